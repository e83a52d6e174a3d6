"""Stage `eval`: what a model trained on the corpus does under the papers' attacks, on safe
prompts, and on maths (docs/eval.md#suites, docs/eval.md#protocols).

Reads `train.files` (this run's checkpoint) when `eval.model` is unset; with a model named
(`retrace eval --model CKPT|embedded|<hub id>`) it reads nothing from the run and depends only on
that model and the eval's files. The engine keeps each model's results apart, under
`runs/<run>/eval/<name>-<hash>/` (`eval_model.slug`: the model's name and a hash of its path or
Hub id and revision, so same-named models never share a folder, then, for a decoding other than
the default, a hash of its settings: a keep and a drop eval of one model sit side by side).
It decodes with the top-level `decode:` (as chat and generate do); each suite's `sampling` is a
declared override of its sampling keys, named in results.json and the report, and every results
row names the decoding it was measured under (`decode`).
Writes:
- `generations` (stages/eval_rows.GENERATIONS): every generation or teacher-forced probe, with
  prompt, prefill, raw and visible text, edit events, token counts and each judge's verdict;
- `results` (stages/eval_metrics.RESULTS): every number, with its judge, interval and n;
- files: `results.json`, `report.md` (tables a program can read), `plots/`.

Suites (eval.suites; each planned, decoded in resumable chunks, judged, summarised): `prefill`,
`midstream`, `benign`, `utility`, `decoding` (stages/eval_suites.py, eval_midstream.py,
eval_utility.py) and `finetune-attack` (stages/eval_finetune.py).

Rejects, with reason: malformed_line, undecodable (a prompt-file line that is no JSON object of
UTF-8 text), missing_prompt, missing_field, missing_answer, unknown_policy, no_final_answer,
no_boxed_answer (unusable eval rows), prefill_too_short (a harmful answer with fewer than k tokens,
per k).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline import models, records
from pipeline.backends import GeneratorSpec
from pipeline.decode import DecodeConfig
from pipeline.decode.config import SAMPLING, setting
from pipeline.stage import Env, StageSpec
from stages import (
    eval_data,
    eval_finetune,
    eval_midstream,
    eval_model,
    eval_overlap,
    eval_suites,
    eval_utility,
)
from stages.eval_config import DecodingSuite, EvalConfig
from stages.eval_judges import judge_name, load_judge
from stages.eval_metrics import RESULTS
from stages.eval_report import write
from stages.eval_rows import GENERATIONS
from stages.eval_run import run_requests

Config = EvalConfig
_PROMPTS = ("eval/*",)
SPEC = StageSpec(
    name="eval",
    reads=("train.files", "publish.files"),
    writes={"generations": GENERATIONS, "results": RESULTS},
    prompts=_PROMPTS,
    hooks=("external_files", "fingerprints", "spec_for"),
    folder="eval/train",
)

PLANNERS = {
    "prefill": (lambda c: c.prefill, eval_suites.plan_prefill, eval_suites.summarise_prefill),
    "midstream": (lambda c: c.midstream, eval_midstream.plan, eval_midstream.summarise),
    "benign": (lambda c: c.benign, eval_suites.plan_benign, eval_suites.summarise_benign),
    "utility": (lambda c: c.utility, eval_utility.plan, eval_utility.summarise),
    "decoding": (lambda c: c.decoding, eval_suites.plan_decoding, eval_suites.summarise_decoding),
}


def spec_for(cfg: EvalConfig) -> StageSpec:
    """A named model needs nothing from the run; this run's checkpoint needs `train`. Each model
    and decoding has its own folder."""
    folder = f"eval/{eval_model.slug(cfg.model, cfg.revision, cfg.decode)}"
    if cfg.model is None:
        return dataclasses.replace(SPEC, folder=folder)
    return dataclasses.replace(SPEC, reads=(), folder=folder)


def overrides(section: Any) -> dict[str, Any]:
    """The decode keys a suite section sets itself (its declared override of `decode:`)."""
    if isinstance(section, DecodingSuite):  # a grid: every point is named in `setting`
        grid = (section.temperatures, section.top_ps, section.top_ks, section.max_new_tokens)
        return dict(zip(SAMPLING, grid, strict=True))
    sampling = getattr(section, "sampling", None)
    return sampling.model_dump(exclude_none=True) if sampling is not None else {}


def _prompt_files(cfg: EvalConfig) -> list[Path]:
    files = []
    for suite in cfg.suites:
        if suite == "finetune-attack":
            files.append(cfg.finetune_attack.data.path)
            files += [f.path for f in cfg.prefill.prompts]
            files.append(cfg.benign.prompts.path)
            continue
        section = PLANNERS[suite][0](cfg)
        for value in section.__dict__.values():
            for item in value if isinstance(value, tuple) else (value,):
                if isinstance(item, eval_data.PromptFile):
                    files.append(item.path)
    return sorted(set(files))


def external_files(cfg: EvalConfig) -> list[Path]:
    """Every prompt file the selected suites read, and a named local model's weights."""
    files = [p for p in _prompt_files(cfg) if p.is_file()]
    if cfg.training_data is not None:
        files += sorted(Path(cfg.training_data).glob("data/*/*.parquet"))
    if cfg.model is not None and Path(cfg.model).is_dir():
        folder = Path(cfg.model)
        files += sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    return files


def fingerprints(cfg: EvalConfig) -> list[dict[str, Any]]:
    found = [] if cfg.model is None else [models.fingerprint(cfg.model, cfg.revision)]
    for j in cfg.judges:
        if j.kind == "guard":
            found.append(models.fingerprint(j.model, j.revision))
    return found


def run(inputs: dict[str, Any], cfg: EvalConfig, env: Env) -> dict[str, pa.Table]:
    source = cfg.model if cfg.model is not None else str(inputs["train.files"] / "final")
    name = eval_model.slug(cfg.model, cfg.revision)
    judges = [load_judge(j, env) for j in cfg.judges]
    names = [j.name for j in judges]
    model = eval_model.load(_spec(cfg, source), name, cfg.baseline, env)
    rows, results, rejected = [], [], []

    def evaluate(m: eval_model.EvalModel, suite: str, label: str) -> None:
        section, plan, summarise = PLANNERS[suite]
        requests, bad = plan(section(cfg), m, env.seed, label)
        rejected.extend(bad)
        folder = env.workdir / "chunks" / m.name / label.replace(":", "-")
        done = run_requests(
            m, requests, judges, cfg.decode, env, folder, cfg.chunk_size, cfg.batch_size
        )
        rows.extend(done)
        decoding = setting(cfg.decode, skip=tuple(overrides(section(cfg))))
        results.extend({**r, "decode": decoding} for r in summarise(m.name, done, names, label))

    for suite in cfg.suites:
        if suite != "finetune-attack":
            evaluate(model, suite, suite)
    if "finetune-attack" in cfg.suites:
        _finetune_attack(cfg, source, model, env, evaluate, rejected)

    data = cfg.training_data or inputs.get("publish.files")
    counts = Counter(r["reason"] for r in rejected)
    meta = {
        "model": name,
        "source": models.model_id(source) if cfg.model is not None else "this run's train stage",
        "suites": list(cfg.suites),
        "judges": [judge_name(j) for j in cfg.judges],
        "baseline": model.baseline,
        "decode": _describe(cfg.decode),
        "decode_setting": setting(cfg.decode),
        "suite_decode": {
            suite: _overridden(cfg, suite) for suite in cfg.suites if suite in PLANNERS
        },
        "rejected": dict(counts),
        "decontamination": _decontamination(rows, data),
    }
    write(env.workdir, results, meta)
    shutil.rmtree(env.workdir / "chunks", ignore_errors=True)
    shutil.rmtree(env.workdir / "finetune", ignore_errors=True)
    return {
        "generations": records.table(rows, GENERATIONS),
        "results": records.table(results, RESULTS),
        "rejected": records.table(rejected, records.REJECTED),
    }


def _describe(d: DecodeConfig) -> str:
    guard = "off"
    if d.guard is not None:
        g = d.guard
        guard = f"{g.scorer.kind} at {g.threshold:g}, {g.retries} retries (scorer-guided rollback)"
    bias = ", ".join(f"{k} {v:+g}" for k, v in d.bias.items()) or "none"
    return (
        f"`{setting(d)}` (context {d.context}; backtrack_by {d.backtrack_by}; bias {bias}; "
        f"disabled {list(d.disable) or 'none'}; guard {guard}; T {d.temperature:g}, top-p "
        f"{d.top_p:g}, top-k {d.top_k}, {d.max_new_tokens} new tokens; max_edits "
        f"{d.max_edits}, max_wasted_tokens {d.max_wasted_tokens})"
    )


def _overridden(cfg: EvalConfig, suite: str) -> str:
    """What a suite's declared override replaces of `decode:`, for the report."""
    section = PLANNERS[suite][0](cfg)
    found = overrides(section)
    if not found:
        return "decode: as is"
    where = "the grid" if isinstance(section, DecodingSuite) else f"eval.{suite}.sampling"
    keys = ", ".join(f"{k} {v}" for k, v in found.items())
    return f"{keys} ({where}, over decode:)"


def _decontamination(rows: list[dict], data: Path | None) -> str:
    if data is None:
        return (
            "not checked: the training data of this model is unknown (set eval.training_data "
            "to its dataset folder)"
        )
    found = eval_overlap.overlaps([r["prompt"] for r in rows], Path(data))
    return (
        f"{found['overlapping']} of {found['eval_prompts']} eval prompts share a word "
        f"{eval_overlap.NGRAM}-gram with one of the {found['training_prompts']} training prompts "
        f"of {data} (blend drops training rows that overlap any sources.eval prompt)"
    )


def _spec(cfg: EvalConfig, source: str) -> GeneratorSpec:
    return GeneratorSpec(
        backend=cfg.backend,
        model=source,
        revision=cfg.revision,
        device=cfg.device,
        dtype=cfg.dtype,
        batch_size=cfg.batch_size,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        max_model_len=cfg.max_model_len,
    )


def _finetune_attack(cfg, source, model, env, evaluate, rejected) -> None:
    suite = cfg.finetune_attack
    pairs, bad = eval_data.harmful_pairs(suite.data.model_copy(update={"limit": suite.pairs}))
    rejected.extend(bad)
    root = env.workdir / "finetune"
    data = eval_finetune.attack_folder(pairs, root / "data")
    for objective in suite.objectives:
        final = eval_finetune.train_copy(
            suite, source, objective, data, root / objective, env.seed, env.log
        )
        copy = eval_model.load(_spec(cfg, str(final)), f"{model.name}+{objective}", False, env)
        for sub in suite.suites:
            evaluate(copy, sub, f"finetune-attack:{sub}")
