import json
import os
import subprocess
import sys

import pytest
import torch

from dictlab.data.corpus import CorpusConfig, contexts, documents
from dictlab.data.extract import ExtractConfig, extract
from dictlab.data.lm import ActivationCapture, load_model, make_sites
from dictlab.data.store import Store
from dictlab.errors import DictlabError


def small_extract(**kw):
    base = dict(layers=[1], sites=["resid_post", "mlp_out"], context_length=16, batch_size=4,
                batches_per_shard=2, train_tokens=600, eval_tokens=150, model_dtype="float32", store_dtype="float32")
    return ExtractConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory, sentences, write_pile_jsonl_zst):
    docs = sentences(300, seed=2, words_per_doc=60)
    return write_pile_jsonl_zst(tmp_path_factory.mktemp("c") / "docs.jsonl.zst", docs)


def test_store_round_trip_matches_direct_capture(tiny_models, corpus_file, tmp_path):
    corpus = CorpusConfig(source=str(corpus_file), eval_fraction=0.2)
    cfg = small_extract()
    store = Store(extract(str(tiny_models["llama"]), corpus, cfg, tmp_path / "s", progress=False))
    assert set(store.sites) == {"L1.resid_post", "L1.mlp_out"} and store.d_model("L1.mlp_out") == 32
    assert store.rows("train") >= 600 and store.rows("eval") >= 150
    assert store.verify() == []
    # recompute the first context directly and compare with the stored rows (BOS left out)
    model, tok = load_model(str(tiny_models["llama"]))
    first = next(contexts(documents(str(corpus_file)), tok, 2, "train", 16, 0.2, 0))
    direct = ActivationCapture(model, make_sites([1], ["resid_post"])).run(torch.tensor([first.tokens]))
    batch = next(store.batches("L1.resid_post", "train", batch_size=len(first.tokens) - 1,
                               columns=("token", "doc", "context", "pos")))
    # batched (and padded) forward passes differ from a single one only by float rounding
    torch.testing.assert_close(batch["x"], direct["L1.resid_post"][0, 1:], rtol=1e-5, atol=1e-5)
    assert batch["token"].tolist() == first.tokens[1:]
    assert batch["pos"].tolist() == list(range(1, len(first.tokens)))
    assert set(batch["doc"].tolist()) == {first.doc} and set(batch["context"].tolist()) == {0}


def test_bos_is_excluded_by_default_and_kept_on_request(tiny_models, corpus_file, tmp_path):
    corpus = CorpusConfig(source=str(corpus_file), eval_fraction=0.2)
    for include in (False, True):
        store = Store(extract(str(tiny_models["gpt2"]), corpus, small_extract(include_bos=include),
                              tmp_path / str(include), progress=False))
        cols = torch.cat([b["pos"] for b in store.batches("L1.mlp_out", "train", 256, columns=("pos",))])
        assert bool((cols == 0).any()) is include


def test_reader_batches_cover_every_row_once_shuffled_or_not(tiny_models, corpus_file, tmp_path):
    corpus = CorpusConfig(source=str(corpus_file), eval_fraction=0.2)
    store = Store(extract(str(tiny_models["llama"]), corpus, small_extract(), tmp_path / "s", progress=False))
    ordered = store.load("L1.mlp_out", "train")
    batches = list(store.batches("L1.mlp_out", "train", batch_size=100, shuffle=True, seed=3))
    assert all(b.shape[0] == 100 for b in batches[:-1])
    shuffled = torch.cat(batches)
    assert not torch.equal(shuffled, ordered)
    key = lambda x: sorted(map(tuple, x.tolist()))  # noqa: E731
    assert key(shuffled) == key(ordered)
    assert store.load("L1.mlp_out", "train", max_rows=77).shape == (77, 32)
    # a slice of every shard (a validation slice and the rest) splits the rows in two, shuffled or not
    head = torch.cat(list(store.batches("L1.mlp_out", "train", 100, shard_rows=slice(0, 10))))
    rest = torch.cat(list(store.batches("L1.mlp_out", "train", 100, shuffle=True, shard_rows=slice(10, None))))
    shards = len(store.shards("train"))
    assert len(head) == store.rows("train", shard_rows=slice(0, 10)) == 10 * shards
    assert len(rest) == store.rows("train", shard_rows=slice(10, None)) == len(ordered) - 10 * shards
    assert key(torch.cat([head, rest])) == key(ordered)


def test_existing_store_is_reused_and_a_different_config_refused(tiny_models, corpus_file, tmp_path):
    corpus = CorpusConfig(source=str(corpus_file), eval_fraction=0.2)
    path = extract(str(tiny_models["llama"]), corpus, small_extract(), tmp_path / "s", progress=False)
    stamp = (path / "manifest.json").stat().st_mtime_ns
    extract(str(tiny_models["llama"]), corpus, small_extract(), path, progress=False)
    assert (path / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(DictlabError, match="different config.*extract"):
        extract(str(tiny_models["llama"]), corpus, small_extract(train_tokens=700), path, progress=False)


def test_verify_finds_a_corrupted_shard(tiny_models, corpus_file, tmp_path):
    corpus = CorpusConfig(source=str(corpus_file), eval_fraction=0.2)
    store = Store(extract(str(tiny_models["llama"]), corpus, small_extract(), tmp_path / "s", progress=False))
    shard = tmp_path / "s" / store.shards("train")[0]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert store.verify() == ["checksum mismatch in train/shard-00000.safetensors"]


def test_incomplete_store_is_not_trusted(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "spec.json").write_text("{}")
    with pytest.raises(DictlabError, match="not a complete activation store.*resume"):
        Store(tmp_path / "s")


def _extract_cmd(model, corpus, out):
    return [sys.executable, "-m", "dictlab.cli", "--quiet", "extract", "--model", str(model), "--corpus", str(corpus),
            "--layers", "2", "--sites", "resid_post", "--context-length", "64", "--batch-size", "8",
            "--train-tokens", "60000", "--eval-tokens", "3000", "--model-dtype", "float32", "--out", str(out)]


def test_resume_after_sigkill_gives_a_bitwise_identical_store(tmp_path, make_model, sentences, write_pile_jsonl_zst,
                                                              kill_when_written):
    model = make_model(tmp_path / "model", "llama", n_layers=4)
    # wider than the other tiny models so that extraction runs long enough to be killed mid-way
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(model)
    cfg.hidden_size, cfg.intermediate_size, cfg.head_dim = 256, 1024, 64
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(model)
    corpus = write_pile_jsonl_zst(tmp_path / "c.jsonl.zst", sentences(2000, seed=5, words_per_doc=200))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_extract_cmd(model, corpus, killed), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard = killed / "train" / "shard-00003.safetensors"
    kill_when_written(proc, shard, "extraction")  # once a few shards are on disk
    assert not (killed / "manifest.json").exists()
    with pytest.raises(DictlabError):
        Store(killed)
    subprocess.run(_extract_cmd(model, corpus, killed), env=env, check=True, capture_output=True)
    whole = tmp_path / "whole"
    subprocess.run(_extract_cmd(model, corpus, whole), env=env, check=True, capture_output=True)
    files = sorted(p.relative_to(whole) for p in whole.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(killed) for p in killed.rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".safetensors"]) > 4
    for f in files:
        assert (whole / f).read_bytes() == (killed / f).read_bytes(), f
    assert json.loads((whole / "manifest.json").read_text())["splits"]["train"]["rows"] >= 60000


def test_a_full_disk_leaves_no_partial_shard(tiny_models, corpus_file, tmp_path, monkeypatch):
    import errno

    import dictlab.data.store

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dictlab.data.store, "save_file", full)
    corpus = CorpusConfig(source=str(corpus_file), eval_fraction=0.2)
    with pytest.raises(DictlabError, match=r"disk full while writing .*shard-00000.*nothing was left behind: the "
                                           r"store needs about [\d,]+ bytes in all at .*rerun the same command"):
        extract(str(tiny_models["llama"]), corpus, small_extract(), tmp_path / "s", progress=False)
    # only what a resumed run reads first: the spec and the model dtype it started with
    assert sorted(p.name for p in (tmp_path / "s").rglob("*") if p.is_file()) == ["precision.json", "spec.json"]


def test_a_store_round_trips_through_an_fsspec_url(tiny_models, corpus_file, tmp_path):
    import fsspec

    corpus = CorpusConfig(source=str(corpus_file), eval_fraction=0.2)
    cfg = small_extract()
    local = Store(extract(str(tiny_models["llama"]), corpus, cfg, tmp_path / "s", progress=False))
    url = "memory://dictlab-test/store"
    remote = Store(extract(str(tiny_models["llama"]), corpus, cfg, url, progress=False))
    assert remote.verify() == [] and remote.info()["bytes"] == local.info()["bytes"]
    assert remote.manifest["splits"] == local.manifest["splits"]  # the same shards, byte for byte
    for split in ("train", "eval"):
        cols = ("token", "pos", "L1.mlp_out")
        for a, b in zip(local.batches("L1.resid_post", split, 97, shuffle=True, seed=3, columns=cols),
                        remote.batches("L1.resid_post", split, 97, shuffle=True, seed=3, columns=cols)):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # an interrupted remote extraction resumes: the last shard and the manifest are gone
    fs = fsspec.filesystem("memory")
    last = remote.shards("train")[-1]
    fs.rm(f"/dictlab-test/store/{last}")
    fs.rm("/dictlab-test/store/train/done.json")
    fs.rm("/dictlab-test/store/manifest.json")
    with pytest.raises(DictlabError, match="not a complete activation store.*rerun"):
        Store(url)
    again = Store(extract(str(tiny_models["llama"]), corpus, cfg, url, progress=False))
    assert again.manifest["splits"] == local.manifest["splits"]
    fs.rm("/dictlab-test", recursive=True)


def test_unset_newer_options_leave_a_store_spec_as_before():
    from dictlab.data.corpus import CorpusConfig
    from dictlab.data.extract import ExtractConfig, store_spec

    plain = store_spec("m", CorpusConfig(), ExtractConfig())["extract"]
    assert "contexts_per_document" not in plain and "start_token" not in plain  # older stores stay reusable
    capped = store_spec("m", CorpusConfig(), ExtractConfig(contexts_per_document=2))["extract"]
    assert capped["contexts_per_document"] == 2
