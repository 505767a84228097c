"""User-facing errors.

Anything a user can get wrong (a flag, a path, a missing weight file, a checkpoint from another model)
raises :class:`UserError` with a message that names the problem and how to fix it. The command-line
scripts print that one line and exit with status 2; ``--debug`` shows the traceback instead.
"""
import logging
import os
import sys


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class Interrupted(Exception):
    """A stop signal (SIGINT, SIGTERM) arrived during an evaluation pass (validation, the test split):
    raised after the batch in progress, so that the caller saves what resume needs and exits."""


def plural(count, word, many=None):
    """'1 epoch', '2 epochs' (``many``: the plural when it is not ``word + 's'``)."""
    return '%d %s' % (count, word if count == 1 else many or word + 's')


def mxnet_message(err):
    """The line of an MXNetError's text that says what went wrong (its first line is often just
    "Traceback (most recent call last):" of the C++ side)."""
    lines = [l.strip() for l in str(err).strip().splitlines() if l.strip()]
    useful = [l for l in lines if not l.startswith(('Traceback', 'File ', 'Stack trace', '[bt]', '['))
              and not l.endswith(':')] or lines or [type(err).__name__]
    text = useful[-1]
    for prefix in ('MXNetError: ', 'mxnet.base.MXNetError: '):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text[:200]


def run_main(main, argv=None):
    """Run ``main(argv)``; turn a :class:`UserError` into ``error: ...`` on stderr and exit code 2, and
    output cut short by its reader (``python tools/study.py ... | head``) into exit code 1 without a
    traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = '--debug' in argv
    try:
        return main(argv)
    except BrokenPipeError:     # the output went to a reader that stopped early (``| head``): not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())       # so that Python's last flush at exit says nothing either
        sys.exit(1)
    except UserError as err:
        if debug:
            raise
        logging.getLogger(__name__).debug('user error', exc_info=True)
        sys.stderr.write('error: %s\n' % err)
        sys.exit(2)
