"""The reference models, each written once against kernels and registered by the built-in
``models`` plugin (:mod:`isthmus.plugins.models`) through the same hook third parties use."""

from isthmus.models.captioner import CaptionerConfig, TinyCaptioner, prefix_lm_mask
from isthmus.models.t2i import T2IConfig, TinyT2I

__all__ = ["CaptionerConfig", "T2IConfig", "TinyCaptioner", "TinyT2I", "prefix_lm_mask"]
