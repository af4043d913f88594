"""Lloyd's algorithm for several centre sets at once, streaming batches: the engine under the k-means
dictionaries (kmeans.py).

Distances are ‖x‖² − 2·x·cᵀ + ‖c‖² by one matrix product per chunk of rows in fp32 (assignment needs
only ‖c‖² − 2·x·cᵀ; ‖x‖² is added for the inertia). Cluster sums are exact fixed-point integers,
updated after the first pass by the rows that changed cluster only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from dictlab.data import distributed
from dictlab.data.distributed import World, world_of
from dictlab.data.placement import free_bytes
from dictlab.data.precision import bfloat16_is_faster
from dictlab.dictionaries.sampling import BatchSource
from dictlab.errors import DictlabError

log = logging.getLogger(__name__)


def sq_distances(x: torch.Tensor, centers: torch.Tensor, center_sq: torch.Tensor | None = None,
                 x_sq: torch.Tensor | None = None) -> torch.Tensor:
    """[N, K] squared Euclidean distances, clamped at 0 against rounding (`x_sq`: the rows' ‖x‖² [N, 1],
    when a caller scores the same rows many times)."""
    if center_sq is None:
        center_sq = (centers * centers).sum(1)
    d = torch.addmm(center_sq, x, centers.T, alpha=-2).add_((x * x).sum(1, keepdim=True) if x_sq is None else x_sq)
    return d.clamp_min_(0)


# Rows per distance product in Lloyd: [2048, K] scores stay in cache for the argmin that follows
# (measured fastest of 1024-8192 for K = 64-1024, d = 640, on 2 cores).
CHUNK = 2048


def chunk_rows(device: torch.device, k: int) -> int:
    """Rows per distance product: CHUNK on the CPU; on a GPU as many as keep the [rows, K] scores near
    64 MB (2048 to 65536 rows), large enough for the matrix product to stay compute-bound."""
    if device.type == "cpu":
        return CHUNK
    return max(CHUNK, min(65536, (1 << 24) // max(k, 1)))


def affine_scores(weight: torch.Tensor, bias: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """x ↦ x·weightᵀ + bias in fp32: Lloyd's distance product, with the weight packed once.

    On CPU this goes through oneDNN with a prepacked weight, 1.2-1.3x faster than torch.addmm (MKL)
    on the AMD EPYC we benchmark on; the op is torch-internal (its compiler's), so when it is
    missing or fails, and on other devices, plain addmm is used. Both are fp32 products.
    """
    if weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, CHUNK)
            torch.ops.mkldnn._linear_pointwise(weight[:1], packed, bias, "none", [], "")
            return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        except (AttributeError, RuntimeError):
            pass
    return lambda x: torch.addmm(bias, x, weight.T)


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def fixed_point_bits(max_abs: torch.Tensor, rows: int) -> torch.Tensor:
    """Per column, the binary exponent s that makes rows · max|x| · 2^s ≤ 2^51: the sum of any subset
    of rows, each rounded to an integer multiple of 2^−s, is then an integer that float64 holds exactly
    (below 2^53, with room for rows in transit between clusters). Its resolution, 2^−s, is ~2^−31 of
    the column's largest value at a million rows: far finer than float32 centres can hold."""
    bound = max_abs.double().clamp_min(torch.finfo(torch.float32).tiny) * max(rows, 1)
    # at most 2^127, so that 2^s is a float32: a column below 2^-127 in every row sums to 0
    return (51 - torch.log2(bound)).floor().clamp_max(127)


class FixedPoint:
    """Rows in units of 2^−s per column (s from `fixed_point_bits`), rounded to integers held in
    float64. Scaling by 2^s is exact in float32 (a power of two, and |x·2^s| ≤ 2^51 by the choice of
    s), so the rounding runs there and only the integers are widened: 1.5x faster than the same in
    float64. Written into buffers kept between calls: a fresh multi-MB tensor per batch cost more in
    page faults than the arithmetic (measured)."""

    def __init__(self, bits: torch.Tensor, device: torch.device):
        self.unit = torch.exp2(bits.double()).to(device)  # 2^s, per column
        self.unit32 = self.unit.float()
        self.scaled = torch.empty(0, len(bits), device=device)
        self.fixed = torch.empty(0, len(bits), dtype=torch.float64, device=device)

    def __call__(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """x (or its rows `index`) in fixed point; the result is valid until the next call."""
        n = len(x) if index is None else len(index)
        if n > len(self.fixed):
            self.scaled = torch.empty(n, x.shape[1], device=x.device)
            self.fixed = torch.empty(n, x.shape[1], dtype=torch.float64, device=x.device)
        scaled = self.scaled[:n]
        if index is not None:
            x = torch.index_select(x, 0, index, out=scaled)
        torch.mul(x, self.unit32, out=scaled).round_()  # round half to even, as float64 rounding would
        return self.fixed[:n].copy_(scaled)


MAX_RECHECKED = 0.3  # a pass that recomputed more of its rows in float32 ends the bfloat16 products


class CertifiedScores:
    """Lloyd's scores x·w + b (w = −2c, b = ‖c‖²; spherical: w = −c, b = 1) by a bfloat16 product,
    certified against float32: a row keeps the bfloat16 argmin only when its gap to the runner-up
    exceeds twice the sum of the two products' error bounds, so that the float32 product would pick the
    same centre; every other row is recomputed in float32. Assignments therefore equal float32 Lloyd's
    (tested), except where float32 itself cannot tell two centres apart: a float32 product of another
    shape may round such a near-tie the other way (directions 5000 from the origin, for example).

    Bounds per score, for a row x: bfloat16 rounds x and w (2^-8 each) and the product's output
    (2^-8); float32 accumulates over d terms (d·2^-24, in both products), and adding b rounds once
    more. By Cauchy–Schwarz |x·w| ≤ ‖x‖·max‖w‖. The rest of each score comes out of the float32 row
    dot product x·w_label, so the inertia does not carry the bfloat16 error."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, exact: Callable[[torch.Tensor], torch.Tensor]):
        self.weight, self.low, self.bias, self.exact = weight, weight.bfloat16(), bias, exact
        d = weight.shape[1]
        eps = 3 * 2.0**-8 + 2 * d * 2.0**-24 + 2.0**-22
        # gap needed: 2 · (error of best + error of runner-up), with a safety factor of 2
        self.per_norm = 8 * eps * float(weight.norm(dim=1).max())
        self.constant = 8 * 2.0**-22 * float(bias.abs().max())
        self.rows = self.rechecked = 0

    def __call__(self, x: torch.Tensor, x_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(label, score of the label) of each row of the chunk x, whose norms are x_norm."""
        approx = torch.mm(x.bfloat16(), self.low.T).float() + self.bias
        two = approx.topk(2, dim=1, largest=False)
        label = two.indices[:, 0].clone()
        unsure = ((two.values[:, 1] - two.values[:, 0]) <= self.per_norm * x_norm + self.constant).nonzero().squeeze(1)
        if unsure.numel():
            label[unsure] = self.exact(x[unsure]).argmin(1)
        best = (x * self.weight[label]).sum(1) + self.bias[label]
        self.rows += len(x)
        self.rechecked += int(unsure.numel())
        return label, best


class _LloydState:
    """One centre set being fitted (one K, one restart): the assignment of every row from the last
    pass, the cluster sums and counts of that assignment, and the per-pass inertia.

    The sums are fixed-point integers held in float64 (each row times 2^s per column, rounded once;
    see `fixed_point_bits`). Sums of such integers are exact in any order, so after the first pass
    only the rows that changed cluster are moved between sums, and the sums still equal a full recount
    bitwise, in any row order and on any number of ranks. The memory this costs is one label per row.
    """

    def __init__(self, centers: torch.Tensor, spherical: bool, tol: float, fixed_point: FixedPoint,
                 bf16: bool = False):
        (k, d), device = centers.shape, centers.device
        self.centers, self.spherical, self.tol, self.fixed_point = centers, spherical, tol, fixed_point
        self.bf16 = bf16 and k > 1
        self.rows = self.rechecked = 0  # rows assigned by a bfloat16 product, and those recomputed in float32
        self.history: list[float] = []
        self.done = False
        self.labels: list[torch.Tensor] = []  # one per batch of rows, in stream order
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (labels, scores) of a batch's chunks
        self.label_dtype = torch.int16 if k <= torch.iinfo(torch.int16).max else torch.int32
        # float64, not int64: torch's index_add_ is ~10x faster on floating types (measured)
        self.sums = torch.zeros(k, d, dtype=torch.float64, device=device)
        self.counts = torch.zeros(k, dtype=torch.float64, device=device)

    def begin(self):
        (k, d), device = self.centers.shape, self.centers.device
        self.batch = 0
        self.inertia = torch.zeros(1, dtype=torch.float64, device=device)  # a tensor: no sync per chunk on a GPU
        self.far_d, self.far_x = torch.empty(0, device=device), torch.empty(0, d, device=device)
        if self.spherical:  # maximise x·c on the unit sphere; "distance" is 1 − cos
            weight, bias = -self.centers, torch.ones(k, device=device)
        else:
            weight, bias = -2 * self.centers, (self.centers * self.centers).sum(1)
        self.score = affine_scores(weight, bias)
        self.certified = CertifiedScores(weight, bias, self.score) if self.bf16 else None

    def assign(self, x: torch.Tensor, x_norm: torch.Tensor) -> None:
        """Score one chunk of rows against the centres; `add` takes the labels of a whole batch."""
        if self.certified is not None:
            self.pending.append(self.certified(x, x_norm))
            return
        score = self.score(x)
        label = score.argmin(1)  # argmin then gather: faster than min(1) over [rows, K]
        self.pending.append((label, score.gather(1, label.unsqueeze(1)).squeeze(1)))

    def add(self, x: torch.Tensor, x_sq: torch.Tensor | None, fixed: torch.Tensor | None):
        """Accumulate a batch of rows `x` assigned chunk by chunk. `fixed` is x in fixed point on the
        first pass (shared by every state); later passes convert only the rows that moved."""
        k = self.centers.shape[0]
        label, best = (torch.cat(t) for t in zip(*self.pending))
        self.pending = []
        if x_sq is not None:
            best = (best + x_sq).clamp_min_(0)
        self.inertia += best.sum(dtype=torch.float64)
        self._move(x, label, fixed)
        # keep the k rows worst served by their centre, to re-seed empty clusters with
        # (once k are kept, only rows worse than the best of them can enter)
        floor = self.far_d.min() if self.far_d.shape[0] >= k else -math.inf
        worse = (best > floor).nonzero().squeeze(1)
        if worse.numel() == 0:
            return
        top_d, top_i = torch.topk(best[worse], min(k, worse.numel()))
        self._keep_farthest(torch.cat([self.far_d, top_d]), torch.cat([self.far_x, x[worse[top_i]]]))

    def _move(self, x: torch.Tensor, label: torch.Tensor, fixed: torch.Tensor | None) -> None:
        i, self.batch = self.batch, self.batch + 1
        if not self.history:  # first pass
            self.labels.append(label.to(self.label_dtype))
            self.counts += torch.bincount(label, minlength=len(self.counts)).double()
            self.sums.index_add_(0, label, fixed)
            return
        previous = self.labels[i] if i < len(self.labels) else None
        if previous is None or previous.shape != label.shape:
            raise DictlabError("the data source gave different rows on a later pass; k-means needs the same "
                               "rows in the same order on every pass")
        moved = (label != previous).nonzero().squeeze(1)
        if moved.numel() == 0:
            return
        into, out_of = label[moved], previous[moved].long()
        rows = self.fixed_point(x, moved)
        self.sums.index_add_(0, into, rows).index_add_(0, out_of, rows, alpha=-1)
        one = torch.ones(len(into), dtype=torch.float64, device=into.device)
        self.counts.index_add_(0, into, one).index_add_(0, out_of, one, alpha=-1)
        previous[moved] = label[moved].to(self.label_dtype)

    def _keep_farthest(self, far_d: torch.Tensor, far_x: torch.Tensor) -> None:
        """Of these candidate rows and their distances, keep the k worst served."""
        k = self.centers.shape[0]
        if far_d.shape[0] > k:
            far_d, idx = torch.topk(far_d, k)
            far_x = far_x[idx]
        self.far_d, self.far_x = far_d, far_x

    def end(self, world: World | None) -> bool:
        """Move the centres (after summing every rank's accumulators); returns True once converged."""
        if self.certified is not None:
            self.rows, self.rechecked = self.rows + self.certified.rows, self.rechecked + self.certified.rechecked
            # the recheck costs a float32 product per row it recomputes: past this share bf16 cannot pay
            self.bf16 = self.certified.rechecked <= MAX_RECHECKED * self.certified.rows
        sums, counts = self.sums, self.counts
        if world is not None:  # the local sums live on: reduce copies
            sums, counts = world.sum(sums.clone()), world.sum(counts.clone())
            world.sum(self.inertia)
            self._keep_farthest(world.cat(self.far_d), world.cat(self.far_x))
        self.history.append(float(self.inertia))  # of the assignment to the centres before this update
        empty = counts == 0
        new = (sums / self.fixed_point.unit / counts.clamp_min(1).unsqueeze(1)).float()
        if empty.any():
            order = torch.argsort(self.far_d, descending=True)
            new[empty] = self.far_x[order[: int(empty.sum())]]
            log.info("k-means K=%d: re-seeded %d empty clusters", len(new), int(empty.sum()))
        self.centers = normalize_rows(new) if self.spherical else new
        h = self.history
        self.done = len(h) > 1 and h[-2] - h[-1] <= self.tol * abs(h[-2]) and not empty.any()
        return self.done


def lloyd(source: BatchSource, inits: list[torch.Tensor], max_iter: int, tol: float, max_abs: torch.Tensor,
          rows: int, spherical: bool = False, progress: bool = True, shift: torch.Tensor | None = None,
          bf16: bool | None = None, cache_bytes: int | None = None) -> list[_LloydState]:
    """Lloyd iterations for several centre sets at once: each pass over the data serves them all.

    With `shift`, the rows are x − shift (and `inits` and the returned centres are in that frame).
    `max_abs` (per column, of the unshifted rows) and `rows` (of all ranks), as `scan` gives them,
    bound the fixed-point sums. For a RankSource, each pass sums every rank's
    accumulators before the centres move. The work runs where `inits` are (each batch is copied there).

    When this rank's rows, shifted, fit in `cache_bytes` (default: a quarter of the free memory where
    the work runs), the first pass keeps them with their norms and the later passes replay them: no
    reading, converting, shifting or norms again, only the distance products and the rows that move.
    """
    world = world_of(source)
    device = inits[0].device
    d = inits[0].shape[1]
    bound = torch.ones(d) if spherical else max_abs.cpu().double() + (0 if shift is None else shift.cpu().abs())
    fixed_point = FixedPoint(fixed_point_bits(bound, rows), device)
    chunk = chunk_rows(device, max(len(c) for c in inits))
    if bf16 is None:  # bfloat16 products with a float32 recheck only where they are measured faster
        bf16 = bfloat16_is_faster(str(device))
    if cache_bytes is None:
        cache_bytes = free_bytes(device) // 4
    cache = [] if -(-rows // (world.size if world else 1)) * (d + 2) * 4 <= cache_bytes else None
    states = [_LloydState(c, spherical, tol, fixed_point, bf16) for c in inits]
    desc = ("spherical " if spherical else "") + "k-means K=" + ",".join(str(len(c)) for c in inits)
    bar = tqdm(total=max_iter, desc=desc, disable=not progress or not distributed.is_main(world),
               dynamic_ncols=True, leave=False)
    row_buffer, norm_buffer = torch.empty(0, d, device=device), torch.empty(0, device=device)  # when not kept
    for iteration in range(max_iter):
        active = [s for s in states if not s.done]
        if not active:
            break
        for s in active:
            s.begin()
        n = 0
        replay = cache is not None and iteration > 0
        for batch in cache if replay else source():
            if replay:
                shifted, norms, squares = batch
                for i in range(0, len(shifted), chunk):
                    for s in active:
                        s.assign(shifted[i: i + chunk], norms[i: i + chunk])
            else:
                shifted, norms = _prepared(batch.to(device, non_blocking=True), shift, spherical, chunk, active,
                                           (row_buffer, norm_buffer) if cache is None else None)
                if cache is None and len(shifted) > len(row_buffer):  # a larger batch: keep its buffers
                    row_buffer, norm_buffer = shifted, norms
                squares = None if spherical else norms.square()
                if cache is not None:
                    cache.append((shifted, norms, squares))
            fixed = fixed_point(shifted) if iteration == 0 else None
            n += len(shifted)
            for s in active:
                s.add(shifted, squares, fixed)
        if world is not None:
            n = int(world.total(n))
        for s in active:
            s.end(world)
        bar.update(1)
        bar.set_postfix(inertia="/".join(f"{s.history[-1] / max(n, 1):.4g}" for s in states), refresh=False)
    bar.close()
    return states


def _prepared(batch: torch.Tensor, shift: torch.Tensor | None, spherical: bool, chunk: int,
              states: list[_LloydState], buffers: tuple | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows as Lloyd sees them: shifted, or on the unit sphere; their norms, or ones when spherical), scored
    chunk by chunk against every state while each chunk is in cache. `buffers` (rows, norms) are reused
    when they are large enough; without them (the rows are kept for later passes) new ones are made."""
    d, device = batch.shape[1], batch.device
    if buffers is not None and len(buffers[0]) >= len(batch):
        shifted, norms = buffers[0][: len(batch)], buffers[1][: len(batch)]
    else:
        shifted, norms = torch.empty(len(batch), d, device=device), torch.empty(len(batch), device=device)
    for i in range(0, len(batch), chunk):
        x, out = batch[i: i + chunk], shifted[i: i + chunk]
        x = torch.sub(x, shift, out=out) if shift is not None else out.copy_(x)
        norm = torch.linalg.vector_norm(x, dim=1, out=norms[i: i + chunk])
        if spherical:
            x.div_(norm.clamp_min(1e-12).unsqueeze(1))
            norm.fill_(1.0)
        for s in states:
            s.assign(x, norm)
    return shifted, norms
