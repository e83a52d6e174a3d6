"""Several judges on one gate (pipeline/judges.py): config forms, `any`/`all` verdicts, prefixed
labels in meta.scores, agreement counts and Cohen's kappa, the filter/inject/rewrite gates and the
card's Judges section.

Two real scorers judge: profanity-check (shipped in its wheel) and detoxify's own code on
conftest's tiny random checkpoint, which scores every text about 0.5 on each label: at threshold
0.1 it flags every text, at 0.9 none. Against profanity-check (a profane text scores ~1.0, a benign
one < 0.1) that forces agreements and disagreements without depending on a trained model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError
from recipe_data import StandInGenerator, harmful, responses
from test_filter import GOOD, OTHER, row
from test_publish import blended, do_publish, publish_inputs  # noqa: F401  (a fixture)

from pipeline import agreement, card, config, judges, records
from pipeline.env import LocalEnv
from pipeline.scorers import ScorerSpec
from stages import filter as filt
from stages import inject, publish, rewrite
from stages.filter import Config as FilterConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

PROFANE = "You are a fucking idiot and I hate you."
BENIGN = "Have a lovely day at the park."
# GOOD with an insult: profane, and long enough to pass filter's quality checks.
TOXIC_ROW = GOOD + " You are a fucking idiot and a worthless piece of shit."


@pytest.fixture(scope="module")
def detox(detoxify_checkpoint):
    """Keyword arguments of the tiny detoxify judge; add a threshold."""
    folder, _ = detoxify_checkpoint
    return {
        "kind": "detoxify",
        "checkpoint": str(folder / "tiny.ckpt"),
        "huggingface_config_path": str(folder),
    }


def two(detox, detox_threshold: float) -> list[ScorerSpec]:
    return [ScorerSpec(kind="profanity-check"), ScorerSpec(**detox, threshold=detox_threshold)]


# --- config ----------------------------------------------------------------------------------


def test_one_scorer_keeps_its_form_and_a_list_parses(detox):
    one = FilterConfig(scorer={"kind": "profanity-check"})
    assert isinstance(one.scorer, ScorerSpec) and one == FilterConfig()
    assert one.model_dump()["scorer"]["kind"] == "profanity-check"  # not turned into a list
    listed = FilterConfig(scorer=two(detox, 0.1), agree="all")
    assert judges.names(listed.scorer) == ["profanity-check", "detoxify"]
    assert listed.scorer[1].threshold == 0.1 and listed.agree == "all"
    for stage in (inject, rewrite):
        assert judges.names(stage.Config(scorer=two(detox, 0.1)).scorer)[1] == "detoxify"


def test_duplicate_judge_names_empty_lists_and_bad_agree_are_config_errors(detox):
    raw = {"filter": {"scorer": [{"kind": "detoxify"}, {"kind": "detoxify", "model_type": "x"}]}}
    with pytest.raises(config.ConfigError) as err:
        config.validate(raw, {"filter": filt})
    assert "filter.scorer" in str(err.value) and "two judges are named 'detoxify'" in str(err.value)
    named = [{"kind": "detoxify", "name": "a"}, {"kind": "detoxify", "name": "b"}]
    assert judges.names(FilterConfig(scorer=named).scorer) == ["a", "b"]
    with pytest.raises(ValidationError, match="at least 1 item"):
        FilterConfig(scorer=[])
    with pytest.raises(ValidationError, match="agree"):
        rewrite.Config(agree="most")
    with pytest.raises(ValidationError, match="threshold"):
        FilterConfig(scorer={"kind": "profanity-check", "threshold": 1.5})


def test_judge_settings_where_nothing_reads_them_are_config_errors():
    from pipeline.decode.config import GuardConfig
    from stages.eval_judges import ScorerJudgeSpec

    with pytest.raises(ValidationError, match="threshold only apply where a scorer gates rows"):
        GuardConfig(scorer={"kind": "profanity-check", "threshold": 0.2})
    with pytest.raises(ValidationError, match="name, label only apply"):
        ScorerJudgeSpec(
            kind="scorer", scorer={"kind": "profanity-check", "name": "a", "label": "x"}
        )
    assert GuardConfig(scorer={"kind": "profanity-check"}, threshold=0.2).threshold == 0.2


def test_the_shipped_configs_keep_one_scorer_through_their_yaml_anchor():
    from pipeline.cli import load_stages

    for name in ("default.yaml", "paper.yaml"):
        cfg = config.load(CONFIGS / name, load_stages())
        assert isinstance(cfg.filter.scorer, ScorerSpec)
        assert cfg.filter.scorer == cfg.inject.scorer == cfg.rewrite.scorer


# --- verdicts ----------------------------------------------------------------------------------


def test_any_and_all_combine_disagreeing_judges(detox):
    env = LocalEnv()
    texts = [PROFANE, BENIGN]
    anyone = judges.judge(env, two(detox, 0.1), texts, agree="any")
    every = judges.judge(env, two(detox, 0.1), texts, agree="all")
    # detoxify at 0.1 flags both; profanity-check only the profane one
    assert [j.flags for j in anyone] == [
        {"profanity-check": True, "detoxify": True},
        {"profanity-check": False, "detoxify": True},
    ]
    assert [j.unsafe for j in anyone] == [True, True]
    assert [j.unsafe for j in every] == [True, False]
    # A judge's own threshold wins over the stage's, which the others take.
    strict = judges.judge(env, two(detox, 0.9), texts, agree="any")
    assert [j.unsafe for j in strict] == [True, False]
    loose = judges.judge(env, two(detox, 0.9), texts, agree="any", threshold=0.0)
    assert [j.flags for j in loose] == [{"profanity-check": True, "detoxify": False}] * 2
    assert loose[0].threshold == {"profanity-check": 0.0, "detoxify": 0.9}
    # A judge's own label wins over the maximum over its labels.
    labelled = judges.judge(env, [ScorerSpec(**detox, label="toxicity")], texts)[0]
    assert labelled.score["detoxify"] == labelled.scores["toxicity"]


def test_several_judges_prefix_their_labels_one_judge_keeps_them(detox):
    env = LocalEnv()
    (one,) = judges.judge(env, ScorerSpec(), [PROFANE])
    assert list(one.scores) == ["profanity"]
    (both,) = judges.judge(env, two(detox, 0.1), [PROFANE])
    assert list(both.scores) == [
        "profanity-check/profanity",
        "detoxify/toxicity",
        "detoxify/severe_toxicity",
        "detoxify/obscene",
        "detoxify/threat",
        "detoxify/insult",
        "detoxify/identity_attack",
    ]
    assert both.scores["profanity-check/profanity"] == one.scores["profanity"]


def test_a_label_the_judge_does_not_have_is_a_clear_error():
    with pytest.raises(judges.JudgeError, match="judge 'profanity-check' has no label 'toxicity'"):
        judges.judge(LocalEnv(), ScorerSpec(label="toxicity"), [BENIGN])


# --- agreement -------------------------------------------------------------------------------


def _flags(a: bool, b: bool) -> judges.Judgement:
    return judges.Judgement(a or b, {"a": a, "b": b}, {}, {}, {})


def test_agreement_counts_and_kappa_by_hand():
    # 10 texts: a flags 4, b flags 5, both flag 3, both clear 4.
    pairs = [(1, 1)] * 3 + [(1, 0)] + [(0, 1)] * 2 + [(0, 0)] * 4
    texts = [_flags(bool(a), bool(b)) for a, b in pairs]
    rules = {"a": judges.Rule(0.5), "b": judges.Rule(0.7, "insult")}
    acc = agreement.Agreement(rules)
    acc.add(texts[:6])  # two chunks, summed downstream as the engine sums stats
    second = agreement.Agreement(rules)
    second.add(texts[6:])
    assert acc.stats() == {
        "judged": 6,
        "judged_unsafe": 6,
        "flagged.a": 4,
        "flagged.b": 5,
        "both_flagged.a+b": 3,
        "both_clear.a+b": 0,
    }
    summary = agreement.summarise({"filter": acc.table_rows() + second.table_rows()})
    assert summary["judges"] == [
        {"gate": "filter", "judge": "a", "threshold": 0.5, "label": None, "rows": 10,
         "flagged": 4, "share": 0.4},
        {"gate": "filter", "judge": "b", "threshold": 0.7, "label": "insult", "rows": 10,
         "flagged": 5, "share": 0.5},
    ]  # fmt: skip
    # p_o = (3 + 4) / 10 = 0.7; p_e = 0.4 * 0.5 + 0.6 * 0.5 = 0.5; kappa = 0.2 / 0.5 = 0.4
    (pair,) = summary["pairs"]
    assert pair == {
        "gate": "filter",
        "judges": "a / b",
        "rows": 10,
        "both_flagged": 3,
        "both_clear": 4,
        "agreement": 0.7,
        "kappa": 0.4,
    }
    assert agreement.cohen_kappa(10, 4, 5, 3) == pytest.approx(0.4)
    assert agreement.cohen_kappa(4, 4, 4, 4) is None  # both flag everything: kappa undefined
    assert agreement.cohen_kappa(4, 2, 2, 0) == pytest.approx(-1.0)  # never agree
    assert agreement.cohen_kappa(0, 0, 0, 0) is None


def test_one_judge_counts_flags_and_no_judge_counts_nothing():
    acc = agreement.Agreement(judges.rules(ScorerSpec(), 0.3, "profanity"))
    acc.add([judges.Judgement(True, {"profanity-check": True}, {}, {}, {})])
    assert acc.table_rows() == [
        {"judge": "profanity-check", "other": None, "rows": 1, "flagged": 1, "clear": 0,
         "threshold": 0.3, "label": "profanity"}
    ]  # fmt: skip
    none = agreement.Agreement(judges.rules(None))
    none.add(judges.judge(LocalEnv(), None, [BENIGN]))
    assert none.table_rows() == [] and none.stats() == {}


# --- the gates ---------------------------------------------------------------------------------


def _filter(rows, **cfg):
    table = records.table(rows, records.SAMPLES)
    return filt.run({"sample.samples": table}, FilterConfig(**cfg), LocalEnv())


def test_filter_drops_what_the_judges_call_toxic(detox):
    rows = [row("good", GOOD), row("other", OTHER), row("toxic", TOXIC_ROW)]
    anyone = _filter(rows, scorer=two(detox, 0.1), agree="any")
    assert {r["id"]: r["reason"] for r in anyone["rejected"].to_pylist()} == {
        "good": "toxic",
        "other": "toxic",
        "toxic": "toxic",
    }
    every = _filter(rows, scorer=two(detox, 0.1), agree="all")
    kept = every["responses"].to_pylist()
    assert [r["id"] for r in kept] == ["good", "other"]
    labels = [s["label"] for s in kept[0]["meta"]["scores"]]
    assert "profanity-check/profanity" in labels and "detoxify/toxicity" in labels
    (toxic,) = every["rejected"].to_pylist()
    detail = json.loads(toxic["detail"])
    assert detail["agree"] == "all"
    assert detail["judges"]["detoxify"] == {
        "toxicity": pytest.approx(0.5, abs=0.01),
        "threshold": 0.1,
        "flagged": True,
    }
    assert detail["judges"]["profanity-check"]["flagged"] is True
    assert "detoxify/insult" in detail["scores"]
    assert every["stats"] == {
        "judged": 3,
        "judged_unsafe": 1,
        "flagged.profanity-check": 1,
        "flagged.detoxify": 3,
        "both_flagged.profanity-check+detoxify": 1,
        "both_clear.profanity-check+detoxify": 0,
    }
    assert every["judges"].to_pylist()[-1] == {
        "judge": "profanity-check",
        "other": "detoxify",
        "rows": 3,
        "flagged": 1,
        "clear": 0,
        "threshold": None,
        "label": None,
    }
    assert every["judges"].to_pylist()[1]["threshold"] == 0.1  # detoxify's own, at which it flagged


def test_inject_records_every_judges_scores_and_can_require_unsafe_spans(detox):
    tea = (
        "Tea is a drink. It comes from a plant! Many people enjoy it? Some add milk. Others do not."
    )
    resp = responses(*[(f"r{i}", "q", tea) for i in range(12)])
    inputs = {"filter.responses": resp, "sources.harmful": harmful()}
    cfg = {"scorer": two(detox, 0.1), "policy_weights": {"harassment": 1.0}}
    out = inject.run(inputs, inject.Config(**cfg), LocalEnv())
    spans = [v for r in out["violations"].to_pylist() for v in r["violations"]]
    assert out["violations"].num_rows == 12
    for v in spans:
        labels = [s["label"] for s in v["scores"]]
        assert "profanity-check/profanity" in labels and "detoxify/obscene" in labels
    profane = [
        next(s["score"] for s in v["scores"] if s["label"] == "profanity-check/profanity") >= 0.5
        for v in spans
    ]
    assert out["stats"]["judged"] == len(spans)  # per injected span
    assert out["stats"]["flagged.profanity-check"] == sum(profane)
    assert out["stats"]["flagged.detoxify"] == len(spans)
    # Only spans profanity-check also flags count as unsafe under `all`: the other rows go.
    strict = inject.run(inputs, inject.Config(**cfg, agree="all", require_unsafe=True), LocalEnv())
    by_row = {}
    for r in out["violations"].to_pylist():
        by_row[r["response_id"]] = all(
            next(s["score"] for s in v["scores"] if s["label"] == "profanity-check/profanity")
            >= 0.5
            for v in r["violations"]
        )
    assert strict["violations"].column("response_id").to_pylist() == [
        rid for rid, ok in by_row.items() if ok
    ]
    assert {r["reason"] for r in strict["rejected"].to_pylist()} <= {"span_not_unsafe"}
    assert strict["rejected"].num_rows == sum(not ok for ok in by_row.values())
    with pytest.raises(ValidationError, match="require_unsafe needs a scorer"):
        inject.Config(scorer=None, require_unsafe=True)


class _Judged(LocalEnv):
    """The stand-in generator with the real scorers."""

    def __init__(self, generator) -> None:
        super().__init__()
        self._generator = generator

    def generator(self, spec):
        return self._generator


def test_rewrite_redraws_what_the_judges_call_unsafe(detox):
    def answer(prompt: str, seed: int) -> str:
        return "Tea is also grown in India." if "Continue the text" in prompt else "Sorry, no."

    tea = "Tea is a drink. It comes from a plant. Many people enjoy it."
    cfg = inject.Config(scorer=None, max_violations=1, policy_weights={"hate": 1.0})
    violations = inject.run(
        {"filter.responses": responses(("r1", "q", tea)), "sources.harmful": harmful()},
        cfg,
        LocalEnv(),
    )["violations"]
    inputs = {"inject.violations": violations, "sources.harmful": harmful()}
    scorer = two(detox, 0.1)
    # any: detoxify flags the benign replacement, so it is redrawn, then falls back
    anyone = rewrite.run(
        inputs, rewrite.Config(scorer=scorer, retries=1), _Judged(StandInGenerator(answer))
    )
    (rep,) = anyone["replacements"].to_pylist()
    assert rep["meta"]["fallback"] is True
    assert anyone["stats"]["judged"] == 2 and anyone["stats"]["judged_unsafe"] == 2
    # all: profanity-check clears it, so it is accepted, every judge's scores kept
    every = rewrite.run(
        inputs, rewrite.Config(scorer=scorer, agree="all"), _Judged(StandInGenerator(answer))
    )
    (rep,) = every["replacements"].to_pylist()
    assert rep["replacement"] == "Tea is also grown in India." and not rep["meta"]["fallback"]
    labels = [s["label"] for s in rep["meta"]["scores"]]
    assert labels[0] == "detoxify/identity_attack" and "profanity-check/profanity" in labels
    assert every["judges"].to_pylist()[:2] == [
        {"judge": "profanity-check", "other": None, "rows": 1, "flagged": 0, "clear": 1,
         "threshold": 0.5, "label": None},
        {"judge": "detoxify", "other": None, "rows": 1, "flagged": 1, "clear": 0,
         "threshold": 0.1, "label": None},
    ]  # fmt: skip


# --- the card --------------------------------------------------------------------------------


def test_card_reports_each_gates_judges_and_their_agreement(blended, detox, tmp_path):  # noqa: F811
    rows = [row("good", GOOD), row("other", OTHER), row("toxic", TOXIC_ROW)]
    filtered = _filter(rows, scorer=two(detox, 0.1), agree="all")
    inputs = publish_inputs(blended)
    inputs["filter.judges"] = filtered["judges"]
    single = records.table(
        [{"judge": "profanity-check", "other": None, "rows": 4, "flagged": 1, "clear": 3,
          "threshold": 0.6, "label": "profanity"}],
        records.JUDGES,
    )  # fmt: skip
    inputs["rewrite.judges"] = single
    a, b = do_publish(inputs, tmp_path / "a"), do_publish(inputs, tmp_path / "b")
    tables = card.card_tables(a)
    # Each judge with the label and threshold it flagged at (its own, else the stage's).
    assert tables["judges"] == [
        {"gate": "filter", "judge": "profanity-check", "label": "max", "threshold": "0.5",
         "texts": "3", "flagged": "1", "flagged share": "0.3333"},
        {"gate": "filter", "judge": "detoxify", "label": "max", "threshold": "0.1",
         "texts": "3", "flagged": "3", "flagged share": "1.0000"},
        {"gate": "rewrite", "judge": "profanity-check", "label": "profanity", "threshold": "0.6",
         "texts": "4", "flagged": "1", "flagged share": "0.2500"},
    ]  # fmt: skip
    # detoxify flags every text, so the pair agrees only where profanity-check flags: kappa 0
    assert tables["judge_pairs"] == [
        {"gate": "filter", "judges": "profanity-check / detoxify", "texts": "3",
         "both flagged": "1", "both clear": "0", "agreement": "0.3333", "kappa": "0.0000"},
    ]  # fmt: skip
    text = (a / "README.md").read_text()
    assert "(filter: `any`)" in text  # RUN_CONFIG sets no agree: the default
    assert "](images/judges.png)" in text
    png = a / "images" / "judges.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.read_bytes() == (b / "images" / "judges.png").read_bytes()
    assert text == (b / "README.md").read_text()
    # One judge on every gate: the judges table (what each flagged at), no pairs, no plot.
    inputs["filter.judges"] = single
    c = do_publish(inputs, tmp_path / "c")
    text = (c / "README.md").read_text()
    assert "Each gate had one judge (profanity-check), so there is no agreement" in text
    one = card.card_tables(c)
    assert [(r["gate"], r["label"], r["threshold"]) for r in one["judges"]] == [
        ("filter", "profanity", "0.6"),
        ("rewrite", "profanity", "0.6"),
    ]
    assert "judge_pairs" not in one and not (c / "images" / "judges.png").exists()


def test_publish_reads_the_judges_table_of_every_judging_stage():
    assert {f"{s}.judges" for s in ("filter", "inject", "rewrite")} <= set(publish.SPEC.reads)
    for stage in (filt, inject, rewrite):
        assert stage.SPEC.writes["judges"] == records.JUDGES


# --- one score -> flag rule ------------------------------------------------------------------

# (scorer, text, the judge's label, the label whose score sets the threshold, nudge, flagged):
# `tie` puts the threshold exactly at that score (flagged: the rule is `>=`), `up` just above it.
# With detoxify, `low`/`high` stand for its lowest- and highest-scoring label on the text: the
# maximum (label None) flags just above the lowest; the lowest label itself does not.
RULE_CASES = [
    ("profanity-check", PROFANE, None, "profanity", "tie", True),
    ("profanity-check", PROFANE, None, "profanity", "up", False),
    ("profanity-check", BENIGN, "profanity", "profanity", "tie", True),
    ("detoxify", BENIGN, "low", "low", "tie", True),
    ("detoxify", BENIGN, "low", "low", "up", False),
    ("detoxify", BENIGN, None, "low", "up", True),
    ("detoxify", BENIGN, None, "high", "up", False),
]


class _Seen:
    """A real scorer that records the texts it was asked about (which text the guard scored)."""

    def __init__(self, scorer) -> None:
        self.scorer, self.labels, self.texts = scorer, scorer.labels, []

    def score(self, texts):
        self.texts += texts
        return self.scorer.score(texts)


def _gate_flags(spec, text, threshold, label):
    cfg = FilterConfig(scorer=spec, threshold=threshold, label=label)
    (verdict,) = judges.judge(LocalEnv(), cfg.scorer, [text], cfg.agree, cfg.threshold, cfg.label)
    return verdict.unsafe


def _guard_flags(spec, text, threshold, label, model_dir):
    from decode_fixtures import Script, decoder

    from pipeline.decode import GuardConfig, Request
    from pipeline.scorers import load_scorer

    guard = GuardConfig(scorer=spec, threshold=threshold, label=label, retries=0)
    seen = _Seen(load_scorer(spec))
    dec = decoder(model_dir, scorer=seen, temperature=0, max_new_tokens=40, guard=guard)
    eot = dec.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    script = dec.prompts.text(text) + [eot]
    user = [{"role": "user", "content": "Say something."}]
    [out] = dec.decode([Request(user)], processors=[Script([script])])
    assert seen.texts[:1] == [text]  # the guard scored exactly this sentence
    return any(e.kind == "rollback" for e in out.events)


def _eval_flags(spec, text, threshold, label):
    from stages.eval_judges import ScorerJudgeSpec, load_judge

    judge = load_judge(
        ScorerJudgeSpec(kind="scorer", scorer=spec, threshold=threshold, label=label)
    )
    (verdict,) = judge.judge(["Say something."], [text])
    return verdict.harmful


@pytest.mark.parametrize("where", ["gate", "guard", "eval"])
@pytest.mark.parametrize(
    "kind, text, label, at, nudge, flagged", RULE_CASES, ids=[str(i) for i in range(7)]
)
def test_same_scores_give_the_same_flags_in_a_gate_the_guard_and_evals_scorer_judge(
    where, kind, text, label, at, nudge, flagged, detox, control_model_dir
):
    import math

    from pipeline.scorers import load_scorer

    spec = ScorerSpec(**detox) if kind == "detoxify" else ScorerSpec(kind=kind)
    scores = load_scorer(spec).score([text])[0]
    ranked = sorted(scores, key=scores.get)
    pick = {"low": ranked[0], "high": ranked[-1]}
    label, at = pick.get(label, label), pick.get(at, at)
    assert kind != "detoxify" or scores[ranked[0]] < scores[ranked[-1]]  # labels set apart
    threshold = scores[at] if nudge == "tie" else math.nextafter(scores[at], 1.0)
    if where == "gate":
        got = _gate_flags(spec, text, threshold, label)
    elif where == "guard":
        got = _guard_flags(spec, text, threshold, label, control_model_dir)
    else:
        got = _eval_flags(spec, text, threshold, label)
    assert got is flagged


@pytest.mark.parametrize(
    "override, new",
    [
        ("filter.toxicity_threshold=0.3", "`toxicity_threshold` is now `threshold`"),
        ("natural.toxicity_threshold=0.3", "`toxicity_threshold` is now `threshold`"),
        ("filter.toxicity_label=profanity", "`toxicity_label` is now `label`"),
        ("natural.toxicity_label=profanity", "`toxicity_label` is now `label`"),
    ],
)
def test_the_old_threshold_key_fails_naming_the_new_one(override, new):
    from pipeline.cli import load_stages

    with pytest.raises(config.ConfigError) as err:
        config.load(None, load_stages(), [override])
    section = override.split(".")[0]
    assert f"  {section}: {new}; rename the key" in str(err.value).splitlines()


def test_every_score_threshold_has_one_name_and_one_range():
    from pipeline.decode.config import GuardConfig
    from stages import natural
    from stages.eval_judges import ScorerJudgeSpec

    models = [FilterConfig, natural.Config, inject.Config, rewrite.Config, GuardConfig]
    for model in models:
        assert {"threshold", "label"} <= set(model.model_fields), model
        model(threshold=1.0)  # a certain score still flags at 1
        with pytest.raises(ValidationError, match="threshold"):
            model(threshold=0)  # would flag every text
    ScorerJudgeSpec(kind="scorer", threshold=1.0, label="profanity")
    with pytest.raises(ValidationError, match="threshold"):
        ScorerJudgeSpec(kind="scorer", threshold=0)
    with pytest.raises(judges.JudgeError, match="eval judge scorer:profanity-check has no label"):
        from stages.eval_judges import load_judge

        load_judge(ScorerJudgeSpec(kind="scorer", label="toxicity"))
