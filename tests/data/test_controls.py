"""The random-weights control: the same architecture and tokenizer, weights drawn afresh by the model's own
initialisation, reproducible from its seed; carried in the model spec; a control run never writes over the
trained run."""

import json

import pytest
import torch

from dictlab.data.controls import split_control, with_control
from dictlab.data.lm import load_model
from dictlab.errors import DictlabError


def test_the_control_travels_in_the_model_spec():
    assert with_control("gemma3-270m", None) == "gemma3-270m"
    assert with_control("gemma3-270m", "random_weights", 3) == "gemma3-270m+random_weights:3"
    assert split_control("gemma3-270m+random_weights:3") == ("gemma3-270m", "random_weights", 3)
    assert split_control("/models/a+b") == ("/models/a+b", None, 0)  # a '+' in a path is not a control
    with pytest.raises(DictlabError, match="unknown control 'shuffled'; accepted: random_weights"):
        with_control("m", "shuffled")
    with pytest.raises(DictlabError, match="the seed after 'random_weights:' must be an integer"):
        split_control("m+random_weights:x")


def test_random_weights_differ_from_the_trained_ones_and_are_reproducible_from_their_seed(tiny_models):
    path = str(tiny_models["llama"])
    trained, tokenizer = load_model(path)
    # (the tiny test model was itself drawn by from_config with seed 0: the control uses other seeds)
    first, same_tokenizer = load_model(f"{path}+random_weights:5")
    again, _ = load_model(f"{path}+random_weights:5")
    other, _ = load_model(f"{path}+random_weights:6")
    assert type(first) is type(trained) and same_tokenizer.get_vocab() == tokenizer.get_vocab()
    weights = [dict(m.named_parameters()) for m in (trained, first, again, other)]
    name = next(n for n in weights[0] if n.endswith("mlp.up_proj.weight"))
    assert not torch.equal(weights[0][name], weights[1][name])
    assert all(torch.equal(weights[1][n], weights[2][n]) for n in weights[1])  # the seed reproduces it
    assert not torch.equal(weights[1][name], weights[3][name])
    std = trained.config.initializer_range  # the model's own scheme: normal(0, initializer_range)
    assert float(weights[1][name].std()) == pytest.approx(std, rel=0.1)


def test_control_config_and_a_run_folder_of_the_other_kind_is_refused(tmp_path):
    from dictlab.config import ExperimentConfig
    from dictlab.pipeline import _refuse_other_control

    cfg = ExperimentConfig(name="rep", control="random_weights", control_seed=2)
    assert cfg.model_spec == "gemma3-270m+random_weights:2"
    with pytest.raises(ValueError, match="random_weights"):
        ExperimentConfig(name="rep", control="shuffled")
    run = tmp_path / "rep"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(ExperimentConfig(name="rep").model_dump()))
    with pytest.raises(DictlabError, match="holds a run on the trained model; this config asks for the "
                                           "random-weights control: give it another name"):
        _refuse_other_control(run, cfg)
    _refuse_other_control(run, ExperimentConfig(name="rep"))  # the same kind of run resumes
