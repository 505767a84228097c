"""No silent wrong results, run folders that are never mixed or clobbered, and one-line errors."""
import json
import os
import sys
import warnings

import numpy as np
import pytest
import mxnet as mx

from engine import checkpoints
import eval as eval_script
from engine import runfolder
from engine import steps
from engine import report
from engine import sources
import train
from common.errors import UserError
from losses import VAALoss
from tests import fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--limit', '64', '--input-size', '32', '--batch_size', '16', '--log-interval', '1']


_cli, _error = fixtures.cli, fixtures.one_line_error


@pytest.fixture(scope='module')
def finished_run(demo_path, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('runs') / 'finished')
    result = train.main(['--data_path', demo_path, '--out', out, '--epochs', '2'] + TINY)
    return out, result


def _csv(tmp_path, name='data'):
    root = tmp_path / name
    root.mkdir()
    fixtures.csv_dataset(str(root))
    return root


def _one_epoch(root, out, extra=()):
    return train.main(['--dataset', 'csv', '--data_path', str(root), '--out', str(out), '--epochs', '1',
                       '--batch_size', '4', '--backbone', 'resnet18_v1', '--input-size', '32',
                       '--num-workers', '0',
                       '--no-pretrained'] + list(extra))


# ---------------------------------------------------------------------------------------------- wrong results

def test_diverged_validation_outputs_stop_the_run_and_never_become_best(demo_path, tmp_path, monkeypatch):
    """Epoch 1's validation outputs are NaN (weights diverged, training loss still finite): the run stops
    naming the epoch, and neither last.params nor best.params takes anything from that epoch."""
    predict = steps.predict

    def diverging(net, loader, ctx, loss_fn=None, **kwargs):
        logits, labels, masks, loss = predict(net, loader, ctx, loss_fn, **kwargs)
        if diverging.calls == 1:
            logits[3, 2] = np.nan
        diverging.calls += 1
        return logits, labels, masks, loss
    diverging.calls = 0
    monkeypatch.setattr(steps, 'predict', diverging)
    out = str(tmp_path / 'nan')
    with pytest.raises(UserError, match='validation outputs became inf/NaN in epoch 1'):
        train.main(['--data_path', demo_path, '--out', out, '--epochs', '3'] + TINY)
    meta, _ = checkpoints.read_meta(os.path.join(out, 'checkpoints', 'last.params'))
    best, _ = checkpoints.read_meta(os.path.join(out, 'checkpoints', 'best.params'))
    assert meta['state']['epoch'] == 1 and best['state']['best_epoch'] == 0
    assert [r['epoch'] for r in json.load(open(os.path.join(out, 'metrics.json')))] == [0]


def test_evaluating_a_network_with_non_finite_outputs_is_refused(finished_run):
    out, _ = finished_run
    net, cfg, names = sources.load_source(out, [mx.cpu()])
    for p in net.collect_params().values():
        if p.name.endswith('classifier0_fsr_dense0_bias'):
            p.set_data(p.data() * np.nan)
    with pytest.raises(UserError, match='inf/NaN outputs for'):
        report.evaluate_split(net, dict(cfg, limit=16), names, 'val', [mx.cpu()])


@pytest.mark.parametrize('change', ['swapped', 'missing'])
def test_every_split_needs_the_training_attributes_in_order(tmp_path, change):
    root = _csv(tmp_path)
    lines = (root / 'val.csv').read_text().splitlines()
    rows = [l.split(',') for l in lines]
    if change == 'swapped':
        rows = [[r[0], r[2], r[1], r[3]] for r in rows]
    else:
        rows = [r[:3] for r in rows]
    (root / 'val.csv').write_text('\n'.join(','.join(r) for r in rows) + '\n')
    with pytest.raises(UserError, match=r'the val split of csv has the attributes \[.*\] \(\d\), but the '
                                        r'model is '
                                        r'trained for \[hat, bag, coat\] \(3\)'):
        _one_epoch(root, tmp_path / 'run')
    # failed before its first checkpoint: nothing kept
    assert not (tmp_path / 'run').exists()


def test_a_truncated_jpeg_is_refused_or_skipped(tmp_path):
    import cv2
    root = _csv(tmp_path)
    image = root / 'img' / 'train_04.jpg'
    noise = np.random.RandomState(0).randint(0, 255, (120, 90, 3)).astype(np.uint8)
    data = cv2.imencode('.jpg', noise)[1].tobytes()
    image.write_bytes(data[:int(len(data) * 0.6)])          # the headers and the upper part of the picture
    assert cv2.imdecode(np.frombuffer(image.read_bytes(), np.uint8), cv2.IMREAD_COLOR) is not None  # silently
    with pytest.raises(UserError, match=r'train_04.jpg is truncated .*--skip-bad-samples'):
        _one_epoch(root, tmp_path / 'r1')
    _one_epoch(root, tmp_path / 'r2', ['--skip-bad-samples'])
    log = (tmp_path / 'r2' / 'train.log').read_text()
    assert '1 bad sample(s) skipped' in log and 'train_04.jpg is truncated' in log


def test_a_csv_written_by_excel_with_a_byte_order_mark_reads_the_same(tmp_path):
    import datasets
    root = _csv(tmp_path)
    plain = datasets.get_split('csv', str(root), 'train')
    (root / 'train.csv').write_bytes(b'\xef\xbb\xbf' + (root / 'train.csv').read_bytes())
    bom = datasets.get_split('csv', str(root), 'train')
    assert bom.attribute_names == plain.attribute_names == ('hat', 'bag', 'coat')
    np.testing.assert_array_equal(bom.labels, plain.labels)


# ---------------------------------------------------------------------------------------------- run folders

def test_a_run_folder_in_use_is_refused_naming_the_holder(tmp_path, demo_path):
    out = str(tmp_path / 'busy')
    holder = runfolder.RunFolder.prepare(dict(resume=None, out=out, dataset='demo', backbone='b', preset='p'))
    try:
        message = _error(['train.py', '--data_path', demo_path, '--out', out, '--epochs', '1'] + TINY,
                         'is in use by process %d' % os.getpid())
        assert out in message
    finally:
        holder.close()
    assert not os.path.exists(os.path.join(out, 'config.json'))


def test_out_with_other_files_is_refused_and_left_alone(tmp_path, demo_path):
    mine = tmp_path / 'my_results'
    mine.mkdir()
    (mine / 'config.json').write_text('{"mine": true}')
    (mine / 'notes.txt').write_text('keep me')
    _error(['train.py', '--data_path', demo_path, '--out', str(mine)],
           'already holds files that are not a run')
    assert sorted(os.listdir(mine)) == ['config.json', 'notes.txt']
    assert (mine / 'config.json').read_text() == '{"mine": true}'


def test_run_folder_files_are_written_atomically(tmp_path, monkeypatch):
    folder = runfolder.RunFolder(str(tmp_path))
    folder.add_row(dict(epoch=0, train_loss=1.0, val_loss=1.0, train_mAP=.5, val_mAP=.5, val_mA=.5))
    before = (tmp_path / 'metrics.json').read_text()

    def dies_halfway(obj, f, **kwargs):
        f.write(json.dumps(obj)[:10])
        raise KeyboardInterrupt('killed while writing')
    monkeypatch.setattr(runfolder.json, 'dump', dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        folder.add_row(dict(epoch=1, train_loss=1.0, val_loss=1.0, train_mAP=.5, val_mAP=.5, val_mA=.5))
    monkeypatch.undo()
    assert (tmp_path / 'metrics.json').read_text() == before
    assert sorted(os.listdir(tmp_path)) == ['curves.png', 'metrics.csv', 'metrics.json']


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / 'last.params')
    checkpoints.atomic_save_ndarrays(path, {'w': mx.nd.ones((2,))})

    def full(fname, data):
        open(fname, 'wb').write(b'part')
        raise mx.base.MXNetError('Traceback (most recent call last):\n  File "../src/io/local_filesys.cc", '
                                 'line 40\nMXNetError: Check failed: nwrite == size (0 vs. 128) : '
                                 'FileStream.Write incomplete')
    monkeypatch.setattr(checkpoints.nd, 'save', full)
    with pytest.raises(UserError) as err:
        checkpoints.atomic_save_ndarrays(path, {'w': mx.nd.zeros((2,))})
    assert 'could not write %s (Check failed: nwrite == size' % path in str(err.value)
    assert 'last.params is as it was before' in str(err.value) and 'Traceback' not in str(err.value)
    monkeypatch.undo()
    assert os.listdir(str(tmp_path)) == ['last.params']
    np.testing.assert_array_equal(mx.nd.load(path)['w'].asnumpy(), [1, 1])


def test_temporary_files_of_killed_writers_are_cleared_when_the_run_resumes(finished_run, tmp_path):
    import shutil
    out = str(tmp_path / 'copy')
    shutil.copytree(finished_run[0], out)
    stale = [os.path.join(out, 'checkpoints', 'last.tmp99999-0.params'),     # today's names
             os.path.join(out, 'metrics.tmp4242-17.json'),
             os.path.join(out, 'checkpoints', 'last.tmp99999.params'),       # earlier versions' names
             os.path.join(out, 'metrics.tmp4242.json'),
             os.path.join(out, 'checkpoints', 'best.params.tmp31337')]
    for path in stale:
        open(path, 'wb').write(b'x' * 100)
    folder = runfolder.RunFolder.prepare(dict(resume=out))
    folder.close()
    assert not any(os.path.exists(p) for p in stale)
    assert os.path.isfile(os.path.join(out, 'checkpoints', 'last.params'))


def test_resume_with_fewer_epochs_than_done_is_refused_and_changes_nothing(finished_run):
    out, _ = finished_run
    before = open(os.path.join(out, 'config.json')).read()
    with pytest.raises(UserError, match='the run has finished 2 epochs, so --epochs 1 would train nothing'):
        train.main(['--resume', out, '--epochs', '1'])
    assert open(os.path.join(out, 'config.json')).read() == before


def test_images_of_the_same_name_get_their_own_overlays(finished_run, tmp_path):
    import cv2
    out, _ = finished_run
    paths = []
    for folder, colour in (('a', (0, 0, 255)), ('b', (255, 0, 0))):
        os.makedirs(str(tmp_path / folder))
        paths.append(str(tmp_path / folder / 'x.png'))
        cv2.imwrite(paths[-1], np.full((48, 48, 3), colour, np.uint8))
    written = eval_script.main([out, '--image'] + paths + ['--out-dir', str(tmp_path / 'att')])
    assert len(set(written)) == 2 and all(os.path.isfile(w) for w in written)


# ------------------------------------------------------------------------------------- one-line errors

def test_eval_out_is_checked_before_the_work(finished_run, tmp_path):
    out, _ = finished_run
    _error(['eval.py', out, '--out', str(tmp_path)], '--out %s is a folder' % tmp_path)
    _error(['eval.py', out, '--out', str(tmp_path / 'no' / 'such' / 'r.json')],
           'cannot be written (no folder')


def test_bad_numbers_are_refused_naming_the_flag(tmp_path, demo_path):
    base = ['train.py', '--data_path', demo_path, '--out', str(tmp_path / 'r')]
    for flags, expected in ((['--lr', 'nan'], '--lr must be a positive number, got nan'),
                            (['--input-size', '16'], '--input-size must be at least 32'),
                            (['--input-size', '0'], '--input-size must be at least 32'),
                            (['--limit', '0'], '--limit must be at least 1'),
                            (['--gamma', '-1'], '--gamma must be 0 or more'),
                            (['--num-workers', '-1'], '--num-workers must be 0 or more')):
        _error(base + flags, expected)
    assert not os.path.exists(str(tmp_path / 'r'))


def test_eval_batch_size_zero_and_damaged_checkpoints_are_one_line(finished_run, tmp_path):
    out, _ = finished_run
    _error(['eval.py', out, '--batch_size', '0'], '--batch_size must be at least 1, got 0')
    cut = open(os.path.join(out, 'checkpoints', 'best.params'), 'rb').read()[:1000]
    for name, data in (('empty.params', b''), ('cut.params', cut)):
        path = str(tmp_path / name)
        open(path, 'wb').write(data)
        line = _error(['eval.py', path, '--dataset', 'demo'], '%s is not an MXNet parameter file (' % path)
        assert 'Invalid NDArray file format' in line


def test_small_input_warns_that_the_attention_has_nothing_to_choose_from(demo_path, tmp_path):
    proc = _cli(['train.py', '--data_path', demo_path, '--out', str(tmp_path / 'r'), '--epochs', '1',
                 '--preset', 'paper'] + TINY)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'tap s4 has a 1x1 map at --input-size 32' in proc.stdout + proc.stderr


def test_plain_bce_losses_use_every_input_and_say_what_they_are():
    loss = VAALoss(np.full(3, 2.0), np.ones(3), plain_bce=True)
    loss.hybridize()
    x, y = mx.nd.random.normal(shape=(4, 3)), mx.nd.ones((4, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        value = loss(x, [x], y, y.ones_like(), y.ones_like() * 3).asnumpy()
    assert not [w for w in caught if 'is not used' in str(w.message)]
    bce = np.logaddexp(0, -x.asnumpy()).mean(1)                        # labels 1: -log sigmoid(x)
    np.testing.assert_allclose(value, 2 * bce, rtol=1e-5)              # weights and std factor ignored
    assert 'plain sigmoid BCE' in repr(loss)
    finetune = VAALoss(primary=False)
    assert 'no loss on the primary logits' in repr(finetune) and 'focal' not in repr(finetune)


def test_the_resume_hint_matches_how_the_run_was_started(monkeypatch):
    monkeypatch.setenv('VAA_LAUNCHER', './run.sh train')
    assert runfolder.resume_command('runs/x') == './run.sh train --resume runs/x'
    monkeypatch.delenv('VAA_LAUNCHER')
    assert runfolder.resume_command('runs/x').endswith('python train.py --resume runs/x') or \
        runfolder.resume_command('runs/x') == '%s train.py --resume runs/x' % sys.executable


def test_a_resumed_epoch_counts_its_batches_from_where_it_stopped(caplog):
    import logging
    progress = runfolder.Progress(75, 'epoch 3', 10, done=44)
    with caplog.at_level(logging.INFO, logger='vaa'):
        runfolder.LOG.propagate = True
        try:
            for _ in range(6):
                progress.update(8, lambda: 0.5)
        finally:
            runfolder.LOG.propagate = False
    assert 'epoch 3 [50/75]' in caplog.text and '[10/' not in caplog.text
