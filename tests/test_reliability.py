"""Exact resume, atomic pickle-free checkpoints, interrupts, non-finite losses, and one-line errors."""
import json
import os
import pickle
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import mxnet as mx

from engine import checkpoints
import train
from engine import loop
from datasets import digits
from common.errors import UserError
from tests import fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--limit', '96', '--input-size', '32', '--batch_size', '16', '--log-interval', '1']


@pytest.fixture(scope='module')
def straight_run(demo_path, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('runs') / 'straight')
    result = train.main(['--data_path', demo_path, '--out', out, '--epochs', '3'] + TINY)
    return out, result


def _rows(out):
    rows = json.load(open(os.path.join(out, 'metrics.json')))
    return [{k: v for k, v in r.items() if k not in ('samples_per_sec', 'seconds')} for r in rows]


def test_resume_gives_the_same_run(straight_run, demo_path, tmp_path):
    """3 epochs straight == 2 epochs, then --resume to 3: bitwise the same metrics on the CPU (all state
    is restored and the data order and augmentation depend only on seed, epoch and sample)."""
    out, result = straight_run
    part = str(tmp_path / 'part')
    train.main(['--data_path', demo_path, '--out', part, '--epochs', '2'] + TINY)
    resumed = train.main(['--resume', part, '--epochs', '3'])
    assert _rows(part) == _rows(out)
    assert resumed['mAP'] == result['mAP'] and resumed['per_attribute'] == result['per_attribute']


@pytest.mark.parametrize('flags', [['--mc-loss'], ['--head', 'apcnn', '--input-size', '64']])
def test_resume_repeats_the_random_draws_inside_the_graph(demo_path, tmp_path, flags):
    """MC-Loss masks and AP-CNN's ROI drops are drawn in the graph: a resumed run draws the same ones."""
    tiny = TINY + ['--limit', '48'] + flags
    straight, part = str(tmp_path / 'straight'), str(tmp_path / 'part')
    train.main(['--data_path', demo_path, '--out', straight, '--epochs', '2'] + tiny)
    train.main(['--data_path', demo_path, '--out', part, '--epochs', '1'] + tiny)
    train.main(['--resume', part, '--epochs', '2'])
    assert _rows(part) == _rows(straight)


# Runs train.py as `python train.py ...` does, with one change: at the start of the second batch of epoch 1
# the child says "paused" and waits for a line on stdin, so that the test's signal arrives at that step
# whatever the load on the machine. (Waiting for a progress line instead, as this test once did, lost the
# race under load: by the time the test read "epoch 1 [2/" and signalled, a busy machine had sometimes let
# the child finish the epoch, and it stopped in epoch 2.)
PAUSED_CHILD = """
import runpy, sys
from engine import steps
real, seen = steps.train_step, []
def train_step(net, loss_fn, trainers, history, batch, epoch, ctx):
    seen.append(epoch)
    if seen.count(1) == 2 and epoch == 1:
        print('paused', flush=True)
        sys.stdin.readline()
    return real(net, loss_fn, trainers, history, batch, epoch, ctx)
steps.train_step = train_step
sys.argv = sys.argv[1:]
runpy.run_path('train.py', run_name='__main__')
"""


def _stop_paused_run(child, run, demo_path, sig, env=None):
    """Run ``child`` (a script here) as ``train.py --data_path DEMO --out run --epochs 3`` + TINY; send
    ``sig`` when it says it paused. Returns (exit status, stdout, stderr)."""
    args = ['--data_path', demo_path, '--out', run, '--epochs', '3'] + TINY
    proc = subprocess.Popen([sys.executable, '-c', child, 'train.py'] + args, cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                            env=dict(os.environ, PYTHONUNBUFFERED='1', **(env or {})))
    # a hung child must not hang the suite (reading its stdout)
    watchdog = threading.Timer(fixtures.WATCHDOG_SECONDS, proc.kill)
    watchdog.start()
    paused = False
    for line in proc.stdout:
        if line.strip() == 'paused':
            paused = True
            proc.send_signal(sig)
            proc.stdin.write('go on\n')
            proc.stdin.flush()
            break
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    code = proc.wait(timeout=fixtures.SUBPROCESS_TIMEOUT)
    watchdog.cancel()
    assert paused, stderr[-3000:]
    return code, stdout, stderr


def test_sigterm_mid_epoch_leaves_a_checkpoint_that_resumes_exactly(straight_run, demo_path, tmp_path):
    """The signal arrives during the second batch of epoch 1 (the child waits there for it): that batch
    finishes, the checkpoint holds epoch 1 after batch 2, and the resumed run equals the straight one."""
    out, result = straight_run
    run = str(tmp_path / 'killed')
    code, stdout, stderr = _stop_paused_run(PAUSED_CHILD, run, demo_path, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, stderr[-3000:]
    assert 'stopped by SIGTERM in epoch 1 after batch 2 of 6;' in stderr, stderr[-3000:]
    assert 'python train.py --resume %s' % run in stderr
    meta, _ = checkpoints.read_meta(os.path.join(run, 'checkpoints', 'last.params'))
    assert (meta['state']['epoch'], meta['state']['batch']) == (1, 2)
    # said once (stderr, and the log file)
    assert 'stopped by' not in stdout
    assert open(os.path.join(run, 'train.log')).read().count('stopped by SIGTERM') == 1
    resumed = train.main(['--resume', run])
    assert _rows(run) == _rows(out)
    assert resumed['mAP'] == result['mAP']


# The same for an evaluation pass: the child pauses at the second batch of the N-th split it evaluates (in
# a 3-epoch run: 1-3 the validations, 4 the test) and waits for a line on stdin.
PAUSED_EVAL_CHILD = """
import os, runpy, sys
from engine import steps
real_predict, real_split, calls, batches = steps.predict, steps.split_batch, [], []
def predict(*args, **kwargs):
    calls.append(1)
    del batches[:]
    return real_predict(*args, **kwargs)
def split_batch(batch, ctx):
    batches.append(1)
    if len(calls) == int(os.environ['PAUSE_IN_SPLIT']) and len(batches) == 2:
        print('paused', flush=True)
        sys.stdin.readline()
    return real_split(batch, ctx)
steps.predict, steps.split_batch = predict, split_batch
sys.argv = sys.argv[1:]
runpy.run_path('train.py', run_name='__main__')
"""


def test_a_stop_during_validation_ends_the_run_at_once_and_resume_redoes_the_validation(
        straight_run, demo_path, tmp_path):
    """SIGINT at the second batch of epoch 1's validation: the run stops after that batch (not after the
    validation, the epoch or the test), the checkpoint holds epoch 1 with all its training batches, and the
    resumed run validates epoch 1 and goes on to the straight run's numbers."""
    out, result = straight_run
    run = str(tmp_path / 'stopped')
    code, _, stderr = _stop_paused_run(PAUSED_EVAL_CHILD, run, demo_path, signal.SIGINT,
                                       {'PAUSE_IN_SPLIT': '2'})
    assert code == 128 + signal.SIGINT, stderr[-3000:]
    assert 'stopped by SIGINT in epoch 1 during the validation (all 6 training batches done' in stderr, stderr
    assert 'Epoch [1]' not in open(os.path.join(run, 'train.log')).read()         # not validated to the end
    meta, _ = checkpoints.read_meta(os.path.join(run, 'checkpoints', 'last.params'))
    assert (meta['state']['epoch'], meta['state']['batch']) == (1, 6)
    assert len(_rows(run)) == 1
    command = stderr.split('Resume with:')[1].split()
    assert command[1:3] == ['train.py', '--resume'], command  # the interpreter that ran it, then train.py
    resumed = train.main(command[2:])                     # the printed command's flags, as printed
    assert _rows(run) == _rows(out)
    assert resumed['mAP'] == result['mAP']


def test_a_stop_during_the_test_ends_at_once_and_resume_runs_the_test(straight_run, demo_path, tmp_path):
    """SIGTERM at the second batch of the test split after the last epoch: the process ends after that
    batch, with no test result; the resumed run trains nothing and writes the straight run's test result."""
    out, result = straight_run
    run = str(tmp_path / 'stopped')
    code, _, stderr = _stop_paused_run(PAUSED_EVAL_CHILD, run, demo_path, signal.SIGTERM,
                                       {'PAUSE_IN_SPLIT': '4'})
    assert code == 128 + signal.SIGTERM, stderr[-3000:]
    assert 'stopped by SIGTERM during the test of the best checkpoint (training is complete' in stderr, stderr
    assert not os.path.exists(os.path.join(run, 'test_metrics.json'))
    assert len(_rows(run)) == 3
    resumed = train.main(['--resume', run])
    assert _rows(run) == _rows(out)
    assert resumed['mAP'] == result['mAP'] and resumed['per_attribute'] == result['per_attribute']
    assert os.path.exists(os.path.join(run, 'test_metrics.json'))


def test_failed_checkpoint_write_keeps_the_previous_one(straight_run, tmp_path, monkeypatch):
    out, _ = straight_run
    meta, arrays = checkpoints.read_meta(os.path.join(out, 'checkpoints', 'last.params'))
    from engine import sources
    net, cfg, _ = sources.load_source(out, [mx.cpu()], 'last')
    path = str(tmp_path / 'last.params')
    checkpoints.save_training(path, net, {}, None, meta)
    good = open(path, 'rb').read()

    def dies_halfway(fname, data):
        with open(fname, 'wb') as f:
            f.write(good[:len(good) // 2])
        raise KeyboardInterrupt('killed during the write')
    monkeypatch.setattr(checkpoints.nd, 'save', dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_training(path, net, {}, None, dict(meta, state=dict(meta['state'], epoch=99)))
    monkeypatch.undo()
    assert os.listdir(str(tmp_path)) == ['last.params'] and open(path, 'rb').read() == good
    assert checkpoints.read_meta(path)[0]['state']['epoch'] == meta['state']['epoch']


class _Payload(object):
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))         # unpickling this would create the marker file


def test_pickle_payloads_are_refused_without_running(tmp_path, demo_path):
    marker = str(tmp_path / 'PWNED')
    run = tmp_path / 'run'
    (run / 'checkpoints').mkdir(parents=True)
    for name in ('last.params', 'best.params'):
        with open(str(run / 'checkpoints' / name), 'wb') as f:
            pickle.dump(_Payload(marker), f)
    with pytest.raises(UserError, match='not an MXNet parameter file'):
        checkpoints.read_meta(str(run / 'checkpoints' / 'last.params'))
    proc = _cli(['eval.py', str(run)])
    assert proc.returncode == 2 and 'not an MXNet parameter file' in proc.stderr
    proc = _cli(['train.py', '--resume', str(run)])
    assert proc.returncode == 2 and 'not an MXNet parameter file' in proc.stderr
    # The demo cache is read with allow_pickle=False: an object array there is refused too.
    cache = tmp_path / 'demo'
    cache.mkdir()
    np.save(str(cache / 'x.npy'), np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    os.rename(str(cache / 'x.npy'), str(cache / 'digits-canvas-v1-seed0.npz'))
    with pytest.raises(UserError, match='damaged'):
        digits.cached(str(cache), seed=0)
    assert not os.path.exists(marker)


def test_non_finite_loss_stops_naming_epoch_and_batch(demo_path, tmp_path, monkeypatch):
    poisoned = 5                                  # this training sample's labels turn NaN in epoch 1
    from datasets import base
    original = base._Transformed.__getitem__

    def poison(self, key):
        data, label, mask, index = original(self, key)
        if self._transform.train and key // len(self) == 1 and index == poisoned:
            label = label * np.nan
        return data, label, mask, index
    monkeypatch.setattr(base._Transformed, '__getitem__', poison)
    out = str(tmp_path / 'nan')
    with pytest.raises(UserError) as err:
        train.main(['--data_path', demo_path, '--out', out, '--epochs', '3'] + TINY)
    from datasets.base import EpochSampler
    sampler = EpochSampler(96, True, seed=0)
    sampler.set_epoch(1)
    batch = list(sampler.order()).index(poisoned) // 16
    assert 'inf/NaN in epoch 1 at batch %d' % batch in str(err.value)
    meta, _ = checkpoints.read_meta(os.path.join(out, 'checkpoints', 'last.params'))
    assert meta['state']['epoch'] == 1                       # the end of epoch 0, untouched
    assert all(np.isfinite(v.asnumpy()).all() for k, v in checkpoints.read_meta(
        os.path.join(out, 'checkpoints', 'last.params'))[1].items() if k.startswith('param/'))


# ---------------------------------------------------------------------------------------------- errors

_cli, _error = fixtures.cli, fixtures.one_line_error


def test_error_unknown_data_path(tmp_path):
    _error(['train.py', '--dataset', 'wider', '--data_path', str(tmp_path / 'nowhere'), '--out',
            str(tmp_path / 'r')],
           'does not exist (expected the WIDER-Attribute folder)')


def test_error_missing_data_path(tmp_path):
    _error(['train.py', '--dataset', 'peta', '--out', str(tmp_path / 'r')],
           '--data_path is required for PETA')


def test_error_malformed_annotations(tmp_path):
    root = tmp_path / 'W'
    fixtures.wider(str(root))
    (root / 'Annotations' / 'wider_attribute_trainval.json').write_text('{"images": [')
    _error(['train.py', '--dataset', 'wider', '--data_path', str(root), '--out', str(tmp_path / 'r')],
           'wider_attribute_trainval.json is not valid JSON')


def test_error_label_length_differs_from_num_classes(tmp_path, demo_path):
    _error(['train.py', '--data_path', demo_path, '--num_classes', '14', '--out', str(tmp_path / 'r')],
           '--num_classes 14 but the demo labels have 12 attributes')


def test_error_checkpoint_of_another_model(tmp_path, straight_run):
    out, _ = straight_run
    from model import get_vaa_net
    ups = str(tmp_path / 'saved_models')
    checkpoints.save_upstream(get_vaa_net('resnet18_v1', 12, 'upstream', 32), ups)
    _error(['eval.py', ups, '--preset', 'paper', '--backbone', 'resnet18_v1', '--input-size', '32',
            '--dataset', 'demo', '--num_classes', '12'], 'this model (resnet18_v1, preset paper, 12 classes')
    _error(['train.py', '--resume', out, '--preset', 'upstream'],
           '--resume %s continues that run as it was configured; --preset upstream (the run has demo)' % out)
    _error(['train.py', '--resume', out, '--backbone', 'resnet50_v1'],
           '--backbone resnet50_v1 (the run has resnet18_v1)')


def test_error_missing_pretrained_cache(tmp_path, demo_path):
    _error(['train.py', '--data_path', demo_path, '--pretrained', '--out', str(tmp_path / 'r')],
           'ImageNet weights for resnet18_v1 are not in the model-zoo cache: place resnet18_v1-',
           env={'MXNET_HOME': str(tmp_path / 'mxhome')})


def test_error_empty_split(tmp_path):
    root = tmp_path / 'csv'
    root.mkdir()
    fixtures.csv_dataset(str(root))
    (root / 'val.csv').write_text('path,hat,bag,coat\n')
    _error(['train.py', '--dataset', 'csv', '--data_path', str(root), '--out', str(tmp_path / 'r')],
           'the val split of csv (%s) is empty' % root)


def test_error_batch_larger_than_dataset(tmp_path, demo_path):
    _error(['train.py', '--data_path', demo_path, '--limit', '50', '--batch_size', '64', '--out',
            str(tmp_path / 'r')],
           '--batch_size 64 is larger than the training split (50 samples)')


def test_error_unwritable_output_folder(tmp_path, demo_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('x')
    _error(['train.py', '--data_path', demo_path, '--out', str(blocker / 'run')],
           'cannot write the run folder')


def test_error_existing_run_is_not_overwritten(straight_run, demo_path):
    out, _ = straight_run
    before = open(os.path.join(out, 'checkpoints', 'last.params'), 'rb').read()
    _error(['train.py', '--data_path', demo_path, '--out', out],
           'already holds a run; continue it with --resume')
    assert open(os.path.join(out, 'checkpoints', 'last.params'), 'rb').read() == before


def test_error_image_that_is_not_an_image(tmp_path, straight_run):
    out, _ = straight_run
    fake = tmp_path / 'photo.jpg'
    fake.write_text('hello')
    _error(['eval.py', out, '--image', str(fake)], 'is not an image OpenCV can read')


def test_error_incompatible_flags(tmp_path, demo_path):
    _error(['train.py', '--data_path', demo_path, '--finetune', '--freeze-epochs', '2', '--out',
            str(tmp_path / 'a')],
           '--finetune freezes the backbone for the whole run; drop --freeze-epochs')
    _error(['train.py', '--test'], '--test needs --resume RUN_DIR')
    _error(['train.py', '--gpus', 'x'], "--gpus takes comma-separated GPU ids")
    _error(['train.py', '--resume', str(tmp_path / 'none')], 'no checkpoints/last.params there')


def test_debug_shows_the_traceback(tmp_path, demo_path):
    proc = _cli(['train.py', '--data_path', demo_path, '--num_classes', '3', '--out', str(tmp_path / 'r'),
                 '--debug'])
    assert proc.returncode != 0 and 'Traceback' in proc.stderr


def test_optimizer_states_are_stored_in_their_parameters_file_shape(straight_run):
    """Every optimizer state of a parameter's size is stored in the shape the parameter has in the file:
    the classifiers' k x k kernels (computed as matrices, stored as the convolution kernels the authors'
    files and the checkpoints before that change hold) and their Adam moments alike."""
    from mxnet import nd
    out, _ = straight_run
    arrays = nd.load(os.path.join(out, 'checkpoints', 'last.params'))
    params = {k[len('param/'):]: v.shape for k, v in arrays.items() if k.startswith('param/')}
    kernels = [n for n, shape in params.items() if len(shape) == 4 and shape[2] > 1 and 'fsr' in n]
    assert kernels, 'no k x k classifier kernel in the demo network'
    checked = set()
    for key, value in arrays.items():
        if key.startswith('opt/'):
            module, name, k = key[len('opt/'):].rsplit('/', 2)
            if value.size == int(np.prod(params[name])):
                assert value.shape == params[name], (key, value.shape, params[name])
                checked.add(name)
    assert set(kernels) <= checked


def test_a_checkpoint_in_the_file_shapes_resumes_bitwise(straight_run, tmp_path):
    """Loading a checkpoint restores every parameter and optimizer state bit for bit, and saving the restored
    state writes the same arrays: nothing is reshaped, rounded or left behind on the way."""
    from mxnet import nd
    from engine import sources
    out, _ = straight_run
    path = os.path.join(out, 'checkpoints', 'last.params')
    stored = nd.load(path)
    meta, arrays = checkpoints.read_meta(path)
    net, cfg, _ = sources.load_source(out, [mx.cpu()], 'last')
    place = loop.Place([mx.cpu()], None, 0, 1)
    trainers = train.get_trainers(cfg, net, place)[0]
    loss, history = train.get_losses(cfg, train.get_data(cfg, place).train, [mx.cpu()])
    checkpoints.load_training(path, net, trainers.trainers, history, arrays)
    restored = 0
    for module, trainer in trainers.trainers.items():      # in memory: each state in its parameter's shape
        for index, state in trainer._updaters[0].states.items():
            param = trainer._params[index]
            name = param.name[len(net.prefix):]
            for k, part in enumerate(state if isinstance(state, (list, tuple)) else [state]):
                value = stored['opt/%s/%s/%d' % (module, name, k)].asnumpy()
                assert part.shape == param.shape, (module, name, part.shape, param.shape)
                np.testing.assert_array_equal(part.asnumpy(), value.reshape(param.shape))
                restored += 1
    assert restored == sum(k.startswith('opt/') for k in stored)
    again = str(tmp_path / 'again.params')
    checkpoints.save_training(again, net, trainers.trainers, history.state_dict(), dict(
        (k, v) for k, v in meta.items() if k not in ('optimizer_counts', 'format')))
    rewritten = nd.load(again)
    assert set(rewritten) == set(stored)
    for key in stored:
        if key != 'meta/json':
            assert rewritten[key].shape == stored[key].shape, key
            np.testing.assert_array_equal(rewritten[key].asnumpy(), stored[key].asnumpy(), err_msg=key)
    assert checkpoints.read_meta(again)[0] == meta
