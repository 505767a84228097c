"""AP-CNN, the weakly supervised attention pyramid CNN (Ding et al., "AP-CNN: Weakly Supervised Attention
Pyramid Convolutional Neural Network for Fine-Grained Visual Classification", TIP 2021): a network of its
own on the project's backbones (``net.py``; its ROI pyramid and zoom in ``roi.py``), from the released
``model/resnet50.py``."""
import collections

from common.errors import UserError

NAME = 'apcnn'
HEAD = ('apcnn', 'AP-CNN: an attention pyramid on stages 2-4 and a second pass on the zoomed ROIs, instead '
                 'of the VAA taps; --input-size divisible by 32')
FIXED = ('apcnn_topk', 'apcnn_anchors', 'apcnn_iou', 'apcnn_drop')
RANGES = (('apcnn_iou', lambda v: v == v and 0 < v <= 1, 'in (0, 1]'),)
Settings = collections.namedtuple('Settings', 'topk anchors iou drop')


def add_flags(a):
    a('--apcnn-topk', default='5,3,1', help='AP-CNN: ROIs kept per pyramid level (strides 8, 16, 32)')
    a('--apcnn-anchors', default='64,128,256',
      help='AP-CNN: anchor sides per level at a 448-pixel input (scaled to --input-size)')
    a('--apcnn-iou', type=float, default=0.05, help='AP-CNN: NMS IoU threshold of the ROIs')
    a('--apcnn-drop', default='0.3,0.3',
      help='AP-CNN: training-time probability of dropping one level-3 ROI, and one level-4 ROI')


def active(cfg):
    return cfg['head'] == 'apcnn'


def _numbers(cfg, key, kind, count, test, what):
    value = cfg[key]
    try:
        numbers = tuple(kind(v) for v in str(value).split(','))
    except ValueError:
        numbers = ()
    if len(numbers) != count or not all(test(v) for v in numbers):
        raise UserError('--%s must be %d %s, got %r' % (key.replace('_', '-'), count, what, value))
    return numbers


def settings(cfg):
    topk = _numbers(cfg, 'apcnn_topk', int, 3, lambda v: v >= 1, 'whole numbers, 1 or more, such as 5,3,1')
    anchors = _numbers(cfg, 'apcnn_anchors', float, 3, lambda v: 0 < v < float('inf'),
                       'positive numbers, such as 64,128,256')
    drop = _numbers(cfg, 'apcnn_drop', float, 2, lambda v: 0 <= v <= 1, 'probabilities, such as 0.3,0.3')
    if sum(drop) > 1:
        raise UserError('--apcnn-drop: the two probabilities add up to more than 1 (%s)' % cfg['apcnn_drop'])
    return Settings(topk, anchors, float(cfg['apcnn_iou']), drop)


def check(cfg):
    if cfg['input_size'] % 32:
        raise UserError('--head apcnn needs an --input-size divisible by 32 (its pyramid adds maps upsampled '
                        'x2 twice), got %d: use %d' % (cfg['input_size'],
                                                       max(32, int(round(cfg['input_size'] / 32.0)) * 32)))
    for flag, key in (('--taps', 'taps'), ('--rga', 'rga'), ('--mc-loss', 'mc_loss')):
        if cfg.get(key) not in (None, False, 'none'):
            raise UserError('--head apcnn has its own attention pyramid instead of the VAA taps and takes no '
                            '%s; drop it' % flag)
    settings(cfg)


def describe(cfg):
    return 'AP-CNN'


def network(cfg, pretrained):
    """The AP-CNN network of the config (not yet initialised)."""
    from related.apcnn.net import APCNNNet
    s = settings(cfg)
    return APCNNNet(cfg['backbone'], cfg['num_classes'], cfg['input_size'], pretrained, preset=cfg['preset'],
                    topk=s.topk, anchors=s.anchors, iou=s.iou, drop_probs=s.drop)


def loss(cfg):
    return None
