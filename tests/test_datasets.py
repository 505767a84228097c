"""Real dataset layouts (fixtures written by the tests): counts, crops, labels, splits, class weights,
bad data, RecordIO, and a one-epoch train.py + eval.py run on each."""
import json
import os

import numpy as np
import pytest

import datasets
import eval as eval_script
import train
from datasets import wider
from datasets.base import Transform, make_loader
from datasets.recordio import prepare
from common.errors import UserError
from losses import class_prior_weights
from tests import fixtures


def _mean_colour(image):
    h, w = image.shape[:2]
    return image[h // 4:3 * h // 4, w // 4:3 * w // 4].reshape(-1, 3).mean(0)


# ---------------------------------------------------------------------------------------------- WIDER

@pytest.fixture(scope='module')
def wider_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('WIDER'))
    return root, fixtures.wider(root)


def test_wider_counts_splits_crops_and_labels(wider_root):
    root, made = wider_root
    train_ds = datasets.get_split('wider', root, 'train')
    val_ds = datasets.get_split('wider', root, 'val')
    trainval = datasets.get_split('wider', root, 'trainval')
    test_ds = datasets.get_split('wider', root, 'test')
    assert (len(train_ds), len(val_ds), len(trainval), len(test_ds)) == (8, 4, 12, 6)
    assert train_ds.attribute_names[4] == 'Tshiirt' and len(train_ds.attribute_names) == 14
    expected = [t for _, info in made['trainval'] for t in info]
    for i, (_, colour, signed) in enumerate(expected):
        img, index = trainval[i]
        assert img.shape == (256, 256, 3) and index == i
        np.testing.assert_allclose(_mean_colour(img), colour, atol=12)      # the box comes back as its colour
        signed = np.array(signed)
        np.testing.assert_array_equal(trainval.labels[i], signed == 1)
        np.testing.assert_array_equal(trainval.mask[i], signed != 0)
    # train = scenes in Image/train, val = Image/val, both from the trainval JSON
    np.testing.assert_array_equal(trainval.labels[:8], train_ds.labels)
    np.testing.assert_array_equal(trainval.labels[8:], val_ds.labels)
    cache = wider.default_cache_dir(root)                                 # cached crops, per user
    assert len(os.listdir(os.path.join(cache, 'trainval'))) == 12
    assert len(os.listdir(os.path.join(cache, 'test'))) == 6
    # nothing written into the data folder
    assert sorted(os.listdir(root)) == ['Annotations', 'Image']


def test_wider_crop_cache_follows_edits_of_the_annotations(tmp_path):
    """Reordered scenes and a corrected box: every sample still shows its own box (crops are keyed by
    scene, box and crop settings, not by position in the JSON)."""
    root = str(tmp_path / 'W')
    made = fixtures.wider(root)
    first = datasets.get_split('wider', root, 'trainval', cache_dir=str(tmp_path / 'crops'))
    assert len(first) == 12
    path = os.path.join(root, 'Annotations', 'wider_attribute_trainval.json')
    ann = json.load(open(path))
    ann['images'].reverse()
    ann['images'][0]['targets'] = ann['images'][0]['targets'][::-1]
    ann['images'][0]['targets'][0]['bbox'] = [95, 30, 20, 40]       # a box moved inside the same colour patch
    json.dump(ann, open(path, 'w'))
    again = datasets.get_split('wider', root, 'trainval', cache_dir=str(tmp_path / 'crops'))
    colours = [colour for _, info in reversed(made['trainval']) for _, colour, _ in info]
    colours[0], colours[1] = colours[1], colours[0]
    for i, colour in enumerate(colours):
        np.testing.assert_allclose(_mean_colour(again[i][0]), colour, atol=12)
        signed = np.array(ann['images'][i // 2]['targets'][i % 2]['attribute'])
        np.testing.assert_array_equal(again.labels[i], signed == 1)


def test_wider_class_weights_from_the_training_split(wider_root):
    root, made = wider_root
    ds = datasets.get_split('wider', root, 'train')
    signed = np.array([s for f, info in made['trainval'] if f.startswith('train/') for _, _, s in info])
    a = (signed == 1).sum(0) / np.maximum((signed != 0).sum(0), 1)       # hand computation
    r = np.where(a <= 0.5, a / (1 - a), 1.0)
    pos, neg = class_prior_weights(ds.labels, ds.mask)
    np.testing.assert_allclose(pos, np.exp(1 - r), rtol=1e-6)
    np.testing.assert_allclose(neg, np.exp(r), rtol=1e-6)


def _write_wider_json(root, which, images):
    with open(os.path.join(root, 'Annotations', 'wider_attribute_%s.json' % which), 'w') as f:
        json.dump({'images': images}, f)


def _bad_wider(tmp_path, mutate):
    root = str(tmp_path / 'W')
    fixtures.wider(root)
    path = os.path.join(root, 'Annotations', 'wider_attribute_trainval.json')
    ann = json.load(open(path))
    mutate(root, ann)
    json.dump(ann, open(path, 'w'))
    return root


def test_wider_zero_area_box(tmp_path):
    def mutate(root, ann):
        ann['images'][1]['targets'][0]['bbox'] = [10, 10, 0, 30]
    root = _bad_wider(tmp_path, mutate)
    with pytest.raises(UserError, match=r'images\[1\].*targets\[0\].*zero area'):
        datasets.get_split('wider', root, 'train')
    ds = datasets.get_split('wider', root, 'train', skip_bad=True)
    assert len(ds) == 7 and ds.skipped == 1


def test_wider_box_outside_the_image(tmp_path):
    def mutate(root, ann):
        ann['images'][0]['targets'][1]['bbox'] = [500, 10, 20, 20]     # entirely right of the 120-px scene
    root = _bad_wider(tmp_path, mutate)
    with pytest.raises(UserError, match=r'p0.jpg.*no area inside the 120x100 image'):
        datasets.get_split('wider', root, 'train')


def test_wider_missing_and_unreadable_scene(tmp_path):
    root = _bad_wider(tmp_path, lambda root, ann: None)
    os.remove(os.path.join(root, 'Image', 'train/0--Parade/p2.jpg'))
    with open(os.path.join(root, 'Image', 'train/0--Parade/p3.jpg'), 'wb') as f:
        f.write(b'\xff\xd8 not really a jpeg')
    with pytest.raises(UserError, match=r'p2.jpg does not exist'):
        datasets.get_split('wider', root, 'train')
    os.remove(os.path.join(root, 'Annotations', 'wider_attribute_trainval.json'))
    fixtures_root = str(tmp_path / 'W2')
    fixtures.wider(fixtures_root)
    with open(os.path.join(fixtures_root, 'Image', 'train/0--Parade/p3.jpg'), 'wb') as f:
        f.write(b'\xff\xd8 not really a jpeg')
    with pytest.raises(UserError, match=r'p3.jpg is not a readable image'):
        datasets.get_split('wider', fixtures_root, 'train')
    ds = datasets.get_split('wider', fixtures_root, 'train', skip_bad=True)
    assert len(ds) == 6 and ds.skipped == 2


def test_wider_bad_attribute_vector(tmp_path):
    def mutate(root, ann):
        ann['images'][2]['targets'][1]['attribute'] = [1] * 13
        ann['images'][3]['targets'][0]['attribute'] = [5] + [1] * 13
    root = _bad_wider(tmp_path, mutate)
    with pytest.raises(UserError, match=r'images\[2\].*targets\[1\].*14 values'):
        datasets.get_split('wider', root, 'train')
    assert datasets.get_split('wider', root, 'train', skip_bad=True).skipped == 2


def test_missing_data_path_and_annotation(tmp_path):
    with pytest.raises(UserError, match='does not exist'):
        datasets.get_split('wider', str(tmp_path / 'nope'), 'train')
    with pytest.raises(UserError, match='wider_attribute_trainval.json'):
        datasets.get_split('wider', str(tmp_path), 'train')
    with pytest.raises(UserError, match='PETA.mat'):
        datasets.get_split('peta', str(tmp_path), 'train')
    with pytest.raises(UserError, match='annotation.mat'):
        datasets.get_split('pa100k', str(tmp_path), 'train')
    with pytest.raises(UserError, match='train.csv'):
        datasets.get_split('csv', str(tmp_path), 'train')
    with pytest.raises(UserError, match='list file for the train split'):
        datasets.get_split('lst', str(tmp_path), 'train')


# ---------------------------------------------------------------------------------------------- PETA

def test_peta_mat_partitions_attributes_and_images(tmp_path):
    root = str(tmp_path)
    labels, orders = fixtures.peta(root)
    ds = datasets.get_split('peta', root, 'train')
    assert len(ds) == 10 and len(ds.attribute_names) == 35 and ds.attribute_names[0] == 'peta_attr0'
    np.testing.assert_array_equal(ds.labels, labels[orders[0][:10], :35])
    assert ds.mask.all()
    assert len(datasets.get_split('peta', root, 'val')) == 4 and len(datasets.get_split(
        'peta', root, 'test')) == 6
    assert len(datasets.get_split('peta', root, 'trainval')) == 14
    full = datasets.get_split('peta', root, 'test', partition=1, all_attributes=True)
    assert len(full.attribute_names) == 105
    np.testing.assert_array_equal(full.labels, labels[orders[1][14:]])
    for k, i in enumerate(orders[1][14:]):
        np.testing.assert_allclose(_mean_colour(full[k][0]), fixtures.COLOURS[i % 6], atol=1)
    with pytest.raises(UserError, match='partitions 0..1'):
        datasets.get_split('peta', root, 'train', partition=4)


def test_peta_label_outside_encoding(tmp_path):
    import scipy.io
    root = str(tmp_path)
    fixtures.peta(root)
    mat = scipy.io.loadmat(os.path.join(root, 'PETA.mat'))
    mat['peta'][0][0][0][0, 4] = 2
    scipy.io.savemat(os.path.join(root, 'PETA.mat'), {'peta': mat['peta']})
    with pytest.raises(UserError, match='image index 1: labels must be 0 or 1'):
        datasets.get_split('peta', root, 'train')


# ---------------------------------------------------------------------------------------------- PA-100K

def test_pa100k_annotation_mat(tmp_path):
    root = str(tmp_path)
    mat = fixtures.pa100k(root)
    ds = datasets.get_split('pa100k', root, 'train')
    assert len(ds) == 8 and len(ds.attribute_names) == 26
    np.testing.assert_array_equal(ds.labels, mat['train_label'])
    assert len(datasets.get_split('pa100k', root, 'trainval')) == 12
    test_ds = datasets.get_split('pa100k', root, 'test')
    np.testing.assert_allclose(_mean_colour(test_ds[0][0]), fixtures.COLOURS[12 % 6], atol=12)
    pos, _ = class_prior_weights(ds.labels, ds.mask)
    a = mat['train_label'].mean(0)
    np.testing.assert_allclose(pos, np.exp(1 - np.where(a <= .5, a / (1 - a), 1)), rtol=1e-6)


# ---------------------------------------------------------------------------------------------- CSV

def test_csv_encoding_splits_and_class_weights(tmp_path):
    root = str(tmp_path)
    rows = fixtures.csv_dataset(root)
    ds = datasets.get_split('csv', root, 'train')
    assert len(ds) == 12 and ds.attribute_names == ('hat', 'bag', 'coat')
    for i, row in enumerate(rows['train']):
        for c, v in enumerate(row[1:]):
            assert (ds.labels[i, c], ds.mask[i, c]) == {'1': (1, 1), '0': (0, 1), '': (0, 0), '?': (0, 0)}[v]
    pos, neg = class_prior_weights(ds.labels, ds.mask)
    # attribute 0: 4 positives of 12 -> a = 1/3, r = 1/2
    assert pos[0] == pytest.approx(np.exp(0.5)) and neg[0] == pytest.approx(np.exp(0.5))
    np.testing.assert_allclose(_mean_colour(ds[5][0]), fixtures.COLOURS[5], atol=12)


def test_csv_wrong_length_bad_value_missing_and_unreadable(tmp_path):
    root = str(tmp_path)
    fixtures.csv_dataset(root)
    path = os.path.join(root, 'train.csv')
    lines = open(path).read().splitlines()
    lines[3] = lines[3] + ',1'                                   # line 4: one label too many
    lines[5] = ','.join(lines[5].split(',')[:-1] + ['2'])        # line 6: value outside the encoding
    open(path, 'w').write('\n'.join(lines) + '\n')
    with pytest.raises(UserError, match=r'train.csv line 4: has 4 labels, expected 3'):
        datasets.get_split('csv', root, 'train')
    lines[3] = ','.join(lines[3].split(',')[:-1])
    open(path, 'w').write('\n'.join(lines) + '\n')
    with pytest.raises(UserError, match=r"train.csv line 6: label values .* got '2'"):
        datasets.get_split('csv', root, 'train')
    ds = datasets.get_split('csv', root, 'train', skip_bad=True)
    assert len(ds) == 11 and ds.skipped == 1
    lines[5] = ','.join(lines[5].split(',')[:-1] + ['1'])
    open(path, 'w').write('\n'.join(lines) + '\n')
    os.remove(os.path.join(root, 'img', 'train_07.jpg'))
    with pytest.raises(UserError, match=r'train_07.jpg: image file does not exist'):
        datasets.get_split('csv', root, 'train')
    with open(os.path.join(root, 'img', 'val_02.jpg'), 'wb') as f:
        f.write(b'')
    val = datasets.get_split('csv', root, 'val')                 # found when the image is read...
    with pytest.raises(UserError, match=r'val_02.jpg is not a readable image'):
        val[2]
    val = datasets.get_split('csv', root, 'val', skip_bad=True)  # ...or up front with --skip-bad-samples
    assert len(val) == 5 and val.skipped == 1


# ---------------------------------------------------------------------------------------------- .lst

def test_lst_upstream_format(tmp_path):
    root = str(tmp_path)
    rows = fixtures.lst_dataset(root)
    ds = datasets.get_split('lst', root, 'train')
    assert len(ds) == 12 and ds.attribute_names[0] == 'Male'
    for i, (_, signed) in enumerate(rows['train']):
        np.testing.assert_array_equal(ds.labels[i], signed == 1)
        np.testing.assert_array_equal(ds.mask[i], signed != 0)
    pos, neg = class_prior_weights(ds.labels, ds.mask)
    assert pos[0] == pytest.approx(1.0) and neg[0] == pytest.approx(np.e)   # a = 1/2 -> r = 1
    lst = os.path.join(root, 'wider_records', 'valid_list.lst')
    lines = open(lst).read().splitlines()
    parts = lines[2].split('\t')
    lines[2] = '\t'.join(parts[:3] + parts[4:])                            # 13 labels
    open(lst, 'w').write('\n'.join(lines) + '\n')
    with pytest.raises(UserError, match=r'valid_list.lst line 3: has 13 labels, expected 14'):
        datasets.get_split('lst', root, 'val')
    lines[2] = '\t'.join(parts[:1] + ['3'] + parts[2:])
    open(lst, 'w').write('\n'.join(lines) + '\n')
    with pytest.raises(UserError, match=r'valid_list.lst line 3: label values must be 1'):
        datasets.get_split('lst', root, 'val')


# ---------------------------------------------------------------------------------------------- RecordIO

def test_recordio_prepare_and_read(tmp_path):
    root, out = str(tmp_path / 'csv'), str(tmp_path / 'rec')
    os.makedirs(root)
    fixtures.csv_dataset(root)
    prepare('csv', root, out)
    for split in ('train', 'val', 'test'):
        for ext in ('.lst', '.rec', '.idx'):
            assert os.path.isfile(os.path.join(out, split + ext))
        src = datasets.get_split('csv', root, split)
        rec = datasets.get_split('rec', out, split)
        assert len(rec) == len(src) and rec.attribute_names == src.attribute_names
        np.testing.assert_array_equal(rec.labels, src.labels)
        np.testing.assert_array_equal(rec.mask, src.mask)
        for i in range(len(src)):
            assert np.abs(rec[i][0].astype(int) - src[i][0].astype(int)).mean() < 3
    # Without the .lst the labels come from the record headers.
    os.remove(os.path.join(out, 'val.lst'))
    rec = datasets.get_split('rec', out, 'val')
    np.testing.assert_array_equal(rec.labels, datasets.get_split('csv', root, 'val').labels)


@pytest.mark.parametrize('processes', [False, True])
def test_loader_with_worker_processes_matches_in_process(tmp_path, processes):
    """Worker threads (what train.py uses) and forked worker processes give exactly the batches of the
    in-process loader."""
    root, out = str(tmp_path / 'csv'), str(tmp_path / 'rec')
    os.makedirs(root)
    fixtures.csv_dataset(root)
    prepare('csv', root, out)
    ds = datasets.get_split('rec', out, 'train')
    tf = Transform(32, 37, (18, 32), train=True, seed=3)
    batches = []
    for workers in (0, 2):
        loader, sampler = make_loader(ds, tf, 5, shuffle=True, num_workers=workers, seed=3,
                                      processes=processes)
        sampler.set_epoch(4)
        batches.append([[x.asnumpy() for x in b] for b in loader])
    assert len(batches[0]) == len(batches[1]) == 3                      # 12 samples, batches of 5
    for b0, b1 in zip(*batches):
        assert len(b0) == len(b1) == 4
        for x0, x1 in zip(b0, b1):
            np.testing.assert_array_equal(x0, x1)


# ---------------------------------------------------------------------------------------------- runs

def _one_epoch(tmp_path, dataset, data_path, extra=(), name=None):
    out = str(tmp_path / (name or 'run-' + dataset))
    argv = ['--dataset', dataset, '--data_path', data_path, '--out', out, '--epochs', '1', '--batch_size',
            '4',
            '--backbone', 'resnet18_v1', '--input-size', '32', '--num-workers', '0',
            '--no-pretrained'] + list(extra)
    result = train.main(argv)
    again = eval_script.main([out, '--num-workers', '0'])
    assert np.isfinite(result['mAP']) and again['mAP'] == pytest.approx(result['mAP'], abs=1e-9)
    assert [r['ap'] for r in again['per_attribute']] == [r['ap'] for r in result['per_attribute']]
    return out, result


@pytest.mark.parametrize('dataset', ['wider', 'peta', 'pa100k', 'csv', 'lst', 'rec'])
def test_one_epoch_train_and_eval(tmp_path, dataset):
    root = str(tmp_path / 'data')
    os.makedirs(root)
    extra = []
    if dataset == 'wider':
        fixtures.wider(root)
    elif dataset == 'peta':
        fixtures.peta(root)
    elif dataset == 'pa100k':
        fixtures.pa100k(root)
    elif dataset == 'csv':
        fixtures.csv_dataset(root)
    elif dataset == 'lst':
        fixtures.lst_dataset(root)
    else:
        src = str(tmp_path / 'src')
        os.makedirs(src)
        fixtures.csv_dataset(src)
        prepare('csv', src, root)
        extra = ['--num-workers', '2']
    out, result = _one_epoch(tmp_path, dataset, root, extra)
    cfg = json.load(open(os.path.join(out, 'config.json')))
    assert cfg['dataset'] == dataset and os.path.isfile(os.path.join(out, 'checkpoints', 'best.params'))
    assert 0 <= result['mAP'] <= 1
    # the scored test split is the dataset's own: its labels and masks, counted per attribute
    test = datasets.get_split(dataset, root, 'test')
    assert [r['name'] for r in result['per_attribute']] == list(test.attribute_names)
    positives = (test.labels * test.mask).sum(0).astype(int).tolist()
    assert [r['positives'] for r in result['per_attribute']] == positives
    assert [r['specified'] for r in result['per_attribute']] == test.mask.sum(0).astype(int).tolist()


def test_skip_bad_samples_is_logged(tmp_path):
    root = str(tmp_path / 'data')
    os.makedirs(root)
    fixtures.csv_dataset(root)
    with open(os.path.join(root, 'train.csv'), 'a') as f:
        f.write('img/missing.jpg,1,0,1\n')
    with pytest.raises(UserError, match='missing.jpg'):
        _one_epoch(tmp_path, 'csv', root)
    out, _ = _one_epoch(tmp_path, 'csv', root, ['--skip-bad-samples'], name='r2')
    assert '1 bad sample(s) skipped' in open(os.path.join(out, 'train.log')).read()


# ------------------------------------------------------------------------------- concurrent cache writers

def test_two_writers_of_one_demo_cache_do_not_rename_each_others_file(tmp_path, monkeypatch):
    """Two runs of a study start together on a fresh machine and both build the demo cache: the one that
    finishes second must not find its temporary file renamed away by the first (it did: one shared
    ``.tmp.npz`` name). The second writer is simulated by a nested build between save and rename."""
    from datasets import digits
    tiny = {s: (np.full((2, 48, 48, 3), i, np.uint8), np.ones((2, 3), np.int8))
            for i, s in enumerate(('train', 'val', 'test'))}
    monkeypatch.setattr(digits, 'build', lambda seed: (tiny, None))
    save = np.savez_compressed
    calls = []

    def save_then_other_writer(file, **arrays):
        save(file, **arrays)
        calls.append(file)
        if len(calls) == 1:                              # the other process saves and renames first
            digits.cached(str(tmp_path), seed=0)
    monkeypatch.setattr(digits.np, 'savez_compressed', save_then_other_writer)
    arrays = digits.cached(str(tmp_path), seed=0)
    assert len(calls) == 2 and calls[0] != calls[1]
    np.testing.assert_array_equal(arrays['val_images'], tiny['val'][0])
    assert os.listdir(str(tmp_path)) == ['digits-canvas-v%d-seed0.npz' % digits.VERSION]   # no leftovers


def test_two_writers_of_one_wider_crop_do_not_rename_each_others_file(tmp_path, monkeypatch):
    """The same for the per-user WIDER crop cache (two runs, or two loader threads, cropping one box)."""
    import cv2
    scene = str(tmp_path / 'scene.jpg')
    cv2.imwrite(scene, np.full((40, 60, 3), 200, np.uint8))
    out = str(tmp_path / 'crop.jpg')
    write = cv2.imwrite
    calls = []

    def write_then_other_writer(file, image, params=None):
        ok = write(file, image, params)
        calls.append(file)
        if len(calls) == 1:
            assert wider._crop_job((scene, [[5, 5, 20, 30]], [out])) == [None]
        return ok
    monkeypatch.setattr(wider.cv2, 'imwrite', write_then_other_writer)
    assert wider._crop_job((scene, [[5, 5, 20, 30]], [out])) == [None]
    assert len(calls) == 2 and calls[0] != calls[1]
    assert sorted(os.listdir(str(tmp_path))) == ['crop.jpg', 'scene.jpg']
