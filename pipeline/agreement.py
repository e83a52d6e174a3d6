"""Counting a gate's votes: how often each judge flagged a text, how often each pair agreed, and
Cohen's kappa for the card.

Plain counting with no model code (pipeline/judges.py gives the verdicts), so publish, which only
reads the counts, does not depend on the scorers' code (nor is made stale by it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import combinations
from typing import Any


class Agreement:
    """Counts over one gate's judgements: per judge how many texts it flagged, per pair how
    many both flagged and how many both cleared. `rules` is each judge's rule by name
    (pipeline/judges.rules: `threshold`, `label`), kept so the card says what each flagged at."""

    def __init__(self, rules: Mapping[str, Any]) -> None:
        self.rules = dict(rules)
        self.names = list(rules)
        self.rows = self.unsafe = 0
        self.flagged = dict.fromkeys(self.names, 0)
        pairs = list(combinations(self.names, 2))
        self.both_flagged, self.both_clear = dict.fromkeys(pairs, 0), dict.fromkeys(pairs, 0)

    def add(self, judgements: Iterable[Any]) -> None:
        """Count judgements (pipeline/judges.Judgement: `unsafe`, `flags` by judge name)."""
        for j in judgements:
            self.rows += 1
            self.unsafe += j.unsafe
            for name, flag in j.flags.items():
                self.flagged[name] += flag
            for a, b in self.both_flagged:
                self.both_flagged[a, b] += j.flags[a] and j.flags[b]
                self.both_clear[a, b] += not j.flags[a] and not j.flags[b]

    def table_rows(self) -> list[dict[str, Any]]:
        """Rows of records.JUDGES: one per judge (`other` null), then one per pair."""
        if not self.names:
            return []
        rows = [
            {
                "judge": n,
                "other": None,
                "rows": self.rows,
                "flagged": f,
                "clear": self.rows - f,
                "threshold": self.rules[n].threshold,
                "label": self.rules[n].label,
            }
            for n, f in self.flagged.items()
        ]
        for (a, b), both in self.both_flagged.items():
            clear = self.both_clear[a, b]
            rows.append(
                {"judge": a, "other": b, "rows": self.rows, "flagged": both, "clear": clear}
                | {"threshold": None, "label": None}
            )
        return rows

    def stats(self) -> dict[str, int]:
        """Flat counts for the manifest's stats (the engine sums them over chunks)."""
        if not self.names:
            return {}
        out = {"judged": self.rows, "judged_unsafe": self.unsafe}
        out |= {f"flagged.{n}": f for n, f in self.flagged.items()}
        for (a, b), both in self.both_flagged.items():
            out[f"both_flagged.{a}+{b}"] = both
            out[f"both_clear.{a}+{b}"] = self.both_clear[a, b]
        return out


def cohen_kappa(rows: int, a_flagged: int, b_flagged: int, both_flagged: int) -> float | None:
    """Cohen's kappa of two judges' flags: observed agreement beyond what their flag rates give
    by chance, (p_o - p_e) / (1 - p_e). None when chance agreement is already total (both judges
    gave one and the same verdict to every text), where kappa is undefined."""
    if rows == 0:
        return None
    both_clear = rows - a_flagged - b_flagged + both_flagged
    observed = (both_flagged + both_clear) / rows
    p_a, p_b = a_flagged / rows, b_flagged / rows
    chance = p_a * p_b + (1 - p_a) * (1 - p_b)
    return None if chance >= 1 else (observed - chance) / (1 - chance)


def summarise(gates: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """The card's numbers from each gate's records.JUDGES rows (any number of chunks' worth):
    `judges` (per gate and judge: the threshold and label it flagged at, rows, flagged, flagged
    share) and `pairs` (per gate and pair: both flagged, both clear, agreement share, Cohen's
    kappa). Judges keep their config order."""
    judges, pairs = [], []
    for gate, rows in gates.items():
        totals: dict[tuple[str, str | None], list[int]] = {}
        rule: dict[str, dict[str, Any]] = {}  # one run's chunks share the judge's rule
        for r in rows:
            t = totals.setdefault((r["judge"], r["other"]), [0, 0, 0])
            t[0], t[1], t[2] = t[0] + r["rows"], t[1] + r["flagged"], t[2] + r["clear"]
            if r["other"] is None:
                rule.setdefault(r["judge"], {"threshold": r["threshold"], "label": r["label"]})
        flagged = {a: t[1] for (a, b), t in totals.items() if b is None}
        for (a, b), (n, f, c) in totals.items():
            if b is None:
                share = _share(f, n)
                judges.append(
                    {"gate": gate, "judge": a, **rule[a], "rows": n, "flagged": f, "share": share}
                )
                continue
            kappa = cohen_kappa(n, flagged[a], flagged[b], f)
            pairs.append(
                {
                    "gate": gate,
                    "judges": f"{a} / {b}",
                    "rows": n,
                    "both_flagged": f,
                    "both_clear": c,
                    "agreement": _share(f + c, n),
                    "kappa": None if kappa is None else round(kappa, 4),
                }
            )
    return {"judges": judges, "pairs": pairs}


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None
