"""format: build the published examples of each recipe, render and check every one.

Reads `inject.violations` and `natural.violations` (taken as one table), `rewrite.replacements`,
`rewrite.refusals`, `rewrite.safe_responses`, `sources.harmful`, `filter.responses` and
`filter.toxic` (the samples natural violations come from); writes `bsafe`, `rlbf`, `reset`,
`recovery` (records.SFT) and `preference` (records.PREFERENCE), TRL's conversational formats with
`segments` carrying the loss flags (layouts in stages/format_build.py):

- bsafe (Sel et al.): benign text · harmful span · [BACKTRACK-P] · span repeated · [REPLACE] ·
  safe alternative · rest, one edit per injected violation;
- rlbf (Sel et al. 2026), from the same violations: benign text · harmful span · [CATEGORY-P] ·
  [BACKTRACK_BY_X] · the rest of the benign text, X the span's target-tokenizer tokens (a
  natural violation has no rest: its replacement continues after the take-back);
- reset (Zhang et al.): prefix(y-) · [RESET] · y+, plus the plain (x, y+) example;
- recovery (Qi et al.): h≤k · r, k in target-tokenizer tokens, `variants_per_triplet` draws, with
  the whole h and k in meta so the trainer can redraw k;
- preference (Zhang et al., DPO): prefix(y-)+[RESET]+y+ over y-, and y+ over a safe prefix with a
  spurious [RESET], on harmful prompts; and on benign prompts (filter.responses) the benign answer
  over a prefix of it with a spurious [RESET]. `meta.pair` names the type: `reset`,
  `no_reset_harmful`, `no_reset_benign`.

Every row is rendered and checked before it is kept: `render(completion) == visible` equals the
visible text the recipe intends (for bsafe the clean response with the safe alternatives, which
must hold no harmful span), control tokens appear exactly where the recipe put them, and no
untrained segment leaves a space before a trained one. A row that fails goes to `rejected`
(`render_mismatch`, `control_token_in_text`, `span_in_visible`, `space_before_trained`), as does
one whose inputs are missing (`missing_response`, `missing_replacement`, `missing_refusal`,
`missing_safe_response`) or inconsistent (`offset_mismatch`). A harmful row with an empty answer
still gets its plain reset example, a k=0 recovery row and a spurious-reset pair.

Not chunked: bsafe rows follow inject.violations and the other kinds follow sources.harmful, so
no one input's chunks cover every row; the stage is CPU-only and fast (scripts/bench_recipes.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from itertools import accumulate, pairwise
from typing import Any

import pyarrow as pa
from pydantic import Field, model_validator

from pipeline import kinds, records, recovery, render, seeds, taxonomy
from pipeline.render import RenderError, render_pieces, split
from pipeline.stage import StageConfig, StageSpec
from pipeline.text import clean
from stages import format_build as build

SPEC = StageSpec(
    name="format",
    reads=(
        "inject.violations",
        "natural.violations",
        "rewrite.replacements",
        "rewrite.refusals",
        "rewrite.safe_responses",
        "sources.harmful",
        "filter.responses",
        "filter.toxic",
    ),
    writes={k: records.config_schema(k) for k in kinds.built_by("format")},
    hooks=("fingerprints",),
)


class Config(StageConfig):
    # bsafe
    per_policy_tokens: bool = True  # [BACKTRACK-HATE] etc.; false: the generic [BACKTRACK]
    train_prefix: bool = True  # train on the benign text before the first violation
    train_copy: bool = (
        True  # train on the repeated span (the model must point at what it takes back)
    )
    # rlbf (Sel et al. 2026), from the same violations; X counts target_tokenizer tokens
    rlbf: bool = True
    rlbf_train_prefix: bool = False  # RLBF: p ⊕ part1 ⊕ v is input, only what follows is target
    rlbf_max_x: int = Field(128, ge=1)  # a span of more tokens gives no rlbf row (span_too_long)
    # reset: prefix(y-) is j words of y-'s n, j ~ U{ceil(lo·n)..floor(hi·n)} (Zhang et al. leave
    # the distribution open; docs/formats.md#reset)
    reset_prefix: tuple[float, float] = (0.0, 1.0)
    reset_plain: bool = True  # also the plain (x, y+) example: the loss's −log p(y+ | x) term
    # recovery
    target_tokenizer: str = "embedded"  # k counts these tokens: Hub id, local folder or embedded
    target_revision: str | None = None
    # the draw's settings (pipeline/recovery.py holds their defaults; publish hands them to the
    # trainer in retrace.json, pipeline/handoff.py)
    p_zero: float = Field(recovery.P_ZERO, ge=0, le=1)
    k_cap: int = Field(recovery.K_CAP, ge=1)
    variants_per_triplet: int = Field(1, ge=1)
    refusal_separator: str = recovery.SEPARATOR
    # preference
    preference_reset_pairs: bool = True  # prefix(y-)+[RESET]+y+ over y-
    preference_spurious_pairs: bool = True  # y+ over prefix(y+)+[RESET]
    # Zhang et al.'s false-reset pairs on benign prompts: a benign answer y over prefix(y)+[RESET]
    preference_benign_pairs: bool = True

    @model_validator(mode="after")
    def _fractions(self) -> Config:
        lo, hi = self.reset_prefix
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"reset_prefix must be 0 <= lo <= hi <= 1, got {self.reset_prefix}")
        top = taxonomy.load().backtrack_by_max
        if self.rlbf_max_x > top:
            raise ValueError(
                f"rlbf_max_x {self.rlbf_max_x} exceeds the {top} [BACKTRACK_BY_<n>] tokens of "
                f"{taxonomy.TAXONOMY_FILE.name} (backtrack_by_max)"
            )
        return self


def fingerprints(cfg: Config) -> list[dict[str, Any]]:
    """recovery's k counts tokens of the target tokenizer: its identity belongs in the cache key."""
    from pipeline.models import fingerprint

    return [fingerprint(cfg.target_tokenizer, cfg.target_revision)]


@cache
def _tokenizer(model: str, revision: str | None) -> Any:
    from transformers import AutoTokenizer

    from pipeline.models import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(model, revision), revision=revision)


def token_offsets(tokenizer: Any, texts: list[str]) -> list[list[tuple[int, int]]]:
    """Each text's tokens as char spans, without special tokens (so h's EOS is never counted),
    by the one counting rule (`render.token_spans_of`: special-token strings split as text).

    Offsets, not decoding: h≤k must be an exact prefix of h's text, and decoding a token prefix
    is not one for byte-level pieces of a character or for normalising tokenizers.
    """
    if not getattr(tokenizer, "is_fast", True):
        raise TypeError(
            "format: target_tokenizer must be a fast (Rust) tokenizer, which reports char "
            "offsets; pick a model that ships tokenizer.json"
        )
    return render.token_spans_of(tokenizer, texts)


# --- rows and their checks -------------------------------------------------------------------


def _meta(base: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    meta = {k: v for k, v in (base or {}).items() if v is not None}
    meta.update(extra)
    return meta


def _provenance(kind: str, policy: list[str], origin: dict[str, Any], *key: Any) -> dict[str, Any]:
    # One joined string hashes faster than one JSON part per key (a measured third of bsafe's
    # time went to json.dumps); ids collide only if a text holds the separator at the same place.
    content_key = "\x1f".join(map(str, (origin["source_id"], *key)))
    return {
        "id": records.row_id(kind, content_key),
        "kind": kind,
        "policy": policy,
        "source": origin["source"],
        "source_id": origin["source_id"],
        "license": origin["license"],
    }


def _sft(kind, policy, origin, prompt, segments, expected, meta, *key) -> dict[str, Any]:
    content = "".join(s["text"] for s in segments)
    return {
        **_provenance(kind, policy, origin, prompt, content, *key),
        "prompt": [records.message("user", prompt)],
        "completion": [records.message("assistant", content)],
        "segments": segments,
        "visible": expected,
        "meta": meta,
    }


def _check(
    content: str, expected: str, planted: list[str], tokenizer: Any = None
) -> tuple[str, str] | None:
    """Why a turn is wrong, or None: its control tokens must be exactly `planted`, in order, and
    it must render strictly to `expected` (with the target tokenizer for RLBF take-backs)."""
    pieces = split(content)
    found = pieces[1::2]
    if found != planted:
        return "control_token_in_text", f"control tokens {found} where the recipe put {planted}"
    try:
        shown = render_pieces(pieces, strict=True, tokenizer=tokenizer)
    except RenderError as err:
        return "render_mismatch", str(err)
    if shown != expected:
        return "render_mismatch", f"rendered {shown[:80]!r}, expected {expected[:80]!r}"
    return None


def _check_sft(
    row: dict[str, Any], spans: tuple[str, ...] = (), tokenizer: Any = None
) -> tuple[str, str] | None:
    segments = row["segments"]
    planted = [s["text"] for s in segments if s["role"] == "control"]
    problem = _check(row["completion"][0]["content"], row["visible"], planted, tokenizer)
    if problem:
        return problem
    if build.untrained_space(segments):
        return "space_before_trained", "an untrained segment ends in whitespace before trained text"
    hit = next((s for s in spans if s in row["visible"]), None)
    if hit is not None:
        return "span_in_visible", f"the visible text still holds the harmful span {hit[:60]!r}"
    return None


# --- the recipes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Injected:
    """One violations row (inject's or natural's), neutralised: what its bsafe and rlbf rows are
    built from."""

    row: dict[str, Any]
    text: str  # the clean benign response
    ats: list[int]  # each violation's insertion point in `text`
    leads: list[str]  # the whitespace before each span (inject's one space, or the model's own)
    spans: list[str]
    prompt: str
    origin: dict[str, Any]
    meta: dict[str, Any]  # the response's meta with the spans' offsets and scores


def _violations(inputs, cfg: Config, out, rejected) -> None:
    """bsafe and rlbf rows: one violations row gives one of each."""
    # A natural violation's sample is one filter dropped as toxic.
    responses = {
        r["id"]: r
        for name in ("filter.responses", "filter.toxic")
        if name in inputs
        for r in inputs[name].to_pylist()
    }
    replacements = {
        (r["violation_id"], r["index"]): r for r in inputs["rewrite.replacements"].to_pylist()
    }
    rows = records.violations(inputs).to_pylist()
    tokenizer = _tokenizer(cfg.target_tokenizer, cfg.target_revision) if cfg.rlbf and rows else None
    for row in rows:
        response = responses.get(row["response_id"])
        if response is None:
            rejected.append(records.reject(row, "format", "missing_response", row["response_id"]))
            continue
        violations = row["violations"]
        leads = _leads(row)
        if leads is None or any(
            row["injected"][v["start"] : v["end"]] != v["span"] for v in violations
        ):
            rejected.append(records.reject(row, "format", "offset_mismatch"))
            continue
        injected = _prepare(row, response, leads)
        reps = [replacements.get((row["id"], i)) for i in range(len(violations))]
        if any(r is None for r in reps):
            rejected.append(records.reject(row, "format", "missing_replacement"))
        else:
            _bsafe(injected, reps, cfg, out["bsafe"], rejected)
        if tokenizer is not None:
            _rlbf(injected, reps, cfg, tokenizer, out["rlbf"], rejected)


def _leads(row: dict[str, Any]) -> list[str] | None:
    """What the violations row puts between the response and each span: inject writes one space,
    natural keeps the model's own whitespace (a line break before a list item, say). None when
    that is not whitespace (offsets that do not fit)."""
    leads, shift = [], 0  # shift: how far `injected` runs ahead of `response` at this point
    for v in row["violations"]:
        lead = row["injected"][v["at"] + shift : v["start"]]
        if lead.strip() or v["start"] < v["at"] + shift:
            return None
        leads.append(lead)
        shift = v["end"] - v["at"]
    return leads


def _prepare(row: dict[str, Any], response: dict[str, Any], leads: list[str]) -> _Injected:
    violations = row["violations"]
    # Pieces are neutralised one by one (the checks catch a control token that only appears
    # where two pieces meet), so the insertion points move with them.
    cuts = [0, *(v["at"] for v in violations), len(row["response"])]
    pieces = [clean(row["response"][a:b]) for a, b in pairwise(cuts)]
    licenses = [response["license"], *(v["license"] for v in violations)]
    meta = _meta(
        response["meta"],
        offsets=row["meta"]["offsets"] if row["meta"] else None,
        origin=(row["meta"] or {}).get("origin"),
        # the violations row's: inject's carry the benign response's, natural's the safe prefix's
        scores=_labelled("response", [(row["meta"] or {}).get("scores") or []])
        + _labelled("span", [v["scores"] for v in violations]),
    )
    return _Injected(
        row=row,
        text="".join(pieces),
        ats=list(accumulate(len(p) for p in pieces[:-1])),
        leads=leads,
        spans=[clean(v["span"]) for v in violations],
        prompt=clean(response["prompt"]),
        origin={
            "source": response["source"],
            "source_id": response["source_id"],
            "license": records.license_expr(*licenses),
        },
        meta=meta,
    )


def _bsafe(inj: _Injected, reps: list[dict[str, Any]], cfg: Config, kept, rejected) -> None:
    tax = taxonomy.load()
    policies = [v["policy"] for v in inj.row["violations"]]
    edits = [
        (
            at,
            lead,
            span,
            tax.backtrack_token(policy, cfg.per_policy_tokens),
            clean(r["replacement"]),
        )
        for at, lead, span, policy, r in zip(
            inj.ats, inj.leads, inj.spans, policies, reps, strict=True
        )
    ]
    segments, visible = build.bsafe(inj.text, edits, cfg.train_prefix, cfg.train_copy)
    rep_meta = [r["meta"] or {} for r in reps]
    templates = sorted({m.get("template") or "" for m in rep_meta} - {""})
    meta = {
        **inj.meta,
        "template": ",".join(templates) or None,
        "fallback": any(m.get("fallback") for m in rep_meta),
        "scores": inj.meta["scores"]
        + _labelled("replacement", [m.get("scores") or [] for m in rep_meta]),
    }
    sft = _sft("bsafe", inj.row["policy"], inj.origin, inj.prompt, segments, visible, meta)
    _keep(sft, _check_sft(sft, tuple(inj.spans)), kept, rejected)


def _rlbf(
    inj: _Injected, reps: list[dict[str, Any] | None], cfg: Config, tokenizer: Any, kept, rejected
) -> None:
    """X is the harmful segment's target-tokenizer tokens: exactly the tokens the trainer puts
    before the category token (it tokenises segment by segment). The render check then proves
    the renderer's take-back over the whole visible text cuts at the span's start.

    A text that ends at its last violation (a natural one: the model's text after its offending
    sentence was dropped) continues after the take-back with that span's replacement, as bsafe
    does, rather than ending the turn right after the control tokens."""
    from pipeline.models import model_id

    tax = taxonomy.load()
    harmful = [lead + span for lead, span in zip(inj.leads, inj.spans, strict=True)]
    xs = [len(o) for o in token_offsets(tokenizer, harmful)]
    if max(xs) > cfg.rlbf_max_x:
        detail = f"a span is {max(xs)} target tokens; format.rlbf_max_x is {cfg.rlbf_max_x}"
        rejected.append(records.reject(inj.row, "format", "span_too_long", detail))
        return
    policies = [v["policy"] for v in inj.row["violations"]]
    edits = [
        (at, lead, span, tax.category(policy), tax.backtrack_by(x))
        for at, lead, span, policy, x in zip(
            inj.ats, inj.leads, inj.spans, policies, xs, strict=True
        )
    ]
    text = inj.text
    if inj.ats[-1] == len(text):
        if reps[-1] is None:
            rejected.append(records.reject(inj.row, "format", "missing_replacement"))
            return
        text += inj.leads[-1] + clean(reps[-1]["replacement"])
    segments, visible = build.rlbf(text, edits, cfg.rlbf_train_prefix)
    meta = {**inj.meta, "tokenizer": model_id(cfg.target_tokenizer, cfg.target_revision)}
    sft = _sft("rlbf", inj.row["policy"], inj.origin, inj.prompt, segments, visible, meta)
    _keep(sft, _check_sft(sft, tuple(inj.spans), tokenizer), kept, rejected)


def _labelled(prefix: str, score_lists: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per label, the highest score over the row's spans (or replacements), as `prefix.label`:
    one row's scores for its benign text, spans and replacements side by side."""
    worst: dict[str, float] = {}
    for scores in score_lists:
        for s in scores:
            label = f"{prefix}.{s['label']}"
            worst[label] = max(worst.get(label, 0.0), s["score"])
    return records.scores(worst)


def _keep(row: dict[str, Any], problem, kept: list, rejected: list) -> None:
    if problem is None:
        kept.append(row)
    else:
        rejected.append(records.reject(row, "format", *problem))


def _preference(policy, origin, prompt, chosen, rejected, meta) -> dict[str, Any]:
    return {
        **_provenance("preference", policy, origin, prompt, chosen, rejected),
        "prompt": [records.message("user", prompt)],
        "chosen": [records.message("assistant", chosen)],
        "rejected": [records.message("assistant", rejected)],
        "meta": meta,
    }


def _check_pair(row: dict[str, Any], chosen: tuple, rejected: tuple) -> tuple[str, str] | None:
    """`chosen`/`rejected`: (expected visible, planted control tokens) of each side."""
    return _check(row["chosen"][0]["content"], *chosen) or _check(
        row["rejected"][0]["content"], *rejected
    )


def _harmful(inputs, cfg: Config, env: Any, out, rejected) -> None:
    """reset, recovery and preference rows: one source row of sources.harmful each."""
    from pipeline.models import model_id

    reset_token = taxonomy.load().reset_token
    lo, hi = cfg.reset_prefix
    refusals = {r["harmful_id"]: r for r in inputs["rewrite.refusals"].to_pylist()}
    safes = {r["harmful_id"]: r for r in inputs["rewrite.safe_responses"].to_pylist()}
    rows = inputs["sources.harmful"].to_pylist()
    answers = [clean(r["response"]) if (r["response"] or "").strip() else "" for r in rows]
    tokenizer = _tokenizer(cfg.target_tokenizer, cfg.target_revision) if any(answers) else None
    spans = token_offsets(tokenizer, answers) if tokenizer else [[] for _ in rows]
    tokenizer_id = model_id(cfg.target_tokenizer, cfg.target_revision)
    for row, h, offsets in zip(rows, answers, spans, strict=True):
        x, policy = clean(row["prompt"]), list(row["policy"] or [])
        safe, refusal = safes.get(row["id"]), refusals.get(row["id"])
        if safe is None:
            rejected.append(records.reject(row, "format", "missing_safe_response"))
        else:
            y_plus, meta = clean(safe["text"]), safe["meta"]
            if h:
                prefix = build.word_prefix(h, lo, hi, seeds.rng(env.seed, row["id"], "reset"))
                segments, visible = build.reset(prefix, y_plus)
                sft = _sft(
                    "reset",
                    policy,
                    row,
                    x,
                    segments,
                    visible,
                    _meta(meta, prefix_chars=len(prefix)),
                )
                _keep(sft, _check_sft(sft), out["reset"], rejected)
                if cfg.preference_reset_pairs:
                    chosen = prefix + reset_token + y_plus
                    pair = _preference(
                        policy,
                        row,
                        x,
                        chosen,
                        h,
                        _meta(meta, prefix_chars=len(prefix), pair="reset"),
                    )
                    problem = _check_pair(pair, (y_plus, [reset_token]), (h, []))
                    _keep(pair, problem, out["preference"], rejected)
            if cfg.reset_plain:
                segments, visible = build.plain(y_plus)
                sft = _sft("reset", policy, row, x, segments, visible, _meta(meta))
                _keep(sft, _check_sft(sft), out["reset"], rejected)
            if cfg.preference_spurious_pairs:
                spurious = build.word_prefix(
                    y_plus, lo, hi, seeds.rng(env.seed, row["id"], "spurious")
                )
                pair_meta = _meta(meta, prefix_chars=len(spurious), pair="no_reset_harmful")
                pair = _preference(policy, row, x, y_plus, spurious + reset_token, pair_meta)
                problem = _check_pair(pair, (y_plus, []), ("", [reset_token]))
                _keep(pair, problem, out["preference"], rejected)
        if refusal is None:
            rejected.append(records.reject(row, "format", "missing_refusal"))
            continue
        # Stripped, so the trainer can take the joint off again (recovery.refusal_of).
        r = clean(refusal["text"]).strip()
        for variant in range(cfg.variants_per_triplet):
            rng = seeds.rng(env.seed, row["id"], "recovery", variant)
            segments, visible, k, k_max = recovery.draw(
                h, offsets, r, rng, cfg.p_zero, cfg.k_cap, cfg.refusal_separator
            )
            meta = _meta(
                refusal["meta"],
                k=k,
                k_max=k_max,
                h_tokens=len(offsets),
                harmful=h,
                tokenizer=tokenizer_id,
            )
            sft = _sft("recovery", policy, row, x, segments, visible, meta, variant)
            _keep(sft, _check_sft(sft), out["recovery"], rejected)


def _benign_pairs(inputs, cfg: Config, env: Any, kept, rejected) -> None:
    """Continuing a benign answer is preferred over a [RESET] after a safe prefix of it (Zhang et
    al.'s second pair type, on benign prompts: it keeps false resets down). One pair per
    filter.responses row, the prefix drawn as reset's."""
    reset_token = taxonomy.load().reset_token
    lo, hi = cfg.reset_prefix
    for row in inputs["filter.responses"].to_pylist():
        y, x = clean(row["response"]), clean(row["prompt"])
        if not y.strip():
            rejected.append(records.reject(row, "format", "missing_response", "empty answer"))
            continue
        prefix = build.word_prefix(y, lo, hi, seeds.rng(env.seed, row["id"], "benign_reset"))
        meta = _meta(row["meta"], prefix_chars=len(prefix), pair="no_reset_benign")
        pair = _preference([], row, x, y, prefix + reset_token, meta)
        _keep(pair, _check_pair(pair, (y, []), ("", [reset_token])), kept, rejected)


def run(inputs: dict[str, pa.Table], cfg: Config, env: Any) -> dict[str, pa.Table]:
    out: dict[str, list[dict[str, Any]]] = {kind: [] for kind in SPEC.writes}
    rejected: list[dict[str, Any]] = []
    _violations(inputs, cfg, out, rejected)
    _harmful(inputs, cfg, env, out, rejected)
    if cfg.preference_benign_pairs:
        _benign_pairs(inputs, cfg, env, out["preference"], rejected)
    tables = {kind: records.table(rows, records.config_schema(kind)) for kind, rows in out.items()}
    return {**tables, "rejected": records.table(rejected, records.REJECTED)}
