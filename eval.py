#!/usr/bin/env python
"""Evaluate a trained model, or show what it attends to.

    python eval.py runs/demo-resnet18_v1-paper-20261122-101500            # best checkpoint, test split
    python eval.py RUN --split val --checkpoint last --compare paper
    python eval.py saved_models/ --preset upstream --dataset wider --data_path /data/WIDER   # authors' files
    python eval.py RUN --image photo1.jpg photo2.png                     # probabilities + attention maps
    python eval.py RUN --export-upstream saved_models/                   # the authors' file layout
    python eval.py RUN --export exported/        # MXNet symbol + params, ONNX, model.json (see export.py)
    python eval.py RUN --export exported/ --int8 # ... and model-int8.onnx, the fastest CPU path

Reports the WIDER mAP protocol and the PETA metrics (``metrics.py``), prints a per-attribute
table and writes the result as JSON (``--out``; default ``<run>/eval_<split>.json``). ``--compare paper``
adds the paper's numbers and the deltas where the paper has any (WIDER-Attribute, PETA).
"""
import os

if 'OMP_NUM_THREADS' not in os.environ:        # must be set before mxnet is imported
    os.environ['OMP_NUM_THREADS'] = str(os.cpu_count() or 1)

import cv2  # noqa: E402
from mxnet import nd  # noqa: E402

import checkpoints  # noqa: E402
import config  # noqa: E402
import datasets  # noqa: E402
import export  # noqa: E402
import inference  # noqa: E402
import plots  # noqa: E402
from distributed import parse_contexts  # noqa: E402
from errors import UserError, run_main  # noqa: E402
from backbone import BACKBONES, tap_names  # noqa: E402
from model import PRESETS  # noqa: E402


def build_parser():
    p = config.Parser(description="Evaluate a run folder, a checkpoint file, or the authors' saved_models/ "
                                  'folder. Every flag takes both spellings, e.g. --batch_size or --batch-size.',
                      formatter_class=config.HelpFormatter)
    p.add_argument('source', help="run folder, checkpoint .params file, or a saved_models/ folder of the authors")
    a = config.group_adder(p, 'what to evaluate')
    a('--split', default='test', help='split to evaluate (train, val, test, ...)')
    a('--checkpoint', default='best', choices=['best', 'last'], help='which checkpoint of a run folder')
    a('--compare', choices=['paper'], help="add the paper's numbers and the differences")
    a('--out', help='JSON file for the result (default: <run>/eval_<split>.json)')
    a('--image', nargs='+', metavar='FILE', help='predict these images and draw their attention maps')
    a('--out-dir', help='folder for the attention PNGs (default: <run>/attention)')
    a('--export-upstream', metavar='DIR', help="write the weights in the authors' saved_models/ layout into DIR "
                                              "(their main.py --test loads --preset upstream, resnet101_v1, 224)")
    a('--export', metavar='DIR', help='write model-symbol.json + model-0000.params (MXNet), model.onnx and '
                                      'model.json (attribute names, output, preprocessing) into DIR')
    a('--int8', type=int, nargs='?', const=256, metavar='N',
      help='with --export: also model-int8.onnx, calibrated on N training images (default 256)')
    a = config.group_adder(p, "data and devices (default: the run's)")
    a('--dataset', choices=datasets.names(), help="dataset (default: the run's)")
    a('--data_path', help="dataset root (default: the run's)")
    a('--gpus', help="GPU ids, e.g. '0' (default: the CPU)")
    a('--batch_size', type=int, help="evaluation batch size (default: the run's)")
    a('--num-workers', type=int, help="data-loader worker processes (default: the run's)")
    a('--limit', type=int, help='evaluate only the first N samples')
    a('--partition', type=int, help="PETA partition (default: the run's, else 0)")
    a('--cache-dir', help='WIDER: folder of the cached person crops')
    a('--skip-bad-samples', action='store_true', default=None, help='skip unreadable or malformed samples')
    a = config.group_adder(p, "the authors' saved_models/ (they carry no config)")
    a('--preset', choices=sorted(PRESETS), default='upstream', help="preset of the authors' files")
    a('--backbone', choices=BACKBONES, default='resnet101_v1', help="backbone of the authors' files")
    a('--input-size', type=int, default=224, help="input size for the authors' files")
    a('--num_classes', type=int, help="number of attributes of the authors' files (default: the dataset's)")
    a('--debug', action='store_true', help='show tracebacks')
    return p


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
    transform = config.transform(cfg)
    net.return_attention = True
    written, images = [], [read_image(path) for path in paths]     # every image checked before any work
    for path, image, out in zip(paths, images, overlay_names(paths, out_dir)):
        x = nd.array(transform(image, 0)[None], ctx=ctx[0])
        _, _, fused, maps = net(x)
        probs = nd.sigmoid(fused)[0].asnumpy()
        print('%s:' % path)
        for name, p in sorted(zip(names, probs), key=lambda t: -t[1]):
            print('  %-16s %.3f' % (name, p))
        crop = transform.eval_view(image)      # show the maps over the crop the network saw
        if getattr(net, 'head_kind', 'vaa') == 'apcnn':
            s3, s4, s5, rois, valid, box = [m[0].asnumpy() for m in maps]
            plots.apcnn_overlay(crop, [s[0] for s in (s3, s4, s5)], rois, valid, box,
                                cfg['input_size'] / float(s3.shape[-1]), out)
            written.append(out)
            print('  AP-CNN gates and ROIs: %s' % out)
            continue
        plots.attention_overlay(crop, [m[0].asnumpy() for m in maps], names, probs, out,
                                tap_names(cfg['backbone'], net.taps))
        written.append(out)
        print('  attention maps: %s' % out)
        if net.rga:                            # the RGA modules' spatial attention, in a figure of its own
            rga_out = out.replace('_attention.png', '_rga.png')
            plots.rga_overlay(crop, [(n, m[0, 0].asnumpy()) for n, m in net.rga_attention(x)], rga_out)
            written.append(rga_out)
            print('  RGA spatial attention: %s' % rga_out)
    net.return_attention = False
    return written


def overlay_names(paths, out_dir):
    """``<name>_attention.png`` per image; images of the same name from different folders get the
    folder too (``a/x.png``, ``b/x.png`` -> ``x_attention.png``, ``b_x_attention.png``), never one file."""
    names, used = [], set()
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        parts = os.path.normpath(os.path.abspath(path)).split(os.sep)[:-1]
        name, k = stem, 0
        while name in used:
            k += 1
            name = '_'.join(parts[-k:] + [stem]) if k <= len(parts) else '%s_%d' % (stem, k)
        used.add(name)
        names.append(os.path.join(out_dir, name + '_attention.png'))
    return names


def export_upstream(net, cfg, names, folder):
    """The weights as the authors' saved_models/ files, and which code can read them."""
    written = checkpoints.save_upstream(net, folder)
    print('wrote %d files in the authors\' saved_models/ layout to %s' % (len(written), folder))
    if (cfg['preset'], cfg['backbone'], cfg['input_size']) == ('upstream', 'resnet101_v1', 224):
        print("the authors' main.py --test loads them (place them in its saved_models/; --num_classes %d)"
              % len(names))
    else:
        print("the authors' code builds only --preset upstream with resnet101_v1 at 224x224, so it cannot load "
              'these; eval.py reads them with: --preset %s --backbone %s --input-size %d --num_classes %d'
              % (cfg['preset'], cfg['backbone'], cfg['input_size'], len(names)))
    return written


def main(argv=None):
    args = build_parser().parse_args(argv)
    config.check_ranges(vars(args), [r for r in config.RANGES if r[0] in ('batch_size', 'limit', 'num_workers',
                                                                          'input_size', 'partition')])
    if args.out:
        inference.check_output_file(args.out, '--out')
    ctx = parse_contexts(args.gpus)
    upstream = dict(preset=args.preset, backbone=args.backbone, input_size=args.input_size, dataset=args.dataset,
                    data_path=args.data_path, num_classes=args.num_classes, split=args.split)
    net, cfg, names = inference.load_source(args.source, ctx, args.checkpoint, upstream, overrides=vars(args))
    net.hybridize(static_alloc=True, static_shape=True)
    if args.export_upstream:
        return export_upstream(net, cfg, names, args.export_upstream)
    if args.int8 is not None and (not args.export or args.int8 < 1):
        raise UserError('--int8 N goes with --export DIR and N >= 1 calibration images (it writes '
                        'DIR/model-int8.onnx)')
    if args.export:
        calibration = export.calibration_images(cfg, names, args.int8) if args.int8 else None
        written = export.export(net, cfg, names, args.export, ctx, calibration)
        print('wrote %s' % ', '.join(written))
        return written
    if args.image:
        out_dir = args.out_dir or os.path.join(cfg['run_dir'], 'attention')
        return explain_images(net, cfg, names, args.image, out_dir, ctx)
    if not cfg.get('dataset'):
        raise UserError('give --dataset (and --data_path) to evaluate these weights on a split')
    return inference.report_split(net, cfg, names, args.split, ctx, args.source, args.out, args.compare)


if __name__ == '__main__':
    run_main(main)
