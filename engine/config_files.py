"""Settings from a file: ``train.py --config FILE`` (YAML, or a run folder's ``config.json`` or
``config.yaml``), with the flags given on the command line overriding it, and the ``config.yaml`` every run
folder gets.

A file's keys are train.py's settings by their flag names (``lr``, ``input_size`` or ``input-size``; a
flag pair as its setting: ``pretrained: false`` for --no-pretrained); a value must have the flag's type and
range. YAML is read with
``yaml.safe_load``: it builds plain values and never runs anything. A run's own files also hold what the run
derived from its settings (the crop geometry, the normalisation, HGAT-FC's grouping, ...) and where it ran
(``out``, ``resume``): those keys are read past, since resolving the settings derives them again.
"""
import difflib
import json

from common.errors import UserError
from engine.flags import RANGES, build_parser

# What a run's config.json holds beside its settings: derived from them (resolve_config, build_net), or
# about one invocation; read past in a config file, left out of config.yaml.
DERIVED = ('resize', 'crop_range', 'normalisation', 'hgat_partition', 'gcn_embedding_dim', 'run_dir',
           'source_kind')
INSTANCE = ('out', 'resume', 'test', 'upstream_weights', 'debug', 'config')
_UNSET = object()


def given_flags(parser, argv):
    """The settings (``dest`` names) given on the command line ``argv``, whatever their values."""
    saved = [(action, action.default) for action in parser._actions]  # pylint: disable=protected-access
    try:
        for action, _ in saved:
            if action.dest != 'help':
                action.default = _UNSET
        parsed = parser.parse_args(argv)
    finally:
        for action, default in saved:
            action.default = default
    return {k for k, v in vars(parsed).items() if v is not _UNSET}


def read(path, parser=None):
    """``{dest: value}`` of the settings in the file at ``path``, each checked against its flag: the key
    (a setting of train.py), the type (and the choices) and the range; UserError naming file and key."""
    parser = parser or build_parser()
    settings = _load(path)
    actions = {a.dest: a for a in parser._actions if a.dest != 'help'}  # pylint: disable=protected-access
    out = {}
    for key, value in settings.items():
        dest = str(key).replace('-', '_')
        if dest in DERIVED or dest in INSTANCE:
            continue
        if dest not in actions:
            close = difflib.get_close_matches(dest, list(actions), n=1)
            raise UserError('%s: %r is not a setting of train.py%s (the keys are its flags: python train.py '
                            '--help)' % (path, key, '; did you mean %s?' % close[0] if close else ''))
        out[dest] = _checked(path, key, value, actions[dest])
    ranges = {r[0]: r for r in RANGES}
    for dest, value in out.items():
        if dest in ranges and value is not None and not ranges[dest][1](value):
            raise UserError('%s: %s must be %s, got %r' % (path, dest, ranges[dest][2], value))
    return out


def _load(path):
    try:
        with open(path) as f:
            text = f.read()
    except OSError as err:
        raise UserError('--config %s: %s' % (path, err.strerror or err))
    import yaml
    try:
        settings = json.loads(text) if path.endswith('.json') else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        raise UserError('--config %s is not readable %s (%s)' % (
            path, 'JSON' if path.endswith('.json') else 'YAML', str(err).splitlines()[0]))
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise UserError('--config %s holds a %s, not settings (key: value lines)' % (path,
                                                                                     type(settings).__name__))
    return settings


def _checked(path, key, value, action):
    """``value`` as the flag of ``action`` takes it, or UserError naming the file and key."""
    if value is None:
        return None
    if action.nargs == 0:                                      # --flag / --no-flag
        if not isinstance(value, bool):
            raise UserError('%s: %s must be true or false, got %r' % (path, key, value))
        return value                                           # the setting's value (pretrained: false)
    if action.type in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                action.type is int and not isinstance(value, int)):
            raise UserError('%s: %s must be %s, got %r' % (path, key, 'a whole number' if action.type is int
                                                           else 'a number', value))
        value = action.type(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)                                     # gpus: 0, partition lists...
    elif not isinstance(value, str):
        raise UserError('%s: %s must be a text value, got %r' % (path, key, value))
    if action.choices is not None and value not in action.choices:
        raise UserError('%s: %s must be one of %s, got %r' % (path, key, ', '.join(map(str, action.choices)),
                                                              value))
    return value


def apply(args, argv, parser):
    """With ``--config FILE``: the file's settings where the command line gave none (in place)."""
    if not getattr(args, 'config', None):
        return args
    given = given_flags(parser, argv)
    for dest, value in read(args.config, parser).items():
        if dest not in given:
            setattr(args, dest, value)
    return args


def settings_of(cfg):
    """The settings of a resolved config as train.py's flags take them: what ``config.yaml`` holds."""
    dests = {a.dest for a in build_parser()._actions} - {'help'}  # pylint: disable=protected-access
    return {k: v for k, v in sorted(cfg.items()) if k in dests and k not in INSTANCE}


def yaml_text(path, cfg):
    """``config.yaml`` of a run (at ``path``): its settings, sorted, after a line saying how to replay it."""
    import yaml
    return ('# the settings this run was trained with: python train.py --config %s --out NEW_RUN '
            'trains it again\n' % path) + yaml.safe_dump(settings_of(cfg), default_flow_style=False)
