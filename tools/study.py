#!/usr/bin/env python
"""Compare systems on one protocol over several seeds, with the spread and the paired differences.

    python tools/study.py --systems vaa,rga,gcn,hgat,mcloss,apcnn --seeds 0,1,2 --out runs/study-demo \\
        --input-size 64
    python tools/study.py --systems vaa,hgat:--hgat-layer=fc --seeds 0,1,2 --out runs/study-peta \\
        --data_path /data/PETA --gpus 0,1,2,3

Every (system, seed) is an ordinary run folder, ``<out>/runs/<system>-seed<k>``, trained by train.py with the
study's other flags (the protocol: data, backbone, input size, epochs, preset, metrics, ...) and the system's
own flags. Systems: vaa (the paper), rga (RGA-SC after stages 2-4), gcn (the ML-GCN head), hgat (the HGAT-FC
head), mcloss (MC-Loss), apcnn (AP-CNN; an --input-size divisible by 32), each optionally with flags of its
own after colons (``hgat:--hgat-layer=fc``).

Running the same command again trains nothing that finished, resumes a run that was interrupted, and refuses
a changed protocol; a run that fails is reported as failed with its reason, and the others go on. With
``--gpus 0,1`` one run at a time trains on each GPU, with ``--cpu-groups N`` N runs share the cores (each
on its own cores); otherwise the runs train one after the other.

Written to ``<out>``: study.md (the table, printed too), study.csv, study.json and study.png: per system the
mean, standard deviation and 95% interval (Student t over the seeds) of test mAP, mA and F1 (in the runs'
metric convention), parameters and training time; the paired difference of every system to the baseline
over the same seeds, with its interval and a verdict; and the per-attribute mean AP.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
import collections  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

from common.errors import UserError, run_main  # noqa: E402
from engine import flags  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The README's names of the systems and the switches that turn them on (README, "Related systems").
SYSTEMS = collections.OrderedDict(
    [
        ('vaa', []),
        ('rga', ['--rga', 'sc', '--rga-stages', '2,3,4']),
        ('gcn', ['--head', 'gcn']),
        ('hgat', ['--head', 'hgat']),
        ('mcloss', ['--mc-loss']),
        ('apcnn', ['--head', 'apcnn']),
    ]
)
# train.py flags the study sets for each run itself
MANAGED = ('out', 'resume', 'seed', 'gpus', 'cpus', 'test')
Run = collections.namedtuple('Run', 'label system seed flags folder log')
PROTOCOL_FILE = 'study-protocol.json'


def build_parser():
    p = flags.Parser(
        description='Train every system with every seed on one protocol and compare them with '
        'the spread over seeds and the paired differences (any other flag is a '
        'train.py flag shared by all runs).',
        allow_abbrev=False, formatter_class=flags.HelpFormatter,
    )
    a = flags.group_adder(p, 'the study')
    a(
        '--systems',
        default='vaa',
        help='comma-separated: vaa, rga, gcn, hgat, mcloss, apcnn, each optionally '
        'with flags of its own after colons, e.g. hgat:--hgat-layer=fc',
    )
    a('--seeds', default='0,1,2', help='comma-separated seeds, e.g. 0,1,2')
    a('--out', required=True, help='the study folder (the run folders, logs and tables go there)')
    a('--baseline', default='vaa', help='the system the others are compared with, seed by seed')
    a('--gpus', help="GPU ids, e.g. '0,1,2,3': one run at a time on each (default: the CPU)")
    a(
        '--cpu-groups',
        type=int,
        default=1,
        help='without --gpus: this many runs at a time, each on its own share of the cores',
    )
    a('--report-only', action='store_true', help='train nothing: tabulate the runs that are there')
    a('--debug', action='store_true', help='show tracebacks')
    return p


def parse_systems(text):
    """``vaa,hgat:--hgat-layer=fc`` -> [(label, name, extra flags)]; unknown names are refused by name."""
    out = []
    for item in [i.strip() for i in text.split(',') if i.strip()]:
        name, *extra = item.split(':--')
        if name not in SYSTEMS:
            raise UserError('--systems: unknown system %r; choose from %s' % (name, ', '.join(SYSTEMS)))
        extra_flags = []
        for flag in extra:
            extra_flags += ('--' + flag).split('=', 1)
        out.append((item, name, SYSTEMS[name] + extra_flags))
    labels = [label for label, _, _ in out]
    if len(set(labels)) != len(labels) or not out:
        raise UserError('--systems %s: name each system once' % text)
    return out


def parse_seeds(text):
    try:
        seeds = [int(s) for s in text.split(',') if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UserError('--seeds %s: give distinct whole numbers, 0 or more, e.g. 0,1,2' % text)
    return seeds


def check_protocol(protocol, systems):
    """Every run's flags must resolve as train.py resolves them (so a wrong flag stops the study before any
    training); the flags the study manages are refused. Returns {train.py setting: value} of the protocol."""
    from engine import config

    parser = flags.build_parser()
    args, unknown = parser.parse_known_args(protocol)
    if unknown:
        raise UserError(
            '%s: not a flag of tools/study.py or train.py (python train.py --help lists them)'
            % ' '.join(unknown)
        )
    given = {k: v for k, v in vars(args).items() if v is not None and v != parser.get_default(k)}
    managed = sorted(set(given) & set(MANAGED))
    if managed:
        raise UserError(
            '--%s: the study sets it for every run itself; drop it' % managed[0].replace('_', '-')
        )
    for label, _, extra in systems:
        try:
            config.parse_args(protocol + extra)
        except UserError as err:
            raise UserError('the runs of %s would stop: %s' % (label, err))
        except SystemExit:
            raise UserError('%s: a flag of this system is not a train.py flag' % label)
    return given


def remember(out, protocol, systems):
    """The protocol of the study folder ``out``: written at its first use; afterwards a different one is
    refused, naming the first setting that differs (systems and seeds may be added)."""
    path = os.path.join(out, PROTOCOL_FILE)
    labels = {label: extra for label, _, extra in systems}
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        for key in sorted(set(saved['protocol']) | set(protocol)):
            if saved['protocol'].get(key) != protocol.get(key):
                raise UserError(
                    '%s was made with another protocol: --%s %s there, %s now; use another --out '
                    '(or the same flags)'
                    % (
                        out,
                        key.replace('_', '-'),
                        saved['protocol'].get(key, '(default)'),
                        protocol.get(key, '(default)'),
                    )
                )
        for label, extra in labels.items():
            if label in saved['systems'] and saved['systems'][label] != extra:
                raise UserError(
                    '%s: system %s had the flags %s there' % (out, label, saved['systems'][label])
                )
        labels = dict(saved['systems'], **labels)
    os.makedirs(out, exist_ok=True)
    with open(path, 'w') as f:
        json.dump(dict(protocol=protocol, systems=labels), f, indent=1, sort_keys=True)


def plan(out, systems, seeds):
    """The runs of the study, each with its folder and log."""
    runs = []
    for label, name, extra in systems:
        stem = re.sub(r'[^\w.=-]+', '_', label.replace(':--', '_')) + '-seed%d' % 0
        for seed in seeds:
            stem = stem[: stem.rindex('-seed')] + '-seed%d' % seed
            runs.append(
                Run(
                    label,
                    name,
                    seed,
                    extra,
                    os.path.join(out, 'runs', stem),
                    os.path.join(out, 'logs', stem + '.log'),
                )
            )
    return runs


def state(run):
    """'done', 'interrupted' (a checkpoint to resume), or 'new'."""
    if os.path.isfile(os.path.join(run.folder, 'test_metrics.json')):
        return 'done'
    if os.path.isfile(os.path.join(run.folder, 'checkpoints', 'last.params')):
        return 'interrupted'
    return 'new'


def command(run, protocol_flags):
    """The train.py command of ``run``: a new run, or ``--resume`` of an interrupted one."""
    if state(run) == 'interrupted':
        return [sys.executable, os.path.join(ROOT, 'train.py'), '--resume', run.folder]
    return (
        [sys.executable, os.path.join(ROOT, 'train.py')]
        + protocol_flags
        + run.flags
        + ['--seed', str(run.seed), '--out', run.folder]
    )


def slots(args):
    """Where runs train at the same time: one GPU each, or groups of the cores, or the whole machine."""
    if args.gpus:
        return [dict(gpus=g.strip()) for g in args.gpus.split(',') if g.strip()]
    cores = (
        sorted(os.sched_getaffinity(0))
        if hasattr(os, 'sched_getaffinity')
        else list(range(os.cpu_count() or 1))
    )
    if not 1 <= args.cpu_groups <= len(cores):
        raise UserError(
            '--cpu-groups %d: give 1 to the %d cores of this machine' % (args.cpu_groups, len(cores))
        )
    size = len(cores) // args.cpu_groups
    return [dict(cores=cores[i * size : (i + 1) * size]) for i in range(args.cpu_groups)]


def launch(run, protocol_flags, slot):
    """Start ``run`` on ``slot`` in the background, its output into its log."""
    os.makedirs(os.path.dirname(run.log), exist_ok=True)
    cmd = command(run, protocol_flags) + (['--gpus', slot['gpus']] if 'gpus' in slot else [])
    env = dict(
        os.environ, VAA_LAUNCHER='%s %s' % (shlex.quote(sys.executable), os.path.join(ROOT, 'train.py'))
    )
    preexec = None
    if 'cores' in slot:
        env['OMP_NUM_THREADS'] = str(len(slot['cores']))
        cores = set(slot['cores'])
        preexec = (lambda: os.sched_setaffinity(0, cores)) if hasattr(os, 'sched_setaffinity') else None
    log = open(run.log, 'a')
    log.write('\n$ %s\n' % ' '.join(shlex.quote(c) for c in cmd))
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, preexec_fn=preexec)
    log.close()
    return proc


def train_all(runs, protocol_flags, free, say=print):
    """Train every run that is not done, one per free slot at a time. SIGINT / SIGTERM are passed to the
    runs (which checkpoint) and end the study; returns {folder: (status, reason, start, end, slot)}."""
    pending = [r for r in runs if state(r) != 'done']
    running, timing, stop = {}, {}, []
    handler = lambda signum, frame: stop.append(signum)  # noqa: E731
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while (pending and not stop) or running:
            while pending and free and not stop:
                run, slot = pending.pop(0), free.pop(0)
                say(
                    'study: %s %s, seed %d on %s'
                    % (
                        'resuming' if state(run) == 'interrupted' else 'training',
                        run.label,
                        run.seed,
                        _where(slot),
                    )
                )
                running[run.folder] = (run, slot, launch(run, protocol_flags, slot), time.time())
            for folder, (run, slot, proc, start) in list(running.items()):
                if stop and proc.poll() is None:
                    proc.send_signal(stop[0])
                if proc.poll() is not None:
                    del running[folder]
                    free.append(slot)
                    timing[folder] = (start, time.time(), _where(slot), proc.returncode)
                    say(
                        'study: %s, seed %d: %s'
                        % (
                            run.label,
                            run.seed,
                            'finished' if proc.returncode == 0 else 'stopped (status %d)' % proc.returncode,
                        )
                    )
            time.sleep(0.2)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    return timing, stop


def _where(slot):
    return 'GPU %s' % slot['gpus'] if 'gpus' in slot else 'cores %s' % ','.join(map(str, slot['cores']))


def failure(run):
    """Why ``run`` has no result: not trained yet, interrupted, or the error line of its log (else its last
    line of output)."""
    if state(run) == 'interrupted':
        return 'interrupted; it resumes from its last checkpoint when the study runs again'
    if not os.path.isfile(run.log):
        return 'not trained'
    lines = [l.strip() for l in open(run.log, errors='replace') if l.strip() and not l.startswith('$ ')]
    errors = [l for l in lines if l.startswith('error:') or 'Error' in l.split(':')[0]]
    return (errors or lines or ['no output'])[-1][:300]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, protocol_flags = build_parser().parse_known_args(argv)
    systems, seeds = parse_systems(args.systems), parse_seeds(args.seeds)
    if args.baseline not in [label for label, _, _ in systems]:
        raise UserError('--baseline %s is not among --systems %s' % (args.baseline, args.systems))
    protocol = check_protocol(protocol_flags, systems)
    runs = plan(args.out, systems, seeds)
    free = slots(args)
    remember(args.out, protocol, systems)
    timing, stop = {}, []
    if not args.report_only:
        timing, stop = train_all(runs, protocol_flags, free)
    from tools import study_report

    result = study_report.write(
        args.out, runs, args.baseline, timing, {r.folder: failure(r) for r in runs if state(r) != 'done'}
    )
    failed = [f for f, t in timing.items() if t[3] != 0] if not stop else []
    if failed:
        sys.stderr.write('study: %d of %d runs failed (their reasons are in the table, "without a result")\n'
                         % (len(failed), len(timing)))
        raise SystemExit(1)
    if stop:
        sys.stderr.write(
            'study stopped by %s; the interrupted runs resume with the same command:\n  %s\n'
            % (
                signal.Signals(stop[0]).name,
                ' '.join(shlex.quote(w) for w in ['python', 'tools/study.py'] + argv),
            )
        )
        raise SystemExit(128 + stop[0])
    return result


if __name__ == '__main__':
    run_main(main)
