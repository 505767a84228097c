"""Every system on every CPU: each network the project builds trains a step and evaluates at every oneDNN
ISA level this machine offers (``DNNL_MAX_CPU_ISA`` = SSE41, AVX2, AVX512_CORE, and unset), each level in
its own process (``tests/isa_probe.py``), and the levels agree to float32 tolerance
(``isa_probe.TOLERANCE``, measured against a float64 computation). MXNet's oneDNN chooses its kernels by
ISA, so a bug can live on one CPU only: MXNet 1.9.1 crashes at the AVX-512 level on a 2-D BatchNorm after
a 1x1 convolution + BatchNorm of the same width on (N, C, 1, 1) maps (AP-CNN's pooled branch and its
classifiers); ``backbone.BatchNorm1D`` keeps the computation off that path.

A level above this CPU's cannot be emulated and is skipped with the reason.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from mxnet.gluon import nn

from common import machine
from tests import fixtures, isa_probe
from backbone import BatchNorm1D

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LEVELS = isa_probe.levels()


@pytest.fixture(scope='module')
def probed(tmp_path_factory):
    """{level: (folder, {system: None or the failure})}, every level run once for the whole module."""
    root = tmp_path_factory.mktemp('isa')
    out = {}
    for level, skip in LEVELS:
        if not skip:
            folder = str(root / level)
            out[level] = folder, isa_probe.run_level(level, folder)
    return out


@pytest.mark.parametrize('level,skip', LEVELS, ids=[level for level, _ in LEVELS])
@pytest.mark.parametrize('system', list(isa_probe.SYSTEMS))
def test_every_system_trains_and_evaluates_at_every_isa_level_with_the_same_numbers(
        probed, system, level, skip):
    if skip:
        pytest.skip('DNNL_MAX_CPU_ISA=%s cannot be tested here: %s' % (level, skip))
    folder, failures = probed[level]
    assert failures[system] is None, failures[system]
    if level == isa_probe.NATIVE:
        return
    reference, native_failures = probed[isa_probe.NATIVE]
    assert native_failures[system] is None, 'no reference: ' + native_failures[system]
    difference = isa_probe.compare(folder, reference, system)
    assert isa_probe.agrees(difference), '%s at %s against the native level: %s (tolerances %s)' % (
        system, level, difference, isa_probe.TOLERANCE)


def test_the_matrix_holds_every_system_the_flags_can_build():
    """A new --head, preset or related-system switch must join isa_probe.SYSTEMS (and so this matrix)."""
    from engine import config
    from model import PRESETS
    parser = config.build_parser()
    actions = {a.dest: a for a in parser._actions}  # pylint: disable=protected-access
    systems = list(isa_probe.SYSTEMS.values())
    assert set(actions['head'].choices) <= {s.get('head', 'vaa') for s in systems}
    assert set(PRESETS) <= {s['preset'] for s in systems}
    assert any(s.get('rga', 'none') != 'none' for s in systems) and any(s.get('mc_loss') for s in systems)
    assert set(actions['rga'].choices) == {'none', 's', 'c', 'sc'}, 'a new RGA mode: add it to the matrix'


def test_the_ranking_of_levels_follows_the_cpu_flags():
    """A level is skipped exactly when the CPU lacks one of its instructions (so AVX-512 machines test it)."""
    flags = machine.cpu_flags()
    if flags is None:
        pytest.skip('no /proc/cpuinfo')
    skipped = {level for level, skip in LEVELS if skip}
    assert ('AVX512_CORE' in skipped) == ('avx512f' not in flags)
    assert ('AVX2' in skipped) == ('avx2' not in flags)
    assert isa_probe.NATIVE not in skipped


# The minimal pattern (no project code but the layer under test): a 1x1 conv + BatchNorm on (N, 64, 1, 1),
# then a second BatchNorm of the same width on (N, 256) vectors, in inference mode. With nn.BatchNorm as
# the second layer MXNet 1.9.1 segfaults at the AVX-512 level; BatchNorm1D must run and give the formula.
PATTERN = textwrap.dedent('''
    import sys
    import numpy as np
    import mxnet as mx
    from mxnet.gluon import nn
    sys.path.insert(0, %r)
    from backbone import BatchNorm1D
    rng = np.random.RandomState(0)
    conv, bn = nn.Conv2D(256, 1, in_channels=64, use_bias=False), nn.BatchNorm(in_channels=256)
    second = {'BatchNorm1D': BatchNorm1D, 'BatchNorm': nn.BatchNorm}[sys.argv[1]](in_channels=256)
    for block in (conv, bn, second):
        block.initialize()
    for p in second.collect_params().values():
        p.set_data(mx.nd.array(rng.uniform(0.5, 1.5, p.shape)))
    bn(conv(mx.nd.array(rng.normal(size=(4, 64, 1, 1))))).wait_to_read()
    z = rng.normal(size=(4, 256)).astype(np.float32)
    np.save(sys.argv[2], second(mx.nd.array(z)).asnumpy())
    np.save(sys.argv[3], z)
    np.save(sys.argv[4], np.stack([p.data().asnumpy() for p in second.collect_params().values()]))
''') % ROOT


@pytest.mark.parametrize('level,skip', LEVELS, ids=[level for level, _ in LEVELS])
def test_the_minimal_crash_pattern_runs_with_the_vector_batchnorm_at_every_level(tmp_path, level, skip):
    if skip:
        pytest.skip('DNNL_MAX_CPU_ISA=%s cannot be tested here: %s' % (level, skip))
    env = dict(os.environ)
    env.pop('DNNL_MAX_CPU_ISA', None)
    if level != isa_probe.NATIVE:
        env['DNNL_MAX_CPU_ISA'] = level
    script = tmp_path / 'pattern.py'
    script.write_text(PATTERN)
    files = [str(tmp_path / n) for n in ('out.npy', 'z.npy', 'params.npy')]
    proc = subprocess.run([sys.executable, str(script), 'BatchNorm1D'] + files, env=env,
                          stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=fixtures.SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, 'exit status %d at %s:\n%s' % (proc.returncode, level, proc.stdout.decode()[
        -2000:])
    out, z, params = (np.load(f) for f in files)
    gamma, beta, mean, var = params                   # collect_params order: gamma, beta, running mean, var
    expected = (z - mean) / np.sqrt(var + 1e-5) * gamma + beta
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_no_network_applies_a_plain_batchnorm_to_vectors():
    """On every CPU (an AVX2 one cannot show the crash): each system's network, run imperatively, feeds
    2-D input to BatchNorm1D only; every other BatchNorm sees maps (the forward pass in training mode, which
    has no crash to hide the answer)."""
    import mxnet as mx
    from mxnet import autograd
    from engine import config
    from engine.build import build_net
    rng = np.random.RandomState(0)
    labels = (rng.rand(16, isa_probe.CLASSES) < 0.4).astype(np.float32)
    x = mx.nd.array(rng.normal(size=(2, 3, isa_probe.SIZE, isa_probe.SIZE)))
    for name, settings in isa_probe.SYSTEMS.items():
        cfg = config.defaults(backbone='resnet18_v1', input_size=isa_probe.SIZE,
                              num_classes=isa_probe.CLASSES,
                              dataset=None, pretrained=False, **settings)
        net = build_net(cfg, [mx.cpu()], labels=labels, mask=np.ones_like(labels))
        seen = []
        for block in _blocks(net):
            if isinstance(block, nn.BatchNorm):
                block.register_forward_pre_hook(lambda b, args: seen.append((b, args[0].ndim)))
        net.return_aux = bool(settings.get('mc_loss'))
        # (inference mode would crash here on AVX-512 with the plain layer)
        with autograd.train_mode():
            net(x)
        assert seen, name
        plain_2d = [b.name for b, ndim in seen if ndim == 2 and not isinstance(b, BatchNorm1D)]
        assert not plain_2d, '%s: nn.BatchNorm on 2-D input (use backbone.BatchNorm1D): %s' % (name, plain_2d)


def _blocks(block):
    out = [block]
    for child in block._children.values():  # pylint: disable=protected-access
        out.extend(_blocks(child))
    return out


def test_batchnorm1d_keeps_the_parameter_names_and_the_numbers_of_batchnorm():
    """Checkpoints of the layer it replaces load unchanged, and it computes what nn.BatchNorm computes on
    vectors, in both modes."""
    import mxnet as mx
    from mxnet import autograd
    old, new = nn.BatchNorm(in_channels=6), BatchNorm1D(in_channels=6)
    names = [[k[len(b.prefix):] for k in b.collect_params()] for b in (old, new)]
    assert names[0] == names[1]
    assert new.prefix.startswith('batchnorm')
    for block in (old, new):
        block.initialize()
    x = mx.nd.array(np.random.RandomState(1).normal(size=(5, 6)))
    with autograd.record():
        a, b = old(x), new(x)
    np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-5, atol=1e-6)
    for p_old, p_new in zip(old.collect_params().values(), new.collect_params().values()):
        # same stats moved
        np.testing.assert_allclose(p_old.data().asnumpy(), p_new.data().asnumpy(), rtol=1e-6)
    np.testing.assert_allclose(old(x).asnumpy(), new(x).asnumpy(), rtol=1e-5, atol=1e-6)


def test_the_vector_batchnorms_keep_the_full_names_checkpoints_hold():
    """The names are those an nn.BatchNorm in the same place gets (batchnorm<k>_ counted with the other
    BatchNorms of the block), in full: AP-CNN's classifier files and checkpoints hold exactly these."""
    scope = nn.HybridSequential(prefix='x_')
    with scope.name_scope():
        first, second, third = nn.BatchNorm(), BatchNorm1D(), BatchNorm1D()
    assert [b.prefix for b in (first, second, third)] == ['x_batchnorm0_', 'x_batchnorm1_', 'x_batchnorm2_']
    assert list(second.collect_params()) == ['x_batchnorm1_gamma', 'x_batchnorm1_beta',
                                             'x_batchnorm1_running_mean', 'x_batchnorm1_running_var']
    from engine import config
    from engine import build
    net = build.build_net(config.defaults(head='apcnn', input_size=64, num_classes=4))
    heads = sorted(k[len(net.prefix):] for k in net.collect_params() if k[len(net.prefix):].startswith('cls'))
    expected = sorted('%s_%s' % (head, name) for head in ('cls3', 'cls4', 'cls5', 'cls_concate') for name in (
        'batchnorm0_gamma', 'batchnorm0_beta', 'batchnorm0_running_mean', 'batchnorm0_running_var',
        'dense0_weight', 'dense0_bias',
        'batchnorm1_gamma', 'batchnorm1_beta', 'batchnorm1_running_mean', 'batchnorm1_running_var',
        'dense1_weight', 'dense1_bias'))
    assert heads == expected


def _torch_batchnorm1d_update(mean, var, x, momentum=0.1):
    """torch.nn.BatchNorm1d's running statistics after a training-mode forward of the batch ``x``
    (transcribed: the running variance moves towards the unbiased batch variance)."""
    n = x.shape[0]
    return ((1 - momentum) * mean + momentum * x.mean(0),
            (1 - momentum) * var + momentum * x.var(0) * n / (n - 1))


@pytest.mark.parametrize('devices,layer', [(1, 'gat'), (2, 'gat'), (2, 'fc')])
def test_the_vector_batchnorms_keep_pytorchs_running_statistics(devices, layer):
    """Three training steps of the HGAT-FC network (BatchNorm1D in every BasicLinear and residual block):
    every vector BatchNorm's running mean and variance equal torch.nn.BatchNorm1d's update on the inputs it
    saw, on each device (batch 7 over two devices: 4 and 3); with --hgat-layer fc, layer 2's BatchNorms see
    every node of a sample (n = batch x nodes). The paper's network has no such layer, so its BatchNorms keep
    MXNet's update."""
    import mxnet as mx
    from mxnet import nd
    from backbone import all_blocks
    from engine import config, steps
    from engine.build import build_net
    from engine.trainers import StageTrainers
    from losses import PredictionHistory, VAALoss
    ctx = [mx.cpu(i) for i in range(devices)]
    cfg = config.defaults(head='hgat', num_classes=4, hgat_groups='contiguous:2', input_size=48,
                          hgat_group_channels=16, hgat_class_channels=8, hgat_layer=layer)
    net = build_net(cfg, ctx)
    layers = [b for b in all_blocks(net) if type(b) is BatchNorm1D]
    assert (layer == 'fc') == any(b.rows_per_sample == 2 for b in layers)   # 2 attributes per group
    assert len(layers) > 10
    seen = {id(b): [] for b in layers}
    for b in layers:
        b.register_forward_hook(lambda block, inputs, output: seen[id(block)].append(inputs[0].asnumpy()))
    expected = {id(b): [(p.running_mean.data(c).asnumpy().astype(np.float64),
                         p.running_var.data(c).asnumpy().astype(np.float64)) for c in ctx] for p, b in
                zip(layers, layers)}
    trainers = StageTrainers(net, ctx, 'sgd', {'learning_rate': 0.01})
    rng = np.random.RandomState(0)
    for step in range(3):
        x = nd.array(rng.normal(size=(7, 3, 48, 48)))
        y = nd.array((rng.rand(7, 4) < 0.5).astype(np.float32))
        steps.train_step(net, VAALoss(), trainers, PredictionHistory(7, 4), (x, y, nd.ones_like(y),
                                                                            nd.arange(7)), 0, ctx)
    mx.nd.waitall()
    for b in layers:
        inputs = seen[id(b)]                       # per step, the devices in order
        for k, c in enumerate(ctx):
            mean, var = expected[id(b)][k]
            for x in inputs[k::devices]:
                mean, var = _torch_batchnorm1d_update(mean, var, x.astype(np.float64))
            np.testing.assert_allclose(b.running_mean.data(c).asnumpy(), mean, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(b.running_var.data(c).asnumpy(), var, rtol=1e-5, atol=1e-6)
    paper = build_net(config.defaults(num_classes=4, input_size=48))
    assert not [b for b in all_blocks(paper) if isinstance(b, BatchNorm1D)]


def test_the_pytorch_running_variance_holds_in_the_hybridized_network_train_py_runs():
    """train.py hybridizes with static_alloc and MXNet's threaded engine runs the step's operators as their
    inputs are ready: the correction must wait for the BatchNorm update it corrects (MXNet writes the running
    statistics in the backward pass). The HGAT-FC network hybridized as train.py runs it, four steps: every
    vector BatchNorm's running statistics equal those of the same network run imperatively (checked against
    torch's update above). An unordered correction lands before or after MXNet's own update by chance."""
    import mxnet as mx
    from mxnet import nd
    from backbone import all_blocks
    from engine import config, steps
    from engine.build import build_net
    from engine.trainers import StageTrainers
    from losses import PredictionHistory, VAALoss
    cfg = config.defaults(head='hgat', num_classes=4, hgat_groups='contiguous:2', input_size=48,
                          hgat_group_channels=16, hgat_class_channels=8)
    stats = []
    for hybrid in (False, True):
        mx.random.seed(3)
        net = build_net(cfg, [mx.cpu()])
        if hybrid:
            net.hybridize(static_alloc=True, static_shape=True)
        trainers = StageTrainers(net, [mx.cpu()], 'sgd', {'learning_rate': 0.01})
        rng, history = np.random.RandomState(0), PredictionHistory(6, 4)
        for _ in range(4):
            x = nd.array(rng.normal(size=(6, 3, 48, 48)))
            y = nd.array((rng.rand(6, 4) < 0.5).astype(np.float32))
            steps.train_step(net, VAALoss(), trainers, history, (x, y, nd.ones_like(y), nd.arange(6)), 0,
                             [mx.cpu()])
        mx.nd.waitall()
        stats.append([(b.running_mean.data().asnumpy(), b.running_var.data().asnumpy())
                      for b in all_blocks(net) if type(b) is BatchNorm1D])
    for (mean, var), (hybrid_mean, hybrid_var) in zip(*stats):
        np.testing.assert_allclose(hybrid_mean, mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(hybrid_var, var, rtol=1e-4, atol=1e-5)



def _input_gradient_calls(root):
    """(file:line, call) of every place in the project's code (not its tests) that records or takes a
    gradient outside training mode: ``autograd.record(train_mode=False)``, ``autograd.predict_mode()``,
    ``autograd.grad(...)`` or ``x.attach_grad()`` (an input's gradient)."""
    import ast
    import subprocess
    files = subprocess.run(['git', 'ls-files', '*.py'], cwd=root, stdout=subprocess.PIPE,
                           universal_newlines=True, check=True).stdout.split()
    found = []
    for name in files:
        if name.startswith('tests/'):
            continue
        for node in ast.walk(ast.parse(open(os.path.join(root, name)).read(), name)):
            if not isinstance(node, ast.Call):
                continue
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, 'id', '')
            inference = func == 'record' and any(
                k.arg == 'train_mode' and not (isinstance(k.value, ast.Constant) and k.value.value is True)
                for k in node.keywords)
            if inference or func in ('predict_mode', 'attach_grad') or (
                    func == 'grad' and isinstance(node.func, ast.Attribute)
                    and getattr(node.func.value, 'id', '') == 'autograd'):
                found.append('%s:%d %s' % (name, node.lineno, func))
    return found


def test_no_code_takes_gradients_in_inference_mode_where_max_pooling_routes_them_wrong():
    """A known MXNet 1.9.1 trap (docs/cpus.md): with oneDNN on, the gradient of GlobalMaxPool2D recorded
    with ``autograd.record(train_mode=False)`` does not go to the maximum (in training mode, and with
    oneDNN off, it does). The networks max-pool (HGAT-FC's head, ML-GCN's), so a saliency map or an export
    check that takes input gradients in inference mode would be silently wrong. Pinned: the trap as this
    MXNet has it, and no code path of the project takes such gradients."""
    import mxnet as mx
    from mxnet import autograd, nd
    from mxnet.gluon import nn
    x = nd.array(np.random.RandomState(0).rand(1, 2, 3, 3))
    at = {}
    for train_mode in (True, False):
        xx = x.copy()
        xx.attach_grad()
        with autograd.record(train_mode=train_mode):
            y = nn.GlobalMaxPool2D()(xx)
        y.backward()
        at[train_mode] = xx.grad.asnumpy().reshape(2, 9).argmax(1).tolist()
    argmax = x.asnumpy().reshape(2, 9).argmax(1).tolist()
    assert at[True] == argmax
    if mx.runtime.Features().is_enabled('MKLDNN') and os.environ.get('MXNET_MKLDNN_ENABLED', '1') != '0':
        assert at[False] != argmax, 'MXNet routes these gradients right now: update docs/cpus.md and here'
    assert _input_gradient_calls(ROOT) == [], (
        'gradients taken outside training mode (wrong through max pooling with oneDNN: docs/cpus.md)')
