"""Behavioural comparison of two models: what they say to the same prompts, and what they predict next
on the same text.

Outputs: every model continues every prompt with the same seed per prompt (sampling at `temperature`,
or greedy at 0); a model marked `chat` reads the prompt through its chat template, the others after
their start token. Two outputs' similarity is the cosine of their all-MiniLM-L6-v2 embeddings. Per
suite: the mean over prompts with a bootstrap interval over prompts, a permutation null (each output
paired with another prompt's output of the same suite), Cohen's d of matched against mismatched pairs,
and a band: strong > 0.7, moderate 0.4–0.7, weak below.

Next token, at the compared positions of the held-out text (data/paired_text.py): top-1 agreement and the
Jensen–Shannon divergence (bits) of the two next-token distributions. With one vocabulary, tokens are
compared by id at every position. With two, only at word-aligned positions, where both models predict
the start of the next word, and tokens by their text without leading spaces (`▁the` and `Ġthe` are
one outcome, and equal texts' probabilities are summed); top-1 agreement then means one prediction's
text begins the other's (` conf` and ` config` agree). Each distribution is kept as its top k
outcomes, renormalised: the JSD is that of these two over the union of their outcomes (0 for equal
lists, 1 bit for disjoint ones), which tends to the full JSD as k grows; the share of the probability
the top k held is reported beside it.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from dictlab.data.paired_text import tokenize
from dictlab.data.placement import model_device
from dictlab.errors import DictlabError
from dictlab.measures.stats import bootstrap_mean, bootstrap_ratio, cohens_d, tested, unit_rows

BANDS = ((0.7, "strong"), (0.4, "moderate"), (-1.0, "weak"))


def band(similarity: float) -> str:
    return next(name for floor, name in BANDS if similarity > floor)


@torch.no_grad()
def continuations(model, tokenizer, prompts: list[str], chat: bool, start: int, new_tokens: int = 48,
                  temperature: float = 0.7, top_p: float = 0.95, seed: int = 0, progress: bool = False) -> list[str]:
    """Each prompt's continuation (new text only), generated with seed `seed`·100003 + prompt index, so
    every model draws the same random numbers for the same prompt."""
    from transformers import GenerationConfig

    if chat and not getattr(tokenizer, "chat_template", None):
        raise DictlabError("chat: true, but the model's tokenizer has no chat template")
    eos = tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=temperature > 0, eos_token_id=eos,
                              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
                              **({"temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 else {}))
    out = []
    for i, prompt in enumerate(tqdm(prompts, desc="generate", disable=not progress, dynamic_ncols=True)):
        if chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenize(tokenizer, prompt, start)[0]
        torch.manual_seed(seed * 100003 + i)
        ids = torch.tensor([ids], device=model_device(model))
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        out.append(tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return out


def output_similarity(outputs_a: list[str], outputs_b: list[str], suites: list[str], embed, n_boot: int = 1000,
                      permutations: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """Per suite, in order, then `all` (suites of fewer than 2 prompts are left out): the mean cosine of
    the two models' output embeddings with interval, null, p, Cohen's d and band; and each prompt's cosine."""
    texts = [t if t else "(no output)" for t in outputs_a + outputs_b]
    e = embed(texts).double().cpu().numpy()
    ea, eb = e[: len(outputs_a)], e[len(outputs_a):]
    cosines = (ea * eb).sum(1)
    out = {"per_prompt": cosines.tolist(), "suites": []}
    rng = np.random.default_rng(seed)
    for suite in [*dict.fromkeys(suites), "all"]:
        index = np.arange(len(suites)) if suite == "all" else np.flatnonzero(np.array(suites) == suite)
        if len(index) < 2:
            continue
        observed, low, high = bootstrap_mean(cosines[index], n_boot, level, seed)
        cross = ea[index] @ eb[index].T
        null = np.array([cross[np.arange(len(index)), rng.permutation(len(index))].mean()
                         for _ in range(permutations)])
        mismatched = cross[~np.eye(len(index), dtype=bool)]
        out["suites"].append({"suite": suite, **tested(observed, null, "greater"), "low": low, "high": high,
                              "n": int(len(index)), "band": band(observed),
                              "cohens_d": cohens_d(cosines[index], mismatched)})
    return out


def token_texts(tokenizer, size: int | None = None) -> np.ndarray:
    """The text of every output id (`size` of them: a model's unembedding may have more rows than its
    tokenizer has tokens) without leading spaces (`▁the`, `Ġthe` → `the`); a token of spaces alone is `␣`,
    an id without a token ``."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    pieces += [None] * max(0, (size or 0) - len(pieces))
    texts = []
    for piece in pieces:
        text = tokenizer.convert_tokens_to_string([piece]) if piece is not None else ""
        texts.append(text.lstrip(" ") or ("␣" if text else ""))
    return np.array(texts, dtype=object)


def merged_keys(ids: np.ndarray, probs: np.ndarray, texts: np.ndarray | None,
                table: dict) -> tuple[np.ndarray, np.ndarray]:
    """Rows of top-k (ids, probs) as (keys, probs), keys −1 where empty: the ids themselves for one shared
    vocabulary (`texts` None), else the keys of the tokens' texts in `table` (filled as met), equal texts
    summed."""
    if texts is None:
        return ids.astype(np.int64), probs.astype(np.float64)
    keys = np.full(ids.shape, -1, dtype=np.int64)
    merged = np.zeros(ids.shape, dtype=np.float64)
    for r in range(len(ids)):
        row: dict[int, float] = {}
        for token, p in zip(ids[r], probs[r]):
            if not texts[token]:  # an id without a token: no outcome (the renormalisation drops it)
                continue
            key = table.setdefault(texts[token], len(table))
            row[key] = row.get(key, 0.0) + float(p)
        keys[r, : len(row)], merged[r, : len(row)] = list(row), list(row.values())
    return keys, merged


def jsd_top_k(pk: np.ndarray, pp: np.ndarray, qk: np.ndarray, qp: np.ndarray) -> np.ndarray:
    """Per row, the JSD (bits) of P and Q each cut to its top k outcomes and renormalised, over the union
    of their outcomes: 0 for equal lists, 1 for disjoint ones. Keys unique within a row, −1 for an
    empty slot (probability 0)."""
    pp = pp / np.maximum(pp.sum(1, keepdims=True), 1e-300)
    qp = qp / np.maximum(qp.sum(1, keepdims=True), 1e-300)
    match = (pk[:, :, None] == qk[:, None, :]) & (pk[:, :, None] >= 0)
    in_both = match.any(2)
    q_at_p = (match * qp[:, None, :]).sum(2)  # Q's probability of each of P's outcomes (0 where Q lacks it)
    m = (pp + q_at_p) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        common = np.where(in_both & (pp > 0), pp * np.log2(pp / m), 0.0) + np.where(
            in_both & (q_at_p > 0), q_at_p * np.log2(q_at_p / m), 0.0)
    p_only = np.where(in_both, 0.0, pp).sum(1)
    q_only = 1 - (match * qp[:, None, :]).sum((1, 2))  # Q's mass on outcomes P lacks
    return 0.5 * common.sum(1) + 0.5 * (p_only + np.clip(q_only, 0, 1))


def top1_agree(a_top: np.ndarray, b_top: np.ndarray, texts_a: np.ndarray | None,
               texts_b: np.ndarray | None) -> np.ndarray:
    """Per row: the same top-1 token (one vocabulary), or one top-1 text beginning the other (two)."""
    if texts_a is None:
        return a_top == b_top
    ta, tb = texts_a[a_top].astype(str), texts_b[b_top].astype(str)
    both = (np.char.str_len(ta) > 0) & (np.char.str_len(tb) > 0)
    return both & (np.char.startswith(ta, tb) | np.char.startswith(tb, ta))


def next_token_comparison(a: dict, b: dict, valid: np.ndarray, texts: tuple | None, n_boot: int = 1000,
                          permutations: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """Top-1 agreement and top-k JSD at the compared positions, with bootstrap intervals over
    documents and permutation nulls (documents shuffled against each other, position by position).

    `a`, `b`: {"ids", "probs"} [D, m, k] top-k next-token predictions at each document's compared
    positions; `valid` [D, m]: the positions compared (word-aligned ones for two vocabularies);
    `texts`: None for one vocabulary, else (token_texts of A, token_texts of B)."""
    n_docs, m, k = a["ids"].shape
    text_a, text_b = (None, None) if texts is None else texts
    table: dict = {}
    ka, pa = merged_keys(a["ids"].reshape(-1, k), a["probs"].reshape(-1, k), text_a, table)
    kb, pb = merged_keys(b["ids"].reshape(-1, k), b["probs"].reshape(-1, k), text_b, table)
    top_a, top_b = a["ids"][:, :, 0].reshape(-1), b["ids"][:, :, 0].reshape(-1)
    flat_valid = valid.reshape(-1)

    def measures(rows_b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keep = flat_valid & flat_valid[rows_b]
        agree = top1_agree(top_a, top_b[rows_b], text_a, text_b) & keep
        jsd = np.where(keep, jsd_top_k(ka, pa, kb[rows_b], pb[rows_b]), 0.0)
        return agree.reshape(n_docs, m).sum(1), jsd.reshape(n_docs, m).sum(1), keep.reshape(n_docs, m).sum(1)

    agree, jsd, counts = measures(np.arange(n_docs * m))
    if counts.sum() == 0:
        raise DictlabError("no positions to compare next-token predictions at (no word-aligned positions)")
    rng = np.random.default_rng(seed)
    null_agree, null_jsd = [], []
    for _ in range(permutations):
        docs = rng.permutation(n_docs)
        na, nj, nc = measures(unit_rows(docs, m))
        null_agree.append(na.sum() / max(nc.sum(), 1))
        null_jsd.append(nj.sum() / max(nc.sum(), 1))
    out = {"positions": int(counts.sum()), "vocabulary": "shared" if texts is None else "different (word-aligned)",
           "top_k": int(k), "top_k_mass_a": float(a["probs"].sum(-1)[valid].mean()),
           "top_k_mass_b": float(b["probs"].sum(-1)[valid].mean())}
    for name, per_doc, null, alternative in (("top1_agreement", agree, null_agree, "greater"),
                                             ("jsd_bits", jsd, null_jsd, "less")):
        observed, low, high = bootstrap_ratio(per_doc, counts, n_boot, level, seed)
        out[name] = {**tested(observed, null, alternative), "low": low, "high": high}
    return out
