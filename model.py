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
hybridizes into one graph. The related systems plug in here too: RGA blocks inside the backbone
(``rga.py``) and the ML-GCN primary head (``mlgcn.py``), through :func:`build_net`.
"""
import collections
import logging
import re
import warnings

import mxnet as mx
from mxnet import gluon
from mxnet.gluon import nn

from attention import HEAD_INIT, AttentionBranch, AttentionClassifier, ReturnsAttention
from backbone import Backbone, all_blocks, freeze_backbone, tap_names
from errors import UserError
from presets import PRESETS  # noqa: F401  (model.PRESETS: the heads of each preset)

LOG = logging.getLogger('vaa')

# ----------------------------------------------------------------------------------------------
# The full network
# ----------------------------------------------------------------------------------------------

class VAANet(ReturnsAttention, gluon.HybridBlock):
    """Backbone + one attention branch and classifier per tap, fused at score level.

    Parameters
    ----------
    backbone : str
        One of ``BACKBONES``.
    num_classes : int
        Number of attributes C.
    preset : 'paper', 'upstream' or 'demo'
        Head architecture and taps (module docstring).
    input_size : int
        Side of the square input; the tap sizes and the kxk classifier convs follow from it.
    pretrained : bool
        Load ImageNet weights for the backbone from the model-zoo cache.
    taps : sequence of str, optional
        Override the preset's taps (``resolve_taps`` gives the syntax); ``()``: no attention branch,
        the prediction is the primary classifier's.
    rga : dict, optional
        ``mode`` (``s``, ``c``, ``sc``), ``stages`` and ``ratios``: RGA modules after those ResNet stages
        (``rga.py``).
    gcn : callable, optional
        ``gcn(feature_width)`` -> an ML-GCN head (``mlgcn.build_gcn``) that replaces the primary Dense
        classifier; ``gcn_pool`` is its global pooling.
    mc : dict, optional
        ``xi``, ``drop_rate``: an MC-Loss head (``mcloss.MCHead``) on the map that enters the global
        pooling, evaluated only while ``return_aux`` is on (training).

    ``net(x)`` returns ``(primary_logits, [tap_logits...], fused_logits)``; after
    ``net.return_attention = True`` a fourth element holds the list of attention maps A_i
    (N x C x H_i x W_i, each map sums to 1); after ``net.return_aux = True`` (MC-Loss, training only)
    a fourth element holds ``[mc_logits, mc_div]`` (``aux_names``).
    """

    aux_names = ('mc_logits', 'mc_div')
    _return_aux = False

    def __init__(self, backbone='resnet101_v1', num_classes=14, preset='paper', input_size=224,
                 pretrained=False, taps=None, root=None, rga=None, gcn=None, gcn_pool='max', mc=None, **kwargs):
        super(VAANet, self).__init__(**kwargs)
        if preset not in PRESETS:
            raise UserError('unknown preset %r: use %s' % (preset, ', '.join(sorted(PRESETS))))
        if num_classes < 1:
            raise UserError('num_classes must be at least 1, got %d' % num_classes)
        cfg = PRESETS[preset]
        self.preset, self.backbone_name, self.num_classes = preset, backbone, num_classes
        self.input_size = input_size
        self.taps = tuple(cfg['taps'] if taps is None else taps)
        self.rga, self.head_kind, self.mc_config = rga, 'gcn' if gcn is not None else 'vaa', mc
        plugins = None
        if rga:
            from rga import rga_blocks
            plugins = lambda shapes: rga_blocks(rga['mode'], shapes, rga.get('stages', (1, 2, 3, 4)),  # noqa: E731
                                                rga.get('ratios', (8, 8, 8)))
        with self.name_scope():
            self.backbone = Backbone(backbone, num_classes, self.taps, pretrained, root, input_size,
                                     pool=gcn_pool if gcn is not None else 'avg', output=gcn is None,
                                     plugins=plugins, return_final_map=mc is not None, prefix='backbone_')
        self.tap_shapes, feature_shape = self._infer_shapes(input_size)
        with self.name_scope():
            if gcn is not None:
                self.gcn = gcn(feature_shape[0])
            if mc is not None:
                from mcloss import MCHead
                # evaluated only while training: at evaluation its parameters are rightly unused
                warnings.filterwarnings('ignore', r'Parameter (%smc_\S+(, )?)+ is not used' % re.escape(self.prefix))
                self.mc = MCHead(num_classes, self.final_shape[0], mc.get('xi', 0), mc.get('drop_rate', 0.4),
                                 prefix='mc_')
            self.branches = nn.HybridSequential(prefix='')
            self.classifiers = nn.HybridSequential(prefix='')
            for i, shape in enumerate(self.tap_shapes):
                if shape[1] != shape[2]:
                    raise UserError('tap %s has a %dx%d map; use a square input' % (self.taps[i], *shape[1:]))
                self.branches.add(AttentionBranch(num_classes, cfg['att_channels'],
                                                  cfg['att_second_kernel'], prefix='branch%d_' % i))
                self.classifiers.add(AttentionClassifier(num_classes, shape[1], cfg['cls_channels'],
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

    @property
    def return_aux(self):
        """When on (training with MC-Loss), ``net(x)`` also returns ``[mc_logits, mc_div]``. Changing it
        rebuilds the cached graph; it cannot be combined with ``return_attention``."""
        return self._return_aux

    @return_aux.setter
    def return_aux(self, value):
        if value and self.mc_config is None:
            raise ValueError('this network has no auxiliary outputs (no MC-Loss head)')
        if bool(value) != self._return_aux:
            self._return_aux = bool(value)
            self._clear_cached_op()

    @property
    def plugins(self):
        """The related systems switched on in this network (empty for the paper's network)."""
        return (['rga %s after stages %s' % (self.rga['mode'], ','.join(map(str, self.rga.get('stages', (1, 2, 3, 4)))))]
                if self.rga else []) + (['ML-GCN head'] if self.head_kind == 'gcn' else []) + (
                    ['MC-Loss head (%d attributes x %d channels%s)' % (
                        self.num_classes, self.mc.xi, ', projected' if self.mc.projected else '')]
                    if self.mc_config is not None else [])

    def stage_modules(self):
        """The network's separately trained modules: ``{name: ParameterDict}``.

        ``backbone``: the model-zoo layers and the new output layer; per tap, the authors' split
        ``stage_N/fconv`` (confidence conv), ``stage_N/fatt`` (attention convs), ``stage_N/fsr``
        (classifier), N = 2, 3, 4 as in their file names (``stage_numbers``); and, when on, ``rga`` (the
        RGA blocks), ``gcn`` (the ML-GCN head) and ``mc`` (the MC-Loss head's bias or projection). Each module gets its own ``gluon.Trainer``
        (``trainers.StageTrainers``) and, without plug-ins, its own file in the authors' layout
        (``checkpoints.upstream_files``).
        """
        backbone = self.backbone.collect_params(re.escape(self.backbone.zoo_prefix) + '.*')
        modules = collections.OrderedDict(backbone=backbone)
        for number, branch, classifier in zip(self.stage_numbers, self.branches, self.classifiers):
            modules['stage_%d/fconv' % number] = branch.fconv.collect_params()
            modules['stage_%d/fatt' % number] = branch.fatt.collect_params()
            modules['stage_%d/fsr' % number] = classifier.fsr.collect_params()
        if self.rga:
            modules['rga'] = self.backbone.collect_params(re.escape(self.backbone.prefix) + r'rga\d+_.*')
        if self.head_kind == 'gcn':
            modules['gcn'] = self.gcn.collect_params()
        if self.mc_config is not None:
            modules['mc'] = self.mc.collect_params()
        return modules

    def primary_params(self):
        """The primary classifier's trainable parameters: the new output layer, or the GCN head's."""
        if self.head_kind == 'gcn':
            return [p for n, p in self.gcn.collect_params().items() if not n.endswith(('_adjacency', '_embeddings'))]
        return list(self.backbone.output.collect_params().values())

    def freeze_backbone(self, frozen=True, keep_output=False, fix_statistics=False):
        """:func:`freeze_backbone` on this network."""
        freeze_backbone(self, frozen, keep_output, fix_statistics)

    def rga_attention(self, x):
        """The spatial attention of every RGA block for the batch ``x`` (run block by block, for
        overlays): ``[(name, N x 1 x H x W)]``."""
        maps = []
        for sequence in list(self.backbone.segments) + [self.backbone.head]:
            for unit in sequence:
                if hasattr(unit, 'use_spatial'):
                    unit.return_attention = True
                    x, spatial, _ = unit(x)
                    unit.return_attention = False
                    maps.append((unit.prefix[len(self.backbone.prefix):].rstrip('_'), spatial))
                else:
                    x = unit(x)
        return maps

    def hybrid_forward(self, F, x):
        outs = self.backbone(x)
        features, primary = outs[:len(self.taps)], outs[-1]
        if self.head_kind == 'gcn':
            primary = self.gcn(primary)
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
            return primary, tap_logits, fused, list(self.mc(outs[-2]))
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
    aux = getattr(net, 'mc_config', None) is not None
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
                pretrained=False, ctx=None, taps=None, root=None, **plugins):
    """Build, initialise and place a :class:`VAANet` (``plugins``: its ``rga``, ``gcn``, ``gcn_pool``, ``mc``)."""
    net = VAANet(backbone, num_classes, preset, input_size, pretrained, taps, root, **plugins)
    return initialize(net, ctx)


def parse_taps(value):
    """``--taps``: None (the preset's), ``none`` (no attention branch) or ``s3,s4``-style names."""
    if value is None or isinstance(value, (list, tuple)):
        return None if value is None else tuple(value)
    return () if value.strip().lower() == 'none' else tuple(t.strip() for t in value.split(',') if t.strip())


def build_net(cfg, ctx=None, pretrained=None, labels=None, mask=None):
    """The network a run's config describes; training, evaluation, resume and the benchmark all build it
    here, so a saved ``config.json`` (or a checkpoint's config) rebuilds exactly the trained network.

    Reads ``backbone``, ``num_classes``, ``preset``, ``input_size``, ``taps``, ``pretrained`` and the
    related systems' keys (``rga``, ``rga_stages``, ``rga_ratios``, ``head``, ``gcn_*``,
    ``backbone_lr_mult``, ``mc_loss``, ``mc_xi``, ``mc_drop``, ``apcnn_*``), each off when absent.
    ``head='apcnn'`` builds an :class:`apcnn.APCNNNet` instead. ``pretrained=False`` overrides the config (weights
    about to be loaded from a checkpoint need no ImageNet cache). ``labels``/``mask``: the training
    labels, from which the ML-GCN head builds its label graph (without them it waits for a checkpoint).
    """
    pretrained = cfg.get('pretrained', False) if pretrained is None else pretrained
    if cfg.get('head', 'vaa') == 'apcnn':
        return _build_apcnn(cfg, ctx, pretrained)
    plugins = {}
    if cfg.get('rga', 'none') not in (None, 'none'):
        plugins['rga'] = dict(mode=cfg['rga'], stages=_ints(cfg.get('rga_stages', '1,2,3,4')),
                              ratios=_ints(cfg.get('rga_ratios', '8,8,8')))
    if cfg.get('head', 'vaa') == 'gcn':
        from mlgcn import build_gcn
        plugins['gcn'] = lambda width: build_gcn(cfg, cfg['num_classes'], width, labels, mask)
        plugins['gcn_pool'] = cfg.get('gcn_pool', 'max')
    if cfg.get('mc_loss'):
        plugins['mc'] = dict(xi=int(cfg.get('mc_xi', 0)), drop_rate=float(cfg.get('mc_drop', 0.4)))
    net = get_vaa_net(cfg['backbone'], cfg['num_classes'], cfg['preset'], cfg['input_size'], pretrained, ctx,
                      parse_taps(cfg.get('taps')), **plugins)
    for tap, shape in zip(tap_names(net.backbone_name, net.taps), net.tap_shapes):
        if shape[1] * shape[2] < 4:
            LOG.warning('tap %s has a %dx%d map at --input-size %d: its spatial attention has next to nothing to '
                        'choose from (use a larger --input-size)', tap, shape[1], shape[2], cfg['input_size'])
    if 'rga' in plugins and 1 in plugins['rga']['stages'] and (cfg['input_size'] // 4) ** 2 >= 1024:
        n = (cfg['input_size'] // 4) ** 2
        LOG.warning('RGA at stage 1 (a %dx%d map): its position graph has %d x %d entries and its compression '
                    'costs about %.1f GMAC per image (ResNet-101 at 224: 7.8); --rga-stages 2,3,4 leaves it out',
                    cfg['input_size'] // 4, cfg['input_size'] // 4, n, n, n ** 3 / 4e9)
    _backbone_lr_mult(net, cfg)
    return net


def _build_apcnn(cfg, ctx, pretrained):
    from apcnn import APCNNNet
    net = APCNNNet(cfg['backbone'], cfg['num_classes'], cfg['input_size'], pretrained, preset=cfg['preset'],
                   topk=_ints(cfg.get('apcnn_topk', '5,3,1')), anchors=_floats(cfg.get('apcnn_anchors', '64,128,256')),
                   iou=float(cfg.get('apcnn_iou', 0.05)), drop_probs=_floats(cfg.get('apcnn_drop', '0.3,0.3')))
    initialize(net, ctx)
    _backbone_lr_mult(net, cfg)
    return net


def _backbone_lr_mult(net, cfg):
    """``--backbone-lr-mult``: the learning-rate factor of the model-zoo layers."""
    if cfg.get('backbone_lr_mult', 1.0) != 1.0:
        for param in net.backbone.zoo_params(with_output=False):
            param.lr_mult = cfg['backbone_lr_mult']


def _floats(value):
    return tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else str(value).split(',')))


def _ints(value):
    return tuple(int(v) for v in str(value).replace(' ', '').split(',') if v) if not isinstance(value, (list, tuple)) \
        else tuple(int(v) for v in value)
