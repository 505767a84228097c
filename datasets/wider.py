"""WIDER-Attribute from its official annotation JSON and image folders.

Layout (as distributed)::

    <data_path>/Annotations/wider_attribute_trainval.json
    <data_path>/Annotations/wider_attribute_test.json
    <data_path>/Image/train/...   Image/val/...   Image/test/...

Each JSON has ``images``: [{``file_name`` (relative to ``Image/``), ``scene_id``, ``targets``:
[{``attribute``: 14 ints in 1 / -1 / 0, ``bbox``: [x, y, w, h]}]}] and ``attribute_id_map``. One sample
per target: the person box, clipped to the image, cropped and resized to 256 x 256 (as the authors'
preprocessing did), cached as JPEG files on first use so later epochs never decode whole scenes again.
The cache is a per-user folder (``--cache-dir`` to choose another); each crop's file name is a hash of
what determines it (scene, box, crop settings), so an edited annotation file gets new crops.

Splits: ``train`` and ``val`` (from the trainval JSON by the image folder), ``trainval``, ``test``.
The paper trained on ``train`` only.
"""
import hashlib
import json
import os

import numpy as np
import cv2
from multiprocessing.pool import ThreadPool

from common.errors import UserError
from common.files import private_temp
from datasets.base import BadSamples, ImageFileDataset, decode_image, require_dir

# The WIDER-Attribute attributes in their official order (the JSON's attribute_id_map; "Tshiirt" sic).
WIDER_ATTRIBUTES = ('Male', 'longHair', 'sunglass', 'Hat', 'Tshiirt', 'longSleeve', 'formal', 'shorts',
                    'jeans', 'longPants', 'skirt', 'faceMask', 'logo', 'stripe')
CROP = 256
SPLITS = {'train': 'trainval', 'val': 'trainval', 'trainval': 'trainval', 'test': 'test'}


def _annotation(data_path, which):
    path = os.path.join(data_path, 'Annotations', 'wider_attribute_%s.json' % which)
    if not os.path.isfile(path):
        raise UserError('WIDER-Attribute: %s is missing (expected Annotations/wider_attribute_{trainval,test}'
                        '.json under --data_path)' % path)
    try:
        with open(path) as f:
            ann = json.load(f)
    except ValueError as err:
        raise UserError('%s is not valid JSON (%s)' % (path, err))
    if not isinstance(ann, dict) or 'images' not in ann:
        raise UserError('%s has no "images" list; is it the WIDER-Attribute annotation?' % path)
    return path, ann


def attribute_names(ann):
    """Names from ``attribute_id_map`` in id order (the official order)."""
    id_map = ann.get('attribute_id_map')
    if not id_map:
        return WIDER_ATTRIBUTES
    return tuple(id_map[k] for k in sorted(id_map, key=int))


def clip_box(bbox, width, height):
    """[x, y, w, h] -> integer (x0, y0, x1, y1) inside the image; None when nothing is left."""
    x, y, w, h = [float(v) for v in bbox]
    x0, y0 = max(0, int(np.floor(x))), max(0, int(np.floor(y)))
    x1, y1 = min(width, int(np.ceil(x + w))), min(height, int(np.ceil(y + h)))
    if w <= 0 or h <= 0 or x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def _crop_job(job):
    scene, boxes, outputs = job
    try:
        image = decode_image(scene)
    except UserError as err:
        return [str(err)] * len(boxes)
    h, w = image.shape[:2]
    results = []
    for bbox, out in zip(boxes, outputs):
        box = clip_box(bbox, w, h)
        if box is None:
            results.append('box %s has no area inside the %dx%d image' % (list(bbox), w, h))
            continue
        x0, y0, x1, y1 = box
        crop = cv2.resize(np.ascontiguousarray(image[y0:y1, x0:x1]), (CROP, CROP),
                          interpolation=cv2.INTER_AREA)
        tmp = private_temp(out)
        cv2.imwrite(tmp, crop[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
        os.replace(tmp, out)
        results.append(None)
    return results


def default_cache_dir(data_path):
    """A per-user folder for the crops of this dataset folder: ``$XDG_CACHE_HOME/vaa-attributes/`` (or
    ``~/.cache/...``) ``wider-<hash of the path>-crop256``; nothing is written into the data folder."""
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    key = hashlib.sha1(os.path.abspath(data_path).encode()).hexdigest()[:10]
    return os.path.join(base, 'vaa-attributes', 'wider-%s-crop%d' % (key, CROP))


def crop_name(scene, file_name, bbox):
    """The cache file name of a person crop: a hash of everything that determines it (the scene's
    name, size and modification time, the box, the crop size and JPEG settings), so that a reordered,
    cut or corrected annotation file never pairs an old crop with new labels."""
    stat = os.stat(scene)
    key = json.dumps([file_name, [float(v) for v in bbox], stat.st_size, stat.st_mtime_ns, CROP, 'area', 95])
    return hashlib.sha1(key.encode()).hexdigest()[:20] + '.jpg'


class WiderAttribute(ImageFileDataset):
    """One split of WIDER-Attribute; samples are the cached 256x256 person crops."""

    def __init__(self, data_path, split='train', skip_bad=False, cache_dir=None, limit=None, workers=None):
        if split not in SPLITS:
            raise UserError('WIDER-Attribute has splits %s, not %r' % (', '.join(SPLITS), split))
        require_dir(data_path, 'WIDER-Attribute')
        ann_path, ann = _annotation(data_path, SPLITS[split])
        names = attribute_names(ann)
        bad = BadSamples(skip_bad, 'WIDER-Attribute %s' % split)
        cache_dir = cache_dir or default_cache_dir(data_path)
        os.makedirs(os.path.join(cache_dir, SPLITS[split]), exist_ok=True)
        samples, jobs = [], {}
        for i, entry in enumerate(ann['images']):
            file_name = entry.get('file_name', '')
            if split in ('train', 'val') and not file_name.replace('\\', '/').startswith(split + '/'):
                continue
            scene = os.path.join(data_path, 'Image', file_name)
            for t, target in enumerate(entry.get('targets', [])):
                where = '%s: images[%d] (%s) targets[%d]' % (ann_path, i, file_name, t)
                signed = target.get('attribute', [])
                if len(signed) != len(names) or any(v not in (1, -1, 0) for v in signed):
                    bad.report(where,
                               'attribute must be %d values in 1 / -1 / 0, got %s' % (len(names), signed))
                    continue
                bbox = target.get('bbox', [])
                if len(bbox) != 4 or float(bbox[2]) <= 0 or float(bbox[3]) <= 0:
                    bad.report(where, 'bbox %s has zero area' % (bbox,))
                    continue
                if not os.path.isfile(scene):
                    bad.report(where, 'image file %s does not exist' % scene)
                    continue
                crop = os.path.join(cache_dir, SPLITS[split], crop_name(scene, file_name, bbox))
                samples.append((crop, signed, where))
                if not os.path.isfile(crop):
                    jobs.setdefault(scene, ([], [], []))
                    jobs[scene][0].append(bbox)
                    jobs[scene][1].append(crop)
                    jobs[scene][2].append(where)
            if limit and len(samples) >= limit:
                break
        failed = self._make_crops(jobs, workers)
        keep = []
        for crop, signed, where in samples:
            if crop in failed:
                bad.report(where, failed[crop])
            else:
                keep.append((crop, signed))
        bad.log()
        self.skipped = len(bad.problems)
        super(WiderAttribute, self).__init__([c for c, _ in keep], [s for _, s in keep], names, split)

    @staticmethod
    def _make_crops(jobs, workers):
        """Crop every pending box (in parallel); returns {crop path: problem} for the failures."""
        if not jobs:
            return {}
        from tqdm import tqdm
        items = [(scene, boxes, outs) for scene, (boxes, outs, _) in jobs.items()]
        failed = {}
        workers = workers or min(8, os.cpu_count() or 1)
        # threads, not forked processes (OpenCV releases the GIL; forking after MXNet's threads can deadlock)
        pool = ThreadPool(workers) if workers > 1 and len(items) > 50 else None
        try:
            results = pool.imap(_crop_job, items, chunksize=16) if pool else map(_crop_job, items)
            for (scene, boxes, outs), problems in tqdm(zip(items, results), total=len(items),
                                                       desc='cropping WIDER person boxes (once)',
                                                       disable=len(items) < 50):
                for out, problem in zip(outs, problems):
                    if problem:
                        failed[out] = problem
        finally:
            if pool:
                pool.close()
                pool.join()
        return failed


DEFAULTS = dict(backbone='resnet101_v1', input_size=224, resize=256, crop_range=(128, 224), monitor='mAP',
                num_workers=4)
