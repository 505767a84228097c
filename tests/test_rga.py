"""RGA-S / RGA-C against a NumPy float64 forward written from the released rga_modules.py, invariants,
finite-difference gradients, and the module inside the network."""
import numpy as np
import pytest
import mxnet as mx
from mxnet import autograd, gluon, nd

from engine import checkpoints
from common.errors import UserError
from engine.build import build_net
from related.rga.modules import RGAModule


def _params(block):
    return {name[len(block.prefix):]: p.data().asnumpy().astype(np.float64)
            for name, p in block.collect_params().items()}


def _embed(p, name, x, train, relu=True):
    """1x1 conv (no bias) + BN (+ ReLU) on N x C x H x W, BN with batch or running statistics."""
    y = np.einsum('oc,nchw->nohw', p[name + 'conv0_weight'][:, :, 0, 0], x)
    if train:
        mean, var = y.mean(axis=(0, 2, 3)), y.var(axis=(0, 2, 3))
    else:
        mean, var = p[name + 'batchnorm0_running_mean'], p[name + 'batchnorm0_running_var']
    y = (y - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5)
    gamma, beta = p[name + 'batchnorm0_gamma'], p[name + 'batchnorm0_beta']
    y = y * gamma[None, :, None, None] + beta[None, :, None, None]
    return np.maximum(y, 0) if relu else y


def _w(p, name, y, train):
    return _embed(p, name + 'out_', _embed(p, name + 'hidden_', y, train), train, relu=False)


def numpy_rga(block, x, train, spatial=True, channel=True):
    """The released RGA forward in float64 (x: N x C x H x W)."""
    p = _params(block)
    n_, c, h, w = x.shape
    n = h * w
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    if spatial:
        theta = _embed(p, 'theta_s_', x, train).reshape(n_, -1, n)
        phi = _embed(p, 'phi_s_', x, train).reshape(n_, -1, n)
        g = np.einsum('bci,bcj->bij', theta, phi)                          # G[i, j] = r_ij
        incoming = g.transpose(0, 2, 1).reshape(n_, n, h, w)               # channel p at q: r_qp
        outgoing = g.reshape(n_, n, h, w)                                  # channel p at q: r_pq
        joint = _embed(p, 'gg_s_', np.concatenate([incoming, outgoing], 1), train)
        own = _embed(p, 'gx_s_', x, train).mean(1, keepdims=True)
        a_s = sig(_w(p, 'W_s_', np.concatenate([own, joint], 1), train))
        x = a_s * x
    if channel:
        nodes = x.reshape(n_, c, n).transpose(0, 2, 1)[..., None]          # N x HW x C x 1
        theta = _embed(p, 'theta_c_', nodes, train)[..., 0].transpose(0, 2, 1)   # N x C x N'
        phi = _embed(p, 'phi_c_', nodes, train)[..., 0]                   # N x N' x C
        g = np.einsum('bik,bkj->bij', theta, phi)                           # C x C
        joint = _embed(p, 'gg_c_', np.concatenate([g.transpose(0, 2, 1)[..., None], g[..., None]], 1), train)
        own = _embed(p, 'gx_c_', nodes, train).mean(1, keepdims=True)
        a_c = sig(_w(p, 'W_c_', np.concatenate([own, joint], 1), train).transpose(0, 2, 1, 3))
        x = a_c * x
    return x


def _block(mode, c, h, w, seed=0):
    mx.random.seed(seed)
    block = RGAModule(c, h, w, 's' in mode, 'c' in mode, prefix='rga_')
    block.initialize()
    for name, p in block.collect_params().items():             # non-trivial running statistics
        if name.endswith('running_mean'):
            p.set_data(nd.random.normal(0, 0.3, shape=p.shape))
        elif name.endswith('running_var'):
            p.set_data(nd.random.uniform(0.5, 2, shape=p.shape))
    return block


@pytest.mark.parametrize('mode', ['s', 'c', 'sc'])
@pytest.mark.parametrize('shape', [(16, 4, 4), (32, 6, 3)])
def test_rga_forward_equals_the_released_computation(mode, shape):
    c, h, w = shape
    block = _block(mode, c, h, w)
    x = np.random.RandomState(1).randn(3, c, h, w)
    for hybrid in (False, True):
        if hybrid:
            block.hybridize()
        for train in (False, True):
            with autograd.record(train_mode=train):
                got = block(nd.array(x)).asnumpy()
            expected = numpy_rga(block, x, train, 's' in mode, 'c' in mode)
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5,
                                       err_msg='%s train=%s' % (hybrid, train))


def test_spatial_weights_are_per_position_and_channel_weights_per_channel():
    x = nd.array(np.random.RandomState(2).rand(2, 16, 4, 4) + 0.5)          # positive: ratios defined
    block = _block('s', 16, 4, 4)
    ratio = (block(x) / x).asnumpy()
    assert (ratio > 0).all() and (ratio < 1).all()
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:, :1], ratio.shape), rtol=1e-5)
    block = _block('c', 16, 4, 4)
    ratio = (block(x) / x).asnumpy()
    assert (ratio > 0).all() and (ratio < 1).all()
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:, :, :1, :1], ratio.shape), rtol=1e-5)
    # the returned maps are those weights
    block.return_attention = True
    out, spatial, channel = block(x)
    np.testing.assert_allclose(channel.asnumpy()[:, :, 0, 0], ratio[:, :, 0, 0], rtol=1e-5)
    assert spatial.shape == (2, 1, 4, 4) and np.all(spatial.asnumpy() == 1)


def test_rga_gradients_match_finite_differences():
    block = _block('sc', 6, 3, 3, seed=3)
    block.cast('float64')
    x = nd.array(np.random.RandomState(4).randn(2, 6, 3, 3), dtype='float64')
    r = nd.array(np.random.RandomState(5).randn(2, 6, 3, 3), dtype='float64')
    weight = block.theta_s[0].weight
    x.attach_grad()
    with autograd.record():                # (batch statistics: MXNet's BN backward assumes them)
        loss = (block(x) * r).sum()
    loss.backward()
    analytic_x, analytic_w = x.grad.asnumpy(), weight.grad().asnumpy()

    def value():
        with autograd.record():            # (a forward pass alone leaves the running statistics as they are)
            return float((block(x) * r).sum().asscalar())
    eps = 1e-6
    for arr, analytic, positions in ((x, analytic_x, [(0, 1, 2, 0), (1, 5, 0, 2)]),
                                     (weight.data(), analytic_w, [(0, 1, 0, 0), (0, 4, 0, 0)])):
        for pos in positions:
            old = arr[pos].asscalar()
            arr[pos] = old + eps
            up = value()
            arr[pos] = old - eps
            down = value()
            arr[pos] = old
            assert (up - down) / (2 * eps) == pytest.approx(analytic[pos], rel=1e-4, abs=1e-8)


def test_rga_in_the_network_keeps_the_zoo_and_adds_a_trained_module(tmp_path):
    cfg = dict(backbone='resnet18_v1', num_classes=4, preset='paper', input_size=64, rga='sc', rga_stages='3')
    net = build_net(cfg)
    plain = build_net(dict(cfg, rga='none'))
    zoo = lambda n: sorted(k[len(n.prefix):] for k in n.collect_params() if 'resnetv10_' in k)  # noqa: E731
    assert zoo(net) == zoo(plain)                                   # the model-zoo part is unchanged
    rga = net.stage_modules()['rga']
    assert sorted(rga.keys()) == sorted(k for k in net.collect_params() if '_rga3_' in k)
    assert len(rga.keys()) > 20
    # the s3 tap is the zoo's stage 3 followed by the RGA block
    for name, p in plain.collect_params().items():
        p.set_data(net.collect_params()[net.prefix + name[len(plain.prefix):]].data())
    x = nd.random.normal(shape=(2, 3, 64, 64))
    block = [u for u in net.backbone.segments[0] if hasattr(u, 'use_spatial')][0]
    np.testing.assert_allclose(net.backbone(x)[0].asnumpy(), block(plain.backbone(x)[0]).asnumpy(), rtol=1e-5,
                               atol=1e-6)
    net.freeze(True, fix_statistics=True)                 # the paper's first phase
    assert all(p.grad_req == 'write' for n, p in rga.items() if not n.endswith((
        'running_mean', 'running_var')))
    assert all(p.grad_req == 'null' for p in net.backbone.feature_params())
    net.freeze(False)
    with pytest.raises(UserError, match="no place for rga sc"):
        checkpoints.save_upstream(net, str(tmp_path / 'saved_models'))
    # hybridized export and import
    net.hybridize()
    expected = net(x)[2].asnumpy()
    net.export(str(tmp_path / 'rga'))
    loaded = gluon.SymbolBlock.imports(str(tmp_path / 'rga-symbol.json'), ['data'],
                                       str(tmp_path / 'rga-0000.params'))
    np.testing.assert_allclose(loaded(x)[-1].asnumpy(), expected, rtol=1e-5, atol=1e-6)


def test_small_maps_and_densenet():
    net = build_net(dict(backbone='resnet18_v1', num_classes=3, preset='demo', input_size=48, rga='sc'))
    # stage 4 is 2x2: 4 // 8 -> 1 channel
    assert 'rga' in net.stage_modules() and net(nd.zeros((2, 3, 48, 48)))[2].shape == (2, 3)
    with pytest.raises(UserError, match='ResNet'):
        build_net(dict(backbone='densenet121', num_classes=3, preset='paper', input_size=64, rga='s'))


# The layouts MXNet 1.9's oneDNN has failed to differentiate once hybridized: the channel part's
# positions-into-channels reshape (a transpose, 128 x 8 x 8), and the gradient of a 4-D concat of two
# N-channel maps ("could not construct a sub-memory": sides 14, 18 and 30, 68 channels; 14 x 14 is
# ResNet's stage 3 at 224 pixels). Every side up to 30 and the channel counts of ResNet and DenseNet
# stages must train.
BACKWARD_CASES = ([('sc', (128, 8, 8)), ('sc', (256, 4, 4)), ('sc', (512, 2, 2))]
                  + [('s', (8, side, side)) for side in range(1, 31)]
                  + [('c', (c, 4, 4)) for c in (64, 68, 128, 256, 512, 640, 1024, 1664, 2048)])


@pytest.mark.parametrize('mode,shape', BACKWARD_CASES,
                         ids=['%s-%dx%dx%d' % ((m,) + s) for m, s in BACKWARD_CASES])
def test_hybridized_training_passes_through_every_map_size(mode, shape):
    block = _block(mode, *shape)
    block.hybridize(static_alloc=True, static_shape=True)
    x = nd.random.normal(shape=(2,) + shape)
    x.attach_grad()
    with autograd.record():
        loss = block(x).sum()
    loss.backward()
    assert np.isfinite(x.grad.asnumpy()).all()
