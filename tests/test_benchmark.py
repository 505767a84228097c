"""benchmark.py runs for every preset and backbone family, and its reference rows are the authors'
construction of the same network (the rows it cannot build are skipped with the reason)."""
import numpy as np

from tools import benchmark

TINY = ['--input-size', '32', '--batch', '2', '--iters', '1', '--warmup', '0', '--only', 'model',
        '--classes', '3']


def test_every_preset_has_its_reference_rows(capsys):
    for preset in ('demo', 'paper', 'upstream'):
        rows = benchmark.main(['--preset', preset, '--backbone', 'resnet18_v1'] + TINY)
        expected = {'ours train', 'ours eval', 'reference train', 'reference eval', 'bare backbone train'}
        assert expected <= set(rows)
        assert all(np.isfinite(v) and v > 0 for v in rows.values())
    assert 'ours / reference' in capsys.readouterr().out


def test_a_densenet_skips_the_reference_rows_and_says_why(capsys):
    rows = benchmark.main(['--preset', 'demo', '--backbone', 'densenet121'] + TINY)
    assert 'reference train' not in rows and rows['bare backbone train'] > 0
    printed = capsys.readouterr().out
    assert "reference rows: skipped, the authors' code builds ResNet backbones only" in printed
