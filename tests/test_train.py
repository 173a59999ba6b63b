"""End-to-end training: a run on four places whose photos' colour encodes the place (it must beat
the best constant guess), the scene helper on a tiny Earth dataset, exact mid-epoch resume (torch loader with worker
processes, DALI CPU pipeline), DDP on two CPU processes, config."""

import json
import os
import socket

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")

import geocell  # noqa: E402

from geocell.commands import train as train_command
from geocell.training import trainer as run
from geocell.training.config import resolve
from geocell.data.terrain import SCENE_NAMES
from geocell.model.checkpoint import load_checkpoint

TINY = ["--image-size", "32", "--batch-size", "16", "--workers", "0", "--backend", "torch", "--threads", "1",
        "--no-progress", "--no-tensorboard", "--arch", "resnet18", "--log-every", "2"]


@pytest.fixture(scope="module")
def earth(tmp_path_factory):
    from geocell.data.earth import build_earth

    return str(build_earth(tmp_path_factory.mktemp("earth"), n=240, size=32, seed=0, progress=False, workers=1))


def _weights(path):
    return load_checkpoint(path)["model"]


# Four places far apart, each photographed in its own colour, in unequal numbers: a model that
# learned anything tells them apart; one that did not answers one place for all.
PLACES = [((48.9, 2.3), (200, 40, 40)), ((40.0, -100.0), (40, 200, 40)),
          ((-25.0, 135.0), (40, 40, 200)), ((35.7, 139.7), (210, 210, 40))]
PLACE_SHARES = (0.4, 0.3, 0.2, 0.1)


def write_colour_places(folder, n: int = 240, seed: int = 0) -> str:
    """A manifest whose images' colour encodes the place (train/val/test drawn within each place)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder / "images", exist_ok=True)
    rows = ["path,lat,lng,scene,split"]
    for k, (((lat, lng), colour), share) in enumerate(zip(PLACES, PLACE_SHARES)):
        for i in range(int(n * share)):
            pixels = np.clip(np.array(colour) + rng.normal(0, 12, (32, 32, 3)), 0, 255).astype(np.uint8)
            name = f"images/p{k}_{i}.jpg"
            Image.fromarray(pixels).save(folder / name)
            split = ("train", "train", "train", "val", "test")[i % 5]
            rows.append(f"{name},{lat + rng.normal(0, 0.2):.5f},{lng + rng.normal(0, 0.2):.5f},"
                        f"{SCENE_NAMES[k]},{split}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return str(folder / "manifest.csv")


def best_constant_guess_accuracy(manifest, radius_km: float) -> float:
    """Chance: the share of test images within radius_km of the best single location one could
    answer for all of them (any training location)."""
    from geocell.data.manifest import read_manifest

    m = read_manifest(manifest)
    train, test = m.split == "train", m.split == "test"
    shape = (test.sum(), train.sum())
    dist = geocell.great_circle_km(*(np.broadcast_to(a, shape).ravel() for a in (
        m.lat[test][:, None], m.lng[test][:, None], m.lat[train][None, :], m.lng[train][None, :]))).reshape(shape)
    return float((dist <= radius_km).mean(axis=0).max())


def test_end_to_end_run(tmp_path, capsys):
    manifest = write_colour_places(tmp_path / "places")
    chance = best_constant_guess_accuracy(manifest, 200)
    assert 0.35 < chance < 0.45  # the largest place's share of the test split
    out = tmp_path / "run"
    assert train_command.main(["--manifest", manifest, "--epochs", "6", "-o", str(out), "--smoothing-km", "65", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "hierarchy" in printed and "most frequent cell" in printed and "2500 km" in printed
    for name in ("config.yaml", "last.pt", "best.pt", "metrics.jsonl", "results.json",
                 "partitions/coarse.csv", "partitions/middle.csv", "partitions/fine.csv"):
        assert (out / name).exists(), name
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["scene_names"] == SCENE_NAMES and len(ckpt["num_classes"]) == 3
    assert ckpt["hierarchy"].shape == (ckpt["num_classes"][-1], 3)
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert any("val" in r for r in records) and any("images_per_s" in r for r in records)
    rows = json.load(open(out / "results.json"))["rows"]
    # the baseline answers the most frequent cell; the trained model must find the other places
    assert rows["most frequent cell"]["acc_200km"] <= chance + 1e-9
    for row in ("hierarchy", "hybrid (retrieval)"):
        assert rows[row]["acc_200km"] >= chance + 0.3, (row, rows[row], chance)


def test_scene_helper_labels_the_gps_images_the_scene_head_learns(tmp_path, capsys):
    # The default route: the Earth dataset with its scene dataset; the helper trains on scenes.csv,
    # labels every GPS image, and the multitask network learns those labels.
    from geocell.data.manifest import read_manifest

    data, out = tmp_path / "earth", tmp_path / "run"
    earth_args = ["--data-dir", str(data), "--earth-n", "200", "--earth-size", "32", "--earth-scenes", "96",
                  "--helper-epochs", "2", "--helper-image-size", "32", "--epochs", "1", "--no-retrieval"]
    assert train_command.main([*earth_args, "-o", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "scene helper" in printed and "agree with the withheld true ones" in printed
    helper = load_checkpoint(out / "scene_helper.pt")
    assert helper["scene_names"] == SCENE_NAMES and helper["num_classes"] == []
    gps = read_manifest(data / "manifest.csv")
    labels = read_manifest(out / "scene_labels.csv", check_files=False)
    assert len(labels) == len(gps) and sorted(labels.paths) == sorted(gps.paths)  # one row per GPS image
    for split in ("train", "val", "test"):
        assert (labels.split == split).sum() == (gps.split == split).sum()
    np.testing.assert_allclose(labels.scene_probs.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(labels.scene, labels.scene_probs.argmax(axis=1))
    summary = json.load(open(out / "results.json"))["scene_helper"]
    assert 0 <= summary["helper_val_accuracy"] <= 1 and set(summary["agreement"]) == {"train", "val", "test"}
    assert load_checkpoint(out / "best.pt")["scene_names"] == SCENE_NAMES
    # any manifest with --scene-manifest (here the same two files, named explicitly)
    assert train_command.main(["--manifest", str(data / "manifest.csv"), "--scene-manifest", str(data / "scenes.csv"),
                     "--helper-epochs", "1", "--helper-image-size", "32", "--stop-after-steps", "1",
                     "-o", str(tmp_path / "own"), *TINY]) == 0
    assert len(read_manifest(tmp_path / "own" / "scene_labels.csv", check_files=False)) == len(gps)
    assert (tmp_path / "own" / "scene_helper.pt").is_file()
    # a resumed run reads the labels back instead of training the helper again
    written = (out / "scene_labels.csv").read_bytes()
    assert train_command.main([*earth_args, "-o", str(tmp_path / "cut"), "--stop-after-steps", "2", *TINY]) == 0
    capsys.readouterr()
    assert train_command.main(["--resume", str(tmp_path / "cut")]) == 0
    assert "scene helper epoch" not in capsys.readouterr().out
    assert (tmp_path / "cut" / "scene_labels.csv").read_bytes() == written


def test_gps_labels_of_other_scenes_are_not_scored_against_the_helpers(tmp_path, capsys):
    # A GPS manifest labelled indoor/natural/urban, a helper trained on the Earth scenes: no
    # agreement is claimed and the scene head is not scored against labels of another scene list.
    from geocell.data.earth import build_earth
    from geocell.data.manifest import read_manifest, write_manifest

    gps = read_manifest(build_earth(tmp_path / "earth", n=200, size=32, seed=0, progress=False, workers=1,
                                    n_scenes=96))
    gps.scene, gps.scene_names = np.arange(len(gps)) % 3, ["indoor", "natural", "urban"]
    write_manifest(gps, tmp_path / "gps.csv")
    out = tmp_path / "run"
    assert train_command.main(["--manifest", str(tmp_path / "gps.csv"), "--scene-manifest", str(tmp_path / "earth" / "scenes.csv"),
                     "--helper-epochs", "1", "--helper-image-size", "32", "--epochs", "1", "--no-retrieval",
                     "-o", str(out), *TINY]) == 0
    results = json.load(open(out / "results.json"))
    assert results["scene_helper"]["agreement"] == {} and results["scene_acc"] is None
    assert load_checkpoint(out / "best.pt")["scene_names"] == SCENE_NAMES


def test_a_resumed_run_refuses_scene_labels_that_do_not_match_its_images(earth, tmp_path):
    # scene_labels.csv with a row missing (edited, or from another dataset): named, not misaligned
    from geocell.data.manifest import read_manifest
    from geocell.training.engine import DistInfo

    gps = read_manifest(earth)
    splits = {name: gps.subset(gps.split == name) for name in ("train", "val", "test")}
    lines = ["path,lat,lng,scene,split"] + [f"{p},{a},{b},water,train" for p, a, b in
                                            zip(gps.paths[:-1], gps.lat[:-1], gps.lng[:-1])]
    (tmp_path / "scene_labels.csv").write_text("\n".join(lines) + "\n")
    cfg = resolve({"manifest": earth})
    with pytest.raises(SystemExit, match=f"has {len(gps) - 1} rows, not one per GPS image"):
        run.propagate_scenes(cfg, DistInfo(), str(tmp_path), splits, resume=True)


@pytest.mark.parametrize("backend,workers", [("torch", "2"), ("dali", "2")])
def test_resume_matches_an_uninterrupted_run(earth, tmp_path, backend, workers):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    # Worker processes / DALI threads must not change the augmentations of the resumed epoch.
    args = ["--manifest", earth, "--epochs", "2", *TINY, "--backend", backend, "--workers", workers]
    train_command.main([*args, "-o", str(tmp_path / "full")])
    steps = load_checkpoint(tmp_path / "full" / "last.pt")["train_state"]["step"]
    # Interrupted mid-epoch (periodic checkpoint), then resumed from the run folder.
    train_command.main([*args, "-o", str(tmp_path / "cut"), "--stop-after-steps", str(steps // 2 + 1)])
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["train_state"]["step"] == steps // 2 + 1
    train_command.main(["--resume", str(tmp_path / "cut")])
    full, resumed = _weights(tmp_path / "full" / "last.pt"), _weights(tmp_path / "cut" / "last.pt")
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    a = json.load(open(tmp_path / "full" / "results.json"))
    b = json.load(open(tmp_path / "cut" / "results.json"))
    assert a["rows"] == b["rows"]


def test_yaml_config_and_flag_precedence(earth, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 5\nlr: 0.02\nschedule: cosine\n")
    out = tmp_path / "run"
    train_command.main(["--config", str(cfg), "--manifest", earth, "--epochs", "1", "-o", str(out),
              "--partitions", *[str(p) for p in _partition_csvs(earth, tmp_path)], *TINY])
    import yaml

    saved = yaml.safe_load(open(out / "config.yaml"))
    assert saved["epochs"] == 1 and saved["lr"] == 0.02 and saved["schedule"] == "cosine"
    import geocell

    csvs = _partition_csvs(earth, tmp_path)
    assert load_checkpoint(out / "last.pt")["num_classes"] == [len(geocell.Partition.read_csv(p)) for p in csvs]


def _partition_csvs(earth, tmp_path):
    import geocell
    from geocell.data.manifest import read_manifest

    m = read_manifest(earth)
    paths = []
    for i, (lo, hi) in enumerate([(1, 120), (1, 40)]):
        p = geocell.partition(m.lat, m.lng, tau_min=lo, tau_max=hi)
        p.to_csv(tmp_path / f"p{i}.csv")
        paths.append(tmp_path / f"p{i}.csv")
    return paths


def _ddp_worker(rank, world, port, earth, out, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    args = train_command.build_parser().parse_args(["--manifest", earth, "--epochs", "1", "-o", out, "--device", "cpu", *TINY])
    result = run.train(resolve(vars(args)))
    digest = float(sum(p.double().sum() for p in result["model"].state_dict().values()))
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rows": result["rows"], "digest": digest}, f)
    run.engine.cleanup_distributed()


def test_ddp_two_gloo_processes(earth, tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "run")
    mp.spawn(_ddp_worker, args=(2, port, earth, out, str(tmp_path)), nprocs=2, join=True)
    r0 = json.load(open(tmp_path / "rank0.json"))
    r1 = json.load(open(tmp_path / "rank1.json"))
    assert r0["digest"] == r1["digest"]  # DDP kept the replicas identical
    assert r0["rows"] == r1["rows"]  # metrics reduced over both shards
    n_test = r0["rows"]["hierarchy"]["n"]
    from geocell.data.manifest import read_manifest

    assert n_test == int((read_manifest(earth).split == "test").sum())  # every test image once
    assert (tmp_path / "run" / "last.pt").exists() and (tmp_path / "run" / "results.json").exists()


def test_imagenet_weights_offline_is_a_clear_cli_error(earth, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.setenv("no_proxy", "")
    monkeypatch.setenv("NO_PROXY", "")
    code = train_command.main(["--manifest", earth, "--epochs", "1", "-o", str(tmp_path / "run"), "--pretrained", "imagenet",
                     *TINY])
    assert code == 2
    err = capsys.readouterr().err
    assert "could not download the ImageNet weights for resnet18" in err and "--pretrained none" in err


def _train_process(args):
    import subprocess
    import sys

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "geocell", "train", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_at_a_mid_epoch_checkpoint(proc, last, after_step, timeout=120):
    """SIGKILL ``proc`` once ``last`` is a mid-epoch checkpoint past ``after_step``; returns that
    step, or None when the run ended first."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            state = load_checkpoint(last)["train_state"]
        except Exception:  # not written yet
            state = None
        if state and state["step_in_epoch"] > 0 and state["step"] > after_step:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return int(state["step"])
        time.sleep(0.02)
    proc.wait(timeout=timeout)
    return None


def test_killed_twice_mid_epoch_then_resumed_equals_the_uninterrupted_run(earth, tmp_path):
    # Periodic checkpoints every 2 steps; SIGKILL right after one (possibly inside the next
    # write), resume, kill again later, resume to the end: bit-identical to one clean run.
    args = ["--manifest", earth, "--epochs", "2", *TINY, "--checkpoint-every", "2"]
    assert train_command.main([*args, "-o", str(tmp_path / "full")]) == 0
    out, last = tmp_path / "cut", tmp_path / "cut" / "last.pt"
    killed = [_kill_at_a_mid_epoch_checkpoint(_train_process([*args, "-o", str(out)]), last, 0)]
    if killed[0] is not None:
        killed.append(_kill_at_a_mid_epoch_checkpoint(_train_process(["--resume", str(out)]), last, killed[0]))
    assert killed[0] is not None, "the run ended before a mid-epoch checkpoint could be interrupted"
    finish = _train_process(["--resume", str(out)])
    assert finish.wait(timeout=300) == 0, finish.stderr.read()
    full, resumed = _weights(tmp_path / "full" / "last.pt"), _weights(last)
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl") if "images_per_s" in line]
    assert steps[-1] == load_checkpoint(last)["train_state"]["step"]
    assert not list(out.glob(".tmp-*"))  # no orphan temporary checkpoint left behind


def test_images_that_fail_are_listed_in_the_run_folder(earth, tmp_path, capsys):
    from geocell.data.manifest import read_manifest, write_manifest

    m = read_manifest(earth)
    train_rows = np.flatnonzero(m.split == "train")
    broken = tmp_path / "broken.jpg"   # a JPEG header and end marker around garbage: fails to decode
    broken.write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(2000) + b"\xff\xd9")
    empty = tmp_path / "empty.jpg"     # fails the check before loading
    empty.write_bytes(b"")
    m.paths[train_rows[0]], m.paths[train_rows[1]] = str(broken), str(empty)
    write_manifest(m, tmp_path / "m.csv")
    out = tmp_path / "run"
    assert train_command.main(["--manifest", str(tmp_path / "m.csv"), "--epochs", "1", "-o", str(out), *TINY]) == 0
    import csv

    with open(out / "skipped_images.csv", newline="") as f:
        listed = {(r["split"], os.path.basename(r["image"])) for r in csv.DictReader(f)}
    assert listed == {("train", "broken.jpg"), ("train", "empty.jpg")}
    assert "2 images could not be used (train 2)" in capsys.readouterr().out


def test_ablation_trains_each_variant_with_each_seed_and_reports_intervals(tmp_path, monkeypatch, capsys):
    """The ablation's wiring, with train() replaced by a stand-in whose test errors are known:
    every variant runs once per seed, classification only, and the table is the bootstrap
    interval of exactly those errors."""
    from geocell.infer.metrics import bootstrap_interval, location_blocks

    calls = []
    # three test images in Paris, two in Sydney, one in New York: three blocks
    true_latlng = np.array([[48.85, 2.35], [48.9, 2.4], [48.8, 2.3], [-33.9, 151.2], [-33.8, 151.1], [40.7, -74.0]])

    def fake_train(cfg, resume=None):
        calls.append(cfg)
        base = 100.0 * len(cfg.taus) + (50.0 if cfg.scene_head else 0.0)
        errors = base + cfg.seed + np.arange(6.0) * 400.0
        rows = {"fine": errors} if len(cfg.taus) == 1 else {"fine": errors + 1e4, "hierarchy": errors}
        return {"errors_km": rows, "seconds": 1.0, "split": "test", "true_latlng": true_latlng}

    monkeypatch.setattr(run, "train", fake_train)
    out = tmp_path / "abl"
    assert train_command.main(["--ablation", "--seeds", "2", "--seed", "5", "--manifest", "unused.csv", "-o", str(out)]) == 0
    assert [(len(c.taus), c.scene_head, c.scene_helper, c.seed) for c in calls] == [
        (1, False, False, 5), (1, False, False, 6), (3, False, False, 5), (3, False, False, 6),
        (3, True, False, 5), (3, True, False, 6), (3, True, True, 5), (3, True, True, 6)]
    assert not any(c.retrieval for c in calls) and len({c.out for c in calls}) == 8
    saved = json.load(open(out / "ablation.json"))
    assert saved["seeds"] == [5, 6] and saved["split"] == "test"
    want = bootstrap_interval([300.0 + s + np.arange(6.0) * 400.0 for s in (5, 6)],
                              blocks=location_blocks(true_latlng), seed=5)
    got = saved["rows"]["3 partitionings + hierarchy"]
    assert all(got[k] == pytest.approx(list(want[k])) for k in ("acc_200km", "acc_750km", "median_km"))
    assert want["units"] == 3 and "95 % bootstrap interval over the S2 blocks" in capsys.readouterr().out
    calls.clear()  # a subset of the variants
    assert train_command.main(["--ablation", "--seeds", "1", "--ablation-variants", "4", "--manifest", "unused.csv",
                     "-o", str(tmp_path / "abl4")]) == 0
    assert [(c.scene_head, c.scene_helper) for c in calls] == [(True, True)]
    assert list(json.load(open(tmp_path / "abl4" / "ablation.json"))["rows"]) == [
        "3 + hierarchy + scenes (helper labels)"]


def test_training_autocast_follows_the_hardware(monkeypatch):
    """auto: bf16 on a GPU and on a CPU that multiplies bf16 natively (AVX512-BF16 or AMX, read here
    from /proc/cpuinfo's flags), full precision elsewhere; an explicit choice always wins."""
    from geocell._internal import torch_util

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert torch_util.training_autocast_dtype(cpu, "none") is None
    assert torch_util.training_autocast_dtype(cpu, "bf16") is torch.bfloat16
    assert torch_util.training_autocast_dtype(cpu, "fp16") is torch.float16
    assert torch_util.training_autocast_dtype(cuda, "auto") is torch.bfloat16
    assert torch_util.training_autocast_dtype(cuda, "none") is None
    if os.path.exists("/proc/cpuinfo"):
        flags = {f for line in open("/proc/cpuinfo") if line.startswith("flags") for f in line.split()}
        assert torch_util.cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_tile"})
    for native, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(torch_util, "cpu_has_native_bf16", lambda native=native: native)
        assert torch_util.training_autocast_dtype(cpu, "auto") is expected
