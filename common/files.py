"""Temporary files that no other writer shares: a file is written under :func:`private_temp`'s name and
renamed over its target (checkpoints, metrics and plots through ``engine.checkpoints.atomic_write``, the
demo and WIDER caches), so a crash leaves the old file or the new one, and two writers of one file (two
runs of a study building the same cache, two loader threads cropping one box) never rename each other's
half-written file away."""
import itertools
import os
import re

_TEMP_COUNTER = itertools.count()
# The names private_temp gives, and the pid-only ones of earlier versions (name.tmp<pid>.ext): what a
# killed writer leaves behind, removed when a run folder is opened again.
TEMP_FILE = re.compile(r'\.tmp\d+(-\d+)?(\.\w+)?$')


def private_temp(path):
    """A temporary name beside ``path`` that no other writer uses: ``name.tmp<pid>-<n>.ext`` (the
    extension kept, so writers that add one, such as ``numpy.savez``, add nothing)."""
    root, ext = os.path.splitext(path)
    return '%s.tmp%d-%d%s' % (root, os.getpid(), next(_TEMP_COUNTER), ext)
