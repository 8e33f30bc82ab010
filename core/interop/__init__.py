"""Foreign checkpoint layouts: Hugging Face model directories and MindSpore checkpoints, read and
written as streams, mapped to a registered model by the layout its package declares
(``ModelSpec.formats``). ``isthmus convert`` and every command that takes a checkpoint use it."""

from isthmus.interop.convert import (
    DTYPES,
    TARGETS,
    Converted,
    convert,
    foreign_checkpoint,
    foreign_model,
    run_config,
)
from isthmus.interop.hf import InteropError
from isthmus.interop.layout import Layout, LayoutError, Rule

__all__ = ["Converted", "DTYPES", "InteropError", "Layout", "LayoutError", "Rule", "TARGETS", "convert",
           "foreign_checkpoint", "foreign_model", "run_config"]
