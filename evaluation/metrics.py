"""Evaluation protocols, shared by train.py and eval.py.

Labels come as y in {0, 1} plus a mask (1 = specified); :func:`to_signed` gives WIDER's 1 / -1 / 0
encoding. Scores are the fused logits: they rank like the probabilities, but a float32 sigmoid
saturates at exactly 1.0 for logits above ~16.6 and would turn distinct scores into ties.

* WIDER mAP, as the official WIDER-Attribute script computes it (``get_mAP_eccv16.m``, also the
  authors' ``evaluate_mAP(testingFlag=True)``): per attribute, rank the samples by score, highest
  first; label 1 is positive, -1 negative, 0 (unspecified) counts as neither; AP is the all-point
  interpolated area (precision made monotone from the right, summed over the recall steps); mAP is
  the mean. Equal scores keep their input order, as MATLAB's stable ``sort(..., 'descend')`` keeps
  them (the authors' NumPy ``argsort()[::-1]`` reverses them; without ties all three agree).
  An attribute with no positive label has no AP (the official script and the authors' function give
  NaN there, and so a NaN mAP); we report its AP as n/a and average the others, and the table says
  which attributes were left out.
* PETA / PA-100K / RAP metrics at threshold 0.5 (p = sigmoid(logit) in float64), in one of two conventions
  (``convention``; ``--metrics``):

  - ``ours``, that of DeepMAR's evaluation code (``attribute_evaluate`` of
    dangweili/pedestrian-attribute-recognition-pytorch), which the pedestrian-attribute papers of 2018
    (this one among them) used: p >= 0.5 is positive; label-based mA = mean over attributes of
    (TPR + TNR) / 2, an attribute without positive (or negative) labels is n/a and left out of the mean;
    instance-based accuracy |P n G| / |P u G|, precision |P n G| / |P| (0 for an empty prediction),
    recall |P n G| / |G| averaged over the samples that have a positive label (the others are left out),
    F1 = 2 P R / (P + R) from the mean P and R.
  - ``rethinking``, that of the community's current baseline, ``get_pedestrian_metrics`` of
    valencebond/Rethinking_of_PAR (``metrics/pedestrian_metrics.py``): p > 0.5 is positive; every ratio
    is x / (y + 1e-20), so an attribute without positives has TPR 0 and counts with TNR / 2, and a sample
    without positives counts with accuracy, precision and recall 0; F1 = 2 P R / (P + R + 1e-20).

  They agree except on those three cases (a score of exactly 0.5, samples without a positive label,
  attributes without positives). Only specified entries count in either (the community's files have no
  unspecified ones).
"""
import numpy as np


def to_signed(labels, mask):
    """{0,1} labels + mask -> WIDER's 1 (positive) / -1 (negative) / 0 (unspecified)."""
    labels = np.asarray(labels)
    return np.where(np.asarray(mask) > 0, 2 * (labels > 0.5) - 1, 0).astype(np.int8)


def average_precision(scores, signed):
    """AP of one attribute as the official WIDER script computes it; ``signed`` in {1, -1, 0}.

    NaN when there is no positive. Ties keep their input order (a stable descending sort).
    """
    scores = np.asarray(scores, dtype=np.float64)
    signed = np.asarray(signed)
    keep = signed != 0                      # unspecified entries move neither TP nor FP
    scores, positive = scores[keep], signed[keep] == 1
    num_pos = int(positive.sum())
    if num_pos == 0:
        return float('nan')
    positive = positive[np.argsort(-scores, kind='stable')]
    tp = np.cumsum(positive)
    fp = np.cumsum(~positive)
    recall = tp / float(num_pos)
    precision = tp / (tp + fp).astype(np.float64)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]            # monotone from the right
    steps = np.where(mrec[1:] != mrec[:-1])[0] + 1
    return float(np.sum((mrec[steps] - mrec[steps - 1]) * mpre[steps]))


def wider_map(scores, labels, mask):
    """(mAP, per-attribute APs) under the WIDER protocol; NaN APs (no positives) are not averaged."""
    signed = to_signed(labels, mask)
    aps = np.array([average_precision(scores[:, c], signed[:, c]) for c in range(signed.shape[1])])
    valid = ~np.isnan(aps)
    return (float(aps[valid].mean()) if valid.any() else float('nan')), aps


def label_based(scores, labels, mask, threshold=0.5):
    """Per-attribute (TPR + TNR) / 2 and its mean mA; NaN where a class has no specified sample."""
    pred = np.asarray(scores) >= threshold
    gt = np.asarray(labels) > 0.5
    m = np.asarray(mask) > 0
    pos, neg = (gt & m).sum(0), (~gt & m).sum(0)
    with np.errstate(invalid='ignore', divide='ignore'):
        tpr = (pred & gt & m).sum(0) / pos.astype(np.float64)
        tnr = (~pred & ~gt & m).sum(0) / neg.astype(np.float64)
    per_attr = (tpr + tnr) / 2
    valid = ~np.isnan(per_attr)
    return (float(per_attr[valid].mean()) if valid.any() else float('nan')), per_attr


def instance_based(scores, labels, mask, threshold=0.5):
    """Instance accuracy, precision, recall and F1 (see the module docstring for empty sets)."""
    m = np.asarray(mask) > 0
    pred = (np.asarray(scores) >= threshold) & m
    gt = (np.asarray(labels) > 0.5) & m
    inter = (pred & gt).sum(1).astype(np.float64)
    union = (pred | gt).sum(1).astype(np.float64)
    n_pred, n_gt = pred.sum(1).astype(np.float64), gt.sum(1).astype(np.float64)
    eff = n_gt > 0
    if not eff.any():
        return dict(accuracy=float('nan'), precision=float('nan'), recall=float('nan'), f1=float('nan'))
    acc = np.mean(inter[eff] / union[eff])
    prec = np.mean(np.where(n_pred[eff] > 0, inter[eff] / np.maximum(n_pred[eff], 1), 0.0))
    rec = np.mean(inter[eff] / n_gt[eff])
    f1 = 2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0
    return dict(accuracy=float(acc), precision=float(prec), recall=float(rec), f1=float(f1))


RETHINKING_EPS = 1e-20


def rethinking_label_based(scores, labels, mask, threshold=0.5):
    """Per-attribute (TPR + TNR) / 2 and its mean, as ``get_pedestrian_metrics`` computes them."""
    pred = np.asarray(scores) > threshold
    gt = np.asarray(labels) > 0.5
    m = np.asarray(mask) > 0
    gt_pos, gt_neg = (gt & m).sum(0).astype(float), (~gt & m).sum(0).astype(float)
    true_pos, true_neg = (gt & pred & m).sum(0).astype(float), (~gt & ~pred & m).sum(0).astype(float)
    per_attr = (1.0 * true_pos / (gt_pos + RETHINKING_EPS) + 1.0 * true_neg / (gt_neg + RETHINKING_EPS)) / 2
    return float(np.mean(per_attr)), per_attr


def rethinking_instance_based(scores, labels, mask, threshold=0.5):
    """Instance accuracy, precision, recall and F1 as ``get_pedestrian_metrics`` computes them."""
    m = np.asarray(mask) > 0
    pred = (np.asarray(scores) > threshold) & m
    gt = (np.asarray(labels) > 0.5) & m
    gt_pos, pred_pos = gt.sum(1).astype(float), pred.sum(1).astype(float)
    inter, union = (gt & pred).sum(1).astype(float), (gt | pred).sum(1).astype(float)
    acc = np.mean(inter / (union + RETHINKING_EPS))
    prec = np.mean(inter / (pred_pos + RETHINKING_EPS))
    rec = np.mean(inter / (gt_pos + RETHINKING_EPS))
    f1 = 2 * prec * rec / (prec + rec + RETHINKING_EPS)
    return dict(accuracy=float(acc), precision=float(prec), recall=float(rec), f1=float(f1))


CONVENTION_NAMES = {'ours': 'our (DeepMAR)', 'rethinking': "Rethinking_of_PAR's"}
CONVENTIONS = {'ours': (label_based, instance_based),
               'rethinking': (rethinking_label_based, rethinking_instance_based)}


def sigmoid(logits):
    """p = 1 / (1 + exp(-logit)) in float64."""
    with np.errstate(over='ignore'):
        return 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))


def evaluate(logits, labels, mask, names=None, convention='ours'):
    """Every metric at once from the fused logits, as a JSON-ready dict (fractions in [0, 1]); mA and the
    instance metrics in ``convention`` (``ours`` or ``rethinking``, see the module docstring), which the
    dict names under ``metrics``.

    ``no_positive`` lists the attributes without a positive label (no AP; left out of the mAP).
    """
    if convention not in CONVENTIONS:
        raise ValueError('unknown metric convention %r (choose from %s)' % (convention, sorted(CONVENTIONS)))
    label_fn, instance_fn = CONVENTIONS[convention]
    logits = np.asarray(logits, np.float64)
    names = list(names) if names is not None else ['attr%d' % i for i in range(logits.shape[1])]
    probs = sigmoid(logits)
    m_ap, aps = wider_map(logits, labels, mask)
    m_a, per_ma = label_fn(probs, labels, mask)
    inst = instance_fn(probs, labels, mask)
    out = dict(mAP=m_ap, mA=m_a, metrics=convention, **inst)
    out['per_attribute'] = [dict(name=n, ap=_num(a), ma=_num(b),
                                 positives=int(((labels[:, i] > 0.5) & (mask[:, i] > 0)).sum()),
                                 specified=int((mask[:, i] > 0).sum()))
                            for i, (n, a, b) in enumerate(zip(names, aps, per_ma))]
    out['no_positive'] = [n for n, a in zip(names, aps) if np.isnan(a)]
    return out


def chance_map(labels, mask):
    """Expected mAP of random scores: AP of a random ranking is about the positive rate."""
    signed = to_signed(labels, mask)
    rates = []
    for c in range(signed.shape[1]):
        spec = signed[:, c] != 0
        if (signed[spec, c] == 1).any():
            rates.append((signed[spec, c] == 1).mean())
    return float(np.mean(rates)) if rates else float('nan')


def _num(x):
    return None if x is None or np.isnan(x) else float(x)


def format_table(result, compare=None, title=None):
    """A per-attribute table (AP and mA in %), with the paper's AP and the delta when given."""
    lines = []
    if title:
        lines.append(title)
    header = '%-16s %8s %8s %7s %9s' % ('attribute', 'AP', 'mA', 'pos', 'specified')
    if compare:
        header += ' %8s %7s' % ('paper AP', 'delta')
    lines.append(header)
    lines.append('-' * len(header))
    for row in result['per_attribute']:
        ap = '%8.2f' % (100 * row['ap']) if row['ap'] is not None else '%8s' % 'n/a'
        ma = '%8.2f' % (100 * row['ma']) if row['ma'] is not None else '%8s' % 'n/a'
        line = '%-16s %s %s %7d %9d' % (row['name'][:16], ap, ma, row['positives'], row['specified'])
        if compare:
            ref = compare.get(row['name'])
            if ref is not None and row['ap'] is not None:
                line += ' %8.1f %+7.1f' % (ref, 100 * row['ap'] - ref)
        lines.append(line)
    lines.append('-' * len(header))
    lines.append('mAP %.2f   mA %.2f   instance acc %.2f  prec %.2f  rec %.2f  F1 %.2f' % tuple(
        100 * result[k] if result[k] is not None and not np.isnan(result[k]) else float('nan')
        for k in ('mAP', 'mA', 'accuracy', 'precision', 'recall', 'f1'))
        + ('   (mA and instance metrics: %s convention)' % CONVENTION_NAMES[result['metrics']]
           if result.get('metrics', 'ours') != 'ours' else ''))
    missing = result.get('no_positive') or []
    if missing:
        lines.append('mAP over %d of %d attributes: no positive label for %s (AP n/a; the official script '
                     'would give NaN)' % (len(result['per_attribute']) - len(missing),
                                          len(result['per_attribute']),
                                          ', '.join(missing)))
    return '\n'.join(lines)
