#!/usr/bin/env python
"""Train the Visual Attention Aggregation network (Sarafianos et al., ECCV 2018).

    python train.py                                   # the embedded demo dataset, CPU, a few minutes
    python train.py --dataset wider --data_path /data/WIDER --pretrained --gpus 0
    python train.py --preset upstream ...             # the authors' released configuration

Accepts the authors' flag names (--data_path --epochs --lr --wd --mom --batch_size --num_classes
--finetune --test) with their meanings; every flag takes both spellings (--batch_size, --batch-size).
Every run writes a folder (``--out``, default ``runs/<dataset>-<backbone>-<preset>-<time>``) with the
resolved config, a log, per-epoch metrics, checkpoints, plots and the final test metrics.

Read top to bottom, this file is the method: data (:func:`get_data`), network (:func:`get_net`), the
losses of Eq. 7 with the prediction history (:func:`get_losses`), a Trainer per stage module and the
learning-rate schedule (:func:`get_trainers`); per epoch the phase, a pass over the training split
(:func:`train_epoch`), validation and the plateau schedule (:func:`end_epoch`); then the test split
(:func:`test`). Flags and presets: ``config.py``; run folder and bookkeeping: ``runfolder.py``;
per-batch steps: ``steps.py``; Trainers: ``trainers.py``.
"""
import os

from engine import machine

_OMP_NOTE = machine.thread_settings()           # must be set before mxnet is imported


if __name__ == '__main__':                     # --help and flag errors answer before mxnet is imported
    from engine import flags
    flags.preparse('train')

import collections  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import mxnet as mx  # noqa: E402

from engine import checkpoints  # noqa: E402
from engine import config  # noqa: E402
import datasets  # noqa: E402
from datasets import loaders  # noqa: E402
from engine import distributed  # noqa: E402
from evaluation import inference  # noqa: E402
from evaluation import metrics  # noqa: E402
from engine import mixed_precision  # noqa: E402
import related  # noqa: E402
from engine import runfolder  # noqa: E402
from engine import steps  # noqa: E402
from engine.errors import UserError, plural, run_main  # noqa: E402
from losses import PredictionHistory, VAALoss, class_prior_weights  # noqa: E402
from model import build_net, use_sync_batchnorm  # noqa: E402
from engine.trainers import PlateauSchedule, StageTrainers  # noqa: E402

LOG = logging.getLogger('vaa')
Data = collections.namedtuple('Data', 'names train val test train_loader sampler val_loader test_loader')
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


def get_data(cfg, ctx, rank=0, num_workers=1):
    """The three splits; the training loader serves this worker's shard with the random augmentation."""
    train = datasets.load_split(cfg['dataset'], cfg['data_path'], cfg['train_split'], cfg['num_classes'],
                                **loaders.data_options(cfg))
    names = list(train.attribute_names)
    val, test = (datasets.load_split(cfg['dataset'], cfg['data_path'], cfg[key], attribute_names=names,
                                     **loaders.data_options(cfg)) for key in ('val_split', 'test_split'))
    cfg['num_classes'] = len(names)
    LOG.info('%s: %d train, %d val, %d test samples, %d attributes', cfg['dataset'], len(train), len(val),
             len(test), len(names))
    train_loader, sampler = loaders.train_loader(cfg, train, len(ctx), rank, num_workers)
    return Data(names, train, val, test, train_loader, sampler, loaders.eval_loader(cfg, val),
                loaders.eval_loader(cfg, test))


def get_net(cfg, ctx, train):
    """The network of the config on every device (with --syncbn, BatchNorm statistics over all GPUs);
    ``train``: the training split, whose labels the ML-GCN head's label graph comes from."""
    if cfg['syncbn'] and len(ctx) > 1 and ctx[0].device_type == 'cpu':
        raise UserError("--syncbn needs GPUs: mxnet 1.9's SyncBatchNorm deadlocks across CPU contexts; "
                        'drop --syncbn or use --gpus 0,1')
    net = build_net(cfg, ctx, labels=train.labels, mask=train.mask, names=list(train.attribute_names))
    LOG.info('model: %s, preset %s, taps %s, input %d%s', cfg['backbone'], cfg['preset'],
             '/'.join(net.taps) or 'none',
             cfg['input_size'], ''.join('; ' + p for p in net.plugins))
    if cfg['syncbn'] and len(ctx) > 1:
        LOG.info('SyncBatchNorm over %d devices: %d layers', len(ctx), use_sync_batchnorm(net, len(ctx)))
    return net


def get_losses(cfg, train, ctx):
    """Eq. 7 with the class priors of the training labels, and the training split's prediction history."""
    pos_weight, neg_weight = class_prior_weights(train.labels, train.mask, cfg['class_weights'])
    loss = VAALoss(pos_weight, neg_weight, gamma=cfg['gamma'], plain_bce=cfg['plain_bce'],
                   # (added to Eq. 7, never replacing it)
                   primary=not cfg['finetune'], aux=related.aux_loss(cfg))
    history = PredictionHistory(len(train), cfg['num_classes'], track=cfg['history_track'],
                                start_epoch=cfg['history_start'], ctx=ctx[0],
                                upstream_zero_rows=cfg['history_zero_rows'])
    LOG.info('losses: %s%s', loss, '' if cfg['plain_bce'] else ' (%s class weights)' % cfg['class_weights'])
    return loss, history


def get_trainers(cfg, net, ctx, kvstore):
    """A Trainer per stage module, stepped together, and the plateau schedule of the learning rate."""
    params = {'learning_rate': cfg['lr'], 'wd': cfg['wd']}
    if cfg['optimizer'] == 'sgd':
        params['momentum'] = cfg['mom']
    if cfg['amp']:
        params['multi_precision'] = True
    trainers = StageTrainers(net, ctx, cfg['optimizer'], params, kvstore, finetune=cfg['finetune'],
                             freeze_epochs=cfg['freeze_epochs'], amp=cfg['amp'], epochs=cfg['epochs'])
    LOG.info('%d Trainers (one per stage module), %s lr %g, batch %d, %s', len(trainers.trainers),
             cfg['optimizer'], cfg['lr'], cfg['batch_size'], plural(cfg['epochs'], 'epoch'))
    return trainers, PlateauSchedule(cfg['lr'], cfg['lr_patience'], cfg['lr_drops'], cfg['monitor'])


def phase_notes(cfg, explicit):
    """Say why a run has no first phase, or warn when the one asked for cannot do its job."""
    preset_freeze = config.PRESET_SETTINGS[cfg['preset']]['freeze_epochs']
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


def cpu_note(cfg, explicit, ctx):
    """On the CPU with the paper's full-size network by default, suggest a smaller one for a first try."""
    if any(c.device_type != 'cpu' for c in ctx) or cfg['dataset'] == 'demo':
        return
    if 'backbone' in explicit or 'input_size' in explicit:
        return
    if cfg['backbone'] in ('resnet18_v1', 'resnet34_v1') and cfg['input_size'] <= 128:
        return
    LOG.info('training %s at %dx%d on the CPU (the paper\'s network; about 8 GB and minutes per hundred '
             'images on 2 cores): for a first try on your data, add --backbone resnet18_v1 --input-size 128 '
             '(README, "Your own data"); a GPU (--gpus 0) is what the full size needs', cfg['backbone'],
             cfg['input_size'],
             cfg['input_size'])


def restore(resumed, path, net, trainers, history, schedule, monitor):
    """Continue from the checkpoint ``path`` (``resumed``: its meta and arrays): weights, optimizer states,
    history and schedule. Returns (epoch, batch, the totals of an interrupted epoch or None)."""
    meta, extra = checkpoints.load_training(path, net, trainers.trainers, history, resumed[1])
    state = meta['state']
    schedule.load_state_dict(state)
    trainers.set_learning_rate(state['lr'])
    epoch, batch = state['epoch'], state.get('batch', 0)
    LOG.info('resumed at epoch %d%s (lr %g, best val %s %.2f%%)', epoch, ' batch %d' % batch if batch else '',
             state['lr'], monitor, 100 * state['best'])
    if not batch:
        return epoch, 0, None
    return epoch, batch, dict({k: v.asnumpy() for k, v in extra.items()}, loss_sum=state['loss_sum'],
                              seen=state['seen'], terms=state.get('terms', {}))


def train_epoch(cfg, epoch, net, loss, trainers, history, data, place, folder, stop, start=0, saved=None):
    """One pass over this worker's shard of ``data``, from batch ``start`` with the totals ``saved`` of an
    interrupted epoch. Returns (``steps.EpochTotals``, number of batches done, samples/sec over all
    workers)."""
    data.sampler.set_epoch(epoch, skip=start * cfg['batch_size'])
    progress = runfolder.Progress(len(data.train_loader), 'epoch %d' % epoch, cfg['log_interval'], done=start)
    guard = runfolder.FiniteGuard(place.ctx[0], epoch, folder)
    totals = steps.EpochTotals(place.ctx[0], cfg['num_classes'], saved)
    batch_no = start
    for batch in data.train_loader:
        # the draws inside the graph (MC-Loss masks, AP-CNN's ROI drops) depend only on seed, epoch and
        # batch, so that a resumed run repeats them
        mx.random.seed((cfg['seed'] * 1000003 + epoch * 10007 + batch_no) % 2 ** 31)
        step = steps.train_step(net, loss, trainers, history, batch, epoch, place.ctx)
        totals.add(step, batch[0].shape[0])
        guard.add(batch_no, sum(step.terms.values(), step.loss))
        batch_no += 1
        progress.update(batch[0].shape[0], totals.mean_loss)
        if progress.count % progress.interval == 0:
            guard.check()
        if stop.requested(trainers.sync):
            break
    guard.check()
    return totals, batch_no, progress.close() * place.workers


def checkpoint_meta(cfg, names, schedule, epoch, batch, **extra):
    """What a checkpoint records besides the arrays: loop state, config and attribute names."""
    state = dict(schedule.state_dict(), epoch=epoch, batch=batch, **extra)
    return dict(state=state, config=cfg, attribute_names=names)


def save_interrupted(cfg, folder, net, trainers, history, data, schedule, epoch, totals, batch_no):
    """Checkpoint a partial epoch so that --resume continues after its last finished batch."""
    saved = totals.state()
    merged = trainers.sync.merged_history(history, data.sampler.indices)
    extra = {k: saved[k] for k in ('logits', 'labels', 'masks')}
    meta = checkpoint_meta(cfg, data.names, schedule, epoch, batch_no, loss_sum=saved['loss_sum'],
                           seen=saved['seen'], terms=saved['terms'])
    folder.save('last', net, meta, trainers.trainers, merged, extra)


def validate(cfg, net, loss, data, schedule, ctx, epoch, totals):
    """Train mAP from the epoch's predictions; validation metrics and loss (the objective training
    minimises); the schedule's verdict. Returns (metrics row, new best?, per-attribute val AP)."""
    out = totals.arrays()
    train_result = metrics.evaluate(out['logits'], out['labels'], out['masks'], data.names)
    logits, labels, masks, val_loss = steps.predict(net, data.val_loader, ctx, loss)
    val = metrics.evaluate(logits, labels, masks, data.names)
    finite = np.isfinite(logits).all() and np.isfinite(val_loss)                # else: diverged
    improved = schedule.update(epoch, val[cfg['monitor']] if finite else float('nan'))
    row = dict(epoch=epoch, lr=schedule.lr, train_loss=totals.mean_loss(), val_loss=val_loss,
               train_mAP=train_result['mAP'], val_mAP=val['mAP'], val_mA=val['mA'], val_f1=val['f1'])
    row.update(('train_' + k, v) for k, v in totals.mean_terms().items())      # MC-Loss: mc_dis, mc_div
    return row, improved, {r['name']: r['ap'] for r in val['per_attribute']}


def end_epoch(cfg, epoch, net, loss, trainers, history, data, schedule, ctx, folder, totals, speed, tic):
    """Validate (rank 0), every worker follows the schedule, then write the checkpoints and metrics."""
    trainers.sync.average_aux_states()
    row, improved, val_ap = (validate(cfg, net, loss, data, schedule, ctx, epoch, totals) if folder.lead
                             else (None, False, None))
    trainers.follow(schedule)
    if schedule.diverged:
        raise UserError('the validation outputs became inf/NaN in epoch %d: the weights diverged although '
                        'the training loss stayed finite. Nothing of this epoch was saved. %s; or start a '
                        'new run with a lower --lr (this one: %g)' % (epoch, folder.last_good(), cfg['lr']))
    merged = trainers.sync.merged_history(history, data.sampler.indices)
    if not folder.lead:
        return
    row.update(samples_per_sec=speed, seconds=time.time() - tic, val_ap=val_ap)
    LOG.info('Epoch [%d]: train loss %.4f  val loss %.4f  train mAP %.2f%%  val mAP %.2f%%  val mA %.2f%%  '
             '(%.1f samples/sec, %.0fs)%s', epoch, row['train_loss'], row['val_loss'], 100 * row['train_mAP'],
             100 * row['val_mAP'], 100 * row['val_mA'], speed, row['seconds'], '  * best' if improved else '')
    if 'train_mc_dis' in row:
        LOG.info('Epoch [%d]: MC-Loss terms (unweighted, not in the losses above): discriminality %.4f  '
                 'diversity %.4f', epoch, row['train_mc_dis'], row['train_mc_div'])
    scaling = trainers.scaling
    if scaling.skipped:
        LOG.info('AMP: %d step(s) skipped for float16 overflow so far (loss scale %g)', scaling.skipped,
                 scaling.scale)
    meta = checkpoint_meta(cfg, data.names, schedule, epoch + 1, 0)
    folder.save('last', net, meta, trainers.trainers, merged)
    if improved:
        folder.save('best', net, meta)
    folder.add_row(row)


def test(cfg, net, data, schedule, ctx, folder):
    """The test split with the best checkpoint; writes test_metrics.json and prints the table."""
    best = folder.checkpoint('best')
    checkpoints.load_weights(best, net)
    result = steps.evaluate(net, data.test_loader, ctx, data.names, cfg['metrics'])
    epoch = schedule.best_epoch
    result.update(split=cfg['test_split'], checkpoint=best, best_epoch=epoch)
    inference.report(result, os.path.join(folder.path, 'test_metrics.json'), os.path.join(
        folder.path, 'test_ap.png'), 'Test split, best checkpoint (epoch %d of %s):' % (epoch, folder.path),
        'test (epoch %d)' % epoch, show=LOG.info)
    if steps.stage_line(result):
        LOG.info(steps.stage_line(result))
    LOG.info('test mAP %.2f%% (chance level from the label priors: %.2f%%); run folder %s',
             100 * result['mAP'], 100 * result['chance_mAP'], folder.path)
    return result


def train(cfg, explicit=()):
    """Train with the resolved ``cfg``; ``explicit`` names the flags the user gave (for --resume).

    SIGINT / SIGTERM finish the current batch, write a checkpoint and exit (status 128 + signal) with
    the command that resumes the run.
    """
    with runfolder.StopSignals() as stop:       # (loader workers forked from here on ignore the signals)
        cfg, place, resumed = setup(cfg, explicit)
        if resumed:
            earlier = finished(cfg, resumed[0]['state'])
            if earlier is not None:
                return earlier
        folder = runfolder.RunFolder.prepare(cfg, lead=place.rank == 0)      # only rank 0 writes
        try:
            runfolder.setup_logging(folder, place.rank if place.workers > 1 else None)
            LOG.info('run folder: %s; %s; devices: %s%s', folder.path, _OMP_NOTE,
                     ', '.join(map(str, place.ctx)), '; worker %d of %d (%s)' % (
                         place.rank, place.workers, cfg['kvstore']) if place.workers > 1 else '')
            LOG.info(machine.describe())
            net, data, trainers, schedule = train_epochs(cfg, explicit, place, resumed, folder, stop)
            if cfg['save_all_ranks'] and place.workers > 1:
                checkpoints.save_training(os.path.join(folder.path, 'rank%d.params' % place.rank), net, {},
                                          None, checkpoint_meta(cfg, data.names, schedule, cfg['epochs'], 0))
            trainers.sync.barrier()
            return test(cfg, net, data, schedule, place.ctx, folder) if folder.lead else None
        except BaseException:
            folder.abandon()                    # a run that failed before its first checkpoint leaves nothing
            raise
        finally:
            folder.close()


def finished(cfg, state):
    """For a resumed run (``state``: its checkpoint's loop state) that has trained all its epochs and been
    tested: say so (and how to train it longer) and return its test result, without testing again;
    otherwise None."""
    path = cfg['resume']
    result_file = os.path.join(path, 'test_metrics.json')
    if state['epoch'] < cfg['epochs'] or state.get('batch') or not os.path.isfile(result_file):
        return None
    runfolder.setup_logging()
    with open(result_file) as f:
        result = json.load(f)
    LOG.info('%s has finished its %s: nothing is left to train, nothing was changed. Its test result (mAP '
             '%.2f%%, epoch %s) is in %s; to train it longer: %s --epochs %d', path,
             plural(state['epoch'], 'epoch'), 100 * result['mAP'], result.get('best_epoch', '?'), result_file,
             runfolder.resume_command(path), state['epoch'] + 5)
    return result


def train_epochs(cfg, explicit, place, resumed, folder, stop):
    """Data, network, losses, trainers; then the epochs, each: phase, training pass, validation. Returns the
    parts the test needs: (net, data, trainers, schedule)."""
    ctx = place.ctx
    data = get_data(cfg, ctx, place.rank, place.workers)                        # data
    net = get_net(cfg, ctx, data.train)                                         # network
    loss, history = get_losses(cfg, data.train, ctx)                            # Eq. 7, history
    trainers, schedule = get_trainers(cfg, net, ctx, place.kvstore)             # a Trainer per stage
    first, start, saved = 0, 0, None
    if resumed:
        first, start, saved = restore(resumed, folder.checkpoint('last'), net, trainers, history, schedule,
                                      cfg['monitor'])
    else:
        phase_notes(cfg, explicit)
        cpu_note(cfg, explicit, ctx)
    folder.write_config(cfg)
    if cfg['hybridize']:
        net.hybridize(static_alloc=True, static_shape=True)
        loss.hybridize(static_alloc=True, static_shape=True)
    for epoch in range(first, cfg['epochs']):
        tic = time.time()
        trainers.set_phase(epoch, loss)                                         # heads / end to end
        totals, batch_no, speed = train_epoch(cfg, epoch, net, loss, trainers, history, data, place, folder,
                                              stop, start, saved)
        start, saved = 0, None
        if batch_no < len(data.train_loader):                                   # a stop signal came
            save_interrupted(cfg, folder, net, trainers, history, data, schedule, epoch, totals, batch_no)
            stop.exit(epoch, batch_no, len(data.train_loader), folder)
        end_epoch(cfg, epoch, net, loss, trainers, history, data, schedule, ctx, folder, totals, speed, tic)
    return net, data, trainers, schedule


def main(argv=None):
    cfg, explicit = config.parse_args(argv)
    return inference.test_from_train_flags(cfg, explicit) if cfg['test'] else train(cfg, explicit)


if __name__ == '__main__':
    run_main(main)
