#!/usr/bin/env python
"""Evaluate a trained model, or show what it attends to.

    python eval.py runs/demo-resnet18_v1-paper-20261122-101500            # best checkpoint, test split
    python eval.py RUN --split val --checkpoint last --compare paper
    python eval.py RUN --compare rethinking          # the community baseline's table, in its metric
    convention
    python eval.py saved_models/ --preset upstream --dataset wider --data_path /data/WIDER   # authors' files
    python eval.py RUN --image photo1.jpg photo2.png                     # probabilities + attention maps
    python eval.py RUN --export-upstream saved_models/                   # the authors' file layout
    python eval.py RUN --export exported/        # MXNet symbol + params, ONNX, model.json (see export.py)
    python eval.py RUN --export exported/ --int8 # ... and model-int8.onnx, the fastest CPU path

Reports the WIDER mAP protocol and the PETA metrics (``metrics.py``), prints a per-attribute
table and writes the result as JSON (``--out``; default ``<run>/eval_<split>.json``). ``--compare paper``
adds the paper's numbers and the deltas where the paper has any (WIDER-Attribute, PETA); ``--compare
rethinking`` the table of Rethinking_of_PAR's README (PETA, PETA-ZS, PA-100K, RAP, RAPv2, RAP-ZS), with
mA and the instance metrics in its convention (``--metrics rethinking``; ``metrics.py``).
"""
import os

from common import machine

machine.thread_settings()                       # must be set before mxnet is imported


if __name__ == '__main__':                     # --help and flag errors answer before mxnet is imported
    from engine import startup
    startup.preparse('eval')

import shlex  # noqa: E402

import cv2  # noqa: E402

from common.errors import UserError, plural, run_main  # noqa: E402
from datasets import loaders  # noqa: E402
from deploy import export  # noqa: E402
from engine import checkpoints, config, flags, report, runfolder, sources  # noqa: E402
from engine.distributed import parse_contexts  # noqa: E402
from evaluation import attention_maps  # noqa: E402


def build_parser():
    return flags.eval_parser()


IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


def folder_hint(path):
    """``--image`` arguments that name the images in the folder ``path``: a glob per extension found there
    (most frequent first), or None when it holds no image file."""
    counts = {}
    for name in os.listdir(path):
        ext = os.path.splitext(name)[1]
        if ext.lower() in IMAGE_EXTENSIONS and os.path.isfile(os.path.join(path, name)):
            counts[ext] = counts.get(ext, 0) + 1
    if not counts:
        return None
    return ' '.join(shlex.quote(path.rstrip(os.sep)) + os.sep + '*' + ext
                    for ext in sorted(counts, key=lambda e: (-counts[e], e)))


def read_image(path, source='RUN'):
    if os.path.isdir(path):
        out = os.path.join(source, 'predictions.csv') if os.path.isfile(os.path.join(source, 'config.json')) \
            else 'predictions.csv'
        files = folder_hint(path)
        given = ('give image files (--image %s)' % files if files else
                 'and it holds no image file (%s)' % ', '.join(IMAGE_EXTENSIONS))
        raise UserError('--image %s is a folder; %s, or predict every image in it with: %s predict.py %s %s '
                        '--out %s' % (path, given, runfolder.python_command(), shlex.quote(source),
                                      shlex.quote(path), shlex.quote(out)))
    if not os.path.isfile(path):
        raise UserError('--image %s: no such file' % path)
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise UserError('--image %s is not an image OpenCV can read (JPEG, PNG, BMP, ...)' % path)
    return image[:, :, ::-1].copy()


def explain_images(net, cfg, names, paths, out_dir, ctx, source='RUN', shared_scale=False):
    """Print attribute probabilities and write one attention-overlay PNG per image (``shared_scale``: the
    attention maps of all images on one colour scale, so that they can be compared)."""
    images = [read_image(path, source) for path in paths]     # every image checked before any work
    os.makedirs(out_dir, exist_ok=True)
    transform = loaders.transform(cfg)
    seen = attention_maps.attention_of(net, cfg, images, ctx)
    top = net.shared_scale([maps for _, _, maps in seen]) if shared_scale else None
    written = []
    for path, image, out, (x, probs, maps) in zip(paths, images, overlay_names(paths, out_dir), seen):
        print('%s:' % path)
        for name, p in sorted(zip(names, probs), key=lambda t: -t[1]):
            print('  %-16s %.3f' % (name, p))
        crop = transform.eval_view(image)      # show the maps over the crop the network saw
        for i, (figure, what) in enumerate(net.overlays(crop, x, maps, names, probs, out, top)):
            written.append(figure)
            shared = ('' if top is None or i else
                      ' (colour scale shared by the %d images: 0 to %.1f x uniform)' % (len(paths), top))
            print('  %s: %s%s' % (what, figure, shared))
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
    print("wrote %s in the authors' saved_models/ layout to %s" % (plural(len(written), 'file'), folder))
    if (cfg['preset'], cfg['backbone'], cfg['input_size']) == ('upstream', 'resnet101_v1', 224):
        print("the authors' main.py --test loads them (place them in its saved_models/; --num_classes %d)"
              % len(names))
    else:
        print("the authors' code builds only --preset upstream with resnet101_v1 at 224x224, so it cannot "
              "load these; evaluate them with:\n  %s" % upstream_command(cfg, folder))
    return written


def upstream_command(cfg, folder):
    """The eval.py command that evaluates exported saved_models/ files of ``cfg``'s network on its data, its
    result going to the run folder."""
    words = [runfolder.python_command(), 'eval.py', folder, '--preset', cfg['preset'], '--backbone',
             cfg['backbone'],
             '--input-size', str(cfg['input_size']), '--dataset', cfg['dataset']]
    if cfg.get('data_path'):
        words += ['--data_path', cfg['data_path']]
    if cfg.get('limit'):
        words += ['--limit', str(cfg['limit'])]         # the run's own test split
    words += ['--out', os.path.join(cfg['run_dir'], 'eval_upstream_files_test.json')]
    return ' '.join(shlex.quote(w) for w in words)


def main(argv=None):
    args = build_parser().parse_args(argv)
    config.check_ranges(vars(args), [r for r in config.RANGES if r[0] in flags.SCRIPT_RANGES['eval']])
    if args.out:
        report.check_output_file(args.out, '--out')
    ctx = parse_contexts(args.gpus)
    upstream = dict(preset=args.preset, backbone=args.backbone, input_size=args.input_size,
                    dataset=args.dataset,
                    data_path=args.data_path, num_classes=args.num_classes, split=args.split)
    net, cfg, names = sources.load_source(args.source, ctx, args.checkpoint, upstream, overrides=vars(args))
    net.hybridize(static_alloc=True, static_shape=True)
    if args.export_upstream:
        return export_upstream(net, cfg, names, args.export_upstream)
    if args.shared_scale and not args.image:
        raise UserError('--shared-scale goes with --image FILE ... (one colour scale for their attention '
                        'maps)')
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
        return explain_images(net, cfg, names, args.image, out_dir, ctx, args.source, args.shared_scale)
    if not cfg.get('dataset'):
        raise UserError('give --dataset (and --data_path) to evaluate these weights on a split')
    if args.compare == 'rethinking' and args.metrics == 'ours':
        raise UserError("--compare rethinking shows the baseline's numbers in its own metric convention, and "
                        'ours in the same one; drop --metrics ours (eval.py without --compare reports ours)')
    return report.report_split(net, cfg, names, args.split, ctx, args.source, args.out, args.compare)


if __name__ == '__main__':
    run_main(main)
