"""ML-GCN (Chen et al., CVPR 2019): a label graph whose GCN produces the classifier, as a primary head.

From the training labels, the conditional probabilities P_ij = P(label j | label i) are binarised at
t and re-weighted into the correlation matrix A' (:func:`correlation_matrix`), normalised into Â
(:func:`normalize_adjacency`). A two-layer GCN maps label embeddings E (C x d) to one classifier
vector per label, W = Â LeakyReLU_0.2(Â E W0) W1 (C x D), and the logits are the image feature
(globally max-pooled, D) times W^T: :class:`GCNClassifier`. Â and E are constants of the network,
stored in its checkpoints but never trained.

Defaults follow the released code (``megvii-research/ML-GCN``: ``util.gen_A``, ``gen_adj``,
``models.GCNResnet``): t = 0.4, p = 0.25, A' = A p / colsum(A) + I, Â = D A'^T D with D =
rowsum(A')^-1/2. The paper's Eq. 8 (p = 0.2 in its text, diagonal 1 - p, D^-1/2 A' D^-1/2) is
``reweight='paper'`` with ``normalize_adjacency(form='paper')``.

Adapted to attributes: only labels specified for both attributes of a sample count
(:func:`cooccurrence`). The faithful label embeddings are GloVe vectors of the attribute names, which
cannot be downloaded here: ``label_embeddings`` reads them from a C x d ``.npy`` file, or falls back
(and says so) to one-hot rows (the default), to a co-occurrence embedding, or to fixed random rows.
"""
import logging
import os
import re

import numpy as np
import mxnet as mx
from mxnet import gluon

from common.errors import UserError

LOG = logging.getLogger('vaa')
EMBEDDINGS = ('onehot', 'cooc', 'random')


def cooccurrence(labels, mask=None):
    """(M, N): M_ij = #samples with labels i and j positive, N_ij = #samples with label i positive;
    both count only samples where attributes i and j are both specified (diagonal of M: 0)."""
    y = np.asarray(labels, np.float64)
    m = np.ones_like(y) if mask is None else np.asarray(mask, np.float64)
    pos = y * m
    counts = pos.T @ m                                                  # N_ij = sum_n y_ni m_ni m_nj
    joint = pos.T @ pos                                                 # M_ij = sum_n y_ni y_nj m_ni m_nj
    np.fill_diagonal(joint, 0)
    return joint, counts


def correlation_matrix(joint, counts, t=0.4, p=0.25, reweight='code'):
    """A' from the counts of :func:`cooccurrence`: P = M / N (0 where N = 0), A = [P >= t], then
    ``code``: A p / (column sums + 1e-6) + I;  ``paper``: p A_ij / sum_{k != j} A_kj off the diagonal,
    1 - p on it (Eq. 8 as corrected by the authors; both normalise columns)."""
    joint, counts = np.asarray(joint, np.float64), np.asarray(counts, np.float64)
    prob = np.divide(joint, counts, out=np.zeros_like(joint), where=counts > 0)
    adjacency = (prob >= t).astype(np.float64)
    np.fill_diagonal(adjacency, 0)
    columns = adjacency.sum(0, keepdims=True)
    if reweight == 'code':
        return adjacency * p / (columns + 1e-6) + np.eye(len(adjacency))
    if reweight == 'paper':
        out = np.divide(adjacency * p, columns, out=np.zeros_like(adjacency), where=columns > 0)
        return out + (1 - p) * np.eye(len(adjacency))
    raise UserError("--gcn-reweight takes code or paper, got %r" % reweight)


def normalize_adjacency(a, form='code'):
    """``code``: D A^T D with D = diag(row sums of A)^-1/2 (the released ``gen_adj``);
    ``paper``: D^-1/2 A D^-1/2 with the same D."""
    a = np.asarray(a, np.float64)
    d = np.diag(np.power(a.sum(1), -0.5))
    return d @ a.T @ d if form == 'code' else d @ a @ d


def attribute_phrases(names):
    """Words for a GloVe lookup: ``longHair`` -> ``long hair``, ``Tshiirt`` -> ``t-shirt``,
    ``upperBodyBlack`` -> ``upper body black``, ``has_zero`` -> ``has zero``."""
    fixes = {'tshiirt': 't-shirt', 'tshirt': 't-shirt'}
    out = []
    for name in names:
        words = re.sub(r'([a-z])([A-Z])', r'\1 \2', name.replace('_', ' ')).lower().split()
        out.append(' '.join(fixes.get(w, w) for w in words))
    return out


def label_embeddings(kind, num_classes, labels=None, mask=None, dim=300, seed=0):
    """E (C x d, float32): ``onehot`` (I), ``cooc`` (PPMI eigenvectors of the masked co-occurrences),
    ``random`` (fixed N(0, 1) rows), or a path to a C x d ``.npy`` (e.g. GloVe of the names)."""
    if kind == 'onehot':
        return np.eye(num_classes, dtype=np.float32)
    if kind == 'random':
        return np.random.RandomState(seed).randn(num_classes, dim).astype(np.float32)
    if kind == 'cooc':
        if labels is None:
            raise UserError('--gcn-embeddings cooc needs the training labels')
        joint, counts = cooccurrence(labels, mask)
        total = np.maximum(np.diag(counts), 1)
        prob = joint / max(float(np.asarray(labels).shape[0]), 1.0)
        marg = total / max(float(np.asarray(labels).shape[0]), 1.0)
        with np.errstate(divide='ignore', invalid='ignore'):
            pmi = np.log(prob / np.outer(marg, marg))
        ppmi = np.nan_to_num(np.maximum(pmi, 0), nan=0.0, posinf=0.0, neginf=0.0)
        ppmi = (ppmi + ppmi.T) / 2 + np.eye(num_classes)
        values, vectors = np.linalg.eigh(ppmi)
        order = np.argsort(-values)[:min(num_classes, dim)]
        return (vectors[:, order] * np.sqrt(np.maximum(values[order], 0))).astype(np.float32)
    if not os.path.isfile(kind):
        raise UserError('--gcn-embeddings %s: use onehot, cooc, random or a C x d .npy file' % kind)
    try:
        array = np.load(kind, allow_pickle=False)
    except ValueError as err:
        raise UserError('--gcn-embeddings %s is not a plain numeric .npy array (%s)' % (kind, err))
    if array.ndim != 2 or array.shape[0] != num_classes or not np.issubdtype(array.dtype, np.number):
        raise UserError('--gcn-embeddings %s has shape %s; it needs one row per attribute (%d x d)'
                        % (kind, array.shape, num_classes))
    return array.astype(np.float32)


class GraphConvolution(gluon.HybridBlock):
    """H' = Â H W (no bias), W initialised U(+-1/sqrt(out)) as the released code."""

    def __init__(self, in_units, out_units, **kwargs):
        super(GraphConvolution, self).__init__(**kwargs)
        bound = 1.0 / np.sqrt(out_units)
        with self.name_scope():
            self.weight = self.params.get('weight', shape=(in_units, out_units), init=mx.init.Uniform(bound))

    def hybrid_forward(self, F, adjacency, h, weight):  # pylint: disable=arguments-differ
        return F.dot(adjacency, F.dot(h, weight))


class GCNClassifier(gluon.HybridBlock):
    """Image features (N x D) -> logits (N x C) through the label graph.

    ``adjacency`` (Â, C x C) and ``embeddings`` (E, C x d) are constants: arrays, or shapes when the
    values come from a checkpoint.
    """

    def __init__(self, adjacency, embeddings, feat_dim, hidden=1024, slope=0.2, **kwargs):
        super(GCNClassifier, self).__init__(**kwargs)
        adjacency = np.zeros(adjacency) if isinstance(adjacency, tuple) else np.asarray(adjacency)
        embeddings = np.zeros(embeddings) if isinstance(embeddings, tuple) else np.asarray(embeddings)
        self.num_classes, self.slope = adjacency.shape[0], slope
        with self.name_scope():
            self.adjacency = self.params.get_constant('adjacency', adjacency.astype(np.float32))
            self.embeddings = self.params.get_constant('embeddings', embeddings.astype(np.float32))
            self.gc1 = GraphConvolution(embeddings.shape[1], hidden, prefix='gc1_')
            self.gc2 = GraphConvolution(hidden, feat_dim, prefix='gc2_')

    def classifiers(self, F, adjacency, embeddings):
        """W (C x D): one classifier vector per label."""
        hidden = F.LeakyReLU(self.gc1(adjacency, embeddings), act_type='leaky', slope=self.slope)
        return self.gc2(adjacency, hidden)

    def hybrid_forward(self, F, features, adjacency, embeddings):  # pylint: disable=arguments-differ
        return F.dot(features, self.classifiers(F, adjacency, embeddings), transpose_b=True)


def build_gcn(settings, num_classes, feat_dim, labels=None, mask=None, dim=None, prefix='gcn_'):
    """(the GCN head of ``settings`` (``related.mlgcn.settings``), its embedding width). With the training
    labels the graph and embeddings are computed (and logged); without (rebuilding for evaluation) they are
    placeholders of the saved width ``dim`` that a checkpoint fills."""
    if labels is None:
        dim = dim or num_classes
        return GCNClassifier((num_classes, num_classes), (num_classes, dim), feat_dim, prefix=prefix), dim
    joint, counts = cooccurrence(labels, mask)
    a = correlation_matrix(joint, counts, settings.t, settings.p, settings.reweight)
    adjacency = normalize_adjacency(a, 'paper' if settings.reweight == 'paper' else 'code')
    embeddings = label_embeddings(settings.embeddings, num_classes, labels, mask)
    edges = int((a - np.diag(np.diag(a)) > 0).sum())
    LOG.info('ML-GCN head: %d label-graph edges (t %g, p %g, %s re-weighting, %.1f per attribute); label '
             'embeddings: %s%s', edges, settings.t, settings.p, settings.reweight, edges / float(num_classes),
             settings.embeddings,
             '' if settings.embeddings not in EMBEDDINGS else
             " (an offline fallback, not the paper's GloVe vectors)")
    return GCNClassifier(adjacency, embeddings, feat_dim, prefix=prefix), int(embeddings.shape[1])
