"""Scoring a split and reporting the result: the JSON with its AP bars beside it and the per-attribute
table, with the paper's numbers or the community baseline's table beside ours (``evaluation/tables.py``).

* :func:`evaluate_split`: one split of the dataset scored with every metric of ``metrics.py``.
* :func:`report`, :func:`report_split`: a result written and printed (what ``eval.py`` and ``train.py``
  print); :func:`test_from_train_flags`: ``train.py --test``, the authors' flag.
* :func:`check_output_file`: an output file checked before any work.
"""
import json
import os

import datasets
from datasets import loaders
from engine import checkpoints, steps
from engine.distributed import parse_contexts
from common.errors import UserError
from evaluation import metrics, plots, tables
from engine.sources import describe, load_source

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
        result['paper'] = tables.paper_reference(cfg['dataset'], names)
    out = out or os.path.join(cfg['run_dir'], 'eval_%s.json' % split)
    per_attribute = (result.get('paper') or {}).get('per_attribute')
    name = os.path.basename(os.path.normpath(os.path.abspath(cfg.get('run_dir') or source)))
    report(result, out, os.path.splitext(out)[0] + '_ap.png',
           '%s split of %s, %s:' % (split, cfg['dataset'], source),
           '%s, %s split' % (name, split), per_attribute)
    if compare == 'paper':
        print(tables.paper_line(result, cfg['dataset']))
    if compare == 'rethinking':
        print(tables.rethinking_table(result, describe(cfg, cfg.get('source_kind', 'ours'))))
    if steps.stage_line(result):
        print(steps.stage_line(result))
    print('chance mAP from the label priors: %.2f; written %s' % (100 * result['chance_mAP'], out))
    return result


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
