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
from tests import isa_probe
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
                          stderr=subprocess.STDOUT, timeout=300)
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
