"""A thin wrapper that makes an engine on an NPU report its Ascend specifics.

Both engines (torch on ``npu:N``, MindSpore on ``Ascend``) are the generic ones; ``isthmus
doctor`` and the selftest report also want the physical device, SoC and precision switches, so
:meth:`AscendEngine.runtime_info` adds them. Every other attribute is the wrapped engine's.
"""

from __future__ import annotations

from typing import Any, Callable


class AscendEngine:
    """``inner`` (a torch or MindSpore engine) plus ``extra`` runtime facts, and ``live()`` facts
    that change as it runs (the fused routes' call counts)."""

    def __init__(self, inner: Any, extra: dict[str, Any], live: Callable[[], dict[str, Any]] | None = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.device = inner.device
        self.extra = extra
        self.live = live

    def __getattr__(self, attribute: str) -> Any:
        if attribute == "inner":  # not set yet (copy, pickle): no recursion
            raise AttributeError(attribute)
        return getattr(self.inner, attribute)

    def runtime_info(self) -> dict[str, Any]:
        """The wrapped engine's runtime info plus the Ascend specifics."""
        return {**self.inner.runtime_info(), **self.extra, **(self.live() if self.live is not None else {})}

    def __repr__(self) -> str:
        return f"AscendEngine({self.inner!r})"


__all__ = ["AscendEngine"]
