"""wav2vec 2.0 in plain PyTorch, loading fairseq checkpoints directly.

Reads top to bottom: configuration, the modules (FeatureEncoder, PositionalConv, EncoderLayer,
Encoder, Quantizer), the model, span masking, the emotion classifier, wav2vec (v1) (the release
recipe's P-TAPT teacher), then checkpoint I/O (a safe unpickler, fairseq and Hugging Face key
mapping, a safetensors reader, the project's own format).
Semantics follow fairseq's fairseq/models/wav2vec/wav2vec2.py (v1: wav2vec.py); see RECIPE.md "Backbone".
"""
from __future__ import annotations

import argparse
import ast
import collections
import json
import math
import os
import pickle
import re
import sys
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

SAMPLE_RATE = 16000  # wav2vec 2.0 takes 16 kHz mono audio
MIN_SAMPLES = 400    # the conv stack's receptive field (25 ms): shorter input gives no frame
# fairseq's default conv stack: 7 layers, 320x downsampling, 25 ms receptive field (400 samples).
BASE_CONV_LAYERS = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2


@dataclass
class Wav2Vec2Config:
    # defaults are wav2vec_small.pt (RECIPE.md "Backbone"); fairseq's argument names in comments
    conv_layers: list = field(default_factory=lambda: list(BASE_CONV_LAYERS))  # conv_feature_layers
    extractor_mode: str = "default"    # "default": group norm on layer 0; "layer_norm": LN on every layer
    conv_bias: bool = False
    embed_dim: int = 768               # encoder_embed_dim
    ffn_dim: int = 3072                # encoder_ffn_embed_dim
    num_layers: int = 12               # encoder_layers
    num_heads: int = 12                # encoder_attention_heads
    layer_norm_first: bool = False     # pre-LN transformer (large models)
    pos_conv_kernel: int = 128         # conv_pos
    pos_conv_groups: int = 16          # conv_pos_groups
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    dropout_input: float = 0.1         # on the projected features
    dropout_features: float = 0.1      # on the unmasked features that feed the quantizer
    layerdrop: float = 0.05            # encoder_layerdrop
    feature_grad_mult: float = 0.1     # gradient scale into the conv encoder
    normalize: bool = False            # task.normalize: zero-mean unit-variance waveform per utterance
    has_quantizer: bool = True         # False for ASR fine-tuned checkpoints
    final_dim: int = 256
    latent_vars: int = 320
    latent_groups: int = 2
    latent_dim: int = 0                # 0: final_dim
    latent_temp: tuple = (2.0, 0.5, 0.999995)  # (start, end, decay per update)
    logit_temp: float = 0.1
    num_negatives: int = 100

    @property
    def conv_dim(self):
        return self.conv_layers[-1][0]


# -----------------------------------------------------------------------------
# modules

class FeatureEncoder(nn.Module):
    """Waveform -> 50 Hz conv features (B, C, F). Group norm on layer 0 is computed over each
    utterance's valid frames only, so an utterance gives the same features whatever it is batched
    with (fairseq normalises over the padding too; on unpadded input the two agree exactly)."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.mode = cfg.extractor_mode
        in_dims = [1] + [d for d, _, _ in cfg.conv_layers[:-1]]
        self.convs = nn.ModuleList(nn.Conv1d(i, d, k, s, bias=cfg.conv_bias)
                                   for i, (d, k, s) in zip(in_dims, cfg.conv_layers))
        for conv in self.convs:  # fairseq's ConvFeatureExtractionModel (conv biases keep torch's default)
            nn.init.kaiming_normal_(conv.weight)
        if self.mode == "default":
            d0 = cfg.conv_layers[0][0]
            self.norms = nn.ModuleList([nn.GroupNorm(d0, d0)])
        else:
            self.norms = nn.ModuleList(nn.LayerNorm(d) for d, _, _ in cfg.conv_layers)

    def output_lengths(self, lengths, num_layers=None):
        for conv in self.convs[:num_layers]:
            lengths = torch.div(lengths - conv.kernel_size[0], conv.stride[0], rounding_mode="floor") + 1
        return lengths

    def forward(self, wav, lengths=None):
        x = wav.unsqueeze(1)
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if self.mode == "default" and i == 0:
                x = masked_group_norm(x, None if lengths is None else self.output_lengths(lengths, 1), self.norms[0])
            elif self.mode == "layer_norm":
                x = self.norms[i](x.transpose(1, 2).float()).transpose(1, 2).type_as(x)
            x = F.gelu(x)
        return x


def masked_group_norm(x, lengths, norm: nn.GroupNorm):
    """A group norm in float32 (fairseq's Fp32GroupNorm: wav2vec 2.0's layer 0, one group per channel;
    every block of wav2vec (v1), one group) with each utterance's statistics over its valid frames only
    (lengths None: over all frames), so the result is exactly what it gets unbatched. The padded frames
    are left as they come: no valid frame of the next conv reads them."""
    weight, bias = (None, None) if norm.weight is None else (norm.weight.float(), norm.bias.float())  # v1: affine or not

    def group_norm(y):
        return F.group_norm(y.float(), norm.num_groups, weight, bias, norm.eps).type_as(y)
    if lengths is None:
        return group_norm(x)
    # Without autograd (V-FT's frozen encoder, inference) the fresh conv output is overwritten in place:
    # 2-5x faster on the CPU than writing a second (B, C, T) tensor (BENCHMARKS.md, group norm).
    out = torch.zeros_like(x) if x.requires_grad else x
    for i, n in enumerate(lengths.tolist()):
        out[i, :, :n] = group_norm(x[i, None, :, :n])[0]
    return out


class PositionalConv(nn.Module):
    """Relative position information: a wide grouped conv with weight norm over the kernel axis
    (fairseq stores it as weight_g (1, 1, K) and weight_v (C, C/groups, K))."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        c, k, g = cfg.embed_dim, cfg.pos_conv_kernel, cfg.pos_conv_groups
        std = math.sqrt(4 / (k * c))  # fairseq's init: N(0, sqrt(4 (1 - dropout) / (K C))), its dropout fixed at 0
        self.weight_v = nn.Parameter(torch.randn(c, c // g, k) * std)
        self.weight_g = nn.Parameter(self.weight_v.detach().norm(dim=(0, 1), keepdim=True))
        self.bias = nn.Parameter(torch.zeros(c))
        self.groups, self.kernel = g, k

    def forward(self, x):  # (B, T, C), padded frames already zero
        weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=(0, 1), keepdim=True))
        y = F.conv1d(x.transpose(1, 2), weight.to(x.dtype), self.bias.to(x.dtype),
                     padding=self.kernel // 2, groups=self.groups)
        if self.kernel % 2 == 0:  # "same" padding for an even kernel drops the last frame
            y = y[..., :-1]
        return F.gelu(y).transpose(1, 2)


class SelfAttention(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        c = cfg.embed_dim
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(c, c) for _ in range(4))
        self.num_heads, self.dropout = cfg.num_heads, cfg.attention_dropout

    def forward(self, x, attn_mask):  # attn_mask: (B, 1, 1, T) True = attend, or None
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.num_heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class EncoderLayer(nn.Module):
    """fairseq's TransformerSentenceEncoderLayer: post-LN (base) or pre-LN (large)."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.embed_dim)
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.embed_dim)
        self.final_layer_norm = nn.LayerNorm(cfg.embed_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.activation_dropout = nn.Dropout(cfg.activation_dropout)
        self.pre_ln = cfg.layer_norm_first

    def feed_forward(self, x):
        return self.dropout(self.fc2(self.activation_dropout(F.gelu(self.fc1(x)))))

    def forward(self, x, attn_mask):
        if self.pre_ln:
            x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x), attn_mask))
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(x + self.dropout(self.self_attn(x, attn_mask)))
        return self.final_layer_norm(x + self.feed_forward(x))


def init_bert_params(module):
    """fairseq's init_bert_params (fairseq/modules/transformer_sentence_encoder.py), which its
    wav2vec 2.0 TransformerEncoder applies to itself: every Linear N(0, 0.02) with zero bias.
    (The attention projections are Linears here; LayerNorms and the positional conv keep theirs.)"""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        nn.init.zeros_(module.bias)


class Encoder(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.pos_conv = PositionalConv(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layer_norm_first, self.layerdrop = cfg.layer_norm_first, cfg.layerdrop
        self.apply(init_bert_params)

    def forward(self, x, padding_mask=None, layer=None):
        """layer=k returns the output of layer k (1-based) as fairseq does: for pre-LN models
        without the final layer norm, which only the full stack's output gets."""
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        x = x + self.pos_conv(x)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = self.dropout(x)
        attn_mask = None if padding_mask is None else ~padding_mask[:, None, None, :]
        last = len(self.layers) if layer is None else layer
        for i, block in enumerate(self.layers[:last]):
            # layer drop as fairseq does it (never the requested layer's output itself)
            if self.training and self.layerdrop > 0 and torch.rand(()) < self.layerdrop and i + 1 != layer:
                continue
            x = block(x, attn_mask)
        if self.layer_norm_first and layer is None:
            x = self.layer_norm(x)
        return x


class Quantizer(nn.Module):
    """fairseq's GumbelVectorQuantizer: G groups of V codewords, straight-through hard Gumbel
    softmax in training, argmax in eval. Returns the codewords and the softmax perplexity
    (of the batch-averaged distribution, summed over groups) for the diversity loss."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        dim = (cfg.latent_dim or cfg.final_dim)
        self.groups, self.num_vars = cfg.latent_groups, cfg.latent_vars
        self.vars = nn.Parameter(torch.rand(1, self.groups * self.num_vars, dim // self.groups))
        self.weight_proj = nn.Linear(cfg.conv_dim, self.groups * self.num_vars)
        nn.init.normal_(self.weight_proj.weight, std=1.0)
        nn.init.zeros_(self.weight_proj.bias)
        self.max_temp, self.min_temp, self.temp_decay = cfg.latent_temp
        self.temperature = self.max_temp

    def set_num_updates(self, num_updates):
        self.temperature = max(self.max_temp * self.temp_decay ** num_updates, self.min_temp)

    def forward(self, x, rows=None):  # (N, conv_dim) -> (N, dim), perplexity (of the `rows` given, or all)
        N = x.shape[0]
        logits = self.weight_proj(x).view(N * self.groups, self.num_vars)
        probs = logits.float().softmax(-1).view(N, self.groups, -1)
        avg_probs = (probs if rows is None else probs[rows]).mean(0)
        perplexity = torch.exp(-(avg_probs * torch.log(avg_probs + 1e-7)).sum(-1)).sum()
        if self.training:
            onehot = F.gumbel_softmax(logits.float(), tau=self.temperature, hard=True).type_as(x)
        else:
            onehot = F.one_hot(logits.argmax(-1), self.num_vars).type_as(x)
        onehot = onehot.view(N, self.groups, self.num_vars, 1)
        codewords = self.vars.view(self.groups, self.num_vars, -1)
        return (onehot * codewords).sum(2).reshape(N, -1), perplexity


class GradScale(torch.autograd.Function):
    """Identity forward, gradient scaled backward (fairseq's GradMultiply)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


# -----------------------------------------------------------------------------
# the model

@dataclass
class Encoded:
    hidden: torch.Tensor          # (B, F, embed_dim) transformer output (or layer k's)
    frame_lengths: torch.Tensor   # (B,) valid frames per utterance
    features: torch.Tensor        # (B, F, conv_dim) layer-normed conv features, unmasked (quantizer input)
    feature_penalty: torch.Tensor  # mean of squared conv features (fairseq's features_pen)


class Wav2Vec2(nn.Module):
    """A fresh model is initialised as fairseq's Wav2Vec2Model (conv: Kaiming normal; transformer:
    init_bert_params; positional conv, mask_emb and quantizer as in fairseq; post_extract_proj,
    project_q, final_proj: torch's defaults, as fairseq leaves them). Loading a checkpoint replaces all of it."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.cfg = cfg
        self.feature_encoder = FeatureEncoder(cfg)
        self.layer_norm = nn.LayerNorm(cfg.conv_dim)
        self.post_extract_proj = nn.Linear(cfg.conv_dim, cfg.embed_dim)
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        self.dropout_features = nn.Dropout(cfg.dropout_features)
        self.mask_emb = nn.Parameter(torch.empty(cfg.embed_dim).uniform_())
        self.encoder = Encoder(cfg)
        if cfg.has_quantizer:
            self.quantizer = Quantizer(cfg)
            self.project_q = nn.Linear(cfg.latent_dim or cfg.final_dim, cfg.final_dim)
            self.final_proj = nn.Linear(cfg.embed_dim, cfg.final_dim)
        self.feature_grad_mult = cfg.feature_grad_mult
        self.features_frozen = False
        # the release's training: the conv encoder's group norm sees the padded batch (it tested one
        # utterance at a time, which is what per-utterance statistics give in eval mode)
        self.norm_over_padding = False

    def freeze_feature_encoder(self):
        """V-FT, the P-TAPT teacher and P-TAPT (RECIPE.md): the conv encoder, its layer norm and the
        projection run without grad; only the transformer trains (the mask embedding and the
        pretraining heads stay as loaded). Returns the parameters left to train."""
        self.features_frozen = True
        self.requires_grad_(False)
        self.encoder.requires_grad_(True)
        return list(self.encoder.parameters())

    def frame_lengths(self, wav_lengths):
        return self.feature_encoder.output_lengths(wav_lengths)

    def check_input(self, wav, wav_lengths):
        """Returns the lengths as a CPU tensor (given or the full width), after checking them."""
        if not torch.is_tensor(wav) or wav.dim() != 2:
            shape = tuple(wav.shape) if torch.is_tensor(wav) else type(wav).__name__
            raise ValueError(f"wav must be a (batch, samples) tensor of mono 16 kHz audio, got {shape}; "
                             "average the channels of stereo audio first")
        if not wav.is_floating_point():
            raise TypeError(f"wav must be floating point (float32 in [-1, 1]), got {wav.dtype}")
        if wav_lengths is None:
            wav_lengths = torch.full((wav.shape[0],), wav.shape[1], dtype=torch.long)
        wav_lengths = torch.as_tensor(wav_lengths).long().cpu()
        if wav_lengths.shape != (wav.shape[0],):
            raise ValueError(f"wav_lengths must have shape ({wav.shape[0]},), got {tuple(wav_lengths.shape)}")
        if int(wav_lengths.max()) > wav.shape[1]:
            raise ValueError(f"wav_lengths exceed the padded length {wav.shape[1]}: max {int(wav_lengths.max())}")
        if int(wav_lengths.min()) < MIN_SAMPLES:
            raise ValueError(f"every utterance needs at least {MIN_SAMPLES} samples (25 ms at 16 kHz), "
                             f"got {int(wav_lengths.min())}")
        return wav_lengths

    def features(self, wav, wav_lengths):
        """Conv features (B, C, F) and their mean square over valid frames (fairseq's features_pen).
        The group norm sees each utterance's valid samples only (see masked_group_norm)."""
        if self.cfg.normalize:  # per utterance over its valid samples, as fairseq's dataset does
            valid = torch.arange(wav.shape[1], device=wav.device) < wav_lengths.to(wav.device)[:, None]
            n = wav_lengths.to(wav.device)[:, None].to(wav.dtype)
            mean = (wav * valid).sum(1, keepdim=True) / n
            var = (((wav - mean) * valid) ** 2).sum(1, keepdim=True) / n
            wav = ((wav - mean) * torch.rsqrt(var + 1e-5)) * valid
        per_utterance = not (self.norm_over_padding and self.training) and int(wav_lengths.min()) < wav.shape[1]
        feats = self.feature_encoder(wav, wav_lengths if per_utterance else None)
        frames = self.frame_lengths(wav_lengths).to(feats.device)
        valid = torch.arange(feats.shape[-1], device=feats.device) < frames[:, None]
        penalty = (feats.float().pow(2) * valid.unsqueeze(1)).sum() / (frames.sum() * feats.shape[1])
        return feats, penalty

    def encode(self, wav, wav_lengths=None, layer=None, time_mask=None, channel_mask=None) -> Encoded:
        """time_mask (B, F) bool: frames replaced by the mask embedding; channel_mask (B, embed_dim)
        bool: channels zeroed. Both act on the projected features, as in fairseq and the release."""
        wav_lengths = self.check_input(wav, wav_lengths)
        if layer is not None and not 1 <= layer <= len(self.encoder.layers):
            raise ValueError(f"layer must be in 1..{len(self.encoder.layers)}, got {layer}")
        frozen = self.features_frozen
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            feats, penalty = self.features(wav, wav_lengths)
            if self.feature_grad_mult != 1.0 and not frozen and torch.is_grad_enabled():
                feats = GradScale.apply(feats, self.feature_grad_mult)
            feats = self.layer_norm(feats.transpose(1, 2))
            x = self.post_extract_proj(feats)
        frames = self.frame_lengths(wav_lengths)
        padding_mask = None  # None keeps attention on its unmasked kernels
        if int(frames.min()) < x.shape[1]:
            padding_mask = (torch.arange(x.shape[1]) >= frames[:, None]).to(x.device)
        x = self.dropout_input(x)
        if time_mask is not None:
            x = torch.where(time_mask.unsqueeze(-1), self.mask_emb.to(x.dtype), x)
        if channel_mask is not None:
            x = x.masked_fill(channel_mask.unsqueeze(1), 0.0)
        hidden = self.encoder(x, padding_mask, layer)
        if padding_mask is not None:
            hidden = hidden.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        return Encoded(hidden, frames.to(x.device), self.dropout_features(feats), penalty)

    def forward(self, wav, wav_lengths=None, layer=None, time_mask=None, channel_mask=None):
        e = self.encode(wav, wav_lengths, layer, time_mask, channel_mask)
        return e.hidden, e.frame_lengths


# -----------------------------------------------------------------------------
# span masking (V-FT, TAPT, P-TAPT)

def compute_span_mask(lengths, max_len, prob, span, min_spans, semantics="hf", generator=None):
    """Boolean (B, max_len) mask of spans inside each utterance's valid frames.

    semantics="hf": Hugging Face's _compute_mask_indices (what the release used): one U[0,1)
      for the call; spans = max(min_spans, int(prob * length / span + u)); starts drawn without
      replacement from [0, length - span].
    semantics="fairseq": fairseq's compute_mask_indices with require_same_masks: a U[0,1) per
      utterance, starts from [0, length - span - 1], then every utterance cut down (at random) to
      the smallest number of masked frames in the batch, so masked counts are equal.
    """
    lengths = [int(n) for n in lengths]
    g = generator
    mask = torch.zeros(len(lengths), max_len, dtype=torch.bool)
    u_call = float(torch.rand((), generator=g))
    chosen = []
    for n in lengths:
        if semantics == "hf":
            k = max(min_spans, int(prob * n / span + u_call))
            k = max(min(k, max_len // span, n - (span - 1)), 0)
            starts = torch.randperm(max(n - span + 1, 0), generator=g)[:k]
        elif semantics == "fairseq":
            k = max(min_spans, int(prob * n / span + float(torch.rand((), generator=g))))
            room = n - span
            if room <= k:
                room = n - k - 1
            starts = torch.randperm(max(room, 0), generator=g)[:k]
        else:
            raise ValueError(f"semantics must be 'hf' or 'fairseq', got {semantics!r}")
        idx = (starts[:, None] + torch.arange(span)).flatten()
        idx = idx[idx < n].unique()
        chosen.append(idx)
    if semantics == "fairseq" and chosen:
        fewest = min(len(c) for c in chosen)
        chosen = [c[torch.randperm(len(c), generator=g)[:fewest]] if len(c) > fewest else c for c in chosen]
    for i, idx in enumerate(chosen):
        mask[i, idx] = True
    return mask


def utterance_span_masks(lengths, max_len, rngs, prob, span, min_spans):
    """Hugging Face span masks drawn per utterance, each from its own generator: the U[0,1) in the
    span count is drawn per utterance instead of once per batch (modern Hugging Face), so an
    utterance's mask depends neither on its batch nor on the number of processes."""
    mask = torch.zeros(len(lengths), max_len, dtype=torch.bool)
    for row, (n, rng) in enumerate(zip(lengths, rngs)):
        n = int(n)
        mask[row, :n] = compute_span_mask([n], n, prob, span, min_spans, "hf", rng)[0]
    return mask


def batch_span_masks(lengths, max_len, batch_rng, rngs, prob, span, min_spans):
    """transformers 4.10's _compute_mask_indices, which the release ran (RECIPE.md "What the release
    actually computed"): ONE span count for the whole batch from its padded length T,
    n = max(min_spans, int(prob * T / span + u)), u ~ U[0,1), cut to T // span when n * span > T;
    every row's n starts uniform without replacement over 0..T - span (spans may overlap); only then
    are the positions past each row's length cleared, so a short utterance in a long batch is masked
    much less. u comes from batch_rng and each row's starts from its own generator."""
    mask = torch.zeros(len(lengths), max_len, dtype=torch.bool)
    if max_len < span:  # (4.10 raises here; no batch of the recipe is this short)
        return mask
    n = max(min_spans, int(prob * max_len / span + float(torch.rand((), generator=batch_rng))))
    if n * span > max_len:
        n = max_len // span
    for row, (length, rng) in enumerate(zip(lengths, rngs)):
        starts = torch.randperm(max_len - span + 1, generator=rng)[:n]
        mask[row, (starts[:, None] + torch.arange(span)).flatten()] = True
        mask[row, int(length):] = False
    return mask


def span_masks(semantics, lengths, max_len, rngs, batch_rng, prob, span, min_spans):
    """(B, max_len) span masks inside each row's valid frames: semantics "batch" (the release,
    batch_span_masks), "utterance" (modern Hugging Face, utterance_span_masks) or "fairseq"
    (compute_span_mask, one draw for the batch)."""
    if semantics == "batch":
        return batch_span_masks(lengths, max_len, batch_rng, rngs, prob, span, min_spans)
    if semantics == "utterance":
        return utterance_span_masks(lengths, max_len, rngs, prob, span, min_spans)
    return compute_span_mask(lengths, max_len, prob, span, min_spans, "fairseq", batch_rng)


# -----------------------------------------------------------------------------
# emotion classifier (V-FT head, RECIPE.md "V-FT")

class EmotionClassifier(nn.Module):
    """ReLU on the transformer output, mean over valid frames, ReLU, Linear. skip_last_frame: the
    release's mean leaves out each utterance's last frame (its PretrainedRNNHead sums frames
    t < n - 1 and divides by n - 1; read from its code, not in RECIPE.md)."""

    def __init__(self, backbone: Wav2Vec2, classes, skip_last_frame=False):
        super().__init__()
        self.backbone, self.classes, self.skip_last_frame = backbone, list(classes), skip_last_frame
        self.head = nn.Linear(backbone.cfg.embed_dim, len(self.classes))

    def forward(self, wav, wav_lengths=None, time_mask=None, channel_mask=None):
        hidden, frame_lengths = self.backbone(wav, wav_lengths, time_mask=time_mask, channel_mask=channel_mask)
        pooled = masked_mean(F.relu(hidden), (frame_lengths - 1).clamp(min=1) if self.skip_last_frame else frame_lengths)
        return self.head(F.relu(pooled))


def masked_mean(x, lengths):  # x (B, F, C): mean over each row's first lengths[b] frames
    valid = (torch.arange(x.shape[1], device=x.device) < lengths[:, None]).unsqueeze(-1)
    return (x * valid).sum(1) / lengths[:, None].to(x.dtype)


# -----------------------------------------------------------------------------
# wav2vec (v1): the release's P-TAPT teacher (RECIPE.md "What the release actually computed")
#
# fairseq's wav2vec_large.pt, as fairseq/models/wav2vec/wav2vec.py computes it (Wav2VecModel's
# ConvFeatureExtractionModel and ConvAggegator; the prediction head serves its pretraining loss only),
# then the release's Conv1d(512, 512, 4, stride 2) + ReLU from 100 Hz to wav2vec 2.0's 50 Hz.
# v1 has no padding mask and every group norm has one group (statistics over all channels and frames),
# so padding reaches every frame in fairseq. Given lengths, the statistics here run over each
# utterance's valid frames: the extractor's convs are unpadded and the aggregator's causal, so every
# valid frame then equals the unpadded result. The release never padded v1 input (teacher batches
# are cropped to their shortest utterance, clustering runs one utterance at a time).

# wav2vec_large.pt: 7 feature layers, hop 160 samples (100 Hz), receptive field 465; 12 causal
# aggregator layers of kernel 2..13 (fairseq's examples/wav2vec training command, and the model
# fairseq prints when it loads the file). The loader reads every setting from the file.
LARGE_CONV_LAYERS = [(512, 10, 5), (512, 8, 4)] + [(512, 4, 2)] * 3 + [(512, 1, 1)] * 2
LARGE_AGG_LAYERS = [(512, k, 1) for k in range(2, 14)]


@dataclass
class Wav2Vec1Config:
    # defaults are wav2vec_large.pt's; fairseq's argument names in comments
    conv_layers: list = field(default_factory=lambda: list(LARGE_CONV_LAYERS))  # conv_feature_layers
    agg_layers: list = field(default_factory=lambda: list(LARGE_AGG_LAYERS))    # conv_aggregator_layers
    log_compression: bool = True   # log_compression: features -> log(|x| + 1)
    skip_feat: bool = False        # skip_connections_feat: skips between equal-width feature layers
    skip_agg: bool = True          # skip_connections_agg
    residual_scale: float = 0.5    # residual_scale: a skip gives (x + residual) * sqrt(residual_scale)
    agg_zero_pad: bool = False     # agg_zero_pad: causal padding by zeros instead of repeating frame 0
    agg_bias: bool = True          # not no_conv_bias (the aggregator's convs; the extractor's never have one)
    affine: bool = True            # not non_affine_group_norm
    activation: str = "relu"       # activation: relu | gelu
    dropout: float = 0.0           # dropout: after every aggregator conv (fairseq fixes the extractor's at 0)

    @property
    def min_samples(self):  # the feature extractor's receptive field (Large: 465): shorter input gives no frame
        receptive, hop = 1, 1
        for _, k, s in self.conv_layers:
            receptive, hop = receptive + (k - 1) * hop, hop * s
        return receptive


class ConvBlock(nn.Module):
    """conv -> dropout -> group norm (one group, fairseq's Fp32GroupNorm) -> activation, one layer of
    either stack. causal: fairseq's aggregator pads k - 1 frames on the left (ka + kb in ConvAggegator),
    so frame t reads frames <= t and the length is kept."""

    def __init__(self, n_in, n_out, k, stride, bias, cfg: Wav2Vec1Config, causal):
        super().__init__()
        self.left_pad = k - 1 if causal else 0
        self.pad_mode = "constant" if cfg.agg_zero_pad else "replicate"
        self.conv = nn.Conv1d(n_in, n_out, k, stride, bias=bias)
        self.dropout = nn.Dropout(cfg.dropout if causal else 0.0)
        self.norm = nn.GroupNorm(1, n_out, affine=cfg.affine)
        self.act = nn.GELU() if cfg.activation == "gelu" else nn.ReLU()

    def output_lengths(self, lengths):
        k, s = self.conv.kernel_size[0], self.conv.stride[0]
        return (torch.div(lengths + self.left_pad - k, s, rounding_mode="floor") + 1).clamp(min=0)

    def forward(self, x, lengths=None):
        if self.left_pad:
            x = F.pad(x, (self.left_pad, 0), mode=self.pad_mode)
        x = self.dropout(self.conv(x))
        return self.act(masked_group_norm(x, None if lengths is None else self.output_lengths(lengths), self.norm))


def stack_lengths(blocks, lengths):
    for block in blocks:
        lengths = block.output_lengths(lengths)
    return lengths


class FeatureExtractor(nn.Module):
    """Waveform (B, L) -> features (B, C, T): unpadded convs without bias, optional skips, log compression."""

    def __init__(self, cfg: Wav2Vec1Config):
        super().__init__()
        dims = [1] + [d for d, _, _ in cfg.conv_layers]
        self.blocks = nn.ModuleList(ConvBlock(i, d, k, s, False, cfg, causal=False)
                                    for i, (d, k, s) in zip(dims, cfg.conv_layers))
        self.skip, self.scale, self.log_compression = cfg.skip_feat, math.sqrt(cfg.residual_scale), cfg.log_compression

    def forward(self, wav, lengths=None):
        x = wav.unsqueeze(1)
        for block in self.blocks:
            residual, x = x, block(x, lengths)
            if self.skip and x.size(1) == residual.size(1):
                # fairseq keeps every step-th residual frame, step = the ratio of the widths (the stride, except
                # for very short input); taken from each utterance's own widths, so padding cannot change it
                n_in = torch.tensor([residual.size(2)]) if lengths is None else lengths
                step = n_in // block.output_lengths(n_in).clamp(min=1)
                index = (torch.arange(x.size(2)) * step[:, None]).clamp(max=residual.size(2) - 1).to(x.device)
                x = (x + residual.gather(2, index[:, None].expand(x.size(0), x.size(1), -1))) * self.scale
            lengths = None if lengths is None else block.output_lengths(lengths)
        return (x.abs() + 1).log() if self.log_compression else x


class Aggregator(nn.Module):
    """fairseq's 'cnn' aggregator (the context network): causal conv blocks, each with a skip (skip_agg; through a
    1x1 conv without bias where the width changes), scaled by sqrt(residual_scale). Output (B, C, T), same rate."""

    def __init__(self, cfg: Wav2Vec1Config):
        super().__init__()
        dims = [cfg.conv_layers[-1][0]] + [d for d, _, _ in cfg.agg_layers]
        self.blocks = nn.ModuleList(ConvBlock(i, d, k, s, cfg.agg_bias, cfg, causal=True)
                                    for i, (d, k, s) in zip(dims, cfg.agg_layers))
        self.residual_proj = nn.ModuleList(nn.Conv1d(i, d, 1, bias=False) if cfg.skip_agg and i != d else nn.Identity()
                                           for i, (d, _, _) in zip(dims, cfg.agg_layers))
        self.skip, self.scale = cfg.skip_agg, math.sqrt(cfg.residual_scale)

    def forward(self, x, lengths=None):
        for block, proj in zip(self.blocks, self.residual_proj):
            residual, x = x, block(x, lengths)
            lengths = None if lengths is None else block.output_lengths(lengths)
            if self.skip:
                x = (x + proj(residual)) * self.scale
        return x


class Wav2Vec1(nn.Module):
    """Waveforms (B, L) at 16 kHz -> the aggregator's output (B, C, T), T = frame_lengths(L) (Large: 512, 100 Hz)."""

    def __init__(self, cfg: Wav2Vec1Config):
        super().__init__()
        self.cfg = cfg
        self.feature_extractor = FeatureExtractor(cfg)
        self.aggregator = Aggregator(cfg)
        self.features_frozen = False

    def freeze_feature_extractor(self):
        """The release's teacher: the feature extractor runs without grad; returns the parameters left to train."""
        self.features_frozen = True
        self.feature_extractor.requires_grad_(False)
        return list(self.aggregator.parameters())

    def frame_lengths(self, wav_lengths):  # Large: (L - 465) // 160 + 1 (the aggregator keeps the length)
        return stack_lengths([*self.feature_extractor.blocks, *self.aggregator.blocks], wav_lengths)

    def forward(self, wav, lengths=None, feature_mask=None):
        """feature_mask (B, C, T) bool: features set to zero before the aggregator (the release's SpecAugment)."""
        if not torch.is_tensor(wav) or wav.dim() != 2 or not wav.is_floating_point():
            raise ValueError("wav must be a floating-point (batch, samples) tensor of mono 16 kHz audio")
        n = torch.full((wav.size(0),), wav.size(1)) if lengths is None else torch.as_tensor(lengths).cpu()
        if n.min() < self.cfg.min_samples or n.max() > wav.size(1):
            raise ValueError(f"lengths {n.tolist()} must be at least {self.cfg.min_samples} samples (the receptive "
                             f"field) and at most the batch's width {wav.size(1)}")
        lengths = None if lengths is None else n
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.features_frozen):
            z = self.feature_extractor(wav, lengths)
        if feature_mask is not None:
            z = z.masked_fill(feature_mask.to(z.device), 0.0)
        if lengths is None:
            return self.aggregator(z)
        c = self.aggregator(z, stack_lengths(self.feature_extractor.blocks, n))
        padded = torch.arange(c.size(2)) >= self.frame_lengths(n)[:, None]
        return c.masked_fill(padded[:, None, :].to(c.device), 0.0)


class Wav2Vec1Teacher(nn.Module):
    """The release's teacher backbone (its Wav2vecWrapper, modules/FeatureFuser.py): wav2vec (v1), then a
    Conv1d(C, C, 4, stride 2) without padding + ReLU that brings 100 Hz to wav2vec 2.0's 50 Hz.
    (B, L) -> (features (B, T, C), frame lengths); Large: T = (L - 945) // 320 + 1, one or two frames
    fewer than wav2vec 2.0's (L - 400) // 320 + 1, never equal; under 945 samples no frame."""

    def __init__(self, v1: Wav2Vec1):
        super().__init__()
        self.v1 = v1
        self.dim = v1.cfg.agg_layers[-1][0]
        self.conv = nn.Conv1d(self.dim, self.dim, 4, 2)
        hop = math.prod(s for _, _, s in v1.cfg.conv_layers)
        self.min_samples = v1.cfg.min_samples + 3 * hop  # 4 frames at 100 Hz: the conv's kernel (Large: 945)

    def frame_lengths(self, wav_lengths):
        n100 = self.v1.frame_lengths(torch.as_tensor(wav_lengths))
        return (torch.div(n100 - 4, 2, rounding_mode="floor") + 1).clamp(min=0)

    def forward(self, wav, lengths=None, time_mask=None, channel_mask=None):
        """time_mask (B, T100), channel_mask (B, C): the release's SpecAugment, zeros on v1's features."""
        n = torch.full((wav.size(0),), wav.size(1)) if lengths is None else torch.as_tensor(lengths).cpu()
        frames = self.frame_lengths(n)
        if n.min() < self.min_samples:
            raise ValueError(f"lengths {n.tolist()}: the teacher needs at least {self.min_samples} samples")
        drop = None
        if time_mask is not None or channel_mask is not None:
            t100 = int(self.v1.frame_lengths(torch.tensor(wav.size(1))))
            drop = torch.zeros(wav.size(0), self.dim, t100, dtype=torch.bool)
            drop |= time_mask[:, None, :] if time_mask is not None else drop
            drop |= channel_mask[:, :, None] if channel_mask is not None else drop
        x = F.relu(self.conv(self.v1(wav, lengths, feature_mask=drop)))
        return x.transpose(1, 2), frames


# -----------------------------------------------------------------------------
# checkpoint I/O

class CheckpointError(Exception):
    """A checkpoint file that cannot be used; the message names the file and what was found."""


class Opaque:
    """Inert stand-in for a class a checkpoint names but we do not import (omegaconf, fairseq,
    numpy, enums): it records its constructor arguments and state, and runs no code."""
    _module = _name = ""

    def __init__(self, *args, **kwargs):
        self._args = args

    def __setstate__(self, state):
        self._state = state

    def __repr__(self):
        return f"<{self._module}.{self._name}>"


_OPAQUE_MODULES = ("omegaconf", "fairseq", "numpy", "typing", "enum", "pathlib", "collections", "copyreg")
_ALLOWED = {("collections", "OrderedDict"): collections.OrderedDict, ("argparse", "Namespace"): argparse.Namespace,
            ("torch", "Size"): torch.Size, ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
            ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2,
            # torch.save pickles with protocol 2, which writes int and str under their Python 2 names
            ("__builtin__", "long"): int, ("__builtin__", "unicode"): str}
for _name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
              "_rebuild_parameter_with_state"):
    if hasattr(torch._utils, _name):
        _ALLOWED[("torch._utils", _name)] = getattr(torch._utils, _name)
# plain builtin types (omegaconf records them as key and element types); calling them runs no user code
for _mod in ("builtins", "__builtin__"):
    for _t in (dict, list, tuple, set, frozenset, int, float, str, bool, bytes, complex, slice, object):
        _ALLOWED[(_mod, _t.__name__)] = _t


class _SafeUnpickler(pickle.Unpickler):
    """Allow-list unpickling: tensors, plain containers and argparse.Namespace are rebuilt;
    classes of config libraries become Opaque records; anything else is refused."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.split(".")[0] in _OPAQUE_MODULES:
            return type(name, (Opaque,), {"_module": module, "_name": name})
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a tensor, container or config record")


class _SafePickleModule:  # what torch.load expects of pickle_module
    Unpickler = _SafeUnpickler

    @staticmethod
    def load(f, **kwargs):
        return _SafeUnpickler(f, **kwargs).load()


def to_plain(obj, _depth=0):
    """Opaque omegaconf containers -> dicts and lists; nodes and enums -> their values."""
    if _depth > 50:
        return None
    if isinstance(obj, Opaque):
        state = getattr(obj, "_state", None)
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (dict, slots) form
        if isinstance(state, dict) and "_content" in state:
            return to_plain(state["_content"], _depth + 1)
        if isinstance(state, dict) and "_val" in state:
            return to_plain(state["_val"], _depth + 1)
        if len(obj._args) == 1:  # an enum member rebuilt from its value
            return to_plain(obj._args[0], _depth + 1)
        return repr(obj)
    if isinstance(obj, argparse.Namespace):
        return {k: to_plain(v, _depth + 1) for k, v in vars(obj).items()}
    if isinstance(obj, dict):
        return {k: to_plain(v, _depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v, _depth + 1) for v in obj)
    return obj


def read_checkpoint(path):
    """Load a checkpoint without executing code from it (see _SafeUnpickler)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", pickle_module=_SafePickleModule, weights_only=False)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (RuntimeError, EOFError, ValueError, OSError, IndexError, KeyError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or another format?): "
                              f"{type(e).__name__}: {str(e)[:200]}") from None


def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves a
    half-written file under the final name. Any failure to write is an OSError naming the file."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except RuntimeError as e:  # torch.save reports a full disk or an unopenable file as a RuntimeError
        raise OSError(f"cannot write {path}: {str(e).splitlines()[0]}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _conv_layers_from_string(text):
    """fairseq's conv_feature_layers is a Python expression such as
    "[(512, 10, 5)] + [(512, 3, 2)] * 4" (or the list itself); evaluate it without eval()."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [ev(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a * b
        raise ValueError(f"unsupported expression in conv_feature_layers: {text!r}")
    layers = ev(ast.parse(text, mode="eval")) if isinstance(text, str) else text
    return [tuple(int(v) for v in layer) for layer in layers]


def _renamed(c: dict, names: dict, defaults) -> dict:
    """The settings c has under the names in `names` (our field -> theirs), as the types of defaults' fields."""
    return {ours: type(getattr(defaults, ours))(c[theirs]) for ours, theirs in names.items()
            if c.get(theirs) is not None}


# Wav2Vec2Config field -> fairseq's name for it (args or cfg.model)
FAIRSEQ_NAMES = {"extractor_mode": "extractor_mode", "conv_bias": "conv_bias", "embed_dim": "encoder_embed_dim",
                 "ffn_dim": "encoder_ffn_embed_dim", "num_layers": "encoder_layers",
                 "num_heads": "encoder_attention_heads", "layer_norm_first": "layer_norm_first",
                 "pos_conv_kernel": "conv_pos", "pos_conv_groups": "conv_pos_groups", "dropout": "dropout",
                 "attention_dropout": "attention_dropout", "activation_dropout": "activation_dropout",
                 "dropout_input": "dropout_input", "dropout_features": "dropout_features",
                 "layerdrop": "encoder_layerdrop", "feature_grad_mult": "feature_grad_mult",
                 "final_dim": "final_dim", "latent_vars": "latent_vars", "latent_groups": "latent_groups",
                 "latent_dim": "latent_dim", "logit_temp": "logit_temp", "num_negatives": "num_negatives"}


def config_from_fairseq(c: dict, normalize: bool, has_quantizer: bool) -> Wav2Vec2Config:
    """Map fairseq's settings onto Wav2Vec2Config; a setting the file does not have keeps its default."""
    layer_type = c.get("layer_type", "transformer")
    if layer_type not in (None, "transformer"):
        raise ValueError(f"layer_type={layer_type!r} (only the transformer encoder is supported)")
    if int(c.get("pos_conv_depth", 1) or 1) != 1:
        raise ValueError(f"pos_conv_depth={c['pos_conv_depth']} (data2vec-style; only depth 1 is supported)")
    d = Wav2Vec2Config()
    values = _renamed(c, FAIRSEQ_NAMES, d)
    values["final_dim"] = values.get("final_dim", d.final_dim) or values.get("embed_dim", d.embed_dim)  # 0: embed_dim
    temp = c.get("latent_temp", d.latent_temp)
    temp = ast.literal_eval(temp) if isinstance(temp, str) else temp
    return Wav2Vec2Config(**values, conv_layers=_conv_layers_from_string(c.get("conv_feature_layers", d.conv_layers)),
                          latent_temp=tuple(float(v) for v in temp), normalize=bool(normalize),
                          has_quantizer=has_quantizer)


# fairseq parameter name -> this module's name
FAIRSEQ_KEYS = [
    (r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)", r"feature_encoder.convs.\1.\2"),
    (r"feature_extractor\.conv_layers\.0\.2\.(weight|bias)", r"feature_encoder.norms.0.\1"),  # group norm
    (r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)", r"feature_encoder.norms.\1.\2"),  # layer norms
    (r"encoder\.pos_conv\.0\.(bias|weight_g|weight_v)", r"encoder.pos_conv.\1"),
    # newer torch's weight-norm parametrization: original0 = g, original1 = v
    (r"encoder\.pos_conv\.0\.parametrizations\.weight\.original0", "encoder.pos_conv.weight_g"),
    (r"encoder\.pos_conv\.0\.parametrizations\.weight\.original1", "encoder.pos_conv.weight_v"),
    (r"(mask_emb|quantizer\.vars|(layer_norm|post_extract_proj|encoder\.layer_norm|quantizer\.weight_proj|project_q|"
     r"final_proj|encoder\.layers\.\d+\.(self_attn\.)?\w+)\.(weight|bias))", r"\1"),
]


def fairseq_key(key, table=FAIRSEQ_KEYS):
    """fairseq parameter name (Hugging Face's with table=HF_KEYS) -> this module's name (None: not in the table)."""
    for pattern, name in table:
        match = re.fullmatch(pattern, key)
        if match:
            return match.expand(name)
    return None


# parameters a fairseq file may hold that this model deliberately does not use: the ASR CTC head
FAIRSEQ_IGNORED = r"w2v_encoder\.proj\.(weight|bias)"


def _describe(obj):
    if isinstance(obj, dict):
        return f"a dict with keys {sorted(map(str, obj))[:8]}"
    return f"a {type(obj).__name__}"


def _some(names, n=10):
    """The first n of the sorted names, and how many more."""
    names = sorted(names)
    return f"{names[:n]}" + (f" (+{len(names) - n})" if len(names) > n else "")


def _map_keys(path, state, table, ignored, prefix=""):
    """state under this module's names (fairseq_key with table, after the regex prefix). Keys matching the
    regex ignored are reported and dropped; any other key the table does not map is a CheckpointError."""
    mapped, unknown, unused = {}, [], []
    for key, value in state.items():
        bare = re.fullmatch(f"{prefix}(.*)", key)
        if re.fullmatch(ignored, key):
            unused.append(key)
        elif bare is None or (name := fairseq_key(bare[1], table)) is None:
            unknown.append(key)
        else:
            mapped[name] = value
    if unknown:
        raise CheckpointError(f"{path}: parameters this wav2vec 2.0 does not know: {_some(unknown)}")
    if unused:
        print(f"{path}: not used by wav2vec 2.0: {sorted(unused)}", file=sys.stderr)
    return mapped


def _model_and_task(*containers, missing="no fairseq configuration (neither 'cfg' nor 'args')"):
    """fairseq keeps the configuration as cfg = {"model": ..., "task": ...} (newer) or as one flat argparse
    namespace (older): the first of containers that is either -> (model settings, task settings, model name)."""
    for c in map(to_plain, containers):
        if isinstance(c, dict):
            model, task = (c["model"], c.get("task") or {}) if isinstance(c.get("model"), dict) else (c, c)
            return model, task, model.get("_name") or model.get("arch") or ""
    raise ValueError(missing)


# fairseq's model names (arch or _name) -> what they are, for messages; audio_cpc: v1's name before fairseq renamed it
MODEL_FAMILIES = {"wav2vec2": "wav2vec 2.0", "wav2vec_ctc": "wav2vec 2.0 ASR", "wav2vec_seq2seq": "wav2vec 2.0 ASR",
                  "hubert": "HuBERT", "data2vec_audio": "data2vec", "wav2vec": "wav2vec (v1)", "audio_cpc": "wav2vec (v1)"}


def _from_fairseq(path, ckpt):
    """(config, state) of a fairseq wav2vec 2.0 file, pretrained or ASR fine-tuned; another model -> ValueError."""
    model_cfg, task, name = _model_and_task(ckpt.get("cfg"), ckpt.get("args"))
    prefix = ""
    if name in ("wav2vec_ctc", "wav2vec_seq2seq") or "w2v_args" in model_cfg:  # ASR: the pretraining settings inside
        inner, inner_task, _ = _model_and_task(model_cfg.get("w2v_args"), missing="an ASR fine-tuned checkpoint "
                                               "without 'w2v_args' (the pretraining configuration)")
        # fine-tuning overrides these, as fairseq's Wav2VecEncoder does
        overrides = {k: model_cfg[k] for k in ("dropout", "attention_dropout", "activation_dropout", "dropout_input")
                     if k in model_cfg}
        if "layerdrop" in model_cfg:
            overrides["encoder_layerdrop"] = model_cfg["layerdrop"]
        model_cfg, task, prefix = {**inner, **overrides}, {**inner_task, **task}, r"w2v_encoder\.w2v_model\."
    elif name and not name.startswith("wav2vec2"):
        hint = " (a wav2vec (v1) file serves only as P-TAPT's teacher: pretrain.py --teacher)" if name in (
            "wav2vec", "audio_cpc") else ""
        raise ValueError(f"holds a {MODEL_FAMILIES.get(name, name)} model ('{name}'), not wav2vec 2.0{hint}")
    state = _map_keys(path, ckpt["model"], FAIRSEQ_KEYS, FAIRSEQ_IGNORED, prefix)
    has_quantizer = any(k.startswith("quantizer.") for k in state)
    return config_from_fairseq(model_cfg, task.get("normalize", False), has_quantizer), state


def load_wav2vec2(path) -> Wav2Vec2:
    """Build wav2vec 2.0 from a fairseq checkpoint (pretrained or ASR fine-tuned), a Hugging Face
    wav2vec 2.0 folder (or its weights file) or one of this project's checkpoints. Returns the model
    in eval mode, float32, on CPU."""
    hf_weights = hf_weight_files(path)
    if hf_weights is not None:
        return load_hf_wav2vec2(hf_weights)
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a model checkpoint: found {_describe(ckpt)}")
    if ckpt.get("format") == "w2v2-ser/wav2vec1-teacher":
        raise CheckpointError(f"{path}: holds the release recipe's wav2vec (v1) P-TAPT teacher, not wav2vec 2.0")
    if ckpt.get("format") in ("w2v2-ser/wav2vec2", "w2v2-ser/classifier"):  # this project's (a classifier's backbone)
        c = ckpt["config"]
        cfg = Wav2Vec2Config(**{f.name: c[f.name] for f in fields(Wav2Vec2Config) if f.name in c})
        cfg.conv_layers, cfg.latent_temp = [tuple(x) for x in cfg.conv_layers], tuple(cfg.latent_temp)
        state = {k.removeprefix("backbone."): v for k, v in ckpt["model"].items() if not k.startswith("head.")}
    else:
        try:
            cfg, state = _from_fairseq(path, ckpt)
        except (ValueError, TypeError, SyntaxError) as e:
            raise CheckpointError(f"{path}: {e}") from None
    model = Wav2Vec2(cfg)
    load_state(model, state, path)
    return model.eval()


# fairseq's wav2vec (v1) (wav2vec_large.pt): the release recipe's P-TAPT teacher, never a V-FT backbone.
# fairseq parameter name -> Wav2Vec1's name
V1_KEYS = [
    (r"feature_extractor\.conv_layers\.(\d+)\.0\.weight", r"feature_extractor.blocks.\1.conv.weight"),
    (r"feature_extractor\.conv_layers\.(\d+)\.2\.(weight|bias)", r"feature_extractor.blocks.\1.norm.\2"),
    (r"feature_aggregator\.conv_layers\.(\d+)\.1\.(weight|bias)", r"aggregator.blocks.\1.conv.\2"),
    (r"feature_aggregator\.conv_layers\.(\d+)\.3\.(weight|bias)", r"aggregator.blocks.\1.norm.\2"),
    (r"feature_aggregator\.residual_proj\.(\d+)\.weight", r"aggregator.residual_proj.\1.weight"),
]
# in a v1 file but only for the pretraining loss: the step-ahead predictions, and project_features='same'|'new'
# (the aggregator applied to the loss's targets; 'same' repeats feature_aggregator's tensors under this name)
V1_IGNORED = [r"wav2vec_predictions\.project_to_steps\.(weight|bias)", r"project_features\..+"]
# settings whose default changed with fairseq's hydra port (base_wav2vec_architecture before, Wav2VecConfig
# after): a file that does not state them could mean either model, so it is refused
V1_REQUIRED = ("conv_feature_layers", "conv_aggregator_layers", "skip_connections_agg", "log_compression")
# Wav2Vec1Config field -> fairseq's name; a setting the file lacks keeps the default (the same in every version)
V1_NAMES = {"log_compression": "log_compression", "skip_feat": "skip_connections_feat", "skip_agg": "skip_connections_agg",
            "residual_scale": "residual_scale", "agg_zero_pad": "agg_zero_pad", "activation": "activation",
            "dropout": "dropout"}


def v1_settings(ckpt: dict) -> dict:
    """The fairseq model settings of a wav2vec (v1) file, newer cfg or older args; anything else -> ValueError."""
    if str(ckpt.get("format", "")).startswith("w2v2-ser/"):
        raise ValueError("holds one of this project's checkpoints, not fairseq's wav2vec (v1)")
    settings, _, name = _model_and_task(ckpt.get("cfg"), ckpt.get("args"))
    if name not in ("wav2vec", "audio_cpc"):  # audio_cpc: wav2vec's early name (fairseq's _upgrade_state_dict)
        raise ValueError(f"holds a {MODEL_FAMILIES.get(name, name or 'unnamed')} model ('{name}'), not wav2vec (v1)")
    return settings


def config_from_v1(c: dict) -> Wav2Vec1Config:
    missing = [k for k in V1_REQUIRED if c.get(k) is None]
    if missing:
        raise ValueError(f"wav2vec (v1) settings {missing} are not in the file (their defaults differ between "
                         "fairseq versions, so the model is ambiguous)")
    if c.get("vq_type") not in (None, "none"):
        raise ValueError(f"a vq-wav2vec model (vq_type={c['vq_type']!r}); only wav2vec (v1) is supported")
    for key, supported in (("aggregator", "cnn"), ("encoder", "cnn"), ("activation", ("relu", "gelu"))):
        if c.get(key) is not None and c[key] not in supported:
            raise ValueError(f"{key}={c[key]!r} (supported: {supported})")
    return Wav2Vec1Config(**_renamed(c, V1_NAMES, Wav2Vec1Config()),
                          conv_layers=_conv_layers_from_string(c["conv_feature_layers"]),
                          agg_layers=_conv_layers_from_string(c["conv_aggregator_layers"]),
                          agg_bias=not c.get("no_conv_bias", False), affine=not c.get("non_affine_group_norm", False))


def load_wav2vec1(path) -> Wav2Vec1:
    """Build wav2vec (v1) from a fairseq checkpoint (wav2vec_large.pt). Every parameter in the file is mapped or
    in V1_IGNORED; anything missing, unexpected or of the wrong shape is named in one CheckpointError.
    Returns the model in eval mode, float32, on CPU."""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path}: not a model checkpoint: found {_describe(ckpt)}")
    try:
        cfg = config_from_v1(v1_settings(ckpt))
    except (ValueError, TypeError, SyntaxError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    # an unknown parameter keeps its own name, so load_state reports it as unexpected with the rest
    state = {fairseq_key(k, V1_KEYS) or k: v for k, v in ckpt["model"].items()
             if not any(re.fullmatch(p, k) for p in V1_IGNORED)}
    model = Wav2Vec1(cfg)
    load_state(model, state, path)
    return model.eval()


# Hugging Face's wav2vec 2.0 (transformers' modeling_wav2vec2.py): a folder with config.json and
# model.safetensors or pytorch_model.bin (sharded: an .index.json), optionally preprocessor_config.json.
# Wav2Vec2Config field -> config.json's name (feature_grad_mult, latent_temp: not there, fairseq's defaults)
HF_NAMES = {"conv_bias": "conv_bias", "embed_dim": "hidden_size", "ffn_dim": "intermediate_size",
            "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads", "layer_norm_first": "do_stable_layer_norm",
            "pos_conv_kernel": "num_conv_pos_embeddings", "pos_conv_groups": "num_conv_pos_embedding_groups",
            "dropout": "hidden_dropout", "attention_dropout": "attention_dropout", "activation_dropout": "activation_dropout",
            "dropout_input": "feat_proj_dropout", "dropout_features": "feat_quantizer_dropout", "layerdrop": "layerdrop",
            "latent_vars": "num_codevectors_per_group", "latent_groups": "num_codevector_groups",
            "latent_dim": "codevector_dim", "final_dim": "proj_codevector_dim",
            "logit_temp": "contrastive_logits_temperature", "num_negatives": "num_negatives"}

# Hugging Face parameter name (the "wav2vec2." of its head models removed) -> this module's name
HF_KEYS = [
    (r"feature_extractor\.conv_layers\.(\d+)\.conv\.(weight|bias)", r"feature_encoder.convs.\1.\2"),
    (r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.(weight|bias)", r"feature_encoder.norms.\1.\2"),  # GN or LNs
    (r"feature_projection\.layer_norm\.(weight|bias)", r"layer_norm.\1"),
    (r"feature_projection\.projection\.(weight|bias)", r"post_extract_proj.\1"),
    (r"masked_spec_embed", "mask_emb"),
    (r"encoder\.pos_conv_embed\.conv\.(bias|weight_g|weight_v)", r"encoder.pos_conv.\1"),
    (r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original0", "encoder.pos_conv.weight_g"),
    (r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original1", "encoder.pos_conv.weight_v"),
    (r"encoder\.layers\.(\d+)\.attention\.([qkv]_proj|out_proj)\.(weight|bias)", r"encoder.layers.\1.self_attn.\2.\3"),
    (r"encoder\.layers\.(\d+)\.layer_norm\.(weight|bias)", r"encoder.layers.\1.self_attn_layer_norm.\2"),
    (r"encoder\.layers\.(\d+)\.feed_forward\.intermediate_dense\.(weight|bias)", r"encoder.layers.\1.fc1.\2"),
    (r"encoder\.layers\.(\d+)\.feed_forward\.output_dense\.(weight|bias)", r"encoder.layers.\1.fc2.\2"),
    (r"(encoder\.(layers\.\d+\.final_)?layer_norm|quantizer\.weight_proj|project_q)\.(weight|bias)", r"\1.\3"),
    (r"quantizer\.codevectors", "quantizer.vars"),
    (r"project_hid\.(weight|bias)", r"final_proj.\1"),
]
# the heads of Wav2Vec2ForCTC and Wav2Vec2ForSequenceClassification: reported and dropped
HF_IGNORED = r"(lm_head|projector|classifier)\.(weight|bias)|layer_weights"
# what this module computes; a config.json asking for something else is refused rather than run differently
HF_SUPPORTED = {"hidden_act": ("gelu",), "feat_extract_activation": ("gelu",), "layer_norm_eps": (1e-5,),
                "feat_extract_norm": ("group", "layer"), "add_adapter": (False, None), "adapter_attn_dim": (None,)}
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """{name: tensor} from a .safetensors file: an 8-byte little-endian header length, a JSON header
    {name: {dtype, shape, data_offsets}}, then the tensors' bytes, back to back. Every offset is checked
    against the file size and the others, so a damaged file is an error, never garbage."""
    with open(path, "rb") as f:
        data = bytearray(f.read())  # writable, as torch.frombuffer wants
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 < n <= len(data) - 8:
        raise CheckpointError(f"{path}: not a safetensors file (header of {n} bytes in a file of {len(data)}; truncated?)")
    try:
        header, entries = json.loads(data[8:8 + n]), []
        header.pop("__metadata__", None)
        for name, h in header.items():
            begin, end = (int(x) for x in h["data_offsets"])
            entries.append((begin, end, name, SAFETENSORS_DTYPES[h["dtype"]], [int(d) for d in h["shape"]]))
        entries.sort()
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors header ({type(e).__name__}: {str(e)[:100]})") from None
    described = entries[-1][1] if entries else 0
    if described != len(data) - 8 - n:
        raise CheckpointError(f"{path}: the header describes {described} bytes of tensors, the file holds "
                              f"{len(data) - 8 - n} (truncated?)")
    tensors, expected = {}, 0
    for begin, end, name, dtype, shape in entries:
        if begin != expected or min(shape, default=0) < 0 or end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{path}: the header's offsets for {name!r} ({begin}..{end}, {dtype}, {shape}) do not "
                                  f"fit its shape or the tensor before it (ends at {expected})")
        expected = end
        tensors[name] = (torch.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=8 + n + begin).clone()
                         .reshape(shape) if end > begin else torch.zeros(shape, dtype=dtype))
    return tensors


def _read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the {what} ({type(e).__name__}: {str(e)[:100]})") from None


def hf_weight_files(path):
    """The weight files of a Hugging Face model when path is its folder, a .safetensors file or a .bin
    file beside a config.json (or an .index.json of shards); None for any other path."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = [os.path.join(path, name) for name in HF_WEIGHTS if os.path.isfile(os.path.join(path, name))]
        if not found:
            raise CheckpointError(f"{path}: a folder without {' or '.join(HF_WEIGHTS[:2])} (not a Hugging Face model)")
        path = found[0]
    elif not (path.endswith((".safetensors", ".index.json")) or path.endswith(".bin") and
              os.path.isfile(os.path.join(os.path.dirname(path), "config.json"))):
        return None
    if path.endswith(".index.json"):
        shards = _read_json(path, "shard index").get("weight_map", {}).values()
        return sorted({os.path.join(os.path.dirname(path), name) for name in shards})
    return [path]


def config_from_hf(c: dict, preprocessor: dict) -> Wav2Vec2Config:
    """Map Hugging Face's config.json (and preprocessor_config.json) onto Wav2Vec2Config; a setting
    the file does not have keeps this module's default."""
    kind = c.get("model_type") if isinstance(c, dict) else f"none ({type(c).__name__})"
    if kind != "wav2vec2":
        raise ValueError(f"model_type {kind!r}, not wav2vec 2.0 ('wav2vec2')")
    for key, supported in HF_SUPPORTED.items():
        if key in c and c[key] not in supported:
            raise ValueError(f"{key}={c[key]!r}: only {' or '.join(map(repr, supported))} is supported")
    if preprocessor.get("sampling_rate", SAMPLE_RATE) != SAMPLE_RATE:
        raise ValueError(f"preprocessor sampling_rate {preprocessor['sampling_rate']}: wav2vec 2.0 here takes {SAMPLE_RATE} Hz")
    dims, kernels, strides = (c.get(k, list(v)) for k, v in zip(("conv_dim", "conv_kernel", "conv_stride"),
                                                                zip(*BASE_CONV_LAYERS)))
    if not len(dims) == len(kernels) == len(strides):
        raise ValueError(f"conv_dim, conv_kernel, conv_stride differ in length: {dims}, {kernels}, {strides}")
    return Wav2Vec2Config(**_renamed(c, HF_NAMES, Wav2Vec2Config()),
                          conv_layers=[(int(a), int(b), int(s)) for a, b, s in zip(dims, kernels, strides)],
                          extractor_mode="layer_norm" if c.get("feat_extract_norm") == "layer" else "default",
                          normalize=bool(preprocessor.get("do_normalize", False)))


def load_hf_wav2vec2(files) -> Wav2Vec2:
    """wav2vec 2.0 from a Hugging Face model's weight files (hf_weight_files) and the config.json beside
    them: Wav2Vec2Model, Wav2Vec2ForPreTraining (with the quantizer and its projections), and
    Wav2Vec2ForCTC / ForSequenceClassification, whose heads are reported and dropped. Every tensor
    must be mapped or in HF_IGNORED; .bin files go through the safe unpickler."""
    folder = os.path.dirname(files[0])
    config_path, prep_path = os.path.join(folder, "config.json"), os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{files[0]}: no config.json beside it (a Hugging Face model folder has one)")
    hf_cfg = _read_json(config_path, "model configuration")
    try:
        cfg = config_from_hf(hf_cfg, _read_json(prep_path, "preprocessor configuration") if os.path.isfile(prep_path) else {})
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    state = {}
    for path in files:
        shard = read_safetensors(path) if path.endswith(".safetensors") else read_checkpoint(path)
        if not isinstance(shard, dict) or not all(torch.is_tensor(v) for v in shard.values()):
            raise CheckpointError(f"{path}: not a state dict of tensors: found {_describe(shard)}")
        state.update(shard)
    mapped = _map_keys(files[0], state, HF_KEYS, HF_IGNORED, prefix=r"(?:wav2vec2\.)?")  # the head models' prefix
    cfg.has_quantizer = any(k.startswith("quantizer.") for k in mapped)
    model = Wav2Vec2(cfg)
    if "mask_emb" not in mapped and not (hf_cfg.get("mask_time_prob", 0.05) or hf_cfg.get("mask_feature_prob", 0)):
        mapped["mask_emb"] = model.mask_emb.detach()  # HF leaves it out of a model that never masks: a fresh one
        print(f"{files[0]}: no masked_spec_embed (the model was configured without masks): a fresh mask embedding",
              file=sys.stderr)
    load_state(model, mapped, files[0])
    return model.eval()


def load_state(model, state, path="state dict"):
    """load_state_dict with errors that name the keys and shapes."""
    own = model.state_dict()
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    wrong = [f"{k}: file {tuple(state[k].shape)} vs config {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected {_some(unexpected)}")
    if wrong:
        problems.append(f"shapes that do not fit the configuration: {wrong[:5]}")
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})


def config_dict(cfg) -> dict:
    """A config with lists for its tuples, as JSON has them (the project's checkpoints, bench.json)."""
    return json.loads(json.dumps(asdict(cfg)))


def save_wav2vec2(model: Wav2Vec2, path, meta=None):
    """The project's own format: plain dicts and tensors, loadable with weights_only=True."""
    save_atomic({"format": "w2v2-ser/wav2vec2", "version": 1, "config": config_dict(model.cfg),
                 "model": model.state_dict(), "meta": meta or {}}, path)


def save_classifier(clf: EmotionClassifier, path, meta=None):
    save_atomic({"format": "w2v2-ser/classifier", "version": 1, "config": config_dict(clf.backbone.cfg),
                 "classes": list(clf.classes), "skip_last_frame": clf.skip_last_frame, "model": clf.state_dict(),
                 "meta": meta or {}}, path)


def load_classifier(path) -> EmotionClassifier:
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "w2v2-ser/classifier":
        raise CheckpointError(f"{path}: not a fine-tuned emotion classifier written by finetune.py "
                              f"(found {_describe(ckpt)})")
    clf = EmotionClassifier(load_wav2vec2(path), ckpt["classes"], bool(ckpt.get("skip_last_frame")))
    clf.head.load_state_dict({"weight": ckpt["model"]["head.weight"], "bias": ckpt["model"]["head.bias"]})
    return clf.eval()


def save_wav2vec1_teacher(teacher: Wav2Vec1Teacher, path, meta=None):
    """The release recipe's trained P-TAPT teacher (v1 and its stride-2 conv), in the project's own format."""
    save_atomic({"format": "w2v2-ser/wav2vec1-teacher", "version": 1, "config": config_dict(teacher.v1.cfg),
                 "model": teacher.state_dict(), "meta": meta or {}}, path)


def load_wav2vec1_teacher(path) -> Wav2Vec1Teacher:
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "w2v2-ser/wav2vec1-teacher":
        raise CheckpointError(f"{path}: not a wav2vec (v1) P-TAPT teacher written by pretrain.py (found {_describe(ckpt)})")
    c = ckpt["config"]
    cfg = Wav2Vec1Config(**{**c, "conv_layers": [tuple(x) for x in c["conv_layers"]],
                            "agg_layers": [tuple(x) for x in c["agg_layers"]]})
    teacher = Wav2Vec1Teacher(Wav2Vec1(cfg))
    load_state(teacher, ckpt["model"], path)
    return teacher.eval()


# -----------------------------------------------------------------------------
# devices and processes (every script imports model.py)

def resolve_device(name="auto"):
    """'auto': the GPU when there is one. Under torchrun each process takes GPU LOCAL_RANK.
    A device that is not there is a ValueError naming it."""
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    except RuntimeError:
        raise ValueError(f"device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA GPU is available here (use cpu or auto)")
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def world():
    """(rank, world size) under torch.distributed (torchrun); (0, 1) in a single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
