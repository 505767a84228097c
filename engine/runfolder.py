"""The run folder and the bookkeeping around the training loop.

A run folder (``--out``, default ``runs/<dataset>-<backbone>-<preset>-<time>``) holds::

    config.json              the resolved configuration
    train.log                the log
    metrics.csv, metrics.json, curves.png     one row per epoch, and the curves
    checkpoints/last.params  everything to continue (also from the middle of an epoch)
    checkpoints/best.params  the weights of the best validation epoch
    test_metrics.json, test_ap.png            the test split with the best weights

* :class:`RunFolder`: creating (or reopening, for ``--resume``) the folder and writing every file in it.
* :func:`setup_logging`, :class:`Progress`: the log and the per-batch progress (a bar on a terminal).
* :class:`StopSignals`: SIGINT/SIGTERM end the epoch after the current batch (agreed by all workers).
* :class:`FiniteGuard`: a non-finite training loss stops the run naming the epoch and batch.
"""
import csv
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import sys
import time

import numpy as np
from mxnet import nd

from engine import checkpoints
from evaluation import plots
from common.errors import UserError
from common.files import TEMP_FILE

LOG = logging.getLogger('vaa')
CHECKPOINT_DIR = 'checkpoints'


def checkpoint_path(run_dir, which):
    """``<run_dir>/checkpoints/<which>.params`` (``which``: last or best)."""
    return os.path.join(run_dir, CHECKPOINT_DIR, '%s.params' % which)


def resume_checkpoint(run_dir):
    """The last checkpoint of the run in ``run_dir``; UserError when there is none."""
    path = checkpoint_path(run_dir, 'last')
    if not os.path.isfile(path):
        raise UserError('--resume %s: no %s/last.params there; give the folder of an earlier run'
                        % (run_dir, CHECKPOINT_DIR))
    return path


class FolderLock(object):
    """An exclusive lock on ``<path>/.lock`` (released when the process ends, even by ``kill -9``) that
    names its holder, so that two processes never share a run folder."""

    def __init__(self, path):
        self.path, self._lock = path, None

    def lock(self):
        """Take the folder's lock, or stop naming the process that holds it; then clear the temporary
        files that writers killed mid-write left behind (only the holder writes here)."""
        lock_path = os.path.join(self.path, '.lock')
        handle = open(lock_path, 'a+')
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or 'another process'
            handle.close()
            raise UserError('run folder %s is in use by %s; wait for it to finish or choose another --out'
                            % (self.path, holder))
        handle.seek(0)
        handle.truncate()
        handle.write('process %d on %s since %s' % (os.getpid(), socket.gethostname(),
                                                    time.strftime('%Y-%m-%d %H:%M:%S')))
        handle.flush()
        self._lock = handle
        for folder in (self.path, os.path.join(self.path, CHECKPOINT_DIR)):
            for name in os.listdir(folder) if os.path.isdir(folder) else ():
                if TEMP_FILE.search(name):
                    os.remove(os.path.join(folder, name))

    def close(self):
        if getattr(self, 'board', None) is not None:
            self.board.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None



class RunFolder(FolderLock):
    """The files of one run. Only the lead worker (rank 0) writes; on the others every write is skipped.

    The lead holds an exclusive lock on ``<run>/.lock`` while it works (released when the process
    ends, even by ``kill -9``), so two processes never share a run folder. Every file is written
    through a temporary file and a rename, so a crash never leaves a cut ``metrics.json``.
    """

    MARKER = '.vaa-run'

    def __init__(self, path, lead=True):
        super(RunFolder, self).__init__(path)
        self.lead, self.rows, self.created = lead, [], False
        self.board = None           # the run's TensorBoard writer (engine.board), closed with the folder

    @classmethod
    def prepare(cls, cfg, lead=True):
        """The folder of ``--resume`` (which must hold a run), or a new one: never one that holds a
        run, another process's run, or files that are not a run's."""
        if not lead:
            return cls(cfg['resume'] or cfg['out'] or '.', lead=False)
        if cfg['resume']:
            resume_checkpoint(cfg['resume'])
            folder = cls(cfg['resume'])
            folder.lock()
            folder.rows = folder.read_rows()
            return folder
        path = cfg['out'] or os.path.join('runs', '%s-%s-%s-%s' % (
            cfg['dataset'], cfg['backbone'], cfg['preset'], time.strftime('%Y%m%d-%H%M%S')))
        folder = cls(path)
        check_new(path)
        folder.created = not os.path.exists(path)
        try:
            os.makedirs(os.path.join(path, CHECKPOINT_DIR), exist_ok=True)
            with open(os.path.join(path, cls.MARKER), 'w') as f:
                f.write('a run folder of vaa-attributes (train.py)\n')
        except OSError as err:
            raise UserError('cannot write the run folder %s (%s); choose another --out' % (
                path, err.strerror))
        folder.lock()
        if os.path.isfile(checkpoint_path(path, 'last')):        # another process got there first
            folder.close()
            raise UserError('%s already holds a run; continue it with --resume %s or choose another --out'
                            % (path, path))
        return folder

    def abandon(self):
        """After a failure before the first checkpoint: remove what this run wrote (the whole folder
        when the run created it), so that no empty run folder is left behind."""
        if not self.lead or os.path.isfile(self.checkpoint('last')):
            return
        self.close()
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for name in (self.MARKER, '.lock', 'config.json', 'train.log'):
            if os.path.isfile(os.path.join(self.path, name)):
                os.remove(os.path.join(self.path, name))
        if os.path.isdir(os.path.join(self.path, CHECKPOINT_DIR)) and \
                not os.listdir(os.path.join(self.path, CHECKPOINT_DIR)):
            os.rmdir(os.path.join(self.path, CHECKPOINT_DIR))

    def checkpoint(self, which):
        return checkpoint_path(self.path, which)

    def last_good(self):
        """Where a stopped run can continue from, in words."""
        if not os.path.isfile(self.checkpoint('last')):
            return 'No checkpoint was written yet, so the run folder is not kept'
        return 'The last good checkpoint is %s (%s)' % (self.checkpoint('last'), resume_command(self.path))

    def write_config(self, cfg):
        """config.json (the whole resolved config, which rebuilds the network) and config.yaml (the
        settings, which train.py --config replays)."""
        self.cfg = cfg
        if self.lead:
            write_json(os.path.join(self.path, 'config.json'), cfg, sort_keys=True)
            from engine import config_files
            path = os.path.join(self.path, 'config.yaml')
            text = config_files.yaml_text(path, cfg)

            def write(tmp):
                with open(tmp, 'w') as f:
                    f.write(text)
            checkpoints.atomic_write(path, write)

    def read_rows(self):
        path = os.path.join(self.path, 'metrics.json')
        if not os.path.isfile(path):
            return []
        try:
            with open(path) as f:
                return json.load(f)
        except ValueError as err:
            raise UserError('%s is damaged (%s); restore it or remove it to resume without the earlier rows'
                            % (path, err))

    def add_row(self, row):
        """Append an epoch's row; rewrite metrics.json, metrics.csv and curves.png (atomically)."""
        self.rows.append(row)
        if not self.lead:
            return
        write_json(os.path.join(self.path, 'metrics.json'), self.rows)
        keys = [k for k in self.rows[0] if not isinstance(self.rows[0][k], (list, dict))]

        def write_csv(tmp):
            with open(tmp, 'w', newline='') as f:
                writer = csv.DictWriter(f, fieldnames=keys, extrasaction='ignore')
                writer.writeheader()
                writer.writerows(self.rows)
        checkpoints.atomic_write(os.path.join(self.path, 'metrics.csv'), write_csv)
        cfg = getattr(self, 'cfg', None) or {}
        checkpoints.atomic_write(os.path.join(self.path, 'curves.png'), lambda tmp: plots.curves(
            self.rows, tmp, title=os.path.basename(os.path.normpath(os.path.abspath(self.path))),
            freeze_epochs=cfg.get('freeze_epochs', 0), monitor=cfg.get('monitor', 'mAP'), lr=cfg.get('lr')))

    def save(self, which, net, meta, trainers=None, history=None, extra=None):
        """Write checkpoint ``which`` atomically: the weights, and for ``last`` the optimizer states
        (``trainers``), the prediction history's arrays and a partial epoch's totals (``extra``)."""
        if self.lead:
            checkpoints.save_training(self.checkpoint(which), net, trainers or {}, history, meta, extra)


def check_new(path):
    """Refuse a folder that holds a run or files of the user's (an empty folder is fine)."""
    if os.path.isfile(checkpoint_path(path, 'last')):
        raise UserError('%s already holds a run; continue it with --resume %s or choose another --out'
                        % (path, path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError('cannot write the run folder %s (Not a directory); choose another --out' % path)
    if os.path.isdir(path) and os.listdir(path) and not os.path.exists(os.path.join(path, RunFolder.MARKER)):
        raise UserError('--out %s already holds files that are not a run of ours (%s); choose a new or '
                        'empty folder' % (path, ', '.join(sorted(os.listdir(path))[:3])))


def write_json(path, obj, **kwargs):
    """``obj`` as indented JSON at ``path``, atomically."""
    def write(tmp):
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=1, **kwargs)
    checkpoints.atomic_write(path, write)


def setup_logging(folder=None, rank=None):
    """Log to stdout and (the lead worker) ``<run>/train.log``; other workers prefix their rank."""
    LOG.setLevel(logging.INFO)
    LOG.handlers[:] = []
    fmt = logging.Formatter('%(asctime)s ' + ('[worker %d] ' % rank if rank else '') + '%(message)s',
                            '%H:%M:%S')
    handlers = [logging.StreamHandler(sys.stdout)]
    if folder is not None and folder.lead:
        handlers.append(logging.FileHandler(os.path.join(folder.path, 'train.log')))
    for handler in handlers:
        handler.setFormatter(fmt)
        LOG.addHandler(handler)
    LOG.propagate = False


def log_to_file(message):
    """Put ``message`` in train.log only (it is also written to stderr, so not to stdout again)."""
    record = LOG.makeRecord(LOG.name, logging.INFO, __file__, 0, message, (), None)
    for handler in LOG.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def resume_command(run_dir):
    """The command that continues the run in ``run_dir``, as this process was started: through
    ``run.sh`` (which says so in VAA_LAUNCHER) or with this interpreter."""
    launcher = os.environ.get('VAA_LAUNCHER') or '%s train.py' % python_command()
    return '%s --resume %s' % (launcher, run_dir)


def python_command():
    """How to name this interpreter in a printed command: ``python`` when that is what the PATH finds,
    else its full path."""
    on_path = shutil.which('python')
    same = on_path and os.path.realpath(on_path) == os.path.realpath(sys.executable)
    return 'python' if same else sys.executable


class Progress(object):
    """tqdm bar on a terminal; otherwise a log line every ``interval`` batches with samples/sec."""

    def __init__(self, total, desc, interval, done=0):
        """``total`` batches, of which ``done`` were finished before (a resumed epoch)."""
        self.total, self.desc, self.interval = total, desc, max(1, interval)
        self.count, self.samples, self.start = done, 0, time.time()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=done, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, samples, loss_fn):
        """Count a batch; ``loss_fn()`` gives the running loss (called only when shown: it syncs)."""
        self.count += 1
        self.samples += samples
        if self.bar is not None:
            loss = loss_fn()                # waits for the batch, so the speed below is real
            self.bar.update(1)
            self.bar.set_postfix_str('%.1f samples/s loss %.4f' % (self.speed(), loss))
        elif self.count % self.interval == 0 or self.count == self.total:
            loss = loss_fn()
            LOG.info('%s [%d/%d] Speed: %.1f samples/sec loss=%.4f', self.desc, self.count, self.total,
                     self.speed(), loss)

    def speed(self):
        return self.samples / max(time.time() - self.start, 1e-9)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        return self.speed()


class StopSignals(object):
    """While active, SIGINT and SIGTERM are recorded instead of killing the process, so that the loop
    can finish its batch and write a checkpoint. (Loader workers forked meanwhile inherit the handler.)"""

    def __init__(self):
        self.received, self.previous = [], {}

    def __enter__(self):
        handler = lambda signum, frame: self.received.append(signum)
        self.previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, old in self.previous.items():
            signal.signal(sig, old)

    def requested(self, sync):
        """A signal arrived here or, in a distributed job, on any worker: all stop after the same batch."""
        flag = 1.0 if self.received else 0.0
        if sync.distributed:
            flag = float(sync.allreduce_array('stop', nd.array([flag], ctx=sync.ctx[0])).asscalar())
        return flag > 0

    def exit(self, where, folder, written=True):
        """Say how to resume (once: on stderr, and in train.log) and exit with status 128 + the signal.
        ``where``: when it came ("in epoch 1 after batch 2 of 6"); ``written``: whether a checkpoint was
        written now (else the last one stands: a stop during the test of a finished run)."""
        name = signal.Signals(self.received[0]).name if self.received else 'a stop request'
        message = ('stopped by %s %s; checkpoint %s %s. Resume with:\n  %s'
                   % (name, where, folder.checkpoint('last'), 'written' if written else 'kept',
                      resume_command(folder.path)))
        log_to_file(message.replace('\n ', ''))
        sys.stderr.write(message + '\n')
        raise SystemExit(128 + (self.received[0] if self.received else 0))


class FiniteGuard(object):
    """Remembers on the device the first batch whose loss is inf or NaN (no host sync per batch);
    :meth:`check` stops the run naming the epoch and that batch, before any checkpoint is written."""

    def __init__(self, ctx, epoch, folder):
        self.epoch, self.folder = epoch, folder
        self.first_bad = nd.array([np.inf], ctx=ctx)

    def add(self, batch_no, loss):
        here = nd.full((1,), batch_no, ctx=self.first_bad.context)
        self.first_bad = nd.minimum(self.first_bad, nd.where(nd.contrib.isfinite(loss), self.first_bad, here))

    def check(self):
        bad = float(self.first_bad.asscalar())
        if np.isfinite(bad):
            raise UserError('the training loss became inf/NaN in epoch %d at batch %d; stopped without '
                            'saving. %s; or start a new run with a lower --lr, or check the data'
                            % (self.epoch, int(bad), self.folder.last_good()))
