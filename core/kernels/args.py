"""Argument normalisation shared by every engine's kernels: axes, spatial pairs, reduced shapes."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def axes(axis: Any, ndim: int) -> tuple[int, ...]:
    """``axis`` (None, an int or a sequence, negatives allowed) as non-negative dims of an ``ndim`` tensor."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (int, np.integer)):
        return (int(axis) % ndim,) if ndim else ()
    return tuple(int(a) % ndim for a in axis)


def pair(value: int | Sequence[int]) -> tuple[int, int]:
    """A stride, padding or dilation given as an int or an ``(h, w)`` pair, as a pair."""
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    first, second = value
    return int(first), int(second)


def reduced_shape(shape: Sequence[int], dims: tuple[int, ...], keepdims: bool) -> tuple[int, ...]:
    """The shape a reduction over ``dims`` leaves, with or without the reduced dims kept as 1."""
    return tuple(1 if i in dims else n for i, n in enumerate(shape) if keepdims or i not in dims)


def adamw_lists(step: int, params: Any, grads: Any, exp_avgs: Any, exp_avg_sqs: Any) -> tuple[list, list, list, list]:
    """The four ``adamw_update`` sequences as lists, after checking ``step`` and their lengths."""
    if step < 1:
        raise ValueError(f"adamw step counts from 1, got {step}")
    lists = list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)
    if len({len(items) for items in lists}) > 1:
        raise ValueError("adamw_update needs one grad, exp_avg and exp_avg_sq per parameter")
    return lists
