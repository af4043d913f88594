"""model_dtype: auto picks the faster of float32 and bfloat16 by a short forward; the choice is recorded."""

import pytest
import torch

from dictlab.data import lm, precision
from dictlab.data.corpus import CorpusConfig
from dictlab.data.extract import PRECISION, ExtractConfig, extract
from dictlab.data.lm import load_model
from dictlab.data.store import Store
from dictlab.errors import DictlabError


def fake_timings(monkeypatch, float32, bf16_warm, bf16):
    """The probe's forwards take these seconds: float32's timed run, bf16's 8-token warm-up, bf16's timed run."""
    calls = []

    def seconds(model, ids, timed=None):
        dtype = next(model.parameters()).dtype
        calls.append((dtype, timed is not None))
        if dtype == torch.float32:
            return float32
        return bf16_warm if ids.shape[1] == 8 else bf16

    monkeypatch.setattr(precision, "_forward_seconds", seconds)
    return calls


def dtype_of(model):
    return next(model.parameters()).dtype


def test_auto_takes_bfloat16_where_it_is_faster(tiny_models, monkeypatch):
    fake_timings(monkeypatch, float32=1.0, bf16_warm=0.2, bf16=0.5)
    model, _ = load_model(str(tiny_models["llama"]), "auto")
    assert dtype_of(model) == torch.bfloat16
    assert model.dictlab_precision["model_dtype"] == "bfloat16"
    assert model.dictlab_precision["seconds"] == {"float32": 1.0, "bfloat16 warm-up (8 tokens)": 0.2, "bfloat16": 0.5}


def test_auto_keeps_float32_and_stops_early_where_bf16_is_slow(tiny_models, monkeypatch, capsys):
    calls = fake_timings(monkeypatch, float32=1.0, bf16_warm=3.0, bf16=8.0)
    model, _ = load_model(str(tiny_models["llama"]), "auto")
    assert dtype_of(model) == torch.float32
    assert calls == [(torch.float32, True), (torch.bfloat16, False)]  # no full bf16 forward after a slow warm-up
    assert "model dtype float32" in capsys.readouterr().err  # one line says what was chosen and why


def test_the_real_probe_runs_and_an_explicit_dtype_wins(tiny_models, monkeypatch):
    model, _ = load_model(str(tiny_models["llama"]), "auto")
    chosen = model.dictlab_precision["model_dtype"]
    assert chosen in ("float32", "bfloat16") and dtype_of(model) == lm.DTYPES[chosen]
    fake_timings(monkeypatch, float32=9.0, bf16_warm=0.1, bf16=0.1)
    model, _ = load_model(str(tiny_models["llama"]), "float32")
    assert dtype_of(model) == torch.float32 and model.dictlab_precision == {"model_dtype": "float32", "why": "given"}


def test_the_model_loaded_with_auto_serves_the_later_stages(tiny_models, monkeypatch):
    fake_timings(monkeypatch, float32=1.0, bf16_warm=3.0, bf16=8.0)
    lm.shared_model.cache_clear()
    first, _ = lm.shared_model(str(tiny_models["llama"]), "auto")
    assert lm.shared_model(str(tiny_models["llama"]), "float32")[0] is first  # what the store records: no reload
    assert lm.shared_model(str(tiny_models["llama"]), "bfloat16")[0] is not first
    lm.shared_model.cache_clear()


def test_an_unknown_dtype_names_the_accepted_ones(tiny_models):
    with pytest.raises(DictlabError, match="float64.*accepted: auto, float32, bfloat16, float16"):
        load_model(str(tiny_models["llama"]), "float64")
    with pytest.raises(ValueError, match="auto"):
        ExtractConfig(model_dtype="float64")


def test_the_store_records_the_choice_and_a_resumed_store_keeps_it(tiny_models, pile_dir, tmp_path, monkeypatch):
    fake_timings(monkeypatch, float32=1.0, bf16_warm=0.2, bf16=0.5)
    lm.shared_model.cache_clear()
    cfg = ExtractConfig(layers=[1], context_length=16, train_tokens=200, eval_tokens=50, store_dtype="float32")
    corpus = CorpusConfig(source=str(pile_dir))
    store = Store(extract(str(tiny_models["llama"]), corpus, cfg, tmp_path / "s", progress=False))
    assert store.model_dtype == "bfloat16" and store.manifest["precision"]["seconds"]["bfloat16"] == 0.5
    # a store started in float32 (its record says so) resumes in float32 even where the probe would pick bf16
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / PRECISION).write_text('{"model_dtype": "float32", "why": "probe on another day"}')
    lm.shared_model.cache_clear()
    resumed = Store(extract(str(tiny_models["llama"]), corpus, cfg, tmp_path / "t", progress=False))
    assert resumed.model_dtype == "float32" and resumed.manifest["precision"]["why"] == "probe on another day"
    lm.shared_model.cache_clear()
