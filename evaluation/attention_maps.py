"""The attention maps of a few images, drawn as ``eval.py --image`` draws them (the network's own
``overlays``: the VAA maps per tap, RGA's relations, AP-CNN's gates and ROIs), for eval.py and for the
attention images of a run's TensorBoard logs."""
import os

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
    """RGB arrays of the attention maps of the first ``count`` images of the split ``data`` as the network
    draws them for TensorBoard (``board_image``; any file it needs goes into ``folder``)."""
    images = [data.image(i) for i in range(min(count, len(data)))]
    crop = loaders.transform(cfg).eval_view
    out = []
    for i, (image, (x, probs, maps)) in enumerate(zip(images, attention_of(net, cfg, images, ctx))):
        if not maps:                            # a network without attention (--taps none)
            return []
        sub = os.path.join(folder, str(i))
        os.makedirs(sub, exist_ok=True)
        out.append(net.board_image(crop(image), x, maps, names, probs, sub))
    return out
