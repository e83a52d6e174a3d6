"""The `train:` config section: every knob of the bundled trainer, with defaults for the small
offline default run (a tiny random Gemma 3 on the default corpus, on a CPU).

Paper-scale values (configs/paper.yaml) are noted beside each group.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pipeline.stage import StageConfig

OBJECTIVES = ("sft", "constrained", "controlled")


class TrainConfig(StageConfig):
    # --- model --------------------------------------------------------------------------------
    # A Hub id, a local HF folder, "embedded" (the bundled Gemma 3 270M), or "random:<size>" (a
    # random-init Gemma 3 of a named size: tiny, 270m, 1b) whose tokenizer comes from `tokenizer`.
    model: str = "random:tiny"
    revision: str | None = None
    tokenizer: str = "embedded"  # only for random models: a folder, a Hub id or "embedded"
    # Control tokens are added as new special tokens, their embeddings drawn around the mean of the
    # existing ones (transformers' mean_resizing); Gemma's <unusedN> slots are not re-purposed, so
    # the same recipe works for any model.
    attn_implementation: str = "sdpa"  # "sdpa" | "eager" | "flash_attention_2" | "flex_attention"
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the decoder (worth it with packing: static shapes)

    # --- data -----------------------------------------------------------------------------------
    data: str | None = None  # a dataset folder; None trains on this run's published folder
    # Configs to train on and their weights: each epoch takes weight x rows of a config (2.0 =
    # every row twice, 0.5 = half of them, a fresh half each epoch), interleaved at random.
    configs: dict[str, float] = Field(default_factory=lambda: {"mixture": 1.0})
    max_length: int = 512  # Qi et al.: 512
    pack: bool = True  # pack documents into rows of max_length; False: length-bucketed padding
    buffer_rows: int = 1024  # rows planned together into length buckets or packs
    shuffle_buffer: int = 4096  # streaming shuffle buffer per config, in rows
    # Qi et al. redraw k for recovery rows every epoch: P(k=0)=0.5, else k ~ U{1..min(100, |h|)}.
    redraw_k: bool = True
    eval_rows: int = 64  # validation rows per config for eval loss (0: no eval)

    # --- objective ------------------------------------------------------------------------------
    objective: Literal["sft", "constrained", "controlled"] = "sft"
    # constrained (Qi et al. token-wise): beta for trained token 1, tokens 2..5, and the rest.
    betas: tuple[float, float, float] = (0.5, 2.0, 0.1)
    # controlled (BSAFE-style): cross-entropy weighted by `alpha` where the target is a control
    # token or the reference puts at least `control_threshold` on control tokens; KL(ref || model)
    # at every other trained position.
    alpha: float = 2.0
    control_threshold: float = 0.05
    reference: str | None = (
        None  # reference model for constrained/controlled; None: the start model
    )

    # --- optimisation ---------------------------------------------------------------------------
    steps: int = 40  # optimizer steps (Qi: 10 epochs x 256 triplets / 64 per step = 40 steps)
    batch_size: int = 4  # rows per micro-batch (packed: rows of max_length tokens)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3  # tiny random model; fine-tuning a real model: 2e-5 (Qi et al.)
    min_lr_ratio: float = 0.1  # cosine decays to lr x this
    warmup_steps: int = 5  # Qi et al.: 0 for SFT, 10 for constrained SFT
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.95)  # Qi: (0.9, 0.999); constrained (0.5, 0.999)
    grad_clip: float = 1.0
    loss_chunk: int = 512  # positions per fp32 loss chunk: its logits take chunk x vocab x 4 B

    # --- checkpoints and logs -------------------------------------------------------------------
    save_every: int = 0  # optimizer steps between checkpoints (0: only the final one)
    keep_checkpoints: int = 2
    eval_every: int = 0  # optimizer steps between evals (0: only at the end)
    seed: int | None = None  # None: the run seed
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"

    @field_validator("configs")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("train.configs is empty; name at least one config, e.g. {mixture: 1}")
        bad = {k: w for k, w in v.items() if w <= 0}
        if bad:
            raise ValueError(f"train.configs weights must be > 0; got {bad}")
        return v

    @field_validator("steps", "batch_size", "grad_accum", "max_length", "buffer_rows", "loss_chunk")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v
