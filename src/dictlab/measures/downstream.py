"""Faithfulness to the model: splice a dictionary's reconstruction in at its site, finish the forward
pass, and compare the next-token predictions with the clean model's.

Per dictionary, on the same held-out contexts (the store's eval split, BOS first):
    CE_clean, CE_spliced, CE_zero, CE_mean      next-token cross-entropy (nats per predicted token) of
                                                the clean model, with x̂ in place of x, with 0, and with
                                                the eval mean of the site in place of x
    recovered_vs_zero = (CE_zero − CE_spliced) / (CE_zero − CE_clean)     (and the same against CE_mean)
    KL = mean_t Σ_v p_clean(v) [log p_clean(v) − log p_spliced(v)]
    CE_error_added: x̂ + (x − x̂) in place of x, which must equal CE_clean (a check of the splice itself;
                    run on the first batch of contexts only, and compared with CE_clean there)
The BOS position is never replaced (the dictionaries are fitted without BOS rows). A transcoder
replaces its target site with its output computed from its input site; the ablations then apply
to the target site.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from dictlab.data.lm import Edit, SiteEditor, parse_site, shared_model
from dictlab.data.store import Store
from dictlab.dictionaries.base import Dictionary
from dictlab.errors import DictlabError


def store_contexts(store: Store, split: str, n_contexts: int, bos: int) -> list[torch.Tensor]:
    """The token ids of the first n contexts of a split, rebuilt from the store's rows (BOS restored)."""
    site = next(iter(store.sites))
    by_context: dict[int, list[tuple[int, int]]] = {}
    for b in store.batches(site, split, 8192, columns=("token", "context", "pos")):
        for token, ctx, pos in zip(b["token"].tolist(), b["context"].tolist(), b["pos"].tolist()):
            if ctx not in by_context and len(by_context) == n_contexts:
                return _assemble(by_context, bos)
            by_context.setdefault(ctx, []).append((pos, token))
    return _assemble(by_context, bos)


def _assemble(by_context: dict, bos: int) -> list[torch.Tensor]:
    out = []
    for rows in by_context.values():
        rows.sort()
        tokens = [t for _, t in rows]
        if rows[0][0] != 0:
            tokens = [bos, *tokens]
        if len(tokens) != rows[-1][0] + 1:
            raise DictlabError("the store is missing rows inside a context; it cannot rebuild the contexts")
        out.append(torch.tensor(tokens))
    return out


def eval_context_batches(store: Store, n_contexts: int, batch_size: int) -> tuple:
    """The store's model and tokenizer (shared with the run's other stages) and its first `n_contexts`
    eval contexts as padded (ids, mask) batches."""
    spec = store.manifest["spec"]
    model, tokenizer = shared_model(spec["model"], store.model_dtype)
    contexts = store_contexts(store, "eval", n_contexts, store.manifest["bos_token_id"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return model, tokenizer, list(padded_batches(contexts, batch_size, pad))


def padded_batches(contexts: list[torch.Tensor], batch_size: int, pad: int) -> Iterator[tuple]:
    for i in range(0, len(contexts), batch_size):
        part = contexts[i:i + batch_size]
        ids = torch.nn.utils.rnn.pad_sequence(part, batch_first=True, padding_value=pad)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(c) for c in part], batch_first=True)
        yield ids, mask


def keep_bos(fn: Callable) -> Callable:
    """An Edit function that applies fn(read, current) (float32, [B, T − 1, d]) to every position but BOS."""
    def edit(read: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        out = current.clone()
        out[:, 1:] = fn(read[:, 1:].float(), current[:, 1:].float()).to(current.dtype)
        return out

    return edit


def _through(dictionary: Dictionary) -> Callable:
    def reconstruct(read: torch.Tensor) -> torch.Tensor:
        flat = read.reshape(-1, read.shape[-1])
        values, indices = dictionary.encode_sparse(flat)
        return dictionary.decode_sparse(values, indices).reshape(*read.shape[:-1], -1)

    return reconstruct


@dataclass
class Spliced:
    """What to splice: a dictionary reading `site` and writing `target` (= site unless a transcoder)."""

    dictionary: Dictionary
    site: str
    target: str


def variants(spliced: dict[str, Spliced], means: dict[str, torch.Tensor]) -> dict[str, list[Edit]]:
    """The edited forward passes: ablations per written site, and per dictionary spliced / error added."""
    out = {}
    for target in sorted({s.target for s in spliced.values()}):
        w = parse_site(target)
        out[f"zero:{target}"] = [Edit(w, w, keep_bos(lambda r, c: torch.zeros_like(c)))]
        mean = means[target]
        out[f"mean:{target}"] = [Edit(w, w, keep_bos(lambda r, c, m=mean: m.expand_as(c)))]
    for name, s in spliced.items():
        r, w, rec = parse_site(s.site), parse_site(s.target), _through(s.dictionary)
        out[f"spliced:{name}"] = [Edit(r, w, keep_bos(lambda read, cur, rec=rec: rec(read)))]
        out[f"error_added:{name}"] = [Edit(r, w, keep_bos(_error_added(rec)))]
    return out


def _error_added(rec: Callable) -> Callable:
    def edit(read: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        x_hat = rec(read)
        return x_hat + (current - x_hat)

    return edit


@torch.no_grad()
def next_token_losses(model, batches: list[tuple], edits: dict[str, list[Edit]],
                      first_batch_only: set[str] = frozenset(), progress: bool = True) -> dict[str, dict]:
    """Mean next-token CE of the clean model and of every edited one, and the KL of each to the clean
    (per predicted token). Edits named in `first_batch_only` run on the first batch alone (checks);
    "clean_first_batch" is the clean model there."""
    sums = {name: {"ce": 0.0, "kl": 0.0, "n": 0} for name in ["clean", "clean_first_batch", *edits]}
    runs = len(batches) * (1 + len(edits)) - (len(batches) - 1) * len(first_batch_only)
    bar = tqdm(total=runs, desc="CE loss (spliced forwards)", disable=not progress, dynamic_ncols=True, leave=False)
    for i, (ids, mask) in enumerate(batches):
        targets, valid = ids[:, 1:], mask[:, 1:].bool()
        clean = _logits(model, ids, mask)
        clean_lse = torch.logsumexp(clean, -1)
        p = (clean - clean_lse.unsqueeze(-1)).exp_()
        for name in ("clean", "clean_first_batch") if i == 0 else ("clean",):
            _add(sums[name], clean, clean_lse, targets, valid, torch.zeros_like(clean_lse))
        bar.update(1)
        for name, edit in edits.items():
            if i > 0 and name in first_batch_only:
                continue
            with SiteEditor(model, edit):
                logits = _logits(model, ids, mask)
            lse = torch.logsumexp(logits, -1)
            _add(sums[name], logits, lse, targets, valid, _kl(p, clean, clean_lse, logits, lse))
            bar.update(1)
    bar.close()
    return {name: {"ce": s["ce"] / s["n"], "kl": s["kl"] / s["n"]} for name, s in sums.items()}


def _kl(p: torch.Tensor, clean: torch.Tensor, clean_lse: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor,
        chunk: int = 16) -> torch.Tensor:
    """Per token KL(p_clean ‖ p_edited) = Σ_v p_v (clean_v − logits_v) − (lse_clean − lse_edited) (Σ p = 1):
    written with differences of logits, which stay small, rather than as Σ p log p − Σ p log q, two terms
    of several nats that cancel (float32 lost 1e-4 of a 1e-3 KL that way). Chunked over positions, so
    the temporary is [B, chunk, V]."""
    out = torch.empty(p.shape[:2])
    for t in range(0, p.shape[1], chunk):
        part = slice(t, t + chunk)
        out[:, part] = (p[:, part] * (clean[:, part] - logits[:, part])).sum(-1) - (clean_lse[:, part] - lse[:, part])
    return out


def _logits(model, ids, mask) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()


def _add(acc: dict, logits, lse, targets, valid, kl) -> None:
    nll = lse - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    acc["ce"] += float(nll[valid].double().sum())
    acc["kl"] += float(kl[valid].double().sum())
    acc["n"] += int(valid.sum())


def recovered(losses: dict[str, dict], name: str, target: str) -> dict:
    """The downstream numbers of one spliced dictionary, from `next_token_losses`' output."""
    clean = losses["clean"]["ce"]
    spliced = losses[f"spliced:{name}"]["ce"]
    out = {"ce_clean": clean, "ce_spliced": spliced, "kl_spliced": losses[f"spliced:{name}"]["kl"]}
    if f"error_added:{name}" in losses:
        out["error_added_ce_gap"] = losses[f"error_added:{name}"]["ce"] - losses["clean_first_batch"]["ce"]
    for base in ("zero", "mean"):
        ablated = losses[f"{base}:{target}"]["ce"]
        out[f"ce_{base}_ablated"] = ablated
        out[f"ce_recovered_vs_{base}"] = (ablated - spliced) / (ablated - clean) if ablated != clean else float("nan")
    return out
