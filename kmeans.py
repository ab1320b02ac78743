"""k-means pseudo-labels for P-TAPT (RECIPE.md, "P-TAPT", step 2).

The teacher's frames of the fold's training sessions are clustered for K = 64, 512 and 4096 by 20
Lloyd iterations, each K on at most max(K) x 1000 randomly sampled frames; every frame of every
training utterance then gets its nearest centroid's label, one per K. The release used faiss on a
GPU, whose default init is K distinct random frames (init="random" here; the default is k-means++).
pretrain.py's pseudo_label_stage runs extract_features, fit_kmeans and assign, and saves the labels.

Lloyd as computed here (GPU first, the CPU works), every K reading the same chunk of frames:
- distances: ||x - c||^2 less ||x||^2 (the same for every c) is ||c||^2 - 2 x.c: one float32
  matmul (no TF32) per chunk and K, on frames translated by their mean (large shared offsets eat
  the digits that tell close centroids apart; scikit-learn translates too) with a column of ones
  that adds ||c||^2;
- update: centroid = mean of its frames, summed in float64; an empty cluster takes the frame
  farthest from its centroid (scikit-learn's rule);
- stop: after `iters` updates, when no label changes (scikit-learn's rule), or once an update
  lowers the inertia by less than `tol` (relative);
- init: greedy k-means++ (scikit-learn's variant) or K distinct random frames, each K from its own
  generator seeded with `seed`: a K fitted alone or with others gets the same centroids.
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

# Frames summed in float32 before they join the float64 sums, as float64 adds after every chunk are
# slow on the CPU; the groups are fixed, so any number of threads or ranks sums the same.
FLOAT32_FRAMES = 4096
INITS = ("k-means++", "random")


@contextlib.contextmanager
def no_tf32():
    """Full float32 matmuls and convolutions inside: TF32 would blur close distances."""
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
        n, after = min(len(x), cap), " (after max_samples)" if cap < len(x) else ""
        raise ValueError(f"cannot fit K={max(ks)} clusters to N={n} frames{after}: K must be <= N")
    if len(x) > cap:  # a seeded draw of which frames, kept in frame order
        drawn = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:cap]
        x = x[drawn.sort().values]
    with _threads(device) as threads:
        frames, cents = _Frames(x, device, chunk_size, threads, ks), {}
        for k, c in inits.items():  # translated as the frames are
            gen = torch.Generator().manual_seed(seed)  # on the CPU: the same on any device or rank
            if torch.is_tensor(c):
                cents[k] = c.to(frames.device, torch.float32) - frames.shift
            elif c == "random":  # K distinct random frames
                cents[k] = frames.rows(torch.randperm(len(frames.x), generator=gen)[:k])
            else:
                cents[k] = _kmeans_plusplus(frames, k, gen)
        history, counts = _lloyd(frames, cents, iters, tol, progress)
    fit = lambda k: KMeansResult((cents[k] + frames.shift).cpu(), history[k], counts[k].cpu())
    return {k: fit(k) for k in ks}


def _checked_inits(features, ks, init):
    """{K: "k-means++", "random" or its (K, D) centroids}, features and init checked."""
    if not (torch.is_tensor(features) and features.dim() == 2 and features.is_floating_point()):
        shape = getattr(features, "shape", type(features))
        raise ValueError(f"need 2-D floating-point features, got {shape}")
    if isinstance(init, str):
        inits = dict.fromkeys(ks, init)
    else:
        inits = {ks[0]: init} if torch.is_tensor(init) else init
    dim = features.shape[1]
    valid = lambda k, c: c in INITS if isinstance(c, str) else tuple(c.shape) == (k, dim)
    if sorted(inits) != sorted(ks) or not all(valid(k, c) for k, c in inits.items()):
        shape = f"centroids of shape (K, {dim})"
        raise ValueError(f"init must be 'k-means++', 'random' or {shape} for each K")
    return inits


def _weights(c):
    # (D + 1, K): a frame [x, 1] times it gives ||c||^2 - 2 x.c, its squared distances less ||x||^2
    return torch.cat([-2 * c, c.square().sum(1, keepdim=True)], 1).T.contiguous()


def _kmeans_plusplus(frames, k, gen):
    # scikit-learn's greedy k-means++: 2 + ln K candidates per step drawn ~ D^2, keep the one that
    # lowers the potential most; K passes over the frames
    sq = torch.cat([xa[:, :-1].square().sum(1) for _, xa in frames.chunks()])
    dists = lambda w: torch.cat([xa @ w for _, xa in frames.chunks()]).add_(sq[:, None]).clamp_(0)
    chosen = [frames.rows(torch.randint(len(sq), (1,), generator=gen))]
    closest = dists(_weights(chosen[0]))[:, 0]
    for _ in range(1, k):
        # float64: a float32 cumsum over millions of frames drifts
        cum = closest.cumsum(0, dtype=torch.float64)
        u = torch.rand(2 + int(math.log(k)), generator=gen, dtype=torch.float64).to(cum.device)
        drawn = torch.searchsorted(cum, u * cum[-1], right=True).clamp_(max=len(cum) - 1)
        candidates = frames.rows(drawn)
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
            sq_norms, h = c.square().sum(1), history[k]
            inertia = frames.sq_total - 2 * (sums_k * c).sum() + (counts[k] * sq_norms).sum()
            h.append(max(float(inertia), 0.0))
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
        distance = lambda s, xa: (xa[:, :-1] - c[labels[s : s + len(xa)]]).square_().sum(1)
        far = torch.cat([distance(s, xa) for s, xa in frames.chunks()])
        idx = far.topk(min(len(empty), len(far))).indices
        x, old, empty = frames.rows(idx).double(), labels[idx], empty[: len(idx)]
        sums = sums.index_add(0, old, -x)
        sizes.index_add_(0, old, -torch.ones_like(old))
        sums[empty], sizes[empty] = x, 1
    return torch.where(sizes[:, None] > 0, sums / sizes.clamp(min=1)[:, None], c.double()).float()


@no_tf32()
def assign(features, centroids, chunk_size=16384, device=None):
    """(N,) long on the CPU: each row of `features` (N, D)'s nearest centroid, by a Lloyd pass."""
    device, k = resolve_device(device or "auto"), len(centroids)
    if features.dim() != 2 or centroids.dim() != 2 or centroids.shape[1] != features.shape[1]:
        c, x = tuple(centroids.shape), tuple(features.shape)
        raise ValueError(f"centroids {c} do not match features {x}")
    c = centroids.to(device, torch.float32)
    labels = {k: torch.empty(len(features), dtype=torch.long, device=device)}
    with _threads(device) as threads:
        # any shift gives the same labels
        frames = _Frames(features, device, chunk_size, threads, [k], shift=c.mean(0))
        sums = frames.lloyd_pass({k: _weights(c - frames.shift)}, labels, split_ranks=False)
        if not torch.isfinite(sums[k]).all():
            raise ValueError("features contain NaN or inf")
    return labels[k].cpu()


# ============================================== engineering: threads, ranks, feature extraction


class _Frames:
    """Frames as given (float16, on the CPU for a GPU fit...), read in chunks made float32, less
    `shift` (default: their mean), with a column of ones; sq_total: the sum of their squared norms
    so translated. Each thread of the pool has its chunk and sum buffers, allocated once."""

    def __init__(self, x, device, chunk, threads, ks, shift=None):
        self.pool, num_threads = threads
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
        # read iters + 1 times: staged on the device when they fit
        self.x = x.to(device) if x.numel() * x.element_size() < free // 3 else x
        if device.type == "cpu":  # a chunk's distances to K centroids then fit a core's L2 cache
            chunk = min(chunk, 1024, max(256, 2**17 // max(ks)))
        self.device = device
        self.shift = torch.zeros(x.shape[1], device=device) if shift is None else shift
        self.buf = buf = torch.ones(max(1, min(chunk, len(x))), x.shape[1] + 1, device=device)
        zeros = lambda dtype: {k: buf.new_zeros(k, buf.shape[1], dtype=dtype) for k in ks}
        # per thread: chunk, distances, float32 group sums, float64 sums
        self.buffers = [
            (b, buf.new_empty(len(buf) * max(ks)), zeros(torch.float32), zeros(torch.float64))
            for b in [buf] + [torch.ones_like(buf) for _ in range(num_threads - 1)]
        ]
        self.group = max(1, FLOAT32_FRAMES // len(buf))  # chunks summed in float32
        if shift is None:
            s = buf.new_zeros(1, buf.shape[1], dtype=torch.float64)
            for _, xa in self.chunks(buf):  # column sums by a matmul: sum(0) is slower on the CPU
                s += xa.new_ones(1, len(xa)) @ xa
            if not torch.isfinite(s).all():  # a NaN frame would silently poison its centroid
                raise ValueError("features contain NaN or inf")
            self.shift = (s[0, :-1] / len(x)).float()
            # each pass's inertia then follows from its cluster sums
            squares = (xa[:, :-1].square().sum(dtype=torch.float64) for _, xa in self.chunks(buf))
            self.sq_total = sum(float(sq) for sq in squares)

    def rows(self, idx):
        return self.x[idx.to(self.x.device)].to(self.device).float() - self.shift

    def chunks(self, buf=None, numbers=None):
        """(start, view of buf (default self.buf): the chunk's frames translated, ones) for each
        chunk number in `numbers` (default: all) until the frames end; valid until the next."""
        buf = self.buf if buf is None else buf
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
                    d = torch.mm(xa, w, out=dists[: m * k].view(m, k))
                    lab = torch.argmin(d, 1, out=labels[k][start : start + m])
                    group_sums[k].index_add_(0, lab, xa)
            for k in weights:
                sums[k] += group_sums[k]
                group_sums[k].zero_()


@contextlib.contextmanager
def _threads(device):
    """(pool, size): one thread per core on the CPU (one on a GPU), torch single-threaded in them
    and meanwhile in the caller, as scikit-learn splits its Lloyd: torch's own threads meet at a
    barrier in every op, and with a busy neighbour every barrier waits for a descheduled thread."""
    threads, size = torch.get_num_threads(), torch.get_num_threads() if device.type == "cpu" else 1
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(size, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            yield pool, size
    finally:
        torch.set_num_threads(threads)


def gather_rows(t, device):
    """Every rank's rows of t in rank order, on every rank's CPU (t itself in one process)."""
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
    from data import AudioDataset, BucketBatchSampler, collate  # clustering alone needs no data.py

    device = resolve_device(device)
    dataset = AudioDataset(utterances, classes=())  # full length; the emotion labels are not needed
    # length-sorted batches of at most batch_seconds of padded audio: little padding, bounded memory
    sampler = BucketBatchSampler(
        dataset.lengths, max(1, len(dataset)), batch_seconds, shuffle=False, drop_last=False
    )
    pin = device.type == "cuda"
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers, pin_memory=pin
    )
    frames = [None] * len(dataset)
    for batch in tqdm(loader, desc="features", disable=not progress):
        hidden, lengths = features_of(batch["wav"].to(device, non_blocking=True), batch["lengths"])
        hidden, lengths = hidden.half().cpu(), lengths.tolist()
        for row, i in enumerate(batch["indices"].tolist()):
            frames[i] = hidden[row, : lengths[row]].clone()  # a view would keep the batch alive
    counts = torch.tensor([len(f) for f in frames], dtype=torch.long)
    return (torch.cat(frames) if frames else torch.zeros(0, 0, dtype=torch.float16)), counts
