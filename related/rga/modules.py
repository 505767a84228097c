"""Relation-Aware Global Attention (Zhang et al., CVPR 2020): RGA-S and RGA-C after ResNet stages.

A feature map x (C x H x W) is seen as a graph twice:

* RGA-S (spatial): the N = H*W positions are the nodes. Two 1x1 embeddings give the pairwise
  affinities G_s = theta(x)^T phi(x) (N x N); every position stacks its relations to all others and
  theirs to it (2N values), compresses them (1x1 conv to N/r) and adds the channel mean of an
  embedding of its own feature (1 value); two 1x1 convs map that to one attention value a_i in (0, 1)
  per position: out = a * x, the same weight for every channel of a position.
* RGA-C (channel): the same with the C channels as nodes (their N-dimensional features), giving one
  weight per channel, the same at every position.

Both (``mode='sc'``) apply RGA-S, then RGA-C, as the authors' best variant. Every "1x1" is a conv
without bias + BatchNorm + ReLU, as in the released ``rga_modules.py``; sizes use floor division, but
never below 1 channel (the released code would build a 0-channel conv for maps smaller than 8
positions, e.g. the demo's). The module is tied to one map size, known when it is built. The authors'
weights start as PyTorch 0.4 initialised them: convs U(+-1/sqrt(fan in)), BatchNorm gammas U(0, 1).

Cost: RGA-S's compression conv maps 2N relations to N/r at each of the N positions, N^3 * 2 / r
multiply-adds; RGA-C's does the same with the C channels, C^3 * 2 / s. At a 224-pixel input that is
7.7 GMAC per image for RGA-S at ResNet stage 1 (N = 3136; the whole ResNet-101 forward pass is 7.8)
and 2.1 GMAC for RGA-C at stage 4 of ResNet-50/101 (C = 2048); the other parts are small. Leaving
stage 1 out (``--rga-stages 2,3,4``) removes the first.
"""
import mxnet as mx
from mxnet import gluon
from mxnet.gluon import nn

from attention import ReturnsAttention
from common.errors import UserError

CONV_INIT = mx.init.Xavier(rnd_type='uniform', factor_type='in', magnitude=1)   # U(+-1/sqrt(fan_in))


class _UnitUniform(mx.init.Initializer):
    """U(0, 1): PyTorch 0.4's BatchNorm weight initialisation, which the authors trained with."""

    def _init_weight(self, _, arr):
        arr[:] = mx.nd.random.uniform(0, 1, shape=arr.shape)

    _init_gamma = _init_weight


def _embed(channels, out_channels, relu=True, prefix=''):
    """1x1 conv (no bias) + BatchNorm (+ ReLU)."""
    seq = nn.HybridSequential(prefix=prefix)
    with seq.name_scope():
        seq.add(nn.Conv2D(out_channels, 1, use_bias=False, in_channels=channels,
                          weight_initializer=CONV_INIT))
        seq.add(nn.BatchNorm(in_channels=out_channels, gamma_initializer=_UnitUniform()))
        if relu:
            seq.add(nn.Activation('relu'))
    return seq


def _weights(channels, down_ratio, prefix):
    """W: 1x1 to channels // d (+BN+ReLU), then 1x1 to one map (+BN, no ReLU)."""
    hidden = max(1, channels // down_ratio)
    seq = nn.HybridSequential(prefix=prefix)
    with seq.name_scope():
        seq.add(_embed(channels, hidden, prefix='hidden_'), _embed(hidden, 1, relu=False, prefix='out_'))
    return seq


class RGAModule(ReturnsAttention, gluon.HybridBlock):
    """RGA-S and/or RGA-C for maps of ``in_channels`` x ``height`` x ``width``.

    ``net(x)`` -> the attended map (same shape); with ``return_attention = True`` ->
    ``(out, spatial, channel)``, the weights a (N x 1 x H x W and N x C x 1 x 1; ones where a part is off).
    """

    def __init__(self, in_channels, height, width, use_spatial=True, use_channel=True, cha_ratio=8,
                 spa_ratio=8,
                 down_ratio=8, **kwargs):
        super(RGAModule, self).__init__(**kwargs)
        if not (use_spatial or use_channel):
            raise UserError('an RGA module needs the spatial or the channel part (or both)')
        self.channels, self.height, self.width = in_channels, height, width
        self.use_spatial, self.use_channel = use_spatial, use_channel
        n = height * width
        inter_c, inter_s = max(1, in_channels // cha_ratio), max(1, n // spa_ratio)
        with self.name_scope():
            if use_spatial:
                self.theta_s = _embed(in_channels, inter_c, prefix='theta_s_')
                self.phi_s = _embed(in_channels, inter_c, prefix='phi_s_')
                self.gx_s = _embed(in_channels, inter_c, prefix='gx_s_')
                self.gg_s = _embed(2 * n, inter_s, prefix='gg_s_')
                self.W_s = _weights(1 + inter_s, down_ratio, prefix='W_s_')
            if use_channel:
                self.theta_c = _embed(n, inter_s, prefix='theta_c_')
                self.phi_c = _embed(n, inter_s, prefix='phi_c_')
                self.gx_c = _embed(n, inter_s, prefix='gx_c_')
                self.gg_c = _embed(2 * in_channels, inter_c, prefix='gg_c_')
                self.W_c = _weights(1 + inter_c, down_ratio, prefix='W_c_')

    def _spatial(self, F, x):
        h, w = self.height, self.width
        n = h * w
        theta = F.reshape(self.theta_s(x), shape=(0, 0, -1))                 # B x C' x N
        phi = F.reshape(self.phi_s(x), shape=(0, 0, -1))
        relations = F.batch_dot(theta, phi, transpose_a=True)                  # B x N x N, G_s[i, j] = r_ij
        # Channel p at position q: r_qp (incoming), then r_pq (outgoing). Stacked before the reshape to a
        # map: MXNet 1.9's oneDNN cannot split the gradient of a 4-D concat of two N-channel maps for some
        # N (196 = 14 x 14, ResNet stage 3 at 224 pixels: "could not construct a sub-memory").
        stacked = F.concat(F.swapaxes(relations, 1, 2), relations, dim=1)       # B x 2N x N
        joint = self.gg_s(F.reshape(stacked, shape=(0, 2 * n, h, w)))         # B x N/r x H x W
        own = F.mean(self.gx_s(x), axis=1, keepdims=True)                      # B x 1 x H x W
        attention = F.sigmoid(self.W_s(F.concat(own, joint, dim=1)))           # B x 1 x H x W
        return F.broadcast_mul(attention, x), attention

    def _channel(self, F, x):
        c = self.channels
        # The N positions become the "channels" of a 1 x C map (the released code uses C x 1: the same
        # computation). swapaxes, not transpose: MXNet 1.9's oneDNN transpose fails in some backward passes.
        nodes = F.expand_dims(F.swapaxes(F.reshape(x, shape=(0, c, -1)), 1, 2), axis=2)       # B x N x 1 x C
        theta = F.swapaxes(F.reshape(self.theta_c(nodes), shape=(0, 0, -1)), 1, 2)          # B x C x N'
        phi = F.reshape(self.phi_c(nodes), shape=(0, 0, -1))                  # B x N' x C
        relations = F.batch_dot(theta, phi)                                    # B x C x C
        stacked = F.concat(F.swapaxes(relations, 1, 2), relations, dim=1)       # B x 2C x C (as in _spatial)
        joint = self.gg_c(F.expand_dims(stacked, axis=2))                     # B x C/s x 1 x C
        own = F.mean(self.gx_c(nodes), axis=1, keepdims=True)                  # B x 1 x 1 x C
        weights = self.W_c(F.concat(own, joint, dim=1))                        # B x 1 x 1 x C
        attention = F.sigmoid(F.swapaxes(weights, 1, 3))                       # B x C x 1 x 1
        return F.broadcast_mul(attention, x), attention

    def hybrid_forward(self, F, x):
        spatial = channel = None
        if self.use_spatial:
            x, spatial = self._spatial(F, x)
        if self.use_channel:
            x, channel = self._channel(F, x)
        if not self._return_attention:
            return x
        spatial = spatial if spatial is not None else F.ones_like(F.slice_axis(x, axis=1, begin=0, end=1))
        channel = channel if channel is not None else F.ones_like(F.mean(x, axis=(2, 3), keepdims=True))
        return x, spatial, channel


def rga_blocks(mode, stage_shapes, stages=(1, 2, 3, 4), ratios=(8, 8, 8)):
    """``{stage: RGAModule}`` for ``stage_shapes`` ``{stage: (C, H, W)}``, named ``rga<stage>_`` in the
    caller's name scope. ``mode``: ``s``, ``c`` or ``sc``; ``ratios``: (channel, spatial, down)."""
    if mode not in ('s', 'c', 'sc'):
        raise UserError("--rga takes s, c or sc (or none), got %r" % mode)
    unknown = [s for s in stages if s not in stage_shapes]
    if unknown:
        raise UserError('--rga-stages %s: the backbone has stages %s' % (
            ','.join(map(str, stages)), ','.join(map(str, sorted(stage_shapes)))))
    return {s: RGAModule(stage_shapes[s][0], stage_shapes[s][1], stage_shapes[s][2], 's' in mode, 'c' in mode,
                         ratios[0], ratios[1], ratios[2], prefix='rga%d_' % s) for s in stages}


def attention(backbone, x):
    """The spatial attention of every RGA module of ``backbone`` for the batch ``x`` (run block by block):
    ``[(name, N x 1 x H x W)]``."""
    maps = []
    for sequence in list(backbone.segments) + [backbone.head]:
        for unit in sequence:
            if isinstance(unit, RGAModule):
                unit.return_attention = True
                x, spatial, _ = unit(x)
                unit.return_attention = False
                maps.append((unit.prefix[len(backbone.prefix):].rstrip('_'), spatial))
            else:
                x = unit(x)
    return maps


def overlay(net, x, crop, path):
    """``eval.py --image``: the RGA modules' spatial attention over the crop, in a figure of its own beside
    the attention maps' (``<name>_rga.png``); returns [(file, what it shows)]."""
    from evaluation import plots
    out = path.replace('_attention.png', '_rga.png')
    plots.rga_overlay(crop, [(n, m[0, 0].asnumpy()) for n, m in attention(net.backbone, x)], out)
    return [(out, 'RGA spatial attention')]
