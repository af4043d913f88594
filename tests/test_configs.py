"""Every shipped config validates, and the controls pair agrees on everything but the control."""

from pathlib import Path

import pytest

from dictlab.config import load_config

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.glob("*.yaml") if "convergence" not in p.name),
                         ids=lambda p: p.name)
def test_every_shipped_experiment_config_validates(path):
    assert load_config(path).name


def test_the_controls_pair_differs_only_in_name_and_control():
    trained, control = (load_config(CONFIGS / n).model_dump() for n in ("controls.yaml", "controls-random.yaml"))
    assert control.pop("control") == "random_weights" and control.pop("compare_with") == trained["name"]
    assert trained.pop("control") is None and trained.pop("compare_with") is None
    assert {k for k in trained if trained[k] != control[k]} == {"name"}
