"""Train the multitask geolocation network (``geocell train`` or ``python train/run.py``).

With no arguments it builds the small Earth dataset (./data/earth) if missing, trains a ResNet-18
for a few minutes and prints the accuracy table. Multi-GPU / multi-node: launch with torchrun, e.g.
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

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch

from geocell.loading.preprocess import Preprocess

from geocell.training import engine
from geocell.training.checkpoint import load_checkpoint, partition_from_dict, save_checkpoint
from geocell.training.config import TrainConfig, add_arguments, resolve, save_yaml, scaled_taus
from geocell.training.losses import MultitaskLoss
from geocell.infer.metrics import BASELINE_ROW, HIERARCHY_ROW, evaluate_full, format_table, partition_names
from geocell.training.model import GeoModel, PretrainedWeightsError

VAL_SPLITS = ("val", "valid", "validation")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geocell train", description=__doc__, argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def log(info, *args) -> None:
    if info.is_main:
        print(*args, flush=True)


# ---------------------------------------------------------------------------------------------
# Data


def load_data(cfg: TrainConfig, info):
    """(train, val, test) manifests; test is None when there is no test split."""
    from geocell.data.manifest import read_manifest

    manifest_path = cfg.manifest
    if manifest_path is None:
        manifest_path = os.path.join(cfg.data_dir, "manifest.csv")
        if not os.path.isfile(manifest_path):
            if info.is_main:
                from geocell.data.earth import build_earth

                print(f"building the Earth dataset ({cfg.earth_n} images, {cfg.earth_size} px) in {cfg.data_dir}",
                      flush=True)
                t0 = time.perf_counter()
                manifest_path = str(build_earth(os.path.abspath(cfg.data_dir), n=cfg.earth_n, size=cfg.earth_size, seed=0,
                                                split_rule=cfg.earth_split,
                                                progress=cfg.progress))
                print(f"built in {time.perf_counter() - t0:.0f} s", flush=True)
            engine.barrier(info)
    full = read_manifest(manifest_path, image_root=cfg.image_root)
    if full.report:
        log(info, f"{manifest_path}: {len(full.report)} unusable rows left out\n{full.format_report()}")
    test = None
    if cfg.val_manifest:
        val = read_manifest(cfg.val_manifest, image_root=cfg.image_root)
        train = full.subset(full.split == "train") if full.split is not None and (full.split == "train").any() else full
    elif full.split is not None and np.isin(full.split, VAL_SPLITS).any():
        train = full.subset(full.split == "train")
        val = full.subset(np.isin(full.split, VAL_SPLITS))
        test = full.subset(full.split == "test") if (full.split == "test").any() else None
    else:
        # No split given: a seeded random holdout.
        order = np.random.default_rng(cfg.seed).permutation(len(full))
        n_val = max(1, int(round(cfg.val_fraction * len(full))))
        val, train = full.subset(np.sort(order[:n_val])), full.subset(np.sort(order[n_val:]))
    if len(train) == 0 or len(val) == 0:
        raise SystemExit(f"{manifest_path}: needs training and validation rows (got {len(train)} and {len(val)})")
    return train, val, test


def build_partitions(cfg: TrainConfig, train, info):
    import geocell

    if cfg.partitions:
        partitions = [geocell.Partition.read_csv(p) for p in cfg.partitions]
    else:
        taus = scaled_taus(cfg.taus, len(train), cfg.tau_scale)
        log(info, f"partitionings from {len(train)} training locations, (tau_min, tau_max) = "
                  + ", ".join(f"{a}/{b}" for a, b in taus))
        partitions = geocell.partitions(train.lat, train.lng, [tuple(t) for t in taus])
    return partitions


def make_loaders(cfg: TrainConfig, partitions, train, val, test, info):
    from geocell.loading.labels import LabelTable
    from geocell.loading.base import make_loader

    def loader(manifest, is_train):
        labels = LabelTable.from_manifest(manifest, partitions)
        return make_loader(manifest, labels, train=is_train, batch_size=cfg.batch_size, image_size=cfg.image_size,
                           resize_size=cfg.resize_size, backend=cfg.backend, device=info.device,
                           num_workers=cfg.workers, shard_id=info.rank, num_shards=info.world, seed=cfg.seed)

    return loader(train, True), loader(val, False), (loader(test, False) if test is not None else None)


# ---------------------------------------------------------------------------------------------
# Training


def select_score(rows: dict) -> float:
    """Model selection score: mean accuracy over the five radii of the final prediction row."""
    row = rows.get(HIERARCHY_ROW) or next(v for k, v in rows.items() if k != BASELINE_ROW)
    return float(np.mean([v for k, v in row.items() if k.startswith("acc_")]))


def train(cfg: TrainConfig) -> dict:
    """One training run. Returns {"rows", "extras", "run_dir", "model", "seconds"} on every rank."""
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
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None,
                 "auto": torch.bfloat16 if on_gpu else None}[cfg.amp]
    channels_last = on_gpu if cfg.channels_last == "auto" else str(cfg.channels_last).lower() == "true"

    resume = load_checkpoint(resume_path(cfg.resume)) if cfg.resume else None
    run_dir = cfg.out or (os.path.dirname(os.path.abspath(resume_path(cfg.resume))) if cfg.resume
                          else os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")))

    # Data and partitionings (a resumed run keeps the partitionings it started with).
    train_set, val_set, test_set = load_data(cfg, info)
    if resume is not None:
        partitions = [partition_from_dict(d) for d in resume["partitions"]]
    else:
        partitions = build_partitions(cfg, train_set, info)
    import geocell

    hierarchy = geocell.hierarchy(partitions)
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
    model = GeoModel(cfg.arch, [len(p) for p in partitions], len(scene_names),
                     pretrained="none" if resume is not None else cfg.pretrained)
    if resume is not None:
        model.load_state_dict(resume["model"])
    model.to(info.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ddp_model = model
    if info.enabled:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if on_gpu else None)
    train_model = torch.compile(ddp_model) if cfg.compile else ddp_model

    criterion = MultitaskLoss([p.centroids for p in partitions], cfg.smoothing_km, cfg.scene_weight).to(info.device)
    optimizer = engine.build_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay)
    schedule = engine.LRSchedule(cfg.schedule, steps_per_epoch, cfg.epochs, cfg.milestones, cfg.gamma, cfg.warmup_epochs)
    scheduler = engine.build_scheduler(optimizer, schedule)
    scaler = torch.amp.GradScaler(info.device.type) if amp_dtype == torch.float16 else None

    epoch, global_step, skip, best = 0, 0, 0, -1.0
    saved_rng = None
    if resume is not None:
        state = resume["train_state"]
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        epoch, global_step, skip = int(state["epoch"]), int(state["step"]), int(state["step_in_epoch"])
        best = float(state.get("best_metric", -1.0))
        rngs = state["rng"]
        saved_rng = rngs[info.rank] if isinstance(rngs, list) and info.rank < len(rngs) else None
        log(info, f"resumed from {cfg.resume}: epoch {epoch + 1}, step {global_step}")

    logger = engine.MetricLogger(run_dir, info.is_main, cfg.tensorboard)
    if info.is_main:
        save_yaml(cfg, os.path.join(run_dir, "config.yaml"))
        os.makedirs(os.path.join(run_dir, "partitions"), exist_ok=True)
        for name, p in zip(names, partitions):
            p.to_csv(os.path.join(run_dir, "partitions", f"{name}.csv"))

    def checkpoint(path, epoch_done, step_in_epoch, with_state=True):
        # Every rank contributes its RNG state (they differ per rank); only rank 0 writes.
        rngs = gather_rng(info)
        if not info.is_main:
            return
        fields = dict(arch=cfg.arch, model=model.state_dict(), num_classes=[len(p) for p in partitions],
                      scene_names=scene_names, partitions=partitions, partition_names=names, hierarchy=hierarchy,
                      preprocess=Preprocess(cfg.image_size, cfg.resize_size or 0).to_dict())
        if with_state:
            fields["train_state"] = {
                "epoch": epoch_done, "step": global_step, "step_in_epoch": step_in_epoch,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {},
                "rng": rngs, "best_metric": best, "config": dataclasses.asdict(cfg)}
        save_checkpoint(path, **fields)

    def on_step(step, step_in_epoch):
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step_in_epoch < steps_per_epoch:
            checkpoint(os.path.join(run_dir, "last.pt"), epoch, step_in_epoch)

    # The loop.
    rows, extras, stopped = {}, {}, False
    while epoch < cfg.epochs and not stopped:
        # Seeding per epoch makes a resumed epoch draw the same augmentations as an uninterrupted one.
        engine.seed_everything(cfg.seed * 100003 + epoch * 101 + info.rank)
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        restore = (lambda: engine.set_rng_state(saved_rng)) if (skip and saved_rng is not None) else None
        t0 = time.perf_counter()
        global_step, train_means, stopped = engine.train_one_epoch(
            train_model, criterion, optimizer, scheduler, train_loader, epoch=epoch, steps=steps_per_epoch,
            global_step=global_step, info=info, amp_dtype=amp_dtype, scaler=scaler, channels_last=channels_last,
            skip=skip, on_step=on_step, stop_at=cfg.stop_after_steps, logger=logger, log_every=cfg.log_every,
            show_progress=cfg.progress, after_skip=restore)
        step_in_epoch = (global_step - epoch * steps_per_epoch)
        skip = 0
        if stopped and step_in_epoch < steps_per_epoch:
            checkpoint(os.path.join(run_dir, "last.pt"), epoch, step_in_epoch)
            log(info, f"stopped after step {global_step} (checkpoint {os.path.join(run_dir, 'last.pt')})")
            break
        seconds = time.perf_counter() - t0
        rows, extras = evaluate_full(ddp_model, val_loader, partitions, hierarchy, info.device, amp_dtype,
                                     names=names, channels_last=channels_last)
        epoch += 1
        score = select_score(rows)
        improved = score > best
        best = max(best, score)
        logger.log({"epoch": epoch, "train": train_means, "val": rows, **extras, "epoch_seconds": seconds},
                   global_step, prefix="val/")
        final = rows.get(HIERARCHY_ROW, rows[names[-1]])
        log(info, f"epoch {epoch}/{cfg.epochs}: loss {train_means.get('loss', float('nan')):.3f}, "
                  f"{steps_per_epoch * cfg.batch_size * info.world / seconds:.0f} images/s, val "
                  + " ".join(f"{t}km {100 * final[f'acc_{t}km']:.1f}%" for t in (25, 200, 750, 2500))
                  + (f", scene {100 * extras['scene_acc']:.1f}%" if "scene_acc" in extras else ""))
        checkpoint(os.path.join(run_dir, "last.pt"), epoch, 0)
        if improved:
            checkpoint(os.path.join(run_dir, "best.pt"), epoch, 0, with_state=False)

    # Report: the test split when there is one, else the validation split.
    if not stopped:
        if test_loader is not None:
            rows, extras = evaluate_full(ddp_model, test_loader, partitions, hierarchy, info.device, amp_dtype,
                                         names=names, channels_last=channels_last)
        split = "test" if test_loader is not None else "validation"
        log(info, f"\ngeolocation accuracy on the {split} split ({extras.get('n', 0)} images)"
                  f"{', scene accuracy %.1f%%' % (100 * extras['scene_acc']) if 'scene_acc' in extras else ''}:")
        log(info, format_table(rows))
        if info.is_main:
            with open(os.path.join(run_dir, "results.json"), "w") as f:
                json.dump({"split": split, "rows": rows, **extras}, f, indent=1)
    logger.close()
    seconds = time.perf_counter() - t_start
    log(info, f"run folder {run_dir} ({seconds:.0f} s)")
    if not stopped and info.is_main:
        best_path = os.path.join(run_dir, "best.pt")
        print(f"next: {best_path} holds the weights with the best validation score, last.pt the last "
              f"epoch with its training state (for --resume). To locate a photo:\n"
              f"  geocell predict photo.jpg --checkpoint {best_path} --map photo_map.png", flush=True)
    return {"rows": rows, "extras": extras, "run_dir": run_dir, "model": model, "seconds": seconds,
            "stopped": stopped}


def resume_path(path: str) -> str:
    return os.path.join(path, "last.pt") if os.path.isdir(path) else path


def gather_rng(info) -> list:
    state = engine.rng_state()
    if not info.enabled:
        return [state]
    import torch.distributed as dist

    states = [None] * info.world
    dist.all_gather_object(states, state)
    return states


# ---------------------------------------------------------------------------------------------
# Ablation: the same data and budget, three model variants


ABLATION = (
    ("1 partitioning", dict(partitions_keep="finest", scene_head=False)),
    ("3 partitionings + hierarchy", dict(scene_head=False)),
    ("3 partitionings + hierarchy + scenes", dict(scene_head=True)),
)


def run_ablation(cfg: TrainConfig) -> dict:
    base_out = cfg.out or os.path.join("runs", "ablation-" + time.strftime("%Y%m%d-%H%M%S"))
    table, seconds = {}, {}
    result = None
    for i, (label, change) in enumerate(ABLATION):
        variant = dataclasses.replace(cfg, ablation=False, out=os.path.join(base_out, f"variant{i + 1}"),
                                      scene_head=change["scene_head"])
        if change.get("partitions_keep") == "finest":
            if variant.partitions:
                variant.partitions = variant.partitions[-1:]
            else:
                variant.taus = variant.taus[-1:]
        result = train(variant)
        rows = result["rows"]
        table[label] = rows.get(HIERARCHY_ROW) or rows[[k for k in rows if k != BASELINE_ROW][-1]]
        seconds[label] = result["seconds"]
    table[BASELINE_ROW] = result["rows"][BASELINE_ROW]
    if engine.DistInfo(int(os.environ.get("RANK", "0"))).is_main:
        print("\nablation (same data, same budget):")
        print(format_table(table))
        print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
        with open(os.path.join(base_out, "ablation.json"), "w") as f:
            json.dump({"rows": table, "seconds": seconds}, f, indent=1)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    flags = vars(parser.parse_args(argv))
    base = None
    if flags.get("resume"):
        state = load_checkpoint(resume_path(flags["resume"])).get("train_state") or {}
        base = state.get("config")
        if base is None:
            parser.error(f"{flags['resume']} has no training state to resume from (is it a best.pt?)")
        base = {k: v for k, v in base.items() if k not in ("resume", "stop_after_steps")}
    try:
        cfg = resolve(flags, flags.get("config"), base=base)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    try:
        if cfg.ablation:
            run_ablation(cfg)
        else:
            train(cfg)
    except PretrainedWeightsError as exc:
        print(f"geocell train: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
