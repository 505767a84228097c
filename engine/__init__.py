"""The training machinery around the method: flags and config, presets and schedules, the per-stage
Trainers, the per-batch steps, run folders and checkpoints, devices and gradient exchange, mixed
precision, errors and the machine line. Nothing here is the paper's method; ``train.py`` uses it."""
