import pytest

from edkm.config import ConfigError, EvalConfig, Recipe, TrainConfig


def test_recipes_in_the_repository_parse_and_validate():
    from pathlib import Path

    recipes = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
    assert len(recipes) >= 3
    for path in recipes:
        recipe = Recipe.from_yaml(path)
        assert Recipe.from_dict(recipe.to_dict()) == recipe


@pytest.mark.parametrize(
    "cls,kwargs,message",
    [
        (TrainConfig, {"steps": 0}, "TrainConfig.steps: must be at least 1"),
        (TrainConfig, {"lr": -1.0}, "TrainConfig.lr: must be a finite number > 0"),
        (TrainConfig, {"warmup_steps": 20, "steps": 10}, "warmup_steps"),
        (TrainConfig, {"trainable": "some"}, "TrainConfig.trainable: must be one of"),
        (TrainConfig, {"seq_len": 1}, "seq_len"),
        (TrainConfig, {"distill": 1.5}, "TrainConfig.distill: must be in \\[0, 1\\]"),
        (TrainConfig, {"distill": float("nan")}, "TrainConfig.distill"),
        (EvalConfig, {"max_windows": -1}, "max_windows"),
        (Recipe, {"eval_fraction": 1.0}, "eval_fraction"),
    ],
)
def test_invalid_values_name_the_key(cls, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        cls(**kwargs)


def test_recipe_yaml_errors_name_the_section_and_key(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("train:\n  steps: 10\n  batchsize: 2\n")
    with pytest.raises(ConfigError, match=r"r\.yaml': Recipe\.train: unknown key 'batchsize'"):
        Recipe.from_yaml(bad)
    bad.write_text("dkm: {bits: 3.5}\n")
    with pytest.raises(ConfigError, match=r"Recipe\.dkm\.bits: expected int"):
        Recipe.from_yaml(bad)


def test_overrides_are_validated():
    assert Recipe().with_overrides(**{"train.steps": 17}).train.steps == 17
    with pytest.raises(ConfigError, match="bits"):
        Recipe().with_overrides(**{"dkm.bits": 0})
