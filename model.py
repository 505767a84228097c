"""The Visual Attention Aggregation network (Sarafianos et al., ECCV 2018) as one Gluon HybridBlock.

    x ──backbone──► y_p (primary logits)
          │ taps k_1..k_T
          ▼
    per tap i: A_i = spatial_softmax(f_att(k_i)), S_i = sigmoid(conv(k_i)), y_ai = f_cls(A_i * S_i)
    fused logits = mean(y_p, y_a1, ..., y_aT);  prediction = sigmoid(fused logits)

Two presets (the supplement's architecture and the released code's):

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
what ``forward`` returns and the methods training, evaluation and the checkpoints use. The related systems
(``related/``) plug their parts into the paper's network through :class:`Parts` (blocks inside the
backbone, the primary head, an auxiliary head), or build a network of their own; :func:`build_net` is
where a config becomes a network.
"""
import collections
import logging
import re
import warnings

import mxnet as mx
from mxnet import gluon
from mxnet.gluon import nn

from engine import config
import related
from attention import HEAD_INIT, AttentionBranch, AttentionClassifier, ReturnsAttention
from backbone import Backbone, all_blocks, tap_names
from engine.errors import UserError
from engine.presets import PRESETS  # noqa: F401  (model.PRESETS: the heads of each preset)

LOG = logging.getLogger('vaa')


class AttributeNet(ReturnsAttention, gluon.HybridBlock):
    """The contract of every network of the project.

    ``net(x)`` returns ``(primary, taps, fused)``: the primary logits (the focal loss of Eq. 7), a list of
    further logits (each gets the history-weighted BCE), and the fused logits (the prediction is their
    sigmoid); after ``net.return_attention = True`` a fourth element holds the attention maps, after
    ``net.return_aux = True`` (training, only for a network with ``aux_names``) the auxiliary outputs.
    ``backbone`` is a :class:`backbone.Backbone`. Each method below has one meaning for every network.
    """

    aux_names = ()
    taps = ()                       # the VAA attention taps this network has
    plugins = ()                    # the related systems in it, in words (for the log)
    onnx_reason = None              # why the network has no ONNX form (None: it has one)
    _return_aux = False

    @property
    def return_aux(self):
        """When on (training), ``net(x)`` also returns the auxiliary outputs (``aux_names``). Changing it
        rebuilds the cached graph; it cannot be combined with ``return_attention``."""
        return self._return_aux

    @return_aux.setter
    def return_aux(self, value):
        if value and not self.aux_names:
            raise ValueError('this network has no auxiliary outputs')
        if bool(value) != self._return_aux:
            self._return_aux = bool(value)
            self._clear_cached_op()

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


class Parts(object):
    """What the related systems plug into the paper's network: ``blocks`` (name, factory(stage shapes) ->
    {stage: block}) inserted after backbone stages; ``primary`` (name, factory(feature width) -> block:
    pooled features -> logits) instead of the Dense output, on ``pool`` pooling; ``aux`` (name, output names,
    factory(shape of the map that enters the pooling) -> block) evaluated while ``return_aux`` is on;
    ``overlays``: functions(net, x, crop, path) -> [(file, what)] drawn beside the attention maps; ``notes``:
    the systems in words."""

    def __init__(self):
        self.blocks = self.primary = self.aux = None
        self.pool = 'avg'
        self.overlays, self.notes = [], []


class VAANet(AttributeNet):
    """Backbone + one attention branch and classifier per tap, fused at score level (module docstring).

    ``backbone``: the model-zoo name; ``preset``: the head architecture and taps (``presets.PRESETS``);
    ``taps``: override the preset's (``backbone.resolve_taps``; ``()``: no branch, the prediction is the
    primary classifier's); ``parts``: the related systems' :class:`Parts` (None: the paper's network alone).
    ``stage_modules()``: ``backbone`` and per tap the authors' ``stage_N/fconv``, ``stage_N/fatt``,
    ``stage_N/fsr`` (N = 2, 3, 4 as in their file names: ``stage_numbers``), then the parts' own modules.
    """

    def __init__(self, backbone='resnet101_v1', num_classes=14, preset='paper', input_size=224,
                 pretrained=False, taps=None, root=None, parts=None, **kwargs):
        super(VAANet, self).__init__(**kwargs)
        if preset not in PRESETS:
            raise UserError('unknown preset %r: use %s' % (preset, ', '.join(sorted(PRESETS))))
        if num_classes < 1:
            raise UserError('num_classes must be at least 1, got %d' % num_classes)
        cfg, parts = PRESETS[preset], parts or Parts()
        self.preset, self.backbone_name = preset, backbone
        self.num_classes, self.input_size = num_classes, input_size
        self.taps = tuple(cfg['taps'] if taps is None else taps)
        self.parts, self.plugins = parts, parts.notes
        self.aux_names = parts.aux[1] if parts.aux else ()
        with self.name_scope():
            self.backbone = Backbone(backbone, num_classes, self.taps, pretrained, root, input_size,
                                     pool=parts.pool, output=parts.primary is None,
                                     plugins=parts.blocks[1] if parts.blocks else None,
                                     return_final_map=parts.aux is not None, prefix='backbone_')
        self.tap_shapes, feature_shape = self._infer_shapes(input_size)
        with self.name_scope():
            self.primary_head = parts.primary[1](feature_shape[0]) if parts.primary else None
            self.aux_head = parts.aux[2](self.final_shape) if parts.aux else None
            self.branches = nn.HybridSequential(prefix='')
            self.classifiers = nn.HybridSequential(prefix='')
            for i, shape in enumerate(self.tap_shapes):
                if shape[1] != shape[2]:
                    raise UserError('tap %s has a %dx%d map; use a square input' % (self.taps[i], *shape[1:]))
                self.branches.add(AttentionBranch(num_classes, cfg['att_channels'],
                                                  cfg['att_second_kernel'], prefix='branch%d_' % i))
                self.classifiers.add(AttentionClassifier(num_classes, shape[1], cfg[
                    'cls_channels'], prefix='classifier%d_' % i))
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
            modules[self.parts.blocks[0]] = self.backbone.inserted_params()
        for part, head in ((self.parts.primary, self.primary_head), (self.parts.aux, self.aux_head)):
            if part:
                modules[part[0]] = head.collect_params()
        return modules

    def primary_params(self):
        """The new output layer's parameters, or the primary head's (its constants excepted)."""
        head = self.primary_head if self.primary_head is not None else self.backbone.output
        return [p for p in head.collect_params().values() if not isinstance(p, gluon.Constant)]

    def shared_scale(self, maps):
        from evaluation import plots
        return plots.attention_scale(maps)

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
            attention, confidence, _ = branch(feat)
            tap_logits.append(classifier(attention * confidence))
            maps.append(attention)
        fused = F.add_n(primary, *tap_logits) / (1 + len(tap_logits)) if tap_logits else primary
        if self._return_attention and self._return_aux:
            raise ValueError('return_attention and return_aux cannot both be on')
        if self._return_attention:
            return primary, tap_logits, fused, maps
        if self._return_aux:
            return primary, tap_logits, fused, list(self.aux_head(outs[-2]))
        return primary, tap_logits, fused


def use_sync_batchnorm(net, num_devices):
    """Swap every BatchNorm of ``net`` for a SyncBatchNorm over ``num_devices`` devices, keeping the same
    parameters (so weights load and save unchanged); statistics are then computed over the whole batch
    instead of each device's slice. Call before hybridizing."""
    from mxnet.gluon.contrib.nn import SyncBatchNorm
    swapped = 0
    for block in all_blocks(net):
        for key, child in list(block._children.items()):  # pylint: disable=protected-access
            if isinstance(child, nn.BatchNorm) and not isinstance(child, SyncBatchNorm):
                kwargs = dict(child._kwargs)  # pylint: disable=protected-access
                sync = SyncBatchNorm(in_channels=child.gamma.shape[0], num_devices=num_devices,
                                     momentum=kwargs['momentum'], epsilon=kwargs['eps'],
                                     prefix=child.prefix, params=child.params)
                block._children[key] = sync  # pylint: disable=protected-access
                for attr, value in list(vars(block).items()):
                    if value is child:
                        object.__setattr__(block, attr, sync)
                swapped += 1
    net._clear_cached_op()  # pylint: disable=protected-access
    return swapped


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


def get_vaa_net(backbone='resnet101_v1', num_classes=14, preset='paper', input_size=224,
                pretrained=False, ctx=None, taps=None, root=None, parts=None):
    """Build, initialise and place a :class:`VAANet` (``parts``: the related systems' :class:`Parts`)."""
    net = VAANet(backbone, num_classes, preset, input_size, pretrained, taps, root, parts)
    return initialize(net, ctx)


def parse_taps(value):
    """``--taps``: None (the preset's), ``none`` (no attention branch) or ``s3,s4``-style names."""
    if value is None or isinstance(value, (list, tuple)):
        return None if value is None else tuple(value)
    return () if value.strip().lower() == 'none' else tuple(t.strip() for t in value.split(',') if t.strip())


def build_net(cfg, ctx=None, pretrained=None, labels=None, mask=None, names=None):
    """The network a run's config describes; training, evaluation, resume and the benchmark all build it
    here, so a saved ``config.json`` (or a checkpoint's config) rebuilds exactly the trained network.

    ``cfg`` is completed in place (``config.complete``: an old run's config gains the keys added since).
    A related system that is a network of its own (``related.network_of``: AP-CNN) builds it; otherwise
    the paper's network with the parts the systems plug in. ``pretrained=False`` overrides the config
    (weights about to be loaded from a checkpoint need no ImageNet cache). ``labels``/``mask``: the
    training labels, from which the ML-GCN head builds its label graph (without them it waits for a
    checkpoint); ``names``: the attribute names (HGAT-FC groups them).
    """
    config.complete(cfg)
    pretrained = cfg['pretrained'] if pretrained is None else pretrained
    own = related.network_of(cfg)
    if own is not None:
        net = initialize(own.network(cfg, pretrained), ctx)
    else:
        parts = Parts()
        for system in related.active(cfg):
            system.plug(cfg, parts, labels, mask, names)
        net = get_vaa_net(cfg['backbone'], cfg['num_classes'], cfg['preset'], cfg['input_size'], pretrained,
                          ctx,
                          parse_taps(cfg['taps']), parts=parts)
        for tap, shape in zip(tap_names(net.backbone_name, net.taps), net.tap_shapes):
            if shape[1] * shape[2] < 4:
                LOG.warning('tap %s has a %dx%d map at --input-size %d: its spatial attention has next to '
                            'nothing to choose from (use a larger --input-size)', tap, shape[1], shape[2],
                            cfg['input_size'])
    if cfg['backbone_lr_mult'] != 1.0:              # --backbone-lr-mult: the model-zoo layers' learning rate
        for param in net.backbone.zoo_params(with_output=False):
            param.lr_mult = cfg['backbone_lr_mult']
    return net
