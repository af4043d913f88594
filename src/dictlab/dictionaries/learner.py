"""Learners: the options of one `fit:` entry, which also build and fit that entry's dictionaries.

A learner module defines its Dictionary subclass and a Learner subclass whose `method` names it.
Defining the subclass registers it in LEARNERS, so the YAML schema and the pipeline find it by that
name: no code outside dictionaries/ names a method. A learner says
    sizes()                   the dictionaries one entry asks for (its K values, or an SAE sweep's members)
    folder(size)              the folder of one of them
    build(size, d_in, d_out)  one unfitted Dictionary
    fit_group(...)            fit the ones a store lacks (default: each one's `fit` on streamed batches;
                              with `shared_passes`, all sizes together and their time split evenly)
    capped(...)               the entry with its work capped, for smoke tests and --quick
and `fit_entry` runs them for one site of a store, reusing what was already fitted with the same inputs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import BeforeValidator, Field, SerializeAsAny, field_validator

from dictlab.data import distributed
from dictlab.data.io import read_json
from dictlab.data.resources import peak_memory
from dictlab.data.store import Store
from dictlab.dictionaries.base import Dictionary
from dictlab.errors import DictlabError
from dictlab.options import Strict

LEARNERS: dict[str, type[Learner]] = {}
DEFAULT_METHOD = "kmeans"  # the method of an entry that names none

NAME = Field(None, pattern=r"^[A-Za-z0-9_.]+$", description="appended to the folder names: tells apart two "
             "entries of one method that differ only in other settings")


def positive_sizes(field: str):
    """A validator for a class body (`_sizes = positive_sizes("k")`): the list is non-empty and every
    value is a positive integer."""
    def check(cls, v):
        if not v or any(k < 1 for k in v):
            raise ValueError(f"{field} must be a non-empty list of positive integers")
        return v

    return field_validator(field)(check)


class Learner(Strict):
    """One entry of the `fit:` list. Subclasses set `method` to a Literal default, which registers them."""

    method: str
    size_field: ClassVar[str | None] = None  # the list whose values are the sizes (--k, --latents; --quick's first 2)
    seeded: ClassVar[bool] = True  # fitted once per run seed (`seeds:`); False for imported dictionaries
    shared_passes: ClassVar[bool] = False  # every size is fitted in the same passes over the data
    work_field: ClassVar[str | None] = None  # the field counting the entry's work (steps, passes); None: fixed
    work_is_passes: ClassVar[bool] = False  # a unit of work reads every training row (its cost grows with them)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if "method" in cls.__dict__.get("__annotations__", {}):
            method = cls.model_fields["method"].default
            known = LEARNERS.get(method)
            if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
                raise DictlabError(f"method {method!r} is already the learner {known.__module__}.{known.__qualname__}"
                                   f"; give {cls.__qualname__} another name")
            LEARNERS[method] = cls

    def sizes(self) -> list:
        return list(getattr(self, self.size_field))

    def folder(self, size) -> str:
        raise NotImplementedError

    def build(self, size, d_in: int, d_out: int | None = None) -> Dictionary:
        raise NotImplementedError

    def check_size(self, size, train_rows: int) -> None:
        """Refuse a size the training rows cannot support (before anything is fitted)."""

    def fit_group(self, dictionaries: list[Dictionary], folders: list[Path], store: Store, site: str,
                  progress: bool, world: distributed.World | None) -> None:
        """Fit these dictionaries (all of the entry's missing sizes with `shared_passes`, else one)."""
        batches = store.source(site, "train", self.batch_size, world)
        for d in dictionaries:
            d.fit(batches, progress)

    def capped(self, steps: int, iterations: int, light: bool = False) -> Learner:
        """This entry with its work capped: at most `steps` training steps, `iterations` passes of an
        iterative fit; `light` (for --quick) also trims samples and logging."""
        return self

    def with_work(self, units: int) -> Learner:
        """This entry doing exactly `units` of its work, as a timing probe (`dictlab plan`): no early stop,
        no warm-up, no checkpoints."""
        return self if self.work_field is None else self.model_copy(update={self.work_field: units})

    def most_work(self) -> int | None:
        """The most units of its work the entry will do (`dictlab plan` scales its probes to it): the
        `work_field`'s value, or a bound where the entry stops on its own rule."""
        return None if self.work_field is None else getattr(self, self.work_field)

    def first_sizes(self, n: int) -> Learner:
        if self.size_field is None:
            return self
        return self.model_copy(update={self.size_field: getattr(self, self.size_field)[:n]})

    def folder_name(self, size) -> str:
        """The folder of one dictionary: the learner's name for the size, then the entry's `name`."""
        name = getattr(self, "name", None)
        return self.folder(size) + (f"-{name}" if name else "")

    def missing_inputs(self, store: Store, site: str, size, folder: Path, eval_only: bool) -> dict | None:
        """The inputs a dictionary's folder must record, or None when it already holds them (done).
        With `eval_only`, a folder still to do is an error."""
        inputs = {"store": store.identity, "site": site, "fit": self.model_dump(), "size": size}
        done = folder / "config.json"
        if done.exists() and read_json(done).get("inputs") == inputs:
            return None
        if eval_only:
            raise DictlabError(f"{folder} was not fitted with these settings; run without --eval-only first")
        return inputs

    def fit_entry(self, store: Store, site: str, out: Path, progress: bool = True, eval_only: bool = False,
                  suffix: str = "", world: distributed.World | None = None) -> list[Path]:
        """Fit this entry's dictionaries of one site into out/<site>/ (those not already there); returns
        every folder. With `world`, every rank calls this and fits on its shards; rank 0 saves. A
        dictionary that is not `data_parallel` (mini-batch k-means) is fitted on rank 0 alone."""
        main = distributed.is_main(world)
        target = getattr(self, "target_site", None)
        folders, todo = [], []
        for size in self.sizes():
            folder = out / site / (self.folder_name(size) + suffix)
            folders.append(folder)
            inputs = self.missing_inputs(store, site, size, folder, eval_only)
            if inputs is None:
                continue
            self.check_size(size, store.rows("train"))
            d_out = store.d_model(target) if target else None
            todo.append((self.build(size, store.d_model(site), d_out), folder, inputs))
        parallel = all(d.data_parallel for d, _, _ in todo)
        if not todo or not (parallel or main):
            return folders
        costs = self._timed_fits([d for d, _, _ in todo], [f for _, f, _ in todo], store, site, progress,
                                 world if parallel else None)
        if not main:
            return folders
        for (d, folder, inputs), cost in zip(todo, costs):
            extra = {"inputs": inputs, "site": site, "train_rows": store.rows("train"), **cost}
            if world is not None:
                extra["ranks"] = world.size
            if target:
                extra["target_site"] = target
            if hasattr(d, "history_"):
                extra["training"] = d.history_
            if getattr(d, "convergence_", None) is not None:
                extra["convergence"] = d.convergence_
            d.save(folder, extra=extra)
        return folders

    def _timed_fits(self, dictionaries: list[Dictionary], folders: list[Path], store: Store, site: str,
                    progress: bool, world: distributed.World | None) -> list[dict]:
        """Each dictionary's fit_seconds and peak memory; dictionaries fitted in shared passes share one
        peak and split the time evenly."""
        if self.shared_passes:
            start = time.perf_counter()
            with peak_memory() as memory:
                self.fit_group(dictionaries, folders, store, site, progress, world)
            seconds = (time.perf_counter() - start) / len(dictionaries)
            return [{"fit_seconds": seconds, **_prefixed(memory)}] * len(dictionaries)
        costs = []
        for d, folder in zip(dictionaries, folders):
            start = time.perf_counter()
            with peak_memory() as memory:
                self.fit_group([d], [folder], store, site, progress, world)
            costs.append({"fit_seconds": time.perf_counter() - start, **_prefixed(memory)})
        return costs


def _prefixed(memory: dict) -> dict:
    return {f"fit_{k}": v for k, v in memory.items()}


def parse_entry(value):
    """A `fit:` entry: a Learner, or a mapping whose `method` (default: kmeans) names a registered one."""
    if isinstance(value, Learner):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"a fit entry is a mapping of options, got {value!r}")
    method = value.get("method", DEFAULT_METHOD)
    if method not in LEARNERS:
        raise ValueError(f"unknown method {method!r}; accepted: {', '.join(LEARNERS)}")
    return LEARNERS[method].model_validate(value)


def learner_class(value) -> type[Learner] | None:
    """The class an entry (a mapping, as written in YAML) is validated as, or None for an unknown method."""
    return LEARNERS.get(value.get("method", DEFAULT_METHOD)) if isinstance(value, dict) else None


FitSpec = Annotated[SerializeAsAny[Learner], BeforeValidator(parse_entry)]


def fit_entries(value) -> list:
    """A `fit:` value: one entry or a list of them."""
    return [value] if isinstance(value, dict) else value


def default_fit() -> list[Learner]:
    return [LEARNERS[DEFAULT_METHOD]()]
