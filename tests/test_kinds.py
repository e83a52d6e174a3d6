"""The KINDS table (pipeline/kinds.py) is what every consumer iterates: each kind goes through
blend (the mixable ones into `mixture`), gets its published config folder, its `-tok` twin when it
is SFT, its card line, a `train.per_step` component, and its control tokens act in the decoder as
the renderer defines. Rows come from test_blend.py's fixtures, one maker per input table, so a new
kind without a fixture fails here first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from decode_fixtures import Script, control_model, decoder
from pydantic import ValidationError
from test_blend import make_inputs
from test_blend import run as run_blend
from test_publish import do_publish, publish_inputs
from trainer_fixtures import one_thread
from typer.testing import CliRunner

from pipeline import kinds, records, render, taxonomy
from pipeline.cli import app
from stages import blend
from trainer import rlbf
from trainer.config import TrainConfig
from trainer.train import train

pytestmark = pytest.mark.usefixtures(one_thread.__name__)
EVERY = {c: 1.0 for c in kinds.MIXED}  # every mixable component weighed


@pytest.fixture(scope="module")
def blended() -> dict:
    return run_blend(make_inputs(), ratios=EVERY)


@pytest.fixture(scope="module")
def folder(blended, tiny_model_dir, tmp_path_factory) -> Path:
    inputs = publish_inputs(blended)
    out = tmp_path_factory.mktemp("kinds-published")
    return do_publish(inputs, out, shard_bytes=10**9, tokenized=[str(tiny_model_dir)])


def test_the_table_is_the_contracts_list_of_kinds():
    assert records.CONFIGS == (*kinds.NAMES, "mixture")
    assert set(kinds.NAMES) == set(kinds.BY_NAME) and len(kinds.NAMES) == len(kinds.KINDS)
    assert set(kinds.COMPONENTS) == set(kinds.KIND_OF)  # no component in two kinds
    for k in kinds.KINDS:
        schema = records.PREFERENCE if k.preference else records.SFT
        assert records.config_schema(k.name) == schema
        assert k.tokenized == (not k.preference)
        assert not (k.mixable and k.preference)
    with pytest.raises(ValueError, match="cannot be mixed"):
        kinds.Kind("x", "format", (), preference=True, mixable=True, origin=False, card="", loss="")


def test_blend_reads_every_kinds_tables_and_writes_every_kind(blended):
    assert blend.SPEC.reads[:-1] == tuple(t for k in kinds.KINDS for _, t in k.built_from)
    for k in kinds.KINDS:
        rows = blended[k.name]
        assert rows.num_rows > 0, k.name
        assert set(rows.column("kind").to_pylist()) == {k.name}
        assert rows.schema.remove_metadata() == records.with_split(records.config_schema(k.name))


def test_blend_mixes_every_mixable_component_and_nothing_else(blended):
    mixed = {
        r["component"]: r["rows_out"]
        for r in blended["report"].to_pylist()
        if r["step"] == "mixture" and r["split"] == "train"
    }
    assert set(mixed) == set(kinds.MIXED) and all(n > 0 for n in mixed.values())
    in_mixture = set(blended["mixture"].column("kind").to_pylist())
    assert in_mixture == {k.name for k in kinds.KINDS if k.mixable}
    for k in kinds.KINDS:  # ratios take exactly the mixable components
        for c in k.components:
            if k.mixable:
                blend.Config(ratios={c: 1.0})
            else:
                with pytest.raises(ValidationError):
                    blend.Config(ratios={c: 1.0})


def test_publish_gives_every_kind_its_config_folder_and_card_line(folder):
    header = (folder / "README.md").read_text(encoding="utf-8")
    names = [c["config_name"] for c in _header(header)["configs"]]
    for k in kinds.KINDS:
        assert list((folder / "data" / k.name).glob("train-*.parquet")), k.name
        assert f"| `{k.name}` | {k.card} | {k.loss} |" in header
    sft = [n for n in kinds.NAMES if kinds.BY_NAME[n].tokenized]
    twins = [f"{n}-tok" for n in (*sft, "mixture")]
    assert names == [*kinds.NAMES, "mixture", *twins]


def test_every_sft_kind_has_a_tok_twin_and_no_other_does(folder):
    for k in kinds.KINDS:
        twin = folder / "data" / f"{k.name}-tok"
        if k.tokenized:
            assert list(twin.glob("train-*.parquet")), k.name
        else:
            assert not twin.exists(), k.name


def _header(card: str) -> dict:
    import yaml

    return yaml.safe_load(card.split("---")[1])


def test_per_step_accepts_every_sft_component_rlbf_included():
    TrainConfig(per_step={"rlbf": 4, "bsafe": 4})  # issue 22: was "unknown component(s)"
    TrainConfig(per_step={c: 1 for c in kinds.SFT_COMPONENTS})
    for k in kinds.KINDS:
        for c in k.components:
            if k.preference:
                with pytest.raises(ValidationError, match="unknown component"):
                    TrainConfig(per_step={c: 1})
            else:
                TrainConfig(per_step={c: 1})


def test_a_per_step_run_with_rlbf_trains(folder, tiny_model_dir, tmp_path):
    per_step = {"rlbf": 2, "bsafe": 2}
    cfg = TrainConfig(
        model=str(tiny_model_dir), configs={"rlbf": 1.0, "bsafe": 1.0}, per_step=per_step,
        steps=2, batch_size=2, eval_rows=0, warmup_steps=0, shuffle_buffer=8,
    )  # fmt: skip
    train(cfg, folder, tmp_path / "out", log=lambda _: None)
    lines = (tmp_path / "out" / "log.jsonl").read_text().splitlines()
    steps = [r for r in map(json.loads, lines) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["rows"] == per_step for r in steps)


@pytest.fixture(scope="module")
def dec(tmp_path_factory):
    model = control_model(tmp_path_factory.mktemp("kinds-gemma"), extra=taxonomy.load().rlbf_tokens)
    return decoder(model, batch_size=8, temperature=0, max_new_tokens=400)


def test_every_kinds_control_tokens_are_the_decoders_and_the_renderers(dec):
    for k in kinds.KINDS:
        for token in k.control_tokens():
            assert token in dec.controls.ids, (k.name, token)
            assert render.split(f"a{token}b") == ["a", token, "b"], (k.name, token)


def test_the_decoder_renders_each_kinds_turn_as_the_renderer_does(blended, dec):
    # Each kind's first published turn, emitted token by token (control tokens as their ids):
    # the decoder's visible text is the renderer's, and its events are the turn's control tokens.
    tax, ids = taxonomy.load(), dec.controls.ids
    eot = dec.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    turns, scripts, requests = [], [], []
    for k in kinds.KINDS:
        row = blended[k.name].slice(0, 1).to_pylist()[0]
        content = (row["chosen"] if k.preference else row["completion"])[0]["content"]
        if not k.preference and rlbf.takes_back(row["segments"]):
            segments, _ = rlbf.recount(row["segments"], dec.tokenizer)  # n in this tokenizer
            content = "".join(s["text"] for s in segments)
        pieces = render.split(content)
        script = [
            t for i, p in enumerate(pieces) for t in ([ids[p]] if i % 2 else dec.prompts.text(p))
        ]
        turns.append((k, content, pieces[1::2]))
        scripts.append([*script, eot])
        requests.append(_request(row))
    outs = dec.decode(requests, processors=[Script(scripts)])
    for (k, content, controls), out in zip(turns, outs, strict=True):
        assert out.visible == render.render(content, tokenizer=dec.tokenizer), k.name
        events = [e.token for e in out.events if e.token is not None]
        assert events == controls, k.name
        assert {tax.classify(t).kind for t in controls} <= set(k.controls), k.name
        if k.controls:
            assert controls, f"{k.name}: its first row uses none of its control tokens"


def _request(row: dict):
    from pipeline.decode import Request

    return Request(list(row["prompt"]), seed=0)


def test_show_names_every_kind_and_refuses_others(tmp_path):
    runner = CliRunner()
    help_text = runner.invoke(app, ["show", "--help"], terminal_width=200).output
    for name in kinds.NAMES:
        assert name in help_text
    result = runner.invoke(app, ["show", "--kind", "nope", "--set", f"run.runs_dir={tmp_path}"])
    assert result.exit_code == 2 and "unknown kind 'nope'" in result.output
