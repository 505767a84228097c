"""What a run is configured with: train.py's flags, the presets' and datasets' defaults, and how they
combine into the config a run saves (``config.json``, and inside every checkpoint).

* the flags are in ``flags.py`` (``build_parser``, imported here), the presets' tables in ``presets.py``;
* :func:`resolve_config`: flags > the dataset's defaults > the preset's schedule > fallbacks, as a
  plain dict.
* :func:`merge_resume`: a resumed run's saved config with the flags a resume may change.
* :func:`defaults`: the resolved config for a few settings (eval.py on the authors' files, which carry
  no config).
* :func:`complete`: the one place where a saved config is upgraded (keys added since filled in).

The image transform, the loaders and the dataset options a config implies are in ``datasets/loaders.py``.
"""
import argparse

import datasets
import related
from common.errors import UserError, plural
from engine.flags import (RANGES, HelpFormatter, Parser, build_parser, check_ranges, group_adder,  # noqa: F401
                   spellings)
from common.presets import BACKBONES, FALLBACKS, PRESETS, PRESET_SETTINGS, SCHEDULES, schedule_for  # noqa: F401

# What a resumed run may change; everything else comes from the run's saved config.
RESUME_OVERRIDES = ('epochs', 'data_path', 'gpus', 'cpus', 'num_workers', 'log_interval', 'debug', 'kvstore',
                    'metrics', 'tensorboard', 'keep')
# What a resumed run must not change (the weights and the schedule depend on them), the related systems'
# settings included.
RESUME_FIXED = ('dataset', 'preset', 'backbone', 'input_size', 'num_classes', 'lr', 'batch_size', 'optimizer',
                'seed', 'train_split', 'partition', 'all_attributes', 'split_file', 'freeze_epochs',
                'finetune', 'gamma',
                'shuffle', 'pretrained', 'taps', 'head', 'backbone_lr_mult') + related.fixed()


def parse_args(argv=None):
    """-> (resolved config, names of the flags the user gave with a value other than the default). With
    ``--config FILE``, the file's settings where the command line gives none (``engine/config_files.py``)."""
    import sys
    from engine import config_files
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = config_files.apply(parser.parse_args(argv), argv, parser)
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
    schedule = schedule_for(cfg['preset'], cfg.get('dataset'))
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
        raise UserError('--epochs %d ends inside the first phase of --preset %s (--freeze-epochs %d: '
                        'backbone and primary classifier frozen in epochs 0-%d), so they would never train: '
                        'give --epochs %d or more, or a smaller --freeze-epochs' % (
                            cfg['epochs'], cfg['preset'], cfg['freeze_epochs'], cfg['freeze_epochs'] - 1,
                            cfg['freeze_epochs'] + 1))
    if cfg['finetune'] and cfg['freeze_epochs']:
        raise UserError('--finetune freezes the backbone for the whole run; drop --freeze-epochs')
    if (cfg.get('taps') or '').strip().lower() == 'none' and (cfg['finetune'] or cfg['freeze_epochs']):
        raise UserError('--taps none leaves only the primary classifier, which --finetune/--freeze-epochs '
                        'would freeze: nothing would train; drop one of them')
    related.check(cfg)


def complete(cfg):
    """Fill, in place, the keys a config lacks with their defaults: the flags' (what an older run's config
    did not have yet) and its preset's settings. The one place where a saved config is upgraded, so that
    the code reads ``cfg['key']``. Returns ``cfg``."""
    if 'hgat_fc_layer2' not in cfg:                 # runs from before --hgat-fc-layer2: the flat layer 2
        cfg['hgat_fc_layer2'] = 'flat'
    for key, value in vars(build_parser().parse_args([])).items():
        cfg.setdefault(key, value)
    for key, value in PRESET_SETTINGS.get(cfg['preset'], {}).items():
        if cfg.get(key) is None:
            cfg[key] = value
    if cfg.get('metrics') is None:                  # runs from before --metrics
        cfg['metrics'] = FALLBACKS['metrics']
    if cfg.get('hgat_fc_layer2') is None:           # a new run: the declared form
        cfg['hgat_fc_layer2'] = 'node'
    return cfg


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
    conflicts = ['--%s %s (the run has %s)' % (k.replace('_', '-') if k != 'num_classes' else k, cfg[k],
                                               saved.get(k))
                 for k in RESUME_FIXED if k in explicit and cfg[k] != saved.get(k)]
    if conflicts:
        raise UserError('--resume %s continues that run as it was configured; %s. Drop those flags or start '
                        'a new run with --out' % (cfg['resume'], ', '.join(conflicts)))
    merged = dict(saved)
    for key in RESUME_OVERRIDES:
        if key in explicit:
            merged[key] = cfg[key]
    merged['resume'] = cfg['resume']
    return merged
