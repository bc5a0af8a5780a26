"""Tests for edkm.config.dkm: the ConfigBase machinery and DKMConfig (validation, scoping, I/O)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from edkm.config import ConfigBase, ConfigError, DKMConfig, LayerOverride


@dataclasses.dataclass
class _Inner(ConfigBase):
    size: int = 1
    ratio: float = 0.5

    def validate(self) -> None:
        if self.size < 1:
            self._fail("size", f"must be at least 1, got {self.size}")


@dataclasses.dataclass
class _Outer(ConfigBase):
    name: str
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    sizes: list[int] = dataclasses.field(default_factory=list)
    shape: tuple[int, ...] = (1, 2)
    path: Path | None = None
    flag: bool = False
    extras: dict[str, _Inner | None] = dataclasses.field(default_factory=dict)


def test_generic_round_trip_through_dict_and_yaml(tmp_path):
    cfg = _Outer(
        name="x",
        inner=_Inner(size=3, ratio=2),  # an int for a float field is accepted as float
        sizes=[1, 2],
        shape=(4, 5, 6),
        path=Path("a/b"),
        extras={"k": _Inner(size=2), "skip": None},
    )
    assert isinstance(cfg.inner.ratio, float)
    data = cfg.to_dict()
    assert data["shape"] == [4, 5, 6] and data["path"] == "a/b"
    assert data["extras"] == {"k": {"size": 2, "ratio": 0.5}, "skip": None}
    assert _Outer.from_dict(data) == cfg
    file = tmp_path / "c.yaml"
    cfg.to_yaml(file)
    assert _Outer.from_yaml(file) == cfg


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "x", "bogus": 1}, "_Outer: unknown key 'bogus'"),
        ({}, "_Outer: missing required key 'name'"),
        ({"name": 3}, "_Outer.name: expected str, got int 3"),
        ({"name": "x", "flag": 1}, "_Outer.flag: expected bool, got int 1"),
        ({"name": "x", "sizes": [1, "2"]}, "_Outer.sizes[1]: expected int, got str '2'"),
        ({"name": "x", "sizes": [True]}, "_Outer.sizes[0]: expected int, got bool True"),
        ({"name": "x", "inner": {"size": 0}}, "_Outer.inner.size: must be at least 1, got 0"),
        ({"name": "x", "inner": {"sise": 2}}, "_Outer.inner: unknown key 'sise'"),
        ({"name": "x", "extras": {"k": {"size": -1}}}, "_Outer.extras['k'].size: must be at"),
        ({"name": "x", "inner": 5}, "_Outer.inner: expected _Inner, got int 5"),
    ],
)
def test_generic_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as info:
        _Outer.from_dict(data)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_construction_is_checked_like_from_dict():
    with pytest.raises(ConfigError, match=r"^_Inner.ratio: expected float, got str"):
        _Inner(ratio="fast")  # type: ignore[arg-type]


def test_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*missing.yaml' does not exist"):
        DKMConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("bits: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml': invalid YAML"):
        DKMConfig.from_yaml(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("bits: 12\n")
    with pytest.raises(
        ConfigError, match=r"wrong.yaml': DKMConfig.bits: must be an integer in 1..8"
    ):
        DKMConfig.from_yaml(wrong)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"expected a mapping"):
        DKMConfig.from_yaml(listing)
    assert DKMConfig.from_yaml_str("") == DKMConfig()


def test_dkm_config_round_trip_with_overrides(tmp_path):
    cfg = DKMConfig(
        bits=2,
        granularity="per_grouped_channel",
        group_size=16,
        tau=1,
        module_type_configs={"LlamaMLP": {"bits": 4}},  # type: ignore[dict-item]  # dicts are coerced
        module_name_configs={
            r".*\.o_proj": None,
            "lm_head": LayerOverride(granularity="per_tensor"),
        },
    )
    assert cfg.tau == 1.0 and isinstance(cfg.module_type_configs["LlamaMLP"], LayerOverride)
    assert DKMConfig.from_dict(cfg.to_dict()) == cfg
    assert DKMConfig.from_yaml_str(cfg.to_yaml()) == cfg
    cfg.to_yaml(tmp_path / "dkm.yaml")
    assert DKMConfig.from_yaml(tmp_path / "dkm.yaml") == cfg


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 0}, "DKMConfig.bits: must be an integer in 1..8, got 0"),
        ({"bits": 9}, "DKMConfig.bits: must be an integer in 1..8, got 9"),
        ({"bits": 3.0}, "DKMConfig.bits: expected int, got float 3.0"),
        ({"tau": 0.0}, "DKMConfig.tau: must be a finite number > 0"),
        ({"tau": float("nan")}, "DKMConfig.tau: must be a finite number > 0"),
        ({"iters": 0}, "DKMConfig.iters: must be at least 1"),
        ({"init": "random"}, "DKMConfig.init: must be one of 'kmeans++', 'quantile'"),
        (
            {"method": "fast"},
            "DKMConfig.method: must be one of 'auto', 'reference', 'unique', 'implicit'",
        ),
        ({"backend": "cuda"}, "DKMConfig.backend: must be one of 'auto', 'torch', 'triton'"),
        ({"method": "triton"}, "DKMConfig.method: 'triton' is a backend now"),
        (
            {"module_type_configs": {"LlamaMLP": {"method": "triton"}}},
            "DKMConfig.module_type_configs['LlamaMLP'].method: 'triton' is a backend now",
        ),
        ({"granularity": "per_channel"}, "DKMConfig.granularity: must be one of"),
        ({"granularity": "per_grouped_channel"}, "DKMConfig.group_size: is required"),
        ({"group_size": 8}, "DKMConfig.group_size: needs granularity='per_grouped_channel'"),
        (
            {"granularity": "per_grouped_channel", "group_size": 0},
            "DKMConfig.group_size: must be at least 1",
        ),
        ({"module_name_configs": {"(": {}}}, "DKMConfig.module_name_configs: key '(' is not a"),
        ({"module_type_configs": {"a.b": {}}}, "DKMConfig.module_type_configs: key 'a.b' is not"),
        (
            {"module_name_configs": {"model.layers.0.mlp.up_proj": {"bits": 9}}},
            "DKMConfig.module_name_configs['model.layers.0.mlp.up_proj'].bits: must be an integer",
        ),
        (
            {"module_name_configs": {"x": {"group_size": 4}}},
            "DKMConfig.module_name_configs['x']: group_size needs granularity",
        ),
        (
            {"module_type_configs": {"LlamaMLP": {"granularity": "per_grouped_channel"}}},
            "DKMConfig.module_type_configs['LlamaMLP']: granularity='per_grouped_channel' needs",
        ),
    ],
)
def test_dkm_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ConfigError) as info:
        DKMConfig.from_dict(kwargs)
    assert str(info.value).startswith(message)


def test_method_triton_message_says_what_to_write():
    with pytest.raises(ConfigError) as info:
        DKMConfig.from_yaml_str("method: triton\n")
    message = str(info.value)
    assert "\n" not in message and "write `backend: triton`" in message
    cfg = DKMConfig.from_yaml_str("method: unique\nbackend: triton\n")
    assert (cfg.method, cfg.backend) == ("unique", "triton")


def test_backend_resolves_with_overrides():
    cfg = DKMConfig(
        method="unique",
        backend="torch",
        module_name_configs={"x": LayerOverride(method="implicit", backend="triton")},
    )
    assert (cfg.global_spec().method, cfg.global_spec().backend) == ("unique", "torch")
    spec = cfg.resolve("x", ["Linear"], default=True)
    assert spec is not None and (spec.method, spec.backend) == ("implicit", "triton")
    assert DKMConfig().backend == "auto"


def test_replace_revalidates():
    with pytest.raises(ConfigError, match=r"DKMConfig.bits"):
        dataclasses.replace(DKMConfig(), bits=10)
    assert dataclasses.replace(DKMConfig(), bits=5).global_spec().num_centroids == 32


def test_resolve_precedence():
    cfg = DKMConfig(
        bits=3,
        module_type_configs={"LlamaMLP": {"bits": 4}, "Linear": {"iters": 7}},  # type: ignore[dict-item]  # dicts are coerced
        module_name_configs={
            r".*\.down_proj": {"bits": 2},  # type: ignore[dict-item]  # dicts are coerced
            "model.layers.1.mlp.down_proj": {"bits": 6},  # type: ignore[dict-item]  # dicts are coerced
            r".*\.v_proj": None,
            "lm_head": {"bits": 8},  # type: ignore[dict-item]  # dicts are coerced
        },
    )
    mlp = ["Linear", "LlamaMLP", "LlamaDecoderLayer"]
    attn = ["Linear", "LlamaAttention", "LlamaDecoderLayer"]
    # own type first (Linear: iters 7, bits global), then the innermost enclosing type
    q = cfg.resolve("model.layers.0.self_attn.q_proj", attn, default=True)
    assert q is not None and (q.bits, q.iters) == (3, 7)
    up = cfg.resolve("model.layers.0.mlp.up_proj", mlp, default=True)
    assert up is not None and (up.bits, up.iters) == (3, 7)  # Linear is the innermost match
    sub = cfg.resolve("model.layers.0.mlp.up_proj", ["MyLinear", *mlp[1:]], default=True)
    assert sub is not None and (sub.bits, sub.iters) == (4, 3)
    # name beats type; exact name beats a pattern
    down0 = cfg.resolve("model.layers.0.mlp.down_proj", mlp, default=True)
    down1 = cfg.resolve("model.layers.1.mlp.down_proj", mlp, default=True)
    assert down0 is not None and down0.bits == 2
    assert down1 is not None and down1.bits == 6
    assert cfg.resolve("model.layers.0.self_attn.v_proj", attn, default=True) is None
    # non-default layers only through a name override
    head = cfg.resolve("lm_head", ["Linear"], default=False)
    assert head is not None and head.bits == 8
    assert cfg.resolve("model.embed", ["Linear"], default=False) is None


def test_override_granularity_merging():
    cfg = DKMConfig(
        granularity="per_grouped_channel",
        group_size=8,
        module_name_configs={"a": {"granularity": "per_tensor"}, "b": {"group_size": 4}},  # type: ignore[dict-item]  # dicts are coerced
    )
    a = cfg.resolve("a", ["Linear"], default=True)
    b = cfg.resolve("b", ["Linear"], default=True)
    c = cfg.resolve("c", ["Linear"], default=True)
    assert a is not None and (a.granularity, a.group_size) == ("per_tensor", None)
    assert b is not None and (b.granularity, b.group_size) == ("per_grouped_channel", 4)
    assert c is not None and c.group_size == 8 and c.num_groups(32) == 4
