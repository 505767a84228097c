"""Work made by the code before the packages (commit f08f2fa, the last with the flat modules) still works: its
run folder evaluates to the test mAP it recorded, resumes, predicts and exports with today's code."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import eval as eval_script
import predict
import train
from tests import fixtures

ROOT = fixtures.ROOT
BEFORE_THE_MOVE = 'f08f2fa'


@pytest.fixture(scope='module')
def old_run(demo_path, tmp_path_factory):
    """A demo run trained by the code of BEFORE_THE_MOVE, taken from the checkout's history."""
    if not os.path.isdir(os.path.join(ROOT, '.git')):
        pytest.skip('not a git checkout: the code before the move cannot be taken from its history')
    old = str(tmp_path_factory.mktemp('old-code'))
    archive = subprocess.run(['git', '-C', ROOT, 'archive', BEFORE_THE_MOVE], stdout=subprocess.PIPE)
    assert archive.returncode == 0, 'the commit %s is not in this checkout' % BEFORE_THE_MOVE
    subprocess.run(['tar', '-x', '-C', old], input=archive.stdout, check=True)
    run = str(tmp_path_factory.mktemp('old-runs') / 'run')
    proc = subprocess.run([sys.executable, 'train.py', '--data_path', demo_path, '--out', run, '--epochs',
                           '2', '--limit', '64', '--input-size', '32', '--batch_size', '16'], cwd=old,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                          timeout=fixtures.SUBPROCESS_TIMEOUT, env=dict(os.environ, PYTHONPATH=old))
    assert proc.returncode == 0, proc.stdout[-3000:]
    return run


def test_an_old_run_evaluates_to_its_recorded_test_map(old_run, tmp_path):
    recorded = json.load(open(os.path.join(old_run, 'test_metrics.json')))
    now = eval_script.main([old_run, '--out', str(tmp_path / 'now.json')])
    assert now['mAP'] == pytest.approx(recorded['mAP'], abs=1e-12)
    aps = [[a['ap'] for a in r['per_attribute']] for r in (now, recorded)]
    assert aps[0] == pytest.approx(aps[1], abs=1e-12)


def test_an_old_run_resumes_predicts_and_exports(old_run, tmp_path, demo_path):
    run = str(tmp_path / 'again')
    shutil.copytree(old_run, run)
    result = train.main(['--resume', run, '--epochs', '3'])
    assert len(json.load(open(os.path.join(run, 'metrics.json')))) == 3 and 0 < result['mAP'] <= 1
    from datasets import digits
    import cv2
    image = str(tmp_path / 'x.png')
    cv2.imwrite(image, digits.DigitsCanvas(demo_path, 'test').images[0][:, :, ::-1])
    rows = predict.main([old_run, image, '--out', str(tmp_path / 'p.csv')])
    assert np.all((rows['probabilities'] > 0) & (rows['probabilities'] < 1))
    written = eval_script.main([old_run, '--export', str(tmp_path / 'export')])
    assert any(f.endswith('model.onnx') for f in written)
