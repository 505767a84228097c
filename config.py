"""What a run is configured with: train.py's flags, the presets' and datasets' defaults, and how they
combine into the config a run saves (``config.json``, and inside every checkpoint).

* the flags are in ``flags.py`` (``build_parser``, imported here), the presets' tables in ``presets.py``;
* :func:`resolve_config`: flags > the dataset's defaults > the preset's schedule > fallbacks, as a
  plain dict.
* :func:`merge_resume`: a resumed run's saved config with the flags a resume may change.
* :func:`defaults`: the resolved config for a few settings (eval.py on the authors' files, which carry
  no config).
* :func:`transform`, :func:`train_loader`, :func:`eval_loader`, :func:`data_options`: the image
  transform, loaders and dataset options a config implies.
"""
import argparse

import datasets
from datasets.base import Transform, make_loader
from errors import UserError, plural
from flags import (RANGES, HelpFormatter, Parser, build_parser, check_ranges, group_adder,  # noqa: F401
                   spellings)
from presets import BACKBONES, DATASET_FAMILY, FALLBACKS, PRESETS, PRESET_SETTINGS, SCHEDULES  # noqa: F401

# What a resumed run may change; everything else comes from the run's saved config.
RESUME_OVERRIDES = ('epochs', 'data_path', 'gpus', 'cpus', 'num_workers', 'log_interval', 'debug', 'kvstore')
# What a resumed run must not change (the weights and the schedule depend on them).
RESUME_FIXED = ('dataset', 'preset', 'backbone', 'input_size', 'num_classes', 'lr', 'batch_size', 'optimizer',
                'seed', 'train_split', 'partition', 'all_attributes', 'freeze_epochs', 'finetune', 'gamma',
                'shuffle', 'pretrained', 'taps', 'head', 'rga', 'rga_stages', 'rga_ratios', 'gcn_embeddings',
                'gcn_t', 'gcn_p', 'gcn_reweight', 'gcn_pool', 'backbone_lr_mult', 'mc_loss', 'mc_weights', 'mc_drop',
                'mc_xi', 'apcnn_topk', 'apcnn_anchors', 'apcnn_iou', 'apcnn_drop')


def parse_args(argv=None):
    """-> (resolved config, names of the flags the user gave with a value other than the default)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = [k for k, v in vars(args).items() if v is not None and v != parser.get_default(k)]
    return resolve_config(args), explicit


# ---------------------------------------------------------------------------------------------- resolving

def augmentation_geometry(data_defaults, input_size):
    """(resize, crop range): the dataset's numbers at its default input size, scaled to ``input_size``."""
    scale = input_size / float(data_defaults.get('input_size', 224))
    crop = data_defaults.get('crop_range', (128, 224))
    return int(round(data_defaults.get('resize', 256) * scale)), [int(round(c * scale)) for c in crop]


def resolve_config(args):
    """Flags > dataset defaults > preset/dataset schedule > fallbacks; a plain dict (saved as config.json).

    ``args``: the parsed flags (a Namespace or a dict of every flag).
    """
    cfg = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)
    if cfg.get('dataset') is None and not cfg.get('resume'):
        cfg['dataset'] = datasets.detect(cfg.get('data_path'))
    data_defaults = datasets.defaults(cfg['dataset']) if cfg.get('dataset') else {}
    if cfg.get('preset') is None:
        cfg['preset'] = data_defaults.get('preset', 'paper')
    family = DATASET_FAMILY.get(cfg.get('dataset'))
    schedule = SCHEDULES.get((cfg['preset'], family)) or SCHEDULES.get(('paper', family)) or {}
    for key, fallback in FALLBACKS.items():
        if cfg.get(key) is None:
            cfg[key] = data_defaults.get(key, schedule.get(key, fallback))
    cfg['resize'], cfg['crop_range'] = augmentation_geometry(data_defaults, cfg['input_size'])
    freeze_given = cfg.get('freeze_epochs') is not None
    for key, value in PRESET_SETTINGS[cfg['preset']].items():
        if cfg.get(key) is None:
            cfg[key] = data_defaults.get(key, value)
    if not freeze_given and (cfg.get('finetune') or not cfg['pretrained']):
        # The first phase trains the heads on ImageNet features; on random ones it would teach nothing.
        cfg['freeze_epochs'] = 0
    check_ranges(cfg, RANGES)
    if not cfg.get('resume'):       # a resumed run keeps its checked config (merge_resume refuses changes)
        check_combinations(cfg, freeze_given)
    return cfg


def check_combinations(cfg, freeze_given=True):
    """UserError for settings that cannot work together (the first phase, freezing, the related systems)."""
    if cfg['freeze_epochs'] >= cfg['epochs'] > 0 and not freeze_given:
        raise UserError('--epochs %d ends inside the first phase of --preset %s (--freeze-epochs %d: backbone and '
                        'primary classifier frozen in epochs 0-%d), so they would never train: give --epochs %d or '
                        'more, or a smaller --freeze-epochs' % (cfg['epochs'], cfg['preset'], cfg['freeze_epochs'],
                                                                 cfg['freeze_epochs'] - 1, cfg['freeze_epochs'] + 1))
    if cfg['finetune'] and cfg['freeze_epochs']:
        raise UserError('--finetune freezes the backbone for the whole run; drop --freeze-epochs')
    if (cfg.get('taps') or '').strip().lower() == 'none' and (cfg['finetune'] or cfg['freeze_epochs']):
        raise UserError('--taps none leaves only the primary classifier, which --finetune/--freeze-epochs '
                        'would freeze: nothing would train; drop one of them')
    if cfg.get('rga', 'none') != 'none' and cfg['backbone'].startswith('densenet'):
        raise UserError('--rga is built for ResNet backbones; %s is a DenseNet' % cfg['backbone'])
    if cfg.get('head') == 'apcnn':
        check_apcnn(cfg)
    if cfg.get('mc_loss'):
        mc_weights(cfg)
        if cfg['finetune']:
            raise UserError('--mc-loss shapes the channels of the backbone, which --finetune freezes for the whole '
                            'run (only its bias would train); drop one of them')


def _numbers(cfg, key, kind, count, test, what):
    value = cfg.get(key)
    try:
        numbers = tuple(kind(v) for v in str(value).split(','))
    except ValueError:
        numbers = ()
    if len(numbers) != count or not all(test(v) for v in numbers):
        raise UserError('--%s must be %d %s, got %r' % (key.replace('_', '-'), count, what, value))
    return numbers


def check_apcnn(cfg):
    """UserError for AP-CNN settings it cannot take."""
    if cfg['input_size'] % 32:
        raise UserError('--head apcnn needs an --input-size divisible by 32 (its pyramid adds maps upsampled x2 '
                        'twice), got %d: use %d' % (cfg['input_size'], max(32, int(round(cfg['input_size'] / 32.0)) * 32)))
    for flag, key in (('--taps', 'taps'), ('--rga', 'rga'), ('--mc-loss', 'mc_loss')):
        if cfg.get(key) not in (None, False, 'none'):
            raise UserError('--head apcnn has its own attention pyramid instead of the VAA taps and takes no %s; '
                            'drop it' % flag)
    _numbers(cfg, 'apcnn_topk', int, 3, lambda v: v >= 1, 'whole numbers, 1 or more, such as 5,3,1')
    _numbers(cfg, 'apcnn_anchors', float, 3, lambda v: 0 < v < float('inf'), 'positive numbers, such as 64,128,256')
    drop = _numbers(cfg, 'apcnn_drop', float, 2, lambda v: 0 <= v <= 1, 'probabilities, such as 0.3,0.3')
    if sum(drop) > 1:
        raise UserError('--apcnn-drop: the two probabilities add up to more than 1 (%s)' % cfg['apcnn_drop'])


def mc_weights(cfg):
    """``--mc-weights`` as (discriminality weight, diversity weight), or a UserError."""
    value = cfg.get('mc_weights', '1.5,20')
    try:
        weights = tuple(float(v) for v in str(value).split(','))
    except ValueError:
        weights = ()
    if len(weights) != 2 or not all(w == w and 0 <= w < float('inf') for w in weights):
        raise UserError("--mc-weights must be two numbers, 0 or more, such as '1.5,20'; got %r" % (value,))
    return weights


def defaults(**flags):
    """The config train.py would resolve for these flags (by their ``dest`` names) and no others."""
    args = build_parser().parse_args([])
    unknown = set(flags) - set(vars(args))
    if unknown:
        raise ValueError('unknown settings %s' % sorted(unknown))
    vars(args).update(flags)
    return resolve_config(args)


def merge_resume(cfg, saved, explicit, state=None):
    """The saved config of the run being resumed, with the flags a resume may change (``explicit``:
    the flags the user gave). A flag that would change the model or the schedule is refused, and so is
    an ``--epochs`` below the epochs the run has finished (``state``: its checkpoint's loop state)."""
    done = (state or {}).get('epoch', 0)
    if 'epochs' in explicit and cfg['epochs'] < done:
        raise UserError('--resume %s: the run has finished %s, so --epochs %d would train nothing; give '
                        '--epochs above %d to train more (eval.py %s evaluates it as it is)'
                        % (cfg['resume'], plural(done, 'epoch'), cfg['epochs'], done, cfg['resume']))
    conflicts = ['--%s %s (the run has %s)' % (k.replace('_', '-') if k != 'num_classes' else k, cfg[k], saved.get(k))
                 for k in RESUME_FIXED if k in explicit and cfg[k] != saved.get(k)]
    if conflicts:
        raise UserError('--resume %s continues that run as it was configured; %s. Drop those flags or start a '
                        'new run with --out' % (cfg['resume'], ', '.join(conflicts)))
    merged = dict(saved)
    for key in RESUME_OVERRIDES:
        if key in explicit:
            merged[key] = cfg[key]
    merged['resume'] = cfg['resume']
    return merged


# ---------------------------------------------------------------------------------------------- what a config implies

def transform(cfg, train=False):
    """The image transform of a config: random crops and mirrors for training, the centre crop else."""
    return Transform(cfg['input_size'], cfg['resize'], cfg['crop_range'], train=train,
                     normalisation=cfg['normalisation'], seed=cfg.get('seed', 0))


def train_loader(cfg, data, num_devices=1, rank=0, num_workers=1):
    """(loader, sampler) of this worker's shard of ``data`` with the training transform and order."""
    shard = len(data) // num_workers
    if cfg['batch_size'] > shard:
        raise UserError('--batch_size %d is larger than the training split (%d samples%s); lower it'
                        % (cfg['batch_size'], shard, ' per worker' if num_workers > 1 else ''))
    remainder = shard % cfg['batch_size']
    last_batch = 'discard' if 0 < remainder < max(2, num_devices) else 'keep'      # BN needs 2+ samples
    return make_loader(data, transform(cfg, train=True), cfg['batch_size'], shuffle=cfg.get('shuffle', True),
                       num_workers=cfg['num_workers'], last_batch=last_batch, seed=cfg['seed'], shard=rank,
                       num_shards=num_workers)


def eval_loader(cfg, data):
    """Batches of ``data`` in order, with the evaluation transform of ``cfg``."""
    return make_loader(data, transform(cfg), cfg['batch_size'], shuffle=False, num_workers=cfg['num_workers'])[0]


def data_options(cfg):
    """Keyword arguments of ``datasets.load_split`` from a config."""
    return dict(limit=cfg.get('limit'), skip_bad=cfg.get('skip_bad_samples'), partition=cfg.get('partition'),
                all_attributes=cfg.get('all_attributes'), cache_dir=cfg.get('cache_dir'))
