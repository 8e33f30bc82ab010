"""The kernel interface (every op a model may call, with its exact semantics), argument rules
shared by the engines, and routing (one backend's kernel set from its engine table plus
per-op overrides)."""

from isthmus.kernels.interface import DTYPES, FLOAT_DTYPES, OPS, Kernels, Tensor
from isthmus.kernels.routing import KernelRoute, KernelSet

__all__ = ["DTYPES", "FLOAT_DTYPES", "KernelRoute", "KernelSet", "Kernels", "OPS", "Tensor"]
