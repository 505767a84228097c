"""AP-CNN (apcnn.py, apcnn_roi.py) against NumPy ports of the released model/resnet50.py:
generate_anchors_single_pyramid, get_att_roi with the "+1" NMS of lib/nms, get_roi_crop_feat with
PyTorch's align_corners=False bilinear resize; the pyramid and gates against NumPy convolutions; and
the behaviours a user relies on (train/test after hybridize, gradients through the zoom, shapes, export)."""
import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, nd

from related.apcnn.net import APCNNNet, PyramidAttentions, PyramidFeatures
from related.apcnn.roi import ROIPyramid, ROIZoom
from common.errors import UserError


# ------------------------------------------------------------------------------------------------
# NumPy ports of the reference
# ------------------------------------------------------------------------------------------------

def np_anchors(size, stride, anchor):
    """generate_anchors_single_pyramid([anchor], [1], [size, size], stride, 1)."""
    shifts = np.arange(0, size) * stride
    sx, sy = np.meshgrid(shifts, shifts)
    cx, cy = sx.reshape(-1), sy.reshape(-1)
    return np.stack([cx - 0.5 * anchor, cy - 0.5 * anchor, cx + 0.5 * anchor, cy + 0.5 * anchor], 1)


def np_nms(boxes, scores, thresh):
    """lib/nms cpu_nms: descending scores, "+1" areas, suppress at IoU >= thresh (float32 as the C code)."""
    boxes, scores = boxes.astype(np.float32), scores.astype(np.float32)
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind='stable')
    suppressed, keep = np.zeros(len(boxes), bool), []
    for a, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        for j in order[a + 1:]:
            if suppressed[j]:
                continue
            w = max(np.float32(0), min(x2[i], x2[j]) - max(x1[i], x1[j]) + 1)
            h = max(np.float32(0), min(y2[i], y2[j]) - max(y1[i], y1[j]) + 1)
            inter = np.float32(w * h)
            if inter / (areas[i] + areas[j] - inter) >= np.float32(thresh):
                suppressed[j] = True
    return np.array(keep, int)


def np_att_roi(att, stride, anchor, image_size, iou, topk, border=0.1):
    """get_att_roi for one sample's (h, w) gate: the kept boxes, in order."""
    h, w = att.shape
    unmask = np.zeros_like(att)
    unmask[int(border * h):int((1 - border) * h), int(border * w):int((1 - border) * w)] = 1
    scores = (att * unmask).reshape(-1)
    boxes = np_anchors(h, stride, anchor)
    keep = scores > scores.mean()
    boxes, scores = boxes[keep], scores[keep]
    boxes = boxes[np_nms(boxes, scores, iou)[:topk]].copy()
    boxes[:, 0] = np.maximum(boxes[:, 0], 0)
    boxes[:, 1] = np.maximum(boxes[:, 1], 0)
    boxes[:, 2] = np.minimum(boxes[:, 2], image_size - 1)
    boxes[:, 3] = np.minimum(boxes[:, 3], image_size - 1)
    return boxes


def np_resize(img, height, width):
    """F.interpolate(mode='bilinear', align_corners=False) of a (c, h, w) array."""
    def axis(out, size):
        src = np.maximum((np.arange(out) + 0.5) * (size / out) - 0.5, 0)
        i0 = src.astype(int)
        return i0, np.where(i0 < size - 1, i0 + 1, i0), src - i0
    y0, y1, ly = axis(height, img.shape[1])
    x0, x1, lx = axis(width, img.shape[2])
    top = img[:, y0][:, :, x0] * (1 - lx) + img[:, y0][:, :, x1] * lx
    bottom = img[:, y1][:, :, x0] * (1 - lx) + img[:, y1][:, :, x1] * lx
    return top * (1 - ly)[:, None] + bottom * ly[:, None]


def np_crop_feat(x, rois, scale, training, u=None, r=None):
    """get_roi_crop_feat for one sample: ``rois`` = [level-3, level-4, level-5 boxes]; the random draws
    are u (which level) and the ROI index int(r * n)."""
    c, height, width = x.shape
    every = np.concatenate(rois) / scale
    xx1, yy1 = every[:, 0].min(), every[:, 1].min()
    xx2, yy2 = every[:, 2].max(), every[:, 3].max()
    crop = (slice(None), slice(int(yy1), int(yy2)), slice(int(xx1), int(xx2)))
    if not training:
        return np_resize(x[crop], height, width)
    mask = np.ones((c, height, width))
    for level, low, high in ((0, 0.0, 0.3), (1, 0.3, 0.6)):
        if low <= u < high:
            level_rois = rois[level] / scale
            x1, y1, x2, y2 = level_rois[int(r * len(level_rois))]
            mask[:, int(y1):int(y2), int(x1):int(x2)] = 0
    out = (x * mask)[crop] * (c * (yy2 - yy1) * (xx2 - xx1) / mask[crop].sum())
    return np_resize(out, height, width)


# ------------------------------------------------------------------------------------------------
# ROI pyramid and zoom
# ------------------------------------------------------------------------------------------------

def _gates(rng, n, sizes):
    return [rng.rand(n, 1, s, s).astype(np.float32) for s in sizes]


def _pyramid(size, hybrid, border=0.1):
    sizes = [size // 8, size // 16, size // 32]
    anchors = [a * size / 448.0 for a in (64, 128, 256)]
    roi = ROIPyramid(size, sizes, (5, 3, 1), anchors, 0.05, border)
    if hybrid:
        roi.hybridize()
    return roi, sizes, anchors


@pytest.mark.parametrize('hybrid', [False, True])
@pytest.mark.parametrize('size,border', [(64, 0.1), (128, 0.1), (128, 0.0)])
def test_roi_pyramid_equals_the_released_get_att_roi(hybrid, size, border):
    rng = np.random.RandomState(size)
    roi, sizes, anchors = _pyramid(size, hybrid, border)
    gates = _gates(rng, 4, sizes)
    gates[0][0, 0] = 0.01                                 # sample 0, level 3: one peak, one ROI of k = 5
    gates[0][0, 0, sizes[0] // 2, sizes[0] // 2] = 0.9
    rois, valid = [a.asnumpy() for a in roi(*[nd.array(g) for g in gates])]
    fewer = False
    for n in range(4):
        start = 0
        for gate, s, a, k in zip(gates, sizes, anchors, roi.topk):
            expected = np_att_roi(gate[n, 0], size // s, a, size, 0.05, k, border)
            got = rois[n, start:start + k][valid[n, start:start + k] > 0]
            assert valid[n, start:start + len(expected)].all()
            assert not valid[n, start + len(expected):start + k].any()
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-4)
            fewer |= len(expected) < k
            start += k
    assert fewer                                  # the case "fewer than k survive NMS" was exercised
    if border == 0.0:
        assert (rois[valid > 0][:, :2] == 0).any()    # anchors over the edge were clamped


@pytest.mark.parametrize('hybrid', [False, True])
def test_roi_zoom_equals_the_released_get_roi_crop_feat_in_both_modes(hybrid):
    size, n = 128, 4
    rng = np.random.RandomState(7)
    roi, sizes, _ = _pyramid(size, False)
    rois, valid = roi(*[nd.array(g) for g in _gates(rng, n, sizes)])
    zoom = ROIZoom(size, (size // 8, size // 8), roi.topk)
    injected = ROIZoom(size, (size // 8, size // 8), roi.topk)      # a cached graph has one call signature
    if hybrid:
        zoom.hybridize()
        injected.hybridize()
    x2 = rng.randn(n, 6, size // 8, size // 8).astype(np.float32)
    per_sample = []
    for i in range(n):
        r_np, v_np = rois[i].asnumpy(), valid[i].asnumpy() > 0
        bounds = np.cumsum([0] + roi.topk)
        per_sample.append([r_np[b:e][v_np[b:e]] for b, e in zip(bounds[:-1], bounds[1:])])
    test, _ = zoom(nd.array(x2), rois, valid)
    for i in range(n):
        np.testing.assert_allclose(test[i].asnumpy(), np_crop_feat(x2[i], per_sample[i], 8, False), rtol=1e-5,
                                   atol=1e-5)
    for u_value in (0.1, 0.45, 0.8):
        u = np.full(n, u_value, np.float32)
        r = rng.rand(n).astype(np.float32)
        with autograd.train_mode():
            train, _ = injected(nd.array(x2), rois, valid, nd.array(u), nd.array(r))
        for i in range(n):
            expected = np_crop_feat(x2[i], per_sample[i], 8, True, u[i], r[i])
            np.testing.assert_allclose(train[i].asnumpy(), expected, rtol=1e-5, atol=1e-5)


def test_zoom_falls_back_to_the_whole_map_and_compensates_the_dropped_energy():
    zoom = ROIZoom(64, (8, 8), (5, 3, 1))
    zoom.hybridize()
    x2 = nd.array(np.random.RandomState(0).randn(2, 3, 8, 8))
    rois, none = nd.zeros((2, 9, 4)), nd.zeros((2, 9))
    out, box = ROIZoom(64, (8, 8), (5, 3, 1))(x2, rois, none)     # no ROI anywhere: the reference crashes
    np.testing.assert_allclose(out.asnumpy(), x2.asnumpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(box.asnumpy(), [[0, 0, 8, 8]] * 2)
    # a union box of the whole map (no resize) and a dropped 2x3 block: the mean stays exactly 1
    rois = np.zeros((1, 9, 4), np.float32)
    valid = np.zeros((1, 9), np.float32)
    rois[0, 0], valid[0, 0] = (8, 16, 32, 32), 1            # level 3: cells x 1..3, y 2..3
    rois[0, 8], valid[0, 8] = (0, 0, 64, 64), 1             # level 5: the whole map
    with autograd.train_mode():
        out, _ = zoom(nd.ones((1, 2, 8, 8)), nd.array(rois), nd.array(valid), nd.array([0.1]),
                      nd.array([0.0]))
    expected = np.full((1, 2, 8, 8), 64 / 58.0)
    expected[:, :, 2:4, 1:4] = 0
    np.testing.assert_allclose(out.asnumpy(), expected, rtol=1e-5, atol=1e-5)
    assert out.asnumpy().mean() == pytest.approx(1.0, abs=1e-5)
    # a drop that would empty the crop drops nothing
    rois[0, 8], valid[0, 8] = 0, 0
    rois[0, 0] = (0, 0, 64, 64)
    with autograd.train_mode():
        out, _ = zoom(nd.ones((1, 2, 8, 8)), nd.array(rois), nd.array(valid), nd.array([0.1]),
                      nd.array([0.0]))
    np.testing.assert_allclose(out.asnumpy(), 1.0, rtol=1e-5)


def test_train_mode_drops_in_about_60_percent_after_hybridize_and_test_mode_never():
    """The frozen-branch pitfall: a Python switch on autograd.is_training() would be traced once."""
    size, n = 128, 8
    rng = np.random.RandomState(3)
    roi, sizes, _ = _pyramid(size, True)
    rois, valid = roi(*[nd.array(g) for g in _gates(rng, n, sizes)])
    zoom = ROIZoom(size, (16, 16), roi.topk)
    zoom.hybridize()
    ones = nd.ones((n, 1, 16, 16))
    first, _ = zoom(ones, rois, valid)                     # traced in test mode first
    mx.random.seed(11)
    dropped = []
    for _ in range(40):
        with autograd.train_mode():
            out, _ = zoom(ones, rois, valid)
        flat = out.asnumpy().reshape(n, -1)
        dropped.extend(flat.max(1) - flat.min(1) > 1e-6)
    assert 0.5 < np.mean(dropped) < 0.7, np.mean(dropped)
    again, _ = zoom(ones, rois, valid)
    np.testing.assert_array_equal(first.asnumpy(), again.asnumpy())
    np.testing.assert_allclose(first.asnumpy(), 1.0, rtol=1e-6)


def test_the_zoom_passes_gradients_to_the_map_and_none_to_the_gates():
    size = 64
    rng = np.random.RandomState(1)
    roi, sizes, _ = _pyramid(size, False)
    zoom = ROIZoom(size, (8, 8), roi.topk)
    gates = [nd.array(g) for g in _gates(rng, 2, sizes)]
    x2 = nd.array(rng.randn(2, 3, 8, 8))
    for a in gates + [x2]:
        a.attach_grad()
    with autograd.record():
        rois, valid = roi(*gates)
        out, _ = zoom(x2, rois, valid)
        (out * nd.array(rng.randn(*out.shape))).sum().backward()
    assert all((g.grad.asnumpy() == 0).all() for g in gates)
    assert np.abs(x2.grad.asnumpy()).sum() > 0


# ------------------------------------------------------------------------------------------------
# Pyramid and gates
# ------------------------------------------------------------------------------------------------

def _np_conv(x, w, b=None, pad=0):
    n, _, h, width = x.shape
    k = w.shape[2]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.zeros((n, w.shape[0], h, width))
    for i in range(k):
        for j in range(k):
            out += np.einsum('nchw,oc->nohw', xp[:, :, i:i + h, j:j + width], w[:, :, i, j])
    return out + (0 if b is None else b.reshape(1, -1, 1, 1))


def _p(block):
    return {name[len(block.prefix):]: p.data().asnumpy().astype(np.float64)
            for name, p in block.collect_params().items()}


def _sigmoid(v):
    return 1 / (1 + np.exp(-v))


def test_pyramid_and_attention_gates_equal_numpy():
    rng = np.random.RandomState(4)
    fpn = PyramidFeatures((8, 12, 16), width=32, prefix='fpn_')
    apn = PyramidAttentions(32, prefix='apn_')
    for block in (fpn, apn):
        block.initialize(mx.init.Normal(0.3))
        block.hybridize()
    b3, b4, b5 = [rng.randn(2, c, s, s) for c, s in ((8, 8), (12, 4), (16, 2))]
    got = fpn(*[nd.array(b) for b in (b3, b4, b5)])
    w = _p(fpn)
    bn = lambda v, name: (v / np.sqrt(1 + 1e-5) * w[name + 'gamma'].reshape(1, -1, 1, 1)  # noqa: E731
                          # (stored mean 0, var 1)
                          + w[name + 'beta'].reshape(1, -1, 1, 1))
    master = np.maximum(bn(_np_conv(b5, w['P5_1_conv_master_conv_weight']), 'P5_1_conv_master_bn_'), 0)
    gpb = np.maximum(bn(_np_conv(b5.mean((2, 3), keepdims=True), w['P5_1_conv_gpb_conv_weight']),
                        'P5_1_conv_gpb_bn_'), 0)
    up = lambda v: v.repeat(2, 2).repeat(2, 3)  # noqa: E731
    p5 = master + gpb
    p4 = _np_conv(b4, w['P4_1_weight'], w['P4_1_bias']) + up(p5)
    p3 = _np_conv(b3, w['P3_1_weight'], w['P3_1_bias']) + up(p4)
    expected = [_np_conv(p, w['%s_2_weight' % k], w['%s_2_bias' % k], pad=1)
                for p, k in ((p3, 'P3'), (p4, 'P4'), (p5, 'P5'))]
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a.asnumpy(), b, rtol=1e-4, atol=1e-4)
    out = [o.asnumpy() for o in apn(*got)]
    w = _p(apn)
    previous = None
    for level, p in zip((3, 4, 5), expected):
        s = _sigmoid(_np_conv(p, w['A%d_1_conv_weight' % level], w['A%d_1_conv_bias' % level], pad=1))
        hidden = np.maximum(_np_conv(p.mean((2, 3), keepdims=True), w['A%d_2_conv1_weight' % level],
                                     w['A%d_2_conv1_bias' % level]), 0)
        c = _sigmoid(_np_conv(hidden, w['A%d_2_conv2_weight' % level], w['A%d_2_conv2_bias' % level]))
        c = c if previous is None else (c + previous) / 2       # C4 = (C4 + C3) / 2, C5 = (C5 + C4') / 2
        previous = c
        np.testing.assert_allclose(out[level - 3], s * p + c * p, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(out[level], s, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# The network
# ------------------------------------------------------------------------------------------------

def _net(backbone='resnet18_v1', size=64, classes=4):
    from engine.build import build_net
    return build_net(dict(backbone=backbone, num_classes=classes, preset='demo', input_size=size,
                          head='apcnn'))


@pytest.mark.parametrize('backbone,size', [('resnet18_v1', 64), ('resnet50_v1', 64), ('densenet121', 64),
                                           ('resnet18_v1', 224)])
def test_network_shapes_and_the_project_contract(backbone, size):
    net = _net(backbone, size)
    assert [s[1] for s in net.level_shapes] == [size // 8, size // 16, size // 32]
    x = nd.array(np.random.RandomState(0).randn(2, 3, size, size))
    primary, taps, fused = net(x)
    assert primary.shape == (2, 4) and len(taps) == 7 and all(t.shape == (2, 4) for t in taps)
    np.testing.assert_allclose(fused.asnumpy(), (primary + nd.add_n(*taps)).asnumpy() / 8, rtol=1e-5,
                               atol=1e-6)
    stages = net.stage_logits(primary, taps)          # each pass's own prediction: stage II sees the zoom
    net.return_attention = True
    second = net(x)
    net.return_attention = False
    np.testing.assert_allclose(stages['stage I'].asnumpy(),
                               (second[0] + nd.add_n(*second[1][:3])).asnumpy() / 4,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose((stages['stage I'] + stages['stage II']).asnumpy() / 2, fused.asnumpy(),
                               rtol=1e-5,
                               atol=1e-6)
    modules = net.stage_modules()
    assert list(modules) == ['backbone', 'apcnn/fpn', 'apcnn/apn', 'apcnn/cls']
    names = [set(m.keys()) for m in modules.values()]
    assert sum(len(n) for n in names) == len(set.union(*names)) == len(net.collect_params().keys())


def test_input_size_must_be_divisible_by_32_and_plugins_are_refused():
    from engine import config
    with pytest.raises(UserError, match='divisible by 32.*use 64'):
        config.resolve_config(config.defaults(head='apcnn', input_size=48, dataset='demo'))
    with pytest.raises(UserError, match='divisible by 32'):
        APCNNNet('resnet18_v1', 4, 48)
    for flags in (dict(mc_loss=True), dict(rga='sc'), dict(taps='s3')):
        with pytest.raises(UserError, match='takes no'):
            config.resolve_config(config.defaults(head='apcnn', input_size=64, dataset='demo', **flags))
    with pytest.raises(UserError, match='--apcnn-topk must be 3'):
        config.resolve_config(config.defaults(head='apcnn', input_size=64, dataset='demo', apcnn_topk='5,3'))
    with pytest.raises(UserError, match='add up to more than 1'):
        config.resolve_config(config.defaults(head='apcnn', input_size=64, dataset='demo',
                                              apcnn_drop='0.6,0.6'))


def test_stage_two_trains_stages_one_and_two_through_the_zoom():
    net = _net()
    net.hybridize()
    x = nd.array(np.random.RandomState(0).randn(2, 3, 64, 64))
    with autograd.record():
        _, taps, _ = net(x)
        nd.add_n(*taps[3:]).sum().backward()                 # stage II's four logits alone
    stage12 = [p for n, p in net.backbone.collect_params().items()
               if ('stage1_' in n or 'stage2_' in n) and n.endswith('weight') and p.grad_req != 'null']
    assert stage12 and all(np.abs(p.grad().asnumpy()).sum() > 0 for p in stage12)


def test_test_mode_is_deterministic_and_the_exported_symbol_gives_the_same_logits(tmp_path):
    from deploy import export
    net = _net()
    net.hybridize(static_alloc=True, static_shape=True)
    x = nd.array(np.random.RandomState(0).randn(3, 3, 64, 64))
    with autograd.train_mode():
        net(x)                                                # a training call in between changes nothing
    first, second = net(x)[2].asnumpy(), net(x)[2].asnumpy()
    np.testing.assert_array_equal(first, second)
    symbol_file, params_file = export.export_symbol(net, 64, str(tmp_path), [mx.cpu()])
    imported = mx.gluon.SymbolBlock.imports(symbol_file, ['data'], params_file)
    np.testing.assert_allclose(imported(x).asnumpy(), first, rtol=1e-4, atol=1e-5)
