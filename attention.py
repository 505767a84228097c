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


class FullMapConv(gluon.HybridBlock):
    """A k x k convolution without padding applied to a k x k map (output 1 x 1), computed as the fully
    connected layer it is: out[n, o] = sum_{c,i,j} W[o, c, i, j] x[n, c, i, j] + b[o].

    The weight lives as the (O, C*k*k) matrix of the convolution's (O, C, k, k) kernel (both flatten in C
    order, so it is the same numbers, the same initial draw included); in files it keeps the kernel's
    shape, ``weight.file_shape``: ``checkpoints.py`` writes and reads every parameter in
    :func:`file_shape`, so training checkpoints and the authors' ``saved_models/`` files are unchanged.
    Names (``convN_weight``, ``convN_bias``) and the output, (N, O, 1, 1), are the convolution's.

    Why: MXNet 1.9.1's oneDNN convolution is slow for this shape, above all in training (the backward
    pass of a 512 x 512 x 14 x 14 kernel: 94 ms at batch 1 and 154 ms at batch 32 on 2 cores, against
    15 and 41 ms for the matrix product), and viewing a 4-D parameter as a matrix inside the graph
    copies it at every pass. An input of another size than k x k is refused (MXNet's shape error), as
    the convolution's 1 x 1 output would be."""

    def __init__(self, channels, map_size, in_channels, weight_initializer=None, **kwargs):
        super(FullMapConv, self).__init__(**kwargs)
        self._channels = channels
        with self.name_scope():
            self.weight = self.params.get('weight', shape=(channels, in_channels * map_size * map_size),
                                          init=weight_initializer)
            self.weight.file_shape = (channels, in_channels, map_size, map_size)
            self.bias = self.params.get('bias', shape=(channels,), init='zeros')

    def _alias(self):
        return 'conv'           # named like the convolution it computes (the authors' files' keys)

    def hybrid_forward(self, F, x, weight, bias):  # pylint: disable=arguments-differ
        out = F.FullyConnected(x, weight, bias, num_hidden=self._channels, flatten=True, name='fwd')
        return F.reshape(out, shape=(0, 0, 1, 1))


def file_shape(param):
    """The shape a parameter has in checkpoint files: its own, or a :class:`FullMapConv` kernel's 4-D
    shape."""
    return tuple(getattr(param, 'file_shape', None) or param.shape)


def _conv_bn_relu(seq, channels, kernel, padding=0, full_map_of=None):
    if full_map_of:         # the input's channels: the weight's shape is known before the first batch
        seq.add(FullMapConv(channels, kernel, in_channels=full_map_of, weight_initializer=HEAD_INIT))
    else:
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
    output is 1 x 1; computed as a matrix product, :class:`FullMapConv`) + BN + ReLU, and a Dense layer.
    ``channels`` is (256, 512, 512) in the paper's supplement and (256, 512, 1024) in the released code;
    ``map_size`` is the tap's H (= W).
    """

    def __init__(self, num_classes, map_size, channels=(256, 512, 512), **kwargs):
        super(AttentionClassifier, self).__init__(**kwargs)
        with self.name_scope():
            self.fsr = nn.HybridSequential(prefix='fsr_')
            with self.fsr.name_scope():
                _conv_bn_relu(self.fsr, channels[0], 1)
                _conv_bn_relu(self.fsr, channels[1], 1)
                _conv_bn_relu(self.fsr, channels[2], map_size, full_map_of=channels[1])
                self.fsr.add(nn.Dense(num_classes, flatten=True, weight_initializer=HEAD_INIT))

    def hybrid_forward(self, F, attended):
        return self.fsr(attended)
