"""The network built the way the authors' released code builds it, as an independent reference.

Used by the tests (are our outputs numerically the same as the authors' construction, given the same
``saved_models/`` files?) and by the benchmark (how fast is their execution style?). It follows the
released code's structure, not ours:

* the backbone is the model-zoo ResNet v1 whose output layer is replaced by a new Dense(C) inside the
  network's name scope, turned into a ``gluon.SymbolBlock`` whose outputs are internal nodes of the
  symbol graph (the taps) and the new Dense's output;
* every per-tap module is a separate, non-hybridized ``nn.Sequential`` (fconv: conv + sigmoid; fatt:
  the attention convs; fsr: the classifier), each initialised on its own;
* the spatial softmax is done eagerly on NDArrays (reshape to (N*C, H*W), softmax, reshape back);
* predictions are the mean of all logits; modules are saved and loaded with the prefix-stripped
  parameter names of ``Block.save_params`` / ``load_params``.
"""
import re
import warnings

import mxnet as mx
from mxnet import gluon, nd
from mxnet.gluon import nn
from mxnet.gluon.model_zoo import vision

from model import PRESETS

INIT = mx.init.Xavier(rnd_type='gaussian', factor_type='in', magnitude=2)
STAGE_ACT = 'resnetv10_stage%d_activation%d_output'


def _tap_nodes(depth, taps, net):
    """Symbol-graph node names of the taps, named as ``backbone.resolve_taps`` names them: ``sN`` (end of
    stage N), ``sNbK`` (after block K of stage N), ``sN-M`` (M blocks before its end: ``s3-3``)."""
    nodes = []
    for tap in taps:
        match = re.fullmatch(r's([1-4])(?:b(\d+)|-(\d+))?', tap)
        if not match:
            raise ValueError('reference supports taps sN, sNbK and sN-M (N = 1-4), not %s' % tap)
        stage = int(match.group(1))
        blocks = len(net.features[3 + stage])           # features: conv, BN, ReLU, pool, stage 1, ...
        block = int(match.group(2)) if match.group(2) else max(blocks - int(match.group(3) or 0), 1)
        nodes.append(STAGE_ACT % (stage, block - 1))
    return nodes


def reference_backbone(depth, num_classes, taps, ctx):
    """Model-zoo ResNet v1 with a new output layer, as a SymbolBlock over the tap nodes."""
    net = vision.get_resnet(1, depth, classes=num_classes, prefix='resnetv10_')
    net.initialize(INIT, ctx=ctx)
    with net.name_scope():
        # pylint: disable=protected-access
        net.output = nn.Dense(num_classes, flatten=True, in_units=net.output._in_units)
        net.output.initialize(INIT, ctx=ctx)
    data = mx.sym.var('data')
    internals = net(data).get_internals()
    outputs = [internals[name] for name in _tap_nodes(depth, taps, net)]
    outputs.append(internals['resnetv10_dense1_fwd_output'])
    with warnings.catch_warnings():   # "Cannot decide type for data": it is float32
        warnings.simplefilter('ignore')
        block = gluon.SymbolBlock(outputs, data, params=net.collect_params())
    block._prefix = 'resnetv10_'  # pylint: disable=protected-access
    return block


def _sequential(make_layers, ctx):
    seq = nn.Sequential()
    with seq.name_scope():
        for layer in make_layers():
            seq.add(layer)
    seq.collect_params().initialize(INIT, ctx=ctx)
    return seq


def reference_heads(num_classes, kernel, preset, ctx):
    """(fconv, fatt, fsr) for one tap, each a separate non-hybrid Sequential."""
    cfg = PRESETS[preset]
    a1, a2 = cfg['att_channels']
    k2 = cfg['att_second_kernel']
    c1, c2, c3 = cfg['cls_channels']
    fconv = _sequential(lambda: [nn.Conv2D(num_classes, 1), nn.Activation('sigmoid')], ctx)
    fatt = _sequential(lambda: [
        nn.Conv2D(a1, 1), nn.BatchNorm(), nn.Activation('relu'),
        nn.Conv2D(a2, k2, padding=k2 // 2), nn.BatchNorm(), nn.Activation('relu'),
        nn.Conv2D(num_classes, 1)], ctx)
    fsr = _sequential(lambda: [
        nn.Conv2D(c1, 1), nn.BatchNorm(), nn.Activation('relu'),
        nn.Conv2D(c2, 1), nn.BatchNorm(), nn.Activation('relu'),
        nn.Conv2D(c3, kernel), nn.BatchNorm(), nn.Activation('relu'),
        nn.Dense(num_classes, flatten=True)], ctx)
    return fconv, fatt, fsr


class UpstreamReference(object):
    """The whole reference network: ``forward(x)`` -> (primary, [tap logits], fused logits)."""

    def __init__(self, depth=101, num_classes=14, preset='upstream', input_size=224, ctx=None):
        self.ctx = ctx or mx.cpu()
        self.taps = PRESETS[preset]['taps']
        self.backbone = reference_backbone(depth, num_classes, self.taps, self.ctx)
        shapes = self.backbone(nd.zeros((1, 3, input_size, input_size), ctx=self.ctx))
        self.stage_numbers = [4 - (len(self.taps) - 1 - i) for i in range(len(self.taps))]
        self.heads = [reference_heads(num_classes, s.shape[2], preset, self.ctx) for s in shapes[:-1]]
        self.forward(nd.zeros((1, 3, input_size, input_size), ctx=self.ctx))  # finish deferred init

    def modules(self):
        """``{upstream file name: block}`` as the authors saved them."""
        out = {'backbone_resnet.params': self.backbone}
        for number, (fconv, fatt, fsr) in zip(self.stage_numbers, self.heads):
            out['fconv_stage_%d.params' % number] = fconv
            out['fatt_stage_%d.params' % number] = fatt
            out['fsr_stage_%d.params' % number] = fsr
        return out

    def parameters(self):
        params = gluon.ParameterDict()
        for block in self.modules().values():
            params.update(block.collect_params())
        return params

    def save(self, folder):
        """What the authors' ``save_params`` wrote: prefix-stripped names, one file per module."""
        for file_name, block in self.modules().items():
            block.collect_params().save('%s/%s' % (folder, file_name), strip_prefix=block.prefix)

    def load(self, folder):
        for file_name, block in self.modules().items():
            block.collect_params().load('%s/%s' % (folder, file_name), ctx=self.ctx,
                                        restore_prefix=block.prefix)

    def forward(self, x):
        outs = self.backbone(x)
        features, primary = outs[:-1], outs[-1]
        tap_logits = []
        for feat, (fconv, fatt, fsr) in zip(features, self.heads):
            confidence = fconv(feat)
            z = fatt(feat)
            n, c, h, w = z.shape
            attention = nd.reshape(nd.softmax(nd.reshape(z, (n * c, h * w))), (n, c, h, w))
            tap_logits.append(fsr(attention * confidence))
        fused = (sum(tap_logits) + primary) / (1 + len(tap_logits))
        return primary, tap_logits, fused

    __call__ = forward
