"""The MindSpore engine on the host CPU: threads and determinism settings, and the CPU manifest.

The manifest was found by experiment (MindSpore 2.10, CPU build): float32, float16 and float64
run every op, float64 convolution going through im2col. bfloat16 has almost no CPU kernels
(MatMul, Exp, Softmax, ReduceSum, Gather, ... all refuse it; only casts, copies and
add/mul/div run), so the manifest leaves it out and the conformance suite skips it with
:data:`BFLOAT16_GAP` as the reason.
"""

from __future__ import annotations

import os

from isthmus.backends.cpu.options import parse_options
from isthmus.registry.backend import Capabilities
from isthmus.registry.specs import BackendParts, BackendRequest

BFLOAT16_GAP = ("MindSpore's CPU build has no bfloat16 kernels for MatMul, Exp, Softmax, "
                "ReduceSum and most other ops (casts only)")

CPU_CAPABILITIES = Capabilities(
    dtypes=frozenset({"float64", "float32", "float16"}),
    fused_kernels=frozenset(),
    compile=True,  # backend.options.mode=graph: mindspore.jit (trace) of the train step
    comm_backend="mccl",  # mindspore.communication on CPU under msrun (checked: AllReduce works)
    max_devices=1,
)


def _cpu_threads() -> int:
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return len(usable) if usable else (os.cpu_count() or 1)


def build_cpu(request: BackendRequest) -> BackendParts:
    """A :class:`~isthmus.backends.mindspore.engine.MindSporeEngine` on ``CPU`` and its kernels, in
    the mode ``backend.options`` asks for (:mod:`isthmus.backends.cpu.options`)."""
    options = parse_options(request.options)
    from isthmus.backends.mindspore.engine import MindSporeEngine, configure_cpu  # first: it quiets MindSpore's log
    from isthmus.backends.mindspore.distributed import DataParallel
    from isthmus.backends.mindspore.sharded import OptimizerParallel
    from isthmus.backends.mindspore.kernels import kernel_table

    engine = MindSporeEngine("CPU", 0, unsupported_dtypes={"bfloat16": BFLOAT16_GAP}, execution=options.execution)
    # MindSpore starts 25 CPU kernel threads whatever the machine: on a small host they fight
    # over the cores. Default to the cores this process may run on.
    configure_cpu(int(request.threads) if request.threads else _cpu_threads(), request.deterministic)
    return BackendParts(engine=engine, kernel_table=kernel_table(engine),
                        capabilities=CPU_CAPABILITIES, data_parallel=DataParallel, sharded=OptimizerParallel)
