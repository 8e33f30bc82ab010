"""Backends written as a third party would: the torch CPU table with ``linear`` computed in NumPy and
differentiated by a hand-written ``torch.autograd.Function``. Test plugins, registered in-process.

* ``numpy-linear`` returns correct gradients, the weight's as a transposed (strided) view, as
  ``(x.T @ g).T`` naturally is; torch 2.13's fused CPU AdamW once trained such weights wrongly.
* ``scaled-vjp`` scales linear's vector-Jacobian product by 0.999: forward exact, training nearly
  right, and every check but the gradient conformance blind to it.
* ``stride-blind`` has ``numpy-linear``'s gradients and an ``adamw_update`` route that reads each
  gradient's memory in its parameter's layout, as torch 2.13's fused CPU kernel did.
"""

from __future__ import annotations

from isthmus.kernels.routing import KernelRoute
from isthmus.registry.hookspecs import hookimpl
from isthmus.registry.specs import BackendSpec, ProbeResult


def numpy_linear(scale: float = 1.0):
    """``linear`` through NumPy; its backward multiplies every gradient by ``scale``."""
    import numpy as np
    import torch

    class Linear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias):
            ctx.save_for_backward(x, weight)
            ctx.has_bias = bias is not None
            out = np.matmul(x.detach().double().numpy(), weight.detach().double().numpy().T)
            if bias is not None:
                out = out + bias.detach().double().numpy()
            return torch.from_numpy(np.ascontiguousarray(out)).to(x.dtype)

        @staticmethod
        def backward(ctx, g):
            x, weight = ctx.saved_tensors
            g64 = g.detach().double().numpy().reshape(-1, weight.shape[0])
            x64 = x.detach().double().numpy().reshape(-1, weight.shape[1])
            grad_x = (g64 @ weight.detach().double().numpy()).reshape(x.shape)
            # (x.T @ g) is (in, out); its transpose is the (out, in) weight gradient, a strided view.
            grad_w = torch.from_numpy(x64.T @ g64).t()
            grad_b = torch.from_numpy(g64.sum(axis=0)) if ctx.has_bias else None
            grads = (torch.from_numpy(grad_x), grad_w, grad_b)
            return tuple(None if t is None else (t * scale).to(x.dtype) for t in grads)

    def linear(x, weight, bias=None):
        return Linear.apply(x, weight, bias)

    return linear


def stride_blind_adamw(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                       weight_decay=0.01):
    """torch's AdamW on gradients reinterpreted with their parameter's strides."""
    import torch

    from isthmus.backends.torch import optim

    grads = [torch.as_strided(g, p.shape, p.stride(), g.storage_offset()) if g.numel() else g
             for p, g in zip(params, grads)]
    return optim.adamw_update(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps,
                              weight_decay, path="loop")


def _factory(request):
    from isthmus.plugins.cpu import factory

    return factory(request)


class NumpyLinearPlugin:
    """Registers backend ``name``: the cpu backend's parts, ``linear`` routed to :func:`numpy_linear`."""

    def __init__(self, name: str = "numpy-linear", scale: float = 1.0, adamw=None) -> None:
        self.name, self.scale, self.adamw = name, scale, adamw

    @hookimpl
    def register_backends(self, register):
        register(BackendSpec(name=self.name, engines=("torch",), default_engine="torch", priority=1,
                             probe=lambda: ProbeResult(True, "host CPU (test plugin)", devices=1),
                             factory=_factory, engine_modules={"torch": ("torch",)},
                             description=f"test: linear in NumPy, VJP x{self.scale}"))

    @hookimpl
    def register_kernels(self, register):
        register(KernelRoute(backend=self.name, op="linear", impl=numpy_linear(self.scale), engine="torch"))
        if self.adamw is not None:
            register(KernelRoute(backend=self.name, op="adamw_update", impl=self.adamw, engine="torch"))


def strided_gradients() -> NumpyLinearPlugin:
    """Correct gradients, the weight's strided."""
    return NumpyLinearPlugin("numpy-linear", 1.0)


def scaled_vjp() -> NumpyLinearPlugin:
    """Linear's vector-Jacobian product scaled by 0.999."""
    return NumpyLinearPlugin("scaled-vjp", 0.999)


def stride_blind() -> NumpyLinearPlugin:
    """Strided weight gradients and an optimizer that ignores their strides."""
    return NumpyLinearPlugin("stride-blind", 1.0, stride_blind_adamw)


CONFTEST = '''
from numpy_linear import scaled_vjp, stride_blind, strided_gradients


def pytest_isthmus_plugins(config):
    return [("numpy-linear", strided_gradients()), ("scaled-vjp", scaled_vjp()), ("stride-blind", stride_blind())]
'''
"""A ``conftest.py`` that gives a kit run these backends (with ``tests/`` on ``PYTHONPATH``)."""
