"""retrace.json: what publish hands the trainer beside the shards (pipeline/handoff.py), read back
by the same model, strictly; the trainer never reads the card."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_publish import RUN_CONFIG, blended, folder  # noqa: F401  (fixtures)
from trainer_fixtures import corpus, hand_off, one_thread

from pipeline import handoff, records
from pipeline.card import config_from_card
from pipeline.models import EMBEDDED_ID
from stages import format as fmt
from stages import push
from stages import train as train_stage
from trainer.config import TrainConfig
from trainer.data import DataError
from trainer.train import train

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


def test_publish_writes_the_draw_the_tokenizer_and_each_configs_control_tokens(folder):  # noqa: F811
    handed = handoff.read(folder)
    section = RUN_CONFIG["format"]
    assert handed.recovery == handoff.Recovery(p_zero=0.25, k_cap=40, refusal_separator="\n")
    assert handed.recovery.model_dump() == {k: section[k] for k in handoff.Recovery.model_fields}
    assert handed.tokenizer == EMBEDDED_ID  # format.target_tokenizer: embedded
    # Every published config with segments, each with what its shards' segments hold.
    with_segments = {c for c in records.CONFIGS if "segments" in records.config_schema(c).names} & {
        p.name for p in (folder / "data").iterdir()
    }
    assert set(handed.control_tokens) == with_segments
    for config, listed in handed.control_tokens.items():
        seen = {
            s["text"]
            for f in (folder / "data" / config).glob("*.parquet")
            for row in pq.read_table(f, columns=["segments"]).to_pylist()
            for s in row["segments"]
            if s["role"] == "control"
        }
        assert listed == sorted(seen), config
    assert "[BACKTRACK-HATE]" in handed.control_tokens["bsafe"]
    # The file is the model's JSON, keys sorted: one text per corpus.
    text = (folder / handoff.FILE).read_text()
    assert json.loads(text) == handed.model_dump(mode="json")
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_the_push_uploads_it(folder):  # noqa: F811
    assert handoff.FILE in [name for name, _ in push.upload_plan(folder)]


def test_format_and_the_trainer_share_one_default_draw():
    cfg = fmt.Config()
    defaults = {k: getattr(cfg, k) for k in handoff.Recovery.model_fields}
    assert handoff.DEFAULT_RECOVERY.model_dump() == defaults
    assert TrainConfig().recovery.model_dump() == dict.fromkeys(defaults)  # None: the folder's


def _card_says_otherwise(card: Path) -> None:
    """The card's embedded config with another draw: the trainer must not see it."""
    text = card.read_text()
    text, n = re.subn(r"(\n  p_zero: )\S+", r"\g<1>0.9", text)
    text, m = re.subn(r"(\n  k_cap: )\S+", r"\g<1>3", text)
    card.write_text(text)
    embedded = config_from_card(card)["format"]
    assert n and m and (embedded["p_zero"], embedded["k_cap"]) == (0.9, 3)


def test_the_trainer_reads_the_handoff_and_a_changed_card_changes_nothing(
    folder,  # noqa: F811
    tiny_model_dir,
    tmp_path,
):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    _card_says_otherwise(copy / "README.md")
    cfg = TrainConfig(
        model=str(tiny_model_dir), configs={"recovery": 1.0}, steps=1, batch_size=2, eval_rows=0
    )
    lines: list[str] = []
    train(cfg, copy, tmp_path / "out", log=lines.append)
    (draw,) = [ln for ln in lines if ln.startswith("recovery redraw:")]
    assert draw.startswith("recovery redraw: P(k=0)=0.25, cap 40, separator '\\n'")
    assert f"{copy / handoff.FILE} (k counted in {EMBEDDED_ID})" in draw


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("remove", r"retrace\.json is missing: the folder was published by an older retrace"),
        ("not json", r"retrace\.json: Invalid JSON"),
        ("unknown key", r"retrace\.json: recovery\.p_zero: Field required; recovery\.p_zro: Extra"),
        ("missing key", r"retrace\.json: tokenizer: Field required"),
        ("no config", r"retrace\.json lists no control_tokens for \['bsafe'\]"),
    ],
)
def test_a_missing_or_broken_handoff_is_one_line_naming_file_and_key(tmp_path, damage, message):
    data = corpus(tmp_path / "data", {"bsafe": 4}, validation=0)
    path = data / handoff.FILE
    raw = json.loads(path.read_text())
    if damage == "remove":
        path.unlink()
    elif damage == "not json":
        path.write_text("{recovery")
    elif damage == "unknown key":
        raw["recovery"]["p_zro"] = raw["recovery"].pop("p_zero")
        path.write_text(json.dumps(raw))
    elif damage == "missing key":
        del raw["tokenizer"]
        path.write_text(json.dumps(raw))
    elif damage == "no config":
        del raw["control_tokens"]["bsafe"]
        path.write_text(json.dumps(raw))
    # The model would fail to load: the hand-off is checked first.
    cfg = TrainConfig(model="random:nonexistent-size", configs={"bsafe": 1.0})
    with pytest.raises(DataError, match=message) as err:
        train(cfg, data, tmp_path / "out")
    assert "\n" not in str(err.value) and "republish" in str(err.value)


def test_the_train_stage_keys_on_the_handoff_not_the_card(tmp_path):
    data = corpus(tmp_path / "data", {"bsafe": 2}, validation=0)
    (data / "README.md").write_text("# card\n")
    files = train_stage.external_files(train_stage.Config(data=str(data)))
    assert data / handoff.FILE in files and data / "README.md" not in files
    assert hand_off(data) in files
