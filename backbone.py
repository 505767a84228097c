"""The backbones: Gluon model-zoo ResNet v1 (18/34/50/101/152) and DenseNet (121/161/169/201), cut at
the taps into consecutive segments, with their ImageNet weights from the model-zoo cache.

The zoo layers are used as they are (the same parameter names as the model zoo and as the authors'
``saved_models/`` files), so the whole network still hybridizes into one graph. Taps are named ``sN``
(end of stage N), ``sNbK`` (after block K of stage N) and ``sN-M`` (M blocks before the end of stage N).
"""
import contextlib
import io
import logging
import os
import re
import socket
import urllib.parse
import weakref

import mxnet as mx
from mxnet import gluon
from mxnet.gluon import nn
from mxnet.gluon.model_zoo import vision
from mxnet.gluon.model_zoo import model_store

from attention import HEAD_INIT
from common.errors import UserError
from common.presets import BACKBONES  # noqa: F401  (backbone.BACKBONES)

LOG = logging.getLogger('vaa')
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
            unreachable = _unreachable(url)
            if unreachable:             # offline: say so once instead of MXNet's retries
                raise OSError(unreachable)
            with contextlib.redirect_stdout(io.StringIO()):        # MXNet prints every failed try
                model_store.get_model_file(name, root=os.path.dirname(path))
        except Exception as err:  # pylint: disable=broad-except  (requests, OSError, hash mismatch...)
            raise UserError(
                'ImageNet weights for %s are not in the model-zoo cache: place %s in %s (downloading %s '
                'failed: %s; fetch and unzip it there by hand, or set MXNET_HOME to the folder that holds '
                'models/), or pass --no-pretrained to start from random weights' % (
                    name, os.path.basename(path), os.path.dirname(path), url,
                    str(err).splitlines()[0][:160] if str(err) else type(err).__name__))
    try:
        zoo_net.load_parameters(path, ctx=mx.cpu())
    except Exception as err:  # mxnet raises MXNetError/AssertionError for damaged files
        raise UserError('could not read the ImageNet weights in %s (%s): delete the file and download '
                        '%s again' % (path, str(err).splitlines()[0] if str(err) else type(err).__name__,
                                      url))


def _unreachable(url, timeout=5.0):
    """Why ``url``'s host cannot be reached (no DNS, no route, refused), or None when a connection opens."""
    parsed = urllib.parse.urlparse(url)
    port = parsed.port or (443 if parsed.scheme == 'https' else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return None
    except OSError as err:
        return 'no network connection to %s:%d (%s)' % (parsed.hostname, port, err.strerror or err)


# ----------------------------------------------------------------------------------------------
# A BatchNorm for feature vectors that runs on every CPU
# ----------------------------------------------------------------------------------------------

class BatchNorm1D(nn.BatchNorm):
    """``nn.BatchNorm`` for (N, C) feature vectors (PyTorch's ``BatchNorm1d``), computed on the same
    numbers viewed as (N, C, 1, 1) maps, keeping the running variance PyTorch keeps.

    The running variance: MXNet's BatchNorm moves it towards the batch's biased variance (divided by n),
    PyTorch's towards the unbiased one (divided by n - 1). Over images n = B*H*W and the two agree; over
    vectors n is the batch size (n/(n-1) = 1.14 at batch 8). The related systems' released code is
    PyTorch, so after each training step (:func:`torch_running_variance`) the update MXNet made,
    v' = m v + (1 - m) s2, is moved to m v + (1 - m) s2 n / (n - 1) = v' + (v' - m v) / (n - 1), on
    every device with its own n. The paper's network has no vector BatchNorm: its BatchNorms stay
    MXNet's, as the authors' code had them.

    MXNet 1.9.1's oneDNN BatchNorm at the AVX-512 level crashes (segmentation fault, inference mode) on a
    2-D input when a BatchNorm with the same number of channels has already run on (N, C, 1, 1) maps in
    channels-last layout (the output of a 1x1 convolution there: AP-CNN's pooled pyramid branch before its
    classifiers' BatchNorms). Its cached kernel is reused for the 2-D array. A 4-D input with the same
    numbers takes the 4-D path, which is correct on every ISA level. The result, the parameters and
    their names are those of ``nn.BatchNorm`` (checkpoints are unchanged); it costs two reshapes.
    """

    rows_per_sample = 1             # vectors per sample (a layer applied to each of K nodes: K)

    def _alias(self):
        return 'batchnorm'          # the automatic names of nn.BatchNorm: batchnorm0_gamma...

    def unbias(self, before, counts):
        """After a training step: the running variance moved as PyTorch moves it (class docstring);
        ``before``: each device's running variance before the step, ``counts``: each device's batch (its
        samples; n is that times :attr:`rows_per_sample`)."""
        momentum = self._kwargs['momentum']
        for now, old, samples in zip(self.running_var.list_data(), before, counts):
            n = samples * self.rows_per_sample
            if n > 1:
                now += (now - momentum * old) / (n - 1)

    def hybrid_forward(self, F, x, gamma, beta, running_mean, running_var):
        # pylint: disable=arguments-differ
        maps = F.reshape(x, shape=(0, 0, 1, 1))
        out = super(BatchNorm1D, self).hybrid_forward(F, maps, gamma, beta, running_mean, running_var)
        return F.reshape(out, shape=(0, 0))


_VECTOR_BATCHNORMS = weakref.WeakKeyDictionary()       # network -> its BatchNorm1D layers


@contextlib.contextmanager
def torch_running_variance(net, counts):
    """Around a training step of ``net`` on device batches of ``counts`` samples: every
    :class:`BatchNorm1D`'s running variance ends as PyTorch's BatchNorm1d would keep it.

    MXNet 1.9.1 moves a BatchNorm's running statistics in the backward pass, and in a hybridized network
    (static_alloc, as train.py runs it) the threaded engine does not order that write with later reads and
    writes of the same arrays: a correction pushed after the step could run before MXNet's own update or
    after it, by chance (a quarter of the runs of the portability probe differed). So the copies are waited
    for before the step and the whole step before the correction: one synchronisation per step, only in a
    network with vector BatchNorms (the related systems')."""
    layers = _VECTOR_BATCHNORMS.get(net)
    if layers is None:                  # (found once; not a SyncBatchNorm put in a BatchNorm1D's place)
        layers = _VECTOR_BATCHNORMS[net] = [b for b in all_blocks(net) if type(b) is BatchNorm1D]
    if not layers:
        yield
        return
    before = [[v.copy() for v in layer.running_var.list_data()] for layer in layers]
    for copies in before:               # taken before the step's BatchNorms move the statistics ...
        for copy in copies:
            copy.wait_to_read()
    yield
    mx.nd.waitall()                     # ... and corrected after they have (docstring)
    for layer, old in zip(layers, before):
        layer.unbias(old, counts)


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


def stage_shapes(units, ends, input_size):
    """``{stage: (C, H, W)}`` at the end of every stage, by symbolic shape inference."""
    x, outs, stage_of = mx.sym.var('data'), {}, {v: k for k, v in ends.items()}
    for i, unit in enumerate(units):
        x = unit(x)
        if i in stage_of:
            outs[int(stage_of[i][1:])] = x
    stages = sorted(outs)
    _, shapes, _ = mx.sym.Group([outs[s] for s in stages]).infer_shape(data=(1, 3, input_size, input_size))
    return {s: tuple(shape[1:]) for s, shape in zip(stages, shapes)}


class Backbone(gluon.HybridBlock):
    """A model-zoo classifier cut into segments at the taps, with a new Dense(C) output.

    ``forward(x)`` returns ``(tap_1, ..., tap_T, primary_logits)``. The zoo layers keep their own
    parameter names (``resnetv10_stage3_conv12_weight``...); the new output layer is created in the zoo
    network's name scope exactly as the authors did, so it is called ``dense1``.

    Options for the related systems (all off by default, which leaves the network as above):
    ``pool`` (``avg``, ``max``, or None: no pooling) for the global pooling; ``output=False`` returns the
    pooled feature vector (N x D) instead of logits, or with ``pool=None`` the last feature map itself;
    ``return_final_map`` returns ``(taps..., final map, output)``: the map that enters the global pooling
    (MC-Loss reads it); ``plugins(stage_shapes)`` returns ``{stage: block}``, blocks
    inserted after the last unit of those stages (created here, outside the zoo's name prefix; a tap at
    the end of such a stage sees the block's output, a tap inside the stage does not).
    """

    def __init__(self, name, num_classes, taps, pretrained=False, root=None, input_size=224, pool='avg',
                 output=True, plugins=None, return_final_map=False, **kwargs):
        super(Backbone, self).__init__(**kwargs)
        if pool is None and output:
            raise ValueError('a Backbone without pooling has no output layer: pass output=False')
        self.return_final_map = bool(return_final_map)
        if name not in BACKBONES:
            raise UserError('unknown backbone %r: choose one of %s' % (name, ', '.join(BACKBONES)))
        self.family = 'densenet' if name.startswith('densenet') else 'resnet'
        with self.name_scope():
            zoo = vision.get_model(name, prefix=ZOO_PREFIX[self.family])
        if pretrained:
            load_pretrained(zoo, name, root)
        units, ends, blocks, tail = _zoo_units(zoo, self.family)
        tap_indices = resolve_taps(taps, ends, blocks)
        self.zoo_prefix = zoo.prefix
        inserted = {}
        if plugins is not None:
            if self.family != 'resnet':
                raise UserError('the RGA blocks are built for ResNet backbones; %s is a DenseNet' % name)
            shapes = stage_shapes(units, ends, input_size)
            with self.name_scope():
                inserted = {ends['s%d' % stage]: block for stage, block in plugins(shapes).items()}
        self.inserted_prefixes = [inserted[i].prefix for i in sorted(inserted)]
        units, index = self._insert(units, inserted)
        self.tap_indices = [index[i] for i in tap_indices]
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
            self.pool = (None if pool is None else nn.GlobalAvgPool2D() if pool == 'avg' else
                         nn.GlobalMaxPool2D())
        self.output = None
        if output:
            with zoo.name_scope():
                # Same construction as the authors' getResNet: the new output layer is named dense1.
                self.output = nn.Dense(num_classes, flatten=True, weight_initializer=HEAD_INIT)

    @staticmethod
    def _insert(units, inserted):
        """Units with the inserted blocks, and old unit index -> new index (a stage end -> its block)."""
        out, index = [], {}
        for i, unit in enumerate(units):
            out.append(unit)
            if i in inserted:
                out.append(inserted[i])
            index[i] = len(out) - 1
        return out, index

    def zoo_params(self, with_output=True):
        """The model-zoo layers' parameters (and the new output layer's, unless ``with_output`` is False)."""
        output = set()
        if self.output is not None and not with_output:
            output = set(self.output.collect_params().keys())
        return [p for name, p in self.collect_params().items()
                if name.startswith(self.zoo_prefix) and name not in output]

    def feature_params(self):
        """The model-zoo layers' parameters (everything of the zoo but the new output layer)."""
        return self.zoo_params(with_output=False)

    def inserted_params(self):
        """The parameters of the blocks inserted after stages (``plugins``), as one ParameterDict."""
        if not self.inserted_prefixes:
            return gluon.ParameterDict()
        return self.collect_params('|'.join(re.escape(p) + '.*' for p in self.inserted_prefixes))

    def freeze(self, frozen=True, fix_statistics=False):
        """Stop (or restart) gradients for the model-zoo layers (not the output layer, not the inserted
        blocks). A frozen layer's BatchNorm statistics never move (MXNet updates them in the backward pass),
        but in training mode it would still normalise with each batch's statistics; ``fix_statistics``
        makes it use its stored ones, so that the frozen backbone computes in training what it computes at
        evaluation (the first phase of the paper's schedule). Unfreezing restores batch statistics. The
        graph is rebuilt at the next call."""
        for param in self.feature_params():
            param.grad_req = 'null' if frozen else 'write'     # (BN running statistics stay 'null')
        for block in all_blocks(self):
            if isinstance(block, nn.BatchNorm) and block.prefix.startswith(self.zoo_prefix):
                # pylint: disable=protected-access
                block._kwargs['use_global_stats'] = bool(frozen and fix_statistics)
        self._clear_cached_op()

    def hybrid_forward(self, F, x):
        taps = []
        for segment in self.segments:
            x = segment(x)
            taps.append(x)
        x = self.head(x)
        final = (x,) if self.return_final_map else ()
        if self.pool is None:
            return tuple(taps) + final + (x,)
        pooled = self.pool(x)
        return tuple(taps) + final + (self.output(pooled) if self.output is not None else F.flatten(pooled),)


def all_blocks(block, seen=None):
    """``block`` and every block below it, each once."""
    seen = set() if seen is None else seen
    if id(block) in seen:
        return []
    seen.add(id(block))
    out = [block]
    for child in block._children.values():  # pylint: disable=protected-access
        out.extend(all_blocks(child, seen))
    return out
