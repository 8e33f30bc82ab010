"""The MindSpore engine on Ascend (``device_target="Ascend"``), with the precision switches set.

Order matters: ``mindspore.set_device("Ascend", id)`` first (the ``device_context.ascend`` setters
check the device target), then ``precision_mode`` and the HF32 switches (CANN reads them when the
device initialises, at the first kernel), then the engine, whose constructor runs a warm-up op.

Without CANN, ``set_device`` raises a RuntimeError of some twenty lines ending in "libge_runner.so:
cannot open shared object file"; :func:`summarise_error` turns it into one line. That path ran on
the real MindSpore 2.10 here; everything after ``set_device`` succeeds only on Ascend silicon and
is unverified.
"""

from __future__ import annotations

import re
from typing import Any

from isthmus.registry.backend import Capabilities
from isthmus.backends.ascend.engine import AscendEngine
from isthmus.backends.ascend.options import AscendOptions, parse_options
from isthmus.backends.mindspore.modes import ExecutionOptions
from isthmus.backends.ascend.soc import SocInfo, lookup
from isthmus.config.composer import ConfigError
from isthmus.errors import BackendUnavailableError
from isthmus.registry.specs import BackendParts, BackendRequest

NO_FLOAT64 = "Ascend AI Cores have no float64 arithmetic"
COMM_BACKEND = "hccl"


def summarise_error(text: str) -> str:
    """One line out of MindSpore's long device error: which library failed to load, and why."""
    loads = re.findall(r"Load dynamic library:\s*(\S+)\s+failed\.\s*([^\n]+)", text)
    if loads:
        lib, why = loads[0]
        more = f" (and {len(loads) - 1} more plugin(s))" if len(loads) > 1 else ""
        return f"MindSpore's Ascend plugin {lib} did not load: {why.strip()}{more}"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "no message")
    return first.split(" Please check", 1)[0][:300]


def set_ascend_device(device_id: int) -> Any:
    """Import MindSpore (quietly, through the MindSpore engine module) and select Ascend ``device_id``."""
    from isthmus.backends.mindspore import engine as ms_engine

    ms = ms_engine.ms
    try:
        ms.set_device("Ascend", device_id)
    except (RuntimeError, ValueError) as error:
        raise BackendUnavailableError(
            f"backend 'ascend' engine 'mindspore': {summarise_error(str(error))}; fix: install CANN and "
            f"source its set_env.sh (`isthmus selftest --backend ascend` lists every step)") from None
    return ms


def apply_precision(ms: Any, options: AscendOptions) -> None:
    """``precision_mode`` and the HF32 switches, each set explicitly (MindSpore allows one value per
    process; a second, different value is a config error)."""
    op_precision = ms.device_context.ascend.op_precision
    for name, value in (("precision_mode", options.precision_mode),
                        ("matmul_allow_hf32", options.allow_hf32_matmul),
                        ("conv_allow_hf32", options.allow_hf32_conv)):
        try:
            getattr(op_precision, name)(value)
        except RuntimeError as error:  # "can not be set repeatedly"
            raise ConfigError(f"backend.options: MindSpore's {name} was already set in this process and "
                              f"cannot change to {value!r} ({' '.join(str(error).split())[:120]}); run a "
                              f"new process") from None


def capabilities(soc: SocInfo, devices: int) -> Capabilities:
    """The manifest: the SoC's dtypes (never float64), HCCL, no fused torch_npu routes."""
    return Capabilities(dtypes=soc.dtypes, fused_kernels=frozenset(), compile=True,
                        autodiff=soc.training, comm_backend=COMM_BACKEND, max_devices=devices)


def build_mindspore(request: BackendRequest, soc_name: str | None) -> BackendParts:
    """The ascend backend with engine ``mindspore`` on device ``request.device_index``;
    ``soc_name`` comes from detection (``npu-smi``), MindSpore having no public SoC query."""
    options = parse_options(request.options)
    index = int(request.device_index)
    ms = set_ascend_device(index)
    apply_precision(ms, options)
    from isthmus.backends.mindspore.engine import MindSporeEngine
    from isthmus.backends.mindspore.kernels import kernel_table

    soc = lookup(soc_name)
    unsupported = {"float64": NO_FLOAT64}
    if not soc.bf16:
        unsupported["bfloat16"] = f"SoC {soc.name} has no bfloat16"
    execution = ExecutionOptions(options.mode, options.jit_level, options.fallback)
    inner = MindSporeEngine("Ascend", index, unsupported_dtypes=unsupported, execution=execution)
    try:
        devices = int(ms.device_context.ascend.device_count())
    except Exception:  # a driver query fault must not hide the engine
        devices = 1
    engine = AscendEngine(inner, {
        "soc": soc.name,
        "soc_product": soc.product,
        "precision_mode": options.precision_mode,
        "allow_hf32_matmul": options.allow_hf32_matmul,
        "allow_hf32_conv": options.allow_hf32_conv,
        "jit_level": (f"{options.jit_level} (applied to the compiled train step, evaluation and forward)"
                      if options.mode == "graph" else f"{options.jit_level} (applied to the compiled update)"),
        "comm_backend": COMM_BACKEND,
    })
    from isthmus.backends.mindspore.distributed import DataParallel
    from isthmus.backends.mindspore.sharded import OptimizerParallel

    return BackendParts(engine=engine, kernel_table=kernel_table(inner), capabilities=capabilities(soc, devices),
                        data_parallel=DataParallel, sharded=OptimizerParallel)


__all__ = ["COMM_BACKEND", "NO_FLOAT64", "apply_precision", "build_mindspore", "capabilities",
           "set_ascend_device", "summarise_error"]
