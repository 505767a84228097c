"""The network: shapes, taps, attention maps, hybridization, presets, pretrained weights, trainers."""
import os
import time

import numpy as np
import pytest
import mxnet as mx
from mxnet import autograd, gluon, nd
from mxnet.gluon.model_zoo import model_store, vision

import attention
from common.errors import UserError
from backbone import model_zoo_file, tap_names
from common.presets import PRESETS
from model import VAANet, get_vaa_net, vaa_net
from engine.trainers import StageTrainers


def _zoo_tap_nodes(backbone, taps):
    """Tap node names in the model zoo's own symbol graph, worked out from the network spec."""
    if backbone.startswith('resnet'):
        depth = int(backbone[6:-3])
        s3 = {18: 2, 34: 6, 50: 6, 101: 23, 152: 36}[depth]
        s4 = 3 if depth > 18 else 2
        names = {'s3': 'stage3_activation%d' % (s3 - 1), 's4': 'stage4_activation%d' % (s4 - 1),
                 's3-3': 'stage3_activation%d' % (max(s3 - 3, 1) - 1)}
        return ['resnetv10_%s_output' % names[t] for t in taps]
    blocks = {121: (24, 16), 201: (48, 32)}[int(backbone[8:])]
    names = {'s3': 'conv3_fwd', 's4': 'stage4_concat%d' % (blocks[1] - 1),
             's3-3': 'stage3_concat%d' % (blocks[0] - 4)}
    return ['densenet0_%s_output' % names[t] for t in taps]


@pytest.mark.parametrize('backbone', ['resnet18_v1', 'resnet50_v1', 'resnet101_v1', 'densenet121'])
@pytest.mark.parametrize('preset', ['paper', 'upstream'])
def test_output_shapes_and_taps_match_model_zoo_graph(backbone, preset):
    """Logit shapes, and every tap equals the model zoo's own graph node (shape and values)."""
    num_classes, size, batch = 6, 64, 2
    net = get_vaa_net(backbone, num_classes, preset, size)
    x = nd.random.normal(shape=(batch, 3, size, size))
    primary, taps, fused = net(x)
    assert primary.shape == fused.shape == (batch, num_classes)
    assert len(taps) == len(PRESETS[preset]['taps'])
    assert all(t.shape == (batch, num_classes) for t in taps)
    # The fusion of SPEC 3: mean of primary and tap logits.
    expected = (primary.asnumpy() + sum(t.asnumpy() for t in taps)) / (1 + len(taps))
    np.testing.assert_allclose(fused.asnumpy(), expected, rtol=1e-5, atol=1e-5)

    # Independent route to the taps: the zoo network's symbol graph with the same weights.
    prefix = 'resnetv10_' if backbone.startswith('resnet') else 'densenet0_'
    zoo = vision.get_model(backbone, prefix=prefix)
    ours = {n[len(net.backbone.zoo_prefix):]: p for n, p in net.backbone.collect_params().items()}
    for name, param in zoo.features.collect_params().items():
        param._load_init(ours[name[len(prefix):]].data(), mx.cpu())
    sym = zoo.features(mx.sym.var('data'))
    nodes = _zoo_tap_nodes(backbone, net.taps)
    block = gluon.SymbolBlock([sym.get_internals()[n] for n in nodes], mx.sym.var('data'),
                              params=zoo.features.collect_params())
    ref_taps = block(x)
    ref_taps = ref_taps if isinstance(ref_taps, list) else [ref_taps]
    ours_taps = net.backbone(x)[:-1]
    for ref, got, shape in zip(ref_taps, ours_taps, net.tap_shapes):
        assert got.shape[1:] == shape == ref.shape[1:]
        np.testing.assert_allclose(got.asnumpy(), ref.asnumpy(), rtol=1e-5, atol=1e-5)


def test_demo_preset_gives_attention_maps_of_at_least_6x6_on_the_demo_canvases():
    net = vaa_net('resnet18_v1', 12, 'demo', 48)
    assert tap_names('resnet18_v1', net.taps) == ['s1', 's2']
    assert net.tap_shapes == [(64, 12, 12), (128, 6, 6)]


def test_resnet101_taps_at_224_are_the_spec_table():
    net = vaa_net('resnet101_v1', 14, 'upstream', 224)
    assert tap_names('resnet101_v1', net.taps) == ['s3b20', 's3', 's4']
    assert net.tap_shapes == [(1024, 14, 14), (1024, 14, 14), (2048, 7, 7)]
    assert net.stage_numbers == [2, 3, 4]
    paper = vaa_net('resnet101_v1', 14, 'paper', 224)
    assert paper.tap_shapes == [(1024, 14, 14), (2048, 7, 7)] and paper.stage_numbers == [3, 4]


@pytest.mark.parametrize('preset', ['paper', 'upstream'])
def test_head_architecture_follows_preset_and_input_size(preset):
    net = vaa_net('resnet18_v1', 5, preset, 96)        # taps 6x6 (s3) and 3x3 (s4)
    cfg = PRESETS[preset]
    branch, classifier = net.branches[-1], net.classifiers[-1]
    convs = [b for b in branch.fatt if isinstance(b, gluon.nn.Conv2D)]
    assert [c._channels for c in convs] == list(cfg['att_channels']) + [5]
    assert [c._kwargs['kernel'] for c in convs] == [(1, 1), (cfg['att_second_kernel'],) * 2, (1, 1)]
    convs = [b for b in classifier.fsr if isinstance(b, gluon.nn.Conv2D)]
    assert [c._channels for c in convs] == list(cfg['cls_channels'][:2])
    assert [c._kwargs['kernel'] for c in convs] == [(1, 1), (1, 1)]
    assert all(c._kwargs['pad'] == (0, 0) for c in convs)
    # the third: a conv over the whole map, kernel = the tap's size (computed as a matrix product)
    sizes = {'paper': (6, 3), 'upstream': (6, 6, 3)}[preset]          # taps s3, s4 / s3-3, s3, s4
    assert len(net.classifiers) == len(sizes)
    for cls, size in zip(net.classifiers, sizes):
        full = [b for b in cls.fsr if isinstance(b, attention.FullMapConv)]
        assert [attention.file_shape(f.weight) for f in full] == [
            (cfg['cls_channels'][2], cfg['cls_channels'][1], size, size)]


@pytest.mark.parametrize('hybridize', [False, True])
def test_the_full_map_conv_is_the_convolution_forward_and_backward(hybridize):
    """attention.FullMapConv computes f_cls's k x k conv as a matrix product: against a NumPy einsum of
    the convolution's formula (a k x k kernel over a k x k map, no padding) and MXNet's own Conv2D on the
    same parameters, in the output and in the gradients of the input, the weight and the bias."""
    rs = np.random.RandomState(3)
    n, c, o, k = 3, 5, 4, 3
    x = rs.normal(size=(n, c, k, k)).astype(np.float32)
    w = rs.normal(size=(o, c, k, k)).astype(np.float32)           # asymmetric in every axis
    b = rs.normal(size=(o,)).astype(np.float32)
    head = rs.normal(size=(n, o, 1, 1)).astype(np.float32)        # d(loss)/d(out), a random direction
    full = attention.FullMapConv(o, k, in_channels=c)
    conv = gluon.nn.Conv2D(o, kernel_size=k, in_channels=c)
    results = []
    for block in (full, conv):
        block.initialize()
        block.weight.set_data(nd.array(w).reshape(block.weight.shape))     # (O, C*k*k) for ours
        block.bias.set_data(nd.array(b))
        if hybridize:
            block.hybridize()
        xx = nd.array(x)
        xx.attach_grad()
        with autograd.record():
            out = block(xx)
        out.backward(nd.array(head))
        mx.nd.waitall()
        results.append([out.asnumpy(), xx.grad.asnumpy(), block.weight.grad().asnumpy(),
                        block.bias.grad().asnumpy()])
    results[0][2] = results[0][2].reshape(w.shape)                 # the gradient in the kernel's shape
    expected = np.einsum('ocij,ncij->no', w, x)[:, :, None, None] + b[None, :, None, None]
    np.testing.assert_allclose(results[0][0], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(results[0][1], np.einsum('ocij,no->ncij', w, head[:, :, 0, 0]), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(results[0][2], np.einsum('ncij,no->ocij', x, head[:, :, 0, 0]), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(results[0][3], head.sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(*results):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    # The parameters are the convolution's in files (checkpoints, the authors' files) and by name.
    assert [attention.file_shape(p) for p in full.collect_params().values()] == [(o, c, k, k), (o,)]
    assert full.prefix.startswith('conv') and full.weight.name.endswith('_weight')
    # and the same initial draw: Xavier on (O, C*k*k) and on (O, C, k, k) give the same numbers
    for block in (full, conv):
        block.collect_params().initialize(attention.HEAD_INIT, force_reinit=True)
        mx.random.seed(11)
        block.weight.initialize(attention.HEAD_INIT, force_reinit=True)
    np.testing.assert_array_equal(full.weight.data().asnumpy().reshape(w.shape), conv.weight.data().asnumpy())
    with pytest.raises(mx.MXNetError):                             # only the k x k map it was built for
        full(nd.ones((1, c, k + 1, k + 1))).wait_to_read()


def test_attention_maps_sum_to_one_and_are_the_spatial_softmax():
    net = get_vaa_net('resnet18_v1', 4, 'upstream', 64)
    net.return_attention = True
    x = nd.random.normal(shape=(3, 3, 64, 64))
    maps = net(x).maps
    assert len(maps) == 3
    for a, shape in zip(maps, net.tap_shapes):
        a = a.asnumpy()
        assert a.shape == (3, 4) + shape[1:]
        assert (a >= 0).all()
        np.testing.assert_allclose(a.sum(axis=(2, 3)), np.ones((3, 4)), rtol=1e-5)
    # spatial_softmax against the NumPy formula exp(z) / sum_hw exp(z)
    z = np.random.randn(2, 3, 4, 5).astype(np.float32) * 3
    got = attention.spatial_softmax(nd, nd.array(z)).asnumpy()
    e = np.exp(z - z.max(axis=(2, 3), keepdims=True))
    np.testing.assert_allclose(got, e / e.sum(axis=(2, 3), keepdims=True), rtol=1e-5, atol=1e-7)
    # Switching it off again gives the three outputs.
    net.return_attention = False
    assert len(net(x)) == 3


@pytest.mark.parametrize('backbone', ['resnet18_v1', 'densenet121'])
def test_hybridized_equals_imperative(backbone):
    x = nd.random.normal(shape=(2, 3, 64, 64))
    label = nd.array(np.random.randint(0, 2, (2, 5)))
    results = []
    for hybrid in (False, True):
        mx.random.seed(1)
        np.random.seed(1)
        net = get_vaa_net(backbone, 5, 'upstream', 64)
        if hybrid:
            net.hybridize(static_alloc=True, static_shape=True)
        infer = [o.asnumpy() for o in _flat(net(x))]
        loss_fn = gluon.loss.SigmoidBinaryCrossEntropyLoss()
        with autograd.record():
            outs = net(x)
            loss = loss_fn(outs[0], label) + sum(loss_fn(t, label) for t in outs[1])
        loss.backward()
        grads = {k[len(net.prefix):]: p.grad().asnumpy() for k, p in net.collect_params().items()
                 if p.grad_req != 'null'}
        results.append((infer, [o.asnumpy() for o in _flat(outs)], grads))
    (i0, t0, g0), (i1, t1, g1) = results
    for a, b in zip(i0 + t0, i1 + t1):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert g0.keys() == g1.keys()
    for k in g0:
        np.testing.assert_allclose(g0[k], g1[k], rtol=1e-3, atol=1e-5, err_msg=k)


def _flat(outs):
    flat = []
    for o in outs:
        flat.extend(o if isinstance(o, list) else [o])
    return flat


def test_pretrained_missing_cache_fails_at_once_with_the_file_to_place(tmp_path, monkeypatch, capsys):
    """Offline (the model-zoo host refuses the connection: the tests' MXNET_GLUON_REPO is a closed loopback
    port): no download is tried, and one error names the file, the folder, the URL, the reason and
    --no-pretrained; nothing is left behind."""
    monkeypatch.setenv('MXNET_HOME', str(tmp_path))
    tried = []
    monkeypatch.setattr(model_store, 'download', lambda url, *a, **k: tried.append(url))
    path, url = model_zoo_file('resnet18_v1')
    start = time.time()
    with pytest.raises(UserError) as err:
        vaa_net('resnet18_v1', 3, 'paper', 64, pretrained=True)
    assert time.time() - start < 5 and tried == []
    message = str(err.value)
    assert os.path.basename(path) in message and str(tmp_path / 'models') in message and url in message
    assert '--no-pretrained' in message and 'no network connection to 127.0.0.1:9' in message
    assert not os.listdir(tmp_path) or not os.listdir(tmp_path / 'models')   # nothing downloaded
    assert capsys.readouterr().out == ''


def test_a_failing_download_is_tried_and_its_retries_stay_off_the_console(tmp_path, monkeypatch, capsys):
    """The host answers but the download fails: MXNet's own download is used (it checks the SHA-1), its
    "download failed ... retrying" lines are not printed, and the error carries the reason."""
    import backbone
    monkeypatch.setenv('MXNET_HOME', str(tmp_path))
    monkeypatch.setattr(backbone, '_unreachable', lambda url: None)
    tried = []

    def failing(url, path=None, **kwargs):
        tried.append(url)
        for left in (4, 3, 2):
            print('download failed due to ConnectionError(MaxRetryError(...)), retrying, %d attempts left'
                  % left)
        raise OSError('Network is unreachable')
    monkeypatch.setattr(model_store, 'download', failing)
    path, url = model_zoo_file('resnet18_v1')
    with pytest.raises(UserError, match='Network is unreachable') as err:
        vaa_net('resnet18_v1', 3, 'paper', 64, pretrained=True)
    assert tried == [url] and os.path.basename(path) in str(err.value)
    assert 'download failed' not in capsys.readouterr().out


def _zoo_weights(path):
    zoo = vision.resnet18_v1()
    zoo.initialize(mx.init.Normal(0.5))
    zoo(nd.zeros((1, 3, 32, 32)))
    zoo.save_parameters(path)
    return zoo


def test_pretrained_missing_file_is_downloaded_through_the_model_zoo_with_its_sha1_check(
        tmp_path, monkeypatch):
    """A model-zoo server on a loopback port (MXNET_GLUON_REPO): the zip is fetched over HTTP, checked
    against the zoo's SHA-1 and loaded; a file whose SHA-1 differs is refused."""
    import functools
    import hashlib
    import http.server
    import threading
    import zipfile
    served = str(tmp_path / 'served.params')
    zoo = _zoo_weights(served)
    sha1 = hashlib.sha1(open(served, 'rb').read()).hexdigest()
    monkeypatch.setenv('MXNET_HOME', str(tmp_path / 'home'))
    monkeypatch.setitem(model_store._model_sha1, 'resnet18_v1', sha1)
    root = tmp_path / 'repo'
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv('MXNET_GLUON_REPO', 'http://127.0.0.1:%d/' % server.server_address[1])
        path, url = model_zoo_file('resnet18_v1')
        zipped = root / 'gluon' / 'models' / os.path.basename(url)
        zipped.parent.mkdir(parents=True)
        with zipfile.ZipFile(str(zipped), 'w') as zf:
            zf.write(served, os.path.basename(path))
        net = get_vaa_net('resnet18_v1', 3, 'paper', 64, pretrained=True)
        assert os.path.isfile(path)
        ours = {n[len(net.backbone.zoo_prefix):]: p for n, p in net.backbone.collect_params().items()}
        for name, param in zoo.features.collect_params().items():
            np.testing.assert_array_equal(ours[name[len(zoo.prefix):]].data().asnumpy(),
                                          param.data().asnumpy())
        os.remove(path)
        monkeypatch.setitem(model_store._model_sha1, 'resnet18_v1', sha1[:8] + '0' * 32)   # same file name
        with pytest.raises(UserError, match='different hash'):
            vaa_net('resnet18_v1', 3, 'paper', 64, pretrained=True)
    finally:
        server.shutdown()
        server.server_close()


def test_pretrained_loads_the_cached_file(tmp_path, monkeypatch):
    monkeypatch.setenv('MXNET_HOME', str(tmp_path))
    path, _ = model_zoo_file('resnet18_v1')
    os.makedirs(os.path.dirname(path))
    zoo = _zoo_weights(path)
    net = get_vaa_net('resnet18_v1', 3, 'paper', 64, pretrained=True)
    ours = {n[len(net.backbone.zoo_prefix):]: p for n, p in net.backbone.collect_params().items()}
    theirs = {n[len(zoo.prefix):]: p for n, p in zoo.features.collect_params().items()}
    assert set(theirs) <= set(ours)
    for name, param in theirs.items():
        np.testing.assert_array_equal(ours[name].data().asnumpy(), param.data().asnumpy())
    # A damaged file is named in the error.
    with open(path, 'wb') as f:
        f.write(b'not a parameter file')
    with pytest.raises(UserError, match='could not read'):
        vaa_net('resnet18_v1', 3, 'paper', 64, pretrained=True)


def test_the_network_takes_numbers_and_the_factory_takes_a_presets():
    """VAANet is built from the taps and widths it is given; vaa_net looks a preset's numbers up."""
    net = VAANet('resnet18_v1', 3, taps=('s2',), att_channels=(8, 16), att_second_kernel=3,
                 cls_channels=(8, 16, 32), input_size=64)
    assert net.preset is None and tap_names('resnet18_v1', net.taps) == ['s2']
    convs = [b for b in net.branches[0].fatt if isinstance(b, gluon.nn.Conv2D)]
    assert [(c._channels, c._kwargs['kernel']) for c in convs] == [(8, (1, 1)), (16, (3, 3)), (3, (1, 1))]
    convs = [b for b in net.classifiers[0].fsr if isinstance(b, gluon.nn.Conv2D)]
    assert [c._channels for c in convs] == [8, 16]
    demo = vaa_net('resnet18_v1', 3, 'demo', 48)
    assert demo.preset == 'demo' and demo.taps == PRESETS['demo']['taps']


def test_unknown_backbone_preset_and_tap_are_user_errors():
    with pytest.raises(UserError, match='unknown backbone'):
        vaa_net('vgg16', 3)
    with pytest.raises(UserError, match='unknown preset'):
        vaa_net('resnet18_v1', 3, 'best')
    with pytest.raises(UserError, match='unknown tap'):
        vaa_net('resnet18_v1', 3, taps=('s9',))


def test_stage_trainers_cover_every_parameter_once_and_freezing_skips_backbone():
    net = get_vaa_net('resnet18_v1', 4, 'upstream', 64)
    trainers = StageTrainers(net, [mx.cpu()], 'sgd', {'learning_rate': 0.1}).trainers
    assert sorted(trainers) == sorted(['backbone'] + ['stage_%d/%s' % (n, m) for n in (2, 3, 4)
                                                       for m in ('fconv', 'fatt', 'fsr')])
    owned = [p.name for t in trainers.values() for p in t._params]
    assert sorted(owned) == sorted(net.collect_params().keys()) and len(owned) == len(set(owned))

    frozen = StageTrainers(net, [mx.cpu()], 'sgd', {'learning_rate': 0.1}, finetune=True)
    assert 'backbone' not in frozen.trainers
    before = {k: p.data().copy() for k, p in net.collect_params().items()}
    x, y = nd.random.normal(shape=(2, 3, 64, 64)), nd.array(np.random.randint(0, 2, (2, 4)))
    loss_fn = gluon.loss.SigmoidBinaryCrossEntropyLoss()
    with autograd.record():
        outs = net(x)
        loss = sum(loss_fn(t, y) for t in outs[1])
    loss.backward()
    frozen.step(2)
    for k, p in net.collect_params().items():
        changed = not np.array_equal(before[k].asnumpy(), p.data().asnumpy())
        if k.startswith(net.backbone.prefix):
            # frozen weights never move (BN running statistics still track the batches)
            assert not changed or 'running' in k, k
        elif k.endswith('weight'):
            assert changed, k
    frozen.set_learning_rate(0.01)
    assert all(t.learning_rate == 0.01 for t in frozen.trainers.values())


def test_two_cpu_contexts_hold_identical_copies_through_training():
    """Each device keeps its own copy of the weights and its own optimizer state: after training steps
    with different halves of the batch on each device, the copies are still bitwise equal (every device
    applies the same summed gradient)."""
    from engine.steps import train_step
    from losses import PredictionHistory, VAALoss
    from engine.trainers import StageTrainers
    ctx = [mx.cpu(0), mx.cpu(1)]
    net = get_vaa_net('resnet18_v1', 3, 'paper', 64, ctx=ctx)
    trainers = StageTrainers(net, ctx, 'sgd', {'learning_rate': 0.1, 'momentum': 0.9},
                             kvstore=mx.kv.create('device'))
    rng = np.random.RandomState(2)
    batch = (nd.array(rng.randn(4, 3, 64, 64)), nd.array(rng.randint(0, 2, (4, 3))), nd.ones((4, 3)),
             nd.arange(4, dtype='int64'))
    before = {k: p.data(ctx[0]).asnumpy() for k, p in net.collect_params().items()}
    for epoch in range(2):
        train_step(net, VAALoss(), trainers, PredictionHistory(4, 3), batch, epoch, ctx)
    moved = 0
    for k, p in net.collect_params().items():
        a, b = p.data(ctx[0]).asnumpy(), p.data(ctx[1]).asnumpy()
        if 'running' not in k:          # (BatchNorm statistics are per device: each saw its own half)
            np.testing.assert_array_equal(a, b, err_msg=k)
        moved += not np.array_equal(a, before[k])
    assert moved > 100
    x = nd.random.normal(shape=(2, 3, 64, 64))
    assert net(x.as_in_context(ctx[0]))[2].shape == (2, 3)
