"""The tables of a study (``tools/study.py``): what every run reached, per system the spread over seeds, the
paired differences to the baseline, the per-attribute mean AP; written as study.md, study.csv, study.json and
study.png, and printed."""

import csv
import json
import os

import numpy as np

from engine import checkpoints
from evaluation import statistics

METRICS = (('mAP', 'mAP'), ('mA', 'mA'), ('f1', 'F1'))
FROZEN = ('running_mean', 'running_var', 'adjacency', 'embeddings')  # stored, not trained (compare.py's)


def read_run(run):
    """The run's test result, parameter count and training time, or None when it has none."""
    path = os.path.join(run.folder, 'test_metrics.json')
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        result = json.load(f)
    rows_path = os.path.join(run.folder, 'metrics.json')
    rows = json.load(open(rows_path)) if os.path.isfile(rows_path) else []
    meta, arrays = checkpoints.read_meta(os.path.join(run.folder, 'checkpoints', 'best.params'))
    params = sum(
        int(np.prod(v.shape)) for k, v in arrays.items() if k.startswith('param/') and not k.endswith(FROZEN)
    )
    return dict(
        mAP=result['mAP'],
        mA=result['mA'],
        f1=result['f1'],
        convention=result.get('metrics', 'ours'),
        per_attribute={a['name']: a['ap'] for a in result['per_attribute']},
        params=params,
        train_seconds=float(sum(r.get('seconds', 0) for r in rows)),
        epochs=len(rows),
    )


def collect(runs, failures):
    """{label: {seed: result}} of the finished runs, and the list of the others with their reasons."""
    done, missing = {}, []
    for run in runs:
        result = read_run(run)
        if result is None:
            missing.append(
                dict(system=run.label, seed=run.seed, reason=failures.get(run.folder, 'not trained'))
            )
        else:
            done.setdefault(run.label, {})[run.seed] = result
    return done, missing


def summarise(done, labels, baseline):
    """Per system the summary of every metric, and the paired differences to ``baseline``."""
    table, paired = {}, {}
    base = done.get(baseline, {})
    for label in labels:
        seeds = done.get(label, {})
        row = {key: statistics.summary([r[key] for r in seeds.values()]) for key, _ in METRICS}
        row.update(
            seeds=sorted(seeds),
            params=_first(seeds, 'params'),
            train_minutes=statistics.summary([r['train_seconds'] / 60 for r in seeds.values()])['mean'],
        )
        table[label] = row
        if label != baseline:
            paired[label] = {
                key: statistics.paired(
                    {s: r[key] for s, r in seeds.items()}, {s: r[key] for s, r in base.items()}
                )
                for key, _ in METRICS
            }
    return table, paired


def _first(seeds, key):
    return next((r[key] for r in seeds.values()), None)


def _pct(v):
    return 'n/a' if v is None or v != v else '%.2f' % (100 * v)


def _interval(s):
    if s['n'] < 2:
        return '%s (1 seed)' % _pct(s['mean']) if s['n'] else 'n/a'
    return '%s ± %s [%s, %s]' % (_pct(s['mean']), _pct(s['std']), _pct(s['low']), _pct(s['high']))


def markdown(table, paired, done, missing, baseline, convention):
    """The study as Markdown: the systems, the paired differences, the per-attribute mean AP, the failures."""
    lines = [
        '| system | seeds | test mAP | mA | F1 | parameters | training min/run |',
        '|---|---|---|---|---|---|---|',
    ]
    for label, row in table.items():
        lines.append(
            '| %s | %s | %s | %s | %s | %s | %s |'
            % (
                label,
                ','.join(map(str, row['seeds'])) or '-',
                _interval(row['mAP']),
                _interval(row['mA']),
                _interval(row['f1']),
                '%.2fM' % (row['params'] / 1e6) if row['params'] else '-',
                '%.1f' % row['train_minutes'] if row['train_minutes'] == row['train_minutes'] else '-',
            )
        )
    lines += [
        '',
        'mean ± standard deviation [95%% interval, Student t over the seeds], in points; mA and F1 in '
        '%s convention.'
        % ("the community's (Rethinking_of_PAR)" if convention == 'rethinking' else 'our (DeepMAR)'),
        '',
        '| %s, paired over the same seeds | mAP | mA | F1 |' % ('difference to ' + baseline),
        '|---|---|---|---|',
    ]
    for label, diffs in paired.items():
        lines.append(
            '| %s | %s |'
            % (
                label,
                ' | '.join('%s: %s' % (_signed(diffs[key]), diffs[key]['verdict']) for key, _ in METRICS),
            )
        )
    lines += ['', per_attribute(table, done)]
    if missing:
        lines += ['', 'without a result:'] + [
            '* %s, seed %d: %s' % (m['system'], m['seed'], m['reason']) for m in missing
        ]
    return '\n'.join(lines) + '\n'


def _signed(d):
    if d['n'] < 2:
        return 'n/a' if not d['n'] else '%+.2f' % (100 * d['mean'])
    return '%+.2f [%+.2f, %+.2f]' % (100 * d['mean'], 100 * d['low'], 100 * d['high'])


def per_attribute(table, done):
    """Each attribute's AP, averaged over a system's seeds (points); n/a where it had no positive label."""
    labels = [l for l in table if done.get(l)]
    if not labels:
        return 'no finished run yet'
    names = list(next(iter(done[labels[0]].values()))['per_attribute'])
    lines = ['| attribute | %s |' % ' | '.join(labels), '|---|%s' % ('---|' * len(labels))]
    for name in names:
        cells = []
        for label in labels:
            aps = [r['per_attribute'].get(name) for r in done[label].values()]
            aps = [a for a in aps if a is not None]
            cells.append('%.2f' % (100 * np.mean(aps)) if aps else 'n/a')
        lines.append('| %s | %s |' % (name, ' | '.join(cells)))
    return '\n'.join(['per-attribute test AP, mean over the seeds:', ''] + lines)


def _earlier_timing(out):
    """{run folder: its timing record} from the study.json of an earlier call ({} if none or unreadable)."""
    try:
        with open(os.path.join(out, 'study.json')) as f:
            return {r['folder']: r['timing'] for r in json.load(f)['runs'] if r.get('timing')}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def write(out, runs, baseline, timing, failures, say=print):
    """Write study.md / .csv / .json / .png into ``out`` and print the Markdown; returns the JSON content."""
    labels = list(dict.fromkeys(r.label for r in runs))
    done, missing = collect(runs, failures)
    table, paired = summarise(done, labels, baseline)
    convention = next((r['convention'] for seeds in done.values() for r in seeds.values()), 'ours')
    text = markdown(table, paired, done, missing, baseline, convention)
    with open(os.path.join(out, 'study.md'), 'w') as f:
        f.write(text)
    _write_csv(os.path.join(out, 'study.csv'), table, paired)
    before = _earlier_timing(out)
    content = dict(
        baseline=baseline,
        convention=convention,
        systems=table,
        paired=paired,
        missing=missing,
        runs=[
            dict(
                system=r.label,
                seed=r.seed,
                folder=r.folder,
                result={
                    k: v for k, v in done.get(r.label, {}).get(r.seed, {}).items() if k != 'per_attribute'
                }
                or None,
                timing=dict(zip(('start', 'end', 'where', 'status'), timing[r.folder]))
                if r.folder in timing
                else before.get(r.folder),      # trained by an earlier call: its record stays
            )
            for r in runs
        ],
    )
    with open(os.path.join(out, 'study.json'), 'w') as f:
        json.dump(content, f, indent=1)
    from evaluation import plots

    plots.study_points(
        labels, done, [k for k, _ in METRICS], [n for _, n in METRICS], table, os.path.join(out, 'study.png')
    )
    say(
        text
        + '\nwritten %s' % ', '.join(os.path.join(out, 'study.' + e) for e in ('md', 'csv', 'json', 'png'))
    )
    return content


def _write_csv(path, table, paired):
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        head = ['system', 'seeds']
        for key, name in METRICS:
            head += ['%s_%s' % (name, s) for s in ('mean', 'std', 'low', 'high')]
            head += ['%s_diff_%s' % (name, s) for s in ('mean', 'low', 'high', 'verdict')]
        writer.writerow(head + ['parameters', 'train_minutes'])
        for label, row in table.items():
            cells = [label, ' '.join(map(str, row['seeds']))]
            for key, _ in METRICS:
                cells += [row[key][s] for s in ('mean', 'std', 'low', 'high')]
                d = paired.get(label, {}).get(key)
                cells += [d[s] for s in ('mean', 'low', 'high', 'verdict')] if d else ['', '', '', '']
            writer.writerow(cells + [row['params'], row['train_minutes']])
