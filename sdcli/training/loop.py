"""The training loop both trainers share: AdamW with warm-up then cosine decay, gradient accumulation and
clipping, EMA, mixed precision on CUDA, DistributedDataParallel under torchrun, checkpoints and resume,
metrics.jsonl and the progress bar.

A Task says what is trained and how one micro-batch's loss is computed (see training.vae, training.unet);
this module knows nothing about autoencoders or denoisers.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from sdcli import distributed
from sdcli.errors import SdcliError
from sdcli.fileio import atomic_path
from sdcli.training import checkpoint
from sdcli.training.config import TrainConfig
from sdcli.training.data import positions


class Task(Protocol):
    net: nn.Module  # every trained module; DDP wraps it, EMA follows it, checkpoints save it
    disc: nn.Module | None  # a second network with its own optimizer (the VAE's discriminator), or None

    def loss(self, net: nn.Module, step: int, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                              dict[str, float]]:
        """(the net's loss, the disc's loss or None, numbers to log) for the samples at `positions`."""

    def save_model(self, out: Path, step: int) -> None:
        """Write the output model (called with the EMA weights in place)."""

    def validate(self, out: Path, step: int) -> dict[str, float]:
        """Write a validation grid (EMA weights in place); returns numbers to log."""

    def state(self) -> dict:
        """Task-specific values a resume needs (config, architecture)."""


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up from 0 to 1 over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class EMA:
    """Exponential moving average of the trainable parameters, decay warmed up as min(d, (1+n)/(10+n))."""

    def __init__(self, net: nn.Module, decay: float):
        self.decay = decay
        self.params = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, net: nn.Module, updates: int) -> None:
        d = min(self.decay, (1 + updates) / (10 + updates))
        live = dict(net.named_parameters())
        names = list(self.params)
        torch._foreach_lerp_([self.params[n] for n in names], [live[n].detach() for n in names], 1 - d)

    @contextlib.contextmanager
    def swapped_in(self, net: nn.Module):
        """The EMA weights in the net's parameters for the block (saving, validation)."""
        live = dict(net.named_parameters())
        backup = {n: live[n].detach().clone() for n in self.params}
        with torch.no_grad():
            for n, v in self.params.items():
                live[n].copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, v in backup.items():
                    live[n].copy_(v)


@dataclass
class Precision:
    """Mixed precision on CUDA: autocast in bf16, or in fp16 with a gradient scaler."""

    device: torch.device
    mode: str  # "no", "bf16", "fp16"

    def __post_init__(self):
        if self.mode != "no" and self.device.type != "cuda":
            raise SdcliError(f"--mixed-precision {self.mode} needs a CUDA GPU; on {self.device.type} training runs "
                             "in fp32 (--mixed-precision no)")
        self.scaler = torch.amp.GradScaler("cuda") if self.mode == "fp16" else None

    def autocast(self):
        if self.mode == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.mode == "bf16" else torch.float16)


def train(task: Task, cfg: TrainConfig, out: Path, device: torch.device, resume: dict | None, progress) -> None:
    """Run optimizer steps up to cfg.max_steps, from a checkpoint's state when resuming."""
    rank, world, _ = distributed.world()
    main = rank == 0
    net = task.net.to(device)
    wrapped = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise SdcliError("nothing to train: every weight is frozen")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    disc_optimizer = None
    if task.disc is not None:
        task.disc.to(device)
        disc_optimizer = torch.optim.AdamW(task.disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9))  # LDM's GAN betas
    ema = EMA(net, cfg.ema_decay) if cfg.ema_decay else None
    precision = Precision(device, cfg.mixed_precision)

    step = 0
    if resume is not None:
        net.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if ema is not None:
            ema.params = {k: v.to(device) for k, v in resume["ema"].items()}
        if task.disc is not None:
            task.disc.load_state_dict(resume["disc"])
            disc_optimizer.load_state_dict(resume["disc_optimizer"])
        if precision.scaler is not None and resume.get("scaler"):
            precision.scaler.load_state_dict(resume["scaler"])
        torch.set_rng_state(resume["rng"][rank] if rank < len(resume["rng"]) else resume["rng"][0])
        step = resume["step"]
    metrics = Metrics(out / "metrics.jsonl", after=step) if main else None

    def state() -> dict:
        rng = _gather(torch.get_rng_state())  # every rank's, so each resumes its own
        return {
            "step": step, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
            "ema": ema.params if ema else {}, "disc": task.disc.state_dict() if task.disc else None,
            "disc_optimizer": disc_optimizer.state_dict() if disc_optimizer else None,
            "scaler": precision.scaler.state_dict() if precision.scaler else None,
            "rng": rng, "world_size": world, "config": task.state(),
        }

    def save() -> None:
        snapshot = state()  # collective: every rank takes part
        if main:
            with ema.swapped_in(net) if ema else contextlib.nullcontext():
                task.save_model(out, step)
            path = checkpoint.save(out, step, snapshot, cfg.keep)
            progress.message(f"step {step}: saved {path}")
        distributed.barrier()

    def validate() -> None:
        if main:
            with ema.swapped_in(net) if ema else contextlib.nullcontext():
                logs = task.validate(out, step)
            if logs:
                metrics.write({"step": step, **{f"val_{k}": v for k, v in logs.items()}})
        distributed.barrier()

    validate_every = cfg.validate_every or cfg.save_every
    saved = step
    start, start_step = time.perf_counter(), step
    with progress.training(cfg.max_steps, step) as bar:
        try:
            while step < cfg.max_steps:
                factor = lr_factor(step, cfg.warmup_steps, cfg.max_steps)
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * factor
                if disc_optimizer is not None:
                    for group in disc_optimizer.param_groups:
                        group["lr"] = cfg.lr * factor
                logs = _accumulate(task, wrapped, cfg, step, rank, world, precision)
                _step(optimizer, params, cfg.max_grad_norm, precision)
                if disc_optimizer is not None and logs.pop("_disc_active", 0):
                    _average_gradients(task.disc)  # not under DDP: see training.vae
                    _step(disc_optimizer, list(task.disc.parameters()), cfg.max_grad_norm, precision)
                if precision.scaler is not None:
                    precision.scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if disc_optimizer is not None:
                    disc_optimizer.zero_grad(set_to_none=True)
                step += 1
                if ema is not None:
                    ema.update(net, step)
                logs = _average_logs(logs)
                if main:
                    rate = (step - start_step) / (time.perf_counter() - start)
                    metrics.write({"step": step, "lr": cfg.lr * factor, **logs, "it_s": rate})
                    bar(step, logs["loss"])
                if step % cfg.save_every == 0 or step == cfg.max_steps:
                    save()
                    saved = step
                if step % validate_every == 0 or step == cfg.max_steps:
                    validate()
        except KeyboardInterrupt:
            if world == 1 and step > saved:
                save()
                raise SdcliError(f"interrupted at step {step}: saved a checkpoint; run the same command with "
                                 "--resume to continue", ) from None
            raise


def _accumulate(task: Task, wrapped: nn.Module, cfg: TrainConfig, step: int, rank: int, world: int,
                precision: Precision) -> dict[str, float]:
    """Forward and backward over cfg.grad_accum micro-batches; DDP syncs gradients on the last one only."""
    totals: dict[str, float] = {}
    for micro in range(cfg.grad_accum):
        last = micro == cfg.grad_accum - 1
        sync = contextlib.nullcontext() if last or world == 1 else wrapped.no_sync()
        with sync:
            with precision.autocast():
                loss, disc_loss, logs = task.loss(wrapped, step, positions(step, micro, rank, world, cfg.batch_size,
                                                                          cfg.grad_accum))
            total = loss if disc_loss is None else loss + disc_loss  # disjoint parameters: see training.vae
            total = total / cfg.grad_accum
            (precision.scaler.scale(total) if precision.scaler else total).backward()
        if not torch.isfinite(loss):
            raise SdcliError(f"the loss became {loss.item()} at step {step}: lower --lr, or resume from an earlier "
                             "checkpoint")
        logs = {"loss": loss.item(), **logs, **({"_disc_active": 1} if disc_loss is not None else {})}
        for k, v in logs.items():
            totals[k] = totals.get(k, 0.0) + v / cfg.grad_accum
    return totals


def _step(optimizer, params: list[torch.Tensor], max_norm: float, precision: Precision) -> None:
    if precision.scaler is not None:
        precision.scaler.unscale_(optimizer)
    if max_norm:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    if precision.scaler is not None:
        precision.scaler.step(optimizer)
    else:
        optimizer.step()


# --- collectives (no-ops in a single process) -----------------------------------------------------------


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _gather(obj) -> list:
    if not _distributed():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _average_gradients(module: nn.Module) -> None:
    if _distributed():
        for p in module.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= torch.distributed.get_world_size()


def _average_logs(logs: dict[str, float]) -> dict[str, float]:
    if not _distributed():
        return logs
    keys = sorted(logs)
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"  # NCCL reduces CUDA tensors only
    values = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(values)
    return dict(zip(keys, (values / torch.distributed.get_world_size()).cpu().tolist(), strict=True))


class Metrics:
    """metrics.jsonl: one JSON object per line. A resumed run first drops the lines after its checkpoint, so
    the log reads as one uninterrupted run."""

    def __init__(self, path: Path, after: int):
        self.path = path
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if line.strip()
                    and json.loads(line).get("step", 0) <= after]
            with atomic_path(path, overwrite=True) as tmp:  # a kill here keeps the whole log
                tmp.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in record.items()}) + "\n")
