"""HGAT-FC (related/hgat/) against NumPy float64 transcriptions of the public hgat_fc.py: BGATLayer (with the
file's own repeat-and-view construction of [h_i || h_j]) and the whole Head for the three variants (with the
assumed BasicLinear / ResidualLinearBlock), the permutation into group order and back, the FC replacement
with its axes right (the write-up's swapped version as the regression case), the group table and files, and
a one-epoch run per variant through train.py, eval.py, predict.py, compare.py, resume and export."""
import json
import os

import numpy as np
import pytest
import mxnet as mx
from mxnet import autograd, nd

from tools import compare
import eval as eval_script
import related.hgat as hgat
import train
from datasets.digits import ATTRIBUTES as DEMO_ATTRIBUTES
from datasets.wider import WIDER_ATTRIBUTES
from common.errors import UserError
from backbone import all_blocks
from related.hgat.head import BGATLayer, FlatLinear, HGATHead


# ------------------------------------------------------------------------------------------ NumPy, float64
def np_bgat(x, w, a, beta, alpha=0.2):
    """BGATLayer.forward of the public file, step by step (dropout 0)."""
    b, n, _ = x.shape
    h = x @ w
    c = h.shape[2]
    a_input = np.concatenate([np.tile(h, (1, 1, n)).reshape(b, n * n, c), np.tile(h, (1, n, 1))],
                             axis=2).reshape(b, n, n, 2 * c)
    e = (a_input @ a)[..., 0]
    e = np.where(e > 0, e, alpha * e)
    att = np.exp(e - e.max(2, keepdims=True))
    att /= att.sum(2, keepdims=True)
    z = att @ h + beta * h
    return np.where(z > 0, z, np.expm1(z)), att


def _np(p):
    return p.data().asnumpy().astype(np.float64)


def np_bn(z, bn):
    return (z - _np(bn.running_mean)) / np.sqrt(_np(bn.running_var) + 1e-5) * _np(bn.gamma) + _np(bn.beta)


def np_dense(z, dense):
    return z @ _np(dense.weight).T + _np(dense.bias)


def np_basic(z, block):
    return np.maximum(np_bn(np_dense(z, block.fc), block.bn), 0)


def np_residual(z, block):
    inner = np.maximum(np_bn(np_dense(z, block.fc1), block.bn1), 0)
    return np.maximum(z + np_bn(np_dense(inner, block.fc2), block.bn2), 0)


def np_layer(nodes, layer, kind):
    """``kind``: gat, fc-flat (a sample's nodes flattened), fc-node (each node alone), none."""
    b, k, c = nodes.shape
    if kind == 'gat':
        return np_bgat(nodes, _np(layer.weight), _np(layer.a), _np(layer.beta))[0]
    if kind == 'fc-flat':
        return np_basic(nodes.reshape(b, k * c), layer.fc).reshape(b, k, c)       # per sample
    if kind == 'fc-node':
        return np.stack([np_basic(nodes[:, i], layer.fc) for i in range(k)], axis=1)  # per node
    return nodes


def np_head(fmap, head, kind):
    """The public Head.forward on a (B, D, H, W) map: GMP, reduce_fc, group FCs, layer 1, class FCs per
    group, layer 2 per group, per-class residual + Linear; each attribute's logit at its own index.
    ``kind``: gat, none, or fc with ``head.fc_layer2`` (layer 1 flat, layer 2 flat or node by node)."""
    kinds = (kind, kind) if kind != 'fc' else ('fc-flat', 'fc-' + head.fc_layer2)
    x = fmap.max(axis=(2, 3))
    for block in head.reduce_fc:
        x = np_basic(x, block)
    nodes = np.stack([np_residual(x, block) for block in head.group_fcs], axis=1)
    nodes = np_layer(nodes, head.layer1, kinds[0])
    out = np.zeros((x.shape[0], sum(head.sizes)))
    k = 0
    for g, members in enumerate(head.groups):
        inside = np.stack([np_basic(nodes[:, g], head.class_fcs[k + j]) for j in range(len(members))], axis=1)
        inside = np_layer(inside, head.layer2[g] if head.layer2 is not None else None, kinds[1])
        for j, attribute in enumerate(members):
            res, fc = head.fcs[k + j]
            out[:, attribute] = np_dense(np_residual(inside[:, j], res), fc)[:, 0]
        k += len(members)
    return out


def _randomise_bn(block, rng):
    for name, p in block.collect_params().items():
        if name.endswith(('running_var', 'gamma')):
            p.set_data(nd.array(rng.uniform(0.5, 1.5, p.shape)))
        elif name.endswith(('running_mean', 'beta')) and 'bgat' not in name:
            p.set_data(nd.array(rng.normal(0, 0.2, p.shape)))


# ------------------------------------------------------------------------------------------ the layer
@pytest.mark.parametrize('hybrid', [False, True])
def test_bgat_layer_equals_the_public_forward_and_its_rows_sum_to_one(hybrid):
    rng = np.random.RandomState(0)
    layer = BGATLayer(6, 5, prefix='bgat_')
    layer.initialize()
    layer.beta.set_data(nd.array([0.7]))
    if hybrid:
        layer.hybridize()
    x = rng.normal(size=(3, 4, 6)).astype(np.float32)
    layer.return_attention = True
    out, att = layer(nd.array(x))
    want, want_att = np_bgat(x.astype(np.float64), _np(layer.weight), _np(layer.a), 0.7)
    np.testing.assert_allclose(out.asnumpy(), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(att.asnumpy(), want_att, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(att.asnumpy().sum(axis=2), 1, rtol=1e-6)
    bound = 1.414 * np.sqrt(6.0 / (6 + 5))                                    # xavier_uniform_, gain 1.414
    assert np.abs(_np(layer.weight)).max() <= bound and np.abs(_np(layer.weight)).max() > bound / 2


def test_bgat_gradients_match_finite_differences():
    rng = np.random.RandomState(1)
    layer = BGATLayer(4, 3, prefix='bgat_')
    layer.initialize()
    layer.cast('float64')
    x = nd.array(rng.normal(size=(2, 3, 4)), dtype='float64')
    r = nd.array(rng.normal(size=(2, 3, 3)), dtype='float64')
    x.attach_grad()
    with autograd.record():
        loss = (layer(x) * r).sum()
    loss.backward()

    def value(xv, wv):
        return float((np_bgat(xv, wv, _np(layer.a), _np(layer.beta))[0] * r.asnumpy()).sum())
    xs, ws, eps = x.asnumpy(), _np(layer.weight), 1e-6
    for (i, j, k) in [(0, 0, 0), (1, 2, 3), (0, 1, 2)]:
        up, down = xs.copy(), xs.copy()
        up[i, j, k] += eps
        down[i, j, k] -= eps
        assert x.grad.asnumpy()[i, j, k] == pytest.approx((value(up, ws) - value(down, ws)) / (
            2 * eps), rel=1e-5)
    for (i, j) in [(0, 0), (3, 2)]:
        up, down = ws.copy(), ws.copy()
        up[i, j] += eps
        down[i, j] -= eps
        numeric = (value(xs, up) - value(xs, down)) / (2 * eps)
        assert layer.weight.grad().asnumpy()[i, j] == pytest.approx(numeric, rel=1e-5)


# ------------------------------------------------------------------------------------------ the head
@pytest.mark.parametrize('kind,fc_layer2', [('gat', 'node'), ('fc', 'node'), ('fc', 'flat'),
                                            ('none', 'node')])
def test_the_head_equals_the_public_head_on_a_2048_channel_map(kind, fc_layer2):
    rng = np.random.RandomState(2)
    groups = [[3, 0], [4], [1, 5, 2]]                          # group order differs from the dataset's
    head = HGATHead(2048, groups, kind, group_channels=16, class_channels=8, fc_layer2=fc_layer2,
                    prefix='hgat_')
    head.initialize()
    _randomise_bn(head, rng)
    fmap = rng.normal(size=(2, 2048, 3, 3)).astype(np.float32)
    want = np_head(fmap.astype(np.float64), head, kind)
    for hybrid in (False, True):
        if hybrid:
            head.hybridize()
        got = head(nd.array(fmap).max(axis=(2, 3))).asnumpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_groups_in_any_order_give_the_logits_in_the_dataset_order():
    """The same attributes grouped in other orders: each logit stays at its attribute's index (checked
    against the NumPy head, which writes each attribute's logit where it belongs), and a permuted input
    order of the groups permutes nothing in the output."""
    rng = np.random.RandomState(3)
    x = rng.normal(size=(2, 32, 2, 2)).astype(np.float32)
    for groups in ([[0, 1], [2, 3, 4]], [[4, 2, 3], [1, 0]], [[2], [0, 4], [3, 1]]):
        head = HGATHead(32, groups, 'gat', group_channels=8, class_channels=4, prefix='hgat_')
        head.initialize()
        _randomise_bn(head, rng)
        got = head(nd.array(x).max(axis=(2, 3))).asnumpy()
        np.testing.assert_allclose(got, np_head(x.astype(np.float64), head, 'gat'), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError):
        HGATHead(32, [[0, 1], [1, 2]], prefix='bad_')


def test_the_fc_replacement_flattens_each_sample_where_the_write_ups_swapped_axes_fail():
    """The write-up's FC replacement reads ``batch_size = x.size(2)``, ``group_channels = x.size(0)``: its
    reshape of (B, G, C) to (C, G * B) only fits the layer when B == C, and then by chance. Ours flattens
    each sample, for any batch size, and a sample's output depends on that sample alone."""
    rng = np.random.RandomState(4)
    k, c = 3, 4
    layer = FlatLinear(k, c, prefix='flat_')
    layer.initialize()
    _randomise_bn(layer, rng)
    for b in (1, 2, 5):
        x = rng.normal(size=(b, k, c)).astype(np.float32)
        right = np_basic(x.astype(np.float64).reshape(b, k * c), layer.fc).reshape(b, k, c)
        np.testing.assert_allclose(layer(nd.array(x)).asnumpy(), right, rtol=1e-4, atol=1e-5)
        moved = x.copy()
        moved[0] += 1                                           # sample 0 changes; the others' outputs do not
        np.testing.assert_allclose(layer(nd.array(moved)).asnumpy()[1:], right[1:], rtol=1e-4, atol=1e-5)
    x = rng.normal(size=(2, k, c))
    batch_size, group_channels = x.shape[2], x.shape[0]        # the write-up's (swapped) sizes
    # (C, G * B) = (4, 6) cannot enter a 12-input layer
    with pytest.raises(ValueError):
        np_basic(x.reshape(batch_size, k * group_channels), layer.fc)


# ------------------------------------------------------------------------------------------ the groups
def test_the_built_in_groups_cover_each_datasets_attributes_once():
    assert [i for _, idx in hgat.partition(WIDER_ATTRIBUTES) for i in idx] != []
    for names in (WIDER_ATTRIBUTES, DEMO_ATTRIBUTES):
        got = hgat.partition(names)
        assert sorted(i for _, idx in got for i in idx) == list(range(len(names)))
    assert sum(len(v) for v in hgat.GROUPS['peta'].values()) == 35
    assert sum(len(v) for v in hgat.GROUPS['pa100k'].values()) == 26
    for table in hgat.GROUPS.values():
        members = sum(table.values(), [])
        assert len(members) == len(set(members))
    halves = hgat.partition(['a', 'b', 'c', 'd', 'e'], 'contiguous:2')
    assert halves == [('group 1', [0, 1, 2]), ('group 2', [3, 4])]


@pytest.mark.parametrize('count,sizes', [(1, [14]), (2, [7, 7]), (3, [5, 5, 4]), (4, [4, 4, 3, 3]),
                                         (5, [3, 3, 3, 3, 2]), (6, [3, 3, 2, 2, 2, 2]), (13, [2] + [1] * 12),
                                         (14, [1] * 14)])
def test_contiguous_groups_of_14_attributes_have_the_documented_sizes(count, sizes):
    """contiguous:G: consecutive groups, the first n mod G one larger (worked out by hand for n = 14)."""
    got = hgat.partition(['a%d' % i for i in range(14)], 'contiguous:%d' % count)
    assert [len(idx) for _, idx in got] == sizes
    assert [i for _, idx in got for i in idx] == list(range(14))
    assert [g for g, _ in got] == ['group %d' % (i + 1) for i in range(count)]
    peta = hgat.partition(['a%d' % i for i in range(35)], 'contiguous:6')
    assert [len(idx) for _, idx in peta] == [6, 6, 6, 6, 6, 5]


def test_group_files_are_checked_by_name(tmp_path):
    names = ['hat', 'bag', 'coat', 'shoes']

    def groups(obj, raw=None):
        path = tmp_path / 'groups.json'
        path.write_text(raw if raw is not None else json.dumps(obj))
        return str(path)
    got = hgat.partition(names, groups({'top': ['coat', 'hat'], 'rest': ['shoes', 'bag']}))
    assert got == [('top', [2, 0]), ('rest', [3, 1])]
    for obj, raw, message in [
            ({'top': ['hat', 'bag']}, None, r'leave out coat, shoes: every attribute needs a group'),
            ({'a': ['hat', 'bag'], 'b': ['bag', 'coat', 'shoes']}, None,
             r"'bag' is in two groups \('a' and 'b'\)"),
            ({'a': ['hat', 'scarf', 'bag', 'coat', 'shoes']}, None,
             r"'scarf' \(group 'a'\) is not an attribute"),
            ({'a': [], 'b': names}, None, r"group 'a' is empty"),
            (None, '{"a": ["hat"', 'is not a readable JSON file'),
            (['hat'], None, r'must hold one object \{group: \[attribute names\]\}')]:
        with pytest.raises(UserError, match=message):
            hgat.partition(names, groups(obj, raw))
    with pytest.raises(UserError, match='needs the attribute groups of this dataset'):
        hgat.partition(names)
    with pytest.raises(UserError, match='contiguous:9: G must be a whole number from 1 to the 4 attributes'):
        hgat.partition(names, 'contiguous:9')


def test_the_node_form_of_layer_2_has_the_declared_shape_and_treats_each_node_alone():
    """--hgat-layer fc, layer 2: one BasicLinear C -> C per group (the public file's fc_replace_GALayer2,
    65,536 weights at C = 256), each node's output depends on that node alone; the flat form's layer is
    (n_g * C)^2 (6,553,600 weights for a 10-attribute group at 256); layer 1 is flat in both."""
    from related.hgat.head import NodeLinear
    groups = [list(range(10)), [10, 11]]
    sizes = {}
    for form in ('node', 'flat'):
        head = HGATHead(64, groups, 'fc', group_channels=16, class_channels=256, fc_layer2=form, prefix='h_')
        assert isinstance(head.layer1, FlatLinear)
        assert [type(layer) for layer in head.layer2] == [NodeLinear if form == 'node' else FlatLinear] * 2
        sizes[form] = [layer.fc.fc.weight.shape for layer in head.layer2]
    assert sizes == {'node': [(256, 256), (256, 256)], 'flat': [(2560, 2560), (512, 512)]}
    rng = np.random.RandomState(5)
    layer = NodeLinear(3, 4, prefix='node_')
    layer.initialize()
    _randomise_bn(layer, rng)
    x = rng.normal(size=(2, 3, 4)).astype(np.float32)
    want = np.stack([np_basic(x[:, i].astype(np.float64), layer.fc) for i in range(3)], axis=1)
    np.testing.assert_allclose(layer(nd.array(x)).asnumpy(), want, rtol=1e-4, atol=1e-5)
    moved = x.copy()
    moved[:, 1] += 1                                            # node 1 changes; nodes 0 and 2 do not
    np.testing.assert_allclose(layer(nd.array(moved)).asnumpy()[:, [0, 2]], want[:, [0, 2]], rtol=1e-4,
                               atol=1e-5)


def test_a_run_from_before_the_option_keeps_its_flat_layer_2_and_new_runs_get_the_declared_one():
    """A config.json without hgat_fc_layer2 (every fc run made before it) rebuilds the flat layer 2 its
    checkpoints hold; a new run's config resolves to node, and the flag chooses."""
    from engine import config
    from engine.build import build_net
    from related.hgat.head import NodeLinear
    new = config.defaults(head='hgat', hgat_layer='fc', num_classes=5, hgat_groups='contiguous:2',
                          input_size=32, pretrained=False, hgat_group_channels=8, hgat_class_channels=4)
    old = {k: v for k, v in new.items() if k != 'hgat_fc_layer2'}
    chosen = dict(new, hgat_fc_layer2='flat')
    kinds = {}
    for name, cfg in (('new', new), ('old', old), ('chosen', chosen)):
        net = build_net(cfg)
        head = [b for b in all_blocks(net) if isinstance(b, HGATHead)][0]
        kinds[name] = (cfg['hgat_fc_layer2'], {type(layer) for layer in head.layer2})
    assert kinds == {'new': ('node', {NodeLinear}), 'old': ('flat', {FlatLinear}),
                     'chosen': ('flat', {FlatLinear})}


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope='module')
def hgat_runs(demo_path, tmp_path_factory):
    root = tmp_path_factory.mktemp('hgat')
    runs = {}
    for layer in ('gat', 'fc', 'none'):
        out = str(root / layer)
        result = train.main(['--data_path', demo_path, '--out', out, '--epochs', '1', '--limit', '64',
                             '--input-size', '48', '--batch_size', '16', '--head', 'hgat', '--hgat-layer',
                             layer,
                             '--hgat-group-channels', '32', '--hgat-class-channels', '16'])
        runs[layer] = out, result
    return runs


def test_each_variant_trains_evaluates_and_rebuilds_from_its_run_folder(hgat_runs, tmp_path, capsys):
    for layer, (out, result) in hgat_runs.items():
        cfg = json.load(open(os.path.join(out, 'config.json')))
        assert cfg['head'] == 'hgat' and cfg['hgat_layer'] == layer
        assert [g for g, _ in cfg['hgat_partition']] == list(hgat.GROUPS['demo'])
        again = eval_script.main([out, '--limit', '64'])
        assert again['mAP'] == pytest.approx(result['mAP'], abs=1e-9)
    printed = capsys.readouterr().out
    summary = compare.main([hgat_runs[k][0] for k in ('gat', 'fc', 'none')] + ['--limit', '32', '--out', str(
        tmp_path / 'c.png')])
    assert [s['system'].split(' (')[0] for s in summary] == ['HGAT-FC'] * 3
    assert 'HGAT-FC (gat)' in summary[0]['system'] and 'HGAT-FC (none)' in summary[2]['system']
    assert printed


def test_a_hgat_run_resumes_predicts_and_exports(hgat_runs, demo_path, tmp_path):
    import shutil
    import predict
    from deploy.export import onnx_session, INPUT_NAME, OUTPUT_NAME
    run = str(tmp_path / 'again')
    shutil.copytree(hgat_runs['gat'][0], run)
    train.main(['--resume', run, '--epochs', '2'])
    assert len(json.load(open(os.path.join(run, 'metrics.json')))) == 2
    folder = str(tmp_path / 'export')
    eval_script.main([run, '--export', folder])
    from datasets import digits
    ds = digits.DigitsCanvas(demo_path, 'test')
    images = []
    for i in range(3):
        path = str(tmp_path / ('c%d.png' % i))
        import cv2
        cv2.imwrite(path, ds.images[i][:, :, ::-1])
        images.append(path)
    gluon_rows = predict.main([run] + images + ['--out', str(tmp_path / 'g.csv')])
    onnx_rows = predict.main([folder] + images + ['--out', str(tmp_path / 'o.csv')])
    np.testing.assert_allclose(onnx_rows['probabilities'], gluon_rows['probabilities'], atol=2e-5)
    session = onnx_session(os.path.join(folder, 'model.onnx'))
    x = np.random.RandomState(0).normal(size=(2, 3, 48, 48)).astype(np.float32)
    from engine.sources import load_source
    net, _, _ = load_source(run, [mx.cpu()])
    np.testing.assert_allclose(session.run([OUTPUT_NAME], {INPUT_NAME: x})[0], net(nd.array(x))[2].asnumpy(),
                               rtol=1e-4, atol=1e-4)
