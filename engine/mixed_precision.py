"""Float16 training (``--amp``): turning it on, and one dynamic loss scale for every per-module Trainer.

``mxnet.contrib.amp`` converts the network's operators to float16 where safe (:func:`init_amp`, called
before the network is built). Its ``init_trainer``/``scale_loss`` helpers attach a loss scaler to one
Trainer; with one Trainer per module the scalers would drift apart and skip different steps. Here one
:class:`LossScaling` keeps the books for all of them: ``trainers.StageTrainers`` scales the losses
with it, asks it after the gradient all-reduce whether the step may go ahead, and then updates every
Trainer or none. On overflow the scale halves at once; after 2,000 clean steps it doubles again (the
schedule of MXNet's dynamic loss scaler, up to 2^24).
"""
from mxnet import autograd, nd

from common.errors import UserError


def init_amp(ctx):
    """Turn on float16 operators; GPU only."""
    if any(c.device_type != 'gpu' for c in ctx):
        raise UserError('--amp trains in float16, which needs a GPU: add --gpus 0 (or drop --amp on the CPU)')
    from mxnet.contrib import amp
    amp.init()


class LossScaling(object):
    """Dynamic loss scale (1, and no checks, when disabled)."""

    def __init__(self, enabled, initial=2.0 ** 16, window=2000, maximum=2.0 ** 24):
        self.enabled = bool(enabled)
        self.scale = float(initial) if self.enabled else 1.0
        self.window, self.maximum = window, maximum
        self.clean_steps, self.skipped = 0, 0

    def scale_losses(self, losses):
        if not self.enabled:
            return losses
        return [loss * self.scale for loss in losses]

    @staticmethod
    def has_overflow(params):
        """True when any gradient (first device; they are all-reduced) holds inf or NaN."""
        grads = [p.list_grad()[0] for p in params if p.grad_req != 'null']
        with autograd.pause():
            finite = nd.ones((1,), ctx=grads[0].context)
            for start in range(0, len(grads), 200):
                chunk = grads[start:start + 200]
                nd.multi_all_finite(*chunk, num_arrays=len(chunk), init_output=False, out=finite)
        return not bool(finite.asscalar())

    def step_allowed(self, params):
        """After the all-reduce: may this step update the weights? On overflow counts a skipped step and
        halves the scale; after ``window`` clean steps in a row doubles it. Always True when disabled."""
        if not self.enabled:
            return True
        if self.has_overflow(params):
            self.skipped += 1
            self.clean_steps = 0
            self.scale = max(self.scale / 2.0, 1.0)
            return False
        self.clean_steps += 1
        if self.clean_steps == self.window:
            self.clean_steps = 0
            self.scale = min(self.scale * 2.0, self.maximum)
        return True
