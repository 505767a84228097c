"""benchmark.py runs for every preset and backbone family, and its reference rows are the authors'
construction of the same network (the rows it cannot build are skipped with the reason)."""
import os
import time

import numpy as np
import pytest

from tools import benchmark

TINY = ['--input-size', '32', '--batch', '2', '--iters', '1', '--warmup', '0', '--only', 'model',
        '--classes', '3']


def test_every_preset_has_its_reference_rows(capsys):
    for preset in ('demo', 'paper', 'upstream'):
        rows = benchmark.main(['--preset', preset, '--backbone', 'resnet18_v1'] + TINY)
        expected = {'ours train', 'ours eval', 'reference train', 'reference eval', 'bare backbone train'}
        assert expected <= set(rows)
        assert all(np.isfinite(v) and v > 0 for v in rows.values())
    assert 'ours / reference' in capsys.readouterr().out


def test_a_densenet_skips_the_reference_rows_and_says_why(capsys):
    rows = benchmark.main(['--preset', 'demo', '--backbone', 'densenet121'] + TINY)
    assert 'reference train' not in rows and rows['bare backbone train'] > 0
    printed = capsys.readouterr().out
    assert "reference rows: skipped, the authors' code builds ResNet backbones only" in printed


def test_only_steps_times_our_training_step_and_evaluation_alone():
    rows = benchmark.main(['--preset', 'demo', '--backbone', 'resnet18_v1'] + TINY[:-4] + ['--only', 'steps',
                                                                                          '--classes', '3'])
    assert set(rows) == {'ours train', 'ours eval'} and all(v > 0 for v in rows.values())


def test_only_the_inference_paths_asked_for_are_built_and_timed():
    rows = benchmark.main(['--only', 'inference', '--paths', 'gluon', '--backbone', 'resnet18_v1',
                           '--preset', 'demo', '--input-size', '32', '--iters', '2', '--classes', '3'])
    assert set(rows) == {'fp32 Gluon (oneDNN), batch 1', 'fp32 Gluon (oneDNN), batch 32'}


def test_an_unknown_inference_path_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit) as err:
        benchmark.main(['--only', 'inference', '--paths', 'gluon,tensorrt'])
    assert err.value.code == 2
    assert '--paths: tensorrt is not a path; choose from gluon,int8,onnx,onnx-int8' in capsys.readouterr().err


def _cpu_seconds(pid):
    with open('/proc/%d/stat' % pid) as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')     # utime + stime


@pytest.mark.skipif(not os.path.isdir('/proc/self'), reason='reads CPU times from /proc (Linux)')
def test_load_runs_busy_processes_beside_the_timing_and_stops_them(monkeypatch):
    """--load N: N processes that each use a core while the rows are timed, and none left after."""
    seen = {}

    def run(args):
        procs = benchmark.BusyProcesses.current
        time.sleep(1.0)
        seen['cpu'] = [_cpu_seconds(p.pid) for p in procs]
        seen['procs'] = list(procs)
        return {}
    monkeypatch.setattr(benchmark, 'run', run)
    benchmark.main(['--load', '2', '--only', 'steps'])
    assert len(seen['procs']) == 2 and all(s > 0.3 for s in seen['cpu']), seen
    assert all(p.poll() is not None for p in seen['procs'])       # killed and reaped
    assert benchmark.BusyProcesses.current == []


_PARENT = '''
import sys, time
sys.path.insert(0, %r)
from tools import benchmark
benchmark.BusyProcesses(1).__enter__()
print(benchmark.BusyProcesses.current[0].pid, flush=True)
time.sleep(600)
'''


@pytest.mark.skipif(not os.path.isdir('/proc/self'), reason='reads /proc (Linux)')
def test_busy_processes_end_with_a_benchmark_killed_by_a_signal():
    """--load's processes must not outlive a benchmark stopped by kill -9 (they did: each kept a core busy
    until someone found it)."""
    import signal
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parent = subprocess.Popen([sys.executable, '-c', _PARENT % root], stdout=subprocess.PIPE,
                              universal_newlines=True)
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    for _ in range(100):
        try:
            with open('/proc/%d/stat' % child) as f:
                state = f.read().rsplit(')', 1)[1].split()[0]
        except OSError:
            break
        if state == 'Z':                  # ended; only its exit status is left (no parent to collect it)
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError('the busy process %d still runs 10 s after its benchmark was killed' % child)
