"""predict.py: a folder of images to predictions.csv, as evaluation would score them."""
import csv
import os

import numpy as np
import pytest
import cv2

import predict
from engine import steps
from datasets import digits, loaders
from common.errors import UserError
from engine.sources import load_source
import mxnet as mx


@pytest.fixture(scope='module')
def demo_run(demo_path, tmp_path_factory):
    import train
    out = str(tmp_path_factory.mktemp('runs') / 'p')
    train.main(['--data_path', demo_path, '--out', out, '--epochs', '1', '--limit', '64', '--batch_size',
                '16'])
    return out


def _read(path):
    with open(path) as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def test_a_folder_and_a_list_give_the_probabilities_evaluation_computes(demo_run, demo_path, tmp_path):
    ds = digits.DigitsCanvas(demo_path, 'test', limit=20)
    folder = tmp_path / 'images'
    (folder / 'sub').mkdir(parents=True)
    paths = []
    for i in range(20):
        path = str(folder / ('sub' if i >= 12 else '') / ('%02d.png' % i))
        cv2.imwrite(path, ds.images[i][:, :, ::-1])               # PNG: the same pixels come back
        paths.append(path)
    listing = tmp_path / 'list.txt'
    listing.write_text('\n'.join(os.path.relpath(p, str(tmp_path)) for p in paths[:5]) + '\n')
    out = str(tmp_path / 'p.csv')
    result = predict.main([demo_run, str(folder), str(listing), '--out', out, '--batch_size', '7'])
    header, rows = _read(out)
    assert header == ['path'] + list(ds.attribute_names)
    # folder (sorted, recursive), then the list
    expected_order = paths[:12] + paths[12:] + paths[:5]
    assert [r[0] for r in rows] == expected_order and len(rows) == 25
    net, cfg, names = load_source(demo_run, [mx.cpu()])
    net.hybridize()
    logits, _, _, _ = steps.predict(net, loaders.eval_loader(dict(cfg, batch_size=20), ds), [mx.cpu()])
    probs = 1 / (1 + np.exp(-logits))
    got = np.array([[float(v) for v in r[1:]] for r in rows])
    np.testing.assert_allclose(got[:20], probs, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got[20:], probs[:5], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result['probabilities'], got, atol=1e-6)


def test_thresholds_and_unreadable_images(demo_run, demo_path, tmp_path):
    ds = digits.DigitsCanvas(demo_path, 'test', limit=4)
    folder = tmp_path / 'images'
    folder.mkdir()
    for i in range(4):
        cv2.imwrite(str(folder / ('%d.png' % i)), ds.images[i][:, :, ::-1])
    (folder / '9.jpg').write_bytes(b'not an image')
    out = str(tmp_path / 'p.csv')
    with pytest.raises(UserError, match='9.jpg is not a readable image.*--skip-bad-images'):
        predict.main([demo_run, str(folder), '--out', out])
    assert not os.path.exists(out)                                    # nothing half-written
    result = predict.main([demo_run, str(folder), '--out', out, '--skip-bad-images', '--threshold', 'val'])
    assert result['skipped'] == [str(folder / '9.jpg')] and len(result['paths']) == 4
    header, rows = _read(out)
    names = list(ds.attribute_names)
    assert header[-len(names):] == ['%s_pred' % n for n in names]
    probs = np.array([[float(v) for v in r[1:1 + len(names)]] for r in rows])
    preds = np.array([[int(v) for v in r[1 + len(names):]] for r in rows])
    np.testing.assert_array_equal(preds, probs >= np.array(result['thresholds']))
    # each threshold is a best balanced accuracy on the validation split (brute force over all cuts)
    net, cfg, _ = load_source(demo_run, [mx.cpu()])
    val = digits.DigitsCanvas(cfg['data_path'], 'val', limit=cfg['limit'])
    logits, labels, masks, _ = steps.predict(net, loaders.eval_loader(cfg, val), [mx.cpu()])
    p = 1 / (1 + np.exp(-logits))
    for c in range(len(names)):
        m = masks[:, c] > 0
        y = labels[m, c] > 0.5
        if y.all() or not y.any():
            continue
        def balanced(t):
            return ((p[m, c] >= t) & y).sum() / y.sum() + ((p[m, c] < t) & ~y).sum() / (~y).sum()
        best = max(balanced(t) for t in np.r_[p[m, c], 0.5, 1.1])
        assert balanced(result['thresholds'][c]) == pytest.approx(best, abs=1e-9)
