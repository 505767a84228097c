"""Reading and writing weights in the authors' ``saved_models/`` layout.

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
import errno
import os

import numpy as np
import mxnet as mx
from mxnet import nd

from common.errors import UserError, mxnet_message
from common.files import private_temp
from attention import file_shape


def upstream_files(net):
    """``{file name: (ParameterDict, prefix to strip)}``: one file per module of ``net.stage_modules()``
    (``backbone`` -> ``backbone_resnet.params``, ``stage_N/fatt`` -> ``fatt_stage_N.params``, ...)."""
    if net.plugins:
        raise UserError("the authors' saved_models/ layout has no place for %s; export a run without related "
                        "systems (its own checkpoints keep everything)" % ' and '.join(net.plugins))
    files = {}
    for name, params in net.stage_modules().items():
        if name == 'backbone':
            files['backbone_%s.params' % net.backbone.family] = (params, net.backbone.zoo_prefix)
        else:
            stage, module = name.split('/')
            files['%s_%s.params' % (module, stage)] = (params, params.prefix)
    return files


def _strip(params, prefix):
    out = {}
    for name, param in params.items():
        if not name.startswith(prefix):
            raise ValueError('parameter %s does not start with %s' % (name, prefix))
        out[name[len(prefix):]] = param
    return out


def atomic_write(path, write):
    """``write(temporary path)``, then fsync + rename over ``path`` (+ fsync of the folder): a crash at
    any moment leaves either the old or the new file, never a mix. A full disk or an unwritable folder
    becomes a :class:`UserError` that names the file and says the previous one is intact."""
    tmp = private_temp(path)
    try:
        write(tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        try:
            folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        except OSError:      # some filesystems cannot fsync a directory; the rename is still atomic
            pass
    except mx.base.MXNetError as err:
        raise UserError('could not write %s (%s); %s is as it was before. Free some space (or fix the '
                        'folder) and run again' % (path, mxnet_message(err), os.path.basename(path)))
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
            raise
        raise UserError('could not write %s (%s); %s is as it was before. Free some space (or fix the '
                        'folder) and run again' % (path, err.strerror, os.path.basename(path)))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save_ndarrays(path, arrays):
    """``nd.save`` to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda tmp: nd.save(tmp, arrays))


def save_upstream(net, folder):
    """Write ``net``'s weights as the authors' ``saved_models/`` files into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    written = []
    for file_name, (params, prefix) in sorted(upstream_files(net).items()):
        # pylint: disable=protected-access
        arrays = {key: _file_array(param) for key, param in _strip(params, prefix).items()}
        path = os.path.join(folder, file_name)
        atomic_save_ndarrays(path, arrays)
        written.append(path)
    return written


def _to_file(array, param):
    """An array of ``param``'s shape (its value or an optimizer state) in the parameter's file shape
    (:func:`attention.file_shape`); any other array as it is."""
    if tuple(array.shape) == tuple(param.shape) != file_shape(param):
        return array.reshape(file_shape(param))
    return array


def _from_file(array, param):
    """The other way: an array of ``param``'s file shape in the parameter's own shape."""
    if tuple(array.shape) == file_shape(param) != tuple(param.shape):
        return array.reshape(param.shape)
    return array


def _file_array(param):
    """``param``'s value, a copy through the engine, in its file shape."""
    return _to_file(param._reduce(), param)  # pylint: disable=protected-access


def _load_ndarray_file(path):
    if not os.path.isfile(path):
        raise UserError('missing checkpoint file %s' % path)
    try:
        arrays = nd.load(path)
    except mx.base.MXNetError as err:
        raise UserError('%s is not an MXNet parameter file (%s)' % (path, mxnet_message(err)))
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
            if param.shape and file_shape(param) != tuple(arrays[key].shape) and 0 not in param.shape:
                raise UserError('%s: %s has shape %s but this model (%s, preset %s, %d classes, input %d) '
                                'needs %s' % (path, key, arrays[key].shape, net.backbone_name, net.preset,
                                              net.num_classes, net.input_size, file_shape(param)))
        for key, param in expected.items():
            value = arrays[key].astype(np.float32) if arrays[key].dtype != param.dtype else arrays[key]
            if param._data is None:  # pylint: disable=protected-access
                param.initialize(ctx=ctx or mx.cpu())
            param.set_data(_from_file(value, param))
    return net


def _short(keys, limit=6):
    return '[%s%s]' % (', '.join(keys[:limit]), ', ...' if len(keys) > limit else '')


# ----------------------------------------------------------------------------------------------
# Training checkpoints (ours): one NDArray file per checkpoint, nothing pickled
# ----------------------------------------------------------------------------------------------
#
# Keys: ``param/<name>`` for every network parameter (name without the network's instance prefix),
# ``opt/<module>/<param name>/<k>`` for the optimizer state of each Trainer, ``history/buffer`` and
# ``history/counts`` for the prediction history, and ``meta/json``: a uint8 array holding the JSON of
# the training state (epoch, learning rate, plateau counters, best metric, config, update counts).

def _param_names(net):
    return {name[len(net.prefix):]: param for name, param in net.collect_params().items()}


def _json_array(obj):
    import json
    return nd.array(np.frombuffer(json.dumps(obj, sort_keys=True).encode('utf-8'), dtype=np.uint8),
                    dtype='uint8')


def _array_json(arr):
    import json
    return json.loads(arr.asnumpy().astype(np.uint8).tobytes().decode('utf-8'))


def _trainer_param_names(net, trainer):
    """The Trainer's parameters by index, named without the network's instance prefix (``vaanet0_``),
    which differs between two networks built in one process."""
    return {i: p.name[len(net.prefix):] if p.name.startswith(net.prefix) else p.name
            for i, p in enumerate(trainer._params)}  # pylint: disable=protected-access


def _optimizer_arrays(net, name, trainer, arrays, counts):
    """Add a Trainer's optimizer state to ``arrays`` (states of its first device; all are in sync)."""
    updater = trainer._updaters[0]  # pylint: disable=protected-access
    index_to_name = _trainer_param_names(net, trainer)
    for index, state in updater.states.items():
        parts = state if isinstance(state, (list, tuple)) else [state]
        param = trainer._params[index]  # pylint: disable=protected-access
        for k, part in enumerate(parts):
            if part is not None:        # a state of the parameter's shape is stored in its file shape
                arrays['opt/%s/%s/%d' % (name, index_to_name[index], k)] = _to_file(part.copyto(mx.cpu()),
                                                                                     param)
    opt = trainer._optimizer  # pylint: disable=protected-access
    counts[name] = dict(num_update=int(opt.num_update), lr=float(trainer.learning_rate),
                        index_update_count={index_to_name[i]: int(c) for i, c in
                                            # pylint: disable=protected-access
                                            opt._index_update_count.items()})


def save_training(path, net, trainers, history, meta, extra=None):
    """Write everything needed to continue training to ``path`` atomically.

    ``trainers``: ``{module name: gluon.Trainer}``; ``history``: the prediction history's arrays
    (``PredictionHistory.state_dict()``, or every worker's merged) or None; ``extra``: more named
    NDArrays (a partial epoch's accumulators), stored under ``extra/<name>``.
    """
    # pylint: disable=protected-access
    arrays = {'param/' + k: _file_array(p) for k, p in _param_names(net).items()}
    for name, value in (extra or {}).items():
        arrays['extra/' + name] = value if isinstance(value, nd.NDArray) else nd.array(value)
    counts = {}
    for name, trainer in trainers.items():
        if trainer._update_on_kvstore:  # pylint: disable=protected-access
            raise ValueError('save_training needs trainers built with update_on_kvstore=False')
        _optimizer_arrays(net, name, trainer, arrays, counts)
    for name, value in (history or {}).items():
        arrays['history/' + name] = value.copyto(mx.cpu())
    meta = dict(meta, optimizer_counts=counts, format='vaa-checkpoint-1')
    arrays['meta/json'] = _json_array(meta)
    atomic_save_ndarrays(path, arrays)


def read_meta(path):
    """The JSON state of a training checkpoint (reads the whole file)."""
    arrays = _load_ndarray_file(path)
    if 'meta/json' not in arrays:
        raise UserError('%s is not a training checkpoint of this project (no meta/json entry)' % path)
    return _array_json(arrays['meta/json']), arrays


def load_weights(path, net, arrays=None):
    """Load the network weights of a training checkpoint into ``net``; returns its meta."""
    if arrays is None:
        meta, arrays = read_meta(path)
    else:
        meta = _array_json(arrays['meta/json'])
    params = _param_names(net)
    stored = {k[len('param/'):]: v for k, v in arrays.items() if k.startswith('param/')}
    missing, extra = sorted(set(params) - set(stored)), sorted(set(stored) - set(params))
    if missing or extra:
        cfg = meta.get('config', {})
        raise UserError('%s was written for another model (%s, preset %s, %s classes) than this one '
                        '(%s, preset %s, %d classes): missing %s, unexpected %s'
                        % (path, cfg.get('backbone'), cfg.get('preset'), cfg.get('num_classes'),
                           net.backbone_name, net.preset, net.num_classes, _short(missing), _short(extra)))
    for key, param in params.items():
        if file_shape(param) != tuple(stored[key].shape):
            raise UserError('%s: %s has shape %s, this model needs %s (another class count, preset or '
                            'input size?)' % (path, key, stored[key].shape, file_shape(param)))
        param.set_data(_from_file(stored[key], param))
    return meta


def load_training(path, net, trainers, history, arrays=None):
    """Restore weights, optimizer states and prediction history; returns (meta, extra arrays)."""
    if arrays is None:
        _, arrays = read_meta(path)
    meta = load_weights(path, net, arrays)
    counts = meta.get('optimizer_counts', {})
    # keys are opt/<module>/<param>/<k>; module names contain a slash (stage_2/fatt), params do not
    stored = [k[len('opt/'):].rsplit('/', 2) for k in arrays if k.startswith('opt/')]
    stored_names = {module for module, _, _ in stored}
    if stored_names - set(trainers):
        raise UserError('%s holds optimizer states for modules %s that this run does not train (another '
                        '--finetune setting?)' % (path, sorted(stored_names - set(trainers))))
    for name, trainer in trainers.items():
        updaters = trainer._updaters  # pylint: disable=protected-access
        opt = trainer._optimizer  # pylint: disable=protected-access
        names = _trainer_param_names(net, trainer)
        unknown = {param for module, param, _ in stored if module == name} - set(names.values())
        if unknown:
            raise UserError('%s: optimizer states for parameters this model lacks: %s'
                            % (path, _short(sorted(unknown))))
        for index, param in enumerate(trainer._params):  # pylint: disable=protected-access
            prefix = 'opt/%s/%s/' % (name, names[index])
            parts = sorted((int(k[len(prefix):]), v) for k, v in arrays.items() if k.startswith(prefix))
            if not parts:
                continue
            for updater, ctx in zip(updaters, trainer._contexts):  # pylint: disable=protected-access
                values = [_from_file(v, param).as_in_context(ctx) for _, v in parts]
                updater.states[index] = values[0] if len(values) == 1 else tuple(values)
                updater.states_synced[index] = True
        if name in counts:
            opt.num_update = counts[name]['num_update']
            name_to_index = {n: i for i, n in names.items()}
            restored = {name_to_index[n]: c for n, c in counts[name]['index_update_count'].items()
                        if n in name_to_index}
            # The optimizer keeps one update count per device (Adam's bias correction reads it).
            per_device = opt._all_index_update_counts  # pylint: disable=protected-access
            # pylint: disable=protected-access
            for device in set(per_device) | {c.device_id for c in trainer._contexts}:
                per_device[device] = dict(restored)
            # pylint: disable=protected-access
            opt._index_update_count = per_device[trainer._contexts[0].device_id]
            trainer.set_learning_rate(counts[name]['lr'])
    if history is not None and 'history/buffer' in arrays:
        saved = {k[len('history/'):]: v for k, v in arrays.items() if k.startswith('history/')}
        history.load_state_dict(saved, path)
    return meta, {k[len('extra/'):]: v for k, v in arrays.items() if k.startswith('extra/')}
