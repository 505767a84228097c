"""Test setup: use both cores for MXNet (must happen before mxnet is imported) and seed every test."""
import os
import sys

os.environ.setdefault('OMP_NUM_THREADS', str(os.cpu_count() or 1))
os.environ.setdefault('MXNET_ENGINE_TYPE', 'ThreadedEnginePerDevice')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import mxnet as mx  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)
    mx.random.seed(0)
    yield


@pytest.fixture(scope='session')
def demo_path(tmp_path_factory):
    """The embedded demo dataset, built once per test session in a temporary folder."""
    from datasets import digits
    path = str(tmp_path_factory.mktemp('demo'))
    digits.cached(path, seed=0)
    return path
