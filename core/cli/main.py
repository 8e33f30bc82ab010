"""The ``isthmus`` command line. Imports no engine until a command needs one."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence


def table(rows: list[list[str]], header: list[str]) -> str:
    """Plain aligned columns: fast to import, readable in CI logs."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def registry():
    from isthmus.registry.manager import get_registry

    return get_registry()


def compose_config(overrides: Sequence[str], config_files: Sequence[str] = ()):
    """The run config from the user's ``--config`` files and overrides, checked against what the
    plugins registered (names, schemas, each backend's declared options)."""
    from isthmus.train.run import compose_run

    return compose_run(registry(), overrides, config_files=config_files)


def add_config_arguments(parser: argparse.ArgumentParser, overrides_help: str = "key=value or group=option") -> None:
    """``--config FILE`` (repeatable) and the positional overrides, for a command that composes a config."""
    parser.add_argument("--config", action="append", default=[], metavar="FILE", dest="config_files",
                        help="a YAML run config, full or partial, merged over the defaults before the "
                             "overrides; repeat it to layer files (later ones win)")
    parser.add_argument("overrides", nargs="*", help=overrides_help)


def cmd_backends(args: argparse.Namespace) -> int:
    from isthmus.registry.selection import all_status

    rows = all_status(registry())
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return 0
    print(
        table(
            [
                [
                    r.name,
                    ",".join(f"{e}*" if e == r.default_engine else e for e in r.engines),
                    ",".join(r.installed) or "no",
                    "yes" if r.usable else "no",
                    str(r.priority) + ("" if r.auto else " (manual)"),
                    r.reason + (f" -- fix: {r.fix}" if r.fix else ""),
                ]
                for r in rows
            ],
            ["backend", "engines", "installed", "usable", "priority", "reason"],
        )
    )
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from isthmus.registry.selection import all_status

    all_status(registry())  # probes are cheap and bounded: one that misbehaves marks its plugin failed
    records = sorted(registry().plugins.values(), key=lambda r: (r.source != "builtin", r.name))
    if args.json:
        print(json.dumps([r.as_dict() for r in records], indent=2))
        return 0
    print(
        table(
            [[r.name, r.version or "-", r.source, ",".join(h.removeprefix("register_") for h in r.hooks) or "-", r.error or "ok"] for r in records],
            ["plugin", "version", "source", "hooks", "status"],
        )
    )
    return 0


def package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for dist in ("isthmus", "numpy", "torch", "mindspore", "torch_npu", "onnx", "onnxruntime", "pluggy", "omegaconf"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def cmd_doctor(args: argparse.Namespace) -> int:
    import os
    import platform

    from isthmus.registry.selection import build, select

    cfg = compose_config(args.overrides, args.config_files)
    reg = registry()
    print(f"python {platform.python_version()} on {platform.platform()}, {os.cpu_count()} cores")
    print("packages: " + ", ".join(f"{k} {v}" for k, v in package_versions().items()))
    env_keys = ("OMP_NUM_THREADS", "TORCH_DEVICE_BACKEND_AUTOLOAD", "CUDA_VISIBLE_DEVICES", "ASCEND_RT_VISIBLE_DEVICES", "ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME")
    print("environment: " + ", ".join(f"{k}={os.environ.get(k, '(unset)')}" for k in env_keys))
    for name, error in reg.errors().items():
        print(f"plugin {name} failed to load: {error}")
    print()
    cmd_backends(argparse.Namespace(json=False))
    print()
    from isthmus.registry.selection import probe, status

    for spec in reg.backends():
        row = status(reg, spec)
        missing = probe(spec).details.get("missing", []) if row.installed and not row.usable else []
        if missing:
            print(f"{spec.name}: what is missing, and how to fix it")
            for item in missing:
                if isinstance(item, dict):
                    print(f"  - {item.get('what', item)}\n    fix: {item.get('fix', '')}")
                else:
                    print(f"  - {item}")
            print()
    b = cfg.backend
    selection = select(reg, b.name, b.engine, b.strict)
    print(f"selection for backend={b.name}" + (" (strict)" if b.strict else "") + ":")
    for line in selection.trace:
        print(f"  {line}")
    shown = len(selection.trace)
    backend = build(reg, selection, {"device_index": b.device_index, "threads": b.threads, "deterministic": b.deterministic, "options": b.options})
    for line in selection.trace[shown:]:  # what building added, e.g. options left to other backends
        print(f"  {line}")
    print(f"\nready: {backend.name} / {backend.engine_name} on {backend.device}")
    for key, value in {**backend.engine.versions(), **backend.engine.runtime_info()}.items():
        print(f"  {key}: {value}")
    print("  capabilities: " + json.dumps(backend.capabilities.as_dict()))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from isthmus.config.composer import to_yaml

    print(to_yaml(compose_config(args.overrides, args.config_files)), end="")
    return 0


def selected_backend(name: str, engine: str | None):
    from isthmus.registry.selection import build, select

    reg = registry()
    return build(reg, select(reg, name, engine))


def cmd_kernels(args: argparse.Namespace) -> int:
    backend = selected_backend(args.backend, args.engine)
    kernels = backend.kernels
    rows = [[op, kernels.sources[op], kernels.routed.get(op, "-")] for op in kernels]
    if args.json and not args.check:
        print(json.dumps({"backend": backend.name, "engine": backend.engine_name, "ops": {r[0]: {"impl": r[1], "routed_by": r[2]} for r in rows}}, indent=2))
        return 0
    if not args.check:
        print(f"backend {backend.name}, engine {backend.engine_name}, device {backend.device}: {len(rows)} ops")
        print(table(rows, ["op", "implementation", "routed by plugin"]))
        return 0
    return check_kernels(backend, args)


def check_kernels(backend: Any, args: argparse.Namespace) -> int:
    from isthmus.verify.conformance import run_suite
    from isthmus.verify.gradients import run_gradient_suite

    dtypes = [d for d in ("float32", "bfloat16") if d in backend.capabilities.dtypes] or ["float64"]
    ops = [o.strip() for o in args.ops.split(",") if o.strip()] if getattr(args, "ops", None) else None
    if ops:
        from isthmus.errors import IsthmusError
        from isthmus.kernels.interface import OPS

        unknown = [o for o in ops if o not in OPS]
        if unknown:
            raise IsthmusError(f"--ops: unknown op(s) {', '.join(unknown)}; valid: {', '.join(OPS)}")
    results = run_suite(backend.kernels, backend.engine, dtypes=dtypes, ops=ops)
    if backend.capabilities.autodiff:
        results += run_gradient_suite(backend.kernels, backend.engine, dtypes=dtypes, ops=ops)
    by_op: dict[tuple[str, str, str], list[Any]] = {}
    for r in results:
        by_op.setdefault((r.op, r.kind, r.dtype), []).append(r)
    rows, failed = [], []
    for (op, kind, dtype), group in sorted(by_op.items()):
        ran = [r for r in group if not r.skipped_reason]
        bad = [r for r in ran if not r.ok]
        failed += bad
        worst = max((r.max_abs_err for r in ran), default=0.0)
        rows.append([op, kind, dtype, str(len(ran)), f"{worst:.2e}", "FAIL" if bad else ("ok" if ran else "skipped")])
    print(f"kernel conformance of {backend.name}/{backend.engine_name} on {backend.device} against the float64 reference"
          + ("" if backend.capabilities.autodiff else " (forward only: the backend does not differentiate)"))
    print(table(rows, ["op", "check", "dtype", "cases", "max abs err", "result"]))
    for r in failed:
        print(f"FAIL {r.kind} {r.op}/{r.case_name} [{r.dtype}]: {r.message}")
    ran_total = sum(1 for r in results if not r.skipped_reason)
    print(f"{ran_total - len(failed)} passed, {len(failed)} failed"
          + (f" (ops with failures: {', '.join(sorted({r.op for r in failed}))})" if failed else ""))
    return 1 if failed else 0


def parser() -> argparse.ArgumentParser:
    from isthmus import __version__

    from isthmus.cli.args import Parser, harden
    from isthmus.cli.guard import DEBUG_ENV, DEBUG_FLAG

    p = Parser(prog="isthmus", description="Train, export and check one model on any accelerator.")
    p.add_argument("--version", action="version", version=f"isthmus {__version__}")
    p.add_argument(DEBUG_FLAG, action="store_true",
                   help=f"show the traceback of an error instead of one line (also {DEBUG_ENV}=1); may stand anywhere")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("backends", help="list backends: engines, installed, usable, why not")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=cmd_backends)

    s = sub.add_parser("plugins", help="list plugins: version, hooks, load errors")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=cmd_plugins)

    s = sub.add_parser("doctor", help="environment, backend selection trace, and the chosen device")
    add_config_arguments(s, "config overrides, e.g. backend=cpu")
    s.set_defaults(run=cmd_doctor)

    s = sub.add_parser("config", help="configuration commands")
    config_sub = s.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_sub.add_parser("show", help="print the composed config as YAML")
    add_config_arguments(show)
    show.set_defaults(run=cmd_config)

    s = sub.add_parser("kernels", help="which implementation serves each kernel op")
    s.add_argument("--backend", default="auto")
    s.add_argument("--engine", default=None)
    s.add_argument("--check", action="store_true",
                   help="run the conformance suite (forward, optimizer and gradients) against the reference")
    s.add_argument("--ops", default=None, metavar="OP,OP", help="with --check: only these ops")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=cmd_kernels)

    from isthmus.cli.convert import add_commands as add_convert_commands
    from isthmus.cli.bundles import add_commands as add_bundle_commands
    from isthmus.cli.export import add_commands as add_export_commands
    from isthmus.cli.run import add_commands
    from isthmus.cli.selftest import add_commands as add_selftest_commands

    add_commands(sub)
    add_selftest_commands(sub)
    add_export_commands(sub)
    add_convert_commands(sub)
    add_bundle_commands(sub)
    add_plugin_commands(sub)
    harden(p)
    return p


def add_plugin_commands(sub: Any) -> None:
    """The commands models and plugins registered (``register_commands``); a name a built-in
    command already has is left out and the plugin is marked failed, naming the clash."""
    from isthmus.cli.dispatch import add_dispatched

    reg = registry()
    for name in reg.names("command"):
        spec = reg.specs["command"][name]
        shared = reg.dispatched(name)
        if shared and name not in sub.choices:
            add_dispatched(sub, name, shared)
            continue
        if reg.conflict("command", name) or name in sub.choices:
            owner = reg.plugins.get(spec.plugin)
            if owner is not None and not owner.error:
                owner.error = f"register_commands: command '{name}' is already taken"
            continue
        s = sub.add_parser(name, help=spec.help, description=spec.description or None)
        try:
            spec.configure(s)
        except BaseException as exc:  # noqa: BLE001 - a plugin's bug must not take the CLI down
            if isinstance(exc, KeyboardInterrupt):
                raise
            from isthmus.registry.manager import one_line

            owner = reg.plugins.get(spec.plugin)
            if owner is not None and not owner.error:
                owner.error = f"register_commands: configuring command '{name}' raised {one_line(exc)}"
            remove_subcommand(sub, name)
            continue
        s.set_defaults(run=spec.run)


def remove_subcommand(sub: Any, name: str) -> None:
    """Take a half-configured subcommand back out of the parser (argparse has no public way)."""
    sub.choices.pop(name, None)
    sub._choices_actions = [a for a in sub._choices_actions if a.dest != name]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``isthmus`` command; every error ends as one line (see :mod:`isthmus.cli.guard`)."""
    from isthmus.cli.args import argv_or_sys, strip_flag
    from isthmus.cli.guard import DEBUG_FLAG, debug_requested, guarded

    words, flag = strip_flag(argv_or_sys(argv), DEBUG_FLAG)
    debug = flag or debug_requested()
    # The command's name, for messages: the first word until argparse knows better.
    named = {"command": next((w for w in words if not w.startswith("-")), "isthmus")}

    def body() -> int:
        from isthmus.cli.args import keep_overrides_positional

        cli = parser()
        args, extra = cli.parse_known_args(keep_overrides_positional(cli, words))
        named["command"] = " ".join(filter(None, (args.command, getattr(args, "config_command", None))))
        if getattr(args, "dispatch", None):  # a command several models share: its own parser decides
            args.argv, extra = words[words.index(args.dispatch) + 1:], []
        # argparse gives a positional list one stretch of the command line: overrides written after an
        # option (`train a=1 --config f.yaml b=2`) come back here, in order, and belong to the list.
        if extra and isinstance(getattr(args, "overrides", None), list) and not any(e.startswith("-") for e in extra):
            args.overrides.extend(extra)
        elif extra:
            cli.error(f"unrecognized arguments: {' '.join(extra)}")
        return int(args.run(args) or 0)

    return guarded(lambda: named["command"], body, debug)


if __name__ == "__main__":
    sys.exit(main())
