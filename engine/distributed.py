"""Devices and machines: the device list, batches split over it, and the gradient exchange shared by
all per-module Trainers.

Gluon gives every ``Trainer`` its own KVStore whose keys are the Trainer's own parameter indices; with
one Trainer per module (the authors' design) several Trainers would then create several distributed
KVStores with clashing keys. Here one KVStore serves them all: :class:`GradientSync` numbers every
parameter of the network once, sums each gradient over devices (``device``) or devices and machines
(``dist_sync``, MXNet's parameter server, roles from the DMLC_* environment variables) and leaves the
update to the Trainers, which are built without a KVStore (``kvstore=None``) and called with
``trainer.update(global_batch_size)`` (``trainers.StageTrainers.step``).

Parameter values start identical everywhere: at start-up every worker pulls rank 0's weights.
"""
import os
import sys

import numpy as np
import mxnet as mx
from mxnet import gluon, nd

from engine import gpu
from common.errors import UserError


def parse_contexts(gpus, cpus=1):
    """The devices of ``--gpus``/``--cpus``: None -> [cpu()] (or ``cpus`` CPU contexts),
    '0,1' -> [gpu(0), gpu(1)], after the preflight (:func:`gpu.preflight`: the GPUs mxnet sees, and a
    UserError for a CPU build or a GPU the build has no kernels for)."""
    gpus = (gpus or '').strip()
    if not gpus:
        if cpus < 1:
            raise UserError('--cpus must be at least 1')
        return [mx.cpu(i) for i in range(cpus)]
    try:
        ids = [int(g) for g in gpus.split(',') if g.strip() != '']
    except ValueError:
        raise UserError("--gpus takes comma-separated GPU ids such as '0' or '0,1', got %r" % gpus)
    gpu.preflight(ids, mx, log=lambda line: sys.stderr.write('gpu: %s\n' % line))
    return [mx.gpu(i) for i in ids]


def split_batch(batch, ctx):
    """Split a ``(data, label, mask, index)`` batch over the devices: a list of such tuples, one per
    device (fewer when the batch is smaller than the device count), indices as NumPy int64."""
    data, label, mask, index = batch
    if data.shape[0] < len(ctx):
        ctx = ctx[:data.shape[0]]
    parts = [gluon.utils.split_and_load(x, ctx, even_split=False) for x in (data, label, mask)]
    index = index.asnumpy().astype(np.int64)
    bounds = np.cumsum([0] + [p.shape[0] for p in parts[0]])
    indices = [index[bounds[i]:bounds[i + 1]] for i in range(len(parts[0]))]
    return list(zip(parts[0], parts[1], parts[2], indices))


def create_kvstore(name, num_devices):
    """The one KVStore of the job: None (one device), ``device`` (several) or ``dist_sync``."""
    if name and name.startswith('dist'):
        if name != 'dist_sync':
            raise UserError('--kvstore %s is not supported; use dist_sync (or device)' % name)
        missing = [v for v in ('DMLC_ROLE', 'DMLC_PS_ROOT_URI', 'DMLC_PS_ROOT_PORT', 'DMLC_NUM_SERVER',
                               'DMLC_NUM_WORKER') if v not in os.environ]
        if missing:
            raise UserError('--kvstore dist_sync needs a parameter server: start the job with '
                            'tools/launch.py, or set %s on every process (docs/speed.md, "Several machines")'
                            % ', '.join(missing))
        return mx.kv.create(name)
    if num_devices > 1:
        return mx.kv.create(name or 'device')
    return None


class GradientSync(object):
    """Sum gradients of ``net``'s parameters over ``ctx`` and, with a ``dist_sync`` ``kvstore``, workers."""

    def __init__(self, net, ctx, kvstore=None):
        self.params = [p for _, p in sorted(net.collect_params().items())]
        self.ctx = list(ctx)
        self.kvstore = kvstore
        self.rank = kvstore.rank if kvstore is not None else 0
        self.num_workers = kvstore.num_workers if kvstore is not None else 1
        self._extra_keys = {}
        if self.kvstore is not None:
            for key, param in enumerate(self.params):
                self.kvstore.init(key, param.data(self.ctx[0]))
            if self.distributed:
                self.broadcast_parameters()

    @property
    def distributed(self):
        return self.num_workers > 1 or (self.kvstore is not None and 'dist' in self.kvstore.type)

    def broadcast_parameters(self):
        """Every worker takes rank 0's parameter values (the server holds what rank 0 initialised)."""
        for key, param in enumerate(self.params):
            self.kvstore.pull(key, out=param.list_data(), priority=-key)
        nd.waitall()

    def allreduce_grads(self):
        """Replace every trainable gradient by its sum over devices and workers."""
        if self.kvstore is None:
            return
        for key, param in enumerate(self.params):
            if param.grad_req != 'null':
                grads = param.list_grad()
                self.kvstore.pushpull(key, grads, out=grads, priority=-key)

    def average_aux_states(self):
        """Average BN running statistics over workers so that every worker evaluates the same model."""
        if not self.distributed:
            return
        for key, param in enumerate(self.params):
            if param.grad_req == 'null' and param.name.endswith(('running_mean', 'running_var')):
                arrays = param.list_data()
                self.kvstore.push(key, arrays, priority=-key)
                self.kvstore.pull(key, out=arrays, priority=-key)
                for arr in arrays:
                    arr /= self.num_workers * len(arrays)
        nd.waitall()

    def barrier(self):
        if self.distributed:
            self.kvstore._barrier()  # pylint: disable=protected-access

    def _key(self, name, shape):
        """A KVStore key (after the parameters') for an extra array exchanged between workers."""
        if name not in self._extra_keys:
            key = len(self.params) + len(self._extra_keys)
            self.kvstore.init(key, nd.zeros(shape, ctx=self.ctx[0]))
            self._extra_keys[name] = key
        return self._extra_keys[name]

    def allreduce_array(self, name, array):
        """Sum ``array`` (on ``ctx[0]``) over workers, in place; identity on one worker."""
        if not self.distributed:
            return array
        key = self._key(name, array.shape)
        self.kvstore.push(key, array)
        self.kvstore.pull(key, out=array)
        nd.waitall()
        return array

    def broadcast_values(self, name, values):
        """Rank 0's list of floats, on every worker."""
        if not self.distributed:
            return list(values)
        arr = nd.array(np.asarray(values, np.float64) if self.rank == 0 else np.zeros(len(values)),
                       ctx=self.ctx[0])
        return self.allreduce_array(name, arr).asnumpy().tolist()

    def merged_history(self, history, shard):
        """The prediction history of every worker's shard, for rank 0's checkpoint.

        Workers update disjoint shards (``shard``: this worker's sample indices); each contributes only
        its own rows, so the sum is the union. Returns arrays like ``history.state_dict()``; the local
        history is left as it is.
        """
        if not self.distributed:
            return history.state_dict()
        own = nd.zeros((history.num_samples,), ctx=self.ctx[0])
        own[nd.array(shard, ctx=self.ctx[0])] = 1
        buffer = history.buffer.as_in_context(self.ctx[0]) * own.reshape((-1, 1, 1))
        counts = history.counts.as_in_context(self.ctx[0]) * own
        return {'buffer': self.allreduce_array('history_buffer', buffer),
                'counts': self.allreduce_array('history_counts', counts)}


def use_sync_batchnorm(net, num_devices):
    """Swap every BatchNorm of ``net`` for a SyncBatchNorm over ``num_devices`` devices, keeping the same
    parameters (so weights load and save unchanged); statistics are then computed over the whole batch
    instead of each device's slice. Call before hybridizing."""
    from mxnet.gluon.contrib.nn import SyncBatchNorm
    from mxnet.gluon import nn
    from backbone import all_blocks
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
