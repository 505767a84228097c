#!/usr/bin/env python
"""Predict the attributes of many images with a trained model: one CSV row per image.

    python predict.py runs/RUN photos/ --out predictions.csv
    python predict.py runs/RUN list.txt a.jpg b.png --out p.csv --threshold val --gpus 0
    python predict.py saved_models/ crops/ --preset upstream --dataset wider --data_path /data/WIDER \
        --out p.csv

SOURCE is a run folder (its best checkpoint), a checkpoint file, the authors' ``saved_models/``, or a
folder written by ``eval.py --export`` (run with onnxruntime: ``model.onnx``, or ``model-int8.onnx``
with ``--int8``, the fastest CPU path).
Each INPUT is an image, a folder (searched recursively for JPEG/PNG/BMP files) or a text file with one
image path per line (relative paths are relative to that file). The CSV has ``path``, one probability
column per attribute (sigmoid of the fused logits) and, with ``--threshold``, one 0/1 column per
attribute (``<name>_pred``): at 0.5, or per attribute at the threshold that maximises its balanced
accuracy (TPR + TNR) / 2 on the run's validation split (``--threshold val``). Images get the
evaluation preprocessing of the model (resize, centre crop, normalisation). Unreadable images are
listed in the log and skipped with ``--skip-bad-images``; otherwise the first one stops the run.
The CSV appears only when complete (written to a temporary file and renamed).
"""
import os

from common import machine

machine.thread_settings()                       # must be set before mxnet is imported


if __name__ == '__main__':                     # --help and flag errors answer before mxnet is imported
    from engine import startup
    startup.preparse('predict')

import csv  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
from mxnet import gluon  # noqa: E402

import datasets  # noqa: E402
from common.errors import UserError, plural, run_main  # noqa: E402
from datasets import loaders  # noqa: E402
from datasets.base import decode_image  # noqa: E402
from deploy import cpu_graph  # noqa: E402
from engine import checkpoints, config, flags, report, sources, steps  # noqa: E402
from engine.distributed import parse_contexts  # noqa: E402
from evaluation import metrics  # noqa: E402

LOG = logging.getLogger('vaa')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')


def build_parser():
    return flags.predict_parser()


def list_images(inputs, skip_bad=False):
    """Every image named by ``inputs`` (files, folders searched recursively, text lists), in order. A list
    entry that is not an image file stops with the list's name and line (``skip_bad``: it is listed and
    left out)."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            for root, dirs, files in os.walk(item):
                dirs.sort()
                paths.extend(os.path.join(root,
                                          f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.isfile(item) and item.lower().endswith(IMAGE_EXTENSIONS):
            paths.append(item)
        elif os.path.isfile(item):
            paths.extend(_read_list(item, skip_bad))
        else:
            raise UserError('input %s does not exist (give image files, folders or text files listing images)'
                            % item)
    if not paths:
        raise UserError('no images found in %s (looked for %s)' % (' '.join(inputs), ', '.join(
            IMAGE_EXTENSIONS)))
    return paths


def _read_list(path, skip_bad):
    """The image paths of a text list (one per line, relative to the list; blank and # lines ignored)."""
    base = os.path.dirname(os.path.abspath(path))
    out = []
    try:
        with open(path, encoding='utf-8-sig') as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise UserError('input %s is neither an image (%s) nor a text list of image paths' % (
            path, ', '.join(IMAGE_EXTENSIONS)))
    for number, line in enumerate(lines, 1):
        entry = line.strip()
        if not entry or entry.startswith('#'):
            continue
        full = entry if os.path.isabs(entry) else os.path.join(base, entry)
        if os.path.isfile(full):
            out.append(full)
            continue
        problem = '%s line %d: %r is not an image file (%s)' % (
            path, number, entry[:80], 'no such file' if entry.lower().endswith(IMAGE_EXTENSIONS) else
            'a text input is read as a list of image paths, one per line, relative to the list')
        if not skip_bad:
            raise UserError(problem + '; fix the line, or pass --skip-bad-images')
        LOG.warning('skipped: %s', problem)
    return out


class ImageList(gluon.data.Dataset):
    """(CHW float32 input, index) per image, or (None, index) for an unreadable one (it is listed)."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            image = decode_image(self.paths[index])
        except UserError:
            return np.zeros((3, self.transform.input_size, self.transform.input_size),
                            np.float32), np.int64(-1 - index)
        return self.transform(image, index), np.int64(index)


def gluon_scorer(net, ctx, input_size):
    """Batch (NDArray) -> fused logits (NumPy) of a Gluon network, the batch split over ``ctx``; the
    network runs as :func:`deploy.cpu_graph.fused_logits_block` (on the CPU, oneDNN's fused graph)."""
    block = cpu_graph.fused_logits_block(net, input_size, ctx[0])

    def score(data):
        parts = gluon.utils.split_and_load(data, ctx[:data.shape[0]], even_split=False)
        return np.concatenate([block(x).asnumpy() for x in parts])
    return score


def onnx_scorer(folder, int8):
    """(score, cfg, names) of an ``eval.py --export`` folder, run by onnxruntime on the CPU."""
    import json
    from deploy import export
    with open(os.path.join(folder, 'model.json')) as f:
        card = json.load(f)
    if 'onnx' not in card['files']:
        raise UserError('%s holds no ONNX model (an AP-CNN export: MXNet symbol files only); predict from '
                        'the run folder instead' % folder)
    name = card['files'].get('onnx_int8') if int8 else card['files']['onnx']
    if name is None:
        raise UserError('%s has no INT8 model; write it with eval.py RUN --export %s --int8' % (
            folder, folder))
    session = export.onnx_session(os.path.join(folder, name))
    cfg = dict(card['model'], crop_range=(card['model']['resize'],) * 2)
    names = card['attributes']
    return (lambda data: session.run([export.OUTPUT_NAME],
                                     {export.INPUT_NAME: data.asnumpy()})[0]), cfg, names


def predict_images(score, cfg, paths, batch_size, workers, skip_bad):
    """(probabilities N x C for the readable images, their paths, the unreadable paths)."""
    loader = gluon.data.DataLoader(ImageList(paths, loaders.transform(cfg)), batch_size=batch_size,
                                   num_workers=workers, thread_pool=True)
    from tqdm import tqdm
    probs, kept, bad = [], [], []
    for data, index in tqdm(loader, total=len(loader), desc='predicting', disable=not sys.stderr.isatty()):
        index = index.asnumpy()
        for i in index[index < 0]:
            bad.append(paths[-1 - i])
            LOG.warning('unreadable image: %s', paths[-1 - i])
        if bad and not skip_bad:
            raise UserError('%s is not a readable image; fix or remove it, or pass --skip-bad-images'
                            % bad[0])
        probs.append(metrics.sigmoid(score(data))[index >= 0])
        kept.extend(paths[i] for i in index[index >= 0])
    return np.concatenate(probs), kept, bad


def validation_thresholds(net, cfg, names, ctx):
    """Per attribute, the threshold on p that maximises (TPR + TNR) / 2 on the run's validation split."""
    data = datasets.load_split(cfg['dataset'], cfg['data_path'], cfg['val_split'],
                               attribute_names=names, **loaders.data_options(cfg))
    logits, labels, masks, _ = steps.predict(net, loaders.eval_loader(cfg, data), ctx)
    probs = metrics.sigmoid(logits)
    return [best_threshold(probs[masks[:, c] > 0, c],
                           labels[masks[:, c] > 0, c] > 0.5) for c in range(len(names))]


def best_threshold(p, y):
    """The threshold t (p >= t is positive) among the scores and 0.5 that maximises (TPR + TNR) / 2 on scores
    ``p`` with truth ``y``; of equally good ones the nearest to 0.5; 0.5 when ``y`` has one class only."""
    if not y.any() or y.all():
        return 0.5                                 # nothing to balance on: the default
    candidates = np.unique(np.r_[p, 0.5])
    scores = np.array([((p >= t) & y).sum() / y.sum() + ((p < t) & ~y).sum() / (~y).sum()
                       for t in candidates])
    best = candidates[scores >= scores.max() - 1e-12]
    return float(best[np.argmin(np.abs(best - 0.5))])      # of equally good ones, nearest 0.5


def write_csv(path, names, paths, probs, thresholds=None):
    def write(tmp):
        with open(tmp, 'w', newline='') as f:
            writer = csv.writer(f)
            flags = ['%s_pred' % n for n in names] if thresholds is not None else []
            writer.writerow(['path'] + list(names) + flags)
            for p, row in zip(paths, probs):
                extra = [int(v >= t) for v, t in zip(row, thresholds)] if thresholds is not None else []
                writer.writerow([p] + ['%.6f' % v for v in row] + extra)
    checkpoints.atomic_write(path, write)


def main(argv=None):
    args = build_parser().parse_args(argv)
    config.check_ranges(vars(args),
                        [r for r in config.RANGES if r[0] in ('batch_size', 'num_workers', 'input_size')])
    if not LOG.handlers:
        logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', datefmt='%H:%M:%S')
    report.check_output_file(args.out, '--out')
    ctx = parse_contexts(args.gpus)
    paths = list_images(args.inputs, args.skip_bad_images)
    upstream = dict(preset=args.preset, backbone=args.backbone, input_size=args.input_size,
                    dataset=args.dataset,
                    data_path=args.data_path, num_classes=args.num_classes, split='val')
    if os.path.isfile(os.path.join(args.source, 'model.json')):
        if args.threshold == 'val':
            raise UserError("--threshold val needs the run folder (its validation split); an export folder "
                            "takes a number")
        score, cfg, names = onnx_scorer(args.source, args.int8)
    else:
        if args.int8:
            raise UserError('--int8 runs an eval.py --export folder; give one as SOURCE')
        net, cfg, names = sources.load_source(args.source, ctx, upstream=upstream,
                                                overrides=dict(dataset=args.dataset,
                                                               data_path=args.data_path))
        net.hybridize(static_alloc=True, static_shape=True)
        score = gluon_scorer(net, ctx, cfg['input_size'])
    thresholds = None
    if args.threshold == 'val':
        thresholds = validation_thresholds(net, cfg, names, ctx)
        LOG.info('thresholds from the validation split: %s',
                 ', '.join('%s %.3f' % t for t in zip(names, thresholds)))
    elif args.threshold is not None:
        try:
            thresholds = [float(args.threshold)] * len(names)
        except ValueError:
            raise UserError("--threshold takes a number or 'val', got %r" % args.threshold)
    probs, kept, bad = predict_images(score, cfg, paths, args.batch_size, args.num_workers,
                                      args.skip_bad_images)
    write_csv(args.out, names, kept, probs, thresholds)
    LOG.info('%s -> %s%s', plural(len(kept), 'image'), args.out,
             '; %d unreadable skipped' % len(bad) if bad else '')
    return dict(paths=kept, probabilities=probs, names=names, thresholds=thresholds, skipped=bad)


if __name__ == '__main__':
    run_main(main)
