#!/usr/bin/env python
"""Compare trained systems side by side on the same split.

    python tools/compare.py runs/vaa runs/rga runs/gcn                      # test split of the runs' dataset
    python tools/compare.py runs/vaa saved_models/ --dataset wider --data_path /data/WIDER --split test

Every SOURCE (a run folder, a checkpoint, or the authors' ``saved_models/`` with ``--preset`` etc. as
for eval.py) is evaluated on the same split with the same protocol. Printed: one row per source with
its system and flags, mAP, mA, instance accuracy/precision/recall/F1, parameters, training images/sec
(from its metrics.json) and evaluation images/sec (measured here), with the settings that make runs
comparable (epochs trained, input size, training split, seed) and a line naming every training setting
in which the runs differ; then the per-attribute AP of every source, attributes sorted by how often they
are positive. Written: ``--out`` (default ``runs/compare-<date>-<time>.png``: per-attribute APs side by
side in that order, so the effect of the imbalance shows) and the same numbers as JSON beside it.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the checkout
from common import machine  # noqa: E402

machine.thread_settings()                       # must be set before mxnet is imported


if __name__ == '__main__':                     # --help and flag errors answer before mxnet is imported
    from engine import startup
    startup.preparse('compare')

import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from engine import checkpoints  # noqa: E402
from engine import config  # noqa: E402
from engine import flags  # noqa: E402
import datasets  # noqa: E402
from datasets import loaders  # noqa: E402
from engine import report  # noqa: E402
from engine import sources  # noqa: E402
from evaluation import metrics  # noqa: E402
from evaluation import plots  # noqa: E402
from engine import steps  # noqa: E402
from engine.distributed import parse_contexts  # noqa: E402
from common.errors import UserError, plural, run_main  # noqa: E402


def build_parser():
    return flags.compare_parser()


def expand_studies(sources):
    """A study folder (tools/study.py) stands for its finished run folders, each system's seeds in order."""
    out = []
    for source in sources:
        if os.path.isfile(os.path.join(source, 'study-protocol.json')):
            runs = os.path.join(source, 'runs')
            found = sorted(os.path.join(runs, n) for n in (os.listdir(runs) if os.path.isdir(runs) else ())
                           if os.path.isfile(os.path.join(runs, n, 'test_metrics.json')))
            if not found:
                raise UserError('%s is a study without a finished run yet' % source)
            out += found
        else:
            out.append(source)
    return out


def evaluate_source(source, args, ctx, common, first=None):
    """One row: metrics on the split, parameter count, training and evaluation speed. ``first``: the
    first source's row; a network for other attributes is refused before it sees that source's data."""
    kind = sources.resolve_source(source)[0]
    upstream = dict(preset=args.preset, backbone=args.backbone, input_size=args.input_size,
                    dataset=common.get('dataset'), data_path=common.get('data_path'), split=args.split)
    net, cfg, names = sources.load_source(source, ctx, upstream=upstream,
                                            overrides=dict(common, limit=args.limit))
    if first is not None and list(names) != first['names']:
        if len(names) != len(first['names']):
            raise UserError('%s predicts %d attributes, %s %d: compare systems trained for the same '
                            'attributes' % (source, len(names), first['source'], len(first['names'])))
        k = next(i for i, (a, b) in enumerate(zip(names, first['names'])) if a != b)
        raise UserError('%s predicts other attributes than %s (attribute %d: %s, not %s): compare systems '
                        'trained for the same attributes, in the same order'
                        % (source, first['source'], k + 1, names[k], first['names'][k]))
    net.hybridize(static_alloc=True, static_shape=True)
    data = datasets.load_split(cfg['dataset'], cfg['data_path'], args.split, **loaders.data_options(cfg))
    loader = loaders.eval_loader(cfg, data)
    steps.predict(net, [next(iter(loader))], ctx)                      # warm up (graph, memory)
    start = time.time()
    if args.metrics is None:                       # the first run's convention, for every source
        args.metrics = cfg.get('metrics') or 'ours'
    result = steps.evaluate(net, loader, ctx, names, args.metrics)
    speed = len(data) / (time.time() - start)
    params = sum(int(np.prod(p.shape)) for n, p in net.collect_params().items()
                 if p.grad_req != 'null' or not n.endswith(
                     ('running_mean', 'running_var', 'adjacency', 'embeddings')))
    metrics_file = os.path.join(cfg.get('run_dir', ''), 'metrics.json')
    train_speed, epochs = None, None
    if kind == 'ours' and os.path.isfile(metrics_file):
        rows = json.load(open(metrics_file))
        train_speed = float(np.mean([r['samples_per_sec'] for r in rows])) if rows else None
        epochs = len(rows)
    settings = {key: cfg.get(key) for key, _ in PROTOCOL} if kind == 'ours' else {}
    if kind == 'ours':
        settings['epochs'] = epochs if epochs is not None else cfg['epochs']
    return dict(source=source, system=sources.describe(cfg, kind), result=result, params=params,
                eval_speed=speed,
                train_speed=train_speed,
                frequency=(data.labels * data.mask).sum(0) / np.maximum(data.mask.sum(0), 1),
                names=list(names), dataset=cfg['dataset'], data_path=cfg['data_path'], settings=settings)


# The training settings that make two runs comparable (beside the system, which is what is compared):
# (config key, how the table and the differences line name it).
PROTOCOL = (('epochs', 'epochs'), ('input_size', 'input size'), ('train_split', 'train split'),
            ('partition', 'partition'), ('seed', 'seed'), ('pretrained', 'ImageNet weights'),
            ('lr', 'learning rate'), ('batch_size', 'batch size'), ('optimizer', 'optimizer'),
            ('freeze_epochs', 'first-phase epochs'), ('limit', '--limit'))


def differences(rows):
    """One line naming every training setting in which the runs differ (and each run's value), or saying
    that they share them; the authors' saved_models/ carry no settings and are left out."""
    ours = [(i, r) for i, r in enumerate(rows) if r['settings']]
    if len(ours) < 2:
        return None
    differ = []
    for key, name in PROTOCOL:
        values = [r['settings'].get(key) for _, r in ours]
        if any(v != values[0] for v in values):
            each = ', '.join('#%d %s' % (i + 1, _show(r['settings'].get(key))) for i, r in ours)
            differ.append('%s (%s)' % (name, each))
    if not differ:
        return 'the runs were trained alike (%s)' % ', '.join(
            '%s %s' % (name, _show(ours[0][1]['settings'].get(key))) for key, name in PROTOCOL[:5])
    return 'NOT COMPARABLE as they stand: the runs differ in %s' % '; '.join(differ)


def _show(value):
    return '-' if value is None else ('yes' if value is True else 'no' if value is False else str(value))


def table(rows):
    """The summary table and the per-attribute AP table, as text."""
    pct = lambda v: '%6.2f' % (100 * v) if v is not None and np.isfinite(v) else '%6s' % 'n/a'  # noqa: E731
    width = max(len(r['source']) for r in rows)
    system = max(len('system'), max(len(r['system']) for r in rows))
    lines = ['%-*s  %-*s %6s %6s %6s %6s %6s %6s %6s %5s %-11s %4s %9s %8s %8s' % (
        width, 'source', system, 'system', 'mAP', 'mA', 'Acc', 'Prec', 'Rec', 'F1', 'epochs', 'input',
            'train split',
        'seed', 'params', 'train/s', 'eval/s')]
    for r in rows:
        m, st = r['result'], r['settings']
        lines.append('%-*s  %-*s %s %s %s %s %s %s %6s %5s %-11s %4s %8.1fM %8s %8.1f' % (
            width, r['source'], system, r['system'], pct(m['mAP']), pct(m['mA']), pct(m['accuracy']),
            pct(m['precision']), pct(m['recall']), pct(m['f1']), _show(st.get('epochs')),
                _show(st.get('input_size')),
            _show(st.get('train_split')), _show(st.get('seed')), r['params'] / 1e6,
            '%.1f' % r['train_speed'] if r['train_speed'] else '-', r['eval_speed']))
    note = differences(rows)
    if note:
        lines.append(note)
    order = np.argsort(-rows[0]['frequency'], kind='stable')
    lines.append('')
    lines.append('per-attribute AP (%), most to least frequent positive label:')
    lines.append('%-18s %6s ' % ('attribute',
                                 'pos %') + ' '.join('%9s' % ('#%d' % (i + 1)) for i in range(len(rows))))
    for c in order:
        aps = [r['result']['per_attribute'][c]['ap'] for r in rows]
        lines.append('%-18s %6.1f ' % (rows[0]['names'][c][:18], 100 * rows[0]['frequency'][c]) +
                     ' '.join('%9s' % ('%.2f' % (100 * a) if a is not None else 'n/a') for a in aps))
    lines.append('   '.join('#%d = %s' % (i + 1, r['source']) for i, r in enumerate(rows)))
    return '\n'.join(lines)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.out is None:
        args.out = os.path.join('runs', 'compare-%s.png' % time.strftime('%Y%m%d-%H%M%S'))
        os.makedirs('runs', exist_ok=True)
    config.check_ranges(vars(args), [r for r in config.RANGES if r[0] in ('limit', 'input_size')])
    report.check_output_file(args.out, '--out')
    if not args.out.lower().endswith(('.png', '.pdf', '.svg', '.jpg')):
        raise UserError('--out %s: give the figure a .png (or .pdf, .svg, .jpg) name; the numbers go to a '
                        '.json beside it' % args.out)
    every = expand_studies(args.sources)
    for source in every:                        # a source that is no model stops the command before any work
        sources.resolve_source(source)
    ctx = parse_contexts(args.gpus)
    common = {k: v for k, v in (('dataset', args.dataset), ('data_path', args.data_path)) if v is not None}
    rows = []
    for source in every:
        rows.append(evaluate_source(source, args, ctx, common, rows[0] if rows else None))
        common.setdefault('dataset', rows[0]['dataset'])             # every source on the first one's data
        common.setdefault('data_path', rows[0]['data_path'])
    text = table(rows)
    print('%s split of %s (%s; mA and the instance metrics in %s convention):\n%s' % (
        args.split, rows[0]['dataset'], plural(len(rows), 'source'), metrics.CONVENTION_NAMES[args.metrics],
            text))
    order = list(np.argsort(-rows[0]['frequency'], kind='stable'))
    checkpoints.atomic_write(args.out, lambda tmp: plots.compare_bars(
        [rows[0]['names'][c] for c in order],
            [[r['result']['per_attribute'][c]['ap'] for c in order] for r in rows],
        ['#%d %s (mAP %.2f): %s' % (i + 1, r['source'], 100 * r['result']['mAP'], r['system'])
         for i, r in enumerate(rows)], [rows[0]['frequency'][c] for c in order], tmp))
    summary = [dict(source=r['source'], system=r['system'], params=r['params'], eval_speed=r['eval_speed'],
                    metrics=args.metrics,
                    train_speed=r['train_speed'], settings=r['settings'],
                    **{k: r['result'][k] for k in ('mAP', 'mA', 'accuracy', 'precision', 'recall', 'f1',
                                                   'per_attribute')})
               for r in rows]
    json_path = os.path.splitext(args.out)[0] + '.json'
    checkpoints.atomic_write(json_path, lambda tmp: json.dump(summary, open(tmp, 'w'), indent=1))
    print('written %s and %s' % (args.out, json_path))
    return summary


if __name__ == '__main__':
    run_main(main)
