"""Train the multitask geolocation network (``geocell train`` or ``python train/run.py``).

With no arguments it builds the small Earth dataset (./data/earth) if missing, trains the default
trunk (EfficientNet-Lite0 from its ImageNet weights) within a ten-minute budget and prints the
accuracy table. Multi-GPU / multi-node: launch with torchrun, e.g.
``torchrun --nproc_per_node 8 train/run.py --manifest mp16.csv --arch resnet50 --image-size 224``.

Reads top to bottom: configuration -> data -> partitionings -> model -> optimiser -> loop -> report.

--resume restores model, optimiser, schedule, scaler, epoch/step (mid-epoch too, with
--checkpoint-every), RNG states and the loader epoch; a mid-epoch resume starts the loader at the
next batch (loader.skip_batches). The loaders draw each epoch's order from (seed, epoch) and each
sample's crop/flip from (seed, epoch, row), so the resumed run is bit-for-bit identical to an
uninterrupted one on the same machine with either backend and any --workers (the tests check torch
with 0 and 2 workers and DALI on the CPU); exception: DALI over packed shards (see geocell.loading.dali_backend).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import functools
import json
import os
import shutil
import time

import numpy as np
import torch

from geocell.partition import Partition, hierarchy as cell_hierarchy, partitions as adaptive_partitions
from geocell._internal.torch_util import training_autocast_dtype
from geocell.data.dataset import read_dataset
from geocell.data.manifest import read_manifest
from geocell.data.splits import held_out_split, min_distance_km, validation_rows
from geocell.infer import fitting
from geocell.infer.bands import band_section
from geocell.infer.evaluate import (REGION_MASSES, accuracy_rows, evaluate_loader, format_calibration,
                                    format_intervals)
from geocell.infer.metrics import (
    HIERARCHY_ROW,
    HYBRID_ROW,
    gather_concat,
    accuracy_from_errors,
    bootstrap_interval,
    format_interval_table,
    format_table,
    location_blocks,
    select_score,
)
from geocell.model.records import Calibration, partition_names
from geocell.infer.retrieval import RetrievalIndex, forward_with_embeddings, index_path_for
from geocell.loading.loaders import make_loader
from geocell.loading.labels import LabelTable
from geocell.training import engine
from geocell.training.budget import DEFAULT_BUDGET_S, Rates, StageClock, parse_budget, plan_steps
from geocell.model.checkpoint import (load_checkpoint, model_fingerprint, partition_from_dict,
                                     save_checkpoint)
from geocell.training.config import TrainConfig, preprocess_from_config, save_yaml, scaled_taus
from geocell.training.losses import MultitaskLoss
from geocell.model.network import GeoModel
from geocell.training.state import TrainState, gather_rng


# The fits after training (calibration, hybrid, background, regions, intervals) per validation
# and test image, measured on the default run (2-core AVX-512 CPU); the budget's safety share
# covers a slower CPU.
FIT_SECONDS_PER_IMAGE = 0.009


def log(info, *args) -> None:
    if info.is_main:
        print(*args, flush=True)


# ---------------------------------------------------------------------------------------------
# Data


def load_data(cfg: TrainConfig, info):
    """(train, val, test) manifests; test is None when there is no test split."""
    manifest_path = cfg.manifest
    if manifest_path is None:
        from geocell.data.earth import build_earth, build_recipe, built_with, default_far, default_land

        manifest_path = os.path.join(cfg.data_dir, "manifest.csv")
        found = built_with(cfg.data_dir) if os.path.isfile(manifest_path) else None
        n_far = default_far(cfg.earth_n) if cfg.earth_far is None else cfg.earth_far
        n_land = default_land(cfg.earth_n) if cfg.earth_land is None else cfg.earth_land
        wanted = build_recipe(cfg.earth_n, cfg.earth_size, 0, cfg.earth_split, n_scenes=cfg.earth_scenes, n_far=n_far,
                              n_land=n_land)
        if found != wanted:
            if info.is_main:
                if os.path.isfile(manifest_path):
                    print(f"{cfg.data_dir} was built with other settings ({found or 'no build.json'}); rebuilding",
                          flush=True)
                print(f"building the Earth dataset ({cfg.earth_n} images, {n_far} far places and {n_land} land places, "
                      f"{cfg.earth_size} px, {cfg.earth_split} split) in {cfg.data_dir}", flush=True)
                t0 = time.perf_counter()
                manifest_path = str(build_earth(os.path.abspath(cfg.data_dir), n=cfg.earth_n, size=cfg.earth_size, seed=0,
                                                split_rule=cfg.earth_split, n_scenes=cfg.earth_scenes, n_far=n_far,
                                                n_land=n_land, progress=cfg.progress))
                print(f"built in {time.perf_counter() - t0:.0f} s", flush=True)
            engine.barrier(info)
    full = read_dataset(manifest_path, image_root=cfg.image_root)
    if full.report:
        log(info, f"{manifest_path}: {len(full.report)} unusable rows left out\n{full.format_report()}")
    test = None
    if cfg.val_manifest:
        val = read_dataset(cfg.val_manifest, image_root=cfg.image_root)
        train = full.subset(full.split == "train") if full.split is not None and (full.split == "train").any() else full
    elif validation_rows(full).any():
        train = full.subset(full.split == "train")
        val = full.subset(validation_rows(full))
        test = full.subset(full.split == "test") if (full.split == "test").any() else None
    elif cfg.holdout == "random":
        # the old draw: val/test photos near training photos (measures memorisation)
        order = np.random.default_rng(cfg.seed).permutation(len(full))
        n_val = max(1, int(round(cfg.val_fraction * len(full))))
        n_test = int(round(cfg.val_fraction * len(full)))
        val = full.subset(np.sort(order[:n_val]))
        test = full.subset(np.sort(order[n_val:n_val + n_test])) if n_test else None
        train = full.subset(np.sort(order[n_val + n_test:]))
    else:
        # No split given: val and test are places the model has not seen (see geocell.data.splits)
        split = held_out_split(full.lat, full.lng, fractions={"val": cfg.val_fraction, "test": cfg.val_fraction},
                               block_level=cfg.holdout_block_level, buffer_km=cfg.holdout_buffer_km, seed=cfg.seed)
        log(info, f"held-out split: whole S2 level-{cfg.holdout_block_level} blocks, no val/test photo within "
                  f"{cfg.holdout_buffer_km:g} km of a training photo ({int((split == '').sum())} photos in the "
                  f"border left out)")
        train, val = full.subset(split == "train"), full.subset(split == "val")
        test = full.subset(split == "test") if (split == "test").any() else None
    if len(train) == 0 or len(val) == 0:
        raise SystemExit(f"{manifest_path}: needs training and validation rows (got {len(train)} and {len(val)})")
    return train, val, test


def scene_dataset(cfg: TrainConfig) -> str | None:
    """The scene-labelled images the helper learns from: --scene-manifest, else the Earth
    dataset's scenes.csv when training on the Earth dataset."""
    if cfg.scene_manifest:
        return cfg.scene_manifest
    if cfg.manifest is None:
        from geocell.data.earth import scene_dataset_path

        path = scene_dataset_path(cfg.data_dir)
        return str(path) if path is not None else None
    return None


def propagate_scenes(cfg: TrainConfig, info, run_dir: str, splits: dict, resume: bool) -> dict:
    """The helper network: trained on the scene dataset, it labels every GPS image (the
    ``splits`` manifests, train first), whose own scene labels are withheld. Writes
    ``scene_helper.pt`` and ``scene_labels.csv`` (one row per GPS image: its split, the label and
    the ``scene_prob_<name>`` columns) in the run folder and returns {split: propagated labels}
    plus a summary under "summary". A resumed run reads its scene_labels.csv back."""
    from geocell.data.manifest import Manifest, write_manifest
    from geocell.training import scenes

    labels_path = os.path.join(run_dir, "scene_labels.csv")
    summary = {}
    if info.is_main and not (resume and os.path.isfile(labels_path)):
        t0 = time.perf_counter()
        source = scene_dataset(cfg)
        scene_set = read_dataset(source, image_root=None)
        labelled = scene_set.subset(scene_set.scene >= 0)
        is_val = validation_rows(labelled)
        options = scenes.HelperOptions(arch=cfg.helper_arch, epochs=cfg.helper_epochs, lr=cfg.helper_lr,
                                       image_size=cfg.helper_image_size, batch_size=cfg.batch_size,
                                       backend=cfg.backend, workers=cfg.workers, seed=cfg.seed, progress=cfg.progress)
        names = list(scene_set.scene_names)
        cache = scenes.HelperCache(source, options, splits)
        cached = cache.load()
        if cached is not None:
            probs, accuracy = cached
            shutil.copyfile(cache.helper_path, os.path.join(run_dir, "scene_helper.pt"))
            log(info, f"scene helper: the one trained by an earlier run on the same data and options ({cache.folder})")
        else:
            log(info, f"scene helper ({cfg.helper_arch}): {int((~is_val).sum())} training / {int(is_val.sum())} "
                      f"validation images of {source}, scenes {', '.join(names)}")
            model, accuracy = scenes.train_helper(labelled.subset(~is_val), labelled.subset(is_val), names, options,
                                                  info.device, log=lambda m: log(info, m))
            scenes.save_helper(os.path.join(run_dir, "scene_helper.pt"), model, names, options)
            probs = {name: scenes.label_images(model, m, options, info.device) for name, m in splits.items()}
            cache.store(os.path.join(run_dir, "scene_helper.pt"), probs, accuracy)
        rows = {name: scenes.apply_labels(m, probs[name], names, np.ones(len(m), bool))[0] for name, m in splits.items()}
        everything = Manifest(paths=[p for m in rows.values() for p in m.paths],
                              lat=np.concatenate([m.lat for m in rows.values()]),
                              lng=np.concatenate([m.lng for m in rows.values()]),
                              scene=np.concatenate([m.scene for m in rows.values()]), scene_names=names,
                              split=np.concatenate([np.full(len(m), name) for name, m in rows.items()]),
                              scene_probs=np.concatenate([probs[name] for name in rows]))
        write_manifest(everything, labels_path)
        # agreement with the withheld labels, where the GPS dataset has them in the same scenes
        truth = {name: m.scene for name, m in splits.items() if list(m.scene_names) == names}
        agreement = {name: scenes.scene_accuracy(probs[name], t) for name, t in truth.items()}
        summary = {"helper_val_accuracy": accuracy, "agreement": {k: v[0] for k, v in agreement.items()},
                   "shares": {n: float((everything.scene == k).mean()) for k, n in enumerate(names)},
                   "seconds": time.perf_counter() - t0}
        log(info, f"scene helper: {100 * accuracy:.1f}% right on its own validation scenes; propagated labels agree "
                  "with the withheld true ones for " + ", ".join(f"{100 * a:.1f}% of {n} ({c} images)"
                                                            for n, (a, c) in agreement.items())
                  + "; labels: " + ", ".join(f"{n} {100 * v:.1f}%" for n, v in summary["shares"].items())
                  + f" ({summary['seconds']:.0f} s; {labels_path})")
    engine.barrier(info)
    written = read_manifest(labels_path, check_files=False)
    if len(written) != sum(len(m) for m in splits.values()):
        raise SystemExit(f"{labels_path} has {len(written)} rows, not one per GPS image: delete it to label again")
    out, start = {}, 0
    for name, m in splits.items():
        out[name] = written.scene[start:start + len(m)]
        start += len(m)
    out["names"] = list(written.scene_names)
    out["summary"] = summary
    return out


def build_partitions(cfg: TrainConfig, train, info):
    if cfg.partitions:
        partitions = [Partition.read_csv(p) for p in cfg.partitions]
    else:
        taus = scaled_taus(cfg.taus, len(train), cfg.tau_scale)
        log(info, f"partitionings from {len(train)} training locations, (tau_min, tau_max) = "
                  + ", ".join(f"{a}/{b}" for a, b in taus))
        partitions = adaptive_partitions(train.lat, train.lng, [tuple(t) for t in taus])
    empty = [f"{name} ({len(p)} cells)" for name, p in zip(partition_names(len(partitions)), partitions) if len(p) < 2]
    if empty:
        raise ValueError(f"{len(train)} training photos give partitionings with fewer than two cells: "
                         f"{', '.join(empty)}; lower tau_min (--taus MIN/MAX, --tau-scale) or give more photos")
    return partitions


def split_loader(cfg: TrainConfig, partitions, manifest, info, is_train: bool):
    labels = LabelTable.from_manifest(manifest, partitions)
    return make_loader(manifest, labels, train=is_train, batch_size=cfg.batch_size,
                       preprocess=preprocess_from_config(cfg), backend=cfg.backend, device=info.device,
                       num_workers=cfg.workers, shard_id=info.rank, num_shards=info.world, seed=cfg.seed)


def make_loaders(cfg: TrainConfig, partitions, train, val, test, info):
    return (split_loader(cfg, partitions, train, info, True), split_loader(cfg, partitions, val, info, False),
            split_loader(cfg, partitions, test, info, False) if test is not None else None)


# ---------------------------------------------------------------------------------------------
# Checkpoints


class RunCheckpoints:
    """Writes the run's checkpoints: what describes the model is fixed when the run starts; the
    training state is read from the live :class:`TrainState` when a checkpoint is written."""

    def __init__(self, run_dir, info, cfg: TrainConfig, model, partitions, names, hierarchy, scene_names):
        self.run_dir, self.info, self.cfg, self.model = run_dir, info, cfg, model
        self.fields = dict(arch=cfg.arch, num_classes=[len(p) for p in partitions], scene_names=scene_names,
                           partitions=partitions, partition_names=names, hierarchy=hierarchy,
                           preprocess=preprocess_from_config(cfg).to_dict())
        self.calibration: Calibration | None = None

    def path(self, name: str) -> str:
        return os.path.join(self.run_dir, name)

    def save(self, name: str, state: TrainState | None = None) -> None:
        """``name`` in the run folder; with ``state``, resumable (every rank must call this then,
        since each contributes its RNG state); only rank 0 writes."""
        rngs = gather_rng(self.info) if state is not None else None
        if not self.info.is_main:
            return
        fields = dict(self.fields, model=self.model.state_dict())
        if self.calibration is not None:
            fields["calibration"] = self.calibration.to_dict()
        if state is not None:
            fields["train_state"] = state.to_dict(rngs, dataclasses.asdict(self.cfg))
        save_checkpoint(self.path(name), **fields)


# ---------------------------------------------------------------------------------------------
# Training


def run_budget(cfg: TrainConfig) -> float | None:
    """Seconds of the run's time budget: --time-budget, whose "auto" is ten minutes on the
    built-in dataset and none on a manifest of one's own."""
    if cfg.time_budget == "auto":
        return DEFAULT_BUDGET_S if cfg.manifest is None else None
    return parse_budget(cfg.time_budget)


def plan_run(cfg, info, clock, budget_s, model, criterion, train_loader, loaders_for, amp_dtype, steps_per_epoch,
             *, n_val: int, after_images: int, n_fitted: int):
    """The time budget's plan: this machine's training steps timed on each path left open
    (both loaders when --backend is auto and DALI is installed; both memory formats when
    --channels-last is auto on a CPU), the fastest kept, then as many steps as finish the run
    within the budget, at most --epochs epochs. bf16 autocast is a candidate only where it is
    native (training_autocast_dtype), as emulated bf16 is several times slower; there, with
    --amp auto on a CPU, float32 is timed too on the fastest loader in each memory format and
    kept, in its faster format, if faster.
    ``loaders_for(cfg)`` builds the training loader of another backend. Returns
    (backend, channels_last, amp, total steps, epochs)."""
    if cfg.channels_last == "auto":
        # A GPU's convolutions are fastest in channels_last; a CPU's depend on its vector units.
        formats = (True,) if info.device.type == "cuda" else (False, True)
    else:
        formats = (str(cfg.channels_last).lower() == "true",)
    probe = functools.partial(engine.probe_rates, model, criterion, info=info)
    loaders = {train_loader.backend: train_loader}
    rates, eval_rate, (backend, channels_last) = probe(loaders, amp_dtype=amp_dtype, channels_last_options=formats)
    if cfg.backend == "auto" and train_loader.backend == "dali":
        # the other loader in the faster memory format only: the probe costs budget too
        loaders["torch"] = loaders_for(dataclasses.replace(cfg, backend="torch"))
        other, other_eval, best = probe({"torch": loaders["torch"]}, amp_dtype=amp_dtype,
                                        channels_last_options=(channels_last,))
        rates.update(other)
        if other[best] > rates[backend, channels_last]:
            (backend, channels_last), eval_rate = best, other_eval
    amp, float32_note = cfg.amp, ""
    chosen_rate = rates[backend, channels_last]
    if amp_dtype is not None and cfg.amp == "auto" and info.device.type == "cpu":
        # Native bf16 is not faster for every trunk: EfficientNet-Lite0's depthwise convolutions
        # ran at 0.6x float32's images/s under bf16 autocast on the AVX512-BF16 CPU.
        # Each memory format again: the layout bf16 prefers need not be float32's (bf16 NCHW
        # 140 against channels_last 139 images/s, where float32 ran 129 in NCHW and about 200
        # in channels_last, on the AVX512-BF16 CPU).
        f32, f32_eval, f32_best = probe({backend: loaders[backend]}, amp_dtype=None, channels_last_options=formats)
        bf16_rate, f32_rate = rates[backend, channels_last], f32[f32_best]
        if f32_rate > bf16_rate:
            # the printed rates stay bf16's as measured; the plan uses float32's, in its own format
            amp_dtype, eval_rate, chosen_rate, channels_last = None, f32_eval, f32_rate, f32_best[1]
        amp = "none" if amp_dtype is None else "bf16"
        float32_note = (f"; float32 on the {backend} loader: "
                        + ", ".join(f"{'channels_last' if cl else 'NCHW'} {r:.0f}" for (_, cl), r in f32.items())
                        + f" images/s ({'float32' if amp == 'none' else 'bf16'}, {backend}, "
                        + f"{'channels_last' if channels_last else 'NCHW'} chosen)")
    if float32_note:
        precision = "bf16 autocast"
    elif amp_dtype is None:
        precision = "float32" + (" (no native bf16 on this CPU: emulated bf16 is several times slower)"
                                 if info.device.type == "cpu" and cfg.amp == "auto" else "")
    else:
        precision = f"{str(amp_dtype).removeprefix('torch.')} autocast"
    log(info, "measured on this machine, training steps in " + precision + ": "
              + ", ".join(f"{b} loader {'channels_last' if cl else 'NCHW'} {r:.0f} images/s"
                          for (b, cl), r in rates.items())
              + (f" ({backend}, {'channels_last' if channels_last else 'NCHW'} chosen)"
                 if len(rates) > 1 and not float32_note else "")
              + float32_note + f"; evaluation {eval_rate:.0f} images/s")
    rates_used = Rates(chosen_rate, eval_rate)
    plan = plan_steps(budget_s=budget_s, elapsed_s=clock.elapsed, rates=rates_used,
                      steps_per_epoch=steps_per_epoch, batch_images=cfg.batch_size * info.world, n_val=n_val,
                      after_images=after_images, after_fixed_s=FIT_SECONDS_PER_IMAGE * n_fitted,
                      max_steps=cfg.epochs * steps_per_epoch)
    log(info, "plan: " + plan.describe(rates_used, budget_s)
              + (f"; at most --epochs {cfg.epochs}" if plan.total_steps == cfg.epochs * steps_per_epoch else ""))
    clock.done("probe and plan")
    return backend, ("true" if channels_last else "false"), amp, plan.total_steps, plan.epoch_count


def train(cfg: TrainConfig, resume: dict | None = None) -> dict:
    """One training run (``resume``: the loaded checkpoint to continue). Returns {"rows" (the
    final table), "val_rows", "extras", "run_dir", "model", "seconds", "stopped"} on every rank."""
    t_start = time.perf_counter()
    info = engine.init_distributed(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    engine.seed_everything(cfg.seed)
    on_gpu = info.device.type == "cuda"
    if on_gpu:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp_dtype = training_autocast_dtype(info.device, cfg.amp)
    # Evaluation and the index run in float32 on the CPU, as geocell evaluate and Geolocator do,
    # so the run's tables are the ones those commands reproduce.
    eval_amp_dtype = amp_dtype if on_gpu else None
    budget_s = run_budget(cfg)
    clock = StageClock(budget_s, start=t_start, log=lambda m: log(info, m))
    run_dir = cfg.out or (os.path.dirname(os.path.abspath(resume_path(cfg.resume))) if cfg.resume
                          else os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")))

    # Data and partitionings (a resumed run keeps the partitionings it started with).
    train_set, val_set, test_set = load_data(cfg, info)
    clock.done("data")
    helper = None
    if cfg.scene_helper and cfg.scene_head and cfg.scene_weight != 0 and scene_dataset(cfg):
        if info.is_main:
            os.makedirs(run_dir, exist_ok=True)
        gps = {"train": train_set, "val": val_set, **({"test": test_set} if test_set is not None else {})}
        helper = propagate_scenes(cfg, info, run_dir, gps, resume is not None)
        # the scene head learns the propagated labels; val/test keep the true ones it is measured by
        train_set.scene, train_set.scene_names = helper["train"], helper["names"]
        for held in (val_set, test_set):
            if held is not None and list(held.scene_names) != helper["names"]:
                held.scene = np.full(len(held), -1)  # its labels are other scenes: nothing to measure by
        clock.done("scene helper")
    if resume is not None:
        partitions = [partition_from_dict(d) for d in resume["partitions"]]
    else:
        partitions = build_partitions(cfg, train_set, info)
    hierarchy = cell_hierarchy(partitions)
    names = partition_names(len(partitions))
    log(info, f"{len(train_set)} training / {len(val_set)} validation images; classes per partitioning: "
              + ", ".join(f"{n} {len(p)}" for n, p in zip(names, partitions)))
    train_loader, val_loader, test_loader = make_loaders(cfg, partitions, train_set, val_set, test_set, info)
    log(info, f"data loader: {train_loader.backend} backend ({getattr(train_loader, 'detail', '')}), "
              f"{len(train_loader)} batches of {cfg.batch_size} per epoch")
    steps_per_epoch = engine.all_reduce_min(len(train_loader), info)
    if steps_per_epoch == 0:
        raise SystemExit(f"the training split ({len(train_set)} images) gives no full batch of {cfg.batch_size} per process")

    # Model: the scene head only when asked for and the training data has scene labels.
    use_scenes = cfg.scene_head and cfg.scene_weight != 0 and bool((train_set.scene >= 0).any())
    scene_names = list(train_set.scene_names) if use_scenes else []
    # seeded here again: the initial weights must not depend on whether the scene helper was
    # trained in this run (drawing from the generator) or taken from the cache
    engine.seed_everything(cfg.seed)
    model = GeoModel(cfg.arch, [len(p) for p in partitions], len(scene_names),
                     pretrained="none" if resume is not None else cfg.pretrained)
    if resume is not None:
        model.load_state_dict(resume["model"])
    model.to(info.device)
    criterion = MultitaskLoss([p.centroids for p in partitions], cfg.smoothing_km, cfg.scene_weight).to(info.device)
    clock.done("partitionings, loaders and model")

    # The steps: a time budget measures this machine and plans them (kept in the saved config,
    # so a resumed run follows the same plan); else epochs x steps per epoch.
    if budget_s and not cfg.total_steps:
        after = len(val_set) + (len(train_set) if cfg.retrieval else 0) + (len(test_set) if test_set is not None else 0)
        cfg.backend, cfg.channels_last, cfg.amp, cfg.total_steps, cfg.epochs = plan_run(
            cfg, info, clock, budget_s, model, criterion, train_loader,
            lambda other: split_loader(other, partitions, train_set, info, True), amp_dtype,
            steps_per_epoch, n_val=len(val_set), after_images=after,
            n_fitted=len(val_set) + (len(test_set) if test_set is not None else 0))
        amp_dtype = training_autocast_dtype(info.device, cfg.amp)  # kept in the config: a resumed run keeps it
        if cfg.backend != train_loader.backend:  # the probe found the other loader faster here
            train_loader, val_loader, test_loader = make_loaders(cfg, partitions, train_set, val_set, test_set, info)
    channels_last = on_gpu if cfg.channels_last == "auto" else str(cfg.channels_last).lower() == "true"
    total_steps = cfg.total_steps or cfg.epochs * steps_per_epoch
    n_epochs = -(-total_steps // steps_per_epoch)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ddp_model = model
    if info.enabled:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if on_gpu else None)
    train_model = torch.compile(ddp_model) if cfg.compile else ddp_model

    # Optimiser, schedule; the training state restored in this one place when resuming.
    optimizer = engine.build_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay)
    schedule = engine.LRSchedule(cfg.schedule, steps_per_epoch, cfg.epochs, cfg.milestones, cfg.gamma, cfg.warmup_epochs,
                                 total_steps=total_steps)
    state = TrainState(optimizer, engine.build_scheduler(optimizer, schedule),
                       torch.amp.GradScaler(info.device.type) if amp_dtype == torch.float16 else None)
    resume_rng = None
    if resume is not None:
        resume_rng = state.restore(resume["train_state"], info.rank)
        log(info, f"resumed from {cfg.resume}: epoch {state.epoch + 1}, step {state.step}")
    options = engine.EpochOptions(steps=steps_per_epoch, amp_dtype=amp_dtype, scaler=state.scaler,
                                  channels_last=channels_last, stop_after_steps=cfg.stop_after_steps,
                                  log_every=cfg.log_every, show_progress=cfg.progress)
    eval_channels_last = engine.evaluation_channels_last(channels_last, info.device)

    def eval_net(net):
        # the weights in the layout evaluation reads them in (a copy, when training uses another)
        if channels_last == eval_channels_last:
            return net
        return copy.deepcopy(model).to(memory_format=torch.contiguous_format)

    def evaluate(loader, **kw):
        return evaluate_loader(eval_net(ddp_model), loader, partitions=partitions, hierarchy=hierarchy,
                               device=info.device, amp=eval_amp_dtype, names=names, channels_last=eval_channels_last,
                               **kw)

    logger = engine.MetricLogger(run_dir, info.is_main, cfg.tensorboard)
    checkpoints = RunCheckpoints(run_dir, info, cfg, model, partitions, names, hierarchy, scene_names)
    if info.is_main:
        save_yaml(cfg, os.path.join(run_dir, "config.yaml"))
        os.makedirs(os.path.join(run_dir, "partitions"), exist_ok=True)
        for name, p in zip(names, partitions):
            p.to_csv(os.path.join(run_dir, "partitions", f"{name}.csv"))

    def epoch_steps(epoch: int) -> int:  # the last epoch of a planned run may be partial
        return min(steps_per_epoch, total_steps - epoch * steps_per_epoch)

    def on_step(state):
        if (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0
                and state.step_in_epoch < epoch_steps(state.epoch)):
            checkpoints.save("last.pt", state)

    # The loop: train an epoch, evaluate on the held-out validation split, keep the best.
    stopped = False
    while state.epoch < n_epochs:
        # Seeding per epoch makes a resumed epoch draw the same augmentations as an uninterrupted one.
        engine.seed_everything(cfg.seed * 100003 + state.epoch * 101 + info.rank)
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(state.epoch)
        t0 = time.perf_counter()
        steps = epoch_steps(state.epoch)
        train_means, stopped = engine.train_one_epoch(
            train_model, criterion, train_loader, state, info, dataclasses.replace(options, steps=steps),
            on_step=on_step, logger=logger, resume_rng=resume_rng if state.step_in_epoch else None)
        resume_rng = None
        if stopped and state.step_in_epoch < steps:
            checkpoints.save("last.pt", state)
            log(info, f"stopped after step {state.step} (checkpoint {checkpoints.path('last.pt')})")
            break
        seconds = time.perf_counter() - t0
        val = evaluate(val_loader)
        rows = accuracy_rows(val, partitions[-1])
        state.epoch, state.step_in_epoch = state.epoch + 1, 0
        score = select_score(rows)
        improved = score > state.best_metric
        state.best_metric = max(state.best_metric, score)
        logger.log({"epoch": state.epoch, "train": train_means, "val": rows, "scene_acc": val.scene_acc,
                    "epoch_seconds": seconds}, state.step, prefix="val/")
        final = rows.get(HIERARCHY_ROW, rows[names[-1]])
        log(info, f"epoch {state.epoch}/{n_epochs}"
                  + (f" ({steps / steps_per_epoch:.2f} of an epoch)" if steps < steps_per_epoch else "")
                  + f": loss {train_means.get('loss', float('nan')):.3f}, "
                  f"{steps * cfg.batch_size * info.world / seconds:.0f} images/s, val "
                  + " ".join(f"{t}km {100 * final[f'acc_{t}km']:.1f}%" for t in (25, 200, 750, 2500))
                  + (f", scene {100 * val.scene_acc:.1f}%" if val.scene_acc is not None else ""))
        checkpoints.save("last.pt", state)
        if improved:
            checkpoints.save("best.pt")
        clock.done(f"epoch {state.epoch}")
        if stopped:
            break

    result = {"rows": {}, "val_rows": {}, "extras": {}, "run_dir": run_dir, "model": model, "stopped": stopped}
    if not stopped:
        index_loader = functools.partial(split_loader, cfg, partitions, train_set, info, False) if cfg.retrieval else None
        result.update(finish(cfg, info, model, evaluate, checkpoints, partitions, train_set, val_loader,
                             test_loader, state, index_loader=index_loader,
                             scene_helper=helper["summary"] if helper else None, clock=clock,
                             embed=lambda loader: embed_loader(eval_net(model), loader, device=info.device,
                                                               amp=eval_amp_dtype, channels_last=eval_channels_last)))
    logger.close()
    report_skipped(info, checkpoints.path("skipped_images.csv"),
                   {"train": train_loader, "val": val_loader, "test": test_loader})
    result["seconds"] = time.perf_counter() - t_start
    log(info, f"run folder {run_dir} ({result['seconds']:.0f} s)")
    if not stopped and info.is_main:
        print(f"next: {checkpoints.path('best.pt')} holds the weights with the best validation score and the "
              f"calibration, last.pt the last epoch with its training state (for --resume). To locate a photo:\n"
              f"  geocell predict photo.jpg --checkpoint {checkpoints.path('best.pt')} --map photo_map.png", flush=True)
    return result


def finish(cfg, info, model, evaluate, checkpoints, partitions, train_set, val_loader, test_loader, state,
           *, index_loader=None, embed=None, scene_helper=None, clock=None) -> dict:
    """After the last epoch: the best weights back, calibration fitted on the validation split,
    the training photos indexed for retrieval and the hybrid fitted on the validation split too,
    then the test split evaluated once (the validation split when there is none)."""
    mark = clock.done if clock is not None else (lambda stage: None)
    engine.barrier(info)
    best = load_checkpoint(checkpoints.path("best.pt"))
    model.load_state_dict(best["model"])
    val = evaluate(val_loader, keep_logits=True, keep_embeddings=index_loader is not None)
    val_rows = accuracy_rows(val, partitions[-1])
    extras = {"scene_helper": scene_helper} if scene_helper else {}
    mark("validation pass")
    say = functools.partial(log, info)
    index = hybrid = None
    held_out = fitting.HeldOut(val.logits, val.true_latlng, val.embeddings, name="validation split")
    if index_loader is not None:
        index = build_retrieval(info, checkpoints, index_loader, embed)
        mark("retrieval index")
    fitted = fitting.fit(held_out, partitions, cell_hierarchy(partitions), index=index,
                         widening=cfg.retrieval_widening, log=say)
    checkpoints.calibration = fitted.calibration if fitted is not None else None
    if fitted is not None:
        cal, truth_mass, hybrid = fitted.calibration, fitted.truth_mass, fitted.calibration.hybrid
        if hybrid is not None:
            val_rows[HYBRID_ROW] = accuracy_from_errors(fitted.hybrid_errors_km)
        log(info, "calibration fitted on the validation split: weights "
                  + ", ".join(f"{w:.2f}" for w in cal.weights) + f", kernel {cal.kernel_km:.0f} km; "
                  + ", ".join(f"the {100 * m:g}% region is the mixture's {100 * cal.region_mass(m):.1f}% "
                              f"(it held {100 * np.mean(truth_mass <= m):.1f}% of validation images)"
                              for m in REGION_MASSES))
        if cal.region_group_scores:
            # each group named by its lower edge, and asked with that similarity
            lows = (-np.inf, *cal.region_edges)
            log(info, "  by the top neighbour's similarity (conformal groups): " + "; ".join(
                (f"below {lows[1]:.3f}" if g == 0 else f"from {low:.3f}") + ": "
                + ", ".join(f"{100 * m:g}% -> {100 * cal.region_mass(m, low):.1f}%" for m in REGION_MASSES)
                for g, low in enumerate(lows)))
        checkpoints.save("best.pt")
        checkpoints.save("last.pt", state)
        extras["calibration"] = cal.to_dict()
    mark("calibration, hybrid and credible regions")
    split, loader = ("test", test_loader) if test_loader is not None else ("validation", val_loader)
    final = evaluate(loader, calibration=checkpoints.calibration, region_masses=REGION_MASSES,
                     retrieval=index, hybrid=hybrid)
    rows = accuracy_rows(final, partitions[-1], countries=True)
    summary = final.calibration_summary()
    ceiling = nearest_training_ceiling(train_set, final.true_latlng)
    log(info, f"\ngeolocation accuracy on the {split} split ({len(final.true_latlng)} images, best.pt)"
              f"{', scene accuracy %.1f%%' % (100 * final.scene_acc) if final.scene_acc is not None else ''}:")
    log(info, format_table(rows))
    if hybrid is not None:
        log(info, f"(validation split, where the hybrid was fitted: hierarchy "
                  f"{100 * val_rows[HIERARCHY_ROW]['acc_200km']:.1f}% / hybrid "
                  f"{100 * val_rows[HYBRID_ROW]['acc_200km']:.1f}% within 200 km)"
                  if HIERARCHY_ROW in val_rows else "")
    if ceiling:
        log(info, "the nearest training photo is within "
                  + ", ".join(f"{t} km for {100 * v:.1f}%" for t, v in ceiling.items()) + " of these images")
    if summary:
        log(info, ("credible regions of the hybrid:\n" if hybrid is not None else "") + format_calibration(summary))
    if info.is_main:
        log(info, format_intervals(final))
        log(info, band_section(final, train_set.lat, train_set.lng, names=[HIERARCHY_ROW, HYBRID_ROW]))
    extras.update(n=len(final.true_latlng), scene_acc=final.scene_acc, calibration_summary=summary,
                  nearest_training_ceiling={str(k): v for k, v in ceiling.items()})
    if info.is_main:
        with open(checkpoints.path("results.json"), "w") as f:
            json.dump({"split": split, "rows": rows, "val_rows": val_rows, **extras}, f, indent=1)
    mark(f"{split} pass")
    return {"rows": rows, "val_rows": val_rows, "extras": extras, "split": split,
            "errors_km": final.errors_km(), "true_latlng": final.true_latlng}


@torch.no_grad()
def embed_loader(model, loader, *, device, amp, channels_last):
    """(unit trunk embeddings (N, D) float16, locations (N, 2)) of every image of ``loader``,
    gathered from all ranks."""
    from geocell._internal.torch_util import autocast_context

    was_training = model.training
    model.eval()
    emb, latlng = [], []
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp):
            _, _, embeddings = forward_with_embeddings(model, images)
        emb.append(embeddings.astype(np.float16))
        latlng.append(targets["latlng"].cpu().numpy().astype(np.float64))
    if was_training:
        model.train()
    dim = getattr(model, "feature_dim", 0)
    return (gather_concat(np.concatenate(emb) if emb else np.zeros((0, dim), np.float16)),
            gather_concat(np.concatenate(latlng) if latlng else np.zeros((0, 2))))


def build_retrieval(info, checkpoints, index_loader, embed):
    """best.retrieval.npz: the training photos embedded by the best weights."""
    t0 = time.perf_counter()
    emb, latlng = embed(index_loader())
    fields = checkpoints.fields
    index = RetrievalIndex(emb, latlng[:, 0], latlng[:, 1],
                           model_fingerprint(checkpoints.model.state_dict(), fields["arch"], fields["preprocess"]),
                           source=f"training split, {len(latlng)} images")
    if info.is_main:
        index.save(index_path_for(checkpoints.path("best.pt")))
    log(info, f"retrieval index of {len(index)} training photos ({index.dim}-d) in "
              f"{time.perf_counter() - t0:.0f} s: {index_path_for(checkpoints.path('best.pt'))}")
    return index


def report_skipped(info, path: str, loaders: dict) -> None:
    """Images that could not be used (unreadable before loading, or failing to decode in an
    epoch), from every rank, each listed once in ``path`` and counted on the console."""
    rows = sorted({(split, str(p), str(reason)) for split, loader in loaders.items() if loader is not None
                   for p, reason in loader.skipped_paths})
    if info.enabled:
        import torch.distributed as dist

        parts = [None] * info.world
        dist.all_gather_object(parts, rows)
        rows = sorted(set().union(*map(set, parts)))
    if not info.is_main or not rows:
        return
    with open(path, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
        writer = csv.writer(f)
        writer.writerow(["split", "image", "reason"])
        writer.writerows(rows)
    counts = {split: sum(r[0] == split for r in rows) for split in loaders}
    print(f"{len(rows)} images could not be used ("
          + ", ".join(f"{split} {n}" for split, n in counts.items() if n) + f"), listed in {path}", flush=True)


def nearest_training_ceiling(train_set, true_latlng, limit: int = 10 ** 9) -> dict:
    """Share of evaluated images whose nearest training photo is within each radius: the best a
    classifier whose answers are training locations can do. Skipped past ``limit`` pairs."""
    if len(train_set) * len(true_latlng) > limit or len(true_latlng) == 0:
        return {}
    d = min_distance_km(true_latlng[:, 0], true_latlng[:, 1], train_set.lat, train_set.lng)
    return {t: float((d <= t).mean()) for t in (200, 750, 2500)}


def resume_path(path: str) -> str:
    return os.path.join(path, "last.pt") if os.path.isdir(path) else path


# ---------------------------------------------------------------------------------------------
# Ablation: the same data and budget, four model variants


ABLATION = (
    ("1 partitioning", dict(partitions_keep="finest", scene_head=False)),
    ("3 partitionings + hierarchy", dict(scene_head=False)),
    ("3 + hierarchy + scenes (true labels)", dict(scene_head=True, scene_helper=False)),
    ("3 + hierarchy + scenes (helper labels)", dict(scene_head=True, scene_helper=True)),
)


def ablation_variant(cfg: TrainConfig, change: dict, out: str, seed: int) -> TrainConfig:
    """One ablation run: the same data and budget, classification only (no retrieval)."""
    variant = dataclasses.replace(cfg, ablation=False, out=out, seed=seed, retrieval=False,
                                  scene_head=change["scene_head"],
                                  scene_helper=change.get("scene_helper", False))
    if change.get("partitions_keep") == "finest":
        if variant.partitions:
            variant.partitions = variant.partitions[-1:]
        else:
            variant.taus = variant.taus[-1:]
    return variant


def run_ablation(cfg: TrainConfig) -> dict:
    """Each variant trained with ``cfg.seeds`` seeds, evaluated once on the test split (its
    hierarchy row; the finest partitioning's for one partitioning); mean and 95 % bootstrap
    interval over the test images' S2 blocks and the seeds (geocell.infer.metrics.bootstrap_interval)."""
    base_out = cfg.out or os.path.join("runs", "ablation-" + time.strftime("%Y%m%d-%H%M%S"))
    seeds = [cfg.seed + k for k in range(max(1, cfg.seeds))]
    table, seconds, split = {}, {}, None
    chosen = cfg.ablation_variants or list(range(1, len(ABLATION) + 1))
    for i, (label, change) in enumerate(ABLATION):
        if i + 1 not in chosen:
            continue
        errors, seconds[label], blocks = [], 0.0, None
        for seed in seeds:
            result = train(ablation_variant(cfg, change, os.path.join(base_out, f"variant{i + 1}", f"seed{seed}"), seed))
            row = HIERARCHY_ROW if HIERARCHY_ROW in result["errors_km"] else \
                [k for k in result["errors_km"] if k != HYBRID_ROW][-1]
            errors.append(result["errors_km"][row])
            seconds[label] += result["seconds"]
            split = result["split"]
            if result.get("true_latlng") is not None:  # the same test images for every seed
                blocks = location_blocks(result["true_latlng"])
        table[label] = bootstrap_interval(np.stack(errors), blocks=blocks, seed=cfg.seed)
        if engine.DistInfo(int(os.environ.get("RANK", "0"))).is_main:  # the table so far, after each variant
            print(f"\nablation (same data, same budget, classification only; {split} split, best.pt of each; "
                  f"mean over seeds {', '.join(map(str, seeds))} [95 % bootstrap interval over "
                  f"{'the S2 blocks of the images' if blocks is not None else 'images'} and seeds]):")
            print(format_interval_table(table))
            print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
            os.makedirs(base_out, exist_ok=True)
            with open(os.path.join(base_out, "ablation.json"), "w") as f:
                json.dump({"split": split, "seeds": seeds, "rows": table, "seconds": seconds}, f, indent=1)
    return table
