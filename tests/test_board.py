"""TensorBoard logs in every run folder, read back the ways a user reads them: the real ``tensorboard``
server's HTTP API, and TensorBoard's own event reader against metrics.json; resumed runs continue the
steps; --no-tensorboard writes none."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest

import train

TINY = ['--limit', '64', '--input-size', '32', '--batch_size', '16', '--log-interval', '2']


@pytest.fixture(scope='module')
def board_run(demo_path, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('board') / 'run')
    result = train.main(['--data_path', demo_path, '--out', out, '--epochs', '2'] + TINY)
    return out, result


def _events(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(path, size_guidance={'scalars': 0, 'images': 0})
    events.Reload()
    return events


def test_every_scalar_of_metrics_json_is_in_the_event_files(board_run):
    """Each epoch's row (losses and their terms, mAP, mA, F1, speed) at the epoch's last step, each
    Trainer's learning rate, the batch losses every --log-interval batches, the test result at the end."""
    out, result = board_run
    rows = json.load(open(os.path.join(out, 'metrics.json')))
    events = _events(os.path.join(out, 'tb'))
    per_epoch = 4                                       # 64 samples in batches of 16
    scalars = {t: {e.step: e.value for e in events.Scalars(t)} for t in events.Tags()['scalars']}
    checked = 0
    for row in rows:
        step = (row['epoch'] + 1) * per_epoch
        for key, value in row.items():
            if key in ('epoch', 'lr', 'seconds', 'val_ap'):
                continue
            tag = 'speed/samples_per_sec' if key == 'samples_per_sec' else key.replace('_', '/', 1)
            assert scalars[tag][step] == pytest.approx(value, rel=1e-6), (tag, step)
            checked += 1
        assert scalars['time/epoch_seconds'][step] == pytest.approx(row['seconds'], rel=1e-6)
        assert {t for t in scalars if t.startswith('lr/')} == {'lr/backbone', 'lr/stage_3/fconv',
                                                                'lr/stage_3/fatt', 'lr/stage_3/fsr',
                                                                'lr/stage_4/fconv', 'lr/stage_4/fatt',
                                                                'lr/stage_4/fsr'}
        assert all(scalars[t][step] == pytest.approx(row['lr']) for t in scalars if t.startswith('lr/'))
    assert checked == 2 * 10                        # loss x2, terms x3, mAP x2, mA, F1, speed
    assert {'train/primary', 'train/tap0', 'train/tap1', 'batch/primary', 'batch/tap1'} <= set(scalars)
    assert sorted(scalars['batch/loss']) == [2, 4, 6, 8]
    for key in ('mAP', 'mA', 'f1', 'accuracy', 'precision', 'recall'):
        assert scalars['test/' + key][2 * per_epoch] == pytest.approx(result[key], rel=1e-6)
    assert sorted(events.Tags()['images']) == ['attention/%d' % i for i in range(4)]
    assert [e.step for e in events.Images('attention/0')] == [4, 8]


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _get(url):
    with urllib.request.urlopen(url, timeout=120) as response:
        return response.read()


def test_the_tensorboard_server_shows_the_scalars_images_and_hyperparameters(board_run):
    out, result = board_run
    port = _free_port()
    exe = os.path.join(os.path.dirname(sys.executable), 'tensorboard')
    server = subprocess.Popen([exe, '--logdir', out, '--host', '127.0.0.1', '--port', str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = 'http://127.0.0.1:%d/data/plugin' % port
    try:
        deadline, tags = time.time() + 120, {}
        while time.time() < deadline and not tags.get('tb'):
            try:
                tags = json.loads(_get(base + '/scalars/tags'))
            except OSError:
                pass
            time.sleep(0.5)
        assert {'val/mAP', 'train/loss', 'batch/loss', 'test/mAP'} <= set(tags['tb']), tags
        query = urllib.parse.urlencode({'run': 'tb', 'tag': 'test/mAP'})
        points = json.loads(_get(base + '/scalars/scalars?' + query))
        assert points[-1][2] == pytest.approx(result['mAP'], rel=1e-6)
        images = json.loads(_get(base + '/images/tags'))
        assert 'attention/0' in images['tb']
        query = urllib.parse.urlencode({'run': 'tb', 'tag': 'attention/0'})
        listed = json.loads(_get(base + '/images/images?' + query))
        png = _get(base + '/images/' + listed[-1]['query'].join(['individualImage?', '']))
        assert png[:8] == b'\x89PNG\r\n\x1a\n'
        request = urllib.request.Request(base + '/hparams/experiment', data=json.dumps(
            {'experimentName': ''}).encode(), headers={'Content-Type': 'application/json'})
        with urllib.request.urlopen(request, timeout=120) as response:
            experiment = json.loads(response.read())
        names = {h['name'] for h in experiment['hparamInfos']}
        assert {'lr', 'batch_size', 'preset', 'seed'} <= names
    finally:
        server.terminate()
        server.wait(timeout=120)


def test_a_resumed_run_continues_the_steps_without_repeating_them(board_run, tmp_path):
    out, _ = board_run
    run = str(tmp_path / 'longer')
    shutil.copytree(out, run)
    train.main(['--resume', run, '--epochs', '3'])
    events = _events(os.path.join(run, 'tb'))
    steps = [e.step for e in events.Scalars('val/mAP')]
    assert steps == [4, 8, 12]
    batch = [e.step for e in events.Scalars('batch/loss')]
    assert batch == sorted(set(batch)) == [2, 4, 6, 8, 10, 12]


def test_no_tensorboard_writes_no_logs(demo_path, tmp_path):
    out = str(tmp_path / 'quiet')
    train.main(['--data_path', demo_path, '--out', out, '--epochs', '1', '--no-tensorboard'] + TINY)
    assert not os.path.exists(os.path.join(out, 'tb')) and os.path.isfile(os.path.join(out, 'metrics.json'))


def test_the_attention_grid_puts_each_map_where_its_tap_and_attribute_are():
    """TensorBoard's image of one input (drawn without matplotlib): one row per tap, the input then each
    attribute; a map whose weight sits in one corner is hot (red) there and cold (blue) elsewhere, a uniform
    map is one colour, blended 0.45 image + 0.55 colour as the eval.py figure blends them."""
    from evaluation import plots
    tile, image = 112, np.full((40, 40, 3), 128, np.uint8)
    corner = np.zeros((4, 4), np.float32)
    corner[3, 0] = 1.0                                            # bottom-left cell
    uniform = np.full((4, 4), 1 / 16.0, np.float32)
    maps = [np.stack([uniform, corner, uniform]), np.stack([corner, uniform, uniform])]
    grid = plots.attention_grid(image, maps, ['a', 'b', 'c'], [0.1, 0.5, 0.9], ['s3', 's4'], top=4.0)
    assert grid.shape == (2 * tile, 4 * tile, 3) and grid.dtype == np.uint8

    def at(tap, column, y, x):
        return grid[tap * tile + y, column * tile + x].astype(int)
    for tap, hot_column in ((0, 2), (1, 1)):                       # the corner map: attribute b, then a
        red, green, blue = at(tap, hot_column, 100, 8)
        assert red > blue + 50 and red > green + 50, (tap, red, green, blue)
        red, green, blue = at(tap, hot_column, 60, 100)
        assert blue > red + 30, (tap, red, green, blue)
    # a uniform map is 1 x uniform everywhere: the colour of 1/4 of the scale, the same in every pixel
    flat = grid[tile + 40:2 * tile, 2 * tile:3 * tile].reshape(-1, 3)
    assert (flat.max(0) - flat.min(0)).max() <= 2
    import cv2
    jet = cv2.applyColorMap(np.array([[int(255 * 0.25)]], np.uint8), cv2.COLORMAP_JET)[0, 0, ::-1]
    np.testing.assert_allclose(flat[0], 0.45 * 128 + 0.55 * jet, atol=1.5)
    # the input tiles are the image
    assert (grid[40:tile, 30:tile] == 128).all() and (grid[tile + 40:2 * tile, 30:tile] == 128).all()
