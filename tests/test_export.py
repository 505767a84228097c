"""Export: the MXNet symbol files and the ONNX file give the Gluon network's fused logits, and model.json
alone is enough to feed them."""
import json
import os
import sys

import cv2
import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon, nd

import eval as evaluate
from deploy import export
import predict
from common.errors import UserError
from engine.build import build_net

ort = pytest.importorskip('onnxruntime')
onnx = pytest.importorskip('onnx')


def _session(path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def _close(got, want):
    """Within 1e-4 relative to the size of the logits."""
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize('settings', [
    dict(preset='paper'), dict(preset='upstream'), dict(preset='demo', input_size=48),
    dict(preset='paper', rga='sc', rga_stages='2,3,4'), dict(preset='paper', head='gcn')],
    ids=['paper', 'upstream', 'demo', 'paper+rga', 'paper+gcn'])
def test_symbol_and_onnx_exports_give_the_fused_logits(settings, tmp_path):
    cfg = dict(dict(backbone='resnet18_v1', num_classes=5, input_size=48, pretrained=False, resize=52,
                    normalisation='paper', dataset='demo'), **settings)
    ctx = [mx.cpu()]
    net = build_net(cfg, ctx, pretrained=False)
    # non-trivial BN statistics
    for name, param in net.collect_params('.*running_mean|.*running_var').items():
        param.set_data(nd.random.uniform(0.5, 1.5, shape=param.shape) if 'var' in name
                       else nd.random.normal(0, 0.1, shape=param.shape))
    names = ['a%d' % i for i in range(5)]
    files = export.export(net, cfg, names, str(tmp_path / 'out'), ctx)
    assert [os.path.basename(f) for f in files] == list(export.FILES)
    assert sorted(os.listdir(str(tmp_path / 'out'))) == sorted(export.FILES)       # no temporary left behind
    x = nd.random.uniform(-2, 2, shape=(3, 3, cfg['input_size'], cfg['input_size']))  # traced at batch 1
    want = net(x)[2].asnumpy()
    loaded = gluon.SymbolBlock.imports(files[0], ['data'], files[1])
    _close(loaded(x).asnumpy(), want)
    session = _session(files[2])
    assert [i.name for i in session.get_inputs()] == ['data']
    assert [i.name for i in onnx.load(files[2]).graph.input] == ['data']   # weights are constants, not inputs
    assert [o.name for o in session.get_outputs()] == ['fused_logits']
    _close(session.run(['fused_logits'], {'data': x.asnumpy()})[0], want)
    _close(session.run(None, {'data': x.asnumpy()[:1]})[0], want[:1])
    card = json.load(open(files[3]))
    assert card['attributes'] == names and card['input']['shape'][1:] == [3, cfg['input_size'], cfg[
        'input_size']]


def _from_card_alone(image, card):
    """Preprocessing written from model.json's words only."""
    p = card['preprocessing']
    assert p['channel_order'] == 'RGB' and p['interpolation'] == 'bilinear'
    img = cv2.resize(image, (p['resize'][1], p['resize'][0]), interpolation=cv2.INTER_LINEAR)
    top, left = (img.shape[0] - p['centre_crop'][0]) // 2, (img.shape[1] - p['centre_crop'][1]) // 2
    img = img[top:top + p['centre_crop'][0], left:left + p['centre_crop'][1]].astype(np.float32)
    return ((img - np.array(p['mean'], np.float32)) / np.array(p['std'], np.float32)).transpose(2, 0, 1)


def test_eval_export_of_a_run_matches_predict_on_real_images(demo_path, tmp_path):
    import train
    run = str(tmp_path / 'run')
    train.main(['--data_path', demo_path, '--out', run, '--epochs', '1', '--limit', '48', '--batch_size',
                '16'])
    from datasets import digits
    ds = digits.DigitsCanvas(demo_path, 'test', limit=6)
    folder = tmp_path / 'images'
    folder.mkdir()
    for i in range(6):                    # sizes other than the input: the resize and crop are exercised
        image = cv2.resize(ds.images[i], (40 + 7 * i, 64 - 3 * i), interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(folder / ('%d.png' % i)), image[:, :, ::-1])
    out = str(tmp_path / 'exported')
    evaluate.main([run, '--export', out, '--int8', '64'])
    card = json.load(open(os.path.join(out, 'model.json')))
    predicted = predict.main([run, str(folder), '--out', str(tmp_path / 'p.csv')])
    assert card['attributes'] == predicted['names']
    batch = np.stack([_from_card_alone(cv2.imread(p)[:, :, ::-1], card) for p in predicted['paths']])
    logits = _session(os.path.join(out, card['files']['onnx'])).run([card['output']['name']], {card['input'][
        'name']: batch})[0]
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), predicted['probabilities'], atol=2e-5)
    # predict.py runs the export folder itself: the same probabilities with model.onnx ...
    exported = predict.main([out, str(folder), '--out', str(tmp_path / 'q.csv'), '--batch_size', '4'])
    assert exported['paths'] == predicted['paths'] and exported['names'] == predicted['names']
    np.testing.assert_allclose(exported['probabilities'], predicted['probabilities'], atol=2e-5)
    # ... and nearly the same with the INT8 model, which really is quantized
    int8_file = os.path.join(out, card['files']['onnx_int8'])
    ops = {node.op_type for node in onnx.load(int8_file).graph.node}
    assert {'QuantizeLinear', 'DequantizeLinear'} <= ops and card['files']['int8_calibration_images'] == 64
    int8 = predict.main([out, str(folder), '--out', str(tmp_path / 'r.csv'), '--int8'])
    difference = np.abs(int8['probabilities'] - exported['probabilities'])
    print('INT8 - fp32 probabilities: max %.4f, mean %.4f' % (difference.max(), difference.mean()))
    # a quantized model (not the fp32 file), and close to it: on average within 0.02 (0.009 here), no
    # probability off by more than 0.1 (0.03 to 0.05 here, depending on how the head's layers quantize)
    assert difference.max() > 1e-3 and difference.mean() < 0.02 and difference.max() < 0.1


def test_export_without_onnx_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, 'onnx', None)
    cfg = dict(backbone='resnet18_v1', num_classes=2, preset='demo', input_size=48, resize=52,
               normalisation='paper')
    net = build_net(cfg, [mx.cpu()], pretrained=False)
    with pytest.raises(UserError, match=r"onnx>=1.16,<1.19.*pip install -e '.\[onnx\]'"):
        export.export(net, cfg, ['a', 'b'], str(tmp_path / 'out'), [mx.cpu()])
    assert not os.path.exists(str(tmp_path / 'out'))                          # checked before any work
