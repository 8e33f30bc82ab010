"""The plugin: what the package adds to isthmus, through the same hooks the built-in models use.
Registering imports nothing heavy: the model and dataset modules load in their factories."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from isthmus import DatasetSpec, ModelSpec, hookimpl


def build_classifier(model_config: Mapping[str, Any], data: Any) -> Any:
    """``ModelSpec.factory``: the model from its config section and the data (its class names)."""
    from isthmus import IsthmusError
    from isthmus_model_example.model import Classifier

    if not data.classes:
        raise IsthmusError("model example-classifier needs labelled data: data=example-shapes, or "
                           "data=image-folder data.path=DIR with one subfolder per class")
    return Classifier(model_config, data.classes)


def build_shapes(data_config: Mapping[str, Any], saved: Mapping[str, Any] | None = None) -> Any:
    """``DatasetSpec.factory``: the drawn shapes, as ``DataSplits``."""
    from isthmus_model_example.shapes import shapes

    return shapes(data_config, saved)


@hookimpl
def register_models(register):
    register(ModelSpec(
        name="example-classifier",
        factory=build_classifier,
        schema="isthmus_model_example.config:ClassifierConfig",
        smoke=("model.width=4", "data.num_train=64", "data.num_eval=16"),
        description="A small convolutional image classifier (the isthmus-model-example package)",
    ))


@hookimpl
def register_datasets(register):
    register(DatasetSpec(name="example-shapes", factory=build_shapes,
                         schema="isthmus_model_example.shapes:ShapesConfig",
                         description="Drawn images of one shape each, labelled circle, square or triangle"))


@hookimpl
def register_config_dirs():
    return Path(__file__).parent / "configs"
