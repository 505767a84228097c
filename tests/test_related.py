"""The related systems through train.py, eval.py and compare.py: on the demo and on a WIDER layout."""
import json
import os

import numpy as np
import pytest

from tools import compare
import eval as eval_script
import train
from common.errors import UserError
from tests import fixtures

SYSTEMS = (('vaa', []), ('rga', ['--rga', 'sc']), ('gcn', ['--head', 'gcn']),
           ('gcn-alone', ['--head', 'gcn', '--taps', 'none']), ('mc', ['--mc-loss']),
           ('apcnn', ['--head', 'apcnn', '--input-size', '64']))


@pytest.fixture(scope='module')
def related_runs(demo_path, tmp_path_factory):
    runs = {}
    for name, flags in SYSTEMS:
        out = str(tmp_path_factory.mktemp('related') / name)
        result = train.main(['--data_path', demo_path, '--out', out, '--epochs', '1', '--limit', '96',
                             '--batch_size', '16', '--log-interval', '100'] + flags)
        runs[name] = (out, result)
    return runs


def test_each_system_trains_and_its_run_folder_rebuilds_the_same_network(related_runs):
    for name, (out, result) in related_runs.items():
        cfg = json.load(open(os.path.join(out, 'config.json')))
        assert (cfg['rga'], cfg['head'], cfg['taps'], cfg['mc_loss']) == {
            'vaa': ('none', 'vaa', None, False), 'rga': ('sc', 'vaa', None, False), 'gcn': (
                'none', 'gcn', None, False),
            'gcn-alone': ('none', 'gcn', 'none', False), 'mc': ('none', 'vaa', None, True),
            'apcnn': ('none', 'apcnn', None, False)}[name]
        again = eval_script.main([out, '--limit', '96'])
        assert np.isfinite(result['mAP']) and again['mAP'] == pytest.approx(result['mAP'], abs=1e-9), name
    log = open(os.path.join(related_runs['gcn'][0], 'train.log')).read()
    assert 'label-graph edges' in log and 'onehot (an offline fallback' in log
    assert 'rga sc after stages 1,2,3,4' in open(os.path.join(related_runs['rga'][0], 'train.log')).read()
    log = open(os.path.join(related_runs['mc'][0], 'train.log')).read()
    row = json.load(open(os.path.join(related_runs['mc'][0], 'metrics.json')))[-1]
    assert 'MC-Loss terms' in log and 0 < row['train_mc_div'] < 1 and row['train_mc_dis'] > 0
    log = open(os.path.join(related_runs['apcnn'][0], 'train.log')).read()
    assert 'AP-CNN head' in log and 'each stage alone: stage I mAP' in log
    assert set(related_runs['apcnn'][1]['stage_mAP']) == {'stage I', 'stage II'}


def test_each_system_predicts_through_the_fused_inference_graph(related_runs, demo_path):
    """predict.py's scorer (deploy.cpu_graph.fused_logits_block: oneDNN's fused graph on the CPU, BatchNorm
    folded) gives every system's fused logits as its training graph does, to float32 rounding."""
    import mxnet as mx
    from mxnet import nd
    from engine import sources
    import predict
    from datasets import digits, loaders
    ds = digits.DigitsCanvas(demo_path, 'test', limit=5)
    for name, (out, _) in related_runs.items():
        net, cfg, _ = sources.load_source(out, [mx.cpu()])
        transform = loaders.transform(cfg)
        x = nd.array(np.stack([transform(image, 0) for image in ds.images]))
        net.hybridize(static_alloc=True, static_shape=True)
        want = net(x)[2].asnumpy()
        got = predict.gluon_scorer(net, [mx.cpu()], cfg['input_size'])(x)
        for batch in (got, predict.gluon_scorer(net, [mx.cpu()], cfg['input_size'])(x[:1])):
            np.testing.assert_allclose(batch, want[:len(batch)], rtol=1e-4, atol=1e-4 * np.abs(want).max(),
                                       err_msg=name)


def test_apcnn_overlays_draw_the_gates_and_the_rois_the_network_chose(related_runs, tmp_path, capsys):
    import cv2
    from unittest import mock
    from datasets import digits
    out = related_runs['apcnn'][0]
    ds = digits.DigitsCanvas(json.load(open(os.path.join(out, 'config.json')))['data_path'], 'test')
    img = str(tmp_path / 'canvas.png')
    cv2.imwrite(img, ds.images[0][:, :, ::-1])
    from evaluation import plots
    with mock.patch.object(plots, 'apcnn_overlay', wraps=plots.apcnn_overlay) as drawn:
        written = eval_script.main([out, '--image', img, '--out-dir', str(tmp_path / 'att')])
    assert os.path.isfile(written[0]) and 'AP-CNN gates and ROIs' in capsys.readouterr().out
    _, gates, rois, valid, box, stride, _ = drawn.call_args[0]
    assert [g.shape for g in gates] == [(8, 8), (4, 4), (2, 2)] and rois.shape == (9, 4) and stride == 8
    assert valid.sum() >= 1 and (rois[valid > 0] >= 0).all() and (rois[valid > 0] <= 63).all()
    assert 0 <= box[0] < box[2] <= 8 and 0 <= box[1] < box[3] <= 8


def test_compare_puts_the_systems_side_by_side(related_runs, tmp_path, capsys):
    sources = [related_runs[name][0] for name, _ in SYSTEMS]
    png = str(tmp_path / 'side_by_side.png')
    summary = compare.main(sources + ['--limit', '96', '--out', png])
    text = capsys.readouterr().out
    assert 'RGA-SC@1,2,3,4' in text and 'ML-GCN head' in text and 'per-attribute AP' in text
    assert 'MC-Loss 1.5,20' in text and 'AP-CNN (demo' in text
    assert os.path.isfile(png) and os.path.isfile(png[:-4] + '.json')
    for row, (name, _) in zip(summary, SYSTEMS):
        assert row['mAP'] == pytest.approx(related_runs[name][1]['mAP'], abs=1e-9), name
        assert row['params'] > 1e6 and row['eval_speed'] > 0 and row['train_speed'] > 0
    assert summary[1]['params'] > summary[0]['params']               # the RGA blocks add parameters


@pytest.mark.parametrize('flags', [['--rga', 'sc', '--rga-stages', '2,3,4'],
                                   ['--head', 'gcn', '--gcn-embeddings', 'cooc'],
                                   ['--mc-loss', '--mc-xi', '3'], ['--head', 'apcnn'],
                                   ['--head', 'hgat', '--hgat-group-channels', '32', '--hgat-class-channels',
                                    '16']])
def test_related_systems_on_a_wider_layout(tmp_path, flags):
    root = str(tmp_path / 'W')
    fixtures.wider(root)
    out = str(tmp_path / 'run')
    result = train.main(['--data_path', root, '--out', out, '--epochs', '1', '--batch_size', '4',
                         '--backbone',
                         'resnet18_v1', '--input-size', '64', '--no-pretrained', '--freeze-epochs',
                         '0'] + flags)
    cfg = json.load(open(os.path.join(out, 'config.json')))
    assert cfg['dataset'] == 'wider' and np.isfinite(result['mAP'])
    assert eval_script.main([out])['mAP'] == pytest.approx(result['mAP'], abs=1e-9)


def test_compare_refuses_a_figure_name_matplotlib_cannot_write_before_any_work(tmp_path):
    with pytest.raises(UserError, match=r'--out .*c\.json: give the figure a \.png'):
        compare.main([str(tmp_path / 'not-evaluated'), '--out', str(tmp_path / 'c.json')])
