"""The trainer's per-epoch k redraw is the format stage's draw (pipeline/recovery.py): every
shipped BeaverTails answer, published by `format` and redrawn for 20 epochs, keeps the boundary
rule and the separator, with P(k=0) and the cap from config (read from the folder's retrace.json,
never from the card)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from recipe_data import harmful
from test_format import rewrites_table, run
from trainer_fixtures import hand_off, one_thread, write_config

from pipeline import handoff, recovery
from stages import format as fmt
from stages.format_build import untrained_space
from trainer import tokens
from trainer.config import TrainConfig
from trainer.data import handed_off, recovery_draw
from trainer.encode import Encoder, Recovery

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

SHIPPED = Path(__file__).resolve().parents[1] / "configs" / "data" / "beavertails.jsonl"
REFUSAL = "I can't help with that."
# A written answer whose tokens include newlines, so some prefixes end in a newline token.
NEWLINES = "Sure.\nGet the list.\nCall them.\n\nMock them.\nShame them.\nLaugh."


def _answers() -> list[tuple[str, str, str, list[str]]]:
    rows = [json.loads(line) for line in SHIPPED.read_text().splitlines()]
    answers = [r["response"] for r in rows if not r["is_safe"]] + [NEWLINES]
    return [(f"h{i}", "Do something bad.", a, []) for i, a in enumerate(answers)]


def test_every_shipped_row_redrawn_for_20_epochs_keeps_the_joint(tiny_model_dir):
    p_zero, cap = 0.3, 12
    answers = _answers()
    cfg = fmt.Config(target_tokenizer=str(tiny_model_dir), p_zero=p_zero, k_cap=cap)
    refusals = rewrites_table(*((rid, REFUSAL) for rid, *_ in answers))
    published = run(cfg, harm=harmful(*answers), refusals=refusals)["recovery"].to_pylist()
    assert len(published) == len(answers)
    tok = tokens.load_tokenizer(str(tiny_model_dir))
    tokens.add_control_tokens(tok)
    enc = Encoder(
        tok,
        4096,
        tokens.control_tokens(),
        recovery=Recovery(p_zero=p_zero, k_cap=cap, refusal_separator=" "),
    )
    ks, joints = [], set()
    for row in published:
        h = row["meta"]["harmful"]
        for epoch in range(20):
            segments = enc.redrawn(row, 5, epoch)
            assert not untrained_space(segments)
            text = "".join(s["text"] for s in segments)
            if segments[0]["role"] == "refusal":  # k = 0: the turn is the refusal alone
                assert segments == [{"text": REFUSAL, "role": "refusal", "train": True}]
                ks.append(0)
                continue
            prefix, refusal = segments
            assert h.startswith(prefix["text"]) and not prefix["text"][-1].isspace()
            joint = refusal["text"][: -len(REFUSAL)]
            assert refusal["text"].endswith(REFUSAL) and joint and joint.isspace()  # never glued
            assert text == prefix["text"] + joint + REFUSAL
            joints.add(joint)
            ids, spans = enc.offsets(h)
            k = sum(1 for _, e in spans if e <= len(prefix["text"]))
            assert 1 <= k <= min(cap, len(ids))
            ks.append(k)
            # Tokenised, the trained side starts right at the boundary: no untrained whitespace.
            doc = enc.encode({**row, "segments": segments}, "recovery")
            first = doc.trained.index(True, doc.prompt_len)
            assert tok.decode(doc.ids[first - 1 : first]).strip()
            assert tok.decode(doc.ids[first:]).startswith(joint)
    share = ks.count(0) / len(ks)
    assert abs(share - p_zero) < 0.08  # 700 draws: 4.5 standard errors
    assert max(ks) == cap
    assert "\n" in joints and " " in joints  # prefixes ending in a newline and mid-sentence


def test_the_redraw_reads_p_zero_cap_and_separator_from_the_handoff_not_the_card(tmp_path):
    folder = tmp_path / "data"
    write_config(folder, "recovery", "train", [])
    cfg = TrainConfig()
    assert recovery_draw(handed_off(folder), cfg, folder)[0] == handoff.DEFAULT_RECOVERY
    hand_off(folder, Recovery(p_zero=0.25, k_cap=40, refusal_separator="\n"))
    # A card whose embedded config says otherwise is not read.
    card = "# card\n\n<!-- retrace:config -->\n```yaml\nformat:\n  p_zero: 0.9\n  k_cap: 3\n"
    (folder / "README.md").write_text(card + '  refusal_separator: "X"\n```\n')
    draw, where = recovery_draw(handed_off(folder), cfg, folder)
    assert draw == Recovery(p_zero=0.25, k_cap=40, refusal_separator="\n")
    assert "retrace.json" in where and "README.md" not in where
    pinned = TrainConfig(recovery={"p_zero": 0.0})  # train.recovery wins where set
    got = recovery_draw(handed_off(folder), pinned, folder)[0]
    assert got == Recovery(p_zero=0.0, k_cap=40, refusal_separator="\n")


def test_refusal_of_takes_the_joint_off():
    for prefix in ("", "Sure", "Sure,\n"):
        for sep in (" ", " -- "):
            segments, _ = recovery.turn(prefix, REFUSAL, sep)
            assert recovery.refusal_of(segments, sep) == REFUSAL
