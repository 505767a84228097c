"""Figures of a run folder: loss and mAP curves, per-attribute AP bars, attention overlays."""
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def curves(rows, path):
    """Train/val loss and val mAP (and mA) per epoch from the metrics rows."""
    if not rows:
        return
    epochs = [r['epoch'] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(epochs, [r['train_loss'] for r in rows], 'o-', label='train')
    ax1.plot(epochs, [r['val_loss'] for r in rows], 's-', label='val')
    ax1.set_xlabel('epoch')
    ax1.set_ylabel('loss (sum over branches)')
    ax1.legend()
    ax1.grid(alpha=.3)
    ax2.plot(epochs, [100 * r['train_mAP'] for r in rows], 'o-', label='train mAP')
    ax2.plot(epochs, [100 * r['val_mAP'] for r in rows], 's-', label='val mAP')
    ax2.plot(epochs, [100 * r['val_mA'] for r in rows], '^--', label='val mA')
    ax2.set_xlabel('epoch')
    ax2.set_ylabel('%')
    ax2.legend()
    ax2.grid(alpha=.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ap_bars(result, path, title='', compare=None):
    """Per-attribute AP bars (%), with the paper's values as markers when given."""
    rows = result['per_attribute']
    names = [r['name'] for r in rows]
    aps = [100 * r['ap'] if r['ap'] is not None else 0 for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(names)), 4))
    x = np.arange(len(names))
    ax.bar(x, aps, color='#4878a8', label='AP')
    if compare:
        ref = [compare.get(n, np.nan) for n in names]
        ax.plot(x, ref, 'k_', markersize=18, mew=2, label='paper')
        ax.legend()
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=45, ha='right')
    ax.set_ylim(0, 100)
    ax.set_ylabel('AP (%)')
    ax.set_title('%s mAP %.2f' % (title, 100 * result['mAP']))
    ax.grid(axis='y', alpha=.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def attention_overlay(image, maps, names, probs, path, tap_names=None):
    """One row per tap: the image with each attribute's attention map over it (paper Fig. 3/4).

    ``image`` H x W x 3 uint8; ``maps`` list over taps of C x h x w arrays; ``probs`` C floats.
    """
    taps, classes = len(maps), len(names)
    fig, axes = plt.subplots(taps, classes + 1, figsize=(1.6 * (classes + 1), 1.75 * taps), squeeze=False)
    h, w = image.shape[:2]
    for t in range(taps):
        axes[t, 0].imshow(image)
        axes[t, 0].set_title(tap_names[t] if tap_names else 'tap %d' % t, fontsize=8)
        for c in range(classes):
            ax = axes[t, c + 1]
            ax.imshow(image)
            ax.imshow(maps[t][c], cmap='jet', alpha=0.5, extent=(0, w, h, 0), interpolation='bilinear')
            if t == 0:
                ax.set_title('%s\n%.2f' % (names[c][:14], probs[c]), fontsize=7)
    for ax in axes.ravel():
        ax.axis('off')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
