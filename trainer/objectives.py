"""Training objectives as loss functions over trained positions, sharing one loop.

Each returns the *sum* of its per-token losses over a micro-batch's trained positions; the loop
divides by the trained tokens of the whole optimizer step, so gradient accumulation is exact
(FORMATS "Trainer facts": the v4.46 transformers fix). Logits exist only for trained positions,
a `loss_chunk` of them at a time, in fp32, each chunk recomputed in backward (activation
checkpointing) so a 262k vocabulary never holds more than one chunk of logits.

- `sft`: cross-entropy.
- `constrained` (Qi et al., token-wise constrained SFT): per token t (t counts trained tokens of
  the document, from 1) the loss is (2/β_t)·(−log σ(β_t·(log π(y_t) − log π_ref(y_t)))), β₁=0.5,
  β₂…₅=2.0, β>₅=0.1. Its value is what we report; its gradient is the authors' code form,
  −w·∇log π with w = clamp(2·(1−σ(β_t·Δ_t)), min=1e-3) detached (equal up to the clamp).
- `controlled` (BSAFE-style weighted distillation, schedule chosen here since the paper leaves it
  open): at a trained position whose target is a control token, or where the reference puts at
  least `control_threshold` of its probability on control tokens, α·cross-entropy; elsewhere
  KL(π_ref ‖ π). α is constant over training.

Reference log-probs come from a frozen copy of the start model run on the same micro-batch under
no_grad: the same numbers a table computed once before training would hold, and the only way to
have them when recovery rows redraw their prefix every epoch (and KL needs the whole distribution).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainer.batching import IGNORE, Batch


@dataclass(frozen=True)
class Heads:
    """Output layer (and the reference's) as functions hidden -> fp32 logits."""

    model: Callable[[torch.Tensor], torch.Tensor]
    reference: Callable[[torch.Tensor], torch.Tensor] | None = None


def logits_fn(model) -> Callable[[torch.Tensor], torch.Tensor]:
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)

    def logits(h: torch.Tensor) -> torch.Tensor:
        z = head(h).float()
        return torch.tanh(z / cap) * cap if cap else z

    return logits


def betas_for(
    index: torch.Tensor, betas: tuple[float, float, float], dtype: torch.dtype
) -> torch.Tensor:
    """β_t for 1-based trained-token indices: betas[0] at t=1, betas[1] at t=2..5, else betas[2]."""
    b = torch.full(index.shape, betas[2], dtype=dtype, device=index.device)
    b = torch.where(index <= 5, torch.tensor(betas[1], dtype=dtype, device=index.device), b)
    return torch.where(index == 1, torch.tensor(betas[0], dtype=dtype, device=index.device), b)


def constrained_token_loss(
    logp: torch.Tensor, ref_logp: torch.Tensor, beta: torch.Tensor
) -> torch.Tensor:
    """Per-token constrained loss: the paper's value, the authors' gradient."""
    delta = logp - ref_logp
    value = (2.0 / beta) * F.softplus(-beta * delta)  # −log σ(x) = softplus(−x)
    w = torch.clamp(2.0 * (1.0 - torch.sigmoid(beta * delta)), min=1e-3).detach()
    surrogate = -w * logp
    return value.detach() + surrogate - surrogate.detach()


class Objective:
    def __init__(self, name: str, cfg, control_ids: list[int]):
        self.name = name
        self.betas = tuple(cfg.betas)
        self.alpha = cfg.alpha
        self.threshold = cfg.control_threshold
        self.chunk = cfg.loss_chunk
        self.control_ids = control_ids

    @property
    def needs_reference(self) -> bool:
        return self.name != "sft"

    def __call__(
        self, hidden: torch.Tensor, ref_hidden: torch.Tensor | None, batch: Batch, heads: Heads
    ) -> torch.Tensor:
        """Sum of per-token losses over the trained positions of `batch`."""
        sel = batch.targets != IGNORE
        h, t = hidden[sel], batch.targets[sel]
        rh = ref_hidden[sel] if ref_hidden is not None else None
        index = batch.trained_index[sel]
        total = hidden.new_zeros((), dtype=torch.float32)
        for i in range(0, t.numel(), self.chunk):
            s = slice(i, i + self.chunk)
            ref = rh[s] if rh is not None else None
            total = total + checkpoint(
                self._chunk, h[s], t[s], ref, index[s], heads, use_reentrant=False
            )
        return total

    def _chunk(self, h, t, ref_h, index, heads: Heads) -> torch.Tensor:
        logits = heads.model(h)
        if self.name == "sft":
            return F.cross_entropy(logits, t, reduction="sum")
        logp_all = torch.log_softmax(logits, -1)
        with torch.no_grad():
            ref_all = torch.log_softmax(heads.reference(ref_h), -1)
        logp = logp_all.gather(1, t[:, None])[:, 0]
        if self.name == "constrained":
            ref_logp = ref_all.gather(1, t[:, None])[:, 0]
            beta = betas_for(index, self.betas, logp.dtype)
            return constrained_token_loss(logp, ref_logp, beta).sum()
        # controlled
        ids = torch.tensor(self.control_ids, device=t.device)
        p_control = ref_all[:, ids].exp().sum(-1)
        weighted = torch.isin(t, ids) | (p_control >= self.threshold)
        kl = (ref_all.exp() * (ref_all - logp_all)).sum(-1)
        return torch.where(weighted, -self.alpha * logp, kl).sum()
