"""The first divergent layer and op of a compared bundle, forward and backward, and what the dump
recorded at or before it (fallbacks, down-casts, host ops).

Forward records are walked in call order, backward records in backward order (the reverse of the
calls), and the first one beyond the noise floor is the divergence; its *path* lists the layers
it sits in, outermost first, down to the op. The per-op replay's culprit, when the bundle has one,
is the op whose own output (forward) or VJP (backward) is wrong, which is what to fix.
"""

from __future__ import annotations

from typing import Any


def layer_path(layer: str, known: set[str]) -> list[str]:
    """``layer`` and those of its dotted prefixes that are layers of the model, outermost first."""
    parts = layer.split(".") if layer else []
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return [p for p in prefixes if p in known or p == layer]


def _describe(direction: str, op_verdict: Any, layer_verdict: Any, target: Any, known: set[str]) -> dict[str, Any]:
    lead = op_verdict or layer_verdict
    call = lead.call
    path = layer_path(lead.layer, known)
    if op_verdict is not None:
        path.append(op_verdict.name)
    context = [e for e in target.events if e["call"] <= call]
    return {
        "direction": direction, "call": call, "op": lead.op, "layer": lead.layer,
        "op_record": op_verdict.name if op_verdict is not None else "",
        "layer_record": layer_verdict.name if layer_verdict is not None else "",
        "ratio": lead.ratio, "error": lead.error, "floor": lead.floor, "path": path,
        "events": context[:50], "events_total": len(context),
    }


def first_divergence(target: Any) -> dict[str, Any]:
    """``{"forward": ..., "backward": ..., "replay_forward": ..., "replay_backward": ...}`` (each
    present only when found): see the module docstring."""
    known = {v.layer for v in target.forward + target.backward if v.layer}
    known |= {v.name.split("@")[0] for v in target.forward if v.kind == "layer"}
    found: dict[str, Any] = {}
    forward = sorted(target.forward, key=lambda v: (v.call, v.kind != "op"))
    op_bad = next((v for v in forward if v.kind == "op" and v.breach), None)
    layer_bad = next((v for v in forward if v.kind == "layer" and v.breach), None)
    if op_bad is not None or layer_bad is not None:
        found["forward"] = _describe("forward", op_bad, layer_bad, target, known)
    backward = sorted(target.backward, key=lambda v: -v.call)
    bad = next((v for v in backward if v.breach), None)
    if bad is not None:
        found["backward"] = _describe("backward", bad if "/" in bad.name or ":" in bad.name else None,
                                      None if "/" in bad.name or ":" in bad.name else bad, target, known)
    for key in ("forward", "backward"):
        culprit = (target.replay or {}).get(f"first_{key}")
        if culprit:
            context = [e for e in target.events if e["call"] <= culprit["call"]]
            found[f"replay_{key}"] = {**culprit, "path": layer_path(culprit["layer"], known) + [culprit["name"]],
                                      "events": context[:50], "events_total": len(context)}
    return found


def describe_first(found: dict[str, Any], key: str) -> str:
    """A sentence for one entry of :func:`first_divergence`."""
    entry = found.get(key)
    if not entry:
        return ""
    path = " > ".join(entry["path"]) or "(top of the model)"
    if key.startswith("replay"):
        what = "output" if key == "replay_forward" else "vector-Jacobian product"
        return (f"replay: {entry['op']} is the first op whose own {what} disagrees with float64 "
                f"({entry['ratio']:.3g}x its tolerance), call #{entry['call']} at {entry.get('where', '')}; path {path}")
    lead = entry["op_record"] or entry["layer_record"]
    text = (f"first divergent {entry['direction']} record: {lead} ({entry['ratio']:.3g}x its floor); "
            f"layer {entry['layer'] or '(top)'}, op {entry['op']}; path {path}")
    if entry["layer_record"] and entry["op_record"]:
        text += f"; first divergent layer record: {entry['layer_record']}"
    return text


def describe_events(entry: dict[str, Any], limit: int = 5) -> str:
    """The fallbacks, down-casts and host ops recorded at or before a divergence."""
    events = entry.get("events") or []
    if not events:
        return "no fallback, down-cast or host op recorded at or before it"
    shown = "; ".join(f"{e['kind']} at {e['name']}: {e['detail']}" for e in events[:limit])
    more = entry.get("events_total", len(events)) - min(limit, len(events))
    return f"recorded at or before it: {shown}" + (f" (and {more} more)" if more > 0 else "")


__all__ = ["describe_events", "describe_first", "first_divergence", "layer_path"]
