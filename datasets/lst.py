"""The authors' list format: MXNet ``.lst`` files (what ``im2rec.py`` packs).

Layout::

    <data_path>/train.lst  val.lst  test.lst
        (or the authors' names training_list.lst, valid_list.lst, testing_list.lst, also inside
         <data_path>/wider_records/)
    <data_path>/attributes.txt      optional: one attribute name per line

Each line is ``index <TAB> label_1 <TAB> ... <TAB> label_C <TAB> relative/path.jpg`` with labels in
WIDER's encoding (1 positive, -1 negative, 0 unspecified), as the authors' ``data_prep`` wrote them.
Paths are relative to ``<data_path>`` (or absolute). Without ``attributes.txt`` the names are the WIDER
attributes when C = 14, else ``attr0`` ...
"""
import os


from datasets.base import BadSamples, ImageFileDataset, find_file, parse_signed, require_dir
from datasets.wider import WIDER_ATTRIBUTES
from common.errors import UserError

UPSTREAM_NAMES = {'train': 'training_list.lst', 'val': 'valid_list.lst', 'test': 'testing_list.lst'}


def list_file(data_path, split, ext='.lst'):
    names = ['%s%s' % (split, ext)]
    if split in UPSTREAM_NAMES:
        names.append(UPSTREAM_NAMES[split].replace('.lst', ext))
    names += [os.path.join('wider_records', n) for n in list(names)]
    return find_file(data_path, names, 'list file for the %s split' % split)


def attribute_names(data_path, count):
    path = os.path.join(data_path, 'attributes.txt')
    if os.path.isfile(path):
        names = [l.strip() for l in open(path, encoding='utf-8-sig') if l.strip()]
        if len(names) != count:
            raise UserError('%s names %d attributes but the labels have %d' % (path, len(names), count))
        return names
    return list(WIDER_ATTRIBUTES) if count == len(WIDER_ATTRIBUTES) else ['attr%d' % i for i in range(count)]


def read_lst(path, bad, limit=None):
    """[(index, signed labels, relative path)] of a .lst file; bad rows go to ``bad``."""
    rows, count = [], None
    with open(path, encoding='utf-8-sig') as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = [p.strip() for p in line.rstrip('\n').split('\t')]
            where = '%s line %d' % (path, line_no)
            if len(parts) < 3:
                bad.report(where, 'needs index, labels and path separated by tabs')
                continue
            if count is None:
                count = len(parts) - 2
            signed = parse_signed(parts[1:-1], where, bad, count)
            if signed is None:
                continue
            rows.append((parts[0], signed, parts[-1]))
            if limit and len(rows) >= limit:
                break
    return rows, count


class LstDataset(ImageFileDataset):
    def __init__(self, data_path, split='train', skip_bad=False, limit=None):
        require_dir(data_path, 'the .lst dataset')
        path = list_file(data_path, split)
        bad = BadSamples(skip_bad, '.lst %s' % split)
        rows, count = read_lst(path, bad, limit)
        if count is None:
            raise UserError('%s holds no samples' % path)
        names = attribute_names(data_path, count)
        paths = [p if os.path.isabs(p) else os.path.join(data_path, p) for _, _, p in rows]
        self._finish(paths, [r[1] for r in rows], names, split, bad)


DEFAULTS = dict(backbone='resnet101_v1', input_size=224, resize=256, crop_range=(128, 224), monitor='mAP',
                num_workers=4)
