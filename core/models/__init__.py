"""The reference models, each written once against kernels and registered by the built-in
``models`` plugin (:mod:`isthmus.plugins.models`) through the same hook third parties use."""

from isthmus.models.captioner import CaptionerConfig, TinyCaptioner, prefix_lm_mask

__all__ = ["CaptionerConfig", "TinyCaptioner", "prefix_lm_mask"]
