"""One recorded pass of a model that wraps a ``torch.nn.Module`` (``Model.module``), for ``isthmus
dump``: the module's own forward and backward under its hooks (:mod:`isthmus.verify.module_probe`),
in the dtype asked for, the way the trainer runs it.

* ``float64`` (the golden run): the module and its inputs in float64, no autocast, and the casts
  the module makes to float32 on its own kept in float64 (:func:`keep_float64`);
* ``float32``: the float32 module as trained;
* ``bfloat16`` / ``float16``: float32 parameters under the engine's autocast, as the trainer's
  ``train.precision=bf16`` / ``fp16`` runs it.

The manifest entry and tensors have the layout of :func:`isthmus.verify.dump.run_pass`, so bundles,
``compare`` and the report read them alike.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any, Mapping

import numpy as np

from isthmus.kernels import events as kernel_events
from isthmus.verify.capture import Capture
from isthmus.verify.module_probe import ModuleProbe

AUTOCAST_DTYPES = ("bfloat16", "float16")


def keep_float64() -> Any:
    """A context in which casts of float64 tensors to a lower float dtype keep float64, so a module
    that computes part of itself in float32 on purpose (``transformers``' RMSNorm and rotary
    embedding do) still runs wholly in float64 for the golden run."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    lower = (torch.float32, torch.bfloat16, torch.float16)
    to_copy = torch.ops.aten._to_copy.default

    class KeepFloat64(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            kwargs = kwargs or {}
            if func is to_copy and kwargs.get("dtype") in lower and args[0].dtype == torch.float64:
                kwargs = {**kwargs, "dtype": torch.float64}
            return func(*args, **kwargs)

    return KeepFloat64()


def wraps_module(model: Any) -> bool:
    """Whether the model runs a ``torch.nn.Module`` of its own (recorded by module hooks)."""
    return getattr(model, "module", None) is not None and hasattr(model.module, "named_modules")


def module_pass(backend: Any, model: Any, params: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray],
                dtype: str, level: str, mode: str, key: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One recorded forward and backward of ``model.loss`` in ``dtype`` (see the module docstring)."""
    import torch

    from isthmus.verify.dump import overflow

    engine, k = backend.engine, backend.kernels
    module = model.module
    wide = dtype == "float64"
    store = "float64" if wide else "float32"
    module.to(torch.float64 if wide else torch.float32)
    try:
        placed = model.place_parameters(engine, {n: np.asarray(a, dtype=store) for n, a in params.items()})
        device_batch = {n: engine.asarray(a, store if a.dtype.kind == "f" else None) for n, a in batch.items()}
        tensors: dict[str, np.ndarray] = {}
        with kernel_events.Listener() as listener:
            capture = Capture(engine, k, level, mode, key, events=listener, backward=True, dtype=dtype)

            def objective(p: dict[str, Any]) -> tuple[Any, Any]:
                probe = ModuleProbe(module, capture, level) if level != "model" else nullcontext()
                with engine.autocast(dtype) if dtype in AUTOCAST_DTYPES else nullcontext(), \
                        keep_float64() if wide else nullcontext(), probe:
                    return model.loss(k, p, device_batch, training=False)

            started = time.perf_counter()
            loss, metrics, grads = engine.value_and_grad(objective, placed)
            seconds = time.perf_counter() - started
            with engine.no_grad(), (engine.autocast(dtype) if dtype in AUTOCAST_DTYPES else nullcontext()), \
                    keep_float64() if wide else nullcontext():
                logits = np.asarray(engine.to_numpy(model.forward(k, placed, device_batch)))
            notes = listener.drain()
    finally:
        module.float()
    loss_value = np.asarray(engine.to_numpy(loss), dtype=np.float64)
    tensors[f"{key}/result/logits"] = logits
    tensors[f"{key}/result/loss"] = loss_value
    gradient_keys = {}
    for name, grad in grads.items():
        gradient_keys[name] = f"{key}/grad/{name}"
        tensors[gradient_keys[name]] = np.asarray(engine.to_numpy(grad))
    for direction, matrix in capture.matrices().items():
        tensors[f"{key}/stats/{direction}"] = matrix
    tensors.update(capture.tensors)
    run = {
        "key": key, "dtype": dtype, "precision": {"float64": "fp64", "float32": "fp32", "bfloat16": "bf16",
                                                  "float16": "fp16"}.get(dtype, dtype),
        "results": {"loss": float(loss_value), "logits": f"{key}/result/logits", "loss_key": f"{key}/result/loss",
                    "logits_source": "a separate forward of the module" + (
                        f" under {dtype} autocast" if dtype in AUTOCAST_DTYPES else f" in {dtype}"),
                    "gradients": gradient_keys,
                    "metrics": {m: float(np.asarray(engine.to_numpy(v))) for m, v in (metrics or {}).items()}},
        "records": {"forward": capture.forward, "backward": sorted(capture.backward, key=lambda r: -r["call"])},
        "stats": {d: f"{key}/stats/{d}" for d in ("forward", "backward")},
        "calls": capture.calls, "backward_taps": capture.taps,
        "backward_records": "recorded" if level != "model" else "none: --level model",
        "naming": "module paths (named_modules)" + (", aten calls by module path and call index" if level == "op"
                                                    else ""),
        "events": capture.events + [{"kind": kind, "call": -1, "name": "", "op": detail.split(":")[0], "layer": "",
                                     "detail": detail} for kind, detail in notes],
        "seconds": seconds,
    }
    run["overflow"] = overflow(run, tensors)
    return run, tensors


__all__ = ["AUTOCAST_DTYPES", "keep_float64", "module_pass", "wraps_module"]
