"""The per-batch work of training and evaluation, shared by train.py, eval.py and benchmark.py.

* :func:`train_step`: one step of the method on a batch: forward on every device, the objective of
  Eq. 7 with each sample's history weights (from the previous epochs' predictions), backward, one
  update of every per-stage Trainer, and the batch's fused predictions stored in the history.
* :class:`EpochTotals`: what an epoch accumulates (loss sum, sample count, predictions, labels, masks),
  also what an interrupted epoch saves and a resumed one starts from.
* :func:`predict`: the fused logits over a whole loader, and the same objective (weights 1).
* :func:`evaluate`: :func:`predict` scored with every metric of ``metrics.py`` (and AP-CNN's two
  stages alone, :func:`stage_line`).
"""
import collections

import numpy as np
from mxnet import autograd, nd

from evaluation import metrics
from engine.distributed import split_batch
from backbone import torch_running_variance
from common.errors import Interrupted, UserError

Step = collections.namedtuple('Step', 'loss logits labels masks terms')


def train_step(net, loss_fn, trainers, history, batch, epoch, ctx):
    """Train on ``batch`` = (data, label, mask, index); returns a :class:`Step` with the loss of Eq. 7
    summed over the batch (an NDArray of shape (1,) on ``ctx[0]``), the per-device fused logits, labels
    and masks, and ``terms``: the batch sums of the objective's parts (Eq. 7's ``primary`` and ``tap<i>``
    terms, and a related system's, unweighted: MC-Loss ``mc_dis``, ``mc_div``).

    ``loss_fn``: a ``losses.VAALoss``, whose :meth:`~losses.VAALoss.objective` is minimised (with an
    auxiliary loss, on the network's auxiliary outputs: ``net.return_aux`` must be on); ``trainers``: a
    ``trainers.StageTrainers``; ``history``: the ``losses.PredictionHistory`` of the training split.
    """
    if loss_fn.aux is not None and not net.return_aux:
        raise ValueError('the loss has an auxiliary term: turn net.return_aux on for training')
    parts = split_batch(batch, ctx)
    weights = [history.weights(idx, epoch, ctx=x.context) for x, _, _, idx in parts]     # 1 + std_s
    losses, objectives, fused, terms = [], [], [], collections.defaultdict(list)
    with torch_running_variance(net, [x.shape[0] for x, _, _, _ in parts]):    # the related systems' vectors
        with autograd.record():
            for (x, y, m, _), w in zip(parts, weights):
                out = net(x)
                total, named = loss_fn.objective(out.primary, out.taps, y, m, w, out.aux)
                losses.append(named.pop('eq7'))                                         # Eq. 7
                for key, value in named.items():
                    terms[key].append(value)
                objectives.append(total)
                fused.append(out.fused)
            scaled = trainers.scale(objectives)
        autograd.backward(scaled)
        trainers.step(batch[0].shape[0])
    logits = [f.detach().astype('float32') for f in fused]
    for (_, _, _, idx), f in zip(parts, logits):
        history.update(idx, nd.sigmoid(f), epoch)               # read by the next epochs' weights
    total = _batch_sum(losses, ctx[0])
    return Step(total, logits, [y for _, y, _, _ in parts], [m for _, _, m, _ in parts],
                {k: _batch_sum(v, ctx[0]) for k, v in terms.items()})


def _batch_sum(arrays, ctx):
    return nd.add_n(*[a.detach().sum().as_in_context(ctx) for a in arrays])


class EpochTotals(object):
    """Running totals of a training epoch. The predictions stay on the device until :meth:`arrays`.

    ``saved``: what :meth:`state` returned for an interrupted epoch, to continue from it (checkpoints
    of version 0.1 kept probabilities, ``scores``, instead of logits: they are converted).
    """

    def __init__(self, ctx, num_classes, saved=None):
        saved = dict(saved or {})
        if 'scores' in saved:
            p = np.clip(np.asarray(saved.pop('scores'), np.float64), 1e-7, 1 - 1e-7)
            saved['logits'] = np.log(p / (1 - p)).astype(np.float32)
        self.num_classes = num_classes
        self.loss_sum = nd.array([saved.get('loss_sum', 0.0)], ctx=ctx)
        self.term_sums = {k: nd.array([v], ctx=ctx) for k, v in saved.get('terms', {}).items()}
        self.seen = saved.get('seen', 0)
        self.outputs = {k: [nd.array(saved[k])] if k in saved else [] for k in ('logits', 'labels', 'masks')}

    def add(self, step, batch_size):
        self.loss_sum += step.loss
        for key, value in step.terms.items():
            self.term_sums[key] = self.term_sums[key] + value if key in self.term_sums else value.copy()
        self.seen += batch_size
        for key, arrays in zip(('logits', 'labels', 'masks'), (step.logits, step.labels, step.masks)):
            self.outputs[key].extend(arrays)

    def mean_loss(self):
        """The mean loss so far (waits for the device)."""
        return float((self.loss_sum / max(self.seen, 1)).asscalar())

    def mean_terms(self):
        """``{term: mean per sample}`` of the objective's parts (``primary``, ``tap<i>``, MC-Loss's)."""
        return {k: float(v.asscalar()) / max(self.seen, 1) for k, v in sorted(self.term_sums.items())}

    def arrays(self):
        """``{'logits', 'labels', 'masks'}`` as NumPy arrays (N x C)."""
        empty = np.zeros((0, self.num_classes), np.float32)
        return {k: np.concatenate([a.asnumpy() for a in v]) if v else empty for k, v in self.outputs.items()}

    def state(self):
        """Everything needed to continue the epoch: loss sum, samples seen and the NumPy outputs."""
        return dict(self.arrays(), loss_sum=float(self.loss_sum.asscalar()), seen=self.seen,
                    terms={k: float(v.asscalar()) for k, v in self.term_sums.items()})


def predict(net, loader, ctx, loss_fn=None, stages=None, stop=None):
    """The fused logits for a whole split (float64 NumPy; rank by them, threshold their sigmoid), with
    labels and masks, and the mean of ``loss_fn`` (the training objective, with history weights 1) when
    given, else NaN. ``stages``: a dict that receives ``{name: logits}`` of each stage of a network that
    has them (``net.stage_logits``: AP-CNN's two passes). ``stop``: a ``runfolder.StopSignals``; when a
    signal has arrived, :class:`~common.errors.Interrupted` is raised after the batch in progress."""
    logits, labels, masks, total, count = [], [], [], 0.0, 0
    parts = collections.defaultdict(list)
    net.return_aux = False                      # the auxiliary head is for training only
    for batch in loader:
        for x, y, m, _ in split_batch(batch, ctx):
            out = net(x)
            logits.append(out.fused)
            if stages is not None:
                for name, value in net.stage_logits(out.primary, out.taps).items():
                    parts[name].append(value)
            labels.append(y)
            masks.append(m)
            if loss_fn is not None:
                total += float(loss_fn(out.primary, out.taps, y, m).sum().asscalar())
                count += x.shape[0]
        if stop is not None and stop.received:
            raise Interrupted('a stop signal during the evaluation of a split')
    to_np = lambda arrs: np.concatenate([a.asnumpy() for a in arrs]) if arrs else np.zeros((0, 0))
    if stages is not None:
        stages.update({name: to_np(v).astype(np.float64) for name, v in parts.items()})
    mean_loss = total / count if count else float('nan')
    return to_np(logits).astype(np.float64), to_np(labels), to_np(masks), mean_loss


def evaluate(net, loader, ctx, names, convention='ours', stop=None):
    """Every metric of ``metrics.evaluate`` on a split (mA and the instance metrics in ``convention``),
    plus the chance-level mAP of its labels. ``stop``: as :func:`predict`'s."""
    stages = {}
    logits, labels, masks, _ = predict(net, loader, ctx, stages=stages, stop=stop)
    if not np.isfinite(logits).all():
        raise UserError('the network gives inf/NaN outputs for %d of %d samples: its weights are broken (a '
                        'diverged run?); evaluate another checkpoint'
                        % ((~np.isfinite(logits)).any(1).sum(), len(logits)))
    result = metrics.evaluate(logits, labels, masks, names, convention)
    result['chance_mAP'] = metrics.chance_map(labels, masks)
    if stages:                                  # AP-CNN: each pass alone, beside the fused prediction
        result['stage_mAP'] = {k: metrics.evaluate(v, labels, masks, names)['mAP'] for k, v in stages.items()}
    return result


def stage_line(result):
    """One line with each stage's own mAP (AP-CNN), or None."""
    if not result.get('stage_mAP'):
        return None
    return 'each stage alone: %s (the prediction averages them: mAP %.2f)' % (
        ', '.join('%s mAP %.2f' % (k, 100 * v) for k, v in sorted(result['stage_mAP'].items())),
            100 * result['mAP'])
