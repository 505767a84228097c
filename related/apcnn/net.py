"""AP-CNN, the weakly supervised attention pyramid CNN (Ding et al., "AP-CNN: Weakly Supervised Attention
Pyramid Convolutional Neural Network for Fine-Grained Visual Classification", TIP 2021), for attributes.

    x ─backbone─► B3 (stride 8), B4 (16), B5 (32)
      stage I:  FPN -> P3, P4, P5; attention pyramid: spatial gates S_l, channel gates C_l (averaged
                bottom-up), A_l = S_l * P_l + C_l * P_l; classifiers on A3, A4, A5 and on the
                concatenated GAP of P3, P4, P5
      ROIs:     one square anchor per cell of S_l (anchors 64/128/256 at a 448 input, scaled to ours),
                cells scoring above the map's mean, NMS at IoU 0.05 ("+1" areas), top 5/3/1
      stage II: B3 cropped to the ROIs' union box (in training one random level-3 or level-4 ROI dropped
                first, energy compensated), resized back; stage 3, stage 4, FPN, gates and classifiers
                again (the same weights)
    output:     the mean of the 8 logits (each stage's 4, averaged, then the two stages averaged)

Onto the project's outputs (so losses, history, metrics and the comparison work unchanged):
``primary`` = stage I's concatenated classifier, ``taps`` = [o3, o4, o5 of stage I, o3, o4, o5, o_cat of
stage II], ``fused`` = the mean of all 8. Everything, ROI selection included, is inside one hybridized
graph; the train/test difference (ROI dropping, energy compensation) comes from a Dropout of ones, a
mode-aware operator, so it survives ``hybridize()``. Written from the authors' released
``model/resnet50.py`` (PRIS-CV/AP-CNN_Pytorch-master); where we differ and why is said below.
"""
import mxnet as mx
from mxnet import gluon
from mxnet.gluon import nn

from backbone import Backbone, BatchNorm1D
from common.errors import UserError
from model import AttributeNet

CONV_INIT = mx.init.MSRAPrelu(factor_type='out', slope=0)          # normal(0, sqrt(2 / (k * k * out)))
LINEAR_INIT = mx.init.Xavier(rnd_type='uniform', factor_type='in', magnitude=1)   # U(+-1 / sqrt(fan_in))


def _conv(channels, kernel, in_channels, use_bias=True, prefix=None):
    return nn.Conv2D(channels, kernel, padding=kernel // 2, in_channels=in_channels, use_bias=use_bias,
                     weight_initializer=CONV_INIT, prefix=prefix)


class BasicConv(gluon.HybridBlock):
    """1x1 conv without bias, BatchNorm (the reference's momentum 0.01 = MXNet's 0.99), ReLU."""

    def __init__(self, in_channels, channels, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.conv = _conv(channels, 1, in_channels, use_bias=False, prefix='conv_')
            self.bn = nn.BatchNorm(momentum=0.99, epsilon=1e-5, in_channels=channels, prefix='bn_')

    def hybrid_forward(self, F, x):
        return F.relu(self.bn(self.conv(x)))


class SimpleFPA(gluon.HybridBlock):
    """P5' = BasicConv(B5) + BasicConv(GAP(B5)) (broadcast over the map)."""

    def __init__(self, in_channels, channels, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.conv_master = BasicConv(in_channels, channels, prefix='conv_master_')
            self.conv_gpb = BasicConv(in_channels, channels, prefix='conv_gpb_')

    def hybrid_forward(self, F, x):
        return F.broadcast_add(self.conv_master(x), self.conv_gpb(F.mean(x, axis=(2, 3), keepdims=True)))


class PyramidFeatures(gluon.HybridBlock):
    """(B3, B4, B5) -> (P3, P4, P5): the top-down pathway; the upsampled maps (nearest, x2) are the sums
    before the 3x3 convs, as in the reference."""

    def __init__(self, in_channels, width=256, **kwargs):
        super().__init__(**kwargs)
        c3, c4, c5 = in_channels
        with self.name_scope():
            self.P5_1, self.P5_2 = SimpleFPA(c5, width, prefix='P5_1_'), _conv(
                width, 3, width, prefix='P5_2_')
            self.P4_1, self.P4_2 = _conv(width, 1, c4, prefix='P4_1_'), _conv(width, 3, width, prefix='P4_2_')
            self.P3_1, self.P3_2 = _conv(width, 1, c3, prefix='P3_1_'), _conv(width, 3, width, prefix='P3_2_')

    def hybrid_forward(self, F, b3, b4, b5):
        p5 = self.P5_1(b5)
        p4 = self.P4_1(b4) + F.UpSampling(p5, scale=2, sample_type='nearest')
        p3 = self.P3_1(b3) + F.UpSampling(p4, scale=2, sample_type='nearest')
        return self.P3_2(p3), self.P4_2(p4), self.P5_2(p5)


class SpatialGate(gluon.HybridBlock):
    """S = sigmoid(3x3 conv, pad 1, width -> 1): one map per level, the ROI scores.

    The reference's ConvTranspose 3x3 / stride 1 / pad 1 is this convolution with the kernel flipped, so
    the two compute the same family of maps; it is written as a Conv2D because MXNet 1.9's oneDNN
    deconvolution fails in the backward pass on CPU. Its initial weights follow the reference's
    (U(+-1/sqrt(9)), the transposed layer's fan-in being 1 x 3 x 3).
    """

    def __init__(self, width=256, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.conv = nn.Conv2D(1, 3, padding=1, in_channels=width, weight_initializer=mx.init.Xavier(
                rnd_type='uniform', factor_type='out', magnitude=1), prefix='conv_')

    def hybrid_forward(self, F, x):
        return F.sigmoid(self.conv(x))


class ChannelGate(gluon.HybridBlock):
    """C = sigmoid(1x1 (ReLU(1x1 (GAP x)))), width -> width/16 -> width."""

    def __init__(self, width=256, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.conv1 = _conv(width // 16, 1, width, prefix='conv1_')
            self.conv2 = _conv(width, 1, width // 16, prefix='conv2_')

    def hybrid_forward(self, F, x):
        return F.sigmoid(self.conv2(F.relu(self.conv1(F.mean(x, axis=(2, 3), keepdims=True)))))


class PyramidAttentions(gluon.HybridBlock):
    """(P3, P4, P5) -> (A3, A4, A5, S3, S4, S5): A_l = S_l * P_l + C_l * P_l with the channel gates passed
    bottom-up, C4 <- (C4 + C3) / 2, C5 <- (C5 + C4) / 2 (the averaged C4)."""

    def __init__(self, width=256, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            for level in (3, 4, 5):
                setattr(self, 'A%d_1' % level, SpatialGate(width, prefix='A%d_1_' % level))
                setattr(self, 'A%d_2' % level, ChannelGate(width, prefix='A%d_2_' % level))

    def hybrid_forward(self, F, p3, p4, p5):
        attended, spatial, previous = [], [], None
        for level, p in zip((3, 4, 5), (p3, p4, p5)):
            s = getattr(self, 'A%d_1' % level)(p)
            c = getattr(self, 'A%d_2' % level)(p)
            c = c if previous is None else (c + previous) / 2
            previous = c
            attended.append(F.broadcast_mul(s, p) + F.broadcast_mul(c, p))
            spatial.append(s)
        return tuple(attended + spatial)


class APClassifier(gluon.HybridBlock):
    """[GAP] -> BN -> Dense(hidden) -> BN -> ELU -> Dense(C); ``pool=False``: the input is a vector."""

    def __init__(self, in_units, num_classes, hidden=256, pool=True, **kwargs):
        super().__init__(**kwargs)
        self.pool = pool
        with self.name_scope():
            self.body = nn.HybridSequential(prefix='')
            # BatchNorm1D: the oneDNN-safe BatchNorm for vectors (see backbone.BatchNorm1D: the AVX-512 crash)
            self.body.add(BatchNorm1D(in_channels=in_units), nn.Dense(hidden, in_units=in_units,
                                                                        weight_initializer=LINEAR_INIT),
                          BatchNorm1D(in_channels=hidden), nn.ELU(),
                          nn.Dense(num_classes, in_units=hidden, weight_initializer=LINEAR_INIT))

    def hybrid_forward(self, F, x):
        return self.body(F.mean(x, axis=(2, 3)) if self.pool else x)


class APCNNNet(AttributeNet):
    """AP-CNN on a model-zoo backbone, with the project's network contract (module docstring).

    ``input_size`` must be divisible by 32 (the x2 upsampling sums). ``anchors`` are the anchor sides at
    ``anchor_ref`` pixels and scale with the input (64/128/256 at 448 -> 32/64/128 at 224; without this
    the 256-pixel level-5 anchor would cover a whole 224 input and the zoom would do nothing). ``topk``,
    ``iou``, ``drop_probs``, ``border``: :class:`roi.ROIPyramid` and :class:`roi.ROIZoom`.
    After ``net.return_attention = True`` a fourth element holds ``[S3, S4, S5, rois, valid, box]``:
    the spatial gates, the ROIs in input pixels, which are valid, and the union box in B3 cells.
    """

    onnx_reason = "box_nms and the computed sampling grid have no ONNX form in MXNet's exporter"

    def __init__(self, backbone='resnet50_v1', num_classes=14, input_size=224, pretrained=False, root=None,
                 preset='paper', topk=(5, 3, 1), anchors=(64, 128, 256), anchor_ref=448, iou=0.05,
                 drop_probs=(0.3, 0.3), border=0.1, width=256, hidden=256, **kwargs):
        super().__init__(**kwargs)
        from related.apcnn.roi import ROIPyramid, ROIZoom
        if input_size % 32:
            raise UserError('--head apcnn needs an --input-size divisible by 32 (its pyramid adds maps '
                            'upsampled x2 twice), got %d: use %d or %d' % (input_size, input_size // 32 * 32,
                                                                 input_size // 32 * 32 + 32))
        self.backbone_name, self.num_classes = backbone, num_classes
        self.input_size, self.preset = input_size, preset
        self.topk = tuple(int(k) for k in topk)
        with self.name_scope():
            self.backbone = Backbone(backbone, num_classes, ('s2', 's3'), pretrained, root, input_size,
                                     pool=None,
                                     output=False, prefix='backbone_')
        shapes = self._infer_shapes(input_size)
        self.level_shapes = shapes
        with self.name_scope():
            self.fpn = PyramidFeatures([s[0] for s in shapes], width, prefix='fpn_')
            self.apn = PyramidAttentions(width, prefix='apn_')
            self.cls3, self.cls4, self.cls5 = [APClassifier(width, num_classes, hidden,
                                                            prefix='cls%d_' % level)
                                               for level in (3, 4, 5)]
            self.cls_concate = APClassifier(3 * width, num_classes, hidden, pool=False, prefix='cls_concate_')
            self.roi = ROIPyramid(input_size, [s[1] for s in shapes], self.topk,
                                  [a * input_size / float(anchor_ref) for a in anchors], iou, border)
            self.zoom = ROIZoom(input_size, shapes[0][1:], self.topk, drop_probs)

    def _infer_shapes(self, input_size):
        outs = self.backbone(mx.sym.var('data'))
        _, shapes, _ = mx.sym.Group(list(outs)).infer_shape(data=(1, 3, input_size, input_size))
        expected = [input_size // s for s in (8, 16, 32)]
        if [s[2] for s in shapes] != expected:
            raise UserError('%s does not give maps at strides 8, 16, 32 after stages 2, 3, 4 (%s at input %d)'
                            % (self.backbone_name, [tuple(s[2:]) for s in shapes], input_size))
        return [tuple(s[1:]) for s in shapes]

    @property
    def plugins(self):
        return ['AP-CNN head (pyramid on stages 2-4, ROIs top %s)' % '/'.join(map(str, self.topk))]

    def stage_modules(self):
        """``backbone`` (the model-zoo layers), ``apcnn/fpn``, ``apcnn/apn``, ``apcnn/cls`` (the four
        classifiers, shared by both stages): one Trainer each."""
        import collections
        import re
        return collections.OrderedDict([
            ('backbone', self.backbone.collect_params(re.escape(self.backbone.zoo_prefix) + '.*')),
            ('apcnn/fpn', self.fpn.collect_params()), ('apcnn/apn', self.apn.collect_params()),
            ('apcnn/cls', self._classifier_params())])

    def _classifier_params(self):
        params = gluon.ParameterDict()
        for block in (self.cls3, self.cls4, self.cls5, self.cls_concate):
            params.update(block.collect_params())
        return params

    def primary_params(self):
        """The primary classifier's parameters: the concatenated classifier (shared by stage II)."""
        return list(self.cls_concate.collect_params().values())

    def overlays(self, crop, x, maps, names, probs, path, top=None):
        """The three spatial gates, the ROIs and the zoom box over the crop (``top`` does not apply: the gates
        are sigmoid values on one fixed scale)."""
        from evaluation import plots
        s3, s4, s5, rois, valid, box = maps
        plots.apcnn_overlay(crop, [s[0] for s in (s3, s4, s5)], rois, valid, box,
                            self.input_size / float(s3.shape[-1]),
                            path)
        return [(path, 'AP-CNN gates and ROIs')]

    @staticmethod
    def stage_logits(primary, taps):
        """``{'stage I': ..., 'stage II': ...}``: each pass's own prediction (the mean of its four logits),
        reported beside the fused one (AP-CNN's output is their mean)."""
        return {'stage I': (primary + taps[0] + taps[1] + taps[2]) / 4, 'stage II': sum(taps[3:]) / 4}

    def _stage(self, F, b3, b4, b5):
        """The four logits of one stage and its spatial gates."""
        p3, p4, p5 = self.fpn(b3, b4, b5)
        a3, a4, a5, s3, s4, s5 = self.apn(p3, p4, p5)
        concat = F.concat(*[F.mean(p, axis=(2, 3)) for p in (p3, p4, p5)], dim=1)
        return [self.cls3(a3), self.cls4(a4), self.cls5(a5), self.cls_concate(concat)], [s3, s4, s5]

    def hybrid_forward(self, F, x):
        b3, b4, b5 = self.backbone(x)
        first, gates = self._stage(F, b3, b4, b5)
        rois, valid = self.roi(*[F.BlockGrad(g) for g in gates])                     # no gradient to boxes
        zoomed, box = self.zoom(b3, rois, valid)
        b4z = self.backbone.segments[1](zoomed)                                      # stage 3 again
        b5z = self.backbone.head(b4z)                                                # stage 4 again
        second, _ = self._stage(F, zoomed, b4z, b5z)
        fused = F.add_n(*(first + second)) / 8.0
        taps = first[:3] + second
        if self._return_attention:
            return first[3], taps, fused, gates + [rois, valid, box]
        return first[3], taps, fused
