"""Evaluation protocols against brute force and hand-worked examples."""
import numpy as np
import pytest

import metrics


def brute_force_ap(scores, signed):
    """WIDER AP by enumerating thresholds: for every distinct score t, precision and recall of
    'score >= t' over the specified samples; AP = sum over recall levels of the recall step times the
    best precision at that recall or beyond."""
    keep = signed != 0
    s, pos = scores[keep], signed[keep] == 1
    if pos.sum() == 0:
        return float('nan')
    points = []
    for t in sorted(set(s.tolist()), reverse=True):
        sel = s >= t
        tp = (sel & pos).sum()
        points.append((tp / pos.sum(), tp / sel.sum()))
    ap, prev_r = 0.0, 0.0
    for r, _ in points:
        if r > prev_r:
            best = max(p for rr, p in points if rr >= r)
            ap += (r - prev_r) * best
            prev_r = r
    return ap


def upstream_style_ap(scores, signed):
    """The authors' test-time function, as the protocol describes it: sort descending, cumulative TP
    and FP (unspecified entries count as neither), precision made monotone from the right."""
    order = np.argsort(-scores, kind='mergesort')
    lab = signed[order]
    tp, fp = np.cumsum(lab == 1), np.cumsum(lab == -1)
    rec = tp / float((signed == 1).sum())
    with np.errstate(invalid='ignore'):
        prec = tp / (tp + fp)
    mrec = np.r_[0, rec, 1]
    mpre = np.r_[0, prec, 0]
    for i in range(len(mpre) - 2, 0, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    idx = np.where(mrec[1:] != mrec[:-1])[0] + 1
    return float(np.sum((mrec[idx] - mrec[idx - 1]) * mpre[idx]))


def test_ap_hand_worked():
    # ranking without the unspecified: + - + -  -> AP = .5 * 1 + .5 * 2/3
    assert metrics.average_precision(np.array([.9, .8, .7, .6, .5]), np.array([1, -1, 0, 1, -1])) == \
        pytest.approx(0.5 + 0.5 * 2 / 3)
    # a tie between a positive and a negative is one threshold: P = 1/2 at R = 1/2, then 2/3 at R = 1
    assert metrics.average_precision(np.array([.9, .9, .5]), np.array([1, -1, 1])) == pytest.approx(2 / 3)
    assert metrics.average_precision(np.array([.9, .9, .5]), np.array([-1, 1, 1])) == pytest.approx(2 / 3)


@pytest.mark.parametrize('seed', range(6))
def test_ap_equals_brute_force_with_ties_and_unspecified(seed):
    rng = np.random.RandomState(seed)
    n, c = 60, 8
    scores = np.round(rng.rand(n, c), 1)                 # many ties
    signed = rng.choice([1, -1, 0], size=(n, c), p=[.3, .6, .1])
    signed[:, 5] = -1                                    # all negative
    signed[:, 6] = 0                                     # all unspecified
    signed[:, 7] = np.where(rng.rand(n) < .5, 1, 0)      # positives and unspecified only
    labels, mask = (signed == 1).astype(np.float32), (signed != 0).astype(np.float32)
    m_ap, aps = metrics.wider_map(scores, labels, mask)
    expected = np.array([brute_force_ap(scores[:, i], signed[:, i]) for i in range(c)])
    np.testing.assert_allclose(aps, expected, rtol=1e-12, equal_nan=True)
    assert np.isnan(aps[5]) and np.isnan(aps[6]) and aps[7] == pytest.approx(1.0)
    assert m_ap == pytest.approx(np.nanmean(expected))


def test_ap_without_ties_equals_the_authors_function():
    rng = np.random.RandomState(1)
    scores = rng.rand(500, 5)
    signed = rng.choice([1, -1, 0], size=(500, 5), p=[.2, .7, .1])
    for i in range(5):
        assert metrics.average_precision(scores[:, i], signed[:, i]) == \
            pytest.approx(upstream_style_ap(scores[:, i], signed[:, i]), abs=1e-12)


def test_ap_does_not_depend_on_the_order_of_tied_scores():
    rng = np.random.RandomState(2)
    scores = np.round(rng.rand(200), 1)
    signed = rng.choice([1, -1], size=200)
    perm = rng.permutation(200)
    assert metrics.average_precision(scores, signed) == metrics.average_precision(scores[perm], signed[perm])


def _hand_example():
    #             gt            pred           mask
    rows = [((1, 1), (1, 1), (1, 1)),
            ((0, 1), (1, 0), (1, 1)),
            ((1, 0), (0, 0), (1, 1)),
            ((0, 0), (0, 1), (1, 0)),        # attribute 1 unspecified: this sample has no positive
            ((1, 1), (1, 0), (1, 1))]
    gt = np.array([r[0] for r in rows], np.float32)
    scores = np.array([r[1] for r in rows], np.float32) * 0.8 + 0.1   # 0.9 / 0.1
    mask = np.array([r[2] for r in rows], np.float32)
    return scores, gt, mask


def test_label_based_mA_hand_worked():
    scores, gt, mask = _hand_example()
    m_a, per = metrics.label_based(scores, gt, mask)
    # attribute 0: TPR 2/3, TNR 1/2; attribute 1 (4 specified): TPR 1/3, TNR 1/1
    np.testing.assert_allclose(per, [(2 / 3 + 1 / 2) / 2, (1 / 3 + 1) / 2])
    assert m_a == pytest.approx(0.625)


def test_instance_metrics_hand_worked():
    scores, gt, mask = _hand_example()
    got = metrics.instance_based(scores, gt, mask)
    # samples 0, 1, 2, 4 count: acc (1 + 0 + 0 + 1/2) / 4, prec (1 + 0 + 0 + 1) / 4, rec (1 + 0 + 0 + 1/2) / 4
    assert got['accuracy'] == pytest.approx(0.375)
    assert got['precision'] == pytest.approx(0.5)
    assert got['recall'] == pytest.approx(0.375)
    assert got['f1'] == pytest.approx(2 * 0.5 * 0.375 / 0.875)


def test_signed_encoding_and_chance_level():
    labels = np.array([[1, 0], [0, 0], [1, 1], [0, 1]], np.float32)
    mask = np.array([[1, 1], [1, 0], [1, 1], [0, 1]], np.float32)
    np.testing.assert_array_equal(metrics.to_signed(labels, mask), [[1, -1], [-1, 0], [1, 1], [0, 1]])
    # positive rate among the specified: attribute 0 rows 0-2 -> 2/3, attribute 1 rows 0, 2, 3 -> 2/3
    assert metrics.chance_map(labels, mask) == pytest.approx(2 / 3)
    # Random scores reach about the chance level.
    rng = np.random.RandomState(0)
    lab = (rng.rand(20000, 3) < [.5, .2, .05]).astype(np.float32)
    m_ap, _ = metrics.wider_map(rng.rand(20000, 3), lab, np.ones_like(lab))
    assert m_ap == pytest.approx(metrics.chance_map(lab, np.ones_like(lab)), abs=0.02)
