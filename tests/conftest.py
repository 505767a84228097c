"""Test setup: the scripts' thread settings for MXNet (the cores shared among the workers; before mxnet
is imported), private caches, no network, and seed every test.

Two worker processes (``-n 2 --dist loadfile`` in pytest.ini, pytest-xdist) each run whole test files
with ``OMP_NUM_THREADS`` = the cores / 2: the tests' networks are small, and on 2 cores one thread per
worker in two workers finished the suite in half the time of two threads in one (one thread alone was
faster than two: 122 s against 147 s for two test files). One crash fails one test: a segmentation fault
or abort in native code (MXNet, oneDNN) ends a worker, not the run; the failed test's report names the
signal and shows where the test was (Python's fault handler writes into a file per worker, read back
here), a new worker takes the rest of its files, and the summary line still comes.

Hangs fail too, slowness does not: a test whose process and child processes use less than 1 s of CPU
time over ``VAA_TEST_HANG_SECONDS`` (default 300) s of wall time is deadlocked; its threads' stacks are
written out and its worker stops. A busy machine (load 8 on 2 cores) still gives every test CPU time, so
it only makes tests slower. pytest-timeout's wall-clock limit (pytest.ini) is the last resort.
"""
import atexit
import collections
import ctypes
import ctypes.util
import faulthandler
import gc
import os
import shutil
import signal
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import machine  # noqa: E402

_WORKERS = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT') or 1)
if os.environ.get('PYTEST_XDIST_WORKER') and _WORKERS > 1:       # the cores shared (module docstring)
    _CORES = int(os.environ.get('OMP_NUM_THREADS') or os.cpu_count() or 1)
    os.environ['OMP_NUM_THREADS'] = str(max(1, _CORES // _WORKERS))
machine.thread_settings()           # as the scripts do, before mxnet is imported
# No test touches the network or the user's caches: the model zoo and the WIDER crops go to a fresh
# folder, and a model-zoo download fails at once (connection refused on the loopback discard port).
_CACHE = tempfile.mkdtemp(prefix='vaa-tests-')
os.environ['MXNET_HOME'] = os.path.join(_CACHE, 'mxnet')
os.environ['XDG_CACHE_HOME'] = os.path.join(_CACHE, 'cache')
os.environ['MXNET_GLUON_REPO'] = 'http://127.0.0.1:9/'
atexit.register(shutil.rmtree, _CACHE, True)
os.environ.setdefault('MXNET_ENGINE_TYPE', 'ThreadedEnginePerDevice')
# Set by the first (controlling) process and inherited by the workers it starts.
if 'VAA_TEST_CRASH_DIR' not in os.environ:
    os.environ['VAA_TEST_CRASH_DIR'] = tempfile.mkdtemp(prefix='vaa-test-crashes-')
    atexit.register(shutil.rmtree, os.environ['VAA_TEST_CRASH_DIR'], True)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import mxnet as mx  # noqa: E402

from common import machine  # noqa: E402

WORKER = os.environ.get('PYTEST_XDIST_WORKER')


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)
    mx.random.seed(0)
    yield


@pytest.fixture(scope='session')
def demo_path(tmp_path_factory):
    """The embedded demo dataset, built once per test session in a temporary folder."""
    from datasets import digits
    path = str(tmp_path_factory.mktemp('demo'))
    digits.cached(path, seed=0)
    return path


# The files that take longest (seconds on 2 AMD EPYC cores, two workers), run first: the two workers take
# whole files, so the last file to start decides when the suite ends; the small ones then fill the gaps.
LONGEST_FILES = ('test_portability.py', 'test_reliability.py', 'test_first_hour.py', 'test_related.py',
                 'test_study.py', 'test_boundaries.py', 'test_train_eval.py', 'test_hgat.py',
                 'test_datasets.py', 'test_pedes.py', 'test_scale.py')


def pytest_collection_modifyitems(session, config, items):
    """Longest files first (:data:`LONGEST_FILES`), each file's tests in their own order."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))


def pytest_report_header(config):
    return machine.describe()


# ------------------------------------------------------------------------------------------------ crashes
def _crash_file(worker):
    return os.path.join(os.environ['VAA_TEST_CRASH_DIR'], '%s.txt' % worker)


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    if WORKER:      # after pytest's own faulthandler set-up: fatal signals are written to this worker's file
        config._vaa_crash_log = open(_crash_file(WORKER), 'w')  # pylint: disable=protected-access
        faulthandler.enable(file=config._vaa_crash_log, all_threads=True)  # pylint: disable=protected-access


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem, report, sched):   # pytest-xdist, in the controlling process
    """Put the signal and the test's Python stack into the report of the test that crashed its worker."""
    report.longrepr = _explain_crash(report.node.gateway.id)


def _explain_crash(worker):
    """'crashed: <signal> ...' (one line, for the summary), then where the test was."""
    try:
        with open(_crash_file(worker)) as f:
            text = f.read()
    except OSError:
        text = ''
    lines = text.splitlines()
    what = next((l for l in lines if l.startswith(('Fatal Python error:', 'hang:'))), None)
    if what is None:
        return ("crashed: its worker process ended without a fatal signal (os._exit, or pytest-timeout's "
                "wall-clock limit in pytest.ini: see the stacks printed above)")
    if what.startswith('hang:'):
        return 'hung: ' + what[len('hang: '):] + '\n' + '\n'.join(_test_stacks(lines[lines.index(what) + 1:]))
    name = what.split(':', 1)[1].strip()
    number = {'Segmentation fault': signal.SIGSEGV, 'Aborted': signal.SIGABRT, 'Bus error': signal.SIGBUS,
              'Floating point exception': signal.SIGFPE, 'Illegal instruction': signal.SIGILL}.get(name)
    return ('crashed: %s%s in native code (MXNet/oneDNN)\n%s\nWhere the test was (most recent call '
            'first):\n%s') % (
        name, ' (%s)' % number.name if number else '', machine.describe(),
        '\n'.join(_test_stacks(lines[lines.index(what) + 1:])) or text[:4000])


def _test_stacks(lines):
    """From a fault-handler dump, the stacks of the threads that were running a test, each cut after the
    test's own frames (pytest's frames below them say nothing)."""
    blocks, block = [], []
    for line in lines:
        if line.startswith(('Thread 0x', 'Current thread 0x')):
            blocks.append(block)
            block = [line]
        elif line.startswith('Extension modules'):
            break
        elif line.strip():
            block.append(line)
    blocks.append(block)
    out = []
    for block in blocks:
        ours = [i for i, line in enumerate(block)
                if os.sep + 'tests' + os.sep in line and 'conftest.py' not in line]
        if ours:
            out.extend(block[:ours[-1] + 1])
    return out


# ---------------------------------------------------------------------------------------------- hangs
def _tree_cpu_seconds():
    """CPU seconds of this process, its finished children and its running descendants (Linux), or of
    this process and its finished children elsewhere."""
    tick = os.sysconf('SC_CLK_TCK') if hasattr(os, 'sysconf') else 100
    stats = {}
    try:
        for pid in os.listdir('/proc'):
            if pid.isdigit():
                try:
                    with open('/proc/%s/stat' % pid) as f:
                        fields = f.read().rsplit(')', 1)[1].split()
                except OSError:
                    continue
                stats[int(pid)] = (int(fields[1]), sum(int(v) for v in fields[11:15]))   # ppid, u+s+cu+cs
    except OSError:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system
    children = collections.defaultdict(list)
    for pid, (ppid, _) in stats.items():
        children[ppid].append(pid)
    total, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0))[1]
        todo.extend(children.get(pid, ()))
    return total / float(tick)


class _HangWatch(threading.Thread):
    """Fails the running test when it makes no CPU progress for ``limit`` seconds (module docstring)."""

    def __init__(self, limit, log):
        super().__init__(name='hang-watch', daemon=True)
        self.limit, self.log, self.test, self.lock = limit, log, None, threading.Lock()
        self.since = self.cpu = None

    def start_test(self, nodeid):
        with self.lock:
            self.test, self.since, self.cpu = nodeid, time.monotonic(), _tree_cpu_seconds()

    def end_test(self):
        with self.lock:
            self.test = None

    def run(self):
        while True:
            time.sleep(min(10.0, self.limit / 10.0))
            with self.lock:
                if self.test is None:
                    continue
                now, cpu = time.monotonic(), _tree_cpu_seconds()
                if cpu - self.cpu >= 1.0:
                    self.since, self.cpu = now, cpu
                    continue
                if now - self.since < self.limit:
                    continue
                self._fail(now - self.since)

    def _fail(self, idle):
        message = ('hang: %s used less than 1 s of CPU time (with its child processes) in %.0f s: a '
                   'deadlock, not slowness (VAA_TEST_HANG_SECONDS=%g); the stacks of its threads:'
                   % (self.test, idle, self.limit))
        for out in (self.log, sys.stderr):
            if out is not None:
                out.write('\n' + message + '\n')
                out.flush()
                faulthandler.dump_traceback(file=out, all_threads=True)
                out.flush()
        os._exit(70)   # pylint: disable=protected-access  (with -n 1 the worker is replaced; the run goes on)


_WATCH = []
_CHECKOUT = []
_NOT_THE_CHECKOUTS = ('.venv', '.git', '__pycache__', '.pytest_cache')


def _checkout_files():
    """Every file of the checkout (its environment, git's folder and Python's caches left out)."""
    found = set()
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if d not in _NOT_THE_CHECKOUTS and not d.endswith('.egg-info')]
        found.update(os.path.relpath(os.path.join(folder, f), ROOT) for f in files)
    return found


def pytest_sessionfinish(session, exitstatus):
    """Tests write only into their temporary folders: a file the suite left in the checkout fails it."""
    if _CHECKOUT:
        written = sorted(_checkout_files() - _CHECKOUT[0])
        if written:
            sys.stderr.write('\nthe tests wrote into the checkout (they must write only under their '
                             'temporary folders): %s\n' % ', '.join(written[:20]))
            session.exitstatus = 1


def pytest_sessionstart(session):
    if not WORKER:
        _CHECKOUT.append(_checkout_files())
    limit = float(os.environ.get('VAA_TEST_HANG_SECONDS', 300))
    if limit > 0 and (WORKER or not getattr(session.config.option, 'numprocesses', None)):
        watch = _HangWatch(limit, getattr(session.config, '_vaa_crash_log', None))
        watch.start()
        _WATCH.append(watch)


def _release_memory():
    """Give the memory of the test that just ended back to the OS: its networks are collected, and
    glibc's malloc, which keeps freed blocks in the arena of each thread that allocated them (MXNet's
    engine and OpenMP threads each have one), returns their free pages (``malloc_trim``). Without this the
    worker's resident memory only grows, test after test; with it, the suite's peak is its largest test."""
    gc.collect()
    mx.nd.waitall()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


try:
    _LIBC = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    _LIBC.malloc_trim  # noqa: B018 (glibc only)
except (OSError, AttributeError):
    _LIBC = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    for watch in _WATCH:
        watch.start_test(item.nodeid)
    yield
    for watch in _WATCH:
        watch.end_test()
    _release_memory()
