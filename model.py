"""wav2vec 2.0 in plain PyTorch: the modules, nothing else (checkpoints.py reads and writes them).

Reads top to bottom: configuration, the modules (FeatureEncoder, PositionalConv, EncoderLayer,
Encoder, Quantizer), the model, span masking, the emotion classifier, then wav2vec (v1) and the
release recipe's P-TAPT teacher front. Semantics follow fairseq's
fairseq/models/wav2vec/wav2vec2.py (v1: wav2vec.py); see RECIPE.md "Backbone".
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

SAMPLE_RATE = 16000  # wav2vec 2.0 takes 16 kHz mono audio
MIN_SAMPLES = 400  # the conv stack's receptive field (25 ms): shorter input gives no frame
# fairseq's default conv stack: 7 layers, 320x downsampling, 25 ms receptive field (400 samples).
BASE_CONV_LAYERS = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2


# Both configs check themselves when built (__post_init__, dataclasses.replace too), whatever the
# source (a checkpoint, a JSON config, code): a value that cannot build the model is a ValueError
# naming field, value and what is expected; never a crash deep in a module or at the first update.


def _expect(ok, name, value, expected):
    if not ok:
        raise ValueError(f"{name}={value!r}: expected {expected}")


def is_int(x):  # bool is an int to Python, never a size or an offset
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x):
    return (is_int(x) or isinstance(x, float)) and math.isfinite(x)


# the kinds of field _check knows: (test, what the error says is expected)
_KINDS = {
    "int>0": (lambda v: is_int(v) and v > 0, "a positive integer"),
    "bool": (lambda v: isinstance(v, bool), "True or False"),
    "prob": (lambda v: _is_number(v) and 0 <= v < 1, "a probability in [0, 1)"),
    "number>0": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "number>=0": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
}


def _check(cfg, kind, names):
    """Checks cfg's fields `names` (space-separated), in order, against _KINDS[kind]."""
    ok, expected = _KINDS[kind]
    for name in names.split():
        _expect(ok(getattr(cfg, name)), name, getattr(cfg, name), expected)


def _conv_triples(name, layers):
    """A conv stack as a list of (dim, kernel, stride) tuples of positive ints (JSON's lists become
    tuples); anything else is a ValueError naming the layer."""
    expected = "a non-empty list of (dim, kernel, stride) layers"
    _expect(isinstance(layers, (list, tuple)) and len(layers) > 0, name, layers, expected)
    for i, layer in enumerate(layers):
        ok = isinstance(layer, (list, tuple)) and len(layer) == 3
        ok = ok and all(is_int(v) and v > 0 for v in layer)
        _expect(ok, f"{name}[{i}]", layer, "(dim, kernel, stride), three positive integers")
    return [tuple(layer) for layer in layers]


@dataclass
class Wav2Vec2Config:
    # defaults are wav2vec_small.pt (RECIPE.md "Backbone"); fairseq's argument names in comments
    conv_layers: list = field(default_factory=lambda: list(BASE_CONV_LAYERS))  # conv_feature_layers
    extractor_mode: str = "default"  # group norm on conv 0; "layer_norm": LN on every conv
    conv_bias: bool = False
    embed_dim: int = 768  # encoder_embed_dim
    ffn_dim: int = 3072  # encoder_ffn_embed_dim
    num_layers: int = 12  # encoder_layers
    num_heads: int = 12  # encoder_attention_heads
    layer_norm_first: bool = False  # pre-LN transformer (large models)
    pos_conv_kernel: int = 128  # conv_pos
    pos_conv_groups: int = 16  # conv_pos_groups
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    dropout_input: float = 0.1  # on the projected features
    dropout_features: float = 0.1  # on the unmasked features that feed the quantizer
    layerdrop: float = 0.05  # encoder_layerdrop
    feature_grad_mult: float = 0.1  # gradient scale into the conv encoder
    normalize: bool = False  # task.normalize: zero-mean unit-variance waveform per utterance
    has_quantizer: bool = True  # False for ASR fine-tuned checkpoints
    final_dim: int = 256
    latent_vars: int = 320
    latent_groups: int = 2
    latent_dim: int = 0  # 0: final_dim
    latent_temp: tuple = (2.0, 0.5, 0.999995)  # (start, end, decay per update)
    logit_temp: float = 0.1
    num_negatives: int = 100

    def __post_init__(self):
        """The checks every source goes through (see _expect); the quantizer's settings only where
        the model has one (an ASR checkpoint's are never used)."""
        self.conv_layers = _conv_triples("conv_layers", self.conv_layers)
        mode = self.extractor_mode
        modes = ("default", "layer_norm")
        _expect(mode in modes, "extractor_mode", mode, "'default' or 'layer_norm'")
        _check(self, "bool", "conv_bias layer_norm_first normalize has_quantizer")
        _check(self, "int>0", "embed_dim ffn_dim num_layers num_heads")
        _check(self, "int>0", "pos_conv_kernel pos_conv_groups")
        for name, who in (("num_heads", "each head"), ("pos_conv_groups", "each conv group")):
            n, e = getattr(self, name), self.embed_dim
            why = f"({who} takes embed_dim / {name} channels)"
            _expect(e % n == 0, name, n, f"a divisor of embed_dim={e} {why}")
        _check(self, "prob", "dropout attention_dropout activation_dropout dropout_input")
        _check(self, "prob", "dropout_features layerdrop")
        _check(self, "number>=0", "feature_grad_mult")
        if isinstance(self.latent_temp, list):  # JSON's
            self.latent_temp = tuple(self.latent_temp)
        if not self.has_quantizer:
            return
        _check(self, "int>0", "final_dim latent_vars latent_groups num_negatives")
        dim = self.latent_dim
        ok = is_int(dim) and dim >= 0
        _expect(ok, "latent_dim", dim, "a positive integer, or 0 for final_dim")
        latent = f"latent_dim={dim}"
        if not dim:
            latent = f"final_dim={self.final_dim} (the latent dim where latent_dim is 0)"
        ok = (dim or self.final_dim) % self.latent_groups == 0
        _expect(ok, "latent_groups", self.latent_groups, f"a divisor of {latent}")
        t = self.latent_temp
        ok = isinstance(t, tuple) and len(t) == 3 and all(_is_number(x) and x > 0 for x in t)
        expected = "(start, end, decay per update): positive numbers, decay at most 1"
        _expect(ok and t[2] <= 1, "latent_temp", t, expected)
        _check(self, "number>0", "logit_temp")

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
        self.convs = nn.ModuleList(
            nn.Conv1d(i, d, k, s, bias=cfg.conv_bias)
            for i, (d, k, s) in zip(in_dims, cfg.conv_layers)
        )
        for conv in self.convs:  # fairseq's init (conv biases keep torch's default)
            nn.init.kaiming_normal_(conv.weight)
        if self.mode == "default":
            d0 = cfg.conv_layers[0][0]
            self.norms = nn.ModuleList([nn.GroupNorm(d0, d0)])
        else:
            self.norms = nn.ModuleList(nn.LayerNorm(d) for d, _, _ in cfg.conv_layers)

    def output_lengths(self, lengths, num_layers=None):
        for conv in self.convs[:num_layers]:
            k, s = conv.kernel_size[0], conv.stride[0]
            lengths = torch.div(lengths - k, s, rounding_mode="floor") + 1
        return lengths

    def forward(self, wav, lengths=None):
        x = wav.unsqueeze(1)
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if self.mode == "default" and i == 0:
                n = None if lengths is None else self.output_lengths(lengths, 1)
                x = masked_group_norm(x, n, self.norms[0])
            elif self.mode == "layer_norm":
                x = self.norms[i](x.transpose(1, 2).float()).transpose(1, 2).type_as(x)
            x = F.gelu(x)
        return x


def masked_group_norm(x, lengths, norm: nn.GroupNorm):
    """A group norm in float32 (fairseq's Fp32GroupNorm: wav2vec 2.0's layer 0, one group per
    channel; every block of wav2vec (v1), one group) with each utterance's statistics over its valid
    frames only (lengths None: over all frames), so the result is exactly what it gets unbatched.
    The padded frames are left as they come: no valid frame of the next conv reads them."""
    weight, bias = (None, None) if norm.weight is None else (norm.weight.float(), norm.bias.float())

    def group_norm(y):
        return F.group_norm(y.float(), norm.num_groups, weight, bias, norm.eps).type_as(y)

    if lengths is None:
        return group_norm(x)
    # Without autograd (V-FT's frozen encoder, inference) the fresh conv output is overwritten in
    # place, faster than writing a second (B, C, T) tensor (BENCHMARKS.md, group norm).
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
        # fairseq's init: N(0, sqrt(4 (1 - dropout) / (K C))), its dropout fixed at 0
        self.weight_v = nn.Parameter(torch.randn(c, c // g, k) * math.sqrt(4 / (k * c)))
        self.weight_g = nn.Parameter(self.weight_v.detach().norm(dim=(0, 1), keepdim=True))
        self.bias = nn.Parameter(torch.zeros(c))
        self.groups, self.kernel = g, k

    def forward(self, x):  # (B, T, C), padded frames already zero
        weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=(0, 1), keepdim=True))
        weight, bias = weight.to(x.dtype), self.bias.to(x.dtype)
        y = F.conv1d(x.transpose(1, 2), weight, bias, padding=self.kernel // 2, groups=self.groups)
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
        q, k, v = (
            p(x).view(B, T, self.num_heads, -1).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
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
            # layer drop as fairseq does it: drawn for every layer, the requested one never dropped
            drop = self.training and self.layerdrop > 0 and torch.rand(()) < self.layerdrop
            if drop and i + 1 != layer:
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
        dim = cfg.latent_dim or cfg.final_dim
        self.groups, self.num_vars = cfg.latent_groups, cfg.latent_vars
        self.vars = nn.Parameter(torch.rand(1, self.groups * self.num_vars, dim // self.groups))
        self.weight_proj = nn.Linear(cfg.conv_dim, self.groups * self.num_vars)
        nn.init.normal_(self.weight_proj.weight, std=1.0)
        nn.init.zeros_(self.weight_proj.bias)
        self.max_temp, self.min_temp, self.temp_decay = cfg.latent_temp
        self.temperature = self.max_temp

    def set_num_updates(self, num_updates):
        self.temperature = max(self.max_temp * self.temp_decay**num_updates, self.min_temp)

    def forward(self, x, rows=None, temperature=None):
        """(N, conv_dim) -> codewords (N, dim), and the perplexity of the `rows` given (or all).
        temperature: the Gumbel softmax's, None for the annealed one (set_num_updates)."""
        N = x.shape[0]
        logits = self.weight_proj(x).view(N * self.groups, self.num_vars)
        probs = logits.float().softmax(-1).view(N, self.groups, -1)
        avg_probs = (probs if rows is None else probs[rows]).mean(0)
        perplexity = torch.exp(-(avg_probs * torch.log(avg_probs + 1e-7)).sum(-1)).sum()
        if self.training:
            tau = self.temperature if temperature is None else temperature
            onehot = F.gumbel_softmax(logits.float(), tau=tau, hard=True).type_as(x)
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
    hidden: torch.Tensor  # (B, F, embed_dim) transformer output (or layer k's)
    frame_lengths: torch.Tensor  # (B,) valid frames per utterance
    features: torch.Tensor  # (B, F, conv_dim) layer-normed conv features, unmasked: quantizer input
    feature_penalty: torch.Tensor  # mean of squared conv features (fairseq's features_pen)


class Wav2Vec2(nn.Module):
    """Initialised as fairseq's Wav2Vec2Model until a checkpoint is loaded over it (conv: Kaiming
    normal; transformer: init_bert_params; positional conv, mask_emb, quantizer: fairseq's;
    post_extract_proj, project_q, final_proj: torch's defaults, as fairseq leaves them)."""

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
        self.features_frozen = False

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
            raise ValueError(
                f"wav must be a (batch, samples) tensor of mono 16 kHz audio, got {shape}; "
                "average the channels of stereo audio first"
            )
        if not wav.is_floating_point():
            raise TypeError(f"wav must be floating point (float32 in [-1, 1]), got {wav.dtype}")
        B, width = wav.shape
        n = torch.full((B,), width) if wav_lengths is None else torch.as_tensor(wav_lengths)
        n = n.long().cpu()
        if n.shape != (B,):
            raise ValueError(f"wav_lengths must have shape ({B},), got {tuple(n.shape)}")
        if int(n.max()) > width:
            raise ValueError(f"wav_lengths exceed the padded length {width}: max {int(n.max())}")
        if int(n.min()) < MIN_SAMPLES:
            raise ValueError(
                f"every utterance needs at least {MIN_SAMPLES} samples (25 ms at 16 kHz), "
                f"got {int(n.min())}"
            )
        return n

    def features(self, wav, wav_lengths, norm_over_padding=False):
        """Conv features (B, C, F) and their mean square over valid frames (fairseq's features_pen).
        The group norm sees each utterance's valid samples only (masked_group_norm), or in training
        with norm_over_padding the whole padded batch, as the release trained (it tested one
        utterance at a time, which per-utterance statistics give)."""
        if self.cfg.normalize:  # per utterance over its valid samples, as fairseq's dataset does
            n = wav_lengths.to(wav.device)[:, None]
            valid = torch.arange(wav.shape[1], device=wav.device) < n
            n = n.to(wav.dtype)
            mean = (wav * valid).sum(1, keepdim=True) / n
            var = (((wav - mean) * valid) ** 2).sum(1, keepdim=True) / n
            wav = ((wav - mean) * torch.rsqrt(var + 1e-5)) * valid
        padded = int(wav_lengths.min()) < wav.shape[1]
        per_utterance = padded and not (norm_over_padding and self.training)
        feats = self.feature_encoder(wav, wav_lengths if per_utterance else None)
        frames = self.frame_lengths(wav_lengths).to(feats.device)
        valid = torch.arange(feats.shape[-1], device=feats.device) < frames[:, None]
        squares = (feats.float().pow(2) * valid.unsqueeze(1)).sum()
        return feats, squares / (frames.sum() * feats.shape[1])

    def encode(
        self,
        wav,
        wav_lengths=None,
        layer=None,
        time_mask=None,
        channel_mask=None,
        *,
        norm_over_padding=False,
        feature_grad_mult=None,
        feature_dropout=True,
    ) -> Encoded:
        """time_mask (B, F) bool: frames replaced by the mask embedding; channel_mask (B, embed_dim)
        bool: channels zeroed. Both act on the projected features, as in fairseq and the release.
        The recipe's settings: norm_over_padding (see features); feature_grad_mult, the gradient's
        scale into the conv encoder (None: the checkpoint's); feature_dropout, the checkpoint's
        dropout_features on the features that feed the quantizer (off in transformers 4.10)."""
        wav_lengths = self.check_input(wav, wav_lengths)
        if layer is not None and not 1 <= layer <= len(self.encoder.layers):
            raise ValueError(f"layer must be in 1..{len(self.encoder.layers)}, got {layer}")
        frozen = self.features_frozen
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            feats, penalty = self.features(wav, wav_lengths, norm_over_padding)
            scale = self.cfg.feature_grad_mult if feature_grad_mult is None else feature_grad_mult
            if scale != 1.0 and not frozen and torch.is_grad_enabled():
                feats = GradScale.apply(feats, scale)
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
        features = self.dropout_features(feats) if feature_dropout else feats
        return Encoded(hidden, frames.to(x.device), features, penalty)

    def forward(self, wav, wav_lengths=None, layer=None, time_mask=None, channel_mask=None, **kw):
        """(hidden, frame_lengths) of encode; kw: encode's recipe settings."""
        e = self.encode(wav, wav_lengths, layer, time_mask, channel_mask, **kw)
        return e.hidden, e.frame_lengths


# -----------------------------------------------------------------------------
# span masking (V-FT, TAPT, P-TAPT)


def span_masks(semantics, lengths, max_len, rngs, batch_rng, prob, span, min_spans):
    """(B, max_len) boolean masks of spans of `span` frames inside each row's first lengths[b]
    frames; every mask of every stage comes from here. rngs: one generator per utterance;
    batch_rng: the batch's own. The three semantics (RECIPE.md "What the release actually
    computed"):

    "release"   transformers 4.10's _compute_mask_indices as the release ran it: one span count for
                the batch from its padded length T, n = max(min_spans, int(prob T / span + u)),
                u ~ U[0,1) from batch_rng, cut to T // span; each row's n starts uniform without
                replacement over 0..T - span (spans may overlap), then the frames past the row's
                length cleared: a short utterance in a long batch is masked much less. The release
                recipe's V-FT, TAPT and P-TAPT.
    "utterance" the same count per utterance from its own length and generator, starts over
                0..length - span: a row's mask depends neither on its batch nor on the number of
                processes. The clean recipe's.
    "fairseq"   fairseq's compute_mask_indices with require_same_masks, from batch_rng: a count per
                utterance, starts over 0..length - span - 1, then every row cut down at random to
                the batch's fewest masked frames. `pretrain.py --mask-semantics fairseq`.
    """
    spans = {"release": _release_spans, "utterance": _utterance_spans, "fairseq": _fairseq_spans}
    if semantics not in spans:
        raise ValueError(
            f"semantics must be 'release', 'utterance' or 'fairseq', got {semantics!r}"
        )
    return spans[semantics](lengths, max_len, rngs, batch_rng, prob, span, min_spans)


def _release_spans(lengths, max_len, rngs, batch_rng, prob, span, min_spans):
    mask = torch.zeros(len(lengths), max_len, dtype=torch.bool)
    if max_len < span:  # (4.10 raises here; no batch of the recipe is this short)
        return mask
    n = max(min_spans, int(prob * max_len / span + float(torch.rand((), generator=batch_rng))))
    if n * span > max_len:
        n = max_len // span
    for row, (length, rng) in enumerate(zip(lengths, rngs)):
        starts = torch.randperm(max_len - span + 1, generator=rng)[:n]
        mask[row, (starts[:, None] + torch.arange(span)).flatten()] = True
        mask[row, int(length) :] = False
    return mask


def _utterance_spans(lengths, max_len, rngs, _batch_rng, prob, span, min_spans):
    mask = torch.zeros(len(lengths), max_len, dtype=torch.bool)
    for row, (n, rng) in enumerate(zip(lengths, rngs)):
        n = int(n)
        k = max(min_spans, int(prob * n / span + float(torch.rand((), generator=rng))))
        k = max(min(k, n // span, n - (span - 1)), 0)
        starts = torch.randperm(max(n - span + 1, 0), generator=rng)[:k]
        idx = (starts[:, None] + torch.arange(span)).flatten()
        mask[row, idx[idx < n]] = True
    return mask


def _fairseq_spans(lengths, max_len, _rngs, g, prob, span, min_spans):
    chosen = []
    for n in [int(n) for n in lengths]:
        k = max(min_spans, int(prob * n / span + float(torch.rand((), generator=g))))
        room = n - span
        if room <= k:
            room = n - k - 1
        starts = torch.randperm(max(room, 0), generator=g)[:k]
        idx = (starts[:, None] + torch.arange(span)).flatten()
        chosen.append(idx[idx < n].unique())
    fewest = min((len(c) for c in chosen), default=0)
    mask = torch.zeros(len(chosen), max_len, dtype=torch.bool)
    for row, idx in enumerate(chosen):
        if len(idx) > fewest:
            idx = idx[torch.randperm(len(idx), generator=g)[:fewest]]
        mask[row, idx] = True
    return mask


def vft_masks(semantics, frames, padded_frames, dim, rngs, batch_rng, time, channel):
    """SpecAugment-like masks of one batch (V-FT, the release's teacher): (time (B, padded_frames),
    channel (B, dim)); time and channel are (prob, span, min_spans), a prob of 0 gives no mask;
    semantics as span_masks."""
    time_mask = channel_mask = None
    if time[0] > 0:
        time_mask = span_masks(semantics, frames, padded_frames, rngs, batch_rng, *time)
    if channel[0] > 0:
        channel_mask = span_masks(semantics, [dim] * len(rngs), dim, rngs, batch_rng, *channel)
    return time_mask, channel_mask


# -----------------------------------------------------------------------------
# emotion classifier (V-FT head, RECIPE.md "V-FT")


class EmotionClassifier(nn.Module):
    """ReLU on the transformer output, mean over valid frames, ReLU, Linear. skip_last_frame: the
    release's mean leaves out each utterance's last frame (its PretrainedRNNHead sums frames
    t < n - 1 and divides by n - 1; read from its code, not in RECIPE.md)."""

    def __init__(self, backbone: Wav2Vec2, classes, skip_last_frame=False, norm_over_padding=False):
        super().__init__()
        self.backbone, self.classes, self.skip_last_frame = backbone, list(classes), skip_last_frame
        self.norm_over_padding = norm_over_padding  # in training only (Wav2Vec2.features)
        self.head = nn.Linear(backbone.cfg.embed_dim, len(self.classes))

    def forward(self, wav, wav_lengths=None, time_mask=None, channel_mask=None):
        masks = dict(time_mask=time_mask, channel_mask=channel_mask)
        recipe = dict(norm_over_padding=self.norm_over_padding)
        hidden, frames = self.backbone(wav, wav_lengths, **masks, **recipe)
        n = (frames - 1).clamp(min=1) if self.skip_last_frame else frames
        return self.head(F.relu(masked_mean(F.relu(hidden), n)))


def masked_mean(x, lengths):  # x (B, F, C): mean over each row's first lengths[b] frames
    valid = (torch.arange(x.shape[1], device=x.device) < lengths[:, None]).unsqueeze(-1)
    return (x * valid).sum(1) / lengths[:, None].to(x.dtype)


# -----------------------------------------------------------------------------
# wav2vec (v1): the release's P-TAPT teacher (RECIPE.md "What the release actually computed")
#
# fairseq's wav2vec_large.pt, as fairseq/models/wav2vec/wav2vec.py computes it (Wav2VecModel's
# ConvFeatureExtractionModel and ConvAggegator; the prediction head serves its pretraining loss
# only), then the release's Conv1d(512, 512, 4, stride 2) + ReLU from 100 Hz to wav2vec 2.0's 50 Hz.
# v1 has no padding mask and every group norm has one group (statistics over all channels and
# frames), so padding reaches every frame in fairseq. Given lengths, the statistics here run over
# each utterance's valid frames: the extractor's convs are unpadded and the aggregator's causal, so
# every valid frame then equals the unpadded result. The release never padded v1 input (teacher
# batches are cropped to their shortest utterance, clustering runs one utterance at a time).

# wav2vec_large.pt: 7 feature layers, hop 160 samples (100 Hz), receptive field 465; 12 causal
# aggregator layers of kernel 2..13 (fairseq's examples/wav2vec training command, and the model
# fairseq prints when it loads the file). The loader reads every setting from the file.
LARGE_CONV_LAYERS = [(512, 10, 5), (512, 8, 4)] + [(512, 4, 2)] * 3 + [(512, 1, 1)] * 2
LARGE_AGG_LAYERS = [(512, k, 1) for k in range(2, 14)]


@dataclass
class Wav2Vec1Config:
    # defaults are wav2vec_large.pt's; fairseq's argument names in comments, the two stacks'
    # conv_feature_layers and conv_aggregator_layers
    conv_layers: list = field(default_factory=lambda: list(LARGE_CONV_LAYERS))
    agg_layers: list = field(default_factory=lambda: list(LARGE_AGG_LAYERS))
    log_compression: bool = True  # features -> log(|x| + 1)
    skip_feat: bool = False  # skip_connections_feat: skips between equal-width feature layers
    skip_agg: bool = True  # skip_connections_agg
    residual_scale: float = 0.5  # a skip gives (x + residual) * sqrt(residual_scale)
    agg_zero_pad: bool = False  # causal padding by zeros instead of repeating frame 0
    agg_bias: bool = True  # not no_conv_bias (the aggregator's convs; the extractor's have none)
    affine: bool = True  # not non_affine_group_norm
    activation: str = "relu"  # relu | gelu
    dropout: float = 0.0  # after every aggregator conv (fairseq fixes the extractor's at 0)

    def __post_init__(self):
        """The checks every source goes through (see _expect above Wav2Vec2Config)."""
        self.conv_layers = _conv_triples("conv_layers", self.conv_layers)
        self.agg_layers = _conv_triples("agg_layers", self.agg_layers)
        _check(self, "bool", "log_compression skip_feat skip_agg agg_zero_pad agg_bias affine")
        _check(self, "number>0", "residual_scale")
        act = self.activation
        _expect(act in ("relu", "gelu"), "activation", act, "'relu' or 'gelu'")
        _check(self, "prob", "dropout")

    @property
    def min_samples(self):  # the extractor's receptive field (Large: 465): shorter gives no frame
        receptive, hop = 1, 1
        for _, k, s in self.conv_layers:
            receptive, hop = receptive + (k - 1) * hop, hop * s
        return receptive


class ConvBlock(nn.Module):
    """conv -> dropout -> group norm (one group, fairseq's Fp32GroupNorm) -> activation, one layer
    of either stack. causal: fairseq's aggregator pads k - 1 frames on the left (ka + kb in
    ConvAggegator), so frame t reads frames <= t and the length is kept."""

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
        n = None if lengths is None else self.output_lengths(lengths)
        return self.act(masked_group_norm(x, n, self.norm))


def stack_lengths(blocks, lengths):
    for block in blocks:
        lengths = block.output_lengths(lengths)
    return lengths


class FeatureExtractor(nn.Module):
    """Waveform (B, L) -> features (B, C, T): unpadded convs without bias, optional skips, log
    compression."""

    def __init__(self, cfg: Wav2Vec1Config):
        super().__init__()
        dims = [1] + [d for d, _, _ in cfg.conv_layers]
        self.blocks = nn.ModuleList(
            ConvBlock(i, d, k, s, False, cfg, causal=False)
            for i, (d, k, s) in zip(dims, cfg.conv_layers)
        )
        self.skip, self.log_compression = cfg.skip_feat, cfg.log_compression
        self.scale = math.sqrt(cfg.residual_scale)

    def forward(self, wav, lengths=None):
        x = wav.unsqueeze(1)
        for block in self.blocks:
            residual, x = x, block(x, lengths)
            if self.skip and x.size(1) == residual.size(1):
                # fairseq keeps every step-th residual frame, step = the ratio of the widths (the
                # stride, except for very short input); taken from each utterance's own widths, so
                # padding cannot change it
                n_in = torch.tensor([residual.size(2)]) if lengths is None else lengths
                step = n_in // block.output_lengths(n_in).clamp(min=1)
                index = torch.arange(x.size(2)) * step[:, None]
                index = index.clamp(max=residual.size(2) - 1).to(x.device)
                kept = residual.gather(2, index[:, None].expand(x.size(0), x.size(1), -1))
                x = (x + kept) * self.scale
            lengths = None if lengths is None else block.output_lengths(lengths)
        return (x.abs() + 1).log() if self.log_compression else x


class Aggregator(nn.Module):
    """fairseq's 'cnn' aggregator (the context network): causal conv blocks, each with a skip
    (skip_agg; through a 1x1 conv without bias where the width changes), scaled by
    sqrt(residual_scale). Output (B, C, T), same rate."""

    def __init__(self, cfg: Wav2Vec1Config):
        super().__init__()
        dims = [cfg.conv_layers[-1][0]] + [d for d, _, _ in cfg.agg_layers]
        self.blocks = nn.ModuleList(
            ConvBlock(i, d, k, s, cfg.agg_bias, cfg, causal=True)
            for i, (d, k, s) in zip(dims, cfg.agg_layers)
        )
        self.residual_proj = nn.ModuleList(
            nn.Conv1d(i, d, 1, bias=False) if cfg.skip_agg and i != d else nn.Identity()
            for i, (d, _, _) in zip(dims, cfg.agg_layers)
        )
        self.skip, self.scale = cfg.skip_agg, math.sqrt(cfg.residual_scale)

    def forward(self, x, lengths=None):
        for block, proj in zip(self.blocks, self.residual_proj):
            residual, x = x, block(x, lengths)
            lengths = None if lengths is None else block.output_lengths(lengths)
            if self.skip:
                x = (x + proj(residual)) * self.scale
        return x


class Wav2Vec1(nn.Module):
    """Waveforms (B, L) at 16 kHz -> the aggregator's output (B, C, T), T = frame_lengths(L) (Large:
    512, 100 Hz)."""

    def __init__(self, cfg: Wav2Vec1Config):
        super().__init__()
        self.cfg = cfg
        self.feature_extractor = FeatureExtractor(cfg)
        self.aggregator = Aggregator(cfg)
        self.features_frozen = False

    def freeze_feature_extractor(self):
        """The release's teacher: the feature extractor runs without grad; returns the parameters
        left to train."""
        self.features_frozen = True
        self.feature_extractor.requires_grad_(False)
        return list(self.aggregator.parameters())

    def frame_lengths(self, wav_lengths):  # Large: (L - 465) // 160 + 1 (the aggregator keeps it)
        return stack_lengths([*self.feature_extractor.blocks, *self.aggregator.blocks], wav_lengths)

    def forward(self, wav, lengths=None, feature_mask=None):
        """feature_mask (B, C, T) bool: features set to zero before the aggregator (the release's
        SpecAugment)."""
        if not torch.is_tensor(wav) or wav.dim() != 2 or not wav.is_floating_point():
            expected = "a floating-point (batch, samples) tensor of mono 16 kHz audio"
            raise ValueError(f"wav must be {expected}")
        width = wav.size(1)
        n = torch.full((wav.size(0),), width) if lengths is None else torch.as_tensor(lengths).cpu()
        if n.min() < self.cfg.min_samples or n.max() > width:
            raise ValueError(
                f"lengths {n.tolist()} must be at least {self.cfg.min_samples} samples (the "
                f"receptive field) and at most the batch's width {width}"
            )
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
    """The release's teacher backbone (its Wav2vecWrapper, modules/FeatureFuser.py): wav2vec (v1),
    then an unpadded Conv1d(C, C, 4, stride 2) + ReLU from 100 Hz to wav2vec 2.0's 50 Hz.
    (B, L) -> (features (B, T, C), frame lengths); Large: T = (L - 945) // 320 + 1 (none under 945
    samples), one or two frames fewer than wav2vec 2.0's (L - 400) // 320 + 1, never equal."""

    def __init__(self, v1: Wav2Vec1):
        super().__init__()
        self.v1 = v1
        self.dim = v1.cfg.agg_layers[-1][0]
        self.conv = nn.Conv1d(self.dim, self.dim, 4, 2)
        hop = math.prod(s for _, _, s in v1.cfg.conv_layers)
        self.min_samples = v1.cfg.min_samples + 3 * hop  # the conv's 4 frames (Large: 945)

    def frame_lengths(self, wav_lengths):
        n100 = self.v1.frame_lengths(torch.as_tensor(wav_lengths))
        return (torch.div(n100 - 4, 2, rounding_mode="floor") + 1).clamp(min=0)

    def forward(self, wav, lengths=None, time_mask=None, channel_mask=None):
        """time_mask (B, T100), channel_mask (B, C): the release's SpecAugment, zeros on v1's
        features."""
        width = wav.size(1)
        n = torch.full((wav.size(0),), width) if lengths is None else torch.as_tensor(lengths).cpu()
        frames = self.frame_lengths(n)
        if n.min() < self.min_samples:
            need = self.min_samples
            raise ValueError(f"lengths {n.tolist()}: the teacher needs at least {need} samples")
        drop = None
        if time_mask is not None or channel_mask is not None:
            t100 = int(self.v1.frame_lengths(torch.tensor(width)))
            drop = torch.zeros(wav.size(0), self.dim, t100, dtype=torch.bool)
            drop |= time_mask[:, None, :] if time_mask is not None else drop
            drop |= channel_mask[:, :, None] if channel_mask is not None else drop
        x = F.relu(self.conv(self.v1(wav, lengths, feature_mask=drop)))
        return x.transpose(1, 2), frames
