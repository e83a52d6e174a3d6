"""Scripted models for decoder tests: the tiny Gemma with retrace's control tokens added, and a
logits processor that forces a given token sequence.

`control_model(dir)` writes the tiny random Gemma 3 of tiny_gemma.py with the control tokens added
as the trainer adds them (`trainer.tokens.add_control_tokens`, mean-resized embeddings) and, by
default, a sliding window of 4 on its first layer and full attention on its second, so a turn of a
few dozen tokens runs past the window (the fixture's own window, 64, never would here).
"""

from __future__ import annotations

from pathlib import Path

from tiny_gemma import build_tokenizer, save_tiny_gemma

from pipeline.backends import GeneratorSpec, load_generator
from pipeline.decode import DecodeConfig, Decoder
from trainer.tokens import add_control_tokens

FORCE = 1e4  # added to a scripted token's logit: it wins unless a bias sets it to -inf


def control_model(
    out_dir: Path,
    sliding_window: int = 4,
    seed: int = 0,
    extra: tuple[str, ...] = (),
    only: tuple[str, ...] | None = None,
) -> Path:
    """`only`: exactly these control tokens instead of the taxonomy's (a model trained on a
    subset of the policies)."""
    out_dir = Path(out_dir)
    tok = build_tokenizer(out_dir)
    if only is None:
        add_control_tokens(tok, extra)  # extra: e.g. RLBF's tokens, as a corpus using them adds
    else:
        tok.add_special_tokens(
            {"additional_special_tokens": list(only)}, replace_extra_special_tokens=False
        )
    tok.save_pretrained(out_dir)
    layers = ["sliding_attention", "full_attention"]
    return save_tiny_gemma(out_dir, tok, seed, sliding_window=sliding_window, layer_types=layers)


def decoder(model_dir: Path, batch_size: int = 4, scorer=None, **cfg) -> Decoder:
    gen = load_generator(GeneratorSpec(model=str(model_dir), batch_size=batch_size))
    return Decoder(gen, DecodeConfig(**cfg), scorer)


class Script:
    """Forces row r to emit `scripts[r]` in order (by its emitted count, taken-back tokens
    included); past its end a row samples freely. `seen` records (emitted, context, scores)."""

    def __init__(self, scripts: list[list[int]]) -> None:
        self.scripts = scripts
        self.seen: list[tuple[int, list[int], list[int], object]] = []

    def __call__(self, rows, scores):
        scores = scores.clone()
        for i, s in enumerate(rows):
            self.seen.append((s.row, list(s.emitted), list(s.context), scores[i].clone()))
            script = self.scripts[s.row]
            if len(s.emitted) < len(script):
                scores[i, script[len(s.emitted)]] += FORCE
        return scores


def memorised_model(
    out_dir: Path, user: str, turn: str, steps: int = 40, extra: tuple[str, ...] = ()
) -> Path:
    """The control model trained until it answers `user` with exactly `turn` (control tokens
    written inline, as in a corpus row) and <end_of_turn>: a backtracking model small enough to
    drive the real CLI, greedy decoding giving a known turn."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.decode.controls import Controls, PromptEncoder

    out_dir = control_model(out_dir, sliding_window=64, extra=extra)
    tok = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    prompt = PromptEncoder(tok, Controls.build(tok, {}, ())).prompt(
        [{"role": "user", "content": user}], "memorised"
    )
    target = tok(turn + "<end_of_turn>", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + target])
    labels = ids.clone()
    labels[0, : len(prompt)] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    torch.manual_seed(0)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(out_dir)
    return out_dir
