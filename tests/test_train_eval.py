"""train.py and eval.py end to end on a tiny version of the embedded dataset, and flag compatibility."""
import json
import os

import numpy as np
import pytest

from common import machine
from engine import config
import eval as eval_script
from evaluation import tables
from evaluation import metrics
import train
from datasets import digits
from datasets.wider import WIDER_ATTRIBUTES


@pytest.fixture(scope='session')
def tiny_run(demo_path, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('runs') / 'tiny')
    result = train.main(['--data_path', demo_path, '--out', out, '--epochs', '3', '--limit', '480',
                         '--log-interval', '5'])
    return out, result


def test_demo_dataset_is_deterministic_disjoint_and_shaped_like_an_attribute_problem(demo_path, tmp_path):
    splits, pools = digits.build(seed=0)
    again, _ = digits.build(seed=0)
    for split in splits:
        np.testing.assert_array_equal(splits[split][0], again[split][0])
        np.testing.assert_array_equal(splits[split][1], again[split][1])
    assert not set(pools['train']) & set(pools['val']) and not set(pools['train']) & set(pools['test'])
    assert not set(pools['val']) & set(pools['test'])
    signed = splits['train'][1]
    assert signed.shape[1] == len(digits.ATTRIBUTES) >= 10
    assert len(digits.WHERE) >= 3 and set(digits.WHERE) <= set(digits.ATTRIBUTES)
    assert 0.04 < (signed == 0).mean() < 0.06
    pos, neg = (signed == 1).sum(0), (signed == -1).sum(0)
    ratios = neg / pos
    assert ratios.min() < 1.5 and 20 < ratios.max() < 40            # about 1:1 to 1:25
    # The cache returns exactly what was built.
    ds = digits.DigitsCanvas(demo_path, 'val')
    np.testing.assert_array_equal(ds.images, splits['val'][0])
    np.testing.assert_array_equal(ds.labels, (splits['val'][1] == 1).astype(np.float32))
    np.testing.assert_array_equal(ds.mask, (splits['val'][1] != 0).astype(np.float32))


def test_where_attributes_follow_the_cells():
    # a 1 in the top row, a red 0 in the centre, a 3 at the bottom
    cells = {1: (1, 'white'), 4: (0, 'red'), 7: (3, 'white')}
    values = dict(zip(digits.ATTRIBUTES, digits._attributes(cells)))
    assert values['one_in_top_row'] == 1 and values['center_filled'] == 1 and values['even_in_center'] == 1
    assert values['three_at_bottom'] == 1 and values['red_zero'] == 1 and values['top_row_empty'] == 0
    moved = {6: (1, 'white'), 5: (0, 'red'), 0: (3, 'white')}     # same digits, other places
    values = dict(zip(digits.ATTRIBUTES, digits._attributes(moved)))
    assert values['one_in_top_row'] == 0 and values['center_filled'] == 0 and values['three_at_bottom'] == 0
    assert values['has_zero'] == 1 and values['red_zero'] == 1


def test_short_run_learns_and_writes_the_run_folder(tiny_run):
    out, result = tiny_run
    for name in ('config.json', 'train.log', 'metrics.csv', 'metrics.json', 'curves.png', 'test_ap.png',
                 'test_metrics.json', 'checkpoints/last.params', 'checkpoints/best.params'):
        assert os.path.isfile(os.path.join(out, name)), name
    rows = json.load(open(os.path.join(out, 'metrics.json')))
    assert [r['epoch'] for r in rows] == [0, 1, 2]
    with open(os.path.join(out, 'metrics.csv')) as f:
        assert f.readline().startswith('epoch,lr,train_loss,val_loss')
        assert len(f.readlines()) == 3
    ds = digits.DigitsCanvas(json.load(open(os.path.join(out, 'config.json')))['data_path'], 'val', limit=480)
    chance = metrics.chance_map(ds.labels, ds.mask)
    best_val = max(r['val_mAP'] for r in rows)
    assert best_val > chance + 0.10, (best_val, chance)
    assert result['mAP'] > chance + 0.10
    log = open(os.path.join(out, 'train.log')).read()
    assert 'Speed:' in log and 'samples/sec' in log
    assert '%s; threads: %s\n' % (machine.describe(), machine.thread_summary()) in log     # what was in force
    # the final table, in the log too
    assert 'Test split, best checkpoint' in log and 'many_digits' in log
    assert list(rows[0]['val_ap']) == list(digits.ATTRIBUTES)                     # per-attribute AP, named


def test_eval_reproduces_the_final_metrics(tiny_run, capsys):
    out, result = tiny_run
    again = eval_script.main([out, '--limit', '480'])
    assert again['mAP'] == pytest.approx(result['mAP'], abs=1e-6)
    assert again['mA'] == pytest.approx(result['mA'], abs=1e-6)
    aps = [r['ap'] for r in result['per_attribute']]
    assert [r['ap'] for r in again['per_attribute']] == pytest.approx(aps)
    saved = json.load(open(os.path.join(out, 'eval_test.json')))
    assert saved['mAP'] == pytest.approx(result['mAP'], abs=1e-6)
    printed = capsys.readouterr().out
    assert 'many_digits' in printed and 'mAP' in printed


def test_eval_compare_paper_and_images(tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    res = eval_script.main([out, '--split', 'val', '--limit', '64', '--compare', 'paper',
                           '--out', str(tmp_path / 'val.json')])
    # the paper reports nothing for the demo: no deltas, and the output says why
    assert res['paper'] is None
    assert 'paper: no numbers to compare with' in capsys.readouterr().out
    ds = digits.DigitsCanvas(json.load(open(os.path.join(out, 'config.json')))['data_path'], 'test')
    import cv2
    img = str(tmp_path / 'canvas.png')
    cv2.imwrite(img, ds.images[0][:, :, ::-1])
    written = eval_script.main([out, '--image', img, '--out-dir', str(tmp_path / 'att')])
    assert os.path.isfile(written[0])
    text = capsys.readouterr().out
    assert 'many_digits' in text and 'attention maps' in text


def test_paper_numbers_apply_only_where_the_paper_reported_them():
    wider = tables.paper_reference('lst', list(WIDER_ATTRIBUTES))
    assert wider['mAP'] == 86.4 and wider['per_attribute']['stripe'] == 68 and wider['resnet101_mAP'] == 83.7
    assert tables.paper_reference('peta', ['a%d' % i for i in range(35)])['mA'] == 84.59
    assert tables.paper_reference('peta', ['a%d' % i for i in range(105)]) is None
    assert tables.paper_reference('demo', list(digits.ATTRIBUTES)) is None
    assert tables.paper_reference('wider', list(WIDER_ATTRIBUTES)[::-1]) is None


def test_export_to_the_authors_layout_and_evaluate_it_back(tiny_run, demo_path, tmp_path, capsys,
                                                           monkeypatch):
    out, result = tiny_run
    monkeypatch.chdir(tmp_path)             # the authors' files' result goes to ./runs/eval-saved_models
    folder = str(tmp_path / 'saved_models')
    written = eval_script.main([out, '--export-upstream', folder])
    assert sorted(os.path.basename(p) for p in written) == sorted(
        ['backbone_resnet.params'] + ['%s_stage_%d.params' % (m, n)
                                      for m in ('fconv', 'fatt', 'fsr') for n in (3, 4)])
    printed = capsys.readouterr().out
    assert "cannot load these" in printed
    assert '--preset demo --backbone resnet18_v1 --input-size 48' in printed
    again = eval_script.main([folder, '--preset', 'demo', '--backbone', 'resnet18_v1', '--input-size', '48',
                             '--dataset', 'demo', '--data_path', demo_path, '--limit', '480'])
    assert again['mAP'] == pytest.approx(result['mAP'], abs=1e-9)


def test_upstream_flag_names_parse_to_the_same_settings():
    args = config.build_parser().parse_args(
        ['--dataset', 'wider', '--data_path', '/d', '--epochs', '7', '--lr', '0.01', '--wd', '0.0001',
         '--mom', '0.8',
         '--batch_size', '16', '--num_classes', '14', '--finetune', '--test'])
    cfg = config.resolve_config(args)
    assert (cfg['data_path'], cfg['epochs'], cfg['lr'], cfg['wd'], cfg['mom'], cfg['batch_size'],
            cfg['num_classes'], cfg['finetune'], cfg['test']) == (
                '/d', 7, 0.01, 0.0001, 0.8, 16, 14, True, True)
    # The authors' defaults where the flag is not given (preset upstream, WIDER schedule).
    up = config.resolve_config(config.build_parser().parse_args(['--preset', 'upstream']))
    assert up['wd'] == 5e-4 and up['mom'] == 0.9 and up['plain_bce'] and up['history_zero_rows']
    assert up['normalisation'] == 'upstream'
    paper = config.resolve_config(config.build_parser().parse_args([]))
    assert not paper['plain_bce'] and not paper['history_zero_rows']
