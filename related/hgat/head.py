"""HGAT-FC's head in Gluon, from the public ``hgat_fc.py`` (``BGATLayer``, ``Head``).

    pooled feature (N, D) -> BasicLinear D -> 1024 -> BasicLinear -> group_channels
      -> one ResidualLinearBlock per group, stacked                    (N, G, group_channels)
      -> layer 1 over the G group nodes                                 (gat / fc / none)
      -> per attribute a BasicLinear group_channels -> class_channels on its group's node,
         stacked per group                                               (N, n_g, class_channels)
      -> layer 2 over the attributes of each group                      (gat / fc / none)
      -> per attribute a ResidualLinearBlock + Dense(class_channels -> 1) -> logits in group order
      -> permuted back to the dataset's order                            (N, C)

``BasicLinear`` and ``ResidualLinearBlock`` live in a helper module of the authors' that is not public; they
are assumed to be ``Linear + BatchNorm1d + ReLU`` and ``ReLU(x + BN(Linear(ReLU(BN(Linear(x))))))`` with the
hidden width ``c / reduction``. The global max pooling of the file's ``Head`` is the backbone's
(``pool='max'``).
Linear layers start as PyTorch's: weights U(+-1/sqrt(fan_in)); biases start at zero. BatchNorms are
``backbone.BatchNorm1D`` (the oneDNN-safe BatchNorm for vectors).
"""
import numpy as np
import mxnet as mx
from mxnet import gluon
from mxnet.gluon import nn

from backbone import BatchNorm1D

LINEAR_INIT = mx.init.Xavier(rnd_type='uniform', factor_type='in', magnitude=1)     # U(+-1/sqrt(fan_in))
# PyTorch's xavier_uniform_(gain=1.414): U(+-gain * sqrt(6 / (fan_in + fan_out))); MXNet's Xavier with
# factor 'avg' draws U(+-sqrt(magnitude / ((fan_in + fan_out) / 2))), so magnitude = 3 gain^2.
GAT_INIT = mx.init.Xavier(rnd_type='uniform', factor_type='avg', magnitude=3 * 1.414 ** 2)


class BasicLinear(gluon.HybridBlock):
    """Dense + BatchNorm1D + ReLU (the assumed ``utils.BasicLinear``)."""

    def __init__(self, in_units, units, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.fc = nn.Dense(units, in_units=in_units, weight_initializer=LINEAR_INIT, prefix='fc_')
            self.bn = BatchNorm1D(in_channels=units, prefix='bn_')

    def hybrid_forward(self, F, x):
        return F.relu(self.bn(self.fc(x)))


class ResidualLinearBlock(gluon.HybridBlock):
    """ReLU(x + BN(Dense(ReLU(BN(Dense(x)))))), hidden width ``channels // reduction`` (the assumed
    ``utils.ResidualLinearBlock``)."""

    def __init__(self, channels, reduction=2, **kwargs):
        super().__init__(**kwargs)
        hidden = max(1, channels // reduction)
        with self.name_scope():
            self.fc1 = nn.Dense(hidden, in_units=channels, weight_initializer=LINEAR_INIT, prefix='fc1_')
            self.bn1 = BatchNorm1D(in_channels=hidden, prefix='bn1_')
            self.fc2 = nn.Dense(channels, in_units=hidden, weight_initializer=LINEAR_INIT, prefix='fc2_')
            self.bn2 = BatchNorm1D(in_channels=channels, prefix='bn2_')

    def hybrid_forward(self, F, x):
        return F.relu(x + self.bn2(self.fc2(F.relu(self.bn1(self.fc1(x))))))


class BGATLayer(gluon.HybridBlock):
    """Graph attention over the nodes of x (N, K, C): h = x W, e_ij = LeakyReLU_alpha(a^T [h_i || h_j]),
    attention = softmax_j(e) (dropout on it in training), out = ELU(attention h + beta h), beta a learned
    scalar starting at 1 (the file's last line says ``segelf.beta``: read as ``self.beta``). a^T [h_i || h_j]
    is computed as (h a_1)_i + (h a_2)_j, which is what the file's repeat-and-view construction forms.
    After ``return_attention = True`` it returns (out, attention)."""

    return_attention = False

    def __init__(self, in_units, units, dropout=0.0, alpha=0.2, **kwargs):
        super().__init__(**kwargs)
        self.units, self.dropout, self.alpha = units, float(dropout), float(alpha)
        with self.name_scope():
            self.weight = self.params.get('W', shape=(in_units, units), init=GAT_INIT)
            self.a = self.params.get('a', shape=(2 * units, 1), init=GAT_INIT)
            self.beta = self.params.get('beta', shape=(1,), init=mx.init.One())

    def hybrid_forward(self, F, x, weight, a, beta):  # pylint: disable=arguments-differ
        h = F.dot(x, weight)                                                     # N, K, C'
        left = F.dot(h, F.slice_axis(a, axis=0, begin=0, end=self.units))       # N, K, 1
        right = F.dot(h, F.slice_axis(a, axis=0, begin=self.units, end=2 * self.units))
        e = F.LeakyReLU(F.broadcast_add(left, F.swapaxes(right, 1, 2)), act_type='leaky', slope=self.alpha)
        attention = F.softmax(e, axis=2)                                          # N, K, K
        if self.dropout:
            attention = F.Dropout(attention, p=self.dropout)
        out = F.LeakyReLU(F.batch_dot(attention, h) + F.broadcast_mul(beta, h), act_type='elu', slope=1.0)
        return (out, attention) if self.return_attention else out


class FlatLinear(gluon.HybridBlock):
    """The FC replacement of a graph-attention layer over a sample's flattened nodes: x (N, K, C) to
    (N, K * C), a BasicLinear K * C -> K * C, and back to (N, K, C). The public file's layer-1 replacement
    (``fc_replace_GALayer1``, G * C -> G * C). Its commented-out call reads ``batch_size = x.size(2)`` and
    ``group_channels = x.size(0)``: run as written it raises unless the batch size equals the group width,
    and then its reshape is this one (see the tests)."""

    def __init__(self, nodes, channels, **kwargs):
        super().__init__(**kwargs)
        self.nodes, self.channels = nodes, channels
        with self.name_scope():
            self.fc = BasicLinear(nodes * channels, nodes * channels, prefix='fc_')

    def hybrid_forward(self, F, x):
        return F.reshape(self.fc(F.reshape(x, shape=(0, -1))), shape=(0, self.nodes, self.channels))


class NodeLinear(gluon.HybridBlock):
    """The FC replacement of a graph-attention layer node by node: one BasicLinear C -> C applied to each
    of the K nodes of x (N, K, C), its BatchNorm over the N * K node vectors. The public file's layer-2
    replacement as declared (``fc_replace_GALayer2``: a ``BasicLinear(class_channels, class_channels)`` per
    group; never called there)."""

    def __init__(self, nodes, channels, **kwargs):
        super().__init__(**kwargs)
        self.nodes, self.channels = nodes, channels
        with self.name_scope():
            self.fc = BasicLinear(channels, channels, prefix='fc_')
        self.fc.bn.rows_per_sample = nodes          # PyTorch's running variance: n = N * K (BatchNorm1D)

    def hybrid_forward(self, F, x):
        rows = self.fc(F.reshape(x, shape=(-1, self.channels)))                   # N * K, C
        return F.reshape(rows, shape=(-1, self.nodes, self.channels))


class HGATHead(gluon.HybridBlock):
    """Pooled features (N, ``feat_dim``) -> logits (N, C) in the dataset's order (module docstring).

    ``groups``: one list of attribute indices (the dataset's order) per group; ``layer``: ``gat``, ``fc`` or
    ``none``; ``fc_layer2``: with ``fc``, layer 2 as :class:`NodeLinear` (``node``, the declared form) or
    :class:`FlatLinear` (``flat``); layer 1 is always flat. The permutation back to the dataset's order is a
    product with a constant 0/1 matrix (exact).
    """

    def __init__(self, feat_dim, groups, layer='gat', group_channels=512, class_channels=256, reduce_to=1024,
                 fc_layer2='node', **kwargs):
        super().__init__(**kwargs)
        if fc_layer2 not in ('node', 'flat'):
            raise ValueError('fc_layer2 is node or flat, not %r' % (fc_layer2,))
        self.groups = [list(map(int, g)) for g in groups]
        self.layer, self.sizes, self.fc_layer2 = layer, [len(g) for g in self.groups], fc_layer2
        order = [i for g in self.groups for i in g]
        count = len(order)
        if sorted(order) != list(range(count)):
            raise ValueError('the groups must hold every attribute once: %s' % groups)
        back = np.zeros((count, count), np.float32)
        back[np.arange(count), order] = 1                 # logits_dataset = logits_grouped @ back
        with self.name_scope():
            self.back = self.params.get_constant('back', back)
            self.reduce_fc = nn.HybridSequential(prefix='reduce_')
            self.reduce_fc.add(BasicLinear(feat_dim, reduce_to, prefix='0_'),
                               BasicLinear(reduce_to, group_channels, prefix='1_'))
            self.group_fcs = self._list(
                lambda i: ResidualLinearBlock(group_channels, 2, prefix='group%d_' % i), len(self.groups),
                'groups_')
            self.layer1 = self._layer(len(self.groups), group_channels, 'layer1_')
            self.class_fcs = self._list(
                lambda i: BasicLinear(group_channels, class_channels, prefix='class%d_' % i), count,
                'classes_')
            self.layer2 = self._list(lambda i: self._layer(self.sizes[i], class_channels, 'group%d_' % i,
                                                           self.fc_layer2),
                                     len(self.groups), 'layer2_') if layer != 'none' else None
            self.fcs = self._list(lambda i: self._out(class_channels, i), count, 'out_')

    @staticmethod
    def _list(make, count, prefix):
        seq = nn.HybridSequential(prefix=prefix)
        with seq.name_scope():
            for i in range(count):
                seq.add(make(i))
        return seq

    def _layer(self, nodes, channels, prefix, form='flat'):
        if self.layer == 'gat':
            return BGATLayer(channels, channels, prefix=prefix)
        if self.layer == 'fc':
            return (NodeLinear if form == 'node' else FlatLinear)(nodes, channels, prefix=prefix)
        return None

    @staticmethod
    def _out(channels, i):
        seq = nn.HybridSequential(prefix='class%d_' % i)
        with seq.name_scope():
            seq.add(ResidualLinearBlock(channels, 2, prefix='res_'),
                    nn.Dense(1, in_units=channels, weight_initializer=LINEAR_INIT, prefix='fc_'))
        return seq

    def hybrid_forward(self, F, x, back):  # pylint: disable=arguments-differ
        x = self.reduce_fc(x)                                                         # N, group_channels
        nodes = F.stack(*[fc(x) for fc in self.group_fcs], axis=1)                    # N, G, group_channels
        if self.layer1 is not None:
            nodes = self.layer1(nodes)
        per_class, k = [], 0
        for g, size in enumerate(self.sizes):
            node = F.reshape(F.slice_axis(nodes, axis=1, begin=g, end=g + 1), shape=(0, -1))
            # N, n_g, class_ch.
            inside = F.stack(*[self.class_fcs[k + j](node) for j in range(size)], axis=1)
            if self.layer2 is not None:
                inside = self.layer2[g](inside)
            per_class += [F.reshape(F.slice_axis(inside, axis=1, begin=j, end=j + 1), shape=(0, -1))
                          for j in range(size)]
            k += size
        grouped = F.concat(*[fc(v) for fc, v in zip(self.fcs, per_class)], dim=1)      # N, C (group order)
        return F.dot(grouped, back)                                                      # dataset order
