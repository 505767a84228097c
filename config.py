"""What a run is configured with: train.py's flags, the presets' and datasets' defaults, and how they
combine into the config a run saves (``config.json``, and inside every checkpoint).

* :func:`build_parser`: the flags, in groups. The authors' flag names keep their meanings; every flag
  answers to both spellings (``--batch_size`` and ``--batch-size``, ``--input-size`` and
  ``--input_size``), and ``--help`` shows each default once.
* :data:`SCHEDULES`, :data:`PRESET_SETTINGS`: the optimiser schedule per (preset, dataset family), and
  per preset the two-phase schedule, the data order and the upstream quirks.
* :func:`resolve_config`: flags > the dataset's defaults > the preset's schedule > fallbacks, as a
  plain dict.
* :func:`merge_resume`: a resumed run's saved config with the flags a resume may change.
* :func:`defaults`: the resolved config for a few settings (eval.py on the authors' files, which carry
  no config).
* :func:`transform`, :func:`train_loader`, :func:`eval_loader`, :func:`data_options`: the image
  transform, loaders and dataset options a config implies.
"""
import argparse
import copy

import datasets
from datasets.base import Transform, make_loader
from errors import UserError
from backbone import BACKBONES
from model import PRESETS

# Schedules (paper and supplement; the released main.py for upstream). Patience p means: divide the learning rate by 10 once the monitored validation
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
# What each preset switches on; each is also a flag, and a dataset's own defaults win (the
# demo keeps its short single-phase schedule). freeze_epochs: the paper's first phase, in which only the
# attention heads train ("a few epochs" in the supplement, which gives no number: see --freeze-epochs).
# shuffle: the authors' ImageRecordIter never shuffled.
PRESET_SETTINGS = {
    'upstream': dict(plain_bce=True, history_zero_rows=True, normalisation='upstream', freeze_epochs=0,
                     shuffle=False),
    'paper': dict(plain_bce=False, history_zero_rows=False, normalisation='paper', freeze_epochs=3, shuffle=True),
    'demo': dict(plain_bce=False, history_zero_rows=False, normalisation='paper', freeze_epochs=0, shuffle=True),
}
# Used when neither the flags, the dataset nor the schedule say. Real datasets start from ImageNet
# weights as in the paper (the demo's defaults say otherwise).
FALLBACKS = dict(backbone='resnet101_v1', input_size=224, epochs=30, batch_size=32, lr=1e-3, optimizer='sgd',
                 lr_patience=3, lr_drops=2, monitor='mAP', num_workers=4, pretrained=True)

# What a resumed run may change; everything else comes from the run's saved config.
RESUME_OVERRIDES = ('epochs', 'data_path', 'gpus', 'cpus', 'num_workers', 'log_interval', 'debug', 'kvstore')
# What a resumed run must not change (the weights and the schedule depend on them).
RESUME_FIXED = ('dataset', 'preset', 'backbone', 'input_size', 'num_classes', 'lr', 'batch_size', 'optimizer',
                'seed', 'train_split', 'partition', 'all_attributes', 'freeze_epochs', 'finetune', 'gamma',
                'shuffle', 'pretrained', 'taps', 'head', 'rga', 'rga_stages', 'rga_ratios', 'gcn_embeddings',
                'gcn_t', 'gcn_p', 'gcn_reweight', 'gcn_pool', 'backbone_lr_mult', 'mc_loss', 'mc_weights', 'mc_drop',
                'mc_xi', 'apcnn_topk', 'apcnn_anchors', 'apcnn_iou', 'apcnn_drop')


# ---------------------------------------------------------------------------------------------- flags

def spellings(flag):
    """``--batch_size`` -> ``['--batch_size', '--batch-size']``: both work, the first is shown."""
    body = flag[2:]
    other = '--' + (body.replace('_', '-') if '_' in body else body.replace('-', '_'))
    return [flag] if other == flag else [flag, other]


class HelpFormatter(argparse.HelpFormatter):
    """Shows one spelling per flag, and ``(default: X)`` only where a default exists and the help
    text does not already say it (flags whose default depends on the preset and dataset say so)."""

    def _format_action_invocation(self, action):
        if len(action.option_strings) == 2 and spellings(action.option_strings[0]) == action.option_strings:
            action = copy.copy(action)
            action.option_strings = action.option_strings[:1]
        return super(HelpFormatter, self)._format_action_invocation(action)

    def _get_help_string(self, action):
        text = action.help or ''
        if 'default' in text or action.default in (None, True, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + ' (default: %(default)s)'


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose abbreviations ignore the second spelling: ``--batch`` still means
    ``--batch_size`` although ``--batch-size`` starts the same way."""

    def _get_option_tuples(self, option_string):
        found, seen = [], set()
        for option in super(Parser, self)._get_option_tuples(option_string):
            if id(option[0]) not in seen:
                seen.add(id(option[0]))
                found.append(option)
        return found


def group_adder(parser, title):
    """``add('--flag', ...)`` for a titled group of ``parser``, registering both spellings."""
    group = parser.add_argument_group(title)
    return lambda flag, *more, **kwargs: group.add_argument(*(spellings(flag) + list(more)), **kwargs)


def _authors_flags(a):
    a('--data_path', help='dataset root (without it: the embedded demo dataset, cached in data/demo)')
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


def _method_flags(a):
    a('--preset', choices=sorted(PRESETS),
      help="paper: the supplement's architecture and the paper's losses and schedule; upstream: the released "
           "code; demo: the paper's heads, narrower, on taps s1 and s2 (12x12 and 6x6 maps on the 48-pixel demo) "
           "(default: demo for the demo dataset, paper otherwise)")
    a('--backbone', choices=BACKBONES, help='backbone (default: resnet101_v1; resnet18_v1 for the demo)')
    a('--pretrained', dest='pretrained', action='store_true', default=None,
      help='start the backbone from ImageNet weights, downloaded into the model-zoo cache when missing '
           '(default: on for real datasets, off for the demo)')
    a('--no-pretrained', dest='pretrained', action='store_false', help='start the backbone from random weights')
    a('--input-size', type=int, help='square input side (default: 224; 48 for the demo)')
    a('--gamma', type=float, default=0.5, help='focusing parameter of the weighted focal loss (Eq. 4)')
    a('--class-weights', default='deepmar', choices=['deepmar', 'paper'],
      help="form of the class-prior weights in Eq. 4: deepmar (the authors' code) or paper (exp(-a_c))")
    a('--history-start', type=int, default=2, help='first epoch whose predictions are stored')
    a('--history-track', type=int, default=5, help='predictions kept per sample; the history weighting '
                                                   'starts at this epoch')
    a('--plain-bce', dest='plain_bce', action='store_true', default=None,
      help='upstream quirk: plain sigmoid BCE for every branch (default: on for --preset upstream)')
    a('--no-plain-bce', dest='plain_bce', action='store_false', help='use the paper losses with any preset')
    a('--history-zero-rows', dest='history_zero_rows', action='store_true', default=None,
      help='upstream quirk: count the zero-initialised history rows (default: on for --preset upstream)')
    a('--no-history-zero-rows', dest='history_zero_rows', action='store_false',
      help='use only stored predictions with any preset')


def _related_flags(a):
    a('--taps', help="the attention taps, e.g. 's3,s4' (default: the preset's); 'none' for no attention branch "
                     "(the primary classifier alone)")
    a('--head', choices=['vaa', 'gcn', 'apcnn'], default='vaa',
      help="primary classifier: vaa (a Dense layer, the paper's), gcn (ML-GCN: a label graph's GCN gives "
           "the classifiers) or apcnn (AP-CNN: an attention pyramid on stages 2-4 and a second pass on the "
           "zoomed ROIs, instead of the VAA taps; --input-size divisible by 32)")
    a('--rga', choices=['none', 's', 'c', 'sc'], default='none',
      help='Relation-Aware Global Attention after ResNet stages: spatial, channel, or both (S then C)')
    a('--rga-stages', default='1,2,3,4', help='stages followed by an RGA module (stage 1 is costly at 224: '
                                               '2,3,4 halves the cost)')
    a('--rga-ratios', default='8,8,8', help='RGA channel, spatial and down-sampling ratios')
    a('--gcn-embeddings', default='onehot',
      help="ML-GCN label embeddings: a C x d .npy file (GloVe of the attribute names, as the paper), or the "
           "offline fallbacks onehot, cooc (co-occurrence eigenvectors), random")
    a('--gcn-t', type=float, default=0.4, help='ML-GCN: threshold tau on P(label j | label i)')
    a('--gcn-p', type=float, default=0.25, help='ML-GCN: re-weighting p (the paper states 0.2)')
    a('--gcn-reweight', choices=['code', 'paper'], default='code',
      help='ML-GCN correlation matrix as the released code computes it, or as Eq. 8 of the paper')
    a('--gcn-pool', choices=['max', 'avg'], default='max', help='ML-GCN image feature pooling')
    a('--mc-loss', action='store_true',
      help='add MC-Loss (mutual-channel loss) on the last feature map to the objective: one channel group per '
           'attribute, a discriminality and a diversity term (training only; predictions are unchanged)')
    a('--mc-weights', default='1.5,20', help="MC-Loss weights of the discriminality and diversity terms (the "
                                             "authors' current code; their ResNet-50 release: 0.0005,0.005)")
    a('--mc-drop', type=float, default=0.4, help='MC-Loss: share of each group that channel-wise attention masks')
    a('--mc-xi', type=int, default=0, help="MC-Loss channels per attribute: 0 splits the backbone's own channels "
                                           "(the paper's ResNet setting); K > 0 projects the map to C x K first")
    a('--apcnn-topk', default='5,3,1', help='AP-CNN: ROIs kept per pyramid level (strides 8, 16, 32)')
    a('--apcnn-anchors', default='64,128,256',
      help='AP-CNN: anchor sides per level at a 448-pixel input (scaled to --input-size)')
    a('--apcnn-iou', type=float, default=0.05, help='AP-CNN: NMS IoU threshold of the ROIs')
    a('--apcnn-drop', default='0.3,0.3',
      help='AP-CNN: training-time probability of dropping one level-3 ROI, and one level-4 ROI')
    a('--backbone-lr-mult', type=float, default=1.0,
      help="learning-rate factor for the model-zoo layers (ML-GCN's recipe: 0.1)")


def _schedule_flags(a):
    a('--optimizer', choices=['sgd', 'adam'], help='optimizer (default: per preset and dataset)')
    a('--freeze-epochs', type=int,
      help="the paper's first phase: for this many epochs only the attention branches and their classifiers "
           "train, with the attention loss alone (backbone and primary classifier frozen), then everything end "
           "to end. The supplement says 'a few epochs'; we use 3 (default: 3 for --preset paper, 0 for upstream "
           "and the demo): enough for the randomly initialised heads to stop sending random gradients into the "
           "pretrained backbone, short next to the 40-epoch schedule")
    a('--shuffle', dest='shuffle', action='store_true', default=None,
      help='shuffle the training samples every epoch (default: on; off for --preset upstream, whose '
           'ImageRecordIter never shuffled)')
    a('--no-shuffle', dest='shuffle', action='store_false', help='keep the training samples in file order')
    a('--lr-patience', type=int, help='epochs without val improvement before the lr is divided by 10 '
                                      '(default: per preset and dataset)')
    a('--lr-drops', type=int, help='maximum number of learning-rate drops (default: per preset and dataset)')
    a('--monitor', choices=['mAP', 'mA', 'f1'], help='validation metric for the best checkpoint and the lr '
                                                     'drops (default: mAP; mA for PETA and PA-100K)')
    a('--seed', type=int, default=0, help='random seed (initialisation, data order, augmentation)')


def _data_flags(a):
    a('--dataset', choices=datasets.names(),
      help='dataset (default: told from the layout of --data_path; the demo without --data_path)')
    a('--train-split', default='train', help="training split (WIDER: the paper used 'train'; 'trainval' too)")
    a('--val-split', default='val', help='validation split')
    a('--test-split', default='test', help='test split')
    a('--partition', type=int, default=0, help='PETA partition (0-4)')
    a('--all-attributes', action='store_true', help='PETA: all 105 attributes instead of the usual 35')
    a('--cache-dir', help='WIDER: folder for the cached person crops (default: <data_path>/crops256)')
    a('--skip-bad-samples', action='store_true',
      help='skip (and count) missing or unreadable images and malformed labels instead of stopping')
    a('--num-workers', type=int, help='data-loader worker processes (default: 4; 0 for the demo)')
    a('--limit', type=int, help='use only the first N samples of every split (quick checks)')


def _run_flags(a):
    a('--out', help='run folder (default: runs/<dataset>-<backbone>-<preset>-<time>)')
    a('--resume', help='run folder to continue from its last checkpoint (with --test: to evaluate)')
    a('--upstream-weights', help="with --test: the authors' saved_models/ folder")
    a('--log-interval', type=int, default=20, help='batches between progress lines when not on a terminal')
    a('--gpus', help="GPU ids, e.g. '0' or '0,1' (default: the CPU)")
    a('--cpus', type=int, default=1, help='without --gpus: split each batch over this many CPU contexts '
                                          '(exercises the multi-device path)')
    a('--no-hybridize', dest='hybridize', action='store_false', help='run the network imperatively '
                                                                     '(default: one hybridized graph)')
    a('--kvstore', default='device', help='gradient exchange: device (one machine, several devices) or '
                                          'dist_sync (several machines; start with launch.py or the DMLC_* '
                                          'variables)')
    a('--syncbn', action='store_true', help='batch-norm statistics over all devices of a machine (SyncBatchNorm)')
    a('--amp', action='store_true', help='float16 training with dynamic loss scaling (GPU only)')
    a('--save-all-ranks', action='store_true',
      help='distributed check: every worker writes its final weights to <out>/rank<k>.params')
    a('--debug', action='store_true', help='show tracebacks')


def build_parser():
    p = Parser(
        description='Train (or with --test evaluate) the Visual Attention Aggregation network. Every flag '
                    'takes both spellings, e.g. --batch_size or --batch-size.', formatter_class=HelpFormatter)
    _authors_flags(group_adder(p, "the authors' flags (same names and meanings)"))
    _method_flags(group_adder(p, 'model and losses'))
    _related_flags(group_adder(p, 'related systems (README, "Related systems")'))
    _schedule_flags(group_adder(p, 'schedule'))
    _data_flags(group_adder(p, 'data'))
    _run_flags(group_adder(p, 'run folder, devices and machines'))
    return p


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
    for key, value in PRESET_SETTINGS[cfg['preset']].items():
        if cfg.get(key) is None:
            cfg[key] = 0 if key == 'freeze_epochs' and cfg.get('finetune') else data_defaults.get(key, value)
    check_ranges(cfg, RANGES)
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
    return cfg


def _finite(test):
    return lambda v: v == v and abs(v) != float('inf') and test(v)


# Each number a flag can take: (config key, test, what the flag needs). None always passes (not given).
RANGES = (
    ('epochs', lambda v: v >= 1, 'at least 1'), ('batch_size', lambda v: v >= 1, 'at least 1'),
    ('lr', _finite(lambda v: v > 0), 'a positive number'), ('wd', _finite(lambda v: v >= 0), '0 or more'),
    ('mom', _finite(lambda v: 0 <= v < 1), 'in [0, 1)'), ('gamma', _finite(lambda v: v >= 0), '0 or more'),
    ('freeze_epochs', lambda v: v >= 0, '0 or more'), ('history_start', lambda v: v >= 0, '0 or more'),
    ('history_track', lambda v: v >= 1, 'at least 1'), ('lr_patience', lambda v: v >= 0, '0 or more'),
    ('lr_drops', lambda v: v >= 0, '0 or more'), ('limit', lambda v: v >= 1, 'at least 1'),
    ('num_workers', lambda v: v >= 0, '0 or more'), ('cpus', lambda v: v >= 1, 'at least 1'),
    ('log_interval', lambda v: v >= 1, 'at least 1'), ('partition', lambda v: 0 <= v <= 4, 'in 0..4'),
    ('input_size', lambda v: v >= 32, 'at least 32 (the backbones downsample the input 32 times)'),
    ('gcn_t', _finite(lambda v: 0 < v <= 1), 'in (0, 1]'), ('gcn_p', _finite(lambda v: 0 <= v <= 1), 'in [0, 1]'),
    ('backbone_lr_mult', _finite(lambda v: v >= 0), '0 or more'),
    ('apcnn_iou', _finite(lambda v: 0 < v <= 1), 'in (0, 1]'),
    ('mc_drop', _finite(lambda v: 0 <= v < 1), 'in [0, 1)'), ('mc_xi', lambda v: v == 0 or v >= 2, '0 or at least 2'),
)


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


def check_ranges(cfg, ranges):
    """UserError naming the first flag whose value is out of its range."""
    for key, test, what in ranges:
        value = cfg.get(key)
        if value is not None and not test(value):
            raise UserError('--%s must be %s, got %s' % (key.replace('_', '-') if key not in (
                'batch_size', 'num_classes') else key, what, value))


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
        raise UserError('--resume %s: the run has finished %d epochs, so --epochs %d would train nothing; give '
                        '--epochs above %d to train more (eval.py %s evaluates it as it is)'
                        % (cfg['resume'], done, cfg['epochs'], done, cfg['resume']))
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
