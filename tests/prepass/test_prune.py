"""LLM-Pruner pre-pass: groups, zeroing == pruning, Taylor scores, restructure, save/load."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from edkm.adapters import get_adapter
from edkm.errors import InputError
from edkm.prepass import load_structured, manifests_of, restructure, save_structured
from edkm.prepass.prune import (
    parse_layers,
    prune_groups,
    prune_model,
    removed_count,
    run_prepass,
    widths_of,
)
from edkm.prepass.prune_importance import accumulate_gradients, group_scores
from tests.conftest import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def _calib(n: int = 4, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))


def _zero_group(block: nn.Module, groups, g: int) -> None:
    with torch.no_grad():
        for slot in groups.members:
            w = block.get_submodule(slot.path).weight
            idx = groups.channels(slot, [g])
            if slot.axis == 0:
                w[idx] = 0
            else:
                w[:, idx] = 0


@pytest.mark.parametrize("kind,group", [("attention", 1), ("attention", 0), ("mlp", 77)])
def test_zeroing_a_group_and_pruning_it_give_identical_logits(kind, group):
    # 8 query / 2 key-value heads: a group is one kv head with its 4 query heads
    model = make_tiny_llama(num_attention_heads=8, num_key_value_heads=2).double()
    zeroed, pruned = copy.deepcopy(model), copy.deepcopy(model)
    for target in (zeroed, pruned):
        adapter = get_adapter(target)
        (groups,) = [g for g in adapter.coupled_groups(1) if g.kind == kind]
        block = adapter.blocks()[1][1]
        if target is zeroed:
            _zero_group(block, groups, group)
        else:
            prune_groups(block, groups, [group])
    with torch.no_grad():
        a, b = zeroed(input_ids=_ids()).logits, pruned(input_ids=_ids()).logits
        full = model(input_ids=_ids()).logits
    assert not torch.allclose(a, full, atol=1e-6)  # the group mattered
    # the pruned matmuls sum fewer terms (the zeros are gone): float64 rounding is the floor
    assert torch.allclose(a, b, rtol=0, atol=1e-12)
    widths = widths_of(pruned)[1]
    if kind == "attention":
        assert widths == {"heads": 4, "kv_heads": 1, "intermediate": 128}
    else:
        assert widths == {"heads": 8, "kv_heads": 2, "intermediate": 127}


def test_pruned_model_runs_and_its_shapes_match_the_manifest_and_restructure():
    model = make_tiny_llama(num_attention_heads=8, num_key_value_heads=4)
    manifest = prune_model(model, _calib(), 0.5, layers="1:", show_progress=False)
    assert manifest["widths"] == [
        {"heads": 8, "kv_heads": 4, "intermediate": 128},
        {"heads": 4, "kv_heads": 2, "intermediate": 64},
    ]
    assert manifests_of(model) == [manifest]
    attn = model.model.layers[1].self_attn
    hd = attn.head_dim
    for i, w in enumerate(manifest["widths"]):
        layer = model.model.layers[i]
        assert layer.self_attn.q_proj.weight.shape == (w["heads"] * hd, 64)
        assert layer.self_attn.k_proj.weight.shape == (w["kv_heads"] * hd, 64)
        assert layer.self_attn.o_proj.weight.shape == (64, w["heads"] * hd)
        assert layer.mlp.up_proj.weight.shape == (w["intermediate"], 64)
        assert layer.mlp.down_proj.weight.shape == (64, w["intermediate"])
        assert get_adapter(model).head_layout(i).num_heads == w["heads"]
    assert sorted(manifest["removed"]["1"]) == ["attention", "mlp"]
    assert len(manifest["removed"]["1"]["mlp"]) == 64 and "0" not in manifest["removed"]
    with torch.no_grad():
        logits = model(input_ids=_ids()).logits
        gen = model.generate(_ids()[:1, :5], max_new_tokens=3, do_sample=False)
    assert torch.isfinite(logits).all() and gen.shape == (1, 8)
    with torch.device("meta"):
        stock = make_tiny_llama(num_attention_heads=8, num_key_value_heads=4)
    restructure(stock, [manifest])
    got = {k: tuple(v.shape) for k, v in stock.state_dict().items()}
    assert got == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert manifest["params_after"] == sum(p.numel() for p in model.parameters())


def _traced_attention_groups(model: nn.Module, block: int) -> list[dict[str, set[int]]]:
    """Per o_proj input head group (by kv head): the q/k/v output channels it depends on,
    found by autograd on a real forward (nonzero gradients), not from the adapter."""
    layer = model.model.layers[block].self_attn
    outs: dict[str, torch.Tensor] = {}
    handles = []
    for name in ("q_proj", "k_proj", "v_proj"):

        def keep(_m, _a, out, name=name):
            out.retain_grad()
            outs[name] = out

        handles.append(getattr(layer, name).register_forward_hook(keep))
    captured: list[torch.Tensor] = []
    handles.append(
        layer.o_proj.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    )
    ids = _ids()
    try:
        model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    attn_in = captured[0]
    n_q = layer.q_proj.out_features // layer.head_dim
    n_kv = layer.k_proj.out_features // layer.head_dim
    width = (n_q // n_kv) * layer.head_dim
    groups = []
    for g in range(n_kv):
        for t in outs.values():
            t.grad = None
        grads = torch.autograd.grad(
            attn_in[..., g * width : (g + 1) * width].sum(), list(outs.values()), retain_graph=True
        )
        groups.append(
            {
                name: set(torch.nonzero(gr.abs().sum((0, 1)) > 0).flatten().tolist())
                for name, gr in zip(outs, grads)
            }
        )
    return groups


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_groups_match_a_traced_dependency_graph(attn):
    model = make_tiny_llama(num_attention_heads=8, num_key_value_heads=2, attn_implementation=attn)
    traced = _traced_attention_groups(model, 1)
    (groups,) = [g for g in get_adapter(model).coupled_groups(1) if g.kind == "attention"]
    slots = {s.path.split(".")[-1]: s for s in groups.members}
    assert len(traced) == groups.count == 2
    for g, deps in enumerate(traced):
        for name in ("q_proj", "k_proj", "v_proj"):
            assert deps[name] == set(groups.channels(slots[name], [g])), (attn, g, name)
    # o_proj's input columns of group g are exactly the channels traced above
    assert slots["o_proj"].axis == 1 and slots["o_proj"].width == slots["q_proj"].width


def test_groups_are_the_same_under_eager_and_sdpa_and_match_torch_pruning_for_the_mlp():
    eager = make_tiny_llama(attn_implementation="eager")
    sdpa = make_tiny_llama(attn_implementation="sdpa")
    assert eager.config._attn_implementation == "eager"
    assert sdpa.config._attn_implementation == "sdpa"
    for b in range(2):
        assert get_adapter(eager).coupled_groups(b) == get_adapter(sdpa).coupled_groups(b)
    # the same calibration picks the same groups under both attention implementations
    m1 = prune_model(eager, _calib(), 0.5, show_progress=False)
    m2 = prune_model(sdpa, _calib(), 0.5, show_progress=False)
    assert m1["removed"] == m2["removed"]

    tp = pytest.importorskip("torch_pruning")
    model = make_tiny_llama()

    class Logits(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(input_ids=x, use_cache=False).logits

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = tp.DependencyGraph().build_dependency(Logits(model), example_inputs=_ids()[:1])
    names = {m: n for n, m in model.named_modules()}
    for b in range(2):
        prefix, block = get_adapter(model).blocks()[b]
        (mlp,) = [g for g in get_adapter(model).coupled_groups(b) if g.kind == "mlp"]
        gate = block.get_submodule("mlp.gate_proj")
        group = graph.get_pruning_group(gate, tp.prune_linear_out_channels, idxs=[5, 9])
        traced = {
            (names[dep.target.module], "out" if "out" in dep.handler.__name__ else "in"): sorted(
                idxs
            )
            for dep, idxs in group
            if dep.target.module in names and isinstance(dep.target.module, nn.Linear)
        }
        want = {
            (f"{prefix}.{s.path}", "out" if s.axis == 0 else "in"): mlp.channels(s, [5, 9])
            for s in mlp.members
        }
        assert traced == want


def _direct_scores(model, calib, block_index, kind, importance, level, how):
    """Scores straight from per-block autograd gradients, group by group with explicit index
    lists (no reshapes), as the module doc defines them."""
    adapter = get_adapter(model)
    prefix, block = adapter.blocks()[block_index]
    (groups,) = [g for g in adapter.coupled_groups(block_index) if g.kind == kind]
    weights = [block.get_submodule(s.path).weight for s in groups.members]
    per_block = []
    for i in range(calib.shape[0]):
        ids = calib[i : i + 1]
        loss = model(input_ids=ids, labels=ids).loss
        per_block.append(torch.autograd.grad(loss, weights))
    n = len(per_block)
    out = []
    for g in range(groups.count):
        slot_scores = []
        for s, w, k in zip(groups.members, weights, range(len(weights))):
            gs = torch.stack([pb[k].double() for pb in per_block])
            grad, fisher = gs.mean(0), (gs**2).sum(0) / n
            idx = groups.channels(s, [g])
            wv, gv, fv = (
                t[idx] if s.axis == 0 else t[:, idx].T for t in (w.detach().double(), grad, fisher)
            )
            terms = {
                "taylor1": wv * gv,
                "taylor2": 0.5 * wv**2 * fv,
                "mix": wv * gv - 0.5 * wv**2 * fv,
            }[importance]
            if level == "element":
                slot_scores.append(terms.abs().sum())
            else:  # one vector per pruned channel (row of sel): |sum| then summed
                slot_scores.append(terms.sum(1).abs().sum())
        t = torch.stack(slot_scores)
        out.append(
            {"sum": t.sum(), "mean": t.mean(), "max": t.max(), "prod": t.prod(), "last": t[-1]}[how]
        )
    return torch.stack(out), groups, prefix, block


@pytest.mark.parametrize(
    "importance,level,how,kind",
    [
        ("taylor1", "element", "sum", "attention"),
        ("taylor1", "vector", "sum", "mlp"),
        ("taylor2", "element", "max", "attention"),
        ("mix", "element", "prod", "mlp"),
        ("mix", "vector", "last", "attention"),
        ("taylor1", "element", "mean", "mlp"),
    ],
)
def test_taylor_scores_equal_a_direct_autograd_computation(importance, level, how, kind):
    model = make_tiny_llama().double()
    calib = _calib(3)
    want, groups, prefix, block = _direct_scores(model, calib, 1, kind, importance, level, how)
    names = [f"{prefix}.{s.path}.weight" for s in groups.members]
    stats = accumulate_gradients(model, calib, names, show_progress=False)
    got = group_scores(block, groups, stats, prefix, importance=importance, level=level, how=how)
    assert got.shape == (groups.count,)
    # the accumulators are float32: relative agreement to float32 rounding
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-12 * float(want.abs().max()))
    assert float(want.abs().max()) > 0
    # only the selected weights got gradients, and none is left behind
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_l2_and_random_importance_and_the_ratio_granularity():
    model = make_tiny_llama()
    # l2: the MLP channel with the smallest squared weights (summed over its 3 layers) goes
    block = model.model.layers[0]
    with torch.no_grad():
        block.mlp.up_proj.weight[17] *= 1e-3
        block.mlp.gate_proj.weight[17] *= 1e-3
        block.mlp.down_proj.weight[:, 17] *= 1e-3
    manifest = prune_model(model, None, 0.01, importance="l2", layers="0", show_progress=False)
    assert manifest["removed"]["0"] == {"mlp": [17]}  # round(0.01 * 2) = 0 kv heads
    a = prune_model(make_tiny_llama(), None, 0.3, importance="random", seed=1, show_progress=False)
    b = prune_model(make_tiny_llama(), None, 0.3, importance="random", seed=1, show_progress=False)
    assert a["removed"] == b["removed"] and a["calibration"] is None
    assert removed_count(0.2, 1536) == 307 and removed_count(0.2, 3) == 1
    assert removed_count(0.16, 3) == 0 and removed_count(0.17, 3) == 1


def test_bad_inputs_are_clear_errors():
    with pytest.raises(InputError, match=r"ratio must be a number in \[0, 1\)"):
        prune_model(make_tiny_llama(), _calib(), 1.0)
    with pytest.raises(InputError, match="would remove all 2 attention groups"):
        prune_model(make_tiny_llama(), _calib(), 0.8)
    with pytest.raises(InputError, match="layer range '1:1' selects no block"):
        prune_model(make_tiny_llama(), _calib(), 0.2, layers="1:1")
    with pytest.raises(InputError, match="must be 'all', START:STOP or one index"):
        parse_layers("a:b", 30)
    with pytest.raises(InputError, match="out of range: the model has 30 blocks"):
        parse_layers("4:40", 30)
    assert parse_layers("4:-2", 30) == range(4, 28)
    with pytest.raises(InputError, match="needs calibration"):
        prune_model(make_tiny_llama(), None, 0.2, importance="taylor1")
    with pytest.raises(InputError, match="importance must be one of"):
        prune_model(make_tiny_llama(), _calib(), 0.2, importance="taylor3")
    with pytest.raises(InputError, match="LLaMA-family causal LMs"):
        prune_model(make_tiny_llama().model, _calib(), 0.2)
    bad = {"kind": "prune", "version": 1, "widths": [{"heads": 3, "kv_heads": 1}] * 2}
    with pytest.raises(InputError, match="block 0 has invalid widths"):
        restructure(make_tiny_llama(), [bad])
    odd = {"kind": "prune", "version": 1}
    odd["widths"] = [{"heads": 3, "kv_heads": 1, "intermediate": 8}] * 2
    with pytest.raises(InputError, match="shares each key/value head among 2"):
        restructure(make_tiny_llama(), [odd])


def test_lora_recovery_merges_back_to_plain_linear_and_lowers_the_loss():
    pytest.importorskip("peft")
    from edkm.prepass.prune_recover import lora_recover

    model = make_tiny_llama()
    prune_model(model, _calib(), 0.5, show_progress=False)
    blocks = torch.arange(64).view(4, 16) % 7  # a pattern the adapters can learn quickly
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        loss0 = float(model(input_ids=blocks, labels=blocks).loss)
    merged, info = lora_recover(model, blocks, steps=15, lr=1e-2, show_progress=False)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert all(
        type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith(("_proj", "head"))
    )
    assert set(merged.state_dict()) == set(before)  # no lora_A / base_layer keys left
    assert not torch.equal(
        merged.state_dict()["model.layers.0.mlp.up_proj.weight"],
        before["model.layers.0.mlp.up_proj.weight"],
    )
    with torch.no_grad():
        loss1 = float(merged(input_ids=blocks, labels=blocks).loss)
    assert loss1 < loss0 and info["steps"] == 15 and info["library"].startswith("peft")
    assert manifests_of(merged) and manifests_of(merged)[0]["kind"] == "prune"


def test_save_and_reload_give_identical_logits(tmp_path):
    pytest.importorskip("peft")
    from edkm.io.loading import load_any_model
    from tests.io.test_models import _save_tiny_with_tokenizer

    folder = tmp_path / "tiny"
    _save_tiny_with_tokenizer(make_tiny_llama(), folder)
    model, tok = load_any_model(folder)
    model, manifest = run_prepass(model, tok, _calib(), 0.5, recovery_steps=2, show_progress=False)
    assert manifest["recovery"]["steps"] == 2
    out = save_structured(model, tmp_path / "pruned", [manifest], tokenizer=tok)
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))  # no pickles
    reloaded = load_structured(out)
    again, _ = load_any_model(out)
    with torch.no_grad():
        want = model(input_ids=_ids()).logits
        assert torch.equal(reloaded(input_ids=_ids()).logits, want)
        assert torch.equal(again(input_ids=_ids()).logits, want)
    assert widths_of(reloaded) == manifest["widths"]


def test_from_pretrained_loads_pruned_and_pruned_palettized_folders(tmp_path):
    from transformers import AutoModelForCausalLM

    import edkm as e

    model = make_tiny_llama()
    manifest = prune_model(model, _calib(), 0.5, layers="1", show_progress=False)
    pruned = save_structured(model, tmp_path / "pruned", [manifest])
    hf = AutoModelForCausalLM.from_pretrained(pruned)
    with torch.no_grad():
        assert torch.equal(hf(input_ids=_ids()).logits, model(input_ids=_ids()).logits)
    assert widths_of(hf) == manifest["widths"]

    e.palettize_(model, e.DKMConfig(bits=3))
    model = e.finalize(model)
    pal = e.save_palettized(model, tmp_path / "pal")
    hf_pal = AutoModelForCausalLM.from_pretrained(pal)
    reloaded = e.load_palettized(pal)
    with torch.no_grad():
        want = model(input_ids=_ids()).logits
        assert torch.equal(hf_pal(input_ids=_ids()).logits, want)
        assert torch.equal(reloaded(input_ids=_ids()).logits, want)
    layer = hf_pal.get_submodule("model.layers.1.mlp.down_proj")
    assert type(layer).__name__ == "PalettizedLinear" and layer.in_features == 64


def test_pruning_after_slicing_composes(tmp_path):
    from edkm.prepass.slicegpt import slice_model

    model = make_tiny_llama()
    sliced = slice_model(model, _calib(), 0.25, show_progress=False)
    pruned = prune_model(model, _calib(), 0.5, show_progress=False)
    out = save_structured(model, tmp_path / "both", manifests_of(model))
    reloaded = load_structured(out)
    assert manifests_of(reloaded) == [sliced, pruned]
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=_ids()).logits, model(input_ids=_ids()).logits)


@pytest.mark.slow
def test_default_model_groups_and_ratio_granularity():
    from edkm.io.models import load_model

    model, _ = load_model("default", dtype=torch.float32)
    adapter = get_adapter(model)
    attention, mlp = adapter.coupled_groups(0)
    assert (attention.count, mlp.count) == (3, 1536)
    assert [s.width for s in attention.members] == [192, 64, 64, 192]  # 3 query heads of 64
    before = sum(p.numel() for p in model.parameters())
    manifest = prune_model(model, None, 0.2, importance="l2", layers="4:-2", show_progress=False)
    assert manifest["widths"][3] == {"heads": 9, "kv_heads": 3, "intermediate": 1536}
    assert manifest["widths"][4] == {"heads": 6, "kv_heads": 2, "intermediate": 1229}
    assert manifest["widths"][28] == {"heads": 9, "kv_heads": 3, "intermediate": 1536}
    # per pruned block: 307 MLP channels x 3 x 576 + one kv group (192 + 64 + 64 + 192) x 576
    assert before - manifest["params_after"] == 24 * (307 * 3 * 576 + 512 * 576)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.arange(16)[None]).logits).all()


def test_precomputed_gradient_statistics_give_the_same_pruning():
    model = make_tiny_llama()
    names = [n for n, _ in model.named_parameters() if "layers." in n and "norm" not in n]
    stats = accumulate_gradients(model, _calib(), names, show_progress=False)
    a = prune_model(copy.deepcopy(model), _calib(), 0.5, importance="mix", stats=stats)
    b = prune_model(copy.deepcopy(model), _calib(), 0.5, importance="mix", show_progress=False)
    assert a["removed"] == b["removed"]
    with pytest.raises(InputError, match="gradient statistics given lack"):
        prune_model(copy.deepcopy(model), _calib(), 0.5, stats={})
