"""Small datasets written in each real layout, for the dataset tests; running the scripts as a user does."""
import json
import os
import subprocess
import sys

import numpy as np
import cv2
import scipy.io

from datasets.wider import WIDER_ATTRIBUTES

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 220, 30), (200, 40, 220), (30, 210, 210)]


def _write(path, rgb):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ok = cv2.imwrite(path, np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 98])
    assert ok, path


def solid(colour, h=40, w=30):
    return np.tile(np.array(colour, np.uint8), (h, w, 1))


def wider(root, seed=0):
    """WIDER layout: 4 train, 2 val, 3 test scenes of 120x100 with two coloured boxes each.

    Returns {json name: [(file_name, [(bbox, colour, signed labels)])]}.
    """
    rng = np.random.RandomState(seed)
    made = {}
    scenes = {'trainval': [('train/0--Parade/p%d.jpg' % i) for i in range(4)] +
                          [('val/1--Handshaking/h%d.jpg' % i) for i in range(2)],
              'test': [('test/2--Demonstration/d%d.jpg' % i) for i in range(3)]}
    for which, files in scenes.items():
        images, made[which] = [], []
        for n, file_name in enumerate(files):
            img = np.full((100, 120, 3), 128, np.uint8)
            boxes = [[5 + n, 10, 30, 50], [95, 30, 60, 40]]     # the second runs off the right edge
            targets, info = [], []
            for b, bbox in enumerate(boxes):
                colour = COLOURS[(n + 2 * b) % len(COLOURS)]
                x, y, w, h = bbox
                img[y:y + h, x:min(x + w, 120)] = colour
                signed = rng.choice([1, -1, 0], size=14, p=[.3, .6, .1]).tolist()
                targets.append({'attribute': signed, 'bbox': bbox})
                info.append((bbox, colour, signed))
            _write(os.path.join(root, 'Image', file_name), img)
            images.append({'file_name': file_name, 'scene_id': n % 3, 'targets': targets})
            made[which].append((file_name, info))
        ann = {'images': images, 'attribute_id_map': {str(i): a for i, a in enumerate(WIDER_ATTRIBUTES)},
               'scene_id_map': {'0': 'Parade', '1': 'Handshaking', '2': 'Demonstration'}}
        os.makedirs(os.path.join(root, 'Annotations'), exist_ok=True)
        with open(os.path.join(root, 'Annotations', 'wider_attribute_%s.json' % which), 'w') as f:
            json.dump(ann, f)
    return made


def peta(root, n=20, seed=0, partitions=2):
    """PETA.mat (DeepMAR structure, 105 attributes) + images/00001.png ...; ``partitions`` partitions (the
    first in file order, the others shuffled), each 10 train, 4 val, the rest test."""
    rng = np.random.RandomState(seed)
    labels = np.zeros((n, 4 + 105))
    labels[:, 0] = np.arange(1, n + 1)
    labels[:, 4:] = rng.rand(n, 105) < 0.3
    names = np.empty((105, 1), object)
    names[:, 0] = ['peta_attr%d' % i for i in range(105)]
    parts = np.empty((partitions, 1), object)
    orders = [np.arange(n)] + [rng.permutation(n) for _ in range(partitions - 1)]
    for p, order in enumerate(orders):
        parts[p, 0] = {'train': order[:10, None] + 1, 'val': order[10:14, None] + 1,
                       'test': order[14:, None] + 1}
    scipy.io.savemat(os.path.join(root, 'PETA.mat'), {'peta': {
        'peta_data': labels, 'attribute': names, 'selected_attribute': np.arange(1, 36)[:, None],
        'partion_attribute': parts}})
    for i in range(n):
        path = os.path.join(root, 'images', '%05d.png' % (i + 1))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        cv2.imwrite(path, solid(COLOURS[i % len(COLOURS)])[:, :, ::-1])
    return labels[:, 4:], orders


def pa100k(root, sizes=(8, 4, 4), seed=0):
    rng = np.random.RandomState(seed)
    names = np.empty((26, 1), object)
    names[:, 0] = ['pa_attr%d' % i for i in range(26)]
    mat, k = {'attributes': names}, 0
    for split, size in zip(('train', 'val', 'test'), sizes):
        files = np.empty((size, 1), object)
        files[:, 0] = ['%06d.jpg' % (k + i + 1) for i in range(size)]
        mat['%s_images_name' % split] = files
        mat['%s_label' % split] = (rng.rand(size, 26) < 0.3).astype(np.uint8)
        for i in range(size):
            _write(os.path.join(root, 'data', '%06d.jpg' % (k + i + 1)),
                   solid(COLOURS[(k + i) % len(COLOURS)]))
        k += size
    scipy.io.savemat(os.path.join(root, 'annotation.mat'), mat)
    return mat


def csv_dataset(root, sizes=(12, 6, 6), attributes=('hat', 'bag', 'coat'), seed=0):
    """train/val/test.csv with 1 / 0 / empty / ? values and coloured images in img/."""
    rng = np.random.RandomState(seed)
    out = {}
    for split, size in zip(('train', 'val', 'test'), sizes):
        rows = []
        for i in range(size):
            rel = 'img/%s_%02d.jpg' % (split, i)
            _write(os.path.join(root, rel), solid(COLOURS[i % len(COLOURS)]))
            values = rng.choice(['1', '0', '', '?'], size=len(attributes), p=[.35, .5, .1, .05]).tolist()
            values[0] = '1' if i % 3 == 0 else '0'           # attribute 0: exactly a third positive
            rows.append([rel] + values)
        with open(os.path.join(root, '%s.csv' % split), 'w') as f:
            f.write(','.join(('path',) + tuple(attributes)) + '\n')
            for row in rows:
                f.write(','.join(row) + '\n')
        out[split] = rows
    return out


def lst_dataset(root, sizes=(12, 6, 6), classes=14, seed=0):
    """The authors' .lst files (wider_records/training_list.lst ...), labels 1 / -1 / 0."""
    rng = np.random.RandomState(seed)
    names = {'train': 'training_list.lst', 'val': 'valid_list.lst', 'test': 'testing_list.lst'}
    out = {}
    os.makedirs(os.path.join(root, 'wider_records'), exist_ok=True)
    for split, size in zip(('train', 'val', 'test'), sizes):
        rows = []
        with open(os.path.join(root, 'wider_records', names[split]), 'w') as f:
            for i in range(size):
                rel = 'Image_cropped/%s/%03d.jpg' % (split, i)
                _write(os.path.join(root, rel), solid(COLOURS[i % len(COLOURS)]))
                signed = rng.choice([1, -1, 0], size=classes, p=[.3, .6, .1])
                signed[0] = 1 if i % 2 == 0 else -1
                f.write('\t'.join([str(i)] + ['%d' % v for v in signed] + [rel]) + '\n')
                rows.append((rel, signed))
        out[split] = rows
    return out


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tests' child processes have no wall-clock limit of their own: on a machine busy with other jobs
# (load 20 on 2 cores) a training run of half a minute took longer than the 600 s such limits allowed, and
# the test failed for the machine's sake. A deadlocked child is caught by the hang watch of
# tests/conftest.py (no CPU progress of the test's whole process tree for 300 s), a runaway one by
# pytest-timeout's limit per test (pytest.ini).
SUBPROCESS_TIMEOUT = None
WATCHDOG_SECONDS = 1700     # a child a test reads from is killed before pytest-timeout ends the test


def cli(args, env=None):
    """Run ``python <args>`` in the project folder as a user would."""
    return subprocess.run([sys.executable] + args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=SUBPROCESS_TIMEOUT,
                          env=dict(os.environ, **(env or {})))


def one_line_error(args, expected, env=None):
    """The script stops with status 2 and one ``error:`` line containing ``expected``, no traceback."""
    proc = cli(args, env)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    errors = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
    assert len(errors) == 1 and expected in errors[0], proc.stderr
    assert 'Traceback' not in proc.stderr
    return errors[0]
