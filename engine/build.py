"""Where a run's config becomes a network: :func:`build_net`, the one place that reads a config to build
one (training, evaluation, resume, the benchmark and the study all call it, so a run folder's
``config.json``, or any checkpoint, rebuilds exactly the trained network).

The networks themselves (``model.py``, ``related/``) take numbers; the related systems add their parts
to the paper's network (``model.Parts``) or build a network of their own (AP-CNN).
"""
import logging

import related
from backbone import tap_names
from engine import config
from model import Parts, get_vaa_net, initialize

LOG = logging.getLogger('vaa')


def parse_taps(value):
    """``--taps``: None (the preset's), ``none`` (no attention branch) or ``s3,s4``-style names."""
    if value is None or isinstance(value, (list, tuple)):
        return None if value is None else tuple(value)
    return () if value.strip().lower() == 'none' else tuple(t.strip() for t in value.split(',') if t.strip())


def build_net(cfg, ctx=None, pretrained=None, labels=None, mask=None, names=None):
    """The network ``cfg`` describes, initialised on ``ctx``.

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
                          ctx, parse_taps(cfg['taps']), parts=parts)
        _warn_small_maps(net, cfg['input_size'])
    if cfg['backbone_lr_mult'] != 1.0:              # --backbone-lr-mult: the model-zoo layers' learning rate
        for param in net.backbone.zoo_params(with_output=False):
            param.lr_mult = cfg['backbone_lr_mult']
    return net


def _warn_small_maps(net, input_size):
    for tap, shape in zip(tap_names(net.backbone_name, net.taps), net.tap_shapes):
        if shape[1] * shape[2] < 4:
            LOG.warning('tap %s has a %dx%d map at --input-size %d: its spatial attention has next to '
                        'nothing to choose from (use a larger --input-size)', tap, shape[1], shape[2],
                        input_size)
