#!/usr/bin/env python
"""What machine this is, in one line for logs and bug reports: the CPU model, its cores and SIMD level
(SSE4.1 / AVX2 / AVX-512 / AMX, which decides the oneDNN kernels MXNet runs), and a ``DNNL_MAX_CPU_ISA``
cap when one is set. Imports nothing heavy (``run.sh test`` prints it before the suite starts), so the
scripts also take their thread settings from here before mxnet is imported (:func:`thread_settings`).

    python -m common.machine   # e.g. "CPU: Intel(R) Xeon(R) Processor, 2 cores, AVX-512 (avx512f ... ) + AMX"
"""
import os
import platform
import subprocess


def cpu_flags():
    """The CPU's feature flags (Linux ``/proc/cpuinfo``), or None where they cannot be read."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith(('flags', 'Features')):
                    return set(line.split(':', 1)[1].split())
    except OSError:
        pass
    return None


def cpu_model():
    """The CPU's model name, as the OS reports it."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    if platform.system() == 'Darwin':
        try:
            return subprocess.run(['sysctl', '-n', 'machdep.cpu.brand_string'], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL,
                                  timeout=5).stdout.decode().strip() or platform.processor()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or 'unknown CPU'


def simd_level(flags=None):
    """'AVX-512 (avx512f, avx512_bf16, avx512_vnni) + AMX', 'AVX2', 'AVX', 'SSE4.1', ... or 'unknown'."""
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return 'unknown (no /proc/cpuinfo)' if platform.machine() not in (
            'arm64', 'aarch64') else 'ARM (no x86 SIMD)'
    if 'avx512f' in flags:
        extras = [f for f in ('avx512_bf16', 'avx512_vnni', 'avx512_fp16') if f in flags]
        level = 'AVX-512 (%s)' % ', '.join(['avx512f'] + extras)
        return level + (' + AMX' if any(f.startswith('amx') for f in flags) else '')
    for flag, name in (('avx2', 'AVX2'), ('avx', 'AVX'), ('sse4_2', 'SSE4.2'), ('sse4_1', 'SSE4.1')):
        if flag in flags:
            return name
    return 'ARM (no x86 SIMD)' if 'asimd' in flags else 'below SSE4.1'


# MXNet copies an array of MXNET_CPU_PARALLEL_SIZE elements or more (default 200000, a 258 x 258 RGB
# image) with an OpenMP team of the thread that asks for the copy. Asked from a Python thread (nd.array of
# a batch, a data-loader worker), that is a team beside the engine's, and once a process has more OpenMP
# threads than cores, libgomp stops letting any of them spin between parallel regions: from then on every
# operator wakes its threads from sleep. Measured on 2 cores: ResNet-50 at batch 1, 45 ms per image
# before one such copy, 63 ms after it, for the rest of the process. A copy is memory-bound; one thread
# does it as fast.
SERIAL_COPIES = str(2 ** 31 - 1)


# What an OpenMP thread does while it waits for work. libgomp's default spins about 300,000 rounds after
# every parallel region (milliseconds on CPUs with a slow PAUSE); on a machine where another process uses
# a core, the spinning thread holds a core its partner needs and every operator waits for the scheduler:
# batch-1 inference of the paper's ResNet-50 dropped to 36% of its quiet speed with one busy process
# beside it. PASSIVE (the OpenMP standard's variable, honoured by every OpenMP runtime) sleeps at once:
# 59% kept there, and a whole demo training epoch is faster even on a quiet machine (less CPU burnt beside
# the data loader's threads); docs/speed.md, "Speed on a busy machine", has the table of candidates.
WAIT_SETTINGS = {'OMP_WAIT_POLICY': 'PASSIVE'}

# The variables that decide how MXNet's threads run, in the order the log names them.
THREAD_VARIABLES = ('OMP_NUM_THREADS', 'OMP_WAIT_POLICY', 'GOMP_SPINCOUNT', 'MXNET_CPU_PARALLEL_SIZE',
                    'MXNET_OMP_MAX_THREADS', 'MXNET_CPU_WORKER_NTHREADS', 'MXNET_ENGINE_TYPE')
_OURS = {}              # id(environ) -> (environ, the variables thread_settings set there); the environ is
                        # kept so that its id cannot pass to another dict


def thread_settings(environ=None):
    """Set, where the user has not, the thread settings MXNet reads when it is imported: OpenMP threads =
    the number of cores (``OMP_NUM_THREADS``; MXNet alone would use one here), copies on the calling
    thread only (``MXNET_CPU_PARALLEL_SIZE``, see ``SERIAL_COPIES``) and :data:`WAIT_SETTINGS`. A
    variable already in the environment is left as it is. Returns :func:`thread_summary`'s line."""
    environ = os.environ if environ is None else environ
    ours = dict(OMP_NUM_THREADS=str(os.cpu_count() or 1), MXNET_CPU_PARALLEL_SIZE=SERIAL_COPIES)
    if not any(name in environ for name in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')):
        ours.update(WAIT_SETTINGS)          # libgomp: GOMP_SPINCOUNT, when set, outranks OMP_WAIT_POLICY
    for name, value in ours.items():
        if name not in environ:
            environ[name] = value
            _OURS.setdefault(id(environ), (environ, set()))[1].add(name)
    return thread_summary(environ)


def _ours(environ):
    """The variables :func:`thread_settings` set in ``environ`` (not the user)."""
    kept, names = _OURS.get(id(environ), (None, set()))
    return names if kept is environ else set()


def thread_summary(environ=None):
    """The thread settings in force, one line: ``OMP_NUM_THREADS=2, GOMP_SPINCOUNT=... (ours: ...)``;
    the ones :func:`thread_settings` set are marked as defaults, the user's own as theirs."""
    environ = os.environ if environ is None else environ
    mine = _ours(environ)
    ours = ['%s=%s' % (n, environ[n]) for n in THREAD_VARIABLES if n in environ and n in mine]
    yours = ['%s=%s' % (n, environ[n]) for n in THREAD_VARIABLES if n in environ and n not in mine]
    parts = []
    if ours:
        parts.append('%s (defaults; set one yourself to override it)' % ', '.join(ours))
    if yours:
        parts.append('%s (from your environment)' % ', '.join(yours))
    return '; '.join(parts) or 'no thread settings'


def describe():
    """One line: model, cores, SIMD level, and the oneDNN cap if ``DNNL_MAX_CPU_ISA`` is set."""
    cap = os.environ.get('DNNL_MAX_CPU_ISA') or os.environ.get('MKLDNN_MAX_CPU_ISA')
    return 'CPU: %s, %d cores, %s%s' % (cpu_model(), os.cpu_count() or 1, simd_level(),
                                        '; oneDNN capped at %s (DNNL_MAX_CPU_ISA)' % cap if cap else '')


if __name__ == '__main__':
    print(describe())
