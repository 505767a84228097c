#!/usr/bin/env python
"""Speed figures: our training/evaluation step vs the authors' execution style, the bare backbone, and
the data pipeline.

    python tools/benchmark.py                                  # resnet101_v1, 224, batch 8, CPU
    python tools/benchmark.py --backbone resnet50_v1 --batch 32 --gpus 0
    python tools/benchmark.py --only data                      # just the data pipeline
    python tools/benchmark.py --only inference --backbone resnet50_v1 --preset paper     # CPU inference paths
    python tools/benchmark.py --only inference --accuracy runs/RUN   # + test mAP of each path on a run's data
    python tools/benchmark.py --only systems --backbone resnet18_v1 --input-size 64 --preset demo   # systems
    python tools/benchmark.py --only steps --preset paper --load 1   # our step beside one busy process
    python tools/benchmark.py --only inference --paths gluon,onnx --batches 1 --load 1

Rows (images/sec, higher is better):

* ``ours train`` / ``ours eval``: what ``train.py`` runs: ``model.build_net``, hybridized with static
  allocation, ``steps.train_step`` with the paper's losses (``losses.VAALoss``) and the prediction
  history, one Trainer per module (``trainers.StageTrainers``).
* ``reference train`` / ``reference eval``: the same architecture executed the way the authors' code
  does it (``upstream_reference.py``: SymbolBlock backbone, per-stage non-hybridized Sequentials, eager
  NDArray spatial softmax, one Trainer per module, sigmoid BCE).
* ``bare backbone train``: the model-zoo backbone alone with a Dense(C) output, hybridized, forward +
  backward + SGD step: the ceiling for anything built on it.
* ``data (files)`` / ``data (RecordIO)``: the training DataLoader (decode, random crop, mirror,
  normalise) over 256x256 JPEG files and over the same images packed with im2rec, with worker threads
  (what train.py uses) and, for comparison, with forked worker processes.

* ``inference``: the fused logits of the network (``export.FusedLogits``) at batch 1 and 32 by four
  paths: the fp32 Gluon graph as predict.py runs it (``deploy.cpu_graph.fused_logits_block``: oneDNN's fused
  graph on the CPU); MXNet's INT8 post-training quantization
  (``quantize_net``, smart mode, naive calibration); onnxruntime on ``model.onnx`` (fp32); onnxruntime
  on ``model-int8.onnx`` (``export.quantize_onnx``: QDQ, per-tensor, min/max). Random weights, so
  speed only; ``--accuracy RUN`` adds each path's test mAP on the run's test split, calibrated on 256
  of its training images.

* ``systems`` (``--only systems``): ``ours train`` / ``ours eval`` for plain VAA and for each related
  system on the same backbone, preset and input (RGA-SC with and without stage 1, the ML-GCN head,
  MC-Loss, AP-CNN when the input is divisible by 32), each also as a ratio to VAA.

``--only steps``: the ``ours train`` and ``ours eval`` rows alone. ``--load N`` times every row with N busy
processes beside it (each a Python loop on one core, ended with the benchmark even when it is killed):
the speed on a shared machine (docs/speed.md, "Speed on a busy machine"). The first line printed names
the thread settings in force (``common.machine.thread_summary``).

Ratios printed at the end: ours/reference, ours/bare backbone, data/ours train; each inference path
against fp32 Gluon at the same batch.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the checkout
from common import machine  # noqa: E402

machine.thread_settings()                       # must be set before mxnet is imported


if __name__ == '__main__':                     # --help and flag errors answer before mxnet is imported
    from engine import startup
    startup.preparse('benchmark')

import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import mxnet as mx  # noqa: E402
from mxnet import autograd, gluon, nd  # noqa: E402

from engine import config  # noqa: E402
from datasets import loaders  # noqa: E402
from engine import flags  # noqa: E402
import related  # noqa: E402
from engine import steps  # noqa: E402
from common.errors import UserError, run_main  # noqa: E402
from engine.distributed import parse_contexts  # noqa: E402
from losses import PredictionHistory, VAALoss  # noqa: E402
from engine.build import build_net  # noqa: E402
from engine.trainers import StageTrainers  # noqa: E402


def _timed(step, warmup, iters, sync):
    for _ in range(warmup):
        step()
    sync()
    start = time.time()
    for _ in range(iters):
        step()
    sync()
    return (time.time() - start) / iters


def ours_steps(args, ctx, x, y, m, **system):
    """What train.py runs, as two callables (train step, eval step): the network of the config, Eq. 7 with
    history weights, the per-stage Trainers, one ``steps.train_step`` per batch; evaluation is the
    hybridized forward pass. ``system``: flags of a related system (``head='apcnn'``, ``mc_loss=True``...)."""
    cfg = config.defaults(backbone=args.backbone, preset=args.preset, input_size=args.input_size,
                          num_classes=args.classes, dataset=None, **system)
    labels = np.random.RandomState(0).randint(0, 2, (256, args.classes)).astype(np.float32)   # ML-GCN's graph
    net = build_net(cfg, [ctx], labels=labels, mask=np.ones_like(labels))
    net.hybridize(static_alloc=True, static_shape=True)
    trainers = StageTrainers(net, [ctx], 'sgd', {'learning_rate': 1e-4, 'momentum': 0.9, 'wd': 5e-4})
    loss = VAALoss(gamma=0.5, aux=related.aux_loss(cfg))
    loss.hybridize(static_alloc=True, static_shape=True)
    history = PredictionHistory(args.batch * 4, args.classes, start_epoch=0, use_epoch=0, ctx=ctx)
    idx = nd.arange(args.batch, dtype='int64')
    for epoch in (0, 1):
        history.update(idx.asnumpy(), nd.random.uniform(shape=(args.batch, args.classes), ctx=ctx), epoch)
    batch = (x, y, m, idx)

    def train_step():
        net.return_aux = loss.aux is not None         # as train.py's epochs (a no-op when it is on already)
        steps.train_step(net, loss, trainers, history, batch, 2, [ctx])

    def eval_step():
        net.return_aux = False
        net(x).fused.wait_to_read()
    return train_step, eval_step


def bench_ours(args, ctx, x, y, m, **system):
    """Images/sec of :func:`ours_steps`: (train, eval)."""
    train_step, eval_step = ours_steps(args, ctx, x, y, m, **system)
    train_s = _timed(train_step, args.warmup, args.iters, nd.waitall)
    eval_s = _timed(eval_step, args.warmup, args.iters, nd.waitall)
    return args.batch / train_s, args.batch / eval_s


# The related systems, each against plain VAA on the same backbone, preset and input (--only systems).
SYSTEMS = (('VAA', {}), ('VAA + RGA-SC at 2,3,4', dict(rga='sc', rga_stages='2,3,4')),
           ('VAA + RGA-SC at 1,2,3,4', dict(rga='sc', rga_stages='1,2,3,4')),
           ('ML-GCN head', dict(head='gcn')),
           ('HGAT-FC head', dict(head='hgat', hgat_groups='contiguous:4')),
           ('VAA + MC-Loss', dict(mc_loss=True)), ('AP-CNN', dict(head='apcnn')))


def bench_systems(args, ctx):
    """Train and eval images/sec of each system of :data:`SYSTEMS`, and each relative to VAA: every
    network is built first, then timed in ``--rounds`` interleaved rounds, and the median round is
    reported (on a shared machine the speed drifts by 10-20% over minutes; interleaving spreads the
    drift over all systems alike)."""
    x = nd.random.normal(shape=(args.batch, 3, args.input_size, args.input_size), ctx=ctx)
    y = nd.array(np.random.randint(0, 2, (args.batch, args.classes)), ctx=ctx)
    m = nd.ones_like(y)
    print('systems: %s, preset %s, input %d, batch %d, %s, OMP_NUM_THREADS=%s, median of %d rounds of %d '
          'steps' % (args.backbone, args.preset, args.input_size, args.batch, ctx,
                     os.environ.get('OMP_NUM_THREADS'), args.rounds, args.iters))
    built = []
    for name, system in SYSTEMS:
        try:
            built.append((name, ours_steps(args, ctx, x, y, m, **system)))
        except UserError as e:      # a system train.py refuses with these settings (AP-CNN at 48 pixels...)
            if not system:
                raise
            print('%s: skipped, %s' % (name, e))
    times = {name: ([], []) for name, _ in built}
    for _ in range(args.rounds):
        for name, step_fns in built:
            for seconds, step in zip(times[name], step_fns):
                seconds.append(_timed(step, args.warmup, args.iters, nd.waitall))
    rows = {name: tuple(args.batch / float(np.median(t)) for t in times[name]) for name, _ in built}
    print('%-28s %12s %12s %10s %10s' % ('', 'train img/s', 'eval img/s', 'train/VAA', 'eval/VAA'))
    for name, (train, evaluation) in rows.items():
        print('%-28s %12.2f %12.2f %9.2fx %9.2fx' % (name, train, evaluation, train / rows['VAA'][0],
                                                     evaluation / rows['VAA'][1]))
    return rows


def bench_reference(args, ctx, x, y, m):
    from tools.upstream_reference import UpstreamReference
    depth = int(args.backbone[len('resnet'):-len('_v1')])
    ref = UpstreamReference(depth, args.classes, args.preset, args.input_size, ctx)
    opt = {'learning_rate': 1e-4, 'momentum': 0.9, 'wd': 5e-4}
    trainers = [gluon.Trainer(block.collect_params(), 'sgd', dict(opt)) for block in ref.modules().values()]
    bce = gluon.loss.SigmoidBinaryCrossEntropyLoss()

    def train_step():
        with autograd.record():
            primary, taps, fused = ref(x)
            loss = bce(primary, y) + sum(bce(t, y) for t in taps)
        loss.backward()
        for trainer in trainers:
            trainer.step(args.batch)
        fused.asnumpy()               # the authors' loop pulled predictions to NumPy every batch

    def eval_step():
        ref(x)[2].asnumpy()
    train_s = _timed(train_step, args.warmup, args.iters, nd.waitall)
    eval_s = _timed(eval_step, args.warmup, args.iters, nd.waitall)
    return args.batch / train_s, args.batch / eval_s


def bench_backbone(args, ctx, x, y):
    """The model-zoo layers alone with global average pooling and a Dense(C) output (``backbone.Backbone``
    without taps: the zoo's own DenseNet ends in a 7x7 pooling that inputs under 224 pixels cannot take)."""
    from backbone import Backbone
    net = Backbone(args.backbone, args.classes, (), input_size=args.input_size)
    net.initialize(mx.init.Xavier(), ctx=ctx)
    net.hybridize(static_alloc=True, static_shape=True)
    trainer = gluon.Trainer(net.collect_params(), 'sgd', {'learning_rate': 1e-4, 'momentum': 0.9, 'wd': 5e-4})
    bce = gluon.loss.SigmoidBinaryCrossEntropyLoss()

    def train_step():
        with autograd.record():
            loss = bce(net(x)[-1], y)
        loss.backward()
        trainer.step(args.batch)
    return args.batch / _timed(train_step, args.warmup, args.iters, nd.waitall)


def _sample_images(folder, count):
    """``count`` 256x256 JPEG crops of scikit-learn's two bundled photos."""
    import cv2
    from sklearn.datasets import load_sample_images
    photos = load_sample_images().images
    rng = np.random.RandomState(0)
    rows = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = rng.randint(120, min(h, w))
        y0, x0 = rng.randint(0, h - side), rng.randint(0, w - side)
        crop = cv2.resize(photo[y0:y0 + side, x0:x0 + side], (256, 256), interpolation=cv2.INTER_AREA)
        rel = 'img/%05d.jpg' % i
        os.makedirs(os.path.join(folder, 'img'), exist_ok=True)
        cv2.imwrite(os.path.join(folder, rel), crop[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
        rows.append(rel)
    return rows


def bench_data(args):
    """Images/sec of the training loader over JPEG files and over RecordIO."""
    import datasets
    from datasets.base import Transform, make_loader
    from datasets.recordio import prepare
    tmp = tempfile.mkdtemp(prefix='vaa-bench-')
    try:
        src, rec = os.path.join(tmp, 'csv'), os.path.join(tmp, 'rec')
        os.makedirs(src)
        rows = _sample_images(src, args.data_images)
        for split in ('train', 'val', 'test'):
            with open(os.path.join(src, '%s.csv' % split), 'w') as f:
                f.write('path,a,b\n' + ''.join('%s,1,0\n' % r for r in rows))
        prepare('csv', src, rec, splits=('train',))
        resize = int(round(256 * args.input_size / 224.0))
        crop = (int(round(128 * args.input_size / 224.0)), args.input_size)
        out = {}
        for name, dataset, path, processes in (('files', 'csv', src, False), ('RecordIO', 'rec', rec, False),
                                               ('files, processes', 'csv', src, True),
                                               ('RecordIO, processes', 'rec', rec, True)):
            ds = datasets.get_split(dataset, path, 'train')
            tf = Transform(args.input_size, resize, crop, train=True)
            loader, sampler = make_loader(ds, tf, args.batch, shuffle=True, num_workers=args.workers,
                                          last_batch='discard', processes=processes)
            sampler.set_epoch(0)
            for _ in loader:                      # warm up the worker processes and the page cache
                break
            sampler.set_epoch(1)
            start, seen = time.time(), 0
            for batch in loader:
                seen += batch[0].shape[0]
            out[name] = seen / (time.time() - start)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def inference_paths(net, cfg, calibration, ctx, folder, wanted=flags.INFERENCE_PATHS):
    """{path name: callable(NCHW float32 NumPy) -> fused logits} for the CPU inference paths of ``wanted``
    (``gluon``, ``int8``, ``onnx``, ``onnx-int8``; fp32 Gluon always, the others' baseline)."""
    from deploy import export
    size = cfg['input_size']
    paths = {}
    # quantize_net and export_symbol hybridize the block they get (and its children) without static
    # allocation: each gets its own wrapper, and the fp32 one is set up last, as eval.py and predict.py run it
    if 'int8' in wanted:
        from mxnet.contrib import quantization
        calib = [[nd.array(np.concatenate(calibration[i:i + 32]))]
                 for i in range(0, len(calibration) - 31, 32)]
        int8 = quantization.quantize_net(export.FusedLogits(net), quantized_dtype='int8',
                                         quantize_mode='smart', calib_mode='naive', calib_data=calib,
                                         num_calib_examples=32 * len(calib), ctx=ctx)
    if 'onnx' in wanted or 'onnx-int8' in wanted:
        symbol_file, params_file = export.export_symbol(net, size, folder, [ctx])
    from deploy import cpu_graph
    block = cpu_graph.fused_logits_block(net, size, ctx)        # what predict.py runs
    paths['fp32 Gluon (oneDNN)'] = lambda x: block(nd.array(x, ctx=ctx)).asnumpy()
    if 'int8' in wanted:
        paths['INT8 MXNet quantize_net'] = lambda x: int8(nd.array(x, ctx=ctx)).asnumpy()
    if 'onnx' in wanted or 'onnx-int8' in wanted:
        fp32_onnx = export.export_onnx(symbol_file, params_file, size, os.path.join(folder, 'model.onnx'))
        if 'onnx' in wanted:
            fp32_session = export.onnx_session(fp32_onnx)
            paths['fp32 onnxruntime'] = lambda x: fp32_session.run(None, {'data': x})[0]
        if 'onnx-int8' in wanted:
            int8_session = export.onnx_session(export.quantize_onnx(
                fp32_onnx, os.path.join(folder, 'model-int8.onnx'), calibration))
            paths['INT8 onnxruntime'] = lambda x: int8_session.run(None, {'data': x})[0]
    return paths


def bench_inference(args, ctx):
    """Images/sec of each inference path at batch 1 and 32 (random weights), and with ``--accuracy RUN``
    each path's mAP on the run's test split."""
    from engine import sources
    import datasets
    from evaluation import metrics
    rows, accuracy, folder = {}, {}, tempfile.mkdtemp()
    try:
        if args.accuracy:
            net, cfg, names = sources.load_source(args.accuracy, [ctx])
            from deploy import export
            calibration = export.calibration_images(cfg, names, 256)
        else:
            cfg = config.defaults(backbone=args.backbone, preset=args.preset, input_size=args.input_size,
                                  num_classes=args.classes, dataset=None)
            net = build_net(cfg, [ctx], pretrained=False)
            calibration = [np.random.normal(size=(1, 3, cfg['input_size'],
                                                  cfg['input_size'])).astype(np.float32)
                           for _ in range(64)]
        paths = inference_paths(net, cfg, calibration, ctx, folder, args.paths)
        for batch in args.batches:
            x = np.random.normal(size=(batch, 3, cfg['input_size'], cfg['input_size'])).astype(np.float32)
            for name, run in paths.items():
                iters = args.iters if batch == 1 else max(2, args.iters // 2)
                rows['%s, batch %d' % (name, batch)] = batch / _timed(lambda: run(x), 1, iters, nd.waitall)
        if args.accuracy:
            test = datasets.load_split(cfg['dataset'], cfg['data_path'], 'test', attribute_names=names,
                                       **loaders.data_options(cfg))
            batches = [(x.asnumpy(), y.asnumpy(), m.asnumpy()) for x, y, m, _ in
                       loaders.eval_loader(dict(cfg, batch_size=32), test)]
            labels, masks = (np.concatenate([b[i] for b in batches]) for i in (1, 2))
            for name, run in paths.items():
                logits = np.concatenate([run(b[0]) for b in batches]).astype(np.float64)
                accuracy[name] = 100 * metrics.evaluate(logits, labels, masks, names)['mAP']
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return rows, accuracy, cfg


class BusyProcesses(object):
    """``with BusyProcesses(n):`` n processes beside this one, each a Python loop that keeps one core busy
    (``--load``): what a second job, a browser or another user does to a shared machine."""
    # A busy loop that ends by itself once its parent is gone (a benchmark killed by a signal must not
    # leave busy processes behind); the parent's pid comes as an argument, so a parent killed before the
    # loop started is noticed too.
    LOOP = ('import os, sys\nparent = int(sys.argv[1])\nwhile os.getppid() == parent:\n'
            '    for _ in range(100000):\n        pass')
    current = []                           # the processes running now (for the tests)

    def __init__(self, count):
        self.count = count

    def __enter__(self):
        import subprocess
        for _ in range(self.count):
            BusyProcesses.current.append(subprocess.Popen([sys.executable, '-c', self.LOOP,
                                                           str(os.getpid())]))
        return self

    def __exit__(self, *exc):
        for proc in BusyProcesses.current:
            proc.kill()
        for proc in BusyProcesses.current:
            proc.wait()
        BusyProcesses.current = []


def main(argv=None):
    p = flags.benchmark_parser()
    args = p.parse_args(argv)
    for flag, least in (('batch', 1), ('iters', 1), ('rounds', 1), ('data_images', 1), ('warmup', 0),
                        ('workers', 0), ('load', 0)):
        if getattr(args, flag) < least:
            p.error('--%s must be at least %d, got %d' % (flag.replace('_', '-'), least, getattr(args, flag)))
    args.paths = [name.strip() for name in args.paths.split(',') if name.strip()]
    unknown = [name for name in args.paths if name not in flags.INFERENCE_PATHS]
    if unknown or not args.paths:
        p.error('--paths: %s is not a path; choose from %s' % (
            ', '.join(unknown) or 'nothing', ','.join(flags.INFERENCE_PATHS)))
    given = args.batches
    try:
        args.batches = [int(b) for b in given.split(',') if b.strip()]
    except ValueError:
        args.batches = []
    if not args.batches or min(args.batches) < 1:
        p.error('--batches: give positive batch sizes separated by commas, e.g. 1,32 (got %r)' % given)
    print('threads: %s' % machine.thread_summary())
    if args.load:
        print('load: %d busy %s beside this one (--load)' % (args.load, 'process' if args.load == 1
                                                               else 'processes'))
    with BusyProcesses(args.load):
        return run(args)


def run(args):
    if args.only == 'startup':
        return bench_startup(args)
    ctx = parse_contexts(args.gpus)[0] if args.gpus else mx.cpu()
    if args.only == 'inference':
        return report_inference(*bench_inference(args, ctx))
    if args.only == 'systems':
        return bench_systems(args, ctx)
    print('benchmark: %s, preset %s, input %d, batch %d, %s, OMP_NUM_THREADS=%s' % (
        args.backbone, args.preset, args.input_size, args.batch, ctx, os.environ.get('OMP_NUM_THREADS')))
    rows = {}
    if args.only != 'data':
        x = nd.random.normal(shape=(args.batch, 3, args.input_size, args.input_size), ctx=ctx)
        y = nd.array(np.random.randint(0, 2, (args.batch, args.classes)), ctx=ctx)
        m = nd.ones_like(y)
        rows['ours train'], rows['ours eval'] = bench_ours(args, ctx, x, y, m)
        if args.only != 'steps':
            if args.backbone.startswith('resnet'):
                rows['reference train'], rows['reference eval'] = bench_reference(args, ctx, x, y, m)
            else:
                print("reference rows: skipped, the authors' code builds ResNet backbones only (not %s)"
                      % args.backbone)
            rows['bare backbone train'] = bench_backbone(args, ctx, x, y)
    if args.only not in ('model', 'steps'):
        for name, value in bench_data(args).items():
            rows['data (%s, %d workers)' % (name, args.workers)] = value
    print('%-40s %12s' % ('', 'images/sec'))
    for name, value in rows.items():
        print('%-40s %12.2f' % (name, value))
    if 'reference train' in rows:
        print('ours / reference: train %.2fx, eval %.2fx' % (rows['ours train'] / rows[
            'reference train'], rows['ours eval'] / rows['reference eval']))
    if 'bare backbone train' in rows:
        print('ours train / bare backbone train: %.0f%%' % (
            100 * rows['ours train'] / rows['bare backbone train']))
        if args.only is None:
            for name in rows:
                if name.startswith('data'):
                    print('%s / ours train: %.1fx' % (name, rows[name] / rows['ours train']))
    return rows


STARTUP = ('train.py', 'eval.py', 'predict.py', 'tools/compare.py', 'tools/benchmark.py', 'tools/study.py')


def bench_startup(args):
    """Seconds until each command's --help has answered, as a whole process (the median of --rounds runs):
    --help and flag errors answer before mxnet is imported."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = {}
    for script in STARTUP:
        times = []
        for _ in range(args.rounds):
            start = time.time()
            subprocess.run([sys.executable, script, '--help'], cwd=root, stdout=subprocess.DEVNULL,
                           check=True)
            times.append(time.time() - start)
        rows[script] = float(np.median(times))
        print('%-22s --help: %.2f s (median of %d)' % (script, rows[script], args.rounds))
    return rows


def report_inference(rows, accuracy, cfg):
    print('inference: %s, preset %s, input %d' % (cfg['backbone'], cfg['preset'], cfg['input_size']))
    print('%-40s %12s %10s' % ('', 'images/sec', 'vs fp32'))
    for name, value in rows.items():
        base = rows['fp32 Gluon (oneDNN), batch %s' % name.rsplit(' ', 1)[1]]
        print('%-40s %12.2f %9.2fx' % (name, value, value / base))
    for name, value in accuracy.items():
        print('test mAP %-31s %12.2f %+9.2f' % (name, value, value - accuracy['fp32 Gluon (oneDNN)']))
    return dict(rows, **{'mAP ' + k: v for k, v in accuracy.items()})


if __name__ == '__main__':
    run_main(main)
