"""``isthmus generate``: tiny-t2i's own command, contributed through ``register_commands``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from isthmus.models.t2i.plugin import NAME


def configure(s: argparse.ArgumentParser) -> None:
    s.add_argument("--checkpoint", required=True, metavar="PATH")
    s.add_argument("--prompt", required=True, help='e.g. "a red circle left of a blue square"')
    s.add_argument("--out", default=None, metavar="FILE.png",
                   help="default: <run dir>/generated/<prompt>-seed<N>.png")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--count", type=int, default=1, help="images side by side, each its own draw")
    s.add_argument("--temperature", type=float, default=None, help="default: the model config's")
    s.add_argument("--top-k", type=int, default=None, help="default: the model config's (0: all codes)")
    s.add_argument("--steps", type=int, default=None, help="denoising steps; default: the model config's")
    s.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (1: none); default: the model config's")
    s.add_argument("--scale", type=int, default=8, help="pixels per image pixel in the PNG")
    from isthmus.cli.main import add_config_arguments

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


def run(args: argparse.Namespace) -> int:
    """Draw ``--count`` images for ``--prompt`` and write them side by side as one PNG."""
    import io

    import numpy as np
    from PIL import Image

    from isthmus.cli.run import checkpoint_run
    from isthmus.config import ConfigError
    from isthmus.models.t2i.sampling import text_to_image
    from isthmus.train.atomic import write_bytes_atomic

    for name, value, low in (("--count", args.count, 1), ("--scale", args.scale, 1), ("--steps", args.steps, 1),
                             ("--top-k", args.top_k, 0), ("--temperature", args.temperature, 0),
                             ("--guidance", args.guidance, 0)):
        if value is not None and value < low:
            raise ConfigError(f"{name} must be at least {low}, got {value}")
    run_, params, loaded = checkpoint_run(args.checkpoint, args.overrides, config_files=args.config_files)
    model: Any = run_.model
    if model.task != "text-to-image":
        raise ConfigError(f"--checkpoint {loaded.path} holds {model.name}, which does not draw images; "
                          f"generate needs a text-to-image checkpoint (model={NAME})")
    tokens = np.repeat(prompt_tokens(model.tokenizer, args.prompt, run_.data.eval.max_len), args.count, axis=0)
    _, images = text_to_image(model, run_.backend, params, tokens, args.seed, args.temperature, args.top_k, args.steps,
                              args.guidance)
    side = images.shape[-1] * args.scale
    sheet = Image.new("RGB", (side * len(images), side))
    for i, image in enumerate(images):
        sheet.paste(Image.fromarray(np.moveaxis(image, 0, -1)).resize((side, side), Image.NEAREST), (i * side, 0))
    run_dir = loaded.path.parent.parent if loaded.path.parent.name == "checkpoints" else loaded.path
    out = Path(args.out) if args.out else run_dir / "generated" / f"{slug(args.prompt)}-seed{args.seed}.png"
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: the file is written as PNG, so its name must end in .png")
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    write_bytes_atomic(out, buffer.getvalue())
    print(f"{args.prompt!r}: {len(images)} image(s) of {images.shape[-1]}x{images.shape[-1]} px (shown x{args.scale}), "
          f"seed {args.seed}, on {run_.backend.name}/{run_.backend.engine_name} -> {out}")
    return 0


__all__ = ["configure", "prompt_tokens", "run", "slug"]
