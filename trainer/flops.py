"""Model FLOPs per token and accelerator peaks, for MFU (docs/formats.md#trainer-facts).

MFU = (6·N + 12·L·H·d_head·T) · tokens/s ÷ peak FLOP/s, where N counts every weight that does a
matmul per token: the transformer blocks and the output layer. With tied embeddings the one shared
matrix *is* the output layer (for Gemma-2-2B it is 23% of 6N), so N is all parameters; with untied
ones the input embedding (a lookup, no FLOPs) is left out. T is the row length of the batch: the
attention term counts the full causal square, as nanochat and PaLM do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Dense bf16 peaks (no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_BF16 = {
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "4090": 165e12,
}


def flops_per_token(model) -> Callable[[int], float]:
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    if not getattr(cfg, "tie_word_embeddings", False):
        n -= model.get_input_embeddings().weight.numel()
    heads_dim = cfg.num_attention_heads * getattr(
        cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads
    )
    layers = cfg.num_hidden_layers
    return lambda seq_len: 6 * n + 12 * layers * heads_dim * seq_len


def peak_flops(device: torch.device) -> float | None:
    """The bf16 dense peak of a CUDA device, or None where unknown (CPUs: no MFU is shown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)
