"""The ``offload`` recipe section: defaults, validation, YAML round trip, the hooks' knobs."""

import inspect

import pytest

from edkm.config import ConfigError, OffloadConfig, Recipe
from edkm.offload import SavedTensorOffload


def test_defaults_round_trip_and_recipe_section():
    cfg = OffloadConfig()
    assert cfg.enabled is False and cfg.pin_memory is None and cfg.offload_inputs is False
    recipe = Recipe.from_yaml_str("offload: {enabled: true, min_bytes: 0, pin_memory: false}")
    assert recipe.offload == OffloadConfig(enabled=True, min_bytes=0, pin_memory=False)
    assert Recipe.from_yaml_str(recipe.to_yaml()) == recipe
    assert Recipe().offload == cfg  # a recipe without the section: offload off


def test_hook_kwargs_are_the_hooks_own_defaults():
    """Every knob maps to a SavedTensorOffload argument, with the same default."""
    params = inspect.signature(SavedTensorOffload).parameters
    for name, value in OffloadConfig().hook_kwargs().items():
        assert params[name].default == value, name
    SavedTensorOffload(**OffloadConfig(min_bytes=0, prefetch=0).hook_kwargs())


@pytest.mark.parametrize(
    "yaml_text,message",
    [
        ("offload: {min_bytes: -1}", "Recipe.offload.min_bytes: must be >= 0"),
        ("offload: {prefetch: -2}", "Recipe.offload.prefetch: must be >= 0"),
        ("offload: {enabled: yes please}", "Recipe.offload.enabled: expected bool"),
        ("offload: {pin: true}", "Recipe.offload: unknown key 'pin'"),
    ],
)
def test_invalid_values_name_the_key(yaml_text, message):
    with pytest.raises(ConfigError, match=message):
        Recipe.from_yaml_str(yaml_text)
