"""What can be built, in one table at the bottom of the import graph (it imports nothing): the backbones,
each preset's heads, its switches and phases, and the optimiser schedule per preset and dataset family.
The flags (``flags.py``), the config (``config.py``) and the network (``model.py``) read it from here.

Sources: ``paper`` is the supplement's architecture (taps, head widths) with the paper's losses and its
schedule (Sec. 4: SGD 1e-3 on WIDER, Adam 1e-4 on PETA); ``upstream`` is the authors' released code
(``cvcode18/imbalanced_learning``: ``main.py``'s defaults and its modules); ``demo`` is ours, for the
embedded 48-pixel dataset.
"""

BACKBONES = ('resnet18_v1', 'resnet34_v1', 'resnet50_v1', 'resnet101_v1', 'resnet152_v1',
             'densenet121', 'densenet161', 'densenet169', 'densenet201')

# The head architecture of each preset. The first upstream tap is written with the block number for
# ResNet-101 (s3b20) in the released code; here as "three blocks before the end of stage 3" (s3-3), which
# is s3b20 for ResNet-101 (``backbone.resolve_taps``).
PRESETS = {
    'paper': dict(taps=('s3', 's4'), att_channels=(256, 256), att_second_kernel=1,
                  cls_channels=(256, 512, 512)),
    'upstream': dict(taps=('s3-3', 's3', 's4'), att_channels=(512, 512), att_second_kernel=3,
                     cls_channels=(256, 512, 1024)),
    # The embedded demo's 48-pixel canvases leave 3x3 and 2x2 maps at s3/s4: the paper's head design,
    # narrower, on the end of stages 1 and 2 gives 12x12 and 6x6 maps at the same cost.
    'demo': dict(taps=('s1', 's2'), att_channels=(64, 64), att_second_kernel=1, cls_channels=(64, 128, 128)),
}

# The optimiser schedule per (preset, dataset family). Patience p means: divide the learning rate by 10
# once the monitored validation metric has not improved for more than p epochs, at most `lr_drops` times.
# Sources:
#   paper/wider: SGD momentum 0.9, weight decay 5e-4, lr 1e-3 divided by 10 on a validation plateau down to
#     1e-5 (two drops), batch 32 (the paper, Sec. 4); patience 3 and 40 epochs are ours (not stated).
#   upstream/wider: the authors' main.py: lr 1e-4, / 10 after more than 10 epochs without val-mAP gain, at
#     most 3 times, batch 24, 250 epochs.
#   paper/peta: Adam, lr 1e-4, / 10 twice after more than 8 epochs without gain, batch 32 (the paper,
#     Sec. 4); 60 epochs are ours (not stated).
#   paper/pedes: Rethinking_of_PAR's configs for its own files (configs/pedes_baseline/*.yaml and train.py):
#     Adam, lr 1e-4, weight decay 5e-4, batch 64, 30 epochs (its MAX_EPOCH), ReduceLROnPlateau(factor 0.1,
#     patience 4), which has no cap: 30 epochs at patience 4 allow at most 6 drops. What we keep of our own
#     protocol is in docs/datasets.md (the plateau watches the monitored metric, mA, not the validation
#     loss; a square input; the validation split picks the checkpoint).
#   demo/demo: ours, for the embedded 48-pixel dataset and a backbone that starts from random weights.
SCHEDULES = {
    ('paper', 'wider'): dict(optimizer='sgd', lr=1e-3, lr_patience=3, lr_drops=2, batch_size=32, epochs=40),
    ('upstream', 'wider'): dict(optimizer='sgd', lr=1e-4, lr_patience=10, lr_drops=3, batch_size=24,
                                epochs=250),
    ('paper', 'peta'): dict(optimizer='adam', lr=1e-4, lr_patience=8, lr_drops=2, batch_size=32, epochs=60),
    ('paper', 'pedes'): dict(optimizer='adam', lr=1e-4, lr_patience=4, lr_drops=6, batch_size=64, epochs=30),
    ('demo', 'demo'): dict(optimizer='adam', lr=1e-3, lr_patience=3, lr_drops=2, batch_size=32, epochs=8),
}
# Which schedule a dataset follows; a preset without a schedule for the family takes the family's first
# (schedule_for).
DATASET_FAMILY = {'wider': 'wider', 'csv': 'wider', 'lst': 'wider', 'rec': 'wider', 'peta': 'peta',
                  'pa100k': 'peta', 'pedes': 'pedes', 'demo': 'demo'}
# What each preset switches on; each is also a flag, and a dataset's own defaults win. Sources: plain_bce and
# history_zero_rows are the released code's losses and history buffer; the normalisation is the released
# code's mean subtraction 104/117/123 (upstream) or the model zoo's ImageNet mean/std (paper);
# freeze_epochs: the paper's first phase, in which only the attention heads train ("a few epochs" in the
# supplement, which gives no number: 3 is ours, see --freeze-epochs); it needs ImageNet weights, so without
# them it is 0 unless asked for; shuffle: the authors' ImageRecordIter never shuffled.
PRESET_SETTINGS = {
    'upstream': dict(plain_bce=True, history_zero_rows=True, normalisation='upstream', freeze_epochs=0,
                     shuffle=False),
    'paper': dict(plain_bce=False, history_zero_rows=False, normalisation='paper', freeze_epochs=3,
                  shuffle=True),
    'demo': dict(plain_bce=False, history_zero_rows=False, normalisation='paper', freeze_epochs=0,
                 shuffle=True),
}
# Used when neither the flags, the dataset nor the schedule say. Real datasets start from ImageNet weights as
# in the paper (the demo's defaults say otherwise).
FALLBACKS = dict(backbone='resnet101_v1', input_size=224, epochs=30, batch_size=32, lr=1e-3, optimizer='sgd',
                 lr_patience=3, lr_drops=2, monitor='mAP', num_workers=4, pretrained=True, metrics='ours')


def schedule_for(preset, dataset):
    """The schedule of ``preset`` on ``dataset`` ({} for a dataset of no family, e.g. none yet)."""
    family = DATASET_FAMILY.get(dataset)
    if (preset, family) in SCHEDULES:
        return SCHEDULES[(preset, family)]
    return next((v for (_, f), v in SCHEDULES.items() if f == family), {})
