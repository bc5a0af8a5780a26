"""Memory ablation of eDKM's techniques on one LLaMA decoder layer (forward + backward).

One LLaMA-7B decoder layer (hidden 4096, MLP 11008, 32 heads; the 7 Linear weights, ~202M
parameters, in bf16), 3-bit per-tensor DKM on all 7, batch 1, sequence 2048. Rows: no DKM (the
floor), reference DKM, + marshaling (offload hooks around DKM), + uniquification, + sharding
(pending), all techniques, the implicit-attention kernel. Each row's peak is measured with
``edkm.measure.peak_memory``: MemTracker under FakeTensorMode at full size (nothing is
allocated), and with real tensors at a reduced width to check that the fake figures agree.
Host copies made by the offload hooks are filed apart (category "Host") and excluded from the
device peak, since host and device are both the CPU here.

Run:
    python -m benchmarks.memory_ablation            # full size (fake) + reduced (fake and real)
    python -m benchmarks.memory_ablation --quick    # reduced width only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edkm.measure import peak_memory
from edkm.offload.hooks import OffloadHooks

BITS = 3
ITERS = 3
TAU = 1e-4  # absolute; memory does not depend on it
RESULTS = Path(__file__).resolve().parent / "results"

FULL = dict(hidden=4096, mlp=11008, heads=32, seq=2048)
REDUCED = dict(hidden=512, mlp=1376, heads=4, seq=256)

# row name -> (dkm method or None, offload DKM's saved tensors?)
ROWS: dict[str, tuple[str | None, bool] | None] = {
    "no DKM (floor)": (None, False),
    "reference DKM": ("reference", False),
    "+ marshaling": ("reference", True),
    "+ uniquification": ("unique", False),
    "+ sharding": None,  # pending: no sharding issue has landed
    "all techniques": ("unique", True),
    "implicit-attention kernel": ("implicit", False),
}


class _DKMLinear(nn.Module):
    """A Linear whose weight goes through DKM on every forward (what palettize_ does)."""

    def __init__(self, linear: nn.Linear, method: str, hooks: OffloadHooks | None) -> None:
        super().__init__()
        self.linear = linear
        self.method = method
        self.hooks = hooks
        k = 2**BITS
        c = torch.linspace(-0.05, 0.05, k, dtype=torch.float32).reshape(1, k)
        self.register_buffer("centroids", c)

    def _soft(self) -> torch.Tensor:
        w = self.linear.weight
        if self.method == "implicit":
            from edkm.kernels import implicit_dkm

            return implicit_dkm(w, self.centroids, tau=TAU, iters=ITERS, backend="torch")[0]
        from edkm.dkm import dkm_soft

        c = self.centroids
        assert isinstance(c, torch.Tensor)
        return dkm_soft(w, c, tau=TAU, iters=ITERS, method=self.method)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx: Any = contextlib.nullcontext()
        if self.hooks is not None:
            self.hooks.keep(x)  # the layer's activation is not DKM's to offload
            ctx = self.hooks
        with ctx:  # DKM's saved tensors, and the soft weight the matmul saves
            return F.linear(x, self._soft(), self.linear.bias)


def _layer(dims: dict[str, int], method: str | None, hooks: OffloadHooks | None) -> nn.Module:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    cfg = LlamaConfig(
        hidden_size=dims["hidden"],
        intermediate_size=dims["mlp"],
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["heads"],
        num_hidden_layers=1,
        vocab_size=32,
    )
    cfg._attn_implementation = "eager"
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # .to() cannot swap FakeTensor parameters
    try:
        layer = LlamaDecoderLayer(cfg, layer_idx=0)
    finally:
        torch.set_default_dtype(old)
    if method is not None:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, _DKMLinear(child, method, hooks))
    return layer


def measure_row(dims: dict[str, int], row: tuple[str | None, bool]) -> dict[str, Any]:
    method, offload = row
    hooks = OffloadHooks(min_bytes=1 << 16, device="cpu") if offload else None
    layer = _layer(dims, method, hooks)
    h, hd, s = dims["hidden"], dims["hidden"] // dims["heads"], dims["seq"]
    x = torch.randn(1, s, h, dtype=torch.bfloat16)
    cos = torch.ones(1, s, hd, dtype=torch.bfloat16)
    sin = torch.zeros(1, s, hd, dtype=torch.bfloat16)

    def step() -> None:
        out = layer(x, position_embeddings=(cos, sin))
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()

    rep = peak_memory(step, track=[layer, x, cos, sin])
    return {
        "method": rep.method,
        "peak_bytes": rep.peak_bytes,
        "by_category": rep.by_category,
        "peak_host_bytes": rep.peak_host_bytes,
        "bytes_to_host": hooks.stats.bytes_to_host if hooks else 0,
        "copies_avoided": hooks.stats.copies_avoided if hooks else 0,
        "dkm_params": sum(p.numel() for p in layer.parameters() if p.dim() == 2),
    }


def run(dims: dict[str, int], fake: bool) -> dict[str, Any]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    rows: dict[str, Any] = {}
    for name, row in ROWS.items():
        if row is None:
            rows[name] = {"status": "pending: no sharding issue has landed"}
            continue
        torch.manual_seed(0)
        with FakeTensorMode() if fake else contextlib.nullcontext():
            rows[name] = measure_row(dims, row)
    floor = rows["no DKM (floor)"]["peak_bytes"]
    ref = rows["reference DKM"]["peak_bytes"] - floor
    for r in rows.values():
        if "peak_bytes" in r:
            r["dkm_bytes"] = r["peak_bytes"] - floor
            r["vs_floor"] = r["peak_bytes"] / floor
            r["reduction"] = ref / r["dkm_bytes"] if r["dkm_bytes"] > 0 else None
    return {"dims": dims, "fake": fake, "rows": rows}


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def table(res: dict[str, Any]) -> str:
    d = res["dims"]
    head = (
        f"hidden {d['hidden']}, MLP {d['mlp']}, {d['heads']} heads, seq {d['seq']}, batch 1, "
        f"{'FakeTensorMode (never allocated)' if res['fake'] else 'real tensors'}"
    )
    lines = [
        f"**{head}**",
        "",
        "| row | peak device MiB | DKM-attributable MiB | moved to host MiB | "
        "peak / floor | reduction vs reference |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in res["rows"].items():
        if "peak_bytes" not in r:
            lines.append(f"| {name} | pending | pending | pending | pending | pending |")
            continue
        red = r["reduction"]
        red_s = "—" if name.startswith("no DKM") else (f"{red:,.0f}x" if red else "≥ floor: ∞")
        lines.append(
            f"| {name} | {_mib(r['peak_bytes'])} | {_mib(r['dkm_bytes'])} | "
            f"{_mib(r['bytes_to_host'])} | {r['vs_floor']:.3f} | {red_s} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="reduced width only")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    runs = [run(REDUCED, fake=True), run(REDUCED, fake=False)]
    if not args.quick:
        runs.insert(0, run(FULL, fake=True))
    agree = {}
    fake_r, real_r = runs[-2]["rows"], runs[-1]["rows"]
    for name in fake_r:
        if "peak_bytes" in fake_r[name]:
            agree[name] = fake_r[name]["peak_bytes"] / real_r[name]["peak_bytes"]
    record = {
        "benchmark": "memory_ablation",
        "device": f"cpu ({platform.machine()})",
        "torch": torch.__version__,
        "bits": BITS,
        "iters": ITERS,
        "dtype": "bfloat16",
        "runs": runs,
        "fake_over_real_reduced": agree,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory_ablation.json").write_text(json.dumps(record, indent=2) + "\n")
    md = [
        "# Memory ablation: one LLaMA decoder layer, 3-bit per-tensor DKM on its 7 Linears",
        "",
        f"torch {torch.__version__}, CPU; forward + backward, {ITERS} DKM iterations. Peak "
        "device memory: `edkm.measure.peak_memory` (PyTorch MemTracker; under FakeTensorMode "
        "for the full-size layer). Parameters, the input and all tensors created by the step "
        "count; host copies of the offload hooks are filed apart and excluded. DKM-attributable "
        "= row peak minus the no-DKM peak. Moved to host = `OffloadHooks.stats.bytes_to_host` "
        "(one copy per storage). Marshaling offloads DKM's saved tensors and the soft weight, "
        "not the layer's activations.",
        "",
    ]
    for r in runs:
        md += [table(r), ""]
    md += [
        "Fake / real peak at reduced width: "
        + ", ".join(f"{k}: {v:.3f}" for k, v in agree.items()),
        "",
    ]
    (RESULTS / "memory_ablation.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
