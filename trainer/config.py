"""The `train:` config section: every knob of the bundled trainer, with defaults for the small
offline default run (a tiny random Gemma 3 on the default corpus, on a CPU).

A plain strict pydantic model: the trainer runs without the engine (`python -m trainer.train`);
the `train` stage adds only the engine's failure bound (stages/train.py). Paper-scale values
(configs/paper.yaml) are noted beside each group.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline import kinds

OBJECTIVES = ("sft", "constrained", "controlled")
# Mixture components `per_step` may name: every SFT kind's (pipeline/kinds.py), Qi et al.'s
# anchor included (trainer.encode.component tells it from other utility rows).
COMPONENTS = kinds.SFT_COMPONENTS


class RecoveryDraw(BaseModel):
    """The format stage's recovery draw, for the per-epoch k redraw, under format's key names.
    None takes the value the folder's retrace.json hands over (pipeline/handoff.py: what
    format drew with), and the log says which was used."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    p_zero: float | None = Field(None, ge=0, le=1)
    k_cap: int | None = Field(None, ge=1)
    refusal_separator: str | None = None


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- model --------------------------------------------------------------------------------
    # A Hub id, a local HF folder, "embedded" (the bundled Gemma 3 270M), or "random:<size>" (a
    # random-init Gemma 3 of a named size: tiny, 270m, 1b) whose tokenizer comes from `tokenizer`.
    model: str = "random:tiny"
    revision: str | None = None
    # Only for random models: a folder, a Hub id, "embedded", or "corpus:<N>" (a byte-level BPE
    # of N entries trained on the dataset's text; trainer/tokens.py says why).
    tokenizer: str = "embedded"
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
    # Qi et al. redraw k for recovery rows every epoch, with the format stage's own draw.
    redraw_k: bool = True
    recovery: RecoveryDraw = Field(default_factory=RecoveryDraw)
    # Rows per optimizer step of each mixture component, stratified (Qi et al.: recovery 16,
    # anchor 64 holds α = 0.2 in every step). None: `configs` weights, interleaved at random,
    # `batch_size x grad_accum` rows of packs per step.
    per_step: dict[str, int] | None = None
    eval_rows: int = 64  # validation rows per config for eval loss (0: no eval)

    # --- objective ------------------------------------------------------------------------------
    objective: Literal["sft", "constrained", "controlled"] = "sft"
    # constrained (Qi et al. token-wise): beta for trained token 1, tokens 2..5, and the rest.
    betas: tuple[float, float, float] = (0.5, 2.0, 0.1)
    # controlled (BSAFE): cross-entropy + α_t·KL(ref || model), α_t = kl_alpha x clamp((m_t - lo)
    # / (hi - lo), 0, 1), m_t the reference's mass on the control tokens, (lo, hi) = kl_mass.
    kl_alpha: float = Field(1.0, ge=0)
    kl_mass: tuple[float, float] = (0.01, 0.1)
    reference: str | None = None  # reference for constrained/controlled; None: the start model
    # Every objective: this loss weight on control-token targets and on the token each later
    # sentence starts in (pipeline/text.py's sentences), where a backtrack could come instead; 1
    # elsewhere.
    decision_weight: float = Field(1.0, gt=0)

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

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer(cls, v: str) -> str:
        if v.startswith("corpus:"):
            size = v.split(":", 1)[1]
            if not size.isdigit() or int(size) < 300:
                raise ValueError("corpus:<N> needs N >= 300 (the 256 bytes and the special tokens)")
        return v

    @field_validator("lr", "grad_clip")
    @classmethod
    def _above_zero(cls, v: float) -> float:
        if not v > 0:
            raise ValueError("must be > 0")
        return v

    @field_validator("warmup_steps", "save_every", "eval_every", "eval_rows", "shuffle_buffer")
    @classmethod
    def _not_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError("must be >= 0")
        return v

    @field_validator("min_lr_ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        if not 0 <= v <= 1:
            raise ValueError("must be between 0 and 1")
        return v

    @field_validator("adam_betas")
    @classmethod
    def _adam(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(b > 0 for b in v):
            raise ValueError("each beta must be > 0")
        return v

    @field_validator("kl_mass")
    @classmethod
    def _mass(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] <= v[1] <= 1:
            raise ValueError("must be [lo, hi] with 0 <= lo <= hi <= 1")
        return v

    @field_validator("per_step")
    @classmethod
    def _per_step(cls, v: dict[str, int] | None) -> dict[str, int] | None:
        if v is None:
            return v
        unknown = sorted(set(v) - set(COMPONENTS))
        if unknown:
            raise ValueError(f"unknown component(s) {unknown}; known: {', '.join(COMPONENTS)}")
        if not v or any(n < 1 for n in v.values()):
            raise ValueError("name at least one component, each with >= 1 row per step")
        return v

    @model_validator(mode="after")
    def _per_step_configs(self) -> TrainConfig:
        if self.per_step is not None and any(w != 1 for w in self.configs.values()):
            raise ValueError(
                "train.per_step sets the rows of each step; train.configs then only names the "
                "configs to read: give each weight 1"
            )
        return self
