"""MC-Loss (mcloss.py) against a NumPy transcription of the released supervisor(), the BCE formula, the
bounds of the diversity term, the CWA mask's counts, and finite differences."""
import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, nd

from common.errors import UserError
from related.mcloss.head import MCHead, MutualChannelLoss


def _head(num_classes, channels, hybrid, **kwargs):
    head = MCHead(num_classes, channels, **kwargs)
    head.initialize()
    if hybrid:
        head.hybridize()
    return head


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _supervisor(x, targets, keep, cnum):
    """The released CUB-200-2011.py supervisor(), line by line in NumPy: (loss_1, loss_2)."""
    n, k, height, width = x.shape
    branch = _softmax(x.reshape(n, k, height * width), 2).reshape(n, k, height, width)
    branch = branch.reshape(n, k // cnum, cnum, height, width).max(axis=2)         # my_MaxPool2d((1, cnum))
    branch = branch.reshape(n, k // cnum, height * width)
    loss_2 = 1.0 - 1.0 * np.mean(np.sum(branch, 2)) / cnum
    mask = np.tile(keep.reshape(1, k, 1, 1), (n, 1, 1, 1))                          # one mask for the batch
    branch_1 = (x * mask).reshape(n, k // cnum, cnum, height, width).max(axis=2)
    branch_1 = branch_1.mean(axis=(2, 3))                                           # AvgPool2d(height)
    log_p = branch_1 - branch_1.max(1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
    loss_1 = -np.mean(log_p[np.arange(n), targets])
    return loss_1, loss_2, branch_1


def _keep(num_classes, xi, drop, rng):
    keep = np.ones((num_classes, xi), np.float32)
    for row in keep:
        row[rng.choice(xi, drop, replace=False)] = 0
    return keep


@pytest.mark.parametrize('hybrid', [False, True])
def test_ce_mode_equals_the_released_supervisor(hybrid):
    rng = np.random.RandomState(0)
    x = np.maximum(rng.randn(4, 15, 7, 7), 0).astype(np.float32) * 3                 # post-ReLU, C=5, xi=3
    targets = rng.randint(0, 5, 4)
    keep = _keep(5, 3, 1, rng)
    loss_1, loss_2, logits_ref = _supervisor(x.astype(np.float64), targets, keep, 3)
    head = _head(5, 15, hybrid, mode='ce')
    logits, div = head(nd.array(x), nd.array(keep))
    np.testing.assert_allclose(logits.asnumpy(), logits_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(div.asnumpy().mean(), loss_2, atol=1e-6)
    dis = MutualChannelLoss(1.0, 0.0, mode='ce')(logits, div, nd.array(targets))
    np.testing.assert_allclose(dis.asnumpy().mean(), loss_1, atol=1e-5)
    total = MutualChannelLoss(1.5, 20.0, mode='ce')(logits, div, nd.array(targets))
    np.testing.assert_allclose(total.asnumpy().mean(), 1.5 * loss_1 + 20 * loss_2, rtol=1e-5)


def test_bce_mode_is_the_masked_per_attribute_bce_with_a_bias():
    rng = np.random.RandomState(1)
    x = np.maximum(rng.randn(6, 12, 5, 5), 0).astype(np.float32)
    keep = _keep(4, 3, 1, rng)
    head = _head(4, 14, False)                               # 14 channels: xi = 3, the last 2 left out
    head.bias.set_data(nd.array([-1.0, 0.5, 0.0, 2.0]))
    x14 = np.concatenate([x, rng.randn(6, 2, 5, 5).astype(np.float32)], axis=1)
    logits, div = head(nd.array(x14), nd.array(keep))
    _, _, g = _supervisor(x.astype(np.float64), np.zeros(6, int), keep, 3)
    z = g + np.array([-1.0, 0.5, 0.0, 2.0])
    np.testing.assert_allclose(logits.asnumpy(), z, rtol=1e-5, atol=1e-6)
    labels = rng.randint(0, 2, (6, 4)).astype(np.float32)
    mask = (rng.rand(6, 4) > 0.3).astype(np.float32)
    p = 1 / (1 + np.exp(-z))
    bce = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    loss = MutualChannelLoss(1.5, 20.0)
    got = loss(logits, div, nd.array(labels), nd.array(mask)).asnumpy()
    np.testing.assert_allclose(got, 1.5 * (bce * mask).mean(1) + 20 * div.asnumpy(), rtol=1e-5)
    flipped = np.where(mask > 0, labels, 1 - labels)                      # unspecified labels change nothing
    np.testing.assert_allclose(loss(logits, div, nd.array(flipped), nd.array(mask)).asnumpy(), got, rtol=1e-6)


@pytest.mark.parametrize('hybrid', [False, True])
def test_diversity_is_bounded_and_reaches_both_ends(hybrid):
    xi, num_classes = 4, 3
    head = _head(num_classes, num_classes * xi, hybrid, mode='ce')
    keep = nd.ones((num_classes, xi))
    rng = np.random.RandomState(2)
    _, div = head(nd.array(rng.randn(8, 12, 6, 6) * 3), keep)
    assert ((div.asnumpy() >= -1e-6) & (div.asnumpy() <= 1 - 1 / xi + 1e-6)).all()
    # identical channels
    same = np.repeat(rng.randn(2, num_classes, 1, 6, 6), xi, axis=2).reshape(2, 12, 6, 6)
    np.testing.assert_allclose(head(nd.array(same), keep)[1].asnumpy(), 1 - 1 / xi, atol=1e-6)
    peaks = np.zeros((2, 12, 6, 6))
    for channel in range(12):                                          # each channel peaks somewhere else
        peaks[:, channel, channel // 6, channel % 6] = 30
    np.testing.assert_allclose(head(nd.array(peaks), keep)[1].asnumpy(), 0, atol=1e-5)


@pytest.mark.parametrize('hybrid', [False, True])
def test_cwa_drops_exactly_int_xi_p_channels_per_group_with_one_mask_per_batch(hybrid):
    xi, num_classes, drop_rate = 5, 3, 0.4                              # int(5 * 0.4) = 2 zeros per group
    head = _head(num_classes, num_classes * xi, hybrid, mode='ce', drop_rate=drop_rate)
    # sample j lights channel j of every group: its logits say whether that channel was kept; the batch
    # repeats the probes, so a mask per sample would show as two different halves
    probes = np.zeros((2 * xi, num_classes * xi, 3, 3), np.float32)
    for j in range(2 * xi):
        probes[j, [g * xi + j % xi for g in range(num_classes)]] = 1
    x = nd.array(probes)

    def mask():
        logits = head(x)[0].asnumpy()
        np.testing.assert_array_equal(logits[:xi], logits[xi:])
        return logits[:xi].T                                             # C x xi of 0/1
    masks = [mask() for _ in range(6)]
    for m in masks:
        assert set(np.unique(m)) <= {0.0, 1.0} and ((m == 0).sum(1) == int(xi * drop_rate)).all()
    assert len({m.tobytes() for m in masks}) > 1                          # redrawn on every call
    mx.random.seed(7)
    first = mask()
    mx.random.seed(7)
    np.testing.assert_array_equal(mask(), first)                         # reproducible from the seed


def test_gradients_match_finite_differences():
    rng = np.random.RandomState(3)
    head = _head(3, 9, False)
    head.cast('float64')
    head.bias.set_data(nd.array([0.3, -0.2, 0.1], dtype='float64'))
    keep = nd.array(_keep(3, 3, 1, rng), dtype='float64')
    x = nd.array(rng.randn(2, 9, 4, 4), dtype='float64')
    labels = nd.array(rng.randint(0, 2, (2, 3)), dtype='float64')
    mask = nd.array([[1, 1, 0], [1, 0, 1]], dtype='float64')
    loss = MutualChannelLoss(1.5, 20.0)

    def value(inp):
        logits, div = head(inp, keep)
        return loss(logits, div, labels, mask).sum()
    x.attach_grad()
    with autograd.record():
        total = value(x)
    total.backward()
    analytic, bias_grad = x.grad.asnumpy(), head.bias.grad().asnumpy()
    eps = 1e-6
    for index in [tuple(rng.randint(0, s) for s in x.shape) for _ in range(12)]:
        up, down = x.copy(), x.copy()
        up[index] += eps
        down[index] -= eps
        numeric = (value(up).asscalar() - value(down).asscalar()) / (2 * eps)
        assert analytic[index] == pytest.approx(numeric, rel=1e-5, abs=1e-8)
    for c in range(3):
        b = head.bias.data().asnumpy()
        head.bias.set_data(nd.array(b + eps * np.eye(3)[c], dtype='float64'))
        f_up = value(x).asscalar()
        head.bias.set_data(nd.array(b - eps * np.eye(3)[c], dtype='float64'))
        f_down = value(x).asscalar()
        head.bias.set_data(nd.array(b, dtype='float64'))
        assert bias_grad[c] == pytest.approx((f_up - f_down) / (2 * eps), rel=1e-5, abs=1e-8)


def test_channel_bookkeeping():
    head = _head(14, 2048, False)                                       # ResNet-101 on WIDER's 14 attributes
    assert head.xi == 146 and head.used_channels == 2044 and head.drop == int(146 * 0.4)
    x = nd.random.uniform(shape=(2, 2048, 2, 2))
    keep = nd.ones((14, 146))
    before = [o.asnumpy() for o in head(x, keep)]
    x[:, 2044:] = 100                                                   # channels left out change nothing
    for a, b in zip(before, head(x, keep)):
        np.testing.assert_array_equal(a, b.asnumpy())
    projected = _head(14, 2048, False, xi=3)
    projected(x, nd.ones((14, 3)))
    assert projected.projection.weight.shape == (42, 2048, 1, 1) and projected.used_channels is None
    with pytest.raises(UserError, match='at least 2 channels per attribute.*--mc-xi'):
        MCHead(14, 20)


# ------------------------------------------------------------------------------------------------
# In the network and the training step
# ------------------------------------------------------------------------------------------------

def _mc_net(hybrid, **mc):
    from engine.build import build_net
    cfg = dict(backbone='resnet18_v1', num_classes=4, preset='demo', input_size=48, mc_loss=True, **mc)
    net = build_net(cfg)
    if hybrid:
        net.hybridize(static_alloc=True, static_shape=True)
    return net


@pytest.mark.parametrize('hybrid', [False, True])
def test_the_mc_head_reads_the_pooled_map_and_leaves_the_predictions_alone(hybrid):
    """The head sees the map that enters the global pooling (its logits are the CCMP + GAP of that map
    plus the bias), and the network's outputs are the same with the head on or off, and the same as
    a network without it holding the same weights."""
    from engine.build import build_net
    net = _mc_net(hybrid, mc_drop=0.0)                      # no channel masking: a deterministic head
    net.aux_head.bias.set_data(nd.array([0.5, -1.0, 0.25, 0.0]))
    x = nd.array(np.random.RandomState(0).randn(3, 3, 48, 48))
    off = [o.asnumpy() for o in _flat(net(x))]
    net.return_aux = True
    outs = net(x)
    on = [o.asnumpy() for o in _flat(outs[:3])]
    for a, b in zip(off, on):
        np.testing.assert_array_equal(a, b)
    fmap = x
    for segment in net.backbone.segments:
        fmap = segment(fmap)
    fmap = net.backbone.head(fmap).asnumpy().astype(np.float64)                   # N, 512, 2, 2
    xi = 512 // 4
    groups = fmap[:, :4 * xi].reshape(3, 4, xi, -1)
    expected = groups.max(axis=2).mean(axis=-1) + [0.5, -1.0, 0.25, 0.0]
    np.testing.assert_allclose(outs.aux[0].asnumpy(), expected, rtol=1e-5, atol=1e-6)
    soft = np.exp(groups - groups.max(-1, keepdims=True))
    soft /= soft.sum(-1, keepdims=True)
    np.testing.assert_allclose(outs.aux[1].asnumpy(), 1 - soft.max(axis=2).sum(-1).mean(-1) / xi, rtol=1e-5)
    net.return_aux = False
    plain = build_net(dict(backbone='resnet18_v1', num_classes=4, preset='demo', input_size=48))
    mine = {n[len(net.prefix):]: p for n, p in net.collect_params().items()}
    for name, param in plain.collect_params().items():
        param.set_data(mine[name[len(plain.prefix):]].data())
    for a, b in zip(off, _flat(plain(x))):
        np.testing.assert_array_equal(a, b.asnumpy())
    with pytest.raises(ValueError, match='cannot both be on'):
        net.return_aux = True
        net.return_attention = True
        net(x)


def _flat(outs):
    return [outs[0]] + list(outs[1]) + [outs[2]]


def test_the_training_step_adds_the_weighted_mc_terms_and_logs_them_unweighted():
    """train_step with MC-Loss: the logged Eq. 7 loss is unchanged, the logged terms are the NumPy
    BCE and diversity of the head's outputs, and the head's bias moves by -lr * w_dis * dL_dis/db (the
    weighted term really is in the backward pass); predict switches the head off again."""
    from engine import steps
    from losses import PredictionHistory, VAALoss
    from engine.trainers import StageTrainers
    rng = np.random.RandomState(2)
    net = _mc_net(False, mc_drop=0.0)
    x = nd.array(rng.randn(4, 3, 48, 48))
    y = nd.array(rng.randint(0, 2, (4, 4)))
    m = nd.array(rng.rand(4, 4) > 0.2)
    with autograd.train_mode():
        primary, taps, _ = net(x)
        net.return_aux = True
        logits, div = [a.asnumpy().astype(np.float64) for a in net(x).aux]
    vaa = VAALoss(gamma=0.5)
    expected_vaa = vaa(primary, taps, y, m).sum().asscalar()
    lr, w_dis, w_div = 0.1, 1.5, 20.0
    trainers = StageTrainers(net, [mx.cpu()], 'sgd', {'learning_rate': lr})
    bias = net.aux_head.bias.data().asnumpy().copy()
    loss = VAALoss(gamma=0.5, aux=MutualChannelLoss(w_dis, w_div))
    step = steps.train_step(net, loss, trainers, PredictionHistory(4, 4), (x, y, m, nd.arange(4)), 0,
                            [mx.cpu()])                 # (net.return_aux is on: the MC head's outputs)
    yy, mm = y.asnumpy(), m.asnumpy()
    bce = -(yy * -np.logaddexp(0, -logits) + (1 - yy) * -np.logaddexp(0, logits))
    assert step.loss.asscalar() == pytest.approx(expected_vaa, rel=1e-5)
    assert step.terms['mc_dis'].asscalar() == pytest.approx((bce * mm).mean(1).sum(), rel=1e-5)
    assert step.terms['mc_div'].asscalar() == pytest.approx(div.sum(), rel=1e-5)
    grad = w_dis * ((1 / (1 + np.exp(-logits)) - yy) * mm / 4).sum(0) / 4        # batch-mean gradient on b
    mx.nd.waitall()  # reading a parameter during oneDNN's ops can be wrong (README, CPUs)
    np.testing.assert_allclose(net.aux_head.bias.data().asnumpy(), bias - lr * grad, rtol=1e-4, atol=1e-7)
    assert net.return_aux
    steps.predict(net, [(x, y, m, nd.arange(4))], [mx.cpu()])
    assert not net.return_aux


def test_mc_loss_flags_are_checked_and_kept_in_the_config():
    from engine import config
    import related
    cfg = config.resolve_config(config.defaults(mc_loss=True, mc_weights='2,10', dataset='demo'))
    assert related.mcloss.settings(cfg).weights == (2.0, 10.0) and 'mc_weights' in config.RESUME_FIXED
    for flags, message in [(dict(mc_weights='1.5'), 'two numbers'), (dict(mc_weights='a,b'), 'two numbers'),
                           (dict(mc_drop=1.0), r'--mc-drop must be in \[0, 1\)'), (dict(mc_xi=1), '--mc-xi'),
                           (dict(finetune=True), '--finetune')]:
        with pytest.raises(UserError, match=message):
            config.resolve_config(config.defaults(mc_loss=True, dataset='demo', **flags))
