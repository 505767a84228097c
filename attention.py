"""Per-tap attention branch and attention classifier (paper Sec. 3.2, Fig. 2).

For a feature map k_i taken from the backbone at tap i:

* ``f_att`` gives attention logits Z_i with one channel per attribute; a spatial softmax over the
  H*W positions of every (sample, attribute) turns them into maps A_i that each sum to 1.
* the confidence conv gives S_i = sigmoid(Conv1x1_C(k_i)).
* the attended features A_i * S_i (C channels, H x W) go through ``f_cls`` (called ``fsr`` in the
  authors' code) to give the tap's attribute logits y_ai.

The blocks keep the authors' module boundaries (``fatt``, ``fconv``, ``fsr``): the network lists them in
``model.VAANet.stage_modules()``, every module gets its own ``gluon.Trainer`` (``trainers.py``) and its own
``saved_models/*_stage_N.params`` file in the authors' layout (``checkpoints.py``).
"""
import mxnet as mx
from mxnet import gluon
from mxnet.gluon import nn

# Every head weight is Xavier(gaussian, "in", 2); biases start at zero.
HEAD_INIT = mx.init.Xavier(rnd_type='gaussian', factor_type='in', magnitude=2)


class ReturnsAttention(object):
    """A ``return_attention`` switch for a HybridBlock: when on, ``forward`` also returns its attention
    maps. Changing it rebuilds the cached graph (a hybridized graph is traced for one setting)."""

    _return_attention = False

    @property
    def return_attention(self):
        return self._return_attention

    @return_attention.setter
    def return_attention(self, value):
        if bool(value) != self._return_attention:
            self._return_attention = bool(value)
            self._clear_cached_op()


def spatial_softmax(F, logits):
    """Softmax over the H*W positions of each (sample, attribute) map: every output map sums to 1."""
    flat = F.reshape(logits, shape=(0, 0, -1))          # N x C x (H*W)
    return F.reshape_like(F.softmax(flat, axis=-1), logits)


def _conv_bn_relu(seq, channels, kernel, padding=0):
    seq.add(nn.Conv2D(channels, kernel_size=kernel, padding=padding, weight_initializer=HEAD_INIT))
    seq.add(nn.BatchNorm())
    seq.add(nn.Activation('relu'))


class AttentionBranch(gluon.HybridBlock):
    """f_att (attention logits), spatial softmax and the confidence conv for one tap.

    Parameters
    ----------
    num_classes : int
        C, the number of attributes (one attention map per attribute).
    channels : (int, int)
        Widths of the two hidden convs of f_att: (256, 256) in the paper's supplement, (512, 512) in
        the released code.
    second_kernel : int
        Kernel of the second hidden conv: 1 (paper) or 3 with padding 1 (released code).

    Returns ``(attention, confidence, attention_logits)``, each N x C x H x W.
    """

    def __init__(self, num_classes, channels=(256, 256), second_kernel=1, **kwargs):
        super(AttentionBranch, self).__init__(**kwargs)
        with self.name_scope():
            self.fatt = nn.HybridSequential(prefix='fatt_')
            with self.fatt.name_scope():
                _conv_bn_relu(self.fatt, channels[0], 1)
                _conv_bn_relu(self.fatt, channels[1], second_kernel, padding=second_kernel // 2)
                self.fatt.add(nn.Conv2D(num_classes, kernel_size=1, weight_initializer=HEAD_INIT))
            self.fconv = nn.HybridSequential(prefix='fconv_')
            with self.fconv.name_scope():
                self.fconv.add(nn.Conv2D(num_classes, kernel_size=1, weight_initializer=HEAD_INIT))
                self.fconv.add(nn.Activation('sigmoid'))

    def hybrid_forward(self, F, features):
        logits = self.fatt(features)                      # Z_i
        attention = spatial_softmax(F, logits)            # A_i, Eq. 1
        confidence = self.fconv(features)                 # S_i = sigmoid(conv(k_i))
        return attention, confidence, logits


class AttentionClassifier(gluon.HybridBlock):
    """f_cls: attended features (C x H x W) -> attribute logits (C).

    Two 1x1 conv+BN+ReLU layers, one conv whose kernel covers the whole H x W map (no padding, so the
    output is 1 x 1) + BN + ReLU, and a Dense layer. ``channels`` is (256, 512, 512) in the paper's
    supplement and (256, 512, 1024) in the released code; ``map_size`` is the tap's H (= W).
    """

    def __init__(self, num_classes, map_size, channels=(256, 512, 512), **kwargs):
        super(AttentionClassifier, self).__init__(**kwargs)
        with self.name_scope():
            self.fsr = nn.HybridSequential(prefix='fsr_')
            with self.fsr.name_scope():
                _conv_bn_relu(self.fsr, channels[0], 1)
                _conv_bn_relu(self.fsr, channels[1], 1)
                _conv_bn_relu(self.fsr, channels[2], map_size)
                self.fsr.add(nn.Dense(num_classes, flatten=True, weight_initializer=HEAD_INIT))

    def hybrid_forward(self, F, attended):
        return self.fsr(attended)
