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
import json
import logging
import os
import signal
import sys
import time

import numpy as np
from mxnet import nd

import checkpoints
import plots
from errors import UserError

LOG = logging.getLogger('vaa')
CHECKPOINT_DIR = 'checkpoints'


def checkpoint_path(run_dir, which):
    """``<run_dir>/checkpoints/<which>.params`` (``which``: last or best)."""
    return os.path.join(run_dir, CHECKPOINT_DIR, '%s.params' % which)


class RunFolder(object):
    """The files of one run. Only the lead worker (rank 0) writes; on the others every write is skipped."""

    def __init__(self, path, lead=True):
        self.path, self.lead = path, lead
        self.rows = []

    @classmethod
    def prepare(cls, cfg, lead=True):
        """The folder of ``--resume`` (which must hold a run), or a new one (never one that holds a run)."""
        if not lead:
            return cls(cfg['resume'] or cfg['out'] or '.', lead=False)
        if cfg['resume']:
            if not os.path.isfile(checkpoint_path(cfg['resume'], 'last')):
                raise UserError('--resume %s: no %s/last.params there; give the folder of an earlier run'
                                % (cfg['resume'], CHECKPOINT_DIR))
            folder = cls(cfg['resume'])
            folder.rows = folder.read_rows()
            return folder
        path = cfg['out'] or os.path.join('runs', '%s-%s-%s-%s' % (
            cfg['dataset'], cfg['backbone'], cfg['preset'], time.strftime('%Y%m%d-%H%M%S')))
        if os.path.isfile(checkpoint_path(path, 'last')):
            raise UserError('%s already holds a run; continue it with --resume %s or choose another --out'
                            % (path, path))
        try:
            os.makedirs(os.path.join(path, CHECKPOINT_DIR), exist_ok=True)
            probe = os.path.join(path, '.write-test')
            with open(probe, 'w') as f:
                f.write('ok')
            os.remove(probe)
        except OSError as err:
            raise UserError('cannot write the run folder %s (%s); choose another --out' % (path, err.strerror))
        return cls(path)

    def checkpoint(self, which):
        return checkpoint_path(self.path, which)

    def write_config(self, cfg):
        if self.lead:
            with open(os.path.join(self.path, 'config.json'), 'w') as f:
                json.dump(cfg, f, indent=1, sort_keys=True)

    def read_rows(self):
        path = os.path.join(self.path, 'metrics.json')
        if not os.path.isfile(path):
            return []
        with open(path) as f:
            return json.load(f)

    def add_row(self, row):
        """Append an epoch's row; rewrite metrics.json, metrics.csv and curves.png."""
        self.rows.append(row)
        if not self.lead:
            return
        with open(os.path.join(self.path, 'metrics.json'), 'w') as f:
            json.dump(self.rows, f, indent=1)
        keys = [k for k in self.rows[0] if not isinstance(self.rows[0][k], (list, dict))]
        with open(os.path.join(self.path, 'metrics.csv'), 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=keys, extrasaction='ignore')
            writer.writeheader()
            writer.writerows(self.rows)
        plots.curves(self.rows, os.path.join(self.path, 'curves.png'))

    def save(self, which, net, meta, trainers=None, history=None, extra=None):
        """Write checkpoint ``which`` atomically: the weights, and for ``last`` the optimizer states
        (``trainers``), the prediction history's arrays and a partial epoch's totals (``extra``)."""
        if self.lead:
            checkpoints.save_training(self.checkpoint(which), net, trainers or {}, history, meta, extra)


def setup_logging(run_dir, rank=None):
    """Log to stdout and (rank 0) ``<run_dir>/train.log``; other workers prefix their rank."""
    LOG.setLevel(logging.INFO)
    LOG.handlers[:] = []
    fmt = logging.Formatter('%(asctime)s ' + ('[worker %d] ' % rank if rank else '') + '%(message)s', '%H:%M:%S')
    handlers = [logging.StreamHandler(sys.stdout)]
    if run_dir:
        handlers.append(logging.FileHandler(os.path.join(run_dir, 'train.log')))
    for handler in handlers:
        handler.setFormatter(fmt)
        LOG.addHandler(handler)
    LOG.propagate = False


class Progress(object):
    """tqdm bar on a terminal; otherwise a log line every ``interval`` batches with samples/sec."""

    def __init__(self, total, desc, interval):
        self.total, self.desc, self.interval = total, desc, max(1, interval)
        self.count, self.samples, self.start = 0, 0, time.time()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

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

    def exit(self, epoch, batch, folder):
        """Say how to resume and exit with status 128 + the signal number."""
        name = signal.Signals(self.received[0]).name if self.received else 'a stop request'
        message = ('stopped by %s in epoch %d after batch %d; checkpoint %s written. Resume with:\n'
                   '  python train.py --resume %s' % (name, epoch, batch, folder.checkpoint('last'), folder.path))
        LOG.info(message.replace('\n', ' '))
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
            raise UserError('the training loss became inf/NaN in epoch %d at batch %d; stopped without saving. '
                            'The last good checkpoint is %s (resume with --resume %s, e.g. after lowering the '
                            'learning rate in a new run, or check the data)' % (
                                self.epoch, int(bad), self.folder.checkpoint('last'), self.folder.path))
