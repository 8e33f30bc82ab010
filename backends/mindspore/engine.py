"""The MindSpore engine: tensors on one device target (CPU, GPU, Ascend); ops dispatch in PyNative
mode, and in graph mode (``backend.options.mode``, the default) the train step, evaluation and the
portability forward run as ``mindspore.jit`` graphs (:mod:`isthmus.backends.mindspore.graph`).

Importing this module imports MindSpore quietly: glog keeps only errors unless the user set
``GLOG_v``, and the "compiled using NumPy 1.x" notice that MindSpore 2.10's extension prints (to
``sys.stderr``, not through ``warnings``) on its first numpy hand-off is absorbed by a warm-up op.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from typing import Any, Callable, Iterator, Mapping

os.environ.setdefault("GLOG_v", "3")  # before the import: glog reads it once, at load time

import numpy as np  # noqa: E402
from isthmus.registry.backend import Engine

from isthmus.backends.mindspore.modes import ExecutionOptions  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import mindspore as ms  # noqa: E402
    from mindspore import ops  # noqa: E402

MS_DTYPES: dict[str, Any] = {
    "float64": ms.float64,
    "float32": ms.float32,
    "float16": ms.float16,
    "bfloat16": ms.bfloat16,
    "int64": ms.int64,
    "int32": ms.int32,
    "bool": ms.bool_,
}
_NAMES = {dtype: name for name, dtype in MS_DTYPES.items()}
log = logging.getLogger("isthmus.mindspore")


def ms_dtype(name: str) -> Any:
    """The MindSpore dtype for an :data:`isthmus.kernels.interface.DTYPES` name."""
    try:
        return MS_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(MS_DTYPES)}") from None


def dtype_name(dtype: Any) -> str:
    """The :data:`isthmus.kernels.interface.DTYPES` name of a MindSpore dtype (MindSpore's own otherwise)."""
    return _NAMES.get(dtype, str(dtype).lower())


def scalar(value: float, like: ms.Tensor) -> float | ms.Tensor:
    """``value`` ready to combine with the tensor ``like``. MindSpore rounds a Python float to
    float32 before combining it with a tensor, so a float64 tensor gets a float64 0-d tensor."""
    return ms.Tensor(float(value), ms.float64) if like.dtype == ms.float64 else value


def _warm_up() -> None:
    # The first op that hands numpy data to MindSpore's extension makes numpy write its ABI
    # notice to sys.stderr and may fail with "returned a result with an exception set". Running
    # that op here, silenced, spends both before any user op runs; later ops are unaffected.
    with contextlib.redirect_stderr(io.StringIO()):
        for _ in range(2):
            try:
                ops.zeros((1,), ms.float32).asnumpy()
                return
            except SystemError:  # the failed first call is the point of the exercise
                continue


def set_device(device_target: str, device_id: int) -> None:
    """Point MindSpore at ``device_target`` in PyNative mode, with errors raised where they occur.

    ``launch_blocking`` makes each op finish before the next starts: without it a failing kernel
    reports its error at a later op, and the conformance suite would blame the wrong case. On a
    2-core host it also trains the demo's image-captioning model ~10x faster (the asynchronous launch threads
    compete with the kernels for the cores).
    """
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        ms.set_device(device_target, device_id)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RuntimeError(f"MindSpore cannot use device target {device_target}: {first[:300]}") from None
    ms.runtime.launch_blocking()


def configure_cpu(threads: int, deterministic: bool) -> None:
    """CPU kernel threads and deterministic kernels. MindSpore refuses to change either a second
    time in a process ("can not be set repeatedly"), so the first backend built decides."""
    try:
        ms.device_context.cpu.op_tuning.threads_num(threads)
    except RuntimeError:
        pass
    if deterministic and ms.get_context("deterministic") != "ON":
        try:
            ms.set_deterministic(True)
        except RuntimeError:
            pass


class MindSporeEngine(Engine):
    """:class:`isthmus.registry.backend.Engine` over MindSpore on ``device_target`` (``"CPU"``, ``"GPU"``,
    ``"Ascend"``) and ``device_id``.

    ``generator`` (a numpy ``Generator``) draws dropout masks on the host: its state is plain data,
    so masks are reproducible and a checkpoint restores them exactly, on any device target.
    ``unsupported_dtypes`` maps a dtype this device target lacks kernels for to the reason; the
    conformance suite skips those dtypes with that reason. ``execution``: graph or PyNative mode,
    ``jit_level`` and ``fallback`` (:mod:`isthmus.backends.mindspore.modes`).
    """

    name = "mindspore"

    def __init__(self, device_target: str = "CPU", device_id: int = 0, seed: int = 0,
                 unsupported_dtypes: Mapping[str, str] | None = None,
                 execution: ExecutionOptions | None = None) -> None:
        set_device(device_target, device_id)
        _warm_up()
        self.device_target = device_target
        self.device_id = device_id
        self.device = "cpu" if device_target == "CPU" else f"{device_target.lower()}:{device_id}"
        self.unsupported_dtypes = dict(unsupported_dtypes or {})
        self.generator = np.random.default_rng(seed)
        self.execution = execution or ExecutionOptions()
        self.step_runner: Any = None  # the last compile_train_step result, for runtime_info
        self._feed: Any = None  # where dropout masks come from while a graph is probed or traced
        self._compiled: dict[Any, Any] = {}  # compile_step's functions, compiled once per process
        self.fell_back: set[str] = set()  # models that could not compile and run in PyNative

    # ------------------------------------------------------------------ graph mode
    @property
    def graph_mode(self) -> bool:
        return self.execution.mode == "graph"

    @property
    def feeding_now(self) -> bool:
        """Whether a function is being probed or traced (its kernels' masks come from a feed)."""
        return self._feed is not None

    @contextlib.contextmanager
    def feeding(self, feed: Any) -> Iterator[None]:
        """Dropout masks from ``feed`` (:class:`isthmus.backends.mindspore.graph.MaskFeed`) within."""
        previous, self._feed = self._feed, feed
        try:
            yield
        finally:
            self._feed = previous

    def dropout_mask(self, shape: tuple[int, ...], p: float) -> ms.Tensor:
        """A bool keep-mask (each element kept with probability ``1 - p``): drawn on the host from
        :attr:`generator`, or, while a graph is traced, its mask input."""
        if self._feed is not None:
            return self._feed.mask(shape, p)
        return ms.Tensor(self.generator.random(tuple(shape)) >= p)

    def compile_step(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Graph mode: ``fn`` as a :class:`~isthmus.backends.mindspore.graph.GraphFunction` (compiled
        per argument signature at its first call); PyNative: ``fn``."""
        if not self.graph_mode:
            return fn
        from isthmus.backends.mindspore.graph import GraphFunction

        try:
            known = self._compiled.get(fn)
        except TypeError:  # unhashable: compiled afresh
            known = None
        if known is None:
            owner = getattr(getattr(fn, "__self__", None), "name", None)
            name = getattr(fn, "__name__", "function")
            known = GraphFunction(self, fn, f"model {owner}" if owner else name, f"{owner}.{name}" if owner else name)
            with contextlib.suppress(TypeError):
                self._compiled[fn] = known
        return known

    def fall_back(self, model: str, problem: Exception) -> None:
        """Note that ``model`` cannot compile and runs in PyNative (``backend.options.fallback``):
        warned once per model, however many of its functions try."""
        if model not in self.fell_back:
            self.fell_back.add(model)
            log.warning("%s; running it in PyNative (backend.options.fallback=true)", problem)

    def compile_train_step(self, step: Any) -> Any:
        """The runner of :class:`isthmus.train.step.TrainStep` ``step``: the objective compiled in
        graph mode, op by op in PyNative; the update compiled in both."""
        from isthmus.backends.mindspore.train_step import MindSporeStepRunner

        self.step_runner = MindSporeStepRunner(self, step, compiled_objective=self.graph_mode)
        return self.step_runner

    def seed(self, n: int) -> None:
        """Reset the dropout generator to a reproducible state."""
        self.generator = np.random.default_rng(n)

    def asarray(self, array: Any, dtype: str | None = None) -> ms.Tensor:
        """Copy ``array`` onto the device, keeping its numpy dtype unless ``dtype`` is given."""
        if isinstance(array, ms.Tensor):
            tensor = ops.deepcopy(array)
            return tensor if dtype is None else ops.cast(tensor, ms_dtype(dtype))
        array = np.asarray(array)
        if array.dtype.name == "bfloat16":  # ml_dtypes arrays (ONNX test data) go through float32
            tensor = ops.cast(ms.Tensor(array.astype(np.float32)), ms.bfloat16)
        else:
            if array.dtype.kind not in "fiub":
                raise TypeError(f"cannot make a MindSpore tensor from numpy dtype {array.dtype}")
            tensor = ms.Tensor(np.array(array, copy=True))
        if dtype is not None and dtype_name(tensor.dtype) != dtype:
            tensor = ops.cast(tensor, ms_dtype(dtype))
        return tensor

    def to_numpy(self, tensor: Any) -> np.ndarray:
        """Copy ``tensor`` to host memory; bfloat16 comes back as float32."""
        if not isinstance(tensor, ms.Tensor):
            return np.array(tensor, copy=True)
        if tensor.dtype == ms.bfloat16:
            tensor = ops.cast(tensor, ms.float32)
        # asnumpy() can share the tensor's memory: copy so later in-place updates do not leak.
        return np.array(tensor.asnumpy(), copy=True)

    # ------------------------------------------------------------------ training support
    def parameters(self, arrays: Mapping[str, np.ndarray], dtype: str = "float32") -> dict[str, ms.Tensor]:
        """Device tensors, one per named numpy array. Plain tensors suffice: :meth:`value_and_grad`
        differentiates with respect to its arguments, so updated parameters need no re-wrapping."""
        return {name: self.asarray(array, dtype) for name, array in arrays.items()}

    def value_and_grad(
        self, fn: Callable[[dict[str, ms.Tensor]], tuple[ms.Tensor, Any]], params: dict[str, ms.Tensor]
    ) -> tuple[ms.Tensor, Any, dict[str, ms.Tensor]]:
        """``fn(params) -> (loss, aux)``; returns the loss, aux and d loss / d params.

        A parameter the loss does not reach gets a zero gradient, so optimizer lists stay aligned.
        """
        names = list(params)
        captured: dict[str, Any] = {}

        def objective(*tensors: ms.Tensor) -> ms.Tensor:
            loss, aux = fn(dict(zip(names, tensors)))
            # PyNative runs the forward once, in Python: aux leaves through this side door, so it
            # may be any structure and is not differentiated.
            captured["aux"] = aux
            return loss

        if not names:
            loss = objective()
            return ops.stop_gradient(loss), captured["aux"], {}
        loss, grads = ms.value_and_grad(objective, grad_position=tuple(range(len(names))))(
            *params.values())
        if not isinstance(grads, (tuple, list)):
            grads = (grads,)
        return loss, _detached(captured["aux"]), dict(zip(names, grads))

    def recompute(self, model: Any, params: Mapping[str, Any]) -> Mapping[str, Any]:
        """Blocks under ``mindspore.recompute`` (see :mod:`isthmus.backends.mindspore.recompute`)."""
        from isthmus.backends.mindspore.recompute import Recompute

        return Recompute(params, self)

    def no_grad(self) -> contextlib.AbstractContextManager:
        """A context in which ops record no graph (evaluation, optimizer updates)."""
        # MindSpore's PyNative no-grad switch is private in 2.10: fall back to a null context
        # (ops outside value_and_grad record nothing to differentiate anyway).
        no_grad = getattr(ms, "_no_grad", None)
        return no_grad() if no_grad is not None else contextlib.nullcontext()

    def rng_state(self) -> dict[str, Any]:
        """The dropout generator's state as JSON-able data (128-bit integers as hex text)."""
        state = self.generator.bit_generator.state
        inner = state["state"]
        return {"numpy_bit_generator": state["bit_generator"],
                "state": hex(inner["state"]), "inc": hex(inner["inc"]),
                "has_uint32": int(state["has_uint32"]), "uinteger": int(state["uinteger"])}

    def set_rng_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`rng_state` returned."""
        if state.get("numpy_bit_generator") != "PCG64":
            raise ValueError(f"not a MindSpore engine RNG state: {dict(state)!r:.200}")
        generator = np.random.default_rng()
        generator.bit_generator.state = {
            "bit_generator": "PCG64",
            "state": {"state": int(state["state"], 16), "inc": int(state["inc"], 16)},
            "has_uint32": int(state["has_uint32"]), "uinteger": int(state["uinteger"]),
        }
        self.generator = generator

    def versions(self) -> dict[str, str]:
        """MindSpore and numpy versions."""
        return {"mindspore": ms.__version__, "numpy": np.__version__}

    def runtime_info(self) -> dict[str, Any]:
        """Device target and id, device count and CPU kernel threads, as MindSpore sees them."""
        mode = self.step_runner.description if self.step_runner is not None else (
            f"graph (mindspore.jit trace, jit_level {self.execution.jit_level})" if self.graph_mode else "pynative")
        info: dict[str, Any] = {"device": self.device, "device_target": self.device_target,
                                "device_id": self.device_id, "mode": mode}
        try:
            module = getattr(ms.device_context, self.device_target.lower(), None)
            info["device_count"] = module.device_count() if module is not None else 1
        except Exception as error:  # a driver fault must not break `isthmus doctor`
            info["error"] = f"{type(error).__name__}: {error}"
        threads = ms.get_context("runtime_num_threads") if self.device_target == "CPU" else None
        if threads:
            info["threads"] = threads
        return info

    # ------------------------------------------------------------------ dumps
    def tap(self, tensor: Any, receive: Callable[[Any], None]) -> bool:
        """``receive(gradient)`` during the next backward, through a PyNative tensor hook."""
        if not isinstance(tensor, ms.Tensor) or not ops.is_floating_point(tensor):
            return False

        def hook(grad: ms.Tensor) -> None:
            receive(grad)  # returning None leaves the gradient as it is

        try:
            tensor.register_hook(hook)
        except RuntimeError:  # "requires grad is false": the loss does not depend on it
            return False
        return True

    def numerics(self) -> dict[str, Any]:
        """Determinism, execution mode and, on Ascend, the operator precision mode in force."""
        found: dict[str, Any] = {"mode": "PyNative", "deterministic": ms.get_context("deterministic")}
        if self.device_target == "Ascend":
            try:
                found["ascend_config"] = dict(ms.get_context("ascend_config") or {})
            except (ValueError, RuntimeError, TypeError):
                pass
        return found

    def __repr__(self) -> str:
        return f"MindSporeEngine(device_target={self.device_target!r}, device_id={self.device_id})"


def _detached(value: Any) -> Any:
    if isinstance(value, ms.Tensor):
        return ops.stop_gradient(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value

