"""``isthmus generate`` for decoder LM checkpoints (llama, qwen2, glm4): continue a prompt.

The checkpoint is an isthmus run or checkpoint directory, or a Hugging Face model directory. The
prompt is text (encoded with the checkpoint's tokenizer) or token ids (``--prompt-ids 1,2,3``).
"""

from __future__ import annotations

import argparse
from typing import Any


def configure(s: argparse.ArgumentParser) -> None:
    s.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="an isthmus run or checkpoint directory, or a Hugging Face model directory")
    prompt = s.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text to continue, encoded with the checkpoint's tokenizer")
    prompt.add_argument("--prompt-ids", metavar="IDS", help="token ids to continue, comma-separated: 1,15,27")
    s.add_argument("--max-new-tokens", type=int, default=32)
    s.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    s.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0: all)")
    s.add_argument("--top-p", type=float, default=1.0, help="keep the likeliest tokens up to this mass (1: all)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-cache", action="store_true", help="rerun the whole prefix each step (no KV cache)")
    s.add_argument("--ids", action="store_true", help="also print the generated token ids")
    from isthmus.cli.main import add_config_arguments

    add_config_arguments(s, "backend overrides, e.g. backend=cpu")


def prompt_ids(args: argparse.Namespace, tokenizer: Any, vocab_size: int) -> list[int]:
    """The prompt as token ids; a bad one is a one-line ``ConfigError``."""
    from isthmus.config import ConfigError

    if args.prompt_ids is not None:
        try:
            ids = [int(part) for part in args.prompt_ids.split(",") if part.strip()]
        except ValueError:
            raise ConfigError(f"--prompt-ids {args.prompt_ids!r}: write integers separated by commas, e.g. 1,15,27") from None
    else:
        if tokenizer is None:
            raise ConfigError("--prompt: this checkpoint has no tokenizer; pass --prompt-ids instead")
        ids = list(tokenizer.encode(args.prompt, specials=False))
        bos = getattr(tokenizer, "bos_id", None)
        ids = ([bos] if bos is not None else []) + ids
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if not ids or bad:
        what = f"id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})" if bad else "the prompt is empty"
        raise ConfigError(f"--prompt{'-ids' if args.prompt_ids is not None else ''}: {what}")
    return ids


def run(args: argparse.Namespace) -> int:
    """Print the continuation of the prompt."""
    import numpy as np

    from isthmus.cli.run import checkpoint_run
    from isthmus.config import ConfigError
    from isthmus.models.decoder_lm.generation import Sampling, generate

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    try:
        sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as err:
        raise ConfigError(f"--temperature/--top-k/--top-p: {err}") from None
    run_, params, loaded = checkpoint_run(args.checkpoint, args.overrides, config_files=args.config_files)
    model: Any = run_.model
    tokenizer = model.tokenizer
    ids = prompt_ids(args, tokenizer, model.config.vocab_size)
    eos = getattr(tokenizer, "eos_id", None)
    out = generate(model, run_.backend, params, np.array([ids]), args.max_new_tokens, sampling,
                   use_cache=not args.no_cache, eos_id=eos)
    row = [int(t) for t in out[0] if t >= 0]
    if eos is not None and eos in row:
        row = row[: row.index(eos)]
    text = tokenizer.decode(row) if tokenizer is not None else " ".join(map(str, row))
    print(text)
    if args.ids:
        print("ids: " + ",".join(map(str, row)))
    return 0


__all__ = ["configure", "prompt_ids", "run"]
