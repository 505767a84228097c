"""What a run's config implies for its data: the image transform, the training loader (this worker's shard,
the random augmentation, the data order) and the evaluation loader, and the options of
``datasets.load_split``."""
from datasets.base import Transform, make_loader
from common.errors import UserError


def transform(cfg, train=False):
    """The image transform of a config: random crops and mirrors for training, the centre crop else."""
    return Transform(cfg['input_size'], cfg['resize'], cfg['crop_range'], train=train,
                     normalisation=cfg['normalisation'], seed=cfg.get('seed', 0))   # (model cards: no seed)


def train_loader(cfg, data, num_devices=1, rank=0, num_workers=1):
    """(loader, sampler) of this worker's shard of ``data`` with the training transform and order."""
    shard = len(data) // num_workers
    if cfg['batch_size'] > shard:
        raise UserError('--batch_size %d is larger than the training split (%d samples%s); lower it'
                        % (cfg['batch_size'], shard, ' per worker' if num_workers > 1 else ''))
    remainder = shard % cfg['batch_size']
    last_batch = 'discard' if 0 < remainder < max(2, num_devices) else 'keep'      # BN needs 2+ samples
    return make_loader(data, transform(cfg, train=True), cfg['batch_size'], shuffle=cfg['shuffle'],
                       num_workers=cfg['num_workers'], last_batch=last_batch, seed=cfg['seed'], shard=rank,
                       num_shards=num_workers)


def eval_loader(cfg, data):
    """Batches of ``data`` in order, with the evaluation transform of ``cfg``."""
    return make_loader(data, transform(cfg), cfg['batch_size'], shuffle=False,
                       num_workers=cfg['num_workers'])[0]


def data_options(cfg):
    """Keyword arguments of ``datasets.load_split`` from a config."""
    return dict(limit=cfg['limit'], skip_bad=cfg['skip_bad_samples'], partition=cfg['partition'],
                all_attributes=cfg['all_attributes'], cache_dir=cfg['cache_dir'],
                split_file=cfg.get('split_file'))
