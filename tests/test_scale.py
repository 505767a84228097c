"""Speed and scale: hybridized vs imperative training step, several devices, several workers, AMP."""
import gc
import os
import subprocess
import sys

import numpy as np
import pytest
import mxnet as mx
from mxnet import autograd, nd

from engine import distributed
from datasets.base import EpochSampler
from losses import PredictionHistory, VAALoss
from model import get_vaa_net
from engine.distributed import use_sync_batchnorm
from engine.steps import train_step
from engine.trainers import StageTrainers
from tests import fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_steps(ctx, hybrid=True, steps=2, batch=8, amp=False, seed=0, size=64, dtype='float32',
                 preset='upstream'):
    """A few steps of the train.py update (``steps.train_step``) on fixed data; returns (losses, grads of
    step 1, params)."""
    gc.collect()        # the previous call's network (Gluon blocks hold reference cycles) goes first
    mx.random.seed(seed)
    np.random.seed(seed)
    net = get_vaa_net('resnet18_v1', 3, preset, size, ctx=ctx)
    net.cast(dtype)
    if hybrid:
        net.hybridize(static_alloc=True, static_shape=True)
    trainers = StageTrainers(net, ctx, 'sgd', {'learning_rate': 0.01, 'momentum': 0.9, 'wd': 5e-4},
                             kvstore=distributed.create_kvstore('device', len(ctx)), amp=amp)
    loss_fn = VAALoss(np.full(3, 1.2), np.full(3, 0.8), gamma=0.5)
    history = PredictionHistory(batch, 3, start_epoch=0, use_epoch=0)
    for epoch in (0, 1):
        history.update(np.arange(batch), nd.array(np.tile(np.random.rand(batch // 2, 3), (2, 1))), epoch)
    history.start_epoch = 3            # the steps (epoch 2) read these weights and store nothing more
    rng = np.random.RandomState(1)
    half = batch // 2     # two identical halves: per-device BN statistics equal the whole batch's
    x = nd.array(np.tile(rng.randn(half, 3, size, size), (2, 1, 1, 1)), dtype=dtype)
    y = nd.array(np.tile(rng.randint(0, 2, (half, 3)), (2, 1)), dtype=dtype)
    m = nd.array(np.tile(rng.rand(half, 3) > 0.1, (2, 1)), dtype=dtype)
    index = nd.array(np.r_[np.arange(half), np.arange(half) + half], dtype='int64')
    losses, grads = [], None
    for step in range(steps):
        out = train_step(net, loss_fn, trainers, history, (x, y, m, index), 2, ctx)
        losses.append(float(out.loss.asscalar()))
        if step == 0:      # the update leaves the all-reduced gradients in place
            grads = {k[len(net.prefix):]: p.grad(ctx[0]).asnumpy() for k, p in net.collect_params().items()
                     if p.grad_req != 'null'}
    final = {k[len(net.prefix):]: p.data(ctx[-1]).asnumpy() for k, p in net.collect_params().items()}
    return losses, grads, final


def _close(a, b, rtol, atol):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


def test_hybridized_training_step_equals_imperative():
    l0, g0, p0 = _train_steps([mx.cpu()], hybrid=False)
    l1, g1, p1 = _train_steps([mx.cpu()], hybrid=True)
    np.testing.assert_allclose(l0, l1, rtol=1e-4)
    _close(g0, g1, 1e-3, 1e-5)
    _close(p0, p1, 1e-3, 1e-5)


def test_two_cpu_devices_equal_one_device_with_the_same_total_batch():
    """Split over two devices, gradients summed, one update per device: the same parameters as one
    device with the whole batch.

    The batch is two identical halves so that each device's BatchNorm statistics equal the whole
    batch's; everything else (split, all-reduce, per-device updaters) is exercised for real. In float64
    the two agree to rounding (float32 convolutions round differently for different batch sizes, and
    BatchNorm's backward amplifies that in a randomly initialised net). At 32 pixels (taps of 2 x 2 and
    1 x 1): MXNet's float64 kernels are its slow, memory-hungry reference ones (3.3 GB at 64 pixels).
    """
    l1, g1, p1 = _train_steps([mx.cpu(0)], hybrid=False, dtype='float64', size=32)
    l2, g2, p2 = _train_steps([mx.cpu(0), mx.cpu(1)], hybrid=False, dtype='float64', size=32)
    np.testing.assert_allclose(l1, l2, rtol=1e-10)
    _close(g1, g2, 1e-7, 1e-9)
    _close(p1, p2, 1e-7, 1e-9)


def test_two_cpu_devices_equal_one_device_in_the_float32_graph():
    """The same as above in float32, with the hybridized graph train.py runs, to float32 accuracy."""
    l1, _, p1 = _train_steps([mx.cpu(0)])
    l2, _, p2 = _train_steps([mx.cpu(0), mx.cpu(1)])
    np.testing.assert_allclose(l1, l2, rtol=2e-3)
    _close(p1, p2, 0, 1e-2)


def test_sync_batchnorm_swap_keeps_parameters_and_outputs():
    net = get_vaa_net('resnet18_v1', 3, 'paper', 32)
    names = sorted(net.collect_params().keys())
    x = nd.random.normal(shape=(4, 3, 32, 32))
    before = net(x)[2].asnumpy()
    assert use_sync_batchnorm(net, 1) == 30        # 20 in ResNet-18 + 5 per tap head
    assert sorted(net.collect_params().keys()) == names
    np.testing.assert_allclose(net(x)[2].asnumpy(), before, rtol=1e-4, atol=1e-4)


def test_loss_scaling_gives_the_same_update_and_skips_overflow():
    _, _, plain = _train_steps([mx.cpu()])
    _, _, scaled = _train_steps([mx.cpu()], amp=True)       # float32 here: scaling must change nothing
    _close(plain, scaled, 1e-4, 1e-6)

    net = get_vaa_net('resnet18_v1', 2, 'paper', 32)
    trainers = StageTrainers(net, [mx.cpu()], 'sgd', {'learning_rate': 0.1}, amp=True)
    scaling = trainers.scaling
    before = {k: p.data().asnumpy() for k, p in net.collect_params().items()}
    with autograd.record():
        loss = net(nd.random.normal(shape=(2, 3, 32, 32)))[2].sum()
    loss.backward()
    params = list(net.collect_params().values())
    params[0].grad()[:] = np.inf
    start = scaling.scale
    assert trainers.step(2) is False
    assert scaling.skipped == 1 and scaling.scale == start / 2
    mx.nd.waitall()  # reading a parameter during oneDNN's ops can be wrong (README, CPUs)
    for k, p in net.collect_params().items():
        if p.grad_req != 'null':            # (the forward pass itself moves the BN running statistics)
            np.testing.assert_array_equal(before[k], p.data().asnumpy(), err_msg=k)


def test_sharded_sampler_gives_disjoint_equal_fixed_shards():
    shards = [EpochSampler(23, True, seed=1, shard=r, num_shards=3) for r in range(3)]
    for epoch in (0, 5):
        seen = []
        for s in shards:
            s.set_epoch(epoch)
            keys = list(s)
            assert len(keys) == 7 == len(s)
            seen.append({k - epoch * 23 for k in keys})
        assert not (seen[0] & seen[1]) and not (seen[1] & seen[2])
        assert all(i % 3 == r for r, idx in enumerate(seen) for i in idx)


def _run(args, env=None, timeout=fixtures.SUBPROCESS_TIMEOUT):
    return subprocess.run([sys.executable] + args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=timeout, env=dict(os.environ, **(env or {})))


def test_dist_sync_two_workers_end_with_identical_parameters(tmp_path, demo_path):
    out = str(tmp_path / 'dist')
    proc = _run(['tools/launch.py', '-n', '2', '--threads', '1', '--', sys.executable, 'train.py',
                 '--kvstore', 'dist_sync',
                 '--data_path', demo_path, '--out', out, '--epochs', '1', '--limit', '96', '--batch_size',
                 '8',
                 '--input-size', '32', '--save-all-ranks'])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = nd.load(os.path.join(out, 'rank0.params')), nd.load(os.path.join(out, 'rank1.params'))
    keys = [k for k in a if k.startswith('param/')]
    assert len(keys) > 100
    for k in keys:
        np.testing.assert_array_equal(a[k].asnumpy(), b[k].asnumpy(), err_msg=k)
    log = open(os.path.join(out, 'train.log')).read()           # only rank 0 writes the run folder
    assert 'worker 0 of 2 (dist_sync)' in log and '[worker 1]' not in log
    assert '[1] ' in proc.stdout and 'Speed:' in proc.stdout


def test_amp_on_cpu_is_a_clear_error(tmp_path, demo_path):
    proc = _run(['train.py', '--amp', '--data_path', demo_path, '--out', str(tmp_path / 'amp'), '--epochs',
                 '1'])
    assert proc.returncode == 2
    assert 'error: --amp trains in float16, which needs a GPU' in proc.stderr
    assert 'Traceback' not in proc.stderr


def test_dist_sync_without_a_parameter_server_is_a_clear_error(tmp_path, demo_path):
    proc = _run(['train.py', '--kvstore', 'dist_sync', '--data_path', demo_path, '--out',
                 str(tmp_path / 'x')])
    assert proc.returncode == 2 and 'needs a parameter server' in proc.stderr


def test_syncbn_on_cpu_contexts_is_a_clear_error(tmp_path, demo_path):
    proc = _run(['train.py', '--syncbn', '--cpus', '2', '--data_path', demo_path, '--out',
                 str(tmp_path / 's'),
                 '--epochs', '1'])
    assert proc.returncode == 2 and '--syncbn needs GPUs' in proc.stderr


def test_thread_settings_fill_in_only_what_the_user_did_not_set():
    from common import machine
    env = {}
    note = machine.thread_settings(env)
    ours = dict(machine.WAIT_SETTINGS, OMP_NUM_THREADS=str(os.cpu_count() or 1),
                MXNET_CPU_PARALLEL_SIZE='2147483647')
    assert env == ours
    assert note == '%s (defaults; set one yourself to override it)' % ', '.join(
        '%s=%s' % (n, ours[n]) for n in machine.THREAD_VARIABLES if n in ours)
    env = {'OMP_NUM_THREADS': '1', 'MXNET_CPU_PARALLEL_SIZE': '1000'}
    note = machine.thread_settings(env)
    assert env['OMP_NUM_THREADS'] == '1' and env['MXNET_CPU_PARALLEL_SIZE'] == '1000'
    assert 'OMP_NUM_THREADS=1, MXNET_CPU_PARALLEL_SIZE=1000 (from your environment)' in note
    # the user's own wait policy (or spin count) stands alone: libgomp lets GOMP_SPINCOUNT outrank it
    for yours in ({'OMP_WAIT_POLICY': 'ACTIVE'}, {'GOMP_SPINCOUNT': '5'}):
        env = dict(yours)
        note = machine.thread_settings(env)
        assert {n: env[n] for n in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT') if n in env} == yours
        assert '%s=%s (from your environment)' % next(iter(yours.items())) in note


def test_a_new_environment_is_never_taken_for_one_the_scripts_filled():
    """thread_summary told the defaults from the user's own by the dict's id, and a freed dict's id passes
    to the next one: a user's OMP_NUM_THREADS=3 was then called one of our defaults."""
    from common import machine
    for _ in range(20):
        env = {}
        machine.thread_settings(env)
        del env                                     # freed: CPython gives its id to the next dict
        yours = {'OMP_NUM_THREADS': '3'}
        assert machine.thread_summary(yours) == 'OMP_NUM_THREADS=3 (from your environment)'


_COPY_PROBE = '''
import os, sys
sys.path.insert(0, %r)
from common import machine
machine.thread_settings()
import numpy as np
import pytest
import mxnet as mx
mx.nd.ones((2, 2)).asnumpy()                  # the engine and its OpenMP team are up
before = len(os.listdir('/proc/self/task'))
mx.nd.array(np.ones((4, 3, 224, 224), np.float32)).wait_to_read()     # a batch copied from NumPy
print(before, len(os.listdir('/proc/self/task')))
'''


@pytest.mark.skipif(not os.path.isdir('/proc/self/task') or (os.cpu_count() or 1) < 2,
                    reason='counts threads in /proc (Linux) and needs an OpenMP team of 2 or more')
def test_a_batch_copied_from_numpy_starts_no_second_openmp_team():
    """The scripts' MXNET_CPU_PARALLEL_SIZE (machine.thread_settings): a copy from NumPy into an NDArray
    on the Python thread makes no OpenMP team there (one more team than cores would stop libgomp's
    spinning for the rest of the process: every later operator wakes its threads from sleep). With
    MXNet's default threshold the same copy does start one, which is what this test would catch."""
    def threads(extra):
        env = dict(os.environ, OMP_NUM_THREADS='2')
        env.pop('MXNET_CPU_PARALLEL_SIZE', None)      # conftest's; the probe sets it as the scripts do
        env.update(extra)
        out = subprocess.run([sys.executable, '-c', _COPY_PROBE % ROOT], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, check=True).stdout.split()
        return [int(n) for n in out[-2:]]
    before, after = threads({})
    assert after == before
    before, after = threads({'MXNET_CPU_PARALLEL_SIZE': '200000'})       # MXNet's own default
    assert after > before
