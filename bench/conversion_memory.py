"""Peak resident memory of `isthmus convert` on a checkpoint of several hundred MB, against the
largest shard it reads (target: at most 1.5x).

A Llama-layout Hugging Face directory of random bfloat16 weights is written first (sharded, as
`save_pretrained` shards), then three conversions run, each in a fresh `isthmus convert` process
whose peak RSS (``ru_maxrss`` from ``wait4``) is read when it exits: Hugging Face -> isthmus (bf16
shards to one float32 file), isthmus -> Hugging Face (back to bf16 shards) and Hugging Face ->
MindSpore (``.ckpt``). The round trip is checked byte for byte on the way.

    python bench/conversion_memory.py [--hidden 1024 --layers 8 --vocab 32000 --shard-mb 100]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
TARGET = 1.5


def write_source(out: Path, hidden: int, layers: int, vocab: int, shard_bytes: int) -> dict:
    """A Llama Hugging Face directory of seeded random bfloat16 weights, written as a stream."""
    from isthmus.interop.hf import expected_shapes, write_hf
    from isthmus.models.decoder_lm.interop import LLAMA
    from isthmus.registry.manager import load_plugins

    registry = load_plugins(autoload=False)[1]
    heads = hidden // 64
    section = LLAMA.model_config({"model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
                                  "intermediate_size": hidden * 11 // 4, "num_hidden_layers": layers,
                                  "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 4)})
    shapes = expected_shapes(registry.model("llama"), section, "bench")

    def chunks(name: str):
        shape = shapes[name]
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        rows = max(1, (8 << 20) // (4 * max(1, int(np.prod(shape[1:])))))
        for first in range(0, shape[0], rows):
            yield (rng.standard_normal((min(rows, shape[0] - first), *shape[1:])) * 0.02).astype(np.float32)

    dtypes = {rule.foreign: "bfloat16" for rule in LLAMA.rules(section)}
    out.mkdir(parents=True)
    write_hf(out, LLAMA, section, chunks, shapes, dtypes, None, shard_bytes)
    return {"parameters": int(sum(np.prod(s) for s in shapes.values())), "hidden": hidden, "layers": layers,
            "vocab": vocab}


def largest(path: Path) -> int:
    return max(p.stat().st_size for p in path.rglob("*") if p.suffix in (".safetensors", ".ckpt"))


def convert(src: Path, to: str, out: Path) -> dict:
    """Run `isthmus convert` in its own process; its peak RSS and wall time."""
    cli = Path(sys.executable).with_name("isthmus")
    start = time.perf_counter()
    process = subprocess.Popen([str(cli), "convert", str(src), "--to", to, "--output", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    stdout, stderr = process.stdout.read().decode(), process.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"isthmus convert {src} --to {to} failed: {stderr.strip()[-400:]}")
    peak = usage.ru_maxrss * 1024  # kilobytes on Linux
    shard = largest(src)
    return {"to": to, "source": src.name, "peak_rss_mb": peak / 2**20, "largest_source_shard_mb": shard / 2**20,
            "ratio": peak / shard, "wall_s": wall, "output_mb": sum(p.stat().st_size for p in out.rglob("*")
                                                                    if p.is_file()) / 2**20,
            "said": stdout.strip()}


def same_tensors(a: Path, b: Path) -> bool:
    """Every tensor of two Hugging Face directories equal in name, dtype, shape and bytes."""
    from isthmus.interop.tensors import SafetensorsFile

    def tensors(path: Path) -> dict:
        found = {}
        for file in sorted(path.glob("*.safetensors")):
            opened = SafetensorsFile(file)
            found.update({name: (opened, info) for name, info in opened.tensors.items()})
        return found

    left, right = tensors(a), tensors(b)
    if left.keys() != right.keys():
        return False
    for name, (file, info) in left.items():
        other, other_info = right[name]
        if (info.shape, info.dtype) != (other_info.shape, other_info.dtype):
            return False
        if any(not np.array_equal(x.view(np.uint16), y.view(np.uint16))
               for x, y in zip(file.chunks(name), other.chunks(name))):
            return False
    return True


def main() -> int:
    from common import machine, write_result

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard-mb", type=int, default=100)
    p.add_argument("--scratch", type=Path, default=None, help="where the checkpoints go (default: a temp dir)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "conversion_memory.json")
    args = p.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="isthmus-convert-", dir=args.scratch))
    try:
        shape = write_source(scratch / "hf", args.hidden, args.layers, args.vocab, args.shard_mb << 20)
        runs = [convert(scratch / "hf", "isthmus", scratch / "isthmus"),
                convert(scratch / "isthmus", "hf", scratch / "hf-back"),
                convert(scratch / "hf", "mindspore", scratch / "mindspore")]
        names = sorted(p.name for p in (scratch / "hf").iterdir())
        same = same_tensors(scratch / "hf", scratch / "hf-back")
        for run in runs:
            print(f"{run['source']} -> {run['to']}: peak RSS {run['peak_rss_mb']:.0f} MiB, largest source shard "
                  f"{run['largest_source_shard_mb']:.0f} MiB: {run['ratio']:.2f}x in {run['wall_s']:.1f} s")
        total = sum(p.stat().st_size for p in (scratch / "hf").iterdir()) / 2**20
        worst = max(r["ratio"] for r in runs)
        print(f"source: {total:.0f} MiB in {len([n for n in names if n.endswith('.safetensors')])} shards; "
              f"round trip byte-identical: {same}; worst ratio {worst:.2f} (target <= {TARGET})")
        write_result(args.out, {"benchmark": "conversion_memory", "model": shape, "source_mb": total,
                                "shard_mb": args.shard_mb, "runs": runs, "round_trip_identical": same,
                                "worst_ratio": worst, "target": TARGET,
                                "machine": machine(os.getloadavg())})
        return 0 if worst <= TARGET and same else 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
