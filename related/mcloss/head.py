"""MC-Loss, the mutual-channel loss (Chang et al., "The Devil is in the Channels", TIP 2020), for
multi-label attributes.

The last feature map's channels are split into one group of xi channels per attribute. Two terms:

* discriminality: channel-wise attention (CWA: in every group ``int(xi * drop_rate)`` channels are zeroed,
  at random places, one mask for the whole batch, redrawn on every call), then cross-channel max pooling
  (CCMP: the maximum over the group's channels at each position), then global average pooling: one
  value g_i per attribute. The released code puts g through softmax cross-entropy over classes
  (``mode='ce'``, kept for comparison with it); for attributes, ``mode='bce'`` (default) uses the masked
  per-attribute sigmoid BCE of g_i + b_i with a learnable bias b_i (the map is post-ReLU, so g_i >= 0
  and sigmoid(g_i) >= 0.5: without b the loss on negatives could not fall below log 2).
* diversity: ``div = 1 - mean_i h(F_i) / xi`` with h(F_i) = sum over positions of the maximum over the
  group's channels of each channel's spatial softmax: h is in [1, xi], 1 when the channels of a group
  are identical and xi when they peak at different places. The released code's form (``supervisor()``
  in CUB-200-2011.py), label-free, on the unmasked map.

``MCHead`` computes (dis_logits, div) from a feature map; ``MutualChannelLoss`` weighs them:
``w_dis * L_dis + w_div * div`` per sample (defaults 1.5 and 20, the authors' current code). The head is
used only while training, so the CWA mask needs no train/test switch inside the graph.
"""
import collections

import numpy as np
from mxnet import gluon, nd
from mxnet.gluon.loss import Loss

from common.errors import UserError
from losses import _log_sigmoids


class MCHead(gluon.HybridBlock):
    """Feature map (N, K, H, W) -> (dis_logits (N, C), div (N,)).

    ``xi=0``: xi = K // C, and the first C * xi channels of the map are used (the rest are left out);
    ``xi>0``: a 1x1 convolution projects the map to C * xi channels first (not in the paper's ResNet
    setting; its "xi channels per class" regime). ``drop_rate``: the share of each group that CWA zeroes
    (``int(xi * drop_rate)`` channels). ``mode``: 'bce' (learnable per-attribute bias) or 'ce'
    (the released single-label form, no parameters).

    ``forward(fmap, keep=None)``: ``keep`` (C, xi) of 0/1 replaces the random CWA mask (tests, and a
    reader comparing with the released code's own mask).
    """

    def __init__(self, num_classes, channels, xi=0, drop_rate=0.4, mode='bce', **kwargs):
        super().__init__(**kwargs)
        if mode not in ('bce', 'ce'):
            raise UserError("MC-Loss mode %r: use 'bce' (attributes) or 'ce' (single-label)" % mode)
        self.num_classes, self.mode, self.projected = int(num_classes), mode, xi > 0
        self.xi = int(xi) if xi > 0 else int(channels) // self.num_classes
        if self.xi < 2:
            raise UserError('MC-Loss needs at least 2 channels per attribute: the map has %d channels for %d '
                            'attributes; give --mc-xi 2 or more (a 1x1 projection)' % (channels, num_classes))
        if not 0 <= drop_rate < 1:
            raise UserError('--mc-drop must be in [0, 1), got %s' % drop_rate)
        self.drop = int(self.xi * drop_rate)
        with self.name_scope():
            self.projection = (gluon.nn.Conv2D(self.num_classes * self.xi, 1, in_channels=channels)
                               if self.projected else None)
            if mode == 'bce':
                self.bias = self.params.get('bias', shape=(self.num_classes,), init='zeros')

    @property
    def used_channels(self):
        """How many channels of the input map the groups take (C * xi), before any projection."""
        return None if self.projected else self.num_classes * self.xi

    def cwa_mask(self, F, fmap):
        """(C, xi) of 0/1 with exactly ``drop`` zeros per row at random places: the rank of uniform draws
        within the row, kept where it is ``drop`` or more. Drawn inside the graph, so a hybridized head
        draws a fresh mask on every call too."""
        shape = (self.num_classes, self.xi)
        u = (F.random.uniform(shape=shape, ctx=fmap.context) if F is nd else F.random.uniform(shape=shape))
        return F.argsort(F.argsort(u, axis=1), axis=1) >= self.drop

    def hybrid_forward(self, F, fmap, keep=None, bias=None):  # pylint: disable=arguments-differ
        if self.projection is not None:
            fmap = self.projection(fmap)
        else:
            fmap = F.slice_axis(fmap, axis=1, begin=0, end=self.num_classes * self.xi)
        groups = F.reshape(fmap, shape=(0, -4, self.num_classes, -1, -2))          # N, C, xi, H, W
        # diversity, on the unmasked map: spatial softmax per channel, max over the group, sum over space
        flat = F.reshape(groups, shape=(0, 0, 0, -1))                                # N, C, xi, HW
        h = F.sum(F.max(F.softmax(flat, axis=-1), axis=2), axis=-1)                 # N, C
        div = 1 - F.mean(h, axis=1) / self.xi
        # discriminality: CWA mask (shared by the batch), CCMP, GAP
        if keep is None:
            keep = self.cwa_mask(F, fmap)
        masked = F.broadcast_mul(flat, F.reshape(keep, shape=(1, self.num_classes, self.xi, 1)))
        logits = F.mean(F.max(masked, axis=2), axis=-1)                              # N, C
        if bias is not None:
            logits = F.broadcast_add(logits, F.reshape(bias, shape=(1, -1)))
        return logits, div


class MutualChannelLoss(Loss):
    """``loss(dis_logits, div, label, mask=None)`` -> (N,): ``dis_weight * L_dis + div_weight * div``.

    ``mode='bce'``: L_dis = (1/C) sum_i m_i BCE(logit_i, y_i) (the masked per-sample mean of the project's
    other losses); ``mode='ce'``: ``label`` holds class indices (N,) and L_dis is the softmax
    cross-entropy over the C groups, as the released code.
    """

    def __init__(self, dis_weight=1.5, div_weight=20.0, mode='bce', weight=None, batch_axis=0, **kwargs):
        super().__init__(weight, batch_axis, **kwargs)
        self.dis_weight, self.div_weight, self.mode = float(dis_weight), float(div_weight), mode

    def terms(self, dis_logits, div, label, mask=None):
        """The two unweighted terms per sample, ``(L_dis, div)`` (float32 under ``--amp``), for logging."""
        dis_logits, div = [a.astype('float32') if a.dtype == np.float16 else a for a in (dis_logits, div)]
        return self._dis(nd, dis_logits, label.astype(dis_logits.dtype) if self.mode == 'bce' else label,
                         None if mask is None else mask.astype(dis_logits.dtype)), div

    def weigh(self, dis, div):
        """``dis_weight * L_dis + div_weight * div``: the MC-Loss term of the objective."""
        return self.dis_weight * dis + self.div_weight * div

    def objective_terms(self, aux, label, mask=None):
        """The objective's interface (``losses.VAALoss``): from the head's auxiliary outputs ``[dis_logits,
        div]``, (the weighted term to add, ``{'mc_dis': L_dis, 'mc_div': div}`` unweighted, per sample)."""
        dis, div = self.terms(aux[0], aux[1], label, mask)
        return self.weigh(dis, div), collections.OrderedDict([('mc_dis', dis), ('mc_div', div)])

    def _dis(self, F, dis_logits, label, mask):
        if self.mode == 'ce':
            return -F.pick(F.log_softmax(dis_logits, axis=-1), label, axis=-1)
        log_p, log_1mp = _log_sigmoids(F, dis_logits)
        bce = -(label * log_p + (1 - label) * log_1mp)
        return F.mean(bce * mask if mask is not None else bce, axis=-1)

    def hybrid_forward(self, F, dis_logits, div, label, mask=None):  # pylint: disable=arguments-differ
        return self.weigh(self._dis(F, dis_logits, label, mask), div)

    def __repr__(self):
        return 'MutualChannelLoss(%s, dis x %g, div x %g)' % (self.mode, self.dis_weight, self.div_weight)
