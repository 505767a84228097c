"""A newcomer's first hour: no run that silently learns nothing, hints that work as printed (each test runs
what was printed), messages that name the bad input, fast --help, plots that explain."""
import json
import os
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tools import compare
from engine import config
import eval as eval_script
from evaluation import plots
import predict
import train
from engine import loop
from common.errors import UserError, plural
from tests import fixtures

ROOT = fixtures.ROOT
TINY = ['--limit', '64', '--input-size', '32', '--batch_size', '16', '--log-interval', '1']
SMALL = ['--backbone', 'resnet18_v1', '--input-size', '32', '--batch_size', '4', '--num-workers', '0']


@pytest.fixture(scope='module')
def two_runs(demo_path, tmp_path_factory):
    """Two demo runs that differ in epochs, seed and input size."""
    root = tmp_path_factory.mktemp('first-hour')
    a, b = str(root / 'one-epoch'), str(root / 'two-epochs')
    train.main(['--data_path', demo_path, '--out', a, '--epochs', '1'] + TINY)
    train.main(['--data_path', demo_path, '--out', b, '--epochs', '2', '--seed', '1'] + TINY[:2] +
               ['--input-size', '48'] + TINY[4:])
    return a, b


def _printed(command):
    """Run a printed command line as the user would, in the project folder."""
    words = shlex.split(command)
    assert words[1].endswith('.py'), command
    return subprocess.run([sys.executable] + words[1:], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=fixtures.SUBPROCESS_TIMEOUT)


# 1 ---------------------------------------------------------------------------------------------------------
def test_random_weights_get_no_first_phase_and_a_too_short_run_is_refused(tmp_path):
    root = str(tmp_path / 'mine')
    fixtures.csv_dataset(root)
    cfg, _ = config.parse_args(['--data_path', root, '--no-pretrained', '--epochs', '2'])
    assert cfg['preset'] == 'paper' and cfg['freeze_epochs'] == 0
    # ImageNet weights
    assert config.parse_args(['--data_path', root, '--epochs', '4'])[0]['freeze_epochs'] == 3
    with pytest.raises(UserError, match=r'--epochs 2 ends inside the first phase of --preset paper '
                                        r'\(--freeze-epochs '
                                        r'3: backbone and primary classifier frozen in epochs '
                                        r'0-2\).*--epochs 4 or more'):
        config.parse_args(['--data_path', root, '--epochs', '2'])
    asked, _ = config.parse_args(['--data_path', root, '--no-pretrained', '--epochs', '2', '--freeze-epochs',
                                  '3'])
    assert asked['freeze_epochs'] == 3                       # asked for: allowed, with warnings (below)


def test_train_log_says_why_there_is_no_first_phase_and_warns_about_one_that_cannot_work(tmp_path):
    root = str(tmp_path / 'mine')
    fixtures.csv_dataset(root)
    out = str(tmp_path / 'run')
    train.main(['--data_path', root, '--no-pretrained', '--epochs', '2', '--out', out] + SMALL)
    log = open(os.path.join(out, 'train.log')).read()
    assert "no first phase: --preset paper's 3 epochs of training the heads on a frozen backbone" in log
    assert 'frozen, training the attention heads' not in log
    assert json.load(open(os.path.join(out, 'config.json')))['freeze_epochs'] == 0
    rows = json.load(open(os.path.join(out, 'metrics.json')))
    assert rows[0]['val_mAP'] != rows[1]['val_mAP'] or rows[0]['train_loss'] != rows[1]['train_loss']
    out2 = str(tmp_path / 'asked')
    train.main(['--data_path', root, '--no-pretrained', '--epochs', '2', '--freeze-epochs', '3', '--out',
                out2] + SMALL)
    log = open(os.path.join(out2, 'train.log')).read()
    for line in ('--freeze-epochs 3 with random weights (--no-pretrained): for 2 epochs the attention heads '
                 'learn',
                 '--freeze-epochs 3 with --epochs 2: the backbone and the primary classifier stay frozen for '
                 'the whole run',
                 'epochs 0-1: backbone and primary classifier frozen, training the attention heads with '
                 'their loss (the whole run)'):
        assert line in log, line


# 2 ---------------------------------------------------------------------------------------------------------
def test_resuming_a_finished_run_trains_and_tests_nothing_and_its_hint_trains_it_longer(
        two_runs, tmp_path, capsys):
    run = str(tmp_path / 'copy')
    shutil.copytree(two_runs[0], run)
    before = {f: os.path.getmtime(os.path.join(run, f)) for f in ('test_metrics.json', 'metrics.json')}
    result = train.main(['--resume', run])
    printed = capsys.readouterr().out
    assert result == json.load(open(os.path.join(run, 'test_metrics.json')))
    assert before == {f: os.path.getmtime(os.path.join(run, f)) for f in before}       # not tested again
    line = [l for l in printed.splitlines() if 'nothing is left to train' in l]
    assert len(line) == 1 and '%s has finished its 1 epoch' % run in line[0] and 'Test split' not in printed
    hint = line[0].split('to train it longer: ', 1)[1]
    assert hint.endswith('--resume %s --epochs 6' % run)
    proc = _printed(hint)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert len(json.load(open(os.path.join(run, 'metrics.json')))) == 6


# 3 and 10 --------------------------------------------------------------------------------------------------
def test_compare_refuses_a_run_for_other_attributes_before_it_sees_the_first_runs_data(two_runs, tmp_path):
    """A run of one's own data next to a demo run: one line naming both and their attribute counts (it was
    an IndexError from the metrics, after the second network had scored the demo's images)."""
    root = str(tmp_path / 'mine')
    fixtures.csv_dataset(root)
    out = str(tmp_path / 'csv-run')
    train.main(['--data_path', root, '--no-pretrained', '--epochs', '1', '--out', out] + SMALL)
    fixtures.one_line_error(['tools/compare.py', two_runs[0], out, '--out', str(tmp_path / 'c.png')],
                            '%s predicts 3 attributes, %s 12: compare systems trained for the same attributes'
                            % (out, two_runs[0]))


def test_compare_shows_the_settings_and_names_every_one_in_which_the_runs_differ(
        two_runs, tmp_path, capsys, monkeypatch):
    a, b = two_runs
    labels = []
    real = plots.compare_bars
    monkeypatch.setattr(plots, 'compare_bars', lambda *args: labels.extend(args[2]) or real(*args))
    monkeypatch.chdir(tmp_path)                      # the default --out: runs/compare-<time>.png, here
    summary = compare.main([a, b, '--limit', '32'])
    text = capsys.readouterr().out
    header = [l for l in text.splitlines() if l.startswith('source')][0]
    for column in ('epochs', 'input', 'train split', 'seed'):
        assert column in header
    differ = [l for l in text.splitlines() if l.startswith('NOT COMPARABLE')]
    assert len(differ) == 1
    assert 'epochs (#1 1, #2 2)' in differ[0] and 'input size (#1 32, #2 48)' in differ[0]
    assert 'seed (#1 0, #2 1)' in differ[0] and 'batch size' not in differ[0]
    for row in summary:
        assert row['system'] in text                 # the system column is never cut
    written = os.listdir(str(tmp_path / 'runs'))
    assert len([f for f in written if f.startswith('compare-') and f.endswith('.png')]) == 1
    assert len(labels) == 2 and a in labels[0] and 'mAP %.2f' % (100 * summary[0]['mAP']) in labels[0]
    same = compare.differences([dict(settings=dict(epochs=1, seed=0)), dict(settings=dict(epochs=1, seed=0))])
    assert same.startswith('the runs were trained alike')
    assert 'runs/compare-<date>-<time>.png' in ' '.join(compare.build_parser().format_help().split())


# 4 ---------------------------------------------------------------------------------------------------------
def test_the_export_upstream_hint_evaluates_the_files_as_printed(two_runs, tmp_path, capsys):
    run = two_runs[0]
    folder = str(tmp_path / 'saved_models')
    eval_script.main([run, '--export-upstream', folder])
    printed = capsys.readouterr().out
    hint = printed.split('evaluate them with:\n', 1)[1].strip().splitlines()[0]
    assert '--num_classes' not in hint and '--dataset demo' in hint
    proc = _printed(hint)
    assert proc.returncode == 0, proc.stdout[-3000:]
    result = json.load(open(os.path.join(run, 'eval_upstream_files_test.json')))
    assert result['mAP'] == pytest.approx(json.load(open(os.path.join(run, 'test_metrics.json')))['mAP'],
                                          abs=1e-6)
    assert sorted(os.listdir(folder)) == sorted(f for f in os.listdir(folder) if f.endswith('.params'))


def test_the_authors_files_evaluated_directly_write_their_result_under_runs(
        two_runs, tmp_path, capsys, monkeypatch, demo_path):
    folder = str(tmp_path / 'saved_models')
    eval_script.main([two_runs[0], '--export-upstream', folder])
    monkeypatch.chdir(tmp_path)
    eval_script.main([folder, '--preset', 'demo', '--backbone', 'resnet18_v1', '--input-size', '32',
                      '--dataset', 'demo', '--data_path', demo_path, '--limit', '16'])
    assert os.path.isfile(str(tmp_path / 'runs' / 'eval-saved_models' / 'eval_test.json'))
    assert all(f.endswith('.params') for f in os.listdir(folder))


# 5 ---------------------------------------------------------------------------------------------------------
def test_an_image_folder_is_named_as_a_folder_and_the_printed_predict_command_works(two_runs, tmp_path):
    run = two_runs[0]
    photos = tmp_path / 'photos'
    photos.mkdir()
    for i in range(2):
        fixtures._write(str(photos / ('p%d.jpg' % i)), fixtures.solid(fixtures.COLOURS[i]))
    line = fixtures.one_line_error(['eval.py', run, '--image', str(photos)], 'is a folder')
    hint = line.split('predict every image in it with: ', 1)[1]
    proc = _printed(hint)
    assert proc.returncode == 0, proc.stdout[-3000:]
    rows = open(os.path.join(run, 'predictions.csv')).read().splitlines()
    assert len(rows) == 3 and rows[0].startswith('path,')


def test_a_data_path_that_is_a_file_is_named_with_the_folder_to_give(tmp_path):
    root = str(tmp_path / 'mine')
    fixtures.csv_dataset(root)
    fixtures.one_line_error(['train.py', '--data_path', os.path.join(root, 'train.csv')],
                            '--data_path %s is a file; give the folder that holds it: --data_path %s' % (
                                os.path.join(root, 'train.csv'), root))
    fixtures.one_line_error(['train.py', '--dataset', 'csv', '--data_path', os.path.join(root, 'train.csv')],
                            'give the folder that holds it (the CSV dataset): --data_path %s' % root)


# 6 ---------------------------------------------------------------------------------------------------------
def test_a_text_file_that_is_not_a_list_of_images_is_named_with_its_line(tmp_path):
    notes = tmp_path / 'notes.txt'
    notes.write_text('# my notes\n\nThe photos from Tuesday are the best.\n')
    with pytest.raises(UserError, match=r"notes.txt line 3: 'The photos from Tuesday are the best.' is not "
                                        r"an image "
                                        r'file \(a text input is read as a list of image paths'):
        predict.list_images([str(notes)])
    image = tmp_path / 'a.jpg'
    fixtures._write(str(image), fixtures.solid(fixtures.COLOURS[0]))
    listing = tmp_path / 'list.txt'
    listing.write_text('a.jpg\nmissing.jpg\n')
    with pytest.raises(UserError, match=r"list.txt line 2: 'missing.jpg' is not an image file \(no such "
                                        r"file\)"):
        predict.list_images([str(listing)])
    assert predict.list_images([str(listing)], skip_bad=True) == [str(image)]


# 7 ---------------------------------------------------------------------------------------------------------
def test_offline_imagenet_weights_give_one_line_and_no_retries(tmp_path):
    root = str(tmp_path / 'mine')
    fixtures.csv_dataset(root)
    proc = fixtures.cli(['train.py', '--data_path', root, '--out', str(tmp_path / 'r')] + SMALL,
                        env={'MXNET_HOME': str(tmp_path / 'mxhome')})
    assert proc.returncode == 2
    assert 'download failed' not in proc.stdout + proc.stderr and 'retrying' not in proc.stdout + proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
    assert len(errors) == 1 and 'no network connection to 127.0.0.1:9' in errors[0]
    # (MXNet's engine line)
    assert [l for l in proc.stderr.strip().splitlines() if not l.startswith('[')] == errors


# 8 ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('script,args,status', [
    ('train.py', ['--help'], 0), ('eval.py', ['--help'], 0), ('predict.py', ['--help'], 0),
    ('tools/compare.py', ['--help'], 0), ('tools/benchmark.py', ['--help'], 0), ('train.py', ['--bogus'], 2),
    ('train.py', ['--epochs', '0'], 2), ('eval.py', ['RUN', '--limit', '0'], 2), ('predict.py', ['RUN'], 2)])
def test_help_and_flag_errors_answer_before_mxnet_is_imported(script, args, status):
    code = ('import runpy, sys; sys.argv = [%r] + %r\n'
            'try:\n    runpy.run_path(%r, run_name="__main__")\n'
            'except SystemExit as e:\n    print("EXIT", e.code, "mxnet" in sys.modules)\n') % (
                script, args, script)
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=fixtures.SUBPROCESS_TIMEOUT)
    assert proc.stdout.strip().splitlines()[-1] == 'EXIT %d False' % status, (proc.stdout[-500:], proc.stderr[
        -500:])


def test_help_texts_say_what_the_code_does():
    from engine import flags
    words = lambda p: ''.join(p.format_help().split())       # noqa: E731  (argparse wraps at hyphens too)
    assert '$XDG_CACHE_HOME/vaa-attributes/wider-<hashof--data_path>-crop256' in words(flags.build_parser())
    assert 'crops256' not in words(flags.build_parser())
    assert 'workerprocesses' not in words(flags.build_parser())
    bench = flags.benchmark_parser()
    assert bench.description.endswith('.')
    assert all(a.help for a in bench._actions if a.option_strings)  # pylint: disable=protected-access
    assert [plural(1, 'epoch'), plural(2, 'epoch'), plural(1, 'image')] == ['1 epoch', '2 epochs', '1 image']


def test_a_one_epoch_run_logs_one_epoch(two_runs):
    log = open(os.path.join(two_runs[0], 'train.log')).read()
    assert 'batch 16, 1 epoch\n' in log and '1 epochs' not in log


# 9 ---------------------------------------------------------------------------------------------------------
def test_constraints_keep_numpy_below_2_for_every_later_install():
    pins = [l.split('#')[0].strip() for l in open(os.path.join(ROOT, 'constraints.txt'))]
    assert 'numpy>=1.21,<1.24' in pins and 'opencv-python<4.9' in pins
    assert "'numpy>=1.21,<1.24'" in open(os.path.join(ROOT, 'setup.py')).read()     # one pin, two places
    script = open(os.path.join(ROOT, 'run.sh')).read()
    assert 'pip install --quiet -c constraints.txt' in script and '/pip.conf' in script
    conf = os.path.join(sys.prefix, 'pip.conf')
    if not os.path.isfile(conf):
        pytest.skip('not the environment run.sh made (no %s)' % conf)
    assert 'constraint = %s' % os.path.join(ROOT, 'constraints.txt') in open(conf).read()


# 11 --------------------------------------------------------------------------------------------------------
def test_the_paper_network_on_a_cpu_gets_a_hint_for_a_first_try(caplog):
    import logging
    import mxnet as mx
    cfg = dict(dataset='csv', backbone='resnet101_v1', input_size=224)
    # (captures the 'vaa' logger, which does not propagate)
    with caplog.at_level(logging.INFO, logger='vaa'):
        loop.cpu_note(cfg, [], [mx.cpu()])
        loop.cpu_note(cfg, ['backbone'], [mx.cpu()])            # the user chose: no hint
        loop.cpu_note(dict(cfg, dataset='demo'), [], [mx.cpu()])
    hints = [r.getMessage() for r in caplog.records if 'for a first try' in r.getMessage()]
    assert len(hints) == 1 and '--backbone resnet18_v1 --input-size 128' in hints[0]


# 13 --------------------------------------------------------------------------------------------------------
def _row(epoch, lr, val):
    return dict(epoch=epoch, lr=lr, train_loss=1.0 - 0.1 * epoch, val_loss=1.1 - 0.1 * epoch, train_mAP=0.5,
                val_mAP=val, val_mA=0.6)


def test_curves_have_whole_epochs_the_first_phase_the_drops_and_the_tested_epoch():
    rows = [_row(0, 1e-3, .40), _row(1, 1e-3, .55), _row(2, 1e-4, .50), _row(3, 1e-4, .52)]
    fig = plots.curves_figure(rows, title='runs/mine', freeze_epochs=1, monitor='mAP', lr=1e-3)
    left, right = fig.axes
    assert fig._suptitle.get_text() == 'runs/mine'  # pylint: disable=protected-access
    assert right.get_xlim() == (-0.5, 3.5)
    assert all(float(t).is_integer() for t in right.get_xticks() if -0.5 <= t <= 3.5)
    star = [l for l in right.get_lines() if l.get_marker() == '*']
    assert len(star) == 1 and list(star[0].get_xdata()) == [1] and 'epoch 1' in star[0].get_label()
    drops = [l for l in right.get_lines() if l.get_linestyle() == ':']
    assert len(drops) == 1 and list(drops[0].get_xdata()) == [2.5, 2.5]         # lr fell after epoch 2
    shaded = [p for p in right.patches if 'first phase' in p.get_label()]
    assert len(shaded) == 1
    one = plots.curves_figure([_row(0, 1e-3, .4)])
    assert one.axes[1].get_xlim() == (-0.5, 0.5) and list(one.axes[1].get_xticks()) == [0]
    plots.plt.close('all')


# 14 --------------------------------------------------------------------------------------------------------
def test_ap_bars_go_from_the_most_to_the_least_positive_with_their_rate_and_chance_level():
    per = [dict(name='rare', ap=0.3, positives=5, specified=100),
           dict(name='common', ap=0.9, positives=60, specified=100),
           dict(name='middle', ap=0.5, positives=20, specified=80)]
    per.append(dict(name='never', ap=None, positives=0, specified=90))
    fig = plots.ap_bars_figure(dict(mAP=0.57, per_attribute=per), 'demo-run, test split, epoch 3')
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ['common (60.0%)', 'middle (25.0%)', 'rare (5.0%)', 'never (0.0%)']     # one line each
    assert ax.get_title() == 'demo-run, test split, epoch 3: mAP 57.00'
    chance = [l for l in ax.get_lines() if 'chance' in l.get_label()][0]
    np.testing.assert_allclose(chance.get_ydata(), [60, 25, 5, 0])
    np.testing.assert_allclose([b.get_height() for b in ax.patches], [90, 50, 30, np.nan])
    assert [t.get_text() for t in ax.texts] == ['n/a'] and ax.texts[0].get_position()[0] == 3
    plots.plt.close('all')


def test_the_comparison_chart_marks_an_attribute_without_ap_as_not_available():
    fig = plots.compare_bars_figure(['a', 'b'], [[0.5, None], [0.7, 0.2]], ['#1 one', '#2 two'], [0.5, 0.01])
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    np.testing.assert_allclose(heights, [50, np.nan, 70, 20])
    assert [t.get_text() for t in ax.texts] == ['n/a']
    plots.plt.close('all')


def test_a_runs_ap_bars_are_titled_with_the_runs_name(two_runs, tmp_path, monkeypatch):
    titles = []
    real = plots.ap_bars_figure
    monkeypatch.setattr(plots, 'ap_bars_figure', lambda result, title='', compare=None: titles.append(
        title) or real(result, title, compare))
    eval_script.main([two_runs[0], '--split', 'val', '--out', str(tmp_path / 'v.json')])
    assert titles == ['one-epoch, val split']


# 15 --------------------------------------------------------------------------------------------------------
def test_attention_tiles_name_attributes_on_one_readable_line():
    maps = [np.full((3, 4, 4), 1 / 16.0, np.float32)]
    names = ['three_at_bottom', 'a_very_long_attribute_name', 'hat']
    fig = plots.attention_figure(np.zeros((48, 48, 3), np.uint8), maps, names, [0.1, 0.5, 0.9])
    titles = [ax.title for ax in fig.axes[1:4]]
    assert [t.get_text() for t in titles] == names and all(t.get_fontsize() >= 9 for t in titles)
    width = fig.get_size_inches()[0] / 4 * fig.dpi          # the tile's pixels
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert max(t.get_window_extent(renderer).width for t in titles) <= width
    plots.plt.close('all')


def test_shared_scale_puts_every_image_of_a_call_on_one_colour_scale(two_runs, tmp_path, monkeypatch):
    photos = []
    for i in range(2):
        path = str(tmp_path / ('p%d.jpg' % i))
        fixtures._write(path, fixtures.solid(fixtures.COLOURS[i]) if i else
                        np.random.RandomState(0).randint(0, 255, (40, 30, 3)).astype(np.uint8))
        photos.append(path)
    tops = {}
    real = plots.attention_overlay
    monkeypatch.setattr(plots, 'attention_overlay', lambda *a, **k: tops.setdefault(
        'shared' if k.get('top') is not None else 'own', []).append(k.get('top')) or real(*a, **k))
    eval_script.main([two_runs[0], '--image'] + photos + ['--out-dir', str(tmp_path / 'own')])
    eval_script.main([two_runs[0], '--image'] + photos + ['--shared-scale', '--out-dir', str(
        tmp_path / 'shared')])
    assert tops['own'] == [None,
                           None] and len(tops['shared']) == 2 and tops['shared'][0] == tops['shared'][1] >= 1
    with pytest.raises(UserError, match='--shared-scale goes with --image'):
        eval_script.main([two_runs[0], '--shared-scale'])


def test_installing_the_project_puts_none_of_its_modules_into_the_environment(tmp_path):
    """pip install -e . (what run.sh runs) into a fresh venv installs the distribution and no module: from
    another folder, `import datasets` (also Hugging Face's package), `import train` and the rest find
    nothing of the checkout."""
    venv = str(tmp_path / 'venv')
    base = getattr(sys, '_base_executable', sys.executable)
    subprocess.run([base, '-m', 'venv', venv], check=True, timeout=fixtures.SUBPROCESS_TIMEOUT)
    python = os.path.join(venv, 'bin', 'python')
    proc = subprocess.run([python, '-m', 'pip', 'install', '--quiet', '--no-deps', '-e', ROOT],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                          timeout=fixtures.SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:]
    names = sorted({os.path.splitext(n)[0] for n in os.listdir(ROOT) if n.endswith('.py')} |
                   {n for n in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, n, '__init__.py'))})
    assert {'datasets', 'train', 'model', 'engine', 'common', 'tools'} <= set(names)
    probe = ('import importlib.util, json, sys; print(json.dumps({n: getattr(importlib.util.find_spec(n), '
             '"origin", None) for n in sys.argv[1:]}))')
    found = json.loads(subprocess.run([python, '-c', probe] + names, cwd=str(tmp_path), check=True,
                                      stdout=subprocess.PIPE, universal_newlines=True).stdout)
    ours = {n: origin for n, origin in found.items() if origin and origin.startswith(ROOT + os.sep)}
    assert not ours, ours
    shown = subprocess.run([python, '-m', 'pip', 'show', 'vaa-attributes'], stdout=subprocess.PIPE,
                           universal_newlines=True)
    assert shown.returncode == 0 and 'Name: vaa-attributes' in shown.stdout


# Settings later commands must honour ---------------------------------------------------------------------
def _conventions(run):
    """Both conventions' metrics of the run's best checkpoint on its test split (computed here, from its
    logits), checked to differ: the demo's red_zero attribute has no positive label, which the community's
    mA counts at TNR / 2 and ours leaves out."""
    from engine import sources
    from evaluation import metrics
    from engine import steps
    import datasets
    from datasets import loaders
    from engine.distributed import parse_contexts
    ctx = parse_contexts(None)
    net, cfg, names = sources.load_source(run, ctx)
    data = datasets.load_split(cfg['dataset'], cfg['data_path'], 'test', attribute_names=names,
                               **loaders.data_options(cfg))
    logits, labels, masks, _ = steps.predict(net, loaders.eval_loader(cfg, data), ctx)
    both = {c: metrics.evaluate(logits, labels, masks, names, c) for c in ('ours', 'rethinking')}
    assert both['ours']['mA'] != pytest.approx(both['rethinking']['mA'], abs=1e-6)
    return both


def _same_as(result, expected):
    for key in ('mAP', 'mA', 'accuracy', 'precision', 'recall', 'f1'):
        assert result[key] == pytest.approx(expected[key], abs=1e-12), key


def test_compare_rethinking_reports_the_communitys_convention_whatever_the_runs(two_runs, tmp_path):
    run = two_runs[0]
    assert json.load(open(os.path.join(run, 'config.json')))['metrics'] == 'ours'
    result = eval_script.main([run, '--compare', 'rethinking', '--out', str(tmp_path / 'r.json')])
    assert result['metrics'] == 'rethinking'
    _same_as(result, _conventions(run)['rethinking'])
    assert json.load(open(str(tmp_path / 'r.json')))['metrics'] == 'rethinking'


@pytest.fixture(scope='module')
def rethinking_run(demo_path, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('rethinking') / 'run')
    train.main(['--data_path', demo_path, '--out', out, '--epochs', '1', '--metrics', 'rethinking'] + TINY)
    return out


def test_resume_test_reports_in_the_runs_convention_unless_metrics_is_given(two_runs, rethinking_run):
    expected = _conventions(rethinking_run)
    own = train.main(['--resume', rethinking_run, '--test'])
    assert own['metrics'] == 'rethinking'
    _same_as(own, expected['rethinking'])
    other = train.main(['--resume', rethinking_run, '--test', '--metrics', 'ours'])
    assert other['metrics'] == 'ours'
    _same_as(other, expected['ours'])
    assert json.load(open(os.path.join(rethinking_run, 'eval_test.json')))['metrics'] == 'ours'
    changed = train.main(['--resume', two_runs[0], '--test', '--metrics', 'rethinking'])
    assert changed['metrics'] == 'rethinking'
    _same_as(changed, _conventions(two_runs[0])['rethinking'])
    # eval.py alike: the run's convention by default, --metrics when given
    assert eval_script.main([rethinking_run])['metrics'] == 'rethinking'
    assert eval_script.main([rethinking_run, '--metrics', 'ours'])['metrics'] == 'ours'


def test_resume_with_epochs_equal_to_those_done_reports_the_finished_run(two_runs, tmp_path, capsys):
    run = str(tmp_path / 'copy')
    shutil.copytree(two_runs[1], run)
    done = len(json.load(open(os.path.join(run, 'metrics.json'))))
    before = {f: os.path.getmtime(os.path.join(run, f)) for f in os.listdir(run) if os.path.isfile(
        os.path.join(run, f))}
    result = train.main(['--resume', run, '--epochs', str(done)])
    assert result == json.load(open(os.path.join(run, 'test_metrics.json')))
    assert 'has finished its %d epochs: nothing is left to train' % done in capsys.readouterr().out
    assert before == {f: os.path.getmtime(os.path.join(run, f)) for f in before}
    assert 'would train nothing' in str(pytest.raises(UserError, train.main, [
        '--resume', run, '--epochs', str(done - 1)]).value)


def test_compare_refuses_runs_for_as_many_attributes_with_other_names(tmp_path):
    """Same count, other order: one line naming the first attribute in which they differ, before any
    scoring (checking the count alone would compare a hat column with a bag column)."""
    runs = []
    for order in (('hat', 'bag', 'coat'), ('hat', 'coat', 'bag')):
        root = str(tmp_path / '-'.join(order))
        fixtures.csv_dataset(root, attributes=order)
        runs.append(str(tmp_path / ('run-' + '-'.join(order))))
        train.main(['--data_path', root, '--no-pretrained', '--epochs', '1', '--out', runs[-1]] + SMALL)
    fixtures.one_line_error(['tools/compare.py', runs[0], runs[1], '--out', str(tmp_path / 'c.png')],
                            '%s predicts other attributes than %s (attribute 2: coat, not bag)'
                            % (runs[1], runs[0]))


def test_the_image_folder_hint_names_the_files_there_and_works_as_printed(two_runs, tmp_path):
    """A folder of PNG files (and one BMP): the hint's --image arguments are globs of the extensions found
    there; given to a shell as printed, they name every image and eval.py draws them all."""
    run = two_runs[0]
    photos = tmp_path / 'my photos'
    photos.mkdir()
    for i in range(3):
        fixtures._write(str(photos / ('p%d.png' % i)), fixtures.solid(fixtures.COLOURS[i]))
    fixtures._write(str(photos / 'q.bmp'), fixtures.solid(fixtures.COLOURS[4]))
    (photos / 'notes.txt').write_text('not an image')
    line = fixtures.one_line_error(['eval.py', run, '--image', str(photos)], 'is a folder')
    given = line.split('give image files (--image ', 1)[1].split('), or predict', 1)[0]
    assert given == '%s %s' % (shlex.quote(str(photos)) + '/*.png', shlex.quote(str(photos)) + '/*.bmp')
    out = str(tmp_path / 'drawn')
    proc = subprocess.run('%s eval.py %s --image %s --out-dir %s' % (sys.executable, shlex.quote(run), given,
                                                                    shlex.quote(out)),
                          shell=True, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=fixtures.SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert sorted(os.listdir(out)) == ['p0_attention.png', 'p1_attention.png', 'p2_attention.png',
                                       'q_attention.png']
    empty = tmp_path / 'empty'
    empty.mkdir()
    fixtures.one_line_error(['eval.py', run, '--image', str(empty)], 'and it holds no image file')


def test_a_python_without_mxnet_is_told_to_use_the_projects_environment_as_printed(two_runs):
    """The commonest slip after ./run.sh: the system's python. The line names .venv and this command as its
    python runs it; run as printed, it works."""
    base = getattr(sys, '_base_executable', sys.executable)
    probe = subprocess.run([base, '-c', 'import mxnet'], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if probe.returncode == 0:
        pytest.skip('the base interpreter has mxnet installed: it cannot show the slip')
    proc = subprocess.run([base, 'eval.py', two_runs[0], '--split', 'val'], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=fixtures.SUBPROCESS_TIMEOUT)
    errors = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert 'has no mxnet: the project is installed in .venv' in errors[0]
    assert 'reinstall' not in errors[0] and 'run.sh train' not in errors[0]
    command = errors[0].split('; run ', 1)[1].split(' (or `source', 1)[0]
    assert command == '.venv/bin/python eval.py %s --split val' % shlex.quote(two_runs[0])
    again = subprocess.run(shlex.split(command), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           universal_newlines=True, timeout=fixtures.SUBPROCESS_TIMEOUT)
    assert again.returncode == 0 and 'val split of demo' in again.stdout, again.stdout[-2000:]


def test_compare_names_a_source_that_is_no_model_before_it_scores_any(two_runs, tmp_path, monkeypatch):
    from tools import compare
    from engine import steps
    monkeypatch.setattr(steps, 'evaluate', lambda *a, **k: pytest.fail('a run was scored first'))
    with pytest.raises(UserError, match='is neither a run folder') as info:
        compare.main([two_runs[0], str(tmp_path), '--out', str(tmp_path / 'c.png')])
    assert str(tmp_path) in str(info.value)


def test_keep_last_holds_one_checkpoint_and_still_resumes_exactly(demo_path, tmp_path):
    """--keep last: no best.params; the test split and eval.py use the last epoch's weights; 1 epoch + resume
    equals 2 epochs straight."""
    straight, part = str(tmp_path / 'straight'), str(tmp_path / 'part')
    flags = ['--data_path', demo_path, '--keep', 'last'] + TINY
    result = train.main(flags + ['--out', straight, '--epochs', '2'])
    assert os.listdir(os.path.join(straight, 'checkpoints')) == ['last.params']
    assert result['best_epoch'] == 1 and result['checkpoint'].endswith('last.params')
    train.main(flags + ['--out', part, '--epochs', '1'])
    resumed = train.main(['--resume', part, '--epochs', '2'])
    assert resumed['mAP'] == result['mAP']
    assert eval_script.main([part, '--out', str(tmp_path / 'e.json')])['mAP'] == result['mAP']
