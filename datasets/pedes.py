"""The pedestrian-attribute community's annotation files: ``dataset_all.pkl`` (and the identity-disjoint
zero-shot splits ``dataset_zs_run0.pkl`` of PETA-ZS and RAP-ZS), as ``valencebond/Rethinking_of_PAR``
writes them (``dataset/pedes_attr/preprocess/format_{peta,pa100k,rap,rap2}.py``) and reads them
(``dataset/pedes_attr/pedes.py``).

Layout::

    <data_path>/dataset_all.pkl            (or --split-file dataset_zs_run0.pkl)
    <data_path>/images/ | data/ | RAP_dataset/   the images the file names

The file is one pickled ``EasyDict`` with the fields

===============  ============================================================================================
``description``  'peta', 'pa100k', 'rap' or 'rap2'
``root``         the image folder on the machine that wrote it (``<save_dir>/images``, ``/data``,
                 ``/RAP_dataset``); read from ``<data_path>/<its last part>`` when the path does not exist
``image_name``   N file names (PETA ``00001.png``...; the others NumPy strings from the .mat file)
``label``        N x A matrix, 1 positive, 0 negative (RAPv2: also 2, which pedes.py sets to 0, negative)
``attr_name``    A names (PETA 105, PA-100K 26, RAP 92, RAPv2 119)
``label_idx``    ``eval``: the evaluated columns in the community's group order (PETA 35, PA-100K 26, RAP 51,
                 RAPv2 54, RAP-ZS 53); ``color`` and ``extra`` the others (PETA's ``extra`` is a ``range``)
``partition``    ``train``, ``val``, ``trainval``, ``test``: index arrays, or (PETA, RAP, RAPv2) lists of one
                 array per numbered run (5); RAP has only ``trainval`` and ``test``
``weight_train``, ``weight_trainval``: the positive rates (not used: the loss computes its own)
===============  ============================================================================================

As ``pedes.py`` with ``DATASET.LABEL: 'eval'``, the attributes are the ``label_idx.eval`` columns in that
order (``all_attributes``: every column); a file without ``label_idx`` has all its attributes evaluated.
``partition`` picks the numbered run of a list (pedes.py takes run 0).

The files are pickles, and a pickle can call any function it names. :func:`read_annotation` never hands
one to ``pickle.load``: its unpickler builds only containers, NumPy arrays and dtypes, ``range`` and the
``EasyDict`` records (as plain dicts), and refuses anything else before it is called.
"""
import _compat_pickle
import glob
import io
import os
import pickle

import numpy as np

from datasets.base import BadSamples, ImageFileDataset, require_dir
from common.errors import UserError

DEFAULT_FILE = 'dataset_all.pkl'
PATTERNS = (DEFAULT_FILE, 'dataset_zs_run*.pkl')
SPLITS = ('train', 'val', 'trainval', 'test')
# The community's names of the datasets (its README's table), by (description, zero-shot file).
COMMUNITY_NAMES = {('peta', False): 'PETA', ('peta', True): 'PETAzs', ('pa100k', False): 'PA100k',
                   ('rap', False): 'RAPv1', ('rap2', False): 'RAPv2', ('rap2', True): 'RAPzs'}


# ---------------------------------------------------------------------------------------------- unpickling

class _Record(dict):
    """What an ``easydict.EasyDict`` becomes: a plain dict. Its pickled attributes repeat its items; where
    they differ the attribute wins, as pedes.py reads the fields as attributes."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError('an EasyDict record with a state of type %s' % type(state).__name__)
        self.update(state)


def _reconstructor(cls, base, state):
    """``copyreg._reconstructor`` (protocols 0 and 1) for the one class it may rebuild here."""
    if cls is not _Record or base is not dict:
        raise pickle.UnpicklingError('copyreg._reconstructor of %r' % (cls,))
    return _Record(state or {})


def _latin1(text, encoding):
    """``_codecs.encode`` as protocols 0-2 use it for bytes (``encode(str, 'latin1')``), and nothing else."""
    if encoding not in ('latin1', 'latin-1') or not isinstance(text, str):
        raise pickle.UnpicklingError('_codecs.encode with %r' % (encoding,))
    return text.encode('latin1')


def _numpy_callables():
    from numpy.core import multiarray, numeric
    found = {('numpy', 'ndarray'): np.ndarray, ('numpy', 'dtype'): np.dtype}
    for core in ('numpy.core', 'numpy._core'):       # NumPy 1.x and 2.x pickles name different modules
        found[(core + '.multiarray', '_reconstruct')] = multiarray._reconstruct
        found[(core + '.multiarray', 'scalar')] = multiarray.scalar
        found[(core + '.numeric', '_frombuffer')] = numeric._frombuffer       # protocol 5
    return found


ADMITTED = dict(_numpy_callables())
ADMITTED.update({('easydict', 'EasyDict'): _Record, ('builtins', 'range'): range, ('builtins', 'dict'): dict,
                 ('copyreg', '_reconstructor'): _reconstructor, ('_codecs', 'encode'): _latin1})


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _compat_pickle.NAME_MAPPING:            # protocols 0-2 write Python 2 names
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = ADMITTED.get((module, name))
        if found is None:
            raise _Refused('%s.%s' % (module, name))
        return found

    def persistent_load(self, pid):
        raise _Refused('a persistent id (%r)' % (pid,))


class _Refused(pickle.UnpicklingError):
    pass


def _plain(value):
    """Records to plain dicts, all the way down."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def read_annotation(path):
    """The annotation file at ``path`` as plain dicts, lists and arrays; UserError for a file that is not
    one (naming the class a pickle would call, for one that names anything but the admitted ones)."""
    try:
        with open(path, 'rb') as f:
            raw = f.read()
    except OSError as err:
        raise UserError('cannot read %s (%s)' % (path, err.strerror or err))
    try:
        content = _Unpickler(io.BytesIO(raw)).load()
    except _Refused as err:
        raise UserError('%s is refused: the pickle calls %s, which is not part of an annotation file of '
                        'Rethinking_of_PAR (only containers, NumPy arrays, range and EasyDict records are '
                        'read; nothing in it was run). Regenerate it with their format_*.py scripts'
                        % (path, err))
    except Exception as err:        # a damaged pickle raises many types
        raise UserError('%s is not a readable annotation pickle (%s: %s)' % (path, type(err).__name__, err))
    if not isinstance(content, dict):
        raise UserError('%s holds a %s, not the EasyDict record of an annotation file'
                        % (path, type(content).__name__))
    return _plain(content)


# ---------------------------------------------------------------------------------------------- checking

def _field(ann, key, path, what):
    if key not in ann:
        raise UserError('%s has no %r field (%s); is it a dataset_all.pkl of Rethinking_of_PAR?'
                        % (path, key, what))
    return ann[key]


def _strings(values, path, key):
    values = list(values.tolist() if isinstance(values, np.ndarray) else values)
    bad = next((v for v in values if not isinstance(v, str)), None)
    if bad is not None:
        raise UserError('%s: %r holds a %s (%r), expected file or attribute names'
                        % (path, key, type(bad).__name__, bad))
    return [str(v) for v in values]


def _indices(values, limit, path, key, what='row', of='rows of its label matrix'):
    """An integer array of row numbers (``what``) in 0..limit-1 (a float array of whole numbers too);
    ``of``: what the limit counts, for the message."""
    array = np.asarray(values)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.integer)
                                     or np.issubdtype(array.dtype, np.floating)):
        raise UserError('%s: %s is a %s array, expected row numbers' % (path, key, array.dtype))
    array = array.ravel()
    if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.round(array)):
        raise UserError('%s: %s holds numbers that are not whole, expected row numbers' % (path, key))
    array = array.astype(np.int64)
    outside = array[(array < 0) | (array >= limit)]
    if outside.size:
        raise UserError('%s: %s holds %s %d, outside the %d %s' % (path, key, what, outside[0], limit, of))
    return array


class Annotation(object):
    """One annotation file, checked: its labels, names, evaluated columns and partitions."""

    def __init__(self, path):
        ann = read_annotation(path)
        self.path = path
        self.description = str(ann.get('description', ''))
        self.zero_shot = os.path.basename(path).startswith('dataset_zs')
        self.root = str(ann.get('root', ''))
        self.image_name = _strings(_field(ann, 'image_name', path, 'the image file names'), path,
                                   'image_name')
        label = np.asarray(_field(ann, 'label', path, 'the label matrix'))
        if label.ndim != 2 or label.dtype == object or not np.issubdtype(label.dtype, np.number):
            raise UserError('%s: label is a %s %s array, expected an images x attributes matrix of numbers'
                            % (path, 'x'.join(map(str, label.shape)) or 'scalar', label.dtype))
        self.label = label
        self.attr_name = _strings(_field(ann, 'attr_name', path, 'the attribute names'), path, 'attr_name')
        if label.shape != (len(self.image_name), len(self.attr_name)):
            raise UserError('%s: label is %d x %d, but there are %d image names and %d attribute names'
                            % ((path,) + label.shape + (len(self.image_name), len(self.attr_name))))
        label_idx = ann.get('label_idx')
        if label_idx is None:                            # as pedes.py: every attribute is evaluated
            self.eval_columns = list(range(len(self.attr_name)))
        else:
            if not isinstance(label_idx, dict) or 'eval' not in label_idx:
                raise UserError('%s: label_idx has no eval list (the evaluated attributes)' % path)
            self.eval_columns = _indices(list(label_idx['eval']), len(self.attr_name), path, 'label_idx.eval',
                                         'column', 'attributes of attr_name').tolist()
        partition = _field(ann, 'partition', path, 'the train/val/test indices')
        if not isinstance(partition, dict) or not partition:
            raise UserError('%s: partition is not a record of splits (train, val, trainval, test)' % path)
        self.partition = partition

    @property
    def community_name(self):
        """PETA, PETAzs, PA100k, RAPv1, RAPv2 or RAPzs (the name in the community's tables), or None."""
        return COMMUNITY_NAMES.get((self.description, self.zero_shot))

    def runs(self, split):
        """How many numbered runs ``split`` has (1 for a plain index array)."""
        value = self.partition[split]
        return len(value) if isinstance(value, (list, tuple)) else 1

    def rows(self, split, run=0):
        """The label rows of ``split`` (of numbered run ``run`` where the file has several)."""
        if split not in self.partition:
            raise UserError(split_hint(self, split))
        value = self.partition[split]
        key = 'partition.%s' % split
        if isinstance(value, (list, tuple)):
            if not value:
                raise UserError('%s: %s is an empty list of runs' % (self.path, key))
            if not 0 <= run < len(value):
                raise UserError('--partition %d, but %s: %s has the runs 0..%d'
                                % (run, self.path, key, len(value) - 1))
            value, key = value[run], '%s[%d]' % (key, run)
        elif run:
            raise UserError('--partition %d, but %s has one %s (an index array, not numbered runs): drop '
                            '--partition' % (run, self.path, key))
        return _indices(value, len(self.label), self.path, key)


def split_hint(ann, split):
    have = [s for s in SPLITS if s in ann.partition] + sorted(set(ann.partition) - set(SPLITS))
    hint = ''
    if 'val' not in ann.partition and 'trainval' in ann.partition and 'test' in ann.partition:
        hint = (': train and validate as Rethinking_of_PAR does with --train-split trainval --val-split test '
                '(it picks the checkpoint on the test split; there is no validation split)')
    elif split in ('train', 'val', 'trainval', 'test'):
        hint = ': choose one of them (--train-split, --val-split, --test-split)'
    return '%s has the partitions %s, not %r%s' % (ann.path, ', '.join(have), split, hint)


_CACHE = {}


def annotation(path):
    """:class:`Annotation` of ``path``, read once per file version (every split reads the same file)."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_mtime_ns, stat.st_size)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = Annotation(path)
    return _CACHE[key]


def split_file_path(data_path, split_file=None):
    """The annotation file of ``data_path`` (``split_file``: a name in it, or a path)."""
    if split_file:
        path = split_file if os.path.isfile(split_file) and os.path.dirname(split_file) else \
            os.path.join(data_path, split_file)
        if not os.path.isfile(path):
            raise UserError('--split-file %s: %s does not exist%s' % (split_file, path, _present(data_path)))
        return path
    path = os.path.join(data_path, DEFAULT_FILE)
    if not os.path.isfile(path):
        raise UserError('%s has no %s%s' % (data_path, DEFAULT_FILE, _present(data_path)))
    return path


def _present(data_path):
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(data_path), '*.pkl')))
    if not found:
        return ''
    return '; it holds %s: choose one with --split-file %s' % (', '.join(found), found[0])


def image_folder(ann, data_path):
    """Where the images are: ``<data_path>/<last part of root>``, the root the file names, or
    ``data_path`` itself (the first that holds the first image)."""
    base = os.path.basename(os.path.normpath(ann.root)) if ann.root else ''
    candidates = [os.path.join(data_path, base)] if base else []
    candidates += [ann.root] if ann.root else []
    candidates.append(data_path)
    first = ann.image_name[0] if ann.image_name else ''
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, first)):
            return folder
    raise UserError('%s: the image %s is in none of %s (its root is %s)'
                    % (ann.path, first, ', '.join(dict.fromkeys(candidates)), ann.root or 'not given'))


class PedesDataset(ImageFileDataset):
    def __init__(self, data_path, split='train', partition=0, all_attributes=False, split_file=None,
                 skip_bad=False, limit=None):
        require_dir(data_path, "the pedestrian datasets of Rethinking_of_PAR's dataset_all.pkl")
        ann = annotation(split_file_path(data_path, split_file))
        rows = ann.rows(split, partition)
        columns = list(range(len(ann.attr_name))) if all_attributes else ann.eval_columns
        if limit:
            rows = rows[:limit]
        folder = image_folder(ann, data_path)
        self.description, self.community_name = ann.description, ann.community_name
        self.split_file = os.path.basename(ann.path)
        bad = BadSamples(skip_bad, '%s %s' % (self.split_file, split))
        labels = ann.label[:, columns]
        signed, paths = [], []
        for i in rows:
            row = labels[i]
            if not np.isin(row, (0, 1, 2)).all():
                bad.report('%s: label row %d (%s)' % (ann.path, i, ann.image_name[i]),
                           'labels must be 1, 0 or 2 (negative, as pedes.py reads it), got %s'
                           % sorted(set(row.tolist()) - {0, 1, 2}))
                continue
            signed.append(np.where(row == 1, 1, -1))
            paths.append(os.path.join(folder, ann.image_name[i]))
        self._finish(paths, signed, [ann.attr_name[c] for c in columns], split, bad)


DEFAULTS = dict(backbone='resnet101_v1', input_size=224, resize=256, crop_range=(160, 224), monitor='mA',
                num_workers=4)
