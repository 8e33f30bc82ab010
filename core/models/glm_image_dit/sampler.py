"""The flow-matching Euler sampler of GLM-Image: diffusers' ``FlowMatchEulerDiscreteScheduler`` with
the timesteps and sigmas ``GlmImagePipeline`` gives it, and the pipeline's classifier-free guidance.

The schedule (host numpy, float32 like diffusers): ``steps`` timesteps ``t_i`` evenly from
``num_train_timesteps`` towards 1, truncated to integers; unshifted sigmas ``t_i / num_train_timesteps``;
shifted by the resolution: with dynamic shifting, ``mu = sqrt(seq_len / base_image_seq_len) *
max_shift + base_shift`` and ``sigma' = mu / (mu + (1 / sigma - 1))`` (linear time shift) or
``e^mu / (e^mu + (1 / sigma - 1))`` (exponential); otherwise ``shift sigma / (1 + (shift - 1) sigma)``;
then a final sigma of 0. Step ``i`` calls the DiT at timestep ``t_i - 1`` and moves the latents by
``(sigma_{i+1} - sigma_i) * v``, where ``v = v_uncond + g (v_cond - v_uncond)`` with guidance
(``g > 1``): the unconditional pass drops every prior token and reads the negative text.

The defaults of :class:`Schedule` are the scheduler settings this module assumes for GLM-Image
(``calculate_shift``'s defaults in the pipeline and the linear shift of the CogView4 family); a
``scheduler_config.json`` read with :func:`schedule_from_config` replaces them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np

from isthmus.errors import IsthmusError

Tensor = Any
SHIFT_TYPES = ("linear", "exponential")


@dataclass(frozen=True)
class Schedule:
    """The ``FlowMatchEulerDiscreteScheduler`` settings the sampler reads."""

    num_train_timesteps: int = 1000
    use_dynamic_shifting: bool = True
    time_shift_type: str = "linear"
    base_shift: float = 0.25
    max_shift: float = 0.75
    base_image_seq_len: int = 256
    shift: float = 1.0

    def __post_init__(self) -> None:
        if self.time_shift_type not in SHIFT_TYPES:
            raise IsthmusError(f"scheduler time_shift_type {self.time_shift_type!r}: valid: {', '.join(SHIFT_TYPES)}")
        if self.num_train_timesteps < 1:
            raise IsthmusError(f"scheduler num_train_timesteps {self.num_train_timesteps}: must be at least 1")


# Scheduler options the sampler does not implement: a config that turns one on is refused.
UNSUPPORTED = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
               "stochastic_sampling")


def schedule_from_config(config: Mapping[str, Any]) -> Schedule:
    """A :class:`Schedule` from a diffusers ``scheduler_config.json`` (its other keys are checked:
    anything that changes the sigmas beyond what this sampler does is refused)."""
    for key in UNSUPPORTED:
        if config.get(key):
            raise IsthmusError(f"scheduler_config.json {key}={config[key]!r} is not supported by the GLM-Image sampler")
    names = {f.name for f in fields(Schedule)}
    return Schedule(**{key: value for key, value in config.items() if key in names})


def mu_for(seq_len: int, schedule: Schedule) -> float:
    """The pipeline's resolution-dependent shift ``mu`` for ``seq_len`` image tokens."""
    return (seq_len / schedule.base_image_seq_len) ** 0.5 * schedule.max_shift + schedule.base_shift


def timesteps_and_sigmas(steps: int, seq_len: int, schedule: Schedule = Schedule()) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``(timesteps (steps,), sigmas (steps + 1,))`` for ``steps`` Euler steps over
    ``seq_len`` image tokens, as ``GlmImagePipeline`` sets its scheduler up."""
    if steps < 1:
        raise IsthmusError(f"steps {steps}: the sampler needs at least 1")
    n = schedule.num_train_timesteps
    timesteps = np.linspace(n, 1.0, steps + 1)[:-1].astype(np.int64).astype(np.float32)
    sigmas = (timesteps / n).astype(np.float32)
    if schedule.use_dynamic_shifting:
        mu = mu_for(seq_len, schedule)
        if schedule.time_shift_type == "linear":
            sigmas = mu / (mu + (1 / sigmas - 1) ** 1.0)
        else:
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
    else:
        sigmas = schedule.shift * sigmas / (1 + (schedule.shift - 1) * sigmas)
    sigmas = np.concatenate([np.asarray(sigmas, dtype=np.float32), np.zeros(1, np.float32)])
    return timesteps, sigmas


def sample(model: Any, k: Any, params: Mapping[str, Any], batch: Mapping[str, Any], steps: int = 50,
           guidance_scale: float = 1.0, schedule: Schedule | None = None) -> Tensor:
    """The latents the DiT denoises from ``batch["noise"]`` ``(B, C, H, W)`` (its dtype is the
    sampler's) in ``steps`` Euler steps, conditioned on ``text``, ``prior_tokens``, ``target_size``
    and ``crop_coords`` (and ``negative_text`` when ``guidance_scale > 1``)."""
    schedule = schedule or Schedule()
    c = model.config
    if c.in_channels != c.out_channels:
        raise IsthmusError(f"model.in_channels ({c.in_channels}) != model.out_channels ({c.out_channels}): the "
                           f"sampler feeds the prediction back as latents, so they must be equal")
    x = batch["noise"]
    dtype = k.dtype(x)
    count, _, height, width = k.shape(x)
    p = c.patch_size
    timesteps, sigmas = timesteps_and_sigmas(steps, (height // p) * (width // p), schedule)
    tokens = batch["prior_tokens"]
    keep, drop = k.zeros(k.shape(tokens), "bool"), k.ones(k.shape(tokens), "bool")
    text = k.cast(batch["text"], dtype)
    guided = guidance_scale > 1.0
    if guided and "negative_text" not in batch:
        raise IsthmusError("guidance_scale > 1 needs negative_text (the unconditional text embeddings) in the batch")
    negative = k.cast(batch["negative_text"], dtype) if guided else None
    size, crop = k.cast(batch["target_size"], dtype), k.cast(batch["crop_coords"], dtype)
    for i in range(steps):
        t = k.full((count,), float(timesteps[i]) - 1.0, "float32")
        v = model.predict(k, params, x, t, text, tokens, keep, size, crop)
        if guided:
            u = model.predict(k, params, x, t, negative, tokens, drop, size, crop)
            v = k.add(u, k.mul(k.sub(v, u), float(guidance_scale)))
        x = k.add(x, k.mul(v, float(sigmas[i + 1] - sigmas[i])))
    return x


__all__ = ["Schedule", "mu_for", "sample", "schedule_from_config", "timesteps_and_sigmas"]
