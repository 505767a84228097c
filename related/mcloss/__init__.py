"""MC-Loss, the mutual-channel loss (Chang et al., "The Devil is in the Channels: Mutual-Channel Loss for
Fine-Grained Image Classification", TIP 2020): an extra term on the map that enters the global pooling,
added to Eq. 7, never replacing it (``head.py``: the head, evaluated in training only, and the loss)."""
import collections

from common.errors import UserError

NAME = 'mc'
HEAD = None
FIXED = ('mc_loss', 'mc_weights', 'mc_drop', 'mc_xi')
RANGES = (('mc_drop', lambda v: v == v and 0 <= v < 1, 'in [0, 1)'),
          ('mc_xi', lambda v: v == 0 or v >= 2, '0 or at least 2'))
Settings = collections.namedtuple('Settings', 'weights drop xi')


def add_flags(a):
    a('--mc-loss', action='store_true',
      help='add MC-Loss (mutual-channel loss) on the last feature map to the objective: one channel group '
           'per attribute, a discriminality and a diversity term (training only; predictions are unchanged)')
    a('--mc-weights', default='1.5,20', help="MC-Loss weights of the discriminality and diversity terms (the "
                                             "authors' current code; their ResNet-50 release: 0.0005,0.005)")
    a('--mc-drop', type=float, default=0.4, help='MC-Loss: share of each group that channel-wise attention '
                                                 'masks')
    a('--mc-xi', type=int, default=0, help="MC-Loss channels per attribute: 0 splits the backbone's own "
                                           "channels (the paper's ResNet setting); K > 0 projects the map to "
                                           "C x K first")


def active(cfg):
    return bool(cfg['mc_loss'])


def settings(cfg):
    """(weights (discriminality, diversity), drop rate, xi); UserError unless the weights are 2 numbers."""
    value = cfg['mc_weights']
    try:
        weights = tuple(float(v) for v in str(value).split(','))
    except ValueError:
        weights = ()
    if len(weights) != 2 or not all(w == w and 0 <= w < float('inf') for w in weights):
        raise UserError("--mc-weights must be two numbers, 0 or more, such as '1.5,20'; got %r" % (value,))
    return Settings(weights, float(cfg['mc_drop']), int(cfg['mc_xi']))


def check(cfg):
    settings(cfg)
    if cfg['finetune']:
        raise UserError('--mc-loss shapes the channels of the backbone, which --finetune freezes for the '
                        'whole run (only its bias would train); drop one of them')


def describe(cfg):
    return 'MC-Loss %s' % cfg['mc_weights']


def plug(cfg, parts, labels=None, mask=None, names=None):
    """The MC head on the map that enters the global pooling, evaluated only while training."""
    from related.mcloss import head
    mc = settings(cfg)

    def build(final_shape):
        block = head.MCHead(cfg['num_classes'], final_shape[0], mc.xi, mc.drop, prefix='mc_')
        parts.notes.append('MC-Loss head (%d attributes x %d channels%s)' % (
            cfg['num_classes'], block.xi, ', projected' if block.projected else ''))
        return block
    from model import AuxHead
    parts.aux = AuxHead(NAME, ('mc_logits', 'mc_div'), build)


def loss(cfg):
    from related.mcloss import head
    return head.MutualChannelLoss(*settings(cfg).weights)
