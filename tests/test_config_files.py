"""train.py --config: settings from a YAML file or a run's config, the command line over the file, the same
one-line errors as the flags; every run folder's config.yaml replays the run; configs/ holds the paper's and
the community's protocols; later commands honour a run's settings."""
import json
import os

import pytest
import yaml

import eval as eval_script
import train
from common.errors import UserError
from engine import config
from engine import config_files
from tests import fixtures

ROOT = fixtures.ROOT
TINY = ['--limit', '64', '--input-size', '32', '--batch_size', '16']


@pytest.fixture(scope='module')
def rethinking_run(demo_path, tmp_path_factory):
    """A demo run with settings that differ from the defaults (the community's metric convention, a seed)."""
    out = str(tmp_path_factory.mktemp('config') / 'run')
    train.main(['--data_path', demo_path, '--out', out, '--epochs', '1', '--metrics', 'rethinking', '--seed',
                '3'] + TINY)
    return out


def test_a_runs_config_yaml_trains_the_same_run_again(rethinking_run, tmp_path):
    settings = yaml.safe_load(open(os.path.join(rethinking_run, 'config.yaml')))
    assert settings['metrics'] == 'rethinking' and settings['seed'] == 3 and 'out' not in settings
    again = str(tmp_path / 'again')
    result = train.main(['--config', os.path.join(rethinking_run, 'config.yaml'), '--out', again])
    first = json.load(open(os.path.join(rethinking_run, 'test_metrics.json')))
    assert result['mAP'] == first['mAP'] and result['metrics'] == 'rethinking'
    assert json.load(open(os.path.join(again, 'metrics.json'))) [0]['val_mAP'] == json.load(open(
        os.path.join(rethinking_run, 'metrics.json')))[0]['val_mAP']


def test_a_runs_config_json_is_read_too_and_flags_win_over_the_file(rethinking_run):
    cfg, explicit = config.parse_args(['--config', os.path.join(rethinking_run, 'config.json'), '--seed', '0',
                                       '--metrics', 'ours'])
    assert (cfg['seed'], cfg['metrics'], cfg['epochs'], cfg['limit']) == (0, 'ours', 1, 64)
    assert 'limit' in explicit and 'seed' not in explicit    # seed 0 given: the default, not explicit


@pytest.mark.parametrize('text,message', [
    ('lrr: 0.1\n', "'lrr' is not a setting of train.py; did you mean lr?"),
    ('epochs: three\n', 'epochs must be a whole number'),
    ('epochs: 2.5\n', 'epochs must be a whole number'),
    ('lr: -1\n', 'lr must be a positive number'),
    ('partition: 5\n', 'partition must be in 0..4'),
    ('pretrained: maybe\n', 'pretrained must be true or false'),
    ('head: gat\n', 'head must be one of vaa, gcn, hgat, apcnn'),
    ('[1, 2]\n', 'holds a list, not settings'),
    ('lr: [\n', 'is not readable YAML'),
])
def test_a_bad_setting_in_a_file_is_one_line_naming_the_file_and_key(tmp_path, text, message):
    path = str(tmp_path / 'bad.yaml')
    open(path, 'w').write(text)
    with pytest.raises(UserError, match=message.replace('[', r'\[').replace('?', r'\?')) as info:
        config.parse_args(['--config', path])
    assert path in str(info.value)


def test_the_error_comes_before_mxnet_is_imported(tmp_path):
    path = str(tmp_path / 'bad.yaml')
    open(path, 'w').write('input_size: 16\n')
    fixtures.one_line_error(['train.py', '--config', path], '%s: input_size must be at least 32' % path)


def test_a_yaml_file_cannot_run_anything(tmp_path):
    path = str(tmp_path / 'evil.yaml')
    marker = str(tmp_path / 'ran')
    open(path, 'w').write("lr: !!python/object/apply:os.system ['touch %s']\n" % marker)
    with pytest.raises(UserError, match='is not readable YAML'):
        config_files.read(path)
    assert not os.path.exists(marker)


CONFIGS = {
    'wider-paper.yaml': dict(dataset='wider', preset='paper'),
    'wider-upstream.yaml': dict(dataset='wider', preset='upstream'),
    'peta-paper.yaml': dict(dataset='peta', preset='paper'),
    'pedes-community.yaml': dict(dataset='pedes', preset='paper', train_split='trainval', val_split='test',
                                 metrics='rethinking'),
}


def test_every_config_file_is_the_protocol_train_py_gives_those_flags():
    """configs/*.yaml spell out what the defaults of their dataset and preset are (and the community's
    splits and convention): the file and the flags resolve to the same config."""
    folder = os.path.join(ROOT, 'configs')
    assert sorted(os.listdir(folder)) == sorted(CONFIGS)
    for name, flags in CONFIGS.items():
        from_file, _ = config.parse_args(['--config', os.path.join(folder, name)])
        from_flags = config.defaults(**flags)
        keys = set(from_flags) - {'config'}
        assert {k: from_file[k] for k in keys} == {k: from_flags[k] for k in keys}, name


def test_later_commands_honour_the_runs_settings(rethinking_run, tmp_path):
    """The run's metric convention: eval.py, tools/compare.py, --resume, --resume --test and --config keep
    it unless a flag says otherwise."""
    from tools import compare
    assert eval_script.main([rethinking_run, '--out', str(tmp_path / 'e.json')])['metrics'] == 'rethinking'
    rows = compare.main([rethinking_run, '--out', str(tmp_path / 'c.png')])
    assert rows[0]['metrics'] == 'rethinking'
    assert compare.main([rethinking_run, '--metrics', 'ours', '--out', str(tmp_path / 'd.png')])[0][
        'metrics'] == 'ours'
    longer = str(tmp_path / 'longer')
    import shutil
    shutil.copytree(rethinking_run, longer)
    assert train.main(['--resume', longer, '--epochs', '2'])['metrics'] == 'rethinking'
    assert train.main(['--resume', longer, '--test'])['metrics'] == 'rethinking'
