"""corpus -> tokens -> activations -> store: batched, resumable, with a progress bar.

Resuming: shards are whole batches of a deterministic context stream, written atomically. A rerun
counts the contexts in the complete shards, skips them in the stream and goes on, so an
interrupted-then-resumed store is bitwise identical to an uninterrupted one.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

import dictlab
from dictlab.config import CorpusConfig, ExtractConfig
from dictlab.corpus import check_source, contexts, documents
from dictlab.errors import DictlabError
from dictlab.io import read_json, write_json
from dictlab.lm import DTYPES, ActivationCapture, bos_id, make_sites, parse_site, shared_model
from dictlab.store import SPLITS, complete_shards, shard_counts, shard_path, write_manifest, write_shard


def resolve_sites(cfg: ExtractConfig):
    """Site kinds (`resid_post`) combine with `layers`; full names (`L3.mlp_out`, module paths) stand alone."""
    kinds = [s for s in cfg.sites if "." not in s]
    named = [parse_site(s) for s in cfg.sites if "." in s]
    return make_sites(cfg.layers, kinds) + named


def store_spec(model: str, corpus: CorpusConfig, extract: ExtractConfig) -> dict:
    """Everything that determines a store's content; a store is reused only for an equal spec. An unset
    start_token is left out, so stores written before it existed keep their spec."""
    unset = {"start_token"} if extract.start_token is None else set()
    return {"model": model, "corpus": corpus.model_dump(), "extract": extract.model_dump(exclude=unset)}


def _check_spec(store: Path, spec: dict) -> bool:
    """True when a complete store for this spec exists; raises when the folder holds another one."""
    for name in ("manifest.json", "spec.json"):
        f = store / name
        if f.exists():
            found = read_json(f)
            found = found["spec"] if name == "manifest.json" else found
            if found != spec:
                raise DictlabError(
                    f"{store} holds a store made with a different config; remove it or pick another run name "
                    "(differs in: " + ", ".join(k for k in spec if spec[k] != found.get(k)) + ")"
                )
            if name == "manifest.json":
                return True
    return False


def _batches(stream, batch_size: int, budget: int, include_bos: bool):
    """Group contexts into batches, stopping after the context that reaches the row budget."""
    rows = 0
    batch = []
    for ctx in stream:
        batch.append(ctx)
        rows += len(ctx.tokens) - (0 if include_bos else 1)
        if rows >= budget:
            break
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _forward(capture: ActivationCapture, batch, pad_id: int, cfg: ExtractConfig, store_dtype):
    """Activations of one batch, flattened to the stored rows, plus the row columns."""
    width = max(len(c.tokens) for c in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, c in enumerate(batch):
        ids[i, : len(c.tokens)] = torch.tensor(c.tokens)
        mask[i, : len(c.tokens)] = 1
    acts = capture.run(ids, None if bool(mask.all()) else mask, stop_early=cfg.stop_early)
    keep = mask.bool()
    if not cfg.include_bos:
        keep[:, 0] = False
    positions = torch.arange(width).expand(len(batch), width)
    out = {name: a[keep].to(store_dtype) for name, a in acts.items()}
    out["token"] = ids[keep].to(torch.int32)
    out["doc"] = torch.tensor([c.doc for c in batch]).unsqueeze(1).expand(-1, width)[keep]
    out["context"] = torch.tensor([c.index for c in batch]).unsqueeze(1).expand(-1, width)[keep]
    out["pos"] = positions[keep].to(torch.int32)
    return out


def _flush(store: Path, split: str, index: int, parts: list[dict], n_contexts: int) -> None:
    merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    write_shard(shard_path(store, split, index), merged, n_contexts)


def extract(model_spec: str, corpus: CorpusConfig, cfg: ExtractConfig, store: Path, progress: bool = True) -> Path:
    """Build (or finish) the activation store at `store`; a complete store for the same spec is kept."""
    store = Path(store)
    spec = store_spec(model_spec, corpus, cfg)
    if _check_spec(store, spec):
        return store
    check_source(corpus.source)
    sites = resolve_sites(cfg)
    if not sites:
        raise DictlabError("no sites to extract: give extract.sites (and extract.layers for site kinds)")
    model, tokenizer = shared_model(model_spec, cfg.model_dtype)
    capture = ActivationCapture(model, sites)  # validates layers and sites before anything is written
    write_json(store / "spec.json", spec)
    bos = bos_id(tokenizer, cfg.start_token)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos
    store_dtype = DTYPES[cfg.store_dtype]
    d_model = {}
    budgets = {"train": cfg.train_tokens, "eval": cfg.eval_tokens}
    for split in SPLITS:
        done = complete_shards(store, split)
        counts = [shard_counts(p) for p in done]
        contexts_done = sum(c for c, _ in counts)
        rows_done = sum(r for _, r in counts)
        budget = budgets[split]
        stream = contexts(
            documents(corpus.source, corpus.field), tokenizer, bos, split,
            cfg.context_length, corpus.eval_fraction, corpus.seed,
        )
        stream = islice(stream, contexts_done, None)
        bar = tqdm(total=budget, initial=min(rows_done, budget), unit="tok", unit_scale=True,
                   desc=f"extract {split}", disable=not progress, dynamic_ncols=True)
        parts: list[dict] = []
        shard_contexts = 0
        index = len(done)
        if rows_done < budget:
            for batch in _batches(stream, cfg.batch_size, budget - rows_done, cfg.include_bos):
                out = _forward(capture, batch, pad, cfg, store_dtype)
                d_model.update({s.name: out[s.name].shape[-1] for s in sites})
                parts.append(out)
                shard_contexts += len(batch)
                bar.update(min(out["token"].numel(), bar.total - bar.n))
                if len(parts) == cfg.batches_per_shard:
                    _flush(store, split, index, parts, shard_contexts)
                    index, parts, shard_contexts = index + 1, [], 0
            if parts:
                _flush(store, split, index, parts, shard_contexts)
        bar.close()
        if not complete_shards(store, split):
            raise DictlabError(
                f"the corpus {corpus.source!r} gave no {split} contexts (eval_fraction={corpus.eval_fraction}); "
                "use a larger corpus or another eval_fraction"
            )
    if not d_model:  # everything was already extracted before a crash: read sizes back from a shard
        with safe_open(str(shard_path(store, "train", 0)), framework="pt") as f:
            d_model = {s.name: f.get_slice(s.name).get_shape()[1] for s in sites}
    extra = {"versions": {"dictlab": dictlab.__version__, "torch": torch.__version__},
             "bos_token_id": bos, "n_layers": model.config.num_hidden_layers}
    write_manifest(store, spec, d_model, cfg.store_dtype, extra)
    return store
