#!/usr/bin/env python
"""Train the Visual Attention Aggregation network (Sarafianos et al., ECCV 2018).

    python train.py                                   # the embedded demo dataset, CPU, a few minutes
    python train.py --dataset wider --data_path /data/WIDER --pretrained --gpus 0
    python train.py --preset upstream ...             # the authors' released configuration

Accepts the authors' flag names (--data_path --epochs --lr --wd --mom --batch_size --num_classes
--finetune --test) with their meanings. Every run writes a folder (``--out``, default
``runs/<dataset>-<backbone>-<preset>-<time>``) with the resolved config, a log, per-epoch metrics (CSV
and JSON), checkpoints (``last.params``, ``best.params``), plots, and the final test metrics.
"""
import os
import sys

if 'OMP_NUM_THREADS' not in os.environ:        # must be set before mxnet is imported
    os.environ['OMP_NUM_THREADS'] = str(os.cpu_count() or 1)
    _OMP_NOTE = 'OMP_NUM_THREADS was not set; using %s (the number of cores)' % os.environ['OMP_NUM_THREADS']
else:
    _OMP_NOTE = 'OMP_NUM_THREADS=%s' % os.environ['OMP_NUM_THREADS']

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import mxnet as mx  # noqa: E402
from mxnet import autograd, gluon, nd  # noqa: E402

import attention  # noqa: E402
import checkpoints  # noqa: E402
import datasets  # noqa: E402
import distributed  # noqa: E402
import metrics  # noqa: E402
import mixed_precision  # noqa: E402
import plots  # noqa: E402
from datasets.base import Transform, make_loader  # noqa: E402
from errors import UserError, run_main  # noqa: E402
from losses import AttentionHistoryLoss, PredictionHistory, WeightedFocalLoss, class_prior_weights  # noqa: E402
from model import BACKBONES, PRESETS, get_vaa_net, use_sync_batchnorm  # noqa: E402

LOG = logging.getLogger('vaa')

# Schedules (SPEC 5). Patience p means: divide the learning rate by 10 once the monitored validation
# metric has not improved for more than p epochs, at most `lr_drops` times.
SCHEDULES = {
    ('paper', 'wider'): dict(optimizer='sgd', lr=1e-3, lr_patience=3, lr_drops=2, batch_size=32, epochs=40),
    ('upstream', 'wider'): dict(optimizer='sgd', lr=1e-4, lr_patience=10, lr_drops=3, batch_size=24,
                                epochs=250),
    ('paper', 'peta'): dict(optimizer='adam', lr=1e-4, lr_patience=8, lr_drops=2, batch_size=32, epochs=60),
}
# Which schedule a dataset follows (the demo has its own defaults in datasets/digits.py).
DATASET_FAMILY = {'wider': 'wider', 'csv': 'wider', 'lst': 'wider', 'rec': 'wider', 'peta': 'peta',
                  'pa100k': 'peta'}
# What the upstream preset switches on (SPEC 4), each also a flag.
UPSTREAM_QUIRKS = dict(plain_bce=True, history_zero_rows=True, normalisation='upstream')
PAPER_SETTINGS = dict(plain_bce=False, history_zero_rows=False, normalisation='paper')

CHECKPOINT_DIR = 'checkpoints'


def build_parser():
    p = argparse.ArgumentParser(
        description='Train (or with --test evaluate) the Visual Attention Aggregation network.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # The authors' flags, same names and meanings.
    a('--data_path', help='dataset root (the demo dataset is cached in data/demo when not given)')
    a('--epochs', type=int, help='number of epochs (default: per preset and dataset)')
    a('--lr', type=float, help='initial learning rate (default: per preset and dataset)')
    a('--wd', type=float, default=5e-4, help='weight decay')
    a('--mom', type=float, default=0.9, help='SGD momentum')
    a('--batch_size', type=int, help='total batch size over all devices (default: per preset and dataset)')
    a('--num_classes', type=int, help='number of attributes; checked against the dataset')
    a('--finetune', action='store_true',
      help="the authors' meaning: freeze the whole backbone and drop the primary-branch loss")
    a('--test', action='store_true',
      help='evaluate on the test split instead of training: the best checkpoint of --resume RUN_DIR, or '
           "the authors' saved_models/ folder given by --upstream-weights")
    # Ours.
    a('--dataset', default='demo', choices=datasets.names(), help='dataset')
    a('--preset', default='paper', choices=sorted(PRESETS),
      help='paper: the supplement architecture with the focal/history losses; upstream: the released code')
    a('--backbone', choices=BACKBONES, help='backbone (default: resnet101_v1; resnet18_v1 for the demo)')
    a('--pretrained', action='store_true', help='start the backbone from ImageNet weights (model-zoo cache)')
    a('--input-size', type=int, help='square input side (default: 224; 48 for the demo)')
    a('--gpus', help="GPU ids, e.g. '0' or '0,1'; CPU when not given")
    a('--cpus', type=int, default=1, help='without --gpus: split each batch over this many CPU contexts '
                                          '(exercises the multi-device path)')
    a('--optimizer', choices=['sgd', 'adam'], help='optimizer (default: per preset and dataset)')
    a('--freeze-epochs', type=int, default=0,
      help="paper schedule: train only the heads (and the new output layer) for this many epochs, "
           "then everything")
    a('--gamma', type=float, default=0.5, help='focusing parameter of the weighted focal loss (Eq. 4)')
    a('--class-weights', default='deepmar', choices=['deepmar', 'paper'],
      help="form of the class-prior weights in Eq. 4: deepmar (the authors' code) or paper (exp(-a_c))")
    a('--history-start', type=int, default=2, help='first epoch whose predictions are stored')
    a('--history-track', type=int, default=5,
      help='predictions kept per sample; the history weighting starts at this epoch')
    a('--plain-bce', dest='plain_bce', action='store_true', default=None,
      help='upstream quirk: plain sigmoid BCE for every branch (default on for --preset upstream)')
    a('--no-plain-bce', dest='plain_bce', action='store_false', help='use the paper losses with any preset')
    a('--history-zero-rows', dest='history_zero_rows', action='store_true', default=None,
      help='upstream quirk: count the zero-initialised history rows (default on for --preset upstream)')
    a('--no-history-zero-rows', dest='history_zero_rows', action='store_false',
      help='use only stored predictions with any preset')
    a('--lr-patience', type=int, help='epochs without val improvement before the lr is divided by 10')
    a('--lr-drops', type=int, help='maximum number of learning-rate drops')
    a('--monitor', choices=['mAP', 'mA', 'f1'], help='validation metric for best checkpoint and lr drops')
    a('--train-split', default='train', help="training split (WIDER: the paper used 'train'; 'trainval' too)")
    a('--val-split', default='val', help='validation split')
    a('--test-split', default='test', help='test split')
    a('--partition', type=int, default=0, help='PETA partition (0-4)')
    a('--all-attributes', action='store_true', help='PETA: all 105 attributes instead of the usual 35')
    a('--cache-dir', help='WIDER: folder for the cached person crops (default: <data_path>/crops256)')
    a('--skip-bad-samples', action='store_true',
      help='skip (and count) missing or unreadable images and malformed labels instead of stopping')
    a('--seed', type=int, default=0, help='random seed (initialisation, data order, augmentation)')
    a('--num-workers', type=int, help='data-loader worker processes')
    a('--out', help='run folder (default: runs/<dataset>-<backbone>-<preset>-<time>)')
    a('--resume', help='run folder to continue from its last checkpoint (with --test: to evaluate)')
    a('--upstream-weights', help="with --test: the authors' saved_models/ folder")
    a('--limit', type=int, help='use only the first N samples of every split (quick checks)')
    a('--log-interval', type=int, default=20, help='batches between progress lines when not on a terminal')
    a('--no-hybridize', dest='hybridize', action='store_false', help='run the network imperatively')
    a('--kvstore', default='device',
      help='gradient exchange: device (one machine, several devices) or dist_sync (several machines; '
           'start with launch.py or the DMLC_* variables)')
    a('--syncbn', action='store_true', help='batch-norm statistics over all devices of a machine (SyncBatchNorm)')
    a('--amp', action='store_true', help='float16 training with dynamic loss scaling (GPU only)')
    a('--save-all-ranks', action='store_true',
      help='distributed check: every worker writes its final weights to <out>/rank<k>.params')
    a('--debug', action='store_true', help='show tracebacks')
    return p


def augmentation_geometry(data_defaults, input_size):
    """(resize, crop range): the dataset's numbers at its default input size, scaled to ``input_size``."""
    scale = input_size / float(data_defaults.get('input_size', 224))
    crop = data_defaults.get('crop_range', (128, 224))
    return int(round(data_defaults.get('resize', 256) * scale)), [int(round(c * scale)) for c in crop]


def resolve_config(args):
    """Flags > dataset defaults > preset/dataset schedule; returns a plain dict (saved as config.json)."""
    cfg = dict(vars(args))
    data_defaults = datasets.defaults(args.dataset)
    family = DATASET_FAMILY.get(args.dataset)
    schedule = SCHEDULES.get((args.preset, family)) or SCHEDULES.get(('paper', family)) or {}
    for key in ('backbone', 'input_size', 'epochs', 'batch_size', 'lr', 'optimizer', 'lr_patience',
                'lr_drops', 'monitor', 'num_workers'):
        if cfg.get(key) is None:
            cfg[key] = data_defaults.get(key, schedule.get(key))
    fallbacks = dict(backbone='resnet101_v1', input_size=224, epochs=30, batch_size=32, lr=1e-3,
                     optimizer='sgd', lr_patience=3, lr_drops=2, monitor='mAP', num_workers=4)
    for key, value in fallbacks.items():
        if cfg.get(key) is None:
            cfg[key] = value
    cfg['resize'], cfg['crop_range'] = augmentation_geometry(data_defaults, cfg['input_size'])
    quirks = UPSTREAM_QUIRKS if args.preset == 'upstream' else PAPER_SETTINGS
    for key, value in quirks.items():
        if cfg.get(key) is None:
            cfg[key] = value
    if cfg['freeze_epochs'] < 0 or cfg['epochs'] < 1 or cfg['batch_size'] < 1:
        raise UserError('--epochs and --batch_size must be positive and --freeze-epochs non-negative')
    if cfg['finetune'] and cfg['freeze_epochs']:
        raise UserError('--finetune freezes the backbone for the whole run; drop --freeze-epochs')
    if cfg['lr'] <= 0:
        raise UserError('--lr must be positive, got %g' % cfg['lr'])
    return cfg


def parse_contexts(gpus, cpus=1):
    """None -> [cpu()] (or ``cpus`` CPU contexts), '0,1' -> [gpu(0), gpu(1)]."""
    gpus = (gpus or '').strip()
    if not gpus:
        if cpus < 1:
            raise UserError('--cpus must be at least 1')
        return [mx.cpu(i) for i in range(cpus)]
    try:
        ids = [int(g) for g in gpus.split(',') if g.strip() != '']
    except ValueError:
        raise UserError("--gpus takes comma-separated GPU ids such as '0' or '0,1', got %r" % gpus)
    available = mx.context.num_gpus()
    missing = [i for i in ids if i >= available]
    if missing:
        raise UserError('--gpus %s: this machine has %d GPU(s) visible to mxnet%s' % (
            gpus, available, '' if available else ' (is the CPU build of mxnet installed? pip install '
            'mxnet-cu112 for CUDA 11.2)'))
    return [mx.gpu(i) for i in ids]


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


def prepare_run_dir(cfg):
    """Create the run folder; never reuse one that already holds a run unless resuming it."""
    if cfg['resume']:
        run_dir = cfg['resume']
        if not os.path.isfile(os.path.join(run_dir, CHECKPOINT_DIR, 'last.params')):
            raise UserError('--resume %s: no %s/last.params there; give the folder of an earlier run'
                            % (run_dir, CHECKPOINT_DIR))
        return run_dir
    run_dir = cfg['out'] or os.path.join('runs', '%s-%s-%s-%s' % (
        cfg['dataset'], cfg['backbone'], cfg['preset'], time.strftime('%Y%m%d-%H%M%S')))
    if os.path.isfile(os.path.join(run_dir, CHECKPOINT_DIR, 'last.params')):
        raise UserError('%s already holds a run; continue it with --resume %s or choose another --out'
                        % (run_dir, run_dir))
    try:
        os.makedirs(os.path.join(run_dir, CHECKPOINT_DIR), exist_ok=True)
        probe = os.path.join(run_dir, '.write-test')
        with open(probe, 'w') as f:
            f.write('ok')
        os.remove(probe)
    except OSError as err:
        raise UserError('cannot write the run folder %s (%s); choose another --out' % (run_dir, err.strerror))
    return run_dir


def load_split(cfg, split):
    data = datasets.get_split(cfg['dataset'], cfg['data_path'], split, limit=cfg.get('limit'),
                              skip_bad=cfg.get('skip_bad_samples'), partition=cfg.get('partition'),
                              all_attributes=cfg.get('all_attributes'), cache_dir=cfg.get('cache_dir'))
    if getattr(data, 'skipped', 0):
        LOG.warning('%s %s: %d bad sample(s) skipped (--skip-bad-samples)', cfg['dataset'], split, data.skipped)
    if len(data) == 0:
        raise UserError('the %s split of %s (%s) is empty' % (split, cfg['dataset'], cfg['data_path']))
    if cfg.get('num_classes') and cfg['num_classes'] != data.num_classes:
        raise UserError('--num_classes %d but the %s labels have %d attributes; drop --num_classes or '
                        'fix it' % (cfg['num_classes'], cfg['dataset'], data.num_classes))
    return data


def eval_loader(cfg, data):
    transform = Transform(cfg['input_size'], cfg['resize'], cfg['crop_range'], train=False,
                          normalisation=cfg['normalisation'])
    loader, _ = make_loader(data, transform, cfg['batch_size'], shuffle=False,
                            num_workers=cfg['num_workers'])
    return loader


def split_batch(batch, ctx):
    """Split (data, label, mask, index) over the devices."""
    data, label, mask, index = batch
    if data.shape[0] < len(ctx):
        ctx = ctx[:data.shape[0]]
    parts = [gluon.utils.split_and_load(x, ctx, even_split=False) for x in (data, label, mask)]
    index = index.asnumpy().astype(np.int64)
    bounds = np.cumsum([0] + [p.shape[0] for p in parts[0]])
    indices = [index[bounds[i]:bounds[i + 1]] for i in range(len(parts[0]))]
    return list(zip(parts[0], parts[1], parts[2], indices))


def predict(net, loader, ctx, loss_fns=None):
    """Sigmoid of the fused logits for a whole split, with labels and mask (NumPy), and mean loss."""
    scores, labels, masks, total, count = [], [], [], 0.0, 0
    for batch in loader:
        for x, y, m, _ in split_batch(batch, ctx):
            primary, taps, fused = net(x)[:3]
            scores.append(nd.sigmoid(fused))
            labels.append(y)
            masks.append(m)
            if loss_fns is not None:
                focal, att = loss_fns
                loss = focal(primary, y, m) + nd.add_n(*[att(t, y, m) for t in taps])
                total += float(loss.sum().asscalar())
                count += x.shape[0]
    to_np = lambda arrs: np.concatenate([a.asnumpy() for a in arrs]) if arrs else np.zeros((0, 0))
    return to_np(scores), to_np(labels), to_np(masks), (total / count if count else float('nan'))


def write_metrics(run_dir, rows):
    with open(os.path.join(run_dir, 'metrics.json'), 'w') as f:
        json.dump(rows, f, indent=1)
    keys = [k for k in rows[0] if not isinstance(rows[0][k], (list, dict))]
    with open(os.path.join(run_dir, 'metrics.csv'), 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction='ignore')
        writer.writeheader()
        writer.writerows(rows)


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


# What a resumed run may change; everything else comes from the run's saved config.
RESUME_OVERRIDES = ('epochs', 'data_path', 'gpus', 'cpus', 'num_workers', 'log_interval', 'debug', 'kvstore')
# What a resumed run must not change (the weights and the schedule depend on them).
RESUME_FIXED = ('dataset', 'preset', 'backbone', 'input_size', 'num_classes', 'lr', 'batch_size', 'optimizer',
                'seed', 'train_split', 'partition', 'all_attributes', 'freeze_epochs', 'finetune', 'gamma')


class Run(object):
    """Everything the loop needs, built from the config in the order of the method section."""

    def __init__(self, cfg, explicit=()):
        ctx = parse_contexts(cfg['gpus'], cfg.get('cpus', 1))
        kvstore = distributed.create_kvstore(cfg['kvstore'], len(ctx))
        self.rank = kvstore.rank if kvstore is not None else 0
        self.num_workers = kvstore.num_workers if kvstore is not None else 1
        self.lead = self.rank == 0                      # only rank 0 writes logs and checkpoints
        self.run_dir = prepare_run_dir(cfg) if self.lead else (cfg['resume'] or cfg['out'] or '.')
        setup_logging(self.run_dir if self.lead else None, self.rank if self.num_workers > 1 else None)
        resume_meta = resume_arrays = None
        if cfg['resume']:
            resume_meta, resume_arrays = checkpoints.read_meta(
                os.path.join(self.run_dir, CHECKPOINT_DIR, 'last.params'))
            saved = resume_meta['config']
            conflicts = ['--%s %s (the run has %s)' % (k.replace('_', '-') if k != 'num_classes' else k, cfg[k],
                                                       saved.get(k))
                         for k in RESUME_FIXED if k in explicit and cfg[k] != saved.get(k)]
            if conflicts:
                raise UserError('--resume %s continues that run as it was configured; %s. Drop those flags or '
                                'start a new run with --out' % (cfg['resume'], ', '.join(conflicts)))
            for key in RESUME_OVERRIDES:
                if key in explicit:
                    saved[key] = cfg[key]
            saved['resume'] = cfg['resume']
            cfg = saved
        self.cfg, self.ctx = cfg, ctx
        if self.lead:
            with open(os.path.join(self.run_dir, 'config.json'), 'w') as f:
                json.dump(cfg, f, indent=1, sort_keys=True)
        LOG.info('run folder: %s', self.run_dir)
        LOG.info(_OMP_NOTE)
        LOG.info('devices: %s%s', ', '.join(str(c) for c in ctx), '; worker %d of %d (%s)' % (
            self.rank, self.num_workers, cfg['kvstore']) if self.num_workers > 1 else '')
        mx.random.seed(cfg['seed'])
        np.random.seed(cfg['seed'])
        if cfg['amp']:
            mixed_precision.init_amp(ctx)           # before the network is built

        # Data
        self.train_data, self.val_data, self.test_data = (
            load_split(cfg, cfg[k]) for k in ('train_split', 'val_split', 'test_split'))
        self.names = list(self.train_data.attribute_names)
        cfg['num_classes'] = len(self.names)
        LOG.info('%s: %d train, %d val, %d test samples, %d attributes', cfg['dataset'], len(self.train_data),
                 len(self.val_data), len(self.test_data), len(self.names))
        shard_size = len(self.train_data) // self.num_workers
        if cfg['batch_size'] > shard_size:
            raise UserError('--batch_size %d is larger than the training split (%d samples%s); lower it'
                            % (cfg['batch_size'], shard_size, ' per worker' if self.num_workers > 1 else ''))
        train_tf = Transform(cfg['input_size'], cfg['resize'], cfg['crop_range'], train=True,
                             normalisation=cfg['normalisation'], seed=cfg['seed'])
        remainder = shard_size % cfg['batch_size']
        last_batch = 'discard' if 0 < remainder < max(2, len(ctx)) else 'keep'   # BN needs 2+ samples
        self.train_loader, self.sampler = make_loader(
            self.train_data, train_tf, cfg['batch_size'], shuffle=True, num_workers=cfg['num_workers'],
            last_batch=last_batch, seed=cfg['seed'], shard=self.rank, num_shards=self.num_workers)
        self.val_loader = eval_loader(cfg, self.val_data)
        self.test_loader = eval_loader(cfg, self.test_data)

        # Model, losses, history, trainers
        self.net = net = get_vaa_net(cfg['backbone'], len(self.names), cfg['preset'], cfg['input_size'],
                                     cfg['pretrained'], ctx)
        if cfg['syncbn'] and len(ctx) > 1 and ctx[0].device_type == 'cpu':
            raise UserError('--syncbn needs GPUs: mxnet 1.9\'s SyncBatchNorm deadlocks across CPU contexts; '
                            'drop --syncbn or use --gpus 0,1')
        if cfg['syncbn'] and len(ctx) > 1:
            LOG.info('SyncBatchNorm over %d devices: %d layers', len(ctx), use_sync_batchnorm(net, len(ctx)))
        pos_w, neg_w = class_prior_weights(self.train_data.labels, self.train_data.mask, cfg['class_weights'])
        self.focal = WeightedFocalLoss(pos_w, neg_w, gamma=cfg['gamma'], plain_bce=cfg['plain_bce'])
        self.att_loss = AttentionHistoryLoss(plain_bce=cfg['plain_bce'])
        self.history = PredictionHistory(len(self.train_data), len(self.names), track=cfg['history_track'],
                                         start_epoch=cfg['history_start'], ctx=ctx[0],
                                         upstream_zero_rows=cfg['history_zero_rows'])
        opt_params = {'learning_rate': cfg['lr'], 'wd': cfg['wd']}
        if cfg['optimizer'] == 'sgd':
            opt_params['momentum'] = cfg['mom']
        if cfg['amp']:
            opt_params['multi_precision'] = True
        self.trainers = attention.build_stage_trainers(net, cfg['optimizer'], opt_params,
                                                       freeze_backbone=cfg['finetune'], kvstore=None)
        self.sync = distributed.GradientSync(net, ctx, kvstore)
        self.scaling = mixed_precision.LossScaling(cfg['amp'])
        self.state = dict(epoch=0, batch=0, lr=cfg['lr'], best=-1.0, best_epoch=-1, patience=0, drops=0)
        self.rows, self.partial, self.stop_signal = [], None, None
        if resume_meta is not None:
            _, extra = checkpoints.load_training(self.checkpoint('last'), net, self.trainers, self.history,
                                                 resume_arrays)
            self.state = dict(resume_meta['state'])
            if self.state.get('batch'):
                # Interrupted inside an epoch: continue after the batches already done.
                self.partial = dict(loss_sum=self.state['loss_sum'], seen=self.state['seen'],
                                    scores=extra['scores'].asnumpy(), labels=extra['labels'].asnumpy(),
                                    masks=extra['masks'].asnumpy())
            metrics_file = os.path.join(self.run_dir, 'metrics.json')
            self.rows = json.load(open(metrics_file)) if os.path.isfile(metrics_file) else []
            attention.set_learning_rate(self.trainers, self.state['lr'])
            LOG.info('resumed at epoch %d%s (lr %g, best %s %.4f)', self.state['epoch'],
                     ' batch %d' % self.state['batch'] if self.state.get('batch') else '', self.state['lr'],
                     cfg['monitor'], self.state['best'])
        LOG.info('model: %s, preset %s, taps %s, input %d; %s lr %g, batch %d, %d epochs; losses: %s',
                 cfg['backbone'], cfg['preset'], '/'.join(net.taps), cfg['input_size'], cfg['optimizer'],
                 cfg['lr'], cfg['batch_size'], cfg['epochs'], 'plain BCE (upstream)' if cfg['plain_bce'] else
                 'weighted focal (gamma %g, %s weights) + history-weighted BCE' % (cfg['gamma'], cfg['class_weights']))
        self.frozen = None
        if cfg['hybridize']:
            net.hybridize(static_alloc=True, static_shape=True)
            for loss in (self.focal, self.att_loss):
                loss.hybridize(static_alloc=True, static_shape=True)

    def checkpoint(self, which):
        return os.path.join(self.run_dir, CHECKPOINT_DIR, '%s.params' % which)

    def set_frozen(self, epoch):
        """The paper's first phase: backbone features frozen for --freeze-epochs epochs."""
        frozen = epoch < self.cfg['freeze_epochs']
        if self.cfg['finetune'] or frozen == self.frozen:
            return
        if frozen:
            LOG.info('epochs 0-%d: backbone frozen, training the heads', self.cfg['freeze_epochs'] - 1)
        elif self.frozen:
            LOG.info('epoch %d: training end to end', epoch)
        attention.freeze_backbone_features(self.net, frozen)
        self.frozen = frozen
        if self.cfg['hybridize']:
            self.net.hybridize(static_alloc=True, static_shape=True)   # new graph for the new grad_req

    def train_epoch(self, epoch):
        """One pass over this worker's shard (or what is left of it after a resume).

        Returns a dict: ``done`` (False when a stop signal ended it early), ``batch`` (batches done),
        ``loss`` (mean), ``scores``/``labels``/``masks`` (NumPy, for the train mAP), ``speed``.
        """
        cfg, net, history = self.cfg, self.net, self.history
        partial, self.partial = self.partial or {}, None
        done_batches = self.state.get('batch', 0) if partial else 0
        self.sampler.set_epoch(epoch, skip=done_batches * cfg['batch_size'])
        total = len(self.train_loader) - done_batches
        progress = Progress(total, 'epoch %d' % epoch, cfg['log_interval'])
        loss_sum = nd.array([partial.get('loss_sum', 0.0)], ctx=self.ctx[0])
        seen = partial.get('seen', 0)
        first_bad = nd.array([np.inf], ctx=self.ctx[0])        # index of the first non-finite batch loss
        scores, labels, masks = [], [], []
        if partial:
            scores, labels, masks = [[nd.array(partial[k])] for k in ('scores', 'labels', 'masks')]
        params = list(net.collect_params().values())
        batch_no = done_batches
        for batch in self.train_loader:
            parts = split_batch(batch, self.ctx)
            weights = [history.weights(idx, epoch, ctx=x.context) for x, _, _, idx in parts]
            losses, fused_parts = [], []
            with autograd.record():
                for (x, y, m, _), w in zip(parts, weights):
                    primary, taps, fused = net(x)
                    if cfg['amp']:
                        primary, taps = primary.astype('float32'), [t.astype('float32') for t in taps]
                    loss = nd.add_n(*[self.att_loss(t, y, m, w) for t in taps])      # Eqs. 5-6
                    if not cfg['finetune']:
                        loss = loss + self.focal(primary, y, m)                       # Eq. 4
                    losses.append(loss)
                    fused_parts.append(fused)
                scaled = self.scaling.scale_losses(losses)
            autograd.backward(scaled)
            batch_size = batch[0].shape[0]
            self.scaling.step(self.sync, self.trainers, batch_size, params)
            for (x, y, m, idx), fused in zip(parts, fused_parts):
                probs = nd.sigmoid(fused.detach().astype('float32'))
                history.update(idx, probs, epoch)
                scores.append(probs)            # stays on the device until the epoch ends
                labels.append(y)
                masks.append(m)
            batch_loss = nd.add_n(*[l.sum().as_in_context(self.ctx[0]) for l in losses])
            here = nd.full((1,), batch_no, ctx=self.ctx[0])
            first_bad = nd.minimum(first_bad, nd.where(nd.contrib.isfinite(batch_loss), first_bad, here))
            loss_sum += batch_loss
            seen += batch_size
            batch_no += 1
            progress.update(batch_size, lambda: float((loss_sum / seen).asscalar()))
            if progress.count % progress.interval == 0:
                self.check_finite(first_bad, epoch)
            if self.should_stop():
                break
        self.check_finite(first_bad, epoch)
        speed = progress.close() * self.num_workers
        to_np = lambda arrs: np.concatenate([a.asnumpy() for a in arrs]) if arrs else np.zeros((0, len(self.names)))
        return dict(done=batch_no >= len(self.train_loader), batch=batch_no, seen=seen,
                    loss_sum=float(loss_sum.asscalar()), loss=float((loss_sum / max(seen, 1)).asscalar()),
                    scores=to_np(scores), labels=to_np(labels), masks=to_np(masks), speed=speed)

    def check_finite(self, first_bad, epoch):
        """Stop with the epoch and batch of the first non-finite loss; the checkpoints stay as they are."""
        bad = float(first_bad.asscalar())
        if np.isfinite(bad):
            raise UserError('the training loss became inf/NaN in epoch %d at batch %d; stopped without saving. '
                            'The last good checkpoint is %s (resume with --resume %s, e.g. after lowering the '
                            'learning rate in a new run, or check the data)' % (
                                epoch, int(bad), self.checkpoint('last'), self.run_dir))

    def should_stop(self):
        """A SIGINT/SIGTERM arrived (on any worker, in a distributed job)."""
        flag = 1.0 if self.stop_signal else 0.0
        if self.sync.distributed:           # every worker must stop after the same batch
            flag = float(self.sync.allreduce_array('stop', nd.array([flag], ctx=self.ctx[0])).asscalar())
        return flag > 0

    def save_interrupted(self, epoch, result):
        """Checkpoint a partial epoch so that --resume continues after its last finished batch."""
        state = dict(self.state, epoch=epoch, batch=result['batch'], loss_sum=result['loss_sum'],
                     seen=result['seen'])
        history = self.sync.merged_history(self.history, self.sampler.indices)
        if self.lead:
            extra = {k: nd.array(result[k]) for k in ('scores', 'labels', 'masks')}
            checkpoints.save_training(self.checkpoint('last'), self.net, self.trainers, history,
                                      dict(state=state, config=self.cfg, attribute_names=self.names), extra)

    def end_epoch(self, epoch, result, tic):
        """Validate (rank 0), drop the lr on plateau, write metrics and checkpoints."""
        cfg, state = self.cfg, self.state
        train_loss, speed = result['loss'], result['speed']
        t_scores, t_labels, t_masks = result['scores'], result['labels'], result['masks']
        self.sync.average_aux_states()
        improved, row = False, None
        if self.lead:
            t_result = metrics.evaluate(t_scores, t_labels, t_masks, self.names)
            v_scores, v_labels, v_masks, val_loss = predict(self.net, self.val_loader, self.ctx,
                                                            (self.focal, self.att_loss))
            v_result = metrics.evaluate(v_scores, v_labels, v_masks, self.names)
            value = {'mAP': v_result['mAP'], 'mA': v_result['mA'], 'f1': v_result['f1']}[cfg['monitor']]
            improved = value > state['best']
            if improved:
                state.update(best=value, best_epoch=epoch, patience=0)
            else:
                state['patience'] += 1
                if state['patience'] > cfg['lr_patience'] and state['drops'] < cfg['lr_drops']:
                    state['lr'] /= 10.0
                    state['drops'] += 1
                    state['patience'] = 0
                    LOG.info('no val %s gain for more than %d epochs: learning rate -> %g', cfg['monitor'],
                             cfg['lr_patience'], state['lr'])
            row = dict(epoch=epoch, lr=state['lr'], train_loss=train_loss, val_loss=val_loss,
                       train_mAP=t_result['mAP'], val_mAP=v_result['mAP'], val_mA=v_result['mA'],
                       val_f1=v_result['f1'], samples_per_sec=speed, seconds=time.time() - tic,
                       val_ap=[r['ap'] for r in v_result['per_attribute']])
        # Every worker follows rank 0's schedule.
        state['lr'], state['drops'] = self.sync.broadcast_values('schedule', [state['lr'], state['drops']])
        attention.set_learning_rate(self.trainers, state['lr'])
        state['epoch'], state['batch'] = epoch + 1, 0
        for key in ('loss_sum', 'seen'):
            state.pop(key, None)
        history = self.sync.merged_history(self.history, self.sampler.indices)
        if not self.lead:
            return
        self.rows.append(row)
        LOG.info('Epoch [%d]: train loss %.4f  val loss %.4f  train mAP %.2f  val mAP %.2f  val mA %.2f  '
                 '(%.1f samples/sec, %.0fs)%s', epoch, train_loss, row['val_loss'], 100 * row['train_mAP'],
                 100 * row['val_mAP'], 100 * row['val_mA'], speed, row['seconds'], '  * best' if improved else '')
        if self.scaling.skipped:
            LOG.info('AMP: %d step(s) skipped for float16 overflow so far (loss scale %g)', self.scaling.skipped,
                     self.scaling.scale)
        meta = dict(state=state, config=cfg, attribute_names=self.names)
        checkpoints.save_training(self.checkpoint('last'), self.net, self.trainers, history, meta)
        if improved:
            checkpoints.save_training(self.checkpoint('best'), self.net, {}, None, meta)
        write_metrics(self.run_dir, self.rows)
        plots.curves(self.rows, os.path.join(self.run_dir, 'curves.png'))

    def test(self):
        """Test split with the best checkpoint; prints the per-attribute table."""
        state = self.state
        checkpoints.load_weights(self.checkpoint('best'), self.net)
        scores, labels, masks, _ = predict(self.net, self.test_loader, self.ctx)
        result = metrics.evaluate(scores, labels, masks, self.names)
        result.update(split=self.cfg['test_split'], checkpoint=self.checkpoint('best'), best_epoch=state['best_epoch'])
        with open(os.path.join(self.run_dir, 'test_metrics.json'), 'w') as f:
            json.dump(result, f, indent=1)
        plots.ap_bars(result, os.path.join(self.run_dir, 'test_ap.png'), 'test (epoch %d)' % state['best_epoch'])
        chance = metrics.chance_map(labels, masks)
        print(metrics.format_table(result, title='Test split, best checkpoint (epoch %d of %s):'
                                   % (state['best_epoch'], self.run_dir)))
        LOG.info('test mAP %.2f (chance level from the label priors: %.2f); run folder %s',
                 100 * result['mAP'], 100 * chance, self.run_dir)
        return result


def train(cfg, explicit=()):
    """Train with the resolved ``cfg``; ``explicit`` names the flags the user gave (for --resume).

    SIGINT / SIGTERM finish the current batch, write a checkpoint and exit (status 128 + signal) with
    the command that resumes the run.
    """
    received = []
    handler = lambda signum, frame: received.append(signum)
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        run = Run(cfg, explicit)          # (loader workers forked here inherit the handler: they go on)
        run.stop_signal = received
        for epoch in range(run.state['epoch'], run.cfg['epochs']):
            tic = time.time()
            run.set_frozen(epoch)
            result = run.train_epoch(epoch)
            if not result['done']:
                run.save_interrupted(epoch, result)
                name = signal.Signals(received[0]).name if received else 'a stop request'
                message = ('stopped by %s in epoch %d after batch %d; checkpoint %s written. Resume with:\n'
                           '  python train.py --resume %s' % (name, epoch, result['batch'] - 1,
                                                              run.checkpoint('last'), run.run_dir))
                LOG.info(message.replace('\n', ' '))
                sys.stderr.write(message + '\n')
                raise SystemExit(128 + (received[0] if received else 0))
            run.end_epoch(epoch, result, tic)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if run.cfg.get('save_all_ranks') and run.num_workers > 1:
        checkpoints.save_training(os.path.join(run.run_dir, 'rank%d.params' % run.rank), run.net, {}, None,
                                  dict(state=run.state, config=run.cfg, attribute_names=run.names))
    run.sync.barrier()
    if not run.lead:
        return None
    return run.test()


def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    if cfg['test']:
        import eval as evaluation
        return evaluation.test_from_train_flags(cfg)
    explicit = [k for k, v in vars(args).items() if v is not None and v != build_parser().get_default(k)]
    return train(cfg, explicit)


if __name__ == '__main__':
    run_main(main)
