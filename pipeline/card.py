"""The dataset card: rendering from data_cards/card.md.jinja, its plots, and reading it back.

The publish stage computes the numbers; this module turns them into README.md and PNGs, with no
timestamps anywhere, so the same numbers give the same bytes. The card embeds the resolved run
config (what publish's `embedded_config` keeps, and its cache key covers) in a fenced YAML block
after a marker, which `config_from_card` reads back for `retrace run --from-card`; its count
tables carry markers too, which `card_tables` reads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import yaml

CARD_DIR = Path(__file__).resolve().parents[1] / "data_cards"
TEMPLATE = "card.md.jinja"
CONFIG_MARKER = "<!-- retrace:config -->"
_TABLE_MARKER = re.compile(r"^<!-- retrace:table (\w+) -->\s*$")
_CONFIG_BLOCK = re.compile(re.escape(CONFIG_MARKER) + r"\s*\n(`{3,})yaml\n(.*?)\n\1", re.DOTALL)


# --- rendering -------------------------------------------------------------------------------


def fence(text: str) -> str:
    """A backtick fence longer than any backtick run in `text`, so the text cannot close it."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def cell(value: Any) -> str:
    """A value as one Markdown table cell: pipes escaped, newlines as spaces."""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def portable(value: Any, base: Path | None = None) -> Any:
    """`value` (nested dicts/lists too) with every absolute local path made shareable: relative
    to `base` (the working directory) when inside it, else `<local>/<last part>`. The one rule
    for everything published (the card, and the rows' source and model ids): it is pushed to
    the Hub, where a path such as /home/<user>/models/x says nothing useful and leaks the
    machine's layout."""
    if isinstance(value, Mapping):
        return {k: portable(v, base) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [portable(v, base) for v in value]
    if not isinstance(value, str) or "\n" in value or not Path(value).is_absolute():
        return value
    path, base = Path(value), (base or Path.cwd()).resolve()
    if path.resolve().is_relative_to(base):
        return path.resolve().relative_to(base).as_posix()
    return f"<local>/{path.name}"


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(CARD_DIR),
        undefined=jinja2.StrictUndefined,  # a missing number is an error, not an empty cell
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters.update(fence=fence, cell=cell, yaml=dump_yaml)
    return env


def render_card(context: Mapping[str, Any]) -> str:
    """README.md text for the dataset folder from the publish stage's numbers.

    `context` holds what data_cards/card.md.jinja names: header fields, count tables, examples,
    recipe sections, the resolved run config and package versions (see stages/publish.py).
    """
    header = dump_yaml(context["header"])
    block = embed_config(context["run_config"])
    return _env().get_template(TEMPLATE).render(**context, header_yaml=header, config_block=block)


def embed_config(config: Mapping[str, Any]) -> str:
    """The marked, fenced YAML block that carries a run config inside a card."""
    text = dump_yaml(dict(config))
    return f"{CONFIG_MARKER}\n{fence(text)}yaml\n{text}{fence(text)}"


# --- reading back ----------------------------------------------------------------------------


def _card_text(path: Path) -> tuple[Path, str]:
    path = Path(path)
    card = path / "README.md" if path.is_dir() else path
    if not card.is_file():
        raise FileNotFoundError(
            f"no dataset card at {card}; pass a published dataset folder or its README.md"
        )
    return card, card.read_text(encoding="utf-8")


def config_from_card(path: Path) -> dict:
    """The full resolved run config embedded in a card (README.md or its folder)."""
    card, text = _card_text(path)
    found = _CONFIG_BLOCK.search(text)
    if found is None:
        raise KeyError(
            f"{card} has no embedded retrace config (a ```yaml block after {CONFIG_MARKER}); "
            "was it written by `retrace stage publish`?"
        )
    config = yaml.safe_load(found.group(2))
    if not isinstance(config, dict):
        raise KeyError(f"{card}: the embedded retrace config is not a mapping")
    return config


def card_tables(path: Path) -> dict[str, list[dict[str, str]]]:
    """Every marked Markdown table of a card, by name, as rows of {column: cell text}."""
    _, text = _card_text(path)
    tables: dict[str, list[dict[str, str]]] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        marker = _TABLE_MARKER.match(line)
        if not marker:
            continue
        block = []
        for row in lines[i + 1 :]:
            if not row.startswith("|"):
                if block:
                    break
                continue
            block.append(row)
        header = _cells(block[0])
        tables[marker.group(1)] = [dict(zip(header, _cells(r), strict=True)) for r in block[2:]]
    return tables


def _cells(row: str) -> list[str]:
    parts = re.split(r"(?<!\\)\|", row.strip())[1:-1]
    return [p.strip().replace("\\|", "|").replace("\\\\", "\\") for p in parts]


# --- plots -----------------------------------------------------------------------------------


def _figure(width: float = 7.0, height: float = 3.6, nrows: int = 1):
    import matplotlib

    matplotlib.use("Agg")  # files only, no display; a fixed backend keeps the bytes stable
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9})
    return plt, *plt.subplots(nrows, 1, figsize=(width, height), dpi=100)


def _save(plt, fig, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    # No "Software" or date entries: the PNG bytes depend only on the data.
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
    return path.name


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_policy_mix(counts: Mapping[str, Mapping[str, int]], path: Path) -> str:
    """Rows per policy, one stacked bar segment per kind (a row with two policies counts twice)."""
    plt, fig, ax = _figure()
    policies = sorted({p for per_kind in counts.values() for p in per_kind})
    if not policies:
        _empty(ax, "no policy-tagged rows")
    left = [0] * len(policies)
    for kind, per_kind in counts.items():
        values = [per_kind.get(p, 0) for p in policies]
        ax.barh(policies, values, left=left, label=kind)
        left = [a + b for a, b in zip(left, values, strict=True)]
    if policies:
        ax.set_xlabel("rows")
        ax.legend(loc="lower right")
    ax.set_title("Policy mix")
    return _save(plt, fig, path)


def plot_k_histogram(ks: Sequence[int], path: Path) -> str:
    """recovery: prefix tokens k of h kept before the refusal (P(k=0) = 0.5, Qi et al.)."""
    plt, fig, ax = _figure()
    if ks:
        # One stairs artist, not one patch per bin: 100 bins draw in milliseconds.
        counts = np.bincount(np.asarray(ks, dtype=np.int64))
        ax.stairs(counts, np.arange(len(counts) + 1) - 0.5, fill=True, color="tab:red")
        ax.set_xlabel("k (target-model tokens of h before the refusal)")
        ax.set_ylabel("rows")
    else:
        _empty(ax, "no recovery rows")
    ax.set_title("recovery: k histogram")
    return _save(plt, fig, path)


def plot_lengths(lengths: Mapping[str, Sequence[int]], path: Path) -> str:
    """Completion length in characters, per kind."""
    plt, fig, ax = _figure()
    shown = {k: v for k, v in lengths.items() if len(v)}
    if shown:
        top = max(max(v) for v in shown.values())
        bins = np.arange(0, top + max(1, top // 30) + 1, max(1, top // 30))
        for kind, values in shown.items():
            ax.stairs(np.histogram(values, bins=bins)[0], bins, linewidth=1.5, label=kind)
        ax.set_xlabel("completion length (characters)")
        ax.set_ylabel("rows")
        ax.legend()
    else:
        _empty(ax, "no rows")
    ax.set_title("Completion lengths")
    return _save(plt, fig, path)


def plot_toxicity(before: Sequence[float], after: Sequence[float], path: Path) -> str:
    """Scorer output on the text backtracked from (before) and on what replaced it (after)."""
    plt, fig, ax = _figure()
    if before or after:
        bins = np.linspace(0, 1, 21)
        series = [
            (before, "before: harmful spans", "tab:red"),
            (after, "after: replacements, refusals, safe responses", "tab:green"),
        ]
        for values, label, color in series:
            if values:
                counts = np.histogram(values, bins=bins)[0]
                ax.stairs(counts, bins, fill=True, alpha=0.6, color=color, label=label)
        ax.set_xlabel("toxicity (highest label score per row)")
        ax.set_ylabel("rows")
        ax.legend()
    else:
        _empty(ax, "no toxicity scores recorded (the run had no scorer)")
    ax.set_title("Toxicity before / after backtracking")
    return _save(plt, fig, path)


def plot_judges(agreement: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> str:
    """Per gate: the share of texts each judge flagged; each pair's agreement and Cohen's kappa."""
    rows = len(agreement["judges"]) + 2 * len(agreement["pairs"])
    plt, fig, (top, bottom) = _figure(width=8.0, height=1.6 + 0.22 * rows, nrows=2)
    judged = list(reversed(agreement["judges"]))  # the first row on top
    top.barh([f"{r['gate']}: {r['judge']}" for r in judged], [r["share"] or 0 for r in judged])
    top.set_xlim(0, 1)
    top.set_title("Share of texts each judge flagged")
    pairs = list(reversed(agreement["pairs"]))
    y = np.arange(len(pairs))
    agree = [r["agreement"] or 0 for r in pairs]
    kappa = [r["kappa"] or 0 for r in pairs]  # undefined kappa drawn as 0; the table says "-"
    bottom.barh(y + 0.2, agree, height=0.4, color="tab:green", label="agreement")
    bottom.barh(y - 0.2, kappa, height=0.4, color="tab:purple", label="Cohen's kappa")
    bottom.set_yticks(y, [f"{r['gate']}: {r['judges']}" for r in pairs])
    bottom.axvline(0, color="black", linewidth=0.8)
    bottom.set_xlim(-1, 1)
    bottom.set_title("Agreement and Cohen's kappa per pair of judges (kappa 0: chance)")
    bottom.legend(loc="best")
    return _save(plt, fig, path)
