"""The YAML schema of `dictlab run`, composed of each stage's own options, and of `dictlab converge`;
loading either refuses unknown keys and names the accepted ones."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from dictlab.analyses.convergence.options import ConvergeConfig
from dictlab.analyses.stages import GraphConfig, SteerConfig
from dictlab.data.controls import with_control
from dictlab.data.corpus import CorpusConfig
from dictlab.data.extract import ExtractConfig
from dictlab.dictionaries.learner import DEFAULT_METHOD, FitSpec, Learner, default_fit, fit_entries, learner_class
from dictlab.errors import DictlabError
from dictlab.interpret.stage import InterpretConfig
from dictlab.measures.evaluation import EvalConfig
from dictlab.options import Strict

__all__ = ["ConvergeConfig", "CorpusConfig", "EvalConfig", "ExperimentConfig", "ExtractConfig", "GraphConfig",
           "InterpretConfig", "SteerConfig", "explain", "load_config", "read_yaml"]


class ExperimentConfig(Strict):
    name: str = Field(description="run directory name under runs/")
    model: str = Field("gemma3-270m", description="embedded alias, local directory or hub id")
    corpus: CorpusConfig = CorpusConfig()
    extract: ExtractConfig = ExtractConfig()
    store: str | None = Field(None, description="where the activation store lives: a folder or an fsspec URL "
                              "(memory://, s3://BUCKET/..., gs://... with s3fs or gcsfs installed); default "
                              "RUNS_DIR/NAME/store")
    fit: list[FitSpec] = Field(default_factory=default_fit, description="one entry per dictionary method "
                               f"(or per setting of one); an entry without `method` is {DEFAULT_METHOD}")
    evaluate: EvalConfig = EvalConfig()
    interpret: InterpretConfig = InterpretConfig()
    graph: GraphConfig = GraphConfig()
    steer: SteerConfig = SteerConfig()
    seeds: list[int] | None = Field(None, description="fit every entry once per seed (overriding its seed): the "
                                    "report shows mean ± std; the deterministic baselines (pca, neurons) and "
                                    "imported dictionaries are fitted once")
    control: Literal["random_weights"] | None = Field(
        None, description="run on a control instead of the trained model: random_weights, the same architecture "
                          "and tokenizer with weights drawn afresh by the model's own initialisation (seeded by "
                          "control_seed); recorded in the store's spec")
    control_seed: int = Field(0, description="seed of the control's weights")
    compare_with: str | None = Field(None, description="with control: the run (a name under RUNS_DIR) on the trained "
                                     "model that this run's report sets beside it, in its Controls section")

    @property
    def model_spec(self) -> str:
        """The model the run loads: `model`, or `model+CONTROL:SEED` (data/controls.py)."""
        return with_control(self.model, self.control, self.control_seed)

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, v):
        if v is not None and (not v or len(set(v)) < len(v)):
            raise ValueError(f"seeds must be a non-empty list of distinct integers, got {v}")
        return v

    @field_validator("fit", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return fit_entries(v)

    @model_validator(mode="after")
    def _compare_with_needs_a_control(self):
        if self.compare_with is not None and self.control is None:
            raise ValueError("compare_with sets a control run beside its trained run: set control (accepted: "
                             "random_weights), or remove compare_with")
        if self.compare_with == self.name:
            raise ValueError(f"compare_with names this run ({self.name!r}): name the run on the trained model")
        return self

    @model_validator(mode="after")
    def _stability_needs_seeds(self):
        if self.evaluate.stability and len(self.seeds or []) < 2:
            raise ValueError(f"evaluate.stability compares fits of two or more seeds; seeds is {self.seeds}: set "
                             "e.g. seeds: [0, 1]")
        return self


def _model_in(annotation):
    """The config class an annotation holds (through list[...] and Optional), or the annotation itself."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if isinstance(found, type) and issubclass(found, BaseModel):
            return found
    return annotation


def _accepted(cls: type[BaseModel], loc: tuple, data) -> str:
    """The keys accepted where an unknown key sits: the schema walked along `loc`, and for a fit entry
    the learner its `method` names (read from the input `data`)."""
    model, value = cls, data
    for part in loc[:-1]:
        if isinstance(part, int):
            value = value[part] if isinstance(value, list) and part < len(value) else value if part == 0 else None
        else:
            field = model.model_fields.get(str(part)) if isinstance(model, type) else None
            model = _model_in(field.annotation) if field is not None else model
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(model, type) and issubclass(model, Learner) and isinstance(part, int):
            model = learner_class(value) or model
    return ", ".join(model.model_fields) if isinstance(model, type) else "?"


def explain(e: ValidationError, cls: type[BaseModel], where: str, data=None) -> str:
    """One line naming every problem of a config (`data`: what was validated, for unknown keys in fit entries)."""
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key {loc!r} (accepted: {_accepted(cls, err['loc'], data)})")
        elif not err["loc"]:  # a check across fields: its message names them
            lines.append(err["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"{loc}: {err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})")
    return f"{where}: " + "; ".join(lines)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise DictlabError(f"config file {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise DictlabError(f"{path}: malformed YAML{where}: {getattr(e, 'problem', None) or e}") from e
    if not isinstance(data, dict):
        raise DictlabError(f"{path}: expected a mapping of keys at the top level")
    return data


def load_config(path: str | Path, kind: type[BaseModel] | None = None):
    """An ExperimentConfig (or `kind`, e.g. ConvergeConfig) from YAML, with errors that name the bad keys."""
    kind = kind or ExperimentConfig
    data = read_yaml(path)
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        raise DictlabError(explain(e, kind, str(path), data)) from e
