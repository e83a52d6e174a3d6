"""blend: formatting of utility rows, dedup, decontamination, split and mixture ratios.

Fixtures are written here: rows in the published SFT/preference schemas (as the format stage
writes them), utility pairs as the sources stage writes them (Alpaca instruction + "\\n\\n" +
input, a GSM8K answer ending "#### N", a MATH solution with \\boxed{}), anchor answers as
filter.responses rows, and a few eval prompts in sources.eval's schema. Texts are random words
from a fixed vocabulary, so rows are distinct unless a test plants a duplicate.
"""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pyarrow as pa
import pytest

from pipeline import dedup, records
from pipeline.env import LocalEnv
from pipeline.store import whole
from stages import blend
from stages.blend_rows import BlendError

VOCAB = (
    "river mountain bread garden window lantern copper violin meadow harbor pencil orchard "
    "candle thunder marble saddle velvet quarry falcon harvest blanket compass ladder ribbon "
    "canyon kettle maple anchor barrel cactus dolphin ember fabric glacier hammock island "
    "jigsaw kayak lemon magnet nectar oyster pepper quartz rocket salmon tunnel umbrella "
    "valley walnut yogurt zephyr basket cotton desert engine forest goblet hollow igloo jacket"
).split()


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n)).capitalize() + "."


def segments_row(kind: str, prompt: str, segments: list[tuple[str, str, bool]], **extra) -> dict:
    """An SFT row as the format stage writes it: completion = the segments joined."""
    text = "".join(t for t, _, _ in segments)
    visible = "".join(t for t, role, _ in segments if role not in ("harmful", "control", "copy"))
    row = {
        "id": records.row_id(kind, prompt, text),
        "kind": kind,
        "policy": extra.pop("policy", ["hate"] if kind != "utility" else []),
        "source": extra.pop("source", "PKU-Alignment/BeaverTails"),
        "source_id": extra.pop("source_id", "0"),
        "license": extra.pop("license", "cc-by-nc-4.0"),
        "prompt": [records.message("user", prompt)],
        "completion": [records.message("assistant", text)],
        "segments": [{"text": t, "role": r, "train": tr} for t, r, tr in segments],
        "visible": visible,
        "meta": {"generator": "tiny", "backend": "transformers", "seed": 1, **extra},
    }
    return row


def rlbf_row(rng: random.Random) -> dict:
    return segments_row(
        "rlbf",
        words(rng, 12),
        [
            (words(rng, 20), "text", False),
            (" " + words(rng, 6), "harmful", False),
            ("[CATEGORY-HATE]", "control", True),
            ("[BACKTRACK_BY_6]", "control", True),
            (" " + words(rng, 15), "text", True),
        ],
        scores=records.scores({"span.toxicity": 0.9}),
    )


def bsafe_row(rng: random.Random) -> dict:
    harm = " " + words(rng, 6)
    return segments_row(
        "bsafe",
        words(rng, 12),
        [
            (words(rng, 20), "text", True),
            (harm, "harmful", False),
            ("[BACKTRACK-HATE]", "control", True),
            (harm, "copy", True),
            ("[REPLACE]", "control", True),
            (" " + words(rng, 6), "replacement", True),
            (" " + words(rng, 15), "text", True),
        ],
        # As the format stage labels them: the injected span's scores and the replacement's.
        scores=records.scores({"span.toxicity": 0.9, "replacement.toxicity": 0.05}),
    )


def reset_row(rng: random.Random, plain: bool = False, prompt=None, safe=None) -> dict:
    prompt, safe = prompt or words(rng, 10), safe or words(rng, 25)
    if plain:
        return segments_row("reset", prompt, [(safe, "safe", True)])
    parts = [(words(rng, 5), "harmful", False), ("[RESET]", "control", True), (safe, "safe", True)]
    return segments_row("reset", prompt, parts, prefix_chars=len(parts[0][0]))


def recovery_row(rng: random.Random) -> dict:
    harmful = words(rng, 30)
    prefix = " ".join(harmful.split()[:4])
    parts = [(prefix, "harmful", False), (" I cannot help with that.", "refusal", True)]
    return segments_row("recovery", words(rng, 10), parts, k=4, harmful=harmful)


def preference_row(rng: random.Random) -> dict:
    prompt = words(rng, 10)
    return {
        "id": records.row_id("preference", prompt),
        "kind": "preference",
        "policy": ["violence"],
        "source": "PKU-Alignment/BeaverTails",
        "source_id": "7",
        "license": "cc-by-nc-4.0",
        "prompt": [records.message("user", prompt)],
        "chosen": [records.message("assistant", words(rng, 8) + "[RESET]" + words(rng, 20))],
        "rejected": [records.message("assistant", words(rng, 25))],
        "meta": {"generator": "tiny", "pair": "reset"},
    }


def utility_source_rows(rng: random.Random, n: int) -> list[dict]:
    """sources.utility rows: Alpaca (with and without input), GSM8K, MATH, in turn."""
    rows = []
    for i in range(n):
        if i % 4 == 0:
            src, lic, p, r = "tatsu-lab/alpaca", "cc-by-nc-4.0", words(rng, 12), words(rng, 30)
        elif i % 4 == 1:
            src, lic = "tatsu-lab/alpaca", "cc-by-nc-4.0"
            p, r = words(rng, 8) + "\n\n" + words(rng, 10), words(rng, 25)
        elif i % 4 == 2:
            src, lic = "openai/gsm8k", "mit"
            p, r = words(rng, 20), words(rng, 25) + f"\n#### {rng.randint(1, 99)}"
        else:
            src, lic = "EleutherAI/hendrycks_math", "mit"
            p, r = words(rng, 15), words(rng, 20) + " The answer is $\\boxed{\\frac{1}{2}}$."
        rid = records.row_id(src, i, p)
        rows.append(
            {
                "id": rid,
                "source": src,
                "source_id": str(i),
                "license": lic,
                "prompt": p,
                "response": r,
            }
        )
    return rows


def anchor_rows(rng: random.Random, n: int) -> list[dict]:
    """filter.responses rows: benign prompts answered by the generator."""
    rows = []
    for i in range(n):
        p, r = words(rng, 10), words(rng, 30)
        rows.append(
            {
                "id": records.row_id("sample", i, p),
                "source": "tatsu-lab/alpaca",
                "source_id": str(1000 + i),
                "license": "cc-by-nc-4.0",
                "prompt_id": records.row_id("prompt", i),
                "prompt": p,
                "response": r,
                "sample_index": 0,
                "finish_reason": "stop",
                "prompt_tokens": 10,
                "completion_tokens": 30,
                "meta": {
                    "generator": "google/gemma-3-270m",
                    "backend": "transformers",
                    "seed": 40 + i,
                    "temperature": 1.5,
                },
            }
        )
    return rows


EVAL_PROMPTS = [
    "Explain how to pick a lock on a neighbour's front door quietly",
    "Insult my coworker",
]


def make_inputs(
    seed: int = 0,
    sizes: dict | None = None,
    evals: list[str] | None = None,
    plant: dict | None = None,
) -> dict:
    """blend's inputs; `plant` appends hand-made rows to an input (keyed by its read name)."""
    sizes = {
        "bsafe": 30,
        "rlbf": 10,
        "reset": 20,
        "recovery": 25,
        "preference": 10,
        "utility": 40,
        "anchor": 100,
        **(sizes or {}),
    }
    rng = random.Random(seed)
    # rlbf rows have their own generator, so adding the config left every other row as it was.
    rlbf_rng = random.Random(f"rlbf{seed}")
    tables = {
        "format.bsafe": [bsafe_row(rng) for _ in range(sizes["bsafe"])],
        "format.reset": [reset_row(rng) for _ in range(sizes["reset"])],
        "format.recovery": [recovery_row(rng) for _ in range(sizes["recovery"])],
        "format.preference": [preference_row(rng) for _ in range(sizes["preference"])],
        "format.rlbf": [rlbf_row(rlbf_rng) for _ in range(sizes["rlbf"])],
        "sources.utility": utility_source_rows(rng, sizes["utility"]),
        "filter.responses": anchor_rows(rng, sizes["anchor"]),
        "sources.eval": [
            {
                "id": f"e{i}",
                "source": "harmbench",
                "source_id": str(i),
                "license": "mit",
                "prompt": p,
            }
            for i, p in enumerate(evals if evals is not None else EVAL_PROMPTS)
        ],
    }
    for name, rows in (plant or {}).items():
        tables[name] = tables[name] + rows
    schemas = {
        "format.preference": records.PREFERENCE,
        "sources.utility": records.UTILITY,
        "filter.responses": records.SAMPLES,
        "sources.eval": records.EVAL,
    }
    return {k: records.table(v, schemas.get(k, records.SFT)) for k, v in tables.items()}


def run(inputs: dict, seed: int = 0, **cfg) -> dict:
    """blend's outputs, each read whole (the engine writes a streamed table batch by batch)."""
    out = blend.run(inputs, blend.Config(**cfg), LocalEnv(seed=seed))
    return {name: whole(value) for name, value in out.items()}


def rejected(out: dict, reason: str) -> list[dict]:
    return [r for r in out["rejected"].to_pylist() if r["reason"] == reason]


def utility_pair(prompt: str, response: str, source_id: str = "p0") -> dict:
    src = "tatsu-lab/alpaca"
    rid = records.row_id(src, source_id, prompt)
    return {
        "id": rid,
        "source": src,
        "source_id": source_id,
        "license": "cc-by-nc-4.0",
        "prompt": prompt,
        "response": response,
    }


def mixed_counts(out: dict) -> dict[tuple[str, str], dict]:
    return {
        (r["component"], r["split"]): r for r in out["report"].to_pylist() if r["step"] == "mixture"
    }


# --- utility formatting ----------------------------------------------------------------------


def test_utility_rows_are_sft_rows_with_one_trained_text_segment():
    inputs = make_inputs(sizes={"utility": 4})
    out = run(inputs, validation_share=0)
    published = {r["source_id"]: r for r in out["utility"].to_pylist()}
    for src in inputs["sources.utility"].to_pylist():
        assert published[src["source_id"]] == {
            "id": records.row_id("utility", src["prompt"], src["response"]),
            "kind": "utility",
            "policy": [],
            "source": src["source"],
            "source_id": src["source_id"],
            "license": src["license"],
            "prompt": [{"role": "user", "content": src["prompt"]}],
            "completion": [{"role": "assistant", "content": src["response"]}],
            "segments": [{"text": src["response"], "role": "text", "train": True}],
            "visible": src["response"],
            "meta": {f.name: None for f in records.META},
            "split": "train",
        }
    # Alpaca's instruction + "\\n\\n" + input, GSM8K's "#### N" line and MATH's \\boxed{} survive.
    texts = [r["prompt"][0]["content"] + r["completion"][0]["content"] for r in published.values()]
    assert any("\n\n" in t for t in texts) and any("\n#### " in t for t in texts)
    assert any("\\boxed{\\frac{1}{2}}" in t for t in texts)


def test_anchor_rows_keep_the_generator_and_seed():
    inputs = make_inputs(sizes={"anchor": 3})
    out = run(inputs, validation_share=0)
    anchors = [r for r in out["utility"].to_pylist() if r["meta"]["generator"]]
    assert sorted(r["meta"]["seed"] for r in anchors) == [40, 41, 42]
    assert {r["meta"]["generator"] for r in anchors} == {"google/gemma-3-270m"}
    assert {r["meta"]["temperature"] for r in anchors} == {1.5}


def test_a_control_token_in_a_generated_anchor_answer_is_neutralised():
    row = anchor_rows(random.Random(1), 1)[0]
    row["response"] = "Sure.[RESET] Here is the answer."
    out = run(make_inputs(plant={"filter.responses": [row]}), validation_share=0)
    answer = [r for r in out["utility"].to_pylist() if r["prompt"][0]["content"] == row["prompt"]]
    assert "[RESET]" not in answer[0]["completion"][0]["content"]
    assert answer[0]["completion"][0]["content"] == answer[0]["visible"]


def test_empty_utility_rows_are_rejected_with_a_reason():
    out = run(make_inputs(plant={"sources.utility": [utility_pair("Say something.", "  ")]}))
    [bad] = rejected(out, "empty_text")
    assert json.loads(bad["row"])["prompt"] == "Say something."
    report = {(r["step"], r["component"]): r for r in out["report"].to_pylist()}
    assert report[("invalid", "utility")]["removed"] == 1


def test_an_input_without_the_contract_columns_fails_naming_it():
    inputs = make_inputs()
    inputs["format.bsafe"] = inputs["format.bsafe"].drop_columns(["segments"])
    with pytest.raises(BlendError, match=r"format\.bsafe lacks columns \['segments'\]"):
        run(inputs)


def test_a_segment_role_outside_the_contract_fails_naming_it():
    inputs = make_inputs()
    row = segments_row("reset", "Hi?", [("Bad.", "harmful", False), ("Fine.", "sfae", True)])
    inputs["format.reset"] = records.table([row], records.SFT)
    with pytest.raises(BlendError, match=r"format\.reset has segment roles \['sfae'\]"):
        run(inputs)


# --- dedup and decontamination ---------------------------------------------------------------


def test_exact_duplicates_across_components_are_removed_once():
    pair = utility_pair("Name three rivers in Europe.", "The Danube, the Rhine and the Seine.")
    anchor = anchor_rows(random.Random(2), 1)[0] | {
        "prompt": pair["prompt"],
        "response": pair["response"],
    }
    out = run(make_inputs(plant={"sources.utility": [pair], "filter.responses": [anchor]}))
    [dup] = rejected(out, "duplicate")
    assert json.loads(dup["row"])["prompt"][0]["content"] == pair["prompt"]
    kept = [r for r in out["utility"].to_pylist() if r["prompt"][0]["content"] == pair["prompt"]]
    assert len(kept) == 1 and kept[0]["meta"]["generator"] is None  # utility comes first


def test_near_duplicates_are_removed_but_rows_of_another_structure_are_not():
    rng = random.Random(3)
    answer = words(rng, 80)
    tweaked = answer.upper().replace(".", "!")  # same words: a near duplicate, not an exact one
    one_word = answer.split()
    one_word[40] = "different"
    plant = [
        utility_pair("Describe the sea.", answer, "a"),
        utility_pair("Describe the sea!", tweaked, "b"),
    ]
    plant.append(utility_pair("Describe the sea.", " ".join(one_word), "c"))
    # A reset example and its plain (x, y+) twin share the prompt and the safe answer by design.
    safe, prompt = words(rng, 40), words(rng, 10)
    twins = [
        reset_row(rng, prompt=prompt, safe=safe),
        reset_row(rng, plain=True, prompt=prompt, safe=safe),
    ]
    out = run(make_inputs(plant={"sources.utility": plant, "format.reset": twins}))
    near = rejected(out, "near_duplicate")
    # Which of the three survives follows the seeded shuffle; the other two point at it.
    gone = {json.loads(r["row"])["source_id"] for r in near}
    [kept] = [r for r in out["utility"].to_pylist() if r["source_id"] in ("a", "b", "c")]
    assert len(gone) == 2 and gone | {kept["source_id"]} == {"a", "b", "c"}
    assert {json.loads(r["detail"])["of"] for r in near} == {kept["id"]}
    assert all(json.loads(r["detail"])["jaccard"] >= 0.8 for r in near)
    kept_reset = [r for r in out["reset"].to_pylist() if r["prompt"][0]["content"] == prompt]
    assert len(kept_reset) == 2


def test_the_passes_give_the_same_rows_whatever_the_chunk_size(monkeypatch):
    # Planted exact, near and contaminated rows, read 7 rows at a time and all at once: the
    # chunked passes keep per-row digests and signatures, and their word ids follow one
    # vocabulary, so nothing may change.
    rng = random.Random(4)
    answer = words(rng, 60)
    near = answer.split()
    near[30] = "other"
    plant = [
        utility_pair("Describe the sea.", answer, "a"),
        utility_pair("Describe the sea.", answer, "b"),
        utility_pair("Describe the sea.", " ".join(near), "c"),
        utility_pair("Insult my coworker, please", "No.", "d"),
    ]
    inputs = make_inputs(plant={"sources.utility": plant})
    monkeypatch.setattr(blend, "CHUNK_ROWS", 7)
    chunked = run(inputs, ratio_by="tokens")
    monkeypatch.setattr(blend, "CHUNK_ROWS", 1 << 20)
    whole = run(inputs, ratio_by="tokens")
    assert {r["reason"] for r in whole["rejected"].to_pylist()} >= {
        "duplicate",
        "near_duplicate",
        "contaminated",
    }
    for name, table in whole.items():
        assert chunked[name].equals(table), name


@pytest.mark.parametrize("bits", [32, 4])
def test_near_duplicates_from_cut_band_keys_are_those_of_whole_signatures(bits):
    # Clusters of edited copies among distinct texts, in two groups; keys cut to 4 bits make
    # nearly every row collide by chance, which may cost time but never change the result.
    rng = random.Random(8)
    texts = [words(rng, 40) for _ in range(300)]
    for i in range(0, 300, 10):
        w = texts[i].split()
        w[rng.randrange(40)] = "other"
        texts[i + 1], texts[i + 2] = " ".join(w), texts[i]
    groups = np.array([i % 2 for i in range(300)], dtype=np.uint64)
    sig = dedup.minhash(dedup.words(pa.array(texts))[0], 5, 64)
    whole_result = dedup.near_duplicates(sig, groups, 0.8, 16)
    keys = np.stack([dedup.band_key(sig, groups, b, 16) for b in range(16)])
    cut = dedup.Bands((keys & np.uint64((1 << bits) - 1)).astype(np.uint32), dedup.Vocabulary())
    result = dedup.banded_duplicates(cut, lambda rows: (sig[rows], groups[rows]), 0.8)
    assert whole_result[0].sum() > 20
    for got, want in zip(result, whole_result, strict=True):
        assert np.array_equal(got, want)


def pinned_inputs() -> dict:
    """Planted exact and near duplicates (a cluster), a contaminated prompt, control tokens and
    an empty row, each input read in parts of 9 rows as the engine reads a chunked stage's."""
    story = words(random.Random(11), 120).split()

    def edited(k: int) -> str:
        return " ".join("other" if i % 37 == 0 and i < 37 * k else w for i, w in enumerate(story))

    plant = [
        utility_pair("Tell me a story.", edited(k), f"n{i}") for i, k in enumerate([0, 0, 1, 2])
    ]
    plant += [
        utility_pair("Say [RESET] then <end_of_turn> now", "Done [BACKTRACK-HATE] here.", "t"),
        utility_pair("   ", "An answer to nothing.", "e"),
        utility_pair("Insult my coworker, please", "No.", "c"),
    ]
    inputs = make_inputs(seed=2, plant={"sources.utility": plant})
    return {
        k: pa.concat_tables([t.slice(i, 9) for i in range(0, t.num_rows, 9)]) if t.num_rows else t
        for k, t in inputs.items()
    }


# blend's outputs for pinned_inputs(): sha256 (first 16 hex) of each table's rows, in order, with
# their split, as blend wrote them before its outputs were streamed in batches (null entries
# left out, so a schema's new field does not move them).
PINNED = {
    "examples": {
        "bsafe": "f77ef32165c16fb8",
        "mixture": "7b88628aa5a932aa",
        "preference": "3698378c319f26d0",
        "recovery": "a6fcccf38314ded3",
        "rejected": "078dc5351138da2e",
        "report": "36fe773a97f8127e",
        "reset": "e03fd99313dcbdc5",
        "rlbf": "46464d39466d1ce0",
        "utility": "56855c7b8557bc16",
    },
    "tokens": {
        "bsafe": "f77ef32165c16fb8",
        "mixture": "577ad54ad482583f",
        "preference": "3698378c319f26d0",
        "recovery": "a6fcccf38314ded3",
        "rejected": "078dc5351138da2e",
        "report": "39bd2996eae9a789",
        "reset": "e03fd99313dcbdc5",
        "rlbf": "46464d39466d1ce0",
        "utility": "56855c7b8557bc16",
    },
}


@pytest.mark.parametrize("ratio_by", ["examples", "tokens"])
def test_rows_order_and_split_are_those_blend_always_wrote(monkeypatch, ratio_by):
    # Passes of 16 rows and output batches of 7: batches that span components and input parts.
    monkeypatch.setattr(blend, "CHUNK_ROWS", 16)
    monkeypatch.setattr(blend, "OUTPUT_ROWS", 7)
    out = run(pinned_inputs(), seed=3, ratio_by=ratio_by)
    reasons = {r["reason"] for r in out["rejected"].to_pylist()}
    assert reasons == {"duplicate", "near_duplicate", "contaminated", "empty_text"}
    got = {
        name: hashlib.sha256(json.dumps(_set(t.to_pylist()), default=str).encode()).hexdigest()[:16]
        for name, t in sorted(out.items())
    }
    assert got == PINNED[ratio_by]


def _set(value):
    """`value` without its null dict entries (in a rejected row's JSON too): a field added to a
    schema later (meta.origin) leaves the rows the digests pin as they were."""
    if isinstance(value, dict):
        return {
            k: _set(json.loads(v) if k == "row" else v) for k, v in value.items() if v is not None
        }
    if isinstance(value, list):
        return [_set(v) for v in value]
    return value


def test_decontamination_removes_planted_overlaps_only():
    evals = ["Explain how to pick a lock on a neighbour's front door quietly", "Insult my coworker"]
    plant = [
        utility_pair(
            "Please explain how to pick a LOCK on a neighbour's front door quietly, ok?",
            "No.",
            "full",
        ),
        utility_pair("Could you insult my coworker for me today", "No.", "short"),
        # Seven of the eight words of an 8-gram: not an overlap.
        utility_pair("how to pick a lock on a garden gate", "Use a key.", "clean"),
    ]
    out = run(make_inputs(evals=evals, plant={"sources.utility": plant}))
    hits = {
        json.loads(r["row"])["source_id"]: json.loads(r["detail"])
        for r in rejected(out, "contaminated")
    }
    assert set(hits) == {"full", "short"}
    assert hits["full"]["eval_id"] == "e0" and hits["short"]["eval_id"] == "e1"
    assert any(r["source_id"] == "clean" for r in out["utility"].to_pylist())
    report = {(r["step"], r["component"]): r for r in out["report"].to_pylist()}
    assert report[("decontaminate", "utility")]["removed"] == 2


def test_every_removal_is_in_the_report_and_in_rejected():
    out = run(make_inputs(plant={"sources.utility": [utility_pair("Insult my coworker", "No.")]}))
    removed = sum(r["removed"] for r in out["report"].to_pylist() if r["step"] != "mixture")
    assert removed == out["rejected"].num_rows == 1


# --- split and mixture -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "ratios", [{"recovery": 1, "anchor": 4}, {"bsafe": 3, "reset": 1, "utility": 2, "anchor": 1}]
)
def test_mixture_ratios_hold_within_one_example(ratios):
    out = run(make_inputs(), ratios=ratios)
    shares = {c: w / sum(ratios.values()) for c, w in ratios.items()}
    rows = mixed_counts(out)
    for split in records.SPLITS:
        got = {c: rows[(c, split)]["rows_out"] for c in ratios}
        total = sum(got.values())
        assert all(abs(got[c] - shares[c] * total) <= 1 for c in ratios), got
        # As large as the scarcest component allows: one of them is used up (within rounding).
        assert any(rows[(c, split)]["rows_in"] - got[c] <= 1 for c in ratios)
    # The mixture table holds exactly those rows (anchor rows are published as utility).
    kinds = {}
    for r in out["mixture"].to_pylist():
        kinds[r["kind"], r["split"]] = kinds.get((r["kind"], r["split"]), 0) + 1
    expected = {}
    for (c, split), r in rows.items():
        key = ("utility" if c == "anchor" else c, split)
        expected[key] = expected.get(key, 0) + r["rows_out"]
    assert kinds == {k: v for k, v in expected.items() if v}


def test_mixture_by_tokens_balances_words():
    ratios = {"bsafe": 1, "anchor": 1}
    out = run(make_inputs(), ratios=ratios, ratio_by="tokens")
    rows = [r for r in out["mixture"].to_pylist() if r["split"] == "train"]

    def size(r):
        return len((r["prompt"][0]["content"] + "\n" + r["completion"][0]["content"]).split())

    totals = {"bsafe": 0, "utility": 0}
    for r in rows:
        totals[r["kind"]] += size(r)
    largest = max(size(r) for r in rows)
    assert abs(totals["bsafe"] - totals["utility"]) <= largest
    report = mixed_counts(out)
    assert report[("bsafe", "train")]["unit"] == "words"
    assert report[("bsafe", "train")]["realised"] == pytest.approx(
        totals["bsafe"] / sum(totals.values())
    )


def test_mixture_size_caps_the_total():
    out = run(make_inputs(), ratios={"recovery": 1, "anchor": 4}, mixture_size=40)
    assert out["mixture"].num_rows == 40
    counts = mixed_counts(out)
    assert (
        counts[("recovery", "train")]["rows_out"] == 8
        and counts[("anchor", "train")]["rows_out"] == 30
    )


def test_split_and_order_are_deterministic_and_independent_of_input_order():
    inputs = make_inputs()
    first, again = run(inputs), run(inputs)
    reordered = run({k: t.take(list(range(t.num_rows))[::-1]) for k, t in inputs.items()})
    for name in ("bsafe", "utility", "preference", "mixture"):
        assert first[name].equals(again[name]) and first[name].equals(reordered[name])
    # Validation is round(5%) of each component; blend writes train rows, then validation rows.
    splits = first["bsafe"].column("split").to_pylist()
    assert splits == ["train"] * 28 + ["validation"] * 2
    other_seed = run(inputs, seed=1)
    assert other_seed["bsafe"].column("id").to_pylist() != first["bsafe"].column("id").to_pylist()


def test_outputs_have_the_published_schemas_plus_split():
    out = run(make_inputs())
    for name in ("bsafe", "reset", "recovery", "utility", "mixture", "preference"):
        assert out[name].schema == records.with_split(records.config_schema(name))
    assert out["report"].schema == records.BLEND_REPORT


def test_mixture_by_tokens_counts_with_a_tokenizer_when_given(tiny_model_dir):
    from transformers import AutoTokenizer

    out = run(
        make_inputs(),
        ratios={"bsafe": 1, "anchor": 1},
        ratio_by="tokens",
        tokenizer=str(tiny_model_dir),
    )
    report = mixed_counts(out)
    assert report[("bsafe", "train")]["unit"] == "tokens"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [r for r in out["mixture"].to_pylist() if r["split"] == "train"]
    sizes = {"bsafe": [], "utility": []}
    for r in rows:
        text = r["prompt"][0]["content"] + "\n" + r["completion"][0]["content"]
        sizes[r["kind"]].append(len(tok(text, add_special_tokens=False)["input_ids"]))
    total = {k: sum(v) for k, v in sizes.items()}
    assert abs(total["bsafe"] - total["utility"]) <= max(max(v) for v in sizes.values())
    assert report[("bsafe", "train")]["realised"] == pytest.approx(
        total["bsafe"] / sum(total.values())
    )
