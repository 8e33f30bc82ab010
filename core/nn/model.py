"""The model interface: what a model provides, written against kernels only.

A model class derives from :class:`Model` (a ``Protocol``, so type checkers check the signatures)
and gets working defaults for every optional part: it must write ``name``, ``param_specs``,
``forward`` and ``loss``; ``evaluate``, ``bind_data``, ``data_state``, ``generate``, ``blocks``,
``engine_module``, ``export_graphs``, ``export_checks`` and ``activation_bytes`` are there to override. The trainer, the export and the portability check call
only what is declared here, never ``getattr``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol

from isthmus.errors import IsthmusError
from isthmus.nn.params import ParamSpec

if TYPE_CHECKING:
    import numpy as np

    from isthmus.data.splits import DataSplits


class Model(Protocol):
    """An engine-neutral model.

    ``params`` maps the dotted names of :meth:`param_specs` to engine tensors and ``batch`` maps
    names to engine tensors (moved from the dataset's numpy batch by the engine). Methods call only
    ``k`` (a :class:`~isthmus.kernels.routing.KernelSet`): no tensor operators, no engine imports,
    so the same code runs on torch, MindSpore, the NumPy reference and the ONNX exporter.
    """

    name: str
    """The registered name (``model.name`` in configs)."""

    task: str = ""
    """What the model does, in a word other models may rely on (``"captioning"``: ``generate``
    reads ``batch["images"]`` and returns token ids that ``tokenizer`` decodes)."""

    tokenizer: Any = None
    """The text tokenizer the model's token ids belong to, when it reads or writes text."""

    engines: tuple[str, ...] | None = None
    """The engines that can run it; None: every engine (a model written against kernels). A run on
    another engine is refused before anything is built."""

    autocast: bool = False
    """True: the model keeps its parameters and inputs as they are and runs low precision through
    the engine's own autocast (``Engine.autocast``); False: the trainer's precision policy casts
    parameters and floating inputs to the compute dtype."""

    module: Any = None
    """The ``torch.nn.Module`` the model runs, when it wraps one: ``isthmus dump`` then records it by
    module hooks under its own module paths, and ``compare`` takes the same module in float64 on the
    CPU as its truth (:mod:`isthmus.verify.module_dump`)."""

    # ---- required ----------------------------------------------------------------------------
    def param_specs(self) -> dict[str, ParamSpec]:
        """Every parameter, by stable dotted name, in a fixed order."""
        ...

    def forward(self, k: Any, params: Mapping[str, Any], batch: Mapping[str, Any], training: bool = False) -> Any:
        """The model's main output tensor for ``batch`` (logits, for a classifier or a language
        model): the tensor that export and portability compare across backends."""
        ...

    def loss(self, k: Any, params: Mapping[str, Any], batch: Mapping[str, Any],
             training: bool = True) -> tuple[Any, dict[str, Any]]:
        """``(scalar loss tensor, {metric name: scalar tensor})``: what the trainer differentiates,
        and metrics averaged over evaluation batches."""
        ...

    # ---- optional, with defaults -------------------------------------------------------------
    def initial_parameters(self, seed: int) -> dict[str, np.ndarray]:
        """The starting weights as numpy arrays, by the names of :meth:`param_specs`. The default
        draws each from its spec, keyed by the seed and the parameter's name."""
        from isthmus.nn.params import initialise

        return initialise(self.param_specs(), seed)

    def place_parameters(self, engine: Any, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """The parameters the trainer updates, on the engine's device, from numpy arrays (at the
        start, and when a checkpoint is resumed). The default is ``engine.parameters(arrays)``."""
        return dict(engine.parameters(arrays))

    def bind_data(self, data: DataSplits, seed: int, saved: Mapping[str, Any] | None) -> DataSplits:
        """The data as this model consumes it. The default passes it through; a model whose batches
        need more than the dataset gives (visual codes fitted on the training images) returns
        wrapped splits. ``saved`` is what :meth:`data_state` returned when the checkpoint was
        written, so a restored model sees the data exactly as in training."""
        return data

    def data_state(self) -> dict[str, Any] | None:
        """What :meth:`bind_data` fitted on the data (JSON-able), for the checkpoint; None: nothing."""
        return None

    def evaluate(self, backend: Any, params: Mapping[str, Any], dataset: Any, *, batch_size: int = 128,
                 max_samples: int | None = None, policy: Any = None, final: bool = True,
                 out_dir: Path | None = None, **options: Any) -> dict[str, Any]:
        """Held-out evaluation. Returns numbers (each one goes into ``metrics.jsonl``) and a
        ``"headline"`` string the command line prints; optionally ``"examples"`` (a list of
        ``{"target", "predicted", "match"}``) and ``"grid"`` (a written image's path).

        ``final`` is the thorough evaluation at the end of training or from ``isthmus eval``, which
        may write files to ``out_dir``; ``options`` come from ``isthmus eval --option KEY=VALUE``.
        The default is the loss and the loss's metrics, weighted by samples."""
        from isthmus.train.evaluate import loss_evaluation

        if options:
            raise IsthmusError(f"--option {next(iter(options))}: model {self.name} takes no evaluation options")
        return loss_evaluation(self, backend, params, dataset, batch_size=batch_size, max_samples=max_samples,
                               policy=policy)

    def blocks(self) -> list[str]:
        """The parameter prefixes of the model's repeated blocks (``["layers.0", "layers.1", ...]``),
        each run through :meth:`isthmus.nn.params.Scope.run`: the units that sharded training shards
        and gathers one at a time, and whose activations ``train.recompute`` recomputes. The default
        has none (the whole model is one unit)."""
        return []

    def engine_module(self) -> Any:
        """The engine's own module holding the parameters, for a model that wraps one (a
        ``torch.nn.Module``); then :meth:`blocks` are its submodules' names. None (the default):
        the model is written against kernels."""
        return None

    def describe(self) -> dict[str, Any]:
        """Facts about how the model runs that a dump or a report records (swapped submodules, a
        fitted codebook's size); JSON-able. The default has none."""
        return {}

    def generate(self, k: Any, params: Mapping[str, Any], batch: Mapping[str, Any], **options: Any) -> Any:
        """What the model produces for the inputs in ``batch`` by running itself repeatedly (token
        ids for a model that captions images or continues text). The default refuses: most models only
        score."""
        raise IsthmusError(f"model {self.name} does not generate")

    def export_graphs(self, params: Mapping[str, Any], host_batch: Mapping[str, Any]) -> list[Any]:
        """Graphs to export beside the forward, each an :class:`isthmus.export.pipeline.ExtraGraph`
        (a KV-cache step for generation, say); ``params`` are the float32 host weights and
        ``host_batch`` the example inputs of the forward. The default has none."""
        return []

    def activation_bytes(self, batch_size: int, training: bool = True) -> int | None:
        """About how many bytes of activations one step holds for ``batch_size`` samples: with
        ``training``, what autodiff keeps for the backward pass; without, what a forward pass (or
        a generation) needs at its peak. :mod:`isthmus.train.budget` adds it to the parameters'
        and optimizer's memory to refuse, before anything is built, a run this machine cannot hold.
        ``None`` (the default): not estimated, the check counts parameters and data only."""
        return None

    def export_checks(self, backend: Any, params: Mapping[str, Any], run_file: Any, host_batch: Mapping[str, Any],
                      tolerance: float, graphs: Mapping[str, Any] | None = None) -> list[Any]:
        """Checks of an exported file beyond its forward output, each an
        :class:`isthmus.export.pipeline.Check`: ``backend`` is the source backend and ``params``
        the float32 host weights, ``run_file(feeds)`` runs the file on numpy feeds, ``host_batch``
        holds the held-out inputs the file was checked on; ``graphs`` maps the name of each graph
        from :meth:`export_graphs` to the runner of its file. The default has none."""
        return []


__all__ = ["Model"]
