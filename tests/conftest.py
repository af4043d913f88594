"""Shared fixtures: tiny random models, tokenizers and corpora written to disk (no hub needed), run configs
over them, and a runner of functions on 2 CPU processes joined by gloo, as torchrun would start them."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dictlab.data.distributed import World

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ARCHS = ("gpt2", "llama", "gemma2", "gemma3_text")
WORDS = (
    "the cat sat on a mat while dogs ran in parks and birds sang over trees near rivers "
    "code runs fast when loops are short def class return import value list dict"
).split()


def _make_tokenizer(path: Path):
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


def _make_char_tokenizer(path: Path):
    """A character-level tokenizer (every character of WORDS and punctuation, and the space, a token): a
    vocabulary and splits unlike _make_tokenizer's, for comparing models across tokenizers."""
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


def _make_model(path: Path, model_type: str, vocab_size: int = 64, n_layers: int = 3, seed: int = 0,
               chars: bool = False, hidden: int = 32):
    """A randomly initialised model of the given architecture, small enough to run in milliseconds
    (with `chars`, its tokenizer is _make_char_tokenizer's)."""
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
    (_make_char_tokenizer if chars else _make_tokenizer)(path)
    return path


def _sentences(n_docs: int, seed: int = 0, words_per_doc: int = 40) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n_docs):
        n = int(torch.randint(5, words_per_doc, (1,), generator=g))
        idx = torch.randint(0, len(WORDS), (n,), generator=g).tolist()
        docs.append(" ".join(WORDS[i] for i in idx) + " .")
    return docs


def _write_pile_jsonl_zst(path: Path, docs: list[str]) -> Path:
    """A file in the Pile's own format: zstd-compressed JSON lines with text and meta."""
    import zstandard

    lines = "".join(json.dumps({"text": d, "meta": {"pile_set_name": "Pile-CC"}}) + "\n" for d in docs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    return path


def _write_run_config(path: Path, name: str, model: Path, pile_dir: Path, sites=("resid_post",),
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


def _kill_when_written(proc, path: Path, what: str, settle: float = 0.0) -> None:
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


def _entry(rank: int, fn, size: int, rendezvous: str, args: tuple):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=size)
    try:
        fn(World(rank, size, rank), *args)
    finally:
        dist.destroy_process_group()


def _on_ranks(fn, tmp_path, *args, size: int = 2) -> None:
    """fn(world, *args) on `size` ranks; raises when any rank fails. fn must be a module-level function."""
    rendezvous = tmp_path / f"rendezvous-{uuid.uuid4().hex}"  # a fresh file: a used one holds stale addresses
    mp.spawn(_entry, args=(fn, size, str(rendezvous), args), nprocs=size)


def _headless_chromium():
    """A Selenium driver of headless Chromium, or a skip saying why there is none."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("headless Chromium is not installed (make test installs the Debian packages chromium and "
                    "chromium-driver with apt-get; that failed or is not allowed on this machine)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=options)


# --- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def make_tokenizer():
    """make_tokenizer(path): a small word-level tokenizer with <bos>/<eos>/<pad>, saved at path."""
    return _make_tokenizer


@pytest.fixture(scope="session")
def make_char_tokenizer():
    """make_char_tokenizer(path): a character-level tokenizer, saved at path."""
    return _make_char_tokenizer


@pytest.fixture(scope="session")
def make_model():
    """make_model(path, model_type, ...): a tiny random model of that architecture, saved at path."""
    return _make_model


@pytest.fixture(scope="session")
def sentences():
    """sentences(n_docs, seed, words_per_doc): seeded random documents over a small vocabulary."""
    return _sentences


@pytest.fixture(scope="session")
def write_pile_jsonl_zst():
    """write_pile_jsonl_zst(path, docs): a file in the Pile's format (zstd JSON lines with text and meta)."""
    return _write_pile_jsonl_zst


@pytest.fixture(scope="session")
def write_run_config():
    """write_run_config(path, name, model, pile_dir, ...): a small experiment YAML over a tiny model."""
    return _write_run_config


@pytest.fixture(scope="session")
def kill_when_written():
    """kill_when_written(proc, path, what, settle): SIGKILL a process once `path` exists."""
    return _kill_when_written


@pytest.fixture(scope="session")
def on_ranks():
    """on_ranks(fn, tmp_path, *args, size=2): fn(world, *args) on `size` gloo ranks (fn at module level)."""
    return _on_ranks


@pytest.fixture(scope="session")
def headless_chromium():
    """headless_chromium(): a Selenium driver of headless Chromium (quit it when done); skips without one."""
    return _headless_chromium


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {arch: _make_model(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def pile_dir(tmp_path_factory):
    """A folder holding a small file in the Pile's format (zstd JSON lines with text and meta)."""
    root = tmp_path_factory.mktemp("pile")
    _write_pile_jsonl_zst(root / "train" / "00.jsonl.zst", _sentences(120, seed=1))
    return root
