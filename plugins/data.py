"""Built-in plugin: the bundled datasets. Registration imports nothing heavy: each dataset's module
is imported inside its factory (and its schema only when a config is checked)."""

from __future__ import annotations

from typing import Any, Mapping

from isthmus.registry.hookspecs import Register, hookimpl
from isthmus.registry.specs import DatasetSpec


def scenes(data_config: Mapping[str, Any], saved: Mapping[str, Any] | None = None) -> Any:
    """The procedural scenes with captions (:func:`isthmus.data.scene_data.scenes`)."""
    from isthmus.data.scene_data import scenes as make

    return make(data_config, saved)


def image_folder(data_config: Mapping[str, Any], saved: Mapping[str, Any] | None = None) -> Any:
    """A user's folder of captioned or labelled images (:func:`isthmus.data.image_folder.image_folder`)."""
    from isthmus.data.image_folder import image_folder as make

    return make(data_config, saved)


@hookimpl
def register_datasets(register: Register) -> None:
    register(DatasetSpec(name="scenes", factory=scenes, schema="isthmus.data.scene_data:ScenesConfig",
                         description="Procedural scenes of coloured shapes with captions, generated in code"))
    register(DatasetSpec(name="image-folder", factory=image_folder, schema="isthmus.data.image_folder:ImageFolderConfig",
                         description="A folder of images: captions.jsonl, labels.jsonl or one subfolder per class"))
