"""Numbers over seeds: a metric's mean, standard deviation and Student-t confidence interval, and the paired
difference of two systems trained with the same seeds (``tools/study.py``).

With n seeds, the interval of the mean is mean +- t(0.975, n - 1) * s / sqrt(n), s the sample standard
deviation (ddof 1). The paired difference of system A to the baseline B takes d_k = A_k - B_k for every seed k
both finished, and the same interval over the d_k: the seed's own effect (initial weights, data order,
augmentation) cancels in each d_k, so the paired interval is narrower than the two systems' intervals side by
side whenever their results move together with the seed. The verdict says "better" when the whole interval is
above 0, "worse" when it is below, and otherwise that the difference is within the noise of those seeds.
"""

import math

import numpy as np
from scipy import stats

LEVEL = 0.95


def summary(values, level=LEVEL):
    """``{n, mean, std, low, high}`` of ``values`` (NaNs dropped): std with ddof 1, the ``level`` Student-t
    interval of the mean; with one value std and the interval are NaN (one seed says nothing of the noise)."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], np.float64)
    n = len(x)
    if n == 0:
        return dict(n=0, mean=float('nan'), std=float('nan'), low=float('nan'), high=float('nan'))
    mean = float(x.mean())
    if n < 2:
        return dict(n=1, mean=mean, std=float('nan'), low=float('nan'), high=float('nan'))
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return dict(n=n, mean=mean, std=std, low=mean - half, high=mean + half)


def paired(values, baseline, level=LEVEL):
    """The paired difference of ``values`` to ``baseline`` (dicts seed -> value) over the seeds both have:
    :func:`summary` of the differences, with ``seeds`` and the ``verdict``."""
    seeds = sorted(
        s for s in values if s in baseline and not _missing(values[s]) and not _missing(baseline[s])
    )
    out = summary([values[s] - baseline[s] for s in seeds], level)
    out.update(seeds=seeds, verdict=verdict(out))
    return out


def verdict(diff):
    """'better', 'worse', or 'within the noise of N seeds' for a :func:`paired` result."""
    if diff['n'] < 2:
        return 'not enough seeds (%d) to tell' % diff['n']
    if diff['low'] > 0:
        return 'better'
    if diff['high'] < 0:
        return 'worse'
    return 'within the noise of %d seeds' % diff['n']


def _missing(value):
    return value is None or math.isnan(value)
