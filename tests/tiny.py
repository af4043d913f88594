"""Tiny random models, tokenizers and corpora written to disk for tests (no hub needed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = (
    "the cat sat on a mat while dogs ran in parks and birds sang over trees near rivers "
    "code runs fast when loops are short def class return import value list dict"
).split()


def make_tokenizer(path: Path):
    """A small word-level tokenizer with <bos>/<eos>/<pad>, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for w in WORDS + [".", ",", "!", "?"]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(path)
    return fast


def make_char_tokenizer(path: Path):
    """A character-level tokenizer (every character of WORDS and punctuation, and the space, a token): a
    vocabulary and splits unlike make_tokenizer's, for comparing models across tokenizers."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for c in sorted(set("".join(WORDS)) | set(" .,!?\n")):
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(path)
    return fast


def make_model(path: Path, model_type: str, vocab_size: int = 64, n_layers: int = 3, seed: int = 0,
               chars: bool = False, hidden: int = 32):
    """A randomly initialised model of the given architecture, small enough to run in milliseconds
    (with `chars`, its tokenizer is make_char_tokenizer's)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=vocab_size, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    if model_type == "gpt2":
        cfg = AutoConfig.for_model("gpt2", n_embd=hidden, n_layer=n_layers, n_head=4, n_positions=256, **common)
    else:
        extra = dict(head_dim=8) if model_type.startswith("gemma") else {}
        cfg = AutoConfig.for_model(
            model_type,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **extra,
            **common,
        )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    (make_char_tokenizer if chars else make_tokenizer)(path)
    return path


def sentences(n_docs: int, seed: int = 0, words_per_doc: int = 40) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n_docs):
        n = int(torch.randint(5, words_per_doc, (1,), generator=g))
        idx = torch.randint(0, len(WORDS), (n,), generator=g).tolist()
        docs.append(" ".join(WORDS[i] for i in idx) + " .")
    return docs


def write_pile_jsonl_zst(path: Path, docs: list[str]) -> Path:
    """A file in the Pile's own format: zstd-compressed JSON lines with text and meta."""
    import zstandard

    lines = "".join(json.dumps({"text": d, "meta": {"pile_set_name": "Pile-CC"}}) + "\n" for d in docs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    return path


def write_run_config(path: Path, name: str, model: Path, pile_dir: Path, sites=("resid_post",),
                     train_tokens: int = 600, fit: list | None = None) -> Path:
    """A small experiment YAML: layer 1 of a tiny model, the Pile-format corpus, 16-token contexts."""
    import yaml

    config = {
        "name": name, "model": str(model),
        "corpus": {"source": f"hub:{pile_dir}", "eval_fraction": 0.2},
        "extract": {"layers": [1], "sites": list(sites), "context_length": 16, "train_tokens": train_tokens,
                    "eval_tokens": 150, "model_dtype": "float32"},
    }
    if fit is not None:
        config["fit"] = fit
    path.write_text(yaml.safe_dump(config))
    return path


def kill_when_written(proc, path: Path, what: str, settle: float = 0.0) -> None:
    """SIGKILL a running process once `path` exists (polled a bounded number of times: about 5 minutes),
    `settle` seconds later."""
    import signal
    import time

    for _ in range(150_000):
        if path.exists():
            break
        assert proc.poll() is None, f"{what} ended before it could be killed"
        time.sleep(0.002)
    assert path.exists()
    time.sleep(settle)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
