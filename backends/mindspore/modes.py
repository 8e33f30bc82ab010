"""How the MindSpore engine runs: the ``backend.options`` keys ``mode``, ``jit_level`` and ``fallback``
that every device running the engine takes (``cpu``, ``ascend``). Parsing them imports no MindSpore.

``mode``: ``graph`` (the default) compiles the train step with ``mindspore.jit``: the model's loss
(forward and, through ``value_and_grad``, backward) and the update (clipping, AdamW, the fp16 loss
scale and skip policy) each run as a compiled graph; evaluation and the portability forward compile
too. ``pynative`` runs the model op by op (the update is still compiled, as MindSpore's own
optimizers compile theirs in PyNative). ``jit_level``: ``mindspore.jit``'s optimisation level.
``fallback``: when a model cannot compile (a Python branch on tensor values), run it in PyNative
with a warning instead of stopping at the first step with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

MODES = ("graph", "pynative")
"""``backend.options.mode`` values."""

JIT_LEVELS = ("O0", "O1")
"""``mindspore.jit(jit_level=...)`` values (``O2`` is deprecated since MindSpore 2.9)."""

KEYS = ("mode", "jit_level", "fallback")


@dataclass(frozen=True)
class ExecutionOptions:
    """``mode``, ``jit_level`` and ``fallback`` (see the module docstring)."""

    mode: str = "graph"
    jit_level: str = "O0"
    fallback: bool = False


def parse_execution(options: Mapping[str, Any], problems: list[str]) -> ExecutionOptions:
    """The execution options in ``options`` (other keys are the caller's); each problem is appended
    to ``problems`` as one line naming the key and the valid values."""
    defaults = ExecutionOptions()
    mode = options.get("mode", defaults.mode)
    if mode not in MODES:
        problems.append(f"backend.options.mode: {mode!r} is not one of {', '.join(MODES)}")
        mode = defaults.mode
    level = options.get("jit_level", defaults.jit_level)
    if level not in JIT_LEVELS:
        problems.append(f"backend.options.jit_level: '{level}' is not one of {', '.join(JIT_LEVELS)}")
        level = defaults.jit_level
    fallback = options.get("fallback", defaults.fallback)
    if not isinstance(fallback, bool):
        problems.append(f"backend.options.fallback: expected true or false, got {fallback!r}")
        fallback = defaults.fallback
    return ExecutionOptions(str(mode), str(level), fallback)


__all__ = ["ExecutionOptions", "JIT_LEVELS", "KEYS", "MODES", "parse_execution"]
