"""Cold-start cost: `isthmus backends` and `import isthmus.cli.main` against `import torch`, one run.

Prints each median wall time over N fresh interpreters and the ratio to `import torch`, checks that
neither isthmus command imported an engine, and writes bench/results/coldstart.json.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

RUNS = 7
TARGET_BACKENDS_S = 0.5

PROBES = {
    "isthmus backends": [sys.executable, "-m", "isthmus.cli", "backends"],
    "import isthmus.cli.main": [sys.executable, "-c", "import isthmus.cli.main"],
    "import torch": [sys.executable, "-c", "import torch"],
    "python -c pass": [sys.executable, "-c", "pass"],
}

ENGINE_CHECK = (
    "import sys; from isthmus.cli.main import main; main(['backends']); main(['plugins']);"
    "print(sorted(m for m in ('torch', 'mindspore', 'torch_npu', 'onnxruntime') if m in sys.modules))"
)


def median_seconds(command: list[str]) -> float:
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    results = {name: median_seconds(cmd) for name, cmd in PROBES.items()}
    engines = subprocess.run([sys.executable, "-c", ENGINE_CHECK], check=True, capture_output=True, text=True)
    imported = engines.stdout.strip().splitlines()[-1]
    torch_time = results["import torch"]
    print(f"median of {RUNS} fresh interpreters each")
    for name, seconds in results.items():
        print(f"  {name:<20} {seconds * 1000:8.1f} ms   {seconds / torch_time:5.2f} x import torch")
    print(f"engines imported by `isthmus backends` + `isthmus plugins`: {imported}")
    ok = results["isthmus backends"] < TARGET_BACKENDS_S and imported == "[]"
    print(f"target: isthmus backends < {TARGET_BACKENDS_S} s and no engine imported -> {'met' if ok else 'MISSED'}")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "coldstart.json").write_text(
        json.dumps({"runs": RUNS, "median_s": results, "engines_imported": imported, "target_met": ok}, indent=2)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
