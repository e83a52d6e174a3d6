"""publish: the dataset folder loads with `datasets` and TRL as it is, its shards are cut by size
and written with the contract's schemas, its card states readable counts, and the same inputs give
the same bytes. Inputs are blend's output on test_blend.py's self-written fixture rows."""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from test_blend import bsafe_row, make_inputs, utility_pair
from test_blend import run as run_blend

from pipeline import card, handoff, records
from pipeline.env import LocalEnv
from stages import blend, publish
from stages import format as fmt

RUN_CONFIG = {
    "run": {"name": "unit", "seed": 0, "max_rejected_share": 0.5},
    "rewrite": {"scorer": {"kind": "profanity-check", "batch_size": 64}},
    # the resolved section, as the engine hands it over; publish hands its draw to the trainer
    "format": fmt.Config(p_zero=0.25, k_cap=40, refusal_separator="\n").model_dump(mode="json"),
    "blend": {
        "ratios": {"recovery": 1.0, "anchor": 4.0},
        "near_dup_threshold": 0.8,
        "tokenizer": None,
    },
    "publish": {"shard_bytes": 12000, "pretty_name": "Tést — ünïcode"},
}
SHARD = re.compile(r"^(train|validation)-(\d{5})-of-(\d{5})\.parquet$")
# Gemma's turn format, as a user of a base model would set it before handing the tokenizer to TRL.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def publish_inputs(blended: dict) -> dict:
    inputs = {f"blend.{k}": v for k, v in blended.items() if k != "rejected"}
    for stage in publish.UPSTREAM:
        empty = records.table([], records.REJECTED)
        inputs[f"{stage}.rejected"] = blended["rejected"] if stage == "blend" else empty
    for stage in publish.JUDGED:
        inputs[f"{stage}.judges"] = records.table([], records.JUDGES)
    return inputs


def do_publish(inputs: dict, folder: Path, **cfg) -> Path:
    cfg = {"shard_bytes": 12000, "pretty_name": "Tést — ünïcode", **cfg}
    env = LocalEnv(seed=0, workdir=folder, run_config=RUN_CONFIG)
    folder.mkdir(parents=True, exist_ok=True)
    publish.run(inputs, publish.Config(**cfg), env)
    return folder


@pytest.fixture(scope="module")
def blended() -> dict:
    # One planted duplicate, so the card has a rejection to count.
    pair = utility_pair("Name three rivers in Europe.", "The Danube, the Rhine and the Seine.")
    dup = pair | {"id": "other", "source_id": "p1"}
    return run_blend(make_inputs(plant={"sources.utility": [pair, dup]}))


@pytest.fixture(scope="module")
def folder(blended, tmp_path_factory) -> Path:
    return do_publish(publish_inputs(blended), tmp_path_factory.mktemp("published"))


def shards(folder: Path, config: str, split: str) -> list[Path]:
    return sorted((folder / "data" / config).glob(f"{split}-*.parquet"))


# --- layout and shards -----------------------------------------------------------------------


def test_shards_are_named_cut_by_size_and_carry_the_contract_schema(folder, blended):
    for config in records.CONFIGS:
        for split in records.SPLITS:
            files = shards(folder, config, split)
            names = [SHARD.match(f.name).groups() for f in files]
            assert [int(i) for _, i, _ in names] == list(range(len(files)))
            assert {int(n) for _, _, n in names} == {len(files)}
            # Every shard but the last reached the size target before it was closed.
            assert all(f.stat().st_size >= 12000 for f in files[:-1])
            schema = pq.read_schema(files[0]).remove_metadata()
            assert schema == records.config_schema(config)
            rows = sum(pq.read_metadata(f).num_rows for f in files)
            assert rows == blended[config].column("split").to_pylist().count(split)
    assert len(shards(folder, "utility", "train")) > 1  # sharding was exercised
    assert not list(folder.rglob("*.partial"))


def test_load_dataset_reads_every_config_and_split(folder, blended, tmp_path):
    assert (folder / handoff.FILE).is_file()  # read with retrace.json beside the shards
    for config in records.CONFIGS:
        loaded = datasets.load_dataset(str(folder), config, cache_dir=str(tmp_path))
        assert set(loaded) == set(records.SPLITS)
        for split in records.SPLITS:
            expected = [r for r in blended[config].to_pylist() if r.pop("split") == split]
            assert loaded[split].to_list() == expected


def test_the_same_inputs_give_the_same_bytes(blended, tmp_path):
    inputs = publish_inputs(blended)
    a, b = do_publish(inputs, tmp_path / "a"), do_publish(inputs, tmp_path / "b")

    def digest(root: Path) -> dict[str, str]:
        files = sorted(p for p in root.rglob("*") if p.is_file())
        return {
            p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files
        }

    assert digest(a) == digest(b)
    assert any(name.startswith("images/") for name in digest(a))


def test_content_defined_chunking_keeps_every_row(blended, tmp_path):
    inputs = publish_inputs(blended)
    plain = do_publish(inputs, tmp_path / "plain")
    cdc = do_publish(inputs, tmp_path / "cdc", content_defined_chunking=True)
    for config in ("mixture", "bsafe"):
        a, b = shards(plain, config, "train"), shards(cdc, config, "train")
        assert pq.ParquetDataset(b).read() == pq.ParquetDataset(a).read()


def test_a_rerun_in_the_same_folder_leaves_no_stale_shards(blended, tmp_path):
    inputs = publish_inputs(blended)
    do_publish(inputs, tmp_path, shard_bytes=5000)
    many = len(shards(tmp_path, "utility", "train"))
    do_publish(inputs, tmp_path, shard_bytes=10**9)
    assert many > 1 and [f.name for f in shards(tmp_path, "utility", "train")] == [
        "train-00000-of-00001.parquet"
    ]


def test_an_empty_config_is_left_out_and_named(tmp_path, tmp_path_factory):
    blended = run_blend(make_inputs(sizes={"preference": 0}))
    folder = do_publish(publish_inputs(blended), tmp_path)
    assert not (folder / "data" / "preference").exists()
    text = (folder / "README.md").read_text()
    header = yaml.safe_load(text.split("---\n")[1])
    assert "preference" not in [c["config_name"] for c in header["configs"]]
    assert "Configs with no rows, not published: preference." in text
    cache = str(tmp_path_factory.mktemp("cache"))
    assert datasets.load_dataset(str(folder), "bsafe", cache_dir=cache)["train"].num_rows == 28


# --- the card --------------------------------------------------------------------------------


def test_card_header_resolves_configs_and_states_the_licence(folder):
    text = (folder / "README.md").read_text()
    header = yaml.safe_load(text.split("---\n")[1])
    # BeaverTails and Alpaca rows are CC BY-NC 4.0, GSM8K and MATH MIT: the card takes the first.
    assert header["license"] == "cc-by-nc-4.0"
    assert header["pretty_name"] == "Tést — ünïcode"
    assert {"safety", "backtracking"} <= set(header["tags"])
    by_name = {c["config_name"]: c for c in header["configs"]}
    assert list(by_name) == list(records.CONFIGS) and by_name["mixture"]["default"] is True
    assert by_name["bsafe"]["data_files"] == [
        {"split": "train", "path": "data/bsafe/train-*.parquet"},
        {"split": "validation", "path": "data/bsafe/validation-*.parquet"},
    ]
    assert "through TRL the `train=false` segments" in text and "retrace train" in text
    # The Hub's own card parser reads the same header.
    from huggingface_hub import DatasetCard

    data = DatasetCard.load(folder / "README.md").data
    assert data.license == "cc-by-nc-4.0" and len(data.configs) == len(records.CONFIGS)


def test_card_counts_are_tables_a_program_can_read(folder, blended):
    tables = card.card_tables(folder)
    counts = {(r["config"], r["split"]): int(r["rows"]) for r in tables["counts"]}
    for config in records.CONFIGS:
        for split in records.SPLITS:
            expected = blended[config].column("split").to_pylist().count(split)
            assert counts[config, split] == expected
    mixture = {(r["kind"], r["split"]): int(r["rows"]) for r in tables["mixture"]}
    for r in blended["mixture"].select(["kind", "split"]).to_pylist():
        mixture[r["kind"], r["split"]] -= 1
    assert set(mixture.values()) == {0}
    assert {"stage": "blend", "reason": "duplicate", "rows": "1"} in tables["rejections"]
    ratios = [r for r in tables["ratios"] if r["split"] == "train"]
    assert {r["component"] for r in ratios} == set(blend.Config().ratios)  # the defaults
    assert all(r["unit"] == "examples" for r in ratios)
    assert {r["policy"] for r in tables["policies"] if r["config"] == "bsafe"} == {"hate"}
    assert {"generator": "google/gemma-3-270m", "backend": "transformers"}.items() <= next(
        r for r in tables["generators"] if r["generator"] == "google/gemma-3-270m"
    ).items()


def test_the_card_counts_rows_by_origin_and_what_natural_set_aside(tmp_path):
    rng = random.Random(5)
    natural = [bsafe_row(rng) for _ in range(3)]
    for row in natural:
        row["meta"]["origin"] = "natural"
    inputs = publish_inputs(run_blend(make_inputs(plant={"format.bsafe": natural})))
    sample = {"id": "s", "response": "..."}
    inputs["filter.rejected"] = records.table(
        [records.reject(sample, "filter", "toxic")] * 4, records.REJECTED
    )
    inputs["natural.rejected"] = records.table(
        [records.reject(sample, "natural", "over_ratio")], records.REJECTED
    )
    folder = do_publish(inputs, tmp_path)
    origins = {(r["config"], r["origin"]): r["rows"] for r in card.card_tables(folder)["origins"]}
    assert origins == {
        ("bsafe", "injected"): "0",  # test_blend's rows predate meta.origin
        ("bsafe", "natural"): "3",
        ("rlbf", "injected"): "0",
        ("rlbf", "natural"): "0",
    }
    text = (folder / "README.md").read_text()
    assert "filter dropped 4 samples as toxic; `natural` reused them, setting aside 1 as " in text


def test_card_shows_one_example_per_kind_plots_and_the_config(folder):
    text = (folder / "README.md").read_text()
    for kind in ("bsafe", "reset", "recovery", "utility", "preference"):
        assert f"### `{kind}`" in text
    assert "[BACKTRACK-HATE]" in text and '"role": "harmful", "train": false' in text
    for name in ("policy_mix", "k_histogram", "lengths", "toxicity"):
        png = folder / "images" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](images/{name}.png)" in text
    assert "profanity-check" in text  # the configured scorer
    assert card.config_from_card(folder) == RUN_CONFIG
    assert card.config_from_card(folder / "README.md") == RUN_CONFIG


def test_config_round_trips_through_a_card_with_awkward_values(tmp_path):
    config = {
        "run": {"name": "x", "seed": 7},
        "sources": {"benign": [{"loader": "alpaca", "path": "a```b.json", "limit": None}]},
        "blend": {"ratios": {"bsafe": 0.1, "anchor": 1e-3}, "text": "multi\nline: `tick`"},
        "publish": {"pretty_name": "ünïcode ```` fence"},
    }
    text = "# card\n\n```yaml\nnot: this\n```\n\n" + card.embed_config(config) + "\n\nafter\n"
    (tmp_path / "README.md").write_text(text)
    assert card.config_from_card(tmp_path) == config


def test_config_from_card_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no dataset card"):
        card.config_from_card(tmp_path)
    (tmp_path / "README.md").write_text("# a card by hand\n")
    with pytest.raises(KeyError, match="has no embedded retrace config"):
        card.config_from_card(tmp_path)


def test_the_card_holds_no_absolute_local_path_and_one_row_per_licence(blended, tmp_path):
    model = tmp_path / "models" / "my-gemma"  # a local folder outside the working directory
    inputs = publish_inputs(blended)
    bsafe = inputs["blend.bsafe"]
    # A span under its own licence spelt another way, as format wrote it before normalising.
    licences = ["cc-by-nc-4.0 AND CC BY-NC 4.0"] * bsafe.num_rows
    inputs["blend.bsafe"] = bsafe.set_column(
        bsafe.schema.get_field_index("license"), "license", pa.array(licences, pa.string())
    )
    run_config = RUN_CONFIG | {
        "sample": {"generator": {"model": str(model)}},
        "sources": {"benign": [{"loader": "alpaca", "path": str(Path.cwd() / "a.jsonl")}]},
    }
    env = LocalEnv(seed=0, workdir=tmp_path / "out", run_config=run_config)
    env.workdir.mkdir()
    publish.run(inputs, publish.Config(shard_bytes=12000), env)
    text = (env.workdir / "README.md").read_text()
    assert str(tmp_path) not in text and str(Path.cwd()) not in text
    embedded = card.config_from_card(env.workdir)
    assert embedded["sample"]["generator"]["model"] == "<local>/my-gemma"
    assert embedded["sources"]["benign"][0]["path"] == "a.jsonl"
    licences = [r["license"] for r in card.card_tables(env.workdir)["licenses"]]
    assert "cc-by-nc-4.0" in licences
    assert all(records.license_expr(x) == x and " AND " not in x for x in licences)


def test_licence_expressions_are_normalised():
    expr = records.license_expr("apache-2.0 AND Apache-2.0", None, "", "MIT")
    assert expr == "apache-2.0 AND mit"
    assert records.license_expr("CC BY-NC 4.0") == "cc-by-nc-4.0"


@pytest.mark.parametrize(
    ("licenses", "expected"),
    [
        (["mit", "cc-by-nc-4.0 AND mit"], "cc-by-nc-4.0"),
        (["MIT", "CC BY-SA 4.0"], "cc-by-sa-4.0"),
        (["mit", "some custom terms"], "other"),
    ],
)
def test_the_licence_is_the_most_restrictive(licenses, expected):
    assert publish.most_restrictive(licenses) == expected


# --- TRL reads every config as it is ---------------------------------------------------------


def _tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _args(cls, tmp_path, **extra):
    return cls(
        output_dir=str(tmp_path / "trl"),
        max_steps=1,
        per_device_train_batch_size=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        **extra,
    )


def test_trl_sft_trainer_takes_every_sft_config_as_it_is(folder, tiny_model_dir, tmp_path):
    import trl
    from transformers import AutoModelForCausalLM

    tok = _tokenizer(tiny_model_dir)
    for config in ("bsafe", "reset", "recovery", "utility", "mixture"):
        train = datasets.load_dataset(str(folder), config, split="train", cache_dir=str(tmp_path))
        assert trl.data_utils.is_conversational(train[0])
        trainer = trl.SFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            args=_args(trl.SFTConfig, tmp_path),
            train_dataset=train,
            processing_class=tok,
        )
        prepared = trainer.train_dataset
        assert prepared.num_rows == train.num_rows
        if config == "bsafe":
            # TRL trains the whole completion: the untrained harmful span is in its labels too,
            # which is what the card warns about.
            row = prepared[0]
            trained = tok.decode([t for t in row["labels"] if t != -100])
            harmful = next(s["text"] for s in train[0]["segments"] if s["role"] == "harmful")
            assert train[0]["prompt"][0]["content"] not in trained  # TRL masks the prompt
            assert harmful.strip() in trained
        if config == "mixture":
            assert trainer.train().training_loss > 0


def test_trl_dpo_trainer_takes_the_preference_config_as_it_is(folder, tiny_model_dir, tmp_path):
    import trl
    from transformers import AutoModelForCausalLM

    train = datasets.load_dataset(str(folder), "preference", split="train", cache_dir=str(tmp_path))
    assert trl.data_utils.is_conversational(train[0])
    trainer = trl.DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=_args(trl.DPOConfig, tmp_path),
        train_dataset=train,
        processing_class=_tokenizer(tiny_model_dir),
    )
    row = trainer.train_dataset[0]
    assert row["prompt_ids"] and row["chosen_ids"] and row["rejected_ids"]
    assert trainer.train().training_loss > 0


def test_the_card_template_and_code_are_in_the_cache_key():
    files = publish.external_files(publish.Config())
    assert {f.name for f in files} == {"card.py", "card.md.jinja"} and all(
        f.is_file() for f in files
    )


def test_toxicity_before_and_after_come_from_the_rows_scores(blended):
    before, after = publish._toxicity([blended["bsafe"], blended["reset"]])
    assert before == [0.9] * blended["bsafe"].num_rows  # span.* labels: the harmful spans
    assert after == [0.05] * blended["bsafe"].num_rows  # every other label: what replaced them


# --- no machine paths ------------------------------------------------------------------------


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


def machine_paths(folder: Path, *roots: Path) -> list[str]:
    """Every place a file under `folder` names one of `roots` (the build machine's folders):
    each value of every column of every shard, nested ones too, and every other file's text."""
    needles = {str(Path(r)) for r in roots} - {"/"}
    hits = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix == ".parquet":
            strings = list(_strings(pq.read_table(path).to_pylist()))
        else:
            strings = [path.read_bytes().decode("utf-8", "replace")]
        hits += [f"{path.relative_to(folder)}: {n}" for s in strings for n in needles if n in s]
    return sorted(set(hits))


def _named_locally(table: pa.Table, source: str, generator: str, tokenizer: str) -> pa.Table:
    """`table` as a run on local files and models writes it: the config's paths in `source` and
    meta."""
    rows = table.to_pylist()
    for r in rows:
        r["source"] = source
        r["meta"] = {**(r["meta"] or {}), "generator": generator, "tokenizer": tokenizer}
    return pa.Table.from_pylist(rows, schema=table.schema)


def test_no_published_file_names_a_path_of_the_build_machine(
    blended, tmp_path, tmp_path_factory, tiny_model_dir
):
    roots = (tmp_path_factory.getbasetemp(), Path.home(), Path.cwd())
    source = str(tmp_path / "data" / "benign.jsonl")
    generator = str(Path.home() / "models" / "my-gemma")
    inputs = publish_inputs(blended)
    for config in records.CONFIGS:
        table = inputs[f"blend.{config}"]
        inputs[f"blend.{config}"] = _named_locally(table, source, generator, str(tiny_model_dir))
    run_config = RUN_CONFIG | {
        "run": {**RUN_CONFIG["run"], "runs_dir": str(tmp_path / "runs")},
        "sample": {"generator": {"model": generator}},
        "format": {**RUN_CONFIG["format"], "target_tokenizer": str(tiny_model_dir)},
        "train": {"data": None, "tokenizer": str(Path.cwd() / "tok")},
        "publish": {**RUN_CONFIG["publish"], "tokenized": [str(tiny_model_dir)]},
    }
    env = LocalEnv(seed=0, workdir=tmp_path / "out", run_config=run_config)
    env.workdir.mkdir()
    publish.run(inputs, publish.Config(shard_bytes=12000, tokenized=[str(tiny_model_dir)]), env)
    folder = env.workdir
    assert (folder / "tokenizer" / "tokenizer_config.json").is_file()
    assert list((folder / "data").glob("bsafe-tok/*.parquet"))  # the -tok twins are scanned too
    assert machine_paths(folder, *roots) == []
    # A local path keeps its last name, as the card has always named one.
    (row,) = pq.read_table(shards(folder, "bsafe", "train")[0]).slice(0, 1).to_pylist()
    assert row["source"] == "<local>/benign.jsonl"
    assert row["meta"]["generator"] == "<local>/my-gemma"
    assert row["meta"]["tokenizer"] == f"<local>/{tiny_model_dir.name}"
    assert handoff.read(folder).tokenizer == row["meta"]["tokenizer"]  # retrace.json's, too
    embedded = card.config_from_card(folder)
    assert embedded["train"]["tokenizer"] == "tok" and "runs_dir" not in embedded["run"]
