"""The NumPy reference engine: host memory, float64 everywhere, a seeded numpy Generator."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from isthmus.backends.reference.kernels import to_reference
from isthmus.registry.backend import Engine


class ReferenceEngine(Engine):
    """:class:`isthmus.registry.backend.Engine` for the float64 golden model.

    Tensors are numpy arrays: floats float64 (narrower dtypes only round values), integers int64,
    booleans bool. ``generator`` feeds ``dropout``; :meth:`seed` resets it.
    """

    name = "numpy"

    def __init__(self, seed: int = 0) -> None:
        self.device = "cpu"
        self.generator = np.random.default_rng(seed)

    def seed(self, n: int) -> None:
        """Reset the random generator to a reproducible state."""
        self.generator = np.random.default_rng(n)

    def asarray(self, array: np.ndarray, dtype: str | None = None) -> np.ndarray:
        """A float64/int64/bool copy of ``array``; a float ``dtype`` rounds values to its precision."""
        return np.array(to_reference(array, dtype), copy=True)

    def to_numpy(self, tensor: Any) -> np.ndarray:
        """A host copy of ``tensor``."""
        return np.array(tensor, copy=True)

    def no_grad(self):
        """The reference records no graph: a do-nothing context, for code shared with engines."""
        import contextlib

        return contextlib.nullcontext()

    def parameters(self, arrays, dtype: str = "float32") -> dict[str, np.ndarray]:
        """Float64 copies (the reference computes in float64 whatever the storage dtype)."""
        return {name: self.asarray(array) for name, array in arrays.items()}

    def versions(self) -> dict[str, str]:
        """The numpy version."""
        return {"numpy": np.__version__}

    def runtime_info(self) -> dict[str, Any]:
        """The CPUs this process may run on (numpy's BLAS may use them)."""
        usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        threads = len(usable) if usable is not None else os.cpu_count()
        return {"device": "cpu", "device_count": 1, "threads": threads}

    def __repr__(self) -> str:
        return "ReferenceEngine(device='cpu')"
