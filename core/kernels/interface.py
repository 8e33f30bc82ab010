"""The kernel interface: every op a model may call, with its exact semantics.

Model code calls ``k.<op>(...)`` on a :class:`~isthmus.kernels.routing.KernelSet`; each engine (NumPy
reference, torch, MindSpore) provides one implementation per op. The docstrings below are the
contract the conformance suite (:mod:`isthmus.verify.conformance`) and the ONNX oracle
(:mod:`isthmus.verify.onnx_oracle`) check every implementation against.

Conventions that hold for every op unless its docstring says otherwise:

* ``Tensor`` is the engine's tensor type. Dtype names are the strings in :data:`DTYPES`.
* Floating ops return the dtype of their floating inputs. The NumPy reference computes every float
  in float64 and returns float64; integers are int64 there and booleans stay bool.
* Binary elementwise ops broadcast like NumPy, and either operand may be a Python scalar; a scalar
  takes the dtype of the tensor operand, except that a float scalar with an integer tensor gives a
  float result. Both tensor operands should share one dtype: mixed precisions follow the engine's
  promotion rules and are not portable.
* ``axis`` arguments accept negative values counted from the end.
* Ops never modify their inputs, except ``adamw_update`` which may (callers use what it returns).
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

Tensor = Any
"""An engine tensor (``torch.Tensor``, ``mindspore.Tensor``, ``numpy.ndarray``)."""

Axis = int | tuple[int, ...] | None

DTYPES: tuple[str, ...] = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "bool")
"""Dtype names shared by every engine."""

FLOAT_DTYPES: tuple[str, ...] = ("float64", "float32", "float16", "bfloat16")


@runtime_checkable
class Kernels(Protocol):
    """One method per op. An engine's kernel table maps each name in :data:`OPS` to a callable with
    exactly this signature."""

    # ----------------------------------------------------------------- creation and metadata
    def asarray(self, data: Any, dtype: str | None = None) -> Tensor:
        """A tensor holding ``data`` (Python scalar, nested sequence or numpy array) on the engine's
        device. ``dtype=None`` keeps ``numpy.asarray(data)``'s dtype (Python floats give float64,
        ints int64, bools bool); otherwise values are converted to ``dtype``."""
        ...

    def zeros(self, shape: Sequence[int], dtype: str = "float32") -> Tensor:
        """A tensor of ``shape`` filled with 0."""
        ...

    def ones(self, shape: Sequence[int], dtype: str = "float32") -> Tensor:
        """A tensor of ``shape`` filled with 1."""
        ...

    def full(self, shape: Sequence[int], value: float | int | bool, dtype: str = "float32") -> Tensor:
        """A tensor of ``shape`` filled with ``value`` converted to ``dtype``."""
        ...

    def arange(
        self, start: int, stop: int | None = None, step: int = 1, dtype: str = "int64"
    ) -> Tensor:
        """``[start, start + step, ...)`` up to but excluding ``stop``, like ``numpy.arange``.
        With one argument the range is ``[0, start)``."""
        ...

    def shape(self, x: Tensor) -> tuple[int, ...]:
        """The shape of ``x`` as a tuple of Python ints (``()`` for a scalar)."""
        ...

    def dtype(self, x: Tensor) -> str:
        """The dtype name of ``x`` (one of :data:`DTYPES` for tensors made by kernels)."""
        ...

    def cast(self, x: Tensor, dtype: str) -> Tensor:
        """``x`` converted to ``dtype``. Float to narrower float rounds to nearest even; float to
        integer truncates toward zero; anything to bool is ``x != 0``; bool to number is 0/1."""
        ...

    # ----------------------------------------------------------------------- elementwise
    def add(self, a: Tensor | float, b: Tensor | float) -> Tensor:
        """``a + b``, broadcasting."""
        ...

    def sub(self, a: Tensor | float, b: Tensor | float) -> Tensor:
        """``a - b``, broadcasting."""
        ...

    def mul(self, a: Tensor | float, b: Tensor | float) -> Tensor:
        """``a * b``, broadcasting."""
        ...

    def div(self, a: Tensor | float, b: Tensor | float) -> Tensor:
        """``a / b``, broadcasting. When both operands are integers (tensors or Python ints) the
        result is the integer quotient truncated toward zero (ONNX ``Div``, C semantics), in the
        integer dtype; otherwise true division. Division by zero follows IEEE for floats."""
        ...

    def neg(self, x: Tensor) -> Tensor:
        """``-x``."""
        ...

    def exp(self, x: Tensor) -> Tensor:
        """``e ** x``; overflows to ``inf`` like IEEE."""
        ...

    def log(self, x: Tensor) -> Tensor:
        """Natural logarithm; ``log(0) = -inf``, negative inputs give NaN."""
        ...

    def sqrt(self, x: Tensor) -> Tensor:
        """Square root; negative inputs give NaN."""
        ...

    def rsqrt(self, x: Tensor) -> Tensor:
        """``1 / sqrt(x)``; ``rsqrt(0) = inf``."""
        ...

    def tanh(self, x: Tensor) -> Tensor:
        """Hyperbolic tangent; exact ±1 saturation for large ``|x|`` (no NaN)."""
        ...

    def sigmoid(self, x: Tensor) -> Tensor:
        """``1 / (1 + exp(-x))`` evaluated without overflow for large ``|x|``."""
        ...

    def relu(self, x: Tensor) -> Tensor:
        """``max(x, 0)``."""
        ...

    def gelu(self, x: Tensor, approximate: str = "none") -> Tensor:
        """GELU. ``approximate="none"``: ``x * 0.5 * (1 + erf(x / sqrt(2)))``;
        ``"tanh"``: ``0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3)))`` (ONNX ``Gelu``,
        ``torch.nn.functional.gelu``)."""
        ...

    def silu(self, x: Tensor) -> Tensor:
        """``x * sigmoid(x)`` (swish), stable for large ``|x|``."""
        ...

    def erf(self, x: Tensor) -> Tensor:
        """The Gauss error function."""
        ...

    def sin(self, x: Tensor) -> Tensor:
        """Sine (radians)."""
        ...

    def cos(self, x: Tensor) -> Tensor:
        """Cosine (radians)."""
        ...

    def pow(self, x: Tensor | float, exponent: Tensor | float) -> Tensor:
        """``x ** exponent``, broadcasting; the exponent may be a Python scalar or a tensor. The
        result has ``x``'s dtype (an integer base with a float exponent is not portable)."""
        ...

    def maximum(self, a: Tensor | float, b: Tensor | float) -> Tensor:
        """Elementwise maximum, broadcasting; NaN if either operand is NaN."""
        ...

    def minimum(self, a: Tensor | float, b: Tensor | float) -> Tensor:
        """Elementwise minimum, broadcasting; NaN if either operand is NaN."""
        ...

    def where(self, cond: Tensor, a: Tensor | float, b: Tensor | float) -> Tensor:
        """``a`` where the bool tensor ``cond`` is true, else ``b``; all three broadcast together."""
        ...

    def equal(self, a: Tensor | float, b: Tensor | float) -> Tensor:
        """``a == b`` as a bool tensor, broadcasting."""
        ...

    def greater(self, a: Tensor | float, b: Tensor | float) -> Tensor:
        """``a > b`` as a bool tensor, broadcasting."""
        ...

    def less(self, a: Tensor | float, b: Tensor | float) -> Tensor:
        """``a < b`` as a bool tensor, broadcasting."""
        ...

    # ------------------------------------------------------------------------ reductions
    def sum(self, x: Tensor, axis: Axis = None, keepdims: bool = False) -> Tensor:
        """Sum over ``axis`` (``None``: all axes; ``()``: no axis, returns ``x`` unchanged, as in
        NumPy). An empty reduction gives 0. Integer inputs sum to int64."""
        ...

    def mean(self, x: Tensor, axis: Axis = None, keepdims: bool = False) -> Tensor:
        """Arithmetic mean of a float tensor over ``axis`` (as in :meth:`sum`); an empty
        reduction gives NaN."""
        ...

    def max(self, x: Tensor, axis: Axis = None, keepdims: bool = False) -> Tensor:
        """Maximum over ``axis`` (as in :meth:`sum`); for a float tensor an empty reduction gives
        ``-inf`` (ONNX ``ReduceMax``). NaN propagates."""
        ...

    def logsumexp(self, x: Tensor, axis: Axis = -1, keepdims: bool = False) -> Tensor:
        """``log(sum(exp(x)))`` over ``axis`` computed as ``m + log(sum(exp(x - m)))`` with ``m``
        the maximum, so it neither overflows nor underflows for ``|x|`` up to the dtype's range.
        All ``-inf`` (or empty) gives ``-inf``."""
        ...

    def argmax(self, x: Tensor, axis: int | None = -1, keepdims: bool = False) -> Tensor:
        """Index of the maximum along ``axis`` as int64 (``None``: index into the flattened
        tensor). Ties resolve to the first (lowest) index."""
        ...

    # ----------------------------------------------------------------------------- shape
    def reshape(self, x: Tensor, shape: Sequence[int]) -> Tensor:
        """``x`` with a new shape of the same size, row-major order. One entry may be ``-1`` (inferred);
        ``0`` means a dimension of size 0 (not "copy", unlike ONNX ``Reshape`` by default)."""
        ...

    def transpose(self, x: Tensor, axes: Sequence[int]) -> Tensor:
        """Permute dimensions: output dim ``i`` is input dim ``axes[i]``; ``axes`` is a full
        permutation of ``range(ndim)``."""
        ...

    def concat(self, xs: Sequence[Tensor], axis: int = 0) -> Tensor:
        """Join tensors of equal rank along ``axis``; other dims must match. Size-0 pieces are
        allowed."""
        ...

    def split(self, x: Tensor, sizes: Sequence[int], axis: int = 0) -> list[Tensor]:
        """Cut ``x`` along ``axis`` into consecutive pieces of the given ``sizes`` (which sum to
        ``x.shape[axis]``; zeros allowed). Returns a list."""
        ...

    def take(self, x: Tensor, indices: Tensor | int, axis: int = 0) -> Tensor:
        """ONNX ``Gather``: pick entries of ``x`` along ``axis`` with integer ``indices`` of any
        shape; the result has shape ``x.shape[:axis] + indices.shape + x.shape[axis + 1:]``. Negative
        indices count from the end. A Python int index removes ``axis``."""
        ...

    def embedding(self, table: Tensor, ids: Tensor) -> Tensor:
        """Rows of ``table`` (``(num, dim)``) picked by integer ``ids`` of any shape:
        ``take(table, ids, axis=0)``, shape ``ids.shape + (dim,)``."""
        ...

    def pad(self, x: Tensor, pads: Sequence[tuple[int, int]], value: float = 0.0) -> Tensor:
        """Constant padding: ``pads[i] = (before, after)`` non-negative counts for dim ``i``, one
        pair per dim of ``x``; new entries are ``value``."""
        ...

    # --------------------------------------------------------------------- linear algebra
    def matmul(self, a: Tensor, b: Tensor) -> Tensor:
        """Matrix product with ``numpy.matmul`` semantics: 1-D operands are promoted to a row /
        column vector and the added dim removed afterwards; leading (batch) dims broadcast."""
        ...

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """``x @ weight.T + bias`` with ``weight`` ``(out, in)`` (torch layout), ``x`` ``(..., in)``,
        ``bias`` ``(out,)``; returns ``(..., out)``."""
        ...

    def conv2d(
        self,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None = None,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
    ) -> Tensor:
        """2-D cross-correlation, NCHW: ``x`` ``(N, C, H, W)``, ``weight`` ``(O, C // groups, kh,
        kw)``, ``bias`` ``(O,)``. ``padding`` is zero padding on both sides of each spatial dim (an int
        or an ``(h, w)`` pair, like ``stride`` and ``dilation``). Output spatial size is
        ``(H + 2p - d * (k - 1) - 1) // s + 1``."""
        ...

    # ------------------------------------------------------------------------------- nn
    def softmax(self, x: Tensor, axis: int = -1) -> Tensor:
        """``exp(x - max) / sum(exp(x - max))`` along ``axis`` (stable for large ``|x|``). ``-inf``
        entries get probability 0."""
        ...

    def log_softmax(self, x: Tensor, axis: int = -1) -> Tensor:
        """``x - logsumexp(x, axis, keepdims=True)``, computed without forming ``log(softmax)``."""
        ...

    def layer_norm(
        self,
        x: Tensor,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        eps: float = 1e-5,
        axis: int = -1,
    ) -> Tensor:
        """ONNX ``LayerNormalization``: normalise over dims ``axis .. ndim-1`` to
        ``(x - mean) / sqrt(var + eps)`` with the biased (population) variance, then multiply by
        ``weight`` and add ``bias``, both shaped ``x.shape[axis:]``. The variance is computed from
        centred values (no ``E[x^2] - E[x]^2`` cancellation)."""
        ...

    def rms_norm(
        self, x: Tensor, weight: Tensor | None = None, eps: float = 1e-6, axis: int = -1
    ) -> Tensor:
        """ONNX ``RMSNormalization``: ``x / sqrt(mean(x**2 over dims axis..ndim-1) + eps)`` times
        ``weight`` (shaped ``x.shape[axis:]``)."""
        ...

    def rotary_embedding(
        self, x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False
    ) -> Tensor:
        """Rotary position embedding on the last dim of ``x`` (``(..., d)``), ONNX
        ``RotaryEmbedding`` arithmetic. With ``r = cos.shape[-1]`` and ``2 * r <= d``, the first
        ``2r`` features are rotated and the rest pass through. ``cos``/``sin`` (``(..., r)``) must
        broadcast against ``x[..., :r]``: e.g. ``(seq, r)`` for ``x`` ``(batch, heads, seq, d)``, or
        ``(batch, 1, seq, r)`` for per-sequence positions (gather a cache with :meth:`take`).
        Pairs are ``(x[..., i], x[..., i + r])`` when not ``interleaved`` and ``(x[..., 2i],
        x[..., 2i + 1])`` when interleaved; each pair ``(a, b)`` becomes ``(a cos - b sin,
        a sin + b cos)``."""
        ...

    def attention(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None = None,
        causal: bool = False,
        scale: float | None = None,
    ) -> Tensor:
        """Scaled dot-product attention ``softmax(q @ k^T * scale + bias) @ v``.

        ``q`` ``(B, Hq, Sq, D)``, ``k`` ``(B, Hkv, Skv, D)``, ``v`` ``(B, Hkv, Skv, Dv)``; returns
        ``(B, Hq, Sq, Dv)``. When ``Hq`` is a multiple of ``Hkv`` (grouped-query) query head ``h``
        reads kv head ``h // (Hq // Hkv)``. ``scale`` defaults to ``1 / sqrt(D)``. ``mask`` is bool
        (True = may attend) or an additive float bias, broadcastable to ``(B, Hq, Sq, Skv)``.
        ``causal`` lets query ``i`` see keys ``j <= i`` (upper-left aligned, ONNX ``Attention``
        ``is_causal`` without a cache) and combines with ``mask``. A query row that may attend no
        key outputs zeros (ONNX convention), never NaN."""
        ...

    def dropout(self, x: Tensor, p: float, training: bool = True) -> Tensor:
        """Inverted dropout: each element is zeroed with probability ``p`` (drawn from the engine's
        seeded generator) and survivors are scaled by ``1 / (1 - p)``. Returns ``x`` unchanged when
        ``p == 0`` or not ``training``; zeros when ``p == 1``."""
        ...

    def cross_entropy(
        self,
        logits: Tensor,
        targets: Tensor,
        ignore_index: int = -100,
        reduction: str = "mean",
        weight: Tensor | None = None,
    ) -> Tensor:
        """Softmax cross-entropy (ONNX ``SoftmaxCrossEntropyLoss``, ``torch.nn.functional.
        cross_entropy``). ``logits`` ``(N, C)`` or ``(N, C, d1, ...)`` (classes on axis 1), integer
        ``targets`` ``(N,)`` or ``(N, d1, ...)``. Per element ``loss = -weight[t] * log_softmax(
        logits)[t]`` (``weight`` ``(C,)`` defaults to ones), 0 where ``t == ignore_index``.
        ``reduction``: ``"none"`` returns the per-element losses, ``"sum"`` their sum, ``"mean"``
        their sum divided by the total weight of non-ignored targets (NaN if all are ignored)."""
        ...

    # ------------------------------------------------------------------------- optimizer
    def adamw_update(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        exp_avgs: Sequence[Tensor],
        exp_avg_sqs: Sequence[Tensor],
        step: int,
        lr: float,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """One AdamW step over lists of tensors, ``torch.optim.AdamW`` semantics (no amsgrad, not
        maximize). For each parameter, with ``step >= 1`` the 1-based count of this update::

            p = p * (1 - lr * weight_decay)
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            p = p - (lr / (1 - beta1**step)) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)

        A gradient may be a strided view (a transposed backward result) and may have another float
        dtype than its parameter (bfloat16 gradients of float32 weights): it is cast to the
        parameter's dtype first, and the update is the same as for a contiguous gradient.

        Returns ``(params, exp_avgs, exp_avg_sqs)``. An implementation may update in place and return
        the same objects; callers must use the returned values."""
        ...

    def global_norm(self, tensors: Sequence[Tensor]) -> Tensor:
        """``sqrt(sum of squares of every element of every tensor)`` as a scalar tensor, accumulated
        in float32 or wider (float32 result for float32/float16/bfloat16 inputs). 0 for no tensors."""
        ...


def _protocol_ops() -> tuple[str, ...]:
    # Declaration order of the Protocol's public methods: the order the docs present them in.
    return tuple(
        name
        for name, value in vars(Kernels).items()
        if callable(value) and not name.startswith("_")
    )


OPS: tuple[str, ...] = _protocol_ops()
"""Every op name, in declaration order. A kernel table must provide all of them."""

__all__ = ["DTYPES", "FLOAT_DTYPES", "Kernels", "OPS", "Tensor"]
