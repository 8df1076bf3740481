"""The statistics behind every diagnostic claim: paired cells, sign flips, bootstrap, Holm.

A *cell* is a small set of failures and an equal-size set of reference examples (examples that
are not failures) drawn from the same batch. For each cell and layer group the diagnostics
record one number ``d[cell, group]`` that compares the failures with the references, built so
that exchanging the two sets of a cell negates it. Under the null hypothesis that a cell's
failures and references are exchangeable (the failures are, for this statistic, no different
from the other examples - as when they are drawn at random), ``d`` is symmetric around 0 and
the sign-flip test of its mean is exact whatever the distribution of ``d``. For the weaker
null "the mean of ``d`` is 0" (failures that differ from the other examples in some other
way) it is approximate, and good with many cells. Only ``cells x groups`` numbers are kept,
never a model-sized tensor per cell.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch

EXACT_CELLS = 16  # up to 2**16 sign patterns are enumerated; above, Monte Carlo
FLIPS = 9999  # Monte Carlo sign patterns
BOOTSTRAP = 2000  # bootstrap resamples for the intervals
LEVEL = 0.95  # confidence level of every interval


def group_norms(grads, group_rows, count: int) -> torch.Tensor:
    """Per group (positions ``group_rows[j]`` in ``grads``), the L2 norm of ``sum(grads)/count``.

    ``grads`` are gradients of a summed loss over ``count`` examples, so this is the norm of
    the gradient of their mean loss. Each tensor's norm is taken in fp32 (as accurate as the
    fp32 gradients, without the float64 copy of every gradient that costs time and memory),
    and the per-tensor squares are added in float64.
    """
    squares = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]).double() ** 2
    return norms_from_squares(squares, group_rows, count)


def norms_from_squares(squares: torch.Tensor, group_rows, count: int) -> torch.Tensor:
    """:func:`group_norms` from each tensor's squared norm (float64 ``squares[i]``)."""
    return torch.stack([squares[rows].sum() for rows in group_rows]).sqrt() / count


def share_log_ratio(failure_norms: torch.Tensor, reference_norms: torch.Tensor) -> torch.Tensor:
    """``log(f_j / r_j) - mean_i log(f_i / r_i)`` per cell: a group's size-free specificity.

    Both arguments are ``[cells, groups]``: the failures' and the references' gradient norms.
    Equivalently, the log of group ``j``'s share of the failures' norm over its share of the
    references' norm, where a share is a value over the geometric mean across groups of the
    cell. A constant factor per group (its size, its weight norm) cancels in ``f_j / r_j``, and
    a constant factor per cell (the failures' larger loss) in the centring, both exactly.
    Groups with a zero (a group the loss does not reach) get NaN and stay out of the centring.
    """
    ratio = failure_norms.double().log() - reference_norms.double().log()
    finite = torch.isfinite(ratio)
    count = finite.sum(dim=1, keepdim=True)
    centre = torch.where(finite, ratio, torch.zeros_like(ratio)).sum(dim=1, keepdim=True)
    centre = centre / count.clamp(min=1)
    out = ratio - centre
    return torch.where(finite & (count > 1), out, torch.full_like(out, math.nan))


def sign_flip_p(values: torch.Tensor, seed: int = 0) -> float | None:
    """One-sided p-value of ``mean(values) > 0`` against sign-symmetric noise (exact or MC).

    ``values``: one number per cell (NaNs dropped). With at most :data:`EXACT_CELLS` cells every
    sign pattern is enumerated, so the smallest attainable p is ``2**-cells``; above, ``FLIPS``
    random patterns give ``p = (1 + #{flipped mean >= observed}) / (1 + FLIPS)``, which is valid
    (never anti-conservative). None when no cell is left.
    """
    values = values[torch.isfinite(values)].double()
    n = values.numel()
    if n == 0:
        return None
    observed = float(values.mean())
    tolerance = 1e-12 * max(1.0, abs(observed))
    if n <= EXACT_CELLS:
        flipped = (_sign_patterns(n) * values).mean(dim=1)
        return float((flipped >= observed - tolerance).double().mean())
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (FLIPS, n), generator=generator).double().mul_(2).sub_(1)
    flipped = (signs * values).mean(dim=1)
    return (1 + int((flipped >= observed - tolerance).sum())) / (1 + FLIPS)


@functools.lru_cache(maxsize=EXACT_CELLS + 1)
def _sign_patterns(n: int) -> torch.Tensor:
    """All ``2**n`` sign vectors of length n, ``[2**n, n]``."""
    return torch.tensor(list(itertools.product((1.0, -1.0), repeat=n)), dtype=torch.float64)


def bootstrap_interval(values: torch.Tensor, seed: int = 0) -> tuple | None:
    """Percentile bootstrap interval (level :data:`LEVEL`) of the mean of ``values`` over cells.

    None when fewer than two finite values are left.
    """
    values = values[torch.isfinite(values)].double()
    n = values.numel()
    if n < 2:
        return None
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n, (BOOTSTRAP, n), generator=generator)
    means = values[draws].mean(dim=1)
    tail = (1 - LEVEL) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return float(low), float(high)


def holm(p_values: dict) -> dict:
    """Holm's step-down adjustment of ``{name: p or None}`` (controls the family-wise error).

    Adjusted ``p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))`` over the m non-None p-values in
    increasing order; None stays None.
    """
    named = sorted((p, name) for name, p in p_values.items() if p is not None)
    m = len(named)
    adjusted, running = {}, 0.0
    for rank, (p, name) in enumerate(named):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[name] = running
    return {name: adjusted.get(name) for name in p_values}


def effect_summary(
    d: torch.Tensor, names: list, seed: int = 0, ratio: bool = True, with_p: bool = True
) -> tuple:
    """Per group: the effect, its interval and its one-sided p-value, from ``d[cells, groups]``.

    With ``ratio`` the cell values are log ratios and effect and interval are reported as the
    ratio ``exp(mean d)`` (1 = no difference); otherwise as the mean difference itself (0 = no
    difference). Returns three dicts ``{group: value or None}``.
    """
    effects, intervals, p_values = {}, {}, {}
    for j, name in enumerate(names):
        column = d[:, j] if d.numel() else torch.empty(0, dtype=torch.float64)
        finite = column[torch.isfinite(column)]
        if finite.numel() == 0:
            effects[name] = intervals[name] = p_values[name] = None
            continue
        mean = float(finite.mean())
        interval = bootstrap_interval(finite, seed + 104729 * (j + 1))
        if ratio:
            effects[name] = math.exp(mean)
            intervals[name] = None if interval is None else tuple(math.exp(v) for v in interval)
        else:
            effects[name] = mean
            intervals[name] = interval
        p_values[name] = sign_flip_p(finite, seed + 7919 * (j + 1)) if with_p else None
    return effects, intervals, p_values


def split_evenly(count: int, parts: int) -> list:
    """``parts`` (<= count) consecutive chunk sizes adding to ``count``, differing by at most 1."""
    parts = max(1, min(parts, count))
    base, extra = divmod(count, parts)
    return [base + (i < extra) for i in range(parts)]
