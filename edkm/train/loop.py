"""The DKM fine-tuning loop: causal-LM loss on training blocks, DKM on the palettized layers.

What a step does: ``grad_accum`` micro-batches of ``batch_size`` blocks each (forward under bf16
autocast where the device supports it, backward), gradient clipping, an AdamW step, the
learning-rate schedule (linear warm-up, cosine decay to ``min_lr_ratio``) and the temperature
schedule (DKM's tau scaled geometrically from ``tau_start`` to ``tau_end`` times the configured
tau, so the soft weights converge onto the hard ones by the end of training).

Determinism: the order of the training blocks depends only on ``(seed, step)``; the
checkpoint holds model (DKM centroids included), optimizer, scheduler and RNG states, so a run
stopped and resumed ends with exactly the weights of an uninterrupted run on the same machine.
SIGTERM and Ctrl-C finish the current step, write a checkpoint and raise
:class:`TrainingInterrupted`.

Marshaling (``OffloadConfig``, recipe section ``offload``): with ``enabled``, every DKM layer's
forward runs under one :class:`edkm.offload.SavedTensorOffload` (:func:`offload_dkm_layers`),
and each step's log record holds that step's offload counters under ``"offload"``
(:func:`offload_summary` adds them up over a run).

On a CPU, each record also holds ``cpu_share``, the share of its threads' time the step got
(:func:`cpu_share`); the trainer warns once when a step gets under 0.6 of it, i.e. when another
process competes for the cores (on two cores that made steps 6x slower, docs/quality.md).

Memory switches (what ``edkm plan`` recommends): ``train.activation_checkpointing`` recomputes
each decoder layer in backward (:func:`activation_checkpointing`); ``offload.activations`` puts
every decoder layer's saved tensors in host memory (:func:`offload_decoder_layers`, counters
under ``"activation_offload"``); ``offload.optimizer`` keeps AdamW's state and the gradients in
host memory (:class:`edkm.train.optim_offload.HostOffloadAdamW`).

Example:
    >>> from edkm.train.loop import train
    >>> state = train(model, blocks, TrainConfig(steps=10), run_dir="runs/demo")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from edkm.config import OffloadConfig, TrainConfig
from edkm.io import atomic
from edkm.nn.palettize import palettized_modules, set_tau_scale
from edkm.offload import SavedTensorOffload
from edkm.progress import progress
from edkm.train.checkpoint import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from edkm.train.distill import distill_loss

LOG_FILE = "train_log.jsonl"
# Test hook: deliver SIGTERM to this process right after the given step (exercises the real
# signal path deterministically).
_SIGTERM_AT_ENV = "EDKM_TEST_SIGTERM_AT_STEP"


class TrainingInterrupted(RuntimeError):
    """Training stopped by a signal after a checkpoint was written."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: stopped after step {step}, checkpoint {checkpoint}")


def _accelerator(cfg: TrainConfig) -> Any:
    """A fresh ``Accelerator`` for this run's device choice.

    accelerate keeps its device state in a process-wide singleton fixed by the first
    ``Accelerator``; a second run in the same process (another ``edkm.compress`` call, a
    notebook) with another ``device`` would silently inherit the first one, so it is reset.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=cfg.device == "cpu")


def training_device(cfg: TrainConfig) -> torch.device:
    """The device a run with this config trains on (accelerate's choice, or the CPU).

    Example:
        >>> training_device(TrainConfig(device="cpu"))
        device(type='cpu')
    """
    return torch.device(_accelerator(cfg).device)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at ``step`` (0-based): linear warm-up then cosine decay.

    Example:
        >>> cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
        >>> round(lr_factor(0, cfg), 2), round(lr_factor(10, cfg), 2), round(lr_factor(100, cfg), 2)
        (0.1, 1.0, 0.1)
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress_ = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress_))


def tau_scale(step: int, cfg: TrainConfig) -> float:
    """Multiplier of DKM's tau at ``step``: geometric from ``tau_start`` to ``tau_end``.

    Example:
        >>> cfg = TrainConfig(steps=11, tau_start=1.0, tau_end=0.01)
        >>> tau_scale(0, cfg), round(tau_scale(5, cfg), 6), round(tau_scale(10, cfg), 6)
        (1.0, 0.1, 0.01)
    """
    if cfg.steps <= 1:
        return cfg.tau_end
    frac = min(1.0, step / (cfg.steps - 1))
    return float(cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** frac)


def block_indices(step: int, cfg: TrainConfig, n_blocks: int) -> torch.Tensor:
    """Indices of the training blocks used by ``step``: a seeded permutation per epoch.

    Example:
        >>> cfg = TrainConfig(batch_size=2, grad_accum=2, seed=0)
        >>> block_indices(0, cfg, 10).tolist() == block_indices(0, cfg, 10).tolist()
        True
    """
    per_step = cfg.batch_size * cfg.grad_accum
    out = []
    for pos in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(pos, n_blocks)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        out.append(int(torch.randperm(n_blocks, generator=gen)[offset]))
    return torch.tensor(out, dtype=torch.long)


def norm_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of the model's normalization layers (RMSNorm, LayerNorm, ...).

    Example:
        >>> len(norm_parameters(torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.Linear(4, 4))))
        2
    """
    out: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            for p in module.parameters(recurse=False):
                out[id(p)] = p
    return list(out.values())


def trainable_parameters(model: torch.nn.Module, cfg: TrainConfig) -> list[torch.nn.Parameter]:
    """The parameters the optimizer updates (``cfg.trainable``).

    ``"all"``: every parameter that requires grad (a caller may freeze some beforehand, as the
    LUT phase does); the other choices also freeze every parameter they leave out.
    """
    from edkm.nn.palettize import palettized_modules

    if cfg.trainable == "all":  # every parameter the caller has not frozen
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        chosen: dict[int, torch.nn.Parameter] = {}
        for _, module in palettized_modules(model):
            for p in module.parameters():
                chosen[id(p)] = p
        if cfg.trainable == "palettized+norms":
            for p in norm_parameters(model):
                chosen[id(p)] = p
        params = list(chosen.values())
        keep = {id(p) for p in params}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
    return params


class _SignalFlag:
    """Turns SIGTERM/SIGINT into a flag checked between steps (handlers restored on exit).

    A second Ctrl-C stops at once (no checkpoint for the step in flight; the previous one
    stays valid).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            # a second Ctrl-C: the user does not want to wait for the step to finish
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> _SignalFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: leave handlers alone
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls natively (what ``autocast: bf16`` asks for).

    A CPU without native bf16 (AVX2 only, no AVX-512) emulates it: there a bf16 matmul is
    several times slower than an fp32 one (5.5x measured on a 2-core AVX2 machine), so
    training stays in fp32. A CPU whose kernels are capped below AVX-512 (PyTorch's
    ``ATEN_CPU_CAPABILITY=avx2`` or ``default``) counts as one without native bf16 too: its bf16
    kernels are the emulated ones.

    Example:
        >>> isinstance(bf16_supported(torch.device("cpu")), bool)
        True
    """
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
            return False
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True


def training_precision(device: torch.device, cfg: TrainConfig) -> str:
    """How a training step on ``device`` computes: ``"bf16 autocast"`` or the weights' dtype.

    Example:
        >>> training_precision(torch.device("cpu"), TrainConfig(autocast="off"))
        'float32'
    """
    if cfg.autocast != "off" and bf16_supported(device):
        return "bf16 autocast"
    return cfg.weights_dtype


def _autocast(device: torch.device, cfg: TrainConfig) -> contextlib.AbstractContextManager[Any]:
    if cfg.autocast == "off" or not bf16_supported(device):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


# the offload counters written to the train log each step (OffloadStats fields)
_OFFLOAD_COUNTS = (
    "tensors_packed",
    "tensors_offloaded",
    "host_copies",
    "copies_avoided",
    "bytes_packed",
    "bytes_offloaded",
    "bytes_to_host",
    "bytes_to_device",
    "bytes_moved",
)
_OFFLOAD_PEAKS = ("peak_host_bytes", "peak_device_bytes")


@contextlib.contextmanager
def offload_dkm_layers(
    model: torch.nn.Module, cfg: OffloadConfig
) -> Iterator[SavedTensorOffload | None]:
    """Run every DKM layer's forward under one offload hook (``None`` when not enabled).

    The hooks are attached to each ``DKMLinear`` module (:meth:`SavedTensorOffload.attach`)
    rather than around the whole model forward: what gets offloaded is exactly what the DKM
    layers save (DKM's attention maps and k-means intermediates, the soft weight the matmul
    keeps), while the rest of the network, and by default the layer's input (an activation a
    plain Linear saves too, shared by q/k/v), stays as it is. Hooks around the whole model
    would be activation offload of every layer, many times the traffic; a hook context inside
    ``DKMLinear.forward`` would make the layer class carry offload state. Attached from here,
    the layer stays free of offload logic, ``edkm.offload`` depends on nothing in edkm, and the
    benchmark (``benchmarks/ablation.py``) measures this same function. The hooks are removed
    on exit, also when training raises.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16))
        >>> with offload_dkm_layers(model, OffloadConfig()) as off:
        ...     off is None
        True
    """
    if not cfg.enabled:
        yield None
        return
    offload = SavedTensorOffload(**cfg.hook_kwargs())
    handles = [
        offload.attach(layer, keep_inputs=not cfg.offload_inputs)
        for _, layer in palettized_modules(model)
    ]
    try:
        yield offload
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def offload_decoder_layers(
    model: torch.nn.Module, cfg: OffloadConfig
) -> Iterator[SavedTensorOffload | None]:
    """Activation offload: every decoder layer's forward under one offload hook (``None`` off).

    Unlike :func:`offload_dkm_layers`, a layer's input goes to the host too: what stays on the
    device between forward and backward is only what is smaller than ``min_bytes``. The DKM
    layers' own hooks (when ``enabled``) sit inside these and take what the DKM layers save.

    Example:
        >>> with offload_decoder_layers(torch.nn.Linear(2, 2), OffloadConfig()) as off:
        ...     off is None
        True
    """
    if not cfg.activations:
        yield None
        return
    from edkm.adapters import get_adapter

    offload = SavedTensorOffload(**cfg.hook_kwargs())
    handles = [offload.attach(block) for _, block in get_adapter(model).blocks()]
    try:
        yield offload
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def activation_checkpointing(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Per-decoder-layer activation checkpointing while the block runs (transformers' own).

    Non-reentrant ``torch.utils.checkpoint``: each decoder layer keeps only its input and is
    recomputed in backward; switched off again on exit so evaluation runs as before.

    Example:
        >>> with activation_checkpointing(torch.nn.Linear(2, 2), False):
        ...     pass
    """
    if not enabled:
        yield
        return
    from edkm.errors import InputError

    if not getattr(model, "supports_gradient_checkpointing", False):
        raise InputError(
            "train.activation_checkpointing: the model "
            f"({type(model).__name__}) does not support gradient checkpointing"
        )
    # transformers >= 4.57 renamed gradient_* to activation_checkpointing_* (old names deprecated)
    kwargs = {"use_reentrant": False}
    hf: Any = model  # a transformers PreTrainedModel (checked above)
    if hasattr(hf, "activation_checkpointing_enable"):
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        disable = hf.activation_checkpointing_disable
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        disable = hf.gradient_checkpointing_disable
    try:
        yield
    finally:
        disable()


def build_optimizer(
    params: list[torch.nn.Parameter], cfg: TrainConfig, offload: OffloadConfig
) -> torch.optim.Optimizer:
    """The trainer's AdamW (betas 0.9/0.95): on the device, or in host memory (``offload.optimizer``).

    Example:
        >>> p = [torch.nn.Parameter(torch.zeros(2))]
        >>> type(build_optimizer(p, TrainConfig(), OffloadConfig(optimizer=True))).__name__
        'HostOffloadAdamW'
    """
    if offload.optimizer:
        from edkm.train.optim_offload import HostOffloadAdamW

        return HostOffloadAdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))


def offload_summary(records: list[dict[str, Any]]) -> dict[str, int] | None:
    """The offload counters of a run: per-step counts added up, peaks maxed (None: no offload).

    Example:
        >>> offload_summary([{"offload": {"host_copies": 2, "peak_host_bytes": 8}},
        ...                  {"offload": {"host_copies": 3, "peak_host_bytes": 5}}])
        {'host_copies': 5, 'peak_host_bytes': 8, 'steps': 2}
    """
    steps = [r["offload"] for r in records if r.get("offload") is not None]
    if not steps:
        return None
    out: dict[str, int] = {}
    for step in steps:
        for key, value in step.items():
            if key in _OFFLOAD_PEAKS:
                out[key] = max(out.get(key, 0), value)
            else:
                out[key] = out.get(key, 0) + value
    out["steps"] = len(steps)
    return out


def read_log(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of ``train_log.jsonl`` in ``run_dir`` (one per step; empty if none).

    Example:
        >>> read_log("no/such/run")
        []
    """
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def train(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    cfg: TrainConfig,
    *,
    run_dir: str | os.PathLike[str],
    resume: bool = False,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    show_progress: bool = True,
    teacher: torch.nn.Module | None = None,
    offload: OffloadConfig | None = None,
) -> TrainState:
    """Fine-tune a palettized model on ``(n, seq_len)`` token blocks; returns the final counters.

    ``run_dir`` receives ``train_log.jsonl`` (one JSON object per step) and ``checkpoints/``.
    With ``offload`` enabled, the DKM layers' saved tensors go to host memory
    (:func:`offload_dkm_layers`) and each log record carries the step's offload counters.
    With ``resume=True`` training continues from the newest checkpoint there. With
    ``cfg.distill > 0``, ``teacher`` (:func:`edkm.train.distill.make_teacher` of the model before
    palettization) is required: it is moved to the training device and only run forward.

    Example:
        >>> edkm.palettize_(model, edkm.DKMConfig(bits=3))  # doctest: +SKIP
        >>> train(model, blocks, TrainConfig(steps=100), run_dir="runs/x")  # doctest: +SKIP
    """
    if cfg.distill > 0 and teacher is None:
        raise ValueError(f"TrainConfig.distill={cfg.distill} needs a teacher model")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    accelerator = _accelerator(cfg)
    # under torchrun / accelerate launch: FSDP2 + edkm's sharded DKM (edkm.shard.train); the
    # sharded run then stands in for the Accelerator (device, backward, clipping, checkpoints)
    from edkm.shard.train import launched_run

    sharded = launched_run(model, cfg, accelerator)
    if sharded is not None:
        accelerator = sharded
    main = sharded is None or sharded.is_main
    # a teacher given without distillation is not run
    teacher = teacher.to(accelerator.device) if teacher is not None and cfg.distill > 0 else None
    offload = offload or OffloadConfig()
    if sharded is not None and offload.optimizer:
        from edkm.errors import InputError

        raise InputError(
            "offload.optimizer: not available in a sharded (launched) run; "
            "FSDP2 shards the optimizer state already"
        )
    params = trainable_parameters(model, cfg)
    if sharded is None and offload.optimizer:
        # the host copies are taken from the parameters where they will train
        model = accelerator.prepare(model)
    optimizer = build_optimizer(params, cfg, offload)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    if sharded is None and not offload.optimizer:
        model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState()
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is not None and sharded is not None:
            state = sharded.load_checkpoint(ckpt, optimizer=optimizer, scheduler=scheduler)
        elif ckpt is not None:
            state = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
    log_path = run_dir / LOG_FILE if main else Path(os.devnull)
    if main:
        _truncate_log(log_path, state.step)
    sigterm_at = int(os.environ.get(_SIGTERM_AT_ENV, "-1"))
    model.train()
    start_wall = time.perf_counter() - state.elapsed_s
    cpu_warned = False
    with (
        _SignalFlag() as flag,
        log_path.open("a") as log,
        progress(
            total=cfg.steps, desc="train", unit="step", disable=not (show_progress and main)
        ) as bar,
        activation_checkpointing(accelerator.unwrap_model(model), cfg.activation_checkpointing),
        offload_decoder_layers(accelerator.unwrap_model(model), offload) as act_hooks,
        offload_dkm_layers(model, offload) as hooks,
    ):
        bar.update(state.step)
        while state.step < cfg.steps:
            for h in (hooks, act_hooks):
                if h is not None:
                    h.reset_stats()
            record = _train_step(
                model, blocks, cfg, state, optimizer, scheduler, accelerator, teacher
            )
            if hooks is not None:
                stats = hooks.stats.to_dict()
                record["offload"] = {k: stats[k] for k in _OFFLOAD_COUNTS + _OFFLOAD_PEAKS}
            if act_hooks is not None:
                stats = act_hooks.stats.to_dict()
                record["activation_offload"] = {
                    k: stats[k] for k in _OFFLOAD_COUNTS + _OFFLOAD_PEAKS
                }
            state.elapsed_s = time.perf_counter() - start_wall
            record["elapsed_s"] = round(state.elapsed_s, 3)
            if sharded is None and not cpu_warned:  # ranks sharing a CPU wait on each other
                cpu_warned = warn_if_cpu_contended(record)
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if on_step is not None:
                on_step(record)
            if state.step == sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)
            final = state.step == cfg.steps
            if flag.signum is not None or final or state.step % cfg.checkpoint_every == 0:
                path = (
                    sharded.save_checkpoint(
                        run_dir, optimizer=optimizer, scheduler=scheduler, state=state
                    )
                    if sharded is not None
                    else save_checkpoint(
                        run_dir,
                        model=accelerator.unwrap_model(model),
                        optimizer=optimizer,
                        scheduler=scheduler,
                        state=state,
                    )
                )
                if flag.signum is not None and not final:
                    raise TrainingInterrupted(flag.signum, state.step, path)
    # the temperature of the last step, also when a resumed run had no step left to take
    set_tau_scale(model, tau_scale(cfg.steps - 1, cfg))
    model.eval()
    return state


def _train_step(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    cfg: TrainConfig,
    state: TrainState,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    accelerator: Any,
    teacher: torch.nn.Module | None,
) -> dict[str, Any]:
    t0, cpu0 = time.perf_counter(), time.process_time()
    scale = tau_scale(state.step, cfg)
    set_tau_scale(model, scale)
    idx = block_indices(state.step, cfg, blocks.shape[0])
    total_loss = total_ce = total_kd = 0.0
    for micro in _chunks(idx, cfg.batch_size):
        batch = blocks[micro]
        if hasattr(accelerator, "local_batch"):  # a sharded run: this rank's share
            batch = accelerator.local_batch(batch)
        batch = batch.to(accelerator.device)
        with _autocast(accelerator.device, cfg):
            out = model(input_ids=batch, labels=batch)
            loss = out.loss
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=batch).logits
                kd = distill_loss(out.logits, teacher_logits)
                total_ce += float(loss.detach()) / cfg.grad_accum
                total_kd += float(kd.detach()) / cfg.grad_accum
                loss = (1 - cfg.distill) * loss + cfg.distill * kd
                del teacher_logits
        del out
        accelerator.backward(loss / cfg.grad_accum)
        total_loss += float(loss.detach()) / cfg.grad_accum
        # the loss holds its graph's nodes (and what autograd Functions keep on their ctx,
        # e.g. the uniquified DKM tables) until it is dropped: not into the next micro-batch
        del loss
    clip = getattr(optimizer, "clip_grad_norm_", None)  # HostOffloadAdamW: host gradients
    if clip is not None:
        grad_norm = clip(cfg.max_grad_norm)
    else:
        grad_norm = accelerator.clip_grad_norm_(
            [p for g in optimizer.param_groups for p in g["params"]], cfg.max_grad_norm
        )
    if hasattr(accelerator, "mean"):  # a sharded run: the loss of the global batch
        total_loss = accelerator.mean(total_loss)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    state.step += 1
    tokens = idx.numel() * blocks.shape[1]
    state.tokens_seen += tokens
    dt = time.perf_counter() - t0
    record = {
        "step": state.step,
        "loss": round(total_loss, 6),
        "lr": lr,
        "tau_scale": scale,
        "grad_norm": round(float(grad_norm), 6),
        "tokens": state.tokens_seen,
        "tokens_per_s": tokens / dt,
        "step_s": round(dt, 4),
    }
    if teacher is not None:
        record["ce"] = round(total_ce, 6)
        record["kd"] = round(total_kd, 6)
    if accelerator.device.type == "cpu":
        record["cpu_share"] = round(cpu_share(time.process_time() - cpu0, dt), 3)
    return record


def cpu_share(cpu_s: float, wall_s: float, threads: int | None = None) -> float:
    """The share of its cores' time a CPU step got: process CPU seconds / (wall x threads).

    ``threads`` defaults to PyTorch's intra-op threads, capped by the cores this process may
    run on. A step alone on its cores gets close to 1 (OpenMP threads spin while they wait);
    one that shares them with another busy process gets about its share or less, and such a
    step can take several times as long (measured: 140-190 s against 24-27 s alone, see
    docs/quality.md), hence :func:`warn_if_cpu_contended`.

    Example:
        >>> cpu_share(cpu_s=30.0, wall_s=20.0, threads=2)
        0.75
    """
    if threads is None:
        affinity = getattr(os, "sched_getaffinity", None)  # Linux; macOS and Windows lack it
        cores = len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)
        threads = min(torch.get_num_threads(), cores)
    return cpu_s / max(wall_s * threads, 1e-9)


CONTENDED_CPU_SHARE = 0.6  # below it, a CPU step is taken to be competing for its cores


def warn_if_cpu_contended(record: dict[str, Any]) -> bool:
    """Warn when a CPU step's ``cpu_share`` shows another process competing for the cores.

    Returns whether it warned (the trainer warns once a run).

    Example:
        >>> warn_if_cpu_contended({"step": 3, "cpu_share": 0.95})
        False
    """
    share = record.get("cpu_share")
    if share is None or share >= CONTENDED_CPU_SHARE:
        return False
    warnings.warn(
        f"edkm: training step {record['step']} got {share:.0%} of its CPU threads' time: "
        "another process is competing for the cores, and a CPU run sharing them can be "
        "several times slower than one alone (the log's cpu_share, every step)",
        RuntimeWarning,
        stacklevel=3,
    )
    return True


def _chunks(idx: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for start in range(0, idx.numel(), size):
        yield idx[start : start + size]


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of steps <= ``step`` (a resumed run rewrites what came after)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    atomic.write_text(path, "".join(ln + "\n" for ln in kept))
