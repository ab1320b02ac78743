"""k-means pseudo-labels for P-TAPT (RECIPE.md, "P-TAPT" step 2).

The method: the teacher's frame features of the fold's training sessions are clustered for K = 64, 512 and
4096 by 20 Lloyd iterations, each K fitted on at most max(K) x 1000 randomly sampled frames; then every frame
of every training utterance gets the label of its nearest centroid, one label per K. The release used faiss
on a GPU, whose default init is K distinct random frames (init="random" here).

Lloyd as computed here (GPU first, the CPU works): squared distances ||x||^2 - 2 x.c + ||c||^2 by one matmul
per chunk of frames, in float32, on frames translated by their mean (features share large offsets, which eat
the digits that tell close centroids apart; scikit-learn translates too); cluster sums in float64; all K
share each chunk read. A K stops after `iters` updates, when no label changes (as scikit-learn stops) or when
an update lowers its inertia by less than `tol` (relative). An empty cluster takes the frame farthest from
its centroid (scikit-learn's rule). init "k-means++" is scikit-learn's greedy variant. Each K draws from its
own generator seeded with `seed`, so a K fitted alone or with others gets the same centroids.
"""
import argparse
import contextlib
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from model import SAMPLE_RATE, resolve_device, save_atomic, world

CPU_BLOCK = 2048  # frames per chunk on the CPU, where chunk buffers that stay in cache measured fastest


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # (K, D) float32 on the CPU
    inertia: list  # sum of squared distances to the nearest centroid, per pass: before each update, after the last
    counts: torch.Tensor  # (K,) long: cluster sizes under the final centroids (fitted frames only)


@contextlib.contextmanager
def no_tf32():
    """Full float32 matmuls and convolutions inside, restored afterwards (TF32 keeps 10 mantissa bits: on a
    GPU it would blur close distances). Also a decorator."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


# ============================================================================ the method

class _Frames:
    """This rank's frames as given (float16, on the CPU for a GPU fit...), after the subsample, read in chunks
    made float32 and centred in one buffer allocated once (fresh large CPU buffers cost page faults on every
    chunk). Under torch.distributed, `offset` places them among all ranks' frames in rank order."""

    def __init__(self, x, cap, seed, block, device):
        self.device, self.rank = device, world()[0]
        sizes = _gather(torch.tensor([len(x)], device=device))[:, 0].tolist()
        self.sampled_from = sum(sizes)
        if sum(sizes) > cap:  # one draw over all ranks' frames: each rank keeps its part of the one-process draw
            off, gen = sum(sizes[:self.rank]), torch.Generator().manual_seed(seed)
            idx = torch.randperm(sum(sizes), generator=gen)[:cap].sort().values
            x = x[(idx[(idx >= off) & (idx < off + len(x))] - off).to(x.device)]
            sizes = _gather(torch.tensor([len(x)], device=device))[:, 0].tolist()
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
        self.x = x.to(device) if x.numel() * x.element_size() < free // 3 else x  # read iters + 1 times: stage them
        self.offset, self.total = sum(sizes[:self.rank]), sum(sizes)
        self.buf = torch.empty(max(1, min(block, len(x))), x.shape[1], device=device)
        # the mean: a chunk's column sums in float32 by a matmul (sum(0) is several times slower on the CPU),
        # float64 across chunks and ranks
        s = torch.zeros(1, x.shape[1], dtype=torch.float64, device=device)
        ones = torch.ones(1, len(self.buf), device=device)
        for start in range(0, len(x), len(self.buf)):
            rows = self.x[start:start + len(self.buf)].to(device, non_blocking=True)
            s += ones[:, :len(rows)] @ self.buf[:len(rows)].copy_(rows)
        if not torch.isfinite(_sum(s)).all():  # a NaN frame would silently poison its centroid
            raise ValueError("features contain NaN or inf")
        self.shift, sq = (s[0] / max(self.total, 1)).float(), torch.zeros((), dtype=torch.float64, device=device)
        for _, xc in self.chunks():  # sum ||x - shift||^2 for the inertia, from the frames as Lloyd sees them
            sq += torch.linalg.vector_norm(xc, dim=1).square().sum(dtype=torch.float64)
        self.sq_total = float(_sum(sq))

    def chunks(self):
        for start in range(0, len(self.x), len(self.buf)):
            rows = self.x[start:start + len(self.buf)].to(self.device, non_blocking=True)
            yield start, torch.sub(rows, self.shift, out=self.buf[:len(rows)])

    def fetch(self, gidx, source=None):
        """source[i] (default: centred frame i) for indices into all ranks' frames, on every rank: each rank
        fills the entries it holds, a sum over ranks completes them (x + 0 is exact)."""
        local = gidx.to(self.device) - self.offset
        mine = (local >= 0) & (local < len(self.x))
        got = (torch.sub(self.x[local[mine].to(self.x.device)].to(self.device), self.shift).float()
               if source is None else source[local[mine]])
        out = torch.zeros((len(gidx),) + got.shape[1:], dtype=got.dtype, device=self.device)
        out[mine] = got
        return _sum(out)

    def draw(self, weights, u):
        """Indices into all ranks' frames drawn ~ weights (this rank's part) for uniform numbers u (the same on
        every rank): a search in the cumulative sum of all ranks' weights, as one process would search it."""
        cum = weights.cumsum(0, dtype=torch.float64)  # a float32 cumsum over millions of frames drifts
        part = _gather(cum[-1:] if len(cum) else cum.new_zeros(1))[:, 0]
        ends = part.cumsum(0)
        r = u.to(self.device) * ends[-1]
        owner = torch.searchsorted(ends, r, right=True).clamp_(max=len(ends) - 1)
        local = torch.searchsorted(cum, r - ends[self.rank] + part[self.rank], right=True).clamp_(max=len(cum) - 1)
        return _sum(torch.where(owner == self.rank, local + self.offset, 0))


def _kmeans_plusplus(frames, k, gen):
    # scikit-learn's greedy k-means++: 2 + ln K candidates per step drawn ~ D^2, keep the one that lowers the
    # potential most; K passes over the frames
    n, trials, device = len(frames.x), 2 + int(math.log(k)), frames.device
    sq = torch.empty(n, device=device)
    for s, x in frames.chunks():
        sq[s:s + len(x)] = torch.linalg.vector_norm(x, dim=1) ** 2

    def dists(points):
        out, p_sq = torch.empty(n, len(points), device=device), points.square().sum(1)
        for s, x in frames.chunks():
            torch.addmm(p_sq, x, points.T, alpha=-2, out=out[s:s + len(x)]).add_(sq[s:s + len(x), None]).clamp_(min=0)
        return out

    chosen = [frames.fetch(torch.randint(frames.total, (1,), generator=gen))]
    closest = dists(chosen[0])[:, 0]
    for _ in range(1, k):
        candidates = frames.fetch(frames.draw(closest, torch.rand(trials, generator=gen, dtype=torch.float64)))
        d = torch.minimum(dists(candidates), closest[:, None])
        best = int(_sum(d.sum(0, dtype=torch.float64)).argmin())
        closest = d[:, best].contiguous()
        chosen.append(candidates[best:best + 1])
    return torch.cat(chosen)


def _lloyd(frames, cents, iters, tol, progress):
    ks, n, dim, device = list(cents), len(frames.x), frames.x.shape[1], frames.device
    dbuf = torch.empty(len(frames.buf) * max(ks), device=device)  # any K's distances of a chunk, allocated once
    ones = torch.ones(len(frames.buf), dtype=torch.long, device=device)
    part = {k: torch.empty(k, dim, device=device) for k in ks}  # a chunk's cluster sums: float32, then float64
    labels = {k: torch.full((n,), -1, dtype=torch.long, device=device) for k in ks}
    history, counts, active = {k: [] for k in ks}, {}, list(ks)
    for it in tqdm(range(iters + 1), desc="k-means", disable=not progress or world()[0] != 0):
        sums = {k: torch.zeros(k, dim, dtype=torch.float64, device=device) for k in active}
        sizes = {k: torch.zeros(k, dtype=torch.long, device=device) for k in active}
        moved = {k: torch.zeros((), dtype=torch.long, device=device) for k in active}
        w = {k: (cents[k].square().sum(1), cents[k].T) for k in active}
        for s, x in frames.chunks():
            m = len(x)
            for k in active:
                lab = torch.addmm(w[k][0], x, w[k][1], alpha=-2, out=dbuf[:m * k].view(m, k)).argmin(1)
                moved[k] += (lab != labels[k][s:s + m]).sum()
                labels[k][s:s + m] = lab
                sums[k] += part[k].zero_().index_add_(0, lab, x)
                sizes[k].index_add_(0, lab, ones[:m])
        still = []
        for k in active:
            sums_k, counts[k], c = _sum(sums[k]), _sum(sizes[k]), cents[k].double()
            # the pass's inertia from its cluster sums: no second look at the frames
            history[k].append(max(float(frames.sq_total - 2 * (sums_k * c).sum()
                                        + (counts[k] * c.square().sum(1)).sum()), 0.0))
            h = history[k]
            converged = it and not int(_sum(moved[k]))  # no label changed: the update would change nothing
            if it == iters or converged or (tol > 0 and len(h) > 1 and h[-2] - h[-1] < tol * h[-2]):
                continue  # these centroids are final, and h[-1] is their inertia
            cents[k] = _update(frames, cents[k], labels[k], sums_k, counts[k].clone())
            still.append(k)
        active = still
        if not active:
            break
    return history, counts


def _update(frames, c, labels, sums, sizes):
    """Cluster means. Each empty cluster takes a frame farthest from its centroid (farthest first), which leaves
    its cluster, as scikit-learn does; a cluster left empty keeps its centroid."""
    empty = (sizes == 0).nonzero()[:, 0]
    if len(empty):
        far = torch.empty(len(frames.x), device=frames.device)
        for s, x in frames.chunks():
            far[s:s + len(x)] = (x - c[labels[s:s + len(x)]]).square_().sum(1)
        top = far.topk(min(len(empty), len(far)))
        pad = len(empty) - len(top.indices)  # every rank offers len(empty): a fixed-size gather
        d = _gather(torch.cat([top.values, far.new_full((pad,), -1.0)])).flatten()
        gidx = _gather(torch.cat([top.indices + frames.offset, top.indices.new_zeros(pad)])).flatten()
        gidx = gidx[d.topk(min(len(empty), frames.total)).indices]
        x, old, empty = frames.fetch(gidx).double(), frames.fetch(gidx, labels), empty[:len(gidx)]
        sums = sums.index_add(0, old, -x)
        sizes.index_add_(0, old, -torch.ones_like(old))
        sums[empty], sizes[empty] = x, 1
    return torch.where(sizes[:, None] > 0, sums / sizes.clamp(min=1)[:, None], c.double()).float()


@no_tf32()
def fit_kmeans(features, ks=(64, 512, 4096), iters=20, init="k-means++", seed=0, tol=0.0, chunk_size=16384,
               max_samples=None, device=None, progress=True):
    """One k-means per K in `ks` on the rows of `features` (N, D): {K: KMeansResult}. init: "k-means++",
    "random" or centroids ({K: (K, D) tensor}, or the tensor for a single K). max_samples (default max(ks) x
    1000): fit on a seeded random subset. Memory besides the frames: about chunk_size x (D + max K) floats."""
    ks, device = [int(k) for k in ks], resolve_device(device or "auto")
    if not torch.is_tensor(features) or features.dim() != 2 or not features.is_floating_point():
        raise ValueError(f"features must be a 2-D (frames, dims) floating-point tensor, got "
                         f"{getattr(features, 'dtype', type(features))} {tuple(getattr(features, 'shape', ()))}")
    if not ks or min(ks) < 1 or len(set(ks)) != len(ks) or iters < 0 or chunk_size < 1 or (max_samples or 1) < 1:
        raise ValueError(f"need distinct ks >= 1, iters >= 0, chunk_size >= 1, max_samples >= 1: got ks={ks}, "
                         f"iters={iters}, chunk_size={chunk_size}, max_samples={max_samples}")
    if isinstance(init, str) and init not in ("k-means++", "random"):
        raise ValueError(f"init must be 'k-means++', 'random' or centroids, got {init!r}")
    inits = dict.fromkeys(ks, init) if isinstance(init, str) else {ks[0]: init} if torch.is_tensor(init) else init
    if not isinstance(inits, dict) or sorted(inits) != sorted(ks) or not all(
            isinstance(c, str) or tuple(c.shape) == (k, features.shape[1]) for k, c in inits.items()):
        raise ValueError(f"init centroids must have shape (K, {features.shape[1]}) for each K in {ks}")
    block = min(chunk_size, CPU_BLOCK) if device.type == "cpu" else chunk_size
    frames = _Frames(features, max(ks) * 1000 if max_samples is None else max_samples, seed, block, device)
    if max(ks) > frames.total:
        raise ValueError(f"cannot fit K={max(ks)} clusters to N={frames.total} frames"
                         f"{' (after max_samples)' if frames.total < frames.sampled_from else ''}: K must be <= N")
    gens = {k: torch.Generator().manual_seed(seed) for k in ks}  # on the CPU: the same draws on any device or rank
    cents = {k: c.to(device, torch.float32) - frames.shift if torch.is_tensor(c)
             else frames.fetch(torch.randperm(frames.total, generator=gens[k])[:k]) if c == "random"
             else _kmeans_plusplus(frames, k, gens[k]) for k, c in inits.items()}
    history, counts = _lloyd(frames, cents, iters, tol, progress)
    return {k: KMeansResult((cents[k] + frames.shift).cpu(), history[k], counts[k].cpu()) for k in ks}


@no_tf32()
def assign(features, centroids, chunk_size=16384, device=None):
    """(N,) long on the CPU: the nearest centroid of every row of `features`."""
    device = resolve_device(device or "auto")
    if features.dim() != 2 or centroids.dim() != 2 or centroids.shape[1] != features.shape[1]:
        raise ValueError(f"centroids {tuple(centroids.shape)} do not match features {tuple(features.shape)}")
    c = centroids.to(device, torch.float32)
    shift = c.mean(0)  # any shift gives the same labels; a central one keeps the digits
    c, block = c - shift, min(chunk_size, CPU_BLOCK) if device.type == "cpu" else chunk_size
    c_sq, buf = c.square().sum(1), torch.empty(max(1, min(block, len(features))), c.shape[1], device=device)
    dbuf, bad = torch.empty(len(buf), len(c), device=device), torch.zeros((), dtype=torch.long, device=device)
    labels = torch.empty(len(features), dtype=torch.long, device=device)
    for start in range(0, len(features), len(buf)):
        rows = features[start:start + len(buf)].to(device, non_blocking=True)
        x = torch.sub(rows, shift, out=buf[:len(rows)])
        dmin, labels[start:start + len(x)] = torch.addmm(c_sq, x, c.T, alpha=-2, out=dbuf[:len(x)]).min(1)
        bad += (~torch.isfinite(dmin)).sum()  # checked once at the end: no wait for the GPU per chunk
    if bad:
        raise ValueError("features contain NaN or inf")
    return labels.cpu()


# ============================================================================ engineering: ranks, files, command line
# Under torch.distributed each rank passes its shard of frames to fit_kmeans; the subsample and the init draw
# indices into all ranks' frames in rank order and cluster sums are all-reduced, so every rank ends with the
# one-process fit of the shards concatenated in rank order.

def _sum(t):
    if world()[1] > 1:
        dist.all_reduce(t)
    return t


def _gather(t):
    """(world size, *t.shape): t of every rank, in rank order."""
    if world()[1] == 1:
        return t[None]
    parts = [torch.empty_like(t) for _ in range(world()[1])]
    dist.all_gather(parts, t.contiguous())
    return torch.stack(parts)


def _gather_cat(t, device):
    """1-D tensors of any length from every rank, concatenated in rank order, on the CPU of every rank."""
    sizes = _gather(torch.tensor([len(t)], device=device))[:, 0].tolist()
    buf = torch.zeros(max(sizes), dtype=t.dtype, device=device)
    buf[:len(t)] = t
    return torch.cat([p[:n] for p, n in zip(_gather(buf), sizes)]).cpu()


@torch.no_grad()
def extract_features(features_of, utterances, device, batch_seconds=200.0, progress=True, workers=2):
    """Every valid frame of every utterance, in utterance order: (N, D) float16 on the CPU (1.5 GB per million
    768-dimensional frames) and frame counts (U,) long. features_of(wav (B, T) on device, lengths (B,) on the
    CPU) -> (features (B, F, D), frame lengths (B,)), e.g. lambda wav, n: model(wav, n, layer=layer)."""
    from data import AudioDataset, BucketBatchSampler, collate  # here: clustering alone needs no data.py
    device = resolve_device(device)
    dataset = AudioDataset(utterances, classes=())  # full length; the emotion labels are not needed
    # length-sorted batches of at most batch_seconds of padded audio: little padding, bounded memory
    sampler = BucketBatchSampler(dataset.lengths, max(1, len(dataset)), batch_seconds, shuffle=False, drop_last=False)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    frames = [None] * len(dataset)
    for batch in tqdm(loader, desc="features", disable=not progress):
        hidden, lengths = features_of(batch["wav"].to(device, non_blocking=True), batch["lengths"])
        hidden, lengths = hidden.half().cpu(), lengths.tolist()
        for row, i in enumerate(batch["indices"].tolist()):
            frames[i] = hidden[row, :lengths[row]].clone()  # a copy: a view would keep the padded batch alive
    counts = torch.tensor([len(f) for f in frames], dtype=torch.long)
    return (torch.cat(frames) if frames else torch.zeros(0, 0, dtype=torch.float16)), counts


def pseudo_label_stage(features_of, utterances, ks, iters, init, seed, device, out_path, meta, progress=True,
                       max_samples=None, workers=2, tol=0.0, chunk_size=16384, batch_seconds=200.0, centroids=None,
                       centroids_path=None):
    """P-TAPT's k-means stage: the frames of `utterances` (extract_features), fit_kmeans for every K (or the
    given {K: centroids}), every frame labelled, written to out_path (save_labels; meta gains the settings,
    the inertia and each K's NMI with emotion, printed) and returned as {K: (frames,) long}; the centroids to
    centroids_path if given. Under torch.distributed every rank calls it: each extracts a contiguous shard of
    the utterances (cut by audio length), the fit is the one-process fit, rank 0 writes, all return all."""
    rank, size = world()
    device = resolve_device(device)
    cum = torch.tensor([u.num_samples for u in utterances], dtype=torch.float64).cumsum(0)
    cut = [0] + [int(torch.searchsorted(cum, cum[-1] * r / size)) for r in range(1, size)] + [len(utterances)]
    feats, counts = extract_features(features_of, utterances[cut[rank]:cut[rank + 1]], device, batch_seconds,
                                     progress and rank == 0, workers)
    dim = int(_gather(torch.tensor([feats.shape[1]], device=device)).max())  # a rank without frames learns D
    feats = feats if len(feats) else torch.zeros(0, dim, dtype=torch.float16)
    fits = (fit_kmeans(feats, ks, iters, init, seed, tol, chunk_size, max_samples, device, progress)
            if centroids is None else {int(k): KMeansResult(c, [], None) for k, c in centroids.items()})
    labels = {k: _gather_cat(assign(feats, f.centroids, chunk_size, device).to(device), device)
              for k, f in fits.items()}
    counts = _gather_cat(counts.to(device), device)
    if rank == 0:
        names = sorted({str(u.label) for u in utterances})
        nmi = {k: emotion_nmi(labels[k], counts, [names.index(str(u.label)) for u in utterances]) for k in fits}
        meta = {**meta, "num_frames": int(counts.sum()), "hours": float(cum[-1]) / SAMPLE_RATE / 3600, "nmi": nmi}
        if centroids is None:
            meta.update(ks=list(fits), iters=iters, init=init if isinstance(init, str) else "given", seed=seed,
                        tol=tol, max_samples=max(fits) * 1000 if max_samples is None else max_samples,
                        num_fit_frames=int(fits[max(fits)].counts.sum()),
                        inertia={k: f.inertia for k, f in fits.items()})
        for k, f in fits.items():
            fitted = (f", inertia {f.inertia[0]:.5g} -> {f.inertia[-1]:.5g} in {len(f.inertia) - 1} updates, "
                      f"{int((f.counts > 0).sum())}/{k} clusters used") if f.inertia else ""
            print(f"K={k}: NMI between pseudo-labels and emotion {nmi[k]:.4f}{fitted}")
        save_labels(out_path, [u.uid for u in utterances], counts, labels, meta)
        if centroids_path:
            save_centroids(centroids_path, {k: f.centroids for k, f in fits.items()}, meta)
    if size > 1:
        dist.barrier()  # the files exist on return, on every rank
    return labels


# The pseudo-label file: {"uids": [str], "frame_counts": (U,) long, "labels": {K: (sum of counts,) int}, "meta": {}}

def _validate_labels(content, path):
    """{uid: (first frame, frame count)}; anything inconsistent is a ValueError naming the file."""
    def check(ok, problem):
        if not ok:
            raise ValueError(f"{path}: invalid pseudo-label file: {problem}")

    check(isinstance(content, dict) and {"uids", "frame_counts", "labels", "meta"} <= set(content),
          "expected a dict with keys uids, frame_counts, labels, meta")
    uids, counts, labels = content["uids"], content["frame_counts"], content["labels"]
    check(isinstance(uids, list) and all(isinstance(u, str) for u in uids) and len(set(uids)) == len(uids),
          "uids must be a list of distinct strings")
    check(torch.is_tensor(counts) and counts.dim() == 1 and counts.dtype == torch.long and bool((counts >= 0).all()),
          "frame_counts must be a 1-D long tensor of counts >= 0")
    check(len(counts) == len(uids), f"{len(uids)} uids but {len(counts)} frame counts")
    check(isinstance(labels, dict) and labels and isinstance(content["meta"], dict),
          "labels must be a non-empty dict {K: tensor} and meta a dict")
    for k, lab in labels.items():
        check(isinstance(k, int) and k > 0 and torch.is_tensor(lab) and lab.dim() == 1 and not lab.is_floating_point(),
              f"labels[{k!r}] must be a 1-D integer tensor under an integer K > 0")
        check(len(lab) == int(counts.sum()), f"labels[{k}] has {len(lab)} entries but frame_counts sum to "
                                             f"{int(counts.sum())}")
        check(not len(lab) or 0 <= lab.min() <= lab.max() < k, f"labels[{k}] has values outside [0, {k})")
    return {u: (s, c) for u, s, c in zip(uids, (counts.cumsum(0) - counts).tolist(), counts.tolist())}


def save_labels(path, uids, frame_counts, labels, meta):
    """Writes the labels of the frames of `uids`, concatenated in uid order, atomically: never a file that
    load_labels would refuse, in int16 when K allows (half the file, half P-TAPT's memory)."""
    content = {"uids": [str(u) for u in uids], "frame_counts": torch.as_tensor(frame_counts, dtype=torch.long).cpu(),
               "labels": {int(k): torch.as_tensor(v).cpu() for k, v in labels.items()}, "meta": dict(meta)}
    _validate_labels(content, path)
    content["labels"] = {k: v.to(torch.int16 if k <= 32767 else torch.int32) for k, v in content["labels"].items()}
    save_atomic(content, path)


def _load(path, what):
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # a truncated or foreign file: torch raises many different things
        raise ValueError(f"{path}: not a readable {what} file ({type(e).__name__}: {e})") from e


def load_labels(path):
    """A checked pseudo-label file, plus "index": {uid: (first frame, frame count)} and "path"."""
    content = _load(path, "pseudo-label")
    index = _validate_labels(content, path)
    return {**content, "index": index, "path": str(path)}


def labels_for(label_file, uid, num_frames):
    """{K: (num_frames,) long}: the pseudo-labels of one utterance of a load_labels() result."""
    path = label_file.get("path", "pseudo-label file")
    if uid not in label_file["index"]:
        raise ValueError(f"{path}: no pseudo-labels for utterance {uid}")
    start, count = label_file["index"][uid]
    if count != num_frames:
        raise ValueError(f"{path}: utterance {uid} has {count} pseudo-labels but {num_frames} frames were "
                         f"expected: pseudo-labels do not match the audio")
    return {k: v[start:start + count].long() for k, v in label_file["labels"].items()}


def emotion_nmi(labels, frame_counts, utterance_labels):
    """Normalised mutual information (arithmetic normalisation, scikit-learn's default) between frame labels
    and the emotion of each frame's utterance: how much emotion the clusters carry (0 to 1)."""
    emotion = torch.repeat_interleave(torch.as_tensor(utterance_labels), torch.as_tensor(frame_counts))
    labels = torch.as_tensor(labels).long()
    p = torch.zeros(int(labels.max()) + 1, int(emotion.max()) + 1, dtype=torch.float64)
    p = p.index_put_((labels, emotion), torch.ones(len(labels), dtype=torch.float64), accumulate=True) / len(labels)
    pa, pb, nz = p.sum(1), p.sum(0), p > 0
    mi = (p[nz] * (p[nz] / (pa[:, None] * pb[None, :])[nz]).log()).sum()
    ha, hb = (-(q[q > 0] * q[q > 0].log()).sum() for q in (pa, pb))
    return float(mi / ((ha + hb) / 2)) if ha + hb > 0 else 1.0


def save_centroids(path, centroids, meta):
    save_atomic({"centroids": {int(k): c.float().cpu() for k, c in centroids.items()}, "meta": dict(meta)}, path)


def load_centroids(path):
    content = _load(path, "centroids")
    cents = content.get("centroids") if isinstance(content, dict) else None
    if not isinstance(cents, dict) or not cents or not all(
            torch.is_tensor(c) and c.dim() == 2 and c.shape[0] == k for k, c in cents.items()):
        raise ValueError(f"{path}: invalid centroids file: expected "
                         f"{{'centroids': {{K: (K, D) tensor}}, 'meta': {{}}}}")
    return content


def run(args):
    """Both commands: pseudo_label_stage on the frames of a wav2vec 2.0 checkpoint's layer; `fit` fits on the
    train split (and writes OUT.centroids.pt), `assign` labels a split with centroids written by `fit`."""
    from data import load_corpus
    from model import load_wav2vec2
    outputs = [args.out] + ([args.out + ".centroids.pt"] if args.command == "fit" else [])
    for path in outputs:  # before the expensive part
        if os.path.exists(path) and not args.force:
            raise FileExistsError(f"{path} exists; pass --force to overwrite it")
    saved = load_centroids(args.centroids) if args.command == "assign" else {"centroids": None, "meta": {}}
    checkpoint = args.checkpoint or saved["meta"].get("checkpoint")
    layer = saved["meta"].get("layer") if args.layer is None else args.layer
    if not checkpoint:
        raise ValueError(f"{args.centroids} records no checkpoint: pass --checkpoint")
    splits, _ = load_corpus(args.data, args.fold, args.wav_dir)
    if args.split not in splits:
        raise ValueError(f"{args.data} has no {args.split!r} split (it has {sorted(splits)})")
    device = resolve_device(args.device)
    model = load_wav2vec2(checkpoint).to(device).eval()
    meta = {**saved["meta"], "checkpoint": os.path.abspath(checkpoint), "layer": layer,
            "data": os.path.abspath(args.data), "fold": args.fold, "split": args.split}
    pseudo_label_stage(lambda wav, n: model(wav, n, layer=layer), splits[args.split], args.ks, args.iters, args.init,
                       args.seed, device, args.out, meta, args.progress, args.max_samples, args.workers, args.tol,
                       args.chunk_size, args.batch_seconds, saved["centroids"], outputs[1] if outputs[1:] else None)
    print("wrote " + " and ".join(outputs))


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every other error of this script
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser():
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    fit = sub.add_parser("fit", formatter_class=fmt, help="fit k-means on the train split's frames, label them all")
    asg = sub.add_parser("assign", formatter_class=fmt, help="label the frames of a split with centroids saved by fit")
    fit.set_defaults(split="train")
    asg.set_defaults(ks=None, iters=0, init=None, seed=0, tol=0.0, max_samples=None)  # no fit
    fit.add_argument("--checkpoint", required=True, help="teacher: a wav2vec 2.0 checkpoint (fairseq or this project)")
    fit.add_argument("--layer", type=int, default=None, help="transformer layer 1..L to cluster; None: the output")
    fit.add_argument("--ks", type=int, nargs="+", default=[64, 512, 4096], help="numbers of clusters (RECIPE.md)")
    fit.add_argument("--iters", type=int, default=20, help="Lloyd iterations (the release: 20)")
    fit.add_argument("--init", choices=["k-means++", "random"], default="k-means++",
                     help="greedy k-means++ (K passes over the frames: use a GPU) or random frames (the release's)")
    fit.add_argument("--seed", type=int, default=0, help="seed of the init and of the frame subsample")
    fit.add_argument("--tol", type=float, default=0.0, help="also stop a K once an update lowers its inertia by less "
                                                            "than this fraction")
    fit.add_argument("--max-samples", type=int, default=None, help="fit on at most this many random frames; None: "
                                                                   "max(ks) x 1000 (the release)")
    fit.add_argument("--out", required=True, help="pseudo-label file to write; centroids go to OUT.centroids.pt")
    asg.add_argument("--centroids", required=True, help="OUT.centroids.pt written by 'fit'")
    asg.add_argument("--checkpoint", default=None, help="teacher checkpoint; None: the one recorded by 'fit'")
    asg.add_argument("--layer", type=int, default=None, help="None: the layer recorded by 'fit'")
    asg.add_argument("--split", default="test", help="split of the corpus to label: train, val or test")
    asg.add_argument("--out", required=True, help="pseudo-label file to write")
    for q in (fit, asg):
        q.add_argument("--data", required=True, help="IEMOCAP_full_release folder, a label .json or a .csv manifest")
        q.add_argument("--fold", type=int, default=None, help="IEMOCAP test session 1-5 (ignored for .json/.csv)")
        q.add_argument("--wav-dir", default=None, help="folder of the wavs named in a label .json")
        q.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
        q.add_argument("--batch-seconds", type=float, default=200.0, help="padded audio per feature batch")
        q.add_argument("--workers", type=int, default=2, help="data loader processes")
        q.add_argument("--chunk-size", type=int, default=16384, help="frames per k-means matmul (CPU: at most "
                                                                     f"{CPU_BLOCK}); memory ~ chunk x (D + K) floats")
        q.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
        q.add_argument("--force", action="store_true", help="overwrite existing output files")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from data import DataError  # the other modules' user-input errors
    from model import CheckpointError
    try:
        run(args)
    except (ValueError, OSError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
