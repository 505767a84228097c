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

Backbones are the Gluon model-zoo ResNet v1 (18/34/50/101/152) and DenseNet (121/161/169/201). Their
layers are used as they are (same parameter names as the model zoo and as the authors' files), cut at
the taps into consecutive segments so the whole network hybridizes into one graph.
"""
import collections
import logging
import os
import re

import mxnet as mx
from mxnet import gluon
from mxnet.gluon import nn
from mxnet.gluon.model_zoo import vision
from mxnet.gluon.model_zoo import model_store

from attention import HEAD_INIT, AttentionBranch, AttentionClassifier
from errors import UserError

LOG = logging.getLogger('vaa')
BACKBONES = ('resnet18_v1', 'resnet34_v1', 'resnet50_v1', 'resnet101_v1', 'resnet152_v1',
             'densenet121', 'densenet161', 'densenet169', 'densenet201')

# The head architecture of each preset. The first upstream tap is written with the block
# number for ResNet-101 (s3b20); for other depths it is resolved as "three blocks before the end of
# stage 3" (see ``resolve_taps``).
PRESETS = {
    'paper': dict(taps=('s3', 's4'), att_channels=(256, 256), att_second_kernel=1,
                  cls_channels=(256, 512, 512)),
    'upstream': dict(taps=('s3-3', 's3', 's4'), att_channels=(512, 512), att_second_kernel=3,
                     cls_channels=(256, 512, 1024)),
    # The embedded demo's 48-pixel canvases leave 3x3 and 2x2 maps at s3/s4: the paper's head design,
    # narrower, on the end of stages 1 and 2 gives 12x12 and 6x6 maps at the same cost.
    'demo': dict(taps=('s1', 's2'), att_channels=(64, 64), att_second_kernel=1, cls_channels=(64, 128, 128)),
}

# The authors' backbone prefix (``saved_models/backbone_resnet.params`` keys are stripped of it).
ZOO_PREFIX = {'resnet': 'resnetv10_', 'densenet': 'densenet0_'}


# ----------------------------------------------------------------------------------------------
# Pretrained weights
# ----------------------------------------------------------------------------------------------

def model_zoo_file(name, root=None):
    """Path where Gluon's model zoo keeps the ImageNet weights of ``name``, and its download URL."""
    root = os.path.expanduser(root or os.path.join(mx.base.data_dir(), 'models'))
    file_name = '%s-%s' % (name, model_store.short_hash(name))
    repo = os.environ.get('MXNET_GLUON_REPO', model_store.apache_repo_url)
    url = '%s%sgluon/models/%s.zip' % (repo, '' if repo.endswith('/') else '/', file_name)
    return os.path.join(root, file_name + '.params'), url


def load_pretrained(zoo_net, name, root=None):
    """Load ImageNet weights into ``zoo_net`` from the model-zoo cache (``$MXNET_HOME/models``). A missing
    file is fetched with MXNet's own model-zoo download (SHA-1 checked); when that fails (offline),
    :class:`UserError` names the file, the folder, the URL and ``--no-pretrained``.
    """
    path, url = model_zoo_file(name, root)
    if not os.path.isfile(path):
        LOG.info('ImageNet weights for %s are not in %s: downloading %s', name, os.path.dirname(path), url)
        try:
            model_store.get_model_file(name, root=os.path.dirname(path))
        except Exception as err:  # pylint: disable=broad-except  (requests, OSError, hash mismatch...)
            raise UserError(
                'ImageNet weights for %s are not in the model-zoo cache: place %s in %s (downloading %s failed: '
                '%s; fetch and unzip it there by hand, or set MXNET_HOME to the folder that holds models/), or '
                'pass --no-pretrained to start from random weights' % (
                    name, os.path.basename(path), os.path.dirname(path), url,
                    str(err).splitlines()[0][:160] if str(err) else type(err).__name__))
    try:
        zoo_net.load_parameters(path, ctx=mx.cpu())
    except Exception as err:  # mxnet raises MXNetError/AssertionError for damaged files
        raise UserError('could not read the ImageNet weights in %s (%s): delete the file and download '
                        '%s again' % (path, str(err).splitlines()[0] if str(err) else type(err).__name__,
                                      url))


# ----------------------------------------------------------------------------------------------
# Backbone with taps
# ----------------------------------------------------------------------------------------------

def _zoo_units(zoo_net, family):
    """Flatten the model zoo's ``features`` into units; return (units, stage end index, stage starts).

    Unit i's output is the feature map after unit i. ResNet stages are split into their residual
    blocks; DenseNet dense blocks into their layers and transitions into BN, ReLU, conv and pool.
    ``ends['s3']`` is the index of the unit that ends stage 3 (for DenseNet blocks 1-3: the
    transition conv, as in the authors' DenseNet tap ``conv3``); ``blocks[3]`` lists the unit index
    of every block of stage 3.
    """
    units, ends, blocks = [], {}, {}
    layers = list(zoo_net.features._children.values())  # pylint: disable=protected-access
    stage = 0
    if family == 'resnet':
        for layer in layers[:-1]:                          # drop GlobalAvgPool2D: part of the tail
            children = list(layer._children.values())  # pylint: disable=protected-access
            if isinstance(layer, nn.HybridSequential) and children:
                stage += 1
                blocks[stage] = list(range(len(units), len(units) + len(children)))
                units.extend(children)
                ends['s%d' % stage] = len(units) - 1
            else:
                units.append(layer)
        tail = []
    else:
        # conv0 bn relu pool, stage1, transition, stage2, transition, stage3, transition, stage4,
        # bn, relu, AvgPool2D(7), Flatten. The fixed 7x7 pool is replaced by a global pool so any
        # input size works (identical at 224).
        body, tail = layers[:-4], layers[-4:-2]
        for layer in body:
            children = list(layer._children.values())  # pylint: disable=protected-access
            if isinstance(layer, nn.HybridSequential) and layer.prefix.endswith('stage%d_' % (stage + 1)):
                stage += 1
                blocks[stage] = list(range(len(units), len(units) + len(children)))
                units.extend(children)
                ends['s%d' % stage] = len(units) - 1
            elif isinstance(layer, nn.HybridSequential):    # transition: BN, ReLU, conv, pool
                units.extend(children)
                ends['s%d' % stage] = len(units) - 2        # after the transition conv
            else:
                units.append(layer)
    return units, ends, blocks, tail


def resolve_taps(taps, ends, blocks):
    """Turn tap names into unit indices.

    ``sN``: end of stage N. ``sNbK``: after block K (1-based) of stage N. ``sN-M``: M blocks before
    the end of stage N (the authors' extra tap is ``s3-3``, which is ``s3b20`` for ResNet-101), clamped
    to the first block of the stage for shallow nets.
    """
    indices = []
    for tap in taps:
        match = re.fullmatch(r's(\d)(?:b(\d+)|-(\d+))?', tap)
        if not match or int(match.group(1)) not in blocks:
            raise UserError('unknown tap %r: use sN (end of stage N), sNbK (after block K of stage N) or '
                            'sN-M (M blocks before the end of stage N), N in %s'
                            % (tap, sorted(blocks)))
        stage = int(match.group(1))
        stage_blocks = blocks[stage]
        if match.group(2):
            k = int(match.group(2))
            if not 1 <= k <= len(stage_blocks):
                raise UserError('tap %r: stage %d has blocks 1..%d' % (tap, stage, len(stage_blocks)))
            indices.append(stage_blocks[k - 1])
        elif match.group(3):
            k = max(len(stage_blocks) - int(match.group(3)), 1)
            indices.append(stage_blocks[k - 1])
        else:
            indices.append(ends['s%d' % stage])
    if list(indices) != sorted(set(indices)):
        raise UserError('taps %s must be distinct and in network order' % (list(taps),))
    return indices


def tap_names(backbone, taps):
    """Canonical ``sN`` / ``sNbK`` names of ``taps`` for ``backbone`` (e.g. ``s3-3`` -> ``s3b20``)."""
    family = 'densenet' if backbone.startswith('densenet') else 'resnet'
    zoo = vision.get_model(backbone)
    units, ends, blocks, _ = _zoo_units(zoo, family)
    names = []
    for tap, index in zip(taps, resolve_taps(taps, ends, blocks)):
        stage = int(tap[1])
        end_name = [k for k, v in ends.items() if v == index]
        names.append(end_name[0] if end_name else 's%db%d' % (stage, blocks[stage].index(index) + 1))
    return names


class Backbone(gluon.HybridBlock):
    """A model-zoo classifier cut into segments at the taps, with a new Dense(C) output.

    ``forward(x)`` returns ``(tap_1, ..., tap_T, primary_logits)``. The zoo layers keep their own
    parameter names (``resnetv10_stage3_conv12_weight``...); the new output layer is created in the zoo
    network's name scope exactly as the authors did, so it is called ``dense1``.
    """

    def __init__(self, name, num_classes, taps, pretrained=False, root=None, **kwargs):
        super(Backbone, self).__init__(**kwargs)
        if name not in BACKBONES:
            raise UserError('unknown backbone %r: choose one of %s' % (name, ', '.join(BACKBONES)))
        self.family = 'densenet' if name.startswith('densenet') else 'resnet'
        with self.name_scope():
            zoo = vision.get_model(name, prefix=ZOO_PREFIX[self.family])
        if pretrained:
            load_pretrained(zoo, name, root)
        units, ends, blocks, tail = _zoo_units(zoo, self.family)
        self.tap_indices = resolve_taps(taps, ends, blocks)
        self.zoo_prefix = zoo.prefix
        with self.name_scope():
            self.segments = nn.HybridSequential(prefix='')
            start = 0
            for end in self.tap_indices:
                segment = nn.HybridSequential(prefix='')
                segment.add(*units[start:end + 1])
                self.segments.add(segment)
                start = end + 1
            self.head = nn.HybridSequential(prefix='')
            self.head.add(*units[start:])
            self.head.add(*tail)
            self.head.add(nn.GlobalAvgPool2D())
        with zoo.name_scope():
            # Same construction as the authors' getResNet: the new output layer is named dense1.
            self.output = nn.Dense(num_classes, flatten=True, weight_initializer=HEAD_INIT)

    def feature_params(self):
        """The model-zoo layers' parameters (everything but the new output layer)."""
        output = set(self.output.collect_params().keys())
        return [p for name, p in self.collect_params().items() if name not in output]

    def hybrid_forward(self, F, x):
        taps = []
        for segment in self.segments:
            x = segment(x)
            taps.append(x)
        return tuple(taps) + (self.output(self.head(x)),)


# ----------------------------------------------------------------------------------------------
# The full network
# ----------------------------------------------------------------------------------------------

class VAANet(gluon.HybridBlock):
    """Backbone + one attention branch and classifier per tap, fused at score level.

    Parameters
    ----------
    backbone : str
        One of ``BACKBONES``.
    num_classes : int
        Number of attributes C.
    preset : 'paper' or 'upstream'
        Head architecture and taps (module docstring).
    input_size : int
        Side of the square input; the tap sizes and the kxk classifier convs follow from it.
    pretrained : bool
        Load ImageNet weights for the backbone from the model-zoo cache (never downloads).
    taps : sequence of str, optional
        Override the preset's taps (``resolve_taps`` gives the syntax).

    ``net(x)`` returns ``(primary_logits, [tap_logits...], fused_logits)``; after
    ``net.return_attention = True`` a fourth element holds the list of attention maps A_i
    (N x C x H_i x W_i, each map sums to 1).
    """

    def __init__(self, backbone='resnet101_v1', num_classes=14, preset='paper', input_size=224,
                 pretrained=False, taps=None, root=None, **kwargs):
        super(VAANet, self).__init__(**kwargs)
        if preset not in PRESETS:
            raise UserError('unknown preset %r: use %s' % (preset, ', '.join(sorted(PRESETS))))
        if num_classes < 1:
            raise UserError('num_classes must be at least 1, got %d' % num_classes)
        cfg = PRESETS[preset]
        self.preset, self.backbone_name, self.num_classes = preset, backbone, num_classes
        self.input_size = input_size
        self.taps = tuple(taps or cfg['taps'])
        self._return_attention = False
        with self.name_scope():
            self.backbone = Backbone(backbone, num_classes, self.taps, pretrained, root,
                                     prefix='backbone_')
        self.tap_shapes = self._infer_tap_shapes(input_size)
        with self.name_scope():
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

    def _infer_tap_shapes(self, input_size):
        outs = self.backbone(mx.sym.var('data'))
        _, shapes, _ = mx.sym.Group(list(outs[:-1])).infer_shape(data=(1, 3, input_size, input_size))
        for tap, shape in zip(self.taps, shapes):
            if min(shape[2:]) < 1:
                raise UserError('input size %d is too small for tap %s' % (input_size, tap))
        return [tuple(s[1:]) for s in shapes]

    def stage_modules(self):
        """The authors' split of the network into separately trained modules: ``{name: block}``.

        ``backbone`` holds the model-zoo layers and the new output layer; each tap has ``stage_N/fconv``
        (confidence conv), ``stage_N/fatt`` (attention convs) and ``stage_N/fsr`` (classifier), N = 2, 3, 4
        as in the authors' file names (``stage_numbers``). Each module gets its own ``gluon.Trainer``
        (``trainers.StageTrainers``) and its own file in the authors' layout (``checkpoints.upstream_files``).
        """
        modules = collections.OrderedDict(backbone=self.backbone)
        for number, branch, classifier in zip(self.stage_numbers, self.branches, self.classifiers):
            modules['stage_%d/fconv' % number] = branch.fconv
            modules['stage_%d/fatt' % number] = branch.fatt
            modules['stage_%d/fsr' % number] = classifier.fsr
        return modules

    def freeze_backbone(self, frozen=True, keep_output=False, fix_statistics=False):
        """Stop (or restart) gradients for the backbone: all of it, or with ``keep_output`` only its
        model-zoo layers. A frozen layer's BatchNorm statistics never move (MXNet updates them in the
        backward pass), but in training mode it would still normalise with each batch's statistics;
        ``fix_statistics`` makes it use its stored ones, so that the frozen backbone computes in training
        exactly what it computes at evaluation (the first phase of the paper's schedule). Unfreezing
        restores batch statistics. The graph is rebuilt at the next call."""
        params = self.backbone.feature_params() if keep_output else self.backbone.collect_params().values()
        for param in params:
            param.grad_req = 'null' if frozen else 'write'     # (BN running statistics stay 'null')
        for block in _all_blocks(self.backbone):
            if isinstance(block, nn.BatchNorm):
                block._kwargs['use_global_stats'] = bool(frozen and fix_statistics)  # pylint: disable=protected-access
        self._clear_cached_op()

    @property
    def return_attention(self):
        """Whether ``forward`` also returns the attention maps (changing it rebuilds the graph)."""
        return self._return_attention

    @return_attention.setter
    def return_attention(self, value):
        if bool(value) != self._return_attention:
            self._return_attention = bool(value)
            self._clear_cached_op()

    def hybrid_forward(self, F, x):
        outs = self.backbone(x)
        features, primary = outs[:-1], outs[-1]
        tap_logits, maps = [], []
        for feat, branch, classifier in zip(features, self.branches, self.classifiers):
            attention, confidence, _ = branch(feat)
            tap_logits.append(classifier(attention * confidence))
            maps.append(attention)
        fused = F.add_n(primary, *tap_logits) / (1 + len(tap_logits))
        if self._return_attention:
            return primary, tap_logits, fused, maps
        return primary, tap_logits, fused


def use_sync_batchnorm(net, num_devices):
    """Swap every BatchNorm of ``net`` for a SyncBatchNorm over ``num_devices`` devices, keeping the same
    parameters (so weights load and save unchanged); statistics are then computed over the whole batch
    instead of each device's slice. Call before hybridizing."""
    from mxnet.gluon.contrib.nn import SyncBatchNorm
    swapped = 0
    for block in _all_blocks(net):
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


def _all_blocks(block, seen=None):
    seen = set() if seen is None else seen
    if id(block) in seen:
        return []
    seen.add(id(block))
    out = [block]
    for child in block._children.values():  # pylint: disable=protected-access
        out.extend(_all_blocks(child, seen))
    return out


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
    # parameters can be handed to Trainers before the first batch.
    net.infer_shape(mx.nd.zeros((1, 3, net.input_size, net.input_size)))
    for param in params:
        if param._data is None:  # pylint: disable=protected-access
            param._finish_deferred_init()  # pylint: disable=protected-access
    net.collect_params().reset_ctx(ctx)
    return net


def get_vaa_net(backbone='resnet101_v1', num_classes=14, preset='paper', input_size=224,
                pretrained=False, ctx=None, taps=None, root=None):
    """Build, initialise and place a :class:`VAANet`."""
    net = VAANet(backbone, num_classes, preset, input_size, pretrained, taps, root)
    return initialize(net, ctx)


def build_net(cfg, ctx=None, pretrained=None):
    """The network a run's config describes; training, evaluation, resume and the benchmark all build it
    here, so a saved ``config.json`` (or a checkpoint's config) rebuilds exactly the trained network.

    Reads ``backbone``, ``num_classes``, ``preset``, ``input_size``, ``taps`` (optional) and
    ``pretrained``; ``pretrained=False`` overrides the latter (weights about to be loaded from a
    checkpoint need no ImageNet cache).
    """
    pretrained = cfg.get('pretrained', False) if pretrained is None else pretrained
    net = get_vaa_net(cfg['backbone'], cfg['num_classes'], cfg['preset'], cfg['input_size'], pretrained, ctx,
                      cfg.get('taps'))
    for tap, shape in zip(tap_names(net.backbone_name, net.taps), net.tap_shapes):
        if shape[1] * shape[2] < 4:
            LOG.warning('tap %s has a %dx%d map at --input-size %d: its spatial attention has next to nothing to '
                        'choose from (use a larger --input-size)', tap, shape[1], shape[2], cfg['input_size'])
    return net
