"""What every dataset provides, and the image transforms (the paper's augmentation).

A dataset is a ``gluon.data.Dataset`` of ``(image, index)`` where ``image`` is an RGB uint8 H x W x 3
array, with ``labels`` (N x C float32 in {0, 1}) and ``mask`` (N x C, 1 = specified) held as arrays so
that class priors and metrics never touch the images. :func:`make_loader` applies the transforms and
returns batches ``(data, label, mask, index)``.
"""
import logging
import os

import numpy as np
import cv2
from mxnet import gluon

from common.errors import UserError

LOG = logging.getLogger('vaa')

# Normalisation per preset: ImageNet mean/std for model-zoo weights; the released code
# subtracted 104/117/123 from R/G/B and did not divide.
NORMALISATION = {
    'paper': (np.array([123.675, 116.28, 103.53], np.float32), np.array([58.395, 57.12, 57.375], np.float32)),
    'upstream': (np.array([104.0, 117.0, 123.0], np.float32), np.array([1.0, 1.0, 1.0], np.float32)),
}


class AttributeDataset(gluon.data.Dataset):
    """Base class: subclasses set ``attribute_names``, ``labels``, ``mask`` and implement ``image``."""

    attribute_names = ()
    labels = None
    mask = None

    def image(self, index):
        raise NotImplementedError

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.image(index), index

    @property
    def num_classes(self):
        return len(self.attribute_names)


class BadSamples(object):
    """Problems found while reading a dataset: raise at the first one, or (``skip``) count and drop."""

    def __init__(self, skip=False, what='dataset'):
        self.skip, self.what, self.problems = skip, what, []

    def report(self, where, problem):
        """``where``: the file (and line or entry); ``problem``: what is wrong with it."""
        message = '%s: %s' % (where, problem)
        if not self.skip:
            raise UserError('%s (fix it, or pass --skip-bad-samples to skip such samples)' % message)
        self.problems.append(message)

    def log(self):
        if self.problems:
            LOG.warning('%s: skipped %d bad sample(s), e.g. %s', self.what, len(self.problems),
                        '; '.join(self.problems[:3]))


def decode_image(path):
    """RGB uint8 H x W x 3 of the image file ``path``; UserError naming the file otherwise."""
    data = np.fromfile(path, dtype=np.uint8) if os.path.isfile(path) else None
    if data is None:
        raise UserError('image %s does not exist' % path)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise UserError('%s is not a readable image (empty, truncated or not JPEG/PNG/BMP)' % path)
    if truncated(data):
        raise UserError('%s is truncated (its end-of-image marker is missing): re-download or re-encode it'
                        % path)
    return image[:, :, ::-1]


def truncated(data):
    """Whether encoded JPEG or PNG bytes lack their end (OpenCV decodes a cut JPEG without complaint,
    filling the missing part with grey): a JPEG ends with the EOI marker FF D9 (some writers pad a few
    bytes after it), a PNG with its IEND chunk."""
    head, tail = data[:8].tobytes(), data[-64:].tobytes()
    if head[:2] == b'\xff\xd8':
        return b'\xff\xd9' not in tail
    if head == b'\x89PNG\r\n\x1a\n':
        return b'IEND' not in tail
    return False


def check_images(paths, bad, verify=False):
    """Indices of ``paths`` that exist (and, with ``verify``, decode); the others go to ``bad``."""
    keep = []
    for i, path in enumerate(paths):
        if not os.path.isfile(path):
            bad.report(path, 'image file does not exist')
            continue
        if verify:
            try:
                decode_image(path)
            except UserError as err:
                bad.report(path, str(err))
                continue
        keep.append(i)
    return keep


def parse_signed(values, where, bad, num_classes=None):
    """Label strings in WIDER's encoding (1 positive, -1 negative, 0 unspecified) -> signed int row.

    Returns None (after reporting to ``bad``) for a row of the wrong length or with another value.
    """
    if num_classes is not None and len(values) != num_classes:
        bad.report(where, 'has %d labels, expected %d' % (len(values), num_classes))
        return None
    try:
        row = [float(v) for v in values]
    except ValueError:
        bad.report(where, 'labels must be numbers 1, -1 or 0, got %s' % ' '.join(values))
        return None
    if any(v not in (1.0, -1.0, 0.0) for v in row):
        bad.report(where, 'label values must be 1 (positive), -1 (negative) or 0 (unspecified), got %s'
                   % ' '.join(values))
        return None
    return np.array(row, np.int8)


class ImageFileDataset(AttributeDataset):
    """Samples that are image files with signed labels (1 / -1 / 0)."""

    def _finish(self, paths, rows, names, split, bad):
        """Drop the samples whose image is missing (or, when skipping bad samples, unreadable), log what
        was skipped and set up the dataset."""
        keep = check_images(paths, bad, verify=bad.skip)
        bad.log()
        self.skipped = len(bad.problems)
        ImageFileDataset.__init__(self, [paths[k] for k in keep],
                                  np.array([rows[k] for k in keep], np.int8).reshape(len(keep), len(names)),
                                  names, split)

    def __init__(self, paths, signed, attribute_names, split):
        signed = np.asarray(signed, np.int8).reshape(len(paths), len(attribute_names))
        self.paths = list(paths)
        self.labels = (signed == 1).astype(np.float32)
        self.mask = (signed != 0).astype(np.float32)
        self.attribute_names = tuple(attribute_names)
        self.split = split

    def image(self, index):
        return decode_image(self.paths[index])


def find_file(folder, candidates, what):
    """The first of ``candidates`` that exists in ``folder``; UserError listing them otherwise."""
    for name in candidates:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise UserError('%s: no %s found (looked for %s)' % (folder, what, ', '.join(candidates)))


def require_dir(path, what):
    if not path:
        raise UserError('--data_path is required for %s' % what)
    if os.path.isfile(path):
        raise UserError('--data_path %s is a file; give the folder that holds it (%s): --data_path %s' % (
            path, what, os.path.dirname(path) or '.'))
    if not os.path.isdir(path):
        raise UserError('--data_path %s does not exist (expected the %s folder)' % (path, what))
    return path


class Transform(object):
    """Resize, crop (random for training, centre for evaluation), mirror, normalise, HWC -> CHW.

    Training (the paper's augmentation): resize to ``resize`` x ``resize``, crop a random square whose
    side is drawn from ``crop_range`` (in pixels of the resized image) at a random place, resize it to
    ``input_size``, mirror with probability 1/2. Evaluation: resize, centre crop ``input_size``.
    The random draws depend only on (seed, epoch, sample index), so they are the same whatever the
    number of loader workers and after a resume.
    """

    def __init__(self, input_size, resize, crop_range, train, normalisation='paper', mirror=True, seed=0):
        self.input_size, self.resize = int(input_size), int(resize)
        self.crop_range = (int(crop_range[0]), int(crop_range[1]))
        if not 1 <= self.crop_range[0] <= self.crop_range[1] <= self.resize:
            raise UserError('crop range %s must lie within 1..%d (the resize)' % (crop_range, self.resize))
        if self.input_size > self.resize:
            raise UserError('input size %d is larger than the resize %d' % (input_size, resize))
        self.train, self.mirror, self.seed = train, mirror, int(seed)
        self.mean, self.std = NORMALISATION[normalisation]

    def eval_view(self, image):
        """The evaluation input before normalisation: resize, then the centre ``input_size`` square."""
        img = cv2.resize(image, (self.resize, self.resize), interpolation=cv2.INTER_LINEAR)
        y0 = (self.resize - self.input_size) // 2
        return img[y0:y0 + self.input_size, y0:y0 + self.input_size]

    def __call__(self, image, index, epoch=0):
        if not self.train:
            img = self.eval_view(image)
        else:
            img = cv2.resize(image, (self.resize, self.resize), interpolation=cv2.INTER_LINEAR)
            rng = np.random.RandomState((self.seed * 7919 + epoch * 104729 + index) % (2 ** 32))
            side = rng.randint(self.crop_range[0], self.crop_range[1] + 1)
            y0 = rng.randint(0, self.resize - side + 1)
            x0 = rng.randint(0, self.resize - side + 1)
            img = img[y0:y0 + side, x0:x0 + side]
            if side != self.input_size:
                img = cv2.resize(img, (self.input_size, self.input_size), interpolation=cv2.INTER_LINEAR)
            if self.mirror and rng.rand() < 0.5:
                img = img[:, ::-1]
        img = (img.astype(np.float32) - self.mean) / self.std
        return np.ascontiguousarray(img.transpose(2, 0, 1))


class EpochSampler(gluon.data.Sampler):
    """Sample order for one epoch at a time, deterministic in (seed, epoch).

    Yields ``epoch * N + index`` so that the dataset side (possibly in worker processes) knows the
    epoch for its augmentation draws. Call :meth:`set_epoch` before iterating. With ``num_shards`` > 1
    (several machines) this worker sees only the samples ``index % num_shards == shard``, the same ones
    every epoch (so its prediction history stays complete), cut to equal sizes so that every worker
    runs the same number of batches.
    """

    def __init__(self, length, shuffle, seed=0, shard=0, num_shards=1):
        self.length, self.shuffle, self.seed, self.epoch = length, shuffle, int(seed), 0
        self.indices = np.arange(shard, length, num_shards)[:length // num_shards] if num_shards > 1 \
            else np.arange(length)

    def set_epoch(self, epoch, skip=0):
        """Iterate epoch ``epoch``, leaving out its first ``skip`` samples (a resumed partial epoch)."""
        self.epoch, self.skip = int(epoch), int(skip)

    def order(self):
        if not self.shuffle:
            return self.indices
        rng = np.random.RandomState((self.seed * 15485863 + self.epoch) % (2 ** 32))
        return self.indices[rng.permutation(len(self.indices))]

    def __iter__(self):
        base = self.epoch * self.length
        return iter((base + self.order()[getattr(self, 'skip', 0):]).tolist())

    def __len__(self):
        return len(self.indices)


class _Transformed(gluon.data.Dataset):
    """(data CHW float32, label, mask, index) for an ``epoch * N + index`` key."""

    def __init__(self, dataset, transform):
        self._dataset, self._transform = dataset, transform
        self._labels = np.asarray(dataset.labels, np.float32)
        self._mask = np.asarray(dataset.mask, np.float32)

    def __len__(self):
        return len(self._dataset)

    def __getitem__(self, key):
        epoch, index = divmod(int(key), len(self._dataset))
        try:
            image, index = self._dataset[index]
        except UserError as err:
            raise UserError('%s (or pass --skip-bad-samples, which checks every image before the first epoch '
                            'and skips the bad ones)' % err)
        data = self._transform(image, index, epoch)
        return data, self._labels[index], self._mask[index], np.int64(index)


def make_loader(dataset, transform, batch_size, shuffle, num_workers=0, last_batch='keep', seed=0, shard=0,
                num_shards=1, processes=False):
    """(DataLoader, EpochSampler) over ``dataset``; batches are (data, label, mask, index) NDArrays.

    ``num_workers`` decode and transform in threads (OpenCV and NumPy release the GIL): forking worker
    processes after MXNet's engine threads exist can deadlock (a lock held by another thread at the
    fork is never released in the child, or the parent waits on one). ``processes=True`` forks
    instead, for comparison (benchmark.py).
    """
    sampler = EpochSampler(len(dataset), shuffle, seed, shard, num_shards)
    batches = gluon.data.BatchSampler(sampler, batch_size, last_batch)
    loader = gluon.data.DataLoader(_Transformed(dataset, transform), batch_sampler=batches,
                                   num_workers=num_workers, thread_pool=not processes)
    return loader, sampler
