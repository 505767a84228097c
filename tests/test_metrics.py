"""Evaluation protocols against the official WIDER script and the authors' function (NumPy
transcriptions), brute force and hand-worked examples."""
import numpy as np
import pytest

from evaluation import metrics


def brute_force_ap(scores, signed):
    """AP by enumerating thresholds: for every distinct score t, precision and recall of 'score >= t'
    over the specified samples; AP = sum over recall levels of the recall step times the best precision
    at that recall or beyond. (Equal to the ranking definition when no two scores tie.)"""
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


def official_wider_ap(scores, labels):
    """get_mAP_eccv16.m (the official WIDER-Attribute script), line by line in NumPy: MATLAB's
    sort(..., 'descend') is stable, 0/0 is NaN, and MATLAB's max ignores NaN (np.fmax)."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    num_truths = np.sum(labels == 1)
    srtd = np.argsort(-scores, kind='stable')
    fp = np.cumsum(labels[srtd] == -1)
    tp = np.cumsum(labels[srtd] == 1)
    with np.errstate(invalid='ignore', divide='ignore'):
        rec = tp / num_truths
        prec = tp / (fp + tp)
    mrec = np.r_[0, rec, 1]
    mpre = np.r_[0, prec, 0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = np.fmax(mpre[i], mpre[i + 1])
    i = np.where(mrec[1:] != mrec[:-1])[0] + 1
    return float(np.sum((mrec[i] - mrec[i - 1]) * mpre[i]))


def authors_ap(scores, labels):
    """The authors' evaluate_mAP(testingFlag=True) inner function (evaluation.py), in NumPy."""
    num_truths = sum(labels == 1)
    sort_ids = scores.argsort()[::-1]
    fp = np.cumsum(labels[sort_ids] == -1)
    tp = np.cumsum(labels[sort_ids] == 1)
    rec = tp / float(num_truths)
    with np.errstate(invalid='ignore'):
        prec = np.true_divide(tp, fp + tp)
    mrec = np.concatenate((np.array([0]), rec, np.array([1])), axis=0)
    mpre = np.concatenate((np.array([0]), prec, np.array([0])), axis=0)
    for i in range(mpre.shape[0] - 2, 0, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    i = np.where(mrec[1:] != mrec[0:-1])[0] + 1
    return sum((mrec[i] - mrec[i - 1]) * mpre[i])


def _split(signed):
    return (signed == 1).astype(np.float32), (signed != 0).astype(np.float32)


def test_ap_hand_worked():
    # ranking without the unspecified: + - + -  -> AP = .5 * 1 + .5 * 2/3
    assert metrics.average_precision(np.array([.9, .8, .7, .6, .5]), np.array([1, -1, 0, 1, -1])) == \
        pytest.approx(0.5 + 0.5 * 2 / 3)
    # a tie keeps the input order, as the official script's stable sort: + - + gives 1/2 * 1 + 1/2 * 2/3,
    # - + + gives precision 1/2 then 2/3, made monotone: 2/3 at both recall steps
    assert metrics.average_precision(np.array([.9, .9, .5]), np.array([1, -1, 1])) == pytest.approx(5 / 6)
    assert metrics.average_precision(np.array([.9, .9, .5]), np.array([-1, 1, 1])) == pytest.approx(2 / 3)


@pytest.mark.parametrize('seed', range(6))
def test_ap_equals_the_official_script_with_ties_saturation_shuffles_and_unspecified(seed):
    rng = np.random.RandomState(seed)
    n, c = 80, 9
    signed = rng.choice([1, -1, 0], size=(n, c), p=[.3, .6, .1])
    signed[:, 5] = -1                                    # all negative
    signed[:, 6] = 0                                     # all unspecified
    signed[:, 7] = np.where(rng.rand(n) < .5, 1, 0)      # positives and unspecified only
    signed[:3, 8] = 0                                    # unspecified entries ranked first
    scores = np.round(rng.rand(n, c), 1)                 # many ties
    scores[:, 3] = 1 / (1 + np.exp(-rng.uniform(10, 25, n).astype(np.float32)))   # float32 sigmoids: 1.0 ties
    scores[:3, 8] = 2.0
    for order in (np.arange(n), rng.permutation(n), rng.permutation(n)):
        s, g = scores[order], signed[order]
        m_ap, aps = metrics.wider_map(s, *_split(g))
        expected = np.array([official_wider_ap(s[:, i], g[:, i]) for i in range(c)])
        np.testing.assert_allclose(aps, expected, rtol=0, atol=1e-12, equal_nan=True)
        assert np.isnan(aps[5]) and np.isnan(aps[6]) and aps[7] == pytest.approx(1.0)
        assert m_ap == pytest.approx(np.nanmean(expected), abs=1e-12)


def test_ap_without_ties_equals_the_authors_function_and_brute_force():
    rng = np.random.RandomState(1)
    scores = rng.rand(500, 5)
    signed = rng.choice([1, -1, 0], size=(500, 5), p=[.2, .7, .1])
    for i in range(5):
        ap = metrics.average_precision(scores[:, i], signed[:, i])
        assert ap == pytest.approx(authors_ap(scores[:, i], signed[:, i]), abs=1e-12)
        assert ap == pytest.approx(brute_force_ap(scores[:, i], signed[:, i]), abs=1e-12)
        perm = rng.permutation(500)                      # without ties the input order does not matter
        assert metrics.average_precision(scores[perm, i], signed[perm, i]) == pytest.approx(ap, abs=1e-15)


def test_ranking_on_logits_avoids_the_ties_of_saturated_sigmoids():
    """Logits above ~16.6 all give float32 sigmoid 1.0: ranked on those, positives and negatives tie
    and the AP depends on their input order. evaluate() ranks on the logits themselves."""
    rng = np.random.RandomState(4)
    n = 400
    signed = rng.choice([1, -1], size=(n, 1), p=[.4, .6])
    logits = np.where(signed == 1, rng.uniform(15, 30, (n, 1)),
                      rng.uniform(-5, 20, (n, 1))).astype(np.float32)
    probs32 = (1 / (1 + np.exp(-logits))).astype(np.float32)
    assert (probs32 == 1.0).mean() > 0.2                  # the saturation is real
    result = metrics.evaluate(logits, *_split(signed))
    on_logits = official_wider_ap(logits[:, 0].astype(np.float64), signed[:, 0])
    assert result['mAP'] == pytest.approx(on_logits, abs=1e-12)
    assert official_wider_ap(probs32[:, 0], signed[:, 0]) < on_logits - 0.005    # what the ties cost
    # thresholded metrics use p = sigmoid(logit) >= 0.5, i.e. logit >= 0
    assert result['mA'] == pytest.approx(metrics.label_based((logits >= 0).astype(float), *_split(signed))[0])


def test_an_attribute_without_positives_is_reported_and_left_out_of_the_mean():
    signed = np.array([[1, -1], [-1, -1], [1, 0], [-1, -1]])
    result = metrics.evaluate(np.array([[2., 1], [1, 2], [3, 0], [0, 1]]), *_split(signed), names=['a', 'b'])
    assert result['no_positive'] == ['b'] and result['per_attribute'][1]['ap'] is None
    assert result['mAP'] == pytest.approx(1.0)
    table = metrics.format_table(result)
    assert 'mAP over 1 of 2 attributes: no positive label for b' in table and 'n/a' in table


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


# ---------------------------------------------------------------------------------------------- conventions

def deepmar_attribute_evaluate(gt_result, pt_result):
    """DeepMAR's attribute_evaluate_lidw (dangweili/pedestrian-attribute-recognition-pytorch,
    baseline/utils/evaluate.py), in NumPy 3; ``pt_result`` is the 0/1 prediction (its callers set
    score >= 0, i.e. p >= 0.5, to 1)."""
    result = {}
    gt_pos = np.sum((gt_result == 1).astype(float), axis=0)
    gt_neg = np.sum((gt_result == 0).astype(float), axis=0)
    pt_pos = np.sum((gt_result == 1).astype(float) * (pt_result == 1).astype(float), axis=0)
    pt_neg = np.sum((gt_result == 0).astype(float) * (pt_result == 0).astype(float), axis=0)
    label_pos_acc = 1.0 * pt_pos / gt_pos
    label_neg_acc = 1.0 * pt_neg / gt_neg
    result['label_acc'] = (label_pos_acc + label_neg_acc) / 2
    gt_pos = np.sum((gt_result == 1).astype(float), axis=1)
    pt_pos = np.sum((pt_result == 1).astype(float), axis=1)
    floatersect_pos = np.sum((gt_result == 1).astype(float) * (pt_result == 1).astype(float), axis=1)
    union_pos = np.sum(((gt_result == 1) + (pt_result == 1)).astype(float), axis=1)
    cnt_eff = float(gt_result.shape[0])
    for iter, key in enumerate(gt_pos):
        if key == 0:
            union_pos[iter] = 1
            pt_pos[iter] = 1
            gt_pos[iter] = 1
            cnt_eff = cnt_eff - 1
            continue
        if pt_pos[iter] == 0:
            pt_pos[iter] = 1
    result['instance_acc'] = np.sum(floatersect_pos / union_pos) / cnt_eff
    result['instance_precision'] = np.sum(floatersect_pos / pt_pos) / cnt_eff
    result['instance_recall'] = np.sum(floatersect_pos / gt_pos) / cnt_eff
    result['instance_F1'] = 2 * result['instance_precision'] * result['instance_recall'] / (
        result['instance_precision'] + result['instance_recall'])
    return result


def _cases(seed=0, n=2000, c=35):
    """Random scores, then the three inputs on which the conventions part: scores of exactly 0.5, samples
    without a positive label, an attribute without positives."""
    rng = np.random.RandomState(seed)
    gt = (rng.rand(n, c) < rng.uniform(0.05, 0.6, c)).astype(np.float64)
    gt[:, :2] = 0
    gt[rng.rand(n) < 0.5, 0] = 1                       # every attribute has positives and negatives
    gt[rng.rand(n) < 0.5, 1] = 1
    probs = rng.rand(n, c)
    tied = np.where(rng.rand(n, c) < 0.3, 0.5, probs)
    empty = rng.rand(n) < 0.2
    no_attr = gt.copy()
    no_attr[:, 5] = 0
    assert gt.sum(1).min() > 0
    yield 'random', probs, gt
    yield 'tied', tied, gt
    yield 'no-positive samples', probs, np.where(empty[:, None], 0, gt)
    yield 'no-positive attribute', probs, no_attr
    yield 'all three', tied, np.where(empty[:, None], 0, no_attr)


@pytest.mark.parametrize('seed', [0, 1])
def test_the_rethinking_convention_is_get_pedestrian_metrics(seed):
    from tests.rethinking_reference import get_pedestrian_metrics
    for case, probs, gt in _cases(seed):
        theirs = get_pedestrian_metrics(gt, probs)
        ones = np.ones_like(gt)
        m_a, per = metrics.rethinking_label_based(probs, gt, ones)
        inst = metrics.rethinking_instance_based(probs, gt, ones)
        np.testing.assert_allclose(per, theirs['label_ma'], rtol=0, atol=1e-12, err_msg=case)
        assert abs(m_a - theirs['ma']) <= 1e-12, case
        for ours, key in (('accuracy', 'instance_acc'), ('precision', 'instance_prec'),
                          ('recall', 'instance_recall'), ('f1', 'instance_f1')):
            assert abs(inst[ours] - theirs[key]) <= 1e-12, (case, ours)
        # the same through evaluate(), which takes the logits: p = sigmoid(logit) in float64
        logits = np.log(probs) - np.log1p(-probs)
        got = metrics.evaluate(logits, gt, ones, convention='rethinking')
        again = get_pedestrian_metrics(gt, metrics.sigmoid(logits))
        assert got['metrics'] == 'rethinking'
        assert abs(got['mA'] - again['ma']) <= 1e-12 and abs(got['f1'] - again['instance_f1']) <= 1e-12, case


@pytest.mark.parametrize('seed', [0, 1])
def test_our_convention_is_deepmars_and_differs_from_theirs_only_in_the_three_cases(seed):
    from tests.rethinking_reference import get_pedestrian_metrics
    for case, probs, gt in _cases(seed):
        ones = np.ones_like(gt)
        ours_ma, per = metrics.label_based(probs, gt, ones)
        ours = metrics.instance_based(probs, gt, ones)
        with np.errstate(invalid='ignore', divide='ignore'):
            deepmar = deepmar_attribute_evaluate(gt, (probs >= 0.5).astype(float))
        np.testing.assert_allclose(per, deepmar['label_acc'], rtol=0, atol=1e-12, err_msg=case)  # NaN = n/a
        assert abs(ours_ma - np.nanmean(deepmar['label_acc'])) <= 1e-12
        for k, key in (('accuracy', 'instance_acc'), ('precision', 'instance_precision'),
                       ('recall', 'instance_recall'), ('f1', 'instance_F1')):
            assert abs(ours[k] - deepmar[key]) <= 1e-12, (case, k)
        theirs = get_pedestrian_metrics(gt, probs)
        same = (abs(ours_ma - theirs['ma']) <= 1e-12
                and abs(ours['accuracy'] - theirs['instance_acc']) <= 1e-12)
        assert same == (case == 'random'), case


def test_conventions_hand_worked():
    """Three samples, two attributes (the second never positive): a tie at 0.5 and an empty sample."""
    probs = np.array([[0.5, 0.2], [0.7, 0.6], [0.1, 0.3]])
    gt = np.array([[1, 0], [1, 0], [0, 0]], np.float64)
    ones = np.ones_like(gt)
    # ours: 0.5 is positive; attribute 1 has no positives (n/a) -> mA = attribute 0 = (2/2 + 1/1) / 2 = 1;
    # samples 0, 1 count: acc (1/1 + 1/2) / 2, prec (1 + 1/2) / 2, rec (1 + 1) / 2
    assert metrics.label_based(probs, gt, ones)[0] == pytest.approx(1.0)
    ours = metrics.instance_based(probs, gt, ones)
    assert (ours['accuracy'], ours['precision'], ours['recall']) == pytest.approx((0.75, 0.75, 1.0))
    # theirs: 0.5 is negative; attribute 0 TPR 1/2, TNR 1; attribute 1 TPR 0, TNR 2/3 -> mA (3/4 + 1/3) / 2;
    # all three samples count: acc (0 + 1/2 + 0) / 3, prec (0 + 1/2 + 0) / 3, rec (0 + 1 + 0) / 3
    assert metrics.rethinking_label_based(probs, gt, ones)[0] == pytest.approx((0.75 + 1 / 3) / 2)
    theirs = metrics.rethinking_instance_based(probs, gt, ones)
    assert (theirs['accuracy'], theirs['precision'], theirs['recall']) == pytest.approx((1 / 6, 1 / 6, 1 / 3))
    assert theirs['f1'] == pytest.approx(2 * (1 / 6) * (1 / 3) / (1 / 6 + 1 / 3))


def test_unspecified_entries_count_in_neither_convention():
    rng = np.random.RandomState(5)
    probs, gt = rng.rand(300, 6), (rng.rand(300, 6) < 0.4).astype(np.float64)
    mask = (rng.rand(300, 6) < 0.8).astype(np.float64)
    for label_fn, instance_fn in metrics.CONVENTIONS.values():
        # an unspecified entry's label and score are irrelevant: flip both, nothing changes
        flipped_gt, flipped_p = np.where(mask > 0, gt, 1 - gt), np.where(mask > 0, probs, 1 - probs)
        assert label_fn(probs, gt, mask)[0] == label_fn(flipped_p, flipped_gt, mask)[0]
        assert instance_fn(probs, gt, mask) == instance_fn(flipped_p, flipped_gt, mask)
