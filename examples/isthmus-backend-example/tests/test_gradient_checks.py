"""The kit's gradient checks catch a wrong backward: this backend's attention, exact forward, with its
gradient scaled by 0.999 on the way back (a slip no forward test and no loss curve shows)."""

import torch

from isthmus.kernels.interface import OPS
from isthmus.kernels.routing import KernelSet
from isthmus.registry.manager import load_plugins
from isthmus.registry.selection import build, select
from isthmus.verify.conformance import reference_backend, run_suite
from isthmus.verify.grad_cases import gradient_cases
from isthmus.verify.gradients import run_gradient_case


class ScaledBackward(torch.autograd.Function):
    """The identity forward; backward multiplies the gradient by 0.999."""
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * 0.999


def test_the_gradient_checks_catch_a_wrong_backward():
    _, registry = load_plugins()
    backend = build(registry, select(registry, "example"))
    table = {op: getattr(backend.kernels, op) for op in OPS}
    table["attention"] = lambda *args, **kwargs: ScaledBackward.apply(backend.kernels.attention(*args, **kwargs))
    broken = KernelSet("example", "torch", table)
    forward = run_suite(broken, backend.engine, dtypes=("float32",), ops=("attention",))
    assert forward and all(r.ok for r in forward)
    reference = reference_backend()
    for case in (c for c in gradient_cases() if c.id in ("attention-mha", "attention-causal_and_mask")):
        assert run_gradient_case(backend.kernels, backend.engine, *reference, case, "float32").ok
        result = run_gradient_case(broken, backend.engine, *reference, case, "float32")  # the kit's check
        assert not result.ok and result.message.startswith("dense cotangent, d/dq: "), result.message
