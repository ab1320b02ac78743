"""k-means pseudo-labels for P-TAPT (../shared/RECIPE.md, "P-TAPT", step 2).

The method: the teacher's frame features of the fold's training sessions are clustered for K = 64, 512 and
4096 by 20 Lloyd iterations, each K fitted on at most max(K) x 1000 randomly sampled frames; then every frame
of every training utterance gets the label of its nearest centroid, one label per K. The release used faiss
on a GPU, whose default init is K distinct random frames (init="random" here; the default is k-means++).

Lloyd as computed here (GPU first, the CPU works), every K reading the same chunk of frames:
- distances: ||x - c||^2 less ||x||^2 (the same for every c) is ||c||^2 - 2 x.c: one float32 matmul (no TF32)
  per chunk and K, on frames translated by their mean (features share large offsets, which eat the digits that
  tell close centroids apart; scikit-learn translates too) and given a column of ones that adds ||c||^2;
- update: centroid = mean of its frames, summed in float64; an empty cluster takes the frame farthest from its
  centroid (scikit-learn's rule);
- stop: after `iters` updates, when no label changes (scikit-learn's rule), or once an update lowers the
  inertia by less than `tol` (relative);
- init: greedy k-means++ (scikit-learn's variant) or K distinct random frames, each K from its own generator
  seeded with `seed`: a K fitted alone or with others gets the same centroids.
"""
import argparse
import contextlib
import itertools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from model import SAMPLE_RATE, resolve_device, save_atomic, world

FLOAT32_FRAMES = 4096  # frames summed in float32 before they join the float64 sums: adding after every 1024-frame
# chunk cost 10% of a K=512 pass on the CPU; the groups are fixed, so any number of threads or ranks sums the same


@contextlib.contextmanager
def no_tf32():
    """Full float32 matmuls and convolutions inside (TF32 keeps 10 mantissa bits: it would blur close distances)."""
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
    inertia: list  # sum of squared distances to the nearest centroid, per pass: before each update, after the last
    counts: torch.Tensor  # (K,) long: cluster sizes under the final centroids (fitted frames only)


@no_tf32()
def fit_kmeans(features, ks=(64, 512, 4096), iters=20, init="k-means++", seed=0, tol=0.0, chunk_size=16384,
               max_samples=None, device=None, progress=True):
    """One k-means per K in `ks` on the rows of `features` (N, D): {K: KMeansResult}. init: "k-means++",
    "random" or centroids ({K: (K, D) tensor}, or the tensor for a single K). max_samples (default max(ks) x
    1000): fit on a seeded random subset. Memory besides the frames: about chunk_size x (D + max K) floats.
    Under torch.distributed each rank passes its shard and gets the fit of all shards in rank order."""
    ks, device = [int(k) for k in ks], resolve_device(device or "auto")
    if not (torch.is_tensor(features) and features.dim() == 2 and features.is_floating_point()):
        raise ValueError(f"need 2-D floating-point features, got {getattr(features, 'shape', type(features))}")
    inits = dict.fromkeys(ks, init) if isinstance(init, str) else {ks[0]: init} if torch.is_tensor(init) else init
    if sorted(inits) != sorted(ks) or not all(c in ("k-means++", "random") if isinstance(c, str)
                                              else tuple(c.shape) == (k, features.shape[1]) for k, c in inits.items()):
        raise ValueError(f"init must be 'k-means++', 'random' or centroids of shape (K, {features.shape[1]}) for each K")
    x, cap = _gather_rows(features, device), max(ks) * 1000 if max_samples is None else max_samples
    if max(ks) > min(len(x), cap):
        raise ValueError(f"cannot fit K={max(ks)} clusters to N={min(len(x), cap)} frames"
                         f"{' (after max_samples)' if cap < len(x) else ''}: K must be <= N")
    if len(x) > cap:  # in frame order: the draw decides which frames, not the order they are read in
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:cap].sort().values]
    gens = {k: torch.Generator().manual_seed(seed) for k in ks}  # on the CPU: the same draws on any device or rank
    with _threads(device) as threads:
        frames = _Frames(x, device, chunk_size, threads, ks)
        cents = {k: c.to(device, torch.float32) - frames.shift if torch.is_tensor(c)
                 else frames.rows(torch.randperm(len(x), generator=gens[k])[:k]) if c == "random"
                 else _kmeans_plusplus(frames, k, gens[k]) for k, c in inits.items()}
        history, counts = _lloyd(frames, cents, iters, tol, progress)
    return {k: KMeansResult((cents[k] + frames.shift).cpu(), history[k], counts[k].cpu()) for k in ks}


def _weights(c):
    # (D + 1, K): a frame [x, 1] times it gives ||c||^2 - 2 x.c, its squared distances less its ||x||^2
    return torch.cat([-2 * c, c.square().sum(1, keepdim=True)], 1).T.contiguous()


def _kmeans_plusplus(frames, k, gen):
    # scikit-learn's greedy k-means++: 2 + ln K candidates per step drawn ~ D^2, keep the one that lowers the
    # potential most; K passes over the frames
    sq = torch.cat([xa[:, :-1].square().sum(1) for _, xa in frames.chunks(frames.buf)])
    dists = lambda w: torch.cat([xa @ w for _, xa in frames.chunks(frames.buf)]).add_(sq[:, None]).clamp_(min=0)
    chosen = [frames.rows(torch.randint(len(sq), (1,), generator=gen))]
    closest = dists(_weights(chosen[0]))[:, 0]
    for _ in range(1, k):
        cum = closest.cumsum(0, dtype=torch.float64)  # a float32 cumsum over millions of frames drifts
        u = torch.rand(2 + int(math.log(k)), generator=gen, dtype=torch.float64).to(cum.device)
        candidates = frames.rows(torch.searchsorted(cum, u * cum[-1], right=True).clamp_(max=len(cum) - 1))
        d = torch.minimum(dists(_weights(candidates)), closest[:, None])
        best = int(d.sum(0, dtype=torch.float64).argmin())
        closest = d[:, best].contiguous()
        chosen.append(candidates[best:best + 1])
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
            h.append(max(float(frames.sq_total - 2 * (sums_k * c).sum() + (counts[k] * c.square().sum(1)).sum()), 0.0))
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
    """Cluster means. Each empty cluster takes a frame farthest from its centroid (farthest first), which leaves
    its cluster, as scikit-learn does; a cluster left empty keeps its centroid."""
    empty = (sizes == 0).nonzero()[:, 0]
    if len(empty):
        far = torch.cat([(xa[:, :-1] - c[labels[s:s + len(xa)]]).square_().sum(1) for s, xa in frames.chunks(frames.buf)])
        idx = far.topk(min(len(empty), len(far))).indices
        x, old, empty = frames.rows(idx).double(), labels[idx], empty[:len(idx)]
        sums = sums.index_add(0, old, -x)
        sizes.index_add_(0, old, -torch.ones_like(old))
        sums[empty], sizes[empty] = x, 1
    return torch.where(sizes[:, None] > 0, sums / sizes.clamp(min=1)[:, None], c.double()).float()


@no_tf32()
def assign(features, centroids, chunk_size=16384, device=None):
    """(N,) long on the CPU: the nearest centroid of every row of `features` (N, D), by one of Lloyd's passes."""
    device, k = resolve_device(device or "auto"), len(centroids)
    if features.dim() != 2 or centroids.dim() != 2 or centroids.shape[1] != features.shape[1]:
        raise ValueError(f"centroids {tuple(centroids.shape)} do not match features {tuple(features.shape)}")
    c, labels = centroids.to(device, torch.float32), {k: torch.empty(len(features), dtype=torch.long, device=device)}
    with _threads(device) as threads:
        frames = _Frames(features, device, chunk_size, threads, [k], shift=c.mean(0))  # any shift: the same labels
        if not torch.isfinite(frames.lloyd_pass({k: _weights(c - frames.shift)}, labels, split_ranks=False)[k]).all():
            raise ValueError("features contain NaN or inf")
    return labels[k].cpu()


# ================================================================ engineering: threads, ranks, files, command line

class _Frames:
    """Frames as given (float16, on the CPU for a GPU fit...), read in chunks made float32, less `shift` (default:
    their mean), with a column of ones; sq_total: the sum of their squared norms so translated. Each thread of the
    pool has its chunk and sum buffers, allocated once for every pass."""

    def __init__(self, x, device, chunk, threads, ks, shift=None):
        (self.pool, num_threads), free = threads, torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
        self.x = x.to(device) if x.numel() * x.element_size() < free // 3 else x  # read iters + 1 times: stage them
        # on the CPU a chunk's distances to K centroids fit a core's L2 cache (512 KB): 256 frames ran a K=512 pass
        # 10% faster than 1024 frames, which ran K=64 10% faster than 256
        chunk = min(chunk, 1024, max(256, 2 ** 17 // max(ks))) if device.type == "cpu" else chunk
        self.device, self.shift = device, torch.zeros(x.shape[1], device=device) if shift is None else shift
        self.buf = buf = torch.ones(max(1, min(chunk, len(x))), x.shape[1] + 1, device=device)
        zeros = lambda dtype: {k: buf.new_zeros(k, buf.shape[1], dtype=dtype) for k in ks}
        self.buffers = [(buf if t == 0 else torch.ones_like(buf), buf.new_empty(len(buf) * max(ks)),
                         zeros(torch.float32), zeros(torch.float64)) for t in range(num_threads)]
        self.group = max(1, FLOAT32_FRAMES // len(buf))  # chunks summed in float32 before the float64 sums
        if shift is None:
            s = buf.new_zeros(1, buf.shape[1], dtype=torch.float64)
            for _, xa in self.chunks(buf):  # column sums by a matmul: sum(0) is several times slower on the CPU
                s += xa.new_ones(1, len(xa)) @ xa
            if not torch.isfinite(s).all():  # a NaN frame would silently poison its centroid
                raise ValueError("features contain NaN or inf")
            self.shift = (s[0, :-1] / len(x)).float()
            # each pass's inertia then follows from its cluster sums
            self.sq_total = sum(float(xa[:, :-1].square().sum(dtype=torch.float64)) for _, xa in self.chunks(buf))

    def rows(self, idx):
        return self.x[idx.to(self.x.device)].to(self.device).float() - self.shift

    def chunks(self, buf, numbers=None):
        """(start, view of buf: the chunk's frames translated, ones) for each chunk number in `numbers` (default:
        every chunk in turn) until the frames end; valid until the next."""
        for start in (i * len(buf) for i in numbers or itertools.count()):
            if start >= len(self.x):
                return
            rows = self.x[start:start + len(buf)].to(self.device, non_blocking=True)
            torch.sub(rows, self.shift, out=buf[:len(rows), :-1])
            yield start, buf[:len(rows)]

    def lloyd_pass(self, weights, labels, split_ranks=True):
        """One Lloyd pass for {K: _weights(centroids)}: labels every frame (into labels[K]) and returns {K: (K, D + 1)
        float64 cluster sums, sizes in the last column}. The threads take groups of chunks in turn (one slowed by a
        neighbour takes fewer); with split_ranks each rank takes every world-size-th group, summed over ranks."""
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
                    lab = torch.argmin(torch.mm(xa, w, out=dists[:m * k].view(m, k)), 1, out=labels[k][start:start + m])
                    group_sums[k].index_add_(0, lab, xa)
            for k in weights:
                sums[k] += group_sums[k]
                group_sums[k].zero_()


@contextlib.contextmanager
def _threads(device):
    """(pool, size): one thread per core on the CPU (one on a GPU), torch single-threaded in them and meanwhile in the
    caller, as scikit-learn splits its Lloyd: torch's own threads meet at a barrier in every op, and with a busy
    neighbour every barrier waits for a descheduled thread (BENCHMARKS.md: a K=64 fit took 23-40 s against 3.3 s)."""
    threads, size = torch.get_num_threads(), torch.get_num_threads() if device.type == "cpu" else 1
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(size, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            yield pool, size
    finally:
        torch.set_num_threads(threads)


def _gather_rows(t, device):
    """The rows of t of every rank, concatenated in rank order, on the CPU of every rank (t itself in one process)."""
    if world()[1] == 1:
        return t
    sizes = torch.zeros(world()[1], dtype=torch.long, device=device)
    sizes[world()[0]] = len(t)
    dist.all_reduce(sizes)
    buf = torch.zeros((int(sizes.max()),) + t.shape[1:], dtype=t.dtype, device=device)
    buf[:len(t)] = t
    parts = [torch.empty_like(buf) for _ in sizes]
    dist.all_gather(parts, buf)
    return torch.cat([p[:n] for p, n in zip(parts, sizes.tolist())]).cpu()


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
                       max_samples=None, workers=2, tol=0.0, chunk_size=16384, batch_seconds=200.0):
    """P-TAPT's k-means stage: the frames of `utterances` (extract_features), fit_kmeans for every K, every
    frame labelled, written to out_path (save_labels; meta gains the settings, the inertia and each K's NMI
    with emotion, printed) and returned as {K: (frames,) long}. Under torch.distributed every rank calls it:
    each extracts a contiguous shard of the utterances (cut by audio length), rank 0 writes, all return all."""
    (rank, size), device = world(), resolve_device(device)
    cum = torch.tensor([u.num_samples for u in utterances], dtype=torch.float64).cumsum(0)
    cut = [0] + [int(torch.searchsorted(cum, cum[-1] * r / size)) for r in range(1, size)] + [len(utterances)]
    feats, counts = extract_features(features_of, utterances[cut[rank]:cut[rank + 1]], device, batch_seconds,
                                     progress and rank == 0, workers)
    if size > 1:  # a rank without frames learns D
        dim = torch.tensor(feats.shape[1], device=device)
        dist.all_reduce(dim, dist.ReduceOp.MAX)
        feats = feats if len(feats) else torch.zeros(0, int(dim), dtype=torch.float16)
    fits = fit_kmeans(feats, ks, iters, init, seed, tol, chunk_size, max_samples, device, progress)
    labels = {k: _gather_rows(assign(feats, f.centroids, chunk_size, device), device) for k, f in fits.items()}
    counts = _gather_rows(counts, device)
    if rank == 0:
        names = sorted({str(u.label) for u in utterances})
        nmi = {k: emotion_nmi(labels[k], counts, [names.index(str(u.label)) for u in utterances]) for k in fits}
        meta = {**meta, "num_frames": int(counts.sum()), "hours": float(cum[-1]) / SAMPLE_RATE / 3600, "nmi": nmi,
                "ks": list(fits), "iters": iters, "init": init if isinstance(init, str) else "given", "seed": seed,
                "tol": tol, "max_samples": max(fits) * 1000 if max_samples is None else max_samples,
                "num_fit_frames": int(fits[max(fits)].counts.sum()), "inertia": {k: f.inertia for k, f in fits.items()}}
        for k, f in fits.items():
            print(f"K={k}: NMI between pseudo-labels and emotion {nmi[k]:.4f}, inertia {f.inertia[0]:.5g} -> "
                  f"{f.inertia[-1]:.5g} in {len(f.inertia) - 1} updates, {int((f.counts > 0).sum())}/{k} clusters used")
        save_labels(out_path, [u.uid for u in utterances], counts, labels, meta)
    if size > 1:
        dist.barrier()  # the file exists on return, on every rank
    return labels


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


# The pseudo-label file: {"uids": [str], "frame_counts": (U,) long, "labels": {K: (sum of counts,) int}, "meta": {}}

def _index(content, path):
    """{uid: (first frame, frame count)}; anything inconsistent is a ValueError naming the file."""
    def check(ok, problem):
        if not ok:
            raise ValueError(f"{path}: invalid pseudo-label file: {problem}")

    check(isinstance(content, dict) and isinstance(content.get("uids"), list) and isinstance(content.get("meta"), dict)
          and torch.is_tensor(content.get("frame_counts")) and isinstance(content.get("labels"), dict)
          and content["labels"], "expected {uids: [str], frame_counts: tensor, labels: {K: tensor}, meta: {}}")
    uids, counts, labels = content["uids"], content["frame_counts"], content["labels"]
    check(len(counts) == len(uids) == len(set(uids)) and all(isinstance(u, str) for u in uids) and counts.dim() == 1
          and counts.dtype == torch.long and bool((counts >= 0).all()),
          f"{len(uids)} uids but {len(counts)} frame counts: need a long count >= 0 for each distinct uid")
    for k, lab in labels.items():
        check(isinstance(k, int) and k > 0 and torch.is_tensor(lab) and lab.dim() == 1 and not lab.is_floating_point(),
              f"labels[{k!r}] must be a 1-D integer tensor under an integer K > 0")
        check(len(lab) == counts.sum(), f"labels[{k}] has {len(lab)} entries but frame_counts sum to {counts.sum()}")
        check(not len(lab) or 0 <= lab.min() <= lab.max() < k, f"labels[{k}] has values outside [0, {k})")
    return {u: (s, c) for u, s, c in zip(uids, (counts.cumsum(0) - counts).tolist(), counts.tolist())}


def save_labels(path, uids, frame_counts, labels, meta):
    """Writes the labels of the frames of `uids`, concatenated in uid order, atomically: never a file that
    load_labels would refuse, in int16 when K allows (half the file, half P-TAPT's memory)."""
    content = {"uids": [str(u) for u in uids], "frame_counts": torch.as_tensor(frame_counts, dtype=torch.long).cpu(),
               "labels": {int(k): torch.as_tensor(v).cpu() for k, v in labels.items()}, "meta": dict(meta)}
    _index(content, path)
    content["labels"] = {k: v.to(torch.int16 if k <= 32767 else torch.int32) for k, v in content["labels"].items()}
    save_atomic(content, path)


def load_labels(path):
    """A checked pseudo-label file, plus "index": {uid: (first frame, frame count)} and "path"."""
    try:
        content = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a missing, truncated or foreign file: torch raises many different things
        raise ValueError(f"{path}: not a readable pseudo-label file ({type(e).__name__}: {e})") from e
    return {**content, "index": _index(content, path), "path": str(path)}


def labels_for(label_file, uid, num_frames):
    """{K: (num_frames,) long}: the pseudo-labels of one utterance of a load_labels() result."""
    if uid not in label_file["index"]:
        raise ValueError(f"{label_file['path']}: no pseudo-labels for utterance {uid}")
    start, count = label_file["index"][uid]
    if count != num_frames:
        raise ValueError(f"{label_file['path']}: utterance {uid} has {count} pseudo-labels but {num_frames} frames "
                         f"were expected: pseudo-labels do not match the audio")
    return {k: v[start:start + count].long() for k, v in label_file["labels"].items()}


def main(argv=None):
    """python kmeans.py fit ...: pseudo_label_stage on the train split's frames from a checkpoint's layer."""
    from data import COUNT, NATURAL, PROBABILITY, DataError, OneLineParser, load_corpus, user_errors
    from model import CheckpointError, load_wav2vec2
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("command", choices=["fit"], help="fit k-means on the train split's frames and label them all")
    a("--checkpoint", required=True, help="teacher: a wav2vec 2.0 checkpoint (fairseq or this project)")
    a("--data", required=True, help="IEMOCAP_full_release folder, a label .json or a .csv manifest")
    a("--fold", type=int, choices=[1, 2, 3, 4, 5], default=None, help="IEMOCAP test session 1-5 (ignored for .json/.csv)")
    a("--wav-dir", default=None, help="folder of the wavs named in a label .json")
    a("--out", required=True, help="pseudo-label file to write")
    a("--layer", type=COUNT, default=None, help="transformer layer 1..L to cluster (default: the output)")
    a("--ks", type=COUNT, nargs="+", default=[64, 512, 4096], help="numbers of clusters (default: RECIPE.md's)")
    a("--iters", type=COUNT, default=20, help="Lloyd iterations (default: the release's 20)")
    a("--init", choices=["k-means++", "random"], default="k-means++", help="(default: k-means++)")
    a("--seed", type=int, default=0, help="seed of the init and of the frame subsample")
    a("--tol", type=PROBABILITY, default=0.0, help="also stop once an update lowers the inertia by less than this fraction")
    a("--max-samples", type=COUNT, default=None, help="fit on at most this many frames (default: max(ks) x 1000)")
    a("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    a("--workers", type=NATURAL, default=2, help="data loader processes")
    a("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    a("--force", action="store_true", help="overwrite an existing output file")
    args = p.parse_args(argv)
    with user_errors():
        if os.path.exists(args.out) and not args.force:  # before the expensive part
            raise DataError(f"{args.out} exists; pass --force to overwrite it")
        folder = os.path.dirname(os.path.abspath(args.out))
        while not os.path.exists(folder):  # save_atomic makes the missing folders
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise DataError(f"--out {args.out}: cannot write under {folder}")
        try:
            train = load_corpus(args.data, args.fold, args.wav_dir)[0]["train"]
            model = load_wav2vec2(args.checkpoint).to(resolve_device(args.device)).eval()
        except CheckpointError as e:  # a missing or unusable checkpoint is bad input too
            raise DataError(str(e)) from None
        if args.layer is not None and args.layer > model.cfg.num_layers:
            raise DataError(f"--layer {args.layer}: the checkpoint has layers 1..{model.cfg.num_layers}")
        meta = {"checkpoint": os.path.abspath(args.checkpoint), "layer": args.layer, "data": os.path.abspath(args.data),
                "fold": args.fold}
        pseudo_label_stage(lambda wav, n: model(wav, n, layer=args.layer), train, args.ks, args.iters, args.init,
                           args.seed, args.device, args.out, meta, args.progress, args.max_samples, args.workers, args.tol)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
