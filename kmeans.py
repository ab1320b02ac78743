"""
k-means pseudo-labels for P-TAPT (RECIPE.md, "P-TAPT" step 2).

The release clustered the teacher's frame features of the fold's training sessions with faiss
(GPU, 20 Lloyd iterations, K = 64, 512 and 4096, at most max(K) x 1000 sampled frames) and gave
every frame of every training utterance one label per K. This file does the same in plain PyTorch:

    pseudo_label_stage(model, utterances, ...) -> P-TAPT's whole k-means stage, one process or torchrun
    fit_kmeans(features, ks)        -> {K: KMeansResult(centroids, inertia history, cluster sizes)}
    assign(features, centroids)     -> nearest-centroid label of every frame
    save_labels / load_labels / labels_for: the pseudo-label file P-TAPT reads
    extract_features                -> every valid frame of a list of utterances, from model.py
    python kmeans.py fit|assign ... -> the command line (python kmeans.py fit --help)

Choices, so that they are written down somewhere:
- All K are fitted together: a plain Lloyd pass reads every chunk of frames once for every K. Each
  K's init draws from its own generator seeded with `seed`, so fitting a K alone or together with
  others gives the same centroids.
- Distances are ||x||^2 - 2 x.c + ||c||^2 with a matmul, chunk by chunk, in float32; the frames are
  first translated by their mean (as scikit-learn does) because that formula loses precision when
  the features share a large offset, which transformer features with their outlier dimensions do.
- Lloyd's result, computed with fewer distances (see "Lloyd iterations"): after the first pass, a
  frame is only looked at when bounds (a 64-dimensional projection of frames and centroids, and
  Yinyang k-means' bounds on how far the centroids moved) do not show that its centroid is still the
  nearest. The labels, hence the centroids, are those of plain Lloyd up to float32 ties.
- Under torch.distributed the frames of all ranks, concatenated in rank order, are clustered as one
  process would cluster them: the subsample and the init draw global indices, cluster sums are
  all-reduced, and every rank ends with the same centroids.
- init "k-means++" is scikit-learn's greedy variant (2 + ln K candidates per step, keep the one that
  lowers the potential most); "random" is the release's (faiss) init: K distinct random frames.
  k-means++ makes K sequential passes over the frames: fine on a GPU, hours on a CPU for K = 4096
  and a million frames, where "random" is the practical choice.
- An empty cluster is re-seeded with the frame currently farthest from its centroid (taken out of
  its old cluster), as scikit-learn does (at most 256 per pass and K).
"""

import argparse
import functools
import math
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

from model import save_atomic, world

CPU_BLOCK = 4096  # frames per chunk read on the CPU (at most chunk_size)
MAX_RESEEDS = 256  # at most this many empty clusters are re-seeded per pass and per K
PROJ_DIMS = 64  # dimensions of the projection bound that prunes Lloyd's passes (_Projection)
PROJ_MIN_DIM = 256  # ... used for features of at least this many dimensions
GROUP_SIZE, MAX_GROUPS = 16, 64  # centroids per group of the Yinyang bounds (_Bounds), and most groups
PAIRS_PER_ROW = 48  # exact distances frame by centroid pair, not by matmul, below K / PAIRS_PER_ROW pairs a frame
PAIR_BATCH = 2048  # pairs at a time (a small gather: large fresh CPU buffers cost page faults)


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # (K, D) float32 on CPU
    inertia: list  # sum of squared distances to the nearest centroid: at init, then after every iteration
    counts: torch.Tensor  # (K,) long, cluster sizes under the final centroids (fitted frames only)
    settled: list = field(default_factory=list)  # per pruned pass: fraction of frames settled without reading them


# -----------------------------------------------------------------------------
# small helpers

def _default_device(device=None):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:  # compare equal to tensor.device later on
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _all_reduce(t):
    if world()[1] > 1:
        dist.all_reduce(t)
    return t


def _rank_sizes(n, device):
    # [n of rank 0, n of rank 1, ...]: the frames of all ranks in rank order form the global array
    world_size = world()[1]
    if world_size == 1:
        return [n]
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.long, device=device))
    return [int(t) for t in sizes]


def _gather_cat(t, device):
    """The 1-D tensors of all ranks concatenated in rank order, on every rank (on CPU)."""
    world_size = world()[1]
    if world_size == 1:
        return t.cpu()
    sizes = _rank_sizes(len(t), device)
    buf = torch.zeros(max(sizes), dtype=t.dtype, device=device)
    buf[:len(t)] = t.to(device)
    parts = [torch.empty_like(buf) for _ in range(world_size)]
    dist.all_gather(parts, buf)
    return torch.cat([p[:n].cpu() for p, n in zip(parts, sizes)])


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
    """The frames being clustered, translated by `shift`. They stay as given (a float16 memmap, CPU frames
    for a GPU fit...): every pass reads them in chunks (chunk_size rows, at most CPU_BLOCK on the CPU),
    centred and converted to float32 in one reused buffer on `device`, so working memory stays at
    chunk_size x (D + K) floats and no centred copy of N x D is made: re-centring a chunk costs less than
    writing and re-reading such a copy. The chunks come with a column of ones appended ("augmented"), so
    that x.(-2c) + ||c||^2 is one matmul. ||x - shift||^2 is kept (N floats)."""

    def __init__(self, feats, chunk_size, device, shift):
        self.feats, self.chunk_size, self.device, self.shift = feats, chunk_size, device, shift
        self.rank, self.world = world()
        sizes = _rank_sizes(len(feats), device)  # under torch.distributed: global index = offset + local index
        self.offset, self.total = sum(sizes[:self.rank]), sum(sizes)
        self.first_nonempty = next((r for r, m in enumerate(sizes) if m), 0)
        self.dim = feats.shape[1]
        # rows per read: on the CPU a block that stays in cache and whose buffer malloc reuses (a fresh
        # 50 MB buffer costs more in page faults than the pass it serves)
        self.block = chunk_size if device.type == "cuda" else min(chunk_size, CPU_BLOCK)
        self.buf = torch.ones(max(1, min(self.block, len(feats))), self.dim + 1, device=device)
        self.sq = torch.empty(len(feats), device=device)
        for start, x in self.chunks():
            self.sq[start:start + len(x)] = torch.linalg.vector_norm(x, dim=1).square_()
        if not torch.isfinite(self.sq).all():  # a NaN frame would poison its centroid without a sound
            raise ValueError("features contain NaN or inf")
        self.sq_total = _all_reduce(self.sq.sum(dtype=torch.float64))  # sum over all ranks' frames of ||x||^2
        self.proj = None

    def __len__(self):
        return len(self.feats)

    def chunks(self, aug=False):
        """(start, (n, D) or augmented (n, D + 1) centred float32 rows) for every chunk: a view of one
        buffer, valid until the next chunk."""
        for start in range(0, len(self.feats), self.block):
            x = self.feats[start:start + self.block].to(self.device, non_blocking=True)
            xa = self.buf[:len(x)]
            torch.sub(x, self.shift, out=xa[:, :-1])  # fp16 -> fp32 too
            yield start, (xa if aug else xa[:, :-1])

    def rows(self, idx):
        # index_select: on the CPU several times faster than feats[idx] for a row gather
        x = self.feats.index_select(0, idx.to(self.feats.device)).to(self.device, non_blocking=True)  # a fresh copy
        if x.dtype == torch.float32:  # in place: one allocation less per pass (2-5% of a fit, measured)
            return x.sub_(self.shift)
        return torch.sub(x, self.shift).float()  # centred at the input's precision, then rounded, as chunks() does

    def fetch(self, gidx):
        """Rows of the frames of all ranks concatenated in rank order (global indices `gidx`), on every
        rank: each rank fills the rows it holds, an all-reduce sums them (a row + zeros is exact)."""
        gidx = gidx.to(self.device)
        if self.world == 1:
            return self.rows(gidx)
        mine = (gidx >= self.offset) & (gidx < self.offset + len(self))
        out = torch.zeros(len(gidx), self.dim, device=self.device)
        out[mine] = self.rows(gidx[mine] - self.offset)
        return _all_reduce(out)

    def project(self, dims, seed):
        """The exact pruning bound of _Projection (made once, for every K): needs dims well below D."""
        if self.proj is None:
            self.proj = _Projection(self, dims, seed)
        return self.proj


class _Projection:
    """x = V z + residual with V (D, p) orthonormal: for every frame x and centroid c,
        ||z - zc||^2 + (r - rc)^2  <=  ||x - c||^2  <=  ||z - zc||^2 + (r + rc)^2
    (r, rc: residual norms), so a p-dimensional product bounds all K distances of a frame. V spans the
    top principal directions of a seeded sample of frames (randomised SVD): the tighter the frames' spectrum,
    the more frames the bounds settle. Frames they do not settle get exact distances, so the result is
    Lloyd's whatever V is. Memory: N x (p + 4) floats."""

    SAMPLE, OVERSAMPLE = 2048, 16

    def __init__(self, frames, dims, seed):
        device = frames.device
        gen = torch.Generator().manual_seed(seed + 1)
        pick = torch.randperm(frames.total, generator=gen)[:self.SAMPLE].sort().values
        sample = frames.fetch(pick)  # the same sample, hence the same V, on every rank
        omega = torch.randn(frames.dim, dims + self.OVERSAMPLE, generator=gen).to(device)
        y = sample @ (sample.T @ (sample @ omega))  # one power iteration
        q = torch.linalg.qr(y).Q
        v = torch.linalg.svd(q.T @ sample, full_matrices=False).Vh[:dims].T
        self.v = torch.linalg.qr(v).Q.contiguous()  # (D, p), orthonormal to float32 precision
        n = len(frames)
        self.z = torch.ones(n, dims + 2, device=device)  # [z, r, 1]: one matmul gives every bound (below)
        for start, x in frames.chunks():
            torch.mm(x, self.v, out=self.z[start:start + len(x), :dims])
        z_sq = torch.linalg.vector_norm(self.z[:, :dims], dim=1).square_()
        # r^2 = ||x||^2 - ||z||^2 in float32: its error, a few 1e-7 x ||x||^2, is below err_r2
        self.err_r2 = frames.sq * 1e-5
        self.z[:, dims] = (frames.sq - z_sq).clamp_(min=0).sqrt_()
        self.zq = z_sq + self.z[:, dims] ** 2

    def weights(self, c):
        """(K, p + 2) W with [z, r, 1] . W_j = ||zc_j||^2 + rc_j^2 - 2 (z.zc_j + r rc_j): the lower bound
        of ||x - c_j||^2 less ||z||^2 + r^2 (the same for every j); and rc (K,), computed directly."""
        zc = c @ self.v
        rc = torch.linalg.vector_norm(c - zc @ self.v.T, dim=1)
        cq = torch.linalg.vector_norm(zc, dim=1).square_() + rc * rc
        return torch.cat([-2 * zc, -2 * rc[:, None], cq[:, None]], 1), rc


# -----------------------------------------------------------------------------
# initialisation

def _kmeans_plusplus(frames, k, gen):
    # Greedy k-means++ (Arthur & Vassilvitskii 2007, scikit-learn's variant): draw 2 + ln K candidates
    # with probability ~ D^2 and keep the one that lowers the potential most. K passes over the frames.
    # Under torch.distributed every rank draws the same random numbers and holds its part of the global
    # potential: the candidates (global indices) and their rows come from the ranks that hold them, so
    # the result is the one-process result on the frames of all ranks (up to float64 summation order).
    n, trials, device, world = len(frames), 2 + int(math.log(k)), frames.device, frames.world

    def dists_to(points):  # (n, P) squared distances of every local frame to each point
        p_sq = (points * points).sum(1)
        out = torch.empty(n, len(points), device=device)
        for start, x in frames.chunks():
            d = torch.addmm(p_sq, x, points.T, alpha=-2, out=out[start:start + len(x)])
            d.add_(frames.sq[start:start + len(x), None]).clamp_(min=0)
        return out

    chosen = torch.empty(k, frames.feats.shape[1], device=device)
    chosen[0] = frames.fetch(torch.randint(frames.total, (1,), generator=gen))[0]
    closest = dists_to(chosen[:1])[:, 0]
    for i in range(1, k):
        cum = closest.cumsum(0, dtype=torch.float64)  # float64: a float32 cumsum over millions of frames drifts
        if world == 1:
            r = torch.rand(trials, generator=gen, dtype=torch.float64).to(device) * cum[-1]
            points = frames.rows(torch.searchsorted(cum, r).clamp_(max=n - 1))
        else:  # the global cumulative sum: this rank's part starts where the lower ranks' parts end
            mine = cum[-1:] if n else torch.zeros(1, dtype=torch.float64, device=device)
            parts = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(parts, mine)
            bounds = torch.cat(parts).cumsum(0)  # the same on every rank: each r has exactly one owner
            r = torch.rand(trials, generator=gen, dtype=torch.float64).to(device) * bounds[-1]
            lo = bounds[frames.rank - 1] if frames.rank else torch.zeros((), dtype=torch.float64, device=device)
            here = (r <= bounds[frames.rank]) & ((r > lo) | (frames.rank == frames.first_nonempty))
            if n == 0:
                here[:] = False
            local = torch.searchsorted(cum, r - lo).clamp_(min=0, max=max(n - 1, 0))
            gidx = torch.where(here, local + frames.offset, torch.full_like(local, -1))
            points = frames.fetch(_all_reduce_max(gidx))
        d = dists_to(points)
        d = torch.minimum(d, closest[:, None], out=d)
        potential = _all_reduce(d.sum(0, dtype=torch.float64))
        best = potential.argmin().view(1)  # stays on the device: no sync per step
        closest = d.index_select(1, best)[:, 0]
        chosen[i] = points[best][0]
    return chosen


def _all_reduce_max(t):
    if world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def _init_centroids(frames, k, init, seed):
    # Every rank calls this: the draws are global (the frames of all ranks in rank order).
    gen = torch.Generator().manual_seed(seed)  # CPU generator: the same draws on every device
    if isinstance(init, torch.Tensor):
        c = init.to(frames.device, torch.float32)
        if frames.world > 1:
            dist.broadcast(c, 0)  # rank 0's centroids, should the ranks have been given different ones
        return c - frames.shift
    if init == "k-means++":
        return _kmeans_plusplus(frames, k, gen)
    return frames.fetch(torch.randperm(frames.total, generator=gen)[:k])  # "random"


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
#
# Every pass gives each frame its nearest centroid; then the centroids move to their clusters' means.
# Cluster sums (float64) and sizes are kept per rank and all-reduced: under torch.distributed every
# rank holds the same centroids. The inertia of a pass comes from the sums, not from the distances:
#   sum_x ||x - c_a(x)||^2 = sum_x ||x||^2 - 2 sum_j S_j.c_j + sum_j n_j ||c_j||^2   (float64)
# so a pass only needs each frame's label, and only frames whose label changed update the sums.
# The first pass is plain (every distance, by matmul, every K per chunk). The next ones are pruned when
# the features have PROJ_MIN_DIM dimensions or more (wav2vec 2.0's 768): a frame is skipped when its
# Yinyang bounds (_Bounds) show that no centroid moved enough to beat its own; otherwise its bounds to
# all K come from the 64-dimensional projection (_Projection, one small matmul), and only when another
# centroid may be nearer are its D features read, for exact distances to the centroids still in play.
# Every bound is widened by its float32 error, so the labels are plain Lloyd's up to float32 ties. If a
# pruned pass has to read more than half of the frames, the next pass is plain again: data whose
# spectrum is too flat for the projection costs little more than plain Lloyd.


class _KState:
    """Lloyd's state for one K: centroids (centred), this rank's labels, cluster sums and sizes."""

    def __init__(self, k, c, n, device):
        self.k, self.c = k, c
        self.labels = torch.zeros(n, dtype=torch.long, device=device)
        self.sums = torch.zeros(k, c.shape[1], dtype=torch.float64, device=device)
        self.counts = torch.zeros(k, dtype=torch.long, device=device)
        self.plain_next = True  # the first pass has no labels to keep: plain
        self.settled = []  # fraction of frames settled by the bound, per pruned pass
        self.buf = None  # (chunk, K) matmul output, reused: a fresh CPU buffer of this size costs page faults
        self.bounds = None  # _Bounds, from the first pruned pass on

    def scratch(self, n, chunk_size, device, width=None):
        width = width or self.k
        if self.buf is None or len(self.buf) < chunk_size * width:
            self.buf = torch.empty(chunk_size * width, device=device)
        return self.buf[:n * width].view(n, width)

    def move(self, idx, old, new, x):
        # frames idx (local) go from clusters old to new: x their rows (float32, centred)
        delta = torch.zeros(self.sums.shape, device=x.device).index_add_(0, new, x).index_add_(0, old, x, alpha=-1)
        self.sums += delta  # float32 within a move, float64 across
        self.counts.index_add_(0, new, torch.ones_like(new)).index_add_(0, old, -torch.ones_like(old))
        self.labels[idx] = new
        if self.bounds is not None:
            self.bounds.reset(idx)


def _weights(c):
    # (K, D + 1): an augmented row [x, 1] times W_j is ||c_j||^2 - 2 x.c_j = ||x - c_j||^2 - ||x||^2
    return torch.cat([-2 * c, (c * c).sum(1, keepdim=True)], 1)


def _plain_pass(frames, states):
    # every distance; each chunk is read once for every K
    for st in states:
        st.w = _weights(st.c).T
        if st.bounds is not None:
            st.bounds.reset()  # the labels change under them
        st.sums.zero_()
        st.counts.zero_()
    for start, xa in frames.chunks(aug=True):
        for st in states:
            lab = torch.mm(xa, st.w, out=st.scratch(len(xa), frames.chunk_size, xa.device)).min(1).indices
            st.labels[start:start + len(xa)] = lab
            # float32 within a chunk; rows with their column of ones are contiguous (fast), and sum to counts
            st.sums += torch.zeros(st.k, frames.dim + 1, device=xa.device).index_add_(0, lab, xa)[:, :-1]
            st.counts += torch.bincount(lab, minlength=st.k)


def _groups(c, count):
    """`count` groups of nearby centroids of similar sizes (recursive halving along the principal
    direction): (perm, width) with the ids of group g at perm[g * width:(g + 1) * width], -1 = padding."""
    out = []

    def split(ids, g):
        if g == 1:
            out.append(ids)
            return
        sub = c[ids] - c[ids].mean(0)
        v = sub[(sub * sub).sum(1).argmax()].clone()
        for _ in range(8):  # power iteration (a deterministic start): any direction would be correct
            v = sub.T @ (sub @ v)
            v /= v.norm().clamp(min=1e-30)
        order = ids[(sub @ v).argsort(stable=True)]
        n1 = round(len(ids) * (g // 2) / g)
        split(order[:n1], g // 2)
        split(order[n1:], g - g // 2)

    split(torch.arange(len(c), device=c.device), count)
    width = max(len(ids) for ids in out)
    perm = torch.full((count * width,), -1, dtype=torch.long, device=c.device)
    for g, ids in enumerate(out):
        perm[g * width:g * width + len(ids)] = ids
    return perm, width


class _Bounds:
    """Per frame (this rank's): u >= its distance to its centroid, lbg[:, g] <= its distance to every other
    centroid of group g (Yinyang k-means, Ding et al. 2015; G = K / 16 groups, at most 64, of nearby
    centroids). When centroids move by delta, u grows by its centroid's delta and lbg[:, g] shrinks by
    group g's largest delta; a frame with u <= min_g lbg keeps its label without any work, the others get
    fresh bounds from the projection. Memory: N x (G + 1) floats."""

    def __init__(self, st, n, device):
        k = st.k
        self.groups = max(1, min(MAX_GROUPS, k // GROUP_SIZE))
        perm, self.width = _groups(st.c, self.groups)
        # columns interleaved, slot-major (column = slot x G + group): a group's minimum is then a min over
        # the middle axis of a (n, width, G) view, which vectorises (over the last axis it does not)
        self.perm = perm.view(self.groups, self.width).T.reshape(-1)
        self.pos = torch.empty(k, dtype=torch.long, device=device)  # column of each centroid
        valid = self.perm >= 0
        self.pos[self.perm[valid]] = valid.nonzero()[:, 0]
        self.gid = self.pos % self.groups
        self.u = torch.full((n,), float("inf"), device=device)
        self.lbg = torch.zeros(n, self.groups, device=device)
        self.c_ref = st.c.double()

    def reset(self, idx=None):
        if idx is None:
            self.u.fill_(float("inf"))
            self.lbg.zero_()
        else:
            self.u[idx] = float("inf")
            self.lbg[idx] = 0

    def drift(self, c, labels, pad):
        c = c.double()
        delta = torch.linalg.vector_norm(c - self.c_ref, dim=1).float() * (1 + 1e-5) + pad
        big = torch.zeros(self.groups, device=c.device).scatter_reduce_(0, self.gid, delta, "amax")
        self.u.add_(delta[labels])
        self.lbg.sub_(big)
        self.c_ref = c

    def ordered(self, w):
        # rows of w in column order, padding rows give +inf (their last column multiplies the ones of [z, r, 1])
        out = torch.zeros(len(self.perm), w.shape[1], device=w.device)
        valid = self.perm >= 0
        out[valid] = w[self.perm[valid]]
        out[~valid, -1] = float("inf")
        return out


def _pruned_pass(frames, st, proj):
    """Labels of this pass for one K from the previous pass's labels (see the notes above _KState).
    Returns how many frames it read (the others were settled by the bounds)."""
    c, device, k = st.c, frames.device, st.k
    if st.bounds is None:
        st.bounds = _Bounds(st, len(frames), device)
    b = st.bounds
    c_sq = (c * c).sum(1)
    w, rc = proj.weights(c)
    wp = b.ordered(w)  # (G x width, p + 2)
    rc_max, csq_max = float(rc.max()), float(c_sq.max())
    sq_max = float(frames.sq.max()) if len(frames) else 0.0
    b.drift(c, st.labels, 1e-6 * math.sqrt(sq_max + csq_max))  # float32 rounding of the bounds
    w_exact = None
    read = 0
    for start in range(0, len(frames), frames.chunk_size):
        end = min(start + frames.chunk_size, len(frames))
        u, lbg = b.u[start:end], b.lbg[start:end]
        ev = (u > lbg.amin(1)).nonzero()[:, 0]  # the others: no centroid can be nearer than their own
        if not len(ev):
            continue
        rows = ev + start
        a, z, zq = st.labels.index_select(0, rows), proj.z.index_select(0, rows), proj.zq.index_select(0, rows)
        r, e = z[:, -2], proj.err_r2.index_select(0, rows)
        dr = torch.minimum(e.sqrt(), e / r.clamp(min=1e-30))  # |error of r| <= dr
        margin = 4 * dr * (r + rc_max) + 2 * dr * dr + 1e-4 * (frames.sq.index_select(0, rows) + csq_max)  # float32 errors
        # bounds of ||x - c||^2 less ||z||^2 + r^2 for every centroid (one matmul): lower [z, r, 1].w, upper
        # that + 4 r rc
        lb = torch.mm(z, wp.T, out=st.scratch(len(ev), frames.chunk_size, device, len(wp)))
        own = b.pos.index_select(0, a)[:, None]
        upper = lb.gather(1, own)[:, 0].addcmul_(r, rc.index_select(0, a), value=4).add_(margin)
        # the own centroid: that upper bound, or the last exact distance plus the moves since if tighter
        u_new = torch.minimum(u.index_select(0, ev), (upper + zq).clamp_(min=0).sqrt_())
        thr = u_new.square().sub_(zq).add_(margin)
        lb.scatter_(1, own, float("inf"))
        gmin = lb.view(len(ev), b.width, b.groups).amin(1)
        open_ = (gmin.amin(1) <= thr).nonzero()[:, 0]  # frames with another centroid in play
        b.lbg[rows] = (gmin + (zq - margin)[:, None]).clamp_(min=0).sqrt_()
        b.u[rows] = u_new
        if not len(open_):
            continue
        # exact distances to the centroids in play and to their own, or to all K (a matmul) when that is
        # not much more work
        pi, pj = (lb[open_] <= thr[open_, None]).nonzero(as_tuple=True)
        pj = b.perm[pj]
        read += len(open_)
        x = frames.rows(rows[open_])
        n_open, a_open = len(open_), a[open_]
        if (len(pi) + n_open) * PAIRS_PER_ROW > n_open * k:
            w_exact = _weights(c).T if w_exact is None else w_exact
            d2, new = torch.addmm(w_exact[-1], x, w_exact[:-1]).min(1)
        else:
            pi = torch.cat([torch.arange(n_open, device=device), pi])
            pj = torch.cat([a_open, pj])
            d = torch.empty(len(pi), device=device)
            for s in range(0, len(pi), PAIR_BATCH):  # ||c||^2 - 2 x.c, the matmul's formula, pair by pair
                i, j = pi[s:s + PAIR_BATCH], pj[s:s + PAIR_BATCH]
                d[s:s + len(i)] = c_sq[j] - 2 * (x.index_select(0, i) * c.index_select(0, j)).sum(1)
            d2 = torch.full((n_open,), float("inf"), device=device).scatter_reduce_(0, pi, d, "amin")
            hit = d == d2[pi]  # the first (lowest index) nearest centroid, as min() picks
            new = torch.full((n_open,), k, dtype=torch.long, device=device).scatter_reduce_(0, pi[hit], pj[hit], "amin")
        b.u[rows[open_]] = (d2 + frames.sq[rows[open_]] + margin[open_]).clamp_(min=0).sqrt_()
        changed = (new != a_open).nonzero()[:, 0]
        if len(changed):  # (their bounds are reset: they excluded the old centroid, not the new one)
            st.move(rows[open_][changed], a_open[changed], new[changed], x[changed])
    return read


def _farthest(frames, st, count):
    # this rank's `count` frames farthest from their centroid: (distance, row, label, global index)
    device = frames.device
    d = torch.empty(len(frames), device=device)
    for start, x in frames.chunks():
        lab = st.labels[start:start + len(x)]
        d[start:start + len(x)] = ((x - st.c[lab]) ** 2).sum(1)
    top = d.topk(min(count, len(d))).indices
    pad = count - len(top)
    out_d = torch.cat([d[top], torch.full((pad,), -1.0, device=device)])
    out_x = torch.cat([frames.rows(top), torch.zeros(pad, frames.dim, device=device)])
    out_l = torch.cat([st.labels[top], torch.zeros(pad, dtype=torch.long, device=device)])
    out_i = torch.cat([top + frames.offset, torch.full((pad,), -1, dtype=torch.long, device=device)])
    if frames.world > 1:
        gathered = []
        for t in (out_d, out_x, out_l, out_i):
            parts = [torch.empty_like(t) for _ in range(frames.world)]
            dist.all_gather(parts, t)
            gathered.append(torch.cat(parts))
        top = gathered[0].topk(count).indices
        out_d, out_x, out_l, out_i = (g[top] for g in gathered)
    return out_d, out_x, out_l, out_i


def _update(frames, st, sums, counts):
    """New centroids from the global sums and sizes. An empty cluster is re-seeded with the frame
    farthest from its centroid (distinct frames, farthest first), taken out of its old cluster so that
    sums and sizes stay those of an actual assignment; a still-empty cluster stays put."""
    empty = (counts == 0).nonzero()[:, 0]
    if len(empty):
        far_d, far_x, far_label, far_idx = _farthest(frames, st, min(st.k, MAX_RESEEDS))
        m = min(len(empty), int((far_d > 0).sum()))
        empty, x, old, idx = empty[:m], far_x[:m], far_label[:m], far_idx[:m]
        sums, counts = sums.clone(), counts.clone()
        sums.index_add_(0, old, -x.double())
        counts.index_add_(0, old, -torch.ones_like(old))
        sums[empty], counts[empty] = x.double(), 1
        mine = (idx >= frames.offset) & (idx < frames.offset + len(frames))  # the owner moves its frames
        if mine.any():
            st.move(idx[mine] - frames.offset, old[mine], empty[mine], x[mine])
    new = sums / counts.clamp(min=1)[:, None]
    st.c = torch.where(counts[:, None] > 0, new, st.c.double()).float()


def _lloyd(frames, cents, iters, tol, progress, prune, seed):
    states = {k: _KState(k, c, len(frames), frames.device) for k, c in cents.items()}
    history, counts, active = {k: [] for k in cents}, {}, list(cents)
    proj = frames.project(prune, seed) if prune else None  # every rank at once (it gathers a sample)
    bar = tqdm(range(iters + 1), desc="k-means", disable=not progress or world()[0] != 0)
    for it in bar:  # pass `it` measures the centroids after `it` updates, then updates them
        plain = [states[k] for k in active if states[k].plain_next or not prune]
        if plain:
            _plain_pass(frames, plain)
        for k in active:
            st = states[k]
            if st not in plain:
                read = _all_reduce(torch.tensor(float(_pruned_pass(frames, st, proj)), device=frames.device))
                st.settled.append(1 - float(read) / max(frames.total, 1))  # over all ranks: the same choice below
                st.plain_next = st.settled[-1] < 0.5  # the bounds do not pay for this data (yet)
            else:
                st.plain_next = False
        for k in active:
            st = states[k]
            sums, n = _all_reduce(st.sums.clone()), _all_reduce(st.counts.clone())
            c = st.c.double()
            inertia = frames.sq_total - 2 * (sums * c).sum() + (n * (c * c).sum(1)).sum()
            history[k].append(max(float(inertia), 0.0))
            counts[k], st.global_stats = n, (sums, n)
        bar.set_postfix({f"K{k}": f"{h[-1]:.5g}" for k, h in history.items()})
        if it == iters:
            break
        still = []
        for k in active:
            h = history[k]
            if tol > 0 and len(h) > 1 and (h[-2] - h[-1]) / max(h[-2], 1e-30) < tol:
                continue  # converged: these centroids are final and h[-1] is their inertia
            _update(frames, states[k], *states[k].global_stats)
            still.append(k)
        active = still
        if not active:
            break
    bar.close()
    for k, st in states.items():
        cents[k] = st.c
    return history, counts, {k: st.settled for k, st in states.items()}


# -----------------------------------------------------------------------------
# public API

def _sample(features, max_samples, seed, device):
    # Fit on at most max_samples frames, a seeded random subset of the frames of all ranks in rank order
    # (the same draw for every number of processes: the union of the ranks' subsets is the one-process subset).
    # Returns (this rank's sampled frames, number of frames of all ranks before sampling).
    rank = world()[0]
    sizes = _rank_sizes(len(features), device)
    total, offset, n = sum(sizes), sum(sizes[:rank]), len(features)
    if total <= max_samples:
        return features, total
    idx = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:max_samples].sort().values
    idx = idx[(idx >= offset) & (idx < offset + n)] - offset
    return features[idx.to(features.device)], total


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
    for start in range(0, len(feats), 4096):  # float32 sums of blocks added in float64: fast and precise
        total += feats[start:start + 4096].to(device).sum(0, dtype=torch.float32)
    n = torch.tensor(float(len(feats)), dtype=torch.float64, device=device)
    mean = (_all_reduce(total) / _all_reduce(n)).float()
    if not torch.isfinite(mean).all():
        raise ValueError("features contain NaN or inf")
    return mean


@_full_fp32
def fit_kmeans(features, ks=(64, 512, 4096), iters=20, init="k-means++", seed=0, tol=0.0, chunk_size=16384,
               max_samples=None, device=None, progress=True, prune_dims=None):
    """Fits one k-means per K in `ks` on the rows of `features` (N, D) and returns {K: KMeansResult}.

    init: "k-means++" (greedy, seeded), "random" (K distinct frames), or given centroids: a (K, D)
    tensor when there is one K, else {K: tensor}. tol > 0 stops a K once an iteration lowers its
    inertia by less than tol (relative). max_samples (default max(ks) x 1000): fit on a seeded random
    subset of that many frames. Under torch.distributed every rank passes its own shard of frames: the
    result is the one-process result on the shards concatenated in rank order (the same subsample, init
    and centroids), returned on every rank. prune_dims: dimensions of the projection bound of the pruned
    passes (None: 64 for features of at least 256 dimensions, else 0 = plain Lloyd); the result is the
    same either way, up to float32 ties.
    """
    features = _check_features(features)
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1 or len(set(ks)) != len(ks):
        raise ValueError(f"ks must be distinct positive integers, got {ks}")
    if iters < 0 or chunk_size < 1:
        raise ValueError(f"iters must be >= 0 and chunk_size >= 1, got {iters} and {chunk_size}")
    init = _check_init(init, ks, features.shape[1])
    device = _default_device(device)
    cap = max(ks) * 1000 if max_samples is None else int(max_samples)
    if cap < 1:
        raise ValueError(f"max_samples must be positive, got {max_samples}")

    dim = features.shape[1]
    if prune_dims is None:
        prune_dims = PROJ_DIMS if dim >= PROJ_MIN_DIM and iters > 1 else 0
    if not 0 <= prune_dims < dim:
        raise ValueError(f"prune_dims must be in [0, {dim}), got {prune_dims}")
    feats, total = _sample(features, cap, seed, device)
    feats = _stage(feats, device)
    frames = _Frames(feats, chunk_size, device, _frames_mean(feats, chunk_size, device))
    for k in ks:
        if k > frames.total:
            raise ValueError(f"cannot fit K={k} clusters to N={frames.total} frames"
                             f"{' (after max_samples)' if frames.total < total else ''}: K must be <= N")
    cents = {k: _init_centroids(frames, k, init[k], seed) for k in ks}
    if frames.total < 4 * (prune_dims + _Projection.OVERSAMPLE):
        prune_dims = 0  # too few frames for the bounds to pay (or for the projection's sample)
    history, counts, settled = _lloyd(frames, cents, iters, tol, progress, prune_dims, seed)
    return {k: KMeansResult((cents[k] + frames.shift).cpu(), history[k], counts[k].cpu(), settled[k]) for k in ks}


@_full_fp32
def assign(features, centroids, chunk_size=16384, device=None):
    """Label (N,) long, on CPU, of the nearest centroid of every row of `features`."""
    features = _check_features(features)
    if centroids.dim() != 2 or centroids.shape[1] != features.shape[1]:
        raise ValueError(f"centroids {tuple(centroids.shape)} do not match features of dimension {features.shape[1]}")
    device = _default_device(device)
    c = centroids.to(device, torch.float32)
    shift = c.mean(0)  # any shift works; a central one is precise
    c = c - shift
    c_sq = (c * c).sum(1)
    labels = torch.empty(len(features), dtype=torch.long)
    buf = torch.empty(min(chunk_size, len(features)), features.shape[1], device=device)
    for start in range(0, len(features), chunk_size):  # one pass, one chunk in memory: fine for a memmap
        x = features[start:start + chunk_size].to(device, non_blocking=True)
        x = torch.sub(x, shift, out=buf[:len(x)])
        dmin, lab = torch.addmm(c_sq, x, c.T, alpha=-2).min(1)  # ||x||^2 is the same for every centroid
        if not torch.isfinite(dmin).all():
            raise ValueError("features contain NaN or inf")
        labels[start:start + len(x)] = lab.cpu()
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
def extract_features(model, utterances, layer, device, batch_seconds=200.0, progress=True, workers=2, out=None):
    """Every valid frame of every utterance, concatenated in utterance order: ((N, D) float16 on CPU,
    frame counts (U,) long). layer: a transformer layer 1..L, or None for the transformer output.

    out: a .npy path. The frames are then written there (float16, memory-mapped, each batch at its
    utterances' place) as they are computed, so memory holds one batch, and the returned (N, D) tensor
    reads that file. This needs model.frame_lengths (wav2vec 2.0 has it) to size the file beforehand."""
    import numpy as np
    from data import AudioDataset, BucketBatchSampler, collate  # here: data.py may import this file

    dataset = AudioDataset(utterances, classes=())  # full length; the emotion labels are not needed
    # Length-sorted batches of at most batch_seconds of padded audio: little padding, bounded memory.
    sampler = BucketBatchSampler(dataset.lengths, batch_size=max(1, len(dataset)), max_batch_seconds=batch_seconds,
                                 bucket=True, shuffle=False, drop_last=False)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                                         pin_memory=torch.device(device).type == "cuda")
    model = model.to(device).eval()
    frames, mm, starts = [None] * len(dataset), None, None
    if out is not None:
        if not hasattr(model, "frame_lengths"):
            raise ValueError("extract_features(out=...) needs model.frame_lengths to size the feature file")
        expected = model.frame_lengths(torch.tensor([u.num_samples for u in utterances], dtype=torch.long))
        expected = expected.cpu().long() if len(utterances) else torch.zeros(0, dtype=torch.long)
        starts = (torch.cumsum(expected, 0) - expected).tolist()
        dim = getattr(getattr(model, "cfg", None), "embed_dim", None)
        if not len(utterances) and dim is not None:  # an empty shard still gets a (0, D) file
            mm = np.lib.format.open_memmap(out, mode="w+", dtype=np.float16, shape=(0, dim))
    for batch in tqdm(loader, desc=f"features (layer {layer or 'last'})", disable=not progress):
        hidden, lengths = model(batch["wav"].to(device), batch["lengths"], layer=layer)  # lengths read on the host
        hidden, lengths = hidden.half().cpu(), lengths.tolist()  # float16: 1M frames x 768 = 1.5 GB
        if out is not None and mm is None:  # the feature dimension is known now
            mm = np.lib.format.open_memmap(out, mode="w+", dtype=np.float16,
                                           shape=(int(expected.sum()), hidden.shape[-1]))
        for row, i in enumerate(batch["indices"].tolist()):
            if out is None:
                frames[i] = hidden[row, :lengths[row]].clone()  # clone: do not keep the padded batch alive
                continue
            if lengths[row] != expected[i]:
                raise ValueError(f"{utterances[i].uid}: the model gave {lengths[row]} frames, "
                                 f"frame_lengths says {int(expected[i])}")
            mm[starts[i]:starts[i] + lengths[row]] = hidden[row, :lengths[row]].numpy()
    if out is None:
        counts = torch.tensor([len(f) for f in frames], dtype=torch.long)
        return (torch.cat(frames) if frames else torch.zeros(0, 0, dtype=torch.float16)), counts
    if mm is None:
        raise ValueError("no utterances and no model.cfg.embed_dim: cannot size an empty feature file")
    mm.flush()
    del mm
    return _open_features(out), expected


def _open_features(path):
    import warnings
    import numpy as np
    with warnings.catch_warnings():  # read-only memory map: torch warns that it is not writable; we never write
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.load(path, mmap_mode="r"))


def _shard_bounds(lengths, rank, world):
    """Contiguous utterance range [lo, hi) of `rank`, cut so that the ranks get similar amounts of audio."""
    cum = torch.cumsum(torch.as_tensor(lengths, dtype=torch.float64), 0)
    total = float(cum[-1]) if len(cum) else 0.0
    cut = lambda r: 0 if r == 0 else len(lengths) if r == world else int(torch.searchsorted(cum, total * r / world))
    return cut(rank), cut(rank + 1)


def pseudo_label_stage(model, utterances, layer, ks, iters, init, seed, device, out_path, meta, progress=True,
                       max_samples=None, feature_dir=None, batch_seconds=200.0, workers=2, chunk_size=16384):
    """P-TAPT's k-means stage: teacher features of `utterances`, k-means for every K in `ks`, one label
    per frame and K written to `out_path` (save_labels; the emotion NMI of each K printed), and returned
    as {K: (frames of all utterances,) long} in utterance order.

    One process, or torchrun (torch.distributed initialised by the caller): rank r extracts a contiguous
    shard of the utterances (cut by audio length), the k-means fit is the one-process fit of all frames
    (global sampling and init, all-reduced centroid sums), each rank labels its shard and the labels are
    gathered in utterance order; rank 0 writes out_path, every rank returns the full labels.

    feature_dir: write each rank's features to a float16 memory-mapped file there while extracting
    (memory: one batch), fit on the sampled frames (at most max_samples, default max(ks) x 1000, read
    into memory), label by streaming the file in chunks, and delete the file at the end. Without it the
    features are kept in memory (float16: 1.5 GB per million 768-dimensional frames)."""
    rank, world_size = world()
    device = _default_device(device)
    ks = [int(k) for k in ks]
    lo, hi = _shard_bounds([u.num_samples for u in utterances], rank, world_size)
    path = os.path.join(feature_dir, f"kmeans-features.rank{rank}.npy") if feature_dir else None
    feats = None
    try:
        feats, counts = extract_features(model, utterances[lo:hi], layer, device, batch_seconds,
                                         progress=progress and rank == 0, workers=workers, out=path)
        if world_size > 1:  # a rank with no utterance (more ranks than utterances) learns D from the others
            dim = int(_all_reduce_max(torch.tensor([feats.shape[1]], device=device)))
            if len(feats) == 0 and feats.shape[1] != dim:
                feats = torch.zeros(0, dim, dtype=torch.float16)
        counts = _gather_cat(counts, device)
        fits = fit_kmeans(feats, ks, iters, init, seed, chunk_size=chunk_size, max_samples=max_samples,
                          device=device, progress=progress)
        labels = {k: _gather_cat(assign(feats, fit.centroids, chunk_size, device).int(), device).long()
                  for k, fit in fits.items()}
        if rank == 0:
            nmi = {}
            names = sorted({u.label for u in utterances if getattr(u, "label", None) is not None})
            if names and all(getattr(u, "label", None) in names for u in utterances):
                emotions = [names.index(u.label) for u in utterances]
                for k in ks:  # the teacher's clusters should carry emotion
                    nmi[k] = emotion_nmi(labels[k], counts, emotions)
                    print(f"K={k}: NMI between pseudo-labels and emotion {nmi[k]:.4f}")
            cap = max(ks) * 1000 if max_samples is None else int(max_samples)
            save_labels(out_path, [u.uid for u in utterances], counts, labels, {
                **meta, "ks": ks, "iters": iters, "init": init if isinstance(init, str) else "given",
                "seed": seed, "max_samples": cap, "num_frames": int(counts.sum()),
                "num_fit_frames": int(next(iter(fits.values())).counts.sum()),
                "inertia": {k: fit.inertia for k, fit in fits.items()}, "nmi": nmi})
        if world_size > 1:
            dist.barrier()  # out_path exists on return, on every rank
    finally:
        if path is not None:
            del feats  # the memory map, before its file goes
            if os.path.exists(path):
                os.remove(path)
    return labels


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
