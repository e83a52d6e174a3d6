"""Train a backtracking model on a published retrace dataset folder.

CPU example (a tiny random Gemma 3 with a 2k-entry BPE built for the corpus, as `make train`
does; with the embedded 262k tokenizer nearly all the compute is the output layer):

    python -m trainer.train --data runs/default/publish/files --out /tmp/ckpt \\
        --set model=random:tiny --set tokenizer=corpus:2048 --set steps=300

Fine-tune the embedded Gemma 3 270M on a GPU, packed, with the constrained objective:

    python -m trainer.train --data DIR --out DIR --set model=embedded --set lr=2e-5 \\
        --set objective=constrained --set adam_betas=[0.5,0.999] --set warmup_steps=10

Through the pipeline: `retrace train [--set train.k=v]` or `make train`. Rerunning with the same
--out resumes from the latest checkpoint and continues exactly as an uninterrupted run would.
Writes <out>/checkpoints/step-N/ (HF model + tokenizer with the control tokens + trainer_state.pt),
<out>/final/ (HF model + tokenizer) and <out>/log.jsonl (one record per step and per eval: loss,
the step's rows and trained-token share per component, rows dropped or cut, and for `controlled`
the KL term and the share of positions it weights). A checkpoint belongs to its data: resuming
on other data, or a second training into the same --out, is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from pydantic import ValidationError

from pipeline import taxonomy
from trainer import data as data_mod
from trainer import tokens
from trainer.batching import IGNORE
from trainer.config import TrainConfig
from trainer.data import DataError, Position, eval_batches, open_folder, train_steps
from trainer.encode import Encoder
from trainer.flops import flops_per_token, peak_flops
from trainer.objectives import Heads, Objective, logits_fn

# Settings that may change between an interrupted run and its resume without changing the result
# (`data` may move: the data's identity is checked by content instead).
_RESUME_FREE = ("data", "save_every", "keep_checkpoints", "eval_every", "device")


def train(
    cfg: TrainConfig,
    data: Path,
    out: Path,
    seed: int = 0,
    stop_after: int | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Train per `cfg` on the dataset folder `data`; checkpoints and logs in `out`.

    `stop_after` ends this call after that many optimizer steps (for preemptible jobs and tests);
    a later call with the same `out` and data resumes. Returns the final model folder (or the
    checkpoint it stopped at). Two trainings into one `out` at once are refused.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with _lock(out):
        return _train(cfg, Path(data), out, seed, stop_after, log)


def _train(cfg, data: Path, out: Path, seed: int, stop_after: int | None, log) -> Path:
    # ---------------------------------------------------------------------------- setup
    seed = cfg.seed if cfg.seed is not None else seed
    sources = open_folder(data, cfg.configs)  # fails here, before any model is loaded
    handed = data_mod.handed_off(data)  # retrace.json: what publish hands the trainer
    have = data_mod.component_rows(sources)
    if cfg.per_step:
        missing = [c for c in cfg.per_step if not have[c]]
        if missing:
            raise DataError(
                f"train.per_step names {missing}, but {data} has no such rows (it has "
                f"{dict(have)}); fix train.per_step or train.configs"
            )
        left_out = {c: n for c, n in have.items() if c not in cfg.per_step}
        if left_out:
            log(f"per_step trains only {', '.join(cfg.per_step)}; not trained: {left_out}")
    # Control tokens the corpus uses beyond the taxonomy (a corpus from elsewhere may name its own
    # policies) become control tokens too, said here, rather than rows dropped in silence; all
    # in tokens.control_tokens' one order, the `-tok` twins' too.
    used = tuple(data_mod.corpus_controls(handed, sources, data))
    extra = [t for t in used if t not in taxonomy.load().all_tokens]
    if extra:
        log(f"control tokens from the corpus, not in the taxonomy, added: {', '.join(extra)}")
    data_id = data_mod.identity(sources)
    draw, draw_source = data_mod.recovery_draw(handed, cfg, data)
    device = _device(cfg.device)
    cuda = device.type == "cuda"
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    )
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ---------------------------------------------------------------------------- model
    resume, state, model, tok = _resume_point(out, cfg, seed, data_id, data, log)
    if resume is not None:
        log(f"resuming from {resume} (step {state['step']})")
    else:
        state = None
        model, tok = tokens.load_for_training(
            cfg.model,
            cfg.tokenizer,
            seed,
            cfg.revision,
            cfg.attn_implementation,
            used,
            lambda: data_mod.corpus_text(sources),
        )
    tokens.set_generation_stops(model, tok)  # saved with every checkpoint
    objective = Objective(cfg.objective, cfg, tokens.control_ids(tok, used))
    reference = _reference(cfg, tok, seed, device, used) if objective.needs_reference else None
    model.to(device)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    decoder = model.get_decoder()
    forward = torch.compile(decoder) if cfg.compile else decoder
    heads = Heads(logits_fn(model), logits_fn(reference) if reference is not None else None)
    controls = tokens.control_tokens(used)
    encoder = Encoder(tok, cfg.max_length, controls, cfg.decision_weight, draw)
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"model {cfg.model}: {n_params / 1e6:.1f}M params, vocab {len(tok)}, device {device}, "
        f"objective {cfg.objective}, configs "
        + ", ".join(f"{s.config} ({s.rows} rows x {s.weight:g})" for s in sources)
    )
    log(draw_source)
    recounts = data_mod.rlbf_recounts(sources, tok)
    if recounts:
        trained = cfg.tokenizer if cfg.model.startswith("random:") else cfg.model
        log(f"rlbf: [BACKTRACK_BY_<n>] re-counted in the trained tokenizer {trained}: {recounts}")

    # ---------------------------------------------------------------------------- optimizer
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0},
        ],
        lr=cfg.lr,
        betas=tuple(cfg.adam_betas),
        **({"fused": True} if cuda else {}),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    step, position, counts = 0, Position(), Counter()
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, position, counts = state["step"], Position(**state["position"]), state["counts"]
        _set_rng(state["rng"])
        _truncate_log(out / "log.jsonl", step, log)
    else:
        torch.manual_seed(seed)
        (out / "log.jsonl").unlink(missing_ok=True)  # a fresh run starts a fresh log
    flops_tok = flops_per_token(model)
    peak = peak_flops(device)

    # ---------------------------------------------------------------------------- loop
    steps = train_steps(sources, encoder, cfg, seed, position, counts)
    journal = (out / "log.jsonl").open("a")
    model.train()
    while step < cfg.steps:
        t0 = time.perf_counter()
        taken = next(steps)
        # Normalise by the trained tokens of the whole step, not per micro-batch
        # (docs/formats.md#trainer-facts).
        n_step = sum(b.n_trained for b in taken.batches)
        loss_sum = torch.zeros((), device=device)
        objective.stats = {"kl": 0.0, "kl_positions": 0, "alpha": 0.0}
        flops = 0.0
        for batch in taken.batches:
            batch = batch.to(device)
            with autocast():
                hidden = _hidden(forward, batch)
                ref_hidden = None
                if reference is not None:
                    with torch.no_grad():
                        ref_hidden = _hidden(reference.get_decoder(), batch)
                loss = objective(hidden, ref_hidden, batch, heads)
            (loss / n_step).backward()
            loss_sum += loss.detach()
            flops += batch.n_tokens * flops_tok(batch.input_ids.shape[1])
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        position = taken.position
        loss_value = loss_sum.item() / n_step  # .item() syncs, so dt below is real time
        dt = time.perf_counter() - t0
        n_tok = sum(b.n_tokens for b in taken.batches)
        mfu = flops / dt / peak if peak else None
        n_rows = sum(taken.rows.values())
        record = {
            "step": step,
            "epoch": position.epoch,
            "loss": loss_value,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens": n_tok,
            "trained_tokens": n_step,
            "tokens_per_s": n_tok / dt,
            "mfu": mfu,
            # The realised mixture of this step, by documents and by trained tokens.
            "rows": dict(sorted(taken.rows.items())),
            "row_share": {c: n / n_rows for c, n in sorted(taken.rows.items())},
            "token_share": {c: n / n_step for c, n in sorted(taken.tokens.items())},
            "dropped": sum(n for k, n in counts.items() if not k.endswith(":cut_to_max_length")),
            "cut": sum(n for k, n in counts.items() if k.endswith(":cut_to_max_length")),
        }
        if cfg.objective == "controlled":
            # The KL term per trained token, the share of trained positions it weights (α_t > 0)
            # and their mean α_t.
            record["kl"] = float(objective.stats["kl"]) / n_step
            record["kl_share"] = int(objective.stats["kl_positions"]) / n_step
            positions = max(1, int(objective.stats["kl_positions"]))
            record["kl_mean_alpha"] = float(objective.stats["alpha"]) / positions
        journal.write(json.dumps(record) + "\n")
        journal.flush()
        shares = " ".join(f"{c} {v:.0%}" for c, v in record["token_share"].items())
        log(
            f"step {step:5d}/{cfg.steps} | epoch {position.epoch} | loss {loss_value:.4f} | "
            + (
                f"kl {record['kl']:.4f} on {record['kl_share']:.0%} "
                f"(mean α {record['kl_mean_alpha']:.2f}) | "
                if "kl" in record
                else ""
            )
            + f"lr {lr:.2e} | gnorm {float(grad_norm):.3f} | {n_tok / dt:,.0f} tok/s | "
            + (f"mfu {100 * mfu:.1f}% | " if mfu is not None else "")
            + f"tokens {shares} | dropped {record['dropped']} | cut {record['cut']}"
        )
        if cfg.eval_rows and (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)):
            losses = evaluate(model, forward, heads, sources, encoder, cfg, device, autocast)
            journal.write(json.dumps({"step": step, "eval": losses}) + "\n")
            journal.flush()
            log(f"eval step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
        stopping = stop_after is not None and step >= stop_after and step < cfg.steps
        if step == cfg.steps or stopping or (cfg.save_every and step % cfg.save_every == 0):
            state = {
                "step": step,
                "position": asdict(position),
                "counts": counts,
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "rng": _get_rng(),
                "config": cfg.model_dump(mode="json"),
                "seed": seed,
                "data": data_id,
            }
            last = _save_checkpoint(out, step, model, tok, state, cfg.keep_checkpoints)
        if stopping:
            log(f"stopped after step {step}; rerun with the same output folder to resume")
            journal.close()
            return last
    journal.close()

    # ---------------------------------------------------------------------------- final model
    final = out / "final"
    model.save_pretrained(final)
    tok.save_pretrained(final)
    if counts:
        log("rows dropped or cut: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    log(f"final model in {final}")
    return final


@contextlib.contextmanager
def _lock(out: Path):
    """Hold `out` for this process: two trainings into one folder would corrupt each other."""
    with open(out / ".train.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"train: another training is writing to {out}; wait for it to finish or train "
                "into another folder"
            ) from None
        yield


# ---------------------------------------------------------------------------- helpers


def _hidden(decoder, batch) -> torch.Tensor:
    return decoder(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state


@torch.no_grad()
def evaluate(model, forward, heads, sources, encoder, cfg, device, autocast) -> dict[str, float]:
    """Mean cross-entropy per trained token on each config's validation rows."""
    ce = Objective("sft", cfg, [])
    model.eval()
    losses = {}
    for src in sources:
        total, n = 0.0, 0
        for batch in eval_batches(src, encoder, cfg):
            batch = batch.to(device)
            batch.weights = (batch.targets != IGNORE).float()  # plain cross-entropy
            with autocast():
                total += ce(_hidden(forward, batch), None, batch, heads).item()
            n += batch.n_trained
        if n:
            losses[src.config] = total / n
    model.train()
    return losses


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device is {name!r} but torch sees no CUDA device")
    return torch.device(name)


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warmup to lr, then cosine down to lr x min_lr_ratio at the last step."""

    def mult(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine

    return mult


def _reference(cfg: TrainConfig, tok, seed: int, device: torch.device, used: tuple[str, ...]):
    """The frozen reference: cfg.reference, or the start model rebuilt exactly (also on resume)."""
    source = cfg.reference or cfg.model
    ref, ref_tok = tokens.load_for_training(
        source,
        cfg.tokenizer,
        seed,
        cfg.revision,
        cfg.attn_implementation,
        used,
        tok=tok if source.startswith("random:") else None,  # the same tokenizer, not retrained
    )
    if ref_tok.get_vocab() != tok.get_vocab():
        raise RuntimeError(
            f"train.reference {cfg.reference!r} has a different vocabulary from train.model; "
            "use a reference with the same tokenizer"
        )
    ref.requires_grad_(False).eval().to(device)
    ref.config.use_cache = False
    return ref


def _check_same_config(saved: dict, cfg: TrainConfig, where: Path) -> None:
    now = cfg.model_dump(mode="json")
    diff = sorted(k for k in now if k not in _RESUME_FREE and saved.get(k) != now[k])
    if diff:
        raise RuntimeError(
            f"train: checkpoint {where} was made with different train.{', train.'.join(diff)}; "
            "restore those settings or train into a new folder"
        )


def _resume_point(out: Path, cfg: TrainConfig, seed: int, data_id: str, data: Path, log):
    """(checkpoint, state, model, tokenizer) of the newest checkpoint that loads, or Nones.

    A checkpoint that does not load (a file cut short by a kill or a full disk, garbage) would
    fail every rerun: it is moved aside to `corrupt-step-N` with one warning line and the one
    before it is tried. A checkpoint that loads but belongs to another config, seed or data is
    refused, as always."""
    for found in sorted((out / "checkpoints").glob("step-*/trainer_state.pt"), reverse=True):
        folder = found.parent
        try:
            state = torch.load(found, weights_only=False)
            if not isinstance(state, dict) or not _STATE_KEYS <= set(state):
                raise ValueError("not a trainer state")
        except Exception as e:  # unpickling, zip, EOF errors: whatever garbage raises
            _set_aside(folder, e, log)
            continue
        _check_resumable(state, cfg, seed, data_id, data, folder)
        try:
            model, tok = tokens.load_checkpoint(folder, cfg.attn_implementation)
        except Exception as e:  # safetensors, JSON, tokenizer errors of a torn file
            _set_aside(folder, e, log)
            continue
        return folder, state, model, tok
    return None, None, None, None


# What every trainer_state.pt holds.
_STATE_KEYS = {"step", "position", "counts", "optimizer", "scheduler", "rng", "config", "seed"}


def _set_aside(folder: Path, error: Exception, log) -> None:
    aside = folder.with_name(f"corrupt-{folder.name}")  # not step-*: never resumed nor pruned
    shutil.rmtree(aside, ignore_errors=True)
    folder.rename(aside)
    why = (str(error).strip().splitlines() or [""])[0][:160]
    log(
        f"warning: checkpoint {folder} cannot be loaded ({type(error).__name__}: {why}); "
        f"moved to {aside.name}, resuming from the checkpoint before it, if any"
    )


def _check_resumable(state: dict, cfg: TrainConfig, seed: int, data_id: str, data, where) -> None:
    _check_same_config(state["config"], cfg, where)
    if state["seed"] != seed:
        raise RuntimeError(
            f"train: checkpoint {where} was made with seed {state['seed']}, not {seed}; "
            "resume with the same run seed or train into a new folder"
        )
    if state.get("data") != data_id:
        raise RuntimeError(
            f"train: checkpoint {where} was trained on other data than {data}; train into "
            "a new folder (retrace train --data gives each dataset its own)"
        )


def _save_checkpoint(out: Path, step: int, model, tok, state: dict, keep: int) -> Path:
    """Write step-N atomically (a temp folder renamed), then drop the oldest beyond `keep`."""
    root = out / "checkpoints"
    final, tmp = root / f"step-{step:07d}", root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    torch.save(state, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(root.glob("step-*"))[: -max(1, keep)]:
        shutil.rmtree(old)
    return final


def _get_rng() -> dict:
    rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _set_rng(rng: dict) -> None:
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _truncate_log(path: Path, step: int, log) -> None:
    """Drop records a killed run wrote after its last checkpoint (the resume rewrites them), and
    a line a kill tore mid-write, which would fail every later read of the log."""
    if not path.exists():
        return
    keep, torn = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            after = record["step"] > step
        except (ValueError, TypeError, KeyError):
            torn += 1
            continue
        if not after:
            keep.append(line)
    if torn:
        log(f"warning: dropped {torn} torn line(s) of {path} (a kill mid-write)")
    path.write_text("".join(ln + "\n" for ln in keep))


# ---------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", required=True, type=Path, help="published dataset folder")
    ap.add_argument("--out", required=True, type=Path, help="checkpoint and log folder")
    ap.add_argument("--config", type=Path, help="a retrace YAML config; its train: section is used")
    ap.add_argument(
        "--set", dest="sets", action="append", default=[], help="train.key=value (YAML)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop-after", type=int, help="stop after this many steps (resume later)")
    args = ap.parse_args(argv)
    from pipeline.overrides import ConfigError, apply_overrides

    raw = yaml.safe_load(args.config.read_text()) if args.config else {}
    # The engine's override parser: `train.lr=1e-4` or just `lr=1e-4`.
    sets = [s if s.startswith("train.") else f"train.{s}" for s in args.sets]
    try:
        section = apply_overrides({"train": dict((raw or {}).get("train") or {})}, sets)["train"]
        cfg = TrainConfig.model_validate(section)
        train(cfg, args.data, args.out, args.seed, args.stop_after)
    except (DataError, ConfigError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None
    except ValidationError as e:
        bad = "; ".join(f"train.{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise SystemExit(f"error: {bad}") from None


if __name__ == "__main__":
    main()
