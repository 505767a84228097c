"""The training core's parts and their wiring: the objective shared by training and validation, the
per-stage Trainers' phases, the plateau schedule, the flags, and the module structure."""
import ast
import os

import numpy as np
import pytest
import mxnet as mx
from mxnet import autograd, nd

from engine import config
from engine import loop
import datasets
from engine import steps
from common.errors import UserError
from losses import PredictionHistory, VAALoss
from model import get_vaa_net
from tests import fixtures
from engine.trainers import PlateauSchedule, StageTrainers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _log_sigmoid(x):
    return -np.logaddexp(0, -x)


def _eq7(primary, taps, y, m, pos_w, neg_w, gamma, with_primary):
    """Eq. 7 in NumPy with history weights 1: focal (Eq. 4) on the primary logits + BCE per tap."""
    total = np.zeros(len(y))
    for t in taps:
        bce = -(y * _log_sigmoid(t) + (1 - y) * _log_sigmoid(-t))
        total += (bce * m).mean(axis=1)
    if with_primary:
        p = 1 / (1 + np.exp(-primary))
        focal = -(pos_w * y * (1 - p) ** gamma * _log_sigmoid(primary) +
                  neg_w * (1 - y) * p ** gamma * _log_sigmoid(-primary))
        total += (focal * m).mean(axis=1)
    return total


@pytest.mark.parametrize('finetune', [False, True])
def test_validation_loss_is_the_objective_the_training_step_minimises(finetune):
    """One batch through the training step and through validation's predict: the same number, and
    that number is Eq. 7 (without the focal term under --finetune) computed in NumPy."""
    classes, size, batch = 3, 32, 6
    net = get_vaa_net('resnet18_v1', classes, 'paper', size)
    net.hybridize(static_alloc=True, static_shape=True)
    pos_w, neg_w = np.array([1.5, 0.7, 2.0]), np.array([0.9, 1.3, 0.6])
    loss_fn = VAALoss(pos_w, neg_w, gamma=0.5, primary=not finetune)
    loss_fn.hybridize()
    # learning rate 0: the step leaves the weights as they were, so both passes see the same network
    trainers = StageTrainers(net, [mx.cpu()], 'sgd', {'learning_rate': 0.0}, finetune=finetune)
    history = PredictionHistory(batch, classes)                   # epoch 0: weights 1, as in validation
    rng = np.random.RandomState(3)
    x = nd.array(rng.randn(batch, 3, size, size))
    y = nd.array(rng.randint(0, 2, (batch, classes)))
    m = nd.array(rng.rand(batch, classes) > 0.2)
    data = (x, y, m, nd.arange(batch, dtype='int64'))
    step = steps.train_step(net, loss_fn, trainers, history, data, 0, [mx.cpu()])
    train_mean = float(step.loss.asscalar()) / batch
    with autograd.train_mode():            # BatchNorm on batch statistics, as in the training step
        _, _, _, val_mean = steps.predict(net, [data], [mx.cpu()], loss_fn)
        primary, taps, _ = net(x)
    assert val_mean == pytest.approx(train_mean, rel=1e-6)
    expected = _eq7(primary.asnumpy().astype(np.float64), [t.asnumpy().astype(np.float64) for t in taps],
                    y.asnumpy(), m.asnumpy(), pos_w, neg_w, 0.5, not finetune).mean()
    assert train_mean == pytest.approx(expected, rel=1e-5)


def test_first_phase_trains_only_the_attention_heads_with_their_loss_then_everything():
    """--freeze-epochs 2: in epochs 0 and 1 the backbone and the primary classifier (weights and BatchNorm
    statistics) stay bitwise as they were, compute in training mode what they compute at evaluation, and the
    loss has no primary term; from epoch 2 all of it trains."""
    net = get_vaa_net('resnet18_v1', 3, 'paper', 32)
    trainers = StageTrainers(net, [mx.cpu()], 'sgd', {'learning_rate': 0.5}, freeze_epochs=2)
    loss_fn = VAALoss()
    history = PredictionHistory(4, 3)
    x, y = nd.random.normal(shape=(4, 3, 32, 32)), nd.array(np.random.randint(0, 2, (4, 3)))
    batch = (x, y, nd.ones_like(y), nd.arange(4, dtype='int64'))
    backbone = set(net.backbone.collect_params().keys())           # model-zoo layers + primary classifier
    moved = {}
    for epoch in (0, 1, 2):
        assert trainers.set_phase(epoch, loss_fn) == (epoch in (0, 2))
        assert loss_fn.primary == (epoch == 2) == trainers.trains_primary
        # phase 1: the frozen backbone normalises with its stored statistics
        with autograd.train_mode():
            training = net(x)[0].asnumpy()
        inference = net(x)[0].asnumpy()
        # The same statistics, but oneDNN may run another kernel in training mode (it does on AVX-512), so the
        # two agree to float32 rounding, not bitwise; with batch statistics (epoch 2) they differ by far more.
        gap = np.abs(training - inference).max() / np.abs(inference).max()
        assert (gap < 1e-5) if epoch < 2 else (gap > 1e-2), (epoch, gap)
        before = {k: p.data().copy() for k, p in net.collect_params().items()}
        steps.train_step(net, loss_fn, trainers, history, batch, epoch, [mx.cpu()])
        mx.nd.waitall()  # reading a parameter during oneDNN's ops can be wrong (README, CPUs)
        moved[epoch] = {k for k, p in net.collect_params().items()
                        if not np.array_equal(before[k].asnumpy(), p.data().asnumpy())}
    for epoch in (0, 1):
        assert not moved[epoch] & backbone, sorted(moved[epoch] & backbone)[:3]
        assert any('branch' in k for k in moved[epoch]) and any('classifier' in k for k in moved[epoch])
    weights = {k for k in backbone if not k.endswith(('running_mean', 'running_var'))}
    assert weights <= moved[2] and any(k.endswith('running_mean') for k in moved[2] & backbone)


def test_plateau_schedule_drops_after_more_than_patience_epochs_and_at_most_max_drops():
    schedule = PlateauSchedule(1e-3, patience=2, max_drops=2)
    values = [0.5, 0.6, 0.6, 0.55, 0.6, 0.59, 0.58, 0.57, 0.7, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]
    lrs, bests = [], []
    for epoch, value in enumerate(values):
        bests.append(schedule.update(epoch, value))
        lrs.append(schedule.lr)
    # no gain in epochs 2, 3, 4: the third such epoch (more than 2) drops; again after 5, 6, 7
    assert lrs[:4] == [1e-3] * 4 and lrs[4] == pytest.approx(1e-4)
    assert lrs[5:7] == [pytest.approx(1e-4)] * 2 and lrs[7] == pytest.approx(1e-5)
    assert lrs[8:] == [pytest.approx(1e-5)] * 7                  # max_drops reached
    assert [e for e, b in enumerate(bests) if b] == [0, 1, 8] and schedule.best_epoch == 8
    again = PlateauSchedule(1, 1, 1)
    again.load_state_dict(schedule.state_dict())
    assert again.state_dict() == schedule.state_dict()


def test_every_flag_takes_both_spellings_and_help_shows_each_default_once():
    parser = config.build_parser()
    for action in parser._actions:
        for flag in action.option_strings:
            if flag.startswith('--') and ('_' in flag or '-' in flag[2:]):
                assert {flag.replace('_', '-'), '--' + flag[2:].replace('-', '_')} <= set(
                    action.option_strings)
    value = ['--batch_size', '16', '--input_size', '40', '--num-classes', '3', '--data-path', '/d',
             '--lr_drops', '1']
    other = ['--batch-size', '16', '--input-size', '40', '--num_classes', '3', '--data_path', '/d',
             '--lr-drops', '1']
    assert vars(parser.parse_args(value)) == vars(parser.parse_args(other))
    assert parser.parse_args(['--batch', '8']).batch_size == 8          # abbreviations still work
    text = parser.format_help()
    text = text[text.index('\n  -h, --help'):]                       # after the usage and description
    assert '(default: None)' not in text and '(default: True)' not in text and '(default: False)' not in text
    for block in text.split('\n  --')[1:]:
        assert block.count('default') <= 1, block
    assert '--batch-size' not in text and '--batch_size' in text       # one spelling shown per flag


def _project_imports():
    modules = {os.path.splitext(f)[0] for f in os.listdir(ROOT) if f.endswith('.py')} | {'datasets'}
    graph = {}
    paths = [f for f in os.listdir(ROOT) if f.endswith('.py')]
    paths += [os.path.join('datasets',
                           f) for f in os.listdir(os.path.join(ROOT, 'datasets')) if f.endswith('.py')]
    for path in paths:
        tree = ast.parse(open(os.path.join(ROOT, path)).read())
        name = path[:-3].replace(os.sep, '.').replace('.__init__', '')
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                deps.add(node.module)
        graph[name] = {d for d in deps if d.split('.')[0] in modules and d != name}
    return graph


def test_no_import_circle_and_eval_and_train_are_independent():
    graph = _project_imports()
    assert 'train' not in graph['eval'] and 'eval' not in graph['train']
    state = {}

    def visit(node, path):
        state[node] = 'open'
        for dep in graph.get(node, ()):
            assert state.get(dep) != 'open', 'import circle: %s' % ' -> '.join(path + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 'done'
    for node in graph:
        if node not in state:
            visit(node, [node])


def test_real_datasets_default_to_the_papers_protocol_and_the_demo_to_its_own():
    paper = config.defaults(dataset='wider')
    assert (paper['pretrained'], paper['freeze_epochs'], paper['shuffle']) == (True, 3, True)
    assert (paper['optimizer'], paper['lr'], paper['batch_size']) == ('sgd', 1e-3, 32)
    upstream = config.defaults(dataset='wider', preset='upstream')
    assert (upstream['pretrained'], upstream['freeze_epochs'], upstream['shuffle']) == (True, 0, False)
    assert config.defaults(dataset='peta')['freeze_epochs'] == 3
    demo = config.defaults()
    assert (demo['dataset'], demo['pretrained'], demo['freeze_epochs'], demo['preset']) == (
        'demo', False, 0, 'demo')
    assert config.defaults(preset='paper')['preset'] == 'paper'
    assert config.defaults(dataset='wider', pretrained=False)['pretrained'] is False     # --no-pretrained
    assert config.defaults(dataset='wider', finetune=True)['freeze_epochs'] == 0
    with pytest.raises(UserError, match='drop --freeze-epochs'):
        config.defaults(dataset='wider', finetune=True, freeze_epochs=2)
    cfg, _ = config.parse_args(['--dataset', 'wider', '--no-pretrained', '--no-shuffle', '--freeze-epochs',
                                '1'])
    assert (cfg['pretrained'], cfg['shuffle'], cfg['freeze_epochs']) == (False, False, 1)


def test_the_dataset_is_told_from_the_folder_layout_or_refused(tmp_path):
    layouts = {'wider': fixtures.wider, 'peta': fixtures.peta, 'pa100k': fixtures.pa100k,
               'csv': fixtures.csv_dataset, 'lst': fixtures.lst_dataset}
    for name, make in layouts.items():
        root = tmp_path / name
        root.mkdir()
        make(str(root))
        assert datasets.detect(str(root)) == name
        cfg, _ = config.parse_args(['--data_path', str(root)])
        assert cfg['dataset'] == name and cfg['backbone'] == 'resnet101_v1'
    (tmp_path / 'records').mkdir()
    for f in ('train.rec', 'train.lst'):
        (tmp_path / 'records' / f).write_text('')
    assert datasets.detect(str(tmp_path / 'records')) == 'rec'
    assert datasets.detect(None) == 'demo'
    empty = tmp_path / 'photos'
    empty.mkdir()
    with pytest.raises(UserError, match='cannot tell the dataset of --data_path .*photos.*give --dataset'):
        config.parse_args(['--data_path', str(empty)])
    assert not list(empty.iterdir())                    # nothing written into a folder we were not given


def test_upstream_preset_reads_the_training_split_in_file_order(demo_path):
    import train
    cfg, _ = config.parse_args(['--data_path', demo_path, '--preset', 'upstream', '--limit', '64',
                                '--batch_size', '16'])
    data = train.get_data(cfg, loop.Place([mx.cpu()], None, 0, 1))
    data.sampler.set_epoch(3)
    assert [int(i) for batch in data.train_loader for i in batch[3].asnumpy()] == list(range(64))
    cfg, _ = config.parse_args(['--data_path', demo_path, '--limit', '64', '--batch_size', '16'])
    data = train.get_data(cfg, loop.Place([mx.cpu()], None, 0, 1))
    data.sampler.set_epoch(3)
    order = [int(i) for batch in data.train_loader for i in batch[3].asnumpy()]
    assert sorted(order) == list(range(64)) and order != list(range(64))
