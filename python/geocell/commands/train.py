"""``geocell train`` (and ``python train/run.py``): the multitask geolocation network trained,
calibrated and reported (the work: :mod:`geocell.training.trainer`; its docstring is the help)."""

from __future__ import annotations

import argparse
import sys

from geocell.model.checkpoint import CheckpointError, load_checkpoint
from geocell.model.network import PretrainedWeightsError
from geocell.training import engine, trainer
from geocell.training.config import add_arguments, resolve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geocell train", description=trainer.__doc__, argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    flags = vars(parser.parse_args(argv))
    base = resume = None
    if flags.get("resume"):
        try:
            resume = load_checkpoint(trainer.resume_path(flags["resume"]))
        except (CheckpointError, ValueError) as exc:
            parser.error(f"cannot resume: {exc}")
        base = (resume.get("train_state") or {}).get("config")
        if base is None:
            parser.error(f"{flags['resume']} has no training state to resume from (is it a best.pt?)")
        base = {k: v for k, v in base.items() if k not in ("resume", "stop_after_steps")}
    try:
        cfg = resolve(flags, flags.get("config"), base=base)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    try:
        if cfg.ablation:
            trainer.run_ablation(cfg)
        else:
            trainer.train(cfg, resume)
    except PretrainedWeightsError as exc:
        print(f"geocell train: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.cleanup_distributed()
    return 0
