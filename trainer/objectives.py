"""Training objectives as loss functions over trained positions, sharing one loop.

Each returns the *sum* of its per-token losses over a micro-batch's trained positions; the loop
divides by the trained tokens of the whole optimizer step, so gradient accumulation is exact
(docs/formats.md#trainer-facts: the v4.46 transformers fix). Logits exist only for trained
positions, a `loss_chunk` of them at a time, in fp32, each chunk recomputed in backward (activation
checkpointing) so a 262k vocabulary never holds more than one chunk of logits.

- `sft`: cross-entropy.
- `constrained` (Qi et al., token-wise constrained SFT): per token t (t counts trained tokens of
  the document, from 1) the loss is (2/β_t)·(−log σ(β_t·(log π(y_t) − log π_ref(y_t)))), β₁=0.5,
  β₂…₅=2.0, β>₅=0.1. Its value is what we report; its gradient is the authors' code form,
  −w·∇log π with w = clamp(2·(1−σ(β_t·Δ_t)), min=1e-3) detached (equal up to the clamp).
- `controlled` (BSAFE's controlled fine-tuning, for downstream fine-tuning of a model that already
  backtracks; docs/formats.md#controlled): cross-entropy on every trained token, as `sft`, plus
  α_t·KL(π_ref ‖ π) at each trained position, α_t = kl_alpha·clamp((m_t − lo)/(hi − lo), 0, 1)
  where m_t is the reference's probability mass on the control tokens at t and (lo, hi) =
  `kl_mass` (lo = hi: a step at lo). α_t is zero where backtracking is not live, so the task is
  learned and only backtracking-relevant positions are held to the reference (the paper leaves the
  schedule open; docs/formats.md#controlled). The loop logs the KL term and the share of positions
  with α_t > 0.

Every objective multiplies each token's loss by the Doc's weight (`decision_weight` on control
targets and on the token a sentence starts in, trainer/encode.py; 1 elsewhere).

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


def kl_weight(mass: torch.Tensor, alpha: float, lo: float, hi: float) -> torch.Tensor:
    """α_t of `controlled` from the reference's control-token mass m_t."""
    if hi <= lo:
        return torch.where(mass >= lo, alpha, 0.0).to(mass.dtype)
    return alpha * torch.clamp((mass - lo) / (hi - lo), 0.0, 1.0)


class Objective:
    def __init__(self, name: str, cfg, control_ids: list[int]):
        self.name = name
        self.betas = tuple(cfg.betas)
        self.alpha = cfg.kl_alpha
        self.mass = tuple(cfg.kl_mass)
        self.chunk = cfg.loss_chunk
        self.control_ids = control_ids
        # Summed over the micro-batches of a step by the caller, then reset: the KL term of
        # `controlled` and how many positions it weighted.
        self.stats = {"kl": 0.0, "kl_positions": 0, "alpha": 0.0}

    @property
    def needs_reference(self) -> bool:
        return self.name != "sft"

    def __call__(
        self, hidden: torch.Tensor, ref_hidden: torch.Tensor | None, batch: Batch, heads: Heads
    ) -> torch.Tensor:
        """Sum of weighted per-token losses over the trained positions of `batch`."""
        sel = batch.targets != IGNORE
        h, t, w = hidden[sel], batch.targets[sel], batch.weights[sel]
        rh = ref_hidden[sel] if ref_hidden is not None else None
        index = batch.trained_index[sel]
        total = hidden.new_zeros((), dtype=torch.float32)
        for i in range(0, t.numel(), self.chunk):
            s = slice(i, i + self.chunk)
            ref = rh[s] if rh is not None else None
            loss, kl, n, alpha = checkpoint(
                self._chunk, h[s], t[s], w[s], ref, index[s], heads, use_reentrant=False
            )
            total = total + loss
            # Tensors: no device sync per chunk.
            self.stats["kl"] = self.stats["kl"] + kl
            self.stats["kl_positions"] = self.stats["kl_positions"] + n
            self.stats["alpha"] = self.stats["alpha"] + alpha
        return total

    def _chunk(self, h, t, w, ref_h, index, heads: Heads):
        """(weighted loss sum, KL term sum, positions the KL term weights, Σα_t) of one chunk."""
        logits = heads.model(h)
        none = torch.zeros((), device=h.device)
        if self.name == "sft":
            return (w * F.cross_entropy(logits, t, reduction="none")).sum(), none, none, none
        logp_all = torch.log_softmax(logits, -1)
        with torch.no_grad():
            ref_all = torch.log_softmax(heads.reference(ref_h), -1)
        logp = logp_all.gather(1, t[:, None])[:, 0]
        if self.name == "constrained":
            ref_logp = ref_all.gather(1, t[:, None])[:, 0]
            beta = betas_for(index, self.betas, logp.dtype)
            return (w * constrained_token_loss(logp, ref_logp, beta)).sum(), none, none, none
        # controlled: cross-entropy everywhere, plus the KL where backtracking is live
        ids = torch.tensor(self.control_ids, device=t.device, dtype=torch.long)
        mass = ref_all[:, ids].exp().sum(-1)
        alpha = kl_weight(mass, self.alpha, *self.mass)
        kl = (ref_all.exp() * (ref_all - logp_all)).sum(-1)
        term = (w * alpha * kl).sum()
        return (w * -logp).sum() + term, term.detach(), (alpha > 0).sum(), alpha.sum()
