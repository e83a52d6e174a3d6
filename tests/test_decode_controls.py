"""The controls are the model's: a control token its tokenizer carries beyond the taxonomy (a
corpus with its own policy names) edits in the decoder, `retrace generate` and `retrace chat`; and
the settings only a loaded model or scorer can check (the guard's label, the token budget against
the model's positions) fail when the decoder loads, in one line."""

from __future__ import annotations

import io
import json

import pytest
from decode_fixtures import Script, control_model, decoder, memorised_model
from rich.console import Console
from tiny_gemma import build_tokenizer, save_tiny_gemma
from typer.testing import CliRunner

from pipeline import taxonomy
from pipeline.backends import GeneratorSpec, load_generator
from pipeline.chat import chat
from pipeline.cli import app
from pipeline.decode import DecodeConfig, GuardConfig, Request, load_decoder
from pipeline.decode.config import DecodeConfigError
from pipeline.decode.controls import model_controls
from pipeline.decode.record import rerender
from pipeline.scorers import ScorerSpec, load_scorer
from trainer.tokens import add_control_tokens

USER = [{"role": "user", "content": "Where does she live?"}]
PRIVATE = "[BACKTRACK-PRIVACY_VIOLATION]"  # a policy the taxonomy does not name
SAID = "Her address is 22 Birch Lane."
TURN = f"{SAID}{PRIVATE} 22 Birch Lane.[REPLACE] private."
SHOWN = "Her address is private."
EVENTS = [
    ("backtrack", PRIVATE, "privacy_violation", ""),
    ("replace", "[REPLACE]", "privacy_violation", " 22 Birch Lane."),
]


@pytest.fixture(scope="module")
def own_dir(tmp_path_factory):
    return control_model(tmp_path_factory.mktemp("own-policy"), extra=(PRIVATE,))


@pytest.fixture(scope="module")
def own_memorised(tmp_path_factory):
    return memorised_model(
        tmp_path_factory.mktemp("own-memorised"), USER[0]["content"], TURN, 60, (PRIVATE,)
    )


def test_the_models_controls_include_its_own_policy_tokens(own_dir, control_model_dir):
    from transformers import AutoTokenizer

    assert PRIVATE not in taxonomy.load().all_tokens
    own = model_controls(AutoTokenizer.from_pretrained(own_dir))
    assert PRIVATE in own and set(taxonomy.load().control_tokens) <= set(own)
    assert PRIVATE not in model_controls(AutoTokenizer.from_pretrained(control_model_dir))
    assert taxonomy.load().classify(PRIVATE).policy == "privacy_violation"
    assert taxonomy.load().classify("[BACKTRACK-PRIVACY_VIOLATIO") is None


def test_a_control_token_outside_the_taxonomy_backtracks_in_the_decoder(own_dir):
    dec = decoder(own_dir, temperature=0, max_new_tokens=60)
    w, tok = dec.prompts.text, dec.tokenizer
    real = tok.convert_tokens_to_ids(PRIVATE)
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    script = w(SAID) + [real] + w(" 22 Birch Lane.") + [dec.controls.ids["[REPLACE]"]]
    [out] = dec.decode([Request(USER)], processors=[Script([script + w(" private.") + [eot]])])
    assert out.visible == SHOWN
    assert [(e.kind, e.token, e.policy, e.removed) for e in out.events] == EVENTS
    assert rerender(out.to_dict(), tok) == SHOWN


def test_a_control_token_outside_the_taxonomy_backtracks_in_generate(own_memorised, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "p", "prompt": USER[0]["content"]}) + "\n")
    out = tmp_path / "turns.jsonl"
    args = ["generate", "--model", str(own_memorised), "--prompts", str(prompts), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--set", "decode.temperature=0"])
    assert result.exit_code == 0, result.output
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["raw"] == TURN and row["visible"] == SHOWN
    assert [(e["kind"], e["token"], e["policy"], e["removed"]) for e in row["events"]] == EVENTS


def test_a_control_token_outside_the_taxonomy_backtracks_in_chat(own_memorised):
    dec = load_decoder(
        load_generator(GeneratorSpec(model=str(own_memorised))), DecodeConfig(temperature=0)
    )
    console = Console(file=io.StringIO(), width=120, color_system=None)
    lines = iter([USER[0]["content"], "/quit"])
    chat(dec, console, ask=lambda: next(lines))
    screen = console.file.getvalue()
    assert "↶ privacy_violation" in screen and "private." in screen
    assert PRIVATE not in screen and "[REPLACE]" not in screen


def test_a_guard_label_the_scorer_lacks_fails_when_the_decoder_loads(own_dir):
    scorer = load_scorer(ScorerSpec(kind="profanity-check"))
    with pytest.raises(DecodeConfigError, match=r"^decode\.guard\.label 'toxicity' is not a label"):
        decoder(own_dir, scorer=scorer, guard=GuardConfig(label="toxicity"))
    decoder(own_dir, scorer=scorer, guard=GuardConfig(label="profanity"))  # its own label loads


def test_a_guard_label_the_scorer_lacks_is_one_line_in_generate(own_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hi"}) + "\n")
    args = ["generate", "--model", str(own_dir), "--prompts", str(prompts)]
    args += ["--set", "decode.guard.scorer.kind=profanity-check"]
    result = CliRunner().invoke(app, [*args, "--set", "decode.guard.label=toxicity"])
    assert result.exit_code == 1
    assert "decode.guard.label 'toxicity' is not a label of scorer profanity-check" in result.output
    assert "Traceback" not in result.output


def test_max_new_tokens_past_the_models_positions_is_refused(own_dir):
    with pytest.raises(DecodeConfigError, match=r"^decode\.max_new_tokens 1000000000 is past"):
        decoder(own_dir, max_new_tokens=10**9)


def test_a_turn_ends_before_it_runs_past_the_models_positions(tmp_path):
    tok = build_tokenizer(tmp_path)
    add_control_tokens(tok)
    tok.save_pretrained(tmp_path)
    save_tiny_gemma(tmp_path, tok, max_position_embeddings=40)
    dec = decoder(tmp_path, temperature=0, max_new_tokens=40)
    script = dec.prompts.text(" The fox naps." * 20)
    [out] = dec.decode([Request(USER)], processors=[Script([script])])
    assert out.finish_reason == "length"
    assert out.prompt_tokens + out.emitted_tokens <= 40
