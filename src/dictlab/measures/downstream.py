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

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from dictlab.data.forward import SharedPrefix, logit_blocks
from dictlab.data.lm import Edit, SiteEditor, parse_site, shared_model
from dictlab.data.placement import Auto, contexts_per_batch, model_device
from dictlab.data.store import Store
from dictlab.dictionaries.base import Dictionary
from dictlab.errors import DictlabError


def store_contexts(store: Store, split: str, n_contexts: int, bos: int) -> list[torch.Tensor]:
    """The token ids of n contexts of a split, rebuilt from the store's rows (BOS restored): the first
    context of each document in store order, then the second ones, and so on (`spread_contexts`)."""
    return _assemble({ctx: rows for ctx, (_, rows) in spread_contexts(store, split, n_contexts).items()}, bos)


def context_documents(store: Store, split: str, n_contexts: int) -> list[int]:
    """The document of each context `store_contexts` returns, in its order."""
    return [doc for doc, _ in spread_contexts(store, split, n_contexts).values()]


def spread_contexts(store: Store, split: str, n_contexts: int) -> dict[int, tuple[int, list[tuple[int, int]]]]:
    """context -> (its document, its (position, token) rows) for n contexts taken one per document in
    turn: as many documents as n allows, so that intervals over documents have documents to resample."""
    site = next(iter(store.sites))
    by_context: dict[int, tuple[int, list[tuple[int, int]]]] = {}
    for b in store.batches(site, split, 8192, columns=("token", "doc", "context", "pos")):
        for token, doc, ctx, pos in zip(*(b[k].tolist() for k in ("token", "doc", "context", "pos"))):
            by_context.setdefault(ctx, (doc, []))[1].append((pos, token))
    turn, seen = {}, {}  # context -> its rank within its document
    for ctx, (doc, _) in by_context.items():
        turn[ctx] = seen.get(doc, 0)
        seen[doc] = turn[ctx] + 1
    chosen = sorted(by_context, key=lambda c: (turn[c], c))[:n_contexts]
    return {c: by_context[c] for c in chosen}


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


def eval_context_batches(store: Store, n_contexts: int, batch_size: Auto = "auto", backward: bool = False) -> tuple:
    """The store's model and tokenizer (shared with the run's other stages, on the device where they
    compute) and its first `n_contexts` eval contexts as padded (ids, mask) batches on that device;
    `batch_size` contexts each, "auto": what fits there (`placement.contexts_per_batch`; `backward`:
    with room for a backward pass)."""
    spec = store.manifest["spec"]
    model, tokenizer = shared_model(spec["model"], store.model_dtype)
    contexts = store_contexts(store, "eval", n_contexts, store.manifest["bos_token_id"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    longest = max((len(c) for c in contexts), default=1)
    size = contexts_per_batch(model, longest, batch_size, backward)
    return model, tokenizer, list(padded_batches(contexts, size, pad, model_device(model)))


def padded_batches(contexts: list[torch.Tensor], batch_size: int, pad: int,
                   device: torch.device | str = "cpu") -> Iterator[tuple]:
    for i in range(0, len(contexts), batch_size):
        part = contexts[i:i + batch_size]
        ids = torch.nn.utils.rnn.pad_sequence(part, batch_first=True, padding_value=pad)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(c) for c in part], batch_first=True)
        yield ids.to(device), mask.to(device)


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
        return dictionary.reconstruct(flat, values, indices).reshape(*read.shape[:-1], -1)

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
                      first_batch_only: set[str] = frozenset(), progress: bool = True,
                      share_prefix: bool = True) -> dict[str, dict]:
    """Mean next-token CE of the clean model and of every edited one, and the KL of each to the clean
    (per predicted token); also their sums per context (`ce_per_context`, `kl_per_context`,
    `tokens_per_context`, in the order of the batches' contexts), which intervals are resampled from.
    Edits named in `first_batch_only` run on the first batch alone (checks); "clean_first_batch" is the
    clean model there.

    Cost: the layers before the earliest edited site run once per batch (the clean forward) and every
    edited forward resumes from there (`share_prefix`; bitwise the same numbers as full forwards, tested);
    the unembedding runs by vocabulary blocks, each reduced to log-sum-exp, target logit and KL while in
    cache."""
    sums = {name: {"ce": [], "kl": [], "n": []} for name in ["clean", "clean_first_batch", *edits]}
    runs = len(batches) * (1 + len(edits)) - (len(batches) - 1) * len(first_batch_only)
    start = SharedPrefix.first_layer(model, [s for es in edits.values() for e in es for s in (e.read, e.write)])
    prefix = SharedPrefix(model, start) if share_prefix and start else None
    bar = tqdm(total=runs, desc="CE loss (spliced forwards)", disable=not progress, dynamic_ncols=True, leave=False)
    for i, (ids, mask) in enumerate(batches):
        valid = mask[:, 1:].bool()
        targets = ids[:, 1:][valid]
        context = torch.arange(len(ids), device=valid.device)[:, None].expand_as(valid)[valid]
        with prefix.recording() if prefix else contextlib.nullcontext():
            clean = NextTokenScores.clean(model, final_hidden(model, ids, mask, valid), targets)
        for name in ("clean", "clean_first_batch") if i == 0 else ("clean",):
            _add(sums[name], clean.nll, torch.zeros_like(clean.nll), context, len(ids))
        bar.update(1)
        for name, edit in edits.items():
            if i > 0 and name in first_batch_only:
                continue
            with prefix.resumed() if prefix else contextlib.nullcontext(), SiteEditor(model, edit):
                hidden = final_hidden(model, ids, mask, valid)
            nll, kl = clean.edited(model, hidden, targets)
            _add(sums[name], nll, kl, context, len(ids))
            bar.update(1)
    bar.close()
    return {name: {"ce": sum(s["ce"]) / sum(s["n"]), "kl": sum(s["kl"]) / sum(s["n"]), "ce_per_context": s["ce"],
                   "kl_per_context": s["kl"], "tokens_per_context": s["n"]} for name, s in sums.items()}


def final_hidden(model, ids: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[N, d]: the final hidden states (after the final norm) at the predicting positions."""
    out = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return out[:, :-1][valid]


class NextTokenScores:
    """The clean model's logits [N, V] and log-sum-exp [N] on a batch; `edited` scores another forward's
    hidden states against them, one vocabulary block at a time.

    Per token: NLL = lse − logit[target]; KL(p_clean ‖ p_edited) = Σ_v p_v (clean_v − logits_v) −
    (lse_clean − lse_edited) (Σ p = 1), written with differences of logits, which stay small, rather than
    as Σ p log p − Σ p log q, two terms of several nats that cancel (float32 lost 1e-4 of a 1e-3 KL that
    way). The log-sum-exp is accumulated over blocks with a running maximum."""

    def __init__(self, logits: torch.Tensor, lse: torch.Tensor, nll: torch.Tensor):
        self.logits, self.lse, self.nll = logits, lse, nll

    @classmethod
    def clean(cls, model, hidden: torch.Tensor, targets: torch.Tensor) -> NextTokenScores:
        logits = torch.empty(hidden.shape[0], model.get_output_embeddings().weight.shape[0], device=hidden.device)
        lse = _LogSumExp(hidden.shape[0], hidden.device)
        for start, block in logit_blocks(model, hidden):
            logits[:, start:start + block.shape[1]] = block
            lse.add(block)
        lse = lse.value()
        return cls(logits, lse, lse - logits.gather(1, targets[:, None])[:, 0])

    def edited(self, model, hidden: torch.Tensor, targets: torch.Tensor,
               watch: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """(NLL [N], KL to the clean [N]) of another forward's final hidden states; with `watch` (token
        ids) also the probability mass the edited model puts on those tokens [N]."""
        n, device = hidden.shape[0], hidden.device
        lse, cross, target_logit = _LogSumExp(n, device), torch.zeros(n, device=device), torch.zeros(n, device=device)
        watched = None if watch is None else torch.zeros(n, len(watch), device=device)
        for start, block in logit_blocks(model, hidden):
            end = start + block.shape[1]
            clean = self.logits[:, start:end]
            lse.add(block)
            cross += ((clean - self.lse[:, None]).exp_() * (clean - block)).sum(1)
            inside = (targets >= start) & (targets < end)
            target_logit[inside] = block[inside, targets[inside] - start]
            if watch is not None:
                inside = (watch >= start) & (watch < end)
                watched[:, inside] = block[:, watch[inside] - start]
        lse = lse.value()
        scores = (lse - target_logit, cross - (self.lse - lse))
        return scores if watch is None else (*scores, (watched - lse[:, None]).exp().sum(1))

    def mass(self, watch: torch.Tensor) -> torch.Tensor:
        """[N]: the clean model's probability mass on the tokens `watch`."""
        return (self.logits[:, watch] - self.lse[:, None]).exp().sum(1)


class _LogSumExp:
    """log Σ exp over blocks of columns, with a running maximum per row."""

    def __init__(self, rows: int, device: torch.device | str = "cpu"):
        self.max = torch.full((rows,), -torch.inf, device=device)
        self.sum = torch.zeros(rows, device=device)

    def add(self, block: torch.Tensor) -> None:
        top = torch.maximum(self.max, block.amax(1))
        self.sum = self.sum * (self.max - top).exp() + (block - top[:, None]).exp_().sum(1)
        self.max = top

    def value(self) -> torch.Tensor:
        return self.max + self.sum.log()


def _add(acc: dict, nll: torch.Tensor, kl: torch.Tensor, context: torch.Tensor, n_contexts: int) -> None:
    """Append a batch's per-context sums of NLL and KL (float64) and token counts."""
    for key, values in (("ce", nll), ("kl", kl)):
        acc[key] += torch.bincount(context, values.double(), minlength=n_contexts).tolist()
    acc["n"] += torch.bincount(context, minlength=n_contexts).tolist()


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
