"""A separate ``gluon.Trainer`` per module of the network (the paper's training design), in one place.

:class:`StageTrainers` owns everything about the Trainers:

* building them: one per module of ``net.stage_modules()`` (``backbone``; per tap ``stage_N/fconv``,
  ``stage_N/fatt``, ``stage_N/fsr``, as the authors' loop had; ``rga`` and ``gcn`` when those
  related systems are on); with ``finetune`` (the authors' meaning) the backbone gets no gradient
  and no Trainer;
* the phases of the paper's schedule (:meth:`StageTrainers.set_phase`): for the first ``freeze_epochs``
  epochs only the attention branches and their classifiers train, with their loss alone; then
  everything end to end;
* the learning rate, one for all Trainers (the authors shared one scheduler between them), and the
  plateau schedule (:class:`PlateauSchedule`) that lowers it;
* the step (:meth:`StageTrainers.step`): gradients summed over devices and workers
  (``distributed.GradientSync``, one KVStore for all Trainers), the float16 overflow check
  (``mixed_precision.LossScaling``), then every Trainer's update, normalised by the global batch.

Updates run on the workers (Trainers without a KVStore of their own), so that every optimizer state
is on hand for checkpoints (``checkpoints.save_training``).
"""
import collections
import logging

import numpy as np
from mxnet import gluon

from engine.distributed import GradientSync
from common.errors import plural
from engine.mixed_precision import LossScaling

LOG = logging.getLogger('vaa')


class PlateauSchedule(object):
    """Divide the learning rate by 10 once the monitored validation metric has not improved for more
    than ``patience`` epochs, at most ``max_drops`` times; also tracks the best epoch.

    ``state_dict()`` uses the checkpoint's keys: ``lr``, ``best``, ``best_epoch``, ``patience`` (epochs
    without improvement so far) and ``drops``.
    """

    def __init__(self, lr, patience, max_drops, monitor='mAP'):
        self.lr, self.patience, self.max_drops = float(lr), int(patience), int(max_drops)
        self.monitor = monitor
        self.best, self.best_epoch, self.waited, self.drops = -1.0, -1, 0, 0
        self.diverged = False

    def update(self, epoch, value):
        """Record ``epoch``'s validation value; True when it is a new best. May lower the rate. A
        non-finite value (the network's outputs were inf/NaN) is never a best: it sets ``diverged``."""
        if not np.isfinite(value):
            self.diverged = True
            return False
        if value > self.best:
            self.best, self.best_epoch, self.waited = value, epoch, 0
            return True
        self.waited += 1
        if self.waited > self.patience and self.drops < self.max_drops:
            self.lr /= 10.0
            self.drops += 1
            self.waited = 0
            LOG.info('no val %s gain for more than %s: learning rate -> %g', self.monitor,
                     plural(self.patience, 'epoch'), self.lr)
        return False

    def state_dict(self):
        return dict(lr=self.lr, best=self.best, best_epoch=self.best_epoch, patience=self.waited,
                    drops=self.drops)

    def load_state_dict(self, state):
        self.lr, self.best, self.best_epoch = state['lr'], state['best'], state['best_epoch']
        self.waited, self.drops = state['patience'], int(state['drops'])


class StageTrainers(object):
    """One ``gluon.Trainer`` per module of ``net``, stepped together.

    Parameters
    ----------
    net : model.AttributeNet
        Its ``stage_modules()`` give the modules.
    ctx : list of Context
        The devices holding the parameters.
    optimizer, optimizer_params
        As for ``gluon.Trainer`` (each Trainer gets its own copy of ``optimizer_params``).
    kvstore : KVStore or None
        ``distributed.create_kvstore``'s store for the gradient exchange (None on one device).
    finetune : bool
        The authors' ``--finetune``: the whole backbone frozen for the whole run (no backbone Trainer).
    freeze_epochs : int
        The paper's first phase: epochs during which only the attention heads train.
    amp : bool
        Float16 training: dynamic loss scaling shared by every Trainer.
    epochs : int, optional
        The run's length, for the phase's log line.
    """

    def __init__(self, net, ctx, optimizer='sgd', optimizer_params=None, kvstore=None, finetune=False,
                 freeze_epochs=0, amp=False, epochs=None):
        self.net, self.finetune, self.freeze_epochs = net, bool(finetune), int(freeze_epochs)
        self.epochs = epochs
        net.freeze(self.finetune)
        self.trainers = collections.OrderedDict(
            (name, gluon.Trainer(params, optimizer, dict(optimizer_params or {}), kvstore=None,
                                 update_on_kvstore=False))
            for name, params in net.stage_modules().items() if not (name == 'backbone' and self.finetune))
        self.params = list(net.collect_params().values())
        self.sync = GradientSync(net, ctx, kvstore)
        self.scaling = LossScaling(amp)
        self.frozen = None

    def set_phase(self, epoch, loss=None):
        """The paper's two phases: before epoch ``freeze_epochs`` only the attention branches and their
        classifiers train (the whole backbone, its output layer and its BatchNorm statistics stay as they
        are, and :attr:`trains_primary` is False); from then on everything trains end to end. ``loss``
        (a ``losses.VAALoss``) gets its primary term switched to match. Returns True when the phase
        changed (and says so in the log)."""
        frozen = epoch < self.freeze_epochs
        if loss is not None:
            loss.primary = not (self.finetune or frozen)
        if self.finetune or frozen == self.frozen:
            return False
        if frozen:
            last = self.freeze_epochs if self.epochs is None else min(self.freeze_epochs, self.epochs)
            LOG.info('%s: backbone and primary classifier frozen, training the attention heads with their '
                     'loss%s',
                     'epoch 0' if last == 1 else 'epochs 0-%d' % (last - 1),
                     ' (the whole run)' if self.epochs is not None and self.freeze_epochs >= self.epochs
                     else '')
        elif self.frozen:
            LOG.info('epoch %d: training end to end', epoch)
        self.net.freeze(frozen, fix_statistics=True)
        self.frozen = frozen
        return True

    @property
    def trains_primary(self):
        """Whether the backbone and its output layer train now, i.e. whether the primary (focal) loss
        applies: not under ``finetune``, not in the first phase."""
        return not (self.finetune or self.frozen)

    @property
    def learning_rate(self):
        return next(iter(self.trainers.values())).learning_rate

    def set_learning_rate(self, lr):
        for trainer in self.trainers.values():
            trainer.set_learning_rate(lr)

    def follow(self, schedule):
        """Every worker takes rank 0's learning rate, drop count and verdict on divergence, and sets the
        rate on every Trainer."""
        lr, drops, diverged = self.sync.broadcast_values('schedule', [
            schedule.lr, schedule.drops, schedule.diverged])
        schedule.lr, schedule.drops, schedule.diverged = lr, int(drops), bool(diverged)
        self.set_learning_rate(lr)

    def scale(self, losses):
        """The losses to differentiate (multiplied by the loss scale under ``--amp``)."""
        return self.scaling.scale_losses(losses)

    def step(self, batch_size):
        """Sum the gradients over devices and workers, then update every Trainer unless a float16
        gradient overflowed. ``batch_size`` is this worker's batch. True when the weights moved."""
        scale = self.scaling.scale
        self.sync.allreduce_grads()
        if not self.scaling.step_allowed(self.params):
            return False
        for trainer in self.trainers.values():
            trainer.update(batch_size * self.sync.num_workers * scale)
        return True
