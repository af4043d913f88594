"""Which units move together: co-activation statistics between two dictionaries over the same tokens.

Side A (units i) and side B (units j) are dictionaries read over token-aligned rows: one store at two
sites or layers, two stores extracted from the same corpus, or one dictionary with itself (within a
layer; pairs i < j). A latent's activation is its code; a cluster's is 1 on its members. Over N tokens:

    per unit     n_i = #active, S_i = Σ a_ti, Q_i = Σ a_ti²
    per pair     C_ij = #co-active, P_ij = Σ a_ti b_tj
    Pearson      r_ij = (N P_ij − S_i S_j) / sqrt((N Q_i − S_i²)(N Q_j − S_j²))
    Jaccard      C_ij / (n_i + n_j − C_ij)
    MI (binary)  of the 2×2 table active/inactive, in nats

Only pairs active together at least once are stored (scipy sparse products of the token × unit code
matrices, summed over blocks of tokens): memory and time scale with the co-active pairs, never with
n_A × n_B. A pair never active together has r = −S_i S_j / sqrt(...), near 0 unless both units fire
on most tokens; such pairs are not edges.

The null pairs each token of A with the token N/2 rows later in B (wrapping around), so tokens come
from different documents; the same statistics on that pairing give the expected number of false
edges at any threshold, and the |r| threshold that keeps a chosen share of null pairs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse
import torch

from dictlab.dictionaries.base import Dictionary
from dictlab.errors import DictlabError

ALIGN_COLUMNS = ("token", "doc", "context", "pos")


def activity(dictionary: Dictionary, x: torch.Tensor) -> scipy.sparse.csr_matrix:
    """[N, units] sparse activations (Dictionary.unit_activity): a latent's code, or 1 for a token's cluster(s).
    The encoding runs where the dictionary is; the sparse statistics are summed on the CPU."""
    out = dictionary.unit_activity(x.to(dictionary.device, non_blocking=True))
    values, indices, active = (t.cpu() for t in out)
    rows = torch.arange(x.shape[0]).unsqueeze(1).expand_as(indices)
    return scipy.sparse.csr_matrix(
        (values[active].double().numpy(), (rows[active].numpy(), indices[active].numpy())),
        shape=(x.shape[0], dictionary.n_latents))


def aligned(a: Iterator[dict], b: Iterator[dict], what: str = "the two stores") -> Iterator[tuple[dict, dict]]:
    """Zip two streams of row batches (dicts with the ALIGN_COLUMNS), checking every row is the same
    token of the same document and context; a mismatch names the first row where they diverge."""
    offset = 0
    for x, y in itertools.zip_longest(a, b):
        if x is None or y is None or len(x["token"]) != len(y["token"]):
            raise DictlabError(f"{what} are not token-aligned: they hold different numbers of rows (from row {offset})")
        for column in ALIGN_COLUMNS:
            differ = (x[column] != y[column]).nonzero()
            if len(differ):
                row = int(differ[0])
                raise DictlabError(f"{what} are not token-aligned: at row {offset + row} their {column} differs "
                                   f"({int(x[column][row])} vs {int(y[column][row])})")
        offset += len(x["token"])
        yield x, y


@dataclass
class Pairs:
    """The statistics of every co-active pair (i, j), sorted by (i, j), and of every unit."""
    n_tokens: int
    i: np.ndarray
    j: np.ndarray
    count: np.ndarray  # C_ij
    product: np.ndarray  # P_ij
    unit_a: dict  # {"n", "sum", "sq", "max"} arrays over A's units
    unit_b: dict

    def pearson(self) -> np.ndarray:
        n = self.n_tokens
        s_a, s_b = self.unit_a["sum"][self.i], self.unit_b["sum"][self.j]
        var_a = n * self.unit_a["sq"][self.i] - s_a ** 2
        var_b = n * self.unit_b["sq"][self.j] - s_b ** 2
        with np.errstate(divide="ignore", invalid="ignore"):
            r = (n * self.product - s_a * s_b) / np.sqrt(var_a * var_b)
        return np.where((var_a > 0) & (var_b > 0), r, 0.0)

    def jaccard(self) -> np.ndarray:
        return self.count / (self.unit_a["n"][self.i] + self.unit_b["n"][self.j] - self.count)

    def mutual_information(self) -> np.ndarray:
        """MI (nats) of the active/inactive 2×2 table of each pair."""
        n = float(self.n_tokens)
        n_a, n_b = self.unit_a["n"][self.i].astype(float), self.unit_b["n"][self.j].astype(float)
        c = self.count.astype(float)
        cells = [(c, n_a, n_b), (n_a - c, n_a, n - n_b), (n_b - c, n - n_a, n_b), (n - n_a - n_b + c, n - n_a, n - n_b)]
        total = np.zeros_like(c)
        for joint, margin_a, margin_b in cells:
            with np.errstate(divide="ignore", invalid="ignore"):
                term = joint / n * np.log(joint * n / (margin_a * margin_b))
            total += np.where(joint > 0, term, 0.0)
        return total


def _unit_stats(m: scipy.sparse.csr_matrix) -> dict:
    cols, data = m.indices, m.data
    width = m.shape[1]
    peak = np.zeros(width)
    np.maximum.at(peak, cols, data)
    return {"n": np.bincount(cols, minlength=width), "sum": np.bincount(cols, data, minlength=width),
            "sq": np.bincount(cols, data * data, minlength=width), "max": peak}


def _add(total: dict | None, part: dict) -> dict:
    if total is None:
        return part
    return {"n": total["n"] + part["n"], "sum": total["sum"] + part["sum"], "sq": total["sq"] + part["sq"],
            "max": np.maximum(total["max"], part["max"])}


class _PairSums:
    """Σ over blocks of token-unit matrices of the pair products and counts ([n_a, n_b]). Sparse while the
    co-active pairs are under `dense_share` of all pairs; beyond, dense arrays (12 bytes a pair, where the
    sparse sums take ~100 bytes a co-active pair): memory is about the smaller of the two."""

    def __init__(self, dense_share: float):
        self.dense_share, self.product, self.count, self.dense = dense_share, None, None, False

    def add(self, product: scipy.sparse.csr_matrix, count: scipy.sparse.csr_matrix) -> None:
        if self.dense:
            _scatter_add(self.product, product), _scatter_add(self.count, count)
            return
        self.product = product if self.product is None else self.product + product
        self.count = count if self.count is None else self.count + count
        n_a, n_b = count.shape
        if self.count.nnz > self.dense_share * n_a * n_b:
            dense_p, dense_c = np.zeros((n_a, n_b)), np.zeros((n_a, n_b), dtype=np.int32)
            _scatter_add(dense_p, self.product), _scatter_add(dense_c, self.count)
            self.product, self.count, self.dense = dense_p, dense_c, True

    def pairs(self, same: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(i, j, count, product) of the co-active pairs in (i, j) order (i < j only when `same`)."""
        if self.dense:  # filled in place: a list of parts and their concatenation would hold the pairs twice
            blocks = [(start, self.count[start:start + 1024]) for start in range(0, self.count.shape[0], 1024)]

            def keep(start, block):
                nonzero = block != 0
                if same:
                    nonzero &= np.arange(block.shape[1]) > np.arange(start, start + len(block))[:, None]
                return nonzero

            total = sum(int(np.count_nonzero(keep(start, block))) for start, block in blocks)
            i, j = np.empty(total, np.int32), np.empty(total, np.int32)
            c, p = np.empty(total, np.int32), np.empty(total, np.float64)
            at = 0
            for start, block in blocks:  # row blocks: nonzero's int64 output stays small
                rows, cols = np.nonzero(keep(start, block))
                end = at + len(rows)
                i[at:end], j[at:end] = rows + start, cols
                c[at:end], p[at:end] = block[rows, cols], self.product[rows + start, cols]
                at = end
            return i, j, c, p
        counts, products = self.count, self.product
        counts.sort_indices(), products.sort_indices()
        if np.array_equal(counts.indptr, products.indptr) and np.array_equal(counts.indices, products.indices):
            p = products.data  # the same pairs in the same (i, j) order: the usual case
        else:  # a sum of products cancelled to an exact 0, which scipy drops: look the products up by pair
            width_b = counts.shape[1]
            p_key = _rows(products).astype(np.int64) * width_b + products.indices
            c_key = _rows(counts).astype(np.int64) * width_b + counts.indices
            where = np.searchsorted(p_key, c_key).clip(max=max(len(p_key) - 1, 0))
            p = np.where(p_key[where] == c_key, products.data[where], 0.0) if len(p_key) else np.zeros(len(c_key))
        i, j, c = _rows(counts), counts.indices.astype(np.int32), np.rint(counts.data).astype(np.int32)
        if same:
            keep = i < j
            i, j, c, p = i[keep], j[keep], c[keep], p[keep]
        return i, j, c, p


def _rows(m: scipy.sparse.csr_matrix) -> np.ndarray:
    return np.repeat(np.arange(m.shape[0], dtype=np.int32), np.diff(m.indptr))


def _scatter_add(dense: np.ndarray, m: scipy.sparse.csr_matrix) -> None:
    """dense += m, a block of rows at a time (a CSR matrix holds each (i, j) once)."""
    for start in range(0, m.shape[0], 2048):
        block = m[start:start + 2048]
        dense[_rows(block) + start, block.indices] += block.data.astype(dense.dtype)


def co_activation(batches: Iterator[tuple[scipy.sparse.csr_matrix, scipy.sparse.csr_matrix]], same: bool = False,
                  block_rows: int = 1 << 16, dense_share: float = 1 / 8, block_pairs: int = 1 << 25) -> Pairs:
    """Stream (A, B) activation batches of the same tokens; pairs with i < j only when `same`
    (a dictionary with itself). Blocks of up to `block_rows` tokens are multiplied at once, fewer when
    their products could hold more than `block_pairs` pairs (Σ over tokens of active A × active B units:
    the two block products then take at most ~12 bytes each per pair); the sums turn dense once more
    than `dense_share` of all pairs are co-active."""
    sums = _PairSums(dense_share)
    unit_a = unit_b = None
    n_tokens = 0
    pending: list[tuple] = []
    pending_rows = pending_pairs = 0

    def flush():
        nonlocal pending_rows, pending_pairs
        a = scipy.sparse.vstack([x for x, _ in pending], format="csr")
        b = scipy.sparse.vstack([y for _, y in pending], format="csr")
        on_a, on_b = a.copy(), b.copy()
        on_a.data[:], on_b.data[:] = 1.0, 1.0
        sums.add((a.T @ b).tocsr(), (on_a.T @ on_b).tocsr())
        pending.clear()
        pending_rows = pending_pairs = 0

    for a, b in batches:
        if a.shape[0] != b.shape[0]:
            raise DictlabError(f"the two sides have {a.shape[0]} and {b.shape[0]} rows in one batch")
        unit_a, unit_b = _add(unit_a, _unit_stats(a)), _add(unit_b, _unit_stats(b))
        n_tokens += a.shape[0]
        pending.append((a, b))
        pending_rows += a.shape[0]
        pending_pairs += int(np.dot(np.diff(a.indptr).astype(np.int64), np.diff(b.indptr)))
        if pending_rows >= block_rows or pending_pairs >= block_pairs:
            flush()
    if pending:
        flush()
    if sums.count is None:
        raise DictlabError("no rows to count co-activations over")
    i, j, c, p = sums.pairs(same)
    return Pairs(n_tokens, i, j, c, p, unit_a, unit_b)


def rotated(batches: Callable[[], Iterator[torch.Tensor]], n_rows: int, batch_size: int) -> Iterator[torch.Tensor]:
    """The rows of a stream starting N/2 rows in and wrapping around, in batches of `batch_size`:
    the null side, paired with the unrotated stream."""
    shift = n_rows // 2

    def rows():
        seen = 0
        for x in batches():  # rows shift.. N
            if seen + len(x) > shift:
                yield x[max(0, shift - seen):]
            seen += len(x)
        seen = 0
        for x in batches():  # rows 0.. shift
            if seen >= shift:
                break
            yield x[: shift - seen]
            seen += len(x)

    buffer, held = [], 0
    for x in rows():
        buffer.append(x)
        held += len(x)
        while held >= batch_size:
            joined = torch.cat(buffer)
            yield joined[:batch_size]
            buffer, held = [joined[batch_size:]], held - batch_size
    if held:
        yield torch.cat(buffer)


def calibrated_threshold(null_r: np.ndarray, rate: float) -> float:
    """The |r| above which a share `rate` of the null's pairs lie: on independent data, about that
    share of the real pairs lies above it too."""
    if not len(null_r):
        return 0.0
    return float(np.quantile(np.abs(null_r), 1 - rate))


def edges(pairs: Pairs, min_r: float = 0.3, min_count: int = 5) -> np.ndarray:
    """Indices (into the pairs) of the edges: |r| > min_r and at least min_count co-active tokens."""
    return np.nonzero((np.abs(pairs.pearson()) > min_r) & (pairs.count >= min_count))[0]


def binned_mutual_information(pairs: Pairs, chosen: np.ndarray, batches, bins: int = 4) -> np.ndarray:
    """MI (nats) of the binned activations of the chosen pairs: bin 0 inactive, bins 1..`bins` equal
    widths of (0, max] per unit. A second pass over the same (A, B) batches; memory: chosen × bins²."""
    keys = pairs.i[chosen].astype(np.int64) * len(pairs.unit_b["n"]) + pairs.j[chosen]  # sorted, as the pairs
    joint = np.zeros((len(chosen), bins + 1, bins + 1))
    hist_a = np.zeros((len(pairs.unit_a["n"]), bins + 1))
    hist_b = np.zeros((len(pairs.unit_b["n"]), bins + 1))

    def binned(m, peak):
        coo = m.tocoo()
        level = np.ceil(coo.data / np.maximum(peak[coo.col], 1e-30) * bins).clip(1, bins).astype(np.int64)
        return coo.row, coo.col, level

    for a, b in batches:
        rows_a, cols_a, bin_a = binned(a, pairs.unit_a["max"])
        rows_b, cols_b, bin_b = binned(b, pairs.unit_b["max"])
        np.add.at(hist_a, (cols_a, bin_a), 1)
        np.add.at(hist_b, (cols_b, bin_b), 1)
        if not len(keys):
            continue
        # every (token, i, j) co-activation, through the tokens' lists of active units on each side
        order_a, order_b = np.argsort(rows_a, kind="stable"), np.argsort(rows_b, kind="stable")
        start_b = np.searchsorted(rows_b[order_b], np.arange(a.shape[0] + 1))
        per_token = np.diff(start_b)[rows_a[order_a]]
        left = np.repeat(order_a, per_token)
        offsets = np.arange(per_token.sum()) - np.repeat(np.cumsum(per_token) - per_token, per_token)
        right = order_b[np.repeat(start_b[rows_a[order_a]], per_token) + offsets]
        key = cols_a[left].astype(np.int64) * len(pairs.unit_b["n"]) + cols_b[right]
        where = np.searchsorted(keys, key).clip(max=len(keys) - 1)
        hit = keys[where] == key
        np.add.at(joint, (where[hit], bin_a[left][hit], bin_b[right][hit]), 1)
    n = float(pairs.n_tokens)
    # the cells where one side is inactive follow from each unit's histogram
    ha, hb = hist_a[pairs.i[chosen]], hist_b[pairs.j[chosen]]
    ha[:, 0] = n - ha[:, 1:].sum(1)
    hb[:, 0] = n - hb[:, 1:].sum(1)
    joint[:, 1:, 0] = ha[:, 1:] - joint[:, 1:, 1:].sum(2)
    joint[:, 0, 1:] = hb[:, 1:] - joint[:, 1:, 1:].sum(1)
    joint[:, 0, 0] = n - joint[:, 1:, :].sum((1, 2)) - joint[:, 0, 1:].sum(1)
    p = joint / n
    outer = (ha / n)[:, :, None] * (hb / n)[:, None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p / outer), 0.0)
    return terms.sum((1, 2))


def _side_batches(store, site: str, split: str, batch_size: int):
    return store.batches(site, split, batch_size, columns=ALIGN_COLUMNS)


def build_graph(store_a, folder_a, store_b=None, folder_b=None, split: str = "eval", min_r: float = 0.3,
                min_count: int = 5, bins: int = 4, batch_size: int = 4096, progress: bool = False) -> dict:
    """The co-activation graph of dictionary A with dictionary B (default: A with itself, within its
    site) over the split: pairs, edges, the null's false edges and per-edge binned MI."""
    from pathlib import Path

    from tqdm.auto import tqdm

    from dictlab.data import distributed
    from dictlab.data.io import read_json
    from dictlab.dictionaries import load_dictionary

    store_b = store_b or store_a
    folder_a = Path(folder_a)
    folder_b = Path(folder_b) if folder_b else folder_a
    same = folder_b.resolve() == folder_a.resolve() and store_b is store_a
    site_a, site_b = (read_json(f / "config.json")["site"] for f in (folder_a, folder_b))
    device = distributed.device()
    dict_a, dict_b = load_dictionary(folder_a).on_device(device), load_dictionary(folder_b).on_device(device)
    n_rows = store_a.rows(split)
    if store_b.rows(split) != n_rows:
        raise DictlabError(f"the stores are not token-aligned: their {split} splits hold {n_rows} and "
                           f"{store_b.rows(split)} rows")

    def real():
        pairs = aligned(_side_batches(store_a, site_a, split, batch_size),
                        _side_batches(store_b, site_b, split, batch_size))
        for x, y in tqdm(pairs, desc="graph: co-activation", disable=not progress, leave=False,
                         total=-(-n_rows // batch_size)):
            yield activity(dict_a, x["x"]), activity(dict_b, y["x"])

    def null():
        shifted = rotated(lambda: store_b.batches(site_b, split, batch_size), n_rows, batch_size)
        for x, y in zip(store_a.batches(site_a, split, batch_size), shifted):
            yield activity(dict_a, x), activity(dict_b, y)

    pairs = co_activation(real(), same)
    null_pairs = co_activation(null(), same)
    chosen = edges(pairs, min_r, min_count)
    null_edges = len(edges(null_pairs, min_r, min_count))
    binned = binned_mutual_information(pairs, chosen, real(), bins)
    null_r = null_pairs.pearson()[null_pairs.count >= min_count]
    return {"pairs": pairs, "edges": chosen, "mi_binned": binned, "same": same,
            "sides": [{"dictionary": str(folder_a), "site": site_a, "kind": dict_a.unit_kind},
                      {"dictionary": str(folder_b), "site": site_b, "kind": dict_b.unit_kind}],
            "summary": {"tokens": pairs.n_tokens, "co_active_pairs": len(pairs.i), "edges": len(chosen),
                        "min_r": min_r, "min_count": min_count, "null_edges": null_edges,
                        "expected_false_edge_fraction": null_edges / len(chosen) if len(chosen) else None,
                        "threshold_for_null_rate": {str(rate): calibrated_threshold(null_r, rate)
                                                    for rate in (0.01, 0.001)}}}


def to_networkx(result: dict):
    """The edges as a networkx Graph; nodes carry side, site, layer, unit, frequency and top tokens."""
    import re

    import networkx as nx

    from dictlab.interpret.units import token_labels

    pairs, chosen = result["pairs"], result["edges"]
    graph = nx.Graph()
    sides = result["sides"][:1] if result["same"] else result["sides"]
    names = ["A", "A"] if result["same"] else ["A", "B"]
    stats = [pairs.unit_a, pairs.unit_b]
    for k, side in enumerate(sides):
        tokens = token_labels(side["dictionary"], 3)
        ends = pairs.i[chosen] if k == 0 else pairs.j[chosen]
        layer = re.match(r"L(\d+)\.", side["site"])
        for unit in np.unique(np.concatenate([ends, pairs.j[chosen]]) if result["same"] else ends).tolist():
            graph.add_node(f"{names[k]}{unit}", side=names[k], site=side["site"], unit=unit,
                           layer=int(layer.group(1)) if layer else -1,
                           frequency=float(stats[k]["n"][unit] / pairs.n_tokens), top_tokens=tokens.get(unit, ""))
    r, jaccard, mi = pairs.pearson()[chosen], pairs.jaccard()[chosen], pairs.mutual_information()[chosen]
    for e, (i, j) in enumerate(zip(pairs.i[chosen].tolist(), pairs.j[chosen].tolist())):
        graph.add_edge(f"A{i}", f"{names[1]}{j}", r=float(r[e]), weight=abs(float(r[e])), jaccard=float(jaccard[e]),
                       count=int(pairs.count[chosen][e]), mi=float(mi[e]), mi_binned=float(result["mi_binned"][e]))
    return graph


def write_graph(result: dict, out) -> dict:
    """adjacency.safetensors, edges.csv, graph.graphml, graph.json and summary.json (with the communities)
    in folder `out`; returns the summary. Its figures (heatmap.png, degree.png) are drawn by the report."""
    import csv
    import json
    from pathlib import Path

    import networkx as nx
    from safetensors.torch import save_file

    from dictlab.data.io import atomic_path, write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pairs, chosen = result["pairs"], result["edges"]
    columns = {"i": pairs.i[chosen], "j": pairs.j[chosen], "r": pairs.pearson()[chosen],
               "jaccard": pairs.jaccard()[chosen], "count": pairs.count[chosen],
               "mi": pairs.mutual_information()[chosen], "mi_binned": result["mi_binned"]}
    with atomic_path(out / "adjacency.safetensors") as tmp:
        save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in columns.items()}, str(tmp),
                  metadata={"shape": json.dumps([len(pairs.unit_a["n"]), len(pairs.unit_b["n"])]),
                            "sides": json.dumps(result["sides"])})
    a_site, b_site = result["sides"][0]["site"], result["sides"][1]["site"]
    with atomic_path(out / "edges.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["site_a", "unit_a", "site_b", "unit_b", "r", "jaccard", "count", "mi", "mi_binned"])
        for e in range(len(chosen)):
            writer.writerow([a_site, int(columns["i"][e]), b_site, int(columns["j"][e]), *(
                float(columns[k][e]) for k in ("r", "jaccard")), int(columns["count"][e]),
                float(columns["mi"][e]), float(columns["mi_binned"][e])])
    graph = to_networkx(result)
    communities = nx.community.louvain_communities(graph, weight="weight", seed=0) if len(graph) else []
    for c, members in enumerate(sorted(communities, key=len, reverse=True)):
        for node in members:
            graph.nodes[node]["community"] = c
    with atomic_path(out / "graph.graphml") as tmp:
        nx.write_graphml(graph, tmp)
    with atomic_path(out / "graph.json") as tmp:
        tmp.write_text(json.dumps(nx.node_link_data(graph, edges="edges")))
    degrees = [d for _, d in graph.degree()]
    summary = {**result["summary"], "sides": result["sides"], "nodes": len(graph),
               "communities": [len(c) for c in sorted(communities, key=len, reverse=True)],
               "max_degree": max(degrees, default=0), "mean_degree": float(np.mean(degrees)) if degrees else 0.0}
    write_json(out / "summary.json", summary)
    return summary
