"""Install the project's dependencies; nothing of the project is installed as a module.

    pip install -e .[cpu,test]     # CPU (mxnet 1.9.1), with the test tools
    pip install -e .[cu112]        # GPU (mxnet-cu112 1.9.1 and the CUDA 11 / cuDNN 8 wheels; the driver only)

The scripts run from the checkout (``python train.py``, ``python tools/compare.py``), which puts its
packages on the import path: installing them would put generic names (``train``, ``model``, ``datasets``,
the last also Hugging Face's package) into the environment, where one would shadow another.

mxnet 1.9.1 is built against NumPy 1.x, hence numpy<1.24 and opencv-python<4.9 (newer OpenCV wheels
require NumPy 2). The ranges below resolve on Python 3.8-3.11.
"""
import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine.gpu import CUDA_WHEELS  # noqa: E402  (the standard library only)

setup(
    name='vaa-attributes',
    version='0.1.0',
    description='Visual Attention Aggregation for imbalanced attribute classification (ECCV 2018) '
                'in MXNet Gluon',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.8,<3.12',
    py_modules=[],
    packages=[],
    install_requires=[
        'numpy>=1.21,<1.24',
        'gluoncv==0.10.5.post0',
        'scipy>=1.8,<1.16',
        'opencv-python>=4.5,<4.9',
        'matplotlib>=3.5,<3.11',
        'tqdm>=4.60',
        'scikit-learn>=1.1,<1.8',     # its bundled digits make the embedded demo dataset
        'pyyaml>=5.4',                # train.py --config, config.yaml
        'tensorboardX>=2.6,<3',       # <run>/tb: TensorBoard's event files without TensorFlow
        'tensorboard>=2.11,<3',       # the server: tensorboard --logdir runs
    ],
    extras_require={
        'cpu': ['mxnet==1.9.1'],
        # the CUDA 11 libraries mxnet-cu112 links, as NVIDIA's pip wheels: only the driver is needed besides
        'cu112': ['mxnet-cu112==1.9.1'] + list(CUDA_WHEELS),
        # eval.py --export: MXNet 1.9.1's ONNX exporter uses onnx.mapping, which onnx 1.19 removed, and
        # onnxruntime's INT8 quantization needs onnx>=1.16; onnxruntime 1.18/1.19 are the newest that install
        # beside numpy<1.24 (1.15-1.17 need numpy>=1.24.2)
        'onnx': ['onnx>=1.16,<1.19', 'onnxruntime>=1.18,<1.20'],
        # pytest-xdist runs the suite in a worker process, so that a crash in native code fails one test
        'test': ['pytest>=7', 'pytest-timeout>=2.1', 'pytest-xdist>=3.5', 'onnx>=1.16,<1.19',
                 'onnxruntime>=1.18,<1.20', 'ruff==0.17.6',      # ruff: the lint of .ci/run (ruff.toml)
                 'easydict>=1.9'],      # the tests write Rethinking_of_PAR's annotation files with it
    },
    classifiers=['Programming Language :: Python :: 3'],
)
