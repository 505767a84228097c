"""Datasets, one module per dataset, behind one registry.

``get_split(name, data_path, split)`` returns an :class:`datasets.base.AttributeDataset`;
``defaults(name)`` gives the settings ``train.py`` uses for that dataset unless told otherwise
(backbone, input size, resize and crop range of the augmentation, schedule).
"""
import os

from errors import UserError

REPO_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data')


def _demo(data_path, split, **kwargs):
    from datasets.digits import DigitsCanvas
    return DigitsCanvas(data_path or os.path.join(REPO_DATA, 'demo'), split, **kwargs)


def _demo_defaults():
    from datasets.digits import DEFAULTS
    return dict(DEFAULTS)


REGISTRY = {
    'demo': (_demo, _demo_defaults),
}


def names():
    return sorted(REGISTRY)


def get_split(name, data_path, split, **kwargs):
    """One split (``train``, ``val``, ``test``...) of dataset ``name`` read from ``data_path``."""
    if name not in REGISTRY:
        raise UserError('unknown dataset %r: choose one of %s' % (name, ', '.join(names())))
    return REGISTRY[name][0](data_path, split, **kwargs)


def defaults(name):
    if name not in REGISTRY:
        raise UserError('unknown dataset %r: choose one of %s' % (name, ', '.join(names())))
    return REGISTRY[name][1]()
