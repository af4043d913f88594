"""`dictlab converge CONFIG`: do different models (base vs instruct, small vs large, other families)
learn the same things? Every pair of the config's models is compared at three levels, each measure
beside its permutation null, with intervals, and Benjamini–Hochberg q-values across every test of the run:

- behaviour (behaviour.py): their outputs to the prompt suites, and their next-token predictions on the
  same held-out text;
- representation (representation.py): every layer pair, on the same text aligned by characters;
- dictionaries (unit_matching.py): units of dictionaries fitted on each model matched by activation
  correlation on the aligned tokens; one dictionary applied to both where they share a residual space.

Two models "share a residual space" when their tokenizers have the same vocabulary and their widths are
equal (base vs instruct of one size); then cosine and the shared dictionary apply too.

    runs/<name>/config.json
    runs/<name>/models/<model>/pass.safetensors, pass.json   activations and next-token predictions on
                                                              the paired text (and on the prompts)
    runs/<name>/models/<model>/generations.json              its outputs to the prompts
    runs/<name>/models/<model>/store/, dictionaries/          its training activations and dictionaries
    runs/<name>/convergence.json                              every comparison and its statistics
    runs/<name>/report.html                                   (written by report/convergence.py)

Each artifact records its inputs and is reused while they are unchanged, so an interrupted run resumes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dictlab.analyses.convergence.options import ConvergeConfig, ConvergeModel
from dictlab.analyses.convergence.representation import METRICS as METRIC_ORDER
from dictlab.data.extract import ExtractConfig
from dictlab.data.io import atomic_path, config_hash, read_json, write_json
from dictlab.data.paired_text import ModelText, pair_rows, sample_texts, tokenize
from dictlab.data.sentence_model import missing, sentence_encoder
from dictlab.errors import DictlabError
from dictlab.measures.stats import benjamini_hochberg


def _model_facts(m: ConvergeModel) -> dict:
    """Tokenizer and architecture of a model, without loading its weights."""
    from transformers import AutoConfig, AutoTokenizer

    from dictlab.data.lm import EMBEDDED_MODELS, bos_id, resolve_model

    where = resolve_model(m.model)
    try:
        tokenizer, config = AutoTokenizer.from_pretrained(where), AutoConfig.from_pretrained(where)
    except OSError as e:
        raise DictlabError(f"could not load model {m.model!r} from {where}: {e}") from e
    config = getattr(config, "text_config", config)
    if m.chat and not getattr(tokenizer, "chat_template", None):
        raise DictlabError(f"model {m.name}: chat: true, but its tokenizer has no chat template")
    n_layers = config.num_hidden_layers
    for layer in [*(m.layers or []), *([m.dictionary_layer] if m.dictionary_layer is not None else [])]:
        if layer >= n_layers:
            raise DictlabError(f"model {m.name}: layer {layer} is out of range (it has {n_layers} layers, "
                               f"0..{n_layers - 1})")
    return {"tokenizer": tokenizer, "start": bos_id(tokenizer, m.start_token), "n_layers": n_layers,
            "d_model": config.hidden_size, "outputs": max(config.vocab_size, len(tokenizer)),
            "vocabulary": config_hash(sorted(tokenizer.get_vocab().items())), "vocab_size": len(tokenizer),
            "source": EMBEDDED_MODELS.get(m.model, m.model)}


def _sweep_layers(m: ConvergeModel, facts: dict) -> list[int]:
    """The layers of the representational sweep: the configured ones, or all."""
    return list(m.layers or range(facts["n_layers"]))


def _plan(cfg: ConvergeConfig, facts: dict) -> dict:
    """Per model: the layers and prompt layers its passes need; per pair: whether it shares a space."""
    shared = {(a, b): facts[a]["vocabulary"] == facts[b]["vocabulary"] and facts[a]["d_model"] == facts[b]["d_model"]
              for a, b in cfg.model_pairs()}
    layers = {m.name: set(_sweep_layers(m, facts[m.name]) if cfg.representation.enabled else ()) for m in cfg.models}
    prompt_layers = {m.name: set() for m in cfg.models}
    for m in cfg.models:
        if m.dictionary_layer is not None:
            layers[m.name].add(m.dictionary_layer)
    for (a, b), same in shared.items():
        la = cfg.model(a).dictionary_layer
        if same and cfg.dictionaries.shared and la is not None:
            layers[b].add(la)
            prompt_layers[a].add(la)
            prompt_layers[b].add(la)
    return {"shared": shared, "layers": {k: sorted(v) for k, v in layers.items()},
            "prompt_layers": {k: sorted(v) for k, v in prompt_layers.items()}}


def _prompts(cfg: ConvergeConfig) -> list[tuple[str, str]]:
    from dictlab.analyses.convergence.prompt_suites import load_prompts

    b = cfg.behaviour
    return load_prompts(b.suites, b.prompt_files, b.prompts_per_suite)


def _load_or_run_pass(folder: Path, inputs: dict, compute) -> dict[str, torch.Tensor]:
    """pass.safetensors, reused when pass.json records the same inputs (written after the tensors)."""
    done = folder / "pass.json"
    if done.exists() and read_json(done).get("inputs") == inputs and (folder / "pass.safetensors").exists():
        return load_file(str(folder / "pass.safetensors"))
    done.unlink(missing_ok=True)
    tensors = compute()
    with atomic_path(folder / "pass.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    write_json(done, {"inputs": inputs, "rows": int(tensors["doc"].numel())})
    return tensors


def _model_stage(cfg: ConvergeConfig, m: ConvergeModel, facts: dict, text: ModelText, positions: list[np.ndarray],
                 plan: dict, prompts: list[tuple[str, str]], folder: Path, progress: bool) -> dict:
    """Everything one model contributes: its passes, generations and dictionaries (each reused when done)."""
    from dictlab.analyses.convergence.behaviour import continuations
    from dictlab.analyses.convergence.paired_pass import prompt_pass, text_pass
    from dictlab.data.lm import shared_model

    tokenizer, start = facts["tokenizer"], facts["start"]
    layers, prompt_layers = plan["layers"][m.name], plan["prompt_layers"][m.name]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    inputs = {"model": m.model, "dtype": m.dtype, "ids": config_hash(text.ids), "start": start,
              "positions": config_hash([p.tolist() for p in positions]), "layers": layers,
              "top_k": cfg.behaviour.top_k_tokens, "prompts": [list(p) for p in prompts] if prompt_layers else [],
              "prompt_layers": prompt_layers}

    def compute():
        model, _ = shared_model(m.model, m.dtype)
        out = text_pass(model, text, positions, layers, cfg.behaviour.top_k_tokens, cfg.text.batch_size, pad,
                        progress)
        prompt_ids = [tokenize(tokenizer, p, start)[0] for _, p in prompts]
        for i, acts in enumerate(prompt_pass(model, prompt_ids, prompt_layers) if prompt_layers else []):
            out.update({f"prompt{i}.{k}": v for k, v in acts.items()})
        return out

    tensors = _load_or_run_pass(folder, inputs, compute)
    generations = None
    if cfg.behaviour.enabled:
        b = cfg.behaviour
        g_inputs = {"model": m.model, "dtype": m.dtype, "chat": m.chat, "start": start,
                    "prompts": [list(p) for p in prompts],  # as JSON gives it back
                    "settings": b.model_dump(exclude={"top_k_tokens", "suites", "prompt_files", "prompts_per_suite"})}
        path = folder / "generations.json"
        if path.exists() and read_json(path).get("inputs") == g_inputs:
            generations = read_json(path)["outputs"]
        else:
            model, _ = shared_model(m.model, m.dtype)
            generations = continuations(model, tokenizer, [p for _, p in prompts], m.chat, start, b.new_tokens,
                                        b.temperature, b.top_p, b.seed, progress)
            write_json(path, {"inputs": g_inputs, "outputs": generations})
    return {"tensors": tensors, "pass_inputs": inputs, "generations": generations, "spans": text.spans,
            "dictionaries": _dictionaries(cfg, m, folder, progress)}


def _dictionaries(cfg: ConvergeConfig, m: ConvergeModel, folder: Path, progress: bool) -> list[Path]:
    """The model's dictionaries at its dictionary layer: a store of training rows, then every fit entry."""
    from dictlab.data.extract import extract
    from dictlab.data.store import Store
    from dictlab.dictionaries.fitting import fit_dictionaries

    specs = m.fit if m.fit is not None else cfg.dictionaries.fit
    if m.dictionary_layer is None or not specs:
        return []
    site = f"L{m.dictionary_layer}.resid_post"
    for spec in specs:
        if getattr(spec, "site", None) not in (None, site) or getattr(spec, "target_site", None):
            raise DictlabError(f"model {m.name}: its dictionaries read {site} (dictionary_layer "
                               f"{m.dictionary_layer}); a fit entry names site {spec.site!r} (and target site "
                               f"{getattr(spec, 'target_site', None)!r}); leave both out")
    extract_cfg = ExtractConfig(layers=[m.dictionary_layer], sites=["resid_post"],
                                context_length=cfg.text.context_length,
                                batch_size=cfg.text.batch_size, train_tokens=cfg.dictionaries.train_tokens,
                                eval_tokens=min(2048, cfg.dictionaries.train_tokens), model_dtype=m.dtype,
                                start_token=m.start_token)
    store = Store(extract(m.model, cfg.corpus, extract_cfg, folder / "store", progress))
    specs = [s.model_copy(update={"site": site}) for s in specs]
    return fit_dictionaries(store, specs, folder / "dictionaries", progress)


def _pair_arrays(stage_a: dict, stage_b: dict, rows) -> tuple:
    """Row indices into each model's pass of the pair's [D, m] compared positions."""
    from dictlab.analyses.convergence.paired_pass import rows_of

    docs = np.broadcast_to(np.arange(rows.a.shape[0])[:, None], rows.a.shape)
    return rows_of(stage_a["tensors"], docs, rows.a), rows_of(stage_b["tensors"], docs, rows.b)


def _compare(cfg: ConvergeConfig, a: str, b: str, stages: dict, facts: dict, rows, shared: bool, texts: list,
             prompts: list, embed, progress: bool) -> dict:
    from dictlab.analyses.convergence.behaviour import next_token_comparison, output_similarity, token_texts
    from dictlab.analyses.convergence.representation import layer_sweep, spread

    st = cfg.statistics
    sa, sb = stages[a], stages[b]
    ia, ib = _pair_arrays(sa, sb, rows)
    n_docs, per_doc = rows.a.shape
    out = {"a": a, "b": b, "shared_space": shared, "documents": n_docs, "positions_per_document": per_doc,
           "word_aligned_fraction": float(rows.word.mean())}
    same_vocab = facts[a]["vocabulary"] == facts[b]["vocabulary"]
    if cfg.behaviour.enabled:
        top = lambda s, i: {k: s["tensors"][f"top_{k}"][i].numpy() for k in ("ids", "probs")}  # noqa: E731
        texts_ab = None if same_vocab else tuple(token_texts(facts[n]["tokenizer"], facts[n]["outputs"])
                                                 for n in (a, b))
        valid = np.ones_like(rows.word) if same_vocab else rows.word
        behaviour = {"next_token": next_token_comparison(top(sa, ia), top(sb, ib), valid, texts_ab, st.bootstrap,
                                                         st.permutations, st.level, st.seed)}
        if embed is None:
            behaviour["outputs_note"] = "output similarity skipped: " + (missing() or "")
        else:
            behaviour["outputs"] = output_similarity(sa["generations"], sb["generations"], [s for s, _ in prompts],
                                                     embed, st.bootstrap, st.permutations, st.level, st.seed)
            behaviour["outputs"]["examples"] = [
                {"suite": s, "prompt": p, "a": oa, "b": ob, "cosine": c} for (s, p), oa, ob, c in
                zip(prompts, sa["generations"], sb["generations"], behaviour["outputs"]["per_prompt"])]
        out["behaviour"] = behaviour
    if cfg.representation.enabled:
        r = cfg.representation
        keep = spread(per_doc, r.positions or per_doc)
        sub_a, sub_b = ia[:, keep].reshape(-1), ib[:, keep].reshape(-1)
        la, lb = _sweep_layers(cfg.model(a), facts[a]), _sweep_layers(cfg.model(b), facts[b])
        metrics = [x for x in r.metrics if x != "cosine" or shared]
        sweep = layer_sweep([sa["tensors"][f"L{i}"][sub_a] for i in la], [sb["tensors"][f"L{i}"][sub_b] for i in lb],
                            n_docs, len(keep), metrics, r.knn_k, r.svcca_keep, min(r.rsa_positions, len(keep)),
                            st.permutations, st.half_samples, st.level, st.seed, progress=progress)
        out["representation"] = {"layers_a": la, "layers_b": lb, "n_layers_a": facts[a]["n_layers"],
                                 "n_layers_b": facts[b]["n_layers"], "positions_per_document": int(len(keep)),
                                 "metrics": sweep}
    out["dictionaries"] = _compare_dictionaries(cfg, a, b, stages, ia, ib, rows, shared, texts, len(prompts))
    return out


def _compare_dictionaries(cfg: ConvergeConfig, a: str, b: str, stages: dict, ia: torch.Tensor, ib: torch.Tensor,
                          rows, shared: bool, texts: list[str], n_prompts: int) -> dict:
    """Units of same-named dictionaries of A and B matched; A's dictionaries applied to both (one space)."""
    from dictlab.analyses.convergence.unit_matching import match_dictionaries, shared_dictionary
    from dictlab.dictionaries import load_dictionary

    st, d = cfg.statistics, cfg.dictionaries
    sa, sb = stages[a], stages[b]
    n_docs = rows.a.shape[0]
    out = {"matched": [], "shared": []}
    la, lb = cfg.model(a).dictionary_layer, cfg.model(b).dictionary_layer
    x_a = sa["tensors"][f"L{la}"][ia.reshape(-1)]  # A at its dictionary layer, on the compared tokens
    prompt_acts = lambda s: [s["tensors"][f"prompt{i}.L{la}"] for i in range(n_prompts)]  # noqa: E731
    folders_b = {f.name: f for f in sb["dictionaries"]}

    def context(side: str, row: int) -> dict:
        doc, s = divmod(row, rows.a.shape[1])
        model, position = (a, rows.a[doc, s]) if side == "a" else (b, rows.b[doc, s])
        start, end = (int(v) for v in stages[model]["spans"][doc][position])
        text = texts[doc]
        return {"doc": doc, "before": text[max(0, start - 80):start], "token": text[start:end],
                "after": text[end:end + 30]}

    for folder_a in sa["dictionaries"]:
        dict_a = load_dictionary(folder_a)
        if folder_a.name in folders_b:
            result = match_dictionaries(dict_a, x_a, load_dictionary(folders_b[folder_a.name]),
                                        sb["tensors"][f"L{lb}"][ib.reshape(-1)],
                                        n_docs, d.threshold, d.min_active, st.permutations, st.bootstrap, st.level,
                                        d.examples, context, st.seed)
            out["matched"].append({"dictionary": folder_a.name, "site_a": f"L{la}.resid_post",
                                   "site_b": f"L{lb}.resid_post", **result})
        if shared and d.shared:
            result = shared_dictionary(dict_a, x_a, sb["tensors"][f"L{la}"][ib.reshape(-1)], n_docs,
                                       prompt_acts(sa), prompt_acts(sb),
                                       st.permutations, st.bootstrap, st.level, st.seed)
            out["shared"].append({"dictionary": folder_a.name, "site": f"L{la}.resid_post", "fitted_on": a, **result})
    return out


def adjust(results: dict, fdr: float) -> dict:
    """Benjamini–Hochberg q-values across every test in `results` (every dict holding a p-value, or a
    matrix of them), written beside each p; returns counts of tests and discoveries at `fdr`."""
    found: list[tuple[dict, np.ndarray]] = []

    def walk(node):
        if isinstance(node, dict):
            if "p" in node and node.get("p") is not None:
                found.append((node, np.asarray(node["p"], dtype=np.float64)))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(results)
    if not found:
        return {"tests": 0, "discoveries": 0, "fdr": fdr}
    q = benjamini_hochberg(np.concatenate([p.ravel() for _, p in found]))
    start = 0
    for node, p in found:
        part = q[start:start + p.size].reshape(p.shape)
        node["q"] = float(part) if p.ndim == 0 else part.tolist()
        start += p.size
    return {"tests": int(q.size), "discoveries": int((q <= fdr).sum()), "fdr": fdr}


def run_convergence(cfg: ConvergeConfig, runs_root: str | Path = "runs", progress: bool = True) -> dict:
    """Run (or resume) the comparison; returns what convergence.json holds."""
    run = Path(runs_root) / cfg.name
    run.mkdir(parents=True, exist_ok=True)
    if not (run / "config.json").exists() or read_json(run / "config.json") != cfg.model_dump():
        write_json(run / "config.json", cfg.model_dump())
    facts = {m.name: _model_facts(m) for m in cfg.models}
    names = [m.name for m in cfg.models]
    pairs = cfg.model_pairs()
    prompts = _prompts(cfg) if cfg.behaviour.enabled or cfg.dictionaries.shared else []
    texts = sample_texts(cfg.corpus.source, cfg.corpus.field, cfg.corpus.eval_fraction, cfg.corpus.seed,
                         [facts[n]["tokenizer"] for n in names], cfg.text.context_length, cfg.text.documents,
                         cfg.text.positions, [(names.index(a), names.index(b)) for a, b in pairs])
    doc_ids, texts = [d for d, _ in texts], [t for _, t in texts]
    model_texts = {}
    for n in names:
        tokenized = [tokenize(facts[n]["tokenizer"], t, facts[n]["start"]) for t in texts]
        model_texts[n] = ModelText([ids for ids, _ in tokenized], [spans for _, spans in tokenized])
    rows = {(a, b): pair_rows(model_texts[a], model_texts[b], texts, cfg.text.positions) for a, b in pairs}
    plan = _plan(cfg, facts)
    stages = {}
    for m in cfg.models:
        needed = [np.unique(np.concatenate([r.a[d] if a == m.name else r.b[d] for (a, b), r in rows.items()
                                            if m.name in (a, b)])) for d in range(len(texts))]
        stages[m.name] = _model_stage(cfg, m, facts[m.name], model_texts[m.name], needed, plan, prompts,
                                      run / "models" / m.name, progress)
    inputs = {"config": cfg.model_dump(), "passes": {n: stages[n]["pass_inputs"] for n in names},
              "dictionaries": {n: [config_hash(read_json(f / "config.json")) for f in stages[n]["dictionaries"]]
                               for n in names}}
    path = run / "convergence.json"
    if path.exists() and read_json(path).get("inputs") == inputs:
        return read_json(path)
    embed = sentence_encoder() if cfg.behaviour.enabled and not missing() else None
    comparisons = [_compare(cfg, a, b, stages, facts, rows[(a, b)], plan["shared"][(a, b)], texts, prompts, embed,
                            progress) for a, b in pairs]
    models = [{"name": m.name, "model": m.model, "source": facts[m.name]["source"],
               "n_layers": facts[m.name]["n_layers"],
               "d_model": facts[m.name]["d_model"], "vocab_size": facts[m.name]["vocab_size"], "chat": m.chat,
               "start_token": facts[m.name]["tokenizer"].convert_ids_to_tokens(facts[m.name]["start"]),
               "dictionary_layer": m.dictionary_layer, "dictionaries": [f.name for f in stages[m.name]["dictionaries"]]}
              for m in cfg.models]
    out = {"inputs": inputs, "name": cfg.name, "models": models, "documents": doc_ids,
           "prompts": [{"suite": s, "prompt": p} for s, p in prompts], "pairs": comparisons}
    out["tests"] = adjust(out["pairs"], cfg.statistics.fdr)
    write_json(path, out)
    return out


def headlines(out: dict) -> list[str]:
    """The headline numbers of every pair, as `dictlab converge` prints them."""
    fdr, lines = out["tests"]["fdr"], []
    for pair in out["pairs"]:
        space = "one residual space" if pair["shared_space"] else "aligned by characters"
        lines.append(f"{pair['a']} vs {pair['b']} ({space}, {pair['documents']} documents × "
                     f"{pair['positions_per_document']} positions)")
        if "behaviour" in pair:
            nt = pair["behaviour"]["next_token"]
            lines.append(f"  next-token top-1 agreement {nt['top1_agreement']['observed']:.3f} (null "
                         f"{nt['top1_agreement']['null_mean']:.3f}), JSD {nt['jsd_bits']['observed']:.3f} bits (null "
                         f"{nt['jsd_bits']['null_mean']:.3f}) at {nt['positions']} positions")
            for s in pair["behaviour"].get("outputs", {}).get("suites", []):
                lines.append(f"  outputs, {s['suite']}: similarity {s['observed']:.3f} [{s['low']:.3f}, "
                             f"{s['high']:.3f}] ({s['band']}; null {s['null_mean']:.3f}, q {s['q']:.2g})")
        rep = pair.get("representation", {})
        for metric in sorted(rep.get("metrics", {}), key=list(METRIC_ORDER).index):
            r = rep["metrics"][metric]
            value = np.array(r["value"], dtype=float)
            i, j = np.unravel_index(np.nanargmax(value), value.shape)
            above = int((np.array(r["q"], dtype=float) <= fdr).sum())
            lines.append(f"  {metric}: highest {value[i, j]:.3f} at layers {rep['layers_a'][i]} / {rep['layers_b'][j]} "
                         f"(null {r['null_mean'][i][j]:.3f}); {above} of {value.size} layer pairs above chance")
        for m in pair.get("dictionaries", {}).get("matched", []):
            lines.append(f"  {m['dictionary']}: {m['best_above']['observed']:.1%} of units matched above r = "
                         f"{m['threshold']} (null {m['best_above']['null_mean']:.1%}), replicated r "
                         f"{m['replicated_r']['observed']:.3f}, Jaccard per token "
                         f"{m['jaccard_per_token']['observed']:.3f}")
        for s in pair.get("dictionaries", {}).get("shared", []):
            lines.append(f"  {s['dictionary']} on both: Jaccard per token {s['jaccard_per_token']['observed']:.3f}, "
                         f"FVU {s['fvu_a']:.3f} / {s['fvu_b']:.3f}")
    lines.append(f"{out['tests']['tests']} tests, {out['tests']['discoveries']} above chance at FDR {fdr}")
    return lines
