"""The related systems that users compare the paper with, which the authors' code never had: one package
each, every one with the same small interface, listed once here.

Each ``related/<system>/__init__.py`` imports nothing heavy (the flags are read before mxnet is imported)
and defines:

* ``NAME``: the module name of its parameters (``stage_modules()``, a Trainer of its own);
* ``HEAD``: its ``--head`` choice and the help for it, or None (it plugs into the paper's network);
* ``RANGES``, ``FIXED``: the bounds of its numeric flags, the settings a resumed run keeps;
* ``add_flags(a)``, ``active(cfg)``, ``check(cfg)`` (its refusals, one line each), ``settings(cfg)`` (its
  flags parsed, once), ``describe(cfg)`` (a few words for tables);
* ``plug(cfg, parts, labels, mask, names)``: adds its blocks to the paper's network (``model.Parts``;
  ``labels``/``mask``/``names``: the training split's, when known), or, for a system that is a network of
  its own, ``network(cfg, pretrained)``;
* ``loss(cfg)``: the term it adds to the objective (on the auxiliary outputs of its head), or None.

The heavy code (the Gluon blocks) sits beside it in the same package and is imported when built.
"""
from related import apcnn, hgat, mcloss, mlgcn, rga

SYSTEMS = (rga, mlgcn, hgat, mcloss, apcnn)


def add_flags(a):
    for system in SYSTEMS:
        system.add_flags(a)


def heads():
    """``--head`` choices and their help: the paper's ``vaa`` first."""
    return [('vaa', "a Dense layer, the paper's")] + [s.HEAD for s in SYSTEMS if s.HEAD]


def ranges():
    return tuple(r for s in SYSTEMS for r in s.RANGES)


def fixed():
    """The settings of every system that a resumed run must keep."""
    return tuple(k for s in SYSTEMS for k in s.FIXED)


def active(cfg):
    """The systems a config switches on."""
    return [s for s in SYSTEMS if s.active(cfg)]


def check(cfg):
    """UserError for the first setting a system on in ``cfg`` cannot take."""
    for system in active(cfg):
        system.check(cfg)


def describe(cfg):
    """The systems on, in a few words each (the paper's network alone: [])."""
    return [s.describe(cfg) for s in active(cfg)]


def network_of(cfg):
    """The system that builds the whole network (AP-CNN), or None: the paper's network with plug-ins."""
    own = [s for s in active(cfg) if hasattr(s, 'network')]
    return own[0] if own else None


def aux_loss(cfg):
    """The term a system on adds to the objective on its head's auxiliary outputs (MC-Loss), or None."""
    terms = [t for t in (s.loss(cfg) for s in active(cfg)) if t is not None]
    return terms[0] if terms else None
