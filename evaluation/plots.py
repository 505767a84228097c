"""Figures of a run folder: loss and mAP curves, per-attribute AP bars, attention overlays."""
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def curves(rows, path, title=None, freeze_epochs=0, monitor='mAP', lr=None):
    """Train/val loss and train/val mAP (and val mA) per epoch from the metrics rows: whole-epoch ticks, the
    first phase (``freeze_epochs``, backbone frozen) shaded, each learning-rate drop marked where it took
    effect (``lr``: the starting rate), and the best epoch by ``monitor`` (the one tested) starred."""
    if rows:
        _save(curves_figure(rows, title, freeze_epochs, monitor, lr), path)


def _save(fig, path):
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curves_figure(rows, title=None, freeze_epochs=0, monitor='mAP', lr=None):
    """The figure of :func:`curves`."""
    from matplotlib.ticker import MaxNLocator
    epochs = [r['epoch'] for r in rows]
    key = {'mAP': 'val_mAP', 'mA': 'val_mA', 'f1': 'val_f1'}.get(monitor, 'val_mAP')
    values = [r.get(key, float('nan')) for r in rows]
    best = epochs[int(np.nanargmax(values))] if np.isfinite(values).any() else None
    rates = [lr if lr is not None else rows[0].get('lr')] + [r.get('lr') for r in rows]
    drops = [e + 0.5 for e, before, after in zip(epochs, rates, rates[1:])
             if None not in (before, after) and after < before * 0.999]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [r['train_loss'] for r in rows], 'o-', label='train')
    ax1.plot(epochs, [r['val_loss'] for r in rows], 's-', label='val')
    ax1.set_ylabel('loss (sum over branches)')
    ax2.plot(epochs, [100 * r['train_mAP'] for r in rows], 'o-', label='train mAP')
    ax2.plot(epochs, [100 * r['val_mAP'] for r in rows], 's-', label='val mAP')
    ax2.plot(epochs, [100 * r['val_mA'] for r in rows], '^--', label='val mA')
    if best is not None:
        i = epochs.index(best)
        ax2.plot([best], [100 * values[i]], '*', color='crimson', markersize=14, zorder=5,
                 label='best val %s (tested): epoch %d' % (monitor, best))
    ax2.set_ylabel('%')
    for ax in (ax1, ax2):
        if freeze_epochs:
            ax.axvspan(-0.5, min(freeze_epochs, epochs[-1] + 1) - 0.5, color='0.85', zorder=0,
                       label='first phase: backbone frozen')
        for i, x in enumerate(drops):
            ax.axvline(x, color='darkorange', ls=':', lw=1.5, label='learning rate / 10' if i == 0 else None)
        ax.set_xlabel('epoch')
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        if len(epochs) <= 20:
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def ap_bars(result, path, title='', compare=None):
    """Per-attribute AP bars (%), attributes from the most to the least often positive, each with its
    positive rate under its name and the AP a random ranking would get (about that rate, the chance level)
    as a marker; the paper's values as markers too when given."""
    _save(ap_bars_figure(result, title, compare), path)


def ap_bars_figure(result, title='', compare=None):
    """The figure of :func:`ap_bars`."""
    rows = sorted(result['per_attribute'], key=lambda r: -r['positives'] / max(r['specified'], 1))
    names = [r['name'] for r in rows]
    rates = [100.0 * r['positives'] / max(r['specified'], 1) for r in rows]
    aps = [100 * r['ap'] if r['ap'] is not None else np.nan for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(names)) + 1.6, 4.6))
    x = np.arange(len(names))
    ax.bar(x, aps, color='#4878a8', label='AP')
    _not_available(ax, x, aps)
    ax.plot(x, rates, '_', color='0.2', markersize=16, mew=2, label='chance (positive rate)')
    if compare:
        ref = [compare.get(n, np.nan) for n in names]
        ax.plot(x, ref, '_', color='crimson', markersize=18, mew=2, label='paper')
    ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.0, 1.0))      # beside the axes: bars reach 100
    ax.set_xticks(x)
    ax.set_xticklabels(['%s (%.1f%%)' % (n, r) for n, r in zip(names, rates)], rotation=45, ha='right',
                       rotation_mode='anchor', fontsize=7)
    ax.set_ylim(0, 100)
    ax.set_ylabel('AP (%)')
    ax.set_xlabel('attribute (positive rate), from the most to the least often positive', fontsize=8)
    score = 'mAP %.2f' % (100 * result['mAP'])
    ax.set_title('%s: %s' % (title, score) if title else score, fontsize=9)
    ax.grid(axis='y', alpha=.3)
    fig.tight_layout()
    return fig


def attention_scale(maps):
    """The top of the colour scale of :func:`attention_overlay` for ``maps`` (a list over taps of C x h x w
    arrays, or a list of such lists for several images): the 99.5th percentile of the maps as multiples
    of the uniform weight, at least 1."""
    flat = maps if maps and isinstance(maps[0], np.ndarray) else [m for group in maps for m in group]
    values = np.concatenate([(np.asarray(m, np.float32) * m[0].size).ravel() for m in flat])
    return max(float(np.percentile(values, 99.5)), 1.0)


def attention_grid(image, maps, names, probs, tap_names=None, top=None, tile=112):
    """The content of :func:`attention_figure` as one RGB array, drawn without matplotlib (a few
    milliseconds instead of a second and a half: TensorBoard's images, every epoch): one row per tap, the
    input then each attribute's map as a multiple of the uniform weight over the image (jet, 0 to ``top``,
    the same colour scale and blending as the figure), each tile ``tile`` pixels square with its attribute's
    name and probability, the tap's name and map size on the input."""
    import cv2
    image = cv2.resize(np.ascontiguousarray(image, np.uint8), (tile, tile), interpolation=cv2.INTER_AREA)
    top = attention_scale(maps) if top is None else float(top)
    font, rows = cv2.FONT_HERSHEY_SIMPLEX, []

    def label(picture, text, y):
        cv2.rectangle(picture, (0, y - 11), (min(tile, 6 * len(text) + 4), y + 3), (0, 0, 0), -1)
        cv2.putText(picture, text, (2, y), font, 0.33, (255, 255, 255), 1, cv2.LINE_AA)

    for t, m in enumerate(maps):
        input_tile = image.copy()
        label(input_tile, tap_names[t] if tap_names else 'tap %d' % t, 12)
        label(input_tile, '%dx%d' % m.shape[1:], 26)
        row = [input_tile]
        for c in range(len(names)):
            weight = cv2.resize(np.asarray(m[c], np.float32) * m[c].size, (tile, tile),
                                interpolation=cv2.INTER_CUBIC)
            level = np.clip(weight / top, 0, 1)
            colour = cv2.applyColorMap((255 * level).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1]
            blended = (0.45 * image + 0.55 * colour).astype(np.uint8)
            label(blended, names[c][:tile // 6], 12)
            label(blended, 'p=%.2f' % probs[c], 26)
            row.append(blended)
        rows.append(np.concatenate(row, axis=1))
    return np.ascontiguousarray(np.concatenate(rows, axis=0))


def attention_overlay(image, maps, names, probs, path, tap_names=None, top=None):
    """Write :func:`attention_figure` to ``path``."""
    _save(attention_figure(image, maps, names, probs, tap_names, top), path)


def attention_figure(image, maps, names, probs, tap_names=None, top=None):
    """One row per tap: the image, then each attribute's attention map over it (paper Fig. 3/4).

    ``image`` H x W x 3 uint8 (the crop the network saw); ``maps`` list over taps of C x h x w arrays
    (each map sums to 1); ``probs`` C floats. Maps are shown as multiples of the uniform weight
    1 / (h w), on one colour scale shared by every tile (so taps and attributes compare; ``top``: its
    top, :func:`attention_scale` of several images to compare them too), upsampled to the image's
    pixels; every tile carries its attribute's full name (on one line, in a size that fits the tile)
    and predicted probability.
    """
    import cv2
    taps, classes = len(maps), len(names)
    h, w = image.shape[:2]
    scaled = [[cv2.resize(np.asarray(m[c], np.float32) * m[c].size, (w, h), interpolation=cv2.INTER_CUBIC)
               for c in range(classes)] for m in maps]
    top = attention_scale(maps) if top is None else float(top)
    tile = max(1.6, 0.068 * max(len(n) for n in names) + 0.25)       # inches: the longest name fits at 9 pt
    fig, axes = plt.subplots(taps, classes + 1, figsize=(tile * (classes + 1) + 0.9, tile * taps + 0.7),
                             squeeze=False)
    for t in range(taps):
        axes[t, 0].imshow(image)
        axes[t, 0].set_ylabel('%s (%dx%d)' % (tap_names[t] if tap_names else 'tap %d' % t, maps[t].shape[1],
                                              maps[t].shape[2]), fontsize=8)
        for c in range(classes):
            ax = axes[t, c + 1]
            ax.imshow(image)
            shown = ax.imshow(np.clip(scaled[t][c], 0, top), cmap='jet', alpha=0.55, vmin=0, vmax=top,
                              interpolation='nearest')
            ax.text(0.03, 0.97, 'p=%.2f' % probs[c], transform=ax.transAxes, fontsize=8, va='top', ha='left',
                    color='white', bbox=dict(facecolor='black', alpha=0.55, pad=1, linewidth=0))
            if t == 0:
                ax.set_title(names[c], fontsize=9)
    axes[0, 0].set_title('input', fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.subplots_adjust(left=0.04, right=0.93, top=0.86, bottom=0.03, wspace=0.06, hspace=0.08)
    bar = fig.add_axes([0.945, 0.1, 0.012, 0.7])
    fig.colorbar(shown, cax=bar).set_label('attention (x uniform)', fontsize=8)
    bar.tick_params(labelsize=7)
    return fig


def _save_tiles(fig, axes, shown, label, path):
    """A row of image tiles without ticks, with a colour bar for ``shown`` named ``label``, saved."""
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.subplots_adjust(left=0.02, right=0.9, top=0.85, bottom=0.03, wspace=0.06)
    bar = fig.add_axes([0.915, 0.12, 0.015, 0.7])
    fig.colorbar(shown, cax=bar).set_label(label, fontsize=7)
    bar.tick_params(labelsize=6)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rga_overlay(image, maps, path):
    """The spatial attention of every RGA module over the image: ``maps`` [(name, H x W)], each shown as
    a multiple of its mean (1 = no preference), on one colour scale with a colour bar."""
    import cv2
    h, w = image.shape[:2]
    scaled = [cv2.resize(np.asarray(m, np.float32) / max(float(np.mean(m)), 1e-12), (w, h),
                         interpolation=cv2.INTER_CUBIC) for _, m in maps]
    low, top = np.percentile(np.stack(scaled), [0.5, 99.5])            # shared by every tile
    top = max(float(top), float(low) + 1e-3)
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(1.6 * (len(maps) + 1) + 0.8, 2.1), squeeze=False)
    axes[0, 0].imshow(image)
    axes[0, 0].set_title('input', fontsize=7)
    for ax, (name, m), tile in zip(axes[0, 1:], maps, scaled):
        ax.imshow(image)
        shown = ax.imshow(np.clip(tile, low, top), cmap='jet', alpha=0.55, vmin=low, vmax=top,
                          interpolation='nearest')
        ax.set_title('%s spatial (%dx%d)' % (name, m.shape[0], m.shape[1]), fontsize=7)
    _save_tiles(fig, axes, shown, 'attention (x mean)', path)


def apcnn_overlay(image, gates, rois, valid, box, stride, path):
    """AP-CNN over the image: the three spatial gates (sigmoid values, one colour scale, a colour bar),
    and on the input the selected ROIs (level 3 / 4 / 5 in green / orange / red) and the union box that
    stage II zooms into (white, dashed). ``rois`` R x 4 in input pixels, ``valid`` R, ``box`` the union
    box in cells of the stride-``stride`` map (end excluded). ``image`` is the crop the network saw."""
    import cv2
    from matplotlib.patches import Rectangle
    h, w = image.shape[:2]
    fig, axes = plt.subplots(1, 4, figsize=(7.2, 2.1), squeeze=False)
    axes[0, 0].imshow(image)
    colours = ['lime'] * 5 + ['orange'] * 3 + ['red'] * 1
    for (x1, y1, x2, y2), ok, colour in zip(rois, valid, colours + ['red'] * max(0, len(rois) - 9)):
        if ok:
            axes[0, 0].add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=colour, lw=1))
    bx1, by1, bx2, by2 = [float(v) * stride for v in box]
    axes[0, 0].add_patch(Rectangle((bx1, by1), bx2 - bx1, by2 - by1, fill=False, color='white', lw=1.5,
                                   ls='--'))
    axes[0, 0].set_title('ROIs (%d) and zoom box' % int(np.sum(valid)), fontsize=7)
    for ax, level, gate in zip(axes[0, 1:], (3, 4, 5), gates):
        ax.imshow(image)
        tile = cv2.resize(np.asarray(gate, np.float32), (w, h), interpolation=cv2.INTER_NEAREST)
        shown = ax.imshow(tile, cmap='jet', alpha=0.55, vmin=0, vmax=1, interpolation='nearest')
        ax.set_title('S%d spatial gate (%dx%d)' % (level, gate.shape[0], gate.shape[1]), fontsize=7)
    _save_tiles(fig, axes, shown, 'gate (sigmoid)', path)


def _not_available(ax, positions, values):
    """'n/a' on the axis where a value is missing (an attribute without a positive label has no AP), so that
    an empty slot does not read as 0."""
    for x, v in zip(positions, values):
        if v != v:
            ax.text(x, 1, 'n/a', ha='center', va='bottom', rotation=90, fontsize=6, color='0.3')


def compare_bars(names, aps, labels, frequency, path):
    """Per-attribute AP (%) of several systems side by side, attributes in the given order (most to
    least frequent), with each attribute's positive rate under its name; 'n/a' where a system has no AP."""
    _save(compare_bars_figure(names, aps, labels, frequency), path)


def compare_bars_figure(names, aps, labels, frequency):
    """The figure of :func:`compare_bars`."""
    k, c = len(aps), len(names)
    fig, ax = plt.subplots(figsize=(max(7, 0.5 * c * max(k, 2) / 2 + 2), 4.2 + 0.2 * k))
    width = 0.8 / k
    x = np.arange(c)
    for i, (values, label) in enumerate(zip(aps, labels)):
        heights = [100 * v if v is not None else np.nan for v in values]
        ax.bar(x - 0.4 + width * (i + 0.5), heights, width, label=label)
        _not_available(ax, x - 0.4 + width * (i + 0.5), heights)
    ax.set_xticks(x)
    ax.set_xticklabels(['%s\n%.0f%%' % (n, 100 * f) for n, f in zip(names, frequency)], rotation=60,
                       ha='right',
                       fontsize=7)
    ax.set_ylim(0, 100)
    ax.set_ylabel('AP (%)')
    ax.set_title('per-attribute AP, most to least frequent positive label (positive rate under each name)',
                 fontsize=8)
    ax.grid(axis='y', alpha=.3)
    # under the axes, one line per system: a legend inside would cover the bars near 100%
    fig.legend(*ax.get_legend_handles_labels(), fontsize=7, loc='lower center', ncol=1, frameon=False)
    fig.tight_layout(rect=(0, 0.045 * k + 0.02, 1, 1))
    return fig


def study_points(labels, done, keys, names, table, path):
    """A study over seeds: per metric, one point per seed for every system, its mean (a bar) and 95%
    interval (a line), in points."""
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys) + 1, 3.6), squeeze=False)
    x = np.arange(len(labels))
    for ax, key, name in zip(axes[0], keys, names):
        for i, label in enumerate(labels):
            seeds = done.get(label, {})
            values = [100 * r[key] for r in seeds.values() if r[key] is not None]
            ax.plot([i] * len(values), values, 'o', ms=4, alpha=.6, color='C0')
            s = table[label][key]
            if s['n']:
                ax.plot([i - .25, i + .25], [100 * s['mean']] * 2, color='k', lw=2)
            if s['n'] > 1:
                ax.plot([i + .3] * 2, [100 * s['low'], 100 * s['high']], color='C3', lw=2)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=45, ha='right', fontsize=7)
        ax.set_title('test %s (%%)' % name, fontsize=9)
        ax.grid(axis='y', alpha=.3)
    fig.suptitle('one point per seed; black: the mean; red: its 95% interval (Student t)', fontsize=8)
    fig.tight_layout()
    _save(fig, path)
