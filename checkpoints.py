"""Reading and writing weights in the authors' ``saved_models/`` layout (SPEC 8).

The authors saved every module with Gluon's ``save_params``, which writes an MXNet NDArray file whose
keys are the parameter names without the block's prefix:

* ``backbone_resnet.params``: the model-zoo names without ``resnetv10_`` (``conv0_weight``,
  ``stage3_conv12_weight``, ...; 588 keys for ResNet-101) and the new output layer ``dense1_*``.
  (DenseNet backbones, which the authors' training code never saved, go to
  ``backbone_densenet.params`` with keys stripped of ``densenet0_``.)
* per tap, with N = 2, 3, 4 for s3b20, s3, s4: ``fconv_stage_N.params`` (``conv0_*``),
  ``fatt_stage_N.params`` (``conv0..2_*``, ``batchnorm0..1_*``), ``fsr_stage_N.params``
  (``conv0..2_*``, ``batchnorm0..2_*``, ``dense0_*``).

NDArray files hold no Python objects, so loading them executes nothing. Files are written to a
temporary name and renamed, so an interrupted save never leaves a half-written file behind.
"""
import os

import numpy as np
import mxnet as mx
from mxnet import nd

from errors import UserError


def upstream_files(net):
    """``{file name: (ParameterDict, prefix to strip)}`` for every module of ``net``."""
    files = {'backbone_%s.params' % net.backbone.family:
             (net.backbone.collect_params(), net.backbone.zoo_prefix)}
    for number, branch, classifier in zip(net.stage_numbers, net.branches, net.classifiers):
        files['fconv_stage_%d.params' % number] = (branch.fconv.collect_params(), branch.fconv.prefix)
        files['fatt_stage_%d.params' % number] = (branch.fatt.collect_params(), branch.fatt.prefix)
        files['fsr_stage_%d.params' % number] = (classifier.fsr.collect_params(), classifier.fsr.prefix)
    return files


def _strip(params, prefix):
    out = {}
    for name, param in params.items():
        if not name.startswith(prefix):
            raise ValueError('parameter %s does not start with %s' % (name, prefix))
        out[name[len(prefix):]] = param
    return out


def atomic_save_ndarrays(path, arrays):
    """``nd.save`` to ``path`` through a temporary file + fsync + rename."""
    tmp = '%s.tmp%d' % (path, os.getpid())
    try:
        nd.save(tmp, arrays)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_upstream(net, folder):
    """Write ``net``'s weights as the authors' ``saved_models/`` files into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    written = []
    for file_name, (params, prefix) in sorted(upstream_files(net).items()):
        arrays = {key: param._reduce() for key, param in _strip(params, prefix).items()}  # pylint: disable=protected-access
        path = os.path.join(folder, file_name)
        atomic_save_ndarrays(path, arrays)
        written.append(path)
    return written


def _load_ndarray_file(path):
    if not os.path.isfile(path):
        raise UserError('missing checkpoint file %s' % path)
    try:
        arrays = nd.load(path)
    except mx.base.MXNetError as err:
        raise UserError('%s is not an MXNet parameter file (%s)' % (path, str(err).splitlines()[0]))
    if not isinstance(arrays, dict):
        raise UserError('%s holds an unnamed list of arrays, not named parameters' % path)
    return arrays


def load_upstream(net, folder, ctx=None):
    """Load the authors' ``saved_models/`` files from ``folder`` into ``net``.

    Every file and key must be present with the right shape; otherwise :class:`UserError` says which
    file and keys differ (typically a checkpoint of another preset, backbone or class count).
    """
    if not os.path.isdir(folder):
        raise UserError('upstream checkpoint folder %s does not exist' % folder)
    for file_name, (params, prefix) in sorted(upstream_files(net).items()):
        path = os.path.join(folder, file_name)
        arrays = _load_ndarray_file(path)
        # Gluon's save_params never adds arg:/aux: prefixes, but Module checkpoints do; accept both.
        arrays = {k.split(':', 1)[-1]: v for k, v in arrays.items()}
        expected = _strip(params, prefix)
        missing = sorted(set(expected) - set(arrays))
        extra = sorted(set(arrays) - set(expected))
        if missing or extra:
            raise UserError(
                '%s does not match this model (%s, preset %s, %d classes): missing keys %s, unexpected '
                'keys %s' % (path, net.backbone_name, net.preset, net.num_classes,
                             _short(missing), _short(extra)))
        for key, param in expected.items():
            if param.shape and tuple(param.shape) != tuple(arrays[key].shape) and 0 not in param.shape:
                raise UserError('%s: %s has shape %s but this model (%s, preset %s, %d classes, input %d) '
                                'needs %s' % (path, key, arrays[key].shape, net.backbone_name, net.preset,
                                              net.num_classes, net.input_size, param.shape))
        for key, param in expected.items():
            value = arrays[key].astype(np.float32) if arrays[key].dtype != param.dtype else arrays[key]
            if param._data is None:  # pylint: disable=protected-access
                param.initialize(ctx=ctx or mx.cpu())
            param.set_data(value)
    return net


def _short(keys, limit=6):
    return '[%s%s]' % (', '.join(keys[:limit]), ', ...' if len(keys) > limit else '')
