"""A trained model from wherever it is: a run folder (its best or last checkpoint), one of our checkpoint
files, or the authors' ``saved_models/`` folder (which carries no config: the preset, backbone, input size
and dataset come from the caller). Shared by eval.py, predict.py, train.py --test and the tools.

* :func:`resolve_source`: what a SOURCE argument is; :func:`load_source`: its network, config and
  attribute names; :func:`describe`: the system of a config in a few words (eval.py, compare.py).
"""
import os

import datasets
import related
from datasets import loaders
from engine import checkpoints, config
from engine.build import build_net
from common.errors import UserError
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
        if which == 'best' and os.path.isfile(checkpoint_path(source, 'last')):    # (a run with --keep last)
            return 'ours', checkpoint_path(source, 'last'), source
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
