"""Rotary frequencies of the decoder family, computed on the host in float64 from the config.

Each scaling type follows the formula the published configs are run with (Hugging Face
``transformers``' rope initialisers): ``default`` ``theta ** (-2i / dim)``; ``linear`` divides them by
``factor``; ``llama3`` divides the low frequencies (wavelength above ``original / low_freq_factor``)
by ``factor``, keeps the high ones (below ``original / high_freq_factor``) and blends in between;
``yarn`` ramps between interpolated (``/ factor``) and original frequencies over the dims whose
rotation counts lie between ``beta_slow`` and ``beta_fast`` over the original context, and scales
cos and sin by the attention factor ``0.1 ln(factor) + 1``.
"""

from __future__ import annotations

import math

from isthmus.models.decoder_lm.config import DecoderConfig, RopeType


def inverse_frequencies(c: DecoderConfig) -> list[float]:
    """``rotary_dim / 2`` frequencies in radians per position."""
    dim = c.rotary_dim
    base = [1.0 / (c.rope_theta ** (i / dim)) for i in range(0, dim, 2)]
    if c.rope_type == RopeType.default:
        return base
    if c.rope_type == RopeType.linear:
        return [f / c.rope_factor for f in base]
    original = float(c.rope_original_max_position_embeddings or c.max_position_embeddings)
    if c.rope_type == RopeType.llama3:
        low_wavelength = original / c.rope_low_freq_factor
        high_wavelength = original / c.rope_high_freq_factor
        scaled = []
        for f in base:
            wavelength = 2 * math.pi / f
            if wavelength < high_wavelength:
                scaled.append(f)
            elif wavelength > low_wavelength:
                scaled.append(f / c.rope_factor)
            else:
                smooth = (original / wavelength - c.rope_low_freq_factor) / (
                    c.rope_high_freq_factor - c.rope_low_freq_factor)
                scaled.append((1 - smooth) * f / c.rope_factor + smooth * f)
        return scaled
    low, high = _yarn_range(c, dim, original)
    if low == high:
        high += 0.001  # a one-dim ramp would divide by zero
    scaled = []
    for i, f in enumerate(base):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        keep = 1.0 - ramp  # share of the original (extrapolated) frequency
        scaled.append((f / c.rope_factor) * (1 - keep) + f * keep)
    return scaled


def _yarn_range(c: DecoderConfig, dim: int, original: float) -> tuple[float, float]:
    def dim_for(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(c.rope_theta))

    low, high = dim_for(c.rope_beta_fast), dim_for(c.rope_beta_slow)
    if c.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def attention_factor(c: DecoderConfig) -> float:
    """What cos and sin are multiplied by: 1 except for YaRN."""
    if c.rope_type != RopeType.yarn:
        return 1.0
    if c.rope_attention_factor is not None:
        return c.rope_attention_factor
    return 1.0 if c.rope_factor <= 1 else 0.1 * math.log(c.rope_factor) + 1.0


__all__ = ["attention_factor", "inverse_frequencies"]
