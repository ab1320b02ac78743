"""Tests of kmeans.py (k-means for P-TAPT pseudo-labels). Fast: CPU only, small data."""

import os
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kmeans import assign, fit_kmeans, labels_for, load_labels, save_labels  # noqa: E402

BIG = 10 ** 9  # max_samples that never subsamples


def blobs(n=20000, dim=32, centers=50, seed=0):
    x, _ = make_blobs(n, dim, centers=centers, random_state=seed)
    return x.astype(np.float32)


@pytest.mark.parametrize("k", [8, 64])
def test_same_init_matches_sklearn(k):
    x = blobs()
    init = x[np.random.default_rng(k).choice(len(x), k, replace=False)]
    ours = fit_kmeans(torch.from_numpy(x), ks=(k,), iters=20, init=torch.from_numpy(init), max_samples=BIG,
                      progress=False)[k]
    sk = KMeans(k, init=init, n_init=1, max_iter=20, algorithm="lloyd", tol=0).fit(x)
    assert abs(ours.inertia[-1] / sk.inertia_ - 1) < 1e-3
    assert (assign(torch.from_numpy(x), ours.centroids).numpy() == sk.labels_).mean() > 0.999
    np.testing.assert_allclose(ours.centroids.numpy(), sk.cluster_centers_, atol=1e-3)


def test_kmeanspp_as_good_as_sklearn():
    # Each side's own k-means++; compare over a few seeds since one draw can be lucky either way.
    x = blobs(centers=64)
    ours = sum(fit_kmeans(torch.from_numpy(x), ks=(64,), seed=s, max_samples=BIG, progress=False)[64].inertia[-1]
               for s in range(3))
    sk = sum(KMeans(64, n_init=1, max_iter=20, algorithm="lloyd", tol=0, random_state=s).fit(x).inertia_
             for s in range(3))
    assert ours <= 1.01 * sk


def test_multi_k_one_pass_equals_single_k():
    x = torch.from_numpy(blobs(5000))
    for init in ("k-means++", "random"):
        together = fit_kmeans(x, ks=(8, 64), iters=10, init=init, seed=3, max_samples=BIG, progress=False)
        for k in (8, 64):
            alone = fit_kmeans(x, ks=(k,), iters=10, init=init, seed=3, max_samples=BIG, progress=False)[k]
            torch.testing.assert_close(together[k].centroids, alone.centroids)
            assert together[k].inertia == pytest.approx(alone.inertia, rel=1e-9)


def test_chunk_size_does_not_matter():
    x = torch.from_numpy(blobs(5000))
    small = fit_kmeans(x, ks=(16,), iters=10, chunk_size=100, max_samples=BIG, progress=False)[16]
    huge = fit_kmeans(x, ks=(16,), iters=10, chunk_size=10 ** 7, max_samples=BIG, progress=False)[16]
    torch.testing.assert_close(small.centroids, huge.centroids, atol=1e-4, rtol=1e-5)
    assert small.inertia == pytest.approx(huge.inertia, rel=1e-5)


def test_empty_cluster_is_reseeded():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(300, 4, generator=g) * 0.1 + m for m in (0.0, 5.0, 10.0)])
    init = torch.tensor([[0.0] * 4, [5.0] * 4, [10.0] * 4, [1000.0] * 4])  # the last one attracts nobody
    r = fit_kmeans(x, ks=(4,), iters=5, init=init, max_samples=BIG, progress=False)[4]
    assert r.counts.min() > 0 and r.counts.sum() == len(x)
    # duplicated frames: random init picks identical points, i.e. identical centroids, one of them empty
    dup = torch.cat([torch.arange(5.0)[:, None].repeat(200, 3), torch.randn(50, 3, generator=g) * 10])
    for seed in range(3):
        r = fit_kmeans(dup, ks=(12,), iters=20, init="random", seed=seed, max_samples=BIG, progress=False)[12]
        assert r.counts.min() > 0


def test_inertia_never_increases():
    x = torch.from_numpy(blobs(5000, centers=20))
    for init in ("k-means++", "random"):
        h = fit_kmeans(x, ks=(32,), iters=15, init=init, max_samples=BIG, progress=False)[32].inertia
        assert len(h) == 16
        assert all(b <= a * (1 + 1e-6) for a, b in zip(h, h[1:]))


def test_tol_stops_early_and_float16_input():
    x = torch.from_numpy(blobs(5000, centers=8)).half()
    r = fit_kmeans(x, ks=(8,), iters=50, tol=1e-4, max_samples=BIG, progress=False)[8]
    assert 2 <= len(r.inertia) < 51 and r.centroids.dtype == torch.float32


def test_known_answer_four_tight_clusters():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(400, 2, generator=g) * 0.01
    noise -= noise.view(4, 100, 2).mean(1).repeat_interleave(100, 0)  # each cluster's mean is its centre exactly
    x = centres.repeat_interleave(100, 0) + noise
    for init in ("k-means++", "random"):
        r = fit_kmeans(x, ks=(4,), iters=10, init=init, seed=0, max_samples=BIG, progress=False)[4]
        got = sorted(map(tuple, r.centroids.tolist()))
        np.testing.assert_allclose(got, sorted(map(tuple, centres.tolist())), atol=1e-5)
        assert r.counts.tolist() == [100] * 4


def test_subsampling_and_bad_input():
    x = torch.randn(100, 3)
    r = fit_kmeans(x, ks=(4,), max_samples=50, progress=False)[4]
    assert r.counts.sum() == 50
    with pytest.raises(ValueError, match=r"K=101.*N=100"):
        fit_kmeans(x, ks=(4, 101), progress=False)
    with pytest.raises(ValueError, match="2-D"):
        fit_kmeans(torch.randn(2, 10, 3), ks=(4,), progress=False)
    with pytest.raises(ValueError, match="init"):
        fit_kmeans(x, ks=(4,), init="kmeans++", progress=False)
    with pytest.raises(ValueError, match="shape"):
        fit_kmeans(x, ks=(4,), init=torch.randn(5, 3), progress=False)


def _label_file(tmp_path):
    counts = [3, 0, 5]
    labels = {4: torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), 40000: torch.arange(8) * 4000}
    path = str(tmp_path / "labels.pt")
    save_labels(path, ["a", "b", "c"], counts, labels, {"layer": 12, "inertia": {4: [1.0, 0.5]}})
    return path, labels


def test_label_file_round_trip(tmp_path):
    path, labels = _label_file(tmp_path)
    raw = torch.load(path, weights_only=True)
    assert raw["labels"][4].dtype == torch.int16 and raw["labels"][40000].dtype == torch.int32
    lf = load_labels(path)
    assert lf["meta"]["layer"] == 12 and lf["index"] == {"a": (0, 3), "b": (3, 0), "c": (3, 5)}
    got = labels_for(lf, "c", 5)
    assert got[4].dtype == torch.long and got[4].tolist() == labels[4][3:].tolist()
    assert got[40000].tolist() == labels[40000][3:].tolist()
    assert not os.path.exists(path + ".tmp")


def test_label_file_errors(tmp_path):
    path, _ = _label_file(tmp_path)
    lf = load_labels(path)
    with pytest.raises(ValueError, match=r"utterance c has 5 pseudo-labels but 6 frames.*do not match the audio"):
        labels_for(lf, "c", 6)
    with pytest.raises(ValueError, match="no pseudo-labels for utterance zz"):
        labels_for(lf, "zz", 1)
    raw = torch.load(path, weights_only=True)
    for corrupt, problem in [(lambda r: r["labels"].__setitem__(4, r["labels"][4][:-1]), "7 entries"),
                             (lambda r: r["labels"][4].__setitem__(0, 4), r"outside \[0, 4\)"),
                             (lambda r: r.__setitem__("uids", ["a", "b"]), "2 uids but 3 frame counts")]:
        bad = {**raw, "labels": dict(raw["labels"]), "uids": list(raw["uids"])}
        bad["labels"][4] = bad["labels"][4].clone()
        corrupt(bad)
        bad_path = str(tmp_path / "bad.pt")
        torch.save(bad, bad_path)
        with pytest.raises(ValueError, match="bad.pt.*" + problem):
            load_labels(bad_path)
    with open(bad_path, "wb") as f:
        f.write(b"not a torch file")
    with pytest.raises(ValueError, match="bad.pt"):
        load_labels(bad_path)
    with pytest.raises(ValueError, match="outside"):  # save refuses what load would refuse
        save_labels(str(tmp_path / "x.pt"), ["a"], [2], {4: torch.tensor([0, 9])}, {})


# -- distributed: 2 gloo processes, each with half the frames, must agree with one process --------

def _dist_worker(rank, init_file, x, init, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        half = len(x) // 2
        r = fit_kmeans(x[rank * half:(rank + 1) * half], ks=(8, 16), iters=8, init=init, max_samples=BIG,
                       device="cpu", progress=False)
        torch.save({k: (v.centroids, v.inertia, v.counts) for k, v in r.items()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_distributed_matches_single_process(tmp_path):
    x = torch.from_numpy(blobs(4000, dim=8, centers=10))
    g = torch.Generator().manual_seed(0)
    init = {k: x[torch.randperm(len(x), generator=g)[:k]].clone() for k in (8, 16)}
    init[16][0] = 1e4  # an empty cluster: exercises the cross-rank re-seeding
    single = fit_kmeans(x, ks=(8, 16), iters=8, init=init, max_samples=BIG, device="cpu", progress=False)
    out = str(tmp_path / "res")
    mp.spawn(_dist_worker, args=(str(tmp_path / "pg"), x, init, out), nprocs=2, join=True)
    for rank in (0, 1):
        res = torch.load(f"{out}.{rank}", weights_only=True)
        for k in (8, 16):
            centroids, inertia, counts = res[k]
            torch.testing.assert_close(centroids, single[k].centroids, atol=1e-5, rtol=0)
            assert inertia == pytest.approx(single[k].inertia, rel=1e-6)
            assert counts.tolist() == single[k].counts.tolist()
