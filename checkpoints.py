"""Every checkpoint format, in and out: fairseq wav2vec 2.0 (`args` or `cfg`) and wav2vec (v1)
files, Hugging Face wav2vec 2.0 folders (safetensors or pytorch_model.bin, sharded or not), and this
project's own files (a model, a classifier, a release teacher). Nothing executes code from a file:
pickles go through an unpickler that builds plain containers and tensors only.

Each loader reads the configuration first, builds and checks a config (model.py), then maps the
weights by an explicit key table and refuses a file whose keys do not match it. Also here: writing
any file atomically (a temporary file, then a rename), so a kill never leaves half a file.
"""

import argparse
import ast
import collections
import json
import math
import os
import pickle
import re
import sys
from dataclasses import asdict, fields, replace

import torch

import model as M


class CheckpointError(Exception):
    """A checkpoint file that cannot be used; the message names the file and what was found."""


# ---- Reading a pickle without running code ----


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


_OPAQUE_MODULES = "omegaconf fairseq numpy typing enum pathlib collections copyreg".split()
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("torch", "Size"): torch.Size,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2,
    # torch.save pickles with protocol 2, which writes int and str under their Python 2 names
    ("__builtin__", "long"): int,
    ("__builtin__", "unicode"): str,
}
# torch's tensor rebuilders (which exist depends on the version), and plain builtin types (omegaconf
# records them as key and element types): calling them runs no user code
_REBUILDERS = """_rebuild_tensor _rebuild_tensor_v2 _rebuild_tensor_v3 _rebuild_parameter
    _rebuild_parameter_with_state""".split()
for _name in _REBUILDERS:
    if hasattr(torch._utils, _name):
        _ALLOWED[("torch._utils", _name)] = getattr(torch._utils, _name)
_PLAIN_TYPES = (dict, list, tuple, set, frozenset, int, float, str, bool, bytes, complex, slice)
for _t in (*_PLAIN_TYPES, object):
    _ALLOWED[("builtins", _t.__name__)] = _ALLOWED[("__builtin__", _t.__name__)] = _t


class _Refused(pickle.UnpicklingError):
    """The safe unpickler's refusal of a class (any other unpickling error means a damaged file)."""


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
        what = f"{module}.{name}"
        raise _Refused(f"refusing to load {what}: not a tensor, container or config record")


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


def _unreadable(path, e: OSError, what="it"):
    return CheckpointError(f"{path}: cannot read {what} ({e.strerror or type(e).__name__})")


# what torch's zip reader and pickle raise on a damaged file ("Invalid argument" for a truncated
# archive): their own words (zip records, load keys) say nothing a user can act on
_DAMAGED = (OSError, pickle.UnpicklingError, RuntimeError, EOFError, ValueError, IndexError)
_DAMAGED += (KeyError, AttributeError, TypeError, OverflowError)


def read_checkpoint(path):
    """Load a checkpoint without executing code from it (see _SafeUnpickler)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:  # a file that cannot be opened (permissions) is named as such, not as a damaged one
        open(path, "rb").close()
    except OSError as e:
        raise _unreadable(path, e) from None
    try:
        return torch.load(
            path, map_location="cpu", pickle_module=_SafePickleModule, weights_only=False
        )
    except _Refused as e:
        raise CheckpointError(f"{path}: {e}") from None
    except _DAMAGED:
        message = "not a complete PyTorch checkpoint (truncated or not a .pt file)"
        raise CheckpointError(f"{path}: {message}") from None


def _describe(obj):
    if isinstance(obj, dict):
        return f"a dict with keys {sorted(map(str, obj))[:8]}"
    if obj is None:
        return "None"
    name = type(obj).__name__
    return f"{'an' if name[0] in 'aeiouAEIOU' else 'a'} {name}"


# ---- Configurations: one rebuild from a file's settings ----


def _names(text):
    """{our field: the file's name} from words "ours=theirs"; a bare word is the same in both."""
    pairs = [word.partition("=") for word in text.split()]
    return {ours: theirs or ours for ours, _, theirs in pairs}


def _rebuild(cls, c: dict, names: dict, **fixed):
    """A cls config from a file's settings c: each field in names (ours -> theirs) that c sets, then
    the fixed values (those parsed by the loader, which replace c's). An int where the field is a
    float becomes one; nothing else is converted (int(7.5), bool("false") would hide a wrong value).
    The config's check then names a wrong value in the file's names: a fairseq user reads
    encoder_attention_heads=5, not num_heads=5."""
    default, values = cls(), {}
    for ours, theirs in names.items():
        if ours not in fixed and c.get(theirs) is not None:
            float_field = M.is_int(c[theirs]) and isinstance(getattr(default, ours), float)
            values[ours] = float(c[theirs]) if float_field else c[theirs]
    try:
        return cls(**{**values, **fixed})
    except ValueError as e:
        raise ValueError(re.sub(r"\b[a-z_]+\b", lambda m: names.get(m[0], m[0]), str(e))) from None


def _conv_layers_from_string(text, name="conv_feature_layers"):
    """fairseq's conv_feature_layers is a Python expression such as
    "[(512, 10, 5)] + [(512, 3, 2)] * 4" (or the list itself); evaluate it without eval(). The
    values are kept as they are: the config's check says which layer is not a (dim, kernel, stride).
    """
    example = "[(512, 10, 5)] + [(512, 3, 2)] * 4"
    unsupported = ValueError(
        f"{name}={text!r}: expected a list of (dim, kernel, stride) layers, such as {example}"
    )

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
            if isinstance(node.op, ast.Add):
                return a + b
            if isinstance(b, int) and len(a if isinstance(a, (list, tuple)) else ()) * b <= 1000:
                return a * b  # a conv stack has a few layers, never a memory bomb's billions
        raise unsupported

    try:
        layers = ev(ast.parse(text, mode="eval")) if isinstance(text, str) else text
    except (SyntaxError, TypeError):  # not Python, or [(1, 2, 3)] + 4
        raise unsupported from None
    if not isinstance(layers, (list, tuple)):
        return layers  # the config names it
    return [tuple(layer) if isinstance(layer, (list, tuple)) else layer for layer in layers]


# ---- fairseq wav2vec 2.0 ----

# Wav2Vec2Config field -> fairseq's name for it (args or cfg.model); conv_layers is parsed
FAIRSEQ_NAMES = _names("""
    conv_layers=conv_feature_layers extractor_mode conv_bias embed_dim=encoder_embed_dim
    ffn_dim=encoder_ffn_embed_dim num_layers=encoder_layers num_heads=encoder_attention_heads
    layer_norm_first pos_conv_kernel=conv_pos pos_conv_groups=conv_pos_groups dropout
    attention_dropout activation_dropout dropout_input dropout_features layerdrop=encoder_layerdrop
    feature_grad_mult final_dim latent_vars latent_groups latent_dim logit_temp num_negatives
""")


def config_from_fairseq(c: dict, normalize: bool, has_quantizer: bool) -> M.Wav2Vec2Config:
    """Map fairseq's settings onto Wav2Vec2Config; a setting the file does not have keeps its
    default."""
    layer_type = c.get("layer_type", "transformer")
    if layer_type not in (None, "transformer"):
        raise ValueError(f"layer_type={layer_type!r} (only the transformer encoder is supported)")
    if int(c.get("pos_conv_depth", 1) or 1) != 1:
        depth = c["pos_conv_depth"]
        raise ValueError(f"pos_conv_depth={depth} (data2vec-style; only depth 1 is supported)")
    d = M.Wav2Vec2Config()
    final_dim = d.final_dim if c.get("final_dim") is None else c["final_dim"]
    embed_dim = d.embed_dim if c.get("encoder_embed_dim") is None else c["encoder_embed_dim"]
    temp = c.get("latent_temp", d.latent_temp)
    if isinstance(temp, str):  # "(2, 0.5, 0.999995)" in args; a list in cfg
        try:
            temp = ast.literal_eval(temp)
        except (ValueError, SyntaxError):
            pass  # the check names it
    if isinstance(temp, (list, tuple)):
        temp = tuple(float(t) if M.is_int(t) else t for t in temp)
    conv_layers = _conv_layers_from_string(c.get("conv_feature_layers", d.conv_layers))
    fixed = dict(conv_layers=conv_layers, latent_temp=temp, normalize=bool(normalize))
    fixed["final_dim"] = final_dim or embed_dim  # fairseq's 0: embed_dim
    return _rebuild(M.Wav2Vec2Config, c, FAIRSEQ_NAMES, **fixed, has_quantizer=has_quantizer)


# fairseq parameter name -> this module's name
FAIRSEQ_KEYS = {
    r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)": r"feature_encoder.convs.\1.\2",
    # the group norm, or the layer norms of extractor_mode="layer_norm"
    r"feature_extractor\.conv_layers\.0\.2\.(weight|bias)": r"feature_encoder.norms.0.\1",
    r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)": r"feature_encoder.norms.\1.\2",
    r"encoder\.pos_conv\.0\.(bias|weight_g|weight_v)": r"encoder.pos_conv.\1",
    # newer torch's weight-norm parametrization: original0 = g, original1 = v
    r"encoder\.pos_conv\.0\.parametrizations\.weight\.original0": "encoder.pos_conv.weight_g",
    r"encoder\.pos_conv\.0\.parametrizations\.weight\.original1": "encoder.pos_conv.weight_v",
    r"(mask_emb|quantizer\.vars|(layer_norm|post_extract_proj|encoder\.layer_norm|"
    r"quantizer\.weight_proj|project_q|"
    r"final_proj|encoder\.layers\.\d+\.(self_attn\.)?\w+)\.(weight|bias))": r"\1",
}
# parameters a fairseq file may hold that this model deliberately does not use: the ASR CTC head
FAIRSEQ_IGNORED = r"w2v_encoder\.proj\.(weight|bias)"


def fairseq_key(key, table=FAIRSEQ_KEYS):
    """fairseq parameter name (Hugging Face's with table=HF_KEYS) -> this module's name (None: not
    in the table)."""
    for pattern, name in table.items():
        match = re.fullmatch(pattern, key)
        if match:
            return match.expand(name)
    return None


def _tensors(path, state, what="the 'model' entry"):
    """state, checked to map parameter names to tensors; else a CheckpointError naming the file and
    the first entry that does not (a list, a tensor, or a string where a tensor belongs)."""
    expected = f"{path}: {what} should map parameter names to tensors"
    if not isinstance(state, dict):
        raise CheckpointError(f"{expected}; found {_describe(state)}")
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{expected}; found a key that is not a name: {key!r}")
        if not torch.is_tensor(value):
            raise CheckpointError(f"{expected}; {key!r} holds {_describe(value)}")
    return state


def _some(names, n=10):
    """The first n of the sorted names, and how many more."""
    names = sorted(names)
    return f"{names[:n]}" + (f" (+{len(names) - n})" if len(names) > n else "")


def _map_keys(path, state, table, ignored, prefix=""):
    """state under this module's names (fairseq_key with table, after the regex prefix). Keys
    matching the regex ignored are reported and dropped; any other key the table does not map is a
    CheckpointError."""
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
        message = f"parameters this wav2vec 2.0 does not know: {_some(unknown)}"
        raise CheckpointError(f"{path}: {message}")
    if unused:
        print(f"{path}: not used by wav2vec 2.0: {sorted(unused)}", file=sys.stderr)
    return mapped


def _model_and_task(*containers, missing="no fairseq configuration (neither 'cfg' nor 'args')"):
    """fairseq keeps the configuration as cfg = {"model": ..., "task": ...} (newer) or as one flat
    argparse namespace (older): the first of containers that is either -> (model settings, task
    settings, model name)."""
    for c in map(to_plain, containers):
        if isinstance(c, dict):
            nested = isinstance(c.get("model"), dict)
            model, task = (c["model"], c.get("task") or {}) if nested else (c, c)
            return model, task, model.get("_name") or model.get("arch") or ""
    raise ValueError(missing)


# fairseq's model names (arch or _name) -> what they are, for messages; audio_cpc: v1's name before
# fairseq renamed it
MODEL_FAMILIES = {"wav2vec2": "wav2vec 2.0", "hubert": "HuBERT", "data2vec_audio": "data2vec"}
MODEL_FAMILIES |= dict.fromkeys(["wav2vec_ctc", "wav2vec_seq2seq"], "wav2vec 2.0 ASR")
MODEL_FAMILIES |= dict.fromkeys(["wav2vec", "audio_cpc"], "wav2vec (v1)")


def _from_fairseq(path, ckpt):
    """(config, state) of a fairseq wav2vec 2.0 file, pretrained or ASR fine-tuned; another model ->
    ValueError."""
    model_cfg, task, name = _model_and_task(ckpt.get("cfg"), ckpt.get("args"))
    prefix = ""
    if name in ("wav2vec_ctc", "wav2vec_seq2seq") or "w2v_args" in model_cfg:
        # ASR: the pretraining settings are inside
        missing = "an ASR fine-tuned checkpoint without 'w2v_args' (the pretraining configuration)"
        inner, inner_task, _ = _model_and_task(model_cfg.get("w2v_args"), missing=missing)
        # fine-tuning overrides these, as fairseq's Wav2VecEncoder does
        dropouts = ("dropout", "attention_dropout", "activation_dropout", "dropout_input")
        overrides = {k: model_cfg[k] for k in dropouts if k in model_cfg}
        if "layerdrop" in model_cfg:
            overrides["encoder_layerdrop"] = model_cfg["layerdrop"]
        model_cfg, task = {**inner, **overrides}, {**inner_task, **task}
        prefix = r"w2v_encoder\.w2v_model\."
    elif name and not name.startswith("wav2vec2"):
        hint = ""
        if name in ("wav2vec", "audio_cpc"):
            hint = " (a wav2vec (v1) file serves only as P-TAPT's teacher: pretrain.py --teacher)"
        family = MODEL_FAMILIES.get(name, name)
        raise ValueError(f"holds a {family} model ('{name}'), not wav2vec 2.0{hint}")
    state = _tensors(path, ckpt["model"])
    has_quantizer = any(re.match(rf"{prefix}quantizer\.", k) for k in state)
    cfg = config_from_fairseq(model_cfg, task.get("normalize", False), has_quantizer)
    return cfg, _map_keys(path, state, FAIRSEQ_KEYS, FAIRSEQ_IGNORED, prefix)


def _own_config(path, ckpt, cls):
    """The config of one of this project's files: its 'config' entry, the dataclass's fields as JSON
    has them (one it lacks keeps the default, one it does not know is ignored), checked as every
    config is when built."""
    c = ckpt.get("config")
    if not isinstance(c, dict):
        found = f"found {_describe(c)}"
        raise CheckpointError(
            f"{path}: the 'config' entry should be a dict of {cls.__name__} settings; {found}"
        )
    try:
        return cls(**{f.name: c[f.name] for f in fields(cls) if f.name in c})
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _model_checkpoint(path):
    """read_checkpoint(path), which must be a dict with a 'model' entry."""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a model checkpoint: found {_describe(ckpt)}")
    return ckpt


def load_wav2vec2(path) -> M.Wav2Vec2:
    """Build wav2vec 2.0 from a fairseq checkpoint (pretrained or ASR fine-tuned), a Hugging Face
    wav2vec 2.0 folder (or its weights file) or one of this project's checkpoints. Returns the model
    in eval mode, float32, on CPU."""
    weights = hf_weights(path)
    if weights is not None:
        return load_hf_wav2vec2(weights)
    ckpt = _model_checkpoint(path)
    if ckpt.get("format") == "w2v2-ser/wav2vec1-teacher":
        message = "holds the release recipe's wav2vec (v1) P-TAPT teacher, not wav2vec 2.0"
        raise CheckpointError(f"{path}: {message}")
    if ckpt.get("format") in ("w2v2-ser/wav2vec2", "w2v2-ser/classifier"):
        cfg = _own_config(path, ckpt, M.Wav2Vec2Config)
        state = _tensors(path, ckpt["model"]).items()  # a classifier's: its backbone's
        state = {k.removeprefix("backbone."): v for k, v in state if not k.startswith("head.")}
    else:
        try:
            cfg, state = _from_fairseq(path, ckpt)
        except (ValueError, TypeError, SyntaxError) as e:
            raise CheckpointError(f"{path}: {e}") from None
    return load_state(M.Wav2Vec2(cfg), state, path)


# ---- fairseq wav2vec (v1) (wav2vec_large.pt): the release recipe's P-TAPT teacher ----

# fairseq parameter name -> Wav2Vec1's name
V1_KEYS = {
    r"feature_extractor\.conv_layers\.(\d+)\.0\.weight": r"feature_extractor.blocks.\1.conv.weight",
    r"feature_extractor\.conv_layers\.(\d+)\.2\.(weight|bias)": (
        r"feature_extractor.blocks.\1.norm.\2"
    ),
    r"feature_aggregator\.conv_layers\.(\d+)\.1\.(weight|bias)": r"aggregator.blocks.\1.conv.\2",
    r"feature_aggregator\.conv_layers\.(\d+)\.3\.(weight|bias)": r"aggregator.blocks.\1.norm.\2",
    r"feature_aggregator\.residual_proj\.(\d+)\.weight": r"aggregator.residual_proj.\1.weight",
}
# in a v1 file but only for the pretraining loss: the step-ahead predictions, and
# project_features='same'|'new' (the aggregator applied to the loss's targets; 'same' repeats
# feature_aggregator's tensors under this name)
V1_IGNORED = [r"wav2vec_predictions\.project_to_steps\.(weight|bias)", r"project_features\..+"]
# settings whose default changed with fairseq's hydra port (base_wav2vec_architecture before,
# Wav2VecConfig after): a file that does not state them could mean either model, so it is refused
V1_REQUIRED = (
    "conv_feature_layers conv_aggregator_layers skip_connections_agg log_compression".split()
)
# what this module computes; a file asking for something else (another encoder) is refused
V1_SUPPORTED = {"aggregator": "cnn", "encoder": "cnn", "activation": ("relu", "gelu")}
# Wav2Vec1Config field -> fairseq's name; a setting the file lacks keeps the default (the same in
# every version). conv_layers and agg_layers are parsed.
V1_NAMES = _names("""conv_layers=conv_feature_layers agg_layers=conv_aggregator_layers
    log_compression skip_feat=skip_connections_feat skip_agg=skip_connections_agg residual_scale
    agg_zero_pad activation dropout""")


def v1_settings(ckpt: dict) -> dict:
    """The fairseq model settings of a wav2vec (v1) file, newer cfg or older args; anything else ->
    ValueError."""
    if str(ckpt.get("format", "")).startswith("w2v2-ser/"):
        raise ValueError("holds one of this project's checkpoints, not fairseq's wav2vec (v1)")
    settings, _, name = _model_and_task(ckpt.get("cfg"), ckpt.get("args"))
    if name not in ("wav2vec", "audio_cpc"):  # audio_cpc: wav2vec's early name
        family = MODEL_FAMILIES.get(name, name or "unnamed")
        raise ValueError(f"holds a {family} model ('{name}'), not wav2vec (v1)")
    return settings


def config_from_v1(c: dict) -> M.Wav2Vec1Config:
    missing = [k for k in V1_REQUIRED if c.get(k) is None]
    if missing:
        raise ValueError(
            f"wav2vec (v1) settings {missing} are not in the file (their defaults differ between "
            "fairseq versions, so the model is ambiguous)"
        )
    if c.get("vq_type") not in (None, "none"):
        vq = c["vq_type"]
        raise ValueError(f"a vq-wav2vec model (vq_type={vq!r}); only wav2vec (v1) is supported")
    for key, supported in V1_SUPPORTED.items():
        if c.get(key) is not None and c[key] not in supported:
            raise ValueError(f"{key}={c[key]!r} (supported: {supported})")
    conv_layers = _conv_layers_from_string(c["conv_feature_layers"])
    agg_layers = _conv_layers_from_string(c["conv_aggregator_layers"], "conv_aggregator_layers")
    agg_bias, affine = not c.get("no_conv_bias", False), not c.get("non_affine_group_norm", False)
    fixed = dict(conv_layers=conv_layers, agg_layers=agg_layers, agg_bias=agg_bias, affine=affine)
    return _rebuild(M.Wav2Vec1Config, c, V1_NAMES, **fixed)


def load_wav2vec1(path) -> M.Wav2Vec1:
    """Build wav2vec (v1) from a fairseq checkpoint (wav2vec_large.pt). Every parameter in the file
    is mapped or in V1_IGNORED; anything missing, unexpected or of the wrong shape is named in one
    CheckpointError. Returns the model in eval mode, float32, on CPU."""
    ckpt = _model_checkpoint(path)
    try:
        cfg = config_from_v1(v1_settings(ckpt))
    except (ValueError, TypeError, SyntaxError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    state = _tensors(path, ckpt["model"]).items()
    state = [(k, v) for k, v in state if not any(re.fullmatch(p, k) for p in V1_IGNORED)]
    # an unknown parameter keeps its own name, so load_state reports it as unexpected with the rest
    state = {fairseq_key(k, V1_KEYS) or k: v for k, v in state}
    return load_state(M.Wav2Vec1(cfg), state, path)


# ---- Hugging Face wav2vec 2.0 (transformers' modeling_wav2vec2.py) ----
# A folder with config.json and model.safetensors or pytorch_model.bin (sharded: an .index.json),
# optionally preprocessor_config.json.

# Wav2Vec2Config field -> config.json's name (feature_grad_mult, latent_temp: not there, fairseq's
# defaults); conv_layers is parsed from three lists
HF_NAMES = _names("""
    conv_bias embed_dim=hidden_size ffn_dim=intermediate_size num_layers=num_hidden_layers
    num_heads=num_attention_heads layer_norm_first=do_stable_layer_norm
    pos_conv_kernel=num_conv_pos_embeddings pos_conv_groups=num_conv_pos_embedding_groups
    dropout=hidden_dropout attention_dropout activation_dropout dropout_input=feat_proj_dropout
    dropout_features=feat_quantizer_dropout layerdrop latent_vars=num_codevectors_per_group
    latent_groups=num_codevector_groups latent_dim=codevector_dim final_dim=proj_codevector_dim
    logit_temp=contrastive_logits_temperature num_negatives
""") | {"conv_layers": "(conv_dim, conv_kernel, conv_stride)"}
# Hugging Face parameter name (the "wav2vec2." of its head models removed) -> this module's name
_HF_LAYER = r"encoder\.layers\.(\d+)\."
HF_KEYS = {
    r"feature_extractor\.conv_layers\.(\d+)\.conv\.(weight|bias)": r"feature_encoder.convs.\1.\2",
    # the group norm or the layer norms
    r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.(weight|bias)": (
        r"feature_encoder.norms.\1.\2"
    ),
    r"feature_projection\.layer_norm\.(weight|bias)": r"layer_norm.\1",
    r"feature_projection\.projection\.(weight|bias)": r"post_extract_proj.\1",
    r"masked_spec_embed": "mask_emb",
    r"encoder\.pos_conv_embed\.conv\.(bias|weight_g|weight_v)": r"encoder.pos_conv.\1",
    r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original0": (
        "encoder.pos_conv.weight_g"
    ),
    r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original1": (
        "encoder.pos_conv.weight_v"
    ),
    _HF_LAYER
    + r"attention\.([qkv]_proj|out_proj)\.(weight|bias)": r"encoder.layers.\1.self_attn.\2.\3",
    _HF_LAYER + r"layer_norm\.(weight|bias)": r"encoder.layers.\1.self_attn_layer_norm.\2",
    _HF_LAYER + r"feed_forward\.intermediate_dense\.(weight|bias)": r"encoder.layers.\1.fc1.\2",
    _HF_LAYER + r"feed_forward\.output_dense\.(weight|bias)": r"encoder.layers.\1.fc2.\2",
    r"(encoder\.(layers\.\d+\.final_)?layer_norm|quantizer\.weight_proj|project_q)"
    r"\.(weight|bias)": r"\1.\3",
    r"quantizer\.codevectors": "quantizer.vars",
    r"project_hid\.(weight|bias)": r"final_proj.\1",
}
# the heads of Wav2Vec2ForCTC and Wav2Vec2ForSequenceClassification: reported and dropped
HF_IGNORED = r"(lm_head|projector|classifier)\.(weight|bias)|layer_weights"
# what this module computes; a config.json asking for something else is refused rather than run
# differently
HF_SUPPORTED = {"hidden_act": ("gelu",), "feat_extract_activation": ("gelu",)}
HF_SUPPORTED |= {"layer_norm_eps": (1e-5,), "feat_extract_norm": ("group", "layer")}
HF_SUPPORTED |= {"add_adapter": (False, None), "adapter_attn_dim": (None,)}
# a model's weights, in the order they are looked for: one file, else a shard index
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HF_WEIGHTS += tuple(f"{name}.index.json" for name in HF_WEIGHTS)
# safetensors' dtype names -> torch's
_ST_DTYPES = _names("""F64=float64 F32=float32 F16=float16 BF16=bfloat16 I64=int64 I32=int32
    I16=int16 I8=int8 U8=uint8 BOOL=bool""")
SAFETENSORS_DTYPES = {st: getattr(torch, name) for st, name in _ST_DTYPES.items()}


def _header_entries(path, header):
    """A safetensors header's tensors, as sorted (begin, end, name, dtype, shape); an entry that is
    not {"dtype": "F32", "shape": [ints], "data_offsets": [begin, end]} is a CheckpointError."""
    entries = []
    for name, h in header.items():
        if not (
            isinstance(h, dict)
            and isinstance(h.get("dtype"), str)
            and isinstance(h.get("shape"), list)
            and isinstance(h.get("data_offsets"), list)
            and len(h["data_offsets"]) == 2
            and all(M.is_int(v) for v in h["shape"] + h["data_offsets"])
        ):
            expected = '{"dtype": ..., "shape": [integers], "data_offsets": [begin, end]}'
            entry = f"the header's entry for {name!r} is {json.dumps(h)[:80]}"
            raise CheckpointError(f"{path}: {entry}, expected {expected}")
        if h["dtype"] not in SAFETENSORS_DTYPES:
            dtype, expected = h["dtype"], ", ".join(SAFETENSORS_DTYPES)
            raise CheckpointError(
                f"{path}: {name!r} has dtype {dtype!r}, expected one of {expected}"
            )
        entries.append((*h["data_offsets"], name, SAFETENSORS_DTYPES[h["dtype"]], h["shape"]))
    return sorted(entries)


def read_safetensors(path):
    """{name: tensor} from a .safetensors file: an 8-byte little-endian header length, a JSON header
    {name: {dtype, shape, data_offsets}}, then the tensors' bytes, back to back. Every offset is
    checked against the file size and the others, so a damaged file is an error, never garbage."""
    try:
        with open(path, "rb") as f:
            data = bytearray(f.read())  # writable, as torch.frombuffer wants
    except OSError as e:
        raise _unreadable(path, e) from None
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    size = len(data) - 8 - n  # of the tensors' bytes
    if not 0 < n <= len(data) - 8:
        found = f"header of {n} bytes in a file of {len(data)}; truncated?"
        raise CheckpointError(f"{path}: not a safetensors file ({found})")
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError:  # not JSON, or not UTF-8
        found = f"its {n}-byte header is not JSON"
        raise CheckpointError(f"{path}: not a safetensors file ({found})") from None
    if not isinstance(header, dict):
        found = f"its header is {_describe(header)}, expected a JSON object of tensors"
        raise CheckpointError(f"{path}: not a safetensors file ({found})")
    header.pop("__metadata__", None)
    entries = _header_entries(path, header)
    described = entries[-1][1] if entries else 0
    if described != size:
        held = f"the header describes {described} bytes of tensors, the file holds {size}"
        raise CheckpointError(f"{path}: {held} (truncated?)")
    tensors, expected = {}, 0
    for begin, end, name, dtype, shape in entries:
        count = math.prod(shape)
        if begin != expected or min(shape, default=0) < 0 or end - begin != count * dtype.itemsize:
            raise CheckpointError(
                f"{path}: the header's offsets for {name!r} ({begin}..{end}, {dtype}, {shape}) do "
                f"not fit its shape or the tensor before it (ends at {expected})"
            )
        expected = end
        if end > begin:
            tensor = torch.frombuffer(data, dtype=dtype, count=count, offset=8 + n + begin)
            tensors[name] = tensor.clone().reshape(shape)
        else:
            tensors[name] = torch.zeros(shape, dtype=dtype)
    return tensors


def _read_json(path, what):
    """A JSON object from path. A file that cannot be read, is not JSON or holds another JSON value
    (a list) is a CheckpointError saying what the file should have been."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except OSError as e:
        raise _unreadable(path, e, f"the {what}") from None
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}: {e.msg}"
        raise CheckpointError(f"{path}: the {what} is not valid JSON ({where})") from None
    except ValueError:  # UnicodeDecodeError
        raise CheckpointError(f"{path}: the {what} is not a UTF-8 JSON file") from None
    if not isinstance(obj, dict):
        found = f"found {_describe(obj)}"
        raise CheckpointError(f"{path}: the {what} should be a JSON object ({{...}}); {found}")
    return obj


def hf_weights(path):
    """The weights of a Hugging Face model when path is its folder (model.safetensors first), a
    .safetensors file, a shard index (.index.json) or a .bin file beside a config.json; None for any
    other path. The model's config.json is the one in that file's folder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = [os.path.join(path, n) for n in HF_WEIGHTS if os.path.isfile(os.path.join(path, n))]
        if not found:
            weights = " or ".join(HF_WEIGHTS[:2])
            raise CheckpointError(f"{path}: a folder without {weights} (not a Hugging Face model)")
        return found[0]
    config = os.path.join(os.path.dirname(path), "config.json")
    bin_beside_config = path.endswith(".bin") and os.path.isfile(config)
    if not (path.endswith((".safetensors", ".index.json")) or bin_beside_config):
        return None
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    return path


def hf_shards(index_path):
    """The files a shard index lists (its weight_map: tensor name -> file), each in the index's own
    folder. A name reaching elsewhere ('../x.safetensors', an absolute path) is refused: a model's
    weights, like its config.json, come from its folder only, never from a parent's."""
    index, folder = _read_json(index_path, "shard index"), os.path.dirname(index_path) or "."
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        found = "an empty one" if weight_map == {} else _describe(weight_map)
        found = "none" if weight_map is None else found
        raise CheckpointError(
            f"{index_path}: expected a 'weight_map' of tensor names to shard files; found {found}"
        )
    for name in weight_map.values():
        if not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name:
            raise CheckpointError(
                f"{index_path}: the weight_map lists {name!r}, expected the name of a file in "
                f"{folder} (a model's weights come from its own folder)"
            )
    names = list(dict.fromkeys(weight_map.values()))  # each once, in the index's order
    for name in names:
        if not os.path.isfile(os.path.join(folder, name)):
            listed = f"listed in {os.path.basename(index_path)}"
            raise CheckpointError(f"{folder}: {name}, {listed}, is missing")
    return [os.path.join(folder, name) for name in sorted(names)]


def config_from_hf(c: dict, preprocessor: dict) -> M.Wav2Vec2Config:
    """Map Hugging Face's config.json (and preprocessor_config.json) onto Wav2Vec2Config; a setting
    the file does not have keeps this module's default. The quantizer's settings are checked whether
    or not the weights hold one (they are read after the config)."""
    kind = c.get("model_type") if isinstance(c, dict) else f"none ({type(c).__name__})"
    if kind != "wav2vec2":
        raise ValueError(f"model_type {kind!r}, not wav2vec 2.0 ('wav2vec2')")
    for key, supported in HF_SUPPORTED.items():
        if key in c and c[key] not in supported:
            only = " or ".join(map(repr, supported))
            raise ValueError(f"{key}={c[key]!r}: only {only} is supported")
    rate = preprocessor.get("sampling_rate", M.SAMPLE_RATE)
    if rate != M.SAMPLE_RATE:
        here = f"wav2vec 2.0 here takes {M.SAMPLE_RATE} Hz"
        raise ValueError(f"preprocessor sampling_rate {rate}: {here}")
    keys = ("conv_dim", "conv_kernel", "conv_stride")
    convs = [list(v) if c.get(k) is None else c[k] for k, v in zip(keys, zip(*M.BASE_CONV_LAYERS))]
    if not (all(isinstance(x, list) for x in convs) and len({len(x) for x in convs}) == 1):
        found = ", ".join(map(str, convs))
        raise ValueError(f"{', '.join(keys)}: expected three lists of one length, found {found}")
    mode = "layer_norm" if c.get("feat_extract_norm") == "layer" else "default"
    normalize = bool(preprocessor.get("do_normalize", False))
    fixed = dict(conv_layers=list(zip(*convs)), extractor_mode=mode, normalize=normalize)
    return _rebuild(M.Wav2Vec2Config, c, HF_NAMES, **fixed)


def load_hf_wav2vec2(weights) -> M.Wav2Vec2:
    """wav2vec 2.0 from a Hugging Face model's weights (hf_weights: one file, or an index of shards)
    and the config.json of that folder, built and checked before any weight is read: Wav2Vec2Model,
    Wav2Vec2ForPreTraining (with the quantizer and its projections), and Wav2Vec2ForCTC /
    ForSequenceClassification, whose heads are reported and dropped. Every tensor must be mapped or
    in HF_IGNORED; .bin files go through the safe unpickler."""
    folder = os.path.dirname(weights) or "."
    config_path = os.path.join(folder, "config.json")
    prep_path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(config_path):
        message = "no config.json beside it (a Hugging Face model folder has one)"
        raise CheckpointError(f"{weights}: {message}")
    hf_cfg = _read_json(config_path, "model configuration")
    has_prep = os.path.isfile(prep_path)
    try:
        prep = _read_json(prep_path, "preprocessor configuration") if has_prep else {}
        cfg = config_from_hf(hf_cfg, prep)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    state = {}
    for path in hf_shards(weights) if weights.endswith(".index.json") else [weights]:
        shard = read_safetensors(path) if path.endswith(".safetensors") else read_checkpoint(path)
        state.update(_tensors(path, shard, "the file"))
    # the head models' parameters are under "wav2vec2."
    mapped = _map_keys(weights, state, HF_KEYS, HF_IGNORED, prefix=r"(?:wav2vec2\.)?")
    cfg = replace(cfg, has_quantizer=any(k.startswith("quantizer.") for k in mapped))
    model = M.Wav2Vec2(cfg)
    masks = hf_cfg.get("mask_time_prob", 0.05) or hf_cfg.get("mask_feature_prob", 0)
    if "mask_emb" not in mapped and not masks:
        # HF leaves it out of a model that never masks: a fresh one
        mapped["mask_emb"] = model.mask_emb.detach()
        note = (
            "no masked_spec_embed (the model was configured without masks): a fresh mask embedding"
        )
        print(f"{weights}: {note}", file=sys.stderr)
    return load_state(model, mapped, weights)


def load_state(model, state, path="state dict"):
    """model, in eval mode, with state loaded as float32; errors name the keys and shapes."""
    own = model.state_dict()
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs config {tuple(own[k].shape)}" for k in wrong]
    problems = [f"missing {_some(missing)}"] if missing else []
    if unexpected:
        problems.append(f"unexpected {_some(unexpected)}")
    if wrong:
        problems.append(f"shapes that do not fit the configuration: {wrong[:5]}")
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()


# ---- This project's files: plain dicts and tensors, loadable with weights_only=True ----


def config_dict(cfg) -> dict:
    """A config with lists for its tuples, as JSON has them (the project's checkpoints,
    bench.json)."""
    return json.loads(json.dumps(asdict(cfg)))


def save_own(kind, cfg, module, path, meta=None, **extra):
    """The one writer of the project's three kinds (wav2vec2, classifier, wav2vec1-teacher)."""
    content = {"format": f"w2v2-ser/{kind}", "version": 1, "config": config_dict(cfg), **extra}
    save_atomic({**content, "model": module.state_dict(), "meta": meta or {}}, path)


def save_wav2vec2(model: M.Wav2Vec2, path, meta=None):
    save_own("wav2vec2", model.cfg, model, path, meta)


def save_classifier(clf: M.EmotionClassifier, path, meta=None):
    extra = {"classes": list(clf.classes), "skip_last_frame": clf.skip_last_frame}
    save_own("classifier", clf.backbone.cfg, clf, path, meta, **extra)


def save_wav2vec1_teacher(teacher: M.Wav2Vec1Teacher, path, meta=None):
    """The release recipe's trained P-TAPT teacher (v1 and its stride-2 conv)."""
    save_own("wav2vec1-teacher", teacher.v1.cfg, teacher, path, meta)


def _read_own(path, kind, what):
    """One of this project's files of the given kind, or a CheckpointError saying it is not what."""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != f"w2v2-ser/{kind}":
        raise CheckpointError(f"{path}: not {what} (found {_describe(ckpt)})")
    return ckpt


def load_classifier(path) -> M.EmotionClassifier:
    """The classifier, backbone and head, from one read of the file."""
    ckpt = _read_own(path, "classifier", "a fine-tuned emotion classifier written by finetune.py")
    classes = ckpt.get("classes")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise CheckpointError(f"{path}: its 'classes' should be a list of names; found {classes!r}")
    backbone = M.Wav2Vec2(_own_config(path, ckpt, M.Wav2Vec2Config))
    clf = M.EmotionClassifier(backbone, classes, bool(ckpt.get("skip_last_frame")))
    return load_state(clf, _tensors(path, ckpt.get("model")), path)


def load_wav2vec1_teacher(path) -> M.Wav2Vec1Teacher:
    what = "a wav2vec (v1) P-TAPT teacher written by pretrain.py"
    ckpt = _read_own(path, "wav2vec1-teacher", what)
    teacher = M.Wav2Vec1Teacher(M.Wav2Vec1(_own_config(path, ckpt, M.Wav2Vec1Config)))
    return load_state(teacher, _tensors(path, ckpt.get("model")), path)


# ---- Writing any file atomically ----


def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves a
    half-written file under the final name. Any failure to write is an OSError naming the file."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except RuntimeError as e:  # torch.save reports a full disk or an unopenable file so
        raise OSError(f"cannot write {path}: {str(e).splitlines()[0]}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path, write):
    """write(f) to <path>.tmp, then rename it: a reader never sees half a file. Any failure to write
    is an OSError naming the file."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", newline="") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from None


def write_json(path, obj):
    write_text_atomic(path, lambda f: json.dump(obj, f, indent=2))
