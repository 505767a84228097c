#!/usr/bin/env python
"""The GPU set-up: the mxnet GPU build, the CUDA libraries it needs, and the preflight of ``--gpus``.

``mxnet-cu112`` 1.9.1 bundles no CUDA library. It needs the CUDA 11 runtime libraries (cudart, cuBLAS,
cuFFT, cuRAND, cuSOLVER, NVRTC, NVTX), cuDNN 8 and NCCL 2, which the ``cu112`` extra installs as NVIDIA's pip
wheels (:data:`CUDA_WHEELS`), and the NVIDIA driver's ``libcuda.so.1``, which only the driver provides.
Its machine code is for compute capabilities 5.0, 6.0, 7.0, 8.0 and 8.6 and it carries no PTX, so a GPU
runs it when the build has code of its major version at or below its minor version (8.9 runs the 8.6
code) and cannot run it otherwise (Hopper, 9.0).

* :func:`prepare` (first thing in every script, via ``startup.preparse``): with a GPU build installed, makes
  the wheels' libraries visible (``LD_LIBRARY_PATH``, set and the script started again once) and imports
  mxnet, turning a library that cannot be loaded into one line naming it and the set-up command.
* :func:`preflight` (``distributed.parse_contexts`` whenever ``--gpus`` is given): the GPUs mxnet sees,
  each one's name, compute capability and free memory, and one line (exit 2) for a GPU the build has no
  kernels for.

    python -m engine.gpu                  # what this machine has: the mxnet build, the libraries, the GPUs
    python -m engine.gpu --library-path   # the CUDA wheels' folders (run.sh puts them in LD_LIBRARY_PATH)
    python -m engine.gpu --check-install  # the GPU build in a throwaway venv: does every library resolve?
"""
import ctypes
import glob
import os
import re
import subprocess
import sys

from common.errors import UserError

# The pip wheels that provide what mxnet-cu112 1.9.1's libmxnet.so links (readelf -d), newest CUDA 11 ones;
# cuDNN pinned to 8.x for libcudnn.so.8 (nvidia-cudnn-cu11's newest is 9.x).
CUDA_WHEELS = ('nvidia-cuda-runtime-cu11==11.8.89', 'nvidia-cublas-cu11==11.11.3.6',
               'nvidia-cufft-cu11==10.9.0.58', 'nvidia-curand-cu11==10.3.0.86',
               'nvidia-cusolver-cu11==11.4.1.48', 'nvidia-cuda-nvrtc-cu11==11.8.89',
               'nvidia-cudnn-cu11==8.9.6.50', 'nvidia-nccl-cu11==2.21.5', 'nvidia-nvtx-cu11==11.8.86')
# What each GPU build has machine code for (its build config, MXNET_CUDA_ARCH) and whether it carries PTX.
BUILDS = {
    'mxnet-cu112': dict(cuda='11.2', arches=((5, 0), (6, 0), (7, 0), (8, 0), (8, 6)), ptx=False),
    'mxnet-cu117': dict(cuda='11.7', arches=((5, 0), (6, 0), (7, 0), (8, 0), (8, 6)), ptx=False),
}
DRIVER_LIBRARY = 'libcuda.so.1'
SETUP = 'VAA_MXNET=cu112 ./run.sh train --gpus 0'
MARK = 'VAA_CUDA_LIBRARY_PATH_SET'          # set once the script has been started again with the path


def installed_builds():
    """The mxnet distributions installed (``mxnet`` is the CPU build), as pip names them."""
    from importlib import metadata
    found = []
    for dist in metadata.distributions():
        name = (dist.metadata['Name'] or '').lower().replace('_', '-')
        if name == 'mxnet' or name.startswith('mxnet-cu'):
            found.append(name)
    return sorted(set(found))


def gpu_build(builds=None):
    """The installed GPU build's name, or None for the CPU build (or none)."""
    builds = installed_builds() if builds is None else builds
    return next((b for b in builds if b.startswith('mxnet-cu')), None)


def library_dirs():
    """The ``lib`` folders of the installed NVIDIA wheels (``site-packages/nvidia/*/lib``)."""
    import importlib.util
    spec = importlib.util.find_spec('nvidia')
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for root in spec.submodule_search_locations:
        dirs += sorted(d for d in glob.glob(os.path.join(root, '*', 'lib')) if os.path.isdir(d))
    return dirs


def prepare(argv=None):
    """Before mxnet is imported: with a GPU build, put the CUDA wheels' folders in ``LD_LIBRARY_PATH``
    (the loader reads it only at start, so the script is started again, once), then import mxnet; a
    library that cannot be loaded stops with one line naming it and the fix."""
    build = gpu_build()
    if build is not None and not os.environ.get(MARK):
        dirs = library_dirs()
        current = [d for d in os.environ.get('LD_LIBRARY_PATH', '').split(os.pathsep) if d]
        if dirs and not set(dirs) <= set(current):
            os.environ['LD_LIBRARY_PATH'] = os.pathsep.join(dirs + current)
            os.environ[MARK] = '1'
            argv = sys.argv if argv is None else argv
            os.execv(sys.executable, [sys.executable] + list(argv))
    try:
        import_mxnet()
    except (OSError, ImportError) as err:
        sys.stderr.write('error: %s\n' % explain_import_error(err, build))
        sys.exit(2)


def import_mxnet():
    """``import mxnet`` without scikit-learn: mxnet.model imports it only for the base class of its legacy
    FeedForward estimator (``object`` without it), 0.8 of the 2.9 s mxnet takes to import. The demo dataset
    imports scikit-learn itself when it needs its digits."""
    if 'mxnet' in sys.modules:
        return
    block = 'sklearn' not in sys.modules
    if block:
        sys.modules['sklearn'] = None           # import sklearn raises ImportError, which mxnet catches
    try:
        import mxnet  # noqa: F401
    finally:
        if block and sys.modules.get('sklearn', 0) is None:
            del sys.modules['sklearn']


def explain_import_error(err, build=None):
    """One line for an mxnet that cannot be imported: the library that is missing and what to do."""
    text = str(err)
    missing = re.search(r'(lib[\w.+-]+\.so[\d.]*): cannot open shared object file', text)
    if missing and missing.group(1) == DRIVER_LIBRARY:
        return ("mxnet (%s) needs the NVIDIA driver's %s, which is not installed or not visible: install the "
                "NVIDIA driver (nvidia-smi must work), or use the CPU build: VAA_MXNET=cpu ./run.sh train"
                % (build or 'GPU build', DRIVER_LIBRARY))
    if missing:
        return ('mxnet (%s) cannot load %s: the CUDA libraries are installed by the set-up command, %s '
                '(it installs them as pip wheels; python -m engine.gpu lists what is there)'
                % (build or 'the installed build', missing.group(1), SETUP))
    if isinstance(err, ImportError) and getattr(err, 'name', None) == 'mxnet':
        return not_in_environment()
    return 'mxnet cannot be imported (%s: %s); install it again with ./run.sh setup (or %s)' % (
        type(err).__name__, text.splitlines()[0] if text else '', SETUP)


def not_in_environment(argv=None):
    """The line for a script started by an interpreter that lacks mxnet: the project lives in the checkout's
    .venv (run.sh makes it), so say so, with this very command as that environment runs it."""
    import shlex
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    venv = os.path.join(checkout, '.venv', 'bin', 'python')
    here = os.path.relpath(venv) if os.path.abspath(os.getcwd()) == checkout else venv
    argv = sys.argv if argv is None else argv
    again = ' '.join(shlex.quote(w) for w in [here] + list(argv))
    if os.path.isfile(venv):
        folder = os.path.dirname(os.path.dirname(here))
        return ('this Python (%s) has no mxnet: the project is installed in %s; run %s (or `source %s` '
                'first, and then python as before)' % (sys.executable, folder, again,
                                                         os.path.join(folder, 'bin', 'activate')))
    return ('this Python (%s) has no mxnet and the project is not set up yet: ./run.sh setup installs it '
            'into .venv; then run %s' % (sys.executable, again))


# ---------------------------------------------------------------------------------------------- the GPUs

def runs_on(capability, build):
    """How ``build`` runs on a GPU of ``capability`` (major, minor): 'native', 'compatible' (code of a
    lower minor version of the same major), 'ptx', or None (no kernels)."""
    info = BUILDS.get(build)
    if info is None:
        return 'unknown'
    if tuple(capability) in info['arches']:
        return 'native'
    same_major = [a for a in info['arches'] if a[0] == capability[0] and a[1] <= capability[1]]
    if same_major:
        return 'compatible'
    if info['ptx'] and any(a <= tuple(capability) for a in info['arches']):
        return 'ptx'
    return None


def query():
    """The GPUs in CUDA's order (as mxnet numbers them): [{index, name, capability, total_mib}], from
    the driver's ``libcuda.so.1``; [] without a driver."""
    try:
        cuda = ctypes.CDLL(DRIVER_LIBRARY)
    except OSError:
        return []
    if cuda.cuInit(0) != 0:
        return []
    count = ctypes.c_int()
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return []
    found = []
    for i in range(count.value):
        device, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        name, total = ctypes.create_string_buffer(256), ctypes.c_size_t()
        cuda.cuDeviceGet(ctypes.byref(device), i)
        cuda.cuDeviceGetName(name, 256, device)
        cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device)     # ..._COMPUTE_CAPABILITY_MAJOR
        cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)     # ..._COMPUTE_CAPABILITY_MINOR
        cuda.cuDeviceTotalMem_v2(ctypes.byref(total), device)
        found.append(dict(index=i, name=name.value.decode(errors='replace'),
                          capability=(major.value, minor.value),
                          total_mib=total.value // 2 ** 20))
    return found


# What a CPU costs instead, for the refusal below (2 cores, training images/s of `tools/benchmark.py --only
# model --batch 32`, validation not counted): ResNet-101 at 224 from docs/speed.md; ResNet-18 at 128 measured
# on an AMD EPYC (AVX2): 17.4 images/s.
CPU_SMALL = 'about 17 images/s: 22 minutes per epoch and 15 h for the 40'
CPU_ALTERNATIVE = ("train on the CPU instead (VAA_MXNET=cpu ./run.sh train ...): the paper's network "
                   '(ResNet-101 at 224) trains about 4.8 images/s on 2 cores, 1.3 h per WIDER epoch of '
                   '23,000 crops and 53 h for the 40 epochs; with --backbone resnet18_v1 --input-size 128, %s'
                   % CPU_SMALL)


def _nvidia_smi(smi):
    """[(index, name, (major, minor))] of the GPUs nvidia-smi lists; UserError without nvidia-smi or GPUs."""
    try:
        out = subprocess.run([smi, '--query-gpu=name,compute_cap', '--format=csv,noheader'],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                             timeout=60)
    except OSError:
        raise UserError('VAA_MXNET=cu112 installs the GPU build, which needs an NVIDIA GPU and its driver: '
                        'nvidia-smi was not found, so nothing was installed; %s' % CPU_ALTERNATIVE)
    gpus = []
    for line in (l for l in out.stdout.splitlines() if l.strip()):
        name, _, cap = line.rpartition(',')
        try:
            gpus.append((len(gpus), name.strip(), tuple(int(v) for v in cap.strip().split('.'))))
        except ValueError:
            continue
    if not gpus:
        raise UserError('nvidia-smi lists no GPU (%s), so nothing was installed; %s'
                        % ((out.stderr or out.stdout).strip()[:200] or 'no output', CPU_ALTERNATIVE))
    return gpus


def before_install(build='mxnet-cu112', smi='nvidia-smi'):
    """Before the GPU build is installed (run.sh): the GPUs nvidia-smi lists and whether ``build`` runs on
    each. Returns the lines to print; UserError when none can run it (nothing has been downloaded yet)."""
    gpus = [(i, name, cap, runs_on(cap, build)) for i, name, cap in _nvidia_smi(smi)]
    if not any(how for _, _, _, how in gpus):
        i, name, cap, _ = gpus[0]
        codes = ', '.join('%d.%d' % a for a in BUILDS[build]['arches'])
        raise UserError('GPU %d, %s, has compute capability %d.%d; %s 1.9.1 has machine code for %s and no '
                        'PTX, and no MXNet CUDA wheel (cu110-cu117 1.9.1, cu112 2.0.0b1) has code for Hopper '
                        '(9.0) or Blackwell (10.x, 12.x): nothing was installed. Use a GPU of compute '
                        'capability 5.0 to 8.9, or %s'
                        % (i, name, cap[0], cap[1], build, codes, CPU_ALTERNATIVE))
    return ['gpu: GPU %d, %s (compute capability %d.%d): %s %s' % (
        i, name, cap[0], cap[1], 'runs' if how else 'cannot run', build) for i, name, cap, how in gpus]


def check(ids, build, devices, visible, free_mib=None):
    """The preflight's verdict: lines to print, or UserError. ``ids``: the --gpus ids; ``build``: the
    installed GPU build (None: the CPU build); ``devices``: :func:`query`'s answer; ``visible``: how many
    GPUs mxnet sees; ``free_mib``: {index: free MiB} where known."""
    from common.errors import UserError
    flag = ','.join(str(i) for i in ids)
    if build is None:
        raise UserError('--gpus %s, but the installed mxnet is the CPU build: install the GPU build with %s '
                        '(it needs only the NVIDIA driver), or drop --gpus' % (flag,
                                                                               SETUP.replace('0', flag)))
    missing = [i for i in ids if i >= visible]
    if missing:
        raise UserError('--gpus %s: mxnet sees %d GPU(s)%s; give ids below %d' % (
            flag, visible, ' (CUDA_VISIBLE_DEVICES=%s)' % os.environ['CUDA_VISIBLE_DEVICES']
            if 'CUDA_VISIBLE_DEVICES' in os.environ else '', visible) if visible else
            '--gpus %s: mxnet (%s) sees no GPU: is the NVIDIA driver installed (nvidia-smi)?' % (flag, build))
    info = BUILDS.get(build, {})
    arches = ', '.join('%d.%d' % a for a in info.get('arches', ()))
    lines = ['mxnet %s sees %d GPU(s)' % (build, visible)]
    by_index = {d['index']: d for d in devices}
    for i in ids:
        d = by_index.get(i)
        if d is None:
            lines.append('GPU %d: (its name and compute capability could not be read from the driver)' % i)
            continue
        cc = '%d.%d' % tuple(d['capability'])
        how = runs_on(d['capability'], build)
        free = (free_mib or {}).get(i)
        memory = ('%.1f of %.1f GiB free' % (free / 1024.0, d['total_mib'] / 1024.0) if free is not None
                  else '%.1f GiB' % (d['total_mib'] / 1024.0))
        if how is None:
            raise UserError(
                'GPU %d (%s) has compute capability %s, and %s has kernels only for %s and no PTX to compile '
                'for newer GPUs, so it cannot run there ("no kernel image is available"). Use another GPU '
                '(compute capability 5.0 to 8.9: V100, T4, A100, RTX 30xx/40xx...), the CPU (drop --gpus), '
                'or for inference export the model (eval.py RUN --export DIR) and run it with an ONNX '
                'runtime that supports this GPU' % (i, d['name'], cc, build, arches))
        note = {'native': 'native kernels', 'compatible': 'runs the %s kernels' % '%d.%d' % max(
            a for a in info['arches'] if a[0] == d['capability'][0] and a[1] <= d['capability'][1]),
            'ptx': 'kernels compiled from PTX', 'unknown': 'kernels of this build not known here'}[how]
        lines.append('GPU %d: %s, compute capability %s (%s), %s' % (i, d['name'], cc, note, memory))
    return lines


def preflight(ids, mx, log=None):
    """Check ``--gpus`` ``ids`` before any work (``mx``: the imported mxnet); prints what it found."""
    build = gpu_build()
    visible = mx.context.num_gpus() if build else 0
    devices = query() if build else []
    free = {}
    for d in devices:
        if d['index'] in ids and runs_on(d['capability'], build):
            try:
                free[d['index']] = mx.context.gpu_memory_info(d['index'])[0] // 2 ** 20
            except Exception:     # (an old driver or a busy GPU: the memory is only information)
                pass
    for line in check(ids, build, devices, visible, free):
        (log or print)(line)


# ---------------------------------------------------------------------------------------------- the check

def needed_libraries(libmxnet):
    """The DT_NEEDED entries of ``libmxnet`` (readelf -d)."""
    out = subprocess.run(['readelf', '-d', libmxnet], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, check=True).stdout
    return re.findall(r'\(NEEDED\)\s+Shared library: \[([^\]]+)\]', out)


def resolve(libmxnet, dirs):
    """{library: path or None} for what the loader finds for ``libmxnet`` with ``dirs`` in
    LD_LIBRARY_PATH (ldd)."""
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(dirs + [
        d for d in os.environ.get('LD_LIBRARY_PATH', '').split(os.pathsep) if d]))
    out = subprocess.run(['ldd', libmxnet], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         universal_newlines=True, env=env).stdout
    found = {}
    for line in out.splitlines():
        m = re.match(r'\s*(\S+) => (not found|(\S+))', line)
        if m:
            found[m.group(1)] = None if m.group(2) == 'not found' else m.group(3)
        elif re.match(r'\s*/\S+ \(0x', line):                  # the dynamic loader itself, by path
            path = line.split()[0]
            found[os.path.basename(path)] = path
    return found


def check_install(folder, build='mxnet-cu112==1.9.1', constraints=None):
    """Install ``build`` and :data:`CUDA_WHEELS` into a new venv in ``folder`` and check with ldd that
    everything libmxnet.so needs resolves but the driver's libcuda.so.1. Returns the exit status."""
    python = _install_venv(folder, build, constraints)
    site = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                          stdout=subprocess.PIPE, universal_newlines=True, check=True).stdout.strip()
    libmxnet = os.path.join(site, 'mxnet', 'libmxnet.so')
    dirs = sorted(d for d in glob.glob(os.path.join(site, 'nvidia', '*', 'lib')) if os.path.isdir(d))
    bad = _check_links(libmxnet, dirs) + _check_wheel_libraries(dirs)
    probe = subprocess.run([python, '-c', 'import mxnet'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           universal_newlines=True,
                           env=dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(dirs)))
    last = (probe.stdout.strip().splitlines() or [''])[-1]
    print('gpu-check: import mxnet: %s' % ('ok' if probe.returncode == 0 else last))
    if probe.returncode:
        print('gpu-check: what the scripts say then: error: %s' % explain_import_error(OSError(last),
                                                                                       build.split('==')[0]))
    if bad:
        print('gpu-check: missing %s' % ', '.join(bad))
        return 1
    print('gpu-check: every library resolves except %s, which the NVIDIA driver installs' % DRIVER_LIBRARY)
    return 0


def _install_venv(folder, build, constraints):
    """The venv of :func:`check_install` (reused when an earlier check installed it); returns its python."""
    import venv
    python = os.path.join(folder, 'bin', 'python')
    if glob.glob(os.path.join(folder, 'lib', 'python*', 'site-packages', 'mxnet', 'libmxnet.so')):
        print('gpu-check: checking the venv an earlier check installed in %s' % folder)
        return python
    print('gpu-check: creating a throwaway venv in %s' % folder)
    venv.create(folder, with_pip=True)
    command = [python, '-m', 'pip', 'install', '--quiet', build] + list(CUDA_WHEELS)
    command += ['-c', constraints] if constraints else []
    print('gpu-check: %s' % ' '.join(command[2:]))
    subprocess.run(command, check=True)
    return python


def _check_links(libmxnet, dirs):
    """Print where each library libmxnet.so links (and what those link) resolves; the missing names."""
    needed = needed_libraries(libmxnet)
    found = resolve(libmxnet, dirs)
    print('gpu-check: %s links %d libraries (readelf -d); with the wheels\' folders in LD_LIBRARY_PATH:'
          % (libmxnet, len(needed)))
    bad = []
    for name in needed:
        path = found.get(name)
        if path is None and name != DRIVER_LIBRARY:
            bad.append(name)
        missing = 'not found (the NVIDIA driver provides it)' if name == DRIVER_LIBRARY else 'NOT FOUND'
        print('  %-24s %s' % (name, path or missing))
    for name, path in sorted(found.items()):
        if name not in needed:
            print('  %-24s %s (needed by one of those)' % (name, path or 'NOT FOUND'))
            if path is None and name != DRIVER_LIBRARY:
                bad.append(name)
    return bad


def _check_wheel_libraries(dirs):
    """The libraries those load at run time (cuDNN's parts, cuBLASLt...): every .so in the wheels' folders
    must resolve its own dependencies; returns the names that do not."""
    parts = sorted(p for d in dirs for p in glob.glob(os.path.join(d, '*.so*')))
    unresolved = {}
    for part in parts:
        for name, path in resolve(part, dirs).items():
            if path is None and name != DRIVER_LIBRARY:
                unresolved.setdefault(name, []).append(os.path.basename(part))
    print('gpu-check: the %d libraries in the wheels\' folders (what those load at run time): %s' % (
        len(parts), 'every dependency resolves' if not unresolved else 'MISSING %s' % '; '.join(
            '%s (for %s)' % (n, ', '.join(w)) for n, w in sorted(unresolved.items()))))
    return sorted(unresolved)


def describe():
    """What this machine has for the GPU path, as lines."""
    builds = installed_builds()
    build = gpu_build(builds)
    lines = ['mxnet builds installed: %s' % (', '.join(builds) or 'none')]
    if build:
        dirs = library_dirs()
        wheels = ', '.join(os.path.basename(os.path.dirname(d)) for d in dirs)
        lines.append('CUDA wheels: %s' % (wheels or 'none'))
    devices = query()
    seen = '; '.join('%d %s %d.%d' % ((d['index'], d['name']) + tuple(d['capability'])) for d in devices)
    lines.append('GPUs (driver): %s' % (seen or 'none found'))
    for d in devices:
        how = runs_on(d['capability'], build) if build else None
        words = {None: 'no kernels in %s' % build if build else 'CPU build', 'native': 'native',
                 'compatible': 'compatible kernels', 'ptx': 'PTX', 'unknown': 'unknown build'}
        lines.append('  GPU %d: %s' % (d['index'], words[how]))
    return lines


if __name__ == '__main__':
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--library-path', action='store_true', help='print the CUDA wheels\' lib folders, '
                                                                     'joined by ":"')
    parser.add_argument('--check-install', metavar='DIR', nargs='?', const='',
                        help='install the GPU build into a throwaway venv (DIR, default a temporary folder) '
                             'and check its libraries with ldd (downloads a few GB)')
    parser.add_argument('--before-install', action='store_true',
                        help="the GPUs nvidia-smi lists and whether the GPU build runs on each (run.sh's "
                             'check before it installs the build)')
    args = parser.parse_args()
    if args.before_install:
        try:
            print('\n'.join(before_install()))
        except UserError as err:
            sys.stderr.write('error: %s\n' % err)
            sys.exit(2)
    elif args.library_path:
        print(os.pathsep.join(library_dirs()))
    elif args.check_install is not None:
        import tempfile
        checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        folder = args.check_install or tempfile.mkdtemp(prefix='vaa-gpu-check-')
        sys.exit(check_install(folder, constraints=os.path.join(checkout, 'constraints.txt')))
    else:
        print('\n'.join(describe()))
