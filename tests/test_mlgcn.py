"""ML-GCN: the label graph by hand and by brute force, the GCN head against NumPy, its constants in
checkpoints, and the label embeddings."""
import numpy as np
import pytest
import mxnet as mx
from mxnet import autograd, nd

from engine import checkpoints
from related.mlgcn import head as mlgcn
from engine import steps
from common.errors import UserError
from losses import PredictionHistory, VAALoss
from engine.build import build_net
from engine.trainers import StageTrainers


def test_correlation_matrix_hand_worked():
    # label counts N_i = 5, 5, 4, 2; P_01 = P_10 = 2/5 = 0.4 (exactly at t), P_23 = 2/4, P_32 = 2/2,
    # P_31 = 1/2, P_13 = 1/5, P_02 = 1/5, P_20 = 1/4: edges 0->1, 1->0, 2->3, 3->1, 3->2
    joint = np.array([[0, 2, 1, 0], [2, 0, 0, 1], [1, 0, 0, 2], [0, 1, 2, 0]], float)
    counts = np.array([5, 5, 4, 2], float)[:, None] * np.ones((1, 4))
    code = mlgcn.correlation_matrix(joint, counts, t=0.4, p=0.25, reweight='code')
    # column sums of A: 1, 2, 1, 1 -> off-diagonal entries 0.25 / colsum, diagonal 1
    expected = np.array([[1, .125, 0, 0], [.25, 1, 0, 0], [0, 0, 1, .25], [0, .125, .25, 1]])
    np.testing.assert_allclose(code, expected, atol=1e-6)
    paper = mlgcn.correlation_matrix(joint, counts, t=0.4, p=0.2, reweight='paper')
    expected = np.array([[.8, .1, 0, 0], [.2, .8, 0, 0], [0, 0, .8, .2], [0, .1, .2, .8]])
    np.testing.assert_allclose(paper, expected, atol=1e-12)
    # normalisations: D A^T D and D^-1/2 A D^-1/2 with D = row sums^-1/2; equal for a symmetric A
    d = np.diag(code.sum(1) ** -0.5)
    np.testing.assert_allclose(mlgcn.normalize_adjacency(code), d @ code.T @ d, rtol=1e-12)
    np.testing.assert_allclose(mlgcn.normalize_adjacency(code, 'paper'), d @ code @ d, rtol=1e-12)
    sym = code + code.T
    np.testing.assert_allclose(mlgcn.normalize_adjacency(sym), mlgcn.normalize_adjacency(sym, 'paper'),
                               rtol=1e-12)


def test_masked_cooccurrence_equals_brute_force():
    rng = np.random.RandomState(0)
    y = (rng.rand(40, 5) < 0.4).astype(np.float32)
    m = (rng.rand(40, 5) > 0.2).astype(np.float32)
    y[:, 4] = 0                                                  # an attribute never positive
    joint, counts = mlgcn.cooccurrence(y, m)
    for i in range(5):
        for j in range(5):
            both = [n for n in range(40) if m[n, i] and m[n, j]]
            assert counts[i, j] == sum(y[n, i] for n in both)
            assert joint[i, j] == (0 if i == j else sum(y[n, i] * y[n, j] for n in both))
    flipped = y.copy()
    flipped[m == 0] = 1 - flipped[m == 0]                         # unspecified labels never count
    np.testing.assert_array_equal(mlgcn.cooccurrence(flipped, m)[0], joint)
    a = mlgcn.correlation_matrix(joint, counts)
    assert np.isfinite(a).all() and (a[4] == np.eye(5)[4]).all()   # no positives: no edges, no NaN


def _head(classes=4, emb=3, width=6, seed=0):
    rng = np.random.RandomState(seed)
    adjacency = rng.rand(classes, classes).astype(np.float32).astype(np.float64)    # (stored as float32)
    embeddings = rng.randn(classes, emb).astype(np.float32).astype(np.float64)
    head = mlgcn.GCNClassifier(adjacency, embeddings, width, hidden=5, prefix='gcn_')
    head.initialize()
    return head, adjacency, embeddings


def _numpy_head(head, adjacency, embeddings, x):
    w0, w1 = head.gc1.weight.data().asnumpy(), head.gc2.weight.data().asnumpy()
    h = adjacency @ embeddings @ w0
    h = np.where(h > 0, h, 0.2 * h)
    return x @ (adjacency @ h @ w1).T


def test_gcn_head_equals_numpy_and_its_gradients_finite_differences():
    head, adjacency, embeddings = _head()
    x = np.random.RandomState(1).randn(3, 6)
    for hybrid in (False, True):
        if hybrid:
            head.hybridize()
        np.testing.assert_allclose(head(nd.array(x)).asnumpy(), _numpy_head(head, adjacency, embeddings, x),
                                   rtol=1e-4, atol=1e-5)
    head.cast('float64')
    feats = nd.array(x, dtype='float64')
    feats.attach_grad()
    r = np.random.RandomState(2).randn(3, 4)
    with autograd.record():
        loss = (head(feats) * nd.array(r, dtype='float64')).sum()
    loss.backward()
    w0 = head.gc1.weight
    analytic = w0.grad().asnumpy()
    value = lambda: float((_numpy_head(head, adjacency, embeddings, x) * r).sum())  # noqa: E731
    for pos in ((0, 1), (2, 4)):
        old = w0.data()[pos].asscalar()
        w0.data()[pos] = old + 1e-6
        up = value()
        w0.data()[pos] = old - 1e-6
        down = value()
        w0.data()[pos] = old
        assert (up - down) / 2e-6 == pytest.approx(analytic[pos], rel=1e-5, abs=1e-9)
    w1 = head.gc2.weight.data().asnumpy()
    h = adjacency @ embeddings @ head.gc1.weight.data().asnumpy()
    np.testing.assert_allclose(feats.grad.asnumpy(), r @ (adjacency @ np.where(h > 0, h, 0.2 * h) @ w1),
                               rtol=1e-6)
    assert head.adjacency.grad_req == 'null' and head.embeddings.grad_req == 'null'


def _gcn_cfg(**extra):
    return dict(dict(backbone='resnet18_v1', num_classes=4, preset='paper', input_size=64, head='gcn',
                     gcn_embeddings='onehot'), **extra)


def test_gcn_constants_travel_in_checkpoints_and_are_never_trained(tmp_path):
    rng = np.random.RandomState(3)
    labels = (rng.rand(30, 4) < 0.5).astype(np.float32)
    cfg = _gcn_cfg()
    net = build_net(cfg, labels=labels, mask=np.ones_like(labels))
    graph = net.primary_head.adjacency.data().asnumpy().copy()
    expected = mlgcn.normalize_adjacency(mlgcn.correlation_matrix(*mlgcn.cooccurrence(labels)))
    np.testing.assert_allclose(graph, expected, rtol=1e-6)
    trainers = StageTrainers(net, [mx.cpu()], 'sgd', {'learning_rate': 0.5})
    assert 'gcn' in trainers.trainers and 'backbone' in trainers.trainers
    x = nd.random.normal(shape=(4, 3, 64, 64))
    batch = (x, nd.array(labels[:4]), nd.ones((4, 4)), nd.arange(4, dtype='int64'))
    before = net.primary_head.gc1.weight.data().asnumpy().copy()
    steps.train_step(net, VAALoss(), trainers, PredictionHistory(4, 4), batch, 0, [mx.cpu()])
    assert not np.array_equal(net.primary_head.gc1.weight.data().asnumpy(), before)        # the GCN trains
    np.testing.assert_array_equal(net.primary_head.adjacency.data().asnumpy(), graph)     # its graph does not
    path = str(tmp_path / 'last.params')
    checkpoints.save_training(path, net, trainers.trainers, None, dict(config=cfg))
    again = build_net(cfg)                                        # as eval.py: no labels, placeholders
    assert not again.primary_head.adjacency.data().asnumpy().any()
    checkpoints.load_weights(path, again)
    np.testing.assert_array_equal(again(x)[2].asnumpy(), net(x)[2].asnumpy())
    with pytest.raises(UserError, match='has shape'):
        checkpoints.load_weights(path, build_net(_gcn_cfg(num_classes=5)))


def test_label_embeddings(tmp_path):
    np.testing.assert_array_equal(mlgcn.label_embeddings('onehot', 4), np.eye(4))
    rng = np.random.RandomState(0)
    y = (rng.rand(50, 6) < 0.4).astype(np.float32)
    a, b = mlgcn.label_embeddings('cooc', 6, y), mlgcn.label_embeddings('cooc', 6, y)
    assert a.shape == (6, 6) and np.isfinite(a).all() and np.array_equal(a, b)
    good = str(tmp_path / 'glove.npy')
    np.save(good, rng.randn(6, 300).astype(np.float32))
    assert mlgcn.label_embeddings(good, 6).shape == (6, 300)
    with pytest.raises(UserError, match='one row per attribute'):
        mlgcn.label_embeddings(good, 7)
    bad = str(tmp_path / 'objects.npy')
    np.save(bad, np.array([{'a': 1}] * 6, dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match='not a plain numeric'):
        mlgcn.label_embeddings(bad, 6)
    assert mlgcn.attribute_phrases(['longHair', 'Tshiirt', 'upperBodyBlack', 'has_zero']) == \
        ['long hair', 't-shirt', 'upper body black', 'has zero']
