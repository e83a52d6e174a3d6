"""One SFT row -> token ids and a per-token "trained" flag, from the row's `segments`.

The prompt is rendered with the model's chat template, or Gemma's turn format when it has none
(`<start_of_turn>user\\n{content}<end_of_turn>\\n<start_of_turn>model\\n`). Every piece of text
that came from data (prompt contents, segment texts, the recovery harmful answer) is tokenised with
`split_special_tokens=True`, so a literal "[RESET]" or "<end_of_turn>" typed by a user never becomes
that token's id (DESIGN §4: control tokens are privileged). Only `control` segments map to a
control-token id, directly. The template's own markup is tokenised with its special tokens.

Flags come from the segments (DESIGN §1): harmful spans and unsafe prefixes are context, the rest
of the assistant turn and its end-of-turn token are trained. `recovery` rows may redraw k each
epoch (Qi et al.): the untrained prefix becomes the first k target-tokenizer tokens of the harmful
answer h, joined at the token-id level to the row's refusal segment as published (with whatever
joint the format stage put on its trained side; none when k=0), as in the authors' code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline import seeds

# Gemma's turn format, for models without a chat template (the embedded Gemma 3 270M is a base
# model). Gemma has no system role: a system message is folded into the first user turn.
_TURN = "<start_of_turn>{role}\n"
_END = "<end_of_turn>\n"
_SENTINEL = "\x00RETRACE{}\x00"  # stands in for message contents when rendering a chat template


@dataclass
class Doc:
    ids: list[int]
    trained: list[bool]  # trained[i]: token i is a training target (predicted from tokens < i)
    config: str


class Encoder:
    """Tokenises rows for one tokenizer; `encode` returns a Doc, or a drop reason."""

    def __init__(self, tokenizer, max_length: int, control_tokens: tuple[str, ...]):
        self.tok = tokenizer
        self.max_length = max_length
        self.control = {t: tokenizer.convert_tokens_to_ids(t) for t in control_tokens}
        self.eot = self._end_of_turn_id()

    # --- pieces -----------------------------------------------------------------------------

    def text(self, s: str) -> list[int]:
        """Data text: special-token strings in it are split, never turned into special ids."""
        if not s:
            return []
        return self.tok(s, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def markup(self, s: str) -> list[int]:
        """Template markup: its special-token strings are the special tokens."""
        if not s:
            return []
        return self.tok(s, add_special_tokens=False, split_special_tokens=False)["input_ids"]

    def _end_of_turn_id(self) -> int:
        eot = self.tok.convert_tokens_to_ids("<end_of_turn>")
        if eot is None or eot == self.tok.unk_token_id:
            eot = self.tok.eos_token_id
        return eot

    # --- the conversation ---------------------------------------------------------------------

    def scaffold(self, prompt: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        """(ids before the assistant content, ids after it up to the end-of-turn token)."""
        msgs = [{"role": m["role"], "content": _SENTINEL.format(i)} for i, m in enumerate(prompt)]
        if self.tok.chat_template:
            msgs.append({"role": "assistant", "content": _SENTINEL.format(len(prompt))})
            rendered = self.tok.apply_chat_template(msgs, tokenize=False)
        else:
            rendered = self._gemma_turns(msgs)
        ids: list[int] = []
        rest = rendered
        for i, m in enumerate(prompt):
            before, rest = rest.split(_SENTINEL.format(i), 1)
            ids += self.markup(before) + self.text(m["content"])
        before, after = rest.split(_SENTINEL.format(len(prompt)), 1)
        ids += self.markup(before)
        tail = self.markup(after)
        # Train through the end-of-turn token and stop: generation stops there, so whatever the
        # template puts after it (a newline) is never produced by the model.
        if self.eot in tail:
            tail = tail[: tail.index(self.eot) + 1]
        return ids, tail

    def _gemma_turns(self, msgs: list[dict[str, str]]) -> str:
        out = self.tok.bos_token or ""
        system = ""
        for m in msgs:
            if m["role"] == "system":
                system = m["content"] + "\n\n"
                continue
            role = "model" if m["role"] == "assistant" else m["role"]
            out += _TURN.format(role=role) + system + m["content"] + _END
            system = ""
        return out + _TURN.format(role="model") + _SENTINEL.format(len(msgs)) + _END

    # --- a row --------------------------------------------------------------------------------

    def encode(
        self, row: dict[str, Any], config: str, redraw: tuple[int, int] | None = None
    ) -> Doc | str:
        """The row as a Doc, or a drop reason. `redraw=(seed, epoch)` redraws a recovery k."""
        head, tail = self.scaffold(row["prompt"])
        ids, trained = list(head), [False] * len(head)
        segments = row["segments"]
        meta = row.get("meta") or {}
        if redraw is not None and row.get("kind") == "recovery" and meta.get("harmful"):
            segments = [s for s in segments if s["role"] != "harmful"]
            prefix = self.recovery_prefix(meta["harmful"], row["id"], *redraw)
            ids += prefix
            trained += [False] * len(prefix)
            if not prefix and segments:
                # The format stage puts the prefix/refusal joint (a space or separator) on the
                # refusal's side; with no prefix the turn starts with the refusal itself.
                segments = [{**segments[0], "text": segments[0]["text"].lstrip()}, *segments[1:]]
        for seg in segments:
            if seg["role"] == "control":
                if seg["text"] not in self.control:
                    return "unknown_control_token"
                piece = [self.control[seg["text"]]]
            else:
                piece = self.text(seg["text"])
            ids += piece
            trained += [bool(seg["train"])] * len(piece)
        # A row with no trained segment would teach only its end of turn (ending right after an
        # unsafe prefix, say): drop it rather than train that.
        if not any(trained[1:]):  # token 0 is never predicted
            return "no_trained_tokens"
        ids += tail
        trained += [True] * len(tail)
        if len(ids) > self.max_length:
            # Truncation keeps the front; a row whose trained tokens all fall past the cut would
            # teach nothing (and could teach continuing an unsafe prefix), so it is dropped.
            ids, trained = ids[: self.max_length], trained[: self.max_length]
            if not any(trained[1:]):
                return "truncated_all_trained"
        return Doc(ids, trained, config)

    def recovery_prefix(self, harmful: str, row_id: str, seed: int, epoch: int) -> list[int]:
        """The first k tokens of h: P(k=0)=0.5, else k ~ U{1..min(100, |h|)} (Qi et al.).

        |h| is counted in this tokenizer's tokens with no end of sequence, so the prefix never
        includes h's end of sequence (the authors' code can). Seeded by row and epoch, so a row's
        k does not depend on batch order and a resumed run redraws the same k.
        """
        h = self.text(harmful)
        rng = seeds.rng(seed, row_id, "recovery_k", epoch)
        if not h or rng.random() < 0.5:
            return []
        return h[: rng.randint(1, min(100, len(h)))]
