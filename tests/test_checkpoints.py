"""The authors' saved_models/ layout: file names, keys, and numerically identical predictions."""
import gc
import os

import numpy as np
import pytest
import mxnet as mx
from mxnet import nd

from engine import checkpoints
from common.errors import UserError
from model import get_vaa_net
from tools.upstream_reference import UpstreamReference

SIZE = 64


def _randomise_bn(params):
    """Non-trivial BN statistics and affine terms, so loading them wrongly would show."""
    for name, p in params.items():
        if name.endswith(('running_var', 'gamma')):
            p.set_data(nd.random.uniform(0.8, 1.2, shape=p.shape))
        elif name.endswith(('running_mean', 'beta')):
            p.set_data(nd.random.normal(0, 0.05, shape=p.shape))


@pytest.fixture(scope='module')
def reference_files(tmp_path_factory):
    """A ResNet-101 upstream-preset network built and saved the way the authors' code does."""
    folder = tmp_path_factory.mktemp('saved_models')
    mx.random.seed(7)
    ref = UpstreamReference(101, 14, 'upstream', SIZE)
    _randomise_bn(ref.parameters())
    ref.save(str(folder))
    x = nd.random.normal(shape=(3, 3, SIZE, SIZE))
    primary, taps, fused = ref(x)
    return str(folder), x, (primary, taps, fused)


def test_upstream_file_names_and_keys_are_spec8(reference_files):
    folder, _, _ = reference_files
    expected_files = {'backbone_resnet.params'} | {'%s_stage_%d.params' % (m, n) for m in
                                                   ('fconv', 'fatt', 'fsr') for n in (2, 3, 4)}
    assert set(os.listdir(folder)) == expected_files
    keys = set(nd.load(os.path.join(folder, 'backbone_resnet.params')))
    assert len(keys) == 588
    assert {'conv0_weight', 'stage3_conv12_weight', 'dense1_weight', 'dense1_bias'} <= keys
    assert not any(k.startswith('resnetv10_') for k in keys)
    assert set(nd.load(os.path.join(folder, 'fconv_stage_2.params'))) == {'conv0_weight', 'conv0_bias'}
    bn = ('gamma', 'beta', 'running_mean', 'running_var')
    fatt = {'conv%d_%s' % (i, w) for i in range(3) for w in ('weight', 'bias')} | \
        {'batchnorm%d_%s' % (i, b) for i in range(2) for b in bn}
    assert set(nd.load(os.path.join(folder, 'fatt_stage_3.params'))) == fatt
    fsr = {'conv%d_%s' % (i, w) for i in range(3) for w in ('weight', 'bias')} | \
        {'batchnorm%d_%s' % (i, b) for i in range(3) for b in bn} | {'dense0_weight', 'dense0_bias'}
    assert set(nd.load(os.path.join(folder, 'fsr_stage_4.params'))) == fsr


def test_our_writer_produces_the_same_files_and_keys(reference_files, tmp_path):
    folder, _, _ = reference_files
    net = get_vaa_net('resnet101_v1', 14, 'upstream', SIZE)
    checkpoints.save_upstream(net, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(os.listdir(folder))
    for name in os.listdir(folder):
        theirs = nd.load(os.path.join(folder, name))
        ours = nd.load(os.path.join(str(tmp_path), name))
        assert set(ours) == set(theirs), name
        assert all(ours[k].shape == theirs[k].shape for k in ours), name


def test_authors_checkpoint_gives_identical_predictions(reference_files):
    folder, x, (primary, taps, fused) = reference_files
    net = get_vaa_net('resnet101_v1', 14, 'upstream', SIZE)
    checkpoints.load_upstream(net, folder)
    for hybrid in (False, True):
        if hybrid:
            net.hybridize(static_alloc=True, static_shape=True)
        p, t, f = net(x)
        assert len(t) == len(taps) == 3
        np.testing.assert_allclose(p.asnumpy(), primary.asnumpy(), rtol=1e-5, atol=1e-6)
        for a, b in zip(t, taps):
            np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(f.asnumpy(), fused.asnumpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('preset', ['upstream', 'paper', 'demo'])
def test_round_trip_through_upstream_layout(tmp_path, preset):
    """Ours -> files -> ours gives identical logits; ours -> files -> authors' construction too."""
    net = get_vaa_net('resnet50_v1', 5, preset, SIZE)
    _randomise_bn(net.collect_params())
    x = nd.random.normal(shape=(2, 3, SIZE, SIZE))
    before = [o.asnumpy() for o in (net(x)[0], net(x)[2])]
    checkpoints.save_upstream(net, str(tmp_path))
    other = get_vaa_net('resnet50_v1', 5, preset, SIZE)
    checkpoints.load_upstream(other, str(tmp_path))
    after = [o.asnumpy() for o in (other(x)[0], other(x)[2])]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    ref = UpstreamReference(50, 5, preset, SIZE)
    ref.load(str(tmp_path))
    np.testing.assert_allclose(ref(x)[2].asnumpy(), before[1], rtol=1e-5, atol=1e-6)


def _refused(net_args, folder, match):
    """load_upstream into a fresh get_vaa_net(*net_args) fails with a UserError matching ``match``. The
    network is collected before the next one is built (Gluon blocks hold reference cycles, which only the
    collector frees: four such networks at once held 2.7 GB)."""
    with pytest.raises(UserError, match=match):
        checkpoints.load_upstream(get_vaa_net(*net_args), folder)
    gc.collect()


def test_mismatched_checkpoints_are_user_errors(reference_files, tmp_path):
    folder, _, _ = reference_files
    _refused(('resnet101_v1', 13, 'upstream', SIZE), folder, r'dense1_weight has shape \(14, 2048\).*13 '
                                                             r'classes')
    _refused(('resnet101_v1', 14, 'paper', SIZE), folder, 'preset paper')
    _refused(('resnet50_v1', 14, 'upstream', SIZE), folder, 'missing keys')
    _refused(('resnet18_v1', 14, 'upstream', SIZE), str(tmp_path / 'no'), 'does not exist')
    net = get_vaa_net('resnet18_v1', 3, 'paper', SIZE)
    checkpoints.save_upstream(net, str(tmp_path))
    os.remove(str(tmp_path / 'fsr_stage_4.params'))
    with pytest.raises(UserError, match='missing checkpoint file .*fsr_stage_4.params'):
        checkpoints.load_upstream(net, str(tmp_path))
    with open(str(tmp_path / 'fsr_stage_4.params'), 'wb') as f:
        f.write(b'\x80\x04garbage')
    with pytest.raises(UserError, match='not an MXNet parameter file'):
        checkpoints.load_upstream(net, str(tmp_path))


def test_interrupted_write_keeps_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / 'a.params')
    checkpoints.atomic_save_ndarrays(path, {'w': nd.ones((2,))})

    def broken_save(fname, data):
        with open(fname, 'wb') as f:
            f.write(b'partial')
        raise IOError('disk full')
    monkeypatch.setattr(checkpoints.nd, 'save', broken_save)
    with pytest.raises(IOError):
        checkpoints.atomic_save_ndarrays(path, {'w': nd.zeros((2,))})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ['a.params']
    np.testing.assert_array_equal(nd.load(path)['w'].asnumpy(), [1, 1])
