"""One rank of a sharding test (started by ``tests.shard.launcher.run_ranks``).

``python -m tests.shard.worker SCENARIO OUT``: joins the gloo group from the environment, runs
the scenario, writes ``OUT/result<rank>.json``. Every rank also computes the single-process
result itself (same seeds), so the comparisons need no data exchange beyond the collectives
under test.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from edkm.shard.comm import Comm
from edkm.shard.engine import local_counts, segments, sharded_unique_dkm
from edkm.shard.launch import init_distributed

# (name, rows, cols, dtype, group_size, compact): uneven rows (11008 on 3 ranks), LUT groups
# that straddle shards, fp32 weights (their bf16 patterns), fp16 weights, both table forms.
ENGINE_CASES = [
    ("per_tensor_11008", 11008, 16, torch.bfloat16, None, None),
    ("groups_straddle", 110, 24, torch.bfloat16, 10, None),
    ("groups_straddle_fixed", 36, 8, torch.bfloat16, 4, False),
    ("fp32_weights", 333, 20, torch.float32, None, None),
    ("fp16_weights", 98, 12, torch.float16, 14, None),
]


def bf16_steps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| in units of b's bf16 step (the spacing of bf16 numbers near |b|)."""
    ref = b.detach().float()
    exp = torch.floor(torch.log2(ref.abs().clamp_min(torch.finfo(torch.float32).tiny)))
    step = torch.exp2(exp - 7)
    return float(((a.detach().float() - ref).abs() / step).max()) if a.numel() else 0.0


def engine(comm: Comm) -> dict[str, Any]:
    from edkm.dkm.unique import unique_dkm
    from edkm.kernels.unique import bit_histogram

    out: dict[str, Any] = {}
    for name, rows, cols, dtype, group_size, compact in ENGINE_CASES:
        gen = torch.Generator().manual_seed(rows * 7 + cols)
        w = (torch.randn(rows, cols, generator=gen) * 0.02).to(dtype)
        w[: rows // 3, :2] = 0.0  # ties and zeros
        groups = 1 if group_size is None else rows // group_size
        c = torch.linspace(-0.04, 0.04, 4).repeat(groups, 1)
        g = torch.randn(rows, cols, generator=gen).to(dtype)
        tau = 0.3 * float(w.float().var())
        ref_w = w.clone().requires_grad_(True)
        ref_soft, ref_c = unique_dkm(ref_w, c, tau=tau, iters=3, groups=groups, compact=compact)
        ref_soft.backward(g)
        start, stop = comm.rows(rows)
        local = w[start:stop].clone().requires_grad_(True)
        counts = comm.all_reduce(
            local_counts(local.detach(), groups, segments(start, stop, group_size or rows))
        )
        soft, c_new = sharded_unique_dkm(
            local, c, tau=tau, iters=3, rows=rows, comm=comm, group_size=group_size, compact=compact
        )
        soft.backward(g[start:stop])
        assert local.grad is not None and ref_w.grad is not None
        ref_grad = ref_w.grad[start:stop]
        out[name] = {
            "rows": [start, stop],
            "histogram_equal": torch.equal(counts, bit_histogram(w, groups)),
            "soft_equal": torch.equal(soft, ref_soft[start:stop]),
            "centroids_equal": torch.equal(c_new, ref_c),
            "grad_equal": torch.equal(local.grad, ref_grad),
            "grad_bf16_steps": bf16_steps(local.grad, ref_grad),
            "grad_close": bool(
                torch.allclose(local.grad.float(), ref_grad.float(), rtol=1e-2, atol=1e-6)
            ),
        }
    return out


def tiny_model() -> torch.nn.Module:
    import edkm
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(intermediate_size=96)  # 96 rows on 3 ranks or 2: even; q 64
    model.train()
    edkm.palettize_(
        model,
        edkm.DKMConfig(
            bits=2,
            method="unique",
            module_name_configs={
                "model.layers.0.mlp.down_proj": {
                    "granularity": "per_grouped_channel",
                    "group_size": 16,
                }
            },
        ),
    )
    return model


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            grad = p.grad
            out[name] = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
    return out


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in model.named_parameters()
    }


def train(comm: Comm, out_dir: Path) -> dict[str, Any]:
    from edkm.errors import InputError
    from edkm.shard.fsdp import load_sharded, save_sharded, shard_model_

    torch.manual_seed(0)
    batch = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(1))
    ref = tiny_model()
    model = copy.deepcopy(ref)

    def step(m: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> float:
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    # single process, global batch: gradients of step 1, then the losses of steps 1-3
    ref_loss = ref(input_ids=batch, labels=batch).loss
    ref_loss.backward()
    ref_grads = {n: g.clone() for n, g in _grads(ref).items()}
    ref_centroids = {n: b.clone() for n, b in ref.named_buffers() if n.endswith("centroids")}
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    ref_opt.step()
    ref_opt.zero_grad(set_to_none=True)
    ref_losses = [float(ref_loss.detach())] + [step(ref, ref_opt, batch) for _ in range(2)]

    shard_model_(model, device="cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start, stop = comm.rows(batch.shape[0])
    local = batch[start:stop]

    def dist_step(ids: torch.Tensor) -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.detach().clone()
        dist.all_reduce(value)
        return float(value) / comm.world

    loss1 = model(input_ids=local, labels=local).loss
    loss1.backward()
    grads = _grads(model)
    centroids = {n: b.clone() for n, b in model.named_buffers() if n.endswith("centroids")}
    value = loss1.detach().clone()
    dist.all_reduce(value)
    losses = [float(value) / comm.world]
    grad_report = {
        n: float((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-30))
        for n, g in ref_grads.items()
    }
    opt.step()
    opt.zero_grad(set_to_none=True)
    ckpt = save_sharded(out_dir / "ckpt", model=model, optimizer=opt, extra={"step": 1})
    losses += [dist_step(local) for _ in range(2)]
    params_after = _params(model)
    # resume from the step-1 checkpoint: steps 2-3 again must give the same losses and weights
    extra = load_sharded(ckpt, model=model, optimizer=opt)
    resumed = [dist_step(local) for _ in range(2)]
    params_resumed = _params(model)
    # a NaN in one rank's shard: every rank raises the same clear error
    layer = model.get_submodule("model.layers.1.mlp.up_proj")
    nan_error = None
    with torch.no_grad():
        if comm.rank == comm.world - 1:
            layer.weight.to_local()[0, 0] = float("nan")
    try:
        model(input_ids=local, labels=local)
    except InputError as err:
        nan_error = str(err)
    return {
        "ref_losses": ref_losses,
        "losses": losses,
        "grad_rel_err": grad_report,
        "grad_names_equal": sorted(grads) == sorted(ref_grads),
        "centroids_equal_step1": all(
            torch.equal(centroids[n], ref_centroids[n]) for n in ref_centroids
        ),
        "extra": extra,
        "resumed_losses": resumed,
        "resume_params_equal": all(
            torch.equal(params_after[n], params_resumed[n]) for n in params_after
        ),
        "nan_error": nan_error,
    }


def die(comm: Comm) -> dict[str, Any]:
    """The last rank exits in the middle of a forward; the others must fail, not hang."""
    from edkm.shard.fsdp import shard_model_

    model = shard_model_(tiny_model(), device="cpu")
    ids = torch.randint(0, 256, (1, 8))
    if comm.rank == comm.world - 1:
        os._exit(3)
    try:
        model(input_ids=ids, labels=ids).loss.backward()
    except Exception as err:  # what the survivors see: gloo's error or the timeout
        return {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    return {"error": None}


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    info = init_distributed(torch.device("cpu"))
    comm = Comm()
    try:
        if scenario == "engine":
            result = engine(comm)
        elif scenario == "train":
            result = train(comm, out)
        elif scenario == "die":
            result = die(comm)
        else:
            raise SystemExit(f"unknown scenario {scenario}")
        (out / f"result{info.rank}.json").write_text(json.dumps(result))
    except Exception:
        traceback.print_exc()
        sys.exit(1)
    finally:
        if scenario != "die":
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
