"""Where correct parts are wired together: each test fails when one plausible wiring bug is planted
(the history weights not reaching the attention loss, the history updated before it is read, the
update normalised by the local batch, the authors' arg:/aux: keys mapped wrongly, a box clipped one
pixel short, the schedule's rate not reaching the Trainers)."""
import os

import numpy as np
import pytest
import mxnet as mx
from mxnet import autograd, nd

from engine import checkpoints
from engine import steps
from datasets import wider
from losses import PredictionHistory, VAALoss
from model import get_vaa_net
from engine.trainers import PlateauSchedule, StageTrainers


def _log_sigmoid(x):
    return -np.logaddexp(0, -x)


def _batch(n, classes, size, seed=0):
    rng = np.random.RandomState(seed)
    x = nd.array(rng.randn(n, 3, size, size))
    y = nd.array(rng.randint(0, 2, (n, classes)))
    m = nd.array(rng.rand(n, classes) > 0.15)
    return x, y, m, nd.arange(n, dtype='int64')


def test_the_training_step_weights_each_tap_by_the_previous_epochs_predictions():
    """Eqs. 5-6 in the loop: in epoch 2 the attention loss of every tap is (1 + std_s) * BCE with std_s
    from the predictions stored in epochs 0 and 1, not from this epoch's, which are stored after."""
    classes, n = 3, 4
    net = get_vaa_net('resnet18_v1', classes, 'paper', 32)
    trainers = StageTrainers(net, [mx.cpu()], 'sgd', {'learning_rate': 0.0})    # weights stay as they are
    loss_fn = VAALoss(gamma=0.5)
    history = PredictionHistory(n, classes, track=3, start_epoch=0, use_epoch=2)
    rng = np.random.RandomState(1)
    stored = [rng.rand(n, classes).astype(np.float32) for _ in range(2)]
    for epoch, probs in enumerate(stored):
        history.update(np.arange(n), nd.array(probs), epoch)
    x, y, m, idx = _batch(n, classes, 32)
    step = steps.train_step(net, loss_fn, trainers, history, (x, y, m, idx), 2, [mx.cpu()])
    with autograd.train_mode():                    # the step's forward: BatchNorm on batch statistics
        primary, taps, fused = [o.asnumpy().astype(np.float64) if not isinstance(o, list) else
                                [t.asnumpy().astype(np.float64) for t in o] for o in net(x)]
    h = np.stack(stored).astype(np.float64)
    var = h.var(axis=0)
    weight = 1 + np.sqrt(var + var ** 2 / (len(stored) - 1))            # Eq. 6 over the two stored rows
    yy, mm = y.asnumpy(), m.asnumpy()
    p = 1 / (1 + np.exp(-primary))
    focal = -(yy * (1 - p) ** 0.5 * _log_sigmoid(primary) + (1 - yy) * p ** 0.5 * _log_sigmoid(-primary))
    expected = (focal * mm).mean(1)
    for t in taps:
        expected += (weight * -(yy * _log_sigmoid(t) + (1 - yy) * _log_sigmoid(-t)) * mm).mean(1)
    assert float(step.loss.asscalar()) == pytest.approx(expected.sum(), rel=1e-5)
    assert not np.allclose(weight, 1)                                  # the weighting is really on
    # this epoch's prediction was stored after it was used, as the newest row
    np.testing.assert_allclose(history.buffer.asnumpy()[:, 0], 1 / (1 + np.exp(-fused)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(history.filled(), [3] * n)


def _two_steps(num_workers):
    """Two SGD steps (momentum, weight decay) on one batch; with ``num_workers`` > 1 the all-reduce is
    that of identical workers (every gradient summed num_workers times)."""
    mx.random.seed(5)
    net = get_vaa_net('resnet18_v1', 3, 'upstream', 32)
    trainers = StageTrainers(net, [mx.cpu()], 'sgd', {'learning_rate': 0.05, 'momentum': 0.9, 'wd': 5e-4})
    if num_workers > 1:
        sync = trainers.sync
        sync.num_workers = num_workers

        def allreduce():
            for p in sync.params:
                if p.grad_req != 'null':
                    p.grad()[:] *= num_workers
        sync.allreduce_grads = allreduce
    history = PredictionHistory(4, 3)
    for epoch in range(2):
        steps.train_step(net, VAALoss(), trainers, history, _batch(4, 3, 32), epoch, [mx.cpu()])
    mx.nd.waitall()  # reading a parameter during oneDNN's ops can be wrong (README, CPUs)
    return {k[len(net.prefix):]: p.data().asnumpy() for k, p in net.collect_params().items()}


def test_n_identical_workers_make_the_update_of_one_worker_with_their_global_batch():
    """The update divides the summed gradient by the global batch (this worker's batch times the
    workers): two workers with the same data move the weights exactly as one."""
    one, two = _two_steps(1), _two_steps(2)
    assert one.keys() == two.keys()
    for k in one:
        np.testing.assert_allclose(one[k], two[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_the_schedules_rate_reaches_every_trainer():
    net = get_vaa_net('resnet18_v1', 3, 'paper', 32)
    trainers = StageTrainers(net, [mx.cpu()], 'sgd', {'learning_rate': 0.1})
    schedule = PlateauSchedule(0.1, patience=0, max_drops=1)
    schedule.update(0, 0.5)
    schedule.update(1, 0.4)                        # no gain for more than 0 epochs: 0.1 -> 0.01
    trainers.follow(schedule)
    rates = [t.learning_rate for t in trainers.trainers.values()]
    assert rates == [pytest.approx(0.01)] * len(trainers.trainers)


def test_module_style_arg_and_aux_keys_load_every_parameter(tmp_path):
    """The authors' files written with arg:/aux: prefixes (as Module checkpoints are): every parameter
    of the loaded network changes from its initial value to the saved one."""
    mx.random.seed(3)
    source = get_vaa_net('resnet18_v1', 3, 'upstream', 64)
    for p in source.collect_params().values():         # every value differs from any initialisation
        p.set_data(nd.random.uniform(0.5, 1.5, shape=p.shape) * (0.05 if p.name.endswith('weight') else 1))
    folder = str(tmp_path / 'saved_models')
    checkpoints.save_upstream(source, folder)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        arrays = nd.load(path)
        nd.save(path, {('aux:' if k.endswith(('running_mean', 'running_var')) else 'arg:') + k: v
                       for k, v in arrays.items()})
    mx.random.seed(4)
    target = get_vaa_net('resnet18_v1', 3, 'upstream', 64)
    before = {k[len(target.prefix):]: p.data().asnumpy().copy() for k, p in target.collect_params().items()}
    checkpoints.load_upstream(target, folder)
    saved = {k[len(source.prefix):]: p.data().asnumpy() for k, p in source.collect_params().items()}
    for k, p in target.collect_params().items():
        k = k[len(target.prefix):]
        assert not np.array_equal(p.data().asnumpy(), before[k]), k
        np.testing.assert_array_equal(p.data().asnumpy(), saved[k], err_msg=k)
    x = nd.random.normal(shape=(2, 3, 64, 64))
    np.testing.assert_array_equal(target(x)[2].asnumpy(), source(x)[2].asnumpy())


def test_a_box_over_the_image_edge_is_clipped_exactly(tmp_path):
    assert wider.clip_box([95, 30, 60, 40], 120, 100) == (95, 30, 120, 70)
    assert wider.clip_box([-3.5, -2, 10, 10], 120, 100) == (0, 0, 7, 8)
    assert wider.clip_box([10.2, 20.7, 5.1, 4.0], 120, 100) == (10, 20, 16, 25)
    # End to end: the last column and row of the scene are a colour of their own; a box running over
    # the corner must keep them (a crop one pixel short loses them).
    import cv2
    import json
    root = tmp_path / 'W'
    (root / 'Image' / 'train').mkdir(parents=True)
    (root / 'Annotations').mkdir()
    scene = np.full((100, 120, 3), 128, np.uint8)
    scene[:, -1] = scene[-1, :] = (250, 20, 20)
    cv2.imwrite(str(root / 'Image' / 'train' / 's.png'), scene[:, :, ::-1])
    ann = {'images': [{'file_name': 'train/s.png', 'targets': [{'attribute': [1] * 14, 'bbox': [
        112, 92, 20, 20]}]}]}
    for which in ('trainval', 'test'):
        (root / 'Annotations' / ('wider_attribute_%s.json' % which)).write_text(json.dumps(ann))
    crop = wider.WiderAttribute(str(root), 'train', cache_dir=str(tmp_path / 'crops'))[0][0].astype(int)
    expected = cv2.resize(scene[92:100, 112:120], (256, 256), interpolation=cv2.INTER_AREA).astype(int)
    assert np.abs(crop - expected).mean() < 3                        # (a JPEG of it)
    assert crop[:, -16:, 0].mean() > 200 and crop[-16:, :, 0].mean() > 200
