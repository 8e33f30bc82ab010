"""A thin wrapper that makes an engine on an NPU report its Ascend specifics.

Both engines (torch on ``npu:N``, MindSpore on ``Ascend``) are the generic ones; ``isthmus
doctor`` and the selftest report also want the physical device, SoC and precision switches, so
:meth:`AscendEngine.runtime_info` adds them. Every other attribute is the wrapped engine's.
"""

from __future__ import annotations

from typing import Any


class AscendEngine:
    """``inner`` (a torch or MindSpore engine) plus ``extra`` runtime facts."""

    def __init__(self, inner: Any, extra: dict[str, Any]) -> None:
        self.inner = inner
        self.name = inner.name
        self.device = inner.device
        self.extra = extra

    def __getattr__(self, attribute: str) -> Any:
        if attribute == "inner":  # not set yet (copy, pickle): no recursion
            raise AttributeError(attribute)
        return getattr(self.inner, attribute)

    def runtime_info(self) -> dict[str, Any]:
        """The wrapped engine's runtime info plus the Ascend specifics."""
        return {**self.inner.runtime_info(), **self.extra}

    def __repr__(self) -> str:
        return f"AscendEngine({self.inner!r})"


__all__ = ["AscendEngine"]
