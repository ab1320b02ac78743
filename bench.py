"""Benchmarks: this project's wav2vec 2.0 pipeline against the libraries the original release used.

    python bench.py --small                      # 2-core CPU, under 3 minutes: tiny model, small batches
    python bench.py                              # the real scale (wav2vec 2.0 Base, batch 64): for a GPU
    python bench.py --small --cases 1,5          # a selection of cases
    python bench.py --small --cases none --scaling   # only the scaling runs

Cases (see BENCHMARKS.md for the record of results):
  1  V-FT training step: model.EmotionClassifier vs transformers' Wav2Vec2Model (eager, sdpa), same weights
  2  one full V-FT epoch, data loading included: the release's way (random batches, fp16, eager attention,
     transformers) vs this project's (bucketed batches, SDPA, bf16 where supported)
  3  inference (frame features): this project vs transformers vs torchaudio
  4  TAPT and P-TAPT update steps: pretrain.py's losses vs transformers' Wav2Vec2ForPreTraining (TAPT)
  5  k-means on frame features: kmeans.fit_kmeans vs scikit-learn vs faiss, same init, 20 iterations
  6  GPU only: model FLOPs utilisation of the V-FT and TAPT steps
  7  the optimisations one at a time, each on vs off (ratio = off / on): frozen encoder without autograd,
     SDPA vs eager attention, audio cache vs decoding, loss.item() every 10 steps vs every step,
     torch.compile (with --compile); on GPUs also bf16 autocast, fused Adam, pinned non_blocking copies
  --scaling: forward time and memory vs utterance length; k-means time vs number of frames

Every comparison runs all sides in this process on the same weights, batch, device and precision,
alternating (a rotating order each round) after warm-up, and reports medians and ratios
(ratio = the other side's median / this project's median: > 1 means this project is faster).
Results print as tables and go to --json (default bench.json). Targets are reported, never asserted.
An opponent library that is not installed is skipped with a message; this project's side still runs.
"""
import argparse
import contextlib
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import model as M
from data import CLASSES, SAMPLE_RATE, AudioDataset, BucketBatchSampler, Utterance, collate
from finetune import autocast_dtype, utterance_span_masks
from model import to_device as tensor_to_device
from pretrain import PseudoLabelHeads, contrastive_loss, masked_frames, utterance_negatives

# -----------------------------------------------------------------------------
# the two scales. --small: a 2-core CPU in under 3 minutes; default: the real shapes, for a GPU.

# A small wav2vec 2.0: the Base architecture with fewer channels and layers.
SMALL_MODEL = dict(conv_layers=[(64, 10, 5)] + [(64, 3, 2)] * 4 + [(64, 2, 2)] * 2, embed_dim=128, ffn_dim=512,
                   num_layers=3, num_heads=4, pos_conv_kernel=32, pos_conv_groups=4, final_dim=64, latent_vars=64)
SCALES = {
    "small": dict(model=SMALL_MODEL, batch_size=8, infer_batch=8, utterances=80, epoch_batch=8, epochs=3,
                  warmup=1, repeats=5, kmeans_n=16384, kmeans_ks=[64, 512], kmeans_repeats=3,
                  scaling_seconds=[1, 5, 10, 20, 30], scaling_n=[10000, 30000, 100000], scaling_k=64, workers=0),
    "real": dict(model={}, batch_size=64, infer_batch=16, utterances=5531, epoch_batch=64, epochs=3,
                 warmup=3, repeats=10, kmeans_n=1_000_000, kmeans_ks=[64, 512, 4096], kmeans_repeats=3,
                 scaling_seconds=[1, 5, 10, 20, 30], scaling_n=[10000, 30000, 100000, 300000, 1000000],
                 scaling_k=512, workers=4),
}
# Recipe settings (RECIPE.md): V-FT masks, TAPT and P-TAPT masks, training crop.
VFT_MASK = dict(time_prob=0.08, time_span=15, time_min=2, channel_prob=0.05, channel_span=64, channel_min=1)
TAPT_MASK = dict(prob=0.05, span=10, min=2)
PTAPT_MASK = dict(prob=0.06, span=15, min=2)
PTAPT_KS = [64, 512, 4096]
MAX_SECONDS = 10.0
LR = 1e-4


def model_config(scale):
    # layerdrop 0 on every side: a randomly skipped layer would only add noise to the timings
    return M.Wav2Vec2Config(**{**scale["model"], "layerdrop": 0.0})


def channel_span(cfg):
    """The recipe's 64-channel span is for 768 channels; a smaller model gets the same fraction."""
    return max(1, round(VFT_MASK["channel_span"] * cfg.embed_dim / 768))


def precision_name(dtype):
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def have(module):
    return importlib.util.find_spec(module) is not None


def version(module):
    try:
        return __import__(module).__version__ if have(module) else None
    except ImportError:
        return None


def skipped(module):
    return f"skipped: {module} not installed"


# -----------------------------------------------------------------------------
# timing: warm-up, then rounds that call every side once in a rotating order; medians

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Others:
    """Shared machines: the CPU cores that *other* processes kept busy while the block ran (Linux:
    all busy time in /proc/stat minus this process's own, over the wall time; None elsewhere).
    With --wait-idle, a timed call that ran beside more than THRESHOLD such cores is redone after
    waiting for quiet, since two cores shared with a busy neighbour make every small op wait."""
    wait_s, THRESHOLD, RETRIES = 0.0, 0.25, 3

    @staticmethod
    def jiffies():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            with open("/proc/self/stat") as f:
                mine = f.read().rsplit(")", 1)[1].split()
            return sum(v) - v[3] - v[4], int(mine[11]) + int(mine[12])  # all busy; own utime + stime
        except (OSError, IndexError, ValueError):
            return None

    def __enter__(self):
        self.start, self.t0 = self.jiffies(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        end, dt = self.jiffies(), time.perf_counter() - self.t0
        self.cores = None
        if self.start and end and dt > 0:
            others = (end[0] - self.start[0]) - (end[1] - self.start[1])
            self.cores = max(0.0, others / os.sysconf("SC_CLK_TCK") / dt)

    @classmethod
    def timed(cls, fn, device, redo=True):
        """(seconds, other cores, redos) of one call, redone (after waiting for quiet) if it ran beside
        others. redo=False where this benchmark's own helper processes (data loader workers) count as others."""
        for attempt in range(cls.RETRIES + 1):
            sync(device)
            with cls() as probe:
                t0 = time.perf_counter()
                fn()
                sync(device)
                seconds = time.perf_counter() - t0
            quiet = probe.cores is None or probe.cores < cls.THRESHOLD
            if quiet or not redo or cls.wait_s <= 0 or attempt == cls.RETRIES:
                return seconds, probe.cores, attempt
            wait_for_idle(cls.wait_s)


def measure(fns, device, warmup, repeats):
    """fns: {name: callable}. Returns {name: {"median_s", "min_s", "times_s", "peak_mb", "other_cores",
    "redone"}}; peak_mb is the CUDA memory allocated during the call above what was allocated before it
    (None on CPU); other_cores the most CPU cores other processes used during a kept call."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    times, peak = {n: [] for n in names}, {n: None for n in names}
    others, redone = {n: [] for n in names}, {n: 0 for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            seconds, cores, retries = Others.timed(fns[name], device)
            times[name].append(seconds)
            redone[name] += retries
            if cores is not None:
                others[name].append(cores)
            if device.type == "cuda":
                used = (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
                peak[name] = max(peak[name] or 0.0, used)
    return {n: {"median_s": statistics.median(times[n]), "min_s": min(times[n]), "times_s": times[n],
                "peak_mb": peak[n], "other_cores": max(others[n]) if others[n] else None, "redone": redone[n]}
            for n in names}


def contention_note(*results):
    """One line on how quiet the machine was during a case's timed calls."""
    kept = [r for res in results for r in res.values() if isinstance(r, dict) and "other_cores" in r]
    cores = [r["other_cores"] for r in kept if r["other_cores"] is not None]
    if not cores:
        return None
    return (f"other processes during timed calls: at most {max(cores):.2f} cores"
            f"; calls redone after waiting for quiet: {sum(r['redone'] for r in kept)}")


class HeapPeak:
    """CPU only: the largest rise of the bytes malloc has handed out (glibc mallinfo2: heap in use plus
    mmapped blocks) during the block, polled every millisecond. Unlike resident memory it does not hide
    reuse of memory the allocator kept; other threads' arenas are not counted. None where unavailable."""

    def __init__(self):
        import ctypes

        class MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in
                        ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                         "fordblks", "keepcost")]
        try:
            self.fn = ctypes.CDLL(None).mallinfo2
            self.fn.restype = MallInfo2
        except (OSError, AttributeError):
            self.fn = None

    def in_use(self):
        info = self.fn()
        return info.uordblks + info.hblkhd

    def __enter__(self):
        if self.fn is not None:
            self.base = self.peak = self.in_use()
            self.stop = False
            self.thread = threading.Thread(target=self.poll, daemon=True)
            self.thread.start()
        return self

    def poll(self):
        while not self.stop:
            self.peak = max(self.peak, self.in_use())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.fn is not None:
            self.stop = True
            self.thread.join()

    @property
    def mb(self):
        return None if self.fn is None else (self.peak - self.base) / 2 ** 20


def load_note():
    return round(os.getloadavg()[0], 2)


def busy_cores(window=2.0):
    """CPU cores kept busy by anything over `window` seconds (Linux /proc/stat); call it while idle
    yourself to see what other processes use. None where /proc/stat is missing."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    try:
        t0, i0 = sample()
        time.sleep(window)
        t1, i1 = sample()
    except OSError:
        return None
    return (1 - (i1 - i0) / max(t1 - t0, 1)) * (os.cpu_count() or 1)


def wait_for_idle(limit_s, threshold=0.5):
    """Shared machines: wait up to limit_s seconds until other processes use fewer than `threshold`
    cores, so that timings are not taken under contention. Returns the busy cores seen last."""
    start, busy = time.perf_counter(), busy_cores()
    while busy is not None and busy >= threshold and time.perf_counter() - start < limit_s:
        busy = busy_cores()
    return None if busy is None else round(busy, 2)


def max_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -----------------------------------------------------------------------------
# batches from IEMOCAP's duration distribution

def iemocap_seconds(n, rng):
    """Utterance durations like IEMOCAP's 4-class set: log-normal, mean ~4.5 s, median ~3.6 s, 0.6-34 s
    (about 6% longer than the 10 s training crop)."""
    return np.clip(rng.lognormal(mean=1.293, sigma=0.65, size=n), 0.6, 34.0)


def make_batch(seconds, rng, max_seconds=None):
    """Noise waveforms of the given durations (cropped to max_seconds), zero-padded to the longest."""
    lengths = [int(s * SAMPLE_RATE) for s in seconds]
    if max_seconds is not None:
        lengths = [min(n, int(max_seconds * SAMPLE_RATE)) for n in lengths]
    wav = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        wav[i, :n] = torch.from_numpy(rng.standard_normal(n).astype(np.float32) * 0.1)
    return {"wav": wav, "lengths": torch.tensor(lengths), "labels": torch.from_numpy(rng.integers(0, 4, len(lengths)))}


def to_device(batch, device):
    """The batch on `device`, and its lengths kept on the host too, as the training scripts read them."""
    moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    return {**moved, "host_lengths": batch["lengths"]}


def sample_mask(lengths, max_len):
    """(B, max_len) long, 1 on the valid samples: transformers' attention_mask."""
    return (torch.arange(max_len, device=lengths.device) < lengths[:, None]).long()


# -----------------------------------------------------------------------------
# the opponents built from this project's weights: transformers, torchaudio (fairseq names)

def hf_config(cfg, attn="sdpa"):
    from transformers import Wav2Vec2Config as HFConfig
    return HFConfig(
        hidden_size=cfg.embed_dim, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.ffn_dim, hidden_act="gelu", hidden_dropout=cfg.dropout,
        activation_dropout=cfg.activation_dropout, attention_dropout=cfg.attention_dropout,
        feat_proj_dropout=cfg.dropout_input, feat_quantizer_dropout=cfg.dropout_features, layerdrop=cfg.layerdrop,
        layer_norm_eps=1e-5, feat_extract_norm="group" if cfg.extractor_mode == "default" else "layer",
        feat_extract_activation="gelu", conv_dim=[d for d, _, _ in cfg.conv_layers],
        conv_kernel=[k for _, k, _ in cfg.conv_layers], conv_stride=[s for _, _, s in cfg.conv_layers],
        conv_bias=cfg.conv_bias, num_conv_pos_embeddings=cfg.pos_conv_kernel,
        num_conv_pos_embedding_groups=cfg.pos_conv_groups, do_stable_layer_norm=cfg.layer_norm_first,
        apply_spec_augment=True, mask_time_prob=VFT_MASK["time_prob"], mask_time_length=VFT_MASK["time_span"],
        mask_time_min_masks=VFT_MASK["time_min"], mask_feature_prob=VFT_MASK["channel_prob"],
        mask_feature_length=channel_span(cfg), mask_feature_min_masks=VFT_MASK["channel_min"],
        num_codevectors_per_group=cfg.latent_vars, num_codevector_groups=cfg.latent_groups,
        codevector_dim=cfg.latent_dim or cfg.final_dim, proj_codevector_dim=cfg.final_dim,
        contrastive_logits_temperature=cfg.logit_temp, num_negatives=cfg.num_negatives, diversity_loss_weight=0.1,
        attn_implementation=attn)


def hf_key(key, weight_norm_names):
    """This project's parameter name -> transformers' Wav2Vec2Model / Wav2Vec2ForPreTraining name
    (None: not part of Wav2Vec2Model; the pretraining heads get their own names below)."""
    parts = key.split(".")
    if key.startswith("feature_encoder.convs."):
        return f"feature_extractor.conv_layers.{parts[2]}.conv.{parts[3]}"
    if key.startswith("feature_encoder.norms."):
        return f"feature_extractor.conv_layers.{parts[2]}.layer_norm.{parts[3]}"
    if key.startswith("layer_norm."):
        return f"feature_projection.layer_norm.{parts[1]}"
    if key.startswith("post_extract_proj."):
        return f"feature_projection.projection.{parts[1]}"
    if key == "mask_emb":
        return "masked_spec_embed"
    if key.startswith("encoder.pos_conv."):
        return "encoder.pos_conv_embed.conv." + weight_norm_names.get(parts[2], parts[2])
    if key.startswith("encoder.layers."):
        i, rest = parts[2], ".".join(parts[3:])
        for ours, theirs in (("self_attn_layer_norm.", "layer_norm."), ("self_attn.", "attention."),
                             ("fc1.", "feed_forward.intermediate_dense."), ("fc2.", "feed_forward.output_dense."),
                             ("final_layer_norm.", "final_layer_norm.")):
            if rest.startswith(ours):
                return f"encoder.layers.{i}.{theirs}{rest[len(ours):]}"
    if key.startswith("encoder.layer_norm."):
        return key
    return None


PRETRAIN_HEADS = {"quantizer.vars": "quantizer.codevectors", "quantizer.weight_proj.weight": "quantizer.weight_proj.weight",
                  "quantizer.weight_proj.bias": "quantizer.weight_proj.bias", "project_q.weight": "project_q.weight",
                  "project_q.bias": "project_q.bias", "final_proj.weight": "project_hid.weight",
                  "final_proj.bias": "project_hid.bias"}


def to_hf_state(net, hf_model, pretraining=False):
    """Our state dict under transformers' names, for hf_model (which decides the weight-norm naming)."""
    own = hf_model.state_dict()
    param = "parametrizations.weight.original" if any("parametrizations" in k for k in own) else None
    weight_norm_names = ({"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}
                         if param else {})
    prefix = "wav2vec2." if pretraining else ""
    out = {}
    for k, v in net.state_dict().items():
        name = hf_key(k, weight_norm_names)
        if name is not None:
            out[prefix + name] = v.clone()
        elif pretraining and k in PRETRAIN_HEADS:
            out[PRETRAIN_HEADS[k]] = v.clone()
    missing, unexpected = sorted(set(own) - set(out)), sorted(set(out) - set(own))
    if missing or unexpected:
        raise RuntimeError(f"weight conversion to transformers: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return out


def hf_backbone(net, attn, pretraining=False):
    """transformers' Wav2Vec2Model (or Wav2Vec2ForPreTraining) holding exactly net's weights."""
    import transformers
    transformers.logging.set_verbosity_error()
    cls = transformers.Wav2Vec2ForPreTraining if pretraining else transformers.Wav2Vec2Model
    hf = cls(hf_config(net.cfg, attn))
    hf.load_state_dict(to_hf_state(net, hf, pretraining))
    return hf


def torchaudio_backbone(net):
    """torchaudio's wav2vec 2.0 with `net`'s weights, through torchaudio's own fairseq converter
    (the same construction the parity tests use)."""
    from test_all import to_fairseq_state, torchaudio_model
    return torchaudio_model(net.cfg, to_fairseq_state(net))


class HFClassifier(nn.Module):
    """The V-FT head (RECIPE.md) on transformers' Wav2Vec2Model, as the release had it."""

    def __init__(self, hf, head):
        super().__init__()
        self.hf, self.head = hf, head

    def forward(self, wav, lengths):
        hidden = self.hf(wav, attention_mask=sample_mask(lengths, wav.shape[1])).last_hidden_state
        frames = self.hf._get_feat_extract_output_lengths(lengths)
        return self.head(F.relu(M.masked_mean(F.relu(hidden), frames)))


def hf_classifier(clf, attn):
    """V-FT as the release froze it: conv encoder, its layer norm and the projection (and the mask
    embedding, as this project does) without grad; transformer and head trained."""
    hf = hf_backbone(clf.backbone, attn)
    head = nn.Linear(clf.head.in_features, clf.head.out_features)
    head.load_state_dict(clf.head.state_dict())
    hf.freeze_feature_encoder()
    for p in list(hf.feature_projection.parameters()) + [hf.masked_spec_embed]:
        p.requires_grad = False
    return HFClassifier(hf, head)


def our_classifier(cfg, seed):
    torch.manual_seed(seed)
    clf = M.EmotionClassifier(M.Wav2Vec2(cfg), CLASSES)
    backbone = clf.backbone
    backbone.freeze_feature_encoder = True  # as finetune.py: conv encoder, its LN, projection without grad
    for p in backbone.parameters():
        p.requires_grad = False
    for p in list(backbone.encoder.parameters()) + list(clf.head.parameters()):
        p.requires_grad = True
    return clf


class full_fp32:
    """Parity checks in true float32: no TF32 in cuDNN convolutions or matmuls (restored afterwards)."""

    def __enter__(self):
        self.saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


@torch.no_grad()
def parity(ours, theirs, wav):
    """Largest |difference| of the frame features of an unpadded batch, in eval mode, float32."""
    ours.eval(), theirs.eval()
    with full_fp32():
        a = ours(wav)[0]
        b = theirs(wav)
    b = b.last_hidden_state if hasattr(b, "last_hidden_state") else b[0]
    return float((a - b).abs().max())


# -----------------------------------------------------------------------------
# one training step, whatever the model: autocast, backward, (scaled) Adam step

def trainer(params, device, dtype, fused):
    opt = torch.optim.Adam(params, lr=LR, weight_decay=0.0, **({"fused": True} if fused else {}))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step(loss_fn):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss
    return step


def utterance_rngs(n, gen):
    """One generator per utterance, as the scripts draw masks (finetune.utterance_rng)."""
    return [torch.Generator().manual_seed(int(torch.randint(1 << 62, (), generator=gen))) for _ in range(n)]


def ours_vft_loss(clf, batch, gen, weights, span):
    """finetune.py's loss_fn: per-utterance span masks, then the classifier."""
    backbone, device = clf.backbone, batch["wav"].device
    frames = backbone.frame_lengths(batch["host_lengths"])
    rngs = utterance_rngs(len(frames), gen)
    time_mask = utterance_span_masks(frames, int(frames.max()), rngs, VFT_MASK["time_prob"], VFT_MASK["time_span"],
                                     VFT_MASK["time_min"])
    dim = backbone.cfg.embed_dim
    channel_mask = utterance_span_masks([dim] * len(frames), dim, rngs, VFT_MASK["channel_prob"], span,
                                        VFT_MASK["channel_min"])
    logits = clf(batch["wav"], batch["host_lengths"], tensor_to_device(time_mask, device),
                 tensor_to_device(channel_mask, device))
    return F.cross_entropy(logits.float(), batch["labels"], weight=weights)


def hf_vft_loss(clf, batch, weights):
    """transformers draws its own SpecAugment masks (same settings, in hf_config) inside forward."""
    logits = clf(batch["wav"], batch["lengths"])
    return F.cross_entropy(logits.float(), batch["labels"], weight=weights)


def class_weight_tensor(device):
    counts = torch.tensor([1103.0, 1636.0, 1708.0, 1084.0])  # IEMOCAP ang, hap, neu, sad (RECIPE.md)
    w = counts.sum() / counts
    return (w / w.sum()).to(device)


# -----------------------------------------------------------------------------
# case 1: V-FT training step

def case_vft_step(args, scale, device, dtype):
    cfg, rng = model_config(scale), np.random.default_rng(args.seed)
    batch = to_device(make_batch(iemocap_seconds(args.batch_size, rng), rng, MAX_SECONDS), device)
    audio_s = float(batch["lengths"].sum()) / SAMPLE_RATE
    weights, span = class_weight_tensor(device), channel_span(cfg)
    clf = our_classifier(cfg, args.seed).to(device)
    gen = torch.Generator().manual_seed(args.seed)
    fused = device.type == "cuda"
    ours_step = trainer([p for p in clf.parameters() if p.requires_grad], device, dtype, fused)
    fns = {"this project (SDPA)": lambda: (clf.train(), ours_step(lambda: ours_vft_loss(clf, batch, gen, weights, span)))}
    checks, notes = {}, []
    if have("transformers"):
        probe = torch.from_numpy(rng.standard_normal((2, 2 * SAMPLE_RATE)).astype(np.float32) * 0.1).to(device)
        for attn in ("eager", "sdpa"):
            hf = hf_classifier(clf, attn).to(device)
            checks[attn] = parity(clf.backbone, hf.hf, probe)
            if checks[attn] > 1e-4:
                notes.append(f"transformers {attn}: outputs differ by {checks[attn]:.2e} > 1e-4; not timed")
                continue
            step = trainer([p for p in hf.parameters() if p.requires_grad], device, dtype, fused)
            fns[f"transformers {attn}"] = (lambda hf=hf, step=step:
                                           (hf.train(), step(lambda: hf_vft_loss(hf, batch, weights))))
    else:
        notes.append(skipped("transformers"))
    res = measure(fns, device, args.warmup, args.repeats)
    ours = res["this project (SDPA)"]["median_s"]
    rows = [{"side": name, "step_ms": r["median_s"] * 1e3, "audio_s_per_s": audio_s / r["median_s"],
             "peak_mb": r["peak_mb"], "ratio": r["median_s"] / ours} for name, r in res.items()]
    if args.profile:
        profile_steps({k: v for k, v in fns.items()}, device)
    note = contention_note(res)
    return {"batch": {"utterances": args.batch_size, "audio_s": audio_s,
                      "padded_s": batch["wav"].numel() / SAMPLE_RATE},
            "parity_max_abs_diff": checks, "rows": rows, "notes": notes + ([note] if note else []), "raw": res}


def profile_steps(fns, device):
    """torch.profiler on one step of every side: the top operators by self time."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name, fn in fns.items():
        fn()
        with profile(activities=acts) as prof:
            fn()
            sync(device)
        print(f"\n--- profile: {name} ---")
        print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=48))


# -----------------------------------------------------------------------------
# case 2: one full V-FT epoch, the release's way vs this project's, data loading included

class NoiseDataset(AudioDataset):
    """AudioDataset whose audio comes from memory (slices of one noise bank) instead of wav files:
    the same cropping, collate and samplers, without the disk."""
    bank = None

    def audio(self, i):
        n = self.utterances[i].num_samples
        start = (i * 7919) % (len(self.bank) - n + 1)
        return self.bank[start:start + n]


def synthetic_corpus(n, rng, folder):
    """n utterances with IEMOCAP-like durations and random labels; wav files of noise under folder
    (16-bit PCM, as IEMOCAP's), or in memory when folder is None."""
    import soundfile as sf
    utterances = []
    for i, s in enumerate(iemocap_seconds(n, rng)):
        samples, uid = int(s * SAMPLE_RATE), f"Ses0{i % 5 + 1}F_bench_F{i:05d}"
        path = os.path.join(folder, uid + ".wav") if folder else f"<memory>/{uid}"
        if folder:
            sf.write(path, (rng.standard_normal(samples) * 0.1).astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
        utterances.append(Utterance(uid, path, CLASSES[int(rng.integers(4))], samples, session=i % 5 + 1))
    return utterances


def padded_frame_fraction(sampler, lengths, net):
    padded = real = 0
    for batch in sampler.batches():
        frames = net.frame_lengths(torch.tensor([lengths[i] for i in batch]))
        padded += len(batch) * int(frames.max())
        real += int(frames.sum())
    return 1 - real / padded if padded else 0.0


def case_epoch(args, scale, device, dtype):
    cfg, rng = model_config(scale), np.random.default_rng(args.seed + 2)
    notes, have_hf = [], have("transformers")
    if not have_hf:
        notes.append(skipped("transformers") + " (the release's side)")
    folder = None if args.in_memory else tempfile.mkdtemp(prefix="bench_wavs_", dir=args.tmp_dir)
    try:
        t0 = time.perf_counter()
        utterances = synthetic_corpus(args.utterances, rng, folder)
        setup_s = time.perf_counter() - t0
        make = NoiseDataset if folder is None else AudioDataset
        if folder is None:
            NoiseDataset.bank = torch.from_numpy(rng.standard_normal(35 * SAMPLE_RATE).astype(np.float32) * 0.1)
        dataset = make(utterances, CLASSES, max_seconds=MAX_SECONDS, crop="head")
        weights, span = class_weight_tensor(device), channel_span(cfg)
        clf = our_classifier(cfg, args.seed).to(device)
        gen = torch.Generator().manual_seed(args.seed)
        sides = {"this project": dict(bucket=True, dtype=dtype, model=clf, fused=device.type == "cuda",
                                      loss=lambda b: ours_vft_loss(clf, b, gen, weights, span))}
        if have_hf:
            release_dtype = torch.float16 if device.type == "cuda" else None  # the release: fp16 autocast
            hf = hf_classifier(clf, "eager").to(device)
            sides = {"release way": dict(bucket=False, dtype=release_dtype, model=hf, fused=False,
                                         loss=lambda b: hf_vft_loss(hf, b, weights)), **sides}
        for side in sides.values():
            model = side["model"]
            side["step"] = trainer([p for p in model.parameters() if p.requires_grad], device, side["dtype"],
                                   side["fused"])
            side["sampler"] = BucketBatchSampler(dataset.lengths, batch_size=args.epoch_batch, bucket=side["bucket"],
                                                 shuffle=True, drop_last=True, seed=args.seed)
            side["padding"] = padded_frame_fraction(side["sampler"], dataset.lengths, clf.backbone)

        def epoch(side, number, limit=None):
            side["model"].train()
            side["sampler"].set_epoch(number)
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=side["sampler"], collate_fn=collate,
                                                 num_workers=args.workers, pin_memory=device.type == "cuda")
            steps = 0
            for batch in loader:
                batch = to_device(batch, device)
                side["step"](lambda: side["loss"](batch))
                steps += 1
                if steps == limit:
                    break
            return steps

        for side in sides.values():  # warm-up: a few steps of each side
            epoch(side, 10_000, limit=args.warmup)
        sync(device)
        times = {name: [] for name in sides}
        probes = {name: {"other_cores": None, "redone": 0} for name in sides}
        names = list(sides)
        for r in range(args.epochs):
            for name in names[r % len(names):] + names[:r % len(names)]:
                seconds, cores, retries = Others.timed(lambda: sides[name].update(steps=epoch(sides[name], r)), device,
                                                       redo=args.workers == 0)
                times[name].append(seconds)
                probe = probes[name]
                probe["redone"] += retries
                if cores is not None:
                    probe["other_cores"] = max(probe["other_cores"] or 0.0, cores)
        audio_s = sum(dataset.lengths) / SAMPLE_RATE  # what an epoch would see without dropping
        ours = statistics.median(times["this project"])
        rows = []
        for name, side in sides.items():
            med = statistics.median(times[name])
            used = sum(sum(dataset.lengths[i] for i in b) for b in side["sampler"].batches()) / SAMPLE_RATE
            rows.append({"side": name, "epoch_s": med, "steps": side["steps"], "audio_s_per_s": used / med,
                         "padded_frames": side["padding"], "precision": precision_name(side["dtype"]),
                         "ratio": med / ours})
        note = contention_note(probes)
        return {"utterances": args.utterances, "audio_h": audio_s / 3600, "setup_s": setup_s,
                "data": "in-memory noise through AudioDataset" if folder is None else "16-bit wav files in a temp dir",
                "workers": args.workers, "rows": rows, "notes": notes + ([note] if note else []), "times_s": times}
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)


# -----------------------------------------------------------------------------
# case 3: inference (frame features)

def case_inference(args, scale, device, dtype):
    cfg, rng = model_config(scale), np.random.default_rng(args.seed + 3)
    torch.manual_seed(args.seed)
    net = M.Wav2Vec2(cfg).to(device).eval()
    batch = to_device(make_batch(iemocap_seconds(args.infer_batch, rng), rng), device)  # full length, as at test
    wav, lengths = batch["wav"], batch["lengths"]
    audio_s = float(lengths.sum()) / SAMPLE_RATE
    probe = torch.from_numpy(rng.standard_normal((2, 2 * SAMPLE_RATE)).astype(np.float32) * 0.1).to(device)
    amp = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    fns, checks, notes = {"this project": lambda: net(wav, batch["host_lengths"])}, {}, []
    if have("transformers"):
        for attn in ("eager", "sdpa"):
            hf = hf_backbone(net, attn).to(device).eval()
            checks[f"transformers {attn}"] = parity(net, hf, probe)
            mask = sample_mask(lengths, wav.shape[1])
            fns[f"transformers {attn}"] = lambda hf=hf, mask=mask: hf(wav, attention_mask=mask)
    else:
        notes.append(skipped("transformers"))
    try:  # torchaudio, and test_all's helpers that build its model (they import pytest)
        ta = torchaudio_backbone(net).to(device).eval()
        checks["torchaudio"] = parity(net, ta, probe)
        fns["torchaudio"] = lambda: ta(wav, lengths)
    except ImportError as e:
        notes.append(skipped(e.name or "torchaudio"))
    for name, d in checks.items():
        if d > 1e-4:
            notes.append(f"{name}: outputs differ by {d:.2e} > 1e-4; not timed")
            fns.pop(name)

    def wrap(fn):
        def run():
            with torch.inference_mode(), amp():
                fn()
        return run
    res = measure({k: wrap(f) for k, f in fns.items()}, device, args.warmup, args.repeats)
    if args.profile:
        profile_steps({k: wrap(f) for k, f in fns.items()}, device)
    ours = res["this project"]["median_s"]
    rows = [{"side": name, "batch_ms": r["median_s"] * 1e3, "audio_s_per_s": audio_s / r["median_s"],
             "peak_mb": r["peak_mb"], "ratio": r["median_s"] / ours} for name, r in res.items()]
    note = contention_note(res)
    return {"batch": {"utterances": args.infer_batch, "audio_s": audio_s, "padded_s": wav.numel() / SAMPLE_RATE},
            "parity_max_abs_diff": checks, "rows": rows, "notes": notes + ([note] if note else []), "raw": res}


# -----------------------------------------------------------------------------
# case 4: TAPT and P-TAPT update steps

def ours_tapt_loss(net, batch, gen):
    """pretrain.py run_tapt's loss_fn."""
    frames = net.frame_lengths(batch["host_lengths"])
    rngs = utterance_rngs(len(frames), gen)
    mask = utterance_span_masks(frames, int(frames.max()), rngs, TAPT_MASK["prob"], TAPT_MASK["span"], TAPT_MASK["min"])
    negatives = utterance_negatives(mask, net.cfg.num_negatives, rngs)
    encoded = net.encode(batch["wav"], batch["host_lengths"], time_mask=tensor_to_device(mask, batch["wav"].device))
    terms = contrastive_loss(net, encoded, mask, negatives)
    return terms["loss"] / terms["n_masked"].clamp(min=1)


def hf_tapt_loss(hf, batch):
    """transformers' pretraining recipe: its own mask and negative sampling (numpy), its loss."""
    from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices
    wav, lengths = batch["wav"], batch["lengths"]
    frames = hf._get_feat_extract_output_lengths(lengths.cpu())
    frame_mask = (torch.arange(int(frames.max())) < frames[:, None]).long()
    shape = tuple(frame_mask.shape)
    mask = _compute_mask_indices(shape, TAPT_MASK["prob"], TAPT_MASK["span"], attention_mask=frame_mask,
                                 min_masks=TAPT_MASK["min"])
    negatives = _sample_negative_indices(shape, hf.config.num_negatives, mask_time_indices=mask)
    mask = torch.from_numpy(mask).to(wav.device)
    out = hf(wav, attention_mask=sample_mask(lengths, wav.shape[1]), mask_time_indices=mask,
             sampled_negative_indices=torch.from_numpy(negatives).long().to(wav.device))
    return out.loss / mask.sum().clamp(min=1)


def ptapt_targets(net, batch, rng):
    """Random pseudo-labels per K for every valid frame (-100 on padding), on the host like a batch's labels."""
    frames = net.frame_lengths(batch["host_lengths"])
    targets = []
    for k in PTAPT_KS:
        t = torch.from_numpy(rng.integers(0, k, (len(frames), int(frames.max()))))
        t[torch.arange(t.shape[1]) >= frames[:, None]] = -100
        targets.append(t)
    return targets


def ours_ptapt_loss(net, heads, batch, targets, gen, masked_only=True):
    """pretrain.py run_pseudo_label_pretraining's loss_fn: the heads on the masked frames only
    (masked_only=True), or, as before BENCHMARKS.md run 3, on every frame with the rest ignored."""
    device = batch["wav"].device
    frames = net.frame_lengths(batch["host_lengths"])
    mask = utterance_span_masks(frames, int(frames.max()), utterance_rngs(len(frames), gen), PTAPT_MASK["prob"],
                                PTAPT_MASK["span"], PTAPT_MASK["min"])
    hidden, _ = net(batch["wav"], batch["host_lengths"], time_mask=tensor_to_device(mask, device))
    loss = 0.0
    if masked_only:
        for head, target in zip(heads.heads, targets):
            loss = loss + F.cross_entropy(head(F.relu(masked_frames(hidden, mask))).float(),
                                          tensor_to_device(target[mask], device), ignore_index=-100)
        return loss
    for logits, target in zip(heads(hidden), targets):
        target = tensor_to_device(target.masked_fill(~mask, -100), device)
        loss = loss + F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100)
    return loss


def case_pretrain_steps(args, scale, device, dtype):
    cfg, rng = model_config(scale), np.random.default_rng(args.seed + 4)
    batch = to_device(make_batch(iemocap_seconds(args.batch_size, rng), rng, MAX_SECONDS), device)
    audio_s = float(batch["lengths"].sum()) / SAMPLE_RATE
    fused, notes, checks = device.type == "cuda", [], {}
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    net = M.Wav2Vec2(cfg).to(device)
    net.feature_grad_mult = 1.0  # the release's (pretrain.py --feature-grad-mult default)
    tapt_step = trainer(list(net.parameters()), device, dtype, fused)
    tapt = {"this project": lambda: (net.train(), tapt_step(lambda: ours_tapt_loss(net, batch, gen)))}
    if have("transformers"):
        probe = torch.from_numpy(rng.standard_normal((2, 2 * SAMPLE_RATE)).astype(np.float32) * 0.1).to(device)
        for attn in ("eager", "sdpa"):
            hf = hf_backbone(net, attn, pretraining=True).to(device)
            checks[attn] = pretrain_parity(net, hf, probe)
            if checks[attn] > 1e-4:
                notes.append(f"transformers {attn}: outputs differ by {checks[attn]:.2e} > 1e-4; not timed")
                continue
            hf.set_gumbel_temperature(net.quantizer.temperature)
            step = trainer(list(hf.parameters()), device, dtype, fused)
            tapt[f"transformers {attn}"] = lambda hf=hf, step=step: (hf.train(), step(lambda: hf_tapt_loss(hf, batch)))
    else:
        notes.append(skipped("transformers"))
    res_tapt = measure(tapt, device, args.warmup, args.repeats)

    # P-TAPT: a fresh backbone (from the checkpoint again), conv encoder and projection frozen
    torch.manual_seed(args.seed)
    pnet = M.Wav2Vec2(cfg).to(device)
    pnet.freeze_feature_encoder = True
    heads = PseudoLabelHeads(cfg.embed_dim, PTAPT_KS).to(device)
    targets = ptapt_targets(pnet, batch, rng)
    pstep = trainer(list(pnet.encoder.parameters()) + list(heads.parameters()), device, dtype, fused)
    with torch.no_grad():  # the proposed variant computes the same loss
        pnet.eval()
        a = ours_ptapt_loss(pnet, heads, batch, targets, torch.Generator().manual_seed(5))
        b = ours_ptapt_loss(pnet, heads, batch, targets, torch.Generator().manual_seed(5), masked_only=False)
        checks["ptapt masked-only loss diff"] = float((a - b).abs())
    ptapt = {"this project": lambda: (pnet.train(), pstep(lambda: ours_ptapt_loss(pnet, heads, batch, targets, gen))),
             "heads on every frame (before)": lambda: (pnet.train(), pstep(
                 lambda: ours_ptapt_loss(pnet, heads, batch, targets, gen, masked_only=False)))}
    res_ptapt = measure(ptapt, device, args.warmup, args.repeats)
    if args.profile:
        profile_steps({**{f"TAPT {k}": f for k, f in tapt.items()}, **{f"P-TAPT {k}": f for k, f in ptapt.items()}}, device)
    rows = []
    for stage, res in (("TAPT", res_tapt), ("P-TAPT", res_ptapt)):
        ours = res["this project"]["median_s"]
        rows += [{"stage": stage, "side": name, "step_ms": r["median_s"] * 1e3, "audio_s_per_s": audio_s / r["median_s"],
                  "peak_mb": r["peak_mb"], "ratio": r["median_s"] / ours} for name, r in res.items()]
    note = contention_note(res_tapt, res_ptapt)
    return {"batch": {"utterances": args.batch_size, "audio_s": audio_s, "padded_s": batch["wav"].numel() / SAMPLE_RATE},
            "parity_max_abs_diff": checks, "rows": rows, "notes": notes + ([note] if note else []),
            "raw": {"TAPT": res_tapt, "P-TAPT": res_ptapt}}


@torch.no_grad()
def pretrain_parity(net, hf, wav):
    """Context projections and quantized targets (eval: argmax codewords) of an unpadded batch."""
    net.eval(), hf.eval()
    with full_fp32():
        e = net.encode(wav)
        ctx = net.final_proj(e.hidden)
        q, _ = net.quantizer(e.features.reshape(-1, e.features.shape[-1]))
        q = net.project_q(q).view(*e.features.shape[:2], -1)
        out = hf(wav)
    return max(float((ctx - out.projected_states).abs().max()), float((q - out.projected_quantized_states).abs().max()))


# -----------------------------------------------------------------------------
# case 5: k-means

def synthetic_frames(n, dim, seed):
    """Frame-feature-like data without clean clusters: a 48-dimensional latent (32 broad overlapping modes,
    decaying variances) mapped linearly to `dim` dimensions, plus isotropic noise, a shared offset and
    4 large-valued 'outlier' dimensions as transformer features have."""
    g = torch.Generator().manual_seed(seed)
    r = 48
    modes = torch.randn(32, r, generator=g)
    z = modes[torch.randint(32, (n,), generator=g)] + torch.randn(n, r, generator=g)
    z = z * torch.linspace(2.0, 0.3, r)
    w = torch.randn(r, dim, generator=g) / r ** 0.5
    offset = torch.randn(dim, generator=g) * 0.5
    offset[:4] += 20.0
    x = torch.randn(n, dim, generator=g).mul_(0.3).addmm_(z, w).add_(offset)
    return x.contiguous()


@torch.no_grad()
def inertia(x, c, device, chunk=16384):
    """The same measure for every implementation: each frame's squared distance to its nearest centroid,
    summed in float64 (labels from a float32 matmul on centred data, distances recomputed exactly)."""
    c = c.to(device, torch.float32)
    shift = c.mean(0)
    cs = c - shift
    c_sq = (cs * cs).sum(1)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, len(x), chunk):
        xs = x[start:start + chunk].to(device, torch.float32) - shift
        labels = torch.addmm(c_sq, xs, cs.T, alpha=-2).argmin(1)
        total += ((xs.double() - cs[labels].double()) ** 2).sum()
    return float(total)


def cpu_gflops():
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    t0 = time.perf_counter()
    for _ in range(3):
        a @ b
    return 3 * 2 * 1024 ** 3 / (time.perf_counter() - t0) / 1e9


def case_kmeans(args, scale, device, dtype):
    import kmeans
    n, dim, iters = args.kmeans_n, 768, args.kmeans_iters
    x = synthetic_frames(n, dim, args.seed)
    xn = x.numpy()
    notes, rows, raw = [], [], {}
    gflops = cpu_gflops()
    for k in args.kmeans_ks:
        if k > n:
            notes.append(f"K={k} > N={n}: skipped")
            continue
        init = x[torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + k))[:k]].clone()
        init_np = init.numpy().copy()
        out = {}
        est_s = 2 * n * k * dim * (iters + 1) / (gflops * 1e9)  # a CPU library's time for this fit, roughly

        def ours():
            out["this project"] = kmeans.fit_kmeans(x, ks=[k], iters=iters, init=init, tol=0.0, max_samples=n,
                                                    device=device, progress=False)[k].centroids
        fns = {"this project": ours}
        if est_s > args.opponent_budget_s:
            notes.append(f"K={k}: CPU opponents skipped (about {est_s:.0f} s per fit > --opponent-budget-s)")
        else:
            if have("sklearn"):
                from sklearn.cluster import KMeans

                def sk():
                    km = KMeans(n_clusters=k, init=init_np, n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd",
                                random_state=0).fit(xn)
                    out["scikit-learn"], out["sk_iters"] = torch.from_numpy(km.cluster_centers_), km.n_iter_
                fns["scikit-learn"] = sk
            else:
                notes.append(skipped("scikit-learn"))
            if have("faiss"):
                import faiss

                def fa():
                    km = faiss.Kmeans(dim, k, niter=iters, seed=args.seed, verbose=False, min_points_per_centroid=1,
                                      max_points_per_centroid=n // k + 1)  # large enough: no subsampling
                    km.train(xn, init_centroids=init_np)
                    out["faiss"] = torch.from_numpy(km.centroids.copy())
                fns["faiss"] = fa
            else:
                notes.append(skipped("faiss"))
        if device.type == "cuda":  # warm-up (CUDA context, cuBLAS) on a slice: not worth a full fit
            kmeans.fit_kmeans(x[:2 * k], ks=[k], iters=2, init=init, max_samples=2 * k, device=device, progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scikit-learn: "explicit initial center position passed"
            res = measure(fns, device, 0, args.kmeans_repeats)
        ours_s = res["this project"]["median_s"]
        ref = None
        for name, r in res.items():
            value = inertia(x, out[name], device)
            ref = value if name == "this project" else ref
            its = out["sk_iters"] if name == "scikit-learn" else iters  # scikit-learn stops once labels settle
            rows.append({"K": k, "side": name, "fit_s": r["median_s"], "iterations": its,
                         "s_per_iter": r["median_s"] / max(its, 1), "inertia": value,
                         "inertia_vs_ours": value / ref - 1, "ratio": r["median_s"] / ours_s,
                         "ratio_per_iter": r["median_s"] / max(its, 1) / (ours_s / iters), "peak_mb": r["peak_mb"]})
        raw[k] = res
    if device.type == "cuda":
        notes.append("scikit-learn and faiss-cpu run on the CPU: not the same device as this project's GPU run")
    note = contention_note(*raw.values())
    notes += [note] if note else []
    return {"N": n, "D": dim, "iterations": iters, "data": "synthetic (see synthetic_frames): low-rank latent with overlapping modes, noise, offset",
            "cpu_gflops_fp32": gflops, "rows": rows, "notes": notes, "raw": raw}


# -----------------------------------------------------------------------------
# case 6: model FLOPs utilisation (GPU only)

def conv_flops(cfg, batch, samples):
    """Forward FLOPs of the conv feature encoder per layer, and the padded number of frames."""
    out, length, cin = [], samples, 1
    for cout, k, s in cfg.conv_layers:
        length = (length - k) // s + 1
        out.append(2 * batch * length * cin * cout * k)
        cin = cout
    return out, length


def transformer_flops(cfg, batch, frames):
    """Forward FLOPs of one pass over (batch, frames): projections, attention, FFN, positional conv."""
    c, f, t = cfg.embed_dim, cfg.ffn_dim, frames
    per_layer = batch * t * (8 * c * c + 4 * c * f) + 4 * batch * t * t * c
    pos = 2 * batch * t * c * (c // cfg.pos_conv_groups) * cfg.pos_conv_kernel
    return cfg.num_layers * per_layer, pos


def step_flops(cfg, batch, samples, stage, masked_fraction=0.05):
    """Model FLOPs of one update on a padded (batch, samples) batch; backward = 2 x forward for trained
    parts (weight gradient only where the input needs none)."""
    conv, frames = conv_flops(cfg, batch, samples)
    layers, pos = transformer_flops(cfg, batch, frames)
    proj = 2 * batch * frames * cfg.conv_dim * cfg.embed_dim
    if stage == "vft":  # conv encoder and projection frozen (forward only); transformer trained
        return sum(conv) + proj + 2 * pos + 3 * layers
    # TAPT: everything trained; quantizer, projections and logits on the masked frames
    m = masked_fraction * batch * frames
    d = cfg.final_dim
    heads = m * (2 * cfg.conv_dim * cfg.latent_groups * cfg.latent_vars + 2 * d * d + 2 * cfg.embed_dim * d
                 + 2 * (1 + cfg.num_negatives) * d)
    return 2 * conv[0] + 3 * sum(conv[1:]) + 3 * (proj + pos + layers + heads)


def peak_matmul_tflops(device, n=8192, repeats=10, per_call=20):
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    out = torch.empty_like(a)

    def products():  # several per timed call: one 8192^3 product (~1.4 ms) is short beside the sync around it
        for _ in range(per_call):
            torch.mm(a, b, out=out)
    products()
    res = measure({"mm": products}, device, 1, repeats)
    return 2 * n ** 3 * per_call / res["mm"]["median_s"] / 1e12


def case_mfu(args, scale, device, dtype):
    if device.type != "cuda":
        return {"rows": [], "notes": ["skipped: GPU only"]}
    peak = peak_matmul_tflops(device)
    cfg, rng = model_config(scale), np.random.default_rng(args.seed + 6)
    batch = to_device(make_batch(iemocap_seconds(args.batch_size, rng), rng, MAX_SECONDS), device)
    b, s = batch["wav"].shape
    weights, span, gen = class_weight_tensor(device), channel_span(cfg), torch.Generator().manual_seed(args.seed)
    clf = our_classifier(cfg, args.seed).to(device)
    vft = trainer([p for p in clf.parameters() if p.requires_grad], device, dtype, True)
    torch.manual_seed(args.seed)
    net = M.Wav2Vec2(cfg).to(device)
    net.feature_grad_mult = 1.0
    tapt = trainer(list(net.parameters()), device, dtype, True)
    res = measure({"V-FT": lambda: (clf.train(), vft(lambda: ours_vft_loss(clf, batch, gen, weights, span))),
                   "TAPT": lambda: (net.train(), tapt(lambda: ours_tapt_loss(net, batch, gen)))},
                  device, args.warmup, args.repeats)
    rows = []
    for name, stage in (("V-FT", "vft"), ("TAPT", "tapt")):
        flops = step_flops(cfg, b, s, stage, TAPT_MASK["prob"])
        t = res[name]["median_s"]
        rows.append({"step": name, "step_ms": t * 1e3, "tflop_per_step": flops / 1e12, "achieved_tflops": flops / t / 1e12,
                     "peak_tflops_bf16_matmul": peak, "mfu": flops / t / 1e12 / peak,
                     "precision": precision_name(dtype)})
    return {"batch": {"utterances": b, "padded_samples": s}, "rows": rows, "notes": [
        "FLOPs counted on the padded batch; peak = 8192^3 bf16 matmuls in this run (median over timed calls of 20)"],
        "raw": res}


# -----------------------------------------------------------------------------
# case 7: the optimisations one at a time, each on and off on the same weights and batch

def eager_attention_forward(self, x, attn_mask):
    """model.SelfAttention.forward without SDPA: softmax(QK^T / sqrt(d) + mask) V, the additive mask
    -inf on padded keys, dropout on the attention map."""
    B, T, C = x.shape
    q, k, v = (p(x).view(B, T, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    if attn_mask is not None:
        scores = scores + torch.zeros(attn_mask.shape, dtype=scores.dtype, device=x.device).masked_fill(
            ~attn_mask, float("-inf"))
    probs = F.dropout(scores.softmax(-1), self.dropout, self.training)
    return self.out_proj((probs @ v).transpose(1, 2).reshape(B, T, C))


@contextlib.contextmanager
def eager_attention():
    """Every model.SelfAttention computes attention the eager way inside the block."""
    saved, M.SelfAttention.forward = M.SelfAttention.forward, eager_attention_forward
    try:
        yield
    finally:
        M.SelfAttention.forward = saved


def case_optimisations(args, scale, device, dtype):
    cfg, rng = model_config(scale), np.random.default_rng(args.seed)  # case 1's batch and weights
    host = make_batch(iemocap_seconds(args.batch_size, rng), rng, MAX_SECONDS)
    batch = to_device(host, device)
    weights, span, gen = class_weight_tensor(device), channel_span(cfg), torch.Generator().manual_seed(args.seed)
    clf = our_classifier(cfg, args.seed).to(device)
    bb, cuda = clf.backbone, device.type == "cuda"
    frozen_by_default = bb.freeze_feature_encoder
    params = [p for p in clf.parameters() if p.requires_grad]
    frozen_part = [p for m in (bb.feature_encoder, bb.layer_norm, bb.post_extract_proj) for p in m.parameters()]
    step = trainer(params, device, dtype, cuda)
    rows, raw, checks = [], {}, {}

    def vft_step(autograd_frozen=False, model=clf, step=step):
        """case 1's step; autograd_frozen: the frozen part's parameters require grad (left out of Adam),
        and it runs with autograd, as an implementation that freezes only in the optimizer does."""
        bb.freeze_feature_encoder = not autograd_frozen
        for p in frozen_part:
            p.requires_grad_(autograd_frozen)
            p.grad = None
        clf.train()
        return step(lambda: ours_vft_loss(model, batch, gen, weights, span))

    def pair(name, note, on, off, unit="ms/step", per=1, warmup=args.warmup, repeats=args.repeats):
        res = raw[name] = measure({"with": on, "without": off}, device, warmup, repeats)
        w, wo = (res[s]["median_s"] * (1e3 if unit.startswith("ms") else 1.0) / per for s in ("with", "without"))
        rows.append({"optimisation": name, "with": w, "without": wo, "unit": unit, "ratio": wo / w,
                     "peak_mb_with": res["with"]["peak_mb"], "peak_mb_without": res["without"]["peak_mb"], "note": note})

    def not_run(name, why):
        rows.append({"optimisation": name, "with": None, "without": None, "unit": None, "ratio": None,
                     "peak_mb_with": None, "peak_mb_without": None, "note": why})

    pair("frozen encoder without autograd", "conv encoder + LN + projection under no_grad (finetune.py) vs their "
         "params requiring grad but left out of Adam: graph built, backward through the conv stack",
         vft_step, lambda: vft_step(autograd_frozen=True))
    with torch.no_grad(), full_fp32():
        bb.eval()
        a = bb(batch["wav"], batch["lengths"])[0]
        with eager_attention():
            b = bb(batch["wav"], batch["lengths"])[0]
        checks["eager vs SDPA attention (padded batch)"] = d = float((a - b).abs().max())
    if d < 1e-4:
        def eager_step():
            with eager_attention():
                vft_step()
        pair("SDPA attention", "F.scaled_dot_product_attention with model.py's (B,1,1,T) bool mask vs "
             "softmax(QK^T/sqrt(d) + -inf mask) V written out (same dropout)", vft_step, eager_step)
    else:
        not_run("SDPA attention", f"not timed: outputs differ by {d:.2e} >= 1e-4")

    folder = tempfile.mkdtemp(prefix="bench_wavs_", dir=args.tmp_dir)
    try:  # case 2's wav files; --cache implies --workers 0 in finetune.py, so 0 workers on both sides
        utterances = synthetic_corpus(args.utterances, np.random.default_rng(args.seed + 2), folder)
        sets = [AudioDataset(utterances, CLASSES, max_seconds=MAX_SECONDS, crop="head", cache=c) for c in (True, False)]

        def load_epoch(dataset):
            sampler = BucketBatchSampler(dataset.lengths, batch_size=args.epoch_batch, shuffle=True, seed=args.seed)
            for _ in torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=0):
                pass
        pair("in-memory audio cache", f"data.AudioDataset(cache=True) vs decoding {len(utterances)} 16-bit wav files "
             "every epoch; one epoch of loading (bucketed batches, collate), no model, 0 workers",
             lambda: load_epoch(sets[0]), lambda: load_epoch(sets[1]), unit="s/epoch", warmup=1, repeats=args.epochs)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    k, done = (10 if cuda else 1), {1: 0, 10: 0}  # steps per timed call: a GPU needs several to run ahead

    def steps_item_every(n):
        for _ in range(k):
            loss = vft_step()
            done[n] += 1
            if done[n] % n == 0:
                loss.item()
    pair("no per-step host sync", f"loss.item() every 10 steps (finetune.py) vs every step; {k} step(s) per timed "
         "call, reported per step" + ("" if cuda else "; on CPU .item() waits for nothing: expect 1.00"),
         lambda: steps_item_every(10), lambda: steps_item_every(1), per=k)
    if args.compile:
        compiled = torch.compile(clf)
        try:
            pair("torch.compile", "torch.compile(classifier) vs eager, same step (compile time excluded: warm-up)",
                 lambda: vft_step(model=compiled), vft_step, warmup=max(args.warmup, 2))
        except Exception as e:  # a compiler failure is a result to report, not a reason to lose the case
            not_run("torch.compile", f"failed: {type(e).__name__}: {str(e)[:200]}")
    else:
        not_run("torch.compile", "not run (pass --compile)")

    low = dtype or torch.bfloat16
    gpu = [f"{precision_name(low)} autocast", "fused Adam", "pinned memory + non_blocking copies"]
    if not cuda:
        for name in gpu:
            not_run(name, f"GPU only, not run on {device.type}")
    else:
        amp, fp32 = (trainer(params, device, t, True) for t in (low, None))
        pair(gpu[0], f"V-FT step under {precision_name(low)} autocast vs fp32 (TF32 as torch's defaults leave it)",
             lambda: vft_step(step=amp), lambda: vft_step(step=fp32))
        fused, foreach = (trainer(params, device, dtype, f) for f in (True, False))
        pair(gpu[1], "V-FT step with Adam(fused=True) vs Adam's default (foreach) on CUDA",
             lambda: vft_step(step=fused), lambda: vft_step(step=foreach))
        pinned = {key: v.pin_memory() for key, v in host.items()}
        pair(gpu[2], "host->device copy of the batch from pinned memory, non_blocking, vs pageable memory "
             "(copy time only; the overlap with compute it allows is not measured here)",
             lambda: to_device(pinned, device), lambda: {key: v.to(device) for key, v in host.items()}, unit="ms/copy")
    bb.freeze_feature_encoder = frozen_by_default
    note = contention_note(*raw.values())
    return {"batch": {"utterances": args.batch_size, "audio_s": float(host["lengths"].sum()) / SAMPLE_RATE,
                      "padded_s": host["wav"].numel() / SAMPLE_RATE},
            "parity_max_abs_diff": checks, "rows": rows, "notes": [note] if note else [], "raw": raw}


# -----------------------------------------------------------------------------
# --scaling: forward time and memory vs utterance length; k-means time vs frames

def loglog_slope(xs, ys):
    lx, ly = np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float))
    return float(np.polyfit(lx, ly, 1)[0])


def scaling(args, scale, device, dtype):
    import kmeans
    cfg = model_config(scale)
    torch.manual_seed(args.seed)
    net = M.Wav2Vec2(cfg).to(device).eval()
    hf = hf_backbone(net, "sdpa").to(device).eval() if have("transformers") else None
    rows, notes, measured = [], [] if hf is not None else [skipped("transformers")], []
    for seconds in args.scaling_seconds:
        wav = torch.randn(1, int(seconds * SAMPLE_RATE), device=device) * 0.1
        fns = {"this project": lambda: net(wav)}
        if hf is not None:
            fns["transformers sdpa"] = lambda: hf(wav)

        def wrap(fn):
            def run():
                with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    fn()
            return run
        res = measure({k: wrap(f) for k, f in fns.items()}, device, 1, max(3, args.repeats // 2))
        measured.append(res)
        for name, r in res.items():
            mem = r["peak_mb"]
            if device.type != "cuda":
                with HeapPeak() as heap:
                    wrap(fns[name])()
                mem = heap.mb
            rows.append({"what": "forward", "side": name, "seconds": seconds, "time_ms": r["median_s"] * 1e3,
                         "mem_mb": mem})
    slopes = {}
    for side in {r["side"] for r in rows}:
        pts = [(r["seconds"], r["time_ms"]) for r in rows if r["side"] == side]
        slopes[f"forward time, {side}"] = loglog_slope(*zip(*pts))
        long = [p for p in pts if p[0] >= 10]
        if len(long) >= 2:  # the long end, where attention's quadratic term shows first
            slopes[f"forward time >= 10 s, {side}"] = loglog_slope(*zip(*long))

    k = args.scaling_k
    kpts = []
    for n in args.scaling_n:
        x = synthetic_frames(n, 768, args.seed)
        init = x[:k].clone()
        fit = lambda x=x, init=init, n=n: kmeans.fit_kmeans(x, ks=[k], iters=args.kmeans_iters, init=init,
                                                            max_samples=n, device=device, progress=False)
        if device.type == "cuda":
            res = measure({"k": fit}, device, 1, 3)
            t, mem = res["k"]["median_s"], res["k"]["peak_mb"]
        else:
            with HeapPeak() as heap:
                res = measure({"k": fit}, device, 0, 1)
            t, mem = res["k"]["median_s"], heap.mb
        measured.append(res)
        rows.append({"what": f"k-means K={k}", "side": "this project", "frames": n, "time_ms": t * 1e3, "mem_mb": mem})
        kpts.append((n, t))
        del x
    slopes[f"k-means time vs frames (K={k})"] = loglog_slope(*zip(*kpts))
    note = contention_note(*measured)
    notes += [note] if note else []
    return {"rows": rows, "loglog_slopes": slopes, "notes": notes + (
        ["CPU memory: peak rise of malloc'd bytes during one call (mallinfo2, polled every ms)"]
        if device.type != "cuda" else ["CUDA memory: peak allocated during the call above what was allocated before"])}


# -----------------------------------------------------------------------------
# targets (reported, not asserted) and output

def targets(results, device):
    out = []

    def row(case, side):
        return next((r for r in results.get(case, {}).get("rows", []) if r.get("side") == side), None)

    def add(name, goal, value, met):
        out.append({"target": name, "goal": goal, "measured": value, "met": met})

    sdpa, eager = row("1", "transformers sdpa"), row("1", "transformers eager")
    if device.type == "cpu":
        if sdpa:
            add("V-FT step vs transformers SDPA (CPU)", ">= 1.0x", sdpa["ratio"], sdpa["ratio"] >= 1.0)
        for r in results.get("5", {}).get("rows", []):
            if r["side"] == "scikit-learn":
                ok = r["ratio"] >= 5 and abs(r["inertia_vs_ours"]) <= 0.01
                add(f"k-means K={r['K']} vs scikit-learn", ">= 5x, inertia within 1%",
                    f"{r['ratio']:.2f}x, inertia {r['inertia_vs_ours']:+.3%}", ok)
    else:
        if eager:
            add("V-FT step vs transformers eager", ">= 1.5x", eager["ratio"], eager["ratio"] >= 1.5)
        if sdpa:
            add("V-FT step vs transformers SDPA", ">= 1.2x", sdpa["ratio"], sdpa["ratio"] >= 1.2)
        rel = row("2", "release way")
        if rel:
            add("full epoch vs the release's way", ">= 2.5x", rel["ratio"], rel["ratio"] >= 2.5)
        for r in results.get("6", {}).get("rows", []):
            if r["step"] == "V-FT":
                add("MFU of the V-FT step (bf16)", ">= 35%", r["mfu"], r["mfu"] >= 0.35)
        for r in results.get("5", {}).get("rows", []):
            if r["side"] == "this project" and r["K"] == 4096 and results["5"]["N"] >= 1_000_000:
                add("k-means 1M x 768, K=4096, 20 iterations", "< 5 s", r["fit_s"], r["fit_s"] < 5)
    return out


def fmt(v):
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-2):
            return f"{v:.3g}"
        return f"{v:.2f}"
    return "-" if v is None else str(v)


def print_table(title, rows, columns):
    print(f"\n{title}")
    if not rows:
        return
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for x in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(x, widths)) + " |")


CASES = {
    "1": ("V-FT training step", case_vft_step, ["side", "step_ms", "audio_s_per_s", "peak_mb", "ratio"]),
    "2": ("full V-FT epoch, data loading included", case_epoch,
          ["side", "epoch_s", "steps", "audio_s_per_s", "padded_frames", "precision", "ratio"]),
    "3": ("inference (frame features)", case_inference, ["side", "batch_ms", "audio_s_per_s", "peak_mb", "ratio"]),
    "4": ("TAPT / P-TAPT update steps", case_pretrain_steps,
          ["stage", "side", "step_ms", "audio_s_per_s", "peak_mb", "ratio"]),
    "5": ("k-means", case_kmeans, ["K", "side", "fit_s", "iterations", "s_per_iter", "inertia", "inertia_vs_ours",
                                  "ratio", "ratio_per_iter", "peak_mb"]),
    "6": ("model FLOPs utilisation (GPU only)", case_mfu,
          ["step", "step_ms", "tflop_per_step", "achieved_tflops", "peak_tflops_bf16_matmul", "mfu", "precision"]),
    "7": ("optimisations one at a time (ratio = without / with)", case_optimisations,
          ["optimisation", "with", "without", "unit", "ratio", "peak_mb_with", "peak_mb_without", "note"]),
}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    s, r = SCALES["small"], SCALES["real"]
    both = lambda key: f"(default: --small {s[key]}, real scale {r[key]})"
    a("--small", action="store_true", help="tiny model and sizes for a 2-core CPU (under 3 minutes)")
    a("--cases", default="1,2,3,4,5,6,7", help="comma-separated case numbers, or 'none' (default: %(default)s)")
    a("--scaling", action="store_true", help="also run the scaling measurements (length, frames)")
    a("--json", default="bench.json", help="where to write the results (default: %(default)s)")
    a("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 (default: %(default)s)")
    a("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
      help="of every side in cases 1, 3-7: auto = bf16 on GPUs that have it (else fp16), fp32 on CPU; "
           "case 2's release side is always fp16 on GPU, fp32 on CPU (default: %(default)s)")
    a("--seed", type=int, default=0, help="(default: %(default)s)")
    a("--warmup", type=int, default=None, help="untimed calls of every side first " + both("warmup"))
    a("--repeats", type=int, default=None, help="timed rounds; medians are reported " + both("repeats"))
    a("--batch-size", type=int, default=None, help="utterances per training batch, cases 1, 4, 6, 7 " + both("batch_size"))
    a("--infer-batch", type=int, default=None, help="utterances per inference batch, case 3 " + both("infer_batch"))
    a("--utterances", type=int, default=None, help="case 2's synthetic corpus size (and case 7's) " + both("utterances"))
    a("--epoch-batch", type=int, default=None, help="case 2's batch size (and case 7's loading) " + both("epoch_batch"))
    a("--epochs", type=int, default=None, help="case 2's timed epochs per side (and case 7's loading) " + both("epochs"))
    a("--workers", type=int, default=None, help="case 2's data loader processes " + both("workers"))
    a("--in-memory", action="store_true",
      help="case 2: feed noise tensors through AudioDataset and the samplers instead of writing wav files")
    a("--tmp-dir", default=None, help="cases 2, 7: where the temporary wav files go (default: the system's)")
    a("--kmeans-n", type=int, default=None, help="frames to cluster in case 5 " + both("kmeans_n"))
    a("--kmeans-ks", type=int, nargs="+", default=None, help="cluster counts in case 5 " + both("kmeans_ks"))
    a("--kmeans-iters", type=int, default=20, help="Lloyd iterations (the release: 20) (default: %(default)s)")
    a("--kmeans-repeats", type=int, default=None, help="timed fits per implementation " + both("kmeans_repeats"))
    a("--opponent-budget-s", type=float, default=60.0,
      help="case 5: skip the CPU libraries for a K whose fit would take longer, roughly (default: %(default)s)")
    a("--scaling-seconds", type=float, nargs="+", default=None, help="utterance lengths " + both("scaling_seconds"))
    a("--scaling-n", type=int, nargs="+", default=None, help="k-means frame counts " + both("scaling_n"))
    a("--scaling-k", type=int, default=None, help="k-means K for scaling " + both("scaling_k"))
    a("--wait-idle", type=float, default=0.0,
      help="shared machines: before each case, and before redoing a timed call that ran beside other busy "
           "processes, wait up to this many seconds until they use < 0.5 cores (0: never wait or redo; "
           "the tables still say how busy the machine was) (default: %(default)s)")
    a("--compile", action="store_true",
      help="case 7: also time torch.compile of the V-FT step's model (compiling takes minutes on a CPU)")
    a("--profile", action="store_true", help="cases 1, 3, 4: print a torch.profiler table of one call of each side")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    scale = SCALES["small" if args.small else "real"]
    for key, value in scale.items():
        if key != "model" and getattr(args, key, None) is None:
            setattr(args, key, value)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = autocast_dtype(device, args.precision)
    cases = [] if args.cases.strip().lower() in ("", "none") else [c.strip() for c in args.cases.split(",")]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        sys.exit(f"error: unknown case(s) {unknown}; choose from {sorted(CASES)}")
    Others.wait_s = args.wait_idle
    torch.manual_seed(args.seed)
    meta = {"command": " ".join(["python", "bench.py", *(argv if argv is not None else sys.argv[1:])]),
            "scale": "small" if args.small else "real", "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "cpu_threads": torch.get_num_threads(), "precision": precision_name(dtype),
            "torch": torch.__version__, "python": platform.python_version(),
            "libraries": {m: version(m) for m in ("transformers", "torchaudio", "sklearn", "faiss")},
            "model": M.config_dict(model_config(scale)), "date": time.strftime("%Y-%m-%d %H:%M"),
            "load_at_start": load_note()}
    print(f"bench: {meta['scale']} scale on {device} ({meta['device_name']}), precision {meta['precision']}, "
          f"torch {torch.__version__}, load {meta['load_at_start']}")
    results = {}
    t_start = time.perf_counter()
    for c in cases:
        title, fn, columns = CASES[c]
        busy = wait_for_idle(args.wait_idle) if args.wait_idle > 0 else None
        load = load_note()
        t0 = time.perf_counter()
        res = fn(args, scale, device, dtype)
        res.update(load_before=load, load_after=load_note(), wall_s=round(time.perf_counter() - t0, 1),
                   max_rss_mb=round(max_rss_mb()), other_busy_cores_before=busy)
        results[c] = res
        print_table(f"[{c}] {title}  (load {load} -> {res['load_after']}"
                    f"{'' if busy is None else f', other processes {busy} cores'}, {res['wall_s']} s)", res["rows"], columns)
        for key in ("batch", "parity_max_abs_diff"):
            if res.get(key):
                print(f"  {key}: " + ", ".join(f"{k}={fmt(v)}" for k, v in res[key].items()))
        for note in res.get("notes", []):
            print(f"  {note}")
    if args.scaling:
        busy = wait_for_idle(args.wait_idle) if args.wait_idle > 0 else None
        load = load_note()
        t0 = time.perf_counter()
        res = scaling(args, scale, device, dtype)
        res.update(load_before=load, load_after=load_note(), wall_s=round(time.perf_counter() - t0, 1),
                   other_busy_cores_before=busy)
        results["scaling"] = res
        print_table(f"[scaling] forward pass and k-means  (load {load} -> {res['load_after']}, {res['wall_s']} s)",
                    res["rows"], ["what", "side", "seconds", "frames", "time_ms", "mem_mb"])
        for name, slope in res["loglog_slopes"].items():
            print(f"  log-log slope of {name}: {slope:.2f}")
        for note in res["notes"]:
            print(f"  {note}")
    goals = targets(results, device)
    print_table("targets (reported, not asserted)", goals, ["target", "goal", "measured", "met"])
    meta["wall_s"] = round(time.perf_counter() - t_start, 1)
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "results": results, "targets": goals}, f, indent=1, default=str)
    print(f"\nwrote {args.json} ({meta['wall_s']} s)")


if __name__ == "__main__":
    main()
