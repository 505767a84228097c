#!/usr/bin/env python
"""Every network the project builds, one training step and the evaluation forward passes, at one oneDNN
ISA level: the subprocess behind ``tests/test_portability.py``.

    python tests/isa_probe.py OUT_DIR [SYSTEM ...]        # at the level of DNNL_MAX_CPU_ISA (unset: native)
    python tests/isa_probe.py --matrix                    # every level this CPU has; prints the matrix

MXNet's oneDNN picks its kernels by ISA when it starts, so a level is a process: the test runs this
script once per level (``DNNL_MAX_CPU_ISA=SSE41|AVX2|AVX512_CORE``, and unset). For each system it
writes ``OUT_DIR/<system>.npz`` when the system is done and names the system in ``OUT_DIR/progress``
before it starts, so that a crash in native code (a segmentation fault) is charged to that system and
the run can go on with the next ones in a new process (:func:`run_level`).

What each system computes (resnet18_v1 at 64 pixels, batch 4, 5 attributes, random weights from a fixed
seed): what ``train.py`` builds from its flags (``config.defaults`` -> ``model.build_net``, the losses,
the per-stage Trainers), hybridized; one step in the first phase (backbone frozen, its BatchNorms on the
stored statistics) and one end to end (``steps.train_step``); then in inference mode the hybridized
forward pass, the same imperatively, and the forward pass with the attention maps (``eval.py --image``).
Saved: the losses, the training logits, every output of the three forward passes, and each parameter's
change over the two steps.
"""
import os
import sys

os.environ.setdefault('OMP_NUM_THREADS', '2')
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from common.machine import cpu_flags  # noqa: E402  (imports nothing heavy)

# name -> train.py settings (by their config keys). Every system the project builds is here:
# tests/test_portability.py fails when a --head choice or a related-system switch has no entry.
SYSTEMS = {
    'paper': dict(preset='paper'),
    'upstream': dict(preset='upstream'),
    'demo': dict(preset='demo'),
    'rga': dict(preset='paper', rga='sc', rga_stages='1,2,3,4'),
    'gcn': dict(preset='paper', head='gcn'),
    'hgat': dict(preset='paper', head='hgat', hgat_groups='contiguous:2'),
    'mcloss': dict(preset='paper', mc_loss=True),
    'apcnn': dict(preset='paper', head='apcnn'),
}
# oneDNN's names (DNNL_MAX_CPU_ISA), lowest first, with the /proc/cpuinfo flags each needs.
LEVELS = (('SSE41', ('sse4_1',)), ('AVX2', ('avx2', 'fma')),
          ('AVX512_CORE', ('avx512f', 'avx512bw', 'avx512vl', 'avx512dq')))
NATIVE = 'native'           # DNNL_MAX_CPU_ISA unset: the machine's own level
BATCH, SIZE, CLASSES = 4, 64, 5


def levels():
    """[(level, reason to skip or None)] for SSE41, AVX2, AVX512_CORE and the native level."""
    flags = cpu_flags()
    out = []
    for name, needs in LEVELS:
        missing = [f for f in needs if flags is not None and f not in flags]
        out.append((name, 'this CPU lacks %s' % ', '.join(missing) if missing else None))
    return out + [(NATIVE, None)]


def probe(name, settings):
    """The arrays of one system (module docstring)."""
    import numpy as np
    import mxnet as mx
    from mxnet import nd

    from engine import config
    from engine import steps
    import train
    from engine import loop
    from engine.build import build_net

    class Split(object):
        """What the losses and the ML-GCN graph read of a training split."""
        def __init__(self, labels):
            self.labels, self.mask = labels, np.ones_like(labels)

        def __len__(self):
            return len(self.labels)

    rng = np.random.RandomState(0)
    mx.random.seed(0)
    split = Split((rng.rand(16, CLASSES) < 0.4).astype(np.float32))
    cfg = config.defaults(backbone='resnet18_v1', input_size=SIZE, num_classes=CLASSES, dataset=None,
                          batch_size=BATCH, pretrained=False, freeze_epochs=1, optimizer='sgd', lr=1e-8,
                          history_start=0, history_track=2, **settings)
    ctx = [mx.cpu()]
    net = build_net(cfg, ctx, labels=split.labels, mask=split.mask)
    loss, history = train.get_losses(cfg, split, ctx)
    trainers, _ = train.get_trainers(cfg, net, loop.Place(ctx, None, 0, 1))
    net.hybridize(static_alloc=True, static_shape=True)
    loss.hybridize(static_alloc=True, static_shape=True)
    x_eval = nd.array(rng.normal(size=(BATCH, 3, SIZE, SIZE)).astype(np.float32))
    out = {}
    evaluate(net, x_eval, 'before', out)        # the same weights at every level: the inference kernels
    for epoch in (0, 1):                        # the first phase (frozen backbone), then end to end
        trainers.set_phase(epoch, loss)
        mx.random.seed(10 + epoch)
        x = nd.array(rng.normal(size=(BATCH, 3, SIZE, SIZE)).astype(np.float32))
        y = nd.array((rng.rand(BATCH, CLASSES) < 0.4).astype(np.float32))
        batch = (x, y, nd.ones_like(y), nd.arange(BATCH * epoch, BATCH * (epoch + 1), dtype='int64'))
        net.return_aux = loss.aux is not None             # as train.py's epochs
        step = steps.train_step(net, loss, trainers, history, batch, epoch, ctx)
        out['train%d_loss' % epoch] = step.loss.asnumpy()
        out['train%d_logits' % epoch] = step.logits[0].asnumpy()
        for key, p in net.collect_params().items():     # the backward kernels
            if p.grad_req != 'null':
                out['train%d_grad:%s' % (epoch, key[len(net.prefix):])] = p.grad().asnumpy()
    evaluate(net, x_eval, 'after', out)         # the trained weights and moved BatchNorm statistics
    return out


def evaluate(net, x, when, out):
    """The inference-mode outputs: hybridized, imperative, and with the attention maps (eval.py --image)."""
    if net.return_aux:
        net.return_aux = False
    for mode in ('hybrid', 'imperative'):
        net.hybridize(active=mode == 'hybrid', static_alloc=True, static_shape=True)
        primary, taps, fused = net(x)[:3]
        out['%s_%s_primary' % (when, mode)], out['%s_%s_fused' % (when, mode)] = primary.asnumpy(
            ), fused.asnumpy()
        for i, tap in enumerate(taps):
            out['%s_%s_tap%d' % (when, mode, i)] = tap.asnumpy()
    net.hybridize(static_alloc=True, static_shape=True)
    net.return_attention = True
    for i, m in enumerate(net(x).maps):
        out['%s_attention%d' % (when, i)] = m.asnumpy()
    net.return_attention = False


def main(argv):
    if argv[:1] == ['--matrix']:
        return print_matrix()
    folder, names = argv[0], argv[1:] or list(SYSTEMS)
    import numpy as np
    for name in names:
        with open(os.path.join(folder, 'progress'), 'a') as f:
            f.write(name + '\n')
        arrays = probe(name, SYSTEMS[name])
        np.savez(os.path.join(folder, name + '.npz'), **arrays)
    return 0


# ------------------------------------------------------------------------------------------------- driver
def run_level(level, folder, names=None, timeout=None):
    """Run the probe at ``level`` for ``names`` (default: every system) in subprocesses, results in
    ``folder``. A process that dies charges its signal to the system it was running and the others run
    in a new process. Returns ``{system: None (ok) or a failure text}``."""
    import signal
    import subprocess
    os.makedirs(folder, exist_ok=True)
    env = dict(os.environ)
    env.pop('DNNL_MAX_CPU_ISA', None)
    env.pop('MKLDNN_VERBOSE', None)
    env.pop('DNNL_VERBOSE', None)
    if level != NATIVE:
        env['DNNL_MAX_CPU_ISA'] = level
    env['MXNET_ENGINE_TYPE'] = env.get('MXNET_ENGINE_TYPE', 'ThreadedEnginePerDevice')
    # Two OpenMP threads at every level, as TOLERANCE was measured (the suite's workers run one each): with
    # one thread RGA's worst layer at SSE4.1 came to 0.11 of the native level's, another rounding order.
    env['OMP_NUM_THREADS'] = '2'
    todo, failed = list(names or SYSTEMS), {}
    progress = os.path.join(folder, 'progress')
    while todo:
        if os.path.exists(progress):
            os.remove(progress)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), folder] + todo, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
        started = open(progress).read().split() if os.path.exists(progress) else []
        done = [n for n in todo if os.path.exists(os.path.join(folder, n + '.npz'))]
        if proc.returncode == 0:
            break
        culprit = started[-1] if started and started[-1] not in done else (todo[0] if not started else None)
        code = proc.returncode
        how = ('killed by %s' % signal.Signals(-code).name if code < 0 else
               'exit status %d%s' % (code, ' (SIGABRT: an abort in native code)' if code == 134 else
                                     ' (a crash in native code: %s)' % signal.Signals(code - 128).name
                                     if 128 < code < 160 else ''))
        text = proc.stdout.decode('utf-8', 'replace')
        if 'Segmentation fault' in text and 'SEGV' not in how:
            how += ', after a segmentation fault (MXNet turns it into an abort)'
        tail = text.strip().splitlines()[-15:]
        if culprit is None:
            raise RuntimeError('isa_probe at %s failed (%s) outside any system:\n%s' % (level, how, '\n'.join(
                tail)))
        failed[culprit] = '%s at DNNL_MAX_CPU_ISA=%s: %s; its last output:\n%s' % (
            culprit, level if level != NATIVE else '(unset)', how, '\n'.join(tail))
        todo = [n for n in todo if n not in done and n != culprit]
    return {n: failed.get(n) for n in (names or SYSTEMS)}


# What "the same numbers" means between two levels (two kernel paths, float32). Measured against a float64
# computation of the same step (MXNet's own kernels, MXNET_MKLDNN_ENABLED=0, the network cast to float64),
# resnet18_v1 at 64 pixels: the forward outputs of every level are within 1e-4 of it; the whole gradient
# within 1e-4 (AVX-512), 1e-3 (SSE4.1) and 4e-3 to 7e-3 (AVX2, and MXNet's float32 kernels), in L2, its
# worst single layer 2e-2 (RGA). A wrong kernel (a wrong axis, a dropped term, a stale cached primitive)
# is off by its whole size. Hence: forward outputs to 1e-3 of max(1, their scale) (logits, probabilities,
# attention maps), each step's gradient of all parameters as one vector to 3e-2 in L2 norm, and each
# parameter's gradient to 1e-1 in L2, for the parameters whose gradient is at least 1% of the step's
# largest (the others hold rounding noise: a conv bias before a BatchNorm has a gradient of exactly zero).
TOLERANCE = dict(forward=1e-3, gradient=3e-2, layer=1e-1)


def compare(folder_a, folder_b, name):
    """How far level a's arrays of ``name`` are from level b's: ``{'forward': max |a - b| / max(1, max |b|)
    over the losses, logits and attention maps; 'gradient': the largest ||g_a - g_b|| / ||g_b|| over the
    training steps, each step's gradients of all parameters as one vector; 'layer': the largest such
    ratio of one parameter (those of at least 1% of the step's largest norm)}`` (:data:`TOLERANCE`).
    Raises ValueError when the two hold different arrays."""
    import numpy as np
    a, b = np.load(os.path.join(folder_a, name + '.npz')), np.load(os.path.join(folder_b, name + '.npz'))
    if set(a.files) != set(b.files) or any(a[k].shape != b[k].shape for k in a.files):
        raise ValueError('%s: the two levels computed different arrays: %s' % (
            name, sorted(set(a.files) ^ set(b.files)) or [k for k in a.files if a[k].shape != b[k].shape]))
    forward, steps = 0.0, {}
    for key in a.files:
        x, y = a[key].astype(np.float64), b[key].astype(np.float64)
        if '_grad:' in key:
            steps.setdefault(key.split('_grad:')[0], []).append((((x - y) ** 2).sum(), (y ** 2).sum()))
        elif y.size:
            forward = max(forward, float(np.abs(x - y).max()) / max(1.0, float(np.abs(y).max())))
    gradient = layer = 0.0
    for pairs in steps.values():
        num, den = sum(n for n, _ in pairs), sum(d for _, d in pairs)
        gradient = max(gradient, np.sqrt(num / den) if den > 0 else 0.0)
        largest = max(d for _, d in pairs)
        layer = max([layer] + [np.sqrt(n / d) for n, d in pairs if d > 0 and d >= 1e-4 * largest])
    return dict(forward=forward, gradient=float(gradient), layer=float(layer))


def agrees(difference):
    """Whether a :func:`compare` result is within :data:`TOLERANCE`."""
    return all(difference[k] <= TOLERANCE[k] for k in TOLERANCE)


def print_matrix():
    import tempfile
    root = tempfile.mkdtemp(prefix='isa-matrix-')
    results = {}
    for level, skip in levels():
        if skip:
            print('%s: skipped (%s)' % (level, skip))
            continue
        results[level] = run_level(level, os.path.join(root, level))
    print('| system | ' + ' | '.join(results) + ' |')
    print('|---|' + '---|' * len(results))
    for name in SYSTEMS:
        cells = []
        for level, res in results.items():
            if res[name]:
                cells.append('CRASH (%s)' % res[name].split('\n')[0].split(': ', 1)[-1])
            elif level == NATIVE:
                cells.append('ok (reference)')
            elif results[NATIVE][name]:
                cells.append('ok (no reference)')
            else:
                d = compare(os.path.join(root, level), os.path.join(root, NATIVE), name)
                cells.append('%s: %.0e / %.0e / %.0e' % (
                    'ok' if agrees(d) else 'DIFFERS', d['forward'], d['gradient'], d['layer']))
        print('| %s | %s |' % (name, ' | '.join(cells)))
    print('(against the native level: forward / gradient / worst layer, tolerances %g / %g / %g '
          '(isa_probe.TOLERANCE); arrays in %s)' % (TOLERANCE['forward'], TOLERANCE['gradient'],
                                                    TOLERANCE['layer'], root))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
