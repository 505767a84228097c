#!/usr/bin/env python
"""What machine this is, in one line for logs and bug reports: the CPU model, its cores and SIMD level
(SSE4.1 / AVX2 / AVX-512 / AMX, which decides the oneDNN kernels MXNet runs), and a ``DNNL_MAX_CPU_ISA``
cap when one is set. Imports nothing heavy (``run.sh test`` prints it before the suite starts).

    python machine.py        # e.g. "CPU: Intel(R) Xeon(R) Processor, 2 cores, AVX-512 (avx512f ... ) + AMX"
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


def describe():
    """One line: model, cores, SIMD level, and the oneDNN cap if ``DNNL_MAX_CPU_ISA`` is set."""
    cap = os.environ.get('DNNL_MAX_CPU_ISA') or os.environ.get('MKLDNN_MAX_CPU_ISA')
    return 'CPU: %s, %d cores, %s%s' % (cpu_model(), os.cpu_count() or 1, simd_level(),
                                        '; oneDNN capped at %s (DNNL_MAX_CPU_ISA)' % cap if cap else '')


if __name__ == '__main__':
    print(describe())
