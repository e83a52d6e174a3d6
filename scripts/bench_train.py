"""Trainer throughput: tokens/s and MFU of the bundled trainer's training step.

Runs the trainer's own pieces (packing and collation, the decoder forward, the chunked fp32 loss,
AdamW, clipping) on random token ids, so it needs no data and no tokenizer: documents of random
length (64..1024 tokens, about half of each trained) packed into rows of --seq-len.

    python scripts/bench_train.py                      # CPU: a tiny model, a few steps
    python scripts/bench_train.py --size 1b            # CUDA: ~1B-param Gemma 3, bf16, packed
    python scripts/bench_train.py --size 1b --compile --batch-size 8

MFU = (6N + 12·L·H·d_head·T) · tokens/s ÷ peak (trainer/flops.py; N counts the tied output
layer). The peak comes from the GPU name (H100/H200: 989e12 bf16 dense); on a CPU pass
--peak-flops to get an MFU at all.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import time

import torch

from trainer import tokens
from trainer.batching import collate, plan
from trainer.config import TrainConfig
from trainer.encode import Doc
from trainer.flops import flops_per_token, peak_flops
from trainer.objectives import Heads, Objective, logits_fn
from trainer.train import _hidden


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", default="1b" if cuda else "tiny", choices=list(tokens.RANDOM_SIZES))
    ap.add_argument("--vocab", type=int, default=262_144 + 16, help="Gemma 3 + control tokens")
    ap.add_argument("--seq-len", type=int, default=4096 if cuda else 512)
    ap.add_argument("--batch-size", type=int, default=4 if cuda else 2, help="packed rows")
    ap.add_argument("--steps", type=int, default=10 if cuda else 3, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3 if cuda else 1, help="untimed steps")
    ap.add_argument("--loss-chunk", type=int, default=4096 if cuda else 512)
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--peak-flops", type=float, help="override the device's bf16 peak FLOP/s")
    args = ap.parse_args()

    # ---------------------------------------------------------------------------- model
    device = torch.device("cuda" if cuda else "cpu")
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=args.vocab, max_position_embeddings=32768, tie_word_embeddings=True,
        attn_implementation=args.attn, **tokens.RANDOM_SIZES[args.size],
    )  # fmt: skip
    model = Gemma3ForCausalLM(config).to(device)
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    decoder = torch.compile(model.get_decoder()) if args.compile else model.get_decoder()
    heads = Heads(logits_fn(model))
    loss_fn = Objective("sft", TrainConfig(loss_chunk=args.loss_chunk), [])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if cuda else {}))
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    )
    n_params = sum(p.numel() for p in model.parameters())
    flops_tok = flops_per_token(model)(args.seq_len)
    peak = args.peak_flops or peak_flops(device)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{args.size}: {n_params / 1e9:.3f}B params (tied output layer counted), {name}")

    # ---------------------------------------------------------------------------- data
    rng = random.Random(0)

    def batch():
        docs = []
        while sum(len(d.ids) for d in docs) < args.batch_size * args.seq_len * 0.95:
            n = rng.randint(64, min(1024, args.seq_len))
            cut = rng.randint(1, n - 1)
            ids = [rng.randrange(args.vocab) for _ in range(n)]
            docs.append(Doc(ids, [False] * cut + [True] * (n - cut), "bench"))
        rows = plan(docs, args.batch_size, args.seq_len, True, None)[0]
        return collate(rows, 0).to(device)

    # ---------------------------------------------------------------------------- steps
    times, toks = [], []
    for i in range(args.warmup + args.steps):
        b = batch()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast():
            loss = loss_fn(_hidden(decoder, b), None, b, heads) / b.n_trained
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(dt)
            toks.append(b.n_tokens)
        print(f"step {i + 1}: loss {loss.item():.3f}, {b.n_tokens / dt:,.0f} tok/s")

    tps = sum(toks) / sum(times)
    mfu = f"{100 * flops_tok * tps / peak:.1f}%" if peak else "n/a (pass --peak-flops)"
    mem = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""
    print(
        f"tokens/s {tps:,.0f} | MFU {mfu} | seq {args.seq_len} x {args.batch_size} packed rows"
        f" | compile {args.compile} | attn {args.attn}{mem}"
    )


if __name__ == "__main__":
    main()
