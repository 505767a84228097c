"""PETA from the DeepMAR release: ``PETA.mat`` and ``images/00001.png`` .. ``19000.png``.

``PETA.mat`` holds the struct ``peta``: ``peta[0][0][0]`` the 19000 x 109 label matrix (the attributes
are columns 4 on, 105 of them, 1 positive / 0 negative), ``peta[0][0][1]`` the 105 attribute names,
``peta[0][0][3]`` five random partitions, each with 1-based ``train`` / ``val`` / ``test`` image indices
(9,500 / 1,900 / 7,600). As usual, the first 35 attributes are used unless ``all_attributes``.
Splits: ``train``, ``val``, ``trainval``, ``test`` of partition ``partition`` (0-4).
"""
import os

import numpy as np

from datasets.base import BadSamples, ImageFileDataset, require_dir
from common.errors import UserError

SPLITS = ('train', 'val', 'trainval', 'test')


def _load_mat(path):
    import scipy.io
    if not os.path.isfile(path):
        raise UserError('PETA: %s is missing (expected PETA.mat and images/ under --data_path)' % path)
    try:
        return scipy.io.loadmat(path)
    except Exception as err:  # scipy raises several types for damaged files
        raise UserError('%s is not a readable MATLAB file (%s)' % (path, err))


def _cell_strings(cell):
    return [str(np.asarray(c).ravel()[0]) for c in np.asarray(cell).ravel()]


class Peta(ImageFileDataset):
    def __init__(self, data_path, split='train', partition=0, all_attributes=False, skip_bad=False,
                 limit=None):
        if split not in SPLITS:
            raise UserError('PETA has splits %s, not %r' % (', '.join(SPLITS), split))
        require_dir(data_path, 'PETA')
        mat_path = os.path.join(data_path, 'PETA.mat')
        mat = _load_mat(mat_path)
        try:
            peta = mat['peta'][0][0]
            labels = np.asarray(peta[0], dtype=np.float64)[:, 4:]
            names = _cell_strings(peta[1])
            parts = peta[3]
            if not 0 <= partition < len(parts):
                raise UserError('PETA: --partition %d, but %s has partitions 0..%d'
                                % (partition, mat_path, len(parts) - 1))
            fields = parts[partition][0][0][0]
            index = {'train': fields[0], 'val': fields[1], 'test': fields[2]}
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise UserError('%s does not have the DeepMAR PETA structure (peta: labels, attribute names, -, '
                            'partitions with train/val/test) (%s)' % (mat_path, err))
        if labels.shape[1] != len(names):
            raise UserError('%s: %d label columns after the first 4 but %d attribute names'
                            % (mat_path, labels.shape[1], len(names)))
        count = len(names) if all_attributes else min(35, len(names))
        labels, names = labels[:, :count], names[:count]
        if split == 'trainval':
            chosen = np.concatenate([np.asarray(index['train']).ravel(), np.asarray(index['val']).ravel()])
        else:
            chosen = np.asarray(index[split]).ravel()
        chosen = chosen.astype(np.int64) - 1
        if limit:
            chosen = chosen[:limit]
        bad = BadSamples(skip_bad, 'PETA %s' % split)
        rows, paths = [], []
        for i in chosen:
            where = '%s: image index %d' % (mat_path, i + 1)
            if not 0 <= i < len(labels):
                bad.report(where, 'is outside the %d label rows' % len(labels))
                continue
            row = labels[i]
            if not np.isin(row, (0, 1)).all():
                bad.report(where, 'labels must be 0 or 1, got %s' % sorted(set(row.tolist()) - {0.0, 1.0}))
                continue
            rows.append(np.where(row == 1, 1, -1))
            paths.append(os.path.join(data_path, 'images', '%05d.png' % (i + 1)))
        self._finish(paths, rows, names, split, bad)


DEFAULTS = dict(backbone='resnet101_v1', input_size=224, resize=256, crop_range=(160, 224), monitor='mA',
                num_workers=4)
