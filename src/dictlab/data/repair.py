"""`dictlab store repair`: re-extract exactly the shards of a store that fail verification.

A shard is a fixed run of whole batches of the store's deterministic context stream (extract.py): shard i
of a folder holds batches i·B … (i+1)·B − 1 of its rank's contexts (B = batches_per_shard). Repair walks
the same stream with the same model, dtype and settings the manifest records, forwards only the batches
of the damaged shards, writes each shard atomically, and rewrites the manifest atomically from the shard
entries — so a repaired store equals an undamaged one byte for byte. A store whose model cannot be loaded
is left as it was.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

from tqdm.auto import tqdm

from dictlab.data.corpus import CorpusConfig
from dictlab.data.extract import ExtractConfig, forward_batch, resolve_sites, split_batches, write_parts
from dictlab.data.lm import DTYPES, ActivationCapture, bos_id, shared_model
from dictlab.data.store import SPLITS, Store, write_manifest
from dictlab.errors import DictlabError

_RANK = re.compile(r"rank-(\d{5})-of-(\d{5})")


def damaged_shards(store: Store) -> list[dict]:
    """The manifest entries of the shards that are missing or whose sha256 differs, with their split."""
    bad = []
    for split in SPLITS:
        for entry in store.manifest["splits"][split]["shards"]:
            rel = entry["file"]
            if not store.loc.exists(rel) or store.loc.sha256(rel) != entry["sha256"]:
                bad.append({**entry, "split": split})
    return bad


def repair(path, progress: bool = True) -> list[str]:
    """Re-extract the damaged shards of the store at `path`; returns their names (none: it was sound)."""
    store = Store(path, verify=False)
    bad = damaged_shards(store)
    if not bad:
        return []
    spec, manifest = store.manifest["spec"], store.manifest
    try:
        model, tokenizer = shared_model(spec["model"], store.model_dtype)
    except Exception as e:  # a hub model offline, a folder moved: whatever the loader raises
        raise DictlabError(f"cannot load the store's model {spec['model']!r} to re-extract {len(bad)} damaged "
                           f"shard(s) ({type(e).__name__}: {e}); nothing was changed") from e
    cfg, corpus = ExtractConfig(**spec["extract"]), CorpusConfig(**spec["corpus"])
    capture = ActivationCapture(model, resolve_sites(cfg))
    bar = tqdm(total=len(bad), desc="repair: shards re-extracted", disable=not progress, dynamic_ncols=True)
    for folder, wanted in _by_folder(bad).items():
        split = folder.split("/")[0]
        for rel, parts, n_contexts in _shards_of(folder, split, wanted, capture, tokenizer, corpus, cfg):
            write_parts(store.loc, rel, parts, n_contexts)
            bar.update(1)
    bar.close()
    extra = {k: v for k, v in manifest.items() if k not in ("spec", "sites", "dtype", "splits")}
    write_manifest(store.loc, spec, manifest["sites"], manifest["dtype"], extra)
    return [e["file"] for e in bad]


def _by_folder(bad: list[dict]) -> dict[str, dict[int, str]]:
    """{shard folder: {shard index: name}} of the damaged shards."""
    out: dict[str, dict[int, str]] = {}
    for e in bad:
        folder, name = e["file"].rsplit("/", 1)
        out.setdefault(folder, {})[int(name.removeprefix("shard-").removesuffix(".safetensors"))] = e["file"]
    return out


def _shards_of(folder: str, split: str, wanted: dict[int, str], capture, tokenizer, corpus: CorpusConfig,
               cfg: ExtractConfig):
    """(name, batches' activations, contexts) of each wanted shard of a folder, from the context stream."""
    rank = _RANK.search(folder)
    world = SimpleNamespace(rank=int(rank.group(1)), size=int(rank.group(2))) if rank else None
    bos = bos_id(tokenizer, cfg.start_token)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos
    device = next(capture.model.parameters()).device
    parts, index, n_contexts = [], None, 0
    for b, batch in enumerate(split_batches(corpus, cfg, tokenizer, split, world)):
        shard = b // cfg.batches_per_shard
        if parts and shard != index:
            yield wanted[index], parts, n_contexts
            parts, n_contexts = [], 0
        if shard > max(wanted):
            return
        if shard in wanted:
            index = shard
            parts.append(forward_batch(capture, batch, pad, cfg, DTYPES[cfg.store_dtype], device))
            n_contexts += len(batch)
    if parts:
        yield wanted[index], parts, n_contexts
