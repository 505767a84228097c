"""Losses and prediction history against independent NumPy implementations of Eqs. 4-6."""
import numpy as np
import pytest
import mxnet as mx
from mxnet import autograd, nd

from losses import (AttentionHistoryLoss, PredictionHistory, WeightedFocalLoss, class_prior_weights,
                    positive_ratios)


def np_log_sigmoid(x):
    return -np.logaddexp(0, -x)


def np_focal(x, y, m, pos_w, neg_w, gamma):
    """Eq. 4 written directly: p = sigmoid(x), -w [y (1-p)^g log p + (1-y) p^g log(1-p)]."""
    x = x.astype(np.float64)
    p = 1 / (1 + np.exp(-x))
    log_p, log_1mp = np_log_sigmoid(x), np_log_sigmoid(-x)
    loss = -(pos_w * y * (1 - p) ** gamma * log_p + neg_w * (1 - y) * p ** gamma * log_1mp)
    return (loss * m).sum(axis=1) / x.shape[1]


def np_bce(x, y):
    x = x.astype(np.float64)
    return -(y * np_log_sigmoid(x) + (1 - y) * np_log_sigmoid(-x))


def np_history_std(rows):
    """std_s of Eq. 6 from the list of stored prediction rows (each N x C)."""
    h = np.stack(rows).astype(np.float64)          # n x N x C
    n = h.shape[0]
    if n < 2:
        return np.zeros(h.shape[1:])
    var = h.var(axis=0)                            # population variance (ddof 0)
    return np.sqrt(var + var ** 2 / (n - 1))


def _data(n=16, c=7, scale=4.0):
    x = np.random.randn(n, c).astype(np.float32) * scale
    x[0, :3] = [40.0, -40.0, 0.0]                  # saturated logits must stay finite
    y = (np.random.rand(n, c) < 0.3).astype(np.float32)
    m = (np.random.rand(n, c) > 0.2).astype(np.float32)
    return x, y, m


def test_class_prior_weights_hand_worked():
    # attribute 0: 1 positive of 4 specified (the 5th is unspecified) -> a = .25, r = 1/3
    # attribute 1: 3 of 5 -> a = .6 > .5, r = 1;  attribute 2: 2 of 4 -> a = .5, r = .5 / .5 = 1
    labels = np.array([[1, 1, 1], [0, 1, 1], [0, 1, 0], [0, 0, 0], [1, 0, 0]], np.float32)
    mask = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1], [0, 1, 0]], np.float32)
    np.testing.assert_allclose(positive_ratios(labels, mask), [0.25, 0.6, 0.5])
    pos, neg = class_prior_weights(labels, mask, 'deepmar')
    np.testing.assert_allclose(pos, np.exp([1 - 1 / 3, 0, 0]), rtol=1e-6)
    np.testing.assert_allclose(neg, np.exp([1 / 3, 1, 1]), rtol=1e-6)
    pos, neg = class_prior_weights(labels, mask, 'paper')
    np.testing.assert_allclose(pos, np.exp([-0.25, -0.6, -0.5]), rtol=1e-6)
    np.testing.assert_array_equal(pos, neg)


def test_deepmar_weights_match_the_released_ratio_formula():
    # The released code hard-codes 1/r for WIDER; a = r / (1 + r) recovers the positive ratio.
    inv_r = np.array([1.0, 3.4596, 18.4724, 3.3855, 3.5971, 1.1370, 12.5846, 5.7823, 10.8279, 1.7478,
                      8.8111, 28.4333, 2.7568, 18.0207])
    n = 100000
    a = (1 / inv_r) / (1 + 1 / inv_r)
    labels = (np.arange(n)[:, None] < np.round(a * n)[None, :]).astype(np.float32)
    pos, neg = class_prior_weights(labels)
    r = np.log(neg)
    np.testing.assert_allclose(r, np.where(a <= 0.5, 1 / inv_r, 1.0), rtol=1e-3)
    np.testing.assert_allclose(np.log(pos), 1 - r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('gamma', [0.0, 0.5, 2.0])
@pytest.mark.parametrize('form', ['deepmar', 'paper', None])
def test_weighted_focal_loss_equals_numpy(gamma, form):
    x, y, m = _data()
    if form is None:
        pos_w = neg_w = np.ones(x.shape[1], np.float32)
        loss_fn = WeightedFocalLoss(gamma=gamma)
    else:
        pos_w, neg_w = class_prior_weights(y, m, form)
        loss_fn = WeightedFocalLoss(pos_w, neg_w, gamma=gamma)
    got = loss_fn(nd.array(x), nd.array(y), nd.array(m)).asnumpy()
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, np_focal(x, y, m, pos_w, neg_w, gamma), rtol=1e-5, atol=1e-6)
    loss_fn.hybridize()
    np.testing.assert_allclose(loss_fn(nd.array(x), nd.array(y), nd.array(m)).asnumpy(),
                               np_focal(x, y, m, pos_w, neg_w, gamma), rtol=1e-5, atol=1e-6)


def test_masked_entries_contribute_nothing():
    x, y, m = _data()
    loss_fn = WeightedFocalLoss(*class_prior_weights(y, m))
    base = loss_fn(nd.array(x), nd.array(y), nd.array(m)).asnumpy()
    x2, y2 = x.copy(), y.copy()
    x2[m == 0] = np.random.randn(int((m == 0).sum())) * 50
    y2[m == 0] = 1 - y2[m == 0]
    np.testing.assert_allclose(loss_fn(nd.array(x2), nd.array(y2), nd.array(m)).asnumpy(), base,
                               rtol=1e-6)
    xg = nd.array(x2)
    xg.attach_grad()
    with autograd.record():
        loss = loss_fn(xg, nd.array(y2), nd.array(m))
    loss.backward()
    assert (xg.grad.asnumpy()[m == 0] == 0).all()


def test_plain_bce_switch_is_sigmoid_bce():
    x, y, m = _data()
    got = WeightedFocalLoss(*class_prior_weights(y), gamma=0.5, plain_bce=True)(
        nd.array(x), nd.array(y), nd.array(m)).asnumpy()
    np.testing.assert_allclose(got, (np_bce(x, y) * m).mean(axis=1), rtol=1e-5)
    got = AttentionHistoryLoss(plain_bce=True)(nd.array(x), nd.array(y), nd.array(m),
                                               nd.full(x.shape, 3.0)).asnumpy()
    np.testing.assert_allclose(got, (np_bce(x, y) * m).mean(axis=1), rtol=1e-5)


def test_focal_gradient_matches_finite_differences():
    x = np.array([[1.3, -0.7, 2.2], [-2.5, 0.4, 0.05]])
    y = np.array([[1, 0, 0], [1, 1, 0]], np.float64)
    m = np.array([[1, 1, 0], [1, 1, 1]], np.float64)
    pos_w, neg_w = np.array([1.5, 0.8, 2.0]), np.array([0.7, 1.2, 1.1])
    loss_fn = WeightedFocalLoss(pos_w, neg_w, gamma=0.5)
    xv = nd.array(x, dtype='float64')
    xv.attach_grad()
    with autograd.record():
        total = loss_fn(xv, nd.array(y, dtype='float64'), nd.array(m, dtype='float64')).sum()
    total.backward()
    eps = 1e-6
    numeric = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        hi, lo = x.copy(), x.copy()
        hi[idx] += eps
        lo[idx] -= eps
        numeric[idx] = (np_focal(hi, y, m, pos_w, neg_w, 0.5).sum()
                        - np_focal(lo, y, m, pos_w, neg_w, 0.5).sum()) / (2 * eps)
    np.testing.assert_allclose(xv.grad.asnumpy(), numeric, rtol=1e-5, atol=1e-8)
    assert (xv.grad.asnumpy()[m == 1] != 0).all()


def test_attention_history_loss_equals_numpy():
    x, y, m = _data()
    w = 1 + np.random.rand(*x.shape).astype(np.float32)
    loss_fn = AttentionHistoryLoss()
    got = loss_fn(nd.array(x), nd.array(y), nd.array(m), nd.array(w)).asnumpy()
    np.testing.assert_allclose(got, (w * np_bce(x, y) * m).mean(axis=1), rtol=1e-5)
    got = loss_fn(nd.array(x), nd.array(y), nd.array(m)).asnumpy()           # no weights yet
    np.testing.assert_allclose(got, (np_bce(x, y) * m).mean(axis=1), rtol=1e-5)


def _epochs(num_samples, num_classes, epochs):
    return [np.random.rand(num_samples, num_classes).astype(np.float32) for _ in range(epochs)]


def test_history_weights_follow_eq6_over_the_last_five_epochs():
    n, c = 10, 4
    preds = _epochs(n, c, 9)
    hist = PredictionHistory(n, c, track=5, start_epoch=2)
    for epoch in range(9):
        idx = np.arange(n)
        if epoch >= 5:      # weights used in this epoch come from the epochs stored before it
            stored = preds[max(2, epoch - 5):epoch]
            expected = 1 + np_history_std(stored)
            np.testing.assert_allclose(hist.weights(idx, epoch).asnumpy(), expected, rtol=1e-5)
        else:
            np.testing.assert_array_equal(hist.weights(idx, epoch).asnumpy(), np.ones((n, c)))
        hist.update(idx, nd.array(preds[epoch]), epoch)
    np.testing.assert_array_equal(hist.filled(), np.full(n, 5))


def test_history_with_fewer_than_five_epochs_uses_only_stored_entries():
    n, c = 6, 3
    preds = _epochs(n, c, 3)
    hist = PredictionHistory(n, c, track=5, start_epoch=0, use_epoch=0)
    idx = np.arange(n)
    np.testing.assert_array_equal(hist.std(idx).asnumpy(), np.zeros((n, c)))   # nothing stored
    hist.update(idx, nd.array(preds[0]), 0)
    np.testing.assert_array_equal(hist.std(idx).asnumpy(), np.zeros((n, c)))   # n = 1: no weight
    hist.update(idx, nd.array(preds[1]), 1)
    hist.update(idx[:3], nd.array(preds[2][:3]), 2)                            # only half seen
    std = hist.std(idx).asnumpy()
    np.testing.assert_allclose(std[:3], np_history_std([p[:3] for p in preds]), rtol=1e-5)
    np.testing.assert_allclose(std[3:], np_history_std([p[3:] for p in preds[:2]]), rtol=1e-5)
    np.testing.assert_array_equal(hist.filled(), [3, 3, 3, 2, 2, 2])


def test_history_is_shuffle_safe():
    n, c, epochs = 23, 5, 8
    preds = _epochs(n, c, epochs)
    ordered = PredictionHistory(n, c)
    shuffled = PredictionHistory(n, c)
    rng = np.random.RandomState(3)
    for epoch in range(epochs):
        for start in range(0, n, 4):
            idx = np.arange(start, min(start + 4, n))
            ordered.update(idx, nd.array(preds[epoch][idx]), epoch)
        perm = rng.permutation(n)
        for start in range(0, n, 4):
            idx = perm[start:start + 4]
            shuffled.update(nd.array(idx), nd.array(preds[epoch][idx]), epoch)
    query = rng.permutation(n)[:9]
    np.testing.assert_allclose(shuffled.weights(query, epochs).asnumpy(),
                               ordered.weights(query, epochs).asnumpy(), rtol=1e-6)
    np.testing.assert_allclose(ordered.weights(query, epochs).asnumpy(),
                               1 + np_history_std([p[query] for p in preds[epochs - 5:]]), rtol=1e-5)


def test_upstream_zero_rows_quirk():
    """The released code's buffer: 5 zero rows, always all counted, so n - 1 = 4."""
    n, c = 8, 3
    preds = _epochs(n, c, 5)
    hist = PredictionHistory(n, c, track=5, start_epoch=2, upstream_zero_rows=True)
    idx = np.arange(n)
    for epoch in range(5):
        hist.update(idx, nd.array(preds[epoch]), epoch)
    rows = np.stack(preds[2:5] + [np.zeros((n, c))] * 2)        # epochs 2-4 plus two zero rows
    var = rows.var(axis=0)
    expected = 1 + np.sqrt(var + var ** 2 / 4)
    np.testing.assert_allclose(hist.weights(idx, 5).asnumpy(), expected, rtol=1e-5)
    assert not np.allclose(expected, 1 + np_history_std(preds[2:5]))   # the quirk differs


def test_history_lives_on_its_context_and_returns_on_requested_one():
    hist = PredictionHistory(4, 2, start_epoch=0, use_epoch=0, ctx=mx.cpu(1))
    hist.update(nd.array([0, 1], ctx=mx.cpu(0)), nd.array([[0.2, 0.4], [0.5, 0.5]], ctx=mx.cpu(0)), 0)
    hist.update([0, 1], nd.array([[0.6, 0.4], [0.5, 0.1]]), 1)
    w = hist.weights([0, 1], 1, ctx=mx.cpu(0))
    assert w.context == mx.cpu(0) and hist.buffer.context == mx.cpu(1)
    np.testing.assert_allclose(w.asnumpy()[0], 1 + np_history_std([np.array([.2, .4]), np.array([.6, .4])]),
                               rtol=1e-5)


def test_the_authors_focal_branch_has_the_same_values_and_gradients_as_ours():
    """The released WeightedFocal's focal branch (wider_training.py), as written: p copied into a new
    NDArray with mx.nd.array, log(p + 1e-12), weights exp(y + (1 - 2y) r). Under mxnet 1.9.1 that copy
    is recorded, so gradients flow through it: values and gradients equal our softplus form (away from
    saturation, where the 1e-12 clip would bite)."""
    np.random.seed(3)
    x, y, _ = _data(n=12, c=5, scale=2.0)
    x[0] = np.random.randn(5)                                          # no saturated logits here
    r = np.random.uniform(0.05, 1.0, 5).astype(np.float32)              # batch_ratios = 1 / class weights
    gamma = 2                                                          # the released branch's gamma
    pred = nd.array(x)
    pred.attach_grad()
    with autograd.record():
        p = mx.nd.array(1 / (1 + nd.exp(-pred)))
        label, ratios = nd.array(y), nd.array(r)
        weights = nd.exp(label + (1 - label * 2) * ratios)
        w_p, w_n = nd.power(1. - p, gamma), nd.power(p, gamma)
        theirs = -(w_p * nd.log(p + 1e-12) * label + w_n * nd.log(1. - p + 1e-12) * (1. - label))
        theirs = nd.mean(theirs * weights, axis=0, exclude=True)
    theirs.backward()
    their_grad = pred.grad.asnumpy()
    ours_fn = WeightedFocalLoss(np.exp(1 - r), np.exp(r), gamma=gamma)
    pred2 = nd.array(x)
    pred2.attach_grad()
    with autograd.record():
        ours = ours_fn(pred2, nd.array(y))
    ours.backward()
    assert np.abs(their_grad).max() > 1e-3                             # the gradient is not cut
    np.testing.assert_allclose(theirs.asnumpy(), ours.asnumpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(their_grad, pred2.grad.asnumpy(), rtol=1e-4, atol=1e-6)
