"""
k-means pseudo-labels for P-TAPT (RECIPE.md, "P-TAPT" step 2).

The release clustered the teacher's frame features of the fold's training sessions with faiss
(GPU, 20 Lloyd iterations, K = 64, 512 and 4096, at most max(K) x 1000 sampled frames) and gave
every frame of every training utterance one label per K. This file does the same in plain PyTorch:

    fit_kmeans(features, ks)        -> {K: KMeansResult(centroids, inertia history, cluster sizes)}
    assign(features, centroids)     -> nearest-centroid label of every frame
    save_labels / load_labels / labels_for: the pseudo-label file P-TAPT reads
    extract_features                -> every valid frame of a list of utterances, from model.py
    python kmeans.py fit|assign ... -> the command line (python kmeans.py fit --help)

Choices, so that they are written down somewhere:
- All K are fitted together: each Lloyd iteration reads every chunk of frames once and updates the
  accumulators of every K. Each K's init draws from its own generator seeded with `seed`, so fitting
  a K alone or together with others gives the same centroids.
- Distances are ||x||^2 - 2 x.c + ||c||^2 with a matmul, chunk by chunk, in float32; the frames are
  first translated by their mean (as scikit-learn does) because that formula loses precision when
  the features share a large offset, which transformer features with their outlier dimensions do.
- init "k-means++" is scikit-learn's greedy variant (2 + ln K candidates per step, keep the one that
  lowers the potential most); "random" is the release's (faiss) init: K distinct random frames.
- An empty cluster is re-seeded with the frame currently farthest from its centroid (taken out of
  its old cluster), as scikit-learn does; we keep the 256 farthest frames of each pass for that.
"""

import argparse
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

MAX_RESEEDS = 256  # farthest frames remembered per pass and per K, to re-seed empty clusters


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # (K, D) float32 on CPU
    inertia: list  # sum of squared distances to the nearest centroid: at init, then after every iteration
    counts: torch.Tensor  # (K,) long, cluster sizes under the final centroids (fitted frames only)


# -----------------------------------------------------------------------------
# small helpers

def _default_device(device=None):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:  # compare equal to tensor.device later on
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(t):
    if _world()[1] > 1:
        dist.all_reduce(t)
    return t


def _check_features(features):
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"features must be a 2-D (frames, dims) tensor, got {shape}")
    if not features.is_floating_point():
        raise ValueError(f"features must be floating point, got {features.dtype}")
    return features


def _chunks(feats, chunk_size, device, shift=None):
    # Frames travel to the device one chunk at a time, in float32, so N x D never has to fit there.
    for start in range(0, len(feats), chunk_size):
        x = feats[start:start + chunk_size].to(device=device, dtype=torch.float32, non_blocking=True)
        yield start, (x if shift is None else x - shift)  # not in place: x may be a view of feats


def _rows(feats, idx, device, shift):
    return feats[idx.to(feats.device)].to(device=device, dtype=torch.float32) - shift


def _sq_dists(x, x_sq, c, c_sq):
    # (n, P) squared distances; the matmul form keeps memory at n x P instead of n x P x D
    return torch.addmm(c_sq, x, c.T, alpha=-2).add_(x_sq[:, None]).clamp_(min=0)


def _nearest(x, x_sq, c, c_sq):
    d = torch.addmm(c_sq, x, c.T, alpha=-2)  # ||x||^2 is the same for every centroid: add it after the min
    dmin, labels = d.min(1)
    return dmin.add_(x_sq).clamp_(min=0), labels


# -----------------------------------------------------------------------------
# initialisation

def _kmeans_plusplus(feats, k, gen, chunk_size, device, shift):
    # Greedy k-means++ (Arthur & Vassilvitskii 2007, scikit-learn's variant): draw 2 + ln K candidates
    # with probability ~ D^2 and keep the one that lowers the potential most.
    n, trials = len(feats), 2 + int(math.log(k))

    def dists_to(points):  # (n, P) squared distances of every frame to each point, chunk by chunk
        p_sq = (points * points).sum(1)
        out = torch.empty(n, len(points), device=device)
        for start, x in _chunks(feats, chunk_size, device, shift):
            out[start:start + len(x)] = _sq_dists(x, (x * x).sum(1), points, p_sq)
        return out

    chosen = torch.empty(k, dtype=torch.long, device=device)
    chosen[0] = torch.randint(n, (1,), generator=gen)[0]
    closest = dists_to(_rows(feats, chosen[:1], device, shift))[:, 0]
    for i in range(1, k):
        cum = closest.cumsum(0, dtype=torch.float64)  # float64: a float32 cumsum over millions of frames drifts
        r = torch.rand(trials, generator=gen, dtype=torch.float64).to(device) * cum[-1]
        cand = torch.searchsorted(cum, r).clamp_(max=n - 1)
        d = torch.minimum(dists_to(_rows(feats, cand, device, shift)), closest[:, None])
        best = d.sum(0, dtype=torch.float64).argmin().view(1)  # stays on the device: no sync per step
        closest = d.index_select(1, best)[:, 0]
        chosen[i] = cand[best][0]
    return _rows(feats, chosen, device, shift)


def _init_centroids(feats, k, init, seed, chunk_size, device, shift):
    gen = torch.Generator().manual_seed(seed)  # CPU generator: same draws on every device
    if isinstance(init, torch.Tensor):
        return init.to(device=device, dtype=torch.float32) - shift
    if init == "k-means++":
        return _kmeans_plusplus(feats, k, gen, chunk_size, device, shift)
    return _rows(feats, torch.randperm(len(feats), generator=gen)[:k], device, shift)  # "random"


def _check_init(init, ks, dim):
    # Turns `init` into {K: "k-means++" | "random" | (K, D) tensor}.
    if isinstance(init, str):
        if init not in ("k-means++", "random"):
            raise ValueError(f"init must be 'k-means++', 'random', or centroids, got {init!r}")
        return {k: init for k in ks}
    if isinstance(init, torch.Tensor):
        if len(ks) != 1:
            raise ValueError(f"a single init tensor needs a single K, got ks={list(ks)}; pass a dict {{K: tensor}}")
        init = {ks[0]: init}
    if not isinstance(init, dict) or sorted(init) != sorted(ks):
        raise ValueError(f"init centroids must be given for exactly the ks {list(ks)}")
    for k, c in init.items():
        if not isinstance(c, torch.Tensor) or tuple(c.shape) != (k, dim):
            raise ValueError(f"init centroids for K={k} must have shape ({k}, {dim}), got {getattr(c, 'shape', c)}")
    return dict(init)


# -----------------------------------------------------------------------------
# Lloyd iterations

@dataclass
class _Stats:  # what one pass over the frames accumulates for one K
    sums: torch.Tensor  # (K, D) float64
    counts: torch.Tensor  # (K,) long
    inertia: torch.Tensor  # () float64
    far_d: torch.Tensor  # (R,) distances of the farthest frames seen so far, -1 = none
    far_x: torch.Tensor  # (R, D) those frames
    far_label: torch.Tensor  # (R,) their current cluster

    @classmethod
    def zeros(cls, k, dim, device):
        r = min(k, MAX_RESEEDS)
        return cls(torch.zeros(k, dim, dtype=torch.float64, device=device),
                   torch.zeros(k, dtype=torch.long, device=device),
                   torch.zeros((), dtype=torch.float64, device=device),
                   torch.full((r,), -1.0, device=device), torch.zeros(r, dim, device=device),
                   torch.zeros(r, dtype=torch.long, device=device))

    def keep_farthest(self, d, x, labels):
        r = len(self.far_d)
        d_all = torch.cat([self.far_d, d])
        top = d_all.topk(min(r, len(d_all))).indices
        self.far_d, self.far_x, self.far_label = (d_all[top], torch.cat([self.far_x, x])[top],
                                                  torch.cat([self.far_label, labels])[top])


def _lloyd_pass(feats, cents, chunk_size, device, shift):
    dim = feats.shape[1]
    stats = {k: _Stats.zeros(k, dim, device) for k in cents}
    c_sq = {k: (c * c).sum(1) for k, c in cents.items()}
    for _, x in _chunks(feats, chunk_size, device, shift):  # each chunk read once, for every K
        x_sq, x64 = (x * x).sum(1), x.double()  # float64 sums: float32 drifts over millions of frames
        for k, c in cents.items():
            dmin, labels = _nearest(x, x_sq, c, c_sq[k])
            st = stats[k]
            st.sums.index_add_(0, labels, x64)
            st.counts += torch.bincount(labels, minlength=k)
            st.inertia += dmin.sum(dtype=torch.float64)
            top = dmin.topk(min(len(st.far_d), len(dmin))).indices  # shrink before merging
            st.keep_farthest(dmin[top], x[top], labels[top])
    for st in stats.values():
        _reduce_stats(st)
    return stats


def _reduce_stats(st):
    rank, world = _world()
    if world == 1:
        return
    for t in (st.sums, st.counts, st.inertia):
        dist.all_reduce(t)
    if (st.counts == 0).any():  # counts are global now, so every rank takes this branch together
        gathered = []
        for t in (st.far_d, st.far_x, st.far_label):
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t)
            gathered.append(torch.cat(parts))
        top = gathered[0].topk(len(st.far_d)).indices
        st.far_d, st.far_x, st.far_label = (g[top] for g in gathered)


def _update(c, st):
    sums, counts = st.sums.clone(), st.counts.clone()
    empty = (counts == 0).nonzero()[:, 0]
    if len(empty):
        # Re-seed with the farthest frames (distinct frames, farthest first), moving each out of its
        # old cluster so that the sums stay those of an actual assignment.
        m = min(len(empty), int((st.far_d > 0).sum()))
        empty, x, old = empty[:m], st.far_x[:m].double(), st.far_label[:m]
        sums.index_add_(0, old, -x)
        counts.index_add_(0, old, -torch.ones_like(old))
        sums[empty], counts[empty] = x, 1
    new = sums / counts.clamp(min=1)[:, None]
    return torch.where(counts[:, None] > 0, new, c.double()).float()  # a still-empty cluster stays put


def _lloyd(feats, cents, iters, tol, chunk_size, device, shift, progress):
    history, counts, active = {k: [] for k in cents}, {}, list(cents)
    bar = tqdm(range(iters + 1), desc="k-means", disable=not progress or _world()[0] != 0)
    for it in bar:  # pass `it` measures the centroids after `it` updates, then updates them
        stats = _lloyd_pass(feats, {k: cents[k] for k in active}, chunk_size, device, shift)
        for k in active:
            history[k].append(stats[k].inertia.item())
            counts[k] = stats[k].counts
        bar.set_postfix({f"K{k}": f"{h[-1]:.5g}" for k, h in history.items()})
        if it == iters:
            break
        still = []
        for k in active:
            h = history[k]
            if tol > 0 and len(h) > 1 and (h[-2] - h[-1]) / max(h[-2], 1e-30) < tol:
                continue  # converged: these centroids are final, their inertia is h[-1]
            cents[k] = _update(cents[k], stats[k])
            still.append(k)
        active = still
        if not active:
            break
    bar.close()
    return history, counts


# -----------------------------------------------------------------------------
# public API

def _sample(features, max_samples, seed, device):
    # Fit on at most max_samples frames (per rank in proportion to its share), a seeded random subset.
    rank, world = _world()
    n = len(features)
    if world > 1:
        total = _all_reduce(torch.tensor(float(n), dtype=torch.float64, device=device)).item()
        max_samples = math.ceil(max_samples * n / max(total, 1))
    if n <= max_samples:
        return features
    gen = torch.Generator().manual_seed(seed + rank)
    idx = torch.randperm(n, generator=gen)[:max_samples].sort().values
    return features[idx.to(features.device)]


def _stage(feats, device):
    # Lloyd reads the frames 21 times and k-means++ K times: keep them on the GPU when they fit easily.
    if feats.device == device or device.type != "cuda":
        return feats
    free, _ = torch.cuda.mem_get_info(device)
    return feats.to(device) if feats.numel() * feats.element_size() < free // 3 else feats


def _frames_mean(feats, chunk_size, device):
    total = torch.zeros(feats.shape[1], dtype=torch.float64, device=device)
    for _, x in _chunks(feats, chunk_size, device):
        total += x.sum(0, dtype=torch.float64)
    n = torch.tensor(float(len(feats)), dtype=torch.float64, device=device)
    mean = (_all_reduce(total) / _all_reduce(n)).float()
    if not torch.isfinite(mean).all():
        raise ValueError("features contain NaN or inf")
    return mean


def fit_kmeans(features, ks=(64, 512, 4096), iters=20, init="k-means++", seed=0, tol=0.0, chunk_size=16384,
               max_samples=None, device=None, progress=True):
    """Fits one k-means per K in `ks` on the rows of `features` (N, D) and returns {K: KMeansResult}.

    init: "k-means++" (greedy, seeded), "random" (K distinct frames), or given centroids: a (K, D)
    tensor when there is one K, else {K: tensor}. tol > 0 stops a K once an iteration lowers its
    inertia by less than tol (relative). max_samples (default max(ks) x 1000): fit on a seeded random
    subset of that many frames. Under torch.distributed every rank passes its own shard of frames;
    rank 0 computes the init from its frames and all ranks return the same centroids.
    """
    features = _check_features(features)
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1 or len(set(ks)) != len(ks):
        raise ValueError(f"ks must be distinct positive integers, got {ks}")
    if iters < 0 or chunk_size < 1:
        raise ValueError(f"iters must be >= 0 and chunk_size >= 1, got {iters} and {chunk_size}")
    init = _check_init(init, ks, features.shape[1])
    device = _default_device(device)
    rank, world = _world()
    cap = max(ks) * 1000 if max_samples is None else int(max_samples)
    if cap < 1:
        raise ValueError(f"max_samples must be positive, got {max_samples}")

    feats = _stage(_sample(features, cap, seed, device), device)
    shift = _frames_mean(feats, chunk_size, device)
    n0 = torch.tensor(len(feats), device=device)  # the init is drawn from rank 0's frames
    if world > 1:
        dist.broadcast(n0, 0)
    for k in ks:
        if k > n0.item():
            raise ValueError(f"cannot fit K={k} clusters to N={n0.item()} frames"
                             f"{' (after max_samples)' if cap < len(features) else ''}: K must be <= N")

    cents = {}
    for k in ks:
        cents[k] = (_init_centroids(feats, k, init[k], seed, chunk_size, device, shift) if rank == 0
                    else torch.empty(k, feats.shape[1], device=device))
        if world > 1:
            dist.broadcast(cents[k], 0)
    history, counts = _lloyd(feats, cents, iters, tol, chunk_size, device, shift, progress)
    return {k: KMeansResult((cents[k] + shift).cpu(), history[k], counts[k].cpu()) for k in ks}


def assign(features, centroids, chunk_size=16384, device=None):
    """Label (N,) long, on CPU, of the nearest centroid of every row of `features`."""
    features = _check_features(features)
    if centroids.dim() != 2 or centroids.shape[1] != features.shape[1]:
        raise ValueError(f"centroids {tuple(centroids.shape)} do not match features of dimension {features.shape[1]}")
    device = _default_device(device)
    c = centroids.to(device=device, dtype=torch.float32)
    shift = c.mean(0)  # distances do not change under translation; precision does
    c = c - shift
    c_sq = (c * c).sum(1)
    labels = torch.empty(len(features), dtype=torch.long)
    for start, x in _chunks(features, chunk_size, device, shift):
        labels[start:start + len(x)] = _nearest(x, (x * x).sum(1), c, c_sq)[1].cpu()
    return labels


# -----------------------------------------------------------------------------
# pseudo-label files: {"uids": [str], "frame_counts": (U,) long, "labels": {K: (sum counts,) int}, "meta": {}}

def _atomic_save(obj, path):
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)  # a crash never leaves a half-written file under the real name


def _validate_labels(content, path):
    # Returns {uid: (start, count)}; any inconsistency is a ValueError naming the file.
    def bad(problem):
        return ValueError(f"{path}: invalid pseudo-label file: {problem}")

    if not isinstance(content, dict) or not {"uids", "frame_counts", "labels", "meta"} <= set(content):
        raise bad("expected a dict with keys uids, frame_counts, labels, meta")
    uids, counts, labels = content["uids"], content["frame_counts"], content["labels"]
    if not isinstance(uids, list) or not all(isinstance(u, str) for u in uids) or len(set(uids)) != len(uids):
        raise bad("uids must be a list of distinct strings")
    if not isinstance(counts, torch.Tensor) or counts.dim() != 1 or counts.dtype != torch.long:
        raise bad("frame_counts must be a 1-D long tensor")
    if len(counts) != len(uids):
        raise bad(f"{len(uids)} uids but {len(counts)} frame counts")
    if len(counts) and counts.min() < 0:
        raise bad("negative frame count")
    if not isinstance(labels, dict) or not labels:
        raise bad("labels must be a non-empty dict {K: tensor}")
    total = int(counts.sum())
    for k, lab in labels.items():
        if not isinstance(k, int) or k < 1:
            raise bad(f"label key {k!r} is not a positive integer K")
        if not isinstance(lab, torch.Tensor) or lab.dim() != 1 or lab.is_floating_point():
            raise bad(f"labels[{k}] must be a 1-D integer tensor")
        if len(lab) != total:
            raise bad(f"labels[{k}] has {len(lab)} entries but frame_counts sum to {total}")
        if len(lab) and (lab.min() < 0 or lab.max() >= k):
            raise bad(f"labels[{k}] has values in [{int(lab.min())}, {int(lab.max())}], outside [0, {k})")
    if not isinstance(content["meta"], dict):
        raise bad("meta must be a dict")
    starts = torch.cumsum(counts, 0) - counts
    return {u: (int(s), int(c)) for u, s, c in zip(uids, starts.tolist(), counts.tolist())}


def save_labels(path, uids, frame_counts, labels, meta):
    """Writes the pseudo-labels of `uids` (frames concatenated in uid order) atomically to `path`."""
    content = {
        "uids": [str(u) for u in uids],
        "frame_counts": torch.as_tensor(frame_counts, dtype=torch.long).cpu(),
        "labels": {int(k): torch.as_tensor(v).cpu().to(torch.int16 if int(k) <= 32767 else torch.int32)
                   for k, v in labels.items()},
        "meta": dict(meta),
    }
    _validate_labels(content, path)  # never write a file that load_labels would refuse
    _atomic_save(content, path)


def load_labels(path):
    """Loads and checks a pseudo-label file; adds "index": {uid: (start, count)} and "path"."""
    try:
        content = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated or foreign file: torch raises many different things
        raise ValueError(f"{path}: not a readable pseudo-label file ({type(e).__name__}: {e})") from e
    index = _validate_labels(content, path)
    return {**content, "index": index, "path": str(path)}


def labels_for(label_file, uid, num_frames):
    """{K: (num_frames,) long} pseudo-labels of one utterance of a load_labels() result."""
    path = label_file.get("path", "pseudo-label file")
    if uid not in label_file["index"]:
        raise ValueError(f"{path}: no pseudo-labels for utterance {uid}")
    start, count = label_file["index"][uid]
    if count != num_frames:
        raise ValueError(f"{path}: utterance {uid} has {count} pseudo-labels but {num_frames} frames were "
                         f"expected: pseudo-labels do not match the audio")
    return {k: v[start:start + count].long() for k, v in label_file["labels"].items()}


def save_centroids(path, centroids, meta):
    _atomic_save({"centroids": {int(k): c.float().cpu() for k, c in centroids.items()}, "meta": dict(meta)}, path)


def load_centroids(path):
    try:
        content = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: not a readable centroids file ({type(e).__name__}: {e})") from e
    cents = content.get("centroids") if isinstance(content, dict) else None
    if not isinstance(cents, dict) or not cents or not all(
            isinstance(c, torch.Tensor) and c.dim() == 2 and c.shape[0] == k for k, c in cents.items()):
        raise ValueError(f"{path}: invalid centroids file: expected {{'centroids': {{K: (K, D) tensor}}, 'meta': {{}}}}")
    return content
