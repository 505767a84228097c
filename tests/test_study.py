"""tools/study.py: every system with every seed on one protocol, the statistics over seeds, and the paired
differences; resumable, parallel on CPU groups, and refusing a changed protocol."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from scipy import stats

from common.errors import UserError
from evaluation import statistics
from tests import fixtures
from tools import study

ROOT = fixtures.ROOT
PROTOCOL = ['--epochs', '1', '--limit', '64', '--input-size', '32', '--batch_size', '16']


def _study(args, **kwargs):
    return subprocess.run([sys.executable, 'tools/study.py'] + args, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=fixtures.SUBPROCESS_TIMEOUT, **kwargs)


@pytest.fixture(scope='module')
def tiny_study(demo_path, tmp_path_factory):
    """2 systems x 2 seeds, two at a time on two groups of the cores."""
    out = str(tmp_path_factory.mktemp('study') / 'tiny')
    args = ['--systems', 'vaa,mcloss', '--seeds', '0,1', '--out', out, '--cpu-groups', '2',
            '--data_path', demo_path] + PROTOCOL
    proc = _study(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, args, proc.stdout


def test_a_tiny_study_trains_every_run_and_tabulates_the_seeds(tiny_study):
    out, _, printed = tiny_study
    content = json.load(open(os.path.join(out, 'study.json')))
    assert sorted((r['system'], r['seed']) for r in content['runs']) == [
        ('mcloss', 0), ('mcloss', 1), ('vaa', 0), ('vaa', 1)]
    for system in ('vaa', 'mcloss'):
        results = [json.load(open(os.path.join(out, 'runs', '%s-seed%d' % (system, s), 'test_metrics.json')))
                   for s in (0, 1)]
        want = statistics.summary([r['mAP'] for r in results])
        got = content['systems'][system]['mAP']
        assert got['mean'] == pytest.approx(np.mean([r['mAP'] for r in results]), abs=1e-12)
        assert (got['low'], got['high']) == pytest.approx((want['low'], want['high']), abs=1e-12)
        assert '| %s | 0,1 | %.2f' % (system, 100 * got['mean']) in printed
    diff = content['paired']['mcloss']['mAP']
    vaa = {r['seed']: r['result']['mAP'] for r in content['runs'] if r['system'] == 'vaa'}
    mc = {r['seed']: r['result']['mAP'] for r in content['runs'] if r['system'] == 'mcloss'}
    assert diff['mean'] == pytest.approx(np.mean([mc[s] - vaa[s] for s in (0, 1)]), abs=1e-12)
    for name in ('study.md', 'study.csv', 'study.png'):
        assert os.path.getsize(os.path.join(out, name)) > 0
    assert 'per-attribute test AP, mean over the seeds' in open(os.path.join(out, 'study.md')).read()


def test_a_reader_that_stops_early_gets_no_traceback(tiny_study):
    """``python tools/study.py ... | head``: the pipe closes before the table is written; the study exits
    with status 1 and no traceback on stderr (it was a BrokenPipeError traceback)."""
    _, args, _ = tiny_study
    proc = subprocess.Popen([sys.executable, 'tools/study.py'] + args, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True)
    proc.stdout.close()                                          # the reader is gone before any output
    err = proc.stderr.read()
    assert proc.wait() == 1 and 'Traceback' not in err and 'BrokenPipe' not in err, err


def test_two_cpu_groups_train_two_runs_at_a_time_each_on_its_own_core(tiny_study):
    out, _, _ = tiny_study
    runs = json.load(open(os.path.join(out, 'study.json')))['runs']
    spans = sorted((r['timing']['start'], r['timing']['end'], r['timing']['where']) for r in runs)
    assert {w for _, _, w in spans} == {'cores 0', 'cores 1'}
    assert spans[1][0] < spans[0][1], 'the first two runs did not overlap: %s' % spans
    for r in runs:
        log = open(os.path.join(r['folder'], 'train.log')).read()
        assert 'OMP_NUM_THREADS=1' in log


def test_running_it_again_trains_nothing(tiny_study):
    out, args, _ = tiny_study
    before = {r: os.path.getmtime(os.path.join(out, 'runs', r, 'test_metrics.json'))
              for r in os.listdir(os.path.join(out, 'runs'))}
    timing = [r['timing'] for r in json.load(open(os.path.join(out, 'study.json')))['runs']]
    proc = _study(args)
    assert proc.returncode == 0 and 'study: training' not in proc.stdout and 'resuming' not in proc.stdout
    assert before == {r: os.path.getmtime(os.path.join(out, 'runs', r, 'test_metrics.json')) for r in before}
    # where and when each run trained stays on record (a rerun wrote None over it)
    assert [r['timing'] for r in json.load(open(os.path.join(out, 'study.json')))['runs']] == timing
    assert all(t and t['status'] == 0 for t in timing)


def test_a_changed_protocol_is_refused_naming_the_flag(tiny_study):
    out, args, _ = tiny_study
    changed = [a if a != '64' else '48' for a in args]                   # --limit 48
    with pytest.raises(UserError, match=r'made with another protocol: --limit 64 there, 48 now'):
        study.main(changed)
    with pytest.raises(UserError, match='the study sets it for every run itself'):
        study.main(args + ['--seed', '3'])
    with pytest.raises(UserError, match="unknown system 'gat'"):
        study.main(['--systems', 'vaa,gat', '--out', out])


def test_compare_reads_a_study_folder(tiny_study, tmp_path):
    from tools import compare
    out, _, _ = tiny_study
    rows = compare.main([out, '--out', str(tmp_path / 'c.png')])
    assert sorted(os.path.basename(r['source']) for r in rows) == [
        'mcloss-seed0', 'mcloss-seed1', 'vaa-seed0', 'vaa-seed1']


def _children(pid):
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                stat = open('/proc/%s/stat' % entry).read()
            except OSError:
                continue
            if int(stat.rsplit(')', 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def test_a_study_stopped_mid_run_resumes_it_to_the_same_result(demo_path, tmp_path):
    """Ctrl-C: the study passes it to the run (which checkpoints) and says how to go on; the same command
    resumes the run, which ends as the uninterrupted one did. The run is held (SIGSTOP) from the moment its
    first batch is logged until the signal is on its way, so that it cannot finish first on a busy machine."""
    mine, straight = str(tmp_path / 'stopped'), str(tmp_path / 'straight')
    protocol = ['--data_path', demo_path] + PROTOCOL[2:] + ['--epochs', '2', '--log-interval', '1']
    args = ['--systems', 'vaa', '--seeds', '0', '--out', mine] + protocol
    proc = subprocess.Popen([sys.executable, 'tools/study.py'] + args, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True)
    watchdog = threading.Timer(fixtures.WATCHDOG_SECONDS, proc.kill)
    watchdog.start()
    log = os.path.join(mine, 'runs', 'vaa-seed0', 'train.log')
    while proc.poll() is None and not (os.path.isfile(log) and 'epoch 0 [1/' in open(log).read()):
        time.sleep(0.05)
    held = _children(proc.pid)
    assert len(held) == 1, held
    os.kill(held[0], signal.SIGSTOP)
    proc.send_signal(signal.SIGINT)
    time.sleep(1)                                   # the study passes the signal on within 0.2 s
    os.kill(held[0], signal.SIGCONT)
    _, err = proc.communicate()
    watchdog.cancel()
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    assert 'the interrupted runs resume with the same command' in err
    again = _study(args)
    assert again.returncode == 0 and 'resuming vaa, seed 0' in again.stdout, again.stderr[-2000:]
    assert _study(['--systems', 'vaa', '--seeds', '0', '--out', straight] + protocol).returncode == 0
    results = [json.load(open(os.path.join(s, 'runs', 'vaa-seed0', 'test_metrics.json')))
               for s in (mine, straight)]
    assert results[0]['mAP'] == results[1]['mAP']
    meta = json.load(open(os.path.join(mine, 'runs', 'vaa-seed0', 'metrics.json')))
    assert len(meta) == 2


def test_a_failed_run_is_reported_with_its_reason_and_the_others_go_on(tiny_study, tmp_path, demo_path):
    mine = str(tmp_path / 'failing')
    # seed 1 of vaa: a file where its run folder should be makes train.py stop
    os.makedirs(os.path.join(mine, 'runs'))
    open(os.path.join(mine, 'runs', 'vaa-seed1'), 'w').close()
    proc = _study(['--systems', 'vaa', '--seeds', '0,1', '--out', mine, '--data_path', demo_path] + PROTOCOL)
    assert proc.returncode == 1 and 'study: 1 of 2 runs failed' in proc.stderr, proc.stderr[-2000:]
    content = json.load(open(os.path.join(mine, 'study.json')))
    assert [(m['seed'], 'Not a directory' in m['reason']) for m in content['missing']] == [(1, True)]
    assert content['systems']['vaa']['seeds'] == [0]
    assert 'without a result:\n* vaa, seed 1: error: cannot write the run folder' in open(
        os.path.join(mine, 'study.md')).read()


# the statistics against scipy, on hand-made results ------------------------------------------------------
def test_the_interval_of_the_mean_is_students_t():
    values = [0.7412, 0.7733, 0.7561, 0.7902]
    got = statistics.summary(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert (got['low'], got['high']) == pytest.approx((low, high), abs=1e-12)
    assert got['std'] == pytest.approx(np.std(values, ddof=1), abs=1e-15) and got['n'] == 4
    one = statistics.summary([0.5])
    assert one['mean'] == 0.5 and np.isnan(one['low']) and np.isnan(one['std'])
    assert statistics.summary([0.5, float('nan'), 0.7])['n'] == 2


def test_the_paired_difference_uses_the_common_seeds_and_says_what_it_shows():
    base = {0: 0.70, 1: 0.75, 2: 0.80, 3: 0.72}
    better = {0: 0.72, 1: 0.771, 2: 0.819, 5: 0.99}               # seeds 0-2 in common; +2 points each
    got = statistics.paired(better, base)
    d = [better[s] - base[s] for s in (0, 1, 2)]
    low, high = stats.t.interval(0.95, 2, loc=np.mean(d), scale=stats.sem(d))
    assert got['seeds'] == [0, 1, 2] and (got['low'], got['high']) == pytest.approx((low, high), abs=1e-12)
    assert got['verdict'] == 'better'
    assert statistics.paired({s: v - 0.02 for s, v in base.items()}, base)['verdict'] in ('worse',)
    noisy = statistics.paired({0: 0.71, 1: 0.74, 2: 0.82, 3: 0.71}, base)
    assert noisy['verdict'] == 'within the noise of 4 seeds' and noisy['low'] < 0 < noisy['high']
    # the seed's effect cancels: the paired interval is narrower than the two intervals side by side
    alone = statistics.summary([better[s] for s in (0, 1, 2)])
    assert got['high'] - got['low'] < alone['high'] - alone['low']
    assert statistics.paired({0: 0.5}, {0: 0.4})['verdict'] == 'not enough seeds (1) to tell'
