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


def thread_settings(environ=None):
    """Set, where the user has not, the thread settings MXNet reads when it is imported: OpenMP threads =
    the number of cores (``OMP_NUM_THREADS``; MXNet alone would use one here) and copies on the calling
    thread only (``MXNET_CPU_PARALLEL_SIZE``, see ``SERIAL_COPIES``). Returns the line train.py logs."""
    environ = os.environ if environ is None else environ
    if 'MXNET_CPU_PARALLEL_SIZE' not in environ:
        environ['MXNET_CPU_PARALLEL_SIZE'] = SERIAL_COPIES
    if 'OMP_NUM_THREADS' in environ:
        return 'OMP_NUM_THREADS=%s' % environ['OMP_NUM_THREADS']
    environ['OMP_NUM_THREADS'] = str(os.cpu_count() or 1)
    return 'OMP_NUM_THREADS was not set; using %s (the number of cores)' % environ['OMP_NUM_THREADS']


def describe():
    """One line: model, cores, SIMD level, and the oneDNN cap if ``DNNL_MAX_CPU_ISA`` is set."""
    cap = os.environ.get('DNNL_MAX_CPU_ISA') or os.environ.get('MKLDNN_MAX_CPU_ISA')
    return 'CPU: %s, %d cores, %s%s' % (cpu_model(), os.cpu_count() or 1, simd_level(),
                                        '; oneDNN capped at %s (DNNL_MAX_CPU_ISA)' % cap if cap else '')


if __name__ == '__main__':
    print(describe())
