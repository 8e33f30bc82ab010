"""``isthmus generate`` for a GLM-Image DiT checkpoint: prompt tokens -> prior image tokens -> DiT
over latents with the flow-matching sampler -> latents.

The prior tokens come from a generator checkpoint (GLM-Image's autoregressive stage: a model whose task
is ``text-to-image-tokens``) run greedily on ``--prompt-ids`` (it draws the ``--preview-grid`` first
when given, then the target grid, as GLM-Image's text-to-image pipeline does; the target grid's tokens
are kept), or from ``--prior-tokens FILE.npy``. Either way they are at
the generator's resolution (one token per 2 x 2 DiT patches) and are upsampled twice by nearest
neighbour, as the pipeline does. The glyph (text) embeddings come from ``--text-embeddings FILE.npy``;
without it the DiT reads one zero vector (GLM-Image's glyph encoder, a T5 encoder, is not part of
isthmus). The output is the latents; with ``--vae DIR`` (a diffusers ``AutoencoderKL`` directory, the
pipeline's ``vae``) they are also decoded to pixels (:mod:`isthmus.models.glm_image_dit.vae`) and
written as a PNG, the images side by side.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

AR_TASK = "text-to-image-tokens"  # what a generator checkpoint's model must do
VAE_MISSING = ("the VAE stage is missing: no --vae was given, so these are latents, not pixels (pass --vae DIR, a "
               "diffusers AutoencoderKL directory, to decode them)")


def configure(s: argparse.ArgumentParser) -> None:
    s.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a glm-image-dit run or checkpoint directory, or a diffusers transformer directory")
    prior = s.add_mutually_exclusive_group(required=True)
    prior.add_argument("--ar-checkpoint", metavar="PATH", help="a generator checkpoint (GLM-Image's autoregressive stage) that draws the prior tokens")
    prior.add_argument("--prior-tokens", metavar="FILE.npy",
                       help="prior tokens at the generator's resolution, (rows * cols) or (count, rows * cols)")
    s.add_argument("--prompt-ids", metavar="IDS", help="with --ar-checkpoint: the prompt's token ids, ending with "
                                                       "the image start token, comma-separated")
    s.add_argument("--preview-grid", metavar="RxC", help="with --ar-checkpoint: a preview grid drawn first")
    s.add_argument("--text-embeddings", metavar="FILE.npy", help="glyph embeddings (T, text_embed_dim)")
    s.add_argument("--negative-text-embeddings", metavar="FILE.npy",
                   help="the unconditional glyph embeddings for guidance (default: zeros like --text-embeddings)")
    s.add_argument("--height", type=int, default=256, help="image height in pixels")
    s.add_argument("--width", type=int, default=256, help="image width in pixels")
    s.add_argument("--vae-scale-factor", type=int, default=8, help="pixels per latent pixel")
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--guidance-scale", type=float, default=1.5, help="classifier-free guidance; 1: none")
    s.add_argument("--scheduler-config", metavar="FILE.json",
                   help="a diffusers scheduler_config.json (default: dynamic shifting, linear time shift, base shift "
                        "0.25, max shift 0.75 over 256 tokens)")
    s.add_argument("--count", type=int, default=1, help="images per prompt")
    s.add_argument("--seed", type=int, default=0, help="the initial noise")
    s.add_argument("--out", default="latents.npy", metavar="FILE.npy", help="where the latents go")
    s.add_argument("--vae", metavar="DIR", help="a diffusers AutoencoderKL directory: decode the latents to pixels")
    s.add_argument("--image", metavar="FILE.png", help="with --vae: where the images go (default: --out as .png)")
    from isthmus.cli.main import add_config_arguments

    add_config_arguments(s, "backend overrides, e.g. backend=cpu")


def token_grid(args: argparse.Namespace, model: Any) -> tuple[int, int]:
    """``(rows, cols)`` of the generator's grid for the requested image size."""
    from isthmus.config import ConfigError

    unit = args.vae_scale_factor * model.config.patch_size * 2
    for key, value in (("--height", args.height), ("--width", args.width)):
        if value < unit or value % unit:
            raise ConfigError(f"{key} {value}: must be a positive multiple of {unit} (vae scale factor "
                              f"{args.vae_scale_factor} x patch {model.config.patch_size} x 2)")
    return args.height // unit, args.width // unit


def load_array(path: str, flag: str) -> np.ndarray:
    from isthmus.config import ConfigError

    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{flag} {path}: not a readable .npy file ({' '.join(str(err).split())[:120]})") from None


def ar_tokens(args: argparse.Namespace, rows: int, cols: int) -> np.ndarray:
    """``(count, rows * cols)`` prior tokens drawn greedily by the generator checkpoint (a model whose
    task is ``text-to-image-tokens``: its ``generate`` takes the grids to draw)."""
    from isthmus.cli.run import checkpoint_run
    from isthmus.config import ConfigError
    from isthmus.models.decoder_lm.commands import prompt_ids

    if args.prompt_ids is None:
        raise ConfigError("--ar-checkpoint needs --prompt-ids (the prompt ending with the image start token)")
    grids = [(rows, cols)]
    if args.preview_grid:
        try:
            preview = tuple(int(v) for v in args.preview_grid.lower().split("x"))
            assert len(preview) == 2 and min(preview) >= 1
        except (ValueError, AssertionError):
            raise ConfigError(f"--preview-grid {args.preview_grid!r}: write ROWSxCOLS, e.g. 4x4") from None
        grids.insert(0, preview)
    run_, params, _ = checkpoint_run(args.ar_checkpoint, args.overrides, config_files=args.config_files)
    model: Any = run_.model
    if model.task != AR_TASK:
        raise ConfigError(f"--ar-checkpoint {args.ar_checkpoint} holds model {model.name}, which does not draw "
                          f"image tokens from text (its task is {model.task or 'not given'!r}, not {AR_TASK!r})")
    ids = prompt_ids(argparse.Namespace(prompt_ids=args.prompt_ids, prompt=None), None, model.config.vocab_size)
    prompt = np.repeat(np.array([ids], dtype=np.int64), args.count, axis=0)
    engine = run_.backend.engine
    with engine.no_grad():
        drawn = model.generate(run_.backend.kernels, params, {"tokens": engine.asarray(prompt)}, grids=grids)
        drawn = np.asarray(engine.to_numpy(drawn), dtype=np.int64)
    return drawn[:, -rows * cols:]


def read_schedule(path: str) -> Any:
    """The sampler's settings from a diffusers ``scheduler_config.json``."""
    import json

    from isthmus.config import ConfigError
    from isthmus.models.glm_image_dit.sampler import schedule_from_config

    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
        assert isinstance(config, dict)
    except (OSError, ValueError, AssertionError):
        raise ConfigError(f"--scheduler-config {path}: not a readable JSON object") from None
    try:
        return schedule_from_config(config)
    except TypeError as err:
        raise ConfigError(f"--scheduler-config {path}: {err}") from None


def upsample(tokens: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Each generator token over its 2 x 2 DiT patches: ``(count, rows * cols)`` to
    ``(count, 4 * rows * cols)``, row-major."""
    grid = tokens.reshape(tokens.shape[0], rows, cols)
    return np.repeat(np.repeat(grid, 2, axis=1), 2, axis=2).reshape(tokens.shape[0], -1)


def run(args: argparse.Namespace) -> int:
    """Write the sampled latents."""
    from isthmus.cli.run import checkpoint_run
    from isthmus.config import ConfigError
    from isthmus.models.glm_image_dit.sampler import sample

    if args.steps < 1 or args.count < 1 or args.vae_scale_factor < 1:
        raise ConfigError("--steps, --count and --vae-scale-factor must be at least 1")
    schedule = read_schedule(args.scheduler_config) if args.scheduler_config else None
    run_, params, _ = checkpoint_run(args.checkpoint, args.overrides, config_files=args.config_files)
    model: Any = run_.model
    c = model.config
    rows, cols = token_grid(args, model)
    if args.prior_tokens is not None:
        tokens = np.asarray(load_array(args.prior_tokens, "--prior-tokens"))
        tokens = tokens[None] if tokens.ndim == 1 else tokens
        if tokens.ndim == 2 and tokens.shape[0] == 1:
            tokens = np.repeat(tokens, args.count, axis=0)
        if tokens.shape != (args.count, rows * cols) or tokens.dtype.kind not in "iu":
            raise ConfigError(f"--prior-tokens {args.prior_tokens}: expected {rows * cols} integer tokens (a "
                              f"{rows}x{cols} grid for {args.height}x{args.width} pixels) per image, got "
                              f"{tokens.dtype} {list(tokens.shape)}")
    else:
        tokens = ar_tokens(args, rows, cols)
    tokens = upsample(np.asarray(tokens, dtype=np.int64), rows, cols)
    if tokens.min() < 0 or tokens.max() >= c.prior_vq_quantizer_codebook_size:
        raise ConfigError(f"prior token {int(tokens.max())} is outside the DiT's codebook "
                          f"(0..{c.prior_vq_quantizer_codebook_size - 1})")
    text = (load_array(args.text_embeddings, "--text-embeddings") if args.text_embeddings
            else np.zeros((1, c.text_embed_dim)))
    negative = (load_array(args.negative_text_embeddings, "--negative-text-embeddings")
                if args.negative_text_embeddings else np.zeros_like(text))
    for flag, array in (("--text-embeddings", text), ("--negative-text-embeddings", negative)):
        if array.ndim != 2 or array.shape[1] != c.text_embed_dim:
            raise ConfigError(f"{flag}: expected (tokens, {c.text_embed_dim}), got {list(array.shape)}")
    latent_rows, latent_cols = args.height // args.vae_scale_factor, args.width // args.vae_scale_factor
    noise = np.random.default_rng(args.seed).standard_normal((args.count, c.in_channels, latent_rows, latent_cols))
    size = np.array([[args.height, args.width]] * args.count, dtype=np.float32)
    host = {"noise": noise.astype(np.float32), "prior_tokens": tokens,
            "text": np.repeat(text[None].astype(np.float32), args.count, axis=0),
            "negative_text": np.repeat(negative[None].astype(np.float32), args.count, axis=0),
            "target_size": size, "crop_coords": np.zeros((args.count, 2), np.float32)}
    engine = run_.backend.engine
    with engine.no_grad():
        latents = sample(model, run_.backend.kernels, params, {key: engine.asarray(v) for key, v in host.items()},
                         steps=args.steps, guidance_scale=args.guidance_scale, schedule=schedule)
        out = np.asarray(engine.to_numpy(latents), dtype=np.float32)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, out)
    print(f"wrote latents {list(out.shape)} to {path} ({args.steps} steps, guidance {args.guidance_scale:g}, "
          f"prior grid {rows}x{cols} upsampled to {2 * rows}x{2 * cols})")
    if args.vae is None:
        print(VAE_MISSING)
        return 0
    image = decode_to_png(args, run_.backend, out)
    print(f"wrote {out.shape[0]} image(s) {image[1]} to {image[0]} (decoded by the VAE in {args.vae})")
    return 0


def decode_to_png(args: argparse.Namespace, backend: Any, latents: np.ndarray) -> tuple[Path, str]:
    """Decode ``latents`` with the ``--vae`` directory on ``backend`` and write them side by side."""
    from PIL import Image

    from isthmus.config import ConfigError
    from isthmus.models.glm_image_dit import vae

    config, weights = vae.read_vae(args.vae)
    if config.latent_channels != latents.shape[1]:
        raise ConfigError(f"--vae {args.vae}: latent_channels {config.latent_channels}, but the DiT makes "
                          f"{latents.shape[1]}")
    engine = backend.engine
    with engine.no_grad():
        pixels = vae.decode(backend.kernels, config, engine.parameters(weights),
                            engine.asarray(vae.denormalise(latents, config)))
        images = vae.to_images(np.asarray(engine.to_numpy(pixels), dtype=np.float32))
    path = Path(args.image) if args.image else Path(args.out).with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    strip = np.concatenate(list(images), axis=1)
    Image.fromarray(strip[..., 0] if strip.shape[-1] == 1 else strip).save(path)
    return path, f"{images.shape[2]}x{images.shape[1]}"


__all__ = ["VAE_MISSING", "configure", "run", "upsample"]
