"""``backend.options`` of the onnxruntime backend: the opset of its one-op graphs.

Imports neither onnx nor onnxruntime: the config check reads this on any machine.
"""

from __future__ import annotations

from typing import Any, Mapping

from isthmus.registry.specs import BackendOptions

DEFAULT_OPSET = 17
"""The lowest opset with ``LayerNormalization``, and within what Ascend's ATC reads (9 to 18)."""

MIN_OPSET = 7
"""The oldest ONNX opset ONNX Runtime runs; a newer one than the installed runtime knows fails
when the first session is built."""

KEYS = ("opset",)


def parse_options(options: Mapping[str, Any] | None) -> int:
    """The opset from ``backend.options``; every problem reported at once in one line. Raises
    :class:`isthmus.config.composer.ConfigError`."""
    from isthmus.config.composer import ConfigError
    from isthmus.registry.store import suggest

    options = dict(options or {})
    problems = [f"backend.options.{key}: unknown onnxruntime option{suggest(str(key), list(KEYS))}; "
                f"valid: {', '.join(KEYS)}" for key in options if key not in KEYS]
    opset = options.get("opset", DEFAULT_OPSET)
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        problems.append(f"backend.options.opset: expected an ONNX opset, an int >= {MIN_OPSET} (default "
                        f"{DEFAULT_OPSET}), got {opset!r}")
    if problems:
        raise ConfigError(problems)
    return opset


OPTIONS = BackendOptions(KEYS, parse_options)
"""What ``BackendSpec.options`` names: checked when a config is composed, on any machine."""

__all__ = ["DEFAULT_OPSET", "KEYS", "MIN_OPSET", "OPTIONS", "parse_options"]
