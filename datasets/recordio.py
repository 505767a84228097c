"""Packed RecordIO datasets: prepare them from any dataset, and read them for training.

Prepare (writes ``<out>/<split>.lst``, packs ``<split>.rec`` + ``<split>.idx`` with the ``im2rec.py``
that ships inside the mxnet wheel, as the authors' README did by hand, and writes ``attributes.txt``)::

    python -m datasets.recordio --dataset wider --data_path /data/WIDER --out /data/WIDER/records

Read with ``train.py --dataset rec --data_path /data/WIDER/records``. Labels are stored in the
records' headers in WIDER's encoding (1 / -1 / 0); the ``.lst`` beside each ``.rec`` is used to get all
labels without reading the images (the record headers are scanned when it is missing).
"""
import argparse
import os
import subprocess
import sys
import threading

import numpy as np

from datasets.base import AttributeDataset, BadSamples, parse_signed, require_dir
from datasets.lst import attribute_names, list_file, read_lst
from common.errors import UserError, run_main


def im2rec_script():
    import mxnet
    path = os.path.join(os.path.dirname(mxnet.__file__), 'tools', 'im2rec.py')
    if not os.path.isfile(path):
        raise UserError('mxnet/tools/im2rec.py is missing from the installed mxnet (%s)' % mxnet.__file__)
    return path


class RecordDataset(AttributeDataset):
    """``<data_path>/<split>.rec`` + ``.idx`` (+ ``.lst``, ``attributes.txt``)."""

    def __init__(self, data_path, split='train', skip_bad=False, limit=None):
        require_dir(data_path, 'the RecordIO dataset')
        self.rec = list_file(data_path, split, '.rec')
        self.idx = os.path.splitext(self.rec)[0] + '.idx'
        if not os.path.isfile(self.idx):
            raise UserError('%s has no index file %s; pack it with im2rec.py (which writes both)'
                            % (self.rec, self.idx))
        self._record, self._pid = None, None
        keys = self._read_keys()
        lst = os.path.splitext(self.rec)[0] + '.lst'
        bad = BadSamples(skip_bad, 'RecordIO %s' % split)
        if os.path.isfile(lst):
            rows, count = read_lst(lst, bad)
            by_index = {int(float(r[0])): r[1] for r in rows}
            missing = [k for k in keys if k not in by_index]
            if missing:
                raise UserError('%s lacks entries for records %s of %s' % (lst, missing[:5], self.rec))
            signed = [by_index[k] for k in keys]
        else:
            signed, count = [], None
            for k in keys:
                header = self._header(k)
                row = np.asarray(header.label, np.float32).ravel()
                count = count or len(row)
                checked = parse_signed(['%g' % v for v in row], '%s record %d' % (self.rec, k), bad, count)
                signed.append(checked if checked is not None else None)
            keys = [k for k, s in zip(keys, signed) if s is not None]
            signed = [s for s in signed if s is not None]
        if limit:
            keys, signed = keys[:limit], signed[:limit]
        bad.log()
        self.skipped = len(bad.problems)
        self.keys = keys
        signed = np.array(signed, np.int8).reshape(len(keys), count or 0)
        self.labels = (signed == 1).astype(np.float32)
        self.mask = (signed != 0).astype(np.float32)
        self.attribute_names = tuple(attribute_names(data_path, signed.shape[1]))
        self.split = split

    def _read_keys(self):
        keys = []
        with open(self.idx) as f:
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        keys.append(int(line.split('\t')[0]))
                    except ValueError:
                        raise UserError('%s line %d is not "<key>\\t<offset>"' % (self.idx, line_no))
        return keys

    def _open(self):
        """The record file, opened once per process and thread (a handle's position is not shared)."""
        import mxnet as mx
        if self._record is None or self._pid != os.getpid():
            self._record, self._pid = threading.local(), os.getpid()
        if not hasattr(self._record, 'handle'):
            self._record.handle = mx.recordio.MXIndexedRecordIO(self.idx, self.rec, 'r')
        return self._record.handle

    def _header(self, key):
        import mxnet as mx
        header, _ = mx.recordio.unpack(self._open().read_idx(key))
        return header

    def image(self, index):
        import mxnet as mx
        import cv2
        _, payload = mx.recordio.unpack(self._open().read_idx(self.keys[index]))
        image = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise UserError('%s: record %d does not hold a readable image' % (self.rec, self.keys[index]))
        return image[:, :, ::-1]

    def __getstate__(self):                     # the open handle does not cross process boundaries
        state = dict(self.__dict__)
        state['_record'], state['_pid'] = None, None
        return state


def prepare(dataset, data_path, out, splits=('train', 'val', 'test'), quality=95, threads=None, **kwargs):
    """Write ``<out>/<split>.lst`` for ``dataset`` and pack it into ``.rec``/``.idx`` with im2rec."""
    import datasets
    os.makedirs(out, exist_ok=True)
    names = None
    for split in splits:
        data = datasets.get_split(dataset, data_path, split, **kwargs)
        if not hasattr(data, 'paths'):
            raise UserError('the %s dataset has no image files to pack' % dataset)
        names = data.attribute_names
        signed = np.where(data.mask > 0, np.where(data.labels > 0, 1, -1), 0)
        lst = os.path.join(out, '%s.lst' % split)
        with open(lst, 'w') as f:
            for i, (path, row) in enumerate(zip(data.paths, signed)):
                f.write('%d\t%s\t%s\n' % (i, '\t'.join(str(int(v)) for v in row), os.path.abspath(path)))
        cmd = [sys.executable, im2rec_script(), os.path.join(out, split), '/', '--pack-label',
               '--quality', str(quality), '--num-thread', str(threads or min(4, os.cpu_count() or 1))]
        result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                universal_newlines=True)
        if result.returncode != 0 or not os.path.isfile(os.path.join(out, split + '.rec')):
            raise UserError('im2rec.py failed for %s:\n%s' % (lst, result.stdout[-2000:]))
        print('%s: packed %d images into %s.rec' % (split, len(data), os.path.join(out, split)))
    with open(os.path.join(out, 'attributes.txt'), 'w') as f:
        f.write('\n'.join(names) + '\n')
    return out


def main(argv=None):
    import datasets
    p = argparse.ArgumentParser(description='Pack a dataset into RecordIO files for fast training.')
    p.add_argument('--dataset', required=True,
                   choices=[n for n in datasets.names() if n not in ('rec', 'demo')],
                   help='source dataset')
    p.add_argument('--data_path', required=True, help='source dataset root')
    p.add_argument('--out', required=True, help='folder for the .lst/.rec/.idx files')
    p.add_argument('--splits', nargs='+', default=['train', 'val', 'test'], help='splits to pack')
    p.add_argument('--quality', type=int, default=95, help='JPEG quality of the packed images')
    p.add_argument('--threads', type=int, help='im2rec encoding threads')
    p.add_argument('--skip-bad-samples', action='store_true', help='skip unreadable or malformed samples')
    p.add_argument('--debug', action='store_true', help='show tracebacks')
    args = p.parse_args(argv)
    return prepare(args.dataset, args.data_path, args.out, args.splits, args.quality, args.threads,
                   skip_bad=args.skip_bad_samples)


DEFAULTS = dict(backbone='resnet101_v1', input_size=224, resize=256, crop_range=(128, 224), monitor='mAP',
                num_workers=4)


if __name__ == '__main__':
    run_main(main)

