"""``edkm plan``: predict the memory of a recipe's training step before running it.

Exit status: 0 the recipe fits, 1 it does not (the table lists the switches that make it fit),
2 bad input.

Example:
    $ edkm plan --model recipes/llama7b_config.json --config recipes/llama7b_3bit.yaml --device-memory 24GiB
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

_EPILOG = """\
The step runs under FakeTensorMode (no memory is allocated; a LLaMA-7B config plans on a CPU in
a minute or two). Device figures are what torch.cuda.max_memory_allocated would report; keep a
margin for the allocator's fragmentation. See docs/plan.md for how exact each row is.

Examples:
  edkm plan --model recipes/llama7b_config.json --config recipes/llama7b_3bit.yaml --device-memory 24GiB
  edkm plan --model default --config recipes/smollm2_3bit.yaml --device cpu
  edkm plan --model ~/models/llama-7b --config my.yaml --device-memory 80GB --json"""


def build_plan(sub: argparse._SubParsersAction) -> None:
    """Register the ``plan`` subcommand."""
    p = sub.add_parser(
        "plan",
        help="predict a training step's peak device and host memory, and whether it fits",
        description=textwrap.fill(
            "Run the training steps of RECIPE on MODEL under FakeTensorMode and print the peak "
            "device and host memory by category (weights, gradients, optimizer state, "
            "activations, DKM, offload buffers), whether it fits --device-memory and "
            "--host-memory, and, when it does not, which switches make it fit (activation "
            "checkpointing, marshaling, optimizer offload, activation offload, micro-batch).",
            width=88,
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        default=None,
        help="local Hugging Face folder (only config.json is needed; weights, when present, "
        "give the DKM tables' exact sizes), a config.json file, or 'default' "
        "(default: the recipe's model)",
    )
    p.add_argument("--config", required=True, metavar="RECIPE", help="recipe YAML file")
    p.add_argument(
        "--device-memory",
        default=None,
        help="device memory, e.g. 24GiB or 80GB (required for --device gpu)",
    )
    p.add_argument(
        "--host-memory",
        default=None,
        help="host memory, e.g. 64GiB (default: this machine's total, from psutil)",
    )
    p.add_argument(
        "--device",
        choices=["gpu", "cpu"],
        default="gpu",
        help="what trains: a GPU (bf16 autocast as on a GPU) or this CPU (device = host memory)",
    )
    p.add_argument("--no-advice", action="store_true", help="do not plan the switches")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.set_defaults(func=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:
    from edkm.config import Recipe
    from edkm.errors import InputError
    from edkm.io.paths import existing_path
    from edkm.plan.planner import make_plan, parse_bytes, render

    recipe = Recipe.from_yaml(existing_path(args.config, "recipe"))
    if args.device == "gpu" and args.device_memory is None:
        raise InputError("--device-memory is required with --device gpu (e.g. 24GiB)")
    device_memory = parse_bytes(args.device_memory) if args.device_memory else 0
    host_memory = parse_bytes(args.host_memory) if args.host_memory else None
    model = args.model if args.model is not None else recipe.model

    def say(line: str) -> None:
        if not args.json:
            print(f"[plan] {line}", file=sys.stderr, flush=True)

    plan = make_plan(
        model,
        recipe,
        device_memory=device_memory,
        host_memory=host_memory,
        kind=args.device,
        advise=not args.no_advice,
        progress=say,
    )
    print(json.dumps(plan.to_dict()) if args.json else render(plan))
    return 0 if plan.fits else 1
