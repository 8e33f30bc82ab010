"""``isthmus generate``: tiny-t2i's own command, contributed through ``register_commands``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from isthmus.models.t2i.plugin import NAME


MAX_COUNT = 1024  # images per sheet
MAX_SCALE = 64  # PNG pixels per image pixel


def configure(s: argparse.ArgumentParser) -> None:
    from isthmus.cli.args import SEED_MAX, float_range, int_range
    from isthmus.cli.main import add_config_arguments

    s.add_argument("--checkpoint", required=True, metavar="PATH")
    s.add_argument("--prompt", required=True, help='e.g. "a red circle left of a blue square"')
    s.add_argument("--out", default=None, metavar="FILE.png",
                   help="default: <run dir>/generated/<prompt>-seed<N>.png")
    s.add_argument("--seed", type=int_range(0, SEED_MAX), default=0)
    s.add_argument("--count", type=int_range(1, MAX_COUNT), default=1,
                   help=f"images side by side, each its own draw (at most {MAX_COUNT})")
    s.add_argument("--temperature", type=float_range(0, 1e6), default=None, help="default: the model config's")
    s.add_argument("--top-k", type=int_range(0, 2**31 - 1), default=None,
                   help="default: the model config's (0: all codes)")
    s.add_argument("--steps", type=int_range(1, 10_000), default=None,
                   help="denoising steps; default: the model config's")
    s.add_argument("--guidance", type=float_range(0, 1e6), default=None,
                   help="classifier-free guidance scale (1: none); default: the model config's")
    s.add_argument("--scale", type=int_range(1, MAX_SCALE), default=8,
                   help=f"pixels per image pixel in the PNG (at most {MAX_SCALE})")

    add_config_arguments(s, "backend overrides, e.g. backend=cpu")


def prompt_tokens(tokenizer: Any, prompt: str, length: int) -> Any:
    """int64 ``(1, length)`` ids of ``prompt``; a word outside the vocabulary or a prompt that is
    too long is a one-line ``DataError``."""
    from isthmus.data import DataError, split_words

    words = split_words(prompt)
    unknown = [w for w in words if w not in tokenizer.token_to_id]
    if not words or unknown:
        what = f"the word {unknown[0]!r} is not" if unknown else "an empty prompt is not"
        raise DataError(f"--prompt {prompt!r}: {what} in the model's vocabulary; known words: {' '.join(tokenizer.words)}")
    if len(words) + 2 > length:
        raise DataError(f"--prompt {prompt!r}: {len(words)} words, but the model reads at most {length - 2}")
    return tokenizer.encode_batch([prompt], length)


def slug(text: str) -> str:
    return "-".join(text.lower().split())[:80] or "prompt"


def sheet_estimate(image_size: int, channels: int, count: int, scale: int) -> Any:
    """Memory of the images drawn and of the PNG sheet built from them (raw, before compression)."""
    from isthmus.train.budget import Estimate

    side = image_size * scale
    return (Estimate().add("images drawn", count * channels * image_size**2 * 4 * 8)
            .add("image sheet", side * side * count * 3 + side * side * 3))


def run(args: argparse.Namespace) -> int:
    """Draw ``--count`` images for ``--prompt`` and write them side by side as one PNG."""
    import io

    import numpy as np
    from PIL import Image

    from isthmus.cli.outputs import output_file
    from isthmus.cli.run import checkpoint_run
    from isthmus.config import ConfigError
    from isthmus.models.t2i.sampling import text_to_image
    from isthmus.train import budget
    from isthmus.train.atomic import write_bytes_atomic
    from isthmus.train.checkpoint import locate, read_state
    from isthmus.train.restore import run_dir_of

    # The output and the sheet's size are known from the sidecar: checked before anything is built.
    ckpt = locate(args.checkpoint)
    saved = read_state(ckpt).config.get("model", {})
    size, channels = int(saved.get("image_size", 32) or 32), int(saved.get("channels", 3) or 3)
    out = Path(args.out) if args.out else run_dir_of(ckpt) / "generated" / f"{slug(args.prompt)}-seed{args.seed}.png"
    side = size * args.scale
    if side * side * args.count > Image.MAX_IMAGE_PIXELS:  # what Pillow itself would refuse to open
        raise ConfigError(f"--count {args.count} --scale {args.scale}: the sheet would be {side * args.count}x{side} "
                          f"pixels, more than the {Image.MAX_IMAGE_PIXELS} an image viewer built on Pillow opens; "
                          f"lower --count or --scale")
    sheet = sheet_estimate(size, channels, args.count, args.scale)
    out = output_file(out, "--out", need_bytes=sheet.parts["image sheet"] // (args.scale**2) + 2**20,
                      suffixes=(".png",))
    what = f"generate --count {args.count} --scale {args.scale} ({size} px images)"
    budget.check(sheet, what, switch="")
    run_, params, loaded = checkpoint_run(args.checkpoint, args.overrides, config_files=args.config_files)
    model: Any = run_.model
    if model.task != "text-to-image":
        raise ConfigError(f"--checkpoint {loaded.path} holds {model.name}, which does not draw images; "
                          f"generate needs a text-to-image checkpoint (model={NAME})")
    for part, nbytes in budget.model_estimate(model, 2 * args.count, training=False).parts.items():
        sheet.add(part, nbytes)
    budget.check(sheet, what, switch="")
    tokens = np.repeat(prompt_tokens(model.tokenizer, args.prompt, run_.data.eval.max_len), args.count, axis=0)
    _, images = text_to_image(model, run_.backend, params, tokens, args.seed, args.temperature, args.top_k, args.steps,
                              args.guidance)
    side = images.shape[-1] * args.scale
    picture = Image.new("RGB", (side * len(images), side))
    for i, image in enumerate(images):
        picture.paste(Image.fromarray(np.moveaxis(image, 0, -1)).resize((side, side), Image.NEAREST), (i * side, 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    write_bytes_atomic(out, buffer.getvalue())
    print(f"{args.prompt!r}: {len(images)} image(s) of {images.shape[-1]}x{images.shape[-1]} px (shown x{args.scale}), "
          f"seed {args.seed}, on {run_.backend.name}/{run_.backend.engine_name} -> {out}")
    return 0


__all__ = ["MAX_COUNT", "MAX_SCALE", "configure", "prompt_tokens", "run", "sheet_estimate", "slug"]
