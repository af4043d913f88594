"""Fit every entry of a `fit:` list over a store: one dictionary per (entry, site, size[, seed]).

    <out>/<site>/<folder>/    one fitted dictionary (weights.safetensors, config.json with its inputs)

A dictionary whose folder already records the same inputs is reused, so an interrupted fit resumes.
"""

from __future__ import annotations

from pathlib import Path

from dictlab.data import distributed
from dictlab.data.store import Store
from dictlab.dictionaries.learner import Learner
from dictlab.errors import DictlabError


def fit_dictionaries(store: Store, specs: list[Learner], out: Path, progress: bool = True, eval_only: bool = False,
                     seeds: list[int] | None = None, world: distributed.World | None = None) -> list[Path]:
    """Fit one dictionary per (entry, site, size[, seed]); a saved one with the same inputs is reused.

    Lloyd and spherical k-means fit all their K in shared passes over the store; the SAEs of one entry
    (its widths, and the k or coefficients it sweeps) train together on each batch. With `seeds`,
    every seeded entry is fitted once per seed, into folders ending in -s<seed>. With `eval_only`,
    nothing is fitted: a dictionary these settings did not produce yet is an error. With `world`,
    every rank calls this and fits on its shards; rank 0 saves.
    """
    writers = {}
    for i, spec in enumerate(specs):
        for s in (getattr(spec, "site", None), getattr(spec, "target_site", None)):
            if s is not None and s not in store.sites:
                raise DictlabError(f"site {s!r} is not in the store; it holds: {', '.join(store.sites)}")
        for site in _sites(spec, store.sites):
            for size in spec.sizes():
                where = f"{site}/{spec.folder_name(size)}"
                if writers.setdefault(where, i) != i:
                    raise DictlabError(f"fit entries {writers[where]} and {i} (counting from 0) both write {where}: "
                                       "give one of them a `name:`")
    folders = []
    for spec in specs:
        for seed in _seeds(spec, seeds):
            seeded = spec if seed is None else spec.model_copy(update={"seed": seed})
            for site in _sites(spec, store.sites):
                folders += seeded.fit_entry(store, site, Path(out), progress, eval_only, _suffix(seed), world)
    return folders


def planned_folders(specs: list[Learner], sites: list[str], seeds: list[int] | None = None) -> dict[str, str | None]:
    """SITE/FOLDER of every dictionary `fit_dictionaries` will write for a store of these sites, known
    before anything runs, each with the site it reconstructs when that is another one (a transcoder)."""
    names = {}
    for spec in specs:
        for site in _sites(spec, sites):
            for size in spec.sizes():
                for seed in _seeds(spec, seeds):
                    names[f"{site}/{spec.folder_name(size)}{_suffix(seed)}"] = getattr(spec, "target_site", None)
    return names


def _sites(spec: Learner, available) -> list[str]:
    """The sites an entry is fitted on: its own `site`, or every site of the store."""
    only = getattr(spec, "site", None)
    return [only] if only else list(available)


def _seeds(spec: Learner, seeds: list[int] | None) -> list[int | None]:
    """The run's seeds for a seeded entry; [None] (its own seed) otherwise."""
    return (seeds if spec.seeded else None) or [None]


def _suffix(seed: int | None) -> str:
    return "" if seed is None else f"-s{seed}"
