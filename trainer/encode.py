"""One SFT row -> token ids, per-token "trained" flags and loss weights, from its `segments`.

The prompt is rendered with the model's chat template, or Gemma's turn format from
prompts/chat/gemma.jinja when it has none (the embedded Gemma 3 270M is a base model). Every piece
of text that came from data (prompt contents, segment texts, the recovery harmful answer) is
tokenised with `split_special_tokens=True`, so a literal "[RESET]" or "<end_of_turn>" typed by a
user never becomes that token's id (docs/data-contract.md#control-tokens: control tokens are
privileged). Only `control` segments map to a control-token id, directly. The template's own markup
is tokenised with its special tokens.

The assistant turn is tokenised as a whole between control tokens, not segment by segment, and
each token goes to the segment its characters fall in; a token straddling a trained and an
untrained segment is not trained, nor is a whitespace-only token right before an untrained one. So
a corpus that puts the space before a harmful span on the trained side yields " Bad" (context), or
an untrained " " + "Bad", never a trained lone " " before it.

An rlbf row's `[BACKTRACK_BY_<n>]` is re-counted in this tokenizer by the decoder's rule
(trainer/rlbf.py), whatever tokenizer the format stage counted it in; a row no n fits is dropped.

Flags come from the segments (docs/data-contract.md#segments): harmful spans and unsafe prefixes are
context, the rest of the assistant turn and its end-of-turn token are trained. `recovery` rows may
redraw k each epoch (Qi et al.) with pipeline/recovery.py, the format stage's own draw and joint, so
the trained row is always one the format stage could have published.

Rows longer than `max_length` keep their edits: benign text is cut from the left of the assistant
turn (then from its right end), never inside the span from the first edit segment (harmful,
control, copy, replacement) to the last; a row whose edits alone do not fit is dropped
`edits_too_long`. Rows with no edit (utility) keep their front.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline import recovery, seeds
from pipeline.handoff import DEFAULT_RECOVERY, Recovery
from pipeline.text import sentence_spans
from pipeline.tokenizing import TextEncoder
from trainer import rlbf

# Roles of an edit (from a harmful span to its replacement): a cut to max_length never enters one.
_EDIT_ROLES = frozenset({"harmful", "control", "copy", "replacement"})


@dataclass
class _Turn:
    ids: list[int]
    trained: list[bool]
    where: list[int]  # the segment each token belongs to
    decision: list[bool]  # a control token, or the token a sentence starts in


@dataclass
class Doc:
    ids: list[int]
    trained: list[bool]  # trained[i]: token i is a training target (predicted from tokens < i)
    config: str
    prompt_len: int = 0  # tokens before the assistant's content: the completion is ids[prompt_len:]
    weights: list[float] = field(default_factory=list)  # loss weight of token i as a target
    component: str = ""  # the row's mixture component (trainer.data.component)
    cut: int = 0  # tokens cut to fit max_length

    def completion_mask(self) -> list[bool]:
        """True on the assistant turn's tokens (content and end of turn), False on the prompt."""
        return [i >= self.prompt_len for i in range(len(self.ids))]


class Encoder(TextEncoder):
    """Tokenises rows for one tokenizer; `encode` returns a Doc, or a drop reason. Its text,
    markup and prompt scaffold are pipeline/tokenizing.py's, the rule the decoder uses too."""

    def __init__(
        self,
        tokenizer,
        max_length: int,
        control_tokens: tuple[str, ...],
        decision_weight: float = 1.0,
        recovery: Recovery | None = None,
    ):
        super().__init__(tokenizer)
        self.max_length = max_length
        self.control = {t: tokenizer.convert_tokens_to_ids(t) for t in control_tokens}
        self._control_ids = frozenset(self.control.values())
        self.decision_weight = decision_weight
        # What the per-epoch k redraw needs beyond the row: the format stage's P(k=0), cap and
        # separator (the folder's retrace.json, or train.recovery: trainer/data.recovery_draw).
        self.recovery = recovery or DEFAULT_RECOVERY

    def turn(self, segments: list[dict[str, Any]]) -> _Turn | str:
        """The assistant content tokenised, or a drop reason. Text between control segments is
        tokenised in one piece; a token whose chars fall in several segments is trained only if
        all of them are."""
        out = _Turn([], [], [], [])
        run: list[int] = []

        def flush() -> None:
            if not run:
                return
            texts = [segments[j]["text"] for j in run]
            starts = [0]
            for t in texts:
                starts.append(starts[-1] + len(t))
            joined = "".join(texts)
            piece, spans = self.offsets(joined)
            # Decision points: where a sentence after the first starts, by the one definition
            # the guard rolls back by (pipeline/text.py; a line break ends one too). The text
            # right after a control token is no decision: that was the control token.
            begins = iter(start for start, _ in sentence_spans(joined)[1:])
            begin = next(begins, None)
            for tid, (a, b) in zip(piece, spans, strict=True):
                first = _segment_at(starts, a)
                last = _segment_at(starts, max(a, b - 1))
                out.ids.append(tid)
                out.trained.append(all(segments[run[j]]["train"] for j in range(first, last + 1)))
                out.where.append(run[first])
                # the token the sentence starts in, whitespace before it aside (" It" or "It")
                starts_one = begin is not None and begin < b and not joined[a:begin].strip()
                out.decision.append(starts_one)
                while begin is not None and begin < b:
                    begin = next(begins, None)
            run.clear()

        for j, seg in enumerate(segments):
            if seg["role"] != "control":
                if seg["text"]:
                    run.append(j)
                continue
            flush()
            if seg["text"] not in self.control:
                return "unknown_control_token"
            out.ids.append(self.control[seg["text"]])
            out.trained.append(bool(seg["train"]))
            out.where.append(j)
            out.decision.append(True)
        flush()
        # A lone whitespace token trained right before an untrained one (a tokenizer that splits
        # " Bad" into " " + "Bad") would teach emitting the space that leads into a harmful span.
        for i in range(len(out.ids) - 1):
            if out.trained[i] and not out.trained[i + 1] and self._blank(out.ids[i]):
                out.trained[i] = False
        return out

    def _blank(self, tid: int) -> bool:
        return tid not in self._control_ids and not self.tok.decode([tid]).strip()

    # --- a row --------------------------------------------------------------------------------

    def encode(
        self, row: dict[str, Any], config: str, redraw: tuple[int, int] | None = None
    ) -> Doc | str:
        """The row as a Doc, or a drop reason. `redraw=(seed, epoch)` redraws a recovery k."""
        segments = row["segments"]
        if redraw is not None and row.get("kind") == "recovery":
            segments = self.redrawn(row, *redraw)
        if rlbf.takes_back(segments):  # n counted in this tokenizer, as the decoder counts it
            recounted = rlbf.recount(segments, self.tok)
            if isinstance(recounted, str):
                return recounted
            segments = recounted[0]
        turn = self.turn(segments)
        if isinstance(turn, str):
            return turn
        body, flags, where = turn.ids, turn.trained, turn.where
        # A row with no trained segment would teach only its end of turn (ending right after an
        # unsafe prefix, say): drop it rather than train that.
        if not any(flags):
            return "no_trained_tokens"
        head, tail = self.scaffold(row["prompt"])
        # decision_weight on control tokens and on the token each later sentence starts in (a
        # decision point: a backtrack could come instead).
        weights = [self.decision_weight if d else 1.0 for d in turn.decision]
        edited = [i for i, j in enumerate(where) if segments[j]["role"] in _EDIT_ROLES]
        cut = len(head) + len(body) + len(tail) - self.max_length
        left = right = 0
        if cut > 0:
            if not edited:  # nothing to protect: keep the front, as any trainer would
                right = cut
            else:
                left = min(cut, edited[0])
                right = cut - left
                if right > len(body) - 1 - edited[-1] + len(tail):
                    return "edits_too_long"
        ids = head + body + tail
        trained = [False] * len(head) + flags + [True] * len(tail)
        weight = [1.0] * len(head) + weights + [1.0] * len(tail)
        if left:
            s = slice(len(head), len(head) + left)
            del ids[s], trained[s], weight[s]
        if right:
            ids, trained, weight = ids[:-right], trained[:-right], weight[:-right]
        if not any(trained[1:]):  # token 0 is never predicted
            return "truncated_all_trained"
        return Doc(ids, trained, config, len(head), weight, component(row), left + right)

    def redrawn(self, row: dict[str, Any], seed: int, epoch: int) -> list[dict[str, Any]]:
        """A recovery row's segments with k drawn afresh for (seed, epoch): the format stage's
        draw (pipeline/recovery.py) under the row's own k_max, seeded by row and epoch so a row's
        k does not depend on batch order and a resumed run redraws the same k."""
        meta = row.get("meta") or {}
        h = meta.get("harmful")
        cfg = self.recovery
        refusal = recovery.refusal_of(row["segments"], cfg.refusal_separator)
        if not h or refusal is None:
            return row["segments"]
        _, offsets = self.offsets(h)
        # The row's own bound when this tokenizer counts h as the format stage's did; a row made
        # for another tokenizer is redrawn under the configured cap in this one's tokens.
        same = meta.get("h_tokens") == len(offsets) and meta.get("k_max") is not None
        cap = meta["k_max"] if same else cfg.k_cap
        rng = seeds.rng(seed, row["id"], "recovery_k", epoch)
        segments, _, _, _ = recovery.draw(
            h, offsets, refusal, rng, cfg.p_zero, cap, cfg.refusal_separator
        )
        return segments


def component(row: dict[str, Any]) -> str:
    """The mixture component a row belongs to: its kind, except that a utility row whose answer a
    generator wrote (meta.generator set) is Qi et al.'s anchor (blend publishes it as utility)."""
    kind = row.get("kind") or ""
    if kind == "utility" and (row.get("meta") or {}).get("generator"):
        return "anchor"
    return kind


def _segment_at(starts: list[int], char: int) -> int:
    """Index of the piece holding `char`, given the pieces' start offsets (and the total end)."""
    lo, hi = 0, len(starts) - 2
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if starts[mid] <= char:
            lo = mid
        else:
            hi = mid - 1
    return lo
