"""The CPU graph that scores images (what predict.py and the benchmark's fp32 row run)."""
import os
import warnings

import mxnet as mx

from deploy.export import FusedLogits


def fused_logits_block(net, input_size, ctx):
    """``net``'s fused logits as one block for scoring images on ``ctx`` (what predict.py and the
    benchmark's fp32 row run). On the CPU, MXNet's oneDNN graph backend partitions it
    (``optimize_for(backend='MKLDNN')``): each convolution runs fused with its BatchNorm (folded into the
    weights), its ReLU and a residual sum, where the training graph runs them one after the other. At
    batch 1 that is most of the per-image time of a ResNet's small operators (ResNet-101, paper preset, 2
    cores: 71 -> 58 ms). The logits equal the plain graph's to float32 rounding (the folded BatchNorm
    rounds differently), not bitwise; evaluation of a split (eval.py, train.py) keeps the training graph,
    so its numbers are the run's. On a GPU (or with ``MXNET_MKLDNN_ENABLED=0``): the hybridized graph."""
    block = FusedLogits(net)
    if ctx.device_type == 'cpu' and os.environ.get('MXNET_MKLDNN_ENABLED', '1') != '0':
        example = mx.nd.zeros((1, 3, input_size, input_size), ctx=ctx)
        with warnings.catch_warnings():         # parameters of training-only parts (MC-Loss) are unused
            warnings.filterwarnings('ignore', message='Parameter .* is not used by any computation')
            block.optimize_for(example, backend='MKLDNN', static_alloc=True, static_shape=True)
    else:
        block.hybridize(static_alloc=True, static_shape=True)
    return block
