"""Using a trained model: load it from wherever it is, score a split, report the result.

Shared by ``eval.py`` and by ``train.py`` (the test split at the end of training, and ``--test``):

* :func:`load_source`: the network and config of a SOURCE: a run folder (its best or last
  checkpoint), one of our checkpoint files, or the authors' ``saved_models/`` folder (which carries no
  config: the preset, backbone, input size and dataset come from the caller).
* :func:`evaluate_split`: one split of the dataset scored with every metric of ``metrics.py``.
* :func:`report`: a result as JSON with its AP bars beside it, and the per-attribute table;
  :func:`report_split` both (what ``eval.py`` and ``train.py --test`` print), with the paper's numbers
  (``compare='paper'``) or the community baseline's table (``compare='rethinking'``) beside ours.
* :func:`describe`: the system of a config in a few words (eval.py, compare.py).
"""
import json
import os

from engine import checkpoints
from engine import config
import datasets
from datasets import loaders
from evaluation import metrics
import related
from evaluation import plots
from engine import steps
from engine.errors import UserError
from datasets.wider import WIDER_ATTRIBUTES
from engine.distributed import parse_contexts
from model import build_net
from engine.runfolder import CHECKPOINT_DIR, checkpoint_path

# Settings a caller may change when it evaluates one of our runs (the rest is the run's config).
EVAL_OVERRIDES = ('dataset', 'data_path', 'batch_size', 'limit', 'partition', 'cache_dir', 'skip_bad_samples',
                  'num_workers', 'split_file', 'metrics')


def resolve_source(source, which='best'):
    """-> (kind, checkpoint path or folder, run folder or None). kind: 'ours' or 'upstream'."""
    if os.path.isfile(source):
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(source)))
        return 'ours', source, run_dir if os.path.isfile(os.path.join(run_dir, 'config.json')) else None
    if os.path.isdir(source):
        if os.path.isfile(checkpoint_path(source, which)):
            return 'ours', checkpoint_path(source, which), source
        if any(os.path.isfile(os.path.join(source, 'backbone_%s.params' % f)) for f in (
                'resnet', 'densenet')):
            return 'upstream', source, None
        raise UserError('%s is neither a run folder (no %s/%s.params) nor an authors\' saved_models/ folder '
                        '(no backbone_resnet.params)' % (source, CHECKPOINT_DIR, which))
    raise UserError('%s does not exist; give a run folder, a checkpoint file or a saved_models/ folder'
                    % source)


def load_source(source, ctx, which='best', upstream=None, overrides=None):
    """Build the network of ``source`` and load its weights; returns (net, cfg, attribute names).

    ``upstream``: for the authors' files, the settings train.py would take as flags (``preset``,
    ``backbone``, ``input_size``, ``dataset``, ``data_path``...; ``num_classes`` or a ``dataset`` to read
    the attribute names from, and ``split`` to read them in). ``overrides``: settings of
    :data:`EVAL_OVERRIDES` that differ from the run's. ``cfg['run_dir']`` is where results go: the run
    folder, or for the authors' files ``runs/eval-<their folder's name>``.
    """
    kind, path, run_dir = resolve_source(source, which)
    if kind == 'ours':
        meta, arrays = checkpoints.read_meta(path)
        cfg = dict(meta['config'])
        names = meta.get('attribute_names') or ['attr%d' % i for i in range(cfg['num_classes'])]
        cfg['num_classes'] = len(names)
        net = build_net(cfg, ctx, pretrained=False, names=names)
        checkpoints.load_weights(path, net, arrays)
        cfg['run_dir'] = run_dir or os.path.dirname(os.path.abspath(path))
    else:
        settings = dict(upstream or {})
        num_classes, split = settings.pop('num_classes', None), settings.pop('split', 'test')
        cfg = config.defaults(**settings)
        if num_classes:
            names = ['attr%d' % i for i in range(num_classes)]
        elif cfg.get('dataset'):
            names = list(datasets.load_split(cfg['dataset'], cfg['data_path'], split,
                                             **dict(loaders.data_options(cfg), limit=1)).attribute_names)
        else:
            raise UserError("evaluating the authors' saved_models/ needs --dataset (or --num_classes with "
                            "--image)")
        # results go to runs/, not into the authors' folder (which holds only their files)
        cfg.update(num_classes=len(names), run_dir=os.path.join('runs', 'eval-%s' % os.path.basename(
            os.path.normpath(os.path.abspath(path)))))
        net = build_net(cfg, ctx, pretrained=False, names=names)
        checkpoints.load_upstream(net, path)
    cfg.update({k: v for k, v in (overrides or {}).items() if k in EVAL_OVERRIDES and v is not None})
    cfg['source_kind'] = kind
    return net, cfg, names


def fused_logits_block(net, input_size, ctx):
    """``net``'s fused logits as one block for scoring images on ``ctx`` (what predict.py and the
    benchmark's fp32 row run). On the CPU, MXNet's oneDNN graph backend partitions it
    (``optimize_for(backend='MKLDNN')``): each convolution runs fused with its BatchNorm (folded into the
    weights), its ReLU and a residual sum, where the training graph runs them one after the other. At
    batch 1 that is most of the per-image time of a ResNet's small operators (ResNet-101, paper preset, 2
    cores: 71 -> 58 ms). The logits equal the plain graph's to float32 rounding (the folded BatchNorm
    rounds differently), not bitwise; evaluation of a split (eval.py, train.py) keeps the training graph,
    so its numbers are the run's. On a GPU (or with ``MXNET_MKLDNN_ENABLED=0``): the hybridized graph."""
    import warnings
    import mxnet as mx
    from deploy import export
    block = export.FusedLogits(net)
    if ctx.device_type == 'cpu' and os.environ.get('MXNET_MKLDNN_ENABLED', '1') != '0':
        example = mx.nd.zeros((1, 3, input_size, input_size), ctx=ctx)
        with warnings.catch_warnings():         # parameters of training-only parts (MC-Loss) are unused
            warnings.filterwarnings('ignore', message='Parameter .* is not used by any computation')
            block.optimize_for(example, backend='MKLDNN', static_alloc=True, static_shape=True)
    else:
        block.hybridize(static_alloc=True, static_shape=True)
    return block


def check_output_file(path, flag):
    """Before any work: ``path`` must be a file name (not a folder) in a folder we can write."""
    if os.path.isdir(path):
        raise UserError('%s %s is a folder; give a file name such as %s'
                        % (flag, path, os.path.join(path, 'result.json')))
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK) or (os.path.exists(path) and
                                                                       not os.access(path, os.W_OK)):
        raise UserError('%s %s cannot be written (%s); choose another place' % (
            flag, path, 'no folder %s' % folder if not os.path.isdir(folder) else 'not writable'))


def describe(cfg, kind='ours'):
    """The system and its flags, in a few words."""
    if kind == 'upstream':
        return "authors' saved_models (%s, %s, %d)" % (cfg['preset'], cfg['backbone'], cfg['input_size'])
    systems = related.active(cfg)
    parts = [s.describe(cfg) for s in systems if s.HEAD] or ['VAA']            # the head first
    parts += [s.describe(cfg) for s in systems if not s.HEAD]
    if related.network_of(cfg) is None:
        parts.append('taps %s' % (cfg['taps'] if cfg['taps'] else 'of the preset'))
    return '%s (%s, %s, %d)' % (' + '.join(parts), cfg['preset'], cfg['backbone'], cfg['input_size'])


def community_dataset(dataset, data, names):
    """The name of the evaluated data in the community's tables (PETA, PETAzs, PA100k, RAPv1, RAPv2,
    RAPzs), or None: Rethinking_of_PAR's files name it; DeepMAR's PETA.mat (35 attributes) and PA-100K's
    annotation.mat hold the same images, partitions and attributes."""
    if dataset == 'pedes':
        return getattr(data, 'community_name', None)
    if dataset == 'peta' and len(names) == 35:
        return 'PETA'
    if dataset == 'pa100k':
        return 'PA100k'
    return None


def evaluate_split(net, cfg, names, split, ctx, convention='ours'):
    """Score ``split`` of the config's dataset (mA and the instance metrics in ``convention``); the split
    must have the model's attributes."""
    data = datasets.load_split(cfg['dataset'], cfg['data_path'], split, attribute_names=names,
                               **loaders.data_options(cfg))
    result = steps.evaluate(net, loaders.eval_loader(cfg, data), ctx, names, convention)
    result['split'] = split
    result['community_dataset'] = community_dataset(cfg['dataset'], data, names)
    return result


def report_split(net, cfg, names, split, ctx, source, out=None, compare=None, convention=None):
    """Evaluate ``split`` and report it: ``out`` (default ``<run>/eval_<split>.json``) with its AP bars,
    the table (with ``compare='paper'`` the paper's numbers and the deltas; with ``'rethinking'`` the
    community baseline's table, in its metric convention), the chance level. ``convention``: that of mA
    and the instance metrics (default: the config's ``metrics``)."""
    convention = 'rethinking' if compare == 'rethinking' else (convention or cfg.get('metrics') or 'ours')
    result = evaluate_split(net, cfg, names, split, ctx, convention)
    result['source'] = os.path.abspath(source)
    if compare == 'paper':
        result['paper'] = paper_reference(cfg['dataset'], names)
    out = out or os.path.join(cfg['run_dir'], 'eval_%s.json' % split)
    per_attribute = (result.get('paper') or {}).get('per_attribute')
    report(result, out, os.path.splitext(out)[0] + '_ap.png',
           '%s split of %s, %s:' % (split, cfg['dataset'], source),
           split, per_attribute)
    if compare == 'paper':
        print(paper_line(result, cfg['dataset']))
    if compare == 'rethinking':
        print(rethinking_table(result, describe(cfg, cfg.get('source_kind', 'ours'))))
    if steps.stage_line(result):
        print(steps.stage_line(result))
    print('chance mAP from the label priors: %.2f; written %s' % (100 * result['chance_mAP'], out))
    return result


def paper_reference(dataset, names):
    """The paper's numbers that apply to an evaluation: WIDER-Attribute's (its 14 attributes, in
    order) or PETA's (the 35 usual attributes); None for anything the paper did not report."""
    if list(names) == list(WIDER_ATTRIBUTES):
        return dict(dataset='WIDER-Attribute', mAP=metrics.PAPER_WIDER_MAP,
                    per_attribute=metrics.PAPER_WIDER_AP,
                    resnet101_mAP=metrics.PAPER_WIDER_RESNET101_MAP)
    if dataset == 'peta' and len(names) == 35:
        return dict(metrics.PAPER_PETA, dataset='PETA')
    return None


def report(result, json_path, png_path, title, bars_title, compare=None, show=print):
    """Write ``result`` to ``json_path`` and its AP bars to ``png_path``; ``show`` the per-attribute
    table (with the paper's APs and the deltas when ``compare`` is given)."""
    def write(tmp):
        with open(tmp, 'w') as f:
            json.dump(result, f, indent=1)
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    checkpoints.atomic_write(json_path, write)
    checkpoints.atomic_write(png_path, lambda tmp: plots.ap_bars(result, tmp, bars_title, compare))
    show(metrics.format_table(result, compare=compare, title=title))
    return json_path


def paper_line(result, dataset):
    """The paper's headline numbers next to ours, with the differences (points), where it has any."""
    ref = result.get('paper')
    if ref is None:
        return ('paper: no numbers to compare with: the paper reports WIDER-Attribute (its 14 attributes) '
                'and PETA (35 attributes), not %s' % dataset)
    ours = {k: 100 * (result[k] if result[k] is not None else float('nan'))
            for k in ('mAP', 'mA', 'accuracy', 'precision', 'recall', 'f1')}
    if ref['dataset'] == 'WIDER-Attribute':
        return 'paper (WIDER-Attribute, ResNet-101): mAP %.1f, ours %.2f (delta %+.2f); ResNet-101 without ' \
               'attention %.1f' % (ref['mAP'], ours['mAP'], ours['mAP'] - ref['mAP'], ref['resnet101_mAP'])
    keys = ('mA', 'accuracy', 'precision', 'recall', 'f1')
    return 'paper (PETA): ' + ', '.join(
        '%s %.2f, ours %.2f (delta %+.2f)' % (k, ref[k], ours[k], ours[k] - ref[k]) for k in keys)


def rethinking_table(result, system):
    """The community baseline's numbers (Rethinking_of_PAR's README) beside ours, in its convention."""
    where = result.get('community_dataset')
    rows = [r for r in metrics.RETHINKING_BASELINE if r[0] == where]
    header = '%-8s %-16s %6s %6s %6s %6s %6s' % ('dataset', 'model', 'mA', 'Acc', 'Prec', 'Rec', 'F1')
    lines = ["Rethinking_of_PAR's baseline (its README; mA and the instance metrics in its convention, "
             'p > 0.5, both sides):', header, '-' * len(header)]
    for row in rows or metrics.RETHINKING_BASELINE:
        lines.append('%-8s %-16s %6.2f %6.2f %6.2f %6.2f %6.2f' % row)
    keys = ('mA', 'accuracy', 'precision', 'recall', 'f1')
    ours = [100 * result[k] for k in keys]
    lines.append('%-8s %-16s %6.2f %6.2f %6.2f %6.2f %6.2f' % ((where or '-', 'ours') + tuple(ours)))
    lines.append('-' * len(header))
    if rows:
        lines.append('%-25s %+6.2f %+6.2f %+6.2f %+6.2f %+6.2f' % ((
            'ours - %s' % rows[0][1],) + tuple(o - b for o, b in zip(ours, rows[0][2:]))))
        lines.append('ours: %s; theirs: %s, 256x192 input, trained on trainval, the checkpoint picked on test'
                     % (system, rows[0][1]))
    else:
        lines.append('no baseline numbers for this data: they report %s (on their files, --dataset pedes)'
                     % ', '.join(dict.fromkeys(r[0] for r in metrics.RETHINKING_BASELINE)))
    return '\n'.join(lines)


def test_from_train_flags(cfg, explicit=()):
    """``train.py --test`` (the authors' flag): the test split with the best checkpoint of --resume, or
    with the authors' files of --upstream-weights; writes ``eval_test.json`` where eval.py does. The metric
    convention is the run's unless ``--metrics`` is among the ``explicit`` flags."""
    source = cfg.get('resume') or cfg.get('upstream_weights')
    if not source:
        raise UserError('--test needs --resume RUN_DIR (our run) or --upstream-weights saved_models/')
    ctx = parse_contexts(cfg['gpus'])
    upstream = {k: cfg[k] for k in ('preset', 'backbone', 'input_size', 'dataset', 'data_path',
                                    'num_classes')}
    net, run_cfg, names = load_source(source, ctx, upstream=upstream,
                                      overrides={'data_path': cfg['data_path']})
    net.hybridize(static_alloc=True, static_shape=True)
    convention = cfg['metrics'] if 'metrics' in explicit else None          # None: the run's own
    return report_split(net, run_cfg, names, 'test', ctx, source, convention=convention)
