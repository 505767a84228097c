"""ML-GCN (Chen et al., "Multi-Label Image Recognition with Graph Convolutional Networks", CVPR 2019): the
paper's primary classifier replaced by one a GCN over the label graph produces (``head.py``, from the
released ``megvii-research/ML-GCN``)."""
import collections

NAME = 'gcn'
HEAD = ('gcn', 'ML-GCN: a label graph\'s GCN gives the classifiers')
FIXED = ('gcn_embeddings', 'gcn_t', 'gcn_p', 'gcn_reweight', 'gcn_pool')
Settings = collections.namedtuple('Settings', 'embeddings t p reweight pool')


def _finite(test):
    return lambda v: v == v and abs(v) != float('inf') and test(v)


RANGES = (('gcn_t', _finite(lambda v: 0 < v <= 1), 'in (0, 1]'),
          ('gcn_p', _finite(lambda v: 0 <= v <= 1), 'in [0, 1]'))


def add_flags(a):
    a('--gcn-embeddings', default='onehot',
      help="ML-GCN label embeddings: a C x d .npy file (GloVe of the attribute names, as the paper), or the "
           "offline fallbacks onehot, cooc (co-occurrence eigenvectors), random")
    a('--gcn-t', type=float, default=0.4, help='ML-GCN: threshold tau on P(label j | label i)')
    a('--gcn-p', type=float, default=0.25, help='ML-GCN: re-weighting p (the paper states 0.2)')
    a('--gcn-reweight', choices=['code', 'paper'], default='code',
      help='ML-GCN correlation matrix as the released code computes it, or as Eq. 8 of the paper')
    a('--gcn-pool', choices=['max', 'avg'], default='max', help='ML-GCN image feature pooling')


def active(cfg):
    return cfg['head'] == 'gcn'


def settings(cfg):
    return Settings(cfg['gcn_embeddings'], float(cfg['gcn_t']), float(cfg['gcn_p']), cfg['gcn_reweight'],
                    cfg['gcn_pool'])


def check(cfg):
    settings(cfg)


def describe(cfg):
    return 'ML-GCN head'


def plug(cfg, parts, labels=None, mask=None, names=None):
    """The GCN head as the primary classifier on the globally pooled feature; without the training labels
    (rebuilding for evaluation) its graph and embeddings are placeholders that a checkpoint fills."""
    from related.mlgcn import head

    def build(width):
        gcn, dim = head.build_gcn(settings(cfg), cfg['num_classes'], width, labels, mask,
                                  cfg.get('gcn_embedding_dim'))
        cfg['gcn_embedding_dim'] = dim           # (saved, so that evaluation rebuilds the head)
        return gcn
    from model import Head
    parts.primary, parts.pool = Head(NAME, build), settings(cfg).pool
    parts.notes.append('ML-GCN head')


def loss(cfg):
    return None
