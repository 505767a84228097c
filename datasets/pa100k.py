"""PA-100K from ``annotation.mat`` and its image folder.

``annotation.mat`` holds ``attributes`` (26 names), ``{train,val,test}_images_name`` (file names) and
``{train,val,test}_label`` (0 / 1 matrices; 80,000 / 10,000 / 10,000). Images are looked for in
``data/``, ``images/``, ``release_data/release_data/`` or ``--data_path`` itself.
"""
import os

import numpy as np

from datasets.base import BadSamples, ImageFileDataset, require_dir
from datasets.peta import _cell_strings, _load_mat
from common.errors import UserError

SPLITS = ('train', 'val', 'trainval', 'test')
IMAGE_DIRS = ('data', 'images', os.path.join('release_data', 'release_data'), '')


class PA100K(ImageFileDataset):
    def __init__(self, data_path, split='train', skip_bad=False, limit=None):
        if split not in SPLITS:
            raise UserError('PA-100K has splits %s, not %r' % (', '.join(SPLITS), split))
        require_dir(data_path, 'PA-100K')
        mat_path = os.path.join(data_path, 'annotation.mat')
        if not os.path.isfile(mat_path):
            raise UserError('PA-100K: %s is missing (expected annotation.mat and the images under '
                            '--data_path)' % mat_path)
        mat = _load_mat(mat_path)
        parts = ['train', 'val'] if split == 'trainval' else [split]
        try:
            names = _cell_strings(mat['attributes'])
            files = sum((_cell_strings(mat['%s_images_name' % p]) for p in parts), [])
            labels = np.concatenate([np.asarray(mat['%s_label' % p], np.float64) for p in parts])
        except KeyError as err:
            raise UserError('%s has no %s entry; is it the PA-100K annotation file?' % (mat_path, err))
        if labels.ndim != 2 or labels.shape[1] != len(names) or labels.shape[0] != len(files):
            raise UserError('%s: the %s labels are %s but there are %d attribute names and %d image names'
                            % (mat_path, split, 'x'.join(map(str, labels.shape)), len(names), len(files)))
        if limit:
            files, labels = files[:limit], labels[:limit]
        if not files:
            raise UserError('%s: the %s split is empty' % (mat_path, split))
        image_dir = next((os.path.join(data_path, d) for d in IMAGE_DIRS
                          if os.path.isfile(os.path.join(data_path, d, files[0]))), None)
        if image_dir is None:
            raise UserError('PA-100K: %s not found in %s under %s' % (files[0], ', '.join(
                d or '.' for d in IMAGE_DIRS), data_path))
        bad = BadSamples(skip_bad, 'PA-100K %s' % split)
        rows, paths = [], []
        for i, (name, row) in enumerate(zip(files, labels)):
            where = '%s: %s_label row %d (%s)' % (mat_path, split, i + 1, name)
            if not np.isin(row, (0, 1)).all():
                bad.report(where, 'labels must be 0 or 1')
                continue
            rows.append(np.where(row == 1, 1, -1))
            paths.append(os.path.join(image_dir, name))
        self._finish(paths, rows, names, split, bad)


DEFAULTS = dict(backbone='resnet101_v1', input_size=224, resize=256, crop_range=(160, 224), monitor='mA',
                num_workers=4)
