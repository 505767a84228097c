"""RGA, Relation-Aware Global Attention (Zhang et al., "Relation-Aware Global Attention for Person
Re-identification", CVPR 2020): modules after chosen ResNet stages (``modules.py``, from the released
``rga_modules.py``), inside the paper's network's backbone."""
import collections
import logging

from common.errors import UserError

LOG = logging.getLogger('vaa')
NAME = 'rga'
HEAD = None
FIXED = ('rga', 'rga_stages', 'rga_ratios')
RANGES = ()
Settings = collections.namedtuple('Settings', 'mode stages ratios')


def add_flags(a):
    a('--rga', choices=['none', 's', 'c', 'sc'], default='none',
      help='Relation-Aware Global Attention after ResNet stages: spatial, channel, or both (S then C)')
    a('--rga-stages', default='1,2,3,4', help='stages followed by an RGA module (stage 1 is costly at 224: '
                                               '2,3,4 halves the cost)')
    a('--rga-ratios', default='8,8,8', help='RGA channel, spatial and down-sampling ratios')


def active(cfg):
    return cfg['rga'] not in (None, 'none')


def settings(cfg):
    """(mode, stages, ratios) from the flags."""
    return Settings(cfg['rga'], _ints(cfg['rga_stages'], 'rga-stages', None),
                    _ints(cfg['rga_ratios'], 'rga-ratios', 3))


def _ints(value, flag, count):
    try:
        numbers = tuple(int(v) for v in str(value).replace(' ', '').split(',') if v)
    except ValueError:
        numbers = ()
    if not numbers or (count and len(numbers) != count) or min(numbers) < 1:
        raise UserError('--%s must be %s whole numbers, 1 or more, such as %s; got %r' % (
            flag, count or 'one or more', '8,8,8' if count else '2,3,4', value))
    return numbers


def check(cfg):
    if cfg['backbone'].startswith('densenet'):
        raise UserError('--rga is built for ResNet backbones; %s is a DenseNet' % cfg['backbone'])
    settings(cfg)


def describe(cfg):
    return 'RGA-%s@%s' % (cfg['rga'].upper(), cfg['rga_stages'])


def plug(cfg, parts, labels=None, mask=None, names=None):
    """RGA modules after the chosen stages of the backbone (warned when stage 1 is costly)."""
    from related.rga import modules
    rga = settings(cfg)
    from model import Blocks
    parts.blocks = Blocks(NAME, lambda shapes: modules.rga_blocks(rga.mode, shapes, rga.stages, rga.ratios))
    parts.notes.append('rga %s after stages %s' % (rga.mode, ','.join(map(str, rga.stages))))
    parts.overlays.append(modules.overlay)
    if 1 in rga.stages and (cfg['input_size'] // 4) ** 2 >= 1024:
        n = (cfg['input_size'] // 4) ** 2
        LOG.warning('RGA at stage 1 (a %dx%d map): its position graph has %d x %d entries and its '
                    'compression costs about %.1f GMAC per image (ResNet-101 at 224: 7.8); --rga-stages '
                    '2,3,4 leaves it out',
                    cfg['input_size'] // 4, cfg['input_size'] // 4, n, n, n ** 3 / 4e9)


def loss(cfg):
    return None
