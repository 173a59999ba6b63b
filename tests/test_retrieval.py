"""Retrieval over the training photos: the index file and its refusals, faiss against numpy, the
hybrid distribution and its credible regions, and the trained pipeline end to end (the trainer's
index and fit, Geolocator with and without retrieval, geocell index build, geocell evaluate)."""

from __future__ import annotations

import io
import math
import os
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

from geocell._internal.geometry import unit_vectors  # noqa: E402
from geocell.cells import EARTH_RADIUS_KM  # noqa: E402
from geocell.model.records import HybridFit  # noqa: E402
from geocell.infer.mixture import Mixture  # noqa: E402
from geocell.infer.hybrid import (NeighbourKernels, fit_retrieval, mix_weights, neighbour_kernels,  # noqa: E402
                                  neighbour_kernels_km)
from geocell.infer.retrieval import (  # noqa: E402
    RetrievalError,
    RetrievalIndex,
    Searcher,
    index_path_for,
    ivfpq_shape,
    normalise,
)


def random_index(n=300, dim=16, seed=0, dtype=np.float16) -> RetrievalIndex:
    rng = np.random.default_rng(seed)
    return RetrievalIndex(normalise(rng.normal(size=(n, dim))).astype(dtype), rng.uniform(-80, 80, n),
                          rng.uniform(-180, 180, n), fingerprint="a" * 64, source="random")


# ----------------------------------------------------------------------------- the index file


def test_index_round_trip(tmp_path):
    index = random_index()
    index.fit = {"kind": "uniform", "weight": 0.5, "kernel_km": 30.0}
    path = tmp_path / "x.retrieval.npz"
    index.save(path)
    back = RetrievalIndex.load(path, fingerprint="a" * 64)
    assert back.embeddings.dtype == np.float16 and np.array_equal(back.embeddings, index.embeddings)
    assert np.array_equal(back.lat, index.lat) and np.array_equal(back.lng, index.lng)
    assert back.fit == index.fit and back.source == "random" and len(back) == 300 and back.dim == 16
    assert index_path_for("runs/a/best.pt") == os.path.join("runs", "a", "best.retrieval.npz")


def test_index_refusals(tmp_path):
    path = tmp_path / "x.npz"
    random_index().save(path)
    with pytest.raises(RetrievalError, match="another checkpoint"):
        RetrievalIndex.load(path, fingerprint="b" * 64)
    # edited after it was written: one location moved, the file otherwise intact
    with np.load(path) as z:
        fields = {k: z[k] for k in z.files}
    fields["lat"] = fields["lat"].copy()
    fields["lat"][0] = 1.0
    np.savez(tmp_path / "edited.npz", **fields)
    with pytest.raises(RetrievalError, match="checksum mismatch"):
        RetrievalIndex.load(tmp_path / "edited.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(RetrievalError, match="not a readable retrieval index"):
        RetrievalIndex.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(RetrievalError, match="not a geocell retrieval index"):
        RetrievalIndex.load(tmp_path / "other.npz")
    with pytest.raises(RetrievalError, match="no such retrieval index"):
        RetrievalIndex.load(tmp_path / "missing.npz")
    with pytest.raises(RetrievalError, match="2 embeddings but 3"):
        RetrievalIndex(np.zeros((2, 4), np.float32), [0, 0, 0], [0, 0, 0], "f")


# ----------------------------------------------------------------------------- search


def test_faiss_and_numpy_agree_on_exact_top_k():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    vectors = normalise(rng.normal(size=(3000, 32)))
    queries = normalise(rng.normal(size=(70, 32)))
    flat, plain = Searcher(vectors), Searcher(vectors, backend="numpy")
    assert (flat.kind, plain.kind) == ("flat", "numpy")
    s1, i1 = flat.search(queries, 16)
    s2, i2 = plain.search(queries, 16)
    assert np.array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, atol=1e-5)
    assert (np.diff(s2, axis=1) <= 0).all()
    # k above the index size: every photo, once
    s, i = plain.search(queries[:2], 5000)
    assert i.shape == (2, 3000) and all(len(set(row)) == 3000 for row in i)


def test_numpy_blocks_and_ivfpq_past_the_budget(monkeypatch):
    import geocell.infer.retrieval as retrieval

    rng = np.random.default_rng(2)
    vectors = normalise(rng.normal(size=(4000, 32)))
    queries = vectors[:50] + 0.01 * rng.normal(size=(50, 32)).astype(np.float32)
    exact = Searcher(vectors, backend="numpy").search(queries, 8)
    monkeypatch.setattr(retrieval, "NUMPY_BLOCK_BYTES", 4096)  # many small blocks: same answer
    blocked = Searcher(vectors, backend="numpy").search(queries, 8)
    assert np.array_equal(exact[1], blocked[1])
    pytest.importorskip("faiss")
    ivf = Searcher(vectors, memory_budget=0)
    assert ivf.kind == "ivfpq" and ivfpq_shape(4000, 32) == (64, 4)
    sims, idx = ivf.search(queries, 8)
    assert idx.shape == (50, 8) and (idx >= 0).all()
    assert (idx[:, 0] == np.arange(50)).mean() >= 0.8  # the perturbed photo itself comes first


# ----------------------------------------------------------------------------- the hybrid


def _grid_mass(mixture, centre, half_deg=1.5, step=0.01):
    """The mixture's mass within +-half_deg of centre (lat, lng), by a lat/lng grid."""
    lat = np.arange(centre[0] - half_deg, centre[0] + half_deg, step) + step / 2
    lng = np.arange(centre[1] - half_deg, centre[1] + half_deg, step) + step / 2
    la, ln = np.meshgrid(lat, lng, indexing="ij")
    density = mixture.density_at(unit_vectors(la.ravel(), ln.ravel()))
    cell = (EARTH_RADIUS_KM * math.radians(step)) ** 2 * np.cos(np.radians(la.ravel()))
    return float((density * cell).sum())


def test_hybrid_is_a_distribution_and_its_regions_hold_what_they_should():
    # the cells put their mass around (0, 0) and (10, 20); the neighbours agree on (45, 7). For
    # vMF kernels the mass outside a component's density contour at c x its peak is c: so the
    # 50 % region is the neighbours' cluster alone, the 90 % one adds the first two cells (mass
    # 0.02 + 2 x 0.04 left out) and the 99 % one all three.
    centroids = unit_vectors(np.array([0.0, 10.0, -30.0]), np.array([0.0, 20.0, 100.0]))
    log_q = np.log([0.75, 0.2, 0.05])  # with weight 0.4 on the cells: 0.3, 0.08, 0.02
    place = np.array([45.0, 7.0])
    rng = np.random.default_rng(0)
    near = place + rng.normal(0, 0.05, (16, 2))
    kernels = NeighbourKernels(weight=0.6, q=np.full(16, 1 / 16), means=unit_vectors(near[:, 0], near[:, 1]),
                               kernel_km=10.0)
    mixture = Mixture(log_q, centroids, 300.0, neighbours=kernels, samples=8000)
    assert math.isclose(mixture.q.sum(), 1.0, rel_tol=1e-12)
    # the neighbours' part holds its weight near the place, and nothing is lost or added
    assert abs(_grid_mass(mixture, place) - 0.6) < 0.01
    assert mixture.holds(place, 0.5) and not mixture.holds((0.0, 0.0), 0.5)
    assert mixture.holds((0.0, 0.0), 0.9) and mixture.holds((10.0, 20.0), 0.9)
    assert not mixture.holds((-30.0, 100.0), 0.9)
    assert mixture.holds((-30.0, 100.0), 0.99)
    assert mixture.region_area_km2(0.5) < 2000  # the neighbours' tight cluster alone
    # and without neighbours it is the cells' mixture again
    assert not Mixture(log_q, centroids, 300.0).holds(place, 0.99)


def test_hybrid_best_guess_falls_back_to_the_top_cell():
    from geocell.infer.hybrid import hybrid_mode

    # two overlapping cells: their mixture is densest between them, where the neighbours are
    centroids = unit_vectors(np.array([0.0, 0.0]), np.array([0.0, 3.0]))
    log_q = np.log([0.55, 0.45])
    middle = np.array([[0.0, 1.5]] * 16)
    for weight, want in ((1e-6, (0.0, 0.0)), (0.9, (0.0, 1.5))):
        kernels = NeighbourKernels(weight=weight, q=np.full(16, 1 / 16),
                                   means=unit_vectors(middle[:, 0], middle[:, 1]), kernel_km=20.0)
        mixture = Mixture(log_q, centroids, 300.0, neighbours=kernels, samples=1)
        assert mixture.density_at(kernels.means[:1])[0] > mixture.density_at(centroids[:1])[0]
        assert np.allclose(hybrid_mode(mixture, log_q, centroids, kernels), want, atol=1e-9)


def _synthetic_validation(n=300, informative=True, seed=0):
    rng = np.random.default_rng(seed)
    cent = np.stack([rng.uniform(-60, 60, 40), rng.uniform(-180, 180, 40)], 1)
    which = rng.integers(0, 40, n)
    true = cent[which] + rng.normal(0, 1.0, (n, 2))
    logits = torch.randn(n, 40, dtype=torch.float64)
    logits[torch.arange(n), torch.as_tensor(which)] += 3.0  # the cells are right more often than not
    log_q = torch.log_softmax(logits, dim=1).numpy()
    if informative:  # half the images have near-duplicates in the index, similar and close by
        close = (np.arange(n) % 2 == 0)[:, None]
        nb = np.where(close[..., None], true[:, None] + rng.normal(0, 0.1, (n, 16, 2)),
                      cent[rng.integers(0, 40, (n, 16))])
        sims = np.where(close, 0.9, 0.3) + rng.normal(0, 0.02, (n, 16))
    else:  # neighbours anywhere, unrelated to the truth
        nb = np.stack([rng.uniform(-60, 60, (n, 16)), rng.uniform(-180, 180, (n, 16))], -1)
        sims = rng.uniform(0.2, 0.4, (n, 16))
    return log_q, cent, -np.sort(-sims, axis=1), nb, true


def test_fit_retrieval_uses_neighbours_only_where_they_help():
    log_q, cent, sims, nb, true = _synthetic_validation(informative=True)
    fit = fit_retrieval(log_q, cent, 300.0, sims, nb, true, fitted_on="synthetic")
    assert fit.kind == "gated" and fit.metrics["nll_cv_gated"] < fit.metrics["nll_cells"]
    lam, w = mix_weights(fit, np.array([[0.9] * 16, [0.3] * 16]))
    assert lam[0] > 0.8 and lam[1] < 0.2 and np.allclose(w.sum(1), 1.0)
    assert HybridFit.from_dict(fit.to_dict()) == fit
    # unrelated neighbours: the fit gives them (almost) no weight, whichever kind wins
    log_q, cent, sims, nb, true = _synthetic_validation(informative=False, seed=1)
    fit = fit_retrieval(log_q, cent, 300.0, sims, nb, true, kinds=("uniform", "softmax"))
    assert mix_weights(fit, sims)[0].max() < 0.05
    with pytest.raises(ValueError, match="unknown kind"):
        HybridFit(kind="nearest").check()
    # the best guess's radius: an older fit without one is the densest point; a bad one is refused
    old = {k: v for k, v in fit.to_dict().items() if k != "point_radius_km"}
    assert HybridFit.from_dict(old).point_radius_km == 0.0
    for bad in (-1.0, float("nan"), 1e9):
        with pytest.raises(ValueError, match="point_radius_km"):
            HybridFit.from_dict({**old, "point_radius_km": bad})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_retrieval_stays_finite_when_similarities_crowd_near_one(seed):
    # As in a real index: top similarities of 0.98-0.9999 for every image, the nearest photo at
    # the true place only above 0.995. Unbounded, the gated kind's sharpest fit ran its
    # parameters off to 1e31 on one fold and scored NaN; each kind must score a finite
    # likelihood, keep its parameters in their ranges, and give the same mixture once stored.
    from geocell.infer.hybrid import NEIGHBOUR_KERNEL_RANGE_KM
    from geocell.model.records import TEMPERATURE_RANGE

    rng = np.random.default_rng(seed)
    log_q, cent, _, _, true = _synthetic_validation(n=400, seed=seed)
    sims = -np.sort(-(1.0 - 10 ** rng.uniform(-4, -1.7, (400, 16))), axis=1)
    at_truth = sims[:, 0] > 0.995
    nb = cent[rng.integers(0, 40, (400, 16))]
    nb[at_truth, 0] = true[at_truth] + rng.normal(0, 0.05, (int(at_truth.sum()), 2))
    fit = fit_retrieval(log_q, cent, 300.0, sims, nb, true)
    for kind in ("uniform", "softmax", "gated"):
        assert np.isfinite(fit.metrics[f"nll_cv_{kind}"]), (kind, fit.metrics)
    assert TEMPERATURE_RANGE[0] <= fit.temperature <= TEMPERATURE_RANGE[1]
    assert NEIGHBOUR_KERNEL_RANGE_KM[0] <= fit.kernel_km <= NEIGHBOUR_KERNEL_RANGE_KM[1]
    assert fit.metrics[f"nll_cv_{fit.kind}"] < fit.metrics["nll_cells"]  # the near photos help
    again = HybridFit.from_dict(fit.to_dict())
    assert all(np.allclose(a, b) for a, b in zip(mix_weights(again, sims), mix_weights(fit, sims)))


def test_neighbour_kernel_widens_as_the_similarity_drops():
    # Neighbours land at the truth with an error of 20 km * exp(30 (1 - s)): a near-duplicate
    # (s = 1) is 20 km off, one of s = 0.9 about 400 km. The fit must recover the width and the
    # slope, and the stored fit must give each neighbour its own width.
    from geocell.infer.hybrid import KERNEL_SLOPE_UNIT
    from geocell.infer.mixture import _kappa, _log_norm

    rng = np.random.default_rng(3)
    n = 600
    log_q, cent, _, _, true = _synthetic_validation(n=n, seed=3)
    sims = -np.sort(-rng.uniform(0.88, 1.0, (n, 16)), axis=1)
    sims[:, 0] = rng.uniform(0.88, 1.0, n)  # the top neighbour's similarity spread over the range
    sigma_km = 20.0 * np.exp(30.0 * (1.0 - sims))
    tu = unit_vectors(true[:, 0], true[:, 1])
    # a point at angular distance ~ sigma (Rayleigh, 2-d) from the truth, in a random direction
    east = np.cross([0.0, 0.0, 1.0], tu)
    east /= np.linalg.norm(east, axis=1, keepdims=True)
    north = np.cross(tu, east)
    angle = rng.uniform(0, 2 * np.pi, (n, 16))
    dist = sigma_km * np.sqrt(-2 * np.log(rng.uniform(size=(n, 16)))) / 6371.0088
    nb_unit = (np.cos(dist)[..., None] * tu[:, None]
               + np.sin(dist)[..., None] * (np.cos(angle)[..., None] * east[:, None]
                                            + np.sin(angle)[..., None] * north[:, None]))
    nb = np.stack([np.degrees(np.arcsin(np.clip(nb_unit[..., 2], -1, 1))),
                   np.degrees(np.arctan2(nb_unit[..., 1], nb_unit[..., 0]))], -1)
    # one neighbour per image, so that the likelihood is that of the generating law
    assert fit_retrieval(log_q, cent, 300.0, sims[:, :1], nb[:, :1], true, kinds=("uniform",)).kernel_slope == 0.0
    fit = fit_retrieval(log_q, cent, 300.0, sims[:, :1], nb[:, :1], true, kinds=("uniform",), widening=True)
    assert 16.0 <= fit.kernel_km <= 25.0 and 26.0 <= fit.kernel_slope <= 34.0, fit
    widths = neighbour_kernels_km(fit, sims[0])
    assert np.allclose(widths, fit.kernel_km * np.exp(fit.kernel_slope * (1.0 - sims[0])))
    assert HybridFit.from_dict(fit.to_dict()) == fit
    old = {k: v for k, v in fit.to_dict().items() if k != "kernel_slope"}
    assert HybridFit.from_dict(old).kernel_slope == 0.0  # older fits: one width for all
    with pytest.raises(ValueError, match="kernel_slope"):
        HybridFit.from_dict({**old, "kernel_slope": -1.0})
    # the mixture uses each neighbour's own width: its density by hand
    kernels = neighbour_kernels(fit, sims[0], nb[0])
    mixture = Mixture(log_q[0], unit_vectors(cent[:, 0], cent[:, 1]), 300.0, neighbours=kernels, samples=10)
    x = tu[:1]
    k = min(64, log_q.shape[1])
    top = np.argpartition(-log_q[0], k - 1)[:k]
    q = np.exp(log_q[0][top] - log_q[0][top].max())
    q /= q.sum()
    kap_cells, kap_nb = _kappa(300.0), _kappa(widths)
    cells_unit = unit_vectors(cent[top, 0], cent[top, 1])
    by_hand = ((1 - kernels.weight) * q @ np.exp(_log_norm(kap_cells) + kap_cells * (cells_unit @ x[0] - 1))
               + kernels.weight * kernels.q @ np.exp(_log_norm(kap_nb) + kap_nb * (kernels.means @ x[0] - 1)))
    assert np.isclose(mixture.density_at(x)[0], by_hand, rtol=1e-9)
    assert KERNEL_SLOPE_UNIT > 0


# ----------------------------------------------------------------------------- the trained pipeline

TINY = ["--image-size", "32", "--batch-size", "16", "--workers", "0", "--backend", "torch", "--threads", "1",
        "--no-progress", "--no-tensorboard", "--arch", "resnet18", "--log-every", "50", "--lr", "0.005"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Earth dataset and one epoch of the default recipe on it: best.pt, its
    calibration with the hybrid's fit, and best.retrieval.npz."""
    from geocell.data.earth import build_earth
    from geocell.commands import train as trainer

    root = tmp_path_factory.mktemp("retrieval")
    manifest = str(build_earth(root / "earth", n=160, size=32, seed=0, progress=False, workers=1,
                               split_rule="random"))
    with redirect_stdout(io.StringIO()) as out:
        assert trainer.main(["--manifest", manifest, "--epochs", "1", "-o", str(root / "run"), *TINY]) == 0
    return manifest, root / "run", out.getvalue()


def _run(main, argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_trainer_writes_the_index_and_the_hybrid(trained):
    from geocell.data.manifest import read_manifest
    from geocell.model.checkpoint import checkpoint_fingerprint
    from geocell.model.checkpoint import load_checkpoint

    manifest, run, printed = trained
    ckpt = load_checkpoint(run / "best.pt")
    index = RetrievalIndex.load(run / "best.retrieval.npz", fingerprint=checkpoint_fingerprint(ckpt))
    train = read_manifest(manifest)
    assert len(index) == int((np.asarray(train.split) == "train").sum()) and index.dim == 512
    assert np.abs(np.linalg.norm(index.embeddings.astype(np.float32), axis=1) - 1).max() < 1e-2
    fit = HybridFit.from_dict(ckpt["calibration"]["retrieval"])
    assert fit.k == 16 and "validation split" in fit.fitted_on
    assert "hybrid (retrieval)" in printed and "hierarchy" in printed


def test_geolocator_with_and_without_retrieval(trained, tmp_path):
    from geocell.data.manifest import read_manifest
    from geocell.infer.predict import Geolocator
    from helpers import make_tiny_checkpoint

    manifest, run, _ = trained
    photos = list(read_manifest(manifest).paths[:3])
    geo = Geolocator.from_checkpoint(run / "best.pt", device="cpu")
    assert geo.hybrid is not None and len(geo.retrieval) > 0
    with_r = geo.predict(photos)
    plain = Geolocator.from_checkpoint(run / "best.pt", device="cpu", retrieval=False)
    assert plain.hybrid is None
    without = plain.predict(photos)
    for a, b in zip(with_r, without):
        assert a.retrieval is not None and len(a.retrieval["neighbours"]) == 16
        assert 0.0 <= a.retrieval["weight"] <= 1.0
        assert b.retrieval is None and b.best_guess == (b.hierarchical_top1.lat, b.hierarchical_top1.lng)
        assert a.hierarchical_top1 == b.hierarchical_top1  # the cells are the same either way
        assert a.to_dict()["best_guess"]["source"] == "hybrid"
    # an index from another checkpoint is refused, by name
    other = make_tiny_checkpoint(tmp_path / "other.pt")
    with pytest.raises(RetrievalError, match="another checkpoint"):
        Geolocator.from_checkpoint(other, device="cpu", index=run / "best.retrieval.npz")


def test_index_build_cli_and_evaluate_rows(trained, tmp_path):
    from geocell.commands import main as geocell_main
    from geocell.model.checkpoint import checkpoint_fingerprint
    from geocell.model.checkpoint import load_checkpoint

    manifest, run, _ = trained
    out = tmp_path / "built.retrieval.npz"
    code, printed, err = _run(geocell_main, ["index", "build", "--checkpoint", str(run / "best.pt"),
                                             "--manifest", manifest, "-o", str(out), "--fit-split", "val",
                                             "--workers", "0", "--no-progress"])
    assert code == 0, err
    assert "hybrid fitted on val" in printed and "wrote" in printed
    built = RetrievalIndex.load(out, fingerprint=checkpoint_fingerprint(load_checkpoint(run / "best.pt")))
    trainer_index = RetrievalIndex.load(run / "best.retrieval.npz")
    assert len(built) == len(trainer_index) and built.fit["kind"] in ("uniform", "softmax", "gated")
    # its own credible regions: one conformal score per validation image, under this fit
    from geocell.data.manifest import read_manifest
    from geocell.infer.predict import Geolocator

    scores = built.fit["region_scores"]
    assert len(scores) == int((read_manifest(manifest).split == "val").sum()) and scores == sorted(scores)
    with_index = Geolocator.from_checkpoint(run / "best.pt", device="cpu", index=out).calibration
    assert with_index.region_scores == tuple(scores)
    assert with_index.region_group_scores == tuple(tuple(g) for g in built.fit.get("region_group_scores", ()))
    own = load_checkpoint(run / "best.pt")["calibration"]["region_scores"]
    assert tuple(Geolocator.from_checkpoint(run / "best.pt", device="cpu").calibration.region_scores) == \
        tuple(own)
    # the same photos, the same weights: the same embeddings (up to float16 and the loaders' order)
    order_a, order_b = np.lexsort((built.lng, built.lat)), np.lexsort((trainer_index.lng, trainer_index.lat))
    np.testing.assert_allclose(built.embeddings[order_a].astype(np.float32),
                               trainer_index.embeddings[order_b].astype(np.float32), atol=2e-2)

    from geocell.commands.evaluate import main as evaluate_main

    args = ["--checkpoint", str(run / "best.pt"), "--manifest", manifest, "--split", "test", "--workers", "0",
            "--no-progress"]
    code, table, err = _run(evaluate_main, [*args, "--index", str(out)])
    assert code == 0, err
    assert "hierarchy" in table and "hybrid (retrieval)" in table and "retrieval over" in table
    assert "nearest training photo <= 25 km" in table and "nearest training photo > 200 km" in table
    code, table, err = _run(evaluate_main, [*args, "--no-retrieval"])
    assert code == 0 and "hierarchy" in table and "hybrid (retrieval)" not in table
    code, _, err = _run(geocell_main, ["index", "build", "--checkpoint", str(run / "best.pt"), "--manifest",
                                       manifest, "-o", str(tmp_path / "x.npz"), "--split", "nope"])
    assert code == 1 and "no rows of split 'nope'" in err
