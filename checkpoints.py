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

from model import (
    BASE_CONV_LAYERS,
    SAMPLE_RATE,
    EmotionClassifier,
    Wav2Vec1,
    Wav2Vec1Config,
    Wav2Vec1Teacher,
    Wav2Vec2,
    Wav2Vec2Config,
)


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


_OPAQUE_MODULES = (
    "omegaconf",
    "fairseq",
    "numpy",
    "typing",
    "enum",
    "pathlib",
    "collections",
    "copyreg",
)


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


for _name in (
    "_rebuild_tensor",
    "_rebuild_tensor_v2",
    "_rebuild_tensor_v3",
    "_rebuild_parameter",
    "_rebuild_parameter_with_state",
):
    if hasattr(torch._utils, _name):
        _ALLOWED[("torch._utils", _name)] = getattr(torch._utils, _name)
# plain builtin types (omegaconf records them as key and element types); calling them runs no user
# code
for _mod in ("builtins", "__builtin__"):
    for _t in (
        dict,
        list,
        tuple,
        set,
        frozenset,
        int,
        float,
        str,
        bool,
        bytes,
        complex,
        slice,
        object,
    ):
        _ALLOWED[(_mod, _t.__name__)] = _t


class _Refused(pickle.UnpicklingError):
    """The safe unpickler's refusal of a class, reported as it is; any other unpickling error means
    a damaged file or not a checkpoint at all."""


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
        raise _Refused(
            f"refusing to load {module}.{name}: not a tensor, container or config record"
        )


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


def _readable(path):
    """A file that exists but cannot be opened (permissions) is named as such, before a reader whose
    own OSErrors may mean a damaged file instead."""
    try:
        open(path, "rb").close()
    except OSError as e:
        raise _unreadable(path, e) from None


def read_checkpoint(path):
    """Load a checkpoint without executing code from it (see _SafeUnpickler)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    _readable(path)
    try:
        return torch.load(
            path, map_location="cpu", pickle_module=_SafePickleModule, weights_only=False
        )
    except _Refused as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (
        OSError,  # torch's zip reader: "Invalid argument" for a truncated archive
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        ValueError,
        IndexError,
        KeyError,
        AttributeError,
        TypeError,
        OverflowError,
    ):  # torch's and pickle's own words (zip records, load keys) say nothing a user can act on
        raise CheckpointError(
            f"{path}: not a complete PyTorch checkpoint (truncated or not a .pt file)"
        ) from None


def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves a
    half-written file under the final name. Any failure to write is an OSError naming the file."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (
        RuntimeError
    ) as e:  # torch.save reports a full disk or an unopenable file as a RuntimeError
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


def _is_int(x):  # bool is an int to Python, never a size or an offset here
    return isinstance(x, int) and not isinstance(x, bool)


def _conv_layers_from_string(text, name="conv_feature_layers"):
    """fairseq's conv_feature_layers is a Python expression such as
    "[(512, 10, 5)] + [(512, 3, 2)] * 4" (or the list itself); evaluate it without eval(). The
    values are kept as they are: the config's check says which layer is not a (dim, kernel,
    stride)."""
    unsupported = ValueError(
        f"{name}={text!r}: expected a list of (dim, kernel, stride) layers, such as "
        "[(512, 10, 5)] + [(512, 3, 2)] * 4"
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


def _renamed(c: dict, names: dict, defaults) -> dict:
    """The settings c has under the names in `names` (our field -> theirs). An int where the field
    is a float becomes one; nothing else is converted (int(7.5), bool("false") would hide a wrong
    value): the config's check names a value of the wrong type."""

    def value(ours, v):
        is_int = isinstance(v, int) and not isinstance(v, bool)
        return float(v) if is_int and isinstance(getattr(defaults, ours), float) else v

    return {
        ours: value(ours, c[theirs]) for ours, theirs in names.items() if c.get(theirs) is not None
    }


def _checked(build, names):
    """build() (a config), its check's ValueError told in the file's names (names: our field ->
    theirs): a fairseq user reads encoder_attention_heads=5, not num_heads=5."""
    try:
        return build()
    except ValueError as e:
        raise ValueError(re.sub(r"\b[a-z_]+\b", lambda m: names.get(m[0], m[0]), str(e))) from None


# Wav2Vec2Config field -> fairseq's name for it (args or cfg.model)
FAIRSEQ_NAMES = {
    "extractor_mode": "extractor_mode",
    "conv_bias": "conv_bias",
    "embed_dim": "encoder_embed_dim",
    "ffn_dim": "encoder_ffn_embed_dim",
    "num_layers": "encoder_layers",
    "num_heads": "encoder_attention_heads",
    "layer_norm_first": "layer_norm_first",
    "pos_conv_kernel": "conv_pos",
    "pos_conv_groups": "conv_pos_groups",
    "dropout": "dropout",
    "attention_dropout": "attention_dropout",
    "activation_dropout": "activation_dropout",
    "dropout_input": "dropout_input",
    "dropout_features": "dropout_features",
    "layerdrop": "encoder_layerdrop",
    "feature_grad_mult": "feature_grad_mult",
    "final_dim": "final_dim",
    "latent_vars": "latent_vars",
    "latent_groups": "latent_groups",
    "latent_dim": "latent_dim",
    "logit_temp": "logit_temp",
    "num_negatives": "num_negatives",
}


def config_from_fairseq(c: dict, normalize: bool, has_quantizer: bool) -> Wav2Vec2Config:
    """Map fairseq's settings onto Wav2Vec2Config; a setting the file does not have keeps its
    default."""
    layer_type = c.get("layer_type", "transformer")
    if layer_type not in (None, "transformer"):
        raise ValueError(f"layer_type={layer_type!r} (only the transformer encoder is supported)")
    if int(c.get("pos_conv_depth", 1) or 1) != 1:
        raise ValueError(
            f"pos_conv_depth={c['pos_conv_depth']} (data2vec-style; only depth 1 is supported)"
        )
    d = Wav2Vec2Config()
    values = _renamed(c, FAIRSEQ_NAMES, d)
    values["final_dim"] = values.get("final_dim", d.final_dim) or values.get(
        "embed_dim", d.embed_dim
    )  # 0: embed_dim
    temp = c.get("latent_temp", d.latent_temp)
    if isinstance(temp, str):  # "(2, 0.5, 0.999995)" in args; a list in cfg
        try:
            temp = ast.literal_eval(temp)
        except (ValueError, SyntaxError):
            pass  # the check names it
    conv_layers = _conv_layers_from_string(c.get("conv_feature_layers", d.conv_layers))
    return _checked(
        lambda: Wav2Vec2Config(
            **values,
            conv_layers=conv_layers,
            latent_temp=tuple(float(t) if _is_int(t) else t for t in temp)
            if isinstance(temp, (list, tuple))
            else temp,
            normalize=bool(normalize),
            has_quantizer=has_quantizer,
        ),
        {**FAIRSEQ_NAMES, "conv_layers": "conv_feature_layers"},
    )


# fairseq parameter name -> this module's name
FAIRSEQ_KEYS = [
    (r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)", r"feature_encoder.convs.\1.\2"),
    (
        r"feature_extractor\.conv_layers\.0\.2\.(weight|bias)",
        r"feature_encoder.norms.0.\1",
    ),  # group norm
    (
        r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)",
        r"feature_encoder.norms.\1.\2",
    ),  # layer norms
    (r"encoder\.pos_conv\.0\.(bias|weight_g|weight_v)", r"encoder.pos_conv.\1"),
    # newer torch's weight-norm parametrization: original0 = g, original1 = v
    (r"encoder\.pos_conv\.0\.parametrizations\.weight\.original0", "encoder.pos_conv.weight_g"),
    (r"encoder\.pos_conv\.0\.parametrizations\.weight\.original1", "encoder.pos_conv.weight_v"),
    (
        r"(mask_emb|quantizer\.vars|(layer_norm|post_extract_proj|encoder\.layer_norm|"
        r"quantizer\.weight_proj|project_q|"
        r"final_proj|encoder\.layers\.\d+\.(self_attn\.)?\w+)\.(weight|bias))",
        r"\1",
    ),
]


def fairseq_key(key, table=FAIRSEQ_KEYS):
    """fairseq parameter name (Hugging Face's with table=HF_KEYS) -> this module's name (None: not
    in the table)."""
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
    if obj is None:
        return "None"
    name = type(obj).__name__
    return f"{'an' if name[0] in 'aeiouAEIOU' else 'a'} {name}"


def _tensors(path, state, what="the 'model' entry"):
    """state, checked to be what every loader maps: parameter names to tensors. A list, a tensor, or
    a string where a tensor belongs is a CheckpointError naming the file and the first entry that is
    not."""
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
        raise CheckpointError(
            f"{path}: parameters this wav2vec 2.0 does not know: {_some(unknown)}"
        )
    if unused:
        print(f"{path}: not used by wav2vec 2.0: {sorted(unused)}", file=sys.stderr)
    return mapped


def _model_and_task(*containers, missing="no fairseq configuration (neither 'cfg' nor 'args')"):
    """fairseq keeps the configuration as cfg = {"model": ..., "task": ...} (newer) or as one flat
    argparse namespace (older): the first of containers that is either -> (model settings, task
    settings, model name)."""
    for c in map(to_plain, containers):
        if isinstance(c, dict):
            model, task = (
                (c["model"], c.get("task") or {}) if isinstance(c.get("model"), dict) else (c, c)
            )
            return model, task, model.get("_name") or model.get("arch") or ""
    raise ValueError(missing)


# fairseq's model names (arch or _name) -> what they are, for messages; audio_cpc: v1's name before
# fairseq renamed it
MODEL_FAMILIES = {
    "wav2vec2": "wav2vec 2.0",
    "wav2vec_ctc": "wav2vec 2.0 ASR",
    "wav2vec_seq2seq": "wav2vec 2.0 ASR",
    "hubert": "HuBERT",
    "data2vec_audio": "data2vec",
    "wav2vec": "wav2vec (v1)",
    "audio_cpc": "wav2vec (v1)",
}


def _from_fairseq(path, ckpt):
    """(config, state) of a fairseq wav2vec 2.0 file, pretrained or ASR fine-tuned; another model ->
    ValueError."""
    model_cfg, task, name = _model_and_task(ckpt.get("cfg"), ckpt.get("args"))
    prefix = ""
    if (
        name in ("wav2vec_ctc", "wav2vec_seq2seq") or "w2v_args" in model_cfg
    ):  # ASR: the pretraining settings inside
        inner, inner_task, _ = _model_and_task(
            model_cfg.get("w2v_args"),
            missing="an ASR fine-tuned checkpoint "
            "without 'w2v_args' (the pretraining configuration)",
        )
        # fine-tuning overrides these, as fairseq's Wav2VecEncoder does
        overrides = {
            k: model_cfg[k]
            for k in ("dropout", "attention_dropout", "activation_dropout", "dropout_input")
            if k in model_cfg
        }
        if "layerdrop" in model_cfg:
            overrides["encoder_layerdrop"] = model_cfg["layerdrop"]
        model_cfg, task, prefix = (
            {**inner, **overrides},
            {**inner_task, **task},
            r"w2v_encoder\.w2v_model\.",
        )
    elif name and not name.startswith("wav2vec2"):
        hint = (
            " (a wav2vec (v1) file serves only as P-TAPT's teacher: pretrain.py --teacher)"
            if name in ("wav2vec", "audio_cpc")
            else ""
        )
        raise ValueError(
            f"holds a {MODEL_FAMILIES.get(name, name)} model ('{name}'), not wav2vec 2.0{hint}"
        )
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
        raise CheckpointError(
            f"{path}: the 'config' entry should be a dict of {cls.__name__} settings; "
            f"found {_describe(c)}"
        )
    try:
        return cls(**{f.name: c[f.name] for f in fields(cls) if f.name in c})
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_wav2vec2(path) -> Wav2Vec2:
    """Build wav2vec 2.0 from a fairseq checkpoint (pretrained or ASR fine-tuned), a Hugging Face
    wav2vec 2.0 folder (or its weights file) or one of this project's checkpoints. Returns the model
    in eval mode, float32, on CPU."""
    weights = hf_weights(path)
    if weights is not None:
        return load_hf_wav2vec2(weights)
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a model checkpoint: found {_describe(ckpt)}")
    if ckpt.get("format") == "w2v2-ser/wav2vec1-teacher":
        raise CheckpointError(
            f"{path}: holds the release recipe's wav2vec (v1) P-TAPT teacher, not wav2vec 2.0"
        )
    if ckpt.get("format") in (
        "w2v2-ser/wav2vec2",
        "w2v2-ser/classifier",
    ):  # this project's (a classifier's backbone)
        cfg = _own_config(path, ckpt, Wav2Vec2Config)
        state = {
            k.removeprefix("backbone."): v
            for k, v in _tensors(path, ckpt["model"]).items()
            if not k.startswith("head.")
        }
    else:
        try:
            cfg, state = _from_fairseq(path, ckpt)
        except (ValueError, TypeError, SyntaxError) as e:
            raise CheckpointError(f"{path}: {e}") from None
    model = Wav2Vec2(cfg)
    load_state(model, state, path)
    return model.eval()


# fairseq's wav2vec (v1) (wav2vec_large.pt): the release recipe's P-TAPT teacher, never a V-FT
# backbone. fairseq parameter name -> Wav2Vec1's name
V1_KEYS = [
    (
        r"feature_extractor\.conv_layers\.(\d+)\.0\.weight",
        r"feature_extractor.blocks.\1.conv.weight",
    ),
    (
        r"feature_extractor\.conv_layers\.(\d+)\.2\.(weight|bias)",
        r"feature_extractor.blocks.\1.norm.\2",
    ),
    (r"feature_aggregator\.conv_layers\.(\d+)\.1\.(weight|bias)", r"aggregator.blocks.\1.conv.\2"),
    (r"feature_aggregator\.conv_layers\.(\d+)\.3\.(weight|bias)", r"aggregator.blocks.\1.norm.\2"),
    (r"feature_aggregator\.residual_proj\.(\d+)\.weight", r"aggregator.residual_proj.\1.weight"),
]


# in a v1 file but only for the pretraining loss: the step-ahead predictions, and
# project_features='same'|'new' (the aggregator applied to the loss's targets; 'same' repeats
# feature_aggregator's tensors under this name)
V1_IGNORED = [r"wav2vec_predictions\.project_to_steps\.(weight|bias)", r"project_features\..+"]


# settings whose default changed with fairseq's hydra port (base_wav2vec_architecture before,
# Wav2VecConfig after): a file that does not state them could mean either model, so it is refused
V1_REQUIRED = (
    "conv_feature_layers",
    "conv_aggregator_layers",
    "skip_connections_agg",
    "log_compression",
)


# Wav2Vec1Config field -> fairseq's name; a setting the file lacks keeps the default (the same in
# every version)
V1_NAMES = {
    "log_compression": "log_compression",
    "skip_feat": "skip_connections_feat",
    "skip_agg": "skip_connections_agg",
    "residual_scale": "residual_scale",
    "agg_zero_pad": "agg_zero_pad",
    "activation": "activation",
    "dropout": "dropout",
}


def v1_settings(ckpt: dict) -> dict:
    """The fairseq model settings of a wav2vec (v1) file, newer cfg or older args; anything else ->
    ValueError."""
    if str(ckpt.get("format", "")).startswith("w2v2-ser/"):
        raise ValueError("holds one of this project's checkpoints, not fairseq's wav2vec (v1)")
    settings, _, name = _model_and_task(ckpt.get("cfg"), ckpt.get("args"))
    if name not in (
        "wav2vec",
        "audio_cpc",
    ):  # audio_cpc: wav2vec's early name (fairseq's _upgrade_state_dict)
        raise ValueError(
            f"holds a {MODEL_FAMILIES.get(name, name or 'unnamed')} model ('{name}'), not wav2vec "
            "(v1)"
        )
    return settings


def config_from_v1(c: dict) -> Wav2Vec1Config:
    missing = [k for k in V1_REQUIRED if c.get(k) is None]
    if missing:
        raise ValueError(
            f"wav2vec (v1) settings {missing} are not in the file (their defaults differ between "
            "fairseq versions, so the model is ambiguous)"
        )
    if c.get("vq_type") not in (None, "none"):
        raise ValueError(
            f"a vq-wav2vec model (vq_type={c['vq_type']!r}); only wav2vec (v1) is supported"
        )
    for key, supported in (
        ("aggregator", "cnn"),
        ("encoder", "cnn"),
        ("activation", ("relu", "gelu")),
    ):
        if c.get(key) is not None and c[key] not in supported:
            raise ValueError(f"{key}={c[key]!r} (supported: {supported})")
    conv_layers = _conv_layers_from_string(c["conv_feature_layers"])
    agg_layers = _conv_layers_from_string(c["conv_aggregator_layers"], "conv_aggregator_layers")
    return _checked(
        lambda: Wav2Vec1Config(
            **_renamed(c, V1_NAMES, Wav2Vec1Config()),
            conv_layers=conv_layers,
            agg_layers=agg_layers,
            agg_bias=not c.get("no_conv_bias", False),
            affine=not c.get("non_affine_group_norm", False),
        ),
        {**V1_NAMES, "conv_layers": "conv_feature_layers", "agg_layers": "conv_aggregator_layers"},
    )


def load_wav2vec1(path) -> Wav2Vec1:
    """Build wav2vec (v1) from a fairseq checkpoint (wav2vec_large.pt). Every parameter in the file
    is mapped or in V1_IGNORED; anything missing, unexpected or of the wrong shape is named in one
    CheckpointError. Returns the model in eval mode, float32, on CPU."""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a model checkpoint: found {_describe(ckpt)}")
    try:
        cfg = config_from_v1(v1_settings(ckpt))
    except (ValueError, TypeError, SyntaxError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    # an unknown parameter keeps its own name, so load_state reports it as unexpected with the rest
    state = {
        fairseq_key(k, V1_KEYS) or k: v
        for k, v in _tensors(path, ckpt["model"]).items()
        if not any(re.fullmatch(p, k) for p in V1_IGNORED)
    }
    model = Wav2Vec1(cfg)
    load_state(model, state, path)
    return model.eval()


# Hugging Face's wav2vec 2.0 (transformers' modeling_wav2vec2.py): a folder with config.json and
# model.safetensors or pytorch_model.bin (sharded: an .index.json), optionally
# preprocessor_config.json. Wav2Vec2Config field -> config.json's name (feature_grad_mult,
# latent_temp: not there, fairseq's defaults)
HF_NAMES = {
    "conv_bias": "conv_bias",
    "embed_dim": "hidden_size",
    "ffn_dim": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "layer_norm_first": "do_stable_layer_norm",
    "pos_conv_kernel": "num_conv_pos_embeddings",
    "pos_conv_groups": "num_conv_pos_embedding_groups",
    "dropout": "hidden_dropout",
    "attention_dropout": "attention_dropout",
    "activation_dropout": "activation_dropout",
    "dropout_input": "feat_proj_dropout",
    "dropout_features": "feat_quantizer_dropout",
    "layerdrop": "layerdrop",
    "latent_vars": "num_codevectors_per_group",
    "latent_groups": "num_codevector_groups",
    "latent_dim": "codevector_dim",
    "final_dim": "proj_codevector_dim",
    "logit_temp": "contrastive_logits_temperature",
    "num_negatives": "num_negatives",
}


# Hugging Face parameter name (the "wav2vec2." of its head models removed) -> this module's name
HF_KEYS = [
    (r"feature_extractor\.conv_layers\.(\d+)\.conv\.(weight|bias)", r"feature_encoder.convs.\1.\2"),
    (
        r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.(weight|bias)",
        r"feature_encoder.norms.\1.\2",
    ),  # GN or LNs
    (r"feature_projection\.layer_norm\.(weight|bias)", r"layer_norm.\1"),
    (r"feature_projection\.projection\.(weight|bias)", r"post_extract_proj.\1"),
    (r"masked_spec_embed", "mask_emb"),
    (r"encoder\.pos_conv_embed\.conv\.(bias|weight_g|weight_v)", r"encoder.pos_conv.\1"),
    (
        r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original0",
        "encoder.pos_conv.weight_g",
    ),
    (
        r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original1",
        "encoder.pos_conv.weight_v",
    ),
    (
        r"encoder\.layers\.(\d+)\.attention\.([qkv]_proj|out_proj)\.(weight|bias)",
        r"encoder.layers.\1.self_attn.\2.\3",
    ),
    (
        r"encoder\.layers\.(\d+)\.layer_norm\.(weight|bias)",
        r"encoder.layers.\1.self_attn_layer_norm.\2",
    ),
    (
        r"encoder\.layers\.(\d+)\.feed_forward\.intermediate_dense\.(weight|bias)",
        r"encoder.layers.\1.fc1.\2",
    ),
    (
        r"encoder\.layers\.(\d+)\.feed_forward\.output_dense\.(weight|bias)",
        r"encoder.layers.\1.fc2.\2",
    ),
    (
        r"(encoder\.(layers\.\d+\.final_)?layer_norm|quantizer\.weight_proj|project_q)"
        r"\.(weight|bias)",
        r"\1.\3",
    ),
    (r"quantizer\.codevectors", "quantizer.vars"),
    (r"project_hid\.(weight|bias)", r"final_proj.\1"),
]


# the heads of Wav2Vec2ForCTC and Wav2Vec2ForSequenceClassification: reported and dropped
HF_IGNORED = r"(lm_head|projector|classifier)\.(weight|bias)|layer_weights"


# what this module computes; a config.json asking for something else is refused rather than run
# differently
HF_SUPPORTED = {
    "hidden_act": ("gelu",),
    "feat_extract_activation": ("gelu",),
    "layer_norm_eps": (1e-5,),
    "feat_extract_norm": ("group", "layer"),
    "add_adapter": (False, None),
    "adapter_attn_dim": (None,),
}


HF_WEIGHTS = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _header_entry(name, h):
    """(begin, end, name, dtype, shape) of one tensor of a safetensors header, which describes it as
    {"dtype": "F32", "shape": [ints], "data_offsets": [begin, end]}; a ValueError saying so if
    not."""
    if not (
        isinstance(h, dict)
        and isinstance(h.get("dtype"), str)
        and isinstance(h.get("shape"), list)
        and isinstance(h.get("data_offsets"), list)
        and len(h["data_offsets"]) == 2
        and all(_is_int(v) for v in h["shape"] + h["data_offsets"])
    ):
        raise ValueError(
            f"the header's entry for {name!r} is {json.dumps(h)[:80]}, expected "
            '{"dtype": ..., "shape": [integers], "data_offsets": [begin, end]}'
        )
    if h["dtype"] not in SAFETENSORS_DTYPES:
        raise ValueError(
            f"{name!r} has dtype {h['dtype']!r}, expected one of {', '.join(SAFETENSORS_DTYPES)}"
        )
    return (*h["data_offsets"], name, SAFETENSORS_DTYPES[h["dtype"]], h["shape"])


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
    if not 0 < n <= len(data) - 8:
        raise CheckpointError(
            f"{path}: not a safetensors file (header of {n} bytes in a file of {len(data)}; "
            "truncated?)"
        )
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError:  # not JSON, or not UTF-8
        raise CheckpointError(
            f"{path}: not a safetensors file (its {n}-byte header is not JSON)"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: not a safetensors file (its header is {_describe(header)}, "
            "expected a JSON object of tensors)"
        )
    header.pop("__metadata__", None)
    try:
        entries = sorted(_header_entry(name, h) for name, h in header.items())
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    described = entries[-1][1] if entries else 0
    if described != len(data) - 8 - n:
        raise CheckpointError(
            f"{path}: the header describes {described} bytes of tensors, the file holds "
            f"{len(data) - 8 - n} (truncated?)"
        )
    tensors, expected = {}, 0
    for begin, end, name, dtype, shape in entries:
        if (
            begin != expected
            or min(shape, default=0) < 0
            or end - begin != math.prod(shape) * dtype.itemsize
        ):
            raise CheckpointError(
                f"{path}: the header's offsets for {name!r} ({begin}..{end}, {dtype}, {shape}) do "
                "not "
                f"fit its shape or the tensor before it (ends at {expected})"
            )
        expected = end
        tensors[name] = (
            torch.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=8 + n + begin)
            .clone()
            .reshape(shape)
            if end > begin
            else torch.zeros(shape, dtype=dtype)
        )
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
        raise CheckpointError(
            f"{path}: the {what} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from None
    except ValueError:  # UnicodeDecodeError
        raise CheckpointError(f"{path}: the {what} is not a UTF-8 JSON file") from None
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: the {what} should be a JSON object ({{...}}); found {_describe(obj)}"
        )
    return obj


def hf_weights(path):
    """The weights of a Hugging Face model when path is its folder (model.safetensors first), a
    .safetensors file, a shard index (.index.json) or a .bin file beside a config.json; None for any
    other path. The model's config.json is the one in that file's folder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = [
            os.path.join(path, name)
            for name in HF_WEIGHTS
            if os.path.isfile(os.path.join(path, name))
        ]
        if not found:
            raise CheckpointError(
                f"{path}: a folder without {' or '.join(HF_WEIGHTS[:2])} (not a Hugging Face model)"
            )
        return found[0]
    if not (
        path.endswith((".safetensors", ".index.json"))
        or path.endswith(".bin")
        and os.path.isfile(os.path.join(os.path.dirname(path), "config.json"))
    ):
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
        found = (
            "none"
            if weight_map is None
            else "an empty one"
            if weight_map == {}
            else _describe(weight_map)
        )
        raise CheckpointError(
            f"{index_path}: expected a 'weight_map' of tensor names to shard files; found {found}"
        )
    names = []
    for name in weight_map.values():
        if not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name:
            raise CheckpointError(
                f"{index_path}: the weight_map lists {name!r}, expected the name of a file in "
                f"{folder} (a model's weights come from its own folder)"
            )
        if name not in names:
            names.append(name)
    for name in names:
        if not os.path.isfile(os.path.join(folder, name)):
            raise CheckpointError(
                f"{folder}: {name}, listed in {os.path.basename(index_path)}, is missing"
            )
    return [os.path.join(folder, name) for name in sorted(names)]


def config_from_hf(c: dict, preprocessor: dict) -> Wav2Vec2Config:
    """Map Hugging Face's config.json (and preprocessor_config.json) onto Wav2Vec2Config; a setting
    the file does not have keeps this module's default. The quantizer's settings are checked whether
    or not the weights hold one (they are read after the config)."""
    kind = c.get("model_type") if isinstance(c, dict) else f"none ({type(c).__name__})"
    if kind != "wav2vec2":
        raise ValueError(f"model_type {kind!r}, not wav2vec 2.0 ('wav2vec2')")
    for key, supported in HF_SUPPORTED.items():
        if key in c and c[key] not in supported:
            raise ValueError(
                f"{key}={c[key]!r}: only {' or '.join(map(repr, supported))} is supported"
            )
    if preprocessor.get("sampling_rate", SAMPLE_RATE) != SAMPLE_RATE:
        raise ValueError(
            f"preprocessor sampling_rate {preprocessor['sampling_rate']}: wav2vec 2.0 here takes "
            f"{SAMPLE_RATE} Hz"
        )
    dims, kernels, strides = (
        list(v) if c.get(k) is None else c[k]
        for k, v in zip(("conv_dim", "conv_kernel", "conv_stride"), zip(*BASE_CONV_LAYERS))
    )
    if not (
        all(isinstance(x, list) for x in (dims, kernels, strides))
        and len(dims) == len(kernels) == len(strides)
    ):
        raise ValueError(
            f"conv_dim, conv_kernel, conv_stride: expected three lists of one length, found "
            f"{dims}, {kernels}, {strides}"
        )
    return _checked(
        lambda: Wav2Vec2Config(
            **_renamed(c, HF_NAMES, Wav2Vec2Config()),
            conv_layers=list(zip(dims, kernels, strides)),
            extractor_mode="layer_norm" if c.get("feat_extract_norm") == "layer" else "default",
            normalize=bool(preprocessor.get("do_normalize", False)),
        ),
        {**HF_NAMES, "conv_layers": "(conv_dim, conv_kernel, conv_stride)"},
    )


def load_hf_wav2vec2(weights) -> Wav2Vec2:
    """wav2vec 2.0 from a Hugging Face model's weights (hf_weights: one file, or an index of shards)
    and the config.json of that folder, built and checked before any weight is read: Wav2Vec2Model,
    Wav2Vec2ForPreTraining (with the quantizer and its projections), and Wav2Vec2ForCTC /
    ForSequenceClassification, whose heads are reported and dropped. Every tensor must be mapped or
    in HF_IGNORED; .bin files go through the safe unpickler."""
    folder = os.path.dirname(weights) or "."
    config_path, prep_path = (
        os.path.join(folder, "config.json"),
        os.path.join(folder, "preprocessor_config.json"),
    )
    if not os.path.isfile(config_path):
        raise CheckpointError(
            f"{weights}: no config.json beside it (a Hugging Face model folder has one)"
        )
    hf_cfg = _read_json(config_path, "model configuration")
    try:
        cfg = config_from_hf(
            hf_cfg,
            _read_json(prep_path, "preprocessor configuration")
            if os.path.isfile(prep_path)
            else {},
        )
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    state = {}
    for path in hf_shards(weights) if weights.endswith(".index.json") else [weights]:
        shard = read_safetensors(path) if path.endswith(".safetensors") else read_checkpoint(path)
        state.update(_tensors(path, shard, "the file"))
    mapped = _map_keys(
        weights, state, HF_KEYS, HF_IGNORED, prefix=r"(?:wav2vec2\.)?"
    )  # the head models' prefix
    cfg = replace(cfg, has_quantizer=any(k.startswith("quantizer.") for k in mapped))
    model = Wav2Vec2(cfg)
    if "mask_emb" not in mapped and not (
        hf_cfg.get("mask_time_prob", 0.05) or hf_cfg.get("mask_feature_prob", 0)
    ):
        mapped["mask_emb"] = (
            model.mask_emb.detach()
        )  # HF leaves it out of a model that never masks: a fresh one
        print(
            f"{weights}: no masked_spec_embed (the model was configured without masks): a fresh "
            "mask embedding",
            file=sys.stderr,
        )
    load_state(model, mapped, weights)
    return model.eval()


def load_state(model, state, path="state dict"):
    """load_state_dict with errors that name the keys and shapes."""
    own = model.state_dict()
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs config {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
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
    """A config with lists for its tuples, as JSON has them (the project's checkpoints,
    bench.json)."""
    return json.loads(json.dumps(asdict(cfg)))


def save_own(kind, cfg, module, path, meta=None, **extra):
    """The project's own format, one writer for its three kinds (wav2vec2, classifier,
    wav2vec1-teacher): plain dicts and tensors, loadable with weights_only=True."""
    content = {"format": f"w2v2-ser/{kind}", "version": 1, "config": config_dict(cfg), **extra}
    save_atomic({**content, "model": module.state_dict(), "meta": meta or {}}, path)


def save_wav2vec2(model: Wav2Vec2, path, meta=None):
    save_own("wav2vec2", model.cfg, model, path, meta)


def save_classifier(clf: EmotionClassifier, path, meta=None):
    extra = {"classes": list(clf.classes), "skip_last_frame": clf.skip_last_frame}
    save_own("classifier", clf.backbone.cfg, clf, path, meta, **extra)


def load_classifier(path) -> EmotionClassifier:
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "w2v2-ser/classifier":
        raise CheckpointError(
            f"{path}: not a fine-tuned emotion classifier written by finetune.py "
            f"(found {_describe(ckpt)})"
        )
    clf = EmotionClassifier(load_wav2vec2(path), ckpt["classes"], bool(ckpt.get("skip_last_frame")))
    clf.head.load_state_dict(
        {"weight": ckpt["model"]["head.weight"], "bias": ckpt["model"]["head.bias"]}
    )
    return clf.eval()


def save_wav2vec1_teacher(teacher: Wav2Vec1Teacher, path, meta=None):
    """The release recipe's trained P-TAPT teacher (v1 and its stride-2 conv)."""
    save_own("wav2vec1-teacher", teacher.v1.cfg, teacher, path, meta)


def load_wav2vec1_teacher(path) -> Wav2Vec1Teacher:
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "w2v2-ser/wav2vec1-teacher":
        raise CheckpointError(
            f"{path}: not a wav2vec (v1) P-TAPT teacher written by pretrain.py (found "
            f"{_describe(ckpt)})"
        )
    teacher = Wav2Vec1Teacher(Wav2Vec1(_own_config(path, ckpt, Wav2Vec1Config)))
    load_state(teacher, _tensors(path, ckpt.get("model")), path)
    return teacher.eval()
