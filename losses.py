"""Losses of the paper (Sec. 3.3) with a per-sample prediction history.

Labels are y in {0, 1} plus a mask (1 = specified, 0 = unspecified); every loss is a per-sample mean
over the C attributes in which masked entries contribute 0. log p and log(1 - p) are computed
from the logits as -softplus(-x) and -softplus(x), so nothing is clipped and gradients flow through p.

* :class:`WeightedFocalLoss` (Eq. 4), for the primary branch:
  L_w = -w [ y (1-p)^gamma log p + (1-y) p^gamma log(1-p) ].
* :class:`AttentionHistoryLoss` (Eqs. 5-6), for each attention tap: L_ai = (1 + std_s) * BCE, the
  std of each sample's recent fused predictions coming from :class:`PredictionHistory`.
* :class:`VAALoss` (Eq. 7): the total, L_w on the primary logits + L_ai on every tap, used by
  training, validation and the benchmark alike.
* :func:`class_prior_weights`: the per-attribute weights of Eq. 4, in the DeepMAR form the authors'
  code computes or in the form printed in the paper.

Upstream quirks are switches: ``plain_bce`` (the released losses were plain sigmoid BCE) and
``PredictionHistory(upstream_zero_rows=True)``.
"""
import collections

import numpy as np
import mxnet as mx
from mxnet import gluon, nd
from mxnet.gluon.loss import Loss

from common.errors import UserError


def positive_ratios(labels, mask=None):
    """a_c: fraction of positives among the specified training labels of each attribute."""
    labels = np.asarray(labels, dtype=np.float64)
    mask = np.ones_like(labels) if mask is None else np.asarray(mask, dtype=np.float64)
    specified = mask.sum(axis=0)
    positives = (labels * mask).sum(axis=0)
    return np.divide(positives, specified, out=np.zeros_like(positives), where=specified > 0)


def class_prior_weights(labels, mask=None, form='deepmar'):
    """Per-attribute (positive, negative) weights of Eq. 4 from the training labels.

    ``deepmar`` (what the authors' code computes): r_c = a_c / (1 - a_c) if a_c <= 0.5 else 1, and
    w = exp(y (1 - r_c) + (1 - y) r_c), i.e. exp(1 - r_c) on positives and exp(r_c) on negatives.
    ``paper`` (Eq. 4 as printed): w_c = exp(-a_c) on both terms.
    Returns two float32 arrays of length C.
    """
    ratios = positive_ratios(labels, mask)
    if form == 'deepmar':
        r = np.where(ratios <= 0.5, ratios / np.maximum(1.0 - ratios, 1e-12), 1.0)
        return np.exp(1.0 - r).astype(np.float32), np.exp(r).astype(np.float32)
    if form == 'paper':
        w = np.exp(-ratios).astype(np.float32)
        return w, w.copy()
    raise UserError('unknown class-weight form %r: use deepmar or paper' % form)


def _log_sigmoids(F, logits):
    """(log p, log(1 - p)) for p = sigmoid(logits), without forming p."""
    return -F.Activation(-logits, act_type='softrelu'), -F.Activation(logits, act_type='softrelu')


class _MaskedLoss(Loss):
    """Common calling convention: ``loss(pred, label, mask=None, ...)`` -> one value per sample."""

    def _masked_mean(self, F, loss, mask):
        return F.mean(loss * mask, axis=self._batch_axis, exclude=True)


class WeightedFocalLoss(_MaskedLoss):
    """Weighted focal loss of Eq. 4 for the primary logits.

    Parameters
    ----------
    pos_weight, neg_weight : array of C floats or None
        Class-prior weights on the positive and negative terms (:func:`class_prior_weights`); None
        means 1.
    gamma : float
        Focusing parameter (0.5 in the paper; 0 gives weighted BCE).
    plain_bce : bool
        Upstream quirk: the authors' released loss skipped weights and focusing, i.e. plain BCE.

    ``loss(pred, label, mask=None)`` -> shape (N,).
    """

    def __init__(self, pos_weight=None, neg_weight=None, gamma=0.5, plain_bce=False, batch_axis=0, **kwargs):
        super(WeightedFocalLoss, self).__init__(None, batch_axis, **kwargs)
        self._gamma = float(gamma)
        self._plain_bce = bool(plain_bce)
        self._pos = None if pos_weight is None else np.asarray(pos_weight, np.float32).reshape(1, -1)
        self._neg = None if neg_weight is None else np.asarray(neg_weight, np.float32).reshape(1, -1)
        self._cache = {}

    def _weights(self, ctx, dtype, num_classes):
        key = (ctx, np.dtype(dtype).name)
        if key not in self._cache:
            pos = np.ones((1, num_classes)) if self._pos is None or self._plain_bce else self._pos
            neg = np.ones((1, num_classes)) if self._neg is None or self._plain_bce else self._neg
            if pos.shape[1] != num_classes:
                raise UserError('class weights are for %d attributes but the logits have %d'
                                % (pos.shape[1], num_classes))
            self._cache[key] = (nd.array(pos, ctx=ctx, dtype=dtype), nd.array(neg, ctx=ctx, dtype=dtype))
        return self._cache[key]

    def forward(self, pred, label, mask=None):  # pylint: disable=arguments-differ
        if mask is None:
            mask = label.ones_like()
        pos, neg = self._weights(pred.context, pred.dtype, pred.shape[-1])
        return super(WeightedFocalLoss, self).forward(pred, label, mask, pos, neg)

    # pylint: disable=arguments-differ
    def hybrid_forward(self, F, pred, label, mask, pos_weight, neg_weight):
        log_p, log_1mp = _log_sigmoids(F, pred)
        # (1-p)^gamma = exp(gamma log(1-p)), p^gamma = exp(gamma log p): smooth, no p clipping. With
        # plain_bce the weights are ones and gamma 0, which is exactly BCE (and uses every input).
        gamma = 0.0 if self._plain_bce else self._gamma
        pos_term = F.broadcast_mul(pos_weight, label * F.exp(gamma * log_1mp) * log_p)
        neg_term = F.broadcast_mul(neg_weight, (1 - label) * F.exp(gamma * log_p) * log_1mp)
        return self._masked_mean(F, -(pos_term + neg_term), mask)


class AttentionHistoryLoss(_MaskedLoss):
    """Attention loss of Eqs. 5-6 for one tap: (1 + std_s) * BCE(y_ai, y).

    ``loss(pred, label, mask=None, std_weight=None)``: ``std_weight`` is the N x C factor
    1 + std_s from :meth:`PredictionHistory.weights` (None or all ones before weighting starts).
    ``plain_bce=True`` (upstream quirk) ignores it. Returns shape (N,).
    """

    def __init__(self, plain_bce=False, batch_axis=0, **kwargs):
        super(AttentionHistoryLoss, self).__init__(None, batch_axis, **kwargs)
        self._plain_bce = bool(plain_bce)

    def forward(self, pred, label, mask=None, std_weight=None):  # pylint: disable=arguments-differ
        if mask is None:
            mask = label.ones_like()
        if std_weight is None or self._plain_bce:
            std_weight = label.ones_like()
        return super(AttentionHistoryLoss, self).forward(pred, label, mask, std_weight)

    def hybrid_forward(self, F, pred, label, mask, std_weight):  # pylint: disable=arguments-differ
        log_p, log_1mp = _log_sigmoids(F, pred)
        bce = -(label * log_p + (1 - label) * log_1mp)
        return self._masked_mean(F, std_weight * bce, mask)


def _as(array, dtype):
    return array if array is None or array.dtype == dtype else array.astype(dtype)


class VAALoss(gluon.Block):
    """The paper's objective (Eq. 7): L = L_w(y_p) + sum_i L_ai(y_ai), one value per sample.

    L_w is :class:`WeightedFocalLoss` on the primary logits, L_ai :class:`AttentionHistoryLoss` on each
    tap's logits with the history weights 1 + std_s. Training, validation and the benchmark all compute
    the loss here, so the validation curve shows the objective that training minimises (with weights 1:
    validation samples have no history).

    Parameters
    ----------
    pos_weight, neg_weight, gamma, plain_bce
        As for :class:`WeightedFocalLoss` (``plain_bce`` applies to both terms).
    primary : bool
        Include L_w. The authors' ``--finetune`` drops it (the backbone, whose output it trains, is
        frozen).
    aux : a related system's loss on the network's auxiliary outputs, optional
        (``related.aux_loss``: MC-Loss with ``--mc-loss``). :meth:`objective` adds it while training.
        Validation does not evaluate the auxiliary head, so the validation loss stays Eq. 7 alone (as does
        the logged training loss; the auxiliary terms are logged beside it).

    ``loss(primary_logits, tap_logits, label, mask=None, std_weight=None)`` -> shape (N,): Eq. 7, computed
    in the logits' dtype, except that float16 logits (``--amp``) are cast to float32 first.
    """

    def __init__(self, pos_weight=None, neg_weight=None, gamma=0.5, plain_bce=False, primary=True, aux=None,
                 **kwargs):
        super(VAALoss, self).__init__(**kwargs)
        self.primary = bool(primary)
        with self.name_scope():
            self.focal = WeightedFocalLoss(pos_weight, neg_weight, gamma=gamma, plain_bce=plain_bce)
            self.attention = AttentionHistoryLoss(plain_bce=plain_bce)
            self.aux = aux

    def objective(self, primary, taps, label, mask=None, std_weight=None, aux=None):
        """What training minimises, and its parts: ``(total, {'eq7': ..., 'primary': the focal term
        (absent without it), 'tap0', 'tap1', ...: each tap's history-weighted term, <the auxiliary loss's
        terms>...})``, each of shape (N,) (the auxiliary terms unweighted; Eq. 7 is the sum of the primary
        and tap terms). ``aux``: the network's auxiliary outputs (``net.return_aux``), needed when an
        auxiliary loss is set."""
        parts = self.terms(primary, taps, label, mask, std_weight)
        eq7 = self.sum_of(parts)
        parts = collections.OrderedDict([('eq7', eq7)] + list(parts.items()))
        if self.aux is None:
            return eq7, parts
        term, terms = self.aux.objective_terms(aux, label, mask)
        parts.update(terms)
        return eq7 + term, parts

    def __repr__(self):
        taps = 'plain sigmoid BCE' if self.attention._plain_bce else 'history-weighted BCE (Eqs. 5-6)'
        if not self.primary:
            text = '%s on each tap; no loss on the primary logits (backbone frozen)' % taps
        elif self.focal._plain_bce:
            text = 'plain sigmoid BCE on the primary logits and on each tap (the released code)'
        else:
            text = 'weighted focal loss (Eq. 4, gamma %g) on the primary logits + %s on each tap' % (
                self.focal._gamma, taps)
        return text + (' + %r' % self.aux if self.aux is not None else '')

    def terms(self, primary, taps, label, mask=None, std_weight=None):
        """The terms of Eq. 7, each of shape (N,): ``primary`` (Eq. 4; absent when ``primary`` is off) and
        ``tap<i>`` (Eqs. 5-6), in the logits' dtype (float16 logits are cast to float32 first)."""
        dtype = np.float32 if primary.dtype == np.float16 else primary.dtype
        primary, taps, label, mask, std_weight = [
            [_as(t, dtype) for t in a] if isinstance(a, (list, tuple)) else _as(a, dtype)
            for a in (primary, taps, label, mask, std_weight)]
        if not (taps or self.primary):
            raise ValueError('VAALoss without the primary term needs at least one tap')
        parts = collections.OrderedDict()
        if self.primary:
            parts['primary'] = self.focal(primary, label, mask)                                     # Eq. 4
        for i, tap in enumerate(taps):
            parts['tap%d' % i] = self.attention(tap, label, mask, std_weight)                     # Eqs. 5-6
        return parts

    @staticmethod
    def sum_of(terms):
        """Eq. 7 from :meth:`terms`: the primary term plus the sum of the tap terms."""
        focal = terms.get('primary')
        taps = [v for k, v in terms.items() if k != 'primary']
        if not taps:
            return focal
        attention = nd.add_n(*taps)
        return attention if focal is None else focal + attention

    def forward(self, primary, taps, label, mask=None, std_weight=None):  # pylint: disable=arguments-differ
        return self.sum_of(self.terms(primary, taps, label, mask, std_weight))


class PredictionHistory(object):
    """Each training sample's recent fused predictions, for the weights of Eqs. 5-6.

    The buffer is an NDArray of shape (num_samples, track, C) on ``ctx`` holding p(positive) (for a
    binary attribute its variance equals that of p(true label)). :meth:`update` stores one row per
    sample and epoch, by sample index, from epoch ``start_epoch`` on, keeping the last ``track``;
    :meth:`weights` gives 1 + std_s with std_s = sqrt(var + var^2 / (n - 1)), var the population
    variance of the n stored rows, from epoch ``use_epoch`` on (n < 2 gives weight 1). Indexing by
    sample makes any shuffling safe.

    ``upstream_zero_rows=True`` reproduces the released code: the zero-initialised buffer always counts
    as ``track`` rows, so the first weighted epochs mix in zeros and n - 1 = track - 1.
    """

    def __init__(self, num_samples, num_classes, track=5, start_epoch=2, use_epoch=None,
                 ctx=None, upstream_zero_rows=False):
        if track < 1:
            raise UserError('history track must be at least 1, got %d' % track)
        self.num_samples, self.num_classes, self.track = num_samples, num_classes, track
        self.start_epoch = start_epoch
        self.use_epoch = track if use_epoch is None else use_epoch
        self.upstream_zero_rows = upstream_zero_rows
        self.ctx = ctx or mx.cpu()
        self.buffer = nd.zeros((num_samples, track, num_classes), ctx=self.ctx)
        self.counts = nd.zeros((num_samples,), ctx=self.ctx)

    def _index(self, indices):
        if isinstance(indices, nd.NDArray):
            return indices.as_in_context(self.ctx).astype('float32')
        return nd.array(np.asarray(indices), ctx=self.ctx)

    def update(self, indices, probs, epoch):
        """Store ``probs`` (N x C, sigmoid of the fused logits) for samples ``indices`` at ``epoch``.

        Does nothing before ``start_epoch``. Call once per sample and epoch.
        """
        if epoch < self.start_epoch:
            return
        idx = self._index(indices)
        probs = probs.as_in_context(self.ctx) if isinstance(probs, nd.NDArray) else \
            nd.array(np.asarray(probs), ctx=self.ctx)
        old = nd.take(self.buffer, idx)                                   # N x T x C, newest first
        rows = [probs.expand_dims(1)]
        if self.track > 1:
            rows.append(nd.slice_axis(old, axis=1, begin=0, end=self.track - 1))
        self.buffer[idx] = nd.concat(*rows, dim=1)
        self.counts[idx] = nd.minimum(nd.take(self.counts, idx) + 1, self.track)

    def std(self, indices):
        """std_s (N x C) of each sample's stored predictions; 0 where fewer than 2 are stored."""
        idx = self._index(indices)
        rows = nd.take(self.buffer, idx)                                  # N x T x C
        if self.upstream_zero_rows:
            n = nd.full((rows.shape[0], 1, 1), self.track, ctx=self.ctx)
            valid = nd.ones_like(rows)
        else:
            n = nd.take(self.counts, idx).reshape((-1, 1, 1))
            steps = nd.arange(self.track, ctx=self.ctx).reshape((1, -1, 1))
            valid = nd.broadcast_lesser(steps, n)                        # N x T x 1
        n_safe = nd.maximum(n, 1)
        mean = nd.broadcast_div(nd.sum(nd.broadcast_mul(rows, valid), axis=1, keepdims=True), n_safe)
        var = nd.broadcast_div(nd.sum(nd.broadcast_mul(nd.square(nd.broadcast_sub(rows, mean)), valid),
                                      axis=1, keepdims=True), n_safe)
        std = nd.sqrt(var + nd.square(var) / nd.maximum(n_safe - 1, 1))
        std = nd.broadcast_mul(std, n >= 2)
        return std.reshape((rows.shape[0], self.num_classes))

    def weights(self, indices, epoch, ctx=None):
        """1 + std_s for samples ``indices`` at ``epoch`` (all ones before ``use_epoch``), on ``ctx``."""
        ctx = ctx or self.ctx
        if epoch < self.use_epoch:
            return nd.ones((len(indices), self.num_classes), ctx=ctx)
        return (1 + self.std(indices)).as_in_context(ctx)

    def filled(self):
        """Number of stored predictions per sample (NumPy int array)."""
        return self.counts.asnumpy().astype(np.int64)

    def state_dict(self):
        """``{'buffer', 'counts'}``: everything a checkpoint needs to continue the history."""
        return {'buffer': self.buffer, 'counts': self.counts}

    def load_state_dict(self, arrays, where='checkpoint'):
        """Restore :meth:`state_dict` arrays; UserError when they were made for another training split."""
        if tuple(arrays['buffer'].shape) != tuple(self.buffer.shape):
            raise UserError('%s: the prediction history holds %s but this run needs %s (another training '
                            'split?)' % (where, arrays['buffer'].shape, self.buffer.shape))
        self.buffer[:] = arrays['buffer'].as_in_context(self.ctx)
        self.counts[:] = arrays['counts'].as_in_context(self.ctx)
