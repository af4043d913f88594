import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tiny import make_model, sentences, write_pile_jsonl_zst  # noqa: E402

ARCHS = ("gpt2", "llama", "gemma2", "gemma3_text")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {arch: make_model(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def pile_dir(tmp_path_factory):
    """A folder holding a small file in the Pile's format (zstd JSON lines with text and meta)."""
    root = tmp_path_factory.mktemp("pile")
    write_pile_jsonl_zst(root / "train" / "00.jsonl.zst", sentences(120, seed=1))
    return root
