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
  k-means++ makes K sequential passes over the frames: fine on a GPU, hours on a CPU for K = 4096
  and a million frames, where "random" is the practical choice.
- An empty cluster is re-seeded with the frame currently farthest from its centroid (taken out of
  its old cluster), as scikit-learn does; we keep the 256 farthest frames of each pass for that.
"""

import argparse
import functools
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from model import save_atomic

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


def _full_fp32(fn):
    # TF32 matmuls (if a training script allowed them) round x.c to 10 bits and blur close distances:
    # k-means runs in full float32 whatever the global setting, which is restored afterwards.
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_float32_matmul_precision(old)
    return wrapper


def _check_features(features):
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"features must be a 2-D (frames, dims) tensor, got {shape}")
    if not features.is_floating_point():
        raise ValueError(f"features must be floating point, got {features.dtype}")
    return features


class _Frames:
    """The frames being clustered, translated by `shift`, served in float32 chunks on `device`.

    Chunks travel to the device one at a time, so N x D never has to fit there; memory stays at
    chunk_size x (D + K) whatever N is. ||x - shift||^2 is computed once per frame and kept (N floats).
    """

    def __init__(self, feats, chunk_size, device, shift):
        self.feats, self.chunk_size, self.device, self.shift = feats, chunk_size, device, shift
        self.sq = torch.empty(len(feats), device=device)
        for start, x, _ in self.chunks(with_sq=False):
            self.sq[start:start + len(x)] = torch.einsum("nd,nd->n", x, x)  # einsum: no n x d temporary
        if not torch.isfinite(self.sq).all():  # a NaN frame would poison its centroid without a sound
            raise ValueError("features contain NaN or inf")

    def __len__(self):
        return len(self.feats)

    def chunks(self, with_sq=True):
        buf = torch.empty(min(self.chunk_size, len(self.feats)), self.feats.shape[1], device=self.device)
        for start in range(0, len(self.feats), self.chunk_size):
            x = self.feats[start:start + self.chunk_size].to(self.device, non_blocking=True)
            x = torch.sub(x, self.shift, out=buf[:len(x)])  # one reused buffer: also converts fp16 -> fp32
            yield start, x, (self.sq[start:start + len(x)] if with_sq else None)

    def rows(self, idx):
        return self.feats[idx.to(self.feats.device)].to(self.device, torch.float32) - self.shift


def _nearest(x, x_sq, c, c_sq):
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2 with a matmul: memory n x K, not n x K x D. ||x||^2 is the
    # same for every centroid, so it is added after the min; float32 rounding can go below 0: clamp.
    dmin, labels = torch.addmm(c_sq, x, c.T, alpha=-2).min(1)
    return dmin.add_(x_sq).clamp_(min=0), labels


# -----------------------------------------------------------------------------
# initialisation

def _kmeans_plusplus(frames, k, gen):
    # Greedy k-means++ (Arthur & Vassilvitskii 2007, scikit-learn's variant): draw 2 + ln K candidates
    # with probability ~ D^2 and keep the one that lowers the potential most. K passes over the frames.
    n, trials, device = len(frames), 2 + int(math.log(k)), frames.device

    def dists_to(points):  # (n, P) squared distances of every frame to each point
        p_sq = (points * points).sum(1)
        out = torch.empty(n, len(points), device=device)
        for start, x, x_sq in frames.chunks():
            d = torch.addmm(p_sq, x, points.T, alpha=-2, out=out[start:start + len(x)])
            d.add_(x_sq[:, None]).clamp_(min=0)
        return out

    chosen = torch.empty(k, dtype=torch.long, device=device)
    chosen[0] = torch.randint(n, (1,), generator=gen)[0]
    closest = dists_to(frames.rows(chosen[:1]))[:, 0]
    for i in range(1, k):
        cum = closest.cumsum(0, dtype=torch.float64)  # float64: a float32 cumsum over millions of frames drifts
        r = torch.rand(trials, generator=gen, dtype=torch.float64).to(device) * cum[-1]
        cand = torch.searchsorted(cum, r).clamp_(max=n - 1)
        d = dists_to(frames.rows(cand))
        d = torch.minimum(d, closest[:, None], out=d)
        best = d.sum(0, dtype=torch.float64).argmin().view(1)  # stays on the device: no sync per step
        closest = d.index_select(1, best)[:, 0]
        chosen[i] = cand[best][0]
    return frames.rows(chosen)


def _init_centroids(frames, k, init, seed):
    gen = torch.Generator().manual_seed(seed)  # CPU generator: the same draws on every device
    if isinstance(init, torch.Tensor):
        return init.to(frames.device, torch.float32) - frames.shift
    if init == "k-means++":
        return _kmeans_plusplus(frames, k, gen)
    return frames.rows(torch.randperm(len(frames), generator=gen)[:k])  # "random"


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
    sums: torch.Tensor  # (K, D) float64: float32 would drift over millions of frames
    counts: torch.Tensor  # (K,) long
    inertia: torch.Tensor  # () float64
    far_d: torch.Tensor  # (R,) distances of the farthest frames seen so far, -1 = none yet
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

    def add(self, x, dmin, labels):
        k, dim = self.sums.shape
        self.sums += torch.zeros(k, dim, device=x.device).index_add_(0, labels, x)  # float32 within a chunk
        self.counts += torch.bincount(labels, minlength=k)
        self.inertia += dmin.sum(dtype=torch.float64)
        top = dmin.topk(min(len(self.far_d), len(dmin))).indices  # this chunk's farthest, then merge
        self.keep_farthest(dmin[top], x[top], labels[top])

    def keep_farthest(self, d, x, labels):
        d_all = torch.cat([self.far_d, d])
        top = d_all.topk(len(self.far_d)).indices
        self.far_d, self.far_x, self.far_label = (d_all[top], torch.cat([self.far_x, x])[top],
                                                  torch.cat([self.far_label, labels])[top])


def _lloyd_pass(frames, cents):
    stats = {k: _Stats.zeros(k, c.shape[1], frames.device) for k, c in cents.items()}
    c_sq = {k: (c * c).sum(1) for k, c in cents.items()}
    for _, x, x_sq in frames.chunks():  # each chunk is read once, for every K
        for k, c in cents.items():
            stats[k].add(x, *_nearest(x, x_sq, c, c_sq[k]))
    for st in stats.values():
        _reduce_stats(st)
    return stats


def _reduce_stats(st):
    world = _world()[1]
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
        # Re-seed with the farthest frames (distinct frames, farthest first), each taken out of its
        # old cluster so that sums and counts stay those of an actual assignment.
        m = min(len(empty), int((st.far_d > 0).sum()))
        empty, x, old = empty[:m], st.far_x[:m].double(), st.far_label[:m]
        sums.index_add_(0, old, -x)
        counts.index_add_(0, old, -torch.ones_like(old))
        sums[empty], counts[empty] = x, 1
    new = sums / counts.clamp(min=1)[:, None]
    return torch.where(counts[:, None] > 0, new, c.double()).float()  # a still-empty cluster stays put


def _lloyd(frames, cents, iters, tol, progress):
    history, counts, active = {k: [] for k in cents}, {}, list(cents)
    bar = tqdm(range(iters + 1), desc="k-means", disable=not progress or _world()[0] != 0)
    for it in bar:  # pass `it` measures the centroids after `it` updates, then updates them
        stats = _lloyd_pass(frames, {k: cents[k] for k in active})
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
                continue  # converged: these centroids are final and h[-1] is their inertia
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
    # Lloyd reads the frames iters + 1 times and k-means++ K times: keep them on the GPU if they fit easily.
    if feats.device == device or device.type != "cuda":
        return feats
    free, _ = torch.cuda.mem_get_info(device)
    return feats.to(device) if feats.numel() * feats.element_size() < free // 3 else feats


def _frames_mean(feats, chunk_size, device):
    # Distances are translation-invariant but ||x||^2 - 2 x.c + ||c||^2 loses precision when all
    # frames share a large offset, as transformer features with their outlier dimensions do.
    total = torch.zeros(feats.shape[1], dtype=torch.float64, device=device)
    for start in range(0, len(feats), chunk_size):
        total += feats[start:start + chunk_size].to(device).sum(0, dtype=torch.float64)
    n = torch.tensor(float(len(feats)), dtype=torch.float64, device=device)
    mean = (_all_reduce(total) / _all_reduce(n)).float()
    if not torch.isfinite(mean).all():
        raise ValueError("features contain NaN or inf")
    return mean


@_full_fp32
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
    n0 = torch.tensor(len(feats), device=device)  # the init is drawn from rank 0's frames
    if world > 1:
        dist.broadcast(n0, 0)
    for k in ks:
        if k > n0.item():
            raise ValueError(f"cannot fit K={k} clusters to N={n0.item()} frames"
                             f"{' (after max_samples)' if cap < len(features) else ''}: K must be <= N")
    frames = _Frames(feats, chunk_size, device, _frames_mean(feats, chunk_size, device))

    cents = {}
    for k in ks:
        cents[k] = (_init_centroids(frames, k, init[k], seed) if rank == 0
                    else torch.empty(k, feats.shape[1], device=device))
        if world > 1:
            dist.broadcast(cents[k], 0)
    history, counts = _lloyd(frames, cents, iters, tol, progress)
    return {k: KMeansResult((cents[k] + frames.shift).cpu(), history[k], counts[k].cpu()) for k in ks}


@_full_fp32
def assign(features, centroids, chunk_size=16384, device=None):
    """Label (N,) long, on CPU, of the nearest centroid of every row of `features`."""
    features = _check_features(features)
    if centroids.dim() != 2 or centroids.shape[1] != features.shape[1]:
        raise ValueError(f"centroids {tuple(centroids.shape)} do not match features of dimension {features.shape[1]}")
    device = _default_device(device)
    c = centroids.to(device, torch.float32)
    frames = _Frames(features, chunk_size, device, shift=c.mean(0))  # any shift works; a central one is precise
    c = c - frames.shift
    c_sq = (c * c).sum(1)
    labels = torch.empty(len(features), dtype=torch.long)
    for start, x, x_sq in frames.chunks():
        labels[start:start + len(x)] = _nearest(x, x_sq, c, c_sq)[1].cpu()
    return labels


# -----------------------------------------------------------------------------
# pseudo-label files: {"uids": [str], "frame_counts": (U,) long, "labels": {K: (sum counts,) int}, "meta": {}}

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
        "labels": {int(k): torch.as_tensor(v).cpu() for k, v in labels.items()},
        "meta": dict(meta),
    }
    _validate_labels(content, path)  # never write a file that load_labels would refuse
    # int16 halves the file (and P-TAPT's memory) for every K up to 32767; checked above, so no overflow
    content["labels"] = {k: v.to(torch.int16 if k <= 32767 else torch.int32) for k, v in content["labels"].items()}
    save_atomic(content, path)


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


def emotion_nmi(labels, frame_counts, utterance_labels):
    """Normalised mutual information (arithmetic mean normalisation, as scikit-learn's default)
    between frame pseudo-labels and the emotion of each frame's utterance: how much emotion the
    clusters carry (0 = none, 1 = the clusters are the emotions)."""
    emotion = torch.repeat_interleave(torch.as_tensor(utterance_labels), torch.as_tensor(frame_counts))
    labels = torch.as_tensor(labels).long()
    joint = torch.zeros(int(labels.max()) + 1, int(emotion.max()) + 1, dtype=torch.float64)
    joint.index_put_((labels, emotion), torch.ones(len(labels), dtype=torch.float64), accumulate=True)
    p = joint / joint.sum()
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = (p[nz] * torch.log(p[nz] / (pa[:, None] * pb[None, :])[nz])).sum()
    entropy = lambda q: -(q[q > 0] * q[q > 0].log()).sum()
    ha, hb = entropy(pa), entropy(pb)
    return float(mi / ((ha + hb) / 2)) if ha + hb > 0 else 1.0


def save_centroids(path, centroids, meta):
    save_atomic({"centroids": {int(k): c.float().cpu() for k, c in centroids.items()}, "meta": dict(meta)}, path)


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
        raise ValueError(f"{path}: invalid centroids file: expected "
                         f"{{'centroids': {{K: (K, D) tensor}}, 'meta': {{}}}}")
    return content


# -----------------------------------------------------------------------------
# teacher features (model.py, data.py)

@torch.no_grad()
def extract_features(model, utterances, layer, device, batch_seconds=200.0, progress=True, workers=2):
    """Every valid frame of every utterance, concatenated in utterance order: ((N, D) float16 on CPU,
    frame counts (U,) long). layer: a transformer layer 1..L, or None for the transformer output."""
    from data import AudioDataset, BucketBatchSampler, collate  # here: data.py may import this file

    dataset = AudioDataset(utterances, classes=())  # full length; the emotion labels are not needed
    # Length-sorted batches of at most batch_seconds of padded audio: little padding, bounded memory.
    sampler = BucketBatchSampler(dataset.lengths, batch_size=max(1, len(dataset)), max_batch_seconds=batch_seconds,
                                 bucket=True, shuffle=False, drop_last=False)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                                         pin_memory=torch.device(device).type == "cuda")
    model = model.to(device).eval()
    frames = [None] * len(dataset)
    for batch in tqdm(loader, desc=f"features (layer {layer or 'last'})", disable=not progress):
        hidden, lengths = model(batch["wav"].to(device), batch["lengths"].to(device), layer=layer)
        hidden, lengths = hidden.half().cpu(), lengths.tolist()  # float16: 1M frames x 768 = 1.5 GB
        for row, i in enumerate(batch["indices"].tolist()):
            frames[i] = hidden[row, :lengths[row]].clone()  # clone: do not keep the padded batch alive
    counts = torch.tensor([len(f) for f in frames], dtype=torch.long)
    return torch.cat(frames), counts


# -----------------------------------------------------------------------------
# command line

def _refuse_overwrite(paths, force):
    for path in paths:
        if os.path.exists(path) and not force:
            raise FileExistsError(f"{path} exists; pass --force to overwrite it")


def _resolve_device(name):
    if name == "auto":
        return _default_device()
    try:
        return _default_device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r}: {e}") from None


def _features(args, checkpoint, layer, split, device):
    from data import load_corpus
    from model import load_wav2vec2

    splits, _ = load_corpus(args.data, args.fold, args.wav_dir)
    if split not in splits:
        raise ValueError(f"{args.data} has no {split!r} split (it has {sorted(splits)})")
    utterances = splits[split]
    model = load_wav2vec2(checkpoint)
    feats, counts = extract_features(model, utterances, layer, device, args.batch_seconds, args.progress, args.workers)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()  # leave the GPU to k-means
    print(f"{len(utterances)} {split} utterances, {len(feats)} frames of dimension {feats.shape[1]}")
    return utterances, feats, counts


def cmd_fit(args):
    centroids_path = args.out + ".centroids.pt"
    _refuse_overwrite([args.out, centroids_path], args.force)  # before the expensive part
    device = _resolve_device(args.device)
    utterances, feats, counts = _features(args, args.checkpoint, args.layer, "train", device)
    uids = [u.uid for u in utterances]
    results = fit_kmeans(feats, args.ks, args.iters, args.init, args.seed, args.tol, args.chunk_size,
                         args.max_samples, device, args.progress)
    labels = {k: assign(feats, r.centroids, args.chunk_size, device) for k, r in results.items()}
    meta = {
        "checkpoint": os.path.abspath(args.checkpoint), "layer": args.layer, "data": os.path.abspath(args.data),
        "fold": args.fold, "split": "train", "ks": list(results), "iters": args.iters, "init": args.init,
        "seed": args.seed, "tol": args.tol, "max_samples": args.max_samples, "num_frames": len(feats),
        "num_fit_frames": int(next(iter(results.values())).counts.sum()),
        "inertia": {k: r.inertia for k, r in results.items()},
    }
    save_centroids(centroids_path, {k: r.centroids for k, r in results.items()}, meta)
    save_labels(args.out, uids, counts, labels, meta)
    for k, r in results.items():
        used = int((torch.bincount(labels[k], minlength=k) > 0).sum())
        nmi = emotion_nmi(labels[k], counts, [sorted({u.label for u in utterances}).index(u.label) for u in utterances])
        print(f"K={k}: inertia {r.inertia[0]:.5g} -> {r.inertia[-1]:.5g} after {len(r.inertia) - 1} iterations, "
              f"{used}/{k} clusters used, NMI with emotion {nmi:.4f}")
    print(f"wrote {args.out} and {centroids_path}")


def cmd_assign(args):
    _refuse_overwrite([args.out], args.force)
    content = load_centroids(args.centroids)
    fitted = content.get("meta", {})
    checkpoint = args.checkpoint or fitted.get("checkpoint")
    layer = args.layer if args.layer is not None else fitted.get("layer")
    if not checkpoint:
        raise ValueError(f"{args.centroids} records no checkpoint: pass --checkpoint")
    for name, used, recorded in (("checkpoint", os.path.abspath(checkpoint), fitted.get("checkpoint")),
                                 ("layer", layer, fitted.get("layer"))):
        if name in fitted and used != recorded:  # allowed (a moved file), but the labels would be off otherwise
            print(f"warning: {name} {used} differs from the one the centroids were fitted on ({recorded})",
                  file=sys.stderr)
    device = _resolve_device(args.device)
    utterances, feats, counts = _features(args, checkpoint, layer, args.split, device)
    uids = [u.uid for u in utterances]
    for k, c in content["centroids"].items():
        if c.shape[1] != feats.shape[1]:
            raise ValueError(f"{args.centroids}: K={k} centroids have dimension {c.shape[1]}, "
                             f"the features {feats.shape[1]}")
    labels = {k: assign(feats, c, args.chunk_size, device) for k, c in content["centroids"].items()}
    meta = {**fitted, "checkpoint": os.path.abspath(checkpoint), "layer": layer, "data": os.path.abspath(args.data),
            "fold": args.fold, "split": args.split, "centroids": os.path.abspath(args.centroids),
            "num_frames": len(feats)}
    save_labels(args.out, uids, counts, labels, meta)
    print(f"wrote {args.out}")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    fit = sub.add_parser("fit", formatter_class=fmt,
                         help="extract the train split's features, fit k-means, label every frame")
    asg = sub.add_parser("assign", formatter_class=fmt, help="label the frames of a split with centroids saved by fit")
    fit.set_defaults(func=cmd_fit)
    asg.set_defaults(func=cmd_assign)

    fit.add_argument("--checkpoint", required=True,
                     help="teacher: a wav2vec 2.0 checkpoint (fairseq, or this project's, e.g. a V-FT classifier)")
    fit.add_argument("--layer", type=int, default=None,
                     help="transformer layer 1..L whose output is clustered; None: the transformer's output")
    fit.add_argument("--ks", type=int, nargs="+", default=[64, 512, 4096], help="numbers of clusters (RECIPE.md)")
    fit.add_argument("--iters", type=int, default=20, help="Lloyd iterations (the release: 20)")
    fit.add_argument("--init", choices=["k-means++", "random"], default="k-means++",
                     help="k-means++ (greedy, as scikit-learn; K passes over the frames: use a GPU) "
                          "or random frames (the release's faiss)")
    fit.add_argument("--seed", type=int, default=0, help="seed of the init and of the frame subsample")
    fit.add_argument("--tol", type=float, default=0.0, help="stop a K early once its inertia improves by less than "
                                                            "this fraction (0: always run --iters)")
    fit.add_argument("--max-samples", type=int, default=None,
                     help="fit on at most this many randomly chosen frames; None: max(ks) x 1000 (the release)")
    fit.add_argument("--out", required=True, help="pseudo-label file to write; centroids go to OUT.centroids.pt")

    asg.add_argument("--centroids", required=True, help="OUT.centroids.pt written by 'fit'")
    asg.add_argument("--checkpoint", default=None, help="teacher checkpoint; None: the one recorded by 'fit'")
    asg.add_argument("--layer", type=int, default=None, help="None: the layer recorded by 'fit'")
    asg.add_argument("--split", default="test", help="split of the corpus to label: train, val or test")
    asg.add_argument("--out", required=True, help="pseudo-label file to write")

    for q in (fit, asg):
        q.add_argument("--data", required=True, help="IEMOCAP_full_release folder, a label .json or a .csv manifest")
        q.add_argument("--fold", type=int, default=None, help="IEMOCAP test session 1-5; its train split is the "
                                                              "other sessions (ignored for .json/.csv)")
        q.add_argument("--wav-dir", default=None, help="folder of the wavs named in a label .json")
        q.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
        q.add_argument("--batch-seconds", type=float, default=200.0, help="padded audio per feature batch")
        q.add_argument("--workers", type=int, default=2, help="data loader processes")
        q.add_argument("--chunk-size", type=int, default=16384,
                       help="frames per k-means chunk: memory ~ chunk x (D + K) floats")
        q.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
        q.add_argument("--force", action="store_true", help="overwrite existing output files")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    errors = (ValueError, OSError)
    try:  # the user-input errors of the other modules; imported here because data.py may import this file
        from data import DataError
        from model import CheckpointError
        errors += (DataError, CheckpointError)
    except ImportError:
        pass
    try:
        args.func(args)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
