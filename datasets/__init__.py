"""Datasets, one module per dataset, behind one registry.

========  ===================================================  =============================
name      layout under ``--data_path``                         module
========  ===================================================  =============================
demo      (built from scikit-learn's digits, cached)           ``datasets/digits.py``
wider     Annotations/wider_attribute_*.json + Image/          ``datasets/wider.py``
peta      PETA.mat + images/00001.png ...                      ``datasets/peta.py``
pa100k    annotation.mat + data/ (or images/)                  ``datasets/pa100k.py``
pedes     dataset_all.pkl (or dataset_zs_run0.pkl) + images    ``datasets/pedes.py``
          (Rethinking_of_PAR's files: PETA, PETA-ZS, PA-100K,
          RAP, RAPv2, RAP-ZS; before PETA.mat when both are there)
csv       train.csv, val.csv, test.csv                         ``datasets/csvlist.py``
lst       train.lst, val.lst, test.lst (the authors' format)   ``datasets/lst.py``
rec       train.rec/.idx, ... (packed by datasets.recordio)    ``datasets/recordio.py``
========  ===================================================  =============================

``get_split(name, data_path, split, **options)`` returns an :class:`datasets.base.AttributeDataset`;
options a dataset does not take (e.g. ``partition`` for WIDER) are ignored. ``load_split`` adds the
checks training and evaluation need (not empty, the expected attribute count). ``defaults(name)``
gives the settings ``train.py`` uses for that dataset unless told otherwise; ``detect(data_path)`` tells
the dataset from a folder's layout (``train.py --data_path`` without ``--dataset``).
"""
import glob
import importlib
import inspect
import logging
import os

from common.errors import UserError

LOG = logging.getLogger('vaa')
REPO_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data')

# name: (module, class)
REGISTRY = {
    'demo': ('datasets.digits', 'DigitsCanvas'),
    'wider': ('datasets.wider', 'WiderAttribute'),
    'peta': ('datasets.peta', 'Peta'),
    'pa100k': ('datasets.pa100k', 'PA100K'),
    'pedes': ('datasets.pedes', 'PedesDataset'),
    'csv': ('datasets.csvlist', 'CsvDataset'),
    'lst': ('datasets.lst', 'LstDataset'),
    'rec': ('datasets.recordio', 'RecordDataset'),
}


def names():
    return sorted(REGISTRY)


def _entry(name):
    if name not in REGISTRY:
        raise UserError('unknown dataset %r: choose one of %s' % (name, ', '.join(names())))
    module = importlib.import_module(REGISTRY[name][0])
    return module, getattr(module, REGISTRY[name][1])


def get_split(name, data_path, split, **options):
    """One split (``train``, ``val``, ``test``...) of dataset ``name`` read from ``data_path``."""
    _, cls = _entry(name)
    if name == 'demo' and not data_path:
        data_path = os.path.join(REPO_DATA, 'demo')
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in options.items() if k in accepted and v is not None}
    return cls(data_path, split, **kwargs)


def load_split(name, data_path, split, num_classes=None, attribute_names=None, **options):
    """:func:`get_split` for training and evaluation: logs the samples skipped as bad, and refuses an
    empty split, one whose attribute count differs from ``num_classes`` (``--num_classes``), and one
    whose attributes are not ``attribute_names`` in that order (those of the training split)."""
    data = get_split(name, data_path, split, **options)
    if attribute_names is not None and list(data.attribute_names) != list(attribute_names):
        raise UserError('the %s split of %s has the attributes %s, but the model is trained for %s: every '
                        'split needs the same attributes in the same order' % (
                            split, name, _differ(data.attribute_names, attribute_names),
                            _differ(attribute_names, data.attribute_names)))
    if getattr(data, 'skipped', 0):
        LOG.warning('%s %s: %d bad sample(s) skipped (--skip-bad-samples)', name, split, data.skipped)
    if len(data) == 0:
        raise UserError('the %s split of %s (%s) is empty' % (split, name, data_path))
    if num_classes and num_classes != data.num_classes:
        raise UserError('--num_classes %d but the %s labels have %d attributes; drop --num_classes or fix it'
                        % (num_classes, name, data.num_classes))
    return data


# What marks each dataset's folder (file names or glob patterns), checked in this order: a folder of records
# also holds .lst files; Rethinking_of_PAR's PETA folder also holds PETA.mat (--dataset peta reads that).
LAYOUTS = (
    ('wider', ('Annotations/wider_attribute_trainval.json',)),
    ('pedes', ('dataset_all.pkl', 'dataset_zs_run*.pkl')),
    ('peta', ('PETA.mat',)),
    ('pa100k', ('annotation.mat',)),
    ('rec', ('train.rec', 'training_list.rec', 'wider_records/training_list.rec')),
    ('lst', ('train.lst', 'training_list.lst', 'wider_records/training_list.lst')),
    ('csv', ('train.csv',)),
)


def detect(data_path):
    """The dataset whose layout ``data_path`` has; ``demo`` without a path (or for a folder holding the
    demo's cache). UserError naming what was looked for otherwise: a folder is never guessed at."""
    if not data_path:
        return 'demo'
    if os.path.isfile(data_path):
        raise UserError('--data_path %s is a file; give the folder that holds it: --data_path %s' % (
            data_path, os.path.dirname(data_path) or '.'))
    if not os.path.isdir(data_path):
        raise UserError('--data_path %s does not exist; give the dataset folder (and --dataset)' % data_path)
    for name, marks in LAYOUTS:
        found = (p for mark in marks for p in glob.glob(os.path.join(glob.escape(data_path), mark)))
        if any(os.path.isfile(path) for path in found):
            return name
    if any(f.startswith('digits-canvas-') and f.endswith('.npz') for f in os.listdir(data_path)):
        return 'demo'
    raise UserError('cannot tell the dataset of --data_path %s from its layout (looked for %s); give '
                    '--dataset'
                    % (data_path,
                       ', '.join('%s (%s)' % (' or '.join(marks), name) for name, marks in LAYOUTS)))


def _differ(names, other):
    """``names`` as a list, shortened around where they first differ from ``other`` when long."""
    names, other = list(names), list(other)
    if len(names) <= 8:
        return '[%s] (%d)' % (', '.join(names), len(names))
    first = next((i for i, (a, b) in enumerate(zip(names, other)) if a != b), min(len(names), len(other)))
    start = max(min(first, len(names)) - 1, 0)
    return '[%s%s%s] (%d)' % ('..., ' if start else '', ', '.join(names[start:start + 4]),
                              ', ...' if len(names) > start + 4 else '', len(names))


def defaults(name):
    module, _ = _entry(name)
    return dict(module.DEFAULTS)
