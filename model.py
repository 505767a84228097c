"""The Visual Attention Aggregation network (Sarafianos et al., ECCV 2018) as one Gluon HybridBlock.

    x ──backbone──► y_p (primary logits)
          │ taps k_1..k_T
          ▼
    per tap i: A_i = spatial_softmax(f_att(k_i)), S_i = sigmoid(conv(k_i)), y_ai = f_cls(A_i * S_i)
    fused logits = mean(y_p, y_a1, ..., y_aT);  prediction = sigmoid(fused logits)

The network takes numbers: the taps, the widths of f_att and f_cls and f_att's second kernel.
:func:`vaa_net` builds it from a preset's numbers (``common/presets.py``: the supplement's architecture
and the released code's):

========== ============================ ==========================================
           ``paper`` (supplement)        ``upstream`` (the authors' released code)
========== ============================ ==========================================
taps        s3, s4                       s3b20 (3 blocks before the end of stage 3), s3, s4
f_att       1x1 256, 1x1 256, 1x1 C      1x1 512, 3x3 512, 1x1 C
f_cls       256, 512, kxk 512, Dense C   256, 512, kxk 1024, Dense C
fusion      (y_p + y_a1 + y_a2) / 3      (y_p + y_a1 + y_a2 + y_a3) / 4
========== ============================ ==========================================

Backbones (``backbone.py``) are the Gluon model-zoo ResNet v1 (18/34/50/101/152) and DenseNet
(121/161/169/201), their layers used as they are and cut at the taps, so the whole network
hybridizes into one graph.

:class:`AttributeNet` is the contract every network of the project keeps (the paper's and AP-CNN's):
what ``forward`` returns (:class:`Outputs`) and the methods training, evaluation and the checkpoints use.
The related systems (``related/``) plug their parts into the paper's network through :class:`Parts`
(blocks inside the backbone, the primary head, an auxiliary head), or build a network of their own.
Where a run's config becomes a network is ``engine/build.py``; nothing here reads a config.
"""
import collections
import re
import warnings

import mxnet as mx
from mxnet import gluon
from mxnet.gluon import nn

from attention import HEAD_INIT, AttentionBranch, AttentionClassifier, ReturnsAttention
from backbone import Backbone, tap_names
from common.errors import UserError
from common.presets import PRESETS


class Outputs(collections.namedtuple('Outputs', 'primary taps fused')):
    """What every network returns: ``primary`` (the logits of the primary classifier; the focal loss of
    Eq. 4), ``taps`` (a list of further logits, each with the history-weighted BCE of Eqs. 5-6) and
    ``fused`` (their mean; the prediction is its sigmoid). It unpacks as those three. ``maps``: the
    attention maps (after ``net.return_attention = True``), else None; ``aux``: the auxiliary head's
    outputs (while ``net.return_aux`` is on: training of a network with ``aux_names``), else None."""

    def __new__(cls, primary, taps, fused, maps=None, aux=None):
        self = super(Outputs, cls).__new__(cls, primary, taps, fused)
        self.maps, self.aux = maps, aux
        return self


class AttributeNet(ReturnsAttention, gluon.HybridBlock):
    """The contract of every network of the project.

    ``net(x)`` returns :class:`Outputs`. ``hybrid_forward`` returns ``(primary, taps, fused)`` and, with
    ``return_attention`` or ``return_aux`` on, the maps or the auxiliary outputs after them; ``forward``
    names them. ``backbone`` is a :class:`backbone.Backbone`. Each method below has one meaning for
    every network.
    """

    aux_names = ()
    taps = ()                       # the VAA attention taps this network has
    plugins = ()                    # the related systems in it, in words (for the log)
    onnx_reason = None              # why the network has no ONNX form (None: it has one)
    preset = None                   # the preset whose numbers built it, when one did (for messages)
    _return_aux = False

    @property
    def return_aux(self):
        """When on (training), ``net(x).aux`` holds the auxiliary outputs (``aux_names``). Changing it
        rebuilds the cached graph; it cannot be combined with ``return_attention``."""
        return self._return_aux

    @return_aux.setter
    def return_aux(self, value):
        if value and not self.aux_names:
            raise ValueError('this network has no auxiliary outputs')
        if bool(value) != self._return_aux:
            self._return_aux = bool(value)
            self._clear_cached_op()

    def forward(self, x, *args):  # pylint: disable=arguments-differ
        if self._return_attention and self._return_aux:
            raise ValueError('return_attention and return_aux cannot both be on')
        out = super(AttributeNet, self).forward(x, *args)
        extra = out[3] if len(out) > 3 else None
        return Outputs(out[0], list(out[1]), out[2], maps=extra if self._return_attention else None,
                       aux=extra if self._return_aux else None)

    def stage_modules(self):
        """``{module name: ParameterDict}``: the separately trained modules, one Trainer each."""
        raise NotImplementedError

    def primary_params(self):
        """The primary classifier's trainable parameters (frozen with the backbone in the first phase)."""
        raise NotImplementedError

    def freeze(self, frozen=True, keep_output=False, fix_statistics=False):
        """Stop (or restart) gradients for the model-zoo layers (``Backbone.freeze``) and, unless
        ``keep_output``, the primary classifier; blocks of the related systems keep training.
        ``fix_statistics``: the frozen BatchNorms normalise with their stored statistics."""
        self.backbone.freeze(frozen, fix_statistics)
        for param in [] if keep_output else self.primary_params():
            param.grad_req = 'null' if frozen else 'write'
        self._clear_cached_op()

    def stage_logits(self, primary, taps):
        """``{name: logits}`` of parts reported beside the fused prediction (AP-CNN's two passes); {}."""
        return {}

    def overlays(self, crop, x, maps, names, probs, path, top=None):
        """``eval.py --image``: draw the attention ``maps`` of the batch-of-one ``x`` over ``crop`` into
        ``path`` (and any further figures beside it), on a colour scale up to ``top`` (None: the image's
        own); returns [(file, what it shows)]."""
        raise NotImplementedError

    def board_image(self, crop, x, maps, names, probs, folder):
        """The RGB array TensorBoard shows for one image after every epoch: the first figure of
        :meth:`overlays`, drawn into ``folder`` and read back (a network may draw it faster)."""
        import os
        import cv2
        import numpy as np
        first = self.overlays(crop, x, maps, names, probs, os.path.join(folder, 'board.png'))[0][0]
        return np.ascontiguousarray(cv2.imread(first, cv2.IMREAD_COLOR)[:, :, ::-1])

    def shared_scale(self, maps):
        """The ``top`` of :meth:`overlays` that puts the attention maps of several images (``maps``: one
        list per image) on one scale, or None where the maps have a fixed scale."""
        return None

    def _build_cache(self, *args):
        # The auxiliary head is evaluated only while training: at evaluation its parameters are rightly
        # unused, and MXNet would warn about each of them.
        with warnings.catch_warnings():
            if self.aux_names:
                warnings.filterwarnings('ignore',
                                        r'Parameter (%s\S+(, )?)+ is not used' % re.escape(self.prefix))
            return super(AttributeNet, self)._build_cache(*args)


# What the related systems plug into the paper's network (fields of :class:`Parts`):
# blocks inserted after backbone stages: factory(stage shapes) -> {stage: block};
Blocks = collections.namedtuple('Blocks', 'module factory')
# the primary classifier instead of the Dense output: factory(feature width) -> block (pooled features ->
# logits);
Head = collections.namedtuple('Head', 'module factory')
# a head on the map that enters the pooling, evaluated while ``return_aux`` is on:
# factory(shape of that map) -> block returning the outputs named ``outputs``.
AuxHead = collections.namedtuple('AuxHead', 'module outputs factory')


class Parts(object):
    """What the related systems plug into the paper's network: ``blocks`` (:data:`Blocks`), ``primary``
    (:data:`Head`, on ``pool`` pooling), ``aux`` (:data:`AuxHead`); ``overlays``: functions(net, x, crop,
    path) -> [(file, what)] drawn beside the attention maps; ``notes``: the systems in words. Each
    ``module`` names the parameters' own Trainer (``stage_modules()``)."""

    def __init__(self):
        self.blocks = self.primary = self.aux = None
        self.pool = 'avg'
        self.overlays, self.notes = [], []


class VAANet(AttributeNet):
    """Backbone + one attention branch and classifier per tap, fused at score level (module docstring).

    ``backbone``: the model-zoo name; ``taps``: the tap names (``backbone.resolve_taps``; ``()``: no
    branch, the prediction is the primary classifier's); ``att_channels``, ``att_second_kernel``: f_att's
    two hidden widths and its second kernel (1, or 3 with padding 1); ``cls_channels``: f_cls's three
    widths; ``parts``: the related systems' :class:`Parts` (None: the paper's network alone).
    ``stage_modules()``: ``backbone`` and per tap the authors' ``stage_N/fconv``, ``stage_N/fatt``,
    ``stage_N/fsr`` (N = 2, 3, 4 as in their file names: ``stage_numbers``), then the parts' own modules.
    The defaults are the paper's numbers (the supplement's architecture).
    """

    def __init__(self, backbone='resnet101_v1', num_classes=14, taps=('s3', 's4'), att_channels=(256, 256),
                 att_second_kernel=1, cls_channels=(256, 512, 512), input_size=224, pretrained=False,
                 root=None, parts=None, **kwargs):
        super(VAANet, self).__init__(**kwargs)
        if num_classes < 1:
            raise UserError('num_classes must be at least 1, got %d' % num_classes)
        parts = parts or Parts()
        self.backbone_name, self.num_classes, self.input_size = backbone, num_classes, input_size
        self.taps, self.parts, self.plugins = tuple(taps), parts, parts.notes
        self.aux_names = parts.aux.outputs if parts.aux else ()
        with self.name_scope():
            self.backbone = Backbone(backbone, num_classes, self.taps, pretrained, root, input_size,
                                     pool=parts.pool, output=parts.primary is None,
                                     plugins=parts.blocks.factory if parts.blocks else None,
                                     return_final_map=parts.aux is not None, prefix='backbone_')
        self.tap_shapes, feature_shape = self._infer_shapes(input_size)
        with self.name_scope():
            self.primary_head = parts.primary.factory(feature_shape[0]) if parts.primary else None
            self.aux_head = parts.aux.factory(self.final_shape) if parts.aux else None
            self.branches = nn.HybridSequential(prefix='')
            self.classifiers = nn.HybridSequential(prefix='')
            for i, shape in enumerate(self.tap_shapes):
                if shape[1] != shape[2]:
                    raise UserError('tap %s has a %dx%d map; use a square input' % (self.taps[i], *shape[1:]))
                self.branches.add(AttentionBranch(num_classes, att_channels, att_second_kernel,
                                                  prefix='branch%d_' % i))
                self.classifiers.add(AttentionClassifier(num_classes, shape[1], cls_channels,
                                                         prefix='classifier%d_' % i))
        # The authors number the per-tap modules stage_2, stage_3, stage_4 (last tap = 4).
        self.stage_numbers = [4 - (len(self.taps) - 1 - i) for i in range(len(self.taps))]

    def _infer_shapes(self, input_size):
        """(shapes of the taps, shape of the backbone's last output) at ``input_size``."""
        outs = self.backbone(mx.sym.var('data'))
        _, shapes, _ = mx.sym.Group(list(outs)).infer_shape(data=(1, 3, input_size, input_size))
        for tap, shape in zip(self.taps, shapes):
            if min(shape[2:]) < 1:
                raise UserError('input size %d is too small for tap %s' % (input_size, tap))
        self.final_shape = tuple(shapes[-2][1:]) if self.backbone.return_final_map else None
        return [tuple(s[1:]) for s in shapes[:len(self.taps)]], tuple(shapes[-1][1:])

    def stage_modules(self):
        backbone = self.backbone.collect_params(re.escape(self.backbone.zoo_prefix) + '.*')
        modules = collections.OrderedDict(backbone=backbone)
        for number, branch, classifier in zip(self.stage_numbers, self.branches, self.classifiers):
            modules['stage_%d/fconv' % number] = branch.fconv.collect_params()
            modules['stage_%d/fatt' % number] = branch.fatt.collect_params()
            modules['stage_%d/fsr' % number] = classifier.fsr.collect_params()
        if self.parts.blocks:
            modules[self.parts.blocks.module] = self.backbone.inserted_params()
        for part, head in ((self.parts.primary, self.primary_head), (self.parts.aux, self.aux_head)):
            if part:
                modules[part.module] = head.collect_params()
        return modules

    def primary_params(self):
        """The new output layer's parameters, or the primary head's (its constants excepted)."""
        head = self.primary_head if self.primary_head is not None else self.backbone.output
        return [p for p in head.collect_params().values() if not isinstance(p, gluon.Constant)]

    def shared_scale(self, maps):
        from evaluation import plots
        return plots.attention_scale(maps)

    def board_image(self, crop, x, maps, names, probs, folder):
        """The attention maps as :meth:`overlays` draws them, as one array drawn without matplotlib."""
        from evaluation import plots
        return plots.attention_grid(crop, maps, names, probs, tap_names(self.backbone_name, self.taps))

    def overlays(self, crop, x, maps, names, probs, path, top=None):
        from evaluation import plots
        plots.attention_overlay(crop, maps, names, probs, path, tap_names(self.backbone_name, self.taps),
                                top=top)
        written = [(path, 'attention maps')]
        for draw in self.parts.overlays:
            written += draw(self, x, crop, path)
        return written

    def hybrid_forward(self, F, x):
        outs = self.backbone(x)
        features, primary = outs[:len(self.taps)], outs[-1]
        if self.primary_head is not None:
            primary = self.primary_head(primary)
        tap_logits, maps = [], []
        for feat, branch, classifier in zip(features, self.branches, self.classifiers):
            attention, confidence, _ = branch(feat)                   # A_i (spatial softmax), S_i
            tap_logits.append(classifier(attention * confidence))     # y_ai = f_cls(A_i * S_i)
            maps.append(attention)
        fused = F.add_n(primary, *tap_logits) / (1 + len(tap_logits)) if tap_logits else primary
        if self._return_attention:
            return primary, tap_logits, fused, maps
        if self._return_aux:
            return primary, tap_logits, fused, list(self.aux_head(outs[-2]))
        return primary, tap_logits, fused


def vaa_net(backbone='resnet101_v1', num_classes=14, preset='paper', input_size=224, pretrained=False,
            taps=None, root=None, parts=None):
    """A :class:`VAANet` with the numbers of ``preset`` (``common.presets.PRESETS``); ``taps``
    overrides the preset's."""
    if preset not in PRESETS:
        raise UserError('unknown preset %r: use %s' % (preset, ', '.join(sorted(PRESETS))))
    heads = PRESETS[preset]
    net = VAANet(backbone, num_classes, heads['taps'] if taps is None else taps, heads['att_channels'],
                 heads['att_second_kernel'], heads['cls_channels'], input_size, pretrained, root, parts)
    net.preset = preset
    return net


def get_vaa_net(backbone='resnet101_v1', num_classes=14, preset='paper', input_size=224,
                pretrained=False, ctx=None, taps=None, root=None, parts=None):
    """:func:`vaa_net`, initialised and placed on ``ctx``."""
    return initialize(vaa_net(backbone, num_classes, preset, input_size, pretrained, taps, root, parts), ctx)


def initialize(net, ctx=None):
    """Initialise every parameter that has no data yet (Xavier gaussian "in" 2 unless the layer set
    its own initializer; pretrained zoo weights are kept) and move everything to ``ctx``."""
    ctx = ctx or [mx.cpu()]
    ctx = ctx if isinstance(ctx, (list, tuple)) else [ctx]
    params = net.collect_params().values()
    for param in params:
        if param._data is None:  # pylint: disable=protected-access
            # default_init, not init: layers that set their own initializer (BN) keep it
            param.initialize(default_init=HEAD_INIT, ctx=ctx)
    # Infer every shape symbolically and allocate now, so loaded weights are shape-checked and the
    # parameters can be handed to Trainers before the first batch (with the auxiliary outputs on, so
    # that the MC head's parameters are in the graph).
    aux = bool(net.aux_names)
    if aux:
        net.return_aux = True
    net.infer_shape(mx.nd.zeros((1, 3, net.input_size, net.input_size)))
    if aux:
        net.return_aux = False
    for param in params:
        if param._data is None:  # pylint: disable=protected-access
            param._finish_deferred_init()  # pylint: disable=protected-access
    net.collect_params().reset_ctx(ctx)
    return net
