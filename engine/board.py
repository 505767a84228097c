"""TensorBoard logs of a run, in ``<run>/tb`` (tensorboardX: it writes TensorBoard's event files without
TensorFlow; MXNet's own mxboard has been unmaintained since 2018 and fails under protobuf 4):

* every ``--log-interval`` batches: ``batch/loss`` (the running mean of Eq. 7 over the epoch so far) and
  each term of the objective (``batch/focal``, ``batch/tap<i>``, the related systems' ``batch/mc_dis``...);
* every epoch: ``train/*`` (the mean of each loss term, Eq. 7 and its parts, and mAP), ``val/*`` (loss, mAP,
  mA, F1), ``lr/<module>`` (each Trainer's learning rate), ``speed/samples_per_sec``; the attention maps of
  the first few validation images (``attention/<n>``, the figures ``eval.py --image`` draws);
* at the end: ``test/*`` and the run's settings as hyperparameters with the final metrics (``tb/hparams``).

The step is the number of training batches done (an epoch is ``batches per epoch`` steps), so a resumed run
continues the curves where they were; TensorBoard drops any event a killed run wrote after its last
checkpoint (``purge_step``). Only the lead worker writes; ``--no-tensorboard`` writes nothing.
"""
import logging
import os
import tempfile

LOG = logging.getLogger('vaa')
IMAGES = 4                  # validation images whose attention maps are drawn every epoch


class Board(object):
    """The run's TensorBoard writer, or a no-op (``enabled=False``, or not the lead worker)."""

    def __init__(self, folder, enabled, batches_per_epoch, epoch=0, batch=0):
        self.path = os.path.join(folder.path, 'tb')
        self.per_epoch = max(1, batches_per_epoch)
        self.writer = None
        if enabled and folder.lead:
            from tensorboardX import SummaryWriter
            start = self.step(epoch, batch)          # the checkpoint's events stay, later ones go
            self.writer = SummaryWriter(logdir=self.path, purge_step=start + 1 if start else None,
                                        flush_secs=30)

    def step(self, epoch, batch):
        """The global step after ``batch`` batches of ``epoch``."""
        return epoch * self.per_epoch + batch

    def batch(self, epoch, batch, loss, terms):
        """The running mean loss and terms of the epoch so far, after ``batch`` batches."""
        if self.writer is None:
            return
        step = self.step(epoch, batch)
        self.writer.add_scalar('batch/loss', loss, step)
        for key, value in terms.items():
            self.writer.add_scalar('batch/%s' % key, value, step)

    def epoch(self, row, learning_rates):
        """The epoch's metrics row (engine.loop) and each Trainer's learning rate, at its last step."""
        if self.writer is None:
            return
        step = self.step(row['epoch'] + 1, 0)
        for key, value in row.items():
            if isinstance(value, (int, float)) and key not in ('epoch', 'lr', 'seconds'):
                group, _, name = key.partition('_')
                tag = {'samples': 'speed/samples_per_sec'}.get(group, '%s/%s' % (group, name))
                self.writer.add_scalar(tag, value, step)
        for module, lr in learning_rates.items():
            self.writer.add_scalar('lr/%s' % module, lr, step)
        self.writer.add_scalar('time/epoch_seconds', row['seconds'], step)

    def attention(self, net, cfg, data, names, ctx, epoch):
        """The attention maps of the first :data:`IMAGES` validation images (net.board_image)."""
        if self.writer is None:
            return
        from evaluation.attention_maps import overlay_images
        step = self.step(epoch + 1, 0)
        with tempfile.TemporaryDirectory() as tmp:
            for i, image in enumerate(overlay_images(net, cfg, data, names, ctx, IMAGES, tmp)):
                self.writer.add_image('attention/%d' % i, image, step, dataformats='HWC')

    def finish(self, cfg, result, epochs):
        """The test result and the settings as hyperparameters with the final metrics."""
        if self.writer is None:
            return
        step = self.step(epochs, 0)
        final = {'test/%s' % k: result[k] for k in ('mAP', 'mA', 'accuracy', 'precision', 'recall', 'f1')
                 if isinstance(result.get(k), float)}
        for tag, value in final.items():
            self.writer.add_scalar(tag, value, step)
        settings = {k: v for k, v in sorted(cfg.items()) if isinstance(v, (bool, int, float, str))}
        self.writer.add_hparams(settings, {'hparam/' + k[5:]: v for k, v in final.items()}, name='hparams',
                                global_step=step)
        self.close()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
