"""Benchmarks: this project's wav2vec 2.0 pipeline against the libraries the original release used.

    python bench.py --small                          # 2-core CPU, a few minutes: small model, small batches
    python bench.py --small --cases 1,5 --kmeans-fresh   # V-FT step and k-means (plus first fits in fresh processes)
    python bench.py --small --cases none --scaling   # only the scaling runs
    python bench.py --cases 1,3,4,6                  # the real scale (wav2vec 2.0 Base, batch 64): for a GPU

Cases (BENCHMARKS.md keeps the record of results):
  1  V-FT training step, the clean recipe (per-utterance masks, group norm over valid frames): this project's
     model.EmotionClassifier vs transformers' Wav2Vec2Model (eager, sdpa) with the same weights and batch
  2  one full V-FT epoch, data loading included: the release's way (random batches, fp16 on GPU, eager
     attention, transformers) vs this project's (bucketed batches, SDPA, bf16 where supported)
  3  inference (frame features): this project vs transformers vs torchaudio
  4  TAPT (fairseq's and the release's objectives) and P-TAPT update steps; transformers' Wav2Vec2ForPreTraining
  5  k-means on frame features: kmeans.fit_kmeans vs scikit-learn's Lloyd vs faiss, same initial centroids,
     at most 20 iterations (this project and scikit-learn stop when no label changes); --kmeans-fresh adds
     each side's first fit in a fresh process
  6  GPU only: model FLOPs utilisation of the V-FT and TAPT steps
  --scaling: forward time (and GPU memory) vs utterance length; k-means time vs number of frames

Every comparison runs all sides in this process on the same weights, batch, device and precision, in a
rotating order after warm-up, and reports medians and ratios (ratio = the other side's median / this
project's median: > 1 means this project is faster). Results print as tables and go to --json. Targets are
reported, never asserted. A library that is not installed is skipped with a message.

The section "reference models" also serves test_all.py: fairseq's checkpoint format (to_fairseq_state,
fairseq_args, write_fairseq), torchaudio's twin (torchaudio_model, torchaudio_layers), transformers' twin
(hf_config, to_hf_state, hf_backbone, hf_classifier). torchaudio and transformers are imported inside them.
"""

import argparse
import copy
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints as C
import kmeans
import model as M
from data import CLASSES, SAMPLE_RATE, AudioDataset, BucketBatchSampler, Utterance, collate
from finetune import vft_loss
from model import vft_masks
from pretrain import (
    PseudoLabelHeads,
    padded_negatives,
    pseudo_label_loss,
    release_tapt_loss,
    tapt_loss,
    utterance_negatives,
)
from train import autocast_dtype, global_loss

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# the two scales (--small: a 2-core CPU; default: the real shapes, for a GPU) and the recipe's settings

SMALL_MODEL = dict(
    conv_layers=[(64, 10, 5)] + [(64, 3, 2)] * 4 + [(64, 2, 2)] * 2,
    embed_dim=128,
    ffn_dim=512,
    num_layers=3,
    num_heads=4,
    pos_conv_kernel=32,
    pos_conv_groups=4,
    final_dim=64,
    latent_vars=64,
)
SCALES = {
    "small": dict(
        model=SMALL_MODEL,
        batch_size=8,
        infer_batch=8,
        utterances=80,
        epoch_batch=8,
        epochs=3,
        warmup=1,
        repeats=5,
        kmeans_n=100_000,
        kmeans_ks=[64, 512],
        kmeans_repeats=3,
        scaling_seconds=[1, 5, 10, 20, 30],
        scaling_n=[10000, 30000, 100000],
        scaling_k=64,
        workers=0,
    ),
    "real": dict(
        model={},
        batch_size=64,
        infer_batch=16,
        utterances=5531,
        epoch_batch=64,
        epochs=3,
        warmup=3,
        repeats=10,
        kmeans_n=1_000_000,
        kmeans_ks=[64, 512, 4096],
        kmeans_repeats=3,
        scaling_seconds=[1, 5, 10, 20, 30],
        scaling_n=[10000, 30000, 100000, 300000, 1000000],
        scaling_k=512,
        workers=4,
    ),
}
VFT_MASK = dict(
    time_prob=0.08, time_span=15, time_min=2, channel_prob=0.05, channel_span=64, channel_min=1
)
TAPT_MASK = (0.05, 10, 2)  # (prob, span, min_spans)
PTAPT_MASK = (0.06, 15, 2)
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


def skipped(module):
    return f"skipped: {module} not installed"


# -----------------------------------------------------------------------------
# timing: warm-up, then rounds that call every side once in a rotating order; medians


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fns, device, warmup, repeats):
    """fns: {name: callable} -> {name: {"median_s", "min_s", "times_s", "peak_mb"}}; peak_mb is the CUDA memory
    allocated during a call above what was allocated before it (None on the CPU)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times, peak = {n: [] for n in names}, {n: None for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # a rotating order
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peak[name] = max(
                    peak[name] or 0.0, (torch.cuda.max_memory_allocated(device) - before) / 2**20
                )
    return {
        n: {
            "median_s": statistics.median(times[n]),
            "min_s": min(times[n]),
            "times_s": times[n],
            "peak_mb": peak[n],
        }
        for n in names
    }


def timed_rows(res, audio_s, key, ours, **extra):
    """Table rows of measure()'s result: time in ms, audio seconds per second, ratio to `ours`."""
    base = res[ours]["median_s"]
    return [
        {
            **extra,
            "side": name,
            key: r["median_s"] * 1e3,
            "min_ms": r["min_s"] * 1e3,
            "audio_s_per_s": audio_s / r["median_s"],
            "peak_mb": r["peak_mb"],
            "ratio": r["median_s"] / base,
        }
        for name, r in res.items()
    ]


def profile_steps(fns, device):
    """torch.profiler on one call of every side: the top operators by self time."""
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
    return {
        "wav": wav,
        "lengths": torch.tensor(lengths),
        "labels": torch.from_numpy(rng.integers(0, 4, len(lengths))),
    }


def to_device(batch, device):
    """The batch on `device`, and its lengths kept on the host too, as the training scripts read them."""
    moved = {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }
    return {**moved, "host_lengths": batch["lengths"]}


def sample_mask(lengths, max_len):
    """(B, max_len) long, 1 on the valid samples: transformers' attention_mask."""
    return (torch.arange(max_len, device=lengths.device) < lengths[:, None]).long()


def probe_wav(rng, device):
    return torch.from_numpy(rng.standard_normal((2, 2 * SAMPLE_RATE)).astype(np.float32) * 0.1).to(
        device
    )


# -----------------------------------------------------------------------------
# reference models: fairseq's file format, torchaudio's and transformers' twins


def random_model(cfg, seed=0):
    """Random weights with non-trivial norms and biases, so a mis-mapped parameter shows."""
    torch.manual_seed(seed)
    net = M.Wav2Vec2(cfg)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return net.eval()


def to_fairseq_state(net):
    """This model's parameters under fairseq's names (the inverse of C.fairseq_key)."""
    out = {}
    ln_mode = net.cfg.extractor_mode == "layer_norm"
    for k, v in net.state_dict().items():
        if k.startswith("feature_encoder.convs."):
            i, what = k.split(".")[2:]
            k = f"feature_extractor.conv_layers.{i}.0.{what}"
        elif k.startswith("feature_encoder.norms."):
            i, what = k.split(".")[2:]
            k = (
                f"feature_extractor.conv_layers.{i}.2.1.{what}"
                if ln_mode
                else f"feature_extractor.conv_layers.{i}.2.{what}"
            )
        elif k.startswith("encoder.pos_conv."):
            k = "encoder.pos_conv.0." + k.split(".")[-1]
        out[k] = v.clone()
    return out


def fairseq_args(cfg):
    layers = " + ".join(f"[{tuple(x)}]" for x in cfg.conv_layers)
    return dict(
        arch="wav2vec2",
        extractor_mode=cfg.extractor_mode,
        conv_feature_layers=layers,
        conv_bias=cfg.conv_bias,
        encoder_embed_dim=cfg.embed_dim,
        encoder_ffn_embed_dim=cfg.ffn_dim,
        encoder_layers=cfg.num_layers,
        encoder_attention_heads=cfg.num_heads,
        layer_norm_first=cfg.layer_norm_first,
        conv_pos=cfg.pos_conv_kernel,
        conv_pos_groups=cfg.pos_conv_groups,
        final_dim=cfg.final_dim,
        latent_vars=cfg.latent_vars,
        latent_groups=cfg.latent_groups,
        latent_temp="(2,0.5,0.999995)",
        dropout=0.1,
        encoder_layerdrop=0.05,
        feature_grad_mult=0.1,
        normalize=cfg.normalize,
        quantize_targets=True,
    )


def write_fairseq(path, net, style):
    """Write `net` as fairseq would: style in args | cfg | omegaconf | asr | legacy."""
    state, a = to_fairseq_state(net), fairseq_args(net.cfg)
    extra = {
        "optimizer_history": [{"criterion_name": "Wav2vecCriterion", "num_updates": 400000}],
        "extra_state": {"epoch": 57, "train_iterator": {"epoch": 57}},
    }
    if style in ("args", "legacy"):
        obj = {"args": argparse.Namespace(**a), "model": state, **extra}
    elif style == "cfg":
        obj = {
            "cfg": {
                "model": {"_name": "wav2vec2", **a},
                "task": {"_name": "audio_pretraining", "normalize": net.cfg.normalize},
            },
            "model": state,
            **extra,
        }
    elif style == "omegaconf":
        from omegaconf import (
            OmegaConf,  # only the tests write omegaconf objects; the loader never imports it
        )

        # lists as fairseq's hydra configs have them (optimization.lr, latent_temp): pickled with int's py2 name
        cfg = OmegaConf.create(
            {
                "model": {"_name": "wav2vec2", **a, "latent_temp": [2.0, 0.5, 0.999995]},
                "task": {"_name": "audio_pretraining", "normalize": net.cfg.normalize},
                "optimization": {"lr": [0.0005], "update_freq": [1], "max_update": 400000},
            }
        )
        obj = {"cfg": cfg, "model": state, **extra}
    elif style == "asr":
        inner = {"model": {"_name": "wav2vec2", **a}, "task": {"normalize": net.cfg.normalize}}
        asr_state = {
            f"w2v_encoder.w2v_model.{k}": v
            for k, v in state.items()
            if not k.startswith(("quantizer", "project_q", "final_proj"))
        }
        asr_state["w2v_encoder.proj.weight"] = torch.randn(32, net.cfg.embed_dim)
        asr_state["w2v_encoder.proj.bias"] = torch.randn(32)
        obj = {
            "cfg": {
                "model": {"_name": "wav2vec_ctc", "w2v_args": inner, "dropout": 0.0},
                "task": {"normalize": net.cfg.normalize},
            },
            "model": asr_state,
            **extra,
        }
    else:
        raise ValueError(style)
    torch.save(obj, path, _use_new_zipfile_serialization=style != "legacy")
    return state


def torchaudio_model(cfg, fs_state):
    """torchaudio's own wav2vec 2.0, loaded through torchaudio's own fairseq key converter."""
    import torchaudio.models
    from torchaudio.models.wav2vec2.utils.import_fairseq import _convert_state_dict

    ta = torchaudio.models.wav2vec2_model(
        extractor_mode="group_norm" if cfg.extractor_mode == "default" else "layer_norm",
        extractor_conv_layer_config=[tuple(x) for x in cfg.conv_layers],
        extractor_conv_bias=cfg.conv_bias,
        encoder_embed_dim=cfg.embed_dim,
        encoder_projection_dropout=0.0,
        encoder_pos_conv_kernel=cfg.pos_conv_kernel,
        encoder_pos_conv_groups=cfg.pos_conv_groups,
        encoder_num_layers=cfg.num_layers,
        encoder_num_heads=cfg.num_heads,
        encoder_attention_dropout=0.0,
        encoder_ff_interm_features=cfg.ffn_dim,
        encoder_ff_interm_dropout=0.0,
        encoder_dropout=0.0,
        encoder_layer_norm_first=cfg.layer_norm_first,
        encoder_layer_drop=0.0,
        aux_num_out=None,
    )
    ta.load_state_dict(_convert_state_dict(fs_state))
    return ta.eval()


def torchaudio_layers(ta, cfg, wav):
    """Every layer's output for one unpadded utterance (1, T), as fairseq defines layer k."""
    if cfg.normalize:  # torchaudio leaves waveform normalisation to the caller
        wav = torch.nn.functional.layer_norm(wav, wav.shape[-1:])
    with torch.no_grad():
        outs = ta.extract_features(wav)[0]
        final = ta(wav)[0]
    return outs, final


def hf_config(cfg, attn="sdpa"):
    """transformers' Wav2Vec2Config for this project's config (SpecAugment: the V-FT recipe's masks)."""
    from transformers import Wav2Vec2Config as HFConfig

    return HFConfig(
        hidden_size=cfg.embed_dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.ffn_dim,
        hidden_act="gelu",
        hidden_dropout=cfg.dropout,
        activation_dropout=cfg.activation_dropout,
        attention_dropout=cfg.attention_dropout,
        feat_proj_dropout=cfg.dropout_input,
        feat_quantizer_dropout=cfg.dropout_features,
        layerdrop=cfg.layerdrop,
        layer_norm_eps=1e-5,
        feat_extract_norm="group" if cfg.extractor_mode == "default" else "layer",
        feat_extract_activation="gelu",
        conv_dim=[d for d, _, _ in cfg.conv_layers],
        conv_kernel=[k for _, k, _ in cfg.conv_layers],
        conv_stride=[s for _, _, s in cfg.conv_layers],
        conv_bias=cfg.conv_bias,
        num_conv_pos_embeddings=cfg.pos_conv_kernel,
        num_conv_pos_embedding_groups=cfg.pos_conv_groups,
        do_stable_layer_norm=cfg.layer_norm_first,
        apply_spec_augment=True,
        mask_time_prob=VFT_MASK["time_prob"],
        mask_time_length=VFT_MASK["time_span"],
        mask_time_min_masks=VFT_MASK["time_min"],
        mask_feature_prob=VFT_MASK["channel_prob"],
        mask_feature_length=channel_span(cfg),
        mask_feature_min_masks=VFT_MASK["channel_min"],
        num_codevectors_per_group=cfg.latent_vars,
        num_codevector_groups=cfg.latent_groups,
        codevector_dim=cfg.latent_dim or cfg.final_dim,
        proj_codevector_dim=cfg.final_dim,
        contrastive_logits_temperature=cfg.logit_temp,
        num_negatives=cfg.num_negatives,
        diversity_loss_weight=0.1,
        attn_implementation=attn,
    )


HF_LAYER_PARTS = (
    ("self_attn_layer_norm.", "layer_norm."),
    ("self_attn.", "attention."),
    ("fc1.", "feed_forward.intermediate_dense."),
    ("fc2.", "feed_forward.output_dense."),
    ("final_layer_norm.", "final_layer_norm."),
)
PRETRAIN_HEADS = {
    "quantizer.vars": "quantizer.codevectors",
    "quantizer.weight_proj.weight": "quantizer.weight_proj.weight",
    "quantizer.weight_proj.bias": "quantizer.weight_proj.bias",
    "project_q.weight": "project_q.weight",
    "project_q.bias": "project_q.bias",
    "final_proj.weight": "project_hid.weight",
    "final_proj.bias": "project_hid.bias",
}


def hf_key(key, weight_norm_names):
    """This project's parameter name -> transformers' Wav2Vec2Model name (None: not part of Wav2Vec2Model;
    the pretraining heads are in PRETRAIN_HEADS)."""
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
        for ours, theirs in HF_LAYER_PARTS:
            if rest.startswith(ours):
                return f"encoder.layers.{i}.{theirs}{rest[len(ours) :]}"
    return key if key.startswith("encoder.layer_norm.") else None


def to_hf_state(net, hf_model, pretraining=False):
    """Our state dict under transformers' names, for hf_model (which decides the weight-norm naming)."""
    own = hf_model.state_dict()
    weight_norm_names = (
        {
            "weight_g": "parametrizations.weight.original0",
            "weight_v": "parametrizations.weight.original1",
        }
        if any("parametrizations" in k for k in own)
        else {}
    )
    prefix, out = "wav2vec2." if pretraining else "", {}
    for k, v in net.state_dict().items():
        name = hf_key(k, weight_norm_names)
        if name is not None:
            out[prefix + name] = v.clone()
        elif pretraining and k in PRETRAIN_HEADS:
            out[PRETRAIN_HEADS[k]] = v.clone()
    missing, unexpected = sorted(set(own) - set(out)), sorted(set(out) - set(own))
    if missing or unexpected:
        raise RuntimeError(
            f"weight conversion to transformers: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return out


def hf_backbone(net, attn, pretraining=False):
    """transformers' Wav2Vec2Model (or Wav2Vec2ForPreTraining) holding exactly net's weights."""
    import transformers

    transformers.logging.set_verbosity_error()
    cls = transformers.Wav2Vec2ForPreTraining if pretraining else transformers.Wav2Vec2Model
    hf = cls(hf_config(net.cfg, attn))
    hf.load_state_dict(to_hf_state(net, hf, pretraining))
    return hf


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


@torch.no_grad()
def parity(ours, theirs, wav):
    """Largest |difference| of the frame features of an unpadded batch, in eval mode, float32."""
    ours.eval(), theirs.eval()
    with kmeans.no_tf32():
        a = ours(wav)[0]
        b = theirs(wav)
    b = b.last_hidden_state if hasattr(b, "last_hidden_state") else b[0]
    return float((a - b).abs().max())


@torch.no_grad()
def pretrain_parity(net, hf, wav):
    """Context projections and quantized targets (eval: argmax codewords) of an unpadded batch."""
    net.eval(), hf.eval()
    with kmeans.no_tf32():
        e = net.encode(wav)
        ctx = net.final_proj(e.hidden)
        q, _ = net.quantizer(e.features.reshape(-1, e.features.shape[-1]))
        q = net.project_q(q).view(*e.features.shape[:2], -1)
        out = hf(wav)
    return max(
        float((ctx - out.projected_states).abs().max()),
        float((q - out.projected_quantized_states).abs().max()),
    )


def checked(name, diff, checks, notes):
    """Records a parity check; False (with a note) when the outputs differ too much to time that side."""
    checks[name] = diff
    if diff > 1e-4:
        notes.append(f"{name}: outputs differ by {diff:.2e} > 1e-4; not timed")
    return diff <= 1e-4


# -----------------------------------------------------------------------------
# one training step, whatever the model: the loss terms under autocast, T.global_loss, (scaled) Adam


def trainer(params, device, dtype, fused):
    opt = torch.optim.Adam(params, lr=LR, weight_decay=0.0, **({"fused": True} if fused else {}))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step(terms_fn):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            terms = terms_fn()
        loss = global_loss(terms, 0.0, device)[0]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss

    return step


def utterance_rngs(n, gen):
    """One generator per utterance, as the scripts draw masks (T.utterance_rng)."""
    return [
        torch.Generator().manual_seed(int(torch.randint(1 << 62, (), generator=gen)))
        for _ in range(n)
    ]


def class_weight_tensor(device):
    counts = torch.tensor(
        [1103.0, 1636.0, 1708.0, 1084.0]
    )  # IEMOCAP ang, hap, neu, sad (RECIPE.md)
    w = counts.sum() / counts
    return (w / w.sum()).to(device)


def our_classifier(cfg, seed, device):
    """finetune.py's model under --recipe clean: group norm over valid frames, the mean over every frame;
    conv encoder, its layer norm and the projection frozen. Returns (classifier, trained parameters)."""
    torch.manual_seed(seed)
    backbone = M.Wav2Vec2(cfg)
    clf = M.EmotionClassifier(backbone, CLASSES).to(device)
    return clf, backbone.freeze_feature_encoder() + list(clf.head.parameters())


def vft_terms(clf, batch, gen, weights):
    """finetune.py's batch_loss under --recipe clean: per-utterance span masks ("utterance" semantics)."""
    bb = clf.backbone
    frames = bb.frame_lengths(batch["host_lengths"])
    rngs = utterance_rngs(len(frames), gen)
    time_mask, channel_mask = vft_masks(
        "utterance",
        frames,
        int(bb.frame_lengths(torch.tensor(batch["wav"].shape[1]))),
        bb.cfg.embed_dim,
        rngs,
        gen,
        (VFT_MASK["time_prob"], VFT_MASK["time_span"], VFT_MASK["time_min"]),
        (VFT_MASK["channel_prob"], channel_span(bb.cfg), VFT_MASK["channel_min"]),
    )
    device = batch["wav"].device
    logits = clf(batch["wav"], batch["host_lengths"], time_mask.to(device), channel_mask.to(device))
    return [vft_loss(logits, batch["labels"], weights)]


def hf_vft_terms(clf, batch, weights):
    """transformers draws its own SpecAugment masks (same settings, in hf_config) inside forward."""
    return [vft_loss(clf(batch["wav"], batch["lengths"]), batch["labels"], weights)]


# -----------------------------------------------------------------------------
# case 1: V-FT training step


def case_vft_step(args, scale, device, dtype):
    cfg, rng = model_config(scale), np.random.default_rng(args.seed)
    batch = to_device(make_batch(iemocap_seconds(args.batch_size, rng), rng, MAX_SECONDS), device)
    audio_s = float(batch["lengths"].sum()) / SAMPLE_RATE
    weights, gen, fused = (
        class_weight_tensor(device),
        torch.Generator().manual_seed(args.seed),
        device.type == "cuda",
    )
    clf, params = our_classifier(cfg, args.seed, device)
    step = trainer(params, device, dtype, fused)
    fns = {
        "this project (SDPA)": lambda: (
            clf.train(),
            step(lambda: vft_terms(clf, batch, gen, weights)),
        )
    }
    checks, notes = {}, [] if have("transformers") else [skipped("transformers")]
    for attn in ("eager", "sdpa") if have("transformers") else ():
        hf = hf_classifier(clf, attn).to(device)
        if checked(
            f"transformers {attn}",
            parity(clf.backbone, hf.hf, probe_wav(rng, device)),
            checks,
            notes,
        ):
            hf_step = trainer([p for p in hf.parameters() if p.requires_grad], device, dtype, fused)
            fns[f"transformers {attn}"] = lambda hf=hf, s=hf_step: (
                hf.train(),
                s(lambda: hf_vft_terms(hf, batch, weights)),
            )
    res = measure(fns, device, args.warmup, args.repeats)
    if args.profile:
        profile_steps(fns, device)
    return {
        "batch": {
            "utterances": args.batch_size,
            "audio_s": audio_s,
            "padded_s": batch["wav"].numel() / SAMPLE_RATE,
        },
        "parity_max_abs_diff": checks,
        "rows": timed_rows(res, audio_s, "step_ms", "this project (SDPA)"),
        "notes": notes,
        "raw": res,
    }


# -----------------------------------------------------------------------------
# case 2: one full V-FT epoch, the release's way vs this project's, data loading included


def synthetic_corpus(n, rng, folder):
    """n utterances with IEMOCAP-like durations and random labels: 16-bit wav files of noise under folder."""
    import soundfile as sf

    utterances = []
    for i, s in enumerate(iemocap_seconds(n, rng)):
        samples, uid = int(s * SAMPLE_RATE), f"Ses0{i % 5 + 1}F_bench_F{i:05d}"
        path = os.path.join(folder, uid + ".wav")
        sf.write(
            path,
            (rng.standard_normal(samples) * 0.1).astype(np.float32),
            SAMPLE_RATE,
            subtype="PCM_16",
        )
        utterances.append(
            Utterance(uid, path, CLASSES[int(rng.integers(4))], samples, session=i % 5 + 1)
        )
    return utterances


def padded_frame_fraction(sampler, lengths, net):
    padded = real = 0
    for batch in sampler.batches():
        frames = net.frame_lengths(torch.tensor([lengths[i] for i in batch]))
        padded += len(batch) * int(frames.max())
        real += int(frames.sum())
    return 1 - real / padded if padded else 0.0


def epoch_sides(args, cfg, dataset, device, dtype):
    """{name: side}: the release's way (if transformers is installed) and this project's, each with its
    model, sampler, precision and step."""
    weights, gen = class_weight_tensor(device), torch.Generator().manual_seed(args.seed)
    clf, params = our_classifier(cfg, args.seed, device)
    sides = {}
    if have("transformers"):
        hf = hf_classifier(clf, "eager").to(device)
        sides["release way"] = dict(
            bucket=False,
            dtype=torch.float16 if device.type == "cuda" else None,
            model=hf,
            params=[p for p in hf.parameters() if p.requires_grad],
            fused=False,
            terms=lambda b: hf_vft_terms(hf, b, weights),
        )
    sides["this project"] = dict(
        bucket=True,
        dtype=dtype,
        model=clf,
        params=params,
        fused=device.type == "cuda",
        terms=lambda b: vft_terms(clf, b, gen, weights),
    )
    for side in sides.values():
        side["step"] = trainer(side["params"], device, side["dtype"], side["fused"])
        side["sampler"] = BucketBatchSampler(
            dataset.lengths,
            batch_size=args.epoch_batch,
            bucket=side["bucket"],
            shuffle=True,
            drop_last=True,
            seed=args.seed,
        )
        side["padding"] = padded_frame_fraction(side["sampler"], dataset.lengths, clf.backbone)
    return sides


def run_epoch(side, dataset, args, device, limit=None):
    """One epoch of `side` (its sampler's next epoch), or its first `limit` steps."""
    side["model"].train()
    side["sampler"].set_epoch(side.setdefault("epoch", 0))
    side["epoch"] += 1
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=side["sampler"],
        collate_fn=collate,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
    )
    side["steps"] = 0
    for batch in loader:
        batch = to_device(batch, device)
        side["step"](lambda: side["terms"](batch))
        side["steps"] += 1
        if side["steps"] == limit:
            break


def case_epoch(args, scale, device, dtype):
    folder = tempfile.mkdtemp(prefix="bench_wavs_", dir=args.tmp_dir)
    try:
        t0 = time.perf_counter()
        utterances = synthetic_corpus(args.utterances, np.random.default_rng(args.seed + 2), folder)
        setup_s = time.perf_counter() - t0
        dataset = AudioDataset(utterances, CLASSES, max_seconds=MAX_SECONDS, crop="head")
        sides = epoch_sides(args, model_config(scale), dataset, device, dtype)
        for side in sides.values():  # warm-up: a few steps of each side
            run_epoch(side, dataset, args, device, limit=args.warmup)
        res = measure(
            {
                name: lambda side=side: run_epoch(side, dataset, args, device)
                for name, side in sides.items()
            },
            device,
            0,
            args.epochs,
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    ours, rows = res["this project"]["median_s"], []
    for name, side in sides.items():
        med = res[name]["median_s"]
        used = (
            sum(sum(dataset.lengths[i] for i in b) for b in side["sampler"].batches()) / SAMPLE_RATE
        )
        rows.append(
            {
                "side": name,
                "epoch_s": med,
                "steps": side["steps"],
                "audio_s_per_s": used / med,
                "padded_frames": side["padding"],
                "precision": precision_name(side["dtype"]),
                "ratio": med / ours,
            }
        )
    return {
        "utterances": args.utterances,
        "audio_h": sum(dataset.lengths) / SAMPLE_RATE / 3600,
        "setup_s": setup_s,
        "data": "16-bit wav files in a temp dir",
        "workers": args.workers,
        "rows": rows,
        "raw": res,
        "notes": []
        if "release way" in sides
        else [skipped("transformers") + " (the release's side)"],
    }


# -----------------------------------------------------------------------------
# case 3: inference (frame features)


def case_inference(args, scale, device, dtype):
    rng = np.random.default_rng(args.seed + 3)
    torch.manual_seed(args.seed)
    net = M.Wav2Vec2(model_config(scale)).to(device).eval()
    batch = to_device(
        make_batch(iemocap_seconds(args.infer_batch, rng), rng), device
    )  # full length, as at test
    wav, lengths, probe = batch["wav"], batch["lengths"], probe_wav(rng, device)
    audio_s = float(lengths.sum()) / SAMPLE_RATE
    fns, checks, notes = {"this project": lambda: net(wav, batch["host_lengths"])}, {}, []
    if not have("transformers"):
        notes.append(skipped("transformers"))
    for attn in ("eager", "sdpa") if have("transformers") else ():
        hf = hf_backbone(net, attn).to(device).eval()
        if checked(f"transformers {attn}", parity(net, hf, probe), checks, notes):
            mask = sample_mask(lengths, wav.shape[1])
            fns[f"transformers {attn}"] = lambda hf=hf, mask=mask: hf(wav, attention_mask=mask)
    if have("torchaudio"):
        ta = torchaudio_model(net.cfg, to_fairseq_state(net)).to(device)
        if checked("torchaudio", parity(net, ta, probe), checks, notes):
            fns["torchaudio"] = lambda: ta(wav, lengths)
    else:
        notes.append(skipped("torchaudio"))

    def wrap(fn):
        def run():
            with (
                torch.inference_mode(),
                torch.autocast(device.type, dtype=dtype, enabled=dtype is not None),
            ):
                fn()

        return run

    fns = {k: wrap(f) for k, f in fns.items()}
    res = measure(fns, device, args.warmup, args.repeats)
    if args.profile:
        profile_steps(fns, device)
    return {
        "batch": {
            "utterances": args.infer_batch,
            "audio_s": audio_s,
            "padded_s": wav.numel() / SAMPLE_RATE,
        },
        "parity_max_abs_diff": checks,
        "rows": timed_rows(res, audio_s, "batch_ms", "this project"),
        "notes": notes,
        "raw": res,
    }


# -----------------------------------------------------------------------------
# case 4: TAPT and P-TAPT update steps


def padded_frames(net, batch):
    return int(net.frame_lengths(torch.tensor(batch["wav"].shape[1])))


def tapt_terms(net, batch, gen, release=False):
    """pretrain.py run_tapt's batch_loss: --recipe clean (fairseq's objective, per-utterance masks and
    distractors) or release (transformers 4.10's loss, batch span counts, distractors over the padding)."""
    frames, device = net.frame_lengths(batch["host_lengths"]), batch["wav"].device
    rngs = utterance_rngs(len(frames), gen)
    mask = M.span_masks(
        "release" if release else "utterance",
        frames,
        padded_frames(net, batch),
        rngs,
        gen,
        *TAPT_MASK,
    )
    if release:  # the release called the model without attention mask: to it the padding is audio
        encoded = net.encode(
            batch["wav"],
            None,
            time_mask=mask.to(device),
            feature_grad_mult=1.0,
            feature_dropout=False,
        )
        negatives = padded_negatives(mask, net.cfg.num_negatives, rngs)
        return [(release_tapt_loss(net, encoded, mask.to(device), negatives)["loss"], 1)]
    encoded = net.encode(
        batch["wav"], batch["host_lengths"], time_mask=mask.to(device), feature_grad_mult=1.0
    )
    terms = tapt_loss(
        net, encoded, mask.to(device), utterance_negatives(mask, net.cfg.num_negatives, rngs)
    )
    return [(terms["loss"], terms["n_masked"])]


def hf_tapt_terms(hf, batch):
    """transformers' pretraining recipe: its own mask and negative sampling (numpy), its loss."""
    from transformers.models.wav2vec2.modeling_wav2vec2 import (
        _compute_mask_indices,
        _sample_negative_indices,
    )

    wav, lengths = batch["wav"], batch["lengths"]
    frames = hf._get_feat_extract_output_lengths(lengths.cpu())
    frame_mask = (torch.arange(int(frames.max())) < frames[:, None]).long()
    mask = _compute_mask_indices(
        tuple(frame_mask.shape), *TAPT_MASK[:2], attention_mask=frame_mask, min_masks=TAPT_MASK[2]
    )
    negatives = _sample_negative_indices(
        tuple(frame_mask.shape), hf.config.num_negatives, mask_time_indices=mask
    )
    mask = torch.from_numpy(mask).to(wav.device)
    out = hf(
        wav,
        attention_mask=sample_mask(lengths, wav.shape[1]),
        mask_time_indices=mask,
        sampled_negative_indices=torch.from_numpy(negatives).long().to(wav.device),
    )
    return [(out.loss, mask.sum())]


def ptapt_terms(net, heads, batch, targets, gen):
    """pretrain.py run_ptapt's batch_loss under --recipe clean: the heads on the masked frames only."""
    frames, device = net.frame_lengths(batch["host_lengths"]), batch["wav"].device
    mask = M.span_masks(
        "utterance",
        frames,
        padded_frames(net, batch),
        utterance_rngs(len(frames), gen),
        gen,
        *PTAPT_MASK,
    )
    hidden, _ = net(batch["wav"], batch["host_lengths"], time_mask=mask.to(device))
    return pseudo_label_loss(heads(hidden[mask.to(device)]), [t[mask].to(device) for t in targets])


def tapt_sides(args, cfg, batch, rng, device, dtype, checks, notes):
    """TAPT: this project's step (clean and release objectives) and transformers' (eager, sdpa)."""
    gen, fused = torch.Generator().manual_seed(args.seed), device.type == "cuda"
    torch.manual_seed(args.seed)
    net = M.Wav2Vec2(cfg).to(device)
    rel = copy.deepcopy(net)  # tapt_terms: pretrain.py's settings (--feature-grad-mult 1 in both)
    step, rel_step = (trainer(list(n.parameters()), device, dtype, fused) for n in (net, rel))
    fns = {
        "this project": lambda: (net.train(), step(lambda: tapt_terms(net, batch, gen))),
        "this project, release objective": lambda: (
            rel.train(),
            rel_step(lambda: tapt_terms(rel, batch, gen, True)),
        ),
    }
    if not have("transformers"):
        notes.append(skipped("transformers"))
    for attn in ("eager", "sdpa") if have("transformers") else ():
        hf = hf_backbone(net, attn, pretraining=True).to(device)
        if checked(
            f"transformers {attn}", pretrain_parity(net, hf, probe_wav(rng, device)), checks, notes
        ):
            hf.set_gumbel_temperature(net.quantizer.temperature)
            s = trainer(list(hf.parameters()), device, dtype, fused)
            fns[f"transformers {attn}"] = lambda hf=hf, s=s: (
                hf.train(),
                s(lambda: hf_tapt_terms(hf, batch)),
            )
    return fns


def case_pretrain_steps(args, scale, device, dtype):
    cfg, rng = model_config(scale), np.random.default_rng(args.seed + 4)
    batch = to_device(make_batch(iemocap_seconds(args.batch_size, rng), rng, MAX_SECONDS), device)
    audio_s, checks, notes = float(batch["lengths"].sum()) / SAMPLE_RATE, {}, []
    tapt = tapt_sides(args, cfg, batch, rng, device, dtype, checks, notes)
    res_tapt = measure(tapt, device, args.warmup, args.repeats)
    torch.manual_seed(
        args.seed
    )  # P-TAPT: a fresh backbone (from the checkpoint again), conv encoder frozen
    pnet = M.Wav2Vec2(cfg).to(device)
    heads = PseudoLabelHeads(cfg.embed_dim, PTAPT_KS).to(device)
    pstep = trainer(
        pnet.freeze_feature_encoder() + list(heads.parameters()),
        device,
        dtype,
        device.type == "cuda",
    )
    frames, gen = (
        int(pnet.frame_lengths(batch["host_lengths"]).max()),
        torch.Generator().manual_seed(args.seed),
    )
    targets = [torch.from_numpy(rng.integers(0, k, (args.batch_size, frames))) for k in PTAPT_KS]
    ptapt = {
        "this project": lambda: (
            pnet.train(),
            pstep(lambda: ptapt_terms(pnet, heads, batch, targets, gen)),
        )
    }
    res_ptapt = measure(ptapt, device, args.warmup, args.repeats)
    if args.profile:
        profile_steps(
            {
                **{f"TAPT {k}": f for k, f in tapt.items()},
                "P-TAPT this project": ptapt["this project"],
            },
            device,
        )
    rows = timed_rows(res_tapt, audio_s, "step_ms", "this project", stage="TAPT") + timed_rows(
        res_ptapt, audio_s, "step_ms", "this project", stage="P-TAPT"
    )
    return {
        "batch": {
            "utterances": args.batch_size,
            "audio_s": audio_s,
            "padded_s": batch["wav"].numel() / SAMPLE_RATE,
        },
        "parity_max_abs_diff": checks,
        "rows": rows,
        "notes": notes,
        "raw": {"TAPT": res_tapt, "P-TAPT": res_ptapt},
    }


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
    w = torch.randn(r, dim, generator=g) / r**0.5
    offset = torch.randn(dim, generator=g) * 0.5
    offset[:4] += 20.0
    x = torch.randn(n, dim, generator=g).mul_(0.3).addmm_(z, w).add_(offset)
    return x.contiguous()


def kmeans_init(x, k, seed):
    """The shared initial centroids: k distinct random frames."""
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + k))[:k]].clone()


@torch.no_grad()
def inertia(x, c, device, chunk=16384):
    """The same measure for every implementation: each frame's squared distance to its nearest centroid
    (kmeans.assign), summed in float64."""
    labels, c, total = kmeans.assign(x, c, device=device), c.double(), 0.0
    for start in range(0, len(x), chunk):
        total += float(
            ((x[start : start + chunk].double() - c[labels[start : start + chunk]]) ** 2).sum()
        )
    return total


def kmeans_fit(side, x, init, iters, device, seed):
    """One fit: (centroids, iterations as scikit-learn's n_iter_ counts them)."""
    k = len(init)
    if side == "this project":
        r = kmeans.fit_kmeans(
            x,
            ks=[k],
            iters=iters,
            init=init,
            tol=0.0,
            max_samples=len(x),
            device=device,
            progress=False,
        )[k]
        return r.centroids, min(
            len(r.inertia), iters
        )  # one inertia per pass; the last pass measures the end
    if side == "scikit-learn":
        from sklearn.cluster import KMeans

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "explicit initial center position passed"
            km = KMeans(
                k,
                init=init.numpy(),
                n_init=1,
                max_iter=iters,
                tol=0.0,
                algorithm="lloyd",
                random_state=0,
            ).fit(x.numpy())
        return torch.from_numpy(km.cluster_centers_), int(km.n_iter_)
    import faiss

    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=iters,
        seed=seed,
        verbose=False,
        min_points_per_centroid=1,
        max_points_per_centroid=len(x) // k + 1,
    )  # large enough: no subsampling
    km.train(x.numpy(), init_centroids=init.numpy())
    return torch.from_numpy(km.centroids.copy()), iters


def first_fit(side, k, n, iters, seed, device):
    """In a fresh process (case 5, --kmeans-fresh): prints the seconds of its first fit as JSON."""
    x = synthetic_frames(n, 768, seed)
    init = kmeans_init(x, k, seed)
    if side == "scikit-learn":
        import sklearn.cluster  # noqa: F401  (imported before the clock starts, as kmeans is)
    t0 = time.perf_counter()
    kmeans_fit(side, x, init, iters, torch.device(device), seed)
    print(json.dumps({"first_fit_s": time.perf_counter() - t0}))


def fresh_fit_seconds(side, k, args, device, notes):
    """first_fit in a new Python process: the seconds of a fresh process's first fit (None if it failed)."""
    code = (
        f"import bench; bench.first_fit({side!r}, {k}, {args.kmeans_n}, {args.kmeans_iters}, {args.seed}, "
        f"{str(device if side == 'this project' else 'cpu')!r})"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True)
    if r.returncode != 0:
        notes.append(f"K={k} {side}: the fresh-process fit failed: {r.stderr.strip()[-300:]}")
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])["first_fit_s"]


def cpu_gflops():
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    t0 = time.perf_counter()
    for _ in range(3):
        a @ b
    return 3 * 2 * 1024**3 / (time.perf_counter() - t0) / 1e9


def kmeans_sides(args, k, gflops, notes):
    est_s = (
        2 * args.kmeans_n * k * 768 * (args.kmeans_iters + 1) / (gflops * 1e9)
    )  # a CPU library's fit, roughly
    if est_s > args.opponent_budget_s:
        notes.append(
            f"K={k}: CPU opponents skipped (about {est_s:.0f} s per fit > --opponent-budget-s)"
        )
        return ["this project"]
    notes += [skipped(module) for module in ("sklearn", "faiss") if not have(module)]
    return ["this project"] + [
        side for side, module in (("scikit-learn", "sklearn"), ("faiss", "faiss")) if have(module)
    ]


def case_kmeans(args, scale, device, dtype):
    x, iters = synthetic_frames(args.kmeans_n, 768, args.seed), args.kmeans_iters
    notes, rows, raw, gflops = [], [], {}, cpu_gflops()
    for k in [k for k in args.kmeans_ks if k <= len(x)]:
        init, out = kmeans_init(x, k, args.seed), {}
        if device.type == "cuda":  # warm-up (CUDA context, cuBLAS) on a slice: not worth a full fit
            kmeans_fit("this project", x[: 2 * k], init, 2, device, args.seed)
        fns = {
            side: (
                lambda side=side: out.__setitem__(
                    side,
                    kmeans_fit(
                        side,
                        x,
                        init,
                        iters,
                        device if side == "this project" else torch.device("cpu"),
                        args.seed,
                    ),
                )
            )
            for side in kmeans_sides(args, k, gflops, notes)
        }
        res = raw[k] = measure(fns, device, 0, args.kmeans_repeats)
        ref = inertia(x, out["this project"][0], device)
        fresh = {
            side: fresh_fit_seconds(side, k, args, device, notes) if args.kmeans_fresh else None
            for side in res
        }
        for side, r in res.items():
            value, its = inertia(x, out[side][0], device), out[side][1]
            rows.append(
                {
                    "K": k,
                    "side": side,
                    "fit_s": r["median_s"],
                    "min_s": r["min_s"],
                    "iterations": its,
                    "s_per_iter": r["median_s"] / max(its, 1),
                    "inertia": value,
                    "inertia_vs_ours": value / ref - 1,
                    "ratio": r["median_s"] / res["this project"]["median_s"],
                    "first_fit_s": fresh[side],
                    "first_fit_ratio": fresh[side] / fresh["this project"]
                    if fresh[side] and fresh["this project"]
                    else None,
                    "peak_mb": r["peak_mb"],
                }
            )
    notes += [f"K={k} > N={len(x)}: skipped" for k in args.kmeans_ks if k > len(x)]
    if device.type == "cuda":
        notes.append(
            "scikit-learn and faiss-cpu run on the CPU: not the same device as this project's GPU run"
        )
    return {
        "N": len(x),
        "D": 768,
        "iterations": iters,
        "cpu_gflops_fp32": gflops,
        "threads": torch.get_num_threads(),
        "data": "synthetic_frames: low-rank latent with overlapping modes, noise, offset",
        "rows": rows,
        "notes": notes,
        "raw": raw,
    }


# -----------------------------------------------------------------------------
# case 6: model FLOPs utilisation (GPU only)


def step_flops(cfg, batch, samples, stage, masked_fraction=0.05):
    """Model FLOPs of one update on a padded (batch, samples) batch; backward = 2 x forward for trained
    parts (weight gradient only where the input needs none)."""
    conv, length, cin = [], samples, 1
    for cout, k, s in cfg.conv_layers:
        length = (length - k) // s + 1
        conv.append(2 * batch * length * cin * cout * k)
        cin = cout
    c, f, t = cfg.embed_dim, cfg.ffn_dim, length
    layers = cfg.num_layers * (batch * t * (8 * c * c + 4 * c * f) + 4 * batch * t * t * c)
    pos = 2 * batch * t * c * (c // cfg.pos_conv_groups) * cfg.pos_conv_kernel
    proj = 2 * batch * t * cfg.conv_dim * cfg.embed_dim
    if stage == "vft":  # conv encoder and projection frozen (forward only); transformer trained
        return sum(conv) + proj + 2 * pos + 3 * layers
    m, d = (
        masked_fraction * batch * t,
        cfg.final_dim,
    )  # TAPT: quantizer, projections, logits on the masked frames
    heads = m * (
        2 * cfg.conv_dim * cfg.latent_groups * cfg.latent_vars
        + 2 * d * d
        + 2 * cfg.embed_dim * d
        + 2 * (1 + cfg.num_negatives) * d
    )
    return 2 * conv[0] + 3 * sum(conv[1:]) + 3 * (proj + pos + layers + heads)


def peak_matmul_tflops(device, n=8192, repeats=10, per_call=20):
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty_like(a)

    def products():  # several per timed call: one 8192^3 product (~1.4 ms) is short beside the sync around it
        for _ in range(per_call):
            torch.mm(a, b, out=out)

    res = measure({"mm": products}, device, 1, repeats)
    return 2 * n**3 * per_call / res["mm"]["median_s"] / 1e12


def case_mfu(args, scale, device, dtype):
    if device.type != "cuda":
        return {"rows": [], "notes": ["skipped: GPU only"]}
    peak = peak_matmul_tflops(device)
    cfg, rng = model_config(scale), np.random.default_rng(args.seed + 6)
    batch = to_device(make_batch(iemocap_seconds(args.batch_size, rng), rng, MAX_SECONDS), device)
    b, s = batch["wav"].shape
    weights, gen = class_weight_tensor(device), torch.Generator().manual_seed(args.seed)
    clf, params = our_classifier(cfg, args.seed, device)
    vft = trainer(params, device, dtype, True)
    torch.manual_seed(args.seed)
    net = M.Wav2Vec2(cfg).to(device)
    tapt = trainer(list(net.parameters()), device, dtype, True)
    res = measure(
        {
            "V-FT": lambda: (clf.train(), vft(lambda: vft_terms(clf, batch, gen, weights))),
            "TAPT": lambda: (net.train(), tapt(lambda: tapt_terms(net, batch, gen))),
        },
        device,
        args.warmup,
        args.repeats,
    )
    rows = []
    for name, stage in (("V-FT", "vft"), ("TAPT", "tapt")):
        flops, t = step_flops(cfg, b, s, stage, TAPT_MASK[0]), res[name]["median_s"]
        rows.append(
            {
                "step": name,
                "step_ms": t * 1e3,
                "tflop_per_step": flops / 1e12,
                "achieved_tflops": flops / t / 1e12,
                "peak_tflops_bf16_matmul": peak,
                "mfu": flops / t / 1e12 / peak,
                "precision": precision_name(dtype),
            }
        )
    return {
        "batch": {"utterances": b, "padded_samples": s},
        "rows": rows,
        "raw": res,
        "notes": [
            "FLOPs counted on the padded batch; peak = 8192^3 bf16 matmuls in this run (median over timed calls of 20)"
        ],
    }


# -----------------------------------------------------------------------------
# --scaling: forward time (GPU memory) vs utterance length; k-means time vs frames


def loglog_slope(xs, ys):
    return float(np.polyfit(np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float)), 1)[0])


def scaling(args, scale, device, dtype):
    torch.manual_seed(args.seed)
    net = M.Wav2Vec2(model_config(scale)).to(device).eval()
    hf = hf_backbone(net, "sdpa").to(device).eval() if have("transformers") else None
    rows, slopes = [], {}
    for seconds in args.scaling_seconds:
        wav = torch.randn(1, int(seconds * SAMPLE_RATE), device=device) * 0.1
        fns = {
            "this project": lambda: net(wav),
            **({"transformers sdpa": lambda: hf(wav)} if hf is not None else {}),
        }

        def wrap(fn):
            def run():
                with (
                    torch.inference_mode(),
                    torch.autocast(device.type, dtype=dtype, enabled=dtype is not None),
                ):
                    fn()

            return run

        res = measure({k: wrap(f) for k, f in fns.items()}, device, 1, max(3, args.repeats // 2))
        rows += [
            {
                "what": "forward",
                "side": name,
                "seconds": seconds,
                "time_ms": r["median_s"] * 1e3,
                "mem_mb": r["peak_mb"],
            }
            for name, r in res.items()
        ]
    for side in {r["side"] for r in rows}:
        pts = [(r["seconds"], r["time_ms"]) for r in rows if r["side"] == side]
        slopes[f"forward time, {side}"] = loglog_slope(*zip(*pts))
        if (
            sum(p[0] >= 10 for p in pts) >= 2
        ):  # the long end, where attention's quadratic term shows first
            slopes[f"forward time >= 10 s, {side}"] = loglog_slope(
                *zip(*[p for p in pts if p[0] >= 10])
            )
    k, kpts = args.scaling_k, []
    for n in args.scaling_n:
        x = synthetic_frames(n, 768, args.seed)
        res = measure(
            {
                "k": lambda: kmeans_fit(
                    "this project", x, x[:k].clone(), args.kmeans_iters, device, args.seed
                )
            },
            device,
            1 if device.type == "cuda" else 0,
            3 if device.type == "cuda" else 1,
        )
        rows.append(
            {
                "what": f"k-means K={k}",
                "side": "this project",
                "frames": n,
                "time_ms": res["k"]["median_s"] * 1e3,
                "mem_mb": res["k"]["peak_mb"],
            }
        )
        kpts.append((n, res["k"]["median_s"]))
    slopes[f"k-means time vs frames (K={k})"] = loglog_slope(*zip(*kpts))
    return {
        "rows": rows,
        "loglog_slopes": slopes,
        "notes": ([] if hf is not None else [skipped("transformers")])
        + [
            "memory: CUDA peak allocated during a call above what was allocated before (not measured on the CPU)"
        ],
    }


# -----------------------------------------------------------------------------
# targets (reported, not asserted), output, command line


def targets(results, device):
    """The targets this run's rows speak to: [{target, goal, measured, met}]."""

    def ratio(case, side):
        return next(
            (r["ratio"] for r in results.get(case, {}).get("rows", []) if r.get("side") == side),
            None,
        )

    if device.type == "cpu":
        goals = [
            (
                "V-FT step vs transformers SDPA (CPU)",
                ">= 1.02x (run 5's)",
                ratio("1", "transformers sdpa"),
                1.02,
            )
        ]
    else:
        goals = [
            ("V-FT step vs transformers eager", ">= 1.5x", ratio("1", "transformers eager"), 1.5),
            ("V-FT step vs transformers SDPA", ">= 1.2x", ratio("1", "transformers sdpa"), 1.2),
            ("full epoch vs the release's way", ">= 2.5x", ratio("2", "release way"), 2.5),
        ]
    out = [
        {"target": name, "goal": goal, "measured": v, "met": v >= least}
        for name, goal, v, least in goals
        if v is not None
    ]
    n = results.get("5", {}).get("N")
    for r in results.get("5", {}).get("rows", []):
        if device.type == "cpu" and r["side"] == "scikit-learn":
            out.append(
                {
                    "target": f"k-means {n} x 768, K={r['K']} vs scikit-learn's Lloyd",
                    "goal": ">= 0.8x, inertia within 1%",
                    "measured": f"{r['ratio']:.2f}x, inertia {r['inertia_vs_ours']:+.1e}",
                    "met": r["ratio"] >= 0.8 and abs(r["inertia_vs_ours"]) <= 0.01,
                }
            )
        if (
            device.type == "cuda"
            and r["side"] == "this project"
            and r["K"] == 4096
            and n >= 1_000_000
        ):
            out.append(
                {
                    "target": "k-means 1M x 768, K=4096, 20 iterations",
                    "goal": "< 5 s",
                    "measured": r["fit_s"],
                    "met": r["fit_s"] < 5,
                }
            )
    out += [
        {
            "target": "MFU of the V-FT step (bf16)",
            "goal": ">= 35%",
            "measured": r["mfu"],
            "met": r["mfu"] >= 0.35,
        }
        for r in results.get("6", {}).get("rows", [])
        if r["step"] == "V-FT"
    ]
    return out


def fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-2) else f"{v:.2f}"
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


STEP_COLUMNS = ["side", "step_ms", "min_ms", "audio_s_per_s", "peak_mb", "ratio"]
CASES = {
    "1": ("V-FT training step (clean recipe)", case_vft_step, STEP_COLUMNS),
    "2": (
        "full V-FT epoch, data loading included",
        case_epoch,
        ["side", "epoch_s", "steps", "audio_s_per_s", "padded_frames", "precision", "ratio"],
    ),
    "3": ("inference (frame features)", case_inference, ["side", "batch_ms"] + STEP_COLUMNS[2:]),
    "4": ("TAPT / P-TAPT update steps", case_pretrain_steps, ["stage"] + STEP_COLUMNS),
    "5": (
        "k-means",
        case_kmeans,
        [
            "K",
            "side",
            "fit_s",
            "min_s",
            "first_fit_s",
            "iterations",
            "s_per_iter",
            "inertia",
            "inertia_vs_ours",
            "ratio",
            "first_fit_ratio",
            "peak_mb",
        ],
    ),
    "6": (
        "model FLOPs utilisation (GPU only)",
        case_mfu,
        [
            "step",
            "step_ms",
            "tflop_per_step",
            "achieved_tflops",
            "peak_tflops_bf16_matmul",
            "mfu",
            "precision",
        ],
    ),
}


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    a, s, r = p.add_argument, SCALES["small"], SCALES["real"]
    both = lambda key: f"(default: --small {s[key]}, real scale {r[key]})"
    a("--small", action="store_true", help="small model and sizes for a 2-core CPU")
    a(
        "--cases",
        default="1,2,3,4,5,6",
        help="comma-separated case numbers, or 'none' (default: %(default)s)",
    )
    a("--scaling", action="store_true", help="also run the scaling measurements (length, frames)")
    a("--json", default="bench.json", help="where to write the results (default: %(default)s)")
    a(
        "--device",
        default="auto",
        help="auto (cuda if available), cpu, cuda, cuda:1 (default: %(default)s)",
    )
    a(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="of every side in cases 1, 3-6: auto = bf16 on GPUs that have it (else fp16), fp32 on CPU; "
        "case 2's release side is always fp16 on GPU, fp32 on CPU (default: %(default)s)",
    )
    a("--seed", type=int, default=0, help="(default: %(default)s)")
    a(
        "--warmup",
        type=int,
        default=None,
        help="untimed calls of every side first " + both("warmup"),
    )
    a(
        "--repeats",
        type=int,
        default=None,
        help="timed rounds; medians are reported " + both("repeats"),
    )
    a(
        "--batch-size",
        type=int,
        default=None,
        help="utterances per training batch, cases 1, 4, 6 " + both("batch_size"),
    )
    a(
        "--infer-batch",
        type=int,
        default=None,
        help="utterances per inference batch, case 3 " + both("infer_batch"),
    )
    a(
        "--utterances",
        type=int,
        default=None,
        help="case 2's synthetic corpus size " + both("utterances"),
    )
    a("--epoch-batch", type=int, default=None, help="case 2's batch size " + both("epoch_batch"))
    a("--epochs", type=int, default=None, help="case 2's timed epochs per side " + both("epochs"))
    a("--workers", type=int, default=None, help="case 2's data loader processes " + both("workers"))
    a(
        "--tmp-dir",
        default=None,
        help="case 2: where the temporary wav files go (default: the system's)",
    )
    a("--kmeans-n", type=int, default=None, help="frames to cluster in case 5 " + both("kmeans_n"))
    a(
        "--kmeans-ks",
        type=int,
        nargs="+",
        default=None,
        help="cluster counts in case 5 " + both("kmeans_ks"),
    )
    a(
        "--kmeans-iters",
        type=int,
        default=20,
        help="most Lloyd iterations (the release: 20) (default: %(default)s)",
    )
    a(
        "--kmeans-repeats",
        type=int,
        default=None,
        help="timed fits per implementation " + both("kmeans_repeats"),
    )
    a(
        "--kmeans-fresh",
        action="store_true",
        help="case 5: also time each side's first fit in a fresh process",
    )
    a(
        "--opponent-budget-s",
        type=float,
        default=60.0,
        help="case 5: skip the CPU libraries for a K whose fit would take longer, roughly (default: %(default)s)",
    )
    a(
        "--scaling-seconds",
        type=float,
        nargs="+",
        default=None,
        help="utterance lengths " + both("scaling_seconds"),
    )
    a(
        "--scaling-n",
        type=int,
        nargs="+",
        default=None,
        help="k-means frame counts " + both("scaling_n"),
    )
    a("--scaling-k", type=int, default=None, help="k-means K for scaling " + both("scaling_k"))
    a(
        "--profile",
        action="store_true",
        help="cases 1, 3, 4: print a torch.profiler table of one call of each side",
    )
    return p


def report(key, title, res, columns):
    print_table(f"[{key}] {title}  ({res['wall_s']} s)", res["rows"], columns)
    for name in ("batch", "parity_max_abs_diff", "loglog_slopes"):
        if res.get(name):
            print(f"  {name}: " + ", ".join(f"{k}={fmt(v)}" for k, v in res[name].items()))
    for note in res.get("notes", []):
        print(f"  {note}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    scale = SCALES["small" if args.small else "real"]
    for key, value in scale.items():
        if key != "model" and getattr(args, key, None) is None:
            setattr(args, key, value)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    dtype = autocast_dtype(device, args.precision)
    cases = (
        []
        if args.cases.strip().lower() in ("", "none")
        else [c.strip() for c in args.cases.split(",")]
    )
    if any(c not in CASES for c in cases):
        sys.exit(
            f"error: unknown case(s) {[c for c in cases if c not in CASES]}; choose from {sorted(CASES)}"
        )
    meta = {
        "command": " ".join(["python", "bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "scale": "small" if args.small else "real",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "precision": precision_name(dtype),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "libraries": {
            m: have(m) and getattr(__import__(m), "__version__", None)
            for m in ("transformers", "torchaudio", "sklearn", "faiss")
        },
        "model": C.config_dict(model_config(scale)),
        "load_average_at_start": os.getloadavg(),
    }
    print(
        f"bench: {meta['scale']} scale on {device} ({meta['device_name']}), precision {meta['precision']}, "
        f"torch {torch.__version__}, {meta['cpu_threads']} threads, load {meta['load_average_at_start'][0]:.2f}"
    )
    results, t_start = {}, time.perf_counter()
    todo = [(c, *CASES[c]) for c in cases] + (
        [
            (
                "scaling",
                "forward pass and k-means",
                scaling,
                ["what", "side", "seconds", "frames", "time_ms", "mem_mb"],
            )
        ]
        if args.scaling
        else []
    )
    for key, title, fn, columns in todo:
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        results[key] = res = fn(args, scale, device, dtype)
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        report(key, title, res, columns)
    goals = targets(results, device)
    print_table("targets (reported, not asserted)", goals, ["target", "goal", "measured", "met"])
    meta.update(wall_s=round(time.perf_counter() - t_start, 1), load_average_at_end=os.getloadavg())
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "results": results, "targets": goals}, f, indent=1, default=str)
    print(
        f"\nwrote {args.json} ({meta['wall_s']} s; load average at the end {meta['load_average_at_end'][0]:.2f})"
    )


if __name__ == "__main__":
    main()
