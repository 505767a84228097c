"""The GPU set-up without a GPU: the preflight's verdicts for faked GPUs, the CPU build's refusal, a CUDA
library that cannot be loaded, and the scripts started again with the CUDA wheels' folders visible."""
import os
import subprocess
import sys

import pytest

from engine import gpu
from common.errors import UserError
from tests import fixtures

ROOT = fixtures.ROOT

A100 = dict(index=0, name='NVIDIA A100-SXM4-40GB', capability=(8, 0), total_mib=40960)
RTX4090 = dict(index=1, name='NVIDIA GeForce RTX 4090', capability=(8, 9), total_mib=24564)
H100 = dict(index=2, name='NVIDIA H100 80GB HBM3', capability=(9, 0), total_mib=81559)


def test_which_gpus_the_cu112_build_runs_on():
    # machine code for 5.0, 6.0, 7.0, 8.0, 8.6 and no PTX: same major, minor at or above the code's
    table = {(3, 7): None, (5, 0): 'native', (5, 2): 'compatible', (6, 1): 'compatible', (7, 0): 'native',
             (7, 5): 'compatible', (8, 0): 'native', (8, 6): 'native', (8, 7): 'compatible',
             (8, 9): 'compatible', (9, 0): None, (10, 0): None, (12, 0): None}
    assert {cc: gpu.runs_on(cc, 'mxnet-cu112') for cc in table} == table
    assert gpu.runs_on((9, 0), 'mxnet-cu999') == 'unknown'


def test_preflight_lines_for_an_a100_and_an_ada_gpu():
    lines = gpu.check([0, 1], 'mxnet-cu112', [A100, RTX4090], visible=2, free_mib={0: 39000})
    assert lines[0] == 'mxnet mxnet-cu112 sees 2 GPU(s)'
    assert lines[1] == ('GPU 0: NVIDIA A100-SXM4-40GB, compute capability 8.0 (native kernels), 38.1 of 40.0 '
                        'GiB free')
    assert lines[2] == ('GPU 1: NVIDIA GeForce RTX 4090, compute capability 8.9 (runs the 8.6 kernels), '
                        '24.0 GiB')


def test_a_hopper_gpu_is_refused_with_what_to_do():
    with pytest.raises(UserError) as info:
        gpu.check([0, 2], 'mxnet-cu112', [A100, RTX4090, H100], visible=3)
    text = str(info.value)
    assert text.startswith('GPU 2 (NVIDIA H100 80GB HBM3) has compute capability 9.0, and mxnet-cu112 has '
                           'kernels only for 5.0, 6.0, 7.0, 8.0, 8.6 and no PTX')
    assert 'drop --gpus' in text and 'eval.py RUN --export DIR' in text and 'ONNX runtime' in text
    gpu.check([0, 1], 'mxnet-cu112', [A100, RTX4090, H100], visible=3)          # the others are fine


def test_ids_mxnet_does_not_see_and_the_cpu_build():
    with pytest.raises(UserError, match=r'--gpus 0,3: mxnet sees 2 GPU\(s\); give ids below 2'):
        gpu.check([0, 3], 'mxnet-cu112', [A100, RTX4090], visible=2)
    with pytest.raises(UserError, match='sees no GPU: is the NVIDIA driver installed'):
        gpu.check([0], 'mxnet-cu112', [], visible=0)
    with pytest.raises(UserError, match=r'the installed mxnet is the CPU build: install the GPU build with '
                                        r'VAA_MXNET=cu112 \./run\.sh train --gpus 1'):
        gpu.check([1], None, [], visible=0)


@pytest.mark.parametrize('script', [['train.py', '--epochs', '1'], ['tools/benchmark.py', '--only', 'model'],
                                    ['eval.py', 'runs/none'], ['predict.py', 'runs/none', 'x.jpg', '--out',
                                                                'p.csv']])
def test_every_script_runs_the_preflight_on_this_cpu_build(script):
    assert gpu.gpu_build() is None, 'these machines have the CPU build'
    fixtures.one_line_error(script + ['--gpus', '0'], 'the installed mxnet is the CPU build')


def test_a_cuda_library_that_cannot_be_loaded_is_named_with_the_set_up_command(tmp_path):
    fake = tmp_path / 'fake' / 'mxnet'
    fake.mkdir(parents=True)
    (fake / '__init__.py').write_text(
        "raise OSError('libcudnn.so.8: cannot open shared object file: No such file or directory')\n")
    env = {'PYTHONPATH': str(tmp_path / 'fake')}
    line = fixtures.one_line_error(['train.py', '--epochs', '1'], 'cannot load libcudnn.so.8', env=env)
    assert gpu.SETUP in line
    (fake / '__init__.py').write_text(
        "raise OSError('libcuda.so.1: cannot open shared object file: No such file or directory')\n")
    line = fixtures.one_line_error(['eval.py', 'runs/none'], "needs the NVIDIA driver's libcuda.so.1",
                                   env=env)
    assert 'install the NVIDIA driver' in line


def test_a_gpu_build_is_started_again_with_its_library_folders(monkeypatch, tmp_path):
    dirs = [str(tmp_path / 'nvidia' / n / 'lib') for n in ('cudnn', 'cublas')]
    monkeypatch.setattr(gpu, 'gpu_build', lambda: 'mxnet-cu112')
    monkeypatch.setattr(gpu, 'library_dirs', lambda: dirs)
    monkeypatch.setenv('LD_LIBRARY_PATH', '/opt/other')
    monkeypatch.delenv(gpu.MARK, raising=False)
    started = []

    def execv(path, argv):
        started.append((path, argv, os.environ['LD_LIBRARY_PATH']))
        raise SystemExit(0)
    monkeypatch.setattr(os, 'execv', execv)
    with pytest.raises(SystemExit):
        gpu.prepare(['train.py', '--gpus', '0'])
    assert started == [(sys.executable, [sys.executable, 'train.py', '--gpus', '0'],
                        os.pathsep.join(dirs + ['/opt/other']))]
    # started again (the mark set), or with the folders already there: mxnet is imported, nothing re-run
    gpu.prepare(['train.py'])
    monkeypatch.delenv(gpu.MARK)
    gpu.prepare(['train.py'])
    assert len(started) == 1


def test_the_wheels_pin_what_libmxnet_links():
    """Each library of the cu112 build (readelf -d of its libmxnet.so, in the README) comes from one pinned
    wheel, cuDNN from an 8.x release."""
    names = {w.split('==')[0]: w.split('==')[1] for w in gpu.CUDA_WHEELS}
    assert set(names) == {'nvidia-cuda-runtime-cu11', 'nvidia-cublas-cu11', 'nvidia-cufft-cu11',
                          'nvidia-curand-cu11', 'nvidia-cusolver-cu11', 'nvidia-cuda-nvrtc-cu11',
                          'nvidia-cudnn-cu11', 'nvidia-nccl-cu11', 'nvidia-nvtx-cu11'}
    assert names['nvidia-cudnn-cu11'].startswith('8.')
    assert all(v.split('.')[0] in ('11', '10', '8', '2') for v in names.values())


def _fake_smi(folder, lines):
    path = os.path.join(str(folder), 'nvidia-smi')
    with open(path, 'w') as f:
        f.write('#!/bin/sh\n' + ''.join('echo "%s"\n' % line for line in lines))
    os.chmod(path, 0o755)
    return str(folder)


def test_run_sh_refuses_a_gpu_the_build_cannot_run_before_it_installs_anything(tmp_path):
    """VAA_MXNET=cu112 on an H100: one line naming the GPU, its compute capability and the CPU alternative,
    before any download (the environment keeps its CPU build)."""
    flavour = open(os.path.join(ROOT, '.venv', '.flavour')).read() if os.path.isfile(
        os.path.join(ROOT, '.venv', '.flavour')) else None
    smi = _fake_smi(tmp_path, ['NVIDIA H100 80GB HBM3, 9.0'])
    proc = subprocess.run(['./run.sh', 'train', '--gpus', '0'], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=fixtures.SUBPROCESS_TIMEOUT,
                          env=dict(os.environ, VAA_MXNET='cu112', PATH=smi + os.pathsep + os.environ['PATH']))
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
    assert len(errors) == 1 and 'GPU 0, NVIDIA H100 80GB HBM3, has compute capability 9.0' in errors[0]
    assert 'nothing was installed' in errors[0] and 'train on the CPU instead' in errors[0]
    assert 'installing' not in proc.stdout + proc.stderr
    after = open(os.path.join(ROOT, '.venv', '.flavour')).read() if flavour is not None else None
    assert after == flavour


def test_the_check_before_install_names_each_gpu_and_what_it_runs(tmp_path):
    smi = os.path.join(_fake_smi(tmp_path, ['NVIDIA A100-SXM4-40GB, 8.0', 'NVIDIA H100 PCIe, 9.0',
                                            'NVIDIA GeForce RTX 4090, 8.9']), 'nvidia-smi')
    assert gpu.before_install(smi=smi) == [
        'gpu: GPU 0, NVIDIA A100-SXM4-40GB (compute capability 8.0): runs mxnet-cu112',
        'gpu: GPU 1, NVIDIA H100 PCIe (compute capability 9.0): cannot run mxnet-cu112',
        'gpu: GPU 2, NVIDIA GeForce RTX 4090 (compute capability 8.9): runs mxnet-cu112']
    with pytest.raises(UserError, match='nvidia-smi was not found, so nothing was installed'):
        gpu.before_install(smi=str(tmp_path / 'missing' / 'nvidia-smi'))
    (tmp_path / 'none').mkdir()
    empty = os.path.join(_fake_smi(tmp_path / 'none', []), 'nvidia-smi')
    with pytest.raises(UserError, match='nvidia-smi lists no GPU'):
        gpu.before_install(smi=empty)
