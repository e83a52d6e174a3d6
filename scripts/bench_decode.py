"""Benchmark the backtracking-aware decoder against plain `generate` on the embedded model.

Prints, on the same prompts, batch size and greedy decoding (so both emit the same tokens):

- plain `model.generate` vs the decoder with no edits: tokens/s and wall time (the cost of the
  machinery: per-token renderer, events, per-row sampling, our own KV-cache loop);
- the decoder with edits forced every --edit-every tokens (a `[BACKTRACK-HATE]`, a copy of the
  last --edit-span tokens, `[REPLACE]`), `context: keep` and `context: drop`: wasted tokens per
  edit, the time they cost, and the extra wall per edit beyond the per-token rate (crops);
- scorer-guided rollback (profanity-check): the overhead per scored sentence with nothing
  flagged, and with one profane sentence planted per turn the wasted tokens and time per rollback.

    python scripts/bench_decode.py                      # 4 prompts, batch 4, 48 new tokens
    python scripts/bench_decode.py --batch-size 1 --max-new-tokens 96
    python scripts/bench_decode.py --rows 8,16 --prompts 32   # batching only, per batch size
    python scripts/bench_decode.py --rows 8,16 --prompts 32 --vary   # rows of varied lengths

`--rows` measures only the decoder's batching (no edits, greedy): tokens/s and the share of the
batch's row slots that decode steps left idle (static batches: rows that finished early; with
continuous batching a waiting request takes the slot), counted at the model's forward, so it
runs unchanged against an older checkout for a before/after comparison.

The embedded model gets the control tokens added in memory (as the trainer adds them), so it can
be forced to emit them. Needs the prepared embedded model (`retrace models prepare`). Timings on
a shared CPU vary; each figure is the best of --repeats runs.
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline.backends import GeneratorSpec, SamplingParams, load_generator
from pipeline.decode import DecodeConfig, Decoder, GuardConfig, Request
from pipeline.scorers import ScorerSpec, load_scorer
from trainer.tokens import add_control_tokens

PROMPTS = [
    "Give me three tips for sleeping better.",
    "Explain how a rainbow forms.",
    "What should I pack for a weekend hiking trip?",
    "How do I make a simple tomato soup?",
    "Why do leaves change colour in autumn?",
    "Suggest a weekly routine for learning a new language.",
    "What are good ways to save money on groceries?",
    "Describe how a bicycle's gears work.",
]
PLANTED = " You are a fucking idiot."


class ForceEdits:
    """Every `every` emitted tokens, force `[BACKTRACK-HATE]`, the row's last `span` tokens again
    and `[REPLACE]`: a real edit of the row's own text."""

    def __init__(self, decoder: Decoder, every: int, span: int) -> None:
        self.bt = decoder.controls.ids["[BACKTRACK-HATE]"]
        self.rep = decoder.controls.ids["[REPLACE]"]
        self.every, self.span = every, span
        self.plans: dict[int, list[int]] = {}

    def __call__(self, rows, scores):
        scores = scores.clone()
        # Edits come only from the plan: the untrained model never emits a control token itself.
        scores[:, sorted(rows[0].control_tokens)] -= 1e4
        for i, s in enumerate(rows):
            plan = self.plans.setdefault(s.row, [])
            plain = [t for t in s.emitted if t not in s.control_tokens]
            if (
                not plan
                and len(s.emitted) % self.every == self.every - 1
                and len(plain) > self.span
            ):
                plan += [self.bt, *s.emitted[-self.span :], self.rep]
            if plan:
                scores[i, plan.pop(0)] += 2e4
        return scores


class Plant:
    """Force one profane sentence into each turn after its first `after` tokens."""

    def __init__(self, decoder: Decoder, after: int) -> None:
        self.ids, self.after = decoder.prompts.text(PLANTED), after
        self.done: set[int] = set()

    def __call__(self, rows, scores):
        scores = scores.clone()
        for i, s in enumerate(rows):
            k = len(s.emitted) - self.after
            if s.row not in self.done and 0 <= k < len(self.ids):
                scores[i, self.ids[k]] += 1e4
                if k == len(self.ids) - 1:
                    self.done.add(s.row)
        return scores


class CountingScorer:
    """The real scorer, counting the sentences it scores and the time it takes."""

    def __init__(self, scorer) -> None:
        self.scorer, self.labels = scorer, scorer.labels
        self.texts, self.seconds = 0, 0.0

    def score(self, texts):
        start = time.perf_counter()
        out = self.scorer.score(texts)
        self.seconds += time.perf_counter() - start
        self.texts += len(texts)
        return out


def best(repeats: int, fn):
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        runs.append((time.perf_counter() - start, out))
    return min(runs, key=lambda r: r[0])


class EndAt:
    """Force `<end_of_turn>` once row r has emitted `lengths[r]` tokens."""

    def __init__(self, stop: int, lengths: list[int]) -> None:
        self.stop, self.lengths = stop, lengths

    def __call__(self, rows, scores):
        scores = scores.clone()
        for i, s in enumerate(rows):
            if len(s.emitted) >= self.lengths[s.row]:
                scores[i, self.stop] += 1e4
        return scores


def rows_only(args) -> None:
    """Tokens/s and idle row slots of the decoder at each batch size in `args.rows`."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    requests = [Request([{"role": "user", "content": p}], seed=i) for i, p in enumerate(prompts)]
    print(f"{'batch':>5} {'tokens':>7} {'wall s':>7} {'tok/s':>7} {'steps':>6} {'idle slots':>10}")
    for size in [int(b) for b in args.rows.split(",")]:
        gen = load_generator(GeneratorSpec(model="embedded", batch_size=size))
        counts: list[int] = []  # rows per one-token decode step
        forward = gen.model.forward

        def counted(*a, _forward=forward, _counts=counts, **kw):
            ids = kw.get("input_ids", a[0] if a else None)
            if ids is not None and ids.shape[1] == 1:
                _counts.append(ids.shape[0])
            return _forward(*a, **kw)

        gen.model.forward = counted
        dec = Decoder(gen, DecodeConfig(temperature=0, max_new_tokens=args.max_new_tokens))
        # --vary: row r ends after a length of its own, as answers do (greedy ones here don't).
        stop = dec.tokenizer.convert_tokens_to_ids("<end_of_turn>")
        lengths = [4 + (r * 7919) % max(args.max_new_tokens - 4, 1) for r in range(len(prompts))]
        procs = [EndAt(stop, lengths)] if args.vary else []
        dec.decode(requests[:2])  # warm-up
        counts.clear()
        t, turns = best(1, lambda d=dec, p=procs: d.decode(requests, processors=p))
        tokens = sum(o.emitted_tokens + (o.finish_reason == "stop") for o in turns)
        idle = 1 - sum(counts) / max(len(counts) * size, 1)
        print(f"{size:5d} {tokens:7d} {t:7.2f} {tokens / t:7.1f} {len(counts):6d} {idle:10.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--edit-every", type=int, default=16)
    ap.add_argument("--edit-span", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--rows", help="comma-separated batch sizes: measure batching only")
    ap.add_argument("--vary", action="store_true", help="with --rows: rows end at varied lengths")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.rows:
        rows_only(args)
        return

    gen = load_generator(GeneratorSpec(model="embedded", batch_size=args.batch_size))
    add_control_tokens(gen.tokenizer)
    gen.model.resize_token_embeddings(len(gen.tokenizer), mean_resizing=True)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    requests = [Request([{"role": "user", "content": p}], seed=i) for i, p in enumerate(prompts)]
    n = args.max_new_tokens

    def decoder(**cfg) -> Decoder:
        scorer = cfg.pop("scorer", None)
        return Decoder(gen, DecodeConfig(temperature=0, max_new_tokens=n, **cfg), scorer)

    print(f"model embedded Gemma 3 270M (fp32, CPU, {torch.get_num_threads()} threads), "
          f"{args.prompts} prompts, batch {args.batch_size}, {n} new tokens, greedy")  # fmt: skip

    # --- plain generate vs the decoder, no edits --------------------------------------------
    formatted = [gen.format_chat([{"role": "user", "content": p}]) for p in prompts]
    params = SamplingParams(temperature=0, max_new_tokens=n)
    t_plain, plain = best(
        args.repeats, lambda: gen.generate(formatted, params, list(range(len(prompts))))
    )
    plain_tokens = sum(g[0].completion_tokens for g in plain)
    plain_dec = decoder()
    t_dec, turns = best(args.repeats, lambda: plain_dec.decode(requests))
    dec_tokens = sum(t.emitted_tokens + (t.finish_reason == "stop") for t in turns)
    same = sum(g[0].text == t.raw for g, t in zip(plain, turns, strict=True))
    print(f"\n{'run':34} {'tokens':>7} {'wall s':>7} {'tok/s':>7}")
    print(f"{'plain generate':34} {plain_tokens:7d} {t_plain:7.2f} {plain_tokens / t_plain:7.1f}")
    print(f"{'decoder, no edits':34} {dec_tokens:7d} {t_dec:7.2f} {dec_tokens / t_dec:7.1f}")
    print(f"decoder / generate tok/s: {(dec_tokens / t_dec) / (plain_tokens / t_plain):.2f}; "
          f"same text in {same}/{len(turns)} turns; "
          f"{sum(len(t.events) for t in turns)} control tokens emitted")  # fmt: skip
    per_token = t_dec / max(dec_tokens, 1)

    # --- forced edits, keep vs drop ------------------------------------------------------------
    print(f"\nedits every {args.edit_every} tokens, copy of {args.edit_span} tokens")
    header = f"{'context':8} {'edits':>5} {'emitted':>7} {'visible':>7} {'wasted':>6} {'wall s':>7}"
    print(header + f" {'wasted/edit':>11} {'their s/edit':>12} {'extra s/edit':>12}")
    for context in ("keep", "drop"):
        dec = decoder(context=context, max_edits=64, max_wasted_tokens=10_000)

        def forced(d: Decoder = dec):
            return d.decode(requests, processors=[ForceEdits(d, args.edit_every, args.edit_span)])

        t, out = best(args.repeats, forced)
        edits = sum(e.kind == "replace" for o in out for e in o.events)
        emitted = sum(o.emitted_tokens for o in out)
        wasted = sum(o.wasted_tokens for o in out)
        extra = (t - emitted * per_token) / max(edits, 1)
        print(
            f"{context:8} {edits:5d} {emitted:7d} {sum(o.visible_tokens for o in out):7d} "
            f"{wasted:6d} {t:7.2f} {wasted / max(edits, 1):11.1f} "
            f"{wasted * per_token / max(edits, 1):12.3f} {extra:12.3f}"
        )

    # --- scorer-guided rollback ----------------------------------------------------------------
    scorer = CountingScorer(load_scorer(ScorerSpec(kind="profanity-check")))
    guard = GuardConfig(threshold=0.8, retries=2)
    dec = decoder(guard=guard, scorer=scorer)
    t_guard, out = best(args.repeats, lambda: dec.decode(requests))
    flagged = sum(e.kind == "rollback" for o in out for e in o.events)
    sentences = scorer.texts / args.repeats
    print(f"\nguard (profanity-check, threshold 0.8), nothing planted: {sentences:.0f} sentences "
          f"scored, {flagged} rollbacks, wall {t_guard:.2f} s vs {t_dec:.2f} s unguarded: "
          f"{(t_guard - t_dec) / max(sentences, 1) * 1000:.1f} ms per sentence "
          f"(scorer alone {scorer.seconds / max(scorer.texts, 1) * 1000:.1f} ms)")  # fmt: skip
    t_plant, out = best(args.repeats, lambda: dec.decode(requests, processors=[Plant(dec, 8)]))
    rollbacks = sum(e.kind == "rollback" for o in out for e in o.events)
    wasted = sum(o.wasted_tokens for o in out)
    print(f"guard, one profane sentence planted per turn: {rollbacks} rollbacks, {wasted} tokens "
          f"wasted ({wasted / max(rollbacks, 1):.1f} per rollback), wall {t_plant:.2f} s, "
          f"{(t_plant - t_guard) / max(rollbacks, 1):.2f} s per rollback over the clean run; "
          f"visible holds the planted sentence in "
          f"{sum('idiot' in o.visible for o in out)}/{len(out)} turns")  # fmt: skip


if __name__ == "__main__":
    main()
