"""The sample stage: exact rows and provenance, rejects, determinism, and resume after a kill.

Prompts are written here; the generator is the tiny random Gemma (tests/tiny_gemma.py), except
where a stand-in generator returns fixed text so rows can be checked exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import stages.sample as sample
from pipeline import config as config_mod
from pipeline import records
from pipeline.backends import Generation, GeneratorSpec
from pipeline.dag import Pipeline
from pipeline.env import LocalEnv
from pipeline.prompting import template_hash
from pipeline.stage import StageConfig, StageSpec

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["tea", "bread", "kites", "maps", "owls", "rain", "clocks", "boats", "moss", "chess"]


def prompt_rows(topics=TOPICS):
    return [
        {
            "id": records.row_id("test", t),
            "source": "test",
            "source_id": f"test-{i}",
            "license": "CC0-1.0",
            "prompt": f"Tell me something about {t}.",
        }
        for i, t in enumerate(topics)
    ]


def run_sample(cfg, rows, seed=0, env=None):
    env = env or LocalEnv(seed=seed)
    return sample.run({"sources.benign": records.table(rows, records.PROMPTS)}, cfg, env)


def tiny_cfg(model_dir, **kw):
    generator = GeneratorSpec(model=str(model_dir), batch_size=4)
    return sample.Config(generator=generator, max_new_tokens=6, **kw)


# --- exact rows with a stand-in generator -----------------------------------------------------


class FixedGenerator:
    """Answers every request with fixed text; records the prompts it saw."""

    model_id = "stand-in"

    def __init__(self, spec, text):
        self.spec, self.text, self.prompts = spec, text, []

    def format_chat(self, messages):
        return "|".join(f"{m['role']}:{m['content']}" for m in messages)

    def count_tokens(self, texts):
        return [len(t.split()) for t in texts]

    def generate(self, prompts, params, seeds):
        self.prompts += prompts
        return [
            [Generation(self.text, "stop", 7, 3, s + j) for j in range(params.n)] for s in seeds
        ]


class StandInEnv(LocalEnv):
    def __init__(self, generator, seed=0):
        super().__init__(seed=seed)
        self._generator = generator

    def generator(self, spec):
        return self._generator


def test_rows_carry_full_provenance_and_neutralised_text():
    cfg = sample.Config(n=2, fewshot=None, temperature=1.5, top_p=0.98)
    fake = FixedGenerator(cfg.generator, "  Sure. <end_of_turn>[RESET] Fine.  ")
    rows = prompt_rows(["tea"])
    out = run_sample(cfg, rows, env=StandInEnv(fake, seed=5))
    assert fake.prompts == ["user:Tell me something about tea."]
    got = out["samples"].to_pylist()
    assert [r["sample_index"] for r in got] == [0, 1]
    first = got[0]
    assert first["response"] == "Sure. ‹end_of_turn›(RESET) Fine."  # never a special token
    assert {k: first[k] for k in ("source", "source_id", "license", "prompt_id", "prompt")} == {
        "source": "test",
        "source_id": "test-0",
        "license": "CC0-1.0",
        "prompt_id": rows[0]["id"],
        "prompt": "Tell me something about tea.",
    }
    assert (first["finish_reason"], first["prompt_tokens"], first["completion_tokens"]) == (
        "stop",
        7,
        3,
    )
    meta = first["meta"]
    seed = sample.seeds.derive(5, rows[0]["id"])
    assert (meta["generator"], meta["backend"], meta["seed"]) == ("stand-in", "transformers", seed)
    assert (meta["temperature"], meta["top_p"]) == (1.5, 0.98)
    assert meta["template"] == f"sample/benign.jinja@{template_hash('sample/benign.jinja')}"
    assert len({r["id"] for r in got}) == 2
    assert out["samples"].schema == records.SAMPLES


def test_fewshot_turns_come_before_the_prompt():
    messages = sample.conversation("Why is the sea salty?", sample.Config())
    roles = [m["role"] for m in messages]
    assert roles[-1] == "user" and messages[-1]["content"] == "Why is the sea salty?"
    assert roles[:-1] == ["user", "assistant"] * (len(roles) // 2)
    assert len(roles) >= 3


def test_empty_and_too_long_prompts_are_rejected_with_reasons():
    cfg = sample.Config(fewshot=None, max_prompt_tokens=6)
    rows = prompt_rows(["tea"])
    rows.append({**rows[0], "id": "empty", "prompt": "   "})
    rows.append({**rows[0], "id": "long", "prompt": "word " * 20})
    out = run_sample(cfg, rows, env=StandInEnv(FixedGenerator(cfg.generator, "ok")))
    reasons = {r["id"]: r["reason"] for r in out["rejected"].to_pylist()}
    assert reasons == {"empty": "empty_prompt", "long": "prompt_too_long"}
    assert out["samples"].num_rows == 1


# --- the tiny model ---------------------------------------------------------------------------


def test_same_seed_same_samples_on_cpu(tiny_model_dir):
    cfg = tiny_cfg(tiny_model_dir, n=2)
    rows = prompt_rows()[:5]
    first = run_sample(cfg, rows, seed=1)["samples"]
    again = run_sample(cfg, rows, seed=1)["samples"]  # a fresh env: the model is loaded again
    assert first.equals(again)
    other = run_sample(cfg, rows, seed=2)["samples"]
    assert other.column("response").to_pylist() != first.column("response").to_pylist()
    assert first.num_rows == 10 and set(first.column("finish_reason").to_pylist()) <= {
        "stop",
        "length",
    }


def prompt_source() -> types.ModuleType:
    """A stand-in `sources` stage writing `benign` prompts, so sample runs under the real engine."""
    module = types.ModuleType("prompt_source")
    module.__file__ = __file__
    module.SPEC = StageSpec(name="sources", writes={"benign": records.PROMPTS})

    class Config(StageConfig):
        pass

    module.Config = Config
    module.run = lambda inputs, cfg, env: {
        "benign": records.table(prompt_rows(), records.PROMPTS),
        "rejected": records.table([], records.REJECTED),
    }
    return module


STAGES = {"sources": prompt_source(), "sample": sample}

# The child logs each chunk it generates and dies (like SIGKILL) before returning the third.
_CHILD = """
import os, sys
import stages.sample as sample
from test_sample import STAGES
from pipeline import config
from pipeline.dag import Pipeline
real, calls = sample.run, []
def run(inputs, cfg, env):
    calls.append(1)
    if len(calls) == 3:
        os._exit(137)
    with open(sys.argv[2], "a") as f:
        f.write(",".join(inputs["sources.benign"].column("source_id").to_pylist()) + "\\n")
    return real(inputs, cfg, env)
sample.run = run
Pipeline(config.load(sys.argv[1], STAGES), STAGES).run(["sample"])
"""


def write_config(tmp_path: Path, model_dir: Path, runs: str) -> Path:
    path = tmp_path / f"{runs}.yaml"
    path.write_text(
        f"run:\n  runs_dir: {tmp_path / runs}\n  chunk_size: 4\n"
        f"sample:\n  max_new_tokens: 6\n  generator:\n    model: {model_dir}\n    batch_size: 2\n"
    )
    return path


def test_killed_sample_resumes_without_recomputing_or_duplicating(
    tiny_model_dir, tmp_path, monkeypatch
):
    cfg_file, log = write_config(tmp_path, tiny_model_dir, "runs"), tmp_path / "chunks.log"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}"}
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(cfg_file), str(log)], env=env, capture_output=True
    )
    assert child.returncode == 137, child.stderr.decode()[-2000:]
    assert log.read_text().splitlines() == [
        "test-0,test-1,test-2,test-3",
        "test-4,test-5,test-6,test-7",
    ]

    pipe = Pipeline(config_mod.load(cfg_file, STAGES), STAGES)
    assert pipe.statuses(["sample"])["sample"] == "partial"
    ran = []
    real = sample.run
    monkeypatch.setattr(
        sample, "run", lambda i, c, e: ran.append(i["sources.benign"].num_rows) or real(i, c, e)
    )
    assert pipe.run(["sample"]) == {"sources": "cached", "sample": "ran"}
    assert ran == [2]  # only the unfinished last chunk (prompts 8-9)
    resumed = pipe.store.read("sample", "samples")
    ids = resumed.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 10
    assert sorted(resumed.column("source_id").to_pylist()) == sorted(f"test-{i}" for i in range(10))

    # The resumed run wrote exactly what an uninterrupted run writes.
    fresh_cfg = write_config(tmp_path, tiny_model_dir, "fresh")
    fresh = Pipeline(config_mod.load(fresh_cfg, STAGES), STAGES)
    fresh.run(["sample"])
    assert fresh.store.read("sample", "samples").sort_by("id").equals(resumed.sort_by("id"))


@pytest.mark.parametrize("n,calls", [(1, [4, 1]), (3, [3, 3, 3, 3, 3])])
def test_each_generate_call_is_one_batch(tiny_model_dir, n, calls):
    """batch_size 4: requests (prompts x n) per generate call never exceed one batch."""
    seen = []

    class Counting(LocalEnv):
        def generator(self, spec):
            gen = super().generator(spec)
            original = type(gen).generate

            def generate(prompts, params, seeds):
                seen.append(len(prompts) * params.n)
                return original(gen, prompts, params, seeds)

            gen.generate = generate
            return gen

    out = run_sample(tiny_cfg(tiny_model_dir, n=n), prompt_rows()[:5], env=Counting())
    assert seen == calls and out["samples"].num_rows == 5 * n
