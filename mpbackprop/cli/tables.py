"""The text the commands print: aligned tables and the summaries of compile, inspect, verify and analyze.

Pure functions from results (summaries, reports, JSON documents) to lines; :mod:`mpbackprop.cli`
echoes them. The evaluation report's table is :func:`mpbackprop.evaluation.format_report`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["shape_text", "format_table", "edge_breakdown", "compile_lines", "inspect_lines", "verify_lines",
           "analyze_lines"]


def shape_text(shape: Any) -> str:
    """``1x8x8`` (``scalar`` for no axes)."""
    return "x".join(str(s) for s in shape) if len(shape) else "scalar"


def edge_breakdown(summary: dict[str, Any]) -> tuple[int, int, int, int, int]:
    """Edges: total, edge types, weight uses, bias and fixed edges (forward types; reverses counted in the total)."""
    total = uses = bias = fixed = 0
    for key, count in summary["num_edges"].items():
        total += count
        etype = key.split(":")[1]
        if etype.endswith("_rev"):
            continue
        if etype.startswith("in_"):
            uses += count
        elif etype.startswith("bias_"):
            bias += count
        elif etype.startswith("fixed_"):
            fixed += count
    return total, len(summary["num_edges"]), uses, bias, fixed


def format_table(headers: list[str], rows: list[list[Any]], right: set[int] | None = None) -> list[str]:
    """Rows of an aligned text table (columns in ``right`` right-aligned)."""
    right = right or set()
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[k]) for r in cells) for k in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if k in right else c.ljust(w) for k, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(parts).rstrip())
    return lines


_ETYPE_RANK = {"in": 0, "out": 1, "bias": 2, "fixed": 3}


def _etype_order(item: tuple[str, int]) -> tuple[Any, ...]:
    """Sort ``src:etype:dst`` keys by layer, then in/out/bias/fixed, forward before reverse."""
    etype = item[0].split(":")[1]
    parts = etype.split("_")
    rev = parts[-1] == "rev"
    if rev:
        parts = parts[:-1]
    layer = int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else -1
    return (layer, _ETYPE_RANK.get(parts[0], 9), rev, item[0])


def inspect_lines(summary: dict[str, Any], path: str = "") -> list[str]:
    """The text ``mpbackprop inspect`` prints for a ``CompiledNetwork.summary()``."""
    layers = summary["layers"]
    out = []
    if path:
        out.append(f"file: {path}")
    output = layers[summary["output_layer"]]
    out.append(f"input shape: {shape_text(summary['input_shape'])}   output: layer {summary['output_layer']} "
               f"({output['name']}), shape {shape_text(output['shape'])}")
    out.append("")
    out.append("nodes:")
    out += ["  " + ln for ln in format_table(
        ["type", "count"], [[k, v] for k, v in summary["num_nodes"].items()], right={1})]
    out.append("")
    out.append("edges:")
    edge_rows = [[k, v] for k, v in sorted(summary["num_edges"].items(), key=_etype_order)]
    edge_rows.append(["total", sum(summary["num_edges"].values())])
    out += ["  " + ln for ln in format_table(["canonical edge type", "count"], edge_rows, right={1})]
    out.append("")
    out.append("layers:")
    frozen = any(d.get("frozen", 0) for d in layers)  # a column only when something is frozen
    headers = ["index", "name", "kind", "shape", "neurons", "params", *(["frozen"] if frozen else []),
               "activation", "inputs", "uses"]
    rows = [[d["index"], d["name"], d["kind"], shape_text(d["shape"]), d["neurons"], d["params"],
             *([d.get("frozen", 0)] if frozen else []), d["activation"], ",".join(map(str, d["inputs"])) or "-",
             d["uses"]] for d in layers]
    rows.append(["", "total", "", "", sum(d["neurons"] for d in layers), sum(d["params"] for d in layers),
                 *([sum(d.get("frozen", 0) for d in layers)] if frozen else []), "", "",
                 sum(d["uses"] for d in layers)])
    right = {0, 4, 5, 6, 9} if frozen else {0, 4, 5, 8}
    out += ["  " + ln for ln in format_table(headers, rows, right=right)]
    if frozen:
        out.append("")
        out.append(f"frozen: {summary.get('frozen_params', 0)} params (requires_grad=False; training leaves "
                   "them unchanged)")
    return out

def compile_lines(net: Any, model_path: Path, model: Any, out: Path, fmt: str, elapsed: float) -> list[str]:
    """What ``mpbackprop compile`` prints about the network it wrote."""
    total, n_types, uses, bias, fixed = edge_breakdown(net.summary())
    kinds = Counter(layer.kind for layer in net.layers[1:])
    kind_text = ", ".join(f"{k} x{n}" if n > 1 else k for k, n in kinds.items())
    return [f"model: {model_path} ({type(model).__name__}), input {shape_text(net.input_shape)} "
            f"-> output {shape_text(net.output_shape)}",
            f"neurons: {net.num_neurons}",
            f"params: {net.num_params}" + (f" ({net.num_frozen} frozen)" if net.num_frozen else ""),
            f"edges: {total} in {n_types} edge types ({uses} weight uses, {bias} bias, {fixed} fixed; "
            "each with its reverse type)",
            f"layers: {len(net.layers) - 1} ({kind_text})",
            f"compile time: {elapsed:.3f} s",
            f"wrote: {out} ({fmt})"]


def verify_lines(report: Any, model_path: Path, rule: str, dtype: str, batch: int) -> list[str]:
    """What ``mpbackprop verify`` prints for a :class:`~mpbackprop.evaluation.verify.VerifyReport`."""
    lines = [f"{model_path}: rule {rule}, {dtype}, batch {batch}, loss {report.loss}"]
    frozen = report.frozen_params > 0
    rows = [[r["layer"], r["name"], r["kind"], r["params"], *([r["frozen"]] if frozen else []),
             f"{r['max_abs_err']:.3e}", f"{r['max_rel_err']:.3e}", "ok" if r["ok"] else "FAIL"]
            for r in report.layers]
    headers = ["layer", "name", "kind", "params", *(["frozen"] if frozen else []), "max abs err", "max rel err", ""]
    lines += ["  " + line for line in format_table(headers, rows, right={0, 3, 4, 5, 6} if frozen else {0, 3, 4, 5})]
    verdict = "OK" if report.ok else "FAILED"
    lines.append(f"{verdict}: max abs error {report.max_abs_err:.3e}, max relative error {report.max_rel_err:.3e}")
    return lines


def analyze_lines(doc: dict[str, Any], steps: int) -> list[str]:
    """What ``mpbackprop analyze`` prints for :func:`mpbackprop.evaluation.analysis.report`'s document."""
    lines = []
    for r in doc["rules"]:
        lines.append(f"{r['rule']}: validation loss {r['val_loss'][-1]:.4f} after {steps} steps "
                     f"(tuned Adam {doc['adam_val_loss'][-1]:.4f})")
        rows = []
        for layer in r["layers"]:
            k = max(1, steps // 10)
            first = sum(layer["cos_to_grad"][:k]) / k
            last = sum(layer["cos_to_grad"][-k:]) / k
            rows.append([layer["index"], layer["name"], f"{first:.3f}", f"{last:.3f}",
                         f"{sum(layer['norm_ratio'][-k:]) / k:.3f}", f"{sum(layer['sign_agreement'][-k:]) / k:.3f}"])
        lines += ["  " + line for line in format_table(["layer", "name", "cos start", "cos end", "norm ratio",
                                                          "sign agree"], rows, right={0, 2, 3, 4, 5})]
    return lines
