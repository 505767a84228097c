"""What every script does first: its command line parsed before anything heavy is imported (``--help``
and a mistyped flag, number or settings file answer in well under a second), then mxnet imported
(:func:`engine.gpu.prepare`). Its own module so that ``flags`` (the parsers) and ``config_files`` (the
settings files, which read the parsers) each import only downwards."""
import sys

from common.errors import UserError
from engine import config_files, gpu
from engine.flags import PARSERS, RANGES, SCRIPT_RANGES, check_ranges


def preparse(script, argv=None):
    """Parse ``script``'s command line before anything heavy is imported: ``--help`` prints and a wrong
    flag or number stops (status 2) in well under a second; the script parses again for real afterwards.
    Then :func:`gpu.prepare` imports mxnet (with a GPU build, after making its CUDA libraries visible)."""
    argv = sys.argv[1:] if argv is None else argv
    args = PARSERS[script]().parse_args(argv)
    names = [r[0] for r in RANGES] if script == 'train' else SCRIPT_RANGES.get(script, ())
    try:
        check_ranges(vars(args), [r for r in RANGES if r[0] in names])
        if getattr(args, 'config', None):           # a settings file: its keys, types and ranges too
            config_files.read(args.config)
    except UserError as err:
        if '--debug' in argv:
            raise
        sys.stderr.write('error: %s\n' % err)
        sys.exit(2)
    gpu.prepare()               # the CUDA libraries of a GPU build visible, then mxnet imported (or one line)
    return args
