#!/usr/bin/env python
"""Evaluate a trained model, or show what it attends to.

    python eval.py runs/demo-resnet18_v1-paper-20261122-101500            # best checkpoint, test split
    python eval.py RUN --split val --checkpoint last --compare paper
    python eval.py saved_models/ --preset upstream --dataset wider --data_path /data/WIDER   # authors' files
    python eval.py RUN --image photo1.jpg photo2.png                     # probabilities + attention maps

Reports the WIDER mAP protocol and the PETA metrics (SPEC 6; ``metrics.py``), prints a per-attribute
table and writes the result as JSON (``--out``; default ``<run>/eval_<split>.json``). ``--compare paper``
adds the paper's per-attribute numbers and the deltas.
"""
import os

if 'OMP_NUM_THREADS' not in os.environ:        # must be set before mxnet is imported
    os.environ['OMP_NUM_THREADS'] = str(os.cpu_count() or 1)

import argparse  # noqa: E402
import json  # noqa: E402

import cv2  # noqa: E402
from mxnet import nd  # noqa: E402

import checkpoints  # noqa: E402
import datasets  # noqa: E402
import metrics  # noqa: E402
import plots  # noqa: E402
import train as training  # noqa: E402
from datasets.base import Transform  # noqa: E402
from errors import UserError, run_main  # noqa: E402
from model import BACKBONES, PRESETS, get_vaa_net, tap_names  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description='Evaluate a run folder, a checkpoint file, or the authors\' '
                                            'saved_models/ folder.',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a('source', help='run folder, checkpoint .params file, or a saved_models/ folder of the authors')
    a('--split', default='test', help='split to evaluate (train, val, test, ...)')
    a('--checkpoint', default='best', choices=['best', 'last'], help='which checkpoint of a run folder')
    a('--dataset', choices=datasets.names(), help='dataset (default: the run\'s)')
    a('--data_path', help='dataset root (default: the run\'s)')
    a('--compare', choices=['paper'], help="add the paper's numbers and the differences")
    a('--out', help='JSON file for the result (default: <run>/eval_<split>.json)')
    a('--image', nargs='+', metavar='FILE', help='predict these images and draw their attention maps')
    a('--out-dir', help='folder for the attention PNGs (default: <run>/attention)')
    a('--gpus', help="GPU ids, e.g. '0'; CPU when not given")
    a('--batch_size', type=int, help='evaluation batch size (default: the run\'s)')
    a('--num-workers', type=int, help='data-loader worker processes')
    a('--limit', type=int, help='evaluate only the first N samples')
    a('--partition', type=int, help='PETA partition (default: the run\'s, else 0)')
    a('--cache-dir', help='WIDER: folder of the cached person crops')
    a('--skip-bad-samples', action='store_true', default=None, help='skip unreadable or malformed samples')
    # For the authors' saved_models/ (no config there).
    a('--preset', choices=sorted(PRESETS), default='upstream', help="preset of the authors' files")
    a('--backbone', choices=BACKBONES, default='resnet101_v1', help="backbone of the authors' files")
    a('--input-size', type=int, default=224, help="input size for the authors' files")
    a('--num_classes', type=int, help='number of attributes of the authors\' files (default: dataset\'s)')
    a('--debug', action='store_true', help='show tracebacks')
    return p


def resolve_source(source, which='best'):
    """-> (kind, checkpoint path or folder, run folder or None). kind: 'ours' or 'upstream'."""
    if os.path.isfile(source):
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(source)))
        return 'ours', source, run_dir if os.path.isfile(os.path.join(run_dir, 'config.json')) else None
    if os.path.isdir(source):
        ckpt = os.path.join(source, training.CHECKPOINT_DIR, '%s.params' % which)
        if os.path.isfile(ckpt):
            return 'ours', ckpt, source
        if any(os.path.isfile(os.path.join(source, 'backbone_%s.params' % f)) for f in ('resnet', 'densenet')):
            return 'upstream', source, None
        raise UserError('%s is neither a run folder (no %s/%s.params) nor an authors\' saved_models/ folder '
                        '(no backbone_resnet.params)' % (source, training.CHECKPOINT_DIR, which))
    raise UserError('%s does not exist; give a run folder, a checkpoint file or a saved_models/ folder' % source)


def load_model(args, ctx):
    """Build the network and load the weights named by ``args.source``; returns (net, cfg, names)."""
    kind, path, run_dir = resolve_source(args.source, args.checkpoint)
    if kind == 'ours':
        meta, arrays = checkpoints.read_meta(path)
        cfg = dict(meta['config'])
        names = meta.get('attribute_names') or ['attr%d' % i for i in range(cfg['num_classes'])]
        net = get_vaa_net(cfg['backbone'], len(names), cfg['preset'], cfg['input_size'], False, ctx,
                          taps=None)
        checkpoints.load_weights(path, net, arrays)
        cfg['run_dir'] = run_dir or os.path.dirname(os.path.abspath(path))
    else:
        cfg = dict(preset=args.preset, backbone=args.backbone, input_size=args.input_size,
                   dataset=args.dataset, data_path=args.data_path, batch_size=24, num_workers=4, limit=None,
                   normalisation='upstream' if args.preset == 'upstream' else 'paper', run_dir=path)
        data_defaults = datasets.defaults(args.dataset) if args.dataset else {}
        cfg['resize'], cfg['crop_range'] = training.augmentation_geometry(data_defaults, args.input_size)
        if args.num_classes:
            names = ['attr%d' % i for i in range(args.num_classes)]
        elif args.dataset:
            names = list(training.load_split(dict(cfg, limit=1, num_classes=None), args.split).attribute_names)
        else:
            raise UserError("evaluating the authors' saved_models/ needs --dataset (or --num_classes with "
                            '--image)')
        net = get_vaa_net(cfg['backbone'], len(names), cfg['preset'], cfg['input_size'], False, ctx)
        checkpoints.load_upstream(net, path)
        cfg['num_classes'] = len(names)
    for key in ('dataset', 'data_path', 'batch_size', 'limit', 'partition', 'cache_dir', 'skip_bad_samples'):
        if getattr(args, key, None) is not None:
            cfg[key] = getattr(args, key)
    if getattr(args, 'num_workers', None) is not None:
        cfg['num_workers'] = args.num_workers
    return net, cfg, names


def evaluate_split(net, cfg, names, split, ctx, compare=None):
    data = training.load_split(dict(cfg, num_classes=None), split)
    if list(data.attribute_names) != list(names):
        raise UserError('the %s split has attributes %s but the model was trained for %s'
                        % (split, list(data.attribute_names)[:5], list(names)[:5]))
    scores, labels, masks, _ = training.predict(net, training.eval_loader(cfg, data), ctx)
    result = metrics.evaluate(scores, labels, masks, names)
    result['split'] = split
    result['chance_mAP'] = metrics.chance_map(labels, masks)
    paper = None
    if compare == 'paper':
        paper = metrics.PAPER_WIDER_AP
        result['paper'] = dict(wider_mAP=metrics.PAPER_WIDER_MAP, wider_per_attribute=metrics.PAPER_WIDER_AP,
                               peta=metrics.PAPER_PETA)
    return result, paper


def print_result(result, paper, title):
    print(metrics.format_table(result, compare=paper, title=title))
    if result.get('paper'):
        ref = result['paper']
        print('paper: WIDER mAP %.1f (delta %+.1f); PETA mA %.2f acc %.2f prec %.2f rec %.2f F1 %.2f '
              '(deltas %+.2f %+.2f %+.2f %+.2f %+.2f)' % (
                  ref['wider_mAP'], 100 * result['mAP'] - ref['wider_mAP'], ref['peta']['mA'],
                  ref['peta']['accuracy'], ref['peta']['precision'], ref['peta']['recall'], ref['peta']['f1'],
                  100 * result['mA'] - ref['peta']['mA'], 100 * result['accuracy'] - ref['peta']['accuracy'],
                  100 * result['precision'] - ref['peta']['precision'],
                  100 * result['recall'] - ref['peta']['recall'], 100 * result['f1'] - ref['peta']['f1']))


def read_image(path):
    if not os.path.isfile(path):
        raise UserError('--image %s: no such file' % path)
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise UserError('--image %s is not an image OpenCV can read (JPEG, PNG, BMP, ...)' % path)
    return image[:, :, ::-1].copy()


def explain_images(net, cfg, names, paths, out_dir, ctx):
    """Print attribute probabilities and write one attention-overlay PNG per image."""
    os.makedirs(out_dir, exist_ok=True)
    transform = Transform(cfg['input_size'], cfg['resize'], cfg['crop_range'], train=False,
                          normalisation=cfg['normalisation'])
    net.return_attention = True
    written = []
    for path in paths:
        image = read_image(path)
        x = nd.array(transform(image, 0)[None], ctx=ctx[0])
        _, _, fused, maps = net(x)
        probs = nd.sigmoid(fused)[0].asnumpy()
        print('%s:' % path)
        for name, p in sorted(zip(names, probs), key=lambda t: -t[1]):
            print('  %-16s %.3f' % (name, p))
        crop = transform.eval_view(image)      # show the maps over the crop the network saw
        out = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + '_attention.png')
        plots.attention_overlay(crop, [m[0].asnumpy() for m in maps], names, probs, out,
                                tap_names(cfg['backbone'], net.taps))
        written.append(out)
        print('  attention maps: %s' % out)
    net.return_attention = False
    return written


def test_from_train_flags(cfg):
    """``train.py --test``: evaluate the best checkpoint of --resume, or --upstream-weights, on test."""
    source = cfg.get('resume') or cfg.get('upstream_weights')
    if not source:
        raise UserError('--test needs --resume RUN_DIR (our run) or --upstream-weights saved_models/')
    argv = [source, '--split', 'test']
    for flag, key in (('--dataset', 'dataset'), ('--data_path', 'data_path'), ('--gpus', 'gpus'),
                      ('--preset', 'preset'), ('--backbone', 'backbone'), ('--input-size', 'input_size')):
        if cfg.get(key) is not None and (cfg.get('upstream_weights') or key in ('data_path', 'gpus')):
            argv += [flag, str(cfg[key])]
    return main(argv)


def main(argv=None):
    args = build_parser().parse_args(argv)
    ctx = training.parse_contexts(args.gpus)
    net, cfg, names = load_model(args, ctx)
    net.hybridize(static_alloc=True, static_shape=True)
    if args.image:
        out_dir = args.out_dir or os.path.join(cfg['run_dir'], 'attention')
        return explain_images(net, cfg, names, args.image, out_dir, ctx)
    if not cfg.get('dataset'):
        raise UserError('give --dataset (and --data_path) to evaluate these weights on a split')
    result, paper = evaluate_split(net, cfg, names, args.split, ctx, args.compare)
    result['source'] = os.path.abspath(args.source)
    out = args.out or os.path.join(cfg['run_dir'], 'eval_%s.json' % args.split)
    with open(out, 'w') as f:
        json.dump(result, f, indent=1)
    plots.ap_bars(result, os.path.splitext(out)[0] + '_ap.png', args.split, paper)
    print_result(result, paper, '%s split of %s, %s:' % (args.split, cfg['dataset'], args.source))
    print('chance mAP from the label priors: %.2f; written %s' % (100 * result['chance_mAP'], out))
    return result


if __name__ == '__main__':
    run_main(main)
