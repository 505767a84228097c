"""Every script's flags, in one module that imports nothing heavy: ``--help`` and a mistyped flag answer
before mxnet is loaded (``engine.startup.preparse``, called first thing by each script).

* :func:`build_parser`: train.py's flags, in groups. The authors' flag names keep their meanings; every
  flag answers to both spellings (``--batch_size`` and ``--batch-size``, ``--input-size`` and
  ``--input_size``), and ``--help`` shows each default once.
* :func:`eval_parser`, :func:`predict_parser`, :func:`compare_parser`, :func:`benchmark_parser`: the other
  scripts', sharing :func:`upstream_flags` (the authors' ``saved_models/`` carry no config).
* :data:`RANGES`, :func:`check_ranges`: what each number may be.
"""
import argparse
import copy
import os

import datasets                   # (its package module only: the registry of names)
import related                    # (the systems' interfaces: they import nothing heavy)
from common.errors import UserError
from common.presets import BACKBONES, PRESETS

METRIC_CONVENTIONS = ('ours', 'rethinking')
METRICS_HELP = ('convention of mA and the instance metrics: ours (p >= 0.5; samples without a positive label '
                "and attributes without positives left out) or rethinking (Rethinking_of_PAR's "
                'get_pedestrian_metrics: p > 0.5, both kept, at 0); docs/datasets.md, "Metric conventions"')


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
        no_default = action.default in (None, True, False, argparse.SUPPRESS)
        if 'default' in text or no_default or not action.option_strings:
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
    # (no parser default: a resumed run's --test tells a given --metrics from the run's own)
    a('--metrics', choices=METRIC_CONVENTIONS, help=METRICS_HELP + ', in the test report (validation, which '
      'picks the best checkpoint, always uses ours) (default: ours; with --resume, the run\'s)')
    a('--test', action='store_true',
      help='evaluate on the test split instead of training: the best checkpoint of --resume RUN_DIR, or '
           "the authors' saved_models/ folder given by --upstream-weights")


def _method_flags(a):
    a('--preset', choices=sorted(PRESETS),
      help="paper: the supplement's architecture and the paper's losses and schedule; upstream: the released "
           "code; demo: the paper's heads, narrower, on taps s1 and s2 (12x12 and 6x6 maps on the 48-pixel "
           "demo) (default: demo for the demo dataset, paper otherwise)")
    a('--backbone', choices=BACKBONES, help='backbone (default: resnet101_v1; resnet18_v1 for the demo)')
    a('--pretrained', dest='pretrained', action='store_true', default=None,
      help='start the backbone from ImageNet weights, downloaded into the model-zoo cache when missing '
           '(default: on for real datasets, off for the demo)')
    # (default=None on both flags of a pair: explicit flags are those that differ from the parser's default)
    a('--no-pretrained', dest='pretrained', action='store_false', default=None,
      help='start the backbone from random weights')
    a('--input-size', type=int, help='square input side (default: 224; 48 for the demo)')
    a('--gamma', type=float, default=0.5, help='focusing parameter of the weighted focal loss (Eq. 4)')
    a('--class-weights', default='deepmar', choices=['deepmar', 'paper'],
      help="form of the class-prior weights in Eq. 4: deepmar (the authors' code) or paper (exp(-a_c))")
    a('--history-start', type=int, default=2, help='first epoch whose predictions are stored')
    a('--history-track', type=int, default=5, help='predictions kept per sample; the history weighting '
                                                   'starts at this epoch')
    a('--plain-bce', dest='plain_bce', action='store_true', default=None,
      help='upstream quirk: plain sigmoid BCE for every branch (default: on for --preset upstream)')
    a('--no-plain-bce', dest='plain_bce', action='store_false', default=None,
      help='use the paper losses with any preset')
    a('--history-zero-rows', dest='history_zero_rows', action='store_true', default=None,
      help='upstream quirk: count the zero-initialised history rows (default: on for --preset upstream)')
    a('--no-history-zero-rows', dest='history_zero_rows', action='store_false', default=None,
      help='use only stored predictions with any preset')


def _related_flags(a):
    a('--taps', help="the attention taps, e.g. 's3,s4' (default: the preset's); 'none' for no attention "
                     "branch (the primary classifier alone)")
    heads = related.heads()
    a('--head', choices=[h for h, _ in heads], default='vaa',
      help='primary classifier: %s' % '; '.join('%s (%s)' % h for h in heads))
    related.add_flags(a)
    a('--backbone-lr-mult', type=float, default=1.0,
      help="learning-rate factor for the model-zoo layers (ML-GCN's recipe: 0.1)")


def _schedule_flags(a):
    a('--optimizer', choices=['sgd', 'adam'], help='optimizer (default: per preset and dataset)')
    a('--freeze-epochs', type=int,
      help="the paper's first phase: for this many epochs only the attention branches and their classifiers "
           "train, with the attention loss alone (backbone and primary classifier frozen), then everything "
           "end to end. The supplement says 'a few epochs'; we use 3 (default: 3 for --preset paper, 0 for "
           "upstream and the demo): enough for the randomly initialised heads to stop sending random "
           "gradients into the pretrained backbone, short next to the 40-epoch schedule")
    a('--shuffle', dest='shuffle', action='store_true', default=None,
      help='shuffle the training samples every epoch (default: on; off for --preset upstream, whose '
           'ImageRecordIter never shuffled)')
    a('--no-shuffle', dest='shuffle', action='store_false', default=None,
      help='keep the training samples in file order')
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
    a('--partition', type=int, default=0, help="PETA partition (0-4); pedes: the file's numbered run (PETA, "
                                               "RAP)")
    a('--all-attributes', action='store_true',
      help='PETA: all 105 attributes instead of the usual 35; pedes: every column of the file, not '
           'label_idx.eval')
    a('--split-file', help="pedes (Rethinking_of_PAR's annotation files): the file in --data_path, e.g. "
                           'dataset_zs_run0.pkl for PETA-ZS and RAP-ZS (default: dataset_all.pkl)')
    a('--cache-dir', help='WIDER: folder for the cached person crops (default: a per-user folder, '
                          '$XDG_CACHE_HOME/vaa-attributes/wider-<hash of --data_path>-crop256, or '
                          '~/.cache/...; nothing is written into the dataset folder)')
    a('--skip-bad-samples', action='store_true',
      help='skip (and count) missing or unreadable images and malformed labels instead of stopping')
    a('--num-workers', type=int, help='data-loader threads that decode and augment images (default: 4; 0 for '
                                      'the demo, which is in memory)')
    a('--limit', type=int, help='use only the first N samples of every split (quick checks)')


def _run_flags(a):
    a('--config', metavar='FILE', help="settings from a YAML file (configs/*.yaml) or a run folder's "
                                       'config.yaml / config.json; flags given beside it win')
    a('--out', help='run folder (default: runs/<dataset>-<backbone>-<preset>-<time>)')
    a('--resume', help='run folder to continue from its last checkpoint (with --test: to evaluate)')
    a('--upstream-weights', help="with --test: the authors' saved_models/ folder")
    a('--log-interval', type=int, default=20, help='batches between progress lines when not on a terminal')
    a('--gpus', help="GPU ids, e.g. '0' or '0,1' (default: the CPU)")
    a('--cpus', type=int, default=1, help='without --gpus: split each batch over this many CPU contexts '
                                          '(exercises the multi-device path)')
    a('--no-hybridize', dest='hybridize', action='store_false',
      help='run the network imperatively (default: one hybridized graph)')
    a('--kvstore', default='device', help='gradient exchange: device (one machine, several devices) or '
                                          'dist_sync (several machines; start with tools/launch.py or the '
                                          'DMLC_* variables)')
    a('--syncbn', action='store_true', help='batch-norm statistics over all devices of a machine '
                                            '(SyncBatchNorm)')
    a('--amp', action='store_true', help='float16 training with dynamic loss scaling (GPU only)')
    a('--keep', choices=['all', 'last'], default='all',
      help='checkpoints kept: all (last.params to resume, best.params of the best validation epoch, which '
           'the test split is scored with) or last (only last.params: a third to half less disk; the test '
           "split and eval.py then use the last epoch's weights)")
    a('--no-tensorboard', dest='tensorboard', action='store_false',
      help='write no TensorBoard logs (default: <run>/tb, for tensorboard --logdir runs)')
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
    ('backbone_lr_mult', _finite(lambda v: v >= 0), '0 or more'),
) + related.ranges()



def check_ranges(cfg, ranges):
    """UserError naming the first flag whose value is out of its range."""
    for key, test, what in ranges:
        value = cfg.get(key)
        if value is not None and not test(value):
            raise UserError('--%s must be %s, got %s' % (key.replace('_', '-') if key not in (
                'batch_size', 'num_classes') else key, what, value))


# ------------------------------------------------------------------------------------ the other scripts

def upstream_flags(p, dataset_help=None):
    """The flags that describe the authors' ``saved_models/`` (they carry no config), for eval, predict
    and compare."""
    a = group_adder(p, "the authors' saved_models/ (they carry no config)")
    a('--preset', choices=sorted(PRESETS), default='upstream', help="preset of the authors' files")
    a('--backbone', choices=BACKBONES, default='resnet101_v1', help="backbone of the authors' files")
    a('--input-size', type=int, default=224, help="input size for the authors' files")
    return a


def eval_parser():
    p = Parser(description="Evaluate a run folder, a checkpoint file, or the authors' saved_models/ folder; "
                           "draw attention maps; export. Every flag takes both spellings, e.g. --batch_size "
                           "or --batch-size.", formatter_class=HelpFormatter)
    p.add_argument('source', help='run folder, checkpoint .params file, or a saved_models/ folder of the '
                                  'authors')
    a = group_adder(p, 'what to evaluate')
    a('--split', default='test', help='split to evaluate (train, val, test, ...)')
    a('--checkpoint', default='best', choices=['best', 'last'], help='which checkpoint of a run folder')
    a('--compare', choices=['paper', 'rethinking'],
      help="add the paper's numbers, or (rethinking) the table of the community's baseline "
           "(Rethinking_of_PAR's README, with its metric convention), and the differences")
    a('--metrics', choices=METRIC_CONVENTIONS, help=METRICS_HELP + " (default: the run's, else ours)")
    a('--out', help="JSON file for the result (default: <run>/eval_<split>.json; for the authors' files "
                    'runs/eval-<their folder>/eval_<split>.json)')
    a('--image', nargs='+', metavar='FILE', help='predict these images and draw their attention maps')
    a('--out-dir', help='folder for the attention PNGs (default: <run>/attention)')
    a('--shared-scale', action='store_true',
      help='with --image: one colour scale for the attention maps of all images of the call (default: each '
           "map scaled to its own maximum), so that maps can be compared")
    a('--export-upstream', metavar='DIR', help="write the weights in the authors' saved_models/ layout into "
                                              "DIR (their main.py --test loads --preset upstream, "
                                              "resnet101_v1, 224)")
    a('--export', metavar='DIR', help='write model-symbol.json + model-0000.params (MXNet), model.onnx and '
                                      'model.json (attribute names, output, preprocessing) into DIR')
    a('--int8', type=int, nargs='?', const=256, metavar='N',
      help='with --export: also model-int8.onnx, calibrated on N training images (default 256)')
    a = group_adder(p, "data and devices (default: the run's)")
    a('--dataset', choices=datasets.names(), help="dataset (default: the run's)")
    a('--data_path', help="dataset root (default: the run's)")
    a('--gpus', help="GPU ids, e.g. '0' (default: the CPU)")
    a('--batch_size', type=int, help="evaluation batch size (default: the run's)")
    a('--num-workers', type=int, help="data-loader threads (default: the run's)")
    a('--limit', type=int, help='evaluate only the first N samples')
    a('--partition', type=int, help="PETA partition (default: the run's, else 0)")
    a('--split-file', help="pedes: the annotation file in --data_path (default: the run's)")
    a('--cache-dir', help="WIDER: folder of the cached person crops (default: the run's, else the per-user "
                          'folder, $XDG_CACHE_HOME/vaa-attributes/wider-<hash of --data_path>-crop256)')
    a('--skip-bad-samples', action='store_true', default=None, help='skip unreadable or malformed samples')
    a = upstream_flags(p)
    a('--num_classes', type=int, help="number of attributes of the authors' files (default: the dataset's)")
    a('--debug', action='store_true', help='show tracebacks')
    return p


def predict_parser():
    p = Parser(description="Predict the attributes of many images with a trained model: one CSV row per "
                           "image.",
               formatter_class=HelpFormatter)
    p.add_argument('source', help="run folder, checkpoint .params file, the authors' saved_models/ folder, "
                                  "or an eval.py --export folder (onnxruntime)")
    p.add_argument('inputs', nargs='+', metavar='INPUT',
                   help='image files, folders, or text files listing images')
    a = group_adder(p, 'output')
    a('--out', required=True, help='the CSV to write')
    a('--threshold', help="add 0/1 columns: a number (e.g. 0.5), or 'val' for per-attribute thresholds "
                          "chosen on the run's validation split")
    a('--skip-bad-images', action='store_true', help='skip (and list) unreadable images instead of stopping')
    a('--int8', action='store_true', help='export folder: run model-int8.onnx (eval.py --export DIR --int8)')
    a = group_adder(p, 'speed')
    a('--gpus', help="GPU ids, e.g. '0' or '0,1' (default: the CPU)")
    a('--batch_size', type=int, default=32, help='images per batch')
    a('--num-workers', type=int, default=2, help='decoding threads')
    a = upstream_flags(p)
    a('--dataset', choices=datasets.names(),
      help='dataset whose attribute names (and validation split) to use')
    a('--data_path', help="dataset root (default: the run's)")
    a('--num_classes', type=int, help="number of attributes of the authors' files (without --dataset)")
    a('--debug', action='store_true', help='show tracebacks')
    return p


def compare_parser():
    p = Parser(description='Compare trained systems side by side on the same split.',
               formatter_class=HelpFormatter)
    p.add_argument('sources', nargs='+', metavar='SOURCE',
                   help='run folders, checkpoints, saved_models/ folders, or study folders (tools/study.py: '
                        'their runs)')
    a = group_adder(p, 'what to compare on')
    a('--split', default='test', help='split to evaluate every source on')
    a('--dataset', choices=datasets.names(), help="dataset (default: the first run's)")
    a('--data_path', help="dataset root (default: the first run's)")
    a('--limit', type=int, help='evaluate only the first N samples')
    a('--metrics', choices=METRIC_CONVENTIONS, help=METRICS_HELP + " (default: the first run's, else ours)")
    a('--out', help='PNG of the per-attribute APs, with a .json of the numbers beside it (default: '
                    'runs/compare-<date>-<time>.png)')
    a('--gpus', help="GPU ids, e.g. '0' (default: the CPU)")
    a = upstream_flags(p)
    a('--debug', action='store_true', help='show tracebacks')
    return p


# The CPU inference paths tools/benchmark.py times (--paths).
INFERENCE_PATHS = ('gluon', 'int8', 'onnx', 'onnx-int8')


def benchmark_parser():
    p = Parser(description="Speed figures (images/sec): our training and evaluation step against the "
                           "authors' execution style and the bare backbone, the data pipeline, the CPU "
                           "inference paths, and the related systems.", formatter_class=HelpFormatter)
    a = group_adder(p, 'network and batch')
    a('--backbone', default='resnet101_v1', choices=BACKBONES,
      help='backbone (the reference rows: ResNet only)')
    a('--preset', default='upstream', choices=sorted(PRESETS), help='head architecture')
    a('--input-size', type=int, default=224, help='square input side')
    a('--batch', type=int, default=8, help='batch size')
    a('--classes', type=int, default=14, help='number of attributes')
    a('--gpus', help="GPU id, e.g. '0' (default: the CPU)")
    a = group_adder(p, 'timing')
    a('--warmup', type=int, default=2, help='untimed steps first')
    a('--iters', type=int, default=5, help='timed steps')
    a('--rounds', type=int, default=3, help='--only systems: interleaved rounds (the median is shown)')
    a('--workers', type=int, default=os.cpu_count() or 1, help='data-loader workers')
    a('--data-images', type=int, default=256, help='images for the data-pipeline rows')
    a = group_adder(p, 'what to time')
    a('--only', choices=['model', 'steps', 'data', 'inference', 'systems', 'startup'],
      help='one part only: model (ours, the reference and the bare backbone), steps (our training step and '
           'evaluation only), data (the loaders), inference (the CPU inference paths), systems (VAA and '
           "each related system) or startup (the seconds each command's --help takes, as a whole process); "
           'default: model and data')
    a('--paths', default=','.join(INFERENCE_PATHS),
      help='--only inference: the paths to time, comma-separated, of %s (default: all)'
           % ', '.join(INFERENCE_PATHS))
    a('--batches', default='1,32', help='--only inference: the batch sizes, comma-separated (batch 1 runs '
                                        '--iters steps, larger batches half as many, at least 2)')
    a('--load', type=int, default=0, metavar='N',
      help='time everything with N busy processes beside it (each a Python loop that keeps one core '
           'busy, started before the timing and stopped after): the speed on a shared machine')
    a('--accuracy', metavar='RUN', help='--only inference: also the test mAP of each path, with the trained '
                                        'network of RUN')
    a('--debug', action='store_true', help='show tracebacks')
    return p


PARSERS = {'train': build_parser, 'eval': eval_parser, 'predict': predict_parser, 'compare': compare_parser,
           'benchmark': benchmark_parser}
# The numbers each script checks before any work (train.py checks all of RANGES while resolving).
SCRIPT_RANGES = {'eval': ('batch_size', 'limit', 'num_workers', 'input_size', 'partition'),
                 'predict': ('batch_size', 'num_workers', 'input_size'), 'compare': ('limit', 'input_size')}
