#!/usr/bin/env python
"""Train the Visual Attention Aggregation network (Sarafianos et al., ECCV 2018).

    python train.py                                   # the embedded demo dataset, CPU, a few minutes
    python train.py --data_path /data/WIDER --gpus 0  # the paper's protocol (ImageNet weights, two phases)
    python train.py --preset upstream ...             # the authors' released configuration

Accepts the authors' flag names (--data_path --epochs --lr --wd --mom --batch_size --num_classes
--finetune --test) with their meanings; every flag takes both spellings (--batch_size, --batch-size).
Every run writes a folder (``--out``, default ``runs/<dataset>-<backbone>-<preset>-<time>``) with the
resolved config, a log, per-epoch metrics, checkpoints, plots and the final test metrics.

Read top to bottom, this file is the method: the data (:func:`get_data`), the network (:func:`get_net`),
the losses of Eq. 7 with the prediction history (:func:`get_losses`), a Trainer per stage module and the
learning-rate schedule (:func:`get_trainers`); then per epoch the phase (heads alone, then end to end), a
pass over the training split (:func:`train_epoch`) and validation (:func:`validate`); finally the test
split with the best weights (:func:`test`). The machinery (flags, run folder, checkpoints, devices) is
in ``engine/``.
"""
from common import machine

_THREADS = machine.thread_settings()            # must be set before mxnet is imported


if __name__ == '__main__':                     # --help and flag errors answer before mxnet is imported
    from engine import startup
    startup.preparse('train')

import collections  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import mxnet as mx  # noqa: E402

import datasets  # noqa: E402
import related  # noqa: E402
from common.errors import Interrupted, UserError, plural, run_main  # noqa: E402
from datasets import loaders  # noqa: E402
from engine import board, config, loop, report, runfolder, steps  # noqa: E402
from engine.build import build_net  # noqa: E402
from engine.distributed import use_sync_batchnorm  # noqa: E402
from engine.trainers import PlateauSchedule, StageTrainers  # noqa: E402
from evaluation import metrics  # noqa: E402
from losses import PredictionHistory, VAALoss, class_prior_weights  # noqa: E402

LOG = logging.getLogger('vaa')
Data = collections.namedtuple('Data', 'names train val test train_loader sampler val_loader test_loader')


def get_data(cfg, place):
    """The three splits; the training loader serves this worker's shard with the random augmentation."""
    train = datasets.load_split(cfg['dataset'], cfg['data_path'], cfg['train_split'], cfg['num_classes'],
                                **loaders.data_options(cfg))
    names = list(train.attribute_names)
    val, test = (datasets.load_split(cfg['dataset'], cfg['data_path'], cfg[key], attribute_names=names,
                                     **loaders.data_options(cfg)) for key in ('val_split', 'test_split'))
    cfg['num_classes'] = len(names)
    LOG.info('%s: %d train, %d val, %d test samples, %d attributes', cfg['dataset'], len(train), len(val),
             len(test), len(names))
    train_loader, sampler = loaders.train_loader(cfg, train, len(place.ctx), place.rank, place.workers)
    return Data(names, train, val, test, train_loader, sampler, loaders.eval_loader(cfg, val),
                loaders.eval_loader(cfg, test))


def get_net(cfg, place, train):
    """The network of the config on every device (with --syncbn, BatchNorm statistics over all GPUs);
    ``train``: the training split, whose labels the ML-GCN head's label graph comes from."""
    if cfg['syncbn'] and len(place.ctx) > 1 and place.ctx[0].device_type == 'cpu':
        raise UserError("--syncbn needs GPUs: mxnet 1.9's SyncBatchNorm deadlocks across CPU contexts; "
                        'drop --syncbn or use --gpus 0,1')
    net = build_net(cfg, place.ctx, labels=train.labels, mask=train.mask, names=list(train.attribute_names))
    LOG.info('model: %s, preset %s, taps %s, input %d%s', cfg['backbone'], cfg['preset'],
             '/'.join(net.taps) or 'none', cfg['input_size'], ''.join('; ' + p for p in net.plugins))
    if cfg['syncbn'] and len(place.ctx) > 1:
        LOG.info('SyncBatchNorm over %d devices: %d layers', len(place.ctx),
                 use_sync_batchnorm(net, len(place.ctx)))
    return net


def get_losses(cfg, train, ctx):
    """Eq. 7 with the class priors of the training labels, and the training split's prediction history."""
    pos_weight, neg_weight = class_prior_weights(train.labels, train.mask, cfg['class_weights'])
    loss = VAALoss(pos_weight, neg_weight, gamma=cfg['gamma'], plain_bce=cfg['plain_bce'],
                   primary=not cfg['finetune'], aux=related.aux_loss(cfg))   # (added to Eq. 7, not instead)
    history = PredictionHistory(len(train), cfg['num_classes'], track=cfg['history_track'],
                                start_epoch=cfg['history_start'], ctx=ctx[0],
                                upstream_zero_rows=cfg['history_zero_rows'])
    LOG.info('losses: %s%s', loss, '' if cfg['plain_bce'] else ' (%s class weights)' % cfg['class_weights'])
    return loss, history


def get_trainers(cfg, net, place):
    """A Trainer per stage module, stepped together, and the plateau schedule of the learning rate."""
    params = {'learning_rate': cfg['lr'], 'wd': cfg['wd']}
    if cfg['optimizer'] == 'sgd':
        params['momentum'] = cfg['mom']
    if cfg['amp']:
        params['multi_precision'] = True
    trainers = StageTrainers(net, place.ctx, cfg['optimizer'], params, place.kvstore,
                             finetune=cfg['finetune'], freeze_epochs=cfg['freeze_epochs'], amp=cfg['amp'],
                             epochs=cfg['epochs'])
    LOG.info('%d Trainers (one per stage module), %s lr %g, batch %d, %s', len(trainers.trainers),
             cfg['optimizer'], cfg['lr'], cfg['batch_size'], plural(cfg['epochs'], 'epoch'))
    return trainers, PlateauSchedule(cfg['lr'], cfg['lr_patience'], cfg['lr_drops'], cfg['monitor'])


def train_epoch(cfg, epoch, run, data, place, stop, start=0, saved=None):
    """One pass over this worker's shard, from batch ``start`` with the totals ``saved`` of an interrupted
    epoch: each batch one :func:`engine.steps.train_step` (Eq. 7 with the history weights, one update of
    every Trainer, the fused predictions into the history). Returns (totals, batches done, samples/sec)."""
    data.sampler.set_epoch(epoch, skip=start * cfg['batch_size'])
    progress = runfolder.Progress(len(data.train_loader), 'epoch %d' % epoch, cfg['log_interval'], done=start)
    guard = runfolder.FiniteGuard(place.ctx[0], epoch, run.folder)
    totals = steps.EpochTotals(place.ctx[0], cfg['num_classes'], saved)
    run.net.return_aux = run.loss.aux is not None          # a related system's head, for its loss term
    batch_no = start
    for batch in data.train_loader:
        # the draws inside the graph (MC-Loss masks, AP-CNN's ROI drops) depend only on seed, epoch and
        # batch, so that a resumed run repeats them
        mx.random.seed((cfg['seed'] * 1000003 + epoch * 10007 + batch_no) % 2 ** 31)
        step = steps.train_step(run.net, run.loss, run.trainers, run.history, batch, epoch, place.ctx)
        totals.add(step, batch[0].shape[0])
        guard.add(batch_no, sum(step.terms.values(), step.loss))
        batch_no += 1
        progress.update(batch[0].shape[0], totals.mean_loss)
        if progress.count % progress.interval == 0:
            guard.check()
            run.folder.board.batch(epoch, batch_no, totals.mean_loss(), totals.mean_terms())
        if stop.requested(run.trainers.sync):
            break
    mx.nd.waitall()     # MXNet moves the BatchNorm statistics in the backward pass, unordered with reads
    guard.check()       # of them: validation and checkpoints must see the last batch's (backbone.py)
    speed = progress.close() * place.workers
    if batch_no == start and saved and saved.get('speed'):         # nothing left to train: the saved figure
        speed = saved['speed']
    return totals, batch_no, speed


def validate(cfg, run, data, place, epoch, totals, stop=None):
    """Train mAP from the epoch's predictions; validation metrics and loss (the objective training
    minimises); the schedule's verdict. Returns (metrics row, new best?, per-attribute val AP)."""
    out = totals.arrays()
    train_result = metrics.evaluate(out['logits'], out['labels'], out['masks'], data.names)
    logits, labels, masks, val_loss = steps.predict(run.net, data.val_loader, place.ctx, run.loss, stop=stop)
    val = metrics.evaluate(logits, labels, masks, data.names)
    finite = np.isfinite(logits).all() and np.isfinite(val_loss)                # else: diverged
    improved = run.schedule.update(epoch, val[cfg['monitor']] if finite else float('nan'))
    row = dict(epoch=epoch, lr=run.schedule.lr, train_loss=totals.mean_loss(), val_loss=val_loss,
               train_mAP=train_result['mAP'], val_mAP=val['mAP'], val_mA=val['mA'], val_f1=val['f1'])
    row.update(('train_' + k, v) for k, v in totals.mean_terms().items())      # MC-Loss: mc_dis, mc_div
    return row, improved, {r['name']: r['ap'] for r in val['per_attribute']}


def test(cfg, run, data, place, stop=None):
    """The test split with the best checkpoint (with --keep last, the last epoch's weights); writes
    test_metrics.json and prints the table. A stop signal ends it after the batch in progress: the run has
    finished training, and its resume runs the test."""
    which = 'best' if cfg['keep'] == 'all' else 'last'
    best = run.folder.checkpoint(which)
    run.load_weights(best)
    try:
        result = steps.evaluate(run.net, data.test_loader, place.ctx, data.names, cfg['metrics'], stop)
    except Interrupted:
        stop.exit('during the test of the %s checkpoint (training is complete: resume runs the test)' % which,
                  run.folder, written=False)
    epoch = run.schedule.best_epoch if which == 'best' else cfg['epochs'] - 1
    result.update(split=cfg['test_split'], checkpoint=best, best_epoch=epoch)
    report.report(result, os.path.join(run.folder.path, 'test_metrics.json'), os.path.join(
        run.folder.path, 'test_ap.png'), 'Test split, %s checkpoint (epoch %d of %s):' % (
            which, epoch, run.folder.path), '%s, test split, epoch %d' % (os.path.basename(
                os.path.normpath(os.path.abspath(run.folder.path))), epoch), show=LOG.info)
    if steps.stage_line(result):
        LOG.info(steps.stage_line(result))
    LOG.info('test mAP %.2f%% (chance level from the label priors: %.2f%%); run folder %s',
             100 * result['mAP'], 100 * result['chance_mAP'], run.folder.path)
    run.folder.board.finish(cfg, result, cfg['epochs'])
    return result


def fit(cfg, explicit, place, resumed, folder, stop):
    """Data, network, losses, trainers; then the epochs, each: the phase, the training pass, validation,
    the checkpoints. Returns the training state and the data (for the test)."""
    data = get_data(cfg, place)                                                 # data
    net = get_net(cfg, place, data.train)                                       # network
    loss, history = get_losses(cfg, data.train, place.ctx)                      # Eq. 7, history
    trainers, schedule = get_trainers(cfg, net, place)                          # a Trainer per stage
    run = loop.Training(cfg, folder, data.names, net, loss, history, trainers, schedule)
    first, start, saved = run.restore(resumed) if resumed else (0, 0, None)
    folder.board = board.Board(folder, cfg['tensorboard'], len(data.train_loader), first, start)
    loop.first_notes(cfg, explicit, place.ctx, resumed)
    folder.write_config(cfg)
    if cfg['hybridize']:
        net.hybridize(static_alloc=True, static_shape=True)
        loss.hybridize(static_alloc=True, static_shape=True)
    for epoch in range(first, cfg['epochs']):
        tic = time.time()
        trainers.set_phase(epoch, loss)                                         # heads alone / end to end
        totals, batch_no, speed = train_epoch(cfg, epoch, run, data, place, stop, start, saved)
        start, saved = 0, None
        if batch_no < len(data.train_loader):                                   # a stop signal came
            run.save_interrupted(data.sampler.indices, epoch, totals, batch_no, speed)
            stop.exit('in epoch %d after batch %d of %d' % (epoch, batch_no, len(data.train_loader)), folder)
        trainers.sync.average_aux_states()
        try:
            verdict = validate(cfg, run, data, place, epoch, totals, stop) if folder.lead else None
        except Interrupted:             # the epoch's training is saved whole; resume redoes the validation
            run.save_interrupted(data.sampler.indices, epoch, totals, batch_no, speed)
            stop.exit('in epoch %d during the validation (all %d training batches done: resume validates)'
                      % (epoch, batch_no), folder)
        run.end_epoch(epoch, verdict, data.sampler.indices, speed, tic)
        folder.board.attention(net, cfg, data.val, data.names, place.ctx, epoch)    # TensorBoard's images
    return run, data


def train(cfg, explicit=()):
    """Train with the resolved ``cfg``; ``explicit`` names the flags the user gave (for --resume).

    SIGINT / SIGTERM finish the current batch, write a checkpoint and exit (status 128 + signal) with
    the command that resumes the run.
    """
    with runfolder.StopSignals() as stop:       # (loader workers forked from here on ignore the signals)
        cfg, place, resumed = loop.setup(cfg, explicit)
        if resumed and loop.finished(cfg, resumed[0]['state']) is not None:
            return loop.finished(cfg, resumed[0]['state'], say=True)
        folder = runfolder.RunFolder.prepare(cfg, lead=place.rank == 0)      # only rank 0 writes
        try:
            loop.start_log(folder, place, cfg, _THREADS)
            run, data = fit(cfg, explicit, place, resumed, folder, stop)
            run.finish(place)
            return test(cfg, run, data, place, stop) if folder.lead else None
        except BaseException:
            folder.abandon()                    # a run that failed before its first checkpoint leaves nothing
            raise
        finally:
            folder.close()


def main(argv=None):
    cfg, explicit = config.parse_args(argv)
    return report.test_from_train_flags(cfg, explicit) if cfg['test'] else train(cfg, explicit)


if __name__ == '__main__':
    run_main(main)
