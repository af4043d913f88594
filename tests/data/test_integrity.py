"""A damaged store never yields a number: each damage reproduced on purpose (a flipped bit in the middle,
a truncated file, a deleted file, a manifest edited by hand, on disk and on an fsspec store) stops the read
with one line naming the shard, what is wrong and the repair command; --no-verify reads as before."""

import json
import shutil

import pytest
import torch

from dictlab.data.corpus import CorpusConfig
from dictlab.data.extract import extract
from dictlab.data.store import Store
from dictlab.errors import DictlabError

from .test_store_extract import small_extract

SITE = "L1.resid_post"


@pytest.fixture(scope="module")
def pristine(tiny_models, sentences, write_pile_jsonl_zst, tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    corpus = write_pile_jsonl_zst(root / "docs.jsonl.zst", sentences(300, seed=2, words_per_doc=60))
    cfg = CorpusConfig(source=str(corpus), eval_fraction=0.2)
    return extract(str(tiny_models["llama"]), cfg, small_extract(), root / "store", progress=False)


@pytest.fixture
def store_copy(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / "store")


def _read_all(path, split="eval", **kw):
    return torch.cat(list(Store(path, **kw).batches(SITE, split, 64)))


def _flip_middle(path):
    """Flip one bit in the middle of the site's activations in a shard."""
    import struct

    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", bytes(data[:8]))[0]
    start, end = json.loads(bytes(data[8:8 + n]))[SITE]["data_offsets"]
    data[8 + n + (start + end) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_bit_stops_the_read_and_no_verify_reads_it(store_copy, pristine):
    shard = store_copy / Store(store_copy).shards("eval")[0]
    _flip_middle(shard)
    with pytest.raises(DictlabError, match=r"shard eval/shard-00000.safetensors of .*store: its sha256 differs from "
                                           r"the one the manifest recorded.*dictlab store repair .*store"):
        _read_all(store_copy)
    damaged, clean = _read_all(store_copy, verify=False), _read_all(pristine)
    assert damaged.shape == clean.shape and not torch.equal(damaged, clean)  # what the check keeps out


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(bytes(100)), "its header is unreadable .*truncated or overwritten"),
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), r"truncated: \d+ bytes where its header "
                                                                         r"needs \d+"),
    (lambda p: p.write_bytes(b"abc"), "truncated to 3 bytes"),
    (lambda p: p.unlink(), "is missing"),
])
def test_truncated_or_deleted_shards_are_named(store_copy, damage, message):
    damage(store_copy / "train" / "shard-00001.safetensors")
    with pytest.raises(DictlabError, match=f"shard train/shard-00001.safetensors of .*{message}.*dictlab store repair"):
        _read_all(store_copy, "train")


def test_a_manifest_edited_by_hand_is_caught(store_copy):
    manifest = json.loads((store_copy / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["sha256"] = "0" * 64
    (store_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DictlabError, match="shard train/shard-00000.safetensors .*sha256 differs"):
        _read_all(store_copy, "train")


def test_remote_stores_are_checked_the_same_way(pristine):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.put(str(pristine), "/integrity/store", recursive=True)
    url = "memory://integrity/store"
    torch.testing.assert_close(_read_all(url), _read_all(pristine))
    rel = Store(url).shards("eval")[0]
    data = bytearray(fs.cat_file(f"/integrity/store/{rel}"))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(f"/integrity/store/{rel}", bytes(data))
    try:
        with pytest.raises(DictlabError, match="shard eval/shard-00000.safetensors of memory://integrity/store"):
            _read_all(url)
    finally:
        fs.rm("/integrity", recursive=True)


def test_commands_stop_with_one_line_and_no_verify_lets_them_read(store_copy, tmp_path, capsys):
    from dictlab.cli import main
    from dictlab.dictionaries.kmeans import KMeans

    km = KMeans(3, max_iter=3)
    km.fit(Store(store_copy).load(SITE, "train"), progress=False)
    km.save(tmp_path / "km", extra={"site": SITE})
    _flip_middle(store_copy / Store(store_copy).shards("eval")[0])
    evaluate = ["evaluate", "--store", str(store_copy), "--ce-contexts", "0", "--bootstrap", "0", str(tmp_path / "km")]
    assert main(["--quiet", *evaluate]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eval/shard-00000.safetensors" in err[0] and "dictlab store repair" in err[0]
    assert main(["--quiet", "--no-verify", *evaluate]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [r[:3] for r in rows[2:]] == [[SITE, "km", "centroid"], [SITE, "km", "gain_shape"]]
    assert Store(store_copy).verify_reads  # the flag lasts for its command only


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_repair_brings_back_a_bitwise_equal_store(store_copy, pristine, capsys):
    from dictlab.cli import main

    _flip_middle(store_copy / "eval" / "shard-00000.safetensors")
    (store_copy / "train" / "shard-00001.safetensors").write_bytes(bytes(100))
    (store_copy / "train" / "shard-00002.safetensors").unlink()
    manifest = json.loads((store_copy / "manifest.json").read_text())
    last = manifest["splits"]["train"]["shards"][-1]
    last["sha256"] = "f" * 64  # edited by hand: the shard is sound, the manifest is not
    (store_copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["--quiet", "store", "repair", str(store_copy)]) == 0
    out = capsys.readouterr().out
    assert "repaired 4 shard(s): train/shard-00001.safetensors, train/shard-00002.safetensors, " in out
    assert _files(store_copy) == _files(pristine)
    assert main(["--quiet", "store", "repair", str(store_copy)]) == 0
    assert "nothing to repair" in capsys.readouterr().out


def test_repair_changes_nothing_when_the_model_cannot_be_loaded(store_copy, capsys):
    from dictlab.cli import main

    manifest = json.loads((store_copy / "manifest.json").read_text())
    manifest["spec"]["model"] = str(store_copy / "no-such-model")
    (store_copy / "manifest.json").write_text(json.dumps(manifest))
    _flip_middle(store_copy / "eval" / "shard-00000.safetensors")
    before = _files(store_copy)
    assert main(["--quiet", "store", "repair", str(store_copy)]) == 2
    err = capsys.readouterr().err
    assert "cannot load the store's model" in err and "nothing was changed" in err and len(err.splitlines()) == 1
    assert _files(store_copy) == before


# --- one writer per folder -----------------------------------------------------------------------
def _lock_held_by(folder, pid, host=None):
    import socket

    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".dictlab.lock").write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                                      "command": "dictlab run c.yaml", "started": "then"}))


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, store_copy, capsys):
    import subprocess
    import sys

    from dictlab.cli import main
    from dictlab.data.lock import folder_lock

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock_held_by(tmp_path / "run", holder.pid)
        with pytest.raises(DictlabError, match=rf"run is being written by pid {holder.pid} on .*\(dictlab run c.yaml, "
                                               r"since then\); wait for it to end or stop it"):
            with folder_lock(tmp_path / "run"):
                pass
        _lock_held_by(store_copy, holder.pid)
        assert main(["--quiet", "store", "repair", str(store_copy)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"being written by pid {holder.pid}" in err[0]
    finally:
        holder.kill()
        holder.wait()
    # the same lock, now that its process is gone: taken over with a note, and released after
    assert main(["--quiet", "store", "repair", str(store_copy)]) == 0
    assert "nothing to repair" in capsys.readouterr().out and not (store_copy / ".dictlab.lock").exists()


def test_a_lock_from_another_host_is_respected_and_nested_stages_share_one(tmp_path):
    import os

    from dictlab.data.lock import folder_lock

    _lock_held_by(tmp_path / "run", 1, host="another-host")
    with pytest.raises(DictlabError, match="pid 1 on another-host"):
        with folder_lock(tmp_path / "run"):
            pass
    (tmp_path / "run" / ".dictlab.lock").unlink()
    with folder_lock(tmp_path / "run"):
        with folder_lock(tmp_path / "run"):  # a stage inside `run`: this process holds it already
            assert json.loads((tmp_path / "run" / ".dictlab.lock").read_text())["pid"] == os.getpid()
        assert (tmp_path / "run" / ".dictlab.lock").exists()
    assert not (tmp_path / "run" / ".dictlab.lock").exists()


# --- a full disk ---------------------------------------------------------------------------------
def test_a_remote_store_that_runs_out_of_space_mid_extraction_is_never_trusted(tiny_models, sentences,
                                                                               write_pile_jsonl_zst, tmp_path):
    """An fsspec memory filesystem with a quota: the put that would pass it fails with ENOSPC."""
    import errno

    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class Quota(MemoryFileSystem):
        protocol = "quotamem"
        root_marker = "/"
        store, pseudo_dirs = {}, [""]  # a filesystem of its own, not the shared memory:// one
        quota = 60_000

        def pipe_file(self, path, value, *args, **kwargs):
            used = sum(len(f.getvalue()) for f in self.store.values())
            if used + len(value) > self.quota:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().pipe_file(path, value, *args, **kwargs)

    fsspec.register_implementation("quotamem", Quota, clobber=True)
    corpus = write_pile_jsonl_zst(tmp_path / "docs.jsonl.zst", sentences(300, seed=2, words_per_doc=60))
    cfg = CorpusConfig(source=str(corpus), eval_fraction=0.2)
    with pytest.raises(DictlabError, match=r"no space left while writing quotamem://s/train/shard-\d+.safetensors "
                                           r"\([\d,]+ bytes\); nothing was left behind: the store needs about "):
        extract(str(tiny_models["llama"]), cfg, small_extract(), "quotamem://s", progress=False)
    names = Quota().find("/s")
    assert "/s/manifest.json" not in names and all(Quota().size(n) > 0 for n in names)
    with pytest.raises(DictlabError, match="not a complete activation store"):
        Store("quotamem://s")


# --- dictionaries ---------------------------------------------------------------------------------
def test_damaged_dictionary_weights_are_refused_and_numbers_trace_to_their_bytes(store_copy, tmp_path, capsys):
    from dictlab.cli import main
    from dictlab.data.io import sha256_file
    from dictlab.dictionaries import load_dictionary
    from dictlab.dictionaries.kmeans import KMeans

    km = KMeans(3, max_iter=3)
    km.fit(Store(store_copy).load(SITE, "train"), progress=False)
    folder = km.save(tmp_path / "km", extra={"site": SITE})
    config = json.loads((folder / "config.json").read_text())
    assert config["weights_sha256"] == sha256_file(folder / "weights.safetensors")
    out = tmp_path / "results.json"
    assert main(["--quiet", "evaluate", "--store", str(store_copy), "--ce-contexts", "0", "--bootstrap", "0",
                 "--out", str(out), str(folder)]) == 0
    results = json.loads(out.read_text())
    assert results["store_manifest_sha256"] == sha256_file(store_copy / "manifest.json")
    assert {r["weights_sha256"] for r in results["results"]} == {config["weights_sha256"]}
    weights = folder / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(DictlabError, match="weights.safetensors: its sha256 differs from the one config.json "
                                           "recorded .*fit or import it again"):
        load_dictionary(folder)
    del config["weights_sha256"]  # a folder saved before dictlab recorded it: read, but a truncated file is named
    (folder / "config.json").write_text(json.dumps(config))
    weights.write_bytes(bytes(50))
    with pytest.raises(DictlabError, match="weights.safetensors: not a readable safetensors file"):
        load_dictionary(folder)


def test_a_shard_is_hashed_once_per_process_until_it_changes(store_copy, monkeypatch):
    from dictlab.data import integrity, store

    integrity._verified.clear()
    calls = []
    real = integrity.check_local
    monkeypatch.setattr(store, "check_local", lambda *a: calls.append(a[-1]) or real(*a))
    shards = Store(store_copy).shards("train")
    first = _read_all(store_copy, "train")
    assert torch.equal(_read_all(store_copy, "train"), first) and calls == shards  # the second pass: no hashing
    _flip_middle(store_copy / shards[0])
    with pytest.raises(DictlabError, match="shard train/shard-00000.safetensors .*sha256 differs"):
        _read_all(store_copy, "train")


def test_a_full_disk_while_saving_a_dictionary_leaves_nothing_and_says_what_it_needs(tmp_path, monkeypatch):
    import errno

    import dictlab.dictionaries.base as base
    from dictlab.dictionaries.sae import SparseAutoencoder

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(base, "save_file", full)
    with pytest.raises(DictlabError, match=r"disk full while writing .*weights.safetensors; nothing was left behind: "
                                           r"these weights need about [\d,]+ bytes"):
        SparseAutoencoder(8, 16, k=2).save(tmp_path / "d")
    assert list((tmp_path / "d").iterdir()) == []
