"""Test setup: use both cores for MXNet (must happen before mxnet is imported), private caches, no
network, and seed every test."""
import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault('OMP_NUM_THREADS', str(os.cpu_count() or 1))
# No test touches the network or the user's caches: the model zoo and the WIDER crops go to a fresh
# folder, and a model-zoo download fails at once (connection refused on the loopback discard port).
_CACHE = tempfile.mkdtemp(prefix='vaa-tests-')
os.environ['MXNET_HOME'] = os.path.join(_CACHE, 'mxnet')
os.environ['XDG_CACHE_HOME'] = os.path.join(_CACHE, 'cache')
os.environ['MXNET_GLUON_REPO'] = 'http://127.0.0.1:9/'
atexit.register(shutil.rmtree, _CACHE, True)
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
