"""The embedded default dataset: multi-digit canvases built from scikit-learn's handwritten digits.

Each sample is a 48 x 48 RGB canvas: a 3 x 3 grid of 16-pixel cells, some of which hold one of the
1,797 8 x 8 digits of ``sklearn.datasets.load_digits`` (scaled to 12 x 12, jittered, drawn in a
colour) on a noisy dark background. Its 12 binary attributes mimic a pedestrian-attribute problem:
imbalanced (positive ratios from about 1:1 to 1:25, like WIDER), partly about *where* something is on
the canvas (so spatial attention matters), and about 5% of the labels are unspecified.

The attributes are symmetric under a left-right mirror, so the paper's mirror augmentation is valid.
Train / val / test canvases are drawn from disjoint sets of source digits. Everything is determined by
the seed; the arrays are cached in ``<data_path>/digits-canvas-v1-seed<seed>.npz`` (built in a few
seconds on first use).
"""
import os

import numpy as np
import cv2

from common.errors import UserError
from common.files import private_temp
from datasets.base import AttributeDataset

CANVAS, CELL, DIGIT = 48, 16, 12
PALETTE = {'white': (235, 235, 235), 'red': (230, 40, 40), 'green': (40, 200, 60),
           'blue': (60, 90, 240), 'yellow': (230, 210, 40)}
COLOUR_NAMES = list(PALETTE)
COLOUR_P = [0.45, 0.1, 0.15, 0.15, 0.15]
SIZES = {'train': 2400, 'val': 600, 'test': 600}
UNSPECIFIED_RATE = 0.05
VERSION = 1

ATTRIBUTES = (
    'many_digits',      # 4 or more digits on the canvas
    'center_filled',    # the centre cell holds a digit                                 (where)
    'has_zero',
    'has_seven',
    'has_pair',         # some digit value appears twice
    'top_row_empty',    # no digit in the top row                                       (where)
    'has_red',          # a digit is drawn in red
    'even_in_center',   # the centre cell holds an even digit                           (where)
    'one_in_top_row',   # a 1 in the top row                                            (where)
    'all_same_colour',  # every digit has the same colour
    'three_at_bottom',  # a 3 in the bottom row                                         (where)
    'red_zero',         # a zero drawn in red
)
WHERE = ('center_filled', 'top_row_empty', 'even_in_center', 'one_in_top_row', 'three_at_bottom')


def _attributes(cells):
    """Attribute vector of a canvas given ``cells``: {cell index 0..8: (digit, colour name)}."""
    digits = [d for d, _ in cells.values()]
    colours = [c for _, c in cells.values()]
    row = {i: i // 3 for i in range(9)}
    values = {
        'many_digits': len(cells) >= 4,
        'center_filled': 4 in cells,
        'has_zero': 0 in digits,
        'has_seven': 7 in digits,
        'has_pair': len(set(digits)) < len(digits),
        'top_row_empty': not any(row[i] == 0 for i in cells),
        'has_red': 'red' in colours,
        'even_in_center': 4 in cells and cells[4][0] % 2 == 0,
        'one_in_top_row': any(row[i] == 0 and d == 1 for i, (d, _) in cells.items()),
        'all_same_colour': len(set(colours)) == 1,
        'three_at_bottom': any(row[i] == 2 and d == 3 for i, (d, _) in cells.items()),
        'red_zero': any(d == 0 and c == 'red' for d, c in cells.values()),
    }
    return np.array([values[name] for name in ATTRIBUTES], np.float32)


def _draw(rng, cells, pool_images):
    canvas = rng.randint(0, 40, size=(CANVAS, CANVAS, 3)).astype(np.float32)
    for cell, (source, colour) in cells.items():
        digit = cv2.resize(pool_images[source], (DIGIT, DIGIT), interpolation=cv2.INTER_LINEAR) / 16.0
        y = (cell // 3) * CELL + rng.randint(0, CELL - DIGIT + 1)
        x = (cell % 3) * CELL + rng.randint(0, CELL - DIGIT + 1)
        alpha = np.clip(digit, 0, 1)[..., None]
        patch = canvas[y:y + DIGIT, x:x + DIGIT]
        canvas[y:y + DIGIT, x:x + DIGIT] = patch * (1 - alpha) + alpha * np.array(PALETTE[colour], np.float32)
    return np.clip(canvas, 0, 255).astype(np.uint8)


def build(seed=0, sizes=None):
    """Build every split: ``{split: (images N x 48 x 48 x 3 uint8, signed labels N x C in 1/-1/0)}``."""
    from sklearn.datasets import load_digits   # bundled with scikit-learn, no download
    sizes = dict(SIZES, **(sizes or {}))
    digits = load_digits()
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(digits.target))
    cut1, cut2 = int(0.6 * len(order)), int(0.8 * len(order))
    pools = {'train': order[:cut1], 'val': order[cut1:cut2], 'test': order[cut2:]}
    out = {}
    for split in ('train', 'val', 'test'):
        pool = pools[split]
        images, labels = [], []
        for _ in range(sizes[split]):
            count = rng.randint(2, 7)
            where = rng.choice(9, size=count, replace=False)
            chosen = rng.choice(pool, size=count)
            colours = rng.choice(len(COLOUR_NAMES), size=count, p=COLOUR_P)
            cells = {int(c): (int(s), COLOUR_NAMES[k]) for c, s, k in zip(where, chosen, colours)}
            images.append(_draw(rng, cells, digits.images))
            labels.append(_attributes({c: (int(digits.target[s]), col) for c, (s, col) in cells.items()}))
        labels = np.stack(labels)
        signed = np.where(labels > 0, 1, -1).astype(np.int8)
        signed[rng.rand(*signed.shape) < UNSPECIFIED_RATE] = 0
        out[split] = (np.stack(images), signed)
    return out, pools


def cached(data_path, seed=0):
    """Load the cached arrays, building and saving them on first use."""
    os.makedirs(data_path, exist_ok=True)
    path = os.path.join(data_path, 'digits-canvas-v%d-seed%d.npz' % (VERSION, seed))
    if not os.path.isfile(path):
        splits, _ = build(seed)
        arrays = {}
        for split, (images, signed) in splits.items():
            arrays[split + '_images'], arrays[split + '_labels'] = images, signed
        tmp = private_temp(path)                       # ends in .npz: savez adds nothing
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, KeyError) as err:
        raise UserError('the demo dataset cache %s is damaged (%s): delete it and it will be rebuilt'
                        % (path, err))


class DigitsCanvas(AttributeDataset):
    """One split of the embedded dataset (see the module docstring)."""

    attribute_names = ATTRIBUTES

    def __init__(self, data_path, split='train', seed=0, limit=None):
        if split not in SIZES:
            raise UserError('the demo dataset has splits train, val and test, not %r' % split)
        arrays = cached(data_path, seed)
        self.images = arrays[split + '_images']
        signed = arrays[split + '_labels'].astype(np.float32)
        if limit:
            self.images, signed = self.images[:limit], signed[:limit]
        self.labels = (signed > 0).astype(np.float32)
        self.mask = (signed != 0).astype(np.float32)
        self.split = split

    def image(self, index):
        return self.images[index]


# What train.py uses unless told otherwise: the demo preset (its schedule: presets.SCHEDULES), a small
# backbone at the canvas resolution, a gentle crop (the attributes depend on where digits are), random
# initial weights, the images in memory.
DEFAULTS = dict(backbone='resnet18_v1', input_size=48, resize=52, crop_range=(44, 52), num_workers=0,
                monitor='mAP', pretrained=False, preset='demo')
