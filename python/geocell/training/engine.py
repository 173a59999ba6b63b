"""Training machinery: distributed setup, optimiser and schedule, the epoch loop, logging, RNG state.

The evaluation pass lives in geocell.infer.evaluate (evaluate_loader).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from geocell._internal.progress import progress_bar
from geocell._internal.torch_util import autocast_context

# ---------------------------------------------------------------------------------------------
# Distributed (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK; NCCL on GPU, gloo on CPU)


class DistInfo:
    def __init__(self, rank=0, world=1, local_rank=0, device=torch.device("cpu")):
        self.rank, self.world, self.local_rank, self.device = rank, world, local_rank, device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def init_distributed(device_name: str = "auto") -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local_rank, device)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_min(value: int, info: DistInfo) -> int:
    if not info.enabled:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=info.device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def all_reduce_mean(values: dict, info: DistInfo) -> dict:
    """Average a dict of floats over ranks."""
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                     device=info.device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return {k: float(v) / info.world for k, v in zip(keys, t.tolist())}


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Reproducibility


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    # Checkpoints store tuples as lists and arrays as tensors (weights_only-safe); convert back.
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], np.asarray(npst[1], dtype=np.uint32), int(npst[2]), int(npst[3]), float(npst[4])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# ---------------------------------------------------------------------------------------------
# Optimiser and learning-rate schedule


def build_optimizer(model, lr: float, momentum: float, weight_decay: float):
    # No weight decay on biases and batch-norm parameters (the usual ResNet practice).
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=False)


def default_milestones(epochs: int) -> list[int]:
    return sorted({max(1, round(epochs * 2 / 3)), max(1, round(epochs * 8 / 9))} - {epochs}) or [max(1, epochs)]


class LRSchedule:
    """Learning-rate factor per optimizer step: linear warm-up, then either the 2018 recipe's
    multi-step decay (x gamma at each milestone epoch, MultiStepLR semantics) or cosine to zero.

    ``total_steps`` (a time-budgeted run, whose last epoch may be partial) sets where the
    schedule ends; by default ``epochs`` whole epochs. The default milestones are 2/3 and 8/9
    of the run: whole epochs when the run is whole epochs (the recipe as it always was), else
    those fractions of its steps."""

    def __init__(self, kind: str, steps_per_epoch: int, epochs: int, milestones=None, gamma=0.5, warmup_epochs=0.0,
                 total_steps: int | None = None):
        if kind not in ("step", "cosine"):
            raise ValueError(f"unknown schedule {kind!r} (step or cosine)")
        self.kind = kind
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.total = int(total_steps) if total_steps else self.steps_per_epoch * max(1, int(epochs))
        whole, rest = divmod(self.total, self.steps_per_epoch)
        if milestones:
            self.milestones = [int(m) * self.steps_per_epoch for m in milestones]
        elif rest == 0:
            self.milestones = [m * self.steps_per_epoch for m in default_milestones(max(1, whole))]
        else:
            self.milestones = sorted({max(1, round(self.total * 2 / 3)), max(1, round(self.total * 8 / 9))})
        self.gamma = float(gamma)
        self.warmup = int(round(float(warmup_epochs) * self.steps_per_epoch))

    def __call__(self, step: int) -> float:
        factor = 1.0
        if self.warmup and step < self.warmup:
            factor = (step + 1) / self.warmup
        if self.kind == "step":
            return factor * self.gamma ** sum(step >= m for m in self.milestones)
        progress = min(1.0, step / self.total)
        return factor * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, schedule: LRSchedule):
    # LambdaLR stepped once per optimizer step; its state_dict holds only numbers (weights_only-safe).
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


# ---------------------------------------------------------------------------------------------
# Logging: JSONL always, TensorBoard when installed, rank 0 only


class MetricLogger:
    def __init__(self, run_dir: str | None, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled and run_dir is not None
        self.file = None
        self.tb = None
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.file = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except Exception:  # tensorboard not installed: JSONL only
                self.tb = None

    def log(self, record: dict, step: int, prefix: str = "") -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **record}, default=float) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in _flatten(record).items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.tb.add_scalar(f"{prefix}{key}", value, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---------------------------------------------------------------------------------------------
# One training epoch


@dataclass
class EpochOptions:
    """How an epoch runs (fixed for the whole run)."""

    steps: int                   # optimizer steps per epoch (the same on every rank)
    amp_dtype: object = None     # autocast dtype, None for full precision
    scaler: object = None        # torch.amp.GradScaler for fp16
    channels_last: bool = False
    stop_after_steps: int = 0    # stop once this many steps are done in total (0: never)
    log_every: int = 20
    show_progress: bool = True


def train_one_epoch(model, criterion, loader, state, info: DistInfo, options: EpochOptions, *,
                    on_step=None, logger: MetricLogger | None = None, resume_rng=None):
    """Trains epoch ``state.epoch`` from step ``state.step_in_epoch`` (a mid-epoch resume starts
    there) to its end, or until ``options.stop_after_steps``. ``state`` (a
    :class:`~geocell.training.state.TrainState`) is updated after every step, so ``on_step(state)``
    (periodic checkpoints) always sees where the run is. ``resume_rng``: RNG state to restore
    once the loader is positioned (a resumed epoch continues the same random streams).
    Returns (mean training metrics of the steps run, stopped early)."""
    model.train()
    device = info.device
    skip = state.step_in_epoch
    bar = progress_bar(options.steps, options.show_progress and info.is_main, f"epoch {state.epoch + 1}",
                       unit="batch", dynamic_ncols=True, mininterval=1.0, leave=False)
    if skip:
        bar.update(skip)
    sums: dict = {}
    count = 0
    window_images, window_start = 0, time.perf_counter()
    stopped = False
    if skip and hasattr(loader, "skip_batches"):
        # The loader starts at batch `skip` of the epoch without loading the batches before it;
        # its batches depend only on (seed, epoch, position), so this equals the uninterrupted run.
        loader.skip_batches(skip)
        it = iter(loader)
    else:
        it = iter(loader)
        for _ in range(skip):
            next(it)
    if resume_rng is not None:
        set_rng_state(resume_rng)
    optimizer, scheduler, scaler = state.optimizer, state.scheduler, options.scaler
    for _ in range(skip, options.steps):
        try:
            images, targets = next(it)
        except StopIteration:
            break
        images = images.to(device, non_blocking=True)
        if options.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = {k: v.to(device, non_blocking=True) for k, v in targets.items()}
        with autocast_context(device, options.amp_dtype):
            geo_logits, scene_logits = model(images)
        loss, parts = criterion(geo_logits, scene_logits, targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        state.step += 1
        state.step_in_epoch += 1
        count += 1
        window_images += images.shape[0] * info.world

        # Synchronising on .item() every step costs little next to a ResNet step; keeps logs exact.
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        if not math.isfinite(float(parts["loss"])):
            raise FloatingPointError(f"loss is {float(parts['loss'])} at epoch {state.epoch + 1}, step {state.step}; "
                                     "lower --lr or check the data")
        bar.update(1)
        if options.log_every and state.step % options.log_every == 0:
            elapsed = time.perf_counter() - window_start
            record = {"epoch": state.epoch + state.step_in_epoch / options.steps,
                      "lr": optimizer.param_groups[0]["lr"],
                      "images_per_s": window_images / max(elapsed, 1e-9),
                      **{k: float(v) for k, v in parts.items()}}
            bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['images_per_s']:.0f}")
            if logger is not None:
                logger.log(record, state.step, prefix="train/")
            window_images, window_start = 0, time.perf_counter()
        if options.stop_after_steps and state.step >= options.stop_after_steps:
            stopped = True
            break
        if on_step is not None:
            on_step(state)
    bar.close()
    means = {k: v / max(count, 1) for k, v in sums.items()}
    return all_reduce_mean(means, info), stopped


# ---------------------------------------------------------------------------------------------
# A short measurement of the machine in hand (for --time-budget)


def evaluation_channels_last(channels_last: bool, device) -> bool:
    """Whether evaluation and the index run in channels_last too. On a CPU they keep the NCHW
    layout of geocell evaluate and Geolocator (the layouts' results differ in the last float
    digits), so a run's tables are the ones those commands reproduce."""
    return bool(channels_last) and torch.device(device).type == "cuda"


def probe_rates(model, criterion, loaders: dict, *, info: DistInfo, amp_dtype, channels_last_options=(False,),
                warmup: int = 2, steps: int = 6, eval_batches: int = 3) -> tuple:
    """Times real training steps on copies of ``model`` (the run's model, optimiser and RNG are
    left untouched, and a loader's batches depend only on (seed, epoch, position), so the run
    that follows is the run without the probe): ``warmup`` untimed and ``steps`` timed steps
    for each training loader of ``loaders`` ({backend: loader}) and each memory format in
    ``channels_last_options``, then ``eval_batches`` forward passes in evaluation mode (full
    precision and layout, as evaluation runs) with the fastest loader. Returns ({(backend, channels_last):
    training images/s over all ranks}, evaluation images/s over all ranks, the fastest pair);
    the same on every rank."""
    import copy

    device = info.device

    def batches(loader):
        loader.set_epoch(0)
        for images, targets in loader:
            yield images.to(device, non_blocking=True), {k: v.to(device, non_blocking=True) for k, v in targets.items()}

    def images_per_s(loader, net, cl: bool, untimed: int, timed: int, make_step) -> float:
        # ``make_step(net)(images, targets)`` timed over ``timed`` batches after ``untimed`` ones
        if cl:
            net = net.to(memory_format=torch.channels_last)
        step = make_step(net)
        seconds, seen, it = 0.0, 0, batches(loader)
        for k in range(untimed + timed):
            try:
                images, targets = next(it)
            except StopIteration:
                break
            t0 = time.perf_counter()
            if cl:
                images = images.contiguous(memory_format=torch.channels_last)
            step(images, targets)
            if k >= untimed:
                seconds, seen = seconds + time.perf_counter() - t0, seen + images.shape[0]
        rate = seen / seconds if seconds > 0 else 0.0
        return all_reduce_mean({"rate": rate}, info)["rate"] * info.world

    def train_step(net):
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

        def step(images, targets):
            with autocast_context(device, amp_dtype):
                geo_logits, scene_logits = net(images)
            loss, _ = criterion(geo_logits, scene_logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            float(loss.detach())  # waits for the device
        return step

    def eval_step(net):
        @torch.no_grad()
        def step(images, targets):
            geo_logits, _ = net(images)
            if geo_logits:
                float(geo_logits[0].sum())  # waits for the device
        return step

    train_rates = {(backend, cl): images_per_s(loaders[backend], copy.deepcopy(model).train(), cl, warmup, steps,
                                               train_step)
                   for backend in loaders for cl in channels_last_options}
    fastest = max(train_rates, key=train_rates.get)
    # the first pass warms up; evaluation in the layout evaluation runs in
    eval_rate = images_per_s(loaders[fastest[0]], copy.deepcopy(model).eval(),
                             evaluation_channels_last(fastest[1], device), 1, eval_batches, eval_step)
    eval_rate = eval_rate or train_rates[fastest]
    return train_rates, eval_rate, fastest
