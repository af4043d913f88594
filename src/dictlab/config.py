"""Typed experiment configs, loaded from YAML; unknown keys are errors that name the accepted ones."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dictlab.errors import DictlabError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CorpusConfig(Strict):
    source: str = Field("embedded", description="'embedded', 'hub:NAME', or a local file/folder")
    field: str = Field("text", description="JSON/parquet field holding the text")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="fraction of documents held out for eval")
    seed: int = Field(0, description="seed of the document split")


class ExtractConfig(Strict):
    layers: list[int] = Field(default_factory=lambda: [8])
    sites: list[str] = Field(default_factory=lambda: ["resid_post"], description="site kinds or full site names")
    context_length: int = Field(128, ge=2)
    batch_size: int = Field(16, ge=1, description="contexts per forward pass")
    batches_per_shard: int = Field(16, ge=1, description="a shard holds this many batches")
    train_tokens: int = Field(200_000, ge=1, description="stored rows wanted in the train split")
    eval_tokens: int = Field(20_000, ge=1, description="stored rows wanted in the eval split")
    model_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    store_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    include_bos: bool = Field(False, description="store BOS positions too (their norm is ~10x the rest)")
    start_token: str | None = Field(None, description="the token that starts each context (default: the "
                                    "tokenizer's BOS), e.g. <|endoftext|> for SmolLM2, whose BOS is a chat token")
    stop_early: bool = Field(True, description="stop the forward pass after the deepest hooked layer")


NAME = Field(None, pattern=r"^[A-Za-z0-9_.]+$", description="appended to the folder names: tells apart two "
             "entries of one method that differ only in other settings")


class _FitCommon(Strict):
    k: list[int] = Field(default_factory=lambda: [64, 128, 256], description="cluster counts")
    name: str | None = NAME
    site: str | None = Field(None, description="fit on this site only (default: every site of the store)")
    max_iter: int = Field(100, ge=1)
    tol: float = Field(1e-4, ge=0, description="stop when inertia improves by less than this fraction")
    seed: int = 0
    batch_size: int = Field(8192, ge=1, description="rows per streamed batch")
    init_sample: int = Field(20_000, ge=1, description="rows k-means++ seeds from")

    @field_validator("k")
    @classmethod
    def _positive(cls, v):
        if not v or any(k < 1 for k in v):
            raise ValueError("k must be a non-empty list of positive integers")
        return v

    def sizes(self) -> list[int]:
        return self.k

    def folder(self, k: int) -> str:
        return f"{self.method}-k{k}"


class KMeansFit(_FitCommon):
    """Lloyd k-means; all K (and n_init restarts) share each pass over the store."""

    method: Literal["kmeans"] = "kmeans"
    n_init: int = Field(1, ge=1, description="k-means++ restarts; the lowest inertia wins")


class SphericalKMeansFit(KMeansFit):
    """Cosine k-means on unit-normalised rows."""

    method: Literal["spherical_kmeans"] = "spherical_kmeans"


class MiniBatchKMeansFit(_FitCommon):
    """Mini-batch k-means over shuffled store batches, for data that does not fit in RAM."""

    method: Literal["minibatch_kmeans"] = "minibatch_kmeans"
    epochs: int = Field(2, ge=1, description="passes over the train split")
    batch_size: int = Field(4096, ge=1)


class ResidualKMeansFit(_FitCommon):
    """L stages of k-means, each on the residual of the previous ones (L0 = stages)."""

    method: Literal["residual_kmeans"] = "residual_kmeans"
    stages: int = Field(2, ge=1)

    def folder(self, k: int) -> str:
        return f"{self.method}-L{self.stages}-k{k}"


class _EMCommon(_FitCommon):
    k: list[int] = Field(default_factory=lambda: [64])
    tol: float = Field(1e-3, ge=0, description="stop when the log-likelihood per row improves by less")
    reg_covar: float = Field(1e-6, gt=0, description="added to every variance, and its floor")
    init_iter: int = Field(10, ge=1, description="k-means iterations of the init")


class GMMFit(_EMCommon):
    """Gaussian mixture by EM, k-means initialised."""

    method: Literal["gmm"] = "gmm"
    covariance: Literal["diag", "spherical"] = "diag"

    def folder(self, k: int) -> str:
        return f"gmm-{self.covariance}-k{k}"


class MPPCAFit(_EMCommon):
    """Mixture of probabilistic PCA: each component a rank-q subspace plus isotropic noise."""

    method: Literal["mppca"] = "mppca"
    q: int = Field(4, ge=1, description="rank of each component's subspace")

    def folder(self, k: int) -> str:
        return f"mppca-q{self.q}-k{k}"


class SAEFit(Strict):
    """A sparse autoencoder (or, with target_site, a transcoder) trained on shuffled store batches."""

    method: Literal["sae"] = "sae"
    rule: Literal["topk", "batchtopk", "relu", "jumprelu"] = "topk"
    name: str | None = NAME
    latents: list[int] = Field(default_factory=lambda: [4096], description="dictionary widths")
    k: int | list[int] = Field(32, description="active latents per row (topk, batchtopk); a list sweeps it")
    matryoshka: list[int] | None = Field(None, description="nested prefix sizes (the full width is added)")
    site: str | None = Field(None, description="input site (default: every site of the store)")
    target_site: str | None = Field(None, description="transcoder: the site to reconstruct")
    l1_coeff: float | list[float] = Field(1e-3, description="relu: L1 penalty, scaled by decoder norms; a list "
                                          "sweeps it")
    l0_coeff: float | list[float] = Field(1e-3, description="jumprelu: L0 penalty; a list sweeps it")
    bandwidth: float = Field(1e-3, gt=0, description="jumprelu: width of the pseudo-derivative's kernel")
    jumprelu_init: float = Field(1e-3, gt=0, description="jumprelu: initial threshold")
    tied: bool = False
    normalize_decoder: bool = True
    aux_k: int = Field(512, ge=1)
    aux_alpha: float = Field(1 / 32, ge=0)
    dead_tokens: int = Field(10_000_000, ge=1, description="a latent silent this long counts as dead")
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(4096, ge=1)
    lr: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(100, ge=0)
    decay_start: float = Field(0.8, ge=0, le=1, description="fraction of steps after which the LR decays to 0")
    sparsity_warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0
    checkpoint_every: int = Field(500, ge=0, description="steps between checkpoints (0: none)")
    shard_latents: bool = Field(False, description="under torchrun, split the latents across the ranks instead "
                                "of the batch (each rank holds 1/N of them and reads every batch): for SAEs too "
                                "wide for one device; one process ignores it")
    gpu_bf16: bool = Field(True, description="on a GPU, train under bfloat16 autocast (matrix products in "
                           "bf16; parameters, Adam and the losses in float32); the CPU always trains in float32")
    log_every: int = Field(100, ge=1, description="steps between logged metrics (console, TensorBoard)")
    wandb_project: str | None = Field(None, description="also log to this Weights & Biases project")

    @field_validator("latents", "k", "l1_coeff", "l0_coeff")
    @classmethod
    def _in_range(cls, v, info):
        counts = info.field_name in ("latents", "k")
        values = v if isinstance(v, list) else [v]
        if not values or any(x < (1 if counts else 0) for x in values):
            what = "a positive integer" if counts else "a number >= 0"
            raise ValueError(f"{info.field_name} must be {what} or a non-empty list of them")
        if len(set(values)) < len(values):
            raise ValueError(f"{info.field_name} lists a value twice: {values}")
        return v

    @model_validator(mode="after")
    def _sweeps_fit_the_rule(self):
        swept = {"k": ("topk", "batchtopk"), "l1_coeff": ("relu",), "l0_coeff": ("jumprelu",)}
        for name, rules in swept.items():
            if isinstance(getattr(self, name), list) and self.rule not in rules:
                raise ValueError(f"a list of {name} sweeps rule {' or '.join(rules)}, not {self.rule}")
        return self

    def sizes(self) -> list[dict]:
        """The sweep: one SAE per width and value of k / l1_coeff / l0_coeff; all train on each batch."""
        as_list = lambda v: v if isinstance(v, list) else [v]  # noqa: E731
        return [{"latents": n, "k": k, "l1_coeff": l1, "l0_coeff": l0} for n in self.latents
                for k in as_list(self.k) for l1 in as_list(self.l1_coeff) for l0 in as_list(self.l0_coeff)]

    def folder(self, member: dict) -> str:
        name = f"{'transcoder' if self.target_site else 'sae'}-{self.rule}"
        name += "-matryoshka" if self.matryoshka else ""
        name += f"-n{member['latents']}" + (f"-k{member['k']}" if self.rule in ("topk", "batchtopk") else "")
        for key, tag in (("l1_coeff", "l1"), ("l0_coeff", "l0")):
            if isinstance(getattr(self, key), list):
                name += f"-{tag}_{member[key]:g}"
        return name


class PretrainedFit(Strict):
    """Published SAEs (Gemma Scope, SAELens folders, dictlab folders), imported as rows of the comparison."""

    method: Literal["pretrained"] = "pretrained"
    site: str = Field(description="the site the SAEs read (and, without target_site, reconstruct)")
    target_site: str | None = Field(None, description="for transcoders: the site they reconstruct")
    sources: list[str] = Field(min_length=1, description="each: hub:OWNER/REPO/PATH, a params.npz, or a folder")
    required: bool = Field(False, description="fail when a source cannot be loaded (default: skip it, warning)")

    def sizes(self) -> list[str]:
        return self.sources

    def folder(self, source: str) -> str:
        tail = "-".join(Path(source.removeprefix("hub:")).parts[-3:]).removesuffix(".npz")
        return "pretrained-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", tail)


FIT_METHODS = {c.model_fields["method"].default: c for c in
               (KMeansFit, SphericalKMeansFit, MiniBatchKMeansFit, ResidualKMeansFit, GMMFit, MPPCAFit, SAEFit,
                PretrainedFit)}
FitSpec = Annotated[
    Union[KMeansFit, SphericalKMeansFit, MiniBatchKMeansFit, ResidualKMeansFit, GMMFit, MPPCAFit, SAEFit,
          PretrainedFit],
    Field(discriminator="method"),
]


class EvalConfig(Strict):
    batch_size: int = Field(4096, ge=1)
    cluster_sample: int = Field(10_000, ge=2, description="eval rows for silhouette, Calinski-Harabasz, "
                                "Davies-Bouldin (their pairwise distances are held in memory: n² floats)")
    seed: int = Field(0, description="seed of the cluster-quality sample")
    ce_contexts: int = Field(32, ge=0, description="eval contexts for the CE loss with reconstructions spliced "
                             "in (0: skip)")
    ce_batch_size: int = Field(4, ge=1, description="contexts per forward pass of the CE evaluation")


class InterpretConfig(Strict):
    """The interpretation stage of `dictlab run` (after evaluation): unit cards and interpretability scores."""
    enabled: bool = Field(True, description="interpret every dictionary of the run")
    split: Literal["eval", "train"] = Field("eval", description="store rows the examples come from")
    n_top: int = Field(20, ge=1, description="top examples per unit (most typical members for clusters)")
    per_interval: int = Field(5, ge=0, description="random examples from each fifth of a latent's activation range")
    logit_lens: bool = Field(True, description="top and bottom tokens of each direction through the unembedding")
    coherence: bool = Field(True, description="context coherence z-score (all-MiniLM-L6-v2, the [interpret] "
                            "extra; skipped with a note when missing)")
    splitting: bool = Field(True, description="parent -> children across the widths of each entry")
    absorption: bool = Field(True, description="first-letter absorption rate of each latent dictionary")
    absorption_rows: int = Field(50_000, ge=100, description="rows of the split read for absorption, at most")
    explainer_url: str | None = Field(None, description="OpenAI-compatible endpoint for explanations and "
                                      "detection scores (default: $DICTLAB_EXPLAINER_URL; none: skipped)")
    explainer_model: str = Field("gpt-4o-mini", description="model name sent to the endpoint")
    explain_units: int = Field(50, ge=0, description="explain the first N units that fire, per dictionary")


DICTIONARY_NAME = r"^[^/]+/[^/]+$"


class GraphConfig(Strict):
    """Co-activation graphs in `dictlab run` (after interpretation): graph.py."""
    dictionaries: list[Annotated[str, Field(pattern=DICTIONARY_NAME)]] = Field(
        default_factory=list, description="dictionaries of the run as SITE/FOLDER (e.g. L8.resid_post/"
        "sae-topk-n1024-k32): a within-site graph of each, and a cross graph of each with the next one")
    split: Literal["eval", "train"] = Field("eval", description="store rows to count over")
    min_r: float = Field(0.3, ge=0, lt=1, description="an edge needs |Pearson r| above this")
    min_count: int = Field(5, ge=1, description="and at least this many co-active tokens")
    bins: int = Field(4, ge=1, description="activation bins per unit for the binned mutual information")


class SteerConfig(Strict):
    """The steering comparison in `dictlab run` (after the graphs): steer.py."""
    dictionary: str | None = Field(None, pattern=DICTIONARY_NAME, description="SITE/FOLDER of the dictionary "
                                   "steered (none: no steering); its within-site graph picks the held neighbours")
    downstream: str | None = Field(None, pattern=DICTIONARY_NAME, description="SITE/FOLDER of a dictionary at a "
                                   "later site: downstream drift, and the units linked by the cross graph")
    units: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, min_length=1, description="units to steer and ablate (default: the n_units with the most edges in the within-site "
        "graph; without edges, the largest mean codes)")
    n_units: int = Field(3, ge=1, description="units picked when `units` is not given")
    alphas: list[Annotated[float, Field(allow_inf_nan=False)]] = Field(
        default_factory=lambda: [0.25, 0.5, 1.0], min_length=1,
        description="α as multiples of each unit's largest code on the eval split")
    hold: int = Field(5, ge=1, description="neighbours held by corrective steering (and downstream units linked)")
    contexts: int = Field(8, ge=1, description="eval contexts measured on")
    prompt: str = Field("The", description="prompt of the side-by-side generations (at the largest α)")
    new_tokens: int = Field(20, ge=0, description="tokens generated per prompt")
    mean_ablation: bool = Field(False, description="ablate to the unit's mean code instead of 0")
    verify: int = Field(5, ge=0, description="every unit is ranked by its attribution estimate of the ablation; "
                        "the top N are also ablated for real")
    ablate_sets: list[list[Annotated[int, Field(ge=0)]]] = Field(default_factory=list, description="sets of units "
                                                                 "ablated together")

    @model_validator(mode="after")
    def _needs_dictionary(self):
        if self.downstream and not self.dictionary:
            raise ValueError("steer.downstream needs steer.dictionary")
        return self


def fit_entries(v):
    """A `fit:` value: one entry or a list; an entry without `method` is k-means."""
    if isinstance(v, dict):
        v = [v]
    return [{"method": "kmeans", **e} if isinstance(e, dict) and "method" not in e else e for e in v]


class ExperimentConfig(Strict):
    @field_validator("fit", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return fit_entries(v)

    name: str = Field(description="run directory name under runs/")
    model: str = Field("gemma3-270m", description="embedded alias, local directory or hub id")
    corpus: CorpusConfig = CorpusConfig()
    extract: ExtractConfig = ExtractConfig()
    store: str | None = Field(None, description="where the activation store lives: a folder or an fsspec URL "
                              "(memory://, s3://BUCKET/..., gs://... with s3fs or gcsfs installed); default "
                              "RUNS_DIR/NAME/store")
    fit: list[FitSpec] = Field(default_factory=lambda: [KMeansFit()], description="one entry per method")
    evaluate: EvalConfig = EvalConfig()
    interpret: InterpretConfig = InterpretConfig()
    graph: GraphConfig = GraphConfig()
    steer: SteerConfig = SteerConfig()
    seeds: list[int] | None = Field(None, description="fit every entry once per seed (overriding its seed): the "
                                    "report shows mean ± std")

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, v):
        if v is not None and (not v or len(set(v)) < len(v)):
            raise ValueError(f"seeds must be a non-empty list of distinct integers, got {v}")
        return v


LABEL = r"^[A-Za-z0-9_.-]+$"


class ConvergeModel(Strict):
    """One model of a convergence run."""
    name: str = Field(pattern=LABEL, description="its label in tables and folders")
    model: str = Field(description="embedded alias, local directory or hub id")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="compute dtype of the forward "
                                                             "passes (the next-token head runs in float32); bfloat16 "
                                                             "pays only where the hardware has bf16 units")
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
    """The held-out text every model reads (paired_text.py)."""
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
    """`dictlab converge`: do two (or more) models learn the same things? (converge.py)"""
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


def _model_in(annotation):
    """The config class an annotation holds (through list[...] and Optional), or the annotation itself."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if isinstance(found, type) and issubclass(found, BaseModel):
            return found
    return annotation


def _explain(e: ValidationError, cls: type[BaseModel], where: str) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            model = cls
            for part in err["loc"][:-1]:
                if isinstance(part, int):
                    continue
                if part in FIT_METHODS:
                    model = FIT_METHODS[part]
                    continue
                field = model.model_fields.get(str(part)) if isinstance(model, type) else None
                model = _model_in(field.annotation) if field is not None else model
            accepted = ", ".join(model.model_fields) if isinstance(model, type) else "?"
            loc = ".".join(str(p) for p in err["loc"] if p not in FIT_METHODS)
            lines.append(f"unknown key {loc!r} (accepted: {accepted})")
        elif not err["loc"]:  # a check across fields: its message names them
            lines.append(err["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
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
        raise DictlabError(_explain(e, kind, str(path))) from e
