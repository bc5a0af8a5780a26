"""The shipped FSDP2 files: the accelerate config loads as FSDP2, the recipe as a Recipe."""

from __future__ import annotations

from pathlib import Path

from edkm.config import Recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_accelerate_config_is_fsdp2() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(RECIPES / "launch" / "accelerate_fsdp2.yaml"))
    assert str(cfg.distributed_type).endswith("FSDP")
    assert cfg.fsdp_config["fsdp_version"] == 2
    assert cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    assert cfg.use_cpu is False


def test_fsdp_recipe_loads_and_runs_the_sharded_method() -> None:
    recipe = Recipe.from_yaml(RECIPES / "llama7b_3bit_fsdp.yaml")
    assert recipe.dkm.method == "unique"
    assert recipe.train.batch_size % 8 == 0  # the global micro-batch divides by the 8 ranks
