"""corpus -> tokens -> activations -> store: batched, resumable, with a progress bar; on N ranks under torchrun.

Resuming: shards are whole batches of a deterministic context stream, written atomically. A rerun
counts the contexts in the complete shards, skips them in the stream and goes on, so an
interrupted-then-resumed store is bitwise identical to an uninterrupted one.

N ranks: every rank walks the same context stream (tokenizing is cheap beside the forward pass) and
forwards the contexts of its documents (document index mod N), into its own shard folder; the stream
stops for all at the same context, so the store holds exactly the rows one process extracts. Rank 0
merges the manifest once every rank is done. A rank resumes from its own shards; resuming with
another number of ranks is refused.

On a GPU the forward runs there, the activations come back through pinned memory, and shards are
written on a background thread while the next batches run.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

import dictlab
from dictlab.data import distributed
from dictlab.data.corpus import CorpusConfig, check_source, contexts, documents
from dictlab.data.lm import DTYPES, ActivationCapture, bos_id, make_sites, parse_site, shared_model
from dictlab.data.store import (
    SPLITS,
    Location,
    complete_shards,
    rank_folders,
    shard_entry,
    shard_folder,
    shard_name,
    split_shards,
    write_manifest,
    write_shard,
)
from dictlab.errors import DictlabError, DiskFull
from dictlab.options import Strict


class ExtractConfig(Strict):
    layers: list[int] = Field(default_factory=lambda: [8])
    sites: list[str] = Field(default_factory=lambda: ["resid_post"], description="site kinds or full site names")
    context_length: int = Field(128, ge=2)
    batch_size: int = Field(16, ge=1, description="contexts per forward pass")
    batches_per_shard: int = Field(16, ge=1, description="a shard holds this many batches")
    train_tokens: int = Field(200_000, ge=1, description="stored rows wanted in the train split")
    eval_tokens: int = Field(20_000, ge=1, description="stored rows wanted in the eval split")
    model_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="the model's compute dtype; auto: bfloat16 with CUDA, else whichever of float32 and "
                            "bfloat16 a short forward finds faster on this CPU (recorded in the manifest)")
    store_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    contexts_per_document: int | None = Field(
        None, ge=1, description="keep only each document's first N contexts (default: all): more documents for the "
                                "same tokens, so that intervals over held-out documents have documents to resample")
    include_bos: bool = Field(False, description="store BOS positions too (their norm is ~10x the rest)")
    start_token: str | None = Field(None, description="the token that starts each context (default: the "
                                    "tokenizer's BOS), e.g. <|endoftext|> for SmolLM2, whose BOS is a chat token")
    stop_early: bool = Field(True, description="stop the forward pass after the deepest hooked layer")


STORE_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ROW_COLUMN_BYTES = 16  # token, doc, context, pos: about 4 bytes each


def store_bytes(cfg: ExtractConfig, d_model: int) -> int:
    """Bytes a store of these settings takes: every row of both splits, each site at d_model wide (a module
    path of another width is counted at d_model), plus the row columns."""
    per_row = len(resolve_sites(cfg)) * d_model * STORE_DTYPE_BYTES.get(cfg.store_dtype, 4) + ROW_COLUMN_BYTES
    return (cfg.train_tokens + cfg.eval_tokens) * per_row


def resolve_sites(cfg: ExtractConfig):
    """Site kinds (`resid_post`) combine with `layers`; full names (`L3.mlp_out`, module paths) stand alone."""
    kinds = [s for s in cfg.sites if "." not in s]
    named = [parse_site(s) for s in cfg.sites if "." in s]
    return make_sites(cfg.layers, kinds) + named


def store_spec(model: str, corpus: CorpusConfig, extract: ExtractConfig) -> dict:
    """Everything that determines a store's content; a store is reused only for an equal spec. An unset
    start_token or contexts_per_document is left out, so stores written before they existed keep their spec."""
    unset = {k for k in ("start_token", "contexts_per_document") if getattr(extract, k) is None}
    return {"model": model, "corpus": corpus.model_dump(), "extract": extract.model_dump(exclude=unset)}


DONE = "done.json"  # in a shard folder: its rank extracted the whole split
PRECISION = "precision.json"  # the model dtype the store was started with, and why


def _check_spec(loc: Location, spec: dict) -> bool:
    """True when a complete store for this spec exists; raises when the folder holds another one."""
    for name in ("manifest.json", "spec.json"):
        if loc.exists(name):
            found = loc.read_json(name)
            found = found["spec"] if name == "manifest.json" else found
            if found != spec:
                raise DictlabError(
                    f"{loc.url} holds a store made with a different config; remove it or pick another run name "
                    "(differs in: " + ", ".join(k for k in spec if spec[k] != found.get(k)) + ")"
                )
            if name == "manifest.json":
                return True
    return False


def _check_ranks(loc: Location, ranks: int) -> None:
    """A partial store is resumed only by as many ranks as started it."""
    for split in SPLITS:
        started = set(rank_folders(loc, split)) | ({1} if complete_shards(loc, split) else set())
        other = started - {ranks}
        if other:
            raise DictlabError(f"{loc.url} was partly extracted by {other.pop()} process(es); resume it with "
                               f"that many (this run has {ranks}), or remove it")


def _own_contexts(stream, budget: int, include_bos: bool, world):
    """This rank's contexts of the stream (all of them for one process), up to and including the
    context at which the rows of every rank together reach the budget."""
    rows = 0
    for ctx in stream:
        if world is None or ctx.doc % world.size == world.rank:
            yield ctx
        rows += len(ctx.tokens) - (0 if include_bos else 1)
        if rows >= budget:
            return


def split_batches(corpus: CorpusConfig, cfg: ExtractConfig, tokenizer, split: str, world):
    """This rank's batches of a split's contexts: the deterministic stream its shards are cut from, shard i
    holding batches i·batches_per_shard and on."""
    bos = bos_id(tokenizer, cfg.start_token)
    stream = contexts(documents(corpus.source, corpus.field), tokenizer, bos, split, cfg.context_length,
                      corpus.eval_fraction, corpus.seed, per_document=cfg.contexts_per_document)
    budget = cfg.train_tokens if split == "train" else cfg.eval_tokens
    return _batches(_own_contexts(stream, budget, cfg.include_bos, world), cfg.batch_size)


def _batches(stream, batch_size: int):
    batch = []
    for ctx in stream:
        batch.append(ctx)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def forward_batch(capture: ActivationCapture, batch, pad_id: int, cfg: ExtractConfig, store_dtype, device):
    """Activations of one batch, flattened to the stored rows, plus the row columns (on the CPU)."""
    width = max(len(c.tokens) for c in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, c in enumerate(batch):
        ids[i, : len(c.tokens)] = torch.tensor(c.tokens)
        mask[i, : len(c.tokens)] = 1
    full = bool(mask.all())
    acts = capture.run(_to_device(ids, device), None if full else _to_device(mask, device), stop_early=cfg.stop_early)
    keep = mask.bool()
    if not cfg.include_bos:
        keep[:, 0] = False
    positions = torch.arange(width).expand(len(batch), width)
    # rows picked by indices made on the CPU: no wait for the GPU, which goes on with the queued work
    rows = _to_device(keep.flatten().nonzero().squeeze(1), device)
    out = {name: _to_cpu(a.flatten(0, 1).index_select(0, rows).to(store_dtype)) for name, a in acts.items()}
    out["token"] = ids[keep].to(torch.int32)
    out["doc"] = torch.tensor([c.doc for c in batch]).unsqueeze(1).expand(-1, width)[keep]
    out["context"] = torch.tensor([c.index for c in batch]).unsqueeze(1).expand(-1, width)[keep]
    out["pos"] = positions[keep].to(torch.int32)
    return out


def _ahead(items, depth: int = 2):
    """The items of an iterator, produced on a background thread up to `depth` ahead: the next batches
    are tokenized while the model runs on this one (fast tokenizers release the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)
        q.put(done)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # let a producer blocked on a full queue see the stop
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.01)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on the device, copied from pinned memory so that the copy queues behind the GPU's
    work instead of waiting for it."""
    return t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True)


def _to_cpu(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)  # waited for before the shard is handed to the writer (_write)


def write_parts(loc: Location, rel: str, parts: list[dict], n_contexts: int) -> None:
    merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    write_shard(loc, rel, merged, n_contexts)


def extract(model_spec: str, corpus: CorpusConfig, cfg: ExtractConfig, store: str | Path,
            progress: bool = True) -> str | Path:
    """Build (or finish) the activation store at `store` (a folder or an fsspec URL); a complete store for
    the same spec is kept. Under torchrun every rank calls this (see the module's docstring)."""
    loc = Location(store)
    world = distributed.current()
    spec = store_spec(model_spec, corpus, cfg)
    if _check_spec(loc, spec):
        return store
    check_source(corpus.source)
    sites = resolve_sites(cfg)
    if not sites:
        raise DictlabError("no sites to extract: give extract.sites (and extract.layers for site kinds)")
    rank, ranks = distributed.position(world)
    _check_ranks(loc, ranks)
    model, tokenizer, precision = _model(loc, model_spec, cfg.model_dtype, world)
    capture = ActivationCapture(model, sites)  # validates layers and sites before anything is written
    if rank == 0:
        loc.write_json("spec.json", spec)
        if not loc.exists(PRECISION):
            loc.write_json(PRECISION, precision)
    device = distributed.device()
    model.to(device)  # where shared_model put it; the later stages that share the model run it there too
    try:
        _extract_splits(loc, capture, tokenizer, corpus, cfg, world, device, progress)
    except DiskFull as e:
        width = (model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config)
        raise DiskFull(f"{e}: the store needs about {store_bytes(cfg, width.hidden_size):,} bytes in all at "
                       f"{loc.url}; free that much (or put the store elsewhere) and rerun the same command to "
                       "resume") from e
    extra = {"versions": {"dictlab": dictlab.__version__, "torch": torch.__version__},
             "bos_token_id": bos_id(tokenizer, cfg.start_token), "n_layers": model.config.num_hidden_layers,
             "ranks": ranks, "precision": precision}
    if rank == 0:
        header, _ = loc.header(split_shards(loc, "train")[0])
        write_manifest(loc, spec, {s.name: header[s.name]["shape"][1] for s in sites}, cfg.store_dtype, extra)
    if world is not None:
        world.barrier()
    return store


def _model(loc: Location, model_spec: str, dtype: str, world) -> tuple:
    """(model, tokenizer, precision): a resumed store keeps the dtype it started with; under torchrun
    every rank takes bfloat16 if any rank's probe chose it, so that one store holds one precision."""
    if dtype == "auto" and loc.exists(PRECISION):
        recorded = loc.read_json(PRECISION)
        return *shared_model(model_spec, recorded["model_dtype"]), recorded
    model, tokenizer = shared_model(model_spec, dtype)
    precision = model.dictlab_precision
    if dtype == "auto" and world is not None:
        agreed = "bfloat16" if world.max(torch.tensor([precision["model_dtype"] == "bfloat16"],
                                                      dtype=torch.uint8))[0] else "float32"
        if agreed != precision["model_dtype"]:
            model, tokenizer = shared_model(model_spec, agreed)
            precision = {**precision, "model_dtype": agreed, "why": "another rank's probe chose it"}
    return model, tokenizer, precision


def _extract_splits(loc: Location, capture: ActivationCapture, tokenizer, corpus: CorpusConfig,
                    cfg: ExtractConfig, world, device, progress: bool) -> None:
    """Every split of this rank, into its shard folders; returns once every rank has finished."""
    rank, ranks = distributed.position(world)
    bos = bos_id(tokenizer, cfg.start_token)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos
    store_dtype = DTYPES[cfg.store_dtype]
    budgets = {"train": cfg.train_tokens, "eval": cfg.eval_tokens}
    found = {}
    with ThreadPoolExecutor(max_workers=1) as writer:
        for split in SPLITS:
            folder = shard_folder(split, rank, ranks)
            done = complete_shards(loc, folder)
            if loc.exists(f"{folder}/{DONE}"):  # this rank finished the split before the run stopped
                found[split] = bool(done)
                continue
            contexts_done = sum(shard_entry(loc, p)["contexts"] for p in done)  # (entries a stop left out, made)
            bar = tqdm(total=budgets[split], unit="tok", unit_scale=True, desc=f"extract {split}",
                       disable=not progress or rank != 0, dynamic_ncols=True)
            parts: list[dict] = []
            shard_contexts, index, pending = 0, len(done), None
            skipped = 0
            for batch in _ahead(split_batches(corpus, cfg, tokenizer, split, world)):
                if skipped < contexts_done:  # already in this rank's shards (whole batches: see the module)
                    skipped += len(batch)
                    bar.update(min(sum(len(c.tokens) for c in batch) * ranks, bar.total - bar.n))
                    continue
                out = forward_batch(capture, batch, pad, cfg, store_dtype, device)
                parts.append(out)
                shard_contexts += len(batch)
                bar.update(min(out["token"].numel() * ranks, bar.total - bar.n))
                if len(parts) == cfg.batches_per_shard:
                    pending = _write(writer, pending, loc, shard_name(folder, index), parts, shard_contexts, device)
                    index, parts, shard_contexts = index + 1, [], 0
            if parts:
                pending = _write(writer, pending, loc, shard_name(folder, index), parts, shard_contexts, device)
            if pending is not None:
                pending.result()
            bar.close()
            shards = complete_shards(loc, folder)
            loc.write_json(f"{folder}/{DONE}", {"shards": len(shards)})
            found[split] = bool(shards)
    if world is not None:
        found = {split: not world.agree(not any_found) for split, any_found in found.items()}
    for split in SPLITS:
        if not found[split]:
            raise DictlabError(
                f"the corpus {corpus.source!r} gave no {split} contexts (eval_fraction={corpus.eval_fraction}); "
                "use a larger corpus or another eval_fraction"
            )
    if world is not None:
        world.barrier()


def _write(writer: ThreadPoolExecutor, pending, loc: Location, rel: str, parts: list[dict], n_contexts: int,
           device: torch.device):
    """Write a shard on the background thread, after the one before it (at most one waits). The GPU's
    copies into the shard's pinned buffers are waited for here, on the thread whose device it is."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if pending is not None:
        pending.result()
    return writer.submit(write_parts, loc, rel, parts, n_contexts)
