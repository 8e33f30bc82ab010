"""A small convolutional classifier, written against isthmus kernels only (``k.conv2d``,
``k.relu``...), so it runs on every engine, the NumPy reference and the ONNX exporter unchanged.

Images ``(B, C, H, W)`` -> conv 3x3 stride 2 -> activation -> conv 3x3 stride 2 -> activation
-> mean over the pixels -> linear -> logits ``(B, num_classes)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from isthmus import Model, ParamSpec, Scope, add_specs, layers
from isthmus_model_example.config import ClassifierConfig


def conv_specs(c_in: int, c_out: int) -> dict[str, ParamSpec]:
    return {"weight": ParamSpec((c_out, c_in, 3, 3), "uniform_fan_in"), "bias": ParamSpec((c_out,), "zeros", decay=False)}


class Classifier(Model):
    """The ``example-classifier`` model."""

    name = "example-classifier"
    task = "classification"

    def __init__(self, config: Mapping[str, Any], classes: tuple[str, ...]) -> None:
        values = {k: v for k, v in config.items() if k != "name"}
        if values.get("num_classes") is None:
            values["num_classes"] = len(classes)
        self.config = ClassifierConfig(**values)
        problems = self.config.check()
        if len(classes) != self.config.num_classes:
            problems.append(("num_classes", f"{self.config.num_classes}, but the data has {len(classes)} classes"))
        if problems:
            raise ValueError("; ".join(f"model.{key}: {message}" for key, message in problems))
        self.classes = classes

    def param_specs(self) -> dict[str, ParamSpec]:
        c = self.config
        specs: dict[str, ParamSpec] = {}
        add_specs(specs, "conv1", conv_specs(c.channels, c.width))
        add_specs(specs, "conv2", conv_specs(c.width, 2 * c.width))
        add_specs(specs, "head", layers.linear_specs(2 * c.width, c.num_classes))
        return specs

    def activate(self, k: Any, x: Any) -> Any:
        return k.relu(x) if self.config.activation == "relu" else k.gelu(x)

    def forward(self, k: Any, params: Mapping[str, Any], batch: Mapping[str, Any], training: bool = False) -> Any:
        p = Scope(params)
        # Batches arrive as float32; computing in the weights' dtype keeps float64 checks float64.
        x = k.cast(batch["images"], k.dtype(p["conv1.weight"]))
        for name in ("conv1", "conv2"):
            x = self.activate(k, k.conv2d(x, p[f"{name}.weight"], p[f"{name}.bias"], stride=2, padding=1))
        return layers.linear(k, p.sub("head"), k.mean(x, axis=(2, 3)))

    def loss(self, k: Any, params: Mapping[str, Any], batch: Mapping[str, Any],
             training: bool = True) -> tuple[Any, dict[str, Any]]:
        logits = self.forward(k, params, batch, training)
        hits = k.equal(k.argmax(logits, axis=-1), batch["labels"])
        return k.cross_entropy(logits, batch["labels"]), {"accuracy": k.mean(k.cast(hits, k.dtype(logits)))}

    def evaluate(self, backend: Any, params: Mapping[str, Any], dataset: Any, *, batch_size: int = 128,
                 max_samples: int | None = None, policy: Any = None, final: bool = True, out_dir: Any = None,
                 **options: Any) -> dict[str, Any]:
        from isthmus_model_example.evaluate import accuracy

        if options:
            from isthmus import IsthmusError

            raise IsthmusError(f"--option {next(iter(options))}: {self.name} takes no evaluation options")
        return accuracy(self, backend, params, dataset, batch_size=batch_size, max_samples=max_samples, policy=policy)

    def describe(self) -> dict[str, Any]:
        return {"config": dataclasses.asdict(self.config), "classes": list(self.classes)}
