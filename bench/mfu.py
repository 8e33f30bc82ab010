"""Training throughput and model FLOPs utilisation (MFU) of a GPT-style model built from core layers.

The model is GPT-2 small in shape (``--preset gpt2-124m``: 12 pre-norm blocks, d 768, 12 heads,
vocabulary 50304, sequence 1024, GELU MLP, learned positions, LM head tied to the token embedding:
124M parameters), written with :mod:`isthmus.nn.layers` only, so it runs on any backend. One step is
what the trainer does: forward + backward through the engine, then isthmus' AdamW through kernels
(the fused route where the backend has one), in bf16 compute over float32 masters where the backend
offers bfloat16 (accelerators; ``--precision`` overrides).

What is reported: tokens/s over the timed steps (after ``--warmup`` untimed ones; each step ends by
reading the loss on the host, which waits for the device), the device name, peak memory where the
engine reports it, and MFU = tokens/s * FLOPs per token / the device's dense peak for the compute
dtype (:data:`PEAK_TFLOPS`, matched by device name). FLOPs per token = 6 N + 12 L d S (N: parameters
without the position table; the second term is attention's QK^T and AV, forward and backward, counted
in full for the causal mask, as in the PaLM paper's appendix B). Without a known peak (CPUs,
unlisted devices) only tokens/s and achieved TFLOPs are printed.

On a CPU backend the default is ``--preset cpu-small`` (2 blocks, d 128, a few steps): it finishes
in seconds and checks the script, not the machine.

    python bench/mfu.py                       # auto backend; gpt2-124m on an accelerator
    python bench/mfu.py --backend cuda --batch-size 16 --steps 30 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

PRESETS_HELP = "gpt2-124m (12 x 768, seq 1024) or cpu-small (2 x 128, seq 128)"


@dataclass(frozen=True)
class Preset:
    """Model shape and run length."""

    n_layers: int
    dim: int
    n_heads: int
    vocab: int
    seq: int
    batch: int
    steps: int
    warmup: int


PRESETS = {
    "gpt2-124m": Preset(n_layers=12, dim=768, n_heads=12, vocab=50304, seq=1024, batch=8, steps=20, warmup=3),
    "cpu-small": Preset(n_layers=2, dim=128, n_heads=4, vocab=512, seq=128, batch=4, steps=5, warmup=1),
}

# Dense (no sparsity) peak TFLOPs per device, from the vendors' datasheets: tensor-core bf16/fp16 with
# float32 accumulation, and plain IEEE float32 (isthmus keeps TF32 off by default). First match wins.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    (r"H100.*(SXM|HBM3)", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),
    (r"H100.*NVL", {"bfloat16": 835.0, "float16": 835.0, "float32": 60.0}),
    (r"H100.*PCIe", {"bfloat16": 756.0, "float16": 756.0, "float32": 51.0}),
    (r"H200", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),
    (r"GH200", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),
    (r"A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}),
    (r"L40S", {"bfloat16": 362.0, "float16": 362.0, "float32": 91.6}),
    (r"\bL4\b", {"bfloat16": 121.0, "float16": 121.0, "float32": 30.3}),
    (r"A10G", {"bfloat16": 70.0, "float16": 70.0, "float32": 31.2}),
    (r"\bA10\b", {"bfloat16": 125.0, "float16": 125.0, "float32": 31.2}),
    (r"RTX 4090", {"bfloat16": 165.2, "float16": 165.2, "float32": 82.6}),
    (r"V100", {"float16": 125.0, "float32": 15.7}),
    (r"\bT4\b", {"float16": 65.0, "float32": 8.1}),
]


def peak_tflops(device_name: str, dtype: str) -> float | None:
    """The dense peak for ``dtype`` on a device whose name matches :data:`PEAK_TFLOPS`, else None."""
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return peaks.get(dtype)
    return None


# ---------------------------------------------------------------------------------------- model
def gpt_specs(p: Preset) -> dict[str, Any]:
    from isthmus.nn.layers import BlockConfig, block_specs, embedding_specs, layer_norm_specs
    from isthmus.nn.params import add_specs

    specs: dict[str, Any] = {}
    add_specs(specs, "wte", embedding_specs(p.vocab, p.dim))
    add_specs(specs, "wpe", embedding_specs(p.seq, p.dim))
    config = BlockConfig(dim=p.dim, n_heads=p.n_heads, out_std=0.02 / math.sqrt(2 * p.n_layers))
    for i in range(p.n_layers):
        add_specs(specs, f"blocks.{i}", block_specs(config))
    add_specs(specs, "ln_f", layer_norm_specs(p.dim))
    return specs


def gpt_loss(k: Any, params: Any, ids: Any, targets: Any, p: Preset) -> Any:
    """Mean next-token cross-entropy of a causal GPT over ``ids`` ``(B, S)``."""
    from isthmus.nn.layers import BlockConfig, block, embedding, layer_norm
    from isthmus.nn.params import Scope

    scope = Scope(params)
    batch, seq = k.shape(ids)
    config = BlockConfig(dim=p.dim, n_heads=p.n_heads)
    x = k.add(embedding(k, scope.sub("wte"), ids), embedding(k, scope.sub("wpe"), k.arange(seq)))
    for i in range(p.n_layers):
        x = block(k, scope.sub(f"blocks.{i}"), x, config, causal=True, training=True)
    x = layer_norm(k, scope.sub("ln_f"), x)
    logits = k.linear(x, scope["wte.weight"])  # head tied to the token embedding
    return k.cross_entropy(k.reshape(logits, (batch * seq, p.vocab)), k.reshape(targets, (batch * seq,)))


def flops_per_token(specs: dict[str, Any], p: Preset) -> tuple[int, float]:
    """``(N, 6 N + 12 L d S)`` with N the parameters without the position table."""
    n = sum(int(np.prod(s.shape)) for name, s in specs.items() if not name.startswith("wpe."))
    return n, 6.0 * n + 12.0 * p.n_layers * p.dim * p.seq


# ---------------------------------------------------------------------------------------- run
def registry_with_cuda() -> Any:
    """The plugin registry, with the cuda plugin added in-process if it is not built in yet."""
    from isthmus.registry.manager import get_registry, load_plugins

    registry = get_registry()
    if "cuda" not in {spec.name for spec in registry.backends()}:
        from isthmus.plugins import cuda

        registry = load_plugins(extra=[("cuda", cuda)])[1]
    return registry


def device_name(backend: Any) -> str:
    info = backend.engine.runtime_info()
    if info.get("device_name"):
        return str(info["device_name"])
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="auto", help="backend name (default: auto)")
    ap.add_argument("--preset", choices=sorted(PRESETS), help=f"{PRESETS_HELP}; default by backend")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                    help="auto: bf16 on an accelerator that has it, else fp32")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--steps", type=int, help="timed steps")
    ap.add_argument("--warmup", type=int, help="untimed steps first")
    ap.add_argument("--compile", action="store_true", help="backend.options.compile=true (cuda)")
    ap.add_argument("--json", type=Path, help="also write the result here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from isthmus.nn.optim import AdamW
    from isthmus.nn.precision import Policy
    from isthmus.registry.selection import build, select

    registry = registry_with_cuda()
    selection = select(registry, args.backend)
    options = {"compile": True} if args.compile else {}
    backend = build(registry, selection, {"deterministic": False, "options": options})
    accelerator = backend.name not in ("cpu", "reference")
    preset = PRESETS[args.preset or ("gpt2-124m" if accelerator else "cpu-small")]
    preset = replace(preset, **{key: value for key, value in (("batch", args.batch_size), ("seq", args.seq_len),
                                                              ("steps", args.steps), ("warmup", args.warmup))
                                if value is not None})
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if accelerator and "bfloat16" in backend.capabilities.dtypes else "fp32"
    policy = Policy(precision)
    k, engine = backend.kernels, backend.engine
    from isthmus.nn.params import initialise

    specs = gpt_specs(preset)
    n_params, per_token = flops_per_token(specs, preset)
    params = engine.parameters(initialise(specs, 0))
    optimizer = AdamW(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    optimizer.init_state(k, params)
    compile_step = getattr(engine, "compile_step", None)
    loss_fn = compile_step(gpt_loss) if compile_step else gpt_loss
    rng = np.random.default_rng(0)
    memory_stats = getattr(engine, "memory_stats", None)

    def step(params: Any) -> tuple[Any, float]:
        tokens = rng.integers(0, preset.vocab, size=(preset.batch, preset.seq + 1), dtype=np.int64)
        ids, targets = engine.asarray(tokens[:, :-1]), engine.asarray(tokens[:, 1:])

        def objective(p: Any) -> tuple[Any, Any]:
            loss = loss_fn(k, policy.cast_params(k, p), ids, targets, preset)
            return loss, loss

        _, loss, grads = engine.value_and_grad(objective, params)
        with engine.no_grad():
            params = optimizer.update(k, params, grads, 3e-4, specs)
        return params, float(engine.to_numpy(loss))

    name = device_name(backend)
    print(f"device: {name} | backend {backend.name}/{backend.engine_name} ({backend.device}) | "
          f"{precision} | {n_params / 1e6:.1f}M params | batch {preset.batch} x seq {preset.seq}", flush=True)
    for _ in range(preset.warmup):
        params, loss = step(params)
    if memory_stats:
        memory_stats()
    started = time.perf_counter()
    for _ in range(preset.steps):
        params, loss = step(params)
    wall = time.perf_counter() - started
    tokens_per_s = preset.steps * preset.batch * preset.seq / wall
    achieved = tokens_per_s * per_token / 1e12
    dtype = policy.compute_dtype
    peak = peak_tflops(name, dtype) if accelerator else None
    result = {
        "device": name,
        "backend": f"{backend.name}/{backend.engine_name}",
        "precision": precision,
        "preset": asdict(preset),
        "params": n_params,
        "flops_per_token": per_token,
        "step_s": wall / preset.steps,
        "tokens_per_s": tokens_per_s,
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "mfu": achieved / peak if peak else None,
        "final_loss": loss,
        "compile": getattr(engine, "compile_status", None),
        "memory": memory_stats() if memory_stats else None,
        "kernels_routed": dict(backend.kernels.routed),
    }
    rate = f"{achieved:.2f} TFLOPs" if achieved >= 1 else f"{achieved * 1e3:.1f} GFLOPs"
    line = f"tokens/s {tokens_per_s:,.0f} | step {1e3 * wall / preset.steps:.1f} ms | {rate} achieved"
    if peak:
        line += f" | MFU {100 * achieved / peak:.1f}% of {peak:g} TFLOPs ({dtype} dense peak)"
    elif accelerator:
        line += f" | MFU: no {dtype} peak known for '{name}' (add it to PEAK_TFLOPS)"
    if result["memory"]:
        line += f" | peak memory {result['memory']['mem_peak_allocated_mib']:.0f} MiB"
    print(line + f" | loss {loss:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
