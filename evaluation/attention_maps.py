"""The attention maps of a few images, drawn as ``eval.py --image`` draws them (the network's own
``overlays``: the VAA maps per tap, RGA's relations, AP-CNN's gates and ROIs), for eval.py and for the
attention images of a run's TensorBoard logs."""
import os

import numpy as np
from mxnet import nd

from datasets import loaders


def attention_of(net, cfg, images, ctx):
    """``[(x, probabilities, maps)]`` of RGB ``images`` through the evaluation transform of ``cfg``: the
    network's input, its attribute probabilities and its attention maps (NumPy, the batch axis dropped)."""
    transform = loaders.transform(cfg)
    net.return_attention = True
    try:
        seen = []
        for image in images:
            x = nd.array(transform(image, 0)[None], ctx=ctx[0])
            out = net(x)
            seen.append((x, nd.sigmoid(out.fused)[0].asnumpy(), [m[0].asnumpy() for m in out.maps]))
        return seen
    finally:
        net.return_attention = False


def overlay_images(net, cfg, data, names, ctx, count, folder):
    """RGB arrays of the overlays of the first ``count`` images of the split ``data`` (drawn into
    ``folder``)."""
    import cv2
    images = [data.image(i) for i in range(min(count, len(data)))]
    crop = loaders.transform(cfg).eval_view
    out = []
    for i, (image, (x, probs, maps)) in enumerate(zip(images, attention_of(net, cfg, images, ctx))):
        if not maps:                            # a network without attention (--taps none)
            return []
        first = net.overlays(crop(image), x, maps, names, probs, os.path.join(folder, '%d.png' % i))[0][0]
        out.append(np.ascontiguousarray(cv2.imread(first, cv2.IMREAD_COLOR)[:, :, ::-1]))
    return out
