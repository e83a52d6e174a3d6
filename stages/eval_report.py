"""The eval's files: `results.json`, `report.md` (Markdown tables a program can read: one header
row, one row per number) and plots (ASR vs k per judge, false triggers vs bias, midstream
backtrack probability per policy). `compare()` puts several models' results side by side.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from stages.eval_judges import WEAKNESS


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# `decode`: the decoding a number was measured under (`default`, `context=drop`, ...).
COLUMNS = ["model", "decode", "suite", "setting", "metric", "judge", "value", "low", "high", "n"]


def write(out: Path, results: list[dict], meta: dict[str, Any]) -> None:
    """results.json, report.md and plots/ into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({**meta, "results": results}, indent=2, sort_keys=True, default=_json) + "\n"
    )
    (out / "report.md").write_text(report(results, meta))
    plots(out / "plots", results)


def _json(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else str(v)


def report(results: list[dict], meta: dict[str, Any]) -> str:
    lines = [f"# retrace eval: {meta['model']}", ""]
    lines += [f"- model source: `{meta['source']}`", f"- suites: {', '.join(meta['suites'])}"]
    lines.append(f"- judges (the first decides headline ASR): {', '.join(meta['judges'])}")
    for kind, note in WEAKNESS.items():
        if any(j.split(":")[0] == kind for j in meta["judges"]):
            lines.append(f"  - `{kind}`: {note}")
    if meta.get("baseline"):
        lines.append(
            "- **baseline**: this model has no control tokens, so its backtrack, reset and false-"
            "trigger rates are 0 by construction, not by measurement (and benign's bias sweep "
            "runs bias 0 only: there is no token to bias)"
        )
    lines.append(f"- decoding (top-level `decode:`): {meta['decode']}")
    for suite, override in meta.get("suite_decode", {}).items():
        lines.append(f"  - {suite}: {override}")
    lines.append(f"- decontamination: {meta['decontamination']}")
    lines.append("- intervals: 95% Wilson score intervals for rates; none for means")
    if meta.get("rejected"):
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(meta["rejected"].items()))
        lines.append(f"- rejected eval rows: {reasons}")
    lines.append("")
    for suite in meta["suites"]:
        rows = [r for r in results if r["suite"].split(":")[0] == suite]
        if not rows:
            continue
        lines += [f"## {suite}", ""]
        if suite == "finetune-attack":
            lines += [objective_table(results, meta["judges"][0]), ""]
        lines += [table(rows, COLUMNS), ""]
    return "\n".join(lines)


def objective_table(results: list[dict], judge: str) -> str:
    """BSAFE's table: one row per model (the original and each fine-tuned copy), the visible ASR
    at each k by the headline judge, and the false-trigger rate with no bias."""
    prefill = [
        r
        for r in results
        if r["metric"] == "asr_visible"
        and r["judge"] == judge
        and r["suite"] in ("prefill", "finetune-attack:prefill")
    ]
    ks = sorted({r["setting"] for r in prefill}, key=lambda s: int(s.split("=")[1]))
    models = list(dict.fromkeys(r["model"] for r in prefill))
    rows = []
    for m in models:
        row = {"model": m, **{f"asr_visible {k}": None for k in ks}, "false_trigger_rate": None}
        for r in prefill:
            if r["model"] == m:
                row[f"asr_visible {r['setting']}"] = r["value"]
        for r in results:
            if (r["model"], r["metric"], r["setting"]) == (m, "false_trigger_rate", "bias=0"):
                row["false_trigger_rate"] = r["value"]
        rows.append(row)
    note = f"ASR by {judge}; each fine-tuned copy is named model+objective."
    return (
        note
        + "\n\n"
        + table(rows, ["model", *(f"asr_visible {k}" for k in ks), "false_trigger_rate"])
    )


def parse_table(text: str) -> list[dict[str, str]]:
    """Rows of the first Markdown table in `text` (the inverse of `table`, values as strings)."""
    rows, header = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            if header is not None and rows:
                break
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif not set("".join(cells)) <= set("-:"):
            rows.append(dict(zip(header, cells, strict=True)))
    return rows


# --- plots -----------------------------------------------------------------------------------


def _series(results: list[dict], suite: str, metric: str) -> dict[str, list[tuple[float, dict]]]:
    """{label: [(x, row)]} for settings named `k=..` or `bias=..` (no sub-settings)."""
    out: dict[str, list[tuple[float, dict]]] = {}
    for r in results:
        if r["suite"] != suite or r["metric"] != metric or "," in r["setting"]:
            continue
        name, _, x = r["setting"].partition("=")
        if name not in ("k", "bias"):
            continue
        label = f"{r['model']} ({r['judge']})" if r["judge"] else r["model"]
        out.setdefault(label, []).append((float(x), r))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in out.items()}


def _plot(path: Path, series: dict, xlabel: str, ylabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in series.items():
        xs = [x for x, _ in points]
        ys = [r["value"] for _, r in points]
        ax.plot(xs, ys, marker="o", label=label)
        lows = [r["low"] for _, r in points]
        if all(v is not None for v in lows):
            ax.fill_between(xs, lows, [r["high"] for _, r in points], alpha=0.15)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plots(folder: Path, results: list[dict]) -> list[Path]:
    made = []
    suites = sorted({r["suite"] for r in results})
    for suite in [s for s in suites if s.endswith("prefill")]:
        for metric in ("asr_raw", "asr_visible"):
            series = _series(results, suite, metric)
            if series:
                path = folder / f"{suite.replace(':', '-')}_{metric}_vs_k.png"
                _plot(path, series, "prefilled harmful tokens k", metric, f"{suite}: {metric}")
                made.append(path)
    for suite in [s for s in suites if s.endswith("benign")]:
        series = _series(results, suite, "false_trigger_rate")
        if series:
            path = folder / f"{suite.replace(':', '-')}_false_triggers_vs_bias.png"
            _plot(path, series, "logit bias on backtrack tokens", "false-trigger rate", suite)
            made.append(path)
    per_policy = [r for r in results if r["suite"] == "midstream" and r["metric"] == "p_policy"]
    if per_policy:
        made.append(_policy_plot(folder / "midstream_p_backtrack_per_policy.png", per_policy))
    return made


def _policy_plot(path: Path, rows: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["setting"].split(",")[0] for r in rows})
    fig, ax = plt.subplots(figsize=(max(4, len(names)), 4))
    width = 0.4
    for shift, place in ((-width / 2, "span"), (width / 2, "benign")):
        values = []
        for name in names:
            hit = [r for r in rows if r["setting"] == f"{name},after={place}"]
            values.append(hit[0]["value"] if hit else 0.0)
        ax.bar([i + shift for i in range(len(names))], values, width, label=f"after {place}")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("teacher-forced P(policy's backtrack token)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- compare ----------------------------------------------------------------------------------


def _load(folder: Path) -> dict[str, Any]:
    for path in (Path(folder) / "results.json", Path(folder) / "files" / "results.json"):
        if path.is_file():
            return json.loads(path.read_text())
    raise FileNotFoundError(
        f"{folder}: no results.json; pass eval output folders (runs/<run>/eval/<model>)"
    )


def _label(data: dict[str, Any]) -> str:
    decoding = data.get("decode_setting", "default")
    return data["model"] if decoding == "default" else f"{data['model']} [{decoding}]"


def compare(folders: list[Path], out: Path) -> str:
    """One table (rows: suite/setting/metric/judge and, for fine-tuned copies, the objective; a
    column per evaluated folder) and one ASR-vs-k plot. A folder is labelled by its model and,
    unless the default, its decoding (`ctrlE [context=drop]`), or by run/label where two folders
    still share a label (the same model and decoding in two runs)."""
    loaded = [(Path(folder), _load(folder)) for folder in folders]
    names = [_label(d) for _, d in loaded]
    labels = [
        f"{f.resolve().parents[1].name}/{name}" if names.count(name) > 1 else name
        for name, (f, _) in zip(names, loaded, strict=True)
    ]
    merged: dict[tuple, dict[str, Any]] = {}
    relabelled = []
    for label, (_, data) in zip(labels, loaded, strict=True):
        for r in data["results"]:
            variant = r["model"][len(data["model"]) + 1 :] if r["model"] != data["model"] else ""
            key = (r["suite"], variant, r["setting"], r["metric"], r["judge"])
            merged.setdefault(key, {})[label] = r["value"]
            relabelled.append({**r, "model": label if not variant else f"{label}+{variant}"})
    columns = ["suite", "objective", "setting", "metric", "judge"]
    rows = [{**dict(zip(columns, key, strict=True)), **values} for key, values in merged.items()]
    text = table(rows, [*columns, *labels]) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(text)
    series = _series(relabelled, "prefill", "asr_visible")
    if series:
        _plot(
            out / "compare_asr_vs_k.png",
            series,
            "prefilled harmful tokens k",
            "ASR (visible)",
            "prefill: ASR vs k",
        )
    return text
