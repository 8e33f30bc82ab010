"""``isthmus caption``: the captioner's own command, contributed through ``register_commands``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="PATH")
    parser.add_argument("--image", required=True, metavar="FILE")
    from isthmus.cli.main import add_config_arguments

    add_config_arguments(parser, "backend overrides, e.g. backend=cpu")


def run(args: argparse.Namespace) -> int:
    """Print the greedy caption of one image."""
    import numpy as np

    from isthmus.cli.run import checkpoint_run
    from isthmus.config import ConfigError
    from isthmus.data import DataError, load_image, normalise_pixels

    run_, params, loaded = checkpoint_run(args.checkpoint, args.overrides, config_files=args.config_files)
    model: Any = run_.model
    if model.task != "captioning":
        raise ConfigError(f"--checkpoint {loaded.path} holds {model.name}, which does not caption images; "
                          f"caption needs a captioning checkpoint")
    image_path = Path(args.image)
    if not image_path.is_file():
        raise DataError(f"--image {image_path}: no such file")
    try:
        pixels = load_image(image_path, int(model.config.image_size))
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"--image {image_path}: not a readable image ({' '.join(str(err).split())})") from None
    images = normalise_pixels(np.moveaxis(pixels, -1, 0)[None])
    k, engine = run_.backend.kernels, run_.backend.engine
    with engine.no_grad():
        ids = engine.to_numpy(model.generate(k, params, {"images": engine.asarray(images)}, run_.data.eval.max_len))
    print(model.tokenizer.decode([int(t) for t in ids[0]]))
    return 0


__all__ = ["configure", "run"]
