"""The options of `dictlab converge` (the whole of its YAML): the models, the text they read, and each level
of the comparison."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from dictlab.data.corpus import CorpusConfig
from dictlab.dictionaries.learner import FitSpec, fit_entries
from dictlab.options import Strict

LABEL = r"^[A-Za-z0-9_.-]+$"


class ConvergeModel(Strict):
    """One model of a convergence run."""
    name: str = Field(pattern=LABEL, description="its label in tables and folders")
    model: str = Field(description="embedded alias, local directory or hub id")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute dtype of the forward passes (the next-token head runs in float32); auto: "
                            "bfloat16 with CUDA, else whichever of float32 and bfloat16 a short forward finds faster")
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1, description="resid_post layers "
                                                             "of the representational sweep (default: all)")
    dictionary_layer: int | None = Field(None, ge=0, description="the layer whose resid_post the dictionaries are "
                                         "fitted on (none: no dictionary level for this model)")
    start_token: str | None = Field(None, description="the token each context and plain prompt starts with "
                                    "(default: BOS)")
    chat: bool = Field(False, description="prompts go through the tokenizer's chat template (instruct models)")
    fit: list[FitSpec] | None = Field(None, description="this model's dictionaries (default: dictionaries.fit)")

    @field_validator("fit", mode="before")
    @classmethod
    def _fit_list(cls, v):
        return fit_entries(v) if v is not None else v


class ConvergeText(Strict):
    """The held-out text every model reads (data/paired_text.py)."""
    documents: int = Field(128, ge=4, description="eval documents compared")
    positions: int = Field(32, ge=2, description="aligned positions per document (every measure uses the same)")
    context_length: int = Field(128, ge=8, description="tokens per context, start token included, for every model")
    batch_size: int = Field(8, ge=1, description="contexts per forward pass")


class ConvergeRepresentation(Strict):
    enabled: bool = True
    metrics: list[Literal["cka", "svcca", "knn", "rsa", "cosine"]] = Field(
        default_factory=lambda: ["cka", "svcca", "knn", "rsa", "cosine"], min_length=1,
        description="cosine only for pairs that share a residual space")
    positions: int | None = Field(None, ge=2, description="the first N of each document's positions in the sweep "
                                  "(default: all text.positions)")
    knn_k: int = Field(10, ge=1)
    rsa_positions: int = Field(8, ge=1, description="positions per document in RSA's distance matrices")
    svcca_keep: float = Field(0.99, gt=0, le=1, description="variance share of SVCCA's principal subspaces")


class ConvergeBehaviour(Strict):
    enabled: bool = True
    suites: list[str] = Field(default_factory=lambda: ["truthfulness", "safety", "instruction_following",
                                                       "uncertainty", "context"], description="built-in suites")
    prompt_files: list[str] = Field(default_factory=list, description=".txt (a prompt a line) or .jsonl "
                                    "({prompt, suite}) files")
    prompts_per_suite: int | None = Field(None, ge=2, description="at most this many prompts of each suite")
    new_tokens: int = Field(48, ge=1)
    temperature: float = Field(0.7, ge=0, description="sampling temperature (0: greedy)")
    top_p: float = Field(0.95, gt=0, le=1)
    seed: int = 0
    top_k_tokens: int = Field(64, ge=1, description="next-token outcomes kept per position for the JSD")


class ConvergeDictionaries(Strict):
    fit: list[FitSpec] = Field(default_factory=list, description="fitted on each model's dictionary_layer "
                               "(entries of the `fit:` list of dictlab run; their site is set per model)")
    train_tokens: int = Field(100_000, ge=1, description="training rows extracted per model")
    threshold: float = Field(0.5, gt=-1, lt=1, description="a unit is matched when its r exceeds this")
    min_active: int = Field(5, ge=1, description="units active on fewer aligned tokens are left out")
    examples: int = Field(5, ge=0, description="matched and unmatched units shown with their contexts")
    shared: bool = Field(True, description="where two models share a residual space, apply A's dictionaries to B")

    @field_validator("fit", mode="before")
    @classmethod
    def _fit_list(cls, v):
        return fit_entries(v)


class ConvergeStatistics(Strict):
    permutations: int = Field(200, ge=1, description="document shufflings behind every null and p-value")
    half_samples: int = Field(50, ge=2, description="half-samples of documents behind the intervals of the "
                              "representational sweep")
    bootstrap: int = Field(1000, ge=10, description="bootstrap resamples for the other intervals")
    level: float = Field(0.95, gt=0, lt=1, description="confidence level of every interval")
    fdr: float = Field(0.05, gt=0, lt=1, description="Benjamini–Hochberg false discovery rate across all tests")
    seed: int = 0


class ConvergeConfig(Strict):
    """`dictlab converge`: do two (or more) models learn the same things? (run.py)"""
    name: str = Field(description="run directory name under runs/")
    corpus: CorpusConfig = CorpusConfig()
    models: list[ConvergeModel] = Field(min_length=2)
    pairs: list[Annotated[list[str], Field(min_length=2, max_length=2)]] | None = Field(
        None, description="[A, B] model names to compare (default: every pair, in order)")
    text: ConvergeText = ConvergeText()
    representation: ConvergeRepresentation = ConvergeRepresentation()
    behaviour: ConvergeBehaviour = ConvergeBehaviour()
    dictionaries: ConvergeDictionaries = ConvergeDictionaries()
    statistics: ConvergeStatistics = ConvergeStatistics()

    @model_validator(mode="after")
    def _consistent(self):
        names = [m.name for m in self.models]
        if len(set(names)) < len(names):
            raise ValueError(f"model names must differ, got {names}")
        for a, b in self.pairs or []:
            for n in (a, b):
                if n not in names:
                    raise ValueError(f"pair [{a}, {b}] names {n!r}, not a model (models: {', '.join(names)})")
            if a == b:
                raise ValueError(f"pair [{a}, {b}] compares a model with itself")
        r = self.representation
        if r.positions is not None and r.positions > self.text.positions:
            raise ValueError(f"representation.positions ({r.positions}) exceeds text.positions ({self.text.positions})")
        if r.rsa_positions > (r.positions or self.text.positions):
            raise ValueError(f"representation.rsa_positions ({r.rsa_positions}) exceeds the positions per document")
        return self

    def model(self, name: str) -> ConvergeModel:
        return next(m for m in self.models if m.name == name)

    def model_pairs(self) -> list[tuple[str, str]]:
        if self.pairs:
            return [(a, b) for a, b in self.pairs]
        names = [m.name for m in self.models]
        return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
