"""k-means pseudo-labels for P-TAPT (RECIPE.md, "P-TAPT", step 2).

The method: the teacher's frame features of the fold's training sessions are clustered for K = 64,
512 and 4096 by 20 Lloyd iterations, each K fitted on at most max(K) x 1000 randomly sampled frames;
then every frame of every training utterance gets the label of its nearest centroid, one label per
K. The release used faiss on a GPU, whose default init is K distinct random frames (init="random"
here; the default is k-means++). pretrain.py's pseudo_label_stage runs these steps
(extract_features, fit_kmeans, assign) and writes the labels (data.save_labels).

Lloyd as computed here (GPU first, the CPU works), every K reading the same chunk of frames:
- distances: ||x - c||^2 less ||x||^2 (the same for every c) is ||c||^2 - 2 x.c: one float32 matmul
(no TF32)
  per chunk and K, on frames translated by their mean (features share large offsets, which eat the
  digits that tell close centroids apart; scikit-learn translates too) and given a column of ones
  that adds ||c||^2;
- update: centroid = mean of its frames, summed in float64; an empty cluster takes the frame
farthest from its
  centroid (scikit-learn's rule);
- stop: after `iters` updates, when no label changes (scikit-learn's rule), or once an update lowers
the
  inertia by less than `tol` (relative);
- init: greedy k-means++ (scikit-learn's variant) or K distinct random frames, each K from its own
generator
  seeded with `seed`: a K fitted alone or with others gets the same centroids.
"""

import contextlib
import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from train import resolve_device, world

# frames summed in float32 before they join the float64 sums: float64 adds after every chunk are
# slow on the CPU (BENCHMARKS.md); the groups are fixed, so any number of threads or ranks sums the
# same
FLOAT32_FRAMES = 4096


@contextlib.contextmanager
def no_tf32():
    """Full float32 matmuls and convolutions inside (TF32 keeps 10 mantissa bits: it would blur
    close distances)."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


# ============================================================================ the method


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # (K, D) float32 on the CPU
    # sum of squared distances to the nearest centroid, per pass: before each update, after the last
    inertia: list
    counts: torch.Tensor  # (K,) long: cluster sizes under the final centroids (fitted frames only)


@no_tf32()
def fit_kmeans(
    features,
    ks=(64, 512, 4096),
    iters=20,
    init="k-means++",
    seed=0,
    tol=0.0,
    chunk_size=16384,
    max_samples=None,
    device=None,
    progress=True,
):
    """One k-means per K in `ks` on the rows of `features` (N, D): {K: KMeansResult}. init:
    "k-means++", "random" or centroids ({K: (K, D) tensor}, or the tensor for a single K).
    max_samples (default max(ks) x 1000): fit on a seeded random subset. Memory besides the frames:
    about chunk_size x (D + max K) floats. Under torch.distributed each rank passes its shard and
    gets the fit of all shards in rank order."""
    ks, device = [int(k) for k in ks], resolve_device(device or "auto")
    inits = _checked_inits(features, ks, init)
    x, cap = gather_rows(features, device), max(ks) * 1000 if max_samples is None else max_samples
    if max(ks) > min(len(x), cap):
        raise ValueError(
            f"cannot fit K={max(ks)} clusters to N={min(len(x), cap)} frames"
            f"{' (after max_samples)' if cap < len(x) else ''}: K must be <= N"
        )
    x = _subsample(x, cap, seed)
    # on the CPU: the same draws on any device or rank
    gens = {k: torch.Generator().manual_seed(seed) for k in ks}
    with _threads(device) as threads:
        frames = _Frames(x, device, chunk_size, threads, ks)
        cents = {k: _initial_centroids(frames, k, c, gens[k]) for k, c in inits.items()}
        history, counts = _lloyd(frames, cents, iters, tol, progress)
    return {
        k: KMeansResult((cents[k] + frames.shift).cpu(), history[k], counts[k].cpu()) for k in ks
    }


def _checked_inits(features, ks, init):
    """{K: "k-means++", "random" or its (K, D) centroids}; a ValueError for features that are not
    2-D floating point, or an init that does not give every K."""
    if not (torch.is_tensor(features) and features.dim() == 2 and features.is_floating_point()):
        raise ValueError(
            f"need 2-D floating-point features, got {getattr(features, 'shape', type(features))}"
        )
    inits = (
        dict.fromkeys(ks, init)
        if isinstance(init, str)
        else {ks[0]: init}
        if torch.is_tensor(init)
        else init
    )
    if sorted(inits) != sorted(ks) or not all(
        c in ("k-means++", "random")
        if isinstance(c, str)
        else tuple(c.shape) == (k, features.shape[1])
        for k, c in inits.items()
    ):
        raise ValueError(
            f"init must be 'k-means++', 'random' or centroids of shape (K, {features.shape[1]}) "
            "for each K"
        )
    return inits


def _subsample(x, cap, seed):
    """At most `cap` of the frames, drawn with `seed`, kept in frame order: the draw decides which
    frames, not the order they are read in."""
    if len(x) <= cap:
        return x
    return x[
        torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:cap].sort().values
    ]


def _initial_centroids(frames, k, init, gen):
    """K centroids, translated as the frames are: given ones, K distinct random frames or
    k-means++."""
    if torch.is_tensor(init):
        return init.to(frames.device, torch.float32) - frames.shift
    if init == "random":
        return frames.rows(torch.randperm(len(frames.x), generator=gen)[:k])
    return _kmeans_plusplus(frames, k, gen)


def _weights(c):
    # (D + 1, K): a frame [x, 1] times it gives ||c||^2 - 2 x.c, its squared distances less its
    # ||x||^2
    return torch.cat([-2 * c, c.square().sum(1, keepdim=True)], 1).T.contiguous()


def _kmeans_plusplus(frames, k, gen):
    # scikit-learn's greedy k-means++: 2 + ln K candidates per step drawn ~ D^2, keep the one that
    # lowers the potential most; K passes over the frames
    sq = torch.cat([xa[:, :-1].square().sum(1) for _, xa in frames.chunks(frames.buf)])
    dists = lambda w: (
        torch.cat([xa @ w for _, xa in frames.chunks(frames.buf)]).add_(sq[:, None]).clamp_(min=0)
    )
    chosen = [frames.rows(torch.randint(len(sq), (1,), generator=gen))]
    closest = dists(_weights(chosen[0]))[:, 0]
    for _ in range(1, k):
        # float64: a float32 cumsum over millions of frames drifts
        cum = closest.cumsum(0, dtype=torch.float64)
        u = torch.rand(2 + int(math.log(k)), generator=gen, dtype=torch.float64).to(cum.device)
        candidates = frames.rows(
            torch.searchsorted(cum, u * cum[-1], right=True).clamp_(max=len(cum) - 1)
        )
        d = torch.minimum(dists(_weights(candidates)), closest[:, None])
        best = int(d.sum(0, dtype=torch.float64).argmin())
        closest = d[:, best].contiguous()
        chosen.append(candidates[best : best + 1])
    return torch.cat(chosen)


def _lloyd(frames, cents, iters, tol, progress):
    ks, history, counts, active = list(cents), {k: [] for k in cents}, {}, list(cents)
    labels = {k: torch.full((len(frames.x),), -1, device=frames.device) for k in ks}
    before = {k: torch.empty_like(labels[k]) for k in ks}  # the previous pass's labels
    for it in tqdm(range(iters + 1), desc="k-means", disable=not progress or world()[0] != 0):
        for k in active:
            labels[k], before[k] = before[k], labels[k]
        sums, still = frames.lloyd_pass({k: _weights(cents[k]) for k in active}, labels), []
        for k in active:
            c, sums_k, counts[k] = cents[k].double(), sums[k][:, :-1], sums[k][:, -1].round().long()
            # the pass's inertia from its cluster sums: no second look at the frames
            h = history[k]
            h.append(
                max(
                    float(
                        frames.sq_total
                        - 2 * (sums_k * c).sum()
                        + (counts[k] * c.square().sum(1)).sum()
                    ),
                    0.0,
                )
            )
            converged = it and torch.equal(labels[k], before[k])  # an update would change nothing
            if it == iters or converged or (tol > 0 and len(h) > 1 and h[-2] - h[-1] < tol * h[-2]):
                continue  # these centroids are final, and h[-1] is their inertia
            cents[k] = _update(frames, cents[k], labels[k], sums_k, counts[k].clone())
            still.append(k)
        active = still
        if not active:
            break
    return history, counts


def _update(frames, c, labels, sums, sizes):
    """Cluster means. Each empty cluster takes a frame farthest from its centroid (farthest first),
    which leaves its cluster, as scikit-learn does; a cluster left empty keeps its centroid."""
    empty = (sizes == 0).nonzero()[:, 0]
    if len(empty):
        far = torch.cat(
            [
                (xa[:, :-1] - c[labels[s : s + len(xa)]]).square_().sum(1)
                for s, xa in frames.chunks(frames.buf)
            ]
        )
        idx = far.topk(min(len(empty), len(far))).indices
        x, old, empty = frames.rows(idx).double(), labels[idx], empty[: len(idx)]
        sums = sums.index_add(0, old, -x)
        sizes.index_add_(0, old, -torch.ones_like(old))
        sums[empty], sizes[empty] = x, 1
    return torch.where(sizes[:, None] > 0, sums / sizes.clamp(min=1)[:, None], c.double()).float()


@no_tf32()
def assign(features, centroids, chunk_size=16384, device=None):
    """(N,) long on the CPU: the nearest centroid of every row of `features` (N, D), by one of
    Lloyd's passes."""
    device, k = resolve_device(device or "auto"), len(centroids)
    if features.dim() != 2 or centroids.dim() != 2 or centroids.shape[1] != features.shape[1]:
        raise ValueError(
            f"centroids {tuple(centroids.shape)} do not match features {tuple(features.shape)}"
        )
    c, labels = (
        centroids.to(device, torch.float32),
        {k: torch.empty(len(features), dtype=torch.long, device=device)},
    )
    with _threads(device) as threads:
        # any shift gives the same labels
        frames = _Frames(features, device, chunk_size, threads, [k], shift=c.mean(0))
        if not torch.isfinite(
            frames.lloyd_pass({k: _weights(c - frames.shift)}, labels, split_ranks=False)[k]
        ).all():
            raise ValueError("features contain NaN or inf")
    return labels[k].cpu()


# ================================================================ engineering: threads, ranks,
# feature extraction


class _Frames:
    """Frames as given (float16, on the CPU for a GPU fit...), read in chunks made float32, less
    `shift` (default: their mean), with a column of ones; sq_total: the sum of their squared norms
    so translated. Each thread of the pool has its chunk and sum buffers, allocated once for every
    pass."""

    def __init__(self, x, device, chunk, threads, ks, shift=None):
        (self.pool, num_threads), free = (
            threads,
            torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0,
        )
        # read iters + 1 times: staged on the device when they fit
        self.x = x.to(device) if x.numel() * x.element_size() < free // 3 else x
        # on the CPU a chunk's distances to K centroids fit a core's L2 cache (512 KB): faster
        # (BENCHMARKS.md)
        chunk = min(chunk, 1024, max(256, 2**17 // max(ks))) if device.type == "cpu" else chunk
        self.device, self.shift = (
            device,
            torch.zeros(x.shape[1], device=device) if shift is None else shift,
        )
        self.buf = buf = torch.ones(max(1, min(chunk, len(x))), x.shape[1] + 1, device=device)
        zeros = lambda dtype: {k: buf.new_zeros(k, buf.shape[1], dtype=dtype) for k in ks}
        self.buffers = [
            (
                buf if t == 0 else torch.ones_like(buf),
                buf.new_empty(len(buf) * max(ks)),
                zeros(torch.float32),
                zeros(torch.float64),
            )
            for t in range(num_threads)
        ]
        # chunks summed in float32 before the float64 sums
        self.group = max(1, FLOAT32_FRAMES // len(buf))
        if shift is None:
            s = buf.new_zeros(1, buf.shape[1], dtype=torch.float64)
            # column sums by a matmul: sum(0) is several times slower on the CPU
            for _, xa in self.chunks(buf):
                s += xa.new_ones(1, len(xa)) @ xa
            if not torch.isfinite(s).all():  # a NaN frame would silently poison its centroid
                raise ValueError("features contain NaN or inf")
            self.shift = (s[0, :-1] / len(x)).float()
            # each pass's inertia then follows from its cluster sums
            self.sq_total = sum(
                float(xa[:, :-1].square().sum(dtype=torch.float64)) for _, xa in self.chunks(buf)
            )

    def rows(self, idx):
        return self.x[idx.to(self.x.device)].to(self.device).float() - self.shift

    def chunks(self, buf, numbers=None):
        """(start, view of buf: the chunk's frames translated, ones) for each chunk number in
        `numbers` (default: every chunk in turn) until the frames end; valid until the next."""
        for start in (i * len(buf) for i in numbers or itertools.count()):
            if start >= len(self.x):
                return
            rows = self.x[start : start + len(buf)].to(self.device, non_blocking=True)
            torch.sub(rows, self.shift, out=buf[: len(rows), :-1])
            yield start, buf[: len(rows)]

    def lloyd_pass(self, weights, labels, split_ranks=True):
        """One Lloyd pass for {K: _weights(centroids)}: labels every frame (into labels[K]) and
        returns {K: (K, D + 1) float64 cluster sums, sizes in the last column}. The threads take
        groups of chunks in turn (one slowed by a neighbour takes fewer); with split_ranks each rank
        takes every world-size-th group, summed over ranks."""
        rank, size = world() if split_ranks else (0, 1)
        claim = itertools.count(rank, size)  # shared by the threads
        for k in weights if size > 1 else ():
            labels[k].zero_()  # each rank labels its own chunks: the sum over ranks completes them
        parts = list(self.pool.map(lambda b: self._share(weights, labels, claim, *b), self.buffers))
        for k in weights:
            for p in parts[1:]:
                parts[0][k] += p[k]
            if size > 1:
                dist.all_reduce(labels[k]), dist.all_reduce(parts[0][k])
        return parts[0]

    def _share(self, weights, labels, claim, buf, dists, group_sums, sums):
        for k in weights:
            sums[k].zero_()
        for g in claim:
            if g * self.group * len(buf) >= len(self.x):
                return sums
            for start, xa in self.chunks(buf, range(g * self.group, (g + 1) * self.group)):
                m = len(xa)
                for k, w in weights.items():
                    lab = torch.argmin(
                        torch.mm(xa, w, out=dists[: m * k].view(m, k)),
                        1,
                        out=labels[k][start : start + m],
                    )
                    group_sums[k].index_add_(0, lab, xa)
            for k in weights:
                sums[k] += group_sums[k]
                group_sums[k].zero_()


@contextlib.contextmanager
def _threads(device):
    """(pool, size): one thread per core on the CPU (one on a GPU), torch single-threaded in them
    and meanwhile in the caller, as scikit-learn splits its Lloyd: torch's own threads meet at a
    barrier in every op, and with a busy neighbour every barrier waits for a descheduled thread
    (BENCHMARKS.md)."""
    threads, size = torch.get_num_threads(), torch.get_num_threads() if device.type == "cpu" else 1
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(size, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            yield pool, size
    finally:
        torch.set_num_threads(threads)


def gather_rows(t, device):
    """The rows of t of every rank, concatenated in rank order, on the CPU of every rank (t itself
    in one process)."""
    if world()[1] == 1:
        return t
    sizes = torch.zeros(world()[1], dtype=torch.long, device=device)
    sizes[world()[0]] = len(t)
    dist.all_reduce(sizes)
    buf = torch.zeros((int(sizes.max()),) + t.shape[1:], dtype=t.dtype, device=device)
    buf[: len(t)] = t
    parts = [torch.empty_like(buf) for _ in sizes]
    dist.all_gather(parts, buf)
    return torch.cat([p[:n] for p, n in zip(parts, sizes.tolist())]).cpu()


@torch.no_grad()
def extract_features(
    features_of, utterances, device, batch_seconds=200.0, progress=True, workers=2
):
    """Every valid frame of every utterance, in utterance order: (N, D) float16 on the CPU (1.5 GB
    per million 768-dimensional frames) and frame counts (U,) long. features_of(wav (B, T) on
    device, lengths (B,) on the CPU) -> (features (B, F, D), frame lengths (B,)), e.g. lambda wav,
    n: model(wav, n, layer=layer)."""
    from data import (  # here: clustering alone needs no data.py
        AudioDataset,
        BucketBatchSampler,
        collate,
    )

    device = resolve_device(device)
    dataset = AudioDataset(utterances, classes=())  # full length; the emotion labels are not needed
    # length-sorted batches of at most batch_seconds of padded audio: little padding, bounded memory
    sampler = BucketBatchSampler(
        dataset.lengths, max(1, len(dataset)), batch_seconds, shuffle=False, drop_last=False
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    frames = [None] * len(dataset)
    for batch in tqdm(loader, desc="features", disable=not progress):
        hidden, lengths = features_of(batch["wav"].to(device, non_blocking=True), batch["lengths"])
        hidden, lengths = hidden.half().cpu(), lengths.tolist()
        for row, i in enumerate(batch["indices"].tolist()):
            # a copy: a view would keep the padded batch alive
            frames[i] = hidden[row, : lengths[row]].clone()
    counts = torch.tensor([len(f) for f in frames], dtype=torch.long)
    return (torch.cat(frames) if frames else torch.zeros(0, 0, dtype=torch.float16)), counts
