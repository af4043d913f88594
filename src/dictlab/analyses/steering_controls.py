"""What a steered unit is compared with: pushes of the same norm along other directions.

    random     a random direction (seeded by the unit): does the unit's direction matter at all?
    diffmean   the difference between the mean activation on the tokens where the unit is active and on
               those where it is not (AxBench, Wu et al. 2025, found this a strong steering baseline): does
               the dictionary's direction do better than the plainest supervised one?

Both are added at every position but BOS, scaled to the norm of the unit's own push |α·m_j|·‖d_j‖.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from dictlab.data.lm import Edit, parse_site
from dictlab.dictionaries.base import Dictionary
from dictlab.errors import DictlabError
from dictlab.measures.downstream import keep_bos


def check_unit(dictionary: Dictionary, unit: int) -> None:
    if not 0 <= unit < dictionary.n_latents:
        raise DictlabError(f"unit {unit} is out of range: the dictionary has {dictionary.n_latents} units "
                           f"(0 to {dictionary.n_latents - 1})")


def _push(dictionary: Dictionary, site: str, unit: int, alpha: float, direction: torch.Tensor) -> Edit:
    """Add `direction`, rescaled to the norm of the unit's push α·d_j (and α's sign), at every position."""
    check_unit(dictionary, unit)
    direction = direction.to(dictionary.device).float()
    vector = direction * (alpha * dictionary.directions[unit].float().norm() / direction.norm())
    where = parse_site(site)
    return Edit(where, where, keep_bos(lambda read, current: current + vector))


def random_edit(dictionary: Dictionary, site: str, unit: int, alpha: float, seed: int = 0) -> Edit:
    """The control for adding α·d_j: adding a random direction of the same norm (seeded by unit)."""
    check_unit(dictionary, unit)
    g = torch.Generator().manual_seed(seed * 1_000_003 + unit)
    direction = torch.randn(dictionary.directions.shape[1], generator=g)  # the same on any device
    return _push(dictionary, site, unit, abs(alpha), direction)


def diffmean_edit(dictionary: Dictionary, site: str, unit: int, alpha: float, direction: torch.Tensor) -> Edit:
    """Adding the unit's DiffMean direction (`diffmean_directions`) with the norm of its push α·d_j."""
    return _push(dictionary, site, unit, alpha, direction)


@torch.no_grad()
def diffmean_directions(dictionary: Dictionary, batches: Iterable[torch.Tensor], units: list[int]) -> dict:
    """unit -> mean(x where the unit is active) − mean(x where it is not), over the rows of `batches`
    (float64 sums about the first batch's mean, so they do not cancel far from the origin); None for a
    unit active on every row or on none, which has no DiffMean."""
    for unit in units:
        check_unit(dictionary, unit)
    chosen = torch.tensor(units, dtype=torch.long)
    shift, total, n, active_sum, active_n = None, None, 0, None, None
    for x in batches:
        _, unit_ids, active = dictionary.unit_activity(x.float())
        # [N, len(units)]: whether each chosen unit is active on each row
        hit = ((unit_ids[:, :, None] == chosen.to(unit_ids.device)) & active[:, :, None]).any(1).double()
        x = x.double()
        if shift is None:
            shift = x.mean(0)
            total, active_sum = torch.zeros_like(shift), torch.zeros(len(units), len(shift), dtype=torch.float64,
                                                                       device=x.device)
            active_n = torch.zeros(len(units), dtype=torch.float64, device=x.device)
        centred = x - shift
        total += centred.sum(0)
        n += len(x)
        active_sum += hit.T @ centred
        active_n += hit.sum(0)
    if shift is None:
        raise DictlabError("DiffMean needs rows: the batches were empty")
    out = {}
    for i, unit in enumerate(units):
        on = int(active_n[i])
        out[unit] = None if on in (0, n) else (active_sum[i] / on - (total - active_sum[i]) / (n - on)).float().cpu()
    return out
