"""Privileged tokenisation, the one rule the trainer, the `-tok` twins and the decoder share.

Every piece of text that came from data (a prompt's contents, segment texts, what a user types) is
tokenised with `split_special_tokens=True`, so a literal "[RESET]" or "<end_of_turn>" in it never
becomes that token's id: control tokens are privileged. Only the chat template's own markup is
tokenised with its special tokens. A conversation's scaffold (the ids before the assistant's
content and after it, up to its end-of-turn token) is built that way from the model's chat
template, or Gemma's turn format (prompts/chat/gemma.jinja) when it has none.
"""

from __future__ import annotations

_SENTINEL = "\x00RETRACE{}\x00"  # stands in for message contents when rendering a chat template
_SCAFFOLDS = 65536  # prompts whose token ids are kept (a few MB)


class TextEncoder:
    """Data text, template markup and prompt scaffolds as ids, for one fast tokenizer."""

    def __init__(self, tokenizer) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError(
                "train: the tokenizer must be a fast (Rust) tokenizer, which reports char offsets; "
                "use a model folder that ships tokenizer.json"
            )
        self.tok = tokenizer
        self._markup: dict[str, list[int]] = {}
        self._scaffolds: dict[tuple, tuple[list[int], list[int]]] = {}
        self.eot = self._end_of_turn_id()

    # --- pieces -----------------------------------------------------------------------------

    def text(self, s: str) -> list[int]:
        """Data text: special-token strings in it are split, never turned into special ids."""
        if not s:
            return []
        return self.tok(s, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def offsets(self, s: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Data text as ids and their char spans."""
        if not s:
            return [], []
        enc = self.tok(
            s, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True
        )
        return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]

    def markup(self, s: str) -> list[int]:
        """Template markup: its special-token strings are the special tokens."""
        if not s:
            return []
        if s not in self._markup:  # a handful of distinct strings, met on every row
            ids = self.tok(s, add_special_tokens=False, split_special_tokens=False)["input_ids"]
            self._markup[s] = ids
        return list(self._markup[s])

    def _end_of_turn_id(self) -> int:
        eot = self.tok.convert_tokens_to_ids("<end_of_turn>")
        if eot is None or eot == self.tok.unk_token_id:
            eot = self.tok.eos_token_id
        return eot

    # --- the conversation ---------------------------------------------------------------------

    def scaffold(self, prompt: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        """(ids before the assistant content, ids after it up to the end-of-turn token)."""
        key = (self.tok.chat_template, *((m["role"], m["content"]) for m in prompt))
        if key not in self._scaffolds:
            if len(self._scaffolds) >= _SCAFFOLDS:  # rows repeat every epoch: keep the recent
                self._scaffolds.pop(next(iter(self._scaffolds)))
            self._scaffolds[key] = self._scaffold(prompt)
        head, tail = self._scaffolds[key]
        return list(head), list(tail)

    def _scaffold(self, prompt: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        msgs = [{"role": m["role"], "content": _SENTINEL.format(i)} for i, m in enumerate(prompt)]
        msgs.append({"role": "assistant", "content": _SENTINEL.format(len(prompt))})
        if self.tok.chat_template:
            rendered = self.tok.apply_chat_template(msgs, tokenize=False)
        else:
            from pipeline.prompting import CHAT_FALLBACK, render_prompt

            rendered = render_prompt(
                CHAT_FALLBACK,
                messages=msgs,
                bos_token=self.tok.bos_token or "",
                add_generation_prompt=False,
            )
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
