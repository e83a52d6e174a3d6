"""A tiny random Gemma-3-architecture model and a small BPE tokenizer, built offline in seconds.

Made here, not downloaded: a byte-level BPE trained on a few hundred English sentences (so words
tokenise into several pieces, as with a real tokenizer) with Gemma's special and turn tokens, and a
`Gemma3ForCausalLM` with 2 layers, hidden size 64, tied embeddings, QK-norm and the 5:1
local:global layer pattern of the real model.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Here is a simple recipe for a healthy breakfast with oats and fruit.",
    "Photosynthesis is how plants turn sunlight, water and carbon dioxide into sugar.",
    "To solve the equation, subtract three from both sides and divide by two.",
    "I cannot help with that request, but I can offer some safer information.",
    "Sorry, I can't assist with that. Is there something else I can help you with?",
    "The capital of France is Paris, a city known for its museums and cafes.",
    "Write a short poem about the sea and the wind at night.",
    "Exercise, sleep and a balanced diet are good for your health.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.",
    "#### 72",
    "The answer is \\boxed{5}.",
]


def build_tokenizer(out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        padding_side="left",
    )
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_gemma(out_dir: Path, seed: int = 0) -> Path:
    """Write a tokenizer and a random tiny Gemma 3 model to `out_dir`; return it."""
    out_dir = Path(out_dir)
    return save_tiny_gemma(out_dir, build_tokenizer(out_dir), seed)


def save_tiny_gemma(out_dir: Path, tok, seed: int = 0, **config) -> Path:
    """A random tiny Gemma 3 for `tok` saved to `out_dir`; `config` overrides its shape (the
    decoder's fixtures shrink the sliding window)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        **{
            "vocab_size": len(tok),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "max_position_embeddings": 1024,
            "sliding_window": 64,
            "query_pre_attn_scalar": 32,
            "pad_token_id": tok.pad_token_id,
            "eos_token_id": tok.eos_token_id,
            "bos_token_id": tok.bos_token_id,
            "tie_word_embeddings": True,
            **config,
        }
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir)
    return out_dir


def build_fluent_tiny_gemma(out_dir: Path, steps: int = 120, seed: int = 0) -> Path:
    """The tiny model after a few seconds of training on the corpus above.

    A random model writes token soup with no sentence boundaries, so inject (which needs one) and
    everything after it would see nothing. Trained briefly on three-sentence answers that end in
    <end_of_turn>, it writes sentence-shaped text and stops, like a real generator.
    """
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = build_tiny_gemma(out_dir, seed=seed)
    tok = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    rng = random.Random(seed)
    sentences = [s for s in _CORPUS if s.endswith(".") and len(s.split()) > 3]
    docs = [" ".join(rng.sample(sentences, 3)) + "<end_of_turn>" for _ in range(64)]
    batch = tok(docs, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(seed)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(out_dir)
    return out_dir
