"""--time-budget: the planner on synthetic timings, the schedule of a partial last epoch, a tiny
budgeted run, and an exact resume inside a budgeted run."""

import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geocell.training.budget import SAFETY_SHARE, Rates, parse_budget, plan_steps


def test_budget_values():
    assert parse_budget("600") == 600 and parse_budget("600s") == 600 and parse_budget("10m") == 600
    assert parse_budget("1h30m") == 5400 and parse_budget("1.5m") == 90 and parse_budget(45) == 45
    assert parse_budget("none") is None and parse_budget("0") is None and parse_budget(None) is None
    for bad in ("ten minutes", "10x", "-5", "m", "inf"):
        with pytest.raises(ValueError, match="time-budget"):
            parse_budget(bad)


def _run_seconds(steps, *, elapsed, rates, spe, batch, n_val, after_images, after_fixed):
    """The whole run's time for ``steps`` optimizer steps, written out plainly."""
    epochs_started = math.ceil(steps / spe)
    return (elapsed + steps * batch / rates.train_images_per_s + epochs_started * n_val / rates.eval_images_per_s
            + after_images / rates.eval_images_per_s + after_fixed)


def _best_by_search(budget, **kw):
    limit = budget * (1 - SAFETY_SHARE)
    fitting = [s for s in range(1, 20_000) if _run_seconds(s, **kw) <= limit]
    return max(fitting) if fitting else 1


def test_plan_on_the_default_runs_timings():
    # 14,400 training images in 225 steps of 64; 1,800 validation and test images; the index.
    kw = dict(elapsed=60.0, rates=Rates(100.0, 400.0), spe=225, batch=64, n_val=1800, after_images=18000,
              after_fixed=30.0)
    plan = plan_steps(budget_s=600, elapsed_s=60, rates=kw["rates"], steps_per_epoch=225, batch_images=64,
                      n_val=1800, after_images=18000, after_fixed_s=30)
    assert plan.total_steps == _best_by_search(600, **kw)
    # 528 s usable (12 % kept back) - 60 - 45 (after) - 30 (fits) = 393 s; with 3 validation
    # passes (13.5 s) that is 379.5 s of steps at 0.64 s: 592 steps, 2.63 epochs
    assert plan.total_steps == 592 and plan.epoch_count == 3 and abs(plan.epochs - 592 / 225) < 1e-12
    assert _run_seconds(plan.total_steps, **kw) <= 528 < _run_seconds(plan.total_steps + 1, **kw)
    # an epoch count asked for caps the plan; a machine twice as fast fills more epochs
    assert plan_steps(budget_s=600, elapsed_s=60, rates=kw["rates"], steps_per_epoch=225, batch_images=64,
                      n_val=1800, after_images=18000, after_fixed_s=30, max_steps=450).total_steps == 450
    fast = plan_steps(budget_s=600, elapsed_s=60, rates=Rates(200.0, 800.0), steps_per_epoch=225, batch_images=64,
                      n_val=1800, after_images=18000, after_fixed_s=30)
    # 528 - 60 - 52.5 = 415.5 s; 6 validation passes of 2.25 s leave 402 s of 0.32 s steps
    assert fast.total_steps == 1256 and fast.epoch_count == 6


def test_a_budget_spent_before_training_still_trains_one_step():
    plan = plan_steps(budget_s=10, elapsed_s=30, rates=Rates(100.0, 400.0), steps_per_epoch=10, batch_images=8,
                      n_val=10, after_images=10, after_fixed_s=1)
    assert plan.total_steps == 1
    with pytest.raises(ValueError, match="rates"):
        plan_steps(budget_s=10, elapsed_s=0, rates=Rates(0.0, 1.0), steps_per_epoch=10, batch_images=8,
                   n_val=10, after_images=10, after_fixed_s=1)


@settings(max_examples=60, deadline=None)
@given(budget=st.floats(30, 3000), elapsed=st.floats(0, 200), train_rate=st.floats(20, 2000),
       eval_rate=st.floats(50, 5000), spe=st.integers(1, 300), batch=st.integers(1, 128),
       n_val=st.integers(1, 3000), after=st.integers(0, 30000), fixed=st.floats(0, 60))
def test_the_plan_is_the_most_steps_that_fit(budget, elapsed, train_rate, eval_rate, spe, batch, n_val, after, fixed):
    rates = Rates(train_rate, eval_rate)
    kw = dict(elapsed=elapsed, rates=rates, spe=spe, batch=batch, n_val=n_val, after_images=after, after_fixed=fixed)
    plan = plan_steps(budget_s=budget, elapsed_s=elapsed, rates=rates, steps_per_epoch=spe, batch_images=batch,
                      n_val=n_val, after_images=after, after_fixed_s=fixed)
    limit = budget * (1 - SAFETY_SHARE)
    # the most steps that fit (up to rounding at an exact tie), or the one step a spent budget still trains
    assert plan.total_steps == 1 or _run_seconds(plan.total_steps, **kw) <= limit * (1 + 1e-12)
    assert _run_seconds(plan.total_steps + 1, **kw) > limit * (1 - 1e-12)


def test_the_schedule_ends_where_a_partial_run_ends():
    from geocell.training.engine import LRSchedule

    # whole epochs: the recipe's milestones (epochs 3 and 4 of 5), with or without total_steps
    assert LRSchedule("step", 100, 5).milestones == [300, 400]
    assert LRSchedule("step", 100, 5, total_steps=500).milestones == [300, 400]
    # 2.5 epochs: 2/3 and 8/9 of its 250 steps
    partial = LRSchedule("step", 100, 3, gamma=0.5, total_steps=250)
    assert partial.milestones == [167, 222] and partial.total == 250
    assert partial(166) == 1.0 and partial(167) == 0.5 and partial(249) == 0.25
    cosine = LRSchedule("cosine", 100, 3, total_steps=250)
    assert cosine(0) == 1.0 and abs(cosine(125) - 0.5) < 1e-12 and cosine(250) == 0.0


torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

from geocell.commands import train as run  # noqa: E402
from geocell.model.checkpoint import load_checkpoint  # noqa: E402

# ResNet-18 from scratch: the budget's plan does not depend on the trunk, and it is the faster one here.
TINY = ["--image-size", "32", "--batch-size", "16", "--workers", "0", "--backend", "torch", "--threads", "1",
        "--no-progress", "--no-tensorboard", "--log-every", "2", "--no-retrieval", "--helper-epochs", "1",
        "--helper-image-size", "32", "--arch", "resnet18"]


@pytest.fixture(scope="module")
def earth_dir(tmp_path_factory):
    return ["--data-dir", str(tmp_path_factory.mktemp("earth") / "data"), "--earth-n", "240", "--earth-size", "32",
            "--earth-scenes", "64"]


def test_a_budgeted_run_plans_its_steps_and_finishes_in_time(earth_dir, tmp_path, capsys):
    out = tmp_path / "run"
    run.main([*earth_dir, *TINY, "-o", str(tmp_path / "warm"), "--epochs", "1", "--stop-after-steps", "1"])
    capsys.readouterr()
    t0 = time.perf_counter()
    assert run.main([*earth_dir, *TINY, "--time-budget", "20s", "-o", str(out)]) == 0
    seconds = time.perf_counter() - t0
    printed = capsys.readouterr().out
    assert "plan:" in printed and "images/s" in printed and "of the 20 s budget left" in printed
    last = load_checkpoint(out / "last.pt")
    config = last["train_state"]["config"]
    assert config["time_budget"] == "20s" and config["total_steps"] >= 1
    assert config["channels_last"] in ("true", "false")  # the probe's choice, kept for a resume
    assert last["train_state"]["step"] == config["total_steps"]
    assert load_checkpoint(out / "best.pt")["model"].keys() == last["model"].keys()
    assert seconds < 120  # generous: the plan aims at 20 s on an idle machine


def test_an_epoch_count_alone_switches_the_default_budget_off(earth_dir, tmp_path):
    from geocell.training.config import resolve

    assert resolve({}).time_budget == "auto"
    assert resolve({"epochs": 2}).time_budget == "none"
    assert resolve({"epochs": 2, "time_budget": "5m"}).time_budget == "5m"  # both: at most 2 epochs in 5 min
    with pytest.raises(ValueError, match="time-budget"):
        resolve({"time_budget": "soon"})


def test_resume_inside_a_budgeted_run_equals_the_uninterrupted_run(earth_dir, tmp_path):
    # The budgeted run's plan (steps, memory format, precision) is fixed in its config: the interrupted run
    # resumes it, and one uninterrupted run of the same plan ends in the same weights.
    cut = tmp_path / "cut"
    assert run.main([*earth_dir, *TINY, "--time-budget", "30s", "-o", str(cut), "--stop-after-steps", "3"]) == 0
    config = load_checkpoint(cut / "last.pt")["train_state"]["config"]
    assert load_checkpoint(cut / "last.pt")["train_state"]["step"] == 3 < config["total_steps"]
    assert run.main(["--resume", str(cut)]) == 0
    full = tmp_path / "full"
    assert run.main([*earth_dir, *TINY, "--time-budget", "30s", "--total-steps", str(config["total_steps"]),
                     "--epochs", str(config["epochs"]), "--channels-last", config["channels_last"],
                     "--amp", config["amp"], "-o", str(full)]) == 0
    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(cut / "last.pt")
    assert a["train_state"]["step"] == b["train_state"]["step"] == config["total_steps"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_a_second_run_reuses_the_scene_helper_of_the_first(earth_dir, tmp_path, capsys):
    # The helper's cost is paid once per data and options: the second run takes its checkpoint
    # and its scene probabilities from the cache, and labels the GPS images identically.
    args = [*earth_dir, *TINY, "--epochs", "1", "--stop-after-steps", "1"]
    assert run.main([*args, "-o", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert run.main([*args, "-o", str(tmp_path / "b")]) == 0
    assert "the one trained by an earlier run" in capsys.readouterr().out
    a, b = (tmp_path / "a" / "scene_labels.csv").read_text(), (tmp_path / "b" / "scene_labels.csv").read_text()
    assert a == b
    assert load_checkpoint(tmp_path / "b" / "scene_helper.pt")["model"].keys() == \
        load_checkpoint(tmp_path / "a" / "scene_helper.pt")["model"].keys()
    # other helper options are another helper
    assert run.main([*args, "--helper-lr", "0.02", "-o", str(tmp_path / "c")]) == 0
    assert "the one trained by an earlier run" not in capsys.readouterr().out


@pytest.mark.parametrize("bf16_rate, float32_rate, expected", [(100.0, 160.0, "none"), (160.0, 100.0, "bf16")])
def test_the_probe_keeps_float32_where_native_bf16_is_slower(monkeypatch, capsys, bf16_rate, float32_rate, expected):
    # bf16 autocast is a rule only where it is emulated: with native bf16 on a CPU and --amp auto,
    # float32 is timed on the chosen path and kept when faster (as for EfficientNet-Lite0), and
    # the choice goes into the config a resumed run follows; an --amp given is not probed
    from geocell.training import engine, trainer
    from geocell.training.budget import StageClock
    from geocell.training.config import TrainConfig

    calls = []

    def fake_probe(model, criterion, loaders, *, info, amp_dtype, channels_last_options=(False,)):
        calls.append(amp_dtype)
        rate = bf16_rate if amp_dtype is torch.bfloat16 else float32_rate
        rates = {(b, cl): rate for b in loaders for cl in channels_last_options}
        return rates, 500.0, next(iter(rates))

    monkeypatch.setattr(engine, "probe_rates", fake_probe)
    loader = type("Loader", (), {"backend": "torch"})()
    quiet = StageClock(600.0, log=lambda *_: None)

    def plan(amp):
        cfg = TrainConfig(backend="torch", channels_last="false", amp=amp, progress=False)
        # a budget short enough that --epochs does not cap the steps
        return trainer.plan_run(cfg, engine.DistInfo(), quiet, 150.0, None, None, loader, None,
                                trainer.training_autocast_dtype(torch.device("cpu"), "bf16"), 100,
                                n_val=10, after_images=10, n_fitted=10)

    capsys.readouterr()
    backend, channels_last, amp, steps, _ = plan("auto")
    assert (backend, channels_last, amp) == ("torch", "false", expected) and steps > 0
    assert calls == [torch.bfloat16, None]
    # both precisions are printed as measured, and the plan follows the faster one (the stub's
    # 160 images/s, whichever precision it was): more steps than 100 images/s would give
    printed = capsys.readouterr().out
    assert f"torch loader NCHW {bf16_rate:.0f} images/s" in printed
    assert f"float32 on the torch loader: NCHW {float32_rate:.0f} images/s" in printed
    assert f"({'float32' if expected == 'none' else 'bf16'}, torch, NCHW chosen)" in printed
    slower = trainer.plan_steps(budget_s=150.0, elapsed_s=0.0, rates=trainer.Rates(100.0, 500.0),
                                steps_per_epoch=100, batch_images=TrainConfig().batch_size, n_val=10,
                                after_images=10, after_fixed_s=trainer.FIT_SECONDS_PER_IMAGE * 10,
                                max_steps=TrainConfig().epochs * 100).total_steps
    faster = trainer.plan_steps(budget_s=150.0, elapsed_s=0.0, rates=trainer.Rates(160.0, 500.0),
                                steps_per_epoch=100, batch_images=TrainConfig().batch_size, n_val=10,
                                after_images=10, after_fixed_s=trainer.FIT_SECONDS_PER_IMAGE * 10,
                                max_steps=TrainConfig().epochs * 100).total_steps
    assert slower < steps <= faster
    calls.clear()
    assert plan("bf16")[2] == "bf16" and calls == [torch.bfloat16]


def test_the_probe_times_float32_in_each_memory_format(monkeypatch, capsys):
    # bf16's faster layout need not be float32's: bf16 NCHW 140 beats channels_last 139, but
    # float32 runs 129 in NCHW and 200 in channels_last; the plan takes float32 in channels_last
    from geocell.training import engine, trainer
    from geocell.training.budget import StageClock
    from geocell.training.config import TrainConfig

    measured = {(torch.bfloat16, False): 140.0, (torch.bfloat16, True): 139.0, (None, False): 129.0, (None, True): 200.0}

    def fake_probe(model, criterion, loaders, *, info, amp_dtype, channels_last_options=(False,)):
        rates = {(b, cl): measured[amp_dtype, cl] for b in loaders for cl in channels_last_options}
        return rates, 500.0, max(rates, key=rates.get)

    monkeypatch.setattr(engine, "probe_rates", fake_probe)
    loader = type("Loader", (), {"backend": "torch"})()
    cfg = TrainConfig(backend="torch", channels_last="auto", amp="auto", progress=False)
    capsys.readouterr()
    backend, channels_last, amp, steps, _ = trainer.plan_run(
        cfg, engine.DistInfo(), StageClock(600.0, log=lambda *_: None), 150.0, None, None, loader, None,
        trainer.training_autocast_dtype(torch.device("cpu"), "bf16"), 100, n_val=10, after_images=10, n_fitted=10)
    assert (backend, channels_last, amp) == ("torch", "true", "none")
    printed = capsys.readouterr().out
    assert "float32 on the torch loader: NCHW 129, channels_last 200 images/s (float32, torch, channels_last chosen)" \
        in printed
    at_200 = trainer.plan_steps(budget_s=150.0, elapsed_s=0.0, rates=trainer.Rates(200.0, 500.0), steps_per_epoch=100,
                                batch_images=cfg.batch_size, n_val=10, after_images=10,
                                after_fixed_s=trainer.FIT_SECONDS_PER_IMAGE * 10, max_steps=cfg.epochs * 100)
    assert steps == at_200.total_steps
