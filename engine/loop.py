"""The bookkeeping around ``train.py``'s epoch loop, so that the loop reads like the method:

* :func:`setup`: devices, workers and, with ``--resume``, the run's own config; the seeds; AMP.
* :class:`Training`: what a checkpoint stores (network, loss, prediction history, Trainers, schedule) with
  the run folder it is saved in: restoring it, saving it after an epoch or an interrupted one, the epoch's
  log lines and metrics row.
* :func:`finished`: a resumed run that has nothing left to train; :func:`first_notes`: why a run has no
  first phase, or a hint for a first try on the CPU; :func:`start_log`: the log's first lines.
"""
import collections
import json
import logging
import os
import time

import numpy as np
import mxnet as mx

from common import machine
from common.errors import UserError, plural
from common.presets import PRESET_SETTINGS
from engine import checkpoints, config, distributed, mixed_precision, runfolder

LOG = logging.getLogger('vaa')
Place = collections.namedtuple('Place', 'ctx kvstore rank workers')     # where this worker trains


def setup(cfg, explicit):
    """-> (cfg, :data:`Place`, the checkpoint to resume or None): devices, workers and, with --resume, the
    run's own config (checked before anything is written)."""
    ctx = distributed.parse_contexts(cfg['gpus'], cfg['cpus'])
    kvstore = distributed.create_kvstore(cfg['kvstore'], len(ctx))
    rank, workers = (kvstore.rank, kvstore.num_workers) if kvstore is not None else (0, 1)
    resumed = None
    if cfg['resume']:
        resumed = checkpoints.read_meta(runfolder.resume_checkpoint(cfg['resume']))
        cfg = config.merge_resume(cfg, resumed[0]['config'], explicit, resumed[0]['state'])
    mx.random.seed(cfg['seed'])
    np.random.seed(cfg['seed'])
    if cfg['amp']:
        mixed_precision.init_amp(ctx)           # before the network is built
    return cfg, Place(ctx, kvstore, rank, workers), resumed


def start_log(folder, place, cfg, threads):
    """The log (stdout and the lead's train.log) and its first lines: folder, threads, devices, machine."""
    runfolder.setup_logging(folder, place.rank if place.workers > 1 else None)
    worker = ('; worker %d of %d (%s)' % (place.rank, place.workers, cfg['kvstore'])
              if place.workers > 1 else '')
    LOG.info('run folder: %s; devices: %s%s', folder.path, ', '.join(map(str, place.ctx)), worker)
    LOG.info('%s; threads: %s', machine.describe(), threads)


class Training(object):
    """What a checkpoint stores, and the run folder it goes to: ``net``, ``loss`` (a ``losses.VAALoss``),
    ``history`` (the prediction history), ``trainers`` (``StageTrainers``) and ``schedule`` (the plateau
    schedule); ``cfg`` and ``names`` (the attribute names) are written with every checkpoint."""

    def __init__(self, cfg, folder, names, net, loss, history, trainers, schedule):
        self.cfg, self.folder, self.names = cfg, folder, names
        self.net, self.loss, self.history = net, loss, history
        self.trainers, self.schedule = trainers, schedule

    def meta(self, epoch, batch, **extra):
        """What a checkpoint records besides the arrays: loop state, config and attribute names."""
        state = dict(self.schedule.state_dict(), epoch=epoch, batch=batch, **extra)
        return dict(state=state, config=self.cfg, attribute_names=self.names)

    def load_weights(self, path):
        checkpoints.load_weights(path, self.net)

    def restore(self, resumed):
        """Continue from the run's last checkpoint (``resumed``: its meta and arrays): weights, optimizer
        states, history and schedule. Returns (epoch, batch, the totals of an interrupted epoch or None)."""
        meta, extra = checkpoints.load_training(self.folder.checkpoint('last'), self.net,
                                                self.trainers.trainers, self.history, resumed[1])
        state = meta['state']
        self.schedule.load_state_dict(state)
        self.trainers.set_learning_rate(state['lr'])
        epoch, batch = state['epoch'], state.get('batch', 0)
        LOG.info('resumed at epoch %d%s (lr %g, best val %s %.2f%%)', epoch,
                 ' batch %d' % batch if batch else '', state['lr'], self.cfg['monitor'], 100 * state['best'])
        if not batch:
            return epoch, 0, None
        return epoch, batch, dict({k: v.asnumpy() for k, v in extra.items()}, loss_sum=state['loss_sum'],
                                  seen=state['seen'], terms=state.get('terms', {}), speed=state.get('speed'))

    def save_interrupted(self, indices, epoch, totals, batch_no, speed=None):
        """Checkpoint a partial epoch so that --resume continues after its last finished batch (after the
        last one: with the validation, which a stop interrupted). ``speed``: the epoch's samples/s so far."""
        saved = totals.state()
        merged = self.trainers.sync.merged_history(self.history, indices)
        extra = {k: saved[k] for k in ('logits', 'labels', 'masks')}
        meta = self.meta(epoch, batch_no, loss_sum=saved['loss_sum'], seen=saved['seen'],
                         terms=saved['terms'], speed=speed)
        self.folder.save('last', self.net, meta, self.trainers.trainers, merged, extra)

    def end_epoch(self, epoch, verdict, indices, speed, tic):
        """After validation (``verdict``: :func:`train.validate`'s, on the lead worker; None elsewhere):
        every worker follows the schedule; the lead logs the epoch, writes ``last`` (and ``best`` on a new
        best) and the metrics row."""
        row, improved, val_ap = verdict or (None, False, None)
        self.trainers.follow(self.schedule)
        if self.schedule.diverged:
            raise UserError('the validation outputs became inf/NaN in epoch %d: the weights diverged '
                            'although the training loss stayed finite. Nothing of this epoch was saved. %s; '
                            'or start a new run with a lower --lr (this one: %g)'
                            % (epoch, self.folder.last_good(), self.cfg['lr']))
        merged = self.trainers.sync.merged_history(self.history, indices)
        if not self.folder.lead:
            return
        row.update(samples_per_sec=speed, seconds=time.time() - tic, val_ap=val_ap)
        self._log(epoch, row, improved, speed)
        meta = self.meta(epoch + 1, 0)
        self.folder.save('last', self.net, meta, self.trainers.trainers, merged)
        if improved and self.cfg['keep'] == 'all':
            self.folder.save('best', self.net, meta)
        self.folder.add_row(row)
        self.folder.board.epoch(row, {m: t.learning_rate for m, t in self.trainers.trainers.items()})

    def _log(self, epoch, row, improved, speed):
        LOG.info('Epoch [%d]: train loss %.4f  val loss %.4f  train mAP %.2f%%  val mAP %.2f%%  '
                 'val mA %.2f%%  (%.1f samples/sec, %.0fs)%s', epoch, row['train_loss'], row['val_loss'],
                 100 * row['train_mAP'], 100 * row['val_mAP'], 100 * row['val_mA'], speed, row['seconds'],
                 '  * best' if improved else '')
        if 'train_mc_dis' in row:
            LOG.info('Epoch [%d]: MC-Loss terms (unweighted, not in the losses above): discriminality %.4f  '
                     'diversity %.4f', epoch, row['train_mc_dis'], row['train_mc_div'])
        scaling = self.trainers.scaling
        if scaling.skipped:
            LOG.info('AMP: %d step(s) skipped for float16 overflow so far (loss scale %g)', scaling.skipped,
                     scaling.scale)

    def finish(self, place):
        """After the last epoch: ``--save-all-ranks`` (each worker's final weights), then wait for all."""
        if self.cfg['save_all_ranks'] and place.workers > 1:
            checkpoints.save_training(os.path.join(self.folder.path, 'rank%d.params' % place.rank), self.net,
                                      {}, None, self.meta(self.cfg['epochs'], 0))
        self.trainers.sync.barrier()


def finished(cfg, state, say=False):
    """For a resumed run (``state``: its checkpoint's loop state) that has trained all its epochs and been
    tested: its test result (with ``say``, also the line that says so and how to train it longer);
    otherwise None. Nothing is trained or tested again."""
    path = cfg['resume']
    result_file = os.path.join(path, 'test_metrics.json')
    if state['epoch'] < cfg['epochs'] or state.get('batch') or not os.path.isfile(result_file):
        return None
    with open(result_file) as f:
        result = json.load(f)
    if say:
        runfolder.setup_logging()
        LOG.info('%s has finished its %s: nothing is left to train, nothing was changed. Its test result '
                 '(mAP %.2f%%, epoch %s) is in %s; to train it longer: %s --epochs %d', path,
                 plural(state['epoch'], 'epoch'), 100 * result['mAP'], result.get('best_epoch', '?'),
                 result_file, runfolder.resume_command(path), state['epoch'] + 5)
    return result


def first_notes(cfg, explicit, ctx, resumed=None):
    """For a new run: why it has no first phase, a warning when the one asked for cannot do its job, and
    on the CPU with the paper's full-size network by default a smaller one for a first try."""
    if resumed:
        return
    preset_freeze = PRESET_SETTINGS[cfg['preset']]['freeze_epochs']
    given = 'freeze_epochs' in explicit
    if not given and preset_freeze and not cfg['pretrained'] and not cfg['finetune']:
        LOG.info("no first phase: --preset %s's %s of training the heads on a frozen backbone are for "
                 "ImageNet features, and this backbone starts from random weights (--no-pretrained); "
                 "--freeze-epochs N asks for them anyway", cfg['preset'], plural(preset_freeze, 'epoch'))
    if given and cfg['freeze_epochs'] and not cfg['pretrained']:
        LOG.warning('--freeze-epochs %d with random weights (--no-pretrained): for %s the attention heads '
                    'learn from the features of a random backbone that does not train', cfg['freeze_epochs'],
                    plural(min(cfg['freeze_epochs'], cfg['epochs']), 'epoch'))
    if given and cfg['freeze_epochs'] >= cfg['epochs']:
        LOG.warning('--freeze-epochs %d with --epochs %d: the backbone and the primary classifier stay '
                    'frozen for the whole run', cfg['freeze_epochs'], cfg['epochs'])
    cpu_note(cfg, explicit, ctx)


def cpu_note(cfg, explicit, ctx):
    """On the CPU with the paper's full-size network by default, a smaller one for a first try."""
    if any(c.device_type != 'cpu' for c in ctx) or cfg['dataset'] == 'demo':
        return
    if 'backbone' in explicit or 'input_size' in explicit:
        return
    if cfg['backbone'] in ('resnet18_v1', 'resnet34_v1') and cfg['input_size'] <= 128:
        return
    LOG.info('training %s at %dx%d on the CPU (the paper\'s network; about 8 GB and minutes per hundred '
             'images on 2 cores): for a first try on your data, add --backbone resnet18_v1 --input-size 128 '
             '(README, "Your own data"); a GPU (--gpus 0) is what the full size needs', cfg['backbone'],
             cfg['input_size'], cfg['input_size'])
