"""Bring your own data: one CSV file per split.

Layout::

    <data_path>/train.csv   val.csv   test.csv   (trainval.csv optional)

Each file starts with a header row: the image path column (``path``, ``image`` or ``file``) and then
one column per attribute, named. Every following row is one image: its path (absolute, or relative to
``<data_path>``) and one value per attribute:

    1 = positive    0 = negative    empty, ? or NA = unspecified (masked out of losses and metrics)

All split files must have the same attribute columns in the same order.
"""
import csv
import os


from datasets.base import BadSamples, ImageFileDataset, require_dir
from common.errors import UserError

PATH_COLUMNS = ('path', 'image', 'file', 'filename', 'image_path')
VALUES = {'1': 1, '1.0': 1, '0': -1, '0.0': -1, '': 0, '?': 0, 'na': 0, 'nan': 0}


class CsvDataset(ImageFileDataset):
    def __init__(self, data_path, split='train', skip_bad=False, limit=None):
        require_dir(data_path, 'the CSV dataset')
        path = os.path.join(data_path, '%s.csv' % split)
        if not os.path.isfile(path):
            raise UserError('CSV dataset: %s is missing (one CSV per split: train.csv, val.csv, test.csv)'
                            % path)
        bad = BadSamples(skip_bad, 'CSV %s' % split)
        with open(path, newline='', encoding='utf-8-sig') as f:      # (Excel writes a BOM)
            reader = csv.reader(f)
            header = next(reader, None)
            if not header or header[0].strip().lower() not in PATH_COLUMNS or len(header) < 2:
                raise UserError('%s line 1: the header must be the path column (%s) followed by attribute '
                                'names, got %s' % (path, '/'.join(PATH_COLUMNS), header))
            names = [h.strip() for h in header[1:]]
            paths, rows = [], []
            for line_no, row in enumerate(reader, start=2):
                if not row or all(not c.strip() for c in row):
                    continue
                where = '%s line %d' % (path, line_no)
                if len(row) != len(header):
                    bad.report(where, 'has %d labels, expected %d (one per attribute in the header)'
                               % (len(row) - 1, len(names)))
                    continue
                values = [VALUES.get(v.strip().lower()) for v in row[1:]]
                if None in values:
                    wrong = [v for v in row[1:] if v.strip().lower() not in VALUES]
                    bad.report(where, 'label values must be 1 (positive), 0 (negative) or empty/?/NA '
                               '(unspecified), got %s' % ', '.join(repr(w) for w in wrong[:3]))
                    continue
                image = row[0].strip()
                paths.append(image if os.path.isabs(image) else os.path.join(data_path, image))
                rows.append(values)
                if limit and len(paths) >= limit:
                    break
        self._finish(paths, rows, names, split, bad)


DEFAULTS = dict(backbone='resnet101_v1', input_size=224, resize=256, crop_range=(128, 224), monitor='mAP',
                num_workers=4)
