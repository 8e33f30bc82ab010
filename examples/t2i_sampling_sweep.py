"""Choose tiny-t2i's sampling settings (guidance, temperature, top-k) by the closed loop, on prompts
that are not the held-out split the model is reported on.

    .venv/bin/python examples/t2i_sampling_sweep.py --checkpoint runs/t2i --judge runs/demo

The prompts come from scenes drawn with another data seed (``--data-seed``, default 1), so picking
the best setting here does not tune on the figures ``isthmus eval`` reports.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np

from isthmus.data import make_dataset
from isthmus.models.t2i.evaluate import Judge, match_rates
from isthmus.models.t2i.sampling import text_to_image
from isthmus.registry.manager import get_registry
from isthmus.train.restore import build_label, restore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--judge", required=True)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--data-seed", type=int, default=1)
    parser.add_argument("--guidance", default="1,2,3,5")
    parser.add_argument("--settings", default="1.0:0,1.0:16,0.8:16", help="temperature:top_k pairs")
    args = parser.parse_args()

    registry = get_registry()
    restored = restore(registry, args.checkpoint)
    backend = build_label(registry, "cpu")
    params = {n: backend.engine.asarray(a) for n, a in restored.params.items()}
    judge = Judge(args.judge, backend)
    _, fresh, _ = make_dataset({"num_train": 1, "num_eval": args.prompts, "seed": args.data_seed}, restored.model.tokenizer)
    prompts = fresh.captions
    tokens = restored.model.tokenizer.encode_batch(prompts, restored.data.eval.max_len)
    print(f"{len(prompts)} prompts from data seed {args.data_seed}; the judge reads "
          f"{match_rates(judge.captions(fresh.images), prompts)['closed_loop_match'] * 100:.1f}% "
          f"of their real images")
    pairs = [tuple(p.split(":")) for p in args.settings.split(",")]
    for guidance, (temperature, top_k) in itertools.product([float(g) for g in args.guidance.split(",")], pairs):
        started = time.perf_counter()
        _, images = text_to_image(restored.model, backend, params, tokens, 0, float(temperature), int(top_k),
                                  guidance=guidance)
        rates = match_rates(judge.captions(images), prompts)
        parts = " ".join(f"{k.removeprefix('closed_loop_')} {v * 100:.0f}%" for k, v in rates.items())
        print(f"guidance {guidance:g} temperature {temperature} top-k {top_k}: {parts} "
              f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
