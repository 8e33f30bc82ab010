"""The classifier's hyperparameters: the ``model`` section's schema, written once.
``configs/model/example-classifier.yaml`` holds values only."""

from __future__ import annotations

from dataclasses import dataclass, field

from isthmus import ModelBase, bounds

ACTIVATIONS = ("relu", "gelu")


@dataclass
class ClassifierConfig(ModelBase):
    """Two strided convolutions, global average pooling and a linear head."""

    name: str = "example-classifier"
    image_size: int = field(default=32, metadata=bounds(ge=8))
    channels: int = field(default=3, metadata=bounds(ge=1))
    width: int = field(default=16, metadata=bounds(ge=1))  # channels of the first convolution; doubled in the second
    activation: str = "gelu"
    num_classes: int | None = field(default=None, metadata=bounds(ge=2))  # None: from the data's classes

    def check(self) -> list[tuple[str, str]]:
        """Rules a field's type cannot state."""
        if self.activation not in ACTIVATIONS:
            return [("activation", f"{self.activation!r} is not one of {', '.join(ACTIVATIONS)}")]
        return []
