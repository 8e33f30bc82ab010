"""Follow a README section the way a new user would: in a copy of the repository, in a fresh
virtual environment, run the shell block that follows ``<!-- follow: NAME -->``, line by line, and
stop at the first failing line.

    python examples/follow_readme.py [--jobs N] README.md add-your-model [add-your-backend ...]

Each section gets its own copy and its own environment, so nothing one leaves helps another. The
sections run side by side, N at a time (default: one per CPU core); each one's transcript is printed
whole when it ends. Exit code 0 when every section ran to its end.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MARKER = re.compile(r"<!-- follow: ([\w-]+) -->\s*```(?:sh|bash)\n(.*?)```", re.S)


def blocks(readme: Path) -> dict[str, str]:
    """Section name -> its shell block."""
    return {name: body for name, body in MARKER.findall(readme.read_text(encoding="utf-8"))}


def copy_repository(source: Path, target: Path) -> None:
    """The tracked and untracked-but-not-ignored files, as a fresh clone would have them."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=source, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    for name in listed:
        if (source / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, target / name)


def follow(root: Path, name: str, script: str) -> tuple[int, str]:
    """Run one section; its exit code and its transcript (the block, then what the shell printed)."""
    with tempfile.TemporaryDirectory(prefix=f"follow-{name}-") as scratch:
        repo, venv = Path(scratch) / "repo", Path(scratch) / "venv"
        copy_repository(root, repo)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(venv),
               "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        env.pop("PYTHONPATH", None)
        started = time.perf_counter()
        transcript = [f"[{name}] $ {line}" for line in script.splitlines()]
        # One shell for the whole block, so `cd` carries over; -x echoes each command, -e stops at a failure.
        done = subprocess.run(["bash", "-e", "-x", "-c", script], cwd=repo, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, errors="replace")
        took = time.perf_counter() - started
        verdict = "ran to its end" if done.returncode == 0 else f"FAILED (exit {done.returncode})"
        transcript += [done.stdout.rstrip("\n"),
                       f"[{name}] {verdict} in {took:.0f} s, in a fresh venv and a copy of the repository"]
        return done.returncode, "\n".join(transcript)


def main(argv: list[str]) -> int:
    jobs = os.cpu_count() or 1
    if argv[:1] == ["--jobs"] and len(argv) > 1 and argv[1].isdigit() and int(argv[1]) > 0:
        jobs, argv = int(argv[1]), argv[2:]
    if len(argv) < 2 or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    readme = Path(argv[0]).resolve()
    found = blocks(readme)
    missing = [name for name in argv[1:] if name not in found]
    if missing:
        print(f"{readme}: no section {', '.join(missing)}; found: {', '.join(found) or 'none'}", file=sys.stderr)
        return 2
    root = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=readme.parent, capture_output=True,
                               text=True, check=True).stdout.strip())
    names = list(dict.fromkeys(argv[1:]))
    failed = []
    with ThreadPoolExecutor(max_workers=min(jobs, len(names))) as pool:
        runs = {name: pool.submit(follow, root, name, found[name]) for name in names}
        for name, run in runs.items():
            code, transcript = run.result()
            print(transcript, flush=True)
            if code:
                failed.append(name)
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
