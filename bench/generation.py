"""Greedy generation speed of the decoder family, with and without the KV cache (tokens/s).

A Llama-preset decoder of seeded random weights continues a prompt on each backend asked for:
with the cache (one prefill step, then one token per step against the static cache) and without
it (the whole prefix rerun every step). Both must give the same tokens; the median of the rounds
is reported per backend.

    python bench/generation.py [--backends cpu,cpu:mindspore --new-tokens 96 --rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> int:
    from common import machine, write_result

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="cpu", help="comma-separated BACKEND[:ENGINE] labels")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="compute threads (1: steadier on a shared machine)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "generation.json")
    args = p.parse_args()

    from isthmus.models.decoder_lm.generation import generate
    from isthmus.models.decoder_lm.model import DecoderLM
    from isthmus.nn.params import initialise
    from isthmus.registry.manager import load_plugins
    from isthmus.train.restore import build_label

    registry = load_plugins(autoload=False)[1]
    section = {"name": "llama", "vocab_size": 258, "hidden_size": args.hidden, "intermediate_size": args.hidden * 11 // 4,
               "num_hidden_layers": args.layers, "num_attention_heads": args.hidden // 32,
               "num_key_value_heads": max(1, args.hidden // 128)}
    model = DecoderLM(section)
    weights = initialise(model.param_specs(), 0)
    prompt = np.random.default_rng(0).integers(0, 258, size=(args.batch, args.prompt))
    rows = []
    for label in [b.strip() for b in args.backends.split(",") if b.strip()]:
        backend = build_label(registry, label, {"threads": args.threads})
        params = {n: backend.engine.asarray(a) for n, a in weights.items()}
        result = {"backend": label, "engine": backend.engine_name}
        tokens = {}
        for cached in (True, False):
            generate(model, backend, params, prompt, 4, use_cache=cached)  # warm-up
            times = []
            for _ in range(args.rounds):
                start = time.perf_counter()
                tokens[cached] = generate(model, backend, params, prompt, args.new_tokens, use_cache=cached)
                times.append(time.perf_counter() - start)
            speed = args.batch * args.new_tokens / statistics.median(times)
            result["cached_tokens_per_s" if cached else "uncached_tokens_per_s"] = speed
        result["same_tokens"] = bool(np.array_equal(tokens[True], tokens[False]))
        result["speedup"] = result["cached_tokens_per_s"] / result["uncached_tokens_per_s"]
        print(f"{label} ({backend.engine_name}): with cache {result['cached_tokens_per_s']:.1f} tokens/s, without "
              f"{result['uncached_tokens_per_s']:.1f} tokens/s ({result['speedup']:.2f}x); same tokens: "
              f"{result['same_tokens']}")
        rows.append(result)
    versions = {}
    for dist in ("torch", "mindspore"):
        try:
            from importlib import metadata

            versions[dist] = metadata.version(dist)
        except Exception:
            pass
    write_result(args.out, {"benchmark": "generation", "model": {**section, "parameters": int(
        sum(np.prod(s.shape) for s in model.param_specs().values()))},
        "settings": {"prompt": args.prompt, "new_tokens": args.new_tokens, "batch": args.batch,
                     "rounds": args.rounds, "threads": args.threads},
        "results": rows, "machine": machine(os.getloadavg(), **versions)})
    return 0 if all(r["same_tokens"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
