"""AP-CNN's ROI pyramid and ROI-guided refinement, inside the hybridized graph (``apcnn.py`` uses them).

Written from ``get_att_roi``, ``generate_anchors_single_pyramid`` and ``get_roi_crop_feat`` of the
authors' ``model/resnet50.py``. The reference runs these in Python per sample; here they are operators on
the whole batch, so the network hybridizes and a trained one exports. What is kept and what differs:

* Anchors: one square anchor per cell, centred at (x * stride, y * stride) (cell indices, no +0.5).
* Scores: the spatial gate with the border (rows and columns outside [int(0.1 h), int(0.9 h))) zeroed;
  cells scoring above the map's mean (zeros included) compete in NMS.
* NMS: ``box_nms`` fed x2 + 1 and y2 + 1, which reproduces the reference's "+1" areas and intersections
  exactly; the reference suppresses at IoU >= 0.05 and ``box_nms`` above its threshold, so the threshold
  is the float32 number just below 0.05. The first k boxes survive (fewer when fewer pass), clamped to
  [0, S - 1].
* Union box: the min/max over the valid ROIs of every level, divided by the stride of B3 (8) and
  truncated; the crop excludes its end. A level with no ROI adds nothing; when no level has one (a map
  with no cell above its mean: the reference crashes) the whole map is used. A crop at least one cell
  wide is kept (the reference would resize an empty crop).
* Training: u ~ U(0, 1); u < 0.3 zeroes one random valid level-3 ROI (coordinates / 8, truncated) on
  every channel, 0.3 <= u < 0.6 one level-4 ROI, else nothing; then the crop is multiplied by the
  float area of the union box over the number of kept cells (the reference's energy compensation, which
  also applies when nothing is dropped). A drop that would empty the crop, or a level without ROIs, drops
  nothing (the reference divides by zero / crashes). Test: crop and resize only.
* Resize: bilinear with ``align_corners=False`` (PyTorch's ``F.interpolate``), by ``BilinearSampler`` at
  explicit source positions: x1 + clamp((j + 0.5) * w_crop / W - 0.5, 0, w_crop - 1). Differentiable
  with respect to the feature map (stage II trains stages 1-2), not to the boxes.
* Train or test: a Dropout of ones (mode-aware) tells them apart inside the cached graph.
"""
import numpy as np
from mxnet import gluon


def _ranks(F, size):
    return F.arange(0, size)


class ROIPyramid(gluon.HybridBlock):
    """(S3, S4, S5) spatial gates (N, 1, h_l, h_l) -> (rois (N, R, 4) in input pixels, valid (N, R)), R =
    sum of ``topk`` (each capped by its map's cells); level 3's rows first. Invalid rows are zeros."""

    def __init__(self, input_size, sizes, topk=(5, 3, 1), anchors=(64, 128, 256), iou=0.05, border=0.1,
                 **kwargs):
        super().__init__(**kwargs)
        self.input_size, self.sizes = int(input_size), [int(s) for s in sizes]
        self.topk = [min(int(k), s * s) for k, s in zip(topk, self.sizes)]
        self.anchors = [float(a) for a in anchors]
        self.iou = float(np.nextafter(np.float32(iou), np.float32(-1)))    # suppress at IoU >= iou
        self.border = float(border)

    def _level(self, F, gate, size, anchor, k):
        stride = self.input_size / float(size)
        idx = _ranks(F, size)
        lo, hi = int(self.border * size), int((1 - self.border) * size)
        inside = (idx >= lo) * (idx < hi)
        inner = F.reshape(F.broadcast_mul(F.reshape(inside, (size, 1)), F.reshape(inside, (1, size))),
                          (1, -1))
        cx = F.reshape(F.broadcast_add(F.zeros((size, 1)), F.reshape(idx * stride, (1, size))), (-1,))
        cy = F.reshape(F.broadcast_add(F.reshape(idx * stride, (size, 1)), F.zeros((1, size))), (-1,))
        half = anchor / 2.0
        # "+1" on the far corner: box_nms's areas and intersections become the reference's
        boxes = F.stack(cx - half, cy - half, cx + half + 1, cy + half + 1, axis=1)            # hw, 4
        gate = F.cast(gate, 'float32')                  # box arithmetic in float32, also under --amp
        score = F.broadcast_mul(F.reshape(gate, (0, -1)), inner)                               # N, hw
        above = F.broadcast_greater(score, F.mean(score, axis=1, keepdims=True))
        score = F.where(above, score, F.ones_like(score) * -1)
        data = F.concat(F.expand_dims(score, 2),
                        F.broadcast_add(F.zeros_like(F.expand_dims(score, 2)), F.expand_dims(boxes, 0)),
                        dim=2)
        kept = self.nms(F, data, k)                                                            # N, k, 5
        valid = F.reshape(F.slice_axis(kept, axis=2, begin=0, end=1), (0, -1)) >= 0
        x1, y1, x2, y2 = [F.reshape(F.slice_axis(kept, axis=2, begin=i, end=i + 1), (0, -1))
                          for i in range(1, 5)]
        last = self.input_size - 1
        rois = F.stack(F.maximum(x1, 0), F.maximum(y1, 0), F.minimum(x2 - 1, last), F.minimum(y2 - 1, last),
                       axis=2)
        return F.broadcast_mul(rois, F.expand_dims(valid, 2)), valid

    def nms(self, F, data, k):
        """The first ``k`` rows of (N, M, 5) [score, x1, y1, x2 + 1, y2 + 1] after NMS at IoU >= ``iou``
        (suppressed and invalid rows: -1), in descending score."""
        return F.slice_axis(F.contrib.box_nms(data, overlap_thresh=self.iou, valid_thresh=0, topk=-1,
                                              coord_start=1,
                                              score_index=0, id_index=-1, force_suppress=True), axis=1,
                            begin=0, end=k)

    def hybrid_forward(self, F, s3, s4, s5):
        levels = [self._level(F, g, s, a, k) for g, s, a, k in zip((
            s3, s4, s5), self.sizes, self.anchors, self.topk)]
        return F.concat(*[r for r, _ in levels], dim=1), F.concat(*[v for _, v in levels], dim=1)


class ROIZoom(gluon.HybridBlock):
    """(B3 (N, c, H, W), rois, valid[, u, r]) -> (the zoomed B3 (N, c, H, W), the crop box (N, 4) in B3
    cells: x1, y1, x2, y2, end excluded).

    ``u`` and ``r`` (N,) in [0, 1) replace the training draws (which level to drop from, and which of its
    valid ROIs: index floor(r * n)); tests inject them.
    """

    def __init__(self, input_size, map_size, topk=(5, 3, 1), drop_probs=(0.3, 0.3), **kwargs):
        super().__init__(**kwargs)
        self.height, self.width = int(map_size[0]), int(map_size[1])
        self.stride = input_size / float(self.width)
        self.topk = [int(k) for k in topk]
        self.drop_probs = [float(p) for p in drop_probs]

    def _pick(self, F, rois, valid, begin, k, r):
        """One valid ROI of rows [begin, begin + k) per sample, index floor(r * n); and whether n > 0."""
        v = F.slice_axis(valid, axis=1, begin=begin, end=begin + k)
        n = F.sum(v, axis=1)
        index = F.minimum(F.floor(r * n), F.maximum(n - 1, 0))
        onehot = F.broadcast_equal(F.reshape(_ranks(F, k), (1, k)), F.reshape(index, (-1, 1))) * v
        box = F.sum(F.broadcast_mul(F.slice_axis(rois, axis=1, begin=begin, end=begin + k),
                                    F.expand_dims(onehot, 2)),
                    axis=1)
        return box, n > 0

    def _axis(self, F, start, stop, size):
        """Source positions (N, size) of an align_corners=False resize of [start, stop) to ``size``,
        normalised for BilinearSampler."""
        length = stop - start
        dst = F.reshape(_ranks(F, size) + 0.5, (1, size))
        src = F.broadcast_sub(F.broadcast_mul(dst, F.reshape(length / size, (-1, 1))), F.ones((1, 1)) * 0.5)
        src = F.broadcast_minimum(F.broadcast_maximum(src, F.zeros((1, 1))), F.reshape(length - 1, (-1, 1)))
        return F.broadcast_add(src, F.reshape(start, (-1, 1))) * (2.0 / (size - 1)) - 1

    def hybrid_forward(self, F, x2, rois, valid, u=None, r=None):
        big = 1e6
        coords = [F.reshape(F.slice_axis(rois, axis=2, begin=i, end=i + 1), (0, -1)) for i in range(4)]
        lo = [F.min(F.where(valid > 0, c, F.ones_like(c) * big), axis=1) for c in coords[:2]]
        hi = [F.max(F.where(valid > 0, c, F.ones_like(c) * -big), axis=1) for c in coords[2:]]
        any_valid = F.max(valid, axis=1) > 0
        full = (self.width * self.stride, self.height * self.stride)
        fx1, fy1 = [F.where(any_valid, v, F.zeros_like(v)) / self.stride for v in lo]
        fx2, fy2 = [F.where(any_valid, v, F.ones_like(v) * f) / self.stride for v, f in zip(hi, full)]
        ix1, iy1 = F.floor(fx1), F.floor(fy1)
        ix2, iy2 = F.maximum(F.floor(fx2), ix1 + 1), F.maximum(F.floor(fy2), iy1 + 1)
        # training: drop one ROI of level 3 or 4 (Dropout of ones is 0 or 2 in training, 1 at test)
        ones = F.ones_like(any_valid)
        training = F.Dropout(ones, p=0.5) != 1
        u = F.random.uniform_like(ones) if u is None else u
        r = F.random.uniform_like(ones) if r is None else r
        p3, p4 = self.drop_probs
        box3, has3 = self._pick(F, rois, valid, 0, self.topk[0], r)
        box4, has4 = self._pick(F, rois, valid, self.topk[0], self.topk[1], r)
        at3, at4 = u < p3, (u >= p3) * (u < p3 + p4)
        dropping = training * (at3 * has3 + at4 * has4)
        box = F.broadcast_mul(box3, F.expand_dims(at3, 1)) + F.broadcast_mul(box4, F.expand_dims(at4, 1))
        dx1, dy1, dx2, dy2 = [F.floor(F.reshape(F.slice_axis(box, axis=1, begin=i, end=i + 1),
                                                (-1,)) / self.stride)
                              for i in range(4)]
        area = (iy2 - iy1) * (ix2 - ix1)
        overlap = (F.relu(F.minimum(dx2, ix2) - F.maximum(dx1, ix1)) *
                   F.relu(F.minimum(dy2, iy2) - F.maximum(dy1, iy1)))
        dropping = dropping * (area - overlap > 0)                  # never drop the whole crop
        kept = area - dropping * overlap
        rows = F.broadcast_mul(self._inside(F, dy1, dy2, self.height), F.expand_dims(dropping, 1))
        cells = F.broadcast_mul(F.expand_dims(rows, 2),
                                F.expand_dims(self._inside(F, dx1, dx2, self.width), 1))
        scale = F.where(training, (fy2 - fy1) * (fx2 - fx1) / kept, ones)             # energy compensation
        mask = F.broadcast_mul(1 - F.expand_dims(cells, 1), F.reshape(scale, (-1, 1, 1, 1)))
        gx = self._axis(F, ix1, ix2, self.width)
        gy = self._axis(F, iy1, iy2, self.height)
        grid = F.concat(F.broadcast_add(F.reshape(gx, (0, 1, 1, -1)), F.zeros((1, 1, self.height, 1))),
                        F.broadcast_add(F.reshape(gy, (0, 1, -1, 1)), F.zeros((1, 1, 1, self.width))), dim=1)
        zoomed = F.BilinearSampler(F.broadcast_mul(x2, mask), F.BlockGrad(grid))
        return zoomed, F.stack(ix1, iy1, ix2, iy2, axis=1)

    @staticmethod
    def _inside(F, start, stop, size):
        """(N, size): 1 where start <= index < stop."""
        idx = F.reshape(_ranks(F, size), (1, size))
        return (F.broadcast_greater_equal(idx, F.reshape(start, (-1, 1))) *
                F.broadcast_lesser(idx, F.reshape(stop, (-1, 1))))
