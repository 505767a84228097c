"""Rethinking_of_PAR's annotation files (dataset_all.pkl, dataset_zs_run0.pkl): written by a transcription
of its format_*.py scripts, read by datasets/pedes.py as its pedes.py reads them, and never unpickled with
anything but the admitted classes."""
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import datasets
from datasets import pedes
from common.errors import UserError
from tests import fixtures
from tests import rethinking_reference as R

WRITERS = {'peta': (R.write_peta_mat, R.format_peta), 'pa100k': (fixtures.pa100k, R.format_pa100k),
           'rap': (R.write_rap_mat, R.format_rap), 'rap2': (R.write_rap2_mat, R.format_rap2)}


def make(root, name, protocol=None, **kwargs):
    """The .mat files and images of ``name`` in ``root``, then its pickle as the script writes it."""
    os.makedirs(root, exist_ok=True)
    write_mat, format_script = WRITERS[name]
    write_mat(root)
    return format_script(root, protocol=protocol, **kwargs)


def expected(dataset, split, run=0, columns=None):
    """What pedes.py's PedesAttr (DATASET.LABEL 'eval') holds for ``split``: label 2 set to 0, the
    label_idx.eval columns, partition[split][run] when it is a list (pedes.py takes run 0)."""
    attr_label = np.array(dataset.label, copy=True)
    attr_label[attr_label == 2] = 0
    eval_idx = dataset.label_idx.eval if columns is None else columns
    attr_label = attr_label[:, eval_idx]
    img_idx = dataset.partition[split]
    if isinstance(img_idx, list):
        img_idx = img_idx[run]
    names = [dataset.attr_name[i] for i in eval_idx]
    return [dataset.image_name[i] for i in img_idx], attr_label[img_idx], names


def _mean_colour(image):
    return image.reshape(-1, 3).mean(0)


@pytest.mark.parametrize('protocol', [0, 2, 3, 4, 5])     # 3: Python 3.7's, which wrote theirs
@pytest.mark.parametrize('name', sorted(WRITERS))
def test_every_file_reads_as_pedes_py_reads_it(tmp_path, name, protocol):
    root = str(tmp_path / name)
    dataset = make(root, name, protocol)
    assert datasets.detect(root) == 'pedes'
    splits = [s for s in ('train', 'val', 'trainval', 'test') if s in dataset.partition]
    runs = len(dataset.partition[splits[0]]) if isinstance(dataset.partition[splits[0]], list) else 1
    for split in splits:
        for run in sorted({0, runs - 1}):
            data = datasets.get_split('pedes', root, split, partition=run)
            files, labels, names = expected(dataset, split, run)
            assert data.attribute_names == tuple(names)
            np.testing.assert_array_equal(data.labels, labels)
            assert data.mask.all()
            assert [os.path.basename(p) for p in data.paths] == files
    colours = fixtures.COLOURS
    index = int(np.asarray(dataset.partition['test'][0] if runs > 1 else dataset.partition['test'])[0])
    first = datasets.get_split('pedes', root, 'test')[0][0]
    tolerance = 1 if name == 'peta' else 12                   # PNG (PETA) or JPEG
    np.testing.assert_allclose(_mean_colour(first), colours[index % len(colours)], atol=tolerance)
    every = datasets.get_split('pedes', root, 'test', all_attributes=True)
    assert every.num_classes == len(dataset.attr_name)
    assert data.community_name == {'peta': 'PETA', 'pa100k': 'PA100k', 'rap': 'RAPv1', 'rap2': 'RAPv2'}[name]


def test_peta_matches_the_deepmar_reader_in_the_group_order(tmp_path):
    """Two independent readers of the same images: PETA.mat (DeepMAR's order, first 35) and the pickle
    Rethinking_of_PAR makes from it (label_idx.eval: the same 35 in its group order)."""
    root = str(tmp_path / 'PETA')
    make(root, 'peta')
    assert datasets.detect(root) == 'pedes'                          # the pickle wins over PETA.mat
    for run in (0, 3):
        for split in ('train', 'val', 'trainval', 'test'):
            ours = datasets.get_split('peta', root, split, partition=run)
            theirs = datasets.get_split('pedes', root, split, partition=run)
            assert ours.paths == theirs.paths
            np.testing.assert_array_equal(ours.labels[:, R.PETA_GROUP_ORDER], theirs.labels)
            assert [ours.attribute_names[c] for c in R.PETA_GROUP_ORDER] == list(theirs.attribute_names)


def test_zero_shot_files_have_one_partition_and_their_own_attributes(tmp_path):
    rng = np.random.RandomState(3)
    root = str(tmp_path / 'PETA')
    os.makedirs(root)
    R.write_peta_mat(root)
    order = rng.permutation(24)
    split = R.Split(train_idx=order[:12].tolist(), val_idx=order[12:15].tolist(),
                    test_idx=order[15:].tolist())
    zs = R.format_peta(root, new_split=split)
    assert datasets.detect(root) == 'pedes'                          # dataset_zs_run0.pkl alone marks it
    error = _user_error(lambda: datasets.get_split('pedes', root, 'train'))
    assert 'no dataset_all.pkl' in error and '--split-file dataset_zs_run0.pkl' in error
    test = datasets.get_split('pedes', root, 'test', split_file='dataset_zs_run0.pkl')
    files, labels, names = expected(zs, 'test')
    np.testing.assert_array_equal(test.labels, labels)
    assert test.community_name == 'PETAzs' and len(test) == 9
    assert len(datasets.get_split('pedes', root, 'trainval', split_file='dataset_zs_run0.pkl')) == 15
    error = _user_error(lambda: datasets.get_split('pedes', root, 'test', partition=1,
                                                   split_file='dataset_zs_run0.pkl'))
    assert 'one partition.test' in error and 'drop --partition' in error
    # train.py's flags reach the reader: --split-file, and the community's protocol
    import mxnet as mx
    from engine import config
    import train
    from engine import loop
    cfg, _ = config.parse_args(['--data_path', root, '--split-file', 'dataset_zs_run0.pkl', '--train-split',
                                'trainval', '--val-split', 'test', '--no-pretrained', '--batch_size', '4'])
    data = train.get_data(cfg, loop.Place([mx.cpu()], None, 0, 1))
    assert cfg['dataset'] == 'pedes' and (len(data.train), len(data.val), len(data.test)) == (15, 9, 9)
    np.testing.assert_array_equal(data.train.labels, expected(zs, 'trainval')[1])

    root2 = str(tmp_path / 'RAP2')
    make(root2, 'rap2')
    order = rng.permutation(16)
    zs2 = R.format_rap2(root2,
                        new_split=R.Split(train_idx=order[:8], val_idx=order[8:10], test_idx=order[10:]))
    test = datasets.get_split('pedes', root2, 'test', split_file='dataset_zs_run0.pkl')
    assert test.num_classes == 53 and test.community_name == 'RAPzs'
    files, labels, names = expected(zs2, 'test')
    assert 38 not in zs2.label_idx.eval and names == list(test.attribute_names)
    np.testing.assert_array_equal(test.labels, labels)
    # the same folder's dataset_all.pkl is still read by default, with its 54 attributes
    assert datasets.get_split('pedes', root2, 'test').num_classes == 54


def test_a_file_without_label_idx_evaluates_every_attribute(tmp_path):
    root = str(tmp_path / 'PA')
    dataset = make(root, 'pa100k')
    dataset.pop('label_idx')
    R._dump(dataset, os.path.join(root, 'dataset_zs_run0.pkl'), None)
    data = datasets.get_split('pedes', root, 'val', split_file='dataset_zs_run0.pkl')
    assert data.attribute_names == tuple(dataset.attr_name)
    np.testing.assert_array_equal(data.labels, np.asarray(dataset.label)[dataset.partition.val])


def test_rap_has_no_val_split_and_the_hint_names_the_protocol(tmp_path):
    root = str(tmp_path / 'RAP')
    make(root, 'rap')
    error = _user_error(lambda: datasets.get_split('pedes', root, 'val'))
    assert 'partitions trainval, test' in error and '--train-split trainval --val-split test' in error
    error = _user_error(lambda: datasets.get_split('pedes', root, 'trainval', partition=5))
    assert '--partition 5' in error and 'runs 0..4' in error


def test_moved_folders_are_read_from_the_data_path(tmp_path):
    """The file's root is the folder of the machine that wrote it: after a move, <data_path>/images."""
    old = str(tmp_path / 'old')
    make(old, 'peta')
    new = str(tmp_path / 'elsewhere' / 'PETA')
    shutil.move(old, new)
    assert not os.path.exists(old)
    data = datasets.get_split('pedes', new, 'test')
    assert all(p.startswith(os.path.join(new, 'images')) for p in data.paths)
    shutil.rmtree(os.path.join(new, 'images'))
    error = _user_error(lambda: datasets.get_split('pedes', new, 'test'))
    assert '00001.png' in error and os.path.join(new, 'images') in error


def test_broken_files_get_one_line_naming_the_field(tmp_path):
    root = str(tmp_path / 'PA')
    dataset = make(root, 'pa100k')
    path = os.path.join(root, 'dataset_all.pkl')
    label = np.array(dataset.label)
    label[1, dataset.label_idx.eval[0]] = 3
    dataset.label = label
    R._dump(dataset, path, None)
    assert 'label row 1' in _user_error(lambda: datasets.get_split('pedes', root, 'train'))
    assert len(datasets.get_split('pedes', root, 'train', skip_bad=True)) == len(dataset.partition.train) - 1
    dataset.label = label.clip(0, 1)
    dataset.partition.test = np.array([0, 99])
    R._dump(dataset, path, None)
    assert 'partition.test holds row 99' in _user_error(lambda: datasets.get_split('pedes', root, 'test'))
    dataset.partition.test = np.array([0.0, 2.0, 3.0])              # whole numbers as floats are row numbers
    R._dump(dataset, path, None)
    assert len(datasets.get_split('pedes', root, 'test')) == 3
    dataset.partition.test = np.array([0.5])
    R._dump(dataset, path, None)
    assert 'not whole' in _user_error(lambda: datasets.get_split('pedes', root, 'test'))
    dataset.pop('image_name')
    R._dump(dataset, path, None)
    assert "no 'image_name' field" in _user_error(lambda: datasets.get_split('pedes', root, 'test'))
    with open(path, 'wb') as f:
        f.write(b'\x80\x04not a pickle')
    assert 'not a readable annotation pickle' in _user_error(lambda: datasets.get_split('pedes', root,
                                                                                        'test'))


# ---------------------------------------------------------------------------------------------- refused

class _System(object):
    """Unpickles to os.system(command): what a hostile annotation file would carry."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Eval(object):
    def __init__(self, source):
        self.source = source

    def __reduce__(self):
        import builtins
        return builtins.eval, (self.source,)


def _payloads(marker):
    touch = 'touch %s' % marker
    # a valid-looking record whose label field is the payload; a payload at the top; one inside a list
    # of partitions; builtins.eval; and protocol 0, whose GLOBAL opcode names it in text
    record = {'description': 'peta', 'image_name': ['00001.png'], 'label': _System(touch)}
    yield 'posix.system', pickle.dumps(record, 4)
    yield 'posix.system', pickle.dumps(_System(touch), 2)
    yield 'posix.system', pickle.dumps({'partition': {'test': [np.arange(3), _System(touch)]}}, 5)
    yield 'builtins.eval', pickle.dumps(_Eval("open(%r, 'w').close()" % marker), 4)
    yield 'posix.system', pickle.dumps(_System(touch), 0)


def test_a_pickle_that_calls_anything_else_is_refused_and_nothing_runs(tmp_path):
    marker = str(tmp_path / 'ran')
    root = str(tmp_path / 'PETA')
    make(root, 'peta')
    path = os.path.join(root, 'dataset_all.pkl')
    for k, (callable_name, payload) in enumerate(_payloads(marker)):
        with open(path, 'wb') as f:
            f.write(payload)
        error = _user_error(lambda: datasets.get_split('pedes', root, 'test'))
        assert 'the pickle calls %s' % callable_name in error and 'nothing in it was run' in error, error
        assert not os.path.exists(marker), 'payload %d ran' % k
    # the payload is live: pickle.load, which the reader never uses, runs it
    probe = subprocess.run([sys.executable, '-c', 'import pickle, sys; pickle.load(open(sys.argv[1], "rb"))',
                            path], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert probe.returncode == 0 and os.path.exists(marker)


def test_the_admitted_classes_build_records_arrays_and_ranges_only():
    assert set(pedes.ADMITTED) >= {('easydict', 'EasyDict'), ('builtins', 'range'),
                                   ('numpy.core.multiarray', '_reconstruct')}
    for module, _ in pedes.ADMITTED:
        numpy_core = module.startswith(('numpy.core.', 'numpy._core.'))
        assert module in ('easydict', 'builtins', 'copyreg', '_codecs', 'numpy') or numpy_core
    forged = pickle.dumps(pedes._Record(a=1), 0).replace(b'datasets.pedes\n_Record', b'easydict\nEasyDict')
    with pytest.raises(UserError, match='copyreg._reconstructor'):   # another class through the back door
        pedes.read_annotation(_file(forged.replace(b'c__builtin__\ndict', b'cbuiltins\nrange')))


def _file(data, _n=[0]):
    import tempfile
    _n[0] += 1
    path = os.path.join(tempfile.mkdtemp(), 'x%d.pkl' % _n[0])
    with open(path, 'wb') as f:
        f.write(data)
    return path


def _user_error(call):
    with pytest.raises(UserError) as info:
        call()
    return str(info.value)


# ---------------------------------------------------------------------------------------------- runs

def test_train_eval_and_predict_through_the_reader(tmp_path, capsys):
    """One epoch on the PETA file (told from the folder, numbered run 2, the report in the community's
    convention), then eval.py --compare rethinking and predict.py; the test report equals
    get_pedestrian_metrics (transcribed) on the best checkpoint's probabilities."""
    import eval as eval_script
    from engine import sources
    from evaluation import metrics
    import predict
    from engine import steps
    import train
    from datasets import loaders
    from engine.distributed import parse_contexts
    root = str(tmp_path / 'PETA')
    dataset = make(root, 'peta')
    out = str(tmp_path / 'run')
    train.main(['--data_path', root, '--out', out, '--epochs', '1', '--batch_size', '4', '--backbone',
                'resnet18_v1', '--input-size', '32', '--num-workers', '0', '--no-pretrained', '--partition',
                '2',
                '--metrics', 'rethinking'])
    cfg = json.load(open(os.path.join(out, 'config.json')))
    assert (cfg['dataset'], cfg['partition'], cfg['metrics']) == ('pedes', 2, 'rethinking')
    report = json.load(open(os.path.join(out, 'test_metrics.json')))
    ctx = parse_contexts(None)
    net, run_cfg, names = sources.load_source(out, ctx)
    test = datasets.get_split('pedes', root, 'test', partition=2)
    logits, labels, _, _ = steps.predict(net, loaders.eval_loader(run_cfg, test), ctx)
    files, gt, _ = expected(dataset, 'test', run=2)
    np.testing.assert_array_equal(labels, gt)
    oracle = R.get_pedestrian_metrics(gt, metrics.sigmoid(logits))
    assert report['metrics'] == 'rethinking'
    for ours, theirs in (('mA', 'ma'), ('accuracy', 'instance_acc'), ('precision', 'instance_prec'),
                         ('recall', 'instance_recall'), ('f1', 'instance_f1')):
        assert report[ours] == pytest.approx(oracle[theirs], abs=1e-12), ours
    capsys.readouterr()
    eval_script.main([out, '--compare', 'rethinking', '--num-workers', '0'])
    printed = capsys.readouterr().out
    assert re.search(r'PETA\s+resnet50\s+83\.96\s+78\.65\s+87\.08\s+85\.62\s+86\.35', printed), printed
    ours_line = next(line for line in printed.splitlines() if line.startswith('PETA     ours'))
    assert '%.2f' % (100 * oracle['ma']) in ours_line
    assert json.load(open(os.path.join(out, 'eval_test.json')))['metrics'] == 'rethinking'
    assert 'drop --metrics ours' in _user_error(lambda: eval_script.main([out, '--compare', 'rethinking',
                                                                         '--metrics', 'ours']))
    plain = eval_script.main([out, '--metrics', 'ours', '--num-workers', '0'])
    assert plain['metrics'] == 'ours'
    assert plain['mA'] == pytest.approx(metrics.label_based(metrics.sigmoid(logits), gt, np.ones_like(gt))[0],
                                        abs=1e-12)
    csv_path = str(tmp_path / 'p.csv')
    predict.main([out, os.path.join(root, 'images', files[0]), '--out', csv_path])
    header = open(csv_path).readline().strip().split(',')
    assert header[1:] == [dataset.attr_name[c] for c in R.PETA_GROUP_ORDER]


def test_the_printed_hints_work(tmp_path):
    """RAP has no val split: the one-line error's flags, added as printed, train the run."""
    root = str(tmp_path / 'RAP')
    make(root, 'rap')
    base = ['train.py', '--data_path', root, '--epochs', '1', '--batch_size', '4', '--backbone',
            'resnet18_v1',
            '--input-size', '32', '--num-workers', '0', '--no-pretrained', '--out', str(tmp_path / 'run')]
    error = fixtures.one_line_error(base, 'no val')
    hint = re.search(r'with (--train-split \S+ --val-split \S+)', error).group(1)
    proc = fixtures.cli(base + hint.split())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.load(open(str(tmp_path / 'run' / 'config.json')))['train_split'] == 'trainval'


def test_the_baseline_table_for_data_it_has_no_numbers_for():
    from evaluation import tables
    result = dict(community_dataset=None, mA=0.5, accuracy=0.4, precision=0.3, recall=0.2, f1=0.1)
    text = tables.rethinking_table(result, 'VAA (paper, resnet18_v1, 32)')
    assert all(('%-8s %-16s %6.2f' % row[:3]) in text for row in tables.RETHINKING_BASELINE)
    assert 'no baseline numbers for this data: they report PA100k, PETA, PETAzs, RAPv1, RAPv2, RAPzs' in text
    assert '50.00  40.00  30.00  20.00  10.00' in text
    result['community_dataset'] = 'RAPzs'
    text = tables.rethinking_table(result, 'VAA')
    assert 'PETA ' not in text and 'RAPzs    resnet50' in text
    assert '-21.76 -24.83 -48.75 -56.60 -67.66' in text                 # ours - their resnet50, in points


# Callables a hostile file would name: each must be refused by name, before it is called. (The numpy ones
# are the planted widening of the allow-list to every attribute of numpy.)
HOSTILE = [('numpy', 'save'), ('numpy', 'load'), ('numpy', 'fromfile'), ('numpy', 'memmap'),
           ('numpy', 'savetxt'), ('numpy', 'loadtxt'), ('numpy.ctypeslib', 'load_library'),
           ('numpy.lib.npyio', 'load'), ('numpy.core.multiarray', 'fromfile'), ('builtins', 'eval'),
           ('builtins', 'exec'), ('builtins', 'open'), ('builtins', 'getattr'), ('builtins', '__import__'),
           ('os', 'system'), ('posix', 'system'), ('os', 'remove'), ('subprocess', 'Popen'),
           ('subprocess', 'check_output'), ('shutil', 'rmtree'), ('pickle', 'loads'), ('io', 'open'),
           ('ctypes', 'CDLL'), ('importlib', 'import_module'), ('runpy', 'run_path'),
           ('copyreg', '__newobj__'),
           ('easydict', 'open'), ('datasets.pedes', '_Record'), ('datasets.pedes', 'read_annotation')]


def _calling(module, name, *args):
    """A protocol-2 pickle that calls ``module.name(*args)`` (GLOBAL, the arguments, REDUCE), written
    opcode by opcode, so that it needs neither the callable nor its module on the writer's side."""
    out = b'\x80\x02c' + module.encode() + b'\n' + name.encode() + b'\n'
    out += pickle.dumps(tuple(args), 2)[2:-1]           # the tuple's opcodes, without PROTO and STOP
    return out + b'R.'


@pytest.mark.parametrize('module,name', HOSTILE)
def test_every_callable_outside_the_allow_list_is_refused_by_name_before_it_runs(tmp_path, module, name):
    marker = str(tmp_path / 'written')
    path = _file(_calling(module, name, marker, np.arange(3)))
    error = _user_error(lambda: pedes.read_annotation(path))
    assert 'the pickle calls %s.%s' % (module, name) in error and 'nothing in it was run' in error, error
    assert not os.path.exists(marker) and os.listdir(str(tmp_path)) == []


def test_the_allow_list_admits_exactly_containers_arrays_ranges_and_records():
    """Every public name of numpy, builtins, os and the modules a pickle could reach is refused but the
    few an annotation file needs: a widened allow-list (all of numpy, say) fails here by name."""
    import builtins
    import os as os_module
    import subprocess as subprocess_module
    needed = {('numpy', 'ndarray'), ('numpy', 'dtype'), ('easydict', 'EasyDict'), ('builtins', 'range'),
              ('builtins', 'dict'), ('copyreg', '_reconstructor'), ('_codecs', 'encode')}
    for core in ('numpy.core', 'numpy._core'):
        needed |= {(core + '.multiarray', '_reconstruct'), (core + '.multiarray', 'scalar'),
                   (core + '.numeric', '_frombuffer')}
    admitted = set()
    for module, namespace in (('numpy', np), ('builtins', builtins), ('os', os_module),
                              ('subprocess', subprocess_module),
                              ('numpy.core.multiarray', np.core.multiarray),
                              ('numpy.core.numeric', np.core.numeric), ('numpy.lib.npyio', np.lib.npyio)):
        for name in dir(namespace):
            try:
                pedes._Unpickler(io.BytesIO(b'')).find_class(module, name)
            except pickle.UnpicklingError as err:
                assert '%s.%s' % (module, name) in str(err)
                continue
            admitted.add((module, name))
    assert admitted <= needed, sorted(admitted - needed)
    assert set(pedes.ADMITTED) == needed


def test_both_ends_of_the_row_and_column_ranges_of_a_file(tmp_path):
    """Row numbers 0..N-1 and attribute columns 0..A-1 are read; N, A and -1 get one line naming the file
    and the field, not an IndexError later; runs 0..4 of a five-run file are read, run 5 is refused."""
    root = str(tmp_path / 'PETA')
    dataset = make(root, 'peta')
    path = os.path.join(root, 'dataset_all.pkl')
    rows, columns = len(dataset.image_name), len(dataset.attr_name)
    for run in (0, 4):
        data = datasets.get_split('pedes', root, 'test', partition=run)
        assert len(data) == len(dataset.partition.test[run])
    error = _user_error(lambda: datasets.get_split('pedes', root, 'test', partition=5))
    assert path in error and 'partition.test has the runs 0..4' in error
    for test, bad in (([0, rows - 1], None), ([0, rows], rows), ([-1, 0], -1)):
        dataset.partition.test = [np.array(test)] * 5
        R._dump(dataset, path, None)
        if bad is None:
            assert len(datasets.get_split('pedes', root, 'test')) == 2
        else:
            error = _user_error(lambda: datasets.get_split('pedes', root, 'test'))
            assert error == '%s: partition.test[0] holds row %d, outside the %d rows of its label matrix' % (
                path, bad, rows)
    dataset.partition.test = [np.array([0, 1])] * 5
    for last, ok in ((columns - 1, True), (columns, False)):
        dataset.label_idx.eval = list(dataset.label_idx.eval[:-1]) + [last]
        R._dump(dataset, path, None)
        if ok:
            assert datasets.get_split('pedes', root, 'test').attribute_names[-1] == dataset.attr_name[last]
        else:
            error = _user_error(lambda: datasets.get_split('pedes', root, 'test'))
            assert error == '%s: label_idx.eval holds column %d, outside the %d attributes of attr_name' % (
                path, columns, columns)
