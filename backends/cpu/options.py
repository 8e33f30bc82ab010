"""``backend.options`` of the cpu backend: how its MindSpore engine runs, explicit and validated.

The keys are the MindSpore engine's (:mod:`isthmus.backends.mindspore.modes`): ``mode`` (``graph``,
the default, or ``pynative``), ``jit_level`` (``O0``, ``O1``) and ``fallback``. The torch engine on
this backend runs eagerly and reads none of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

from isthmus.backends.mindspore.modes import JIT_LEVELS, MODES, ExecutionOptions, parse_execution
from isthmus.config.composer import ConfigError
from isthmus.registry.specs import BackendOptions
from isthmus.registry.store import suggest


@dataclass(frozen=True)
class CpuOptions:
    """``mode``: ``graph`` compiles the MindSpore train step, evaluation and the portability forward
    with ``mindspore.jit``; ``pynative`` runs the model op by op. ``jit_level``: ``mindspore.jit``'s
    optimisation level. ``fallback``: a model that cannot compile runs in PyNative with a warning
    (false: the run stops at the first step and names the cause)."""

    mode: str = "graph"
    jit_level: str = "O0"
    fallback: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def execution(self) -> ExecutionOptions:
        return ExecutionOptions(self.mode, self.jit_level, self.fallback)


KEYS = ("mode", "jit_level", "fallback")


def parse_options(options: Mapping[str, Any] | None) -> CpuOptions:
    """Validate ``backend.options``; every problem is reported at once, naming the key and the
    valid values. Raises :class:`isthmus.config.composer.ConfigError`."""
    options = dict(options or {})
    problems: list[str] = []
    for key in options:
        if key not in KEYS:
            problems.append(f"backend.options.{key}: unknown cpu option{suggest(str(key), list(KEYS))}; "
                            f"valid: {', '.join(KEYS)}")
    execution = parse_execution(options, problems)
    if problems:
        raise ConfigError(problems)
    return CpuOptions(execution.mode, execution.jit_level, execution.fallback)


OPTIONS = BackendOptions(KEYS, parse_options)
"""What ``BackendSpec.options`` names: checked when a config is composed, on any machine."""

__all__ = ["CpuOptions", "JIT_LEVELS", "KEYS", "MODES", "OPTIONS", "parse_options"]
