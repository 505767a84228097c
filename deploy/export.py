"""Export a trained model for use outside this code: MXNet symbol + params, ONNX, and ``model.json``.

``eval.py SOURCE --export DIR`` writes

* ``DIR/model-symbol.json`` + ``DIR/model-0000.params``: the hybridized network (``HybridBlock.export``),
  with one input ``data`` (N x 3 x S x S, float32) and one output, the fused logits (N x C). Loadable
  with ``gluon.SymbolBlock.imports(symbol, ['data'], params)`` and by MXNet's C/C++/Java front ends.
* ``DIR/model.onnx``: the same graph through MXNet's own ONNX exporter (opset 13, any batch size),
  input ``data``, output ``fused_logits``; the weights are initializers, not graph inputs.
* ``DIR/model-int8.onnx`` (with ``--int8 N``): ``model.onnx`` quantized by onnxruntime's static
  post-training quantization (QDQ; uint8 activations, int8 weights, one scale per tensor, ranges from
  the min/max over N training images with the evaluation preprocessing). The fastest CPU path
  (``tools/benchmark.py --only inference``); ``predict.py DIR ... --int8`` runs it.
* ``DIR/model.json``: what a user of either file needs and nothing else: the attribute names in output
  order, the output to read and what to apply to it (sigmoid), and the preprocessing (RGB order, resize,
  centre crop, mean and standard deviation in 0-255 pixel units, NCHW layout).

MXNet 1.9.1's exporter writes opset 12/13 operators but stamps the model with the newest opset of the
installed ``onnx`` and validates each graph against that opset, which rejects its own ``ReduceMean``
(RGA) under onnx >= 1.13 (opset 18 moved ``axes`` to an input). We stamp and check opset 13, the
opset of the operators it writes, and check the finished model with ``onnx.checker.check_model``.
It also uses ``onnx.mapping``, removed in onnx 1.19, and onnxruntime's quantization tool needs
onnx >= 1.16: the ``onnx`` extra pins ``onnx>=1.16,<1.19``. The model is stamped IR version 7 (that of
opset 13), not the installed onnx's newest, which older runtimes refuse.
"""
import contextlib
import json
import logging
import os
import shutil
import tempfile

import numpy as np
from mxnet import gluon

from common.errors import UserError

ONNX_OPSET = 13
ONNX_IR_VERSION = 7                                # the IR version of opset 13 (onnx 1.8)
INPUT_NAME, OUTPUT_NAME = 'data', 'fused_logits'
FILES = ('model-symbol.json', 'model-0000.params', 'model.onnx', 'model.json')
INT8_FILE = 'model-int8.onnx'


class FusedLogits(gluon.HybridBlock):
    """The network with one output: its fused logits (what evaluation ranks, sigmoid -> probabilities)."""

    def __init__(self, net, **kwargs):
        super().__init__(**kwargs)
        self.net = net

    def hybrid_forward(self, F, x):  # pylint: disable=arguments-differ
        return self.net(x).fused


def model_card(cfg, names, int8_images=0, onnx=True):
    """``model.json``: everything needed to feed the exported graph and read its output (``onnx``: whether
    the network has an ONNX form, ``net.onnx_reason is None``)."""
    from datasets.base import NORMALISATION
    mean, std = NORMALISATION[cfg['normalisation']]
    size = cfg['input_size']
    files = {'mxnet_symbol': FILES[0], 'mxnet_params': FILES[1]}
    if onnx:
        files['onnx'] = FILES[2]
    return {
        'format': 'vaa-attributes export 1',
        'files': dict(files, **({'onnx_int8': INT8_FILE, 'int8_calibration_images': int8_images}
                                if int8_images else {})),
        'attributes': list(names),
        'input': {'name': INPUT_NAME, 'shape': ['N', 3, size, size], 'dtype': 'float32', 'layout': 'NCHW'},
        'output': {'name': OUTPUT_NAME, 'shape': ['N', len(names)], 'index': 0,
                   'meaning': 'fused logits (mean of the primary and every attention classifier); '
                              'probability = sigmoid(logit), one column per attribute in "attributes" order',
                   'activation': 'sigmoid'},
        'preprocessing': {
            'channel_order': 'RGB', 'pixel_range': [0, 255],
            'resize': [cfg['resize'], cfg['resize']], 'interpolation': 'bilinear',
            'centre_crop': [size, size],
            'mean': [round(float(v), 4) for v in mean], 'std': [round(float(v), 4) for v in std],
            'formula': 'x = (centre_crop(resize(rgb_uint8)) - mean) / std, HWC -> CHW, add the batch axis',
        },
        'model': {k: cfg[k] for k in ('backbone', 'preset', 'input_size', 'resize', 'normalisation', 'taps',
                                      'rga',
                                      'head', 'dataset') if cfg.get(k) is not None},
    }


def export_symbol(net, input_size, folder, ctx):
    """``model-symbol.json`` + ``model-0000.params`` of the fused-logits graph into ``folder``."""
    from mxnet import nd
    block = FusedLogits(net)
    block.hybridize(static_alloc=False, static_shape=False)
    block(nd.zeros((1, 3, input_size, input_size), ctx=ctx[0]))       # build the graph once
    block.export(os.path.join(folder, 'model'))
    return [os.path.join(folder, f) for f in FILES[:2]]


@contextlib.contextmanager
def _onnx_opset(version):
    """While MXNet's exporter runs: the installed onnx reports ``version`` as its newest opset and skips the
    per-graph check (run afterwards on the whole model, with the model's own opset)."""
    import onnx.checker
    import onnx.defs
    saved = onnx.defs.onnx_opset_version, onnx.checker.check_graph, logging.getLogger().level
    onnx.defs.onnx_opset_version = lambda: version
    onnx.checker.check_graph = lambda *args, **kwargs: None
    # its per-operator notes (e.g. on 2-D dot) are not for users
    logging.getLogger().setLevel(logging.ERROR)
    try:
        yield
    finally:
        onnx.defs.onnx_opset_version, onnx.checker.check_graph = saved[:2]
        logging.getLogger().setLevel(saved[2])


def onnx_modules():
    """(onnx, mxnet.onnx) or a UserError that says how to install them."""
    try:
        import onnx
        import mxnet.onnx as mx_onnx
        onnx.mapping  # noqa: B018  pylint: disable=pointless-statement
    except (ImportError, AttributeError):
        raise UserError("ONNX export needs onnx>=1.16,<1.19 (MXNet 1.9.1's exporter uses APIs later releases "
                        "removed) and onnxruntime: pip install -e '.[onnx]'")
    return onnx, mx_onnx


def onnx_session(path):
    """An onnxruntime CPU session for ``path``, with OMP_NUM_THREADS threads (like MXNet) and quiet logs."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError("running an exported model needs onnxruntime: pip install -e '.[onnx]'")
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = int(os.environ.get('OMP_NUM_THREADS') or 0)      # 0: onnxruntime decides
    return onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def export_onnx(symbol_file, params_file, input_size, out):
    """``out`` (model.onnx) from the exported symbol and params: opset 13, dynamic batch, named output."""
    onnx, mx_onnx = onnx_modules()
    shape = (1, 3, input_size, input_size)
    with _onnx_opset(ONNX_OPSET):
        mx_onnx.export_model(symbol_file, params_file, in_shapes=[shape], in_types=[np.float32],
                             onnx_file_path=out, dynamic=True, dynamic_input_shapes=[(None,) + shape[1:]])
    model = onnx.load(out)
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]      # weights as constants: ORT can fold them
    del graph.input[:]
    graph.input.extend(inputs)
    old = graph.output[0].name
    for node in graph.node:
        node.output[:] = [OUTPUT_NAME if o == old else o for o in node.output]
    graph.output[0].name = OUTPUT_NAME
    # not the installed onnx's newest: older runtimes load it too
    model.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, out)
    return out


def calibration_images(cfg, names, count):
    """``count`` images of the run's training split (a fixed random sample), preprocessed as for
    evaluation: the inputs whose ranges set the INT8 scales."""
    import datasets
    from datasets import loaders
    if not cfg.get('dataset'):
        raise UserError('--int8 calibrates on the training split: give --dataset and --data_path')
    data = datasets.load_split(cfg['dataset'], cfg['data_path'], 'train', attribute_names=names,
                               **dict(loaders.data_options(cfg), limit=None))
    transform = loaders.transform(cfg)
    picks = np.random.RandomState(0).permutation(len(data))[:count]
    return [transform(data[int(i)][0], int(i))[None] for i in picks]


def quantize_onnx(src, out, images):
    """``out``: ``src`` quantized by onnxruntime (QDQ, uint8 activations, int8 weights, per tensor,
    min/max calibration over ``images``, each 1 x 3 x S x S float32)."""
    onnx, _ = onnx_modules()
    try:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise UserError("--int8 needs onnxruntime>=1.18,<1.20: pip install -e '.[onnx]'")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(images)

        def get_next(self):
            x = next(self.items, None)
            return None if x is None else {INPUT_NAME: x}

    prepared = out + '.prep.onnx'
    try:
        quant_pre_process(src, prepared, skip_symbolic_shape=True)
        quantize_static(prepared, out, Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, per_channel=False)
    finally:
        if os.path.exists(prepared):
            os.remove(prepared)
    model = onnx.load(out)
    model.ir_version = ONNX_IR_VERSION
    onnx.save(model, out)
    return out


def export(net, cfg, names, folder, ctx, calibration=None):
    """Write the files of the module docstring into ``folder`` (``model-int8.onnx`` when ``calibration``
    images are given); each appears only when complete."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError('--export %s is a file; give a folder' % folder)
    onnx = net.onnx_reason is None
    if not onnx and calibration:
        raise UserError('--int8 quantizes the ONNX model, and this network has none (%s); export without '
                        '--int8' % net.onnx_reason)
    if onnx:
        onnx_modules()                             # before any work: the extra must be installed
    os.makedirs(folder, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix='.export-', dir=folder)
    try:
        symbol_file, params_file = export_symbol(net, cfg['input_size'], tmp, ctx)
        files = list(FILES)
        if onnx:
            export_onnx(symbol_file, params_file, cfg['input_size'], os.path.join(tmp, FILES[2]))
        else:
            files.remove(FILES[2])
            print('MXNet symbol files only (%s); run them with mx.gluon.SymbolBlock.imports or predict.py on '
                  'the run folder' % net.onnx_reason)
        if calibration:
            quantize_onnx(os.path.join(tmp, FILES[2]), os.path.join(tmp, INT8_FILE), calibration)
            files.insert(3, INT8_FILE)
        with open(os.path.join(tmp, FILES[3]), 'w') as f:
            json.dump(model_card(cfg, names, len(calibration or ()), onnx), f, indent=2)
        for name in files:
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    except OSError as err:
        raise UserError('could not write the export to %s (%s)' % (folder, err.strerror or err))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [os.path.join(folder, name) for name in files]

