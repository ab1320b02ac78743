"""The project's tests: `pytest test_all.py`. Independent references where they exist
(torchaudio's wav2vec 2.0 and fairseq key converter, scikit-learn's k-means, hand-computed
metrics, loss references written from the formulas)."""

import argparse
import csv
import dataclasses
import glob
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.torch as safetensors_torch  # test requirements: writers and references only
import soundfile as sf
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import transformers

import checkpoints as C
import data
import evaluate as E
import model as M
import pretrain as P
import synth as S
import train as T
from bench import (
    fairseq_args,
    hf_backbone,
    pretrain_parity,
    random_model,
    to_fairseq_state,
    torchaudio_layers,
    torchaudio_model,  # fairseq-format files and torchaudio's twin, shared with the benchmarks
    write_fairseq,
)
from data import labels_for, load_labels, save_labels
from kmeans import assign, fit_kmeans

HERE = os.path.dirname(os.path.abspath(__file__))

# =============================================================================
# model: wav2vec 2.0 against torchaudio, checkpoints (fairseq-format files written by the tests)


def tiny_config(**kw):
    base = dict(
        conv_layers=[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2,
        embed_dim=64,
        ffn_dim=128,
        num_layers=3,
        num_heads=4,
        pos_conv_kernel=16,
        pos_conv_groups=4,
        final_dim=32,
        latent_vars=20,
    )
    base.update(kw)
    return M.Wav2Vec2Config(**base)


TINY_GN = dict()  # group norm, post-LN
TINY_LN = dict(extractor_mode="layer_norm", conv_bias=True, layer_norm_first=True, normalize=True)
BASE = dict(
    conv_layers=list(M.BASE_CONV_LAYERS),
    embed_dim=768,
    ffn_dim=3072,
    num_layers=12,
    num_heads=12,
    pos_conv_kernel=128,
    pos_conv_groups=16,
    final_dim=256,
    latent_vars=320,
)


@pytest.mark.parametrize(
    "variant,style",
    [
        ("gn", "args"),
        ("gn", "omegaconf"),
        ("gn", "legacy"),
        ("ln", "cfg"),
        ("ln", "asr"),
        ("base", "args"),
    ],
)
def test_matches_torchaudio(tmp_path, variant, style):
    cfg = (
        tiny_config(**{"gn": TINY_GN, "ln": TINY_LN}[variant])
        if variant != "base"
        else M.Wav2Vec2Config(**BASE)
    )
    net = random_model(cfg)
    path = tmp_path / "ckpt.pt"
    fs_state = write_fairseq(path, net, style)
    ours = C.load_wav2vec2(path)
    assert not ours.training and ours.cfg.normalize == cfg.normalize
    assert ours.cfg.has_quantizer == (style != "asr")
    ta = torchaudio_model(cfg, fs_state)
    g = torch.Generator().manual_seed(1)
    lengths = [16000, 11000, 6400] if variant != "base" else [8000, 4800]
    wav = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        wav[i, :n] = torch.randn(n, generator=g) * 0.1
    lens = torch.tensor(lengths)
    refs = [torchaudio_layers(ta, cfg, wav[i : i + 1, :n]) for i, n in enumerate(lengths)]
    with torch.no_grad():
        for k in list(range(1, cfg.num_layers + 1)) + [None]:
            hidden, frames = ours(wav, lens, layer=k)
            for i, n in enumerate(lengths):
                ta_layers, ta_final = refs[i]
                ref = ta_final[0] if k is None else ta_layers[k - 1][0]
                assert frames[i] == ref.shape[0]
                # batched (padded) and single unpadded utterances both match the reference
                torch.testing.assert_close(hidden[i, : frames[i]], ref, atol=1e-4, rtol=1e-4)
                single, _ = ours(wav[i : i + 1, :n], layer=k)
                torch.testing.assert_close(single[0], ref, atol=1e-4, rtol=1e-4)
            assert hidden[2:, frames[-1] :].abs().sum() == 0 if len(lengths) > 2 else True


def test_layer_norm_extractor_batch_matches_torchaudio_batch(tmp_path):
    # with per-frame layer norms, padding cannot leak, so torchaudio's own padded batch is a reference too
    cfg = tiny_config(extractor_mode="layer_norm", conv_bias=True, layer_norm_first=True)
    net = random_model(cfg, seed=3)
    ta = torchaudio_model(cfg, to_fairseq_state(net))
    wav, lens = torch.randn(3, 12000), torch.tensor([12000, 7000, 3000])
    with torch.no_grad():
        ours, frames = net(wav, lens)
        ref, ref_frames = ta(wav, lens)
    assert torch.equal(frames, ref_frames)
    for i in range(3):
        torch.testing.assert_close(ours[i, : frames[i]], ref[i, : frames[i]], atol=1e-4, rtol=1e-4)


def test_batch_invariance_group_norm():
    """An utterance's features do not depend on its batch-mates (group norm over valid frames)."""
    net = random_model(tiny_config())
    wav, lens = torch.randn(2, 20000), torch.tensor([20000, 5000])
    with torch.no_grad():
        batched, frames = net(wav, lens)
        alone, _ = net(wav[1:, :5000])
    torch.testing.assert_close(batched[1, : frames[1]], alone[0], atol=1e-5, rtol=1e-5)


def test_frame_lengths_conv_arithmetic():
    net = M.Wav2Vec2(M.Wav2Vec2Config(**BASE))
    # fairseq base: 400-sample receptive field, 320-sample hop: 1 s -> 49 frames
    assert net.frame_lengths(torch.tensor([400, 719, 720, 16000, 160000])).tolist() == [
        1,
        1,
        2,
        49,
        499,
    ]


def test_project_checkpoint_roundtrip_weights_only(tmp_path):
    net = random_model(tiny_config(**TINY_LN))
    path = tmp_path / "ours.pt"
    C.save_wav2vec2(net, path, meta={"note": "x"})
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "w2v2-ser/wav2vec2" and raw["meta"] == {"note": "x"}
    back = C.load_wav2vec2(path)
    wav = torch.randn(1, 8000)
    with torch.no_grad():
        torch.testing.assert_close(back(wav)[0], net(wav)[0])
    assert not any(p.name.startswith("ours.pt.tmp") for p in tmp_path.iterdir())


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/w2v2_ser_pwned",))


def test_loading_never_executes_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "args": Exploit()}, path)
    with pytest.raises(C.CheckpointError, match="refusing to load"):
        C.load_wav2vec2(path)
    assert not os.path.exists("/tmp/w2v2_ser_pwned")


def test_bad_checkpoints_get_clear_errors(tmp_path):
    net = random_model(tiny_config())
    good = tmp_path / "good.pt"
    write_fairseq(good, net, "args")
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    damaged = ": not a complete PyTorch checkpoint (truncated or not a .pt file)"
    with pytest.raises(C.CheckpointError) as e:
        C.load_wav2vec2(tmp_path / "trunc.pt")
    assert str(e.value) == f"{tmp_path / 'trunc.pt'}{damaged}"
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(C.CheckpointError) as e:
        C.load_wav2vec2(tmp_path / "text.pt")
    assert str(e.value) == f"{tmp_path / 'text.pt'}{damaged}"
    with pytest.raises(C.CheckpointError, match="no such checkpoint"):
        C.load_wav2vec2(tmp_path / "absent.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(C.CheckpointError, match="not a model checkpoint"):
        C.load_wav2vec2(tmp_path / "other.pt")
    # another model family, named as such
    state = to_fairseq_state(net)
    torch.save(
        {
            "cfg": {"model": {"_name": "hubert"}},
            "model": {**state, "label_embs_concat": torch.zeros(3)},
        },
        tmp_path / "hubert.pt",
    )
    with pytest.raises(C.CheckpointError, match="HuBERT"):
        C.load_wav2vec2(tmp_path / "hubert.pt")
    torch.save(
        {
            "args": argparse.Namespace(arch="wav2vec"),
            "model": {"feature_aggregator.0.weight": torch.zeros(1)},
        },
        tmp_path / "v1.pt",
    )
    with pytest.raises(C.CheckpointError, match=r"wav2vec \(v1\)"):
        C.load_wav2vec2(tmp_path / "v1.pt")
    # a missing key, an unexpected key, a shape that does not fit the configuration: all named
    for edit, pattern in [
        (lambda s: s.pop("encoder.layers.0.fc1.weight"), "missing.*encoder.layers.0.fc1.weight"),
        (
            lambda s: s.__setitem__("encoder.layers.0.extra.weight", torch.zeros(1)),
            "encoder.layers.0.extra",
        ),
        (
            lambda s: s.__setitem__("post_extract_proj.weight", torch.zeros(64, 31)),
            "post_extract_proj.weight: file \\(64, 31\\)",
        ),
    ]:
        s = to_fairseq_state(net)
        edit(s)
        torch.save(
            {"args": argparse.Namespace(**fairseq_args(net.cfg)), "model": s}, tmp_path / "bad.pt"
        )
        with pytest.raises(C.CheckpointError, match=pattern):
            C.load_wav2vec2(tmp_path / "bad.pt")


W2V2_BAD = [
    (
        dict(num_heads=5),
        "num_heads=5: expected a divisor of embed_dim=768 (each head takes embed_dim / num_heads channels)",
    ),
    (dict(embed_dim=0), "embed_dim=0: expected a positive integer"),
    (dict(ffn_dim=-1), "ffn_dim=-1: expected a positive integer"),
    (dict(num_layers=2.5), "num_layers=2.5: expected a positive integer"),
    (dict(pos_conv_kernel=True), "pos_conv_kernel=True: expected a positive integer"),
    (
        dict(conv_layers=[]),
        "conv_layers=[]: expected a non-empty list of (dim, kernel, stride) layers",
    ),
    (
        dict(conv_layers=[(512, 10, 5), (512, 3)]),
        "conv_layers[1]=(512, 3): expected (dim, kernel, stride), three positive integers",
    ),
    (
        dict(conv_layers=[(512, 10, 0)]),
        "conv_layers[0]=(512, 10, 0): expected (dim, kernel, stride), three positive integers",
    ),
    (
        dict(conv_layers=[512, 10, 5]),
        "conv_layers[0]=512: expected (dim, kernel, stride), three positive integers",
    ),
    (
        dict(pos_conv_groups=5),
        "pos_conv_groups=5: expected a divisor of embed_dim=768 (each conv group takes embed_dim / pos_conv_groups channels)",
    ),
    (
        dict(latent_groups=3),
        "latent_groups=3: expected a divisor of final_dim=256 (the latent dim where latent_dim is 0)",
    ),
    (
        dict(latent_dim=100, latent_groups=3),
        "latent_groups=3: expected a divisor of latent_dim=100",
    ),
    (dict(latent_vars=0), "latent_vars=0: expected a positive integer"),
    (
        dict(latent_temp=(2.0, 0.5)),
        "latent_temp=(2.0, 0.5): expected (start, end, decay per update): positive numbers, decay at most 1",
    ),
    (dict(dropout=1.0), "dropout=1.0: expected a probability in [0, 1)"),
    (dict(layerdrop=-0.1), "layerdrop=-0.1: expected a probability in [0, 1)"),
    (
        dict(extractor_mode="group_norm"),
        "extractor_mode='group_norm': expected 'default' or 'layer_norm'",
    ),
    (dict(conv_bias="false"), "conv_bias='false': expected True or False"),
]
V1_BAD = [
    (
        dict(agg_layers=[]),
        "agg_layers=[]: expected a non-empty list of (dim, kernel, stride) layers",
    ),
    (
        dict(conv_layers=[(512, 10, 5), (512, -8, 4)]),
        "conv_layers[1]=(512, -8, 4): expected (dim, kernel, stride), three positive integers",
    ),
    (dict(residual_scale=0), "residual_scale=0: expected a positive number"),
    (dict(activation="tanh"), "activation='tanh': expected 'relu' or 'gelu'"),
    (dict(dropout=2.0), "dropout=2.0: expected a probability in [0, 1)"),
]


def load_error(path, load=C.load_wav2vec2):
    """The CheckpointError loading path gives: one line, returned whole to compare."""
    with pytest.raises(C.CheckpointError) as e:
        load(path)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize(
    "cls,edit,message",
    [(M.Wav2Vec2Config, *case) for case in W2V2_BAD]
    + [(M.Wav2Vec1Config, *case) for case in V1_BAD],
)
def test_configs_are_checked_when_built(cls, edit, message):
    """A config that cannot build its model is a ValueError naming the field, the value and what is
    expected, whoever builds it; dataclasses.replace checks again."""
    with pytest.raises(ValueError) as e:
        cls(**edit)
    assert str(e.value) == message
    with pytest.raises(ValueError) as e:
        dataclasses.replace(cls(), **edit)
    assert str(e.value) == message


def test_config_checks_take_json_and_skip_an_absent_quantizer():
    cfg = M.Wav2Vec2Config(conv_layers=[[512, 10, 5], [512, 3, 2]], latent_temp=[2, 0.5, 0.9])
    assert cfg.conv_layers == [(512, 10, 5), (512, 3, 2)] and cfg.latent_temp == (2, 0.5, 0.9)
    v1 = M.Wav2Vec1Config(conv_layers=[[8, 10, 5]], agg_layers=[[8, 2, 1]])
    assert (v1.conv_layers, v1.agg_layers) == ([(8, 10, 5)], [(8, 2, 1)])
    # an ASR model has no quantizer: its latent settings are never used, so never refused
    asr = tiny_config(has_quantizer=False, latent_groups=3)
    assert not hasattr(M.Wav2Vec2(asr), "quantizer")
    with pytest.raises(ValueError, match=r"^latent_groups=3: expected a divisor of final_dim=32"):
        dataclasses.replace(asr, has_quantizer=True)


def test_bad_model_settings_refused_at_load_in_the_files_own_names(tmp_path):
    """Every source's config is checked when it is built, before any weight is read: none of these
    files holds a usable weight (an empty 'model' entry, a safetensors file of garbage), yet each is
    refused for its settings, named as the file spells them. Heads that do not divide embed_dim used
    to load, then crash at the first training update."""
    net = random_model(tiny_config())
    args = fairseq_args(net.cfg)
    fs_heads = (
        "encoder_attention_heads=5: expected a divisor of encoder_embed_dim=64 "
        "(each head takes encoder_embed_dim / encoder_attention_heads channels)"
    )
    cases = {
        "args.pt": (
            {"args": argparse.Namespace(**{**args, "encoder_attention_heads": 5}), "model": {}},
            fs_heads,
        ),
        "cfg.pt": (
            {
                "cfg": {
                    "model": {**args, "_name": "wav2vec2", "conv_feature_layers": "[(64, 10)]"},
                    "task": {},
                },
                "model": {},
            },
            "conv_feature_layers[0]=(64, 10): expected (dim, kernel, stride), three positive "
            "integers",
        ),
        "asr.pt": (
            {
                "cfg": {
                    "model": {
                        "_name": "wav2vec_ctc",
                        "w2v_args": {"model": {**args, "encoder_layers": 0}, "task": {}},
                    },
                    "task": {},
                },
                "model": {},
            },
            "encoder_layers=0: expected a positive integer",
        ),
        "latent.pt": (
            {
                "args": argparse.Namespace(**{**args, "latent_groups": 3}),
                "model": {"quantizer.vars": torch.zeros(1)},
            },
            "latent_groups=3: expected a divisor of final_dim=32 (the latent dim where latent_dim "
            "is 0)",
        ),
        "temp.pt": (
            {
                "args": argparse.Namespace(**{**args, "latent_temp": "(2, 0.5"}),
                "model": {"quantizer.vars": torch.zeros(1)},
            },
            "latent_temp='(2, 0.5': expected (start, end, decay per update): positive numbers, "
            "decay at most 1",
        ),
    }
    for name, (obj, message) in cases.items():
        torch.save(obj, tmp_path / name)
        assert load_error(tmp_path / name) == f"{tmp_path / name}: {message}"
    # this project's files: a model and a classifier, in the dataclass's own names
    C.save_wav2vec2(net, tmp_path / "ours.pt")
    C.save_classifier(M.EmotionClassifier(net, ["a", "b"]), tmp_path / "clf.pt")
    for name in ("ours.pt", "clf.pt"):
        raw = torch.load(tmp_path / name, weights_only=True)
        raw["config"]["num_heads"], raw["model"] = 5, {}
        torch.save(raw, tmp_path / name)
        assert load_error(tmp_path / name) == (
            f"{tmp_path / name}: num_heads=5: expected a divisor of embed_dim=64 (each head takes "
            "embed_dim / num_heads channels)"
        )
    raw["config"] = [raw["config"]]
    torch.save(raw, tmp_path / "list.pt")
    assert load_error(tmp_path / "list.pt") == (
        f"{tmp_path / 'list.pt'}: the 'config' entry should be a dict of Wav2Vec2Config settings; "
        "found a list"
    )
    # a Hugging Face folder: config.json in its own names, the weights never read
    hf = hf_backbone(net, "eager")
    write_hf(tmp_path / "hf", hf, "safetensors", "parametrizations", False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"not weights" * 10)
    for edit, message in [
        (
            {"num_attention_heads": 5},
            "num_attention_heads=5: expected a divisor of hidden_size=64 (each head takes "
            "hidden_size / num_attention_heads channels)",
        ),
        (
            {"conv_stride": [5, 2, 2, 2, 2, 2, 0]},
            "(conv_dim, conv_kernel, conv_stride)[6]=(32, 2, 0): expected (dim, kernel, stride), "
            "three positive integers",
        ),
        (
            {"num_codevector_groups": 3, "codevector_dim": 32},
            "num_codevector_groups=3: expected a divisor of codevector_dim=32",
        ),
        ({"hidden_dropout": 1.5}, "hidden_dropout=1.5: expected a probability in [0, 1)"),
    ]:
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **edit}))
        assert load_error(tmp_path / "hf") == f"{tmp_path / 'hf' / 'config.json'}: {message}"


def test_model_entry_of_tensors_or_one_line_error(tmp_path):
    """fairseq's and this project's 'model' entry maps names to tensors: a list, a tensor, or a string
    where a tensor belongs is one CheckpointError naming the file and what was expected (these were
    AttributeErrors from deep in the loader)."""
    net = random_model(tiny_config())
    args = argparse.Namespace(**fairseq_args(net.cfg))
    state = to_fairseq_state(net)
    expected = "the 'model' entry should map parameter names to tensors"
    for entry, found in [
        ([state], "found a list"),
        (torch.zeros(3), "found a Tensor"),
        ({**state, "mask_emb": "0.5"}, "'mask_emb' holds a str"),
        ({**state, 7: torch.zeros(1)}, "found a key that is not a name: 7"),
    ]:
        torch.save({"args": args, "model": entry}, tmp_path / "fs.pt")
        assert load_error(tmp_path / "fs.pt") == f"{tmp_path / 'fs.pt'}: {expected}; {found}"
    C.save_wav2vec2(net, tmp_path / "ours.pt")
    raw = torch.load(tmp_path / "ours.pt", weights_only=True)
    raw["model"]["mask_emb"] = [0.5] * 64
    torch.save(raw, tmp_path / "ours.pt")
    assert load_error(tmp_path / "ours.pt") == (
        f"{tmp_path / 'ours.pt'}: {expected}; 'mask_emb' holds a list"
    )


def test_classifier_file_round_trip_and_damaged_entries(tmp_path):
    """load_classifier gives back the saved classifier's exact logits, its classes and head option
    (read in one pass of the file); a classifier file without its classes or its head's weights is
    one CheckpointError naming the file (they were a KeyError's traceback)."""
    torch.manual_seed(0)
    clf = M.EmotionClassifier(random_model(tiny_config()), ["ang", "neu"], skip_last_frame=True)
    torch.nn.init.normal_(clf.head.weight)
    C.save_classifier(clf, tmp_path / "clf.pt")
    loaded = C.load_classifier(tmp_path / "clf.pt")
    wav, lengths = torch.randn(2, 4000), torch.tensor([4000, 3000])
    with torch.no_grad():
        assert torch.equal(loaded(wav, lengths), clf.eval()(wav, lengths))
    assert loaded.classes == ["ang", "neu"] and loaded.skip_last_frame and not loaded.training
    raw = torch.load(tmp_path / "clf.pt", weights_only=True)
    del raw["model"]["head.weight"]
    torch.save(raw, tmp_path / "headless.pt")
    message = load_error(tmp_path / "headless.pt", C.load_classifier)
    assert message == f"{tmp_path / 'headless.pt'}: missing ['head.weight']"
    raw = torch.load(tmp_path / "clf.pt", weights_only=True)
    del raw["classes"]
    torch.save(raw, tmp_path / "nameless.pt")
    assert load_error(tmp_path / "nameless.pt", C.load_classifier) == (
        f"{tmp_path / 'nameless.pt'}: its 'classes' should be a list of names; found None"
    )


def test_bad_waveforms():
    net = random_model(tiny_config())
    with pytest.raises(ValueError, match="at least 400 samples"):
        net(torch.randn(1, 399))
    with pytest.raises(ValueError, match="average the channels"):
        net(torch.randn(1, 2, 8000))
    with pytest.raises(TypeError, match="floating point"):
        net(torch.zeros(1, 8000, dtype=torch.int16))
    with pytest.raises(ValueError, match="exceed"):
        net(torch.randn(2, 8000), torch.tensor([8000, 9000]))
    with pytest.raises(ValueError, match="layer must be"):
        net(torch.randn(1, 8000), layer=4)


def test_quantizer_eval_is_argmax_and_temperature_schedule():
    net = random_model(tiny_config())
    q = net.quantizer
    x = torch.randn(10, net.cfg.conv_dim)
    codes, ppl = q(x)
    logits = q.weight_proj(x).view(10, q.groups, q.num_vars)
    expect = torch.cat(
        [q.vars[0, g * q.num_vars + logits[:, g].argmax(-1)] for g in range(q.groups)], -1
    )
    torch.testing.assert_close(codes, expect)
    assert 1 <= ppl.item() <= q.groups * q.num_vars
    q.set_num_updates(0)
    assert q.temperature == 2.0
    q.set_num_updates(1000)
    assert q.temperature == pytest.approx(2.0 * 0.999995**1000)
    q.set_num_updates(10**7)
    assert q.temperature == 0.5


# ----------------------------------------------------------------------------- Hugging Face folders
# written by transformers (a test requirement only); model.py reads them without it or safetensors
transformers.logging.set_verbosity_error()
SHAPES = {
    "gn": dict(),  # group norm, post-LN
    "ln": dict(extractor_mode="layer_norm", conv_bias=True, layer_norm_first=True, normalize=True),
    "base": dict(
        conv_layers=list(M.BASE_CONV_LAYERS),
        embed_dim=768,
        ffn_dim=3072,
        num_layers=12,
        num_heads=12,
        pos_conv_kernel=128,
        pos_conv_groups=16,
        final_dim=256,
        latent_vars=320,
    ),
}
OLD_SPELLING = {
    "parametrizations.weight.original0": "weight_g",
    "parametrizations.weight.original1": "weight_v",
}


def write_hf(folder, hf, fmt, spelling, normalize):
    """hf's config.json and weights as save_pretrained writes them (transformers 5 writes safetensors
    only; pytorch_model.bin is what 4.x wrote: torch.save of the state dict), in either weight-norm spelling."""
    hf.config.save_pretrained(folder)
    transformers.Wav2Vec2FeatureExtractor(do_normalize=normalize).save_pretrained(folder)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if spelling == "weight_g":
        for new, old in OLD_SPELLING.items():
            state = {k.replace(new, old): v for k, v in state.items()}
    if fmt == "safetensors":
        safetensors_torch.save_file(
            state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"}
        )
    else:
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))


def reference_input(hf_folder, seconds, seed=1):
    """A waveform and what transformers' own feature extractor makes of it (do_normalize from the folder)."""
    wav = np.random.default_rng(seed).standard_normal(int(seconds * 16000)).astype(np.float32)
    fe = transformers.Wav2Vec2FeatureExtractor.from_pretrained(hf_folder)
    return torch.from_numpy(wav)[None], torch.from_numpy(
        fe(wav, sampling_rate=16000).input_values[0]
    )[None]


def same_config(a, b):  # fairseq leaves latent_dim 0 (= final_dim), Hugging Face names it
    def plain(c):
        return dataclasses.replace(c, latent_dim=c.latent_dim or c.final_dim, has_quantizer=True)

    return plain(a) == plain(b)


@pytest.mark.parametrize(
    "shape,fmt,spelling",
    [
        (s, f, w)
        for s in ("gn", "ln")
        for f in ("safetensors", "bin")
        for w in ("parametrizations", "weight_g")
    ]
    + [("base", "safetensors", "weight_g")],
)  # the Base shape as on the hub
def test_hf_folder_matches_transformers_and_fairseq(tmp_path, shape, fmt, spelling):
    cfg = tiny_config(**SHAPES[shape]) if shape != "base" else M.Wav2Vec2Config(**SHAPES["base"])
    net = random_model(cfg)
    pretraining = shape != "ln"  # Wav2Vec2ForPreTraining, or the bare Wav2Vec2Model
    hf = hf_backbone(net, "eager", pretraining).eval()
    write_hf(tmp_path, hf, fmt, spelling, cfg.normalize)
    weights = tmp_path / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    ours = C.load_wav2vec2(
        tmp_path if spelling == "parametrizations" else weights
    )  # the folder or its weights file
    if (
        shape == "base"
    ):  # the fairseq path is the tiny cases'; here the weights it would load (seconds saved)
        fs = net
    else:
        write_fairseq(tmp_path / "fairseq.pt", net, "args")
        fs = C.load_wav2vec2(tmp_path / "fairseq.pt")
    assert (
        not ours.training
        and ours.cfg.has_quantizer == pretraining
        and ours.cfg.normalize == cfg.normalize
    )
    assert same_config(ours.cfg, fs.cfg)
    own, fs_state = ours.state_dict(), fs.state_dict()
    assert own.keys() == fs_state.keys() if pretraining else set(own) < set(fs_state)
    assert all(torch.equal(own[k], fs_state[k]) for k in own)
    wav, hf_input = reference_input(tmp_path, 0.5 if shape == "base" else 1.0)
    backbone = hf.wav2vec2 if pretraining else hf
    with torch.no_grad():
        out = backbone(hf_input, output_hidden_states=True)
        layers = (
            range(1, cfg.num_layers + 1) if shape != "base" else [6]
        )  # Base: one layer and the output
        for k in layers:  # hidden_states[k]: layer k's output (pre-LN: before the final LN)
            torch.testing.assert_close(
                ours(wav, layer=k)[0], out.hidden_states[k], atol=1e-4, rtol=1e-4
            )
        final = ours(wav)[0]
        torch.testing.assert_close(final, out.last_hidden_state, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(final, fs(wav)[0], atol=0, rtol=0)
    if (
        pretraining
    ):  # the quantizer, project_q and project_hid (final_proj) too; unnormalised input here
        assert pretrain_parity(ours, hf, wav) < 1e-4


@pytest.mark.parametrize("head", ["Wav2Vec2ForCTC", "Wav2Vec2ForSequenceClassification"])
def test_hf_heads_are_reported_and_dropped(tmp_path, capfd, head):
    net = random_model(tiny_config())
    backbone = hf_backbone(net, "eager")
    config = dict(
        backbone.config.to_dict(), vocab_size=32, use_weighted_layer_sum=True, num_labels=4
    )
    hf = getattr(transformers, head)(type(backbone.config).from_dict(config)).eval()
    hf.wav2vec2.load_state_dict(backbone.state_dict())
    write_hf(tmp_path, hf, "safetensors", "parametrizations", False)
    ours = C.load_wav2vec2(tmp_path)
    err = capfd.readouterr().err
    assert "not used by wav2vec 2.0" in err and (
        "lm_head.weight" in err if "CTC" in head else "layer_weights" in err
    )
    assert not ours.cfg.has_quantizer
    wav = torch.randn(1, 12000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            ours(wav)[0], hf.wav2vec2(wav).last_hidden_state, atol=1e-4, rtol=1e-4
        )


def one_line_error(path, pattern):
    with pytest.raises(C.CheckpointError, match=pattern) as e:
        C.load_wav2vec2(path)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_hf_bad_folders_get_one_line_errors(tmp_path):
    hf = hf_backbone(random_model(tiny_config()), "eager")
    good = tmp_path / "good"
    write_hf(good, hf, "safetensors", "parametrizations", False)
    blob = (good / "model.safetensors").read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])

    def variant(name, weights, weights_name="model.safetensors"):
        folder = tmp_path / name
        folder.mkdir()
        for f in ("config.json", "preprocessor_config.json"):
            (folder / f).write_bytes((good / f).read_bytes())
        (folder / weights_name).write_bytes(weights)
        return folder

    # a pytorch_model.bin holding a pickle that runs code: refused, never run
    marker = tmp_path / "ran"
    torch.save(
        {"feature_projection.projection.weight": RunsCommand(f"touch {marker}")},
        tmp_path / "evil.bin",
    )
    evil = variant("evil", (tmp_path / "evil.bin").read_bytes(), "pytorch_model.bin")
    one_line_error(evil, "refusing to load posix.system|refusing to load os.system")
    assert not marker.exists()
    one_line_error(variant("trunc", blob[: len(blob) // 2]), "model.safetensors.*truncated")
    one_line_error(variant("tiny", blob[:5]), "not a safetensors file")
    # a header that lies: one tensor moved onto the next one's bytes (same header length)
    name = min(header, key=lambda k: header[k]["data_offsets"][0] if k != "__metadata__" else 1e18)
    begin, end = header[name]["data_offsets"]
    lie = dict(header, **{name: dict(header[name], data_offsets=[begin + 4, end + 4])})
    text = json.dumps(lie, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    one_line_error(variant("lie", blob[:8] + text + blob[8 + n :]), f"offsets for '{name}'")
    # another model type, named
    hubert = variant("hubert", blob)
    (hubert / "config.json").write_text(
        json.dumps({**json.loads((good / "config.json").read_text()), "model_type": "hubert"})
    )
    one_line_error(hubert, "config.json: model_type 'hubert', not wav2vec 2.0")
    relu = variant("relu", blob)
    (relu / "config.json").write_text(
        json.dumps({**json.loads((good / "config.json").read_text()), "hidden_act": "relu"})
    )
    one_line_error(relu, "hidden_act='relu'")
    # strict key accounting: an unknown tensor, a missing one, a wrong shape, all named
    state = safetensors_torch.load_file(good / "model.safetensors")
    for i, (edit, pattern) in enumerate(
        [
            (
                lambda s: s.__setitem__("encoder.layers.0.adapter.weight", torch.zeros(1)),
                "does not know.*adapter",
            ),
            (
                lambda s: s.pop("encoder.layers.1.feed_forward.output_dense.weight"),
                "missing.*encoder.layers.1.fc2.weight",
            ),
            (
                lambda s: s.__setitem__(
                    "feature_projection.projection.weight", torch.zeros(64, 31)
                ),
                r"post_extract_proj.weight: file \(64, 31\)",
            ),
        ]
    ):
        s = dict(state)
        edit(s)
        safetensors_torch.save_file(s, tmp_path / "edited.safetensors")
        one_line_error(variant(f"edit{i}", (tmp_path / "edited.safetensors").read_bytes()), pattern)
    one_line_error(tmp_path / "nothing", "no such checkpoint")  # absent path: as before
    (tmp_path / "empty").mkdir()
    one_line_error(tmp_path / "empty", "without model.safetensors")


def first_tapt_loss(checkpoint, corpus, out, name):
    r = script(
        "pretrain.py",
        "--mode",
        "tapt",
        "--fold",
        1,
        "--data",
        corpus,
        "--out",
        out,
        "--name",
        name,
        "--checkpoint",
        checkpoint,
        "--batch-size",
        4,
        "--updates",
        1,
        "--warmup",
        1,
        "--workers",
        0,
        "--no-progress",
        "--recipe",
        "clean",
        env=ONE_THREAD,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(open(os.path.join(out, name, "fold1", "tapt.log.jsonl")).readline())["loss"]


def test_tapt_from_hf_pretraining_folder_equals_fairseq(corpus, tmp_path):
    net = random_model(tiny_config())
    write_hf(
        tmp_path / "hf",
        hf_backbone(net, "eager", pretraining=True),
        "safetensors",
        "weight_g",
        False,
    )
    write_fairseq(tmp_path / "fairseq.pt", net, "args")
    from_hf = first_tapt_loss(tmp_path / "hf", corpus, tmp_path, "hf")
    from_fairseq = first_tapt_loss(tmp_path / "fairseq.pt", corpus, tmp_path, "fs")
    assert np.isfinite(from_hf) and from_hf == from_fairseq  # one thread: bit for bit


def test_hf_sharded_folder(tmp_path):
    """A model saved in shards (model.safetensors.index.json), as save_pretrained writes a large one."""
    net = random_model(tiny_config())
    hf = hf_backbone(net, "eager", pretraining=True).eval()
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and len(
        list(tmp_path.glob("*.safetensors"))
    ) > 1
    ours = C.load_wav2vec2(tmp_path)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in ours.state_dict().items())


def test_hf_shard_index_lists_files_of_its_own_folder_only(tmp_path):
    """An index's weight_map names files of the model's own folder: one reaching out ('../', an
    absolute path) is refused, so the weights and config.json are the folder's own, never a parent's
    (a folder whose index pointed at ../model.safetensors loaded the parent's model and config). An
    empty or absent weight_map, an index that is not a JSON object, a listed shard that is missing:
    one line each, naming the file and what was expected."""
    hf = hf_backbone(random_model(tiny_config()), "eager", pretraining=True).eval()
    write_hf(tmp_path, hf, "safetensors", "parametrizations", False)  # the parent: a whole model
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2

    def folder(name, index_json, files=("config.json", *shards)):
        path = tmp_path / name
        path.mkdir()
        for f in files:
            shutil.copy(tmp_path / "sharded" / f, path / f)
        (path / "model.safetensors.index.json").write_text(json.dumps(index_json))
        return path

    def pointing_at(target):
        return {**index, "weight_map": {k: target for k in index["weight_map"]}}

    own_folder = "(a model's weights come from its own folder)"
    for name, index_json, listed in [
        ("up", pointing_at("../model.safetensors"), "'../model.safetensors'"),
        ("absolute", pointing_at(str(tmp_path / "model.safetensors")), None),
        ("subfolder", pointing_at(f"sharded/{shards[0]}"), f"'sharded/{shards[0]}'"),
    ]:
        path = folder(name, index_json)
        listed = listed or repr(str(tmp_path / "model.safetensors"))
        for given in (path, path / "model.safetensors.index.json"):  # the folder or its index
            assert load_error(given) == (
                f"{path / 'model.safetensors.index.json'}: the weight_map lists {listed}, expected "
                f"the name of a file in {path} {own_folder}"
            )
    # no config.json of its own: never the parent's, whatever the index points at
    path = folder("no_config", pointing_at("../model.safetensors"), files=shards)
    assert load_error(path) == (
        f"{path / 'model.safetensors.index.json'}: no config.json beside it (a Hugging Face model "
        "folder has one)"
    )
    expected_map = "expected a 'weight_map' of tensor names to shard files; found"
    for name, index_json, found in [
        ("empty", {**index, "weight_map": {}}, f"{expected_map} an empty one"),
        ("absent", {"metadata": index["metadata"]}, f"{expected_map} none"),
        ("listed", {**index, "weight_map": shards}, f"{expected_map} a list"),
        ("array", [index], "the shard index should be a JSON object ({...}); found a list"),
    ]:
        path = folder(name, index_json)
        assert load_error(path) == f"{path / 'model.safetensors.index.json'}: {found}"
    path = folder("missing", index, files=("config.json", shards[0], *shards[2:]))
    assert load_error(path) == (
        f"{path}: {shards[1]}, listed in model.safetensors.index.json, is missing"
    )
    assert C.load_wav2vec2(folder("whole", index)).cfg.has_quantizer  # every shard present: loads


def safetensors_bytes(header, data=b""):
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def test_safetensors_header_errors_say_what_was_expected(tmp_path):
    path = tmp_path / "w.safetensors"
    for header, payload, message in [
        (
            {"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}},
            b"ab",
            "'w' has dtype 'F8_E4M3', expected one of F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL",
        ),
        (
            {"w": {"dtype": "F32", "shape": [2]}},
            b"",
            'the header\'s entry for \'w\' is {"dtype": "F32", "shape": [2]}, expected '
            '{"dtype": ..., "shape": [integers], "data_offsets": [begin, end]}',
        ),
        (
            [{"w": 1}],
            b"",
            "not a safetensors file (its header is a list, expected a JSON object of tensors)",
        ),
        (b"\xff\xfe{}", b"", "not a safetensors file (its 4-byte header is not JSON)"),
    ]:
        path.write_bytes(safetensors_bytes(header, payload))
        assert load_error(path, C.read_safetensors) == f"{path}: {message}"
    path.write_bytes(
        safetensors_bytes({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8))
    )
    assert torch.equal(C.read_safetensors(path)["w"], torch.zeros(2))


# ----------------------------------------------------------------------------- wav2vec (v1), the release's P-TAPT teacher
# fairseq-format v1 files written here (args, cfg and pickled-omegaconf styles); a float64 reference from fairseq's
# wav2vec.py formulas on the file's own tensors; frame counts against wav2vec 2.0's; refusals

LARGE = dict(
    conv_feature_layers="[(512, 10, 5), (512, 8, 4), (512, 4, 2), (512, 4, 2), (512, 4, 2), (512, 1, 1), (512, 1, 1)]",
    conv_aggregator_layers="[(512, 2, 1), (512, 3, 1), (512, 4, 1), (512, 5, 1), (512, 6, 1), (512, 7, 1), "
    "(512, 8, 1), (512, 9, 1), (512, 10, 1), (512, 11, 1), (512, 12, 1), (512, 13, 1)]",
    skip_connections_feat=False,
    skip_connections_agg=True,
    residual_scale=0.5,
    log_compression=True,
    agg_zero_pad=False,
    no_conv_bias=False,
    non_affine_group_norm=False,
    dropout=0.0,
    aggregator="cnn",
)
# the Large geometry and settings at a width the CPU runs in no time
NARROW = {
    **LARGE,
    "conv_feature_layers": LARGE["conv_feature_layers"].replace("512", "8"),
    "conv_aggregator_layers": LARGE["conv_aggregator_layers"].replace("512", "8"),
}
# every other option: skips in the extractor, zero padding, width changes (residual_proj), no biases,
# no affine norms, gelu, no log compression
OPTIONS = dict(
    conv_feature_layers="[(12, 10, 5), (12, 8, 4), (12, 4, 2), (12, 1, 1)]",
    conv_aggregator_layers="[(12, 2, 1), (20, 3, 1), (20, 5, 1), (16, 4, 1)]",
    skip_connections_feat=True,
    skip_connections_agg=True,
    residual_scale=0.3,
    log_compression=False,
    agg_zero_pad=True,
    no_conv_bias=True,
    non_affine_group_norm=True,
    dropout=0.1,
    aggregator="cnn",
    activation="gelu",
)
PREDICTION_STEPS = 12


def v1_layers(text):
    return C._conv_layers_from_string(text)


def v1_fairseq_state(s, seed=0, dtype=torch.float32):
    """Random parameters under fairseq's names and shapes (wav2vec.py's Wav2VecModel with these settings)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    state, affine = {}, not s.get("non_affine_group_norm", False)
    d_in = 1
    for i, (d, k, _) in enumerate(v1_layers(s["conv_feature_layers"])):
        state[f"feature_extractor.conv_layers.{i}.0.weight"] = rand(
            d, d_in, k, scale=(d_in * k) ** -0.5
        )
        if affine:
            state[f"feature_extractor.conv_layers.{i}.2.weight"] = 1 + rand(d, scale=0.1)
            state[f"feature_extractor.conv_layers.{i}.2.bias"] = rand(d, scale=0.1)
        d_in = d
    embed = d_in
    for i, (d, k, _) in enumerate(v1_layers(s["conv_aggregator_layers"])):
        if s["skip_connections_agg"] and d != d_in:
            state[f"feature_aggregator.residual_proj.{i}.weight"] = rand(
                d, d_in, 1, scale=d_in**-0.5
            )
        state[f"feature_aggregator.conv_layers.{i}.1.weight"] = rand(
            d, d_in, k, scale=(d_in * k) ** -0.5
        )
        if not s.get("no_conv_bias", False):
            state[f"feature_aggregator.conv_layers.{i}.1.bias"] = rand(d, scale=0.1)
        if affine:
            state[f"feature_aggregator.conv_layers.{i}.3.weight"] = 1 + rand(d, scale=0.1)
            state[f"feature_aggregator.conv_layers.{i}.3.bias"] = rand(d, scale=0.1)
        d_in = d
    state["wav2vec_predictions.project_to_steps.weight"] = rand(
        d_in, embed, 1, PREDICTION_STEPS, scale=0.01
    )
    state["wav2vec_predictions.project_to_steps.bias"] = rand(embed, scale=0.01)
    return state


def v1_model_args(s):
    """Model settings as a 2019 fairseq run stored them: base_wav2vec_architecture fills every one it knows."""
    return dict(
        prediction_steps=PREDICTION_STEPS,
        num_negatives=10,
        sample_distance=None,
        cross_sample_negatives=False,
        dropout_features=0.0,
        dropout_agg=0.0,
        encoder="cnn",
        gru_dim=512,
        balanced_classes=False,
        project_features="none",
        offset="auto",
        **s,
    )


def write_v1(path, s, style, state):
    """A v1 file as fairseq writes one. args: fairseq <= 0.10 (wav2vec_large.pt, 2019): a flat argparse
    Namespace, the legacy (pre-zip) torch format, fp16 training's half-precision weights and the optimizer state.
    cfg: fairseq's trainer today (cfg converted to plain containers, args None). omegaconf: fairseq of late 2020
    (the release's pin b8ea8a9b) pickles the DictConfig itself."""
    history = [
        {
            "criterion_name": "BinaryCrossEntropyCriterion",
            "optimizer_name": "FairseqAdam",
            "lr_scheduler_state": {"best": 2.1},
            "num_updates": 400000,
        }
    ]
    first = next(iter(state.values()))
    optimizer = {
        "state": {
            0: {
                "step": 400000,
                "exp_avg": torch.zeros_like(first),
                "exp_avg_sq": torch.zeros_like(first),
            }
        },
        "param_groups": [
            {"lr": 1e-6, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0, "params": [0]}
        ],
    }
    if style == "args":
        args = argparse.Namespace(
            arch="wav2vec",
            task="speech_pretraining",
            criterion="binary_cross_entropy",
            optimizer="adam",
            lr=[0.005],
            lr_scheduler="cosine",
            max_update=400000,
            fp16=True,
            data="/manifest/path",
            sample_rate=16000,
            max_sample_size=150000,
            seed=1,
            **v1_model_args(s),
        )
        obj = {
            "args": args,
            "model": state,
            "optimizer_history": history,
            "last_optimizer_state": optimizer,
            "extra_state": {
                "train_iterator": {"epoch": 112, "iterations_in_epoch": 0},
                "val_loss": 2.1,
            },
        }
        torch.save(obj, path, _use_new_zipfile_serialization=False)
        return
    fields = {
        "_name": "wav2vec",
        "vq_type": "none",
        "vq_vars": 320,
        "vq_groups": 2,
        "vq_dim": 0,
        "vq_depth": 1,
        "combine_groups": False,
        "vq_temp": [2.0, 0.5, 0.999995],
        "vq_gamma": 0.25,
        "infonce": False,
        "activation": "relu",
        **v1_model_args(s),
        "cross_sample_negatives": 0,
    }  # Wav2VecConfig's every field
    cfg = {
        "common": {"fp16": True, "seed": 1},
        "model": fields,
        "criterion": {"_name": "wav2vec", "infonce": False},
        "task": {
            "_name": "audio_pretraining",
            "data": "/manifest/path",
            "sample_rate": 16000,
            "normalize": False,
        },
        "optimization": {"max_update": 400000, "lr": [0.005]},
    }
    if style == "omegaconf_no_lists":  # a cfg without lists (no protocol-2 int in the pickle)
        cfg["model"].pop("vq_temp"), cfg["optimization"].pop("lr")
    if style.startswith("omegaconf"):
        from omegaconf import (
            OmegaConf,  # only the tests write omegaconf objects; the loader never imports it
        )

        cfg = OmegaConf.create(cfg)
    obj = {
        "args": None,
        "cfg": cfg,
        "model": state,
        "criterion": None,
        "optimizer_history": history,
        "task_state": {},
        "extra_state": {"metrics": {}, "previous_training_time": 1.0},
        "last_optimizer_state": optimizer,
    }
    torch.save(obj, path)


# ---- the reference: fairseq's wav2vec.py formulas, functional, float64, on the file's own tensors


def v1_reference(state, s, wav):
    """Wav2VecModel.feature_extractor then .feature_aggregator (ConvFeatureExtractionModel, ConvAggegator)."""
    p = {k: v.double() for k, v in state.items()}
    act = F.gelu if s.get("activation", "relu") == "gelu" else F.relu
    scale = math.sqrt(s["residual_scale"])
    x = wav.double()[:, None]
    for i, (_, _, stride) in enumerate(v1_layers(s["conv_feature_layers"])):
        residual = x
        x = F.conv1d(x, p[f"feature_extractor.conv_layers.{i}.0.weight"], stride=stride)
        x = act(
            F.group_norm(
                x,
                1,
                p.get(f"feature_extractor.conv_layers.{i}.2.weight"),
                p.get(f"feature_extractor.conv_layers.{i}.2.bias"),
                1e-5,
            )
        )
        if s["skip_connections_feat"] and x.size(1) == residual.size(1):
            residual = residual[..., :: residual.size(2) // x.size(2)][..., : x.size(2)]
            x = (x + residual) * scale
    if s["log_compression"]:
        x = (x.abs() + 1).log()
    for i, (_, k, stride) in enumerate(v1_layers(s["conv_aggregator_layers"])):
        residual = x
        ka = k // 2
        kb = ka - 1 if k % 2 == 0 else ka
        x = F.pad(x, (ka + kb, 0), mode="constant" if s["agg_zero_pad"] else "replicate")
        x = F.conv1d(
            x,
            p[f"feature_aggregator.conv_layers.{i}.1.weight"],
            p.get(f"feature_aggregator.conv_layers.{i}.1.bias"),
            stride=stride,
        )
        x = act(
            F.group_norm(
                x,
                1,
                p.get(f"feature_aggregator.conv_layers.{i}.3.weight"),
                p.get(f"feature_aggregator.conv_layers.{i}.3.bias"),
                1e-5,
            )
        )
        if s["skip_connections_agg"]:
            proj = p.get(f"feature_aggregator.residual_proj.{i}.weight")
            x = (x + (residual if proj is None else F.conv1d(residual, proj))) * scale
    return x


def v1_max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


# ---- loading


@pytest.mark.parametrize("settings", ["narrow", "options"])
@pytest.mark.parametrize("style", ["args", "cfg", "omegaconf", "omegaconf_no_lists"])
def test_v1_every_key_accounted_for(tmp_path, style, settings):
    s = {"narrow": NARROW, "options": OPTIONS}[settings]
    state = v1_fairseq_state(s, dtype=torch.float16 if style == "args" else torch.float32)
    write_v1(tmp_path / "v1.pt", s, style, state)
    net = C.load_wav2vec1(tmp_path / "v1.pt")
    assert not net.training and all(p.dtype == torch.float32 for p in net.parameters())
    cfg = net.cfg
    assert cfg.conv_layers == v1_layers(s["conv_feature_layers"]) and cfg.agg_layers == v1_layers(
        s["conv_aggregator_layers"]
    )
    assert (
        cfg.skip_feat,
        cfg.skip_agg,
        cfg.residual_scale,
        cfg.log_compression,
        cfg.agg_zero_pad,
    ) == (
        s["skip_connections_feat"],
        s["skip_connections_agg"],
        s["residual_scale"],
        s["log_compression"],
        s["agg_zero_pad"],
    )
    assert (cfg.agg_bias, cfg.affine, cfg.dropout) == (
        not s["no_conv_bias"],
        not s["non_affine_group_norm"],
        s["dropout"],
    )
    assert cfg.activation == s.get("activation", "relu")
    # every file key: mapped onto exactly one parameter with its values, or in the ignore list
    ours = net.state_dict()
    mapped = {k: C.fairseq_key(k, C.V1_KEYS) for k in state}
    ignored = {k for k in state if any(re.fullmatch(p, k) for p in C.V1_IGNORED)}
    assert ignored == {
        "wav2vec_predictions.project_to_steps.weight",
        "wav2vec_predictions.project_to_steps.bias",
    }
    assert all((mapped[k] is None) == (k in ignored) for k in state)
    assert sorted(v for v in mapped.values() if v) == sorted(ours)
    for k, name in mapped.items():
        if name:
            assert torch.equal(ours[name], state[k].float())


def test_v1_real_large_shapes(tmp_path):
    """wav2vec_large.pt's exact shapes (args style, as released), two short utterances against the reference."""
    state = v1_fairseq_state(LARGE, seed=1)
    write_v1(tmp_path / "wav2vec_large.pt", LARGE, "args", state)
    net = C.load_wav2vec1(tmp_path / "wav2vec_large.pt")
    assert net.cfg == M.Wav2Vec1Config()  # the config's defaults are Large's
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == sum(
        v.numel() for k, v in state.items() if not k.startswith("wav2vec_predictions")
    )
    assert n_params == 29_390_848
    g = torch.Generator().manual_seed(2)
    lengths = [2400, 1500]
    wav = torch.zeros(2, 2400)
    for i, n in enumerate(lengths):
        wav[i, :n] = torch.randn(n, generator=g) * 0.1
    with torch.no_grad():
        batched = net(wav, torch.tensor(lengths))
        for i, n in enumerate(lengths):
            ref = v1_reference(state, LARGE, wav[i : i + 1, :n])[0]
            assert (
                ref.shape
                == (512, (n - 465) // 160 + 1)
                == (512, net.frame_lengths(torch.tensor(n)))
            )
            assert v1_max_diff(net(wav[i : i + 1, :n])[0], ref) < 1e-4
            assert v1_max_diff(batched[i, :, : ref.shape[1]], ref) < 1e-4


@pytest.mark.parametrize("settings", ["narrow", "options"])
def test_v1_matches_reference(tmp_path, settings):
    s = {"narrow": NARROW, "options": OPTIONS}[settings]
    state = v1_fairseq_state(s, seed=3)
    write_v1(tmp_path / "v1.pt", s, "cfg", state)
    net = C.load_wav2vec1(tmp_path / "v1.pt")
    g = torch.Generator().manual_seed(4)
    # 130 samples (options model): 25 -> 5 -> 1 frames, so fairseq's skip step (the width ratio) is 5, not the stride
    lengths = [4000, 2900, 1000 if settings == "narrow" else 130]
    wav = torch.zeros(3, 4000)
    for i, n in enumerate(lengths):
        wav[i, :n] = torch.randn(n, generator=g) * 0.1
    lens = torch.tensor(lengths)
    frames = net.frame_lengths(lens)
    with torch.no_grad():
        # fairseq's own semantics: the padded batch as one tensor, no lengths
        assert v1_max_diff(net(wav), v1_reference(state, s, wav)) < 1e-4
        # unpadded utterances, and each utterance's valid frames in the padded batch given lengths
        batched = net(wav, lens)
        for i, n in enumerate(lengths):
            ref = v1_reference(state, s, wav[i : i + 1, :n])[0]
            assert ref.shape[1] == frames[i]
            assert v1_max_diff(net(wav[i : i + 1, :n])[0], ref) < 1e-4
            assert v1_max_diff(batched[i, :, : frames[i]], ref) < 1e-4
            assert batched[i, :, frames[i] :].abs().sum() == 0
        # without lengths the padding reaches every frame of a padded utterance: the group norms' statistics
        # run over the padded width (and in the options model the extractor's skips subsample by its ratio)
        unaware = net(wav)
        for i in (1, 2):
            ref = v1_reference(state, s, wav[i : i + 1, : lengths[i]])[0]
            per_frame = (unaware[i, :, : frames[i]].double() - ref).abs().amax(0)
            assert (per_frame > 1e-3).all(), per_frame


def test_v1_padding_and_grad_through_aggregator_only():
    """The release's teacher: frozen extractor (no grad), trained aggregator; padding changes no valid frame's grad."""
    net = M.Wav2Vec1(
        M.Wav2Vec1Config(
            conv_layers=v1_layers(NARROW["conv_feature_layers"]),
            agg_layers=v1_layers(NARROW["conv_aggregator_layers"]),
        )
    )
    params = net.freeze_feature_extractor()
    assert {id(p) for p in params} == {id(p) for p in net.aggregator.parameters()}
    wav = torch.randn(2, 3000, generator=torch.Generator().manual_seed(0))
    out = net(wav, torch.tensor([3000, 2000]))
    out[1, :, : net.frame_lengths(torch.tensor(2000))].sum().backward()
    assert all(p.grad is None for p in net.feature_extractor.parameters())
    alone = M.Wav2Vec1(net.cfg)
    alone.load_state_dict(net.state_dict())
    alone.freeze_feature_extractor()
    alone(wav[1:, :2000]).sum().backward()
    for a, b in zip(
        net.aggregator.parameters(), alone.aggregator.parameters()
    ):  # float32 sums in another order
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)


# ---- frame counts: the release's teacher (v1 at 100 Hz, then Conv1d(k=4, s=2), no padding) against wav2vec 2.0


def test_frame_counts_teacher_vs_wav2vec2():
    lengths = torch.arange(400, 20 * 16000 + 1)  # every length from 400 samples to 20 s
    v1 = M.Wav2Vec1(
        M.Wav2Vec1Config(
            conv_layers=v1_layers(NARROW["conv_feature_layers"]),
            agg_layers=v1_layers(NARROW["conv_aggregator_layers"]),
        )
    )
    n100 = v1.frame_lengths(lengths)
    teacher = torch.where(
        n100 >= 4, torch.div(n100 - 4, 2, rounding_mode="floor") + 1, torch.zeros_like(n100)
    )
    w2v2 = M.FeatureEncoder(M.Wav2Vec2Config()).output_lengths(
        lengths
    )  # what model.Wav2Vec2.frame_lengths returns
    assert torch.equal(
        n100, ((lengths - 465) // 160 + 1).clamp(min=0)
    )  # receptive field 465, hop 160
    assert torch.equal(w2v2, (lengths - 400) // 320 + 1)  # receptive field 400, hop 320
    diff = w2v2 - teacher
    # 400..464: no v1 frame (fairseq's conv raises); 465..944: 1-3 frames at 100 Hz, too few for the teacher's
    # kernel of 4 (its Conv1d raises); from 945 (teacher receptive field 465 + 3 * 160) on, teacher = (L - 945) // 320 + 1
    assert (n100[lengths < 465] == 0).all() and (
        n100[(lengths >= 465) & (lengths < 945)] <= 3
    ).all()
    long = lengths >= 945
    assert torch.equal(teacher[long], (lengths[long] - 945) // 320 + 1)
    # wav2vec 2.0 has 2 more frames when (L - 400) mod 320 <= 224, 1 more when it is 225..319; never equal
    expect = torch.where((lengths[long] - 400) % 320 <= 224, 2, 1)
    assert torch.equal(diff[long], expect)
    assert int((diff[long] == 2).sum()) == 224_325 and int((diff[long] == 1).sum()) == 94_731
    for n, w, t in [
        (16000, 49, 48),
        (160000, 499, 498),
        (945, 2, 1),
        (1264, 3, 1),
        (1265, 3, 2),
        (1520, 4, 2),
    ]:
        assert (int(w2v2[n - 400]), int(teacher[n - 400])) == (w, t), n


def test_v1_frame_lengths_match_the_convs():
    """frame_lengths against real forward passes at every boundary, the teacher's Conv1d included."""
    net = M.Wav2Vec1(
        M.Wav2Vec1Config(
            conv_layers=v1_layers(NARROW["conv_feature_layers"]),
            agg_layers=v1_layers(NARROW["conv_aggregator_layers"]),
        )
    ).eval()
    conv = torch.nn.Conv1d(8, 8, 4, stride=2)
    with torch.no_grad():
        for n in [465, 466, 624, 625, 944, 945, 1104, 1105, 1264, 1265, 4000]:
            out = net(torch.randn(1, n))
            assert out.shape[2] == net.frame_lengths(torch.tensor(n)) == (n - 465) // 160 + 1
            if n >= 945:
                assert conv(out).shape[2] == (n - 945) // 320 + 1
    with pytest.raises(ValueError, match="at least 465 samples"):
        net(torch.randn(1, 464))
    with pytest.raises(ValueError, match="floating-point"):
        net(torch.zeros(1, 1000, dtype=torch.int16))


# ---- refusals


def test_v1_refuses_code_in_pickle(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"args": RunsCommand(f"touch {marker}"), "model": {}}, tmp_path / "evil.pt")
    with pytest.raises(
        C.CheckpointError, match="refusing to load posix.system|refusing to load os.system"
    ):
        C.load_wav2vec1(tmp_path / "evil.pt")
    assert not marker.exists()


def v1_one_line_error(load, path, pattern):
    with pytest.raises(C.CheckpointError) as e:
        load(path)
    message = str(e.value)
    assert "\n" not in message and re.search(pattern, message), message
    return message


def test_v1_other_families_and_bad_files_one_line(tmp_path):
    # a wav2vec 2.0 file (cfg and args styles) to the v1 loader
    w2v2 = {
        "feature_extractor.conv_layers.0.0.weight": torch.zeros(512, 1, 10),
        "mask_emb": torch.zeros(768),
    }
    torch.save(
        {"cfg": {"model": {"_name": "wav2vec2"}, "task": {}}, "model": w2v2}, tmp_path / "w2v2.pt"
    )
    v1_one_line_error(
        C.load_wav2vec1, tmp_path / "w2v2.pt", r"wav2vec 2\.0 .*\('wav2vec2'\), not wav2vec \(v1\)"
    )
    torch.save({"args": argparse.Namespace(arch="hubert"), "model": w2v2}, tmp_path / "hubert.pt")
    v1_one_line_error(C.load_wav2vec1, tmp_path / "hubert.pt", r"HuBERT.*not wav2vec \(v1\)")
    # a v1 file to the wav2vec 2.0 loader: refused by name
    state = v1_fairseq_state(NARROW)
    for style in ("args", "cfg"):
        write_v1(tmp_path / f"v1_{style}.pt", NARROW, style, state)
        v1_one_line_error(
            C.load_wav2vec2,
            tmp_path / f"v1_{style}.pt",
            r"holds a wav2vec \(v1\) model \('wav2vec'\)",
        )
    # vq-wav2vec, the GRU aggregator, a file that leaves a version-dependent setting unstated
    for edit, pattern in [
        ({"vq_type": "gumbel"}, "vq-wav2vec"),
        ({"aggregator": "gru"}, "aggregator='gru'"),
        ({"log_compression": None}, r"\['log_compression'\] are not in the file"),
    ]:
        write_v1(tmp_path / "odd.pt", {**NARROW, **edit}, "cfg", state)
        v1_one_line_error(C.load_wav2vec1, tmp_path / "odd.pt", pattern)
    # missing, unexpected and wrong-shape parameters: all named in one line
    bad = dict(state)
    bad.pop("feature_aggregator.conv_layers.3.1.bias")
    bad["feature_aggregator.extra.weight"] = torch.zeros(1)
    bad["feature_extractor.conv_layers.1.0.weight"] = torch.zeros(8, 8, 3)
    write_v1(tmp_path / "bad.pt", NARROW, "args", bad)
    v1_one_line_error(
        C.load_wav2vec1,
        tmp_path / "bad.pt",
        r"missing \['aggregator\.blocks\.3\.conv\.bias'\]; unexpected \['feature_aggregator\.extra\.weight'\]; "
        r"shapes .*feature_extractor\.blocks\.1\.conv\.weight: file \(8, 8, 3\) vs config \(8, 8, 8\)",
    )
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    v1_one_line_error(C.load_wav2vec1, tmp_path / "other.pt", "not a model checkpoint")


def test_v1_bad_settings_and_non_tensor_parameters_one_line(tmp_path):
    """A v1 file's settings are checked when its config is built, before its weights (none here fit),
    and named as fairseq spells them; the release teacher's own file in the config's names. A
    parameter that is not a tensor is named (it was an AttributeError from load_state)."""
    path = tmp_path / "v1.pt"
    for edit, message in [
        (
            {"conv_aggregator_layers": "[]"},
            "conv_aggregator_layers=[]: expected a non-empty list of (dim, kernel, stride) layers",
        ),
        (
            {"conv_feature_layers": "[(8, 10, 5), (8, 8)]"},
            "conv_feature_layers[1]=(8, 8): expected (dim, kernel, stride), three positive integers",
        ),
        (
            {"conv_feature_layers": "[(8, 10, 5)] * [2]"},
            "conv_feature_layers='[(8, 10, 5)] * [2]': expected a list of (dim, kernel, stride) "
            "layers, such as [(512, 10, 5)] + [(512, 3, 2)] * 4",
        ),
        ({"residual_scale": -0.5}, "residual_scale=-0.5: expected a positive number"),
        ({"skip_connections_agg": "yes"}, "skip_connections_agg='yes': expected True or False"),
    ]:
        write_v1(path, {**NARROW, **edit}, "cfg", {"unused": torch.zeros(1)})
        assert load_error(path, C.load_wav2vec1) == f"{path}: {message}"
    expected = "the 'model' entry should map parameter names to tensors"
    state = v1_fairseq_state(NARROW)
    write_v1(path, NARROW, "args", {**state, "feature_aggregator.conv_layers.0.1.weight": "fc"})
    assert load_error(path, C.load_wav2vec1) == (
        f"{path}: {expected}; 'feature_aggregator.conv_layers.0.1.weight' holds a str"
    )
    torch.save({"args": argparse.Namespace(arch="wav2vec", **NARROW), "model": [state]}, path)
    assert load_error(path, C.load_wav2vec1) == f"{path}: {expected}; found a list"
    # the release teacher as pretrain.py writes it
    teacher = M.Wav2Vec1Teacher(M.Wav2Vec1(C.config_from_v1(NARROW)))
    C.save_wav2vec1_teacher(teacher, tmp_path / "teacher.pt")
    raw = torch.load(tmp_path / "teacher.pt", weights_only=True)
    torch.save({**raw, "config": {**raw["config"], "activation": "tanh"}, "model": {}}, path)
    assert load_error(path, C.load_wav2vec1_teacher) == (
        f"{path}: activation='tanh': expected 'relu' or 'gelu'"
    )
    torch.save({**raw, "model": torch.zeros(1)}, path)
    assert load_error(path, C.load_wav2vec1_teacher) == f"{path}: {expected}; found a Tensor"


def test_checkpoint_errors_through_the_cli_are_one_line(corpus, tmp_path):
    """What a user sees: finetune.py --checkpoint and pretrain.py --teacher given a bad file end on one
    `error:` line naming the file and what was expected, with exit status 2 and no traceback."""
    net = random_model(tiny_config())
    args, state = fairseq_args(net.cfg), to_fairseq_state(net)
    heads = {**args, "encoder_attention_heads": 5}
    torch.save({"args": argparse.Namespace(**heads), "model": state}, tmp_path / "heads.pt")
    torch.save(
        {"args": argparse.Namespace(**args), "model": {**state, "mask_emb": "zeros"}},
        tmp_path / "str.pt",
    )
    write_fairseq(tmp_path / "whole.pt", net, "args")
    blob = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(blob[: len(blob) // 2])
    hf_backbone(net, "eager", pretraining=True).save_pretrained(
        tmp_path / "sharded", max_shard_size="100KB"
    )
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "sharded" / shard).unlink()
    for name, message in [
        (
            "heads.pt",
            "encoder_attention_heads=5: expected a divisor of encoder_embed_dim=64 (each head "
            "takes encoder_embed_dim / encoder_attention_heads channels)",
        ),
        (
            "str.pt",
            "the 'model' entry should map parameter names to tensors; 'mask_emb' holds a str",
        ),
        ("trunc.pt", "not a complete PyTorch checkpoint (truncated or not a .pt file)"),
        ("sharded", f"{shard}, listed in model.safetensors.index.json, is missing"),
    ]:
        r = script(
            "finetune.py",
            "--fold",
            1,
            "--data",
            corpus,
            "--checkpoint",
            tmp_path / name,
            "--out",
            tmp_path / "runs",
            "--workers",
            0,
            "--no-progress",
        )
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert last.startswith(f"error: {tmp_path / name}: {message}"), last
    v1 = v1_fairseq_state(NARROW)
    write_v1(
        tmp_path / "v1.pt", NARROW, "args", {**v1, "feature_aggregator.conv_layers.0.1.bias": 0}
    )
    r = script(
        "pretrain.py", *v1_teacher_args(corpus, tmp_path / "v1.pt"), "--out", tmp_path / "runs"
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: --teacher: {tmp_path / 'v1.pt'}: the 'model' entry should map parameter names to "
        "tensors; 'feature_aggregator.conv_layers.0.1.bias' holds an int"
    )


# =============================================================================
# data: data.py


def write_wav(path, num_samples, samplerate=16000, channels=1, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    x = 0.1 * np.random.default_rng(seed).standard_normal((num_samples, channels)).astype(
        np.float32
    )
    sf.write(path, x, samplerate, subtype="PCM_16")
    return path


def write_release(root, utterances, extra_lines=()):
    """A minimal IEMOCAP tree. utterances: (session, uid, label, audio) with audio = number of
    samples, bytes (written as-is) or None (no file). extra_lines go into Session1's first label file."""
    for s in data.SESSIONS:
        os.makedirs(os.path.join(root, f"Session{s}", "dialog", "EmoEvaluation"), exist_ok=True)
    files = {}
    for j, (s, uid, label, audio) in enumerate(utterances):
        dialog = uid.rsplit("_", 1)[0]
        files.setdefault((s, dialog), []).append(
            f"[{j}.0000 - {j + 1}.0000]\t{uid}\t{label}\t[2.5000, 2.5000, 2.5000]"
        )
        wav = os.path.join(root, f"Session{s}", "sentences", "wav", dialog, uid + ".wav")
        if isinstance(audio, int):
            write_wav(wav, audio, seed=j)
        elif isinstance(audio, bytes):
            os.makedirs(os.path.dirname(wav), exist_ok=True)
            with open(wav, "wb") as f:
                f.write(audio)
    for n, ((s, dialog), lines) in enumerate(sorted(files.items())):
        if s == 1 and n == 0:
            lines = lines + list(extra_lines)
        path = os.path.join(root, f"Session{s}", "dialog", "EmoEvaluation", dialog + ".txt")
        with open(path, "w") as f:
            f.write(
                "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"
                + "\n".join(lines)
                + "\n"
            )
    return root


def one_per_session(label="neu", audio=8000):
    return [(s, f"Ses0{s}F_impro01_F000", label, audio) for s in data.SESSIONS]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synth") / "IEMOCAP_full_release")
    S.synthesize_iemocap(root, utterances_per_session=8, seed=3, min_seconds=0.5, max_seconds=1.5)
    return root


def simple_parse(root):
    """Independent reading of the top-level label files: uid -> (session, label)."""
    labels = {}
    for s in data.SESSIONS:
        for path in glob.glob(
            os.path.join(root, f"Session{s}", "dialog", "EmoEvaluation", "Ses*.txt")
        ):
            for line in open(path):
                fields = line.rstrip("\n").split("\t")
                if line.startswith("[") and len(fields) == 4:
                    labels[fields[1]] = (s, fields[2])
    return labels


def expected_counts(labels):
    mapping = {"neu": "neu", "ang": "ang", "sad": "sad", "hap": "hap", "exc": "hap"}
    table = {str(s): dict.fromkeys(data.CLASSES, 0) for s in data.SESSIONS}
    for s, label in labels.values():
        if label in mapping:
            table[str(s)][mapping[label]] += 1
    return table


# ----------------------------------------------------------------------------- IEMOCAP reading


def test_synthetic_round_trip(synth):
    utterances = data.load_iemocap(synth)
    labels = simple_parse(synth)
    table = data.count_table(utterances)
    assert table["sessions"] == expected_counts(labels)
    assert table["total"] == 5 * 8 and all(sum(r.values()) == 8 for r in table["sessions"].values())
    assert (
        len(labels) > table["total"]
    )  # the dropped labels (fru, sur, ...) are there, and not counted
    assert {lab for _, lab in labels.values()} - set(data.IEMOCAP_LABELS)
    assert [u.uid for u in utterances] == sorted(u.uid for u in utterances)
    for u in utterances[:10]:
        assert labels[u.uid][0] == u.session
        assert u.label == data.IEMOCAP_LABELS[labels[u.uid][1]]
        assert os.path.basename(u.path) == u.uid + ".wav" and not u.uid.startswith(".")
        assert u.num_samples == len(data.read_audio(u.path))
    assert {u.uid[-4] for u in utterances} == {"F", "M"}
    text = data.format_count_table(table)
    assert "total" in text and str(table["total"]) in text and len(text.splitlines()) == 2 + 5 + 1


def test_synthetic_decoys_and_junk_are_not_counted(synth):
    emo = os.path.join(synth, "Session1", "dialog", "EmoEvaluation")
    decoys = glob.glob(os.path.join(emo, "*", "*.txt"))
    assert {os.path.basename(os.path.dirname(p)) for p in decoys} == {
        "Categorical",
        "Attribute",
        "Self-evaluation",
    }
    # The decoys do parse as label lines with other labels: a reader walking subfolders would miscount.
    decoy_labels = {}
    for path in decoys:
        pairs, bad = data.parse_label_file(path)
        assert pairs and not bad
        decoy_labels.update(pairs)
    real = {uid: lab for uid, (s, lab) in simple_parse(synth).items() if s == 1}
    assert any(decoy_labels[uid] != real[uid] for uid in real)
    assert glob.glob(os.path.join(emo, "._*.txt"))
    junk = glob.glob(os.path.join(synth, "Session1", "sentences", "wav", "*", "._*.wav"))
    assert junk and open(junk[0], "rb").read(4) == b"\x00\x05\x16\x07"
    # Each Session's label files mix both speakers in every dialog.
    for path in glob.glob(os.path.join(emo, "Ses*.txt")):
        speakers = {uid[-4] for uid, _ in data.parse_label_file(path)[0]}
        assert speakers == {"F", "M"}, path


def test_synthesis_is_deterministic_and_realistic(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for out in (a, b):
        S.synthesize_iemocap(
            out, utterances_per_session=2, seed=7, min_seconds=1.0, max_seconds=2.0
        )
    files = sorted(
        os.path.relpath(p, a) for p in glob.glob(os.path.join(a, "**", "*"), recursive=True)
    )
    assert files == sorted(
        os.path.relpath(p, b) for p in glob.glob(os.path.join(b, "**", "*"), recursive=True)
    )
    for rel in files:
        if os.path.isfile(os.path.join(a, rel)):
            assert (
                open(os.path.join(a, rel), "rb").read() == open(os.path.join(b, rel), "rb").read()
            ), rel
    utterances = data.load_iemocap(a)
    info = sf.info(utterances[0].path)
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    assert all(1.0 * 16000 <= u.num_samples <= 2.0 * 16000 + 1 for u in utterances)
    S.synthesize_iemocap(
        a, utterances_per_session=1, seed=7, min_seconds=1.0, max_seconds=2.0
    )  # rewrite: ok
    assert data.count_table(data.load_iemocap(a))["total"] == 5
    with pytest.raises(data.DataError, match="not empty"):
        S.synthesize_iemocap(str(tmp_path), utterances_per_session=1)  # a folder it did not write


def test_split_fold(synth):
    utterances = data.load_iemocap(synth)
    for fold in data.SESSIONS:
        train, test = data.split_fold(utterances, fold)
        assert {u.session for u in test} == {fold} and fold not in {u.session for u in train}
        assert len(train) + len(test) == len(utterances)
        assert not {u.path for u in train} & {u.path for u in test}
        assert {u.uid[-4] for u in test} == {"F", "M"}  # both speakers of the session
    for bad in (0, 6, None, "1"):
        with pytest.raises(data.DataError, match="fold"):
            data.split_fold(utterances, bad)


def test_load_corpus_iemocap(synth):
    splits, classes = data.load_corpus(synth, fold=2)
    assert classes == data.CLASSES and set(splits) == {"train", "test"}
    assert {u.session for u in splits["test"]} == {2}
    with pytest.raises(data.DataError, match="fold"):
        data.load_corpus(synth)


def test_unparsable_label_line_is_skipped_and_counted(tmp_path):
    root = write_release(
        str(tmp_path / "r"),
        one_per_session(),
        extra_lines=[
            "[6.2901 - 8.2357]\tSes01F_impro01_F001 neu",  # looks like a label, does not parse
            "[oops]",
            "C-E2:\tNeutral;\t()",
            "A-E1:\tval 3; act 2; dom  2;\t()",
            "% a comment",
            "",
        ],
    )
    with pytest.warns(
        data.DataWarning, match=r"skipped 2 label line.*Ses01F_impro01\.txt line \d+"
    ):
        utterances = data.load_iemocap(root)
    assert len(utterances) == 5


def test_missing_root_and_session(tmp_path):
    with pytest.raises(data.DataError, match="nowhere"):
        data.load_iemocap(str(tmp_path / "nowhere"))
    root = write_release(str(tmp_path / "r"), one_per_session())
    os.rename(os.path.join(root, "Session3"), os.path.join(root, "moved"))
    with pytest.raises(data.DataError, match=r"Session3.*Session1\.\.Session5"):
        data.load_iemocap(root)


def test_bad_wavs_are_skipped_with_one_warning(tmp_path):
    utterances = one_per_session() + [
        (1, "Ses01F_impro01_F001", "ang", 0),  # a valid header with no samples
        (1, "Ses01F_impro01_F002", "ang", 100),  # too short for one wav2vec frame
        (1, "Ses01F_impro01_F003", "sad", b"RIFF\x00\x00garbage" * 10),
        (2, "Ses02F_impro01_F001", "hap", None),  # missing
        (2, "Ses02F_impro01_F002", "fru", None),  # dropped label: never looked at
    ]
    root = write_release(str(tmp_path / "r"), utterances)
    with pytest.warns(data.DataWarning) as record:
        loaded = data.load_iemocap(root)
    messages = [str(w.message) for w in record]
    assert (
        len(messages) == 1
        and "skipped 4 labelled" in messages[0]
        and "Ses01F_impro01_F001.wav" in messages[0]
    )
    assert [u.uid for u in loaded] == sorted(f"Ses0{s}F_impro01_F000" for s in data.SESSIONS)


def test_label_file_not_utf8_is_an_error_and_a_session_without_labels_warns(tmp_path):
    """A label file re-saved as UTF-16 made its session vanish without a word: now one error line
    naming the file; a session whose label files hold no label line is one warning line naming it."""
    root = tmp_path / "IEMOCAP_full_release"
    S.synthesize_iemocap(str(root), utterances_per_session=2, seed=0, max_seconds=1.0)
    emo = {s: root / f"Session{s}" / "dialog" / "EmoEvaluation" for s in data.SESSIONS}
    label_file = sorted(emo[3].glob("Ses*.txt"))[0]
    original = label_file.read_bytes()
    label_file.write_text(original.decode("utf-8"), encoding="utf-16")
    done = run_cli("--data", str(root))
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1 and err[0].startswith("error: "), done.stderr
    assert str(label_file) in err[0] and "UTF-8" in err[0] and "NUL" in err[0]
    label_file.write_bytes(original.replace(b"[", b"\xe9[", 1))  # a Latin-1 e-acute
    with pytest.raises(data.DataError, match=re.escape(str(label_file)) + r".*byte 0xe9 at offset"):
        data.parse_label_file(str(label_file))
    label_file.write_bytes(b"\xef\xbb\xbf" + original)  # UTF-8 with a BOM is UTF-8
    plain = tmp_path / "plain.txt"
    plain.write_bytes(original)
    assert data.parse_label_file(str(label_file)) == data.parse_label_file(str(plain))
    assert len(data.parse_label_file(str(plain))[0]) >= 2
    label_file.write_bytes(original)
    for path in emo[4].glob("Ses*.txt"):  # Session4's label files, emptied of their label lines
        path.write_text("% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n")
    done = run_cli("--data", str(root), "--json")
    err = done.stderr.strip().splitlines()
    assert done.returncode == 0 and len(err) == 1 and err[0].startswith("warning: "), done.stderr
    assert "Session4" in err[0] and str(emo[4]) in err[0]
    assert list(json.loads(done.stdout)["sessions"]) == ["1", "2", "3", "5"]


# ----------------------------------------------------------------------------- audio


def test_read_audio_stereo_8k(tmp_path):
    path = str(tmp_path / "stereo.wav")
    t = np.arange(8000) / 8000
    sine = np.sin(2 * np.pi * 440 * t)
    sf.write(path, np.stack([0.5 * sine, 0.1 * sine], 1).astype(np.float32), 8000, subtype="FLOAT")
    wav = data.read_audio(path)
    assert wav.dtype == torch.float32 and wav.shape == (16000,)
    assert wav.shape[0] == data.audio_num_samples(path)
    peak = wav[1000:-1000].abs().max().item()
    assert abs(peak - 0.3) < 0.02  # the average of the two channels
    with pytest.raises(data.DataError, match="short.wav"):
        data.read_audio(write_wav(str(tmp_path / "short.wav"), 100))
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"not audio at all")
    with pytest.raises(data.DataError, match="garbage.wav"):
        data.read_audio(str(garbage))


@pytest.mark.parametrize(
    "samplerate,frames", [(8000, 8001), (22050, 22051), (44100, 44101), (48000, 48007)]
)
def test_num_samples_matches_decoded_length(tmp_path, samplerate, frames):
    path = write_wav(str(tmp_path / "x.wav"), frames, samplerate)
    assert data.audio_num_samples(path) == len(data.read_audio(path))


def test_label_json(tmp_path):
    for name in ("a", "b", "c", "d", "e"):
        write_wav(str(tmp_path / "wavs" / f"{name}.wav"), 4000)
    spec = {
        "Train": {"a.wav": "ang", "b.wav": "neu", "c.wav": "sad"},
        "Val": {"d.wav": "neu"},
        "Test": {"e.wav": "ang"},
    }
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(spec))
    splits, classes = data.load_corpus(str(path), wav_dir=str(tmp_path / "wavs"))
    assert classes == ("ang", "neu", "sad")
    assert [u.uid for u in splits["train"]] == ["a", "b", "c"] and splits["val"][0].split == "val"
    assert splits["test"][0].path == os.path.join(str(tmp_path / "wavs"), "e.wav")
    spec["Test"]["e.wav"] = "hap"
    path.write_text(json.dumps(spec))
    with pytest.raises(data.DataError, match=r"'hap'.*e\.wav"):
        data.load_corpus(str(path), wav_dir=str(tmp_path / "wavs"))
    spec["Test"] = {"zz.wav": "ang"}
    path.write_text(json.dumps(spec))
    with pytest.raises(data.DataError, match="zz.wav"):
        data.load_corpus(str(path), wav_dir=str(tmp_path / "wavs"))
    del spec["Test"]
    path.write_text(json.dumps(spec))
    with pytest.raises(data.DataError, match="Test"):
        data.load_label_json(str(path), str(tmp_path / "wavs"))
    path.write_text("{not json")
    with pytest.raises(data.DataError, match="labels.json"):
        data.load_label_json(str(path))


def test_manifest(tmp_path):
    for name in ("a", "b", "c"):
        write_wav(str(tmp_path / "audio" / f"{name}.wav"), 4000)
    path = tmp_path / "corpus.csv"
    path.write_text(
        f"path,label,split\naudio/a.wav,calm,train\n{tmp_path}/audio/b.wav,loud,train\naudio/c.wav,calm,test\n"
    )
    splits, classes = data.load_corpus(str(path))
    assert classes == ("calm", "loud") and set(splits) == {"train", "test"}
    assert splits["train"][0].path == os.path.join(str(tmp_path), "audio/a.wav")
    assert splits["train"][0].num_samples == 4000
    path.write_text(
        "path,label,split\naudio/a.wav,calm,train\naudio/b.wav,loud,train\naudio/c.wav,angry,test\n"
    )
    with pytest.raises(data.DataError, match=r"'angry'.*c\.wav"):
        data.load_corpus(str(path))
    path.write_text(
        "path,label,split\naudio/a.wav,calm,train\naudio/b.wav,loud,train\naudio/a.wav,calm,test\n"
    )
    with pytest.raises(data.DataError, match="both train and test"):
        data.load_corpus(str(path))
    path.write_text("path,label,split\naudio/a.wav,calm,training\n")
    with pytest.raises(data.DataError, match="line 2.*'training'"):
        data.load_manifest(str(path))
    path.write_text("file,label\naudio/a.wav,calm\n")
    with pytest.raises(data.DataError, match="path,label,split"):
        data.load_manifest(str(path))
    with pytest.raises(data.DataError, match="missing.csv"):
        data.load_corpus(str(tmp_path / "missing.csv"))


def test_label_json_listing_a_wav_twice_is_refused(tmp_path):
    """json.load keeps the last of two labels of one wav: the file is refused instead, with two
    labels or with the same label twice (a copy-paste slip either way)."""
    for name in ("a", "b", "c"):
        write_wav(str(tmp_path / f"{name}.wav"), 4000)
    path = tmp_path / "labels.json"
    for train in (
        '"a.wav": "ang", "b.wav": "neu", "a.wav": "neu"',
        '"a.wav": "ang", "a.wav": "ang"',
    ):
        path.write_text('{"Train": {' + train + '}, "Test": {"c.wav": "ang"}}')
        done = run_cli("--data", str(path))
        err = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(err) == 1, done.stderr
        assert err[0].startswith(f"error: {path}: Train lists 'a.wav' twice (labels 'ang' and ")
    path.write_text(
        '{"Train": {"a.wav": "ang"}, "Test": {"c.wav": "ang"}, "Test": {"b.wav": "ang"}}'
    )
    with pytest.raises(data.DataError, match='"Test" is there twice'):
        data.load_label_json(str(path))
    path.write_text('{"Train": {"a.wav": "ang", "b.wav": "neu"}, "Test": {"a.wav": "ang"}}')
    with pytest.raises(data.DataError, match=r"a\.wav is in both train and test"):
        data.load_label_json(str(path))
    path.write_text('{"Train": {"a.wav": "ang", "b.wav": "neu"}, "Test": {"c.wav": "ang"}}')
    assert [u.uid for u in data.load_label_json(str(path))] == ["a", "b", "c"]  # Val: optional


def test_custom_corpus_uids_are_paths_in_the_corpus(tmp_path):
    """spk1/000.wav and spk2/000.wav were both utterance '000': P-TAPT's k-means stage then failed
    with '12 uids but 12 frame counts'. A .csv or .json corpus's uid is the wav's path relative to
    the corpus folder, without its extension; two entries with one uid are refused at once."""
    rows, expected = ["path,label,split"], []
    for speaker in ("spk1", "spk2"):
        for i in range(8):
            rel = f"{speaker}/{i:03d}.wav"
            write_wav(str(tmp_path / rel), 16000, seed=len(rows))
            split = "train" if i < 6 else "test"
            rows.append(f"{rel},{'ab'[i % 2]},{split}")
            expected += [f"{speaker}/{i:03d}"] if split == "train" else []
    manifest = tmp_path / "corpus.csv"
    manifest.write_text("\n".join(rows) + "\n")
    done = run_cli(
        "--mode", "kmeans", "--data", manifest, "--fold", "1", "--ks", "4", "--checkpoint",
        "random-tiny", "--workers", "0", "--no-progress", "--out", tmp_path / "runs",
        name="pretrain.py",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    stored = load_labels(tmp_path / "runs" / "kmeans" / "fold1" / "labels.pt")
    assert sorted(stored["uids"]) == sorted(expected) and len(expected) == 12
    splits, _ = data.load_corpus(str(manifest))
    assert sorted(u.uid for u in splits["train"]) == sorted(expected)
    # a label .json: relative to its wav folder, '/' between folders
    spec = {"Train": {"spk1/000.wav": "a", "spk2/000.wav": "b"}, "Test": {"spk1/001.wav": "a"}}
    (tmp_path / "labels.json").write_text(json.dumps(spec))
    assert [u.uid for u in data.load_label_json(str(tmp_path / "labels.json"))] == [
        "spk1/000", "spk2/000", "spk1/001",
    ]  # fmt: skip
    os.makedirs(tmp_path / "meta")
    (tmp_path / "meta" / "labels.json").write_text(json.dumps(spec))
    assert [u.uid for u in data.load_label_json(tmp_path / "meta" / "labels.json", tmp_path)] == [
        "spk1/000", "spk2/000", "spk1/001",
    ]  # fmt: skip
    # one uid twice: the same file listed twice, or two files that differ only in their extension
    sf.write(str(tmp_path / "spk1" / "000.flac"), np.zeros(8000, np.float32), 16000)
    for extra, problem in [
        ("spk1/000.wav,a,train", r"spk1/000\.wav is listed twice \(also .*corpus\.csv line 2\)"),
        ("./spk1/000.wav,a,test", r"spk1/000\.wav is in both train and test"),
        (
            "spk1/000.flac,a,train",
            r"000\.flac and .*000\.wav .*both have the utterance id 'spk1/000'",
        ),
    ]:
        manifest.write_text("\n".join(rows + [extra]) + "\n")
        done = run_cli("--data", manifest)
        err = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(err) == 1, done.stderr
        assert err[0].startswith(f"error: {manifest} line {len(rows) + 1}: ") and re.search(
            problem, err[0]
        ), err[0]


# ----------------------------------------------------------------------------- dataset and batching


def test_dataset_crops_and_collate(tmp_path):
    utterances = [
        data.Utterance(f"u{i}", write_wav(str(tmp_path / f"u{i}.wav"), n, seed=i), lab, n)
        for i, (n, lab) in enumerate([(20000, "ang"), (5000, "sad"), (40000, "xxx")])
    ]
    full = data.AudioDataset(utterances, ("ang", "sad"))
    assert full.lengths == [20000, 5000, 40000] and [full[i]["label"] for i in range(3)] == [
        0,
        1,
        -1,
    ]
    head = data.AudioDataset(utterances, ("ang", "sad"), max_seconds=0.5)
    assert head.lengths == [8000, 5000, 8000]
    assert head[2]["offset"] == 0 and torch.equal(head[2]["wav"], full[2]["wav"][:8000])

    ds = data.AudioDataset(
        utterances, ("ang", "sad"), max_seconds=0.5, crop="random", crop_align=320, seed=1
    )
    offsets = {}
    for epoch in range(6):
        ds.set_epoch(epoch)
        item = ds[2]
        assert item["offset"] % 320 == 0 and len(item["wav"]) == 8000
        assert torch.equal(item["wav"], full[2]["wav"][item["offset"] : item["offset"] + 8000])
        assert ds[1]["offset"] == 0 and len(ds[1]["wav"]) == 5000
        offsets[epoch] = item["offset"]
    assert len(set(offsets.values())) > 1  # epochs differ
    again = data.AudioDataset(
        utterances, ("ang", "sad"), max_seconds=0.5, crop="random", crop_align=320, seed=1
    )
    again.set_epoch(4)
    assert again[2]["offset"] == offsets[4]  # a function of (seed, epoch, index) only

    batch = data.collate([head[0], head[1]])
    assert batch["wav"].shape == (2, 8000) and batch["wav"].dtype == torch.float32
    assert batch["lengths"].tolist() == [8000, 5000] and batch["labels"].tolist() == [0, 1]
    assert batch["indices"].tolist() == [0, 1] and batch["offsets"].tolist() == [0, 0]
    assert torch.all(batch["wav"][1, 5000:] == 0) and torch.equal(
        batch["wav"][1, :5000], head[1]["wav"]
    )

    sampler = data.BucketBatchSampler(head.lengths, batch_size=2, drop_last=False)
    loader = torch.utils.data.DataLoader(head, batch_sampler=sampler, collate_fn=data.collate)
    batches = list(loader)
    assert len(batches) == len(loader) == 2
    assert sorted(i for b in batches for i in b["indices"].tolist()) == [0, 1, 2]

    cached = data.AudioDataset(utterances, ("ang", "sad"), cache=True)
    first = cached[0]["wav"]
    os.remove(utterances[0].path)
    assert torch.equal(cached[0]["wav"], first)  # served from memory
    with pytest.raises(data.DataError, match="u0.wav.*not found"):
        full[0]


def varied_lengths(n=1000, seed=0):
    return np.random.default_rng(seed).integers(16000, 8 * 16000, n).tolist()


def test_sampler_covers_every_index_once():
    lengths = varied_lengths(1003)
    for kwargs in ({}, {"max_batch_seconds": 40}, {"bucket": False}, {"shuffle": False}):
        sampler = data.BucketBatchSampler(lengths, batch_size=16, drop_last=False, **kwargs)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths))), kwargs
    full = list(data.BucketBatchSampler(lengths, batch_size=16, drop_last=True))
    assert all(len(b) == 16 for b in full) and len(full) == len(lengths) // 16
    evaluation = list(
        data.BucketBatchSampler(lengths, batch_size=16, shuffle=False, drop_last=True)
    )
    flat = [i for b in evaluation for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # never drops
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)


def test_sampler_bucketing_reduces_padding():
    lengths = varied_lengths(3200)
    bucketed = data.BucketBatchSampler(lengths, batch_size=16).padding_fraction()
    random = data.BucketBatchSampler(lengths, batch_size=16, bucket=False).padding_fraction()
    assert bucketed < 0.05 and random > 0.3 and bucketed < random / 5


def test_sampler_seeds_and_epochs():
    lengths = varied_lengths()
    a, b = (
        data.BucketBatchSampler(lengths, 16, seed=5),
        data.BucketBatchSampler(lengths, 16, seed=5),
    )
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(data.BucketBatchSampler(lengths, 16, seed=6)) != first
    a.set_epoch(1, start_batch=3)
    b.set_epoch(1)
    assert list(a) == list(b)[3:] and len(a) == len(b) - 3


def test_sampler_max_batch_seconds():
    lengths = varied_lengths()
    sampler = data.BucketBatchSampler(lengths, batch_size=64, max_batch_seconds=30, drop_last=True)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # nothing dropped
    assert all(len(b) * max(lengths[i] for i in b) <= 30 * 16000 for b in batches)
    assert max(len(b) for b in batches) > 3  # and batches are not trivially small
    huge = data.BucketBatchSampler(
        [16000 * 60, 16000], batch_size=8, max_batch_seconds=30, drop_last=False
    )
    assert sorted(map(len, huge)) == [1, 1]  # an utterance over the limit gets a batch of its own


def test_sampler_distributed_shards():
    lengths = varied_lengths(500)
    for kwargs in (
        {"drop_last": True},
        {"drop_last": False, "max_batch_seconds": 60},
        {"shuffle": False},
    ):
        single = list(data.BucketBatchSampler(lengths, 16, seed=2, **kwargs))
        ranks = [
            data.BucketBatchSampler(lengths, 16, seed=2, num_replicas=2, rank=r, **kwargs)
            for r in (0, 1)
        ]
        shards = [list(r) for r in ranks]
        assert len(shards[0]) == len(shards[1]) == len(single)
        for batch, s0, s1 in zip(single, *shards):
            assert sorted(s0 + s1) == sorted(batch) and s0 and s1
    # A batch smaller than the number of replicas: every rank still gets an utterance.
    tiny = [
        list(
            data.BucketBatchSampler(
                [16000] * 5, 4, drop_last=False, shuffle=False, num_replicas=3, rank=r
            )
        )
        for r in range(3)
    ]
    assert [len(t) for t in tiny] == [2, 2, 2] and all(len(b) >= 1 for t in tiny for b in t)
    assert set(i for t in tiny for b in t for i in b) == set(range(5))


# ----------------------------------------------------------------------------- command line


def run_cli(*args, name="data.py"):
    return subprocess.run(
        [sys.executable, os.path.join(HERE, name), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli(tmp_path):
    out = str(tmp_path / "IEMOCAP_full_release")
    done = run_cli(out, "--per-session", "2", "--seed", "1", "--max-seconds", "2", name="synth.py")
    assert done.returncode == 0, done.stderr
    done = run_cli("--data", out, "--json")
    assert done.returncode == 0, done.stderr
    table = json.loads(done.stdout)
    assert table["total"] == 10 and list(table["sessions"]) == ["1", "2", "3", "4", "5"]
    assert table == data.count_table(data.load_iemocap(out))
    missing = str(tmp_path / "no_such_dir")
    done = run_cli("--data", missing)
    assert done.returncode == 2 and "no_such_dir" in done.stderr and "Traceback" not in done.stderr


def test_cli_table_in_process(synth, capsys):
    assert data.main(["--data", synth]) == 0
    text = capsys.readouterr().out
    assert re.search(r"\|\s+total\s+\|.*\|\s+40 \|", text)


# =============================================================================
# losses: masking, negatives, every loss alone, the release recipe's pieces


@pytest.mark.parametrize("semantics", ["utterance", "fairseq"])
def test_span_mask_stays_in_valid_frames(semantics):
    lengths = [200, 120, 37, 15]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        mask = M.span_masks(semantics, lengths, 200, [g] * 4, g, 0.08, 10, 2)
        for i, n in enumerate(lengths):
            assert not mask[i, n:].any()
            assert mask[i, :n].sum() >= min(10, n - 1)  # at least one span fits in every row here
        if semantics == "fairseq":  # require_same_masks: equal masked counts
            assert len(set(mask.sum(1).tolist())) == 1


def test_span_mask_utterance_span_count():
    """Per utterance: spans = max(min, int(p * L / span + u)), u the first draw of the utterance's
    own generator; spans never overlap here (span 1), so the masked count is the number of spans."""
    for seed in range(30):
        rngs = [
            torch.Generator().manual_seed(2 * seed),
            torch.Generator().manual_seed(2 * seed + 1),
        ]
        u = [
            float(torch.rand((), generator=torch.Generator().manual_seed(r.initial_seed())))
            for r in rngs
        ]
        mask = M.span_masks("utterance", [1000, 400], 1000, rngs, None, 0.05, 1, 2)
        assert mask.sum(1).tolist() == [
            max(2, int(0.05 * 1000 + u[0])),
            max(2, int(0.05 * 400 + u[1])),
        ]


def test_negatives_are_other_masked_frames_of_the_same_utterance():
    mask = torch.zeros(3, 50, dtype=torch.bool)
    mask[0, 5:20] = True
    mask[1, 30:33] = True
    mask[2, 0:40] = True
    g = torch.Generator().manual_seed(0)
    neg = P.sample_negatives(mask, 100, g)
    rows = mask.nonzero()[:, 0]
    assert neg.shape == (int(mask.sum()), 100)
    idx = torch.arange(len(rows))[:, None].expand_as(neg)
    assert (neg != idx).all()
    assert (rows[neg] == rows[:, None]).all()
    # uniform over the other frames: utterance 1 has 3 masked frames, so 2 candidates each ~50%
    r1 = neg[rows == 1]
    counts = torch.bincount(r1.flatten() - int((rows == 0).sum()), minlength=3).float()
    assert counts.sum() == 300 and (counts / 200).max() < 1.0


def reference_wav2vec2_loss(model, wav, lens, mask, negatives):
    """The loss from RECIPE.md's formulas, one frame at a time, in float64."""
    model = model.double().eval()
    wav = wav.double()
    enc = model.encode(wav, lens, time_mask=mask)
    conv = model.feature_encoder(wav, lens)  # (B, C, F)
    frames = model.frame_lengths(lens)
    squares = [conv[b, :, : frames[b]].pow(2) for b in range(len(lens))]
    penalty = sum(s.sum() for s in squares) / sum(s.numel() for s in squares)
    q = model.quantizer
    positions = mask.nonzero().tolist()
    targets, probs = [], []
    for b, t in positions:
        logits = q.weight_proj(enc.features[b, t])
        codes = []
        for grp in range(q.groups):
            lg = logits[grp * q.num_vars : (grp + 1) * q.num_vars]
            codes.append(q.vars[0, grp * q.num_vars + int(lg.argmax())])
            probs.append(torch.softmax(lg, 0))
        targets.append(model.project_q(torch.cat(codes)))
    ce = 0.0
    for i, (b, t) in enumerate(positions):
        context = model.final_proj(enc.hidden[b, t])
        cands = [targets[i]] + [targets[j] for j in negatives[i].tolist()]
        logits = []
        for k, cand in enumerate(cands):
            if k > 0 and torch.equal(cand, targets[i]):
                logits.append(torch.tensor(float("-inf"), dtype=torch.float64))
            else:
                cos = torch.dot(context, cand) / (context.norm() * cand.norm())
                logits.append(cos / model.cfg.logit_temp)
        ce = ce - torch.log_softmax(torch.stack(logits), 0)[0]
    n = len(positions)
    ppl = 0.0
    for grp in range(q.groups):
        avg = torch.stack(probs[grp :: q.groups]).mean(0)
        ppl = ppl + torch.exp(-(avg * torch.log(avg + 1e-7)).sum())
    gv = q.groups * q.num_vars
    return {"contrastive": ce, "diversity": (gv - ppl) / gv * n, "feature_penalty": penalty * n}


def test_wav2vec2_loss_matches_reference_from_formulas():
    cfg = tiny_config(num_layers=2, latent_vars=8, num_negatives=5)
    model = random_model(cfg, seed=5).double()
    g = torch.Generator().manual_seed(0)
    wav, lens = torch.randn(2, 9000, generator=g).double(), torch.tensor([9000, 6000])
    frames = model.frame_lengths(lens)
    mask = M.span_masks("utterance", frames, int(frames.max()), [g, g], g, 0.2, 3, 2)
    negatives = P.sample_negatives(mask, 5, g)
    # make two distractors equal to their target, so the -inf rule is exercised
    first = mask.nonzero()[:, 0] == 0
    negatives[0, 0] = 0  # impossible from the sampler, but a duplicate codeword acts the same
    with torch.no_grad():
        got = P.tapt_loss(model, model.encode(wav, lens, time_mask=mask), mask, negatives)
        ref = reference_wav2vec2_loss(model, wav, lens, mask, negatives)
    assert got["n_masked"] == int(mask.sum()) and first.any()
    for key in ("contrastive", "diversity", "feature_penalty"):
        torch.testing.assert_close(got[key].double(), ref[key].double(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(
        got["loss"].double(),
        (ref["contrastive"] + 0.1 * ref["diversity"] + 10 * ref["feature_penalty"]).double(),
    )
    with (
        torch.no_grad()
    ):  # --feature-penalty 0: Hugging Face's objective, the other terms unchanged
        hf = P.tapt_loss(
            model, model.encode(wav, lens, time_mask=mask), mask, negatives, penalty_weight=0.0
        )
    assert ref["feature_penalty"] > 0
    torch.testing.assert_close(
        hf["loss"].double(), (ref["contrastive"] + 0.1 * ref["diversity"]).double()
    )


def test_fresh_model_initialised_as_fairseq():
    """Wav2Vec2(cfg) draws its weights as fairseq's Wav2Vec2Model does (issue #4)."""
    torch.manual_seed(0)
    cfg = tiny_config(embed_dim=128, ffn_dim=256, num_layers=2)
    net = M.Wav2Vec2(cfg)
    for conv in net.feature_encoder.convs:  # kaiming_normal_: std sqrt(2 / fan_in)
        fan_in = conv.weight.shape[1] * conv.weight.shape[2]
        assert abs(conv.weight.std().item() / math.sqrt(2 / fan_in) - 1) < 0.1
    linears = [m for m in net.encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == cfg.num_layers * 6  # q, k, v, out, fc1, fc2
    for lin in linears:  # init_bert_params: N(0, 0.02), zero bias
        assert abs(lin.weight.std().item() / 0.02 - 1) < 0.1 and not lin.bias.any()
    pos = net.encoder.pos_conv
    k, c = cfg.pos_conv_kernel, cfg.embed_dim
    assert abs(pos.weight_v.std().item() / math.sqrt(4 / (k * c)) - 1) < 0.1 and not pos.bias.any()
    torch.testing.assert_close(
        pos.weight_g, pos.weight_v.norm(dim=(0, 1), keepdim=True)
    )  # weight norm, dim=2
    assert 0 <= net.mask_emb.min() and net.mask_emb.max() < 1  # uniform_
    q = net.quantizer
    assert 0 <= q.vars.min() and q.vars.max() < 1 and not q.weight_proj.bias.any()
    assert abs(q.weight_proj.weight.std().item() - 1) < 0.1
    # fairseq leaves these three at torch's default: U(+-1/sqrt(fan_in))
    for lin in (net.post_extract_proj, net.project_q, net.final_proj):
        assert lin.weight.abs().max() <= 1 / math.sqrt(lin.in_features)
    for norm in list(net.encoder.modules()) + [net.layer_norm]:
        if isinstance(norm, torch.nn.LayerNorm):
            assert bool((norm.weight == 1).all()) and not norm.bias.any()


def group_norm_case(seed, offset):
    """A layer-0 group norm with non-trivial affine parameters, a padded batch (channel means around
    `offset`) and an upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    norm = torch.nn.GroupNorm(16, 16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=g)
        norm.bias.uniform_(-0.5, 0.5, generator=g)
    x = torch.randn(3, 16, 300, generator=g) * 2 + torch.randn(3, 16, 1, generator=g) * offset
    return norm, x, torch.tensor([300, 120, 211]), torch.randn(3, 16, 300, generator=g)


def backward_over_valid_frames(y, lengths, dy):
    valid = (torch.arange(y.shape[-1]) < lengths[:, None]).unsqueeze(1)
    (y * dy * valid).sum().backward()


def assert_per_utterance_group_norm(y, grad, x, lengths, dy, norm, tol):
    """y and the gradient into x are each utterance's float64 group norm over its valid frames alone."""
    w, b = norm.weight.detach().double(), norm.bias.detach().double()
    for i, n in enumerate(lengths.tolist()):
        xi = x.detach()[i : i + 1, :, :n].double().requires_grad_()
        ref = F.group_norm(xi, 16, w, b, norm.eps)
        (ref * dy[i : i + 1, :, :n].double()).sum().backward()
        torch.testing.assert_close(y[i, :, :n].double(), ref[0].detach(), atol=tol, rtol=tol)
        torch.testing.assert_close(grad[i, :, :n].double(), xi.grad[0], atol=tol, rtol=tol)


def test_masked_group_norm_values_and_gradients_per_utterance():
    """The layer-0 group norm of a padded batch gives each utterance the values and the gradients
    (TAPT trains through it) of a float64 group norm over its valid frames alone (issue #5)."""
    norm, x, lengths, dy = group_norm_case(seed=0, offset=3)
    x.requires_grad_()
    with torch.no_grad():  # the no-autograd path (V-FT's frozen encoder, inference) works in place
        y_no_grad = M.masked_group_norm(x.detach().clone(), lengths, norm)
    y = M.masked_group_norm(x, lengths, norm)
    backward_over_valid_frames(y, lengths, dy)
    assert_per_utterance_group_norm(y, x.grad, x, lengths, dy, norm, tol=1e-5)
    for i, n in enumerate(lengths.tolist()):
        assert torch.equal(y_no_grad[i, :, :n], y[i, :, :n].detach())
        assert not x.grad[i, :, n:].any()  # padded frames feed nothing downstream


def test_group_norm_is_float32_under_autocast():
    """The layer-0 group norm gives each utterance the values and gradients of a float64 group norm over its
    valid frames under bf16 and fp16 autocast too (fairseq computes this norm in float32, its Fp32GroupNorm)."""
    norm, x, lengths, dy = group_norm_case(seed=1, offset=30)
    for dtype in (None, torch.bfloat16, torch.float16):
        xg = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            y = M.masked_group_norm(xg, lengths, norm)
        assert y.dtype == torch.float32
        backward_over_valid_frames(y, lengths, dy)
        assert_per_utterance_group_norm(y, xg.grad, x, lengths, dy, norm, tol=1e-4)


def test_wav2vec2_objective_learns_on_a_tiny_model():
    """TAPT's objective (pretrain.tapt_loss with sample_negatives and span_masks) can
    learn: on four synthetic 1 s utterances a fresh tiny model's contrastive loss per masked frame
    falls from chance, ln(1 + negatives), to below half of it within 100 updates, without the
    quantizer collapsing (a collapsed codebook would lower the loss by making distractors equal to
    their targets, which get -inf)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    wav = torch.stack(
        [
            torch.from_numpy(
                np.asarray(
                    S.synth_utterance(
                        rng,
                        S.speaker_voice(rng, "FM"[i % 2]),
                        S.EMOTION_STYLE[("neu", "ang", "sad", "hap")[i]],
                        1.0,
                        -50.0,
                    ),
                    dtype=np.float32,
                )
            )
            for i in range(4)
        ]
    )
    wav = 0.5 * wav / wav.abs().amax(1, keepdim=True)
    lens = torch.full((4,), wav.shape[1])
    num_negatives = 20
    model = M.Wav2Vec2(tiny_config(num_layers=2, num_negatives=num_negatives))
    frames = model.frame_lengths(lens)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    chance = math.log(1 + num_negatives)

    g_eval = torch.Generator().manual_seed(123)
    eval_mask = M.span_masks(
        "utterance", frames, int(frames.max()), [g_eval] * len(frames), g_eval, 0.3, 5, 2
    )
    eval_negatives = P.sample_negatives(eval_mask, num_negatives, g_eval)

    def evaluate():  # eval mode: argmax codewords, no dropout; fixed masks and distractors
        model.eval()
        with torch.no_grad():
            enc = model.encode(wav, lens, time_mask=eval_mask)
            terms = P.tapt_loss(model, enc, eval_mask, eval_negatives)
            targets, _ = model.quantizer(enc.features[eval_mask])
            duplicates = (targets[eval_negatives] == targets[:, None]).all(-1).float().mean()
        model.train()
        return float(terms["contrastive"] / terms["n_masked"]), float(duplicates)

    before, _ = evaluate()
    g = torch.Generator().manual_seed(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # tensors this small: one thread is faster, and immune to a busy machine
    try:
        for update in range(100):
            mask = M.span_masks(
                "utterance", frames, int(frames.max()), [g] * len(frames), g, 0.3, 5, 2
            )
            terms = P.tapt_loss(
                model,
                model.encode(wav, lens, time_mask=mask),
                mask,
                P.sample_negatives(mask, num_negatives, g),
            )
            opt.zero_grad()
            (terms["loss"] / terms["n_masked"]).backward()
            opt.step()
            model.quantizer.set_num_updates(update + 1)
    finally:
        torch.set_num_threads(threads)
    after, duplicates = evaluate()
    assert before > 0.9 * chance, (before, chance)
    assert after < 0.5 * chance, (before, after, chance)
    assert duplicates < 0.1, duplicates


# ----------------------------------------------------------------------------- each loss alone


def test_vft_loss_is_class_weighted_cross_entropy():
    """vft_loss's pair, numerator / denominator, is sum_i w_{y_i} CE_i / sum_i w_{y_i}, written out in float64."""
    import finetune

    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(6, 4, generator=g), torch.tensor([0, 1, 1, 2, 3, 3])
    weights = T.class_weights([0, 0, 1, 2, 2, 2, 3], 4)
    total, count = finetune.vft_loss(logits, labels, weights)
    log_p = logits.double().log_softmax(-1)
    w = weights.double()[labels]
    expected = -(w * log_p[torch.arange(6), labels]).sum() / w.sum()
    assert float(total / count) == pytest.approx(float(expected), rel=1e-6)
    assert float(count) == pytest.approx(float(w.sum()), rel=1e-6)


def test_teacher_loss_labels_every_frame_with_its_utterance():
    """teacher_loss: a class-weighted CE over every frame (each carrying its utterance's label) and one over
    the utterances, each written out in float64."""
    g = torch.Generator().manual_seed(1)
    frame_logits, utterance_logits = (
        torch.randn(3, 5, 4, generator=g),
        torch.randn(3, 4, generator=g),
    )
    labels, weights = torch.tensor([2, 0, 2]), torch.tensor([0.1, 0.2, 0.3, 0.4])
    (fs, fc), (us, uc) = P.teacher_loss(frame_logits, utterance_logits, labels, weights)
    w = weights.double()
    frame = -sum(
        w[labels[u]] * frame_logits[u, t].double().log_softmax(-1)[labels[u]]
        for u in range(3)
        for t in range(5)
    )
    utterance = -sum(
        w[labels[u]] * utterance_logits[u].double().log_softmax(-1)[labels[u]] for u in range(3)
    )
    assert float(fs) == pytest.approx(float(frame), rel=1e-6) and float(fc) == pytest.approx(
        5 * float(w[labels].sum())
    )
    assert float(us) == pytest.approx(float(utterance), rel=1e-6) and float(uc) == pytest.approx(
        float(w[labels].sum())
    )


def test_pseudo_label_loss_one_term_per_k():
    """pseudo_label_loss: for each K, the summed CE of the masked frames' clusters and the number of frames."""
    g = torch.Generator().manual_seed(2)
    logits = [torch.randn(7, 4, generator=g), torch.randn(7, 16, generator=g)]
    targets = [torch.randint(0, 4, (7,), generator=g), torch.randint(0, 16, (7,), generator=g)]
    terms = P.pseudo_label_loss(logits, targets)
    assert len(terms) == 2
    for (total, count), lk, tk in zip(terms, logits, targets):
        expected = -lk.double().log_softmax(-1)[torch.arange(7), tk].sum()
        assert count == 7 and float(total) == pytest.approx(float(expected), rel=1e-6)


class RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_bad_pseudo_label_file_is_one_line_without_unsafe_advice(tmp_path):
    """A booby-trapped or truncated labels.pt: one line naming the file; torch's own message (which
    advises loading with weights_only=False) never reaches the user, and nothing is run."""
    marker = tmp_path / "ran"
    trapped, truncated = tmp_path / "labels.pt", tmp_path / "cut.pt"
    torch.save({"uids": RunsCommand(f"touch {marker}")}, trapped)
    truncated.write_bytes(trapped.read_bytes()[:50])
    for path in (trapped, truncated, tmp_path / "missing.pt"):
        with pytest.raises(ValueError) as e:
            data.load_labels(path)
        text = str(e.value)
        assert text.startswith(f"{path}: not a readable pseudo-label file") and "\n" not in text
        assert "weights_only" not in text and not marker.exists()


def test_resume_points_never_run_code(tmp_path, capsys):
    """A resume file is read like a checkpoint: a pickle that would run a command is refused (and the
    previous resume point used), never executed."""
    path = str(tmp_path / "state.pt")
    T.save_training_state({"update": 1}, path)
    marker = tmp_path / "ran"
    torch.save(
        {"update": RunsCommand(f"touch {marker}")}, f"{path}.new"
    )  # a newer 'resume point' that runs code
    assert T.load_training_state(path)["update"] == 1
    assert not marker.exists() and "state.pt.new is unreadable" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the release recipe


def reference_release_tapt_loss(model, features, hidden, mask, negatives):
    """transformers 4.10's Wav2Vec2ForPreTraining loss written out in float64 from its formulas (eval-mode
    codes, so no Gumbel noise): every frame quantized; perplexity of the masked frames' mean softmax per group,
    summed; CE over [target; distractors] of cos / logit_temp, a distractor equal to its target at -inf,
    summed over masked frames; + 0.1 (G V - perplexity) / (G V), neither scaled by n_masked nor normalised."""
    q = model.quantizer
    B, T, C = features.shape
    x = features.double().reshape(B * T, C)
    logits = (x @ q.weight_proj.weight.double().T + q.weight_proj.bias.double()).view(
        B * T, q.groups, q.num_vars
    )
    probs = logits.softmax(-1)[mask.flatten()].mean(0)
    perplexity = torch.exp(-(probs * torch.log(probs + 1e-7)).sum(-1)).sum()
    codes = logits.argmax(-1)  # (B T, G)
    book = q.vars.double().view(q.groups, q.num_vars, -1)
    quantized = torch.cat([book[g][codes[:, g]] for g in range(q.groups)], -1)
    projected = quantized @ model.project_q.weight.double().T + model.project_q.bias.double()
    context = (
        hidden.double()[mask] @ model.final_proj.weight.double().T + model.final_proj.bias.double()
    )
    flat = mask.flatten().nonzero().squeeze(1)
    total = 0.0
    for i, frame in enumerate(flat.tolist()):
        candidates = torch.cat([projected[frame][None], projected[negatives[i]]])
        sims = (
            torch.nn.functional.cosine_similarity(context[i][None], candidates, dim=-1)
            / model.cfg.logit_temp
        )
        sims[1:][(projected[negatives[i]] == projected[frame]).all(-1)] = float("-inf")
        total = total - sims.log_softmax(0)[0]
    gv = q.groups * q.num_vars
    return total + 0.1 * (gv - perplexity) / gv


def test_release_tapt_loss_matches_transformers_410_formulas():
    """release_tapt_loss on a padded batch with one utterance much shorter than the other, run as the
    release ran it (no attention mask: padding is audio), against the float64 reference; some distractors
    fall on the padding."""
    torch.manual_seed(0)
    model = M.Wav2Vec2(
        tiny_config(dropout=0.0, attention_dropout=0.0, dropout_input=0.0, dropout_features=0.0)
    ).eval()
    wav = torch.randn(2, 16000, generator=torch.Generator().manual_seed(1)) * 0.1
    lengths = torch.tensor([16000, 3200])
    wav[1, 3200:] = 0.0
    frames = model.frame_lengths(lengths)
    T = int(frames.max())
    g = lambda s: torch.Generator().manual_seed(s)
    mask = M.span_masks("release", frames, T, [g(6), g(7)], g(5), 0.2, 3, 2)
    assert mask[1].any() and not mask[1, int(frames[1]) :].any()
    negatives = P.padded_negatives(mask, 20, [g(8), g(9)])
    row1 = (
        negatives[int(mask[0].sum()) :] - T
    )  # the short utterance's distractors, as frame indices of its row
    assert (row1 >= int(frames[1])).any() and ((row1 >= 0) & (row1 < T)).all()
    flat = mask.flatten().nonzero().squeeze(1)
    assert not (negatives == flat[:, None]).any()  # never the frame itself
    with torch.no_grad():
        encoded = model.encode(wav, None, time_mask=mask)
        terms = P.release_tapt_loss(model, encoded, mask, negatives)
        expected = reference_release_tapt_loss(
            model, encoded.features, encoded.hidden, mask, negatives
        )
    assert float(terms["loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(terms["diversity"]) < 1 and int(terms["n_masked"]) == int(mask.sum())


def covered_probability(length, span, n):
    """P(a frame is masked) for each frame when n distinct span starts are drawn uniformly from 0..length - span."""
    starts = length - span + 1
    out = []
    for j in range(length):
        covering = min(j, starts - 1) - max(0, j - span + 1) + 1  # starts whose span covers frame j
        out.append(1 - math.comb(starts - covering, n) / math.comb(starts, n))
    return out


def test_release_span_masks_follow_the_410_formula():
    """One span count for the batch from its padded length (0.08 / 15 / min 2 at 499 frames: 2 spans with
    probability 0.339, 3 with 0.661), starts over the padded length, padding cleared: a 1 s utterance (49
    frames) in a 10 s batch is left unmasked about 75% of the time; per utterance it never is."""
    g = lambda s: torch.Generator().manual_seed(s)
    draws, frames, span = 3000, [499, 49], 15
    short_unmasked, long_masked = 0, 0.0
    for i in range(draws):
        m = M.span_masks(
            "release", frames, 499, [g(3 * i + 1), g(3 * i + 2)], g(3 * i), 0.08, span, 2
        )
        short_unmasked += int(not m[1].any())
        long_masked += int(m[0].sum())
        assert not m[1, 49:].any()
    p2 = 1 - (0.08 * 499 / span - 2)  # P(int(2.661 + u) == 2)
    expected_unmasked = p2 * math.comb(436, 2) / math.comb(485, 2) + (1 - p2) * math.comb(
        436, 3
    ) / math.comb(485, 3)
    assert short_unmasked / draws == pytest.approx(expected_unmasked, abs=0.025)
    expected_long = p2 * sum(covered_probability(499, span, 2)) + (1 - p2) * sum(
        covered_probability(499, span, 3)
    )
    assert long_masked / draws == pytest.approx(expected_long, rel=0.02)
    per_utterance = M.span_masks("utterance", frames, 499, [g(1), g(2)], g(0), 0.08, span, 2)
    assert per_utterance[1].sum() >= span  # at least two spans inside its own 49 frames


def test_release_vft_group_norm_sees_the_padding_and_the_transformer_does_not():
    """The release's V-FT: in training, an utterance's features depend on how far its batch pads it (group norm
    over the padded row), not on what else is in the batch (attention mask); eval (its one-utterance test)
    and the clean recipe give each utterance its unbatched result."""
    torch.manual_seed(0)
    net = M.Wav2Vec2(
        tiny_config(
            dropout=0.0,
            attention_dropout=0.0,
            dropout_input=0.0,
            dropout_features=0.0,
            layerdrop=0.0,
        )
    )
    g = torch.Generator().manual_seed(2)
    short, other_a, other_b = (torch.randn(n, generator=g) * 0.1 for n in (6000, 16000, 16000))
    batch = lambda other: (
        torch.stack([torch.nn.functional.pad(short, (0, 10000)), other]),
        torch.tensor([6000, 16000]),
    )
    net.train()
    with torch.no_grad():
        alone, _ = net(short[None], norm_over_padding=True)
        with_a, frames = net(*batch(other_a), norm_over_padding=True)
        with_b, _ = net(*batch(other_b), norm_over_padding=True)
        n = int(frames[0])
        torch.testing.assert_close(
            with_a[0, :n], with_b[0, :n], atol=1e-6, rtol=0
        )  # the transformer: masked
        assert (with_a[0, :n] - alone[0, :n]).abs().max() > 1e-3  # the group norm: padded
        net.eval()
        torch.testing.assert_close(
            net(*batch(other_a), norm_over_padding=True)[0][0, :n],
            net(short[None])[0][0, :n],
            atol=1e-5,
            rtol=1e-5,
        )
        net.train()
        torch.testing.assert_close(
            net(*batch(other_a))[0][0, :n], alone[0, :n], atol=1e-5, rtol=1e-5
        )


def release_label_slice(labels, start, nlabel):
    """The reference: the release's collate (pretrain/dataloader.py:182-204) on one cropped utterance,
    written from its code: _conv_out_length per layer of wav2vec 2.0 Base's conv stack applied to
    the crop start, a numpy slice from there, then cut or padded with -100 to nlabel."""
    label_start = start
    for kernel, stride in [(10, 5)] + [(3, 2)] * 4 + [(2, 2)] * 2:
        label_start = (label_start - kernel) // stride + 1
    x = labels[None, label_start : label_start + nlabel]
    if x.shape[1] >= nlabel:
        return x[0, :nlabel]
    return np.pad(x, [[0, 0], [0, nlabel - x.shape[1]]], constant_values=-100)[0]


def test_release_ptapt_crop_labels_match_the_release_for_every_start():
    """Every start offset 0..3200 samples of a 2 s crop of a 10 s utterance, beside a shorter one: the
    labels the release recipe gives its frames equal the release's; the clean recipe (aligned crops)
    takes frame start / 320; the shorter utterance, not cropped, keeps its labels from frame 0."""
    labels = np.arange(499) + 1000  # 10 s: 499 frames, each labelled with its own number
    width = nlabel = 99  # a 2 s crop: 99 frames
    conv = M.BASE_CONV_LAYERS
    crop, full = 32000, [160000, 20000]
    short = np.arange(62) + 5000  # the 1.25 s utterance's 62 frames
    per_utterance = [{8: torch.tensor(labels)}, {8: torch.tensor(short)}]
    for start in range(0, 3201):
        batch = {
            "indices": torch.tensor([0, 1]),
            "offsets": torch.tensor([start, 0]),
            "lengths": torch.tensor([crop, 20000]),
        }
        for release in (True, False):
            if not release and start % 320:
                continue  # aligned crops start at whole frames only
            starts = P.crop_starts(batch, full, 320, conv, release)
            frames = torch.tensor([nlabel, 62])
            got = P.crop_labels(per_utterance, [0, 1], starts, frames, width)[0]
            if release:
                expected = release_label_slice(labels, start, nlabel)
            else:
                expected = labels[start // 320 :][:nlabel]
            assert got[0].tolist() == expected.tolist(), (start, release)
            assert got[1].tolist() == short.tolist() + [-100] * (width - 62)  # not cropped
    assert (
        P.release_start(0, conv) == -1 and P.release_start(640, conv) == 1
    )  # frame k - 1 at 320 k
    # the release's quirk: a batch's longest utterance, not longer than the crop, is "cropped" at 0
    alone = {
        "indices": torch.tensor([1]),
        "offsets": torch.tensor([0]),
        "lengths": torch.tensor([20000]),
    }
    assert P.crop_starts(alone, full, 320, conv, True) == [-1]


def test_warmup_from_zero_is_the_release_schedule():
    """The first 100 learning-rate factors against the release's LambdaLR (pretrain/trainer.py:197-
    204), warm-up 40 of 400 updates, flat 5%; the clean recipe's warm-up starts one step later."""
    total, warmup = 400, 40
    flat = int(0.05 * total)

    def release(step):
        if step < warmup:
            return float(step) / float(max(1, warmup))
        if step < warmup + flat:
            return 1.0
        return max(0.0, float(total - step) / float(max(1, total - (warmup + flat))))

    ours = [T.tri_stage_lr(step, total, warmup, flat, from_zero=True) for step in range(100)]
    assert ours == [release(step) for step in range(100)] and ours[0] == 0.0
    clean = [T.tri_stage_lr(step, total, warmup, flat) for step in range(100)]
    assert clean[:warmup] == [release(step + 1) for step in range(warmup)]
    assert clean[warmup:] == ours[warmup:]


def test_teacher_crop_starts_follow_the_recipe():
    """The release's teacher crops start at np.random.randint(over): 0..over - 1; the clean recipe
    draws 0..over. Drawn through crop_to_shortest with 400 generators."""
    wav = torch.arange(2 * 1000, dtype=torch.float32).view(2, 1000)
    batch = {"wav": wav, "lengths": torch.tensor([1000, 990])}
    for release, last in ((True, 9), (False, 10)):
        starts = set()
        for seed in range(400):
            rngs = [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1000)]
            cropped, lengths = P.crop_to_shortest(batch, rngs, release=release)
            assert (
                lengths.tolist() == [990, 990] and int(cropped[1, 0]) == 1000
            )  # the shortest: whole
            starts.add(int(cropped[0, 0]))
        assert starts == set(range(last + 1)), (release, sorted(starts))


def test_precision_per_recipe_and_device(monkeypatch):
    """The release recipe trains in fp16 with a gradient scaler on a GPU, as the release; the clean
    recipe in bf16 where the GPU has it; both in float32 on the CPU."""
    base = ["--mode", "tapt", "--data", "x", "--checkpoint", "random-tiny"]
    release, clean = (P.parse_args([*base, "--recipe", r]).precision for r in ("release", "clean"))
    assert (release, clean) == ("auto-fp16", "auto")
    import finetune

    assert finetune.parse_args(["--quickstart"]).precision == "auto-fp16"
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert T.autocast_dtype(cpu, release) is None and T.autocast_dtype(cpu, clean) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert (
        T.autocast_dtype(gpu, release) == torch.float16
    )  # GradScaler on: train() enables it for fp16
    assert T.autocast_dtype(gpu, clean) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert T.autocast_dtype(gpu, clean) == torch.float16


def test_release_dynamic_batches():
    """The release's RandomBucketSampler: 50 length buckets read in ascending order, shuffled inside, cut when a
    batch holds at least the budget of audio, last partial batch dropped; the batch order shuffled."""
    rng = np.random.default_rng(0)
    lengths = (rng.uniform(1, 12, 1000) * 16000).clip(max=160000).astype(int)
    sampler = data.BucketBatchSampler(lengths, batch_seconds=250, seed=3)
    batches = sampler.global_batches(0)
    seconds = [lengths[b].sum() / 16000 for b in batches]
    assert all(250 <= s < 250 + 10 for s in seconds)
    used = [i for b in batches for i in b]
    assert len(used) == len(set(used)) and len(lengths) - len(used) < 250 * 16000 / lengths.min()
    order = np.argsort(lengths, kind="stable")
    bucket_of = np.empty(len(lengths), int)
    bucket_of[order] = np.arange(len(lengths)) // (len(lengths) // 50)
    assert all(
        np.ptp(bucket_of[b]) <= len(b) // 20 + 1 for b in batches
    )  # neighbouring buckets of 20 only
    assert batches != sorted(
        batches, key=lambda b: bucket_of[b].min()
    )  # the batch order is shuffled
    assert (
        sampler.global_batches(1) != batches
        and data.BucketBatchSampler(lengths, batch_seconds=250, seed=3).global_batches(0) == batches
    )


# =============================================================================
# k-means: kmeans.py

BIG = 10**9  # max_samples that never subsamples


@pytest.fixture
def one_thread():
    # These tensors are tiny: with 2 threads on a busy 2-core machine, OpenMP hand-offs cost ~20 ms per
    # matmul and dominate; one thread runs the whole file several times faster.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def blobs(n=20000, dim=32, centers=50, seed=0):
    from sklearn.datasets import (
        make_blobs,  # imported here: the spawned distributed workers need no sklearn
    )

    x, _ = make_blobs(n, dim, centers=centers, random_state=seed)
    return x.astype(np.float32)


def frames_like(n, dim=320, seed=0, rank=24):
    """Frame-feature-like data (as bench.py's): a low-rank latent with broad modes, noise, a shared offset
    and a few large dimensions; Lloyd is still moving after 15 iterations."""
    g = torch.Generator().manual_seed(seed)
    modes = torch.randn(16, rank, generator=g)
    z = (modes[torch.randint(16, (n,), generator=g)] + torch.randn(n, rank, generator=g)) * 2
    offset = torch.randn(dim, generator=g) * 0.5
    offset[:4] += 20.0
    return (
        torch.randn(n, dim, generator=g)
        .mul_(0.3)
        .addmm_(z, torch.randn(rank, dim, generator=g) / rank**0.5)
        .add_(offset)
    )


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("k", [8, 64])
def test_same_init_matches_sklearn(k):
    from sklearn.cluster import KMeans

    x = blobs()
    init = x[np.random.default_rng(k).choice(len(x), k, replace=False)]
    ours = fit_kmeans(
        torch.from_numpy(x),
        ks=(k,),
        iters=20,
        init=torch.from_numpy(init),
        max_samples=BIG,
        progress=False,
    )[k]
    sk = KMeans(k, init=init, n_init=1, max_iter=20, algorithm="lloyd", tol=0).fit(x)
    assert abs(ours.inertia[-1] / sk.inertia_ - 1) < 1e-3
    # a frame on a boundary (a float32 tie: the two sides' matmuls round differently) may go either way and
    # move its two centroids a little, which moves the next boundary frames: over 20 iterations this grows
    # (K=64 on 50 blobs splits blobs: boundaries run through dense data)
    assert (assign(torch.from_numpy(x), ours.centroids).numpy() == sk.labels_).mean() > 0.995
    assert np.isclose(ours.centroids.numpy(), sk.cluster_centers_, atol=1e-3).all(1).mean() > 0.9
    # one iteration, before any tie: the same labels and centroids
    one = fit_kmeans(
        torch.from_numpy(x),
        ks=(k,),
        iters=1,
        init=torch.from_numpy(init),
        max_samples=BIG,
        progress=False,
    )[k]
    sk1 = KMeans(k, init=init, n_init=1, max_iter=1, algorithm="lloyd", tol=0).fit(x)
    np.testing.assert_allclose(one.centroids.numpy(), sk1.cluster_centers_, atol=1e-4)
    assert (assign(torch.from_numpy(x), one.centroids).numpy() == sk1.labels_).all()


@pytest.mark.usefixtures("one_thread")
def test_stops_when_labels_stop_changing_as_sklearn():
    # Both stop at the pass whose labels equal the previous pass's: sklearn's n_iter_ counts the passes
    # run, our inertia has one entry per pass (the last measures the final centroids).
    from sklearn.cluster import KMeans

    x = blobs(5000, dim=8, centers=10, seed=1)
    for seed in range(3):
        init = x[np.random.default_rng(seed).choice(len(x), 10, replace=False)]
        ours = fit_kmeans(
            torch.from_numpy(x),
            ks=(10,),
            iters=50,
            init=torch.from_numpy(init),
            max_samples=BIG,
            progress=False,
        )[10]
        sk = KMeans(10, init=init, n_init=1, max_iter=50, algorithm="lloyd", tol=0).fit(x)
        assert 2 <= len(ours.inertia) == sk.n_iter_ < 50
        assert ours.inertia[-1] == pytest.approx(sk.inertia_, rel=1e-5)
        torch.testing.assert_close(
            ours.centroids, torch.from_numpy(sk.cluster_centers_), atol=1e-4, rtol=0
        )


@pytest.mark.usefixtures("one_thread")
def test_kmeanspp_as_good_as_sklearn():
    # Each side's own k-means++; compare over a few seeds since one draw can be lucky either way.
    from sklearn.cluster import KMeans

    x = blobs(centers=64)
    ours = sum(
        fit_kmeans(torch.from_numpy(x), ks=(64,), seed=s, max_samples=BIG, progress=False)[
            64
        ].inertia[-1]
        for s in range(3)
    )
    sk = sum(
        KMeans(64, n_init=1, max_iter=20, algorithm="lloyd", tol=0, random_state=s).fit(x).inertia_
        for s in range(3)
    )
    assert ours <= 1.01 * sk


@pytest.mark.usefixtures("one_thread")
def test_multi_k_one_pass_equals_single_k():
    x = torch.from_numpy(blobs(5000))
    for init in ("k-means++", "random"):
        together = fit_kmeans(
            x, ks=(8, 64), iters=10, init=init, seed=3, max_samples=BIG, progress=False
        )
        for k in (8, 64):
            alone = fit_kmeans(
                x, ks=(k,), iters=10, init=init, seed=3, max_samples=BIG, progress=False
            )[k]
            torch.testing.assert_close(together[k].centroids, alone.centroids)
            assert together[k].inertia == pytest.approx(alone.inertia, rel=1e-9)


@pytest.mark.usefixtures("one_thread")
def test_chunk_size_does_not_matter():
    x = torch.from_numpy(blobs(5000))
    small = fit_kmeans(x, ks=(16,), iters=10, chunk_size=100, max_samples=BIG, progress=False)[16]
    huge = fit_kmeans(x, ks=(16,), iters=10, chunk_size=10**7, max_samples=BIG, progress=False)[16]
    torch.testing.assert_close(small.centroids, huge.centroids, atol=1e-4, rtol=1e-5)
    assert small.inertia == pytest.approx(huge.inertia, rel=1e-5)


def test_threads_do_not_matter():
    # On the CPU, Lloyd's passes hand fixed groups of chunks to one thread per torch thread (torch single-threaded
    # in each): the number of threads changes only the float64 summation order, and torch's setting is restored,
    # after an error too.
    x = torch.from_numpy(blobs(5000))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fit_kmeans(x, ks=(16, 40), iters=10, chunk_size=500, max_samples=BIG, progress=False)
        labels_one = assign(x, one[40].centroids, chunk_size=300)
        torch.set_num_threads(2)
        two = fit_kmeans(x, ks=(16, 40), iters=10, chunk_size=500, max_samples=BIG, progress=False)
        labels_two = assign(x, one[40].centroids, chunk_size=300)
        assert torch.get_num_threads() == 2
        bad = x.clone()
        bad[4321, 0] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            fit_kmeans(bad, ks=(16,), progress=False)
        with pytest.raises(ValueError, match="NaN"):
            assign(bad, one[16].centroids)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)
    for k in (16, 40):
        torch.testing.assert_close(one[k].centroids, two[k].centroids, atol=1e-5, rtol=0)
        assert one[k].inertia == pytest.approx(two[k].inertia, rel=1e-9) and torch.equal(
            one[k].counts, two[k].counts
        )
    assert torch.equal(labels_one, labels_two)


@pytest.mark.usefixtures("one_thread")
def test_empty_cluster_is_reseeded():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(300, 4, generator=g) * 0.1 + m for m in (0.0, 5.0, 10.0)])
    init = torch.tensor(
        [[0.0] * 4, [5.0] * 4, [10.0] * 4, [1000.0] * 4]
    )  # the last one attracts nobody
    r = fit_kmeans(x, ks=(4,), iters=5, init=init, max_samples=BIG, progress=False)[4]
    assert r.counts.min() > 0 and r.counts.sum() == len(x)
    # duplicated frames: random init picks identical points, i.e. identical centroids, one of them empty
    dup = torch.cat(
        [torch.arange(5.0)[:, None].repeat(200, 3), torch.randn(50, 3, generator=g) * 10]
    )
    for seed in range(3):
        r = fit_kmeans(
            dup, ks=(12,), iters=20, init="random", seed=seed, max_samples=BIG, progress=False
        )[12]
        assert r.counts.min() > 0


@pytest.mark.usefixtures("one_thread")
def test_inertia_never_increases_and_is_the_measured_one():
    x = frames_like(5000, dim=32)
    for init in ("k-means++", "random"):
        r = fit_kmeans(x, ks=(32,), iters=15, init=init, max_samples=BIG, progress=False)[32]
        h = r.inertia
        assert len(h) == 16  # these frames keep moving: no early stop
        assert all(b <= a * (1 + 1e-6) for a, b in zip(h, h[1:]))
        # the inertia from the cluster sums is the one measured from the distances
        d = torch.cdist(x.double(), r.centroids.double()).min(1).values
        assert h[-1] == pytest.approx(float((d * d).sum()), rel=1e-6)


@pytest.mark.usefixtures("one_thread")
def test_tol_stops_early_and_float16_input():
    x = torch.from_numpy(frames_like(5000, dim=32).numpy()).half()
    r = fit_kmeans(x, ks=(8,), iters=50, tol=1e-3, max_samples=BIG, progress=False)[8]
    h = r.inertia
    assert 2 <= len(h) < 51 and r.centroids.dtype == torch.float32
    assert h[-2] - h[-1] < 1e-3 * h[-2] and all(a - b >= 1e-3 * a for a, b in zip(h[:-2], h[1:-1]))


@pytest.mark.usefixtures("one_thread")
def test_known_answer_four_tight_clusters():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(400, 2, generator=g) * 0.01
    noise -= (
        noise.view(4, 100, 2).mean(1).repeat_interleave(100, 0)
    )  # each cluster's mean is its centre exactly
    x = centres.repeat_interleave(100, 0) + noise
    for init in ("k-means++", "random"):
        r = fit_kmeans(x, ks=(4,), iters=10, init=init, seed=0, max_samples=BIG, progress=False)[4]
        d = torch.cdist(
            centres.double(), r.centroids.double()
        )  # each centre found, by a centroid of its own
        assert d.min(1).values.max() < 1e-5 and sorted(d.argmin(1).tolist()) == [0, 1, 2, 3]
        assert r.counts.tolist() == [100] * 4


@pytest.mark.usefixtures("one_thread")
def test_subsampling_and_bad_input():
    x = torch.randn(100, 3)
    r = fit_kmeans(x, ks=(4,), max_samples=50, progress=False)[4]
    assert r.counts.sum() == 50
    with pytest.raises(ValueError, match=r"K=101.*N=100"):
        fit_kmeans(x, ks=(4, 101), progress=False)
    with pytest.raises(ValueError, match=r"K=60.*N=50 frames \(after max_samples\)"):
        fit_kmeans(x, ks=(60,), max_samples=50, progress=False)
    with pytest.raises(ValueError, match="2-D"):
        fit_kmeans(torch.randn(2, 10, 3), ks=(4,), progress=False)
    with pytest.raises(ValueError, match="init"):
        fit_kmeans(x, ks=(4,), init="kmeans++", progress=False)
    with pytest.raises(ValueError, match="shape"):
        fit_kmeans(x, ks=(4,), init=torch.randn(5, 3), progress=False)
    x[7, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fit_kmeans(x, ks=(4,), progress=False)
    with pytest.raises(ValueError, match="NaN"):
        assign(x, r.centroids)


def test_no_tf32_restores_the_settings():
    from kmeans import no_tf32

    old = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
        with no_tf32():
            assert (
                torch.get_float32_matmul_precision() == "highest"
                and not torch.backends.cudnn.allow_tf32
            )
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(old[0])
        torch.backends.cudnn.allow_tf32 = old[1]


def _label_file(tmp_path):
    counts = [3, 0, 5]
    labels = {4: torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), 40000: torch.arange(8) * 4000}
    path = str(tmp_path / "labels.pt")
    save_labels(path, ["a", "b", "c"], counts, labels, {"layer": 12, "inertia": {4: [1.0, 0.5]}})
    return path, labels


@pytest.mark.usefixtures("one_thread")
def test_label_file_round_trip(tmp_path):
    path, labels = _label_file(tmp_path)
    raw = torch.load(path, weights_only=True)
    assert raw["labels"][4].dtype == torch.int16 and raw["labels"][40000].dtype == torch.int32
    lf = load_labels(path)
    assert lf["meta"]["layer"] == 12 and lf["index"] == {"a": (0, 3), "b": (3, 0), "c": (3, 5)}
    got = labels_for(lf, "c", 5)
    assert got[4].dtype == torch.long and got[4].tolist() == labels[4][3:].tolist()
    assert got[40000].tolist() == labels[40000][3:].tolist()
    assert os.listdir(tmp_path) == ["labels.pt"]  # no temporary file left behind


@pytest.mark.usefixtures("one_thread")
def test_label_file_errors(tmp_path):
    path, _ = _label_file(tmp_path)
    lf = load_labels(path)
    with pytest.raises(
        ValueError, match=r"utterance c has 5 pseudo-labels but 6 frames.*do not match the audio"
    ):
        labels_for(lf, "c", 6)
    with pytest.raises(ValueError, match="no pseudo-labels for utterance zz"):
        labels_for(lf, "zz", 1)
    raw = torch.load(path, weights_only=True)
    for corrupt, problem in [
        (lambda r: r["labels"].__setitem__(4, r["labels"][4][:-1]), "7 entries"),
        (lambda r: r["labels"][4].__setitem__(0, 4), r"outside \[0, 4\)"),
        (lambda r: r.__setitem__("uids", ["a", "b"]), "2 uids but 3 frame counts"),
    ]:
        bad = {**raw, "labels": dict(raw["labels"]), "uids": list(raw["uids"])}
        bad["labels"][4] = bad["labels"][4].clone()
        corrupt(bad)
        bad_path = str(tmp_path / "bad.pt")
        torch.save(bad, bad_path)
        with pytest.raises(ValueError, match="bad.pt.*" + problem):
            load_labels(bad_path)
    with open(bad_path, "wb") as f:
        f.write(b"not a torch file")
    with pytest.raises(ValueError, match="bad.pt"):
        load_labels(bad_path)
    with pytest.raises(ValueError, match="outside"):  # save refuses what load would refuse
        save_labels(str(tmp_path / "x.pt"), ["a"], [2], {4: torch.tensor([0, 9])}, {})


# -- distributed: 2 gloo processes, each with half the frames, must agree with one process --------


def _dist_worker(rank, init_file, x, init, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        half = len(x) // 2
        r = fit_kmeans(
            x[rank * half : (rank + 1) * half],
            ks=(8, 16),
            iters=8,
            init=init,
            max_samples=BIG,
            device="cpu",
            progress=False,
        )
        torch.save({k: (v.centroids, v.inertia, v.counts) for k, v in r.items()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("one_thread")
def test_distributed_matches_single_process(tmp_path):
    x = torch.from_numpy(blobs(4000, dim=8, centers=10))
    g = torch.Generator().manual_seed(0)
    init = {k: x[torch.randperm(len(x), generator=g)[:k]].clone() for k in (8, 16)}
    init[16][0] = 1e4  # an empty cluster: exercises the cross-rank re-seeding
    single = fit_kmeans(
        x, ks=(8, 16), iters=8, init=init, max_samples=BIG, device="cpu", progress=False
    )
    out = str(tmp_path / "res")
    mp.spawn(_dist_worker, args=(str(tmp_path / "pg"), x, init, out), nprocs=2, join=True)
    for rank in (0, 1):
        res = torch.load(f"{out}.{rank}", weights_only=True)
        for k in (8, 16):
            centroids, inertia, counts = res[k]
            torch.testing.assert_close(centroids, single[k].centroids, atol=1e-5, rtol=0)
            assert inertia == pytest.approx(single[k].inertia, rel=1e-5)
            assert counts.tolist() == single[k].counts.tolist()


# -- P-TAPT's k-means stage (pretrain.pseudo_label_stage): 2 gloo processes = 1 process -------------


def _tiny_teacher():
    from train import tiny_random_config

    torch.manual_seed(0)
    return M.Wav2Vec2(tiny_random_config()).eval()


def _stage(utterances, out, max_samples=None, init="k-means++"):
    teacher = _tiny_teacher()
    return P.pseudo_label_stage(
        lambda wav, lengths: teacher(wav, lengths, layer=1),
        utterances,
        (4, 16),
        6,
        init,
        3,
        "cpu",
        str(out),
        {"fold": 1},
        progress=False,
        max_samples=max_samples,
        workers=0,
        chunk_size=500,
    )


def _stage_worker(rank, init_file, utterances, tmp, x, shard):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        got = {
            "full": _stage(utterances, os.path.join(tmp, "two.pt")),
            "sampled": _stage(
                utterances, os.path.join(tmp, "two-sampled.pt"), max_samples=700, init="random"
            ),
        }
        part = x[:shard] if rank == 0 else x[shard:]  # unequal shards
        for init in ("k-means++", "random"):
            r = fit_kmeans(
                part,
                ks=(8, 16),
                iters=6,
                init=init,
                seed=5,
                max_samples=3000,
                device="cpu",
                progress=False,
            )
            got[init] = {k: (v.centroids, v.inertia, v.counts) for k, v in r.items()}
        torch.save(got, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("one_thread")
def test_pseudo_label_stage_two_processes_equal_one(tmp_path):
    root = tmp_path / "IEMOCAP_full_release"
    S.synthesize_iemocap(
        str(root), utterances_per_session=4, seed=2, min_seconds=0.6, max_seconds=2.0
    )
    train = data.load_corpus(str(root), 1)[0]["train"]
    x = torch.from_numpy(blobs(5000, dim=8, centers=12))

    one = _stage(train, tmp_path / "one.pt")
    sampled = _stage(train, tmp_path / "one-sampled.pt", max_samples=700, init="random")
    single = {
        init: fit_kmeans(
            x,
            ks=(8, 16),
            iters=6,
            init=init,
            seed=5,
            max_samples=3000,
            device="cpu",
            progress=False,
        )
        for init in ("k-means++", "random")
    }
    mp.spawn(
        _stage_worker,
        args=(str(tmp_path / "pg"), train, str(tmp_path), x, 1234),
        nprocs=2,
        join=True,
    )

    a = load_labels(tmp_path / "one.pt")
    n = int(a["frame_counts"].sum())
    assert a["uids"] == [u.uid for u in train] and n > 700 and set(one) == {4, 16}
    for k in one:
        assert len(one[k]) == n and torch.equal(a["labels"][k].long(), one[k])
        assert len(torch.unique(one[k])) == k
    for name in ("two.pt", "two-sampled.pt", "one-sampled.pt"):
        b = load_labels(tmp_path / name)
        assert b["uids"] == a["uids"] and torch.equal(b["frame_counts"], a["frame_counts"])
        assert (
            b["meta"]["fold"] == 1
            and b["meta"]["num_frames"] == n
            and set(b["meta"]["nmi"]) == {4, 16}
        )
    two, two_sampled = load_labels(tmp_path / "two.pt"), load_labels(tmp_path / "two-sampled.pt")
    one_sampled = load_labels(tmp_path / "one-sampled.pt")
    assert one_sampled["meta"]["num_fit_frames"] == two_sampled["meta"]["num_fit_frames"] == 700
    for k in (4, 16):
        assert torch.equal(two["labels"][k], a["labels"][k])  # 2 ranks, k-means++ = 1 process
        assert two["meta"]["inertia"][k] == pytest.approx(a["meta"]["inertia"][k], rel=1e-5)
        # max_samples below the number of frames: the same 700 frames are drawn whatever the world size
        assert torch.equal(two_sampled["labels"][k], one_sampled["labels"][k])
        assert torch.equal(one_sampled["labels"][k].long(), sampled[k])
    assert sorted(set(os.listdir(tmp_path)) - {"pg"}) == sorted(
        [
            "IEMOCAP_full_release",
            "one.pt",
            "one-sampled.pt",
            "two.pt",
            "two-sampled.pt",
            "rank0.pt",
            "rank1.pt",
        ]
    )
    for rank in (0, 1):  # rank 1 wrote no label file (above); every rank returns the full labels
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for k in (4, 16):
            assert torch.equal(got["full"][k], one[k]) and torch.equal(
                got["sampled"][k], sampled[k]
            )
        # fit_kmeans under torch.distributed: k-means++ and random init, subsampling, unequal shards
        for init in ("k-means++", "random"):
            for k in (8, 16):
                centroids, inertia, counts = got[init][k]
                torch.testing.assert_close(centroids, single[init][k].centroids, atol=1e-5, rtol=0)
                assert inertia == pytest.approx(single[init][k].inertia, rel=1e-5)
                assert (
                    counts.tolist() == single[init][k].counts.tolist() and int(counts.sum()) == 3000
                )


# -- feature extraction, pretrain.py --mode kmeans ---------------------------------------------------


class _FakeTeacher(torch.nn.Module):
    # One frame per 320 samples; every frame of an utterance carries its first sample, so the test can
    # tell whether frames come back in utterance order after length bucketing.
    def forward(self, wav, wav_lengths):
        lengths = wav_lengths // 320
        hidden = wav[:, :1, None].expand(-1, int(lengths.max()), 3).clone()
        hidden[torch.arange(hidden.shape[1]) >= lengths[:, None]] = (
            99.0  # padding must never come out
        )
        return hidden, lengths


@pytest.mark.usefixtures("one_thread")
def test_extract_features_order_and_counts(tmp_path):
    from kmeans import extract_features

    utterances = []
    for i, seconds in enumerate([0.5, 2.0, 0.1, 1.3, 0.7]):
        path = str(tmp_path / f"u{i}.wav")
        n = int(seconds * 16000)
        sf.write(path, np.full(n, i / 8, dtype=np.float32), 16000, subtype="FLOAT")
        utterances.append(data.Utterance(f"u{i}", path, "neu", n))
    feats, counts = extract_features(
        _FakeTeacher(), utterances, "cpu", batch_seconds=2.5, progress=False, workers=0
    )
    assert counts.tolist() == [u.num_samples // 320 for u in utterances]
    assert feats.dtype == torch.float16 and feats.shape == (sum(counts.tolist()), 3)
    expected = torch.cat([torch.full((c, 3), i / 8) for i, c in enumerate(counts.tolist())])
    torch.testing.assert_close(feats.float(), expected)
    empty, empty_counts = extract_features(_FakeTeacher(), [], "cpu", progress=False, workers=0)
    assert empty.shape[0] == 0 and len(empty_counts) == 0


def test_kmeans_mode_labels_the_untouched_checkpoint(corpus, tmp_path, capsys):
    """pretrain.py --mode kmeans: P-TAPT's k-means stage alone, on --checkpoint's frames. A --layer the model
    lacks is one line, and the corrected command then runs in the same folder; a finished fold is skipped."""
    argv = [
        "--mode",
        "kmeans",
        "--data",
        corpus,
        "--fold",
        1,
        "--out",
        tmp_path,
        "--checkpoint",
        "random-tiny",
        "--ks",
        4,
        "--kmeans-iters",
        3,
        "--no-progress",
        "--workers",
        0,
    ]
    with pytest.raises(SystemExit) as e:
        P.main(list(map(str, argv + ["--layer", 9])))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--layer 9" in err[0], err
    P.main(list(map(str, argv)))
    labels = load_labels(tmp_path / "kmeans" / "fold1" / "labels.pt")
    assert labels["uids"] == [u.uid for u in data.load_corpus(corpus, 1)[0]["train"]] and list(
        labels["labels"]
    ) == [4]
    assert labels["meta"]["layer"] == 2 and 0 <= labels["meta"]["nmi"][4] <= 1
    assert "NMI between pseudo-labels and emotion" in capsys.readouterr().out
    P.main(list(map(str, argv)))
    assert "labels.pt exists" in capsys.readouterr().out


# =============================================================================
# metrics: evaluate.py and the results table


def test_emotion_nmi_equals_sklearn():
    from sklearn.metrics import normalized_mutual_info_score

    g = torch.Generator().manual_seed(0)
    counts, emotions = (
        torch.randint(1, 30, (40,), generator=g),
        torch.randint(0, 4, (40,), generator=g),
    )
    frame_emotion = torch.repeat_interleave(emotions, counts)
    labels = torch.randint(0, 16, (int(counts.sum()),), generator=g)
    labels = torch.where(
        torch.rand(len(labels), generator=g) < 0.5, frame_emotion * 4, labels
    )  # clusters carry some
    nmi = E.emotion_nmi(labels, counts, emotions.tolist())
    assert 0.1 < nmi < 0.9 and nmi == pytest.approx(
        normalized_mutual_info_score(frame_emotion, labels), abs=1e-12
    )


def test_metrics_hand_computed():
    # class 3 never occurs in the test set; class 2 is never predicted
    y_true, y_pred = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 0, 0]
    m = E.compute_metrics(y_true, y_pred, ["a", "b", "c", "d"])
    assert m["confusion"] == [[1, 1, 0, 0], [0, 2, 0, 0], [2, 0, 0, 0], [0, 0, 0, 0]]
    assert m["ua"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)  # recall over the 3 classes present
    assert m["wa"] == pytest.approx(3 / 6)
    # F1: a = 2(1/3)(1/2)/(1/3+1/2) = 0.4, b = 2(2/3)(1)/(2/3+1) = 0.8, c = 0 (never predicted)
    assert m["macro_f1"] == pytest.approx((0.4 + 0.8 + 0.0) / 3)
    assert m["recall"] == {"a": 0.5, "b": 1.0, "c": 0.0}
    perfect = E.compute_metrics([0, 1, 2, 3], [0, 1, 2, 3], ["a", "b", "c", "d"])
    assert perfect["ua"] == perfect["wa"] == perfect["macro_f1"] == 1.0


def test_metrics_agree_with_sklearn():
    from sklearn.metrics import balanced_accuracy_score, f1_score

    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 4, 300), rng.integers(0, 4, 300)
    m = E.compute_metrics(y_true, y_pred, list("abcd"))
    assert m["ua"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))


def put_run(run_dir, ua, wa, confusion, config):
    """A finished run as finetune.py leaves it: config.json, then metrics.json."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "metrics.json").write_text(
        json.dumps(
            {"ua": ua, "wa": wa, "macro_f1": ua, "classes": ["a", "b"], "confusion": confusion}
        )
    )


def test_results_table(tmp_path):
    def put(fold, run, ua, wa):
        config = {"lr": 1e-4, "recipe": "release", "fold": fold, "run": run, "seed": 0}
        config.update(seed_of_run=run, workers=run, device=["cpu", "cuda"][run])  # not compared
        config["data"] = str(tmp_path) + "/" * run  # one folder, written two ways
        put_run(
            tmp_path / "vft" / f"fold{fold}" / f"run{run}", ua, wa, [[run + 1, 0], [0, 1]], config
        )

    put(1, 0, 0.70, 0.60)
    put(1, 1, 0.80, 0.70)
    put(2, 0, 0.50, 0.40)
    result = E.aggregate(str(tmp_path / "vft"))
    assert result["folds"]["1"]["ua"] == pytest.approx(0.75)
    assert result["folds"]["1"]["ua_std"] == pytest.approx(np.std([0.7, 0.8], ddof=0))
    assert result["average"]["ua"] == pytest.approx((0.75 + 0.5) / 2)
    assert result["confusion"] == [[4, 0], [0, 3]]
    out = script("evaluate.py", tmp_path / "vft", timeout=120)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    # one run has no spread: its value alone, not "± 0.0"
    assert "| vft UA | 75.0 ± 5.0 | 50.0 (1 run) | 62.5 |" in out.stdout and "ddof 0" in out.stdout
    assert "± 0.0" not in out.stdout and "runs: Ses1: 2, Ses2: 1" in out.stdout
    results = json.loads((tmp_path / "vft" / "results.json").read_text())
    assert results["average"]["wa"] == pytest.approx(0.525) and results["runs"] == 3
    assert [row["runs"] for row in results["folds"].values()] == [2, 1]
    assert results["folds"]["2"]["ua_std"] == 0.0 and results["skipped"] == []
    empty = script("evaluate.py", tmp_path, timeout=120)
    assert empty.returncode == 2 and empty.stderr.strip().splitlines() == [
        f"error: {tmp_path}: no fold<k>/run<r>/metrics.json found (has finetune.py finished a run "
        "here?); skipped: vft (not fold<k>)"
    ]


def test_results_table_reads_only_fold_and_run_folders(tmp_path):
    """The fold was searched for anywhere in the path: everything under manifold3/ was one column
    'Ses3', a fold1.bak/ copy counted as more Ses1 runs, fold_old/ was a traceback. Now only
    <root>/fold<k>/run<r>/metrics.json counts, and one warning line lists the rest."""
    root = tmp_path / "manifold3"
    config = {"lr": 1e-4}
    put_run(root / "fold1" / "run0", 0.6, 0.6, [[1, 0], [0, 1]], {**config, "fold": 1})
    put_run(root / "fold2" / "run0", 0.8, 0.8, [[1, 0], [0, 1]], {**config, "fold": 2})
    shutil.copytree(root / "fold1", root / "fold1.bak")
    (root / "fold1.bak" / "run0" / "metrics.json").write_text(json.dumps({"ua": 0.1}))
    (root / "fold_old" / "run0").mkdir(parents=True)
    (root / "fold_old" / "run0" / "metrics.json").write_text("{}")
    (root / "fold2" / "run1").mkdir()  # unfinished: config.json and a resume point, no metrics
    (root / "fold2" / "run1" / "config.json").write_text(json.dumps({**config, "lr": 1}))
    (root / "fold2" / "notes").mkdir()
    out = script("evaluate.py", root, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[:3] == [
        "| method | Ses1 | Ses2 | Average |",
        "|---|---|---|---|",
        "| manifold3 UA | 60.0 (1 run) | 80.0 (1 run) | 70.0 |",
    ]
    assert out.stderr.splitlines() == [
        f"warning: {root}: skipped: fold1.bak (not fold<k>), fold2/notes (not run<r>), "
        "fold2/run1 (unfinished: no metrics.json), fold_old (not fold<k>)"
    ]
    results = json.loads((root / "results.json").read_text())
    assert [row["runs"] for row in results["folds"].values()] == [1, 1]
    assert len(results["skipped"]) == 4 and results["confusion"] == [[2, 0], [0, 2]]
    os.remove(root / "fold1" / "run0" / "config.json")  # a run of before config.json: read, flagged
    out = script("evaluate.py", root, timeout=120)
    assert out.returncode == 0 and out.stderr.strip().endswith(
        "; settings not checked (no config.json): fold1/run0"
    ), out.stderr


def test_results_table_refuses_runs_of_different_settings(tmp_path):
    """Fold 1 run with the release recipe, fold 2 with --recipe clean, both under runs/vft: one
    error line naming the setting and two runs, not one row that averages two methods."""
    corpus = tmp_path / "IEMOCAP_full_release"
    S.synthesize_iemocap(str(corpus), utterances_per_session=4, seed=0, max_seconds=1.0)
    out = tmp_path / "runs"
    tiny = ["--data", corpus, "--out", out, "--epochs", 1, "--batch-size", 4, *TINY_RUN[:2]]
    tiny += ["--workers", 0, "--cache", "--no-progress"]
    r = script("finetune.py", *tiny, "--fold", 1, "--runs", 2, "--name", "vft")
    assert r.returncode == 0, r.stderr[-3000:]
    r = script("finetune.py", *tiny, "--fold", 2, "--recipe", "clean", "--name", "vft")
    assert r.returncode == 0, r.stderr[-3000:]
    r = script("evaluate.py", out / "vft", timeout=120)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error: "), r.stderr
    assert "fold1/run0 and fold2/run0 were computed with different settings (" in err[0]
    assert "recipe 'release' vs 'clean'" in err[0] and "group_norm 'padded' vs 'valid'" in err[0]
    assert not (out / "vft" / "results.json").exists()
    os.rename(out / "vft" / "fold2", out / "vft" / "fold2.clean")  # what the error suggests
    r = script("evaluate.py", out / "vft", timeout=120)
    assert r.returncode == 0, r.stderr  # runs 0 and 1: seeds 0 and 1, the same settings
    assert r.stderr.splitlines() == [f"warning: {out / 'vft'}: skipped: fold2.clean (not fold<k>)"]
    assert "| method | Ses1 | Average |" in r.stdout and re.search(
        r"\| vft UA \| [\d.]+ ± ", r.stdout
    )
    # --init runs/<method>/fold{fold}/pretrained.pt differs by fold as it should, not by method
    root = tmp_path / "ft-ptapt"
    for fold in (1, 2):
        shutil.copytree(out / "vft" / "fold1" / "run0", root / f"fold{fold}" / "run0")
    config = json.loads((root / "fold1" / "run0" / "config.json").read_text())

    def init(fold, method, folder=None):
        path = root / f"fold{folder or fold}" / "run0" / "config.json"
        init = f"runs/{method}/fold{fold}/pretrained.pt"
        path.write_text(json.dumps({**config, "fold": fold, "init": init}))

    init(1, "ptapt")
    init(2, "ptapt")
    assert list(E.aggregate(str(root))["folds"]) == ["1", "2"]
    init(2, "tapt")
    with pytest.raises(data.DataError, match=r"init '.*/ptapt/fold\{fold\}/.*' vs '.*/tapt/fold"):
        E.aggregate(str(root))
    init(1, "ptapt", folder=2)  # fold 1's run copied into fold2/
    with pytest.raises(data.DataError, match=r"fold2/run0/config.json: fold 1, but the run is in"):
        E.aggregate(str(root))


def test_evaluate_device_is_one_it_can_run_on(tmp_path, capsys):
    """--device mps and --device meta were tracebacks: one line naming the flag and the choices."""
    clf = M.EmotionClassifier(M.Wav2Vec2(T.tiny_random_config()), ["calm", "loud"])
    C.save_classifier(clf, tmp_path / "model.pt")
    wav = write_wav(str(tmp_path / "a.wav"), 16000)
    r = script(
        "evaluate.py", "--checkpoint", tmp_path / "model.pt", "--predict", wav, "--device", "mps"
    )
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "error: argument --device: 'mps': expected auto, cpu, cuda or cuda:N (see --help)"
    ]
    for device in ("meta", "gpu", "cuda:", "cuda:x", "CUDA"):
        with pytest.raises(SystemExit) as e:
            E.main(
                ["--checkpoint", str(tmp_path / "model.pt"), "--predict", wav, "--device", device]
            )
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and f"--device: {device!r}" in err[0], err
    E.main(["--checkpoint", str(tmp_path / "model.pt"), "--predict", wav, "--device", "cpu"])
    assert re.fullmatch(
        rf"{re.escape(wav)}\t(calm|loud)\tcalm=[\d.]+ loud=[\d.]+\n", capsys.readouterr().out
    )


# =============================================================================
# training: finetune.py and pretrain.py on a small synthetic corpus, as a user runs them

TINY_RUN = [
    "--checkpoint",
    "random-tiny",
    "--batch-size",
    "8",
    "--lr",
    "5e-4",
    "--channel-mask-span",
    "8",
    "--workers",
    "0",
    "--cache",
    "--no-progress",
]


def script(name, *args, timeout=600, env=None):
    return subprocess.run(
        [sys.executable, os.path.join(HERE, name), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


ONE_THREAD = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
}  # CPU results bit for bit: several threads round scatter-adds differently


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("corpus") / "IEMOCAP_full_release")
    S.synthesize_iemocap(root, utterances_per_session=24, seed=1, min_seconds=1.0, max_seconds=3.0)
    return root


# 12 epochs at lr 1e-3: UA 0.71-0.83 over seeds 0-7, as far above 0.6 as 30 epochs at 5e-4 (0.67-0.83, seeds 0-3)
VFT_EPOCHS = 12
VFT_RUN = ["--fold", 1, *TINY_RUN, "--lr", "1e-3"]  # the last --lr wins


@pytest.fixture(scope="module")
def vft_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    r = script("finetune.py", "--data", corpus, "--out", out, "--epochs", VFT_EPOCHS, *VFT_RUN)
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "vft" / "fold1" / "run0", r


def test_vft_learns_the_held_out_session(vft_run):
    """A tiny random wav2vec 2.0 fine-tuned on sessions 2-5 recognises session 1's emotions."""
    run_dir, r = vft_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n"] == 24 and metrics["classes"] == ["ang", "hap", "neu", "sad"]
    assert metrics["ua"] >= 0.6, metrics  # chance is 0.25
    assert f"UA {metrics['ua']:.4f}" in r.stdout
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert len(log) == VFT_EPOCHS and log[-1]["loss"] < log[0]["loss"]
    assert not (run_dir / "state.pt").exists()
    with open(run_dir / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24 and all(r["uid"].startswith("Ses01") for r in rows)
    hits = sum(r["label"] == r["prediction"] for r in rows)
    assert hits / 24 == pytest.approx(metrics["wa"])


def test_finetuned_model_retests_and_predicts(vft_run, corpus):
    run_dir, _ = vft_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    r = script("evaluate.py", "--checkpoint", run_dir / "model.pt", "--data", corpus, "--fold", 1)
    assert r.returncode == 0, r.stderr
    again = json.loads(r.stdout.strip().splitlines()[-1])
    assert again["ua"] == pytest.approx(metrics["ua"]) and again["wa"] == pytest.approx(
        metrics["wa"]
    )
    wavs = sorted(
        glob.glob(os.path.join(corpus, "Session1", "sentences", "wav", "*", "Ses01*.wav"))
    )[:2]
    r = script("evaluate.py", "--checkpoint", run_dir / "model.pt", "--predict", *wavs)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].split("\t")[1] in ("ang", "hap", "neu", "sad")
    probs = [float(x.split("=")[1]) for x in lines[0].split("\t")[2].split()]
    assert sum(probs) == pytest.approx(1.0, abs=1e-3)


def test_finished_run_is_not_overwritten(vft_run, corpus):
    run_dir, _ = vft_run
    before = (run_dir / "metrics.json").stat().st_mtime_ns
    out = run_dir.parent.parent.parent
    r = script("finetune.py", "--data", corpus, "--out", out, "--epochs", VFT_EPOCHS, *VFT_RUN)
    assert r.returncode == 0 and "finished already" in r.stdout
    assert (run_dir / "metrics.json").stat().st_mtime_ns == before
    r = script("finetune.py", "--data", corpus, "--out", out, "--epochs", VFT_EPOCHS + 1, *VFT_RUN)
    assert r.returncode == 2 and "other settings" in r.stderr and "epochs" in r.stderr


@pytest.mark.parametrize("recipe", ["release", "clean"])
def test_interrupted_finetuning_resumes_to_the_same_result(corpus, tmp_path, recipe):
    """SIGKILL at a random moment after the first epoch's checkpoint; the rerun ends where an
    uninterrupted run does."""
    args = [
        "--fold",
        2,
        "--data",
        corpus,
        "--epochs",
        3,
        "--train-fraction",
        0.25,
        "--recipe",
        recipe,
        "--name",  # one folder name for both recipes
        "vft",
        *TINY_RUN,
    ]
    r = script("finetune.py", *args, "--out", tmp_path / "straight", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-2000:]
    cmd = [
        sys.executable,
        os.path.join(HERE, "finetune.py"),
        *map(str, args),
        "--out",
        str(tmp_path / "killed"),
    ]
    run = tmp_path / "killed" / "vft" / "fold2" / "run0"
    r = run_killed_in_stages(
        cmd, [(run / "state.pt", run / "metrics.json")], np.random.default_rng()
    )
    assert "resuming" in r.stdout
    a = json.loads((tmp_path / "straight" / "vft" / "fold2" / "run0" / "metrics.json").read_text())
    b = json.loads((run / "metrics.json").read_text())
    assert a["confusion"] == b["confusion"] and a["ua"] == b["ua"]
    assert_same_weights(
        tmp_path / "straight" / "vft" / "fold2" / "run0" / "model.pt", run / "model.pt", atol=0
    )
    assert (
        read_log(tmp_path / "straight" / "vft" / "fold2" / "run0" / "log.jsonl")[-1]["loss"]
        == read_log(run / "log.jsonl")[-1]["loss"]
    )


def test_finetune_bad_input(corpus, tmp_path):
    r = script(
        "finetune.py", "--fold", 6, "--data", corpus, "--out", tmp_path, *TINY_RUN
    )  # 0 fails the same check
    assert r.returncode == 2 and "fold" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "notckpt.pt").write_text("not a checkpoint")
    r = script(
        "finetune.py",
        "--fold",
        1,
        "--data",
        corpus,
        "--out",
        tmp_path,
        "--init",
        tmp_path / "notckpt.pt",
        *TINY_RUN[2:],
    )
    assert r.returncode == 2 and "notckpt.pt" in r.stderr and "wav2vec 2.0" in r.stderr
    r = script(
        "finetune.py", "--fold", 1, "--data", tmp_path / "nowhere", "--out", tmp_path, *TINY_RUN
    )
    assert r.returncode == 2 and "nowhere" in r.stderr and "Traceback" not in r.stderr
    # several processes without torchrun's LOCAL_RANK would all take GPU 0
    r = script(
        "finetune.py",
        "--fold",
        1,
        "--data",
        corpus,
        "--out",
        tmp_path,
        *TINY_RUN,
        "--device",
        "cuda",
        env={**os.environ, "WORLD_SIZE": "2", "RANK": "0"},
    )
    assert (
        r.returncode == 2
        and "LOCAL_RANK" in r.stderr
        and "torchrun" in r.stderr
        and "Traceback" not in r.stderr
    )


def test_quickstart_fills_in_its_preset(corpus, tmp_path):
    """--quickstart fills in its preset where no flag was given; flags given win; the recipe is recorded."""
    r = script(
        "finetune.py",
        "--quickstart",
        "--data",
        corpus,
        "--out",
        tmp_path,
        "--epochs",
        1,
        "--train-fraction",
        0.25,
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    config = json.loads((tmp_path / "quickstart" / "fold1" / "run0" / "config.json").read_text())
    assert (
        config["checkpoint"] == "random-tiny"
        and config["batch_size"] == 8
        and config["epochs"] == 1
    )
    assert (
        config["recipe"] == "release"
        and config["group_norm"] == "padded"
        and config["bucket"] is False
    )
    assert (
        json.loads((tmp_path / "quickstart" / "fold1" / "run0" / "metrics.json").read_text())["n"]
        == 24
    )


def test_class_weights_and_stratified_fraction():
    import finetune

    w = T.class_weights([0, 0, 0, 1], 2)  # N / n_c = 4/3, 4 -> normalised 0.25, 0.75
    torch.testing.assert_close(w, torch.tensor([0.25, 0.75]))
    utts = [data.Utterance(f"u{i}", f"u{i}.wav", "ab"[i % 2], 16000) for i in range(40)]
    half = finetune.stratified_fraction(utts, 0.25, seed=0)
    assert sorted(u.label for u in half) == ["a"] * 5 + ["b"] * 5
    assert finetune.stratified_fraction(utts, 0.25, seed=0) == half


def test_tri_stage_schedule():
    lr = [T.tri_stage_lr(s, total=100, warmup=10, flat=5) for s in range(101)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == 1.0 and lr[14] == 1.0
    assert lr[15] == pytest.approx(85 / 85) and lr[57] == pytest.approx(43 / 85) and lr[100] == 0.0
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))


# P-TAPT and TAPT on fold 2 as the tests run them: stages long enough to be killed inside (a resume point every
# 2 updates), on one thread so that a killed and resumed run can be compared bit for bit
PRETRAIN_RUN = [
    "--fold",
    2,
    "--checkpoint",
    "random-tiny",
    "--batch-size",
    8,
    "--warmup",
    2,
    "--lr",
    "5e-4",
    "--workers",
    0,
    "--cache",
    "--no-progress",
    "--save-every",
    2,
    "--device",
    "cpu",
]
PTAPT_RUN = [  # --name: one folder name for both recipes
    "--mode",
    "ptapt",
    "--name",
    "ptapt",
    "--updates",
    8,
    "--teacher-updates",
    8,
    "--ks",
    4,
    16,
    *PRETRAIN_RUN,
]
TAPT_RUN = ["--mode", "tapt", "--name", "tapt", "--updates", 6, *PRETRAIN_RUN]


@pytest.fixture(scope="module")
def straight_runs(corpus, tmp_path_factory):
    """recipe -> (a folder with finished PTAPT_RUN and TAPT_RUN, the P-TAPT run's process), computed once:
    tests read them, or change a copy."""
    runs = {}

    def get(recipe):
        if recipe not in runs:
            out = tmp_path_factory.mktemp(f"straight-{recipe}")
            ptapt, tapt = (
                script(
                    "pretrain.py",
                    *args,
                    "--data",
                    corpus,
                    "--out",
                    out,
                    "--recipe",
                    recipe,
                    env=ONE_THREAD,
                )
                for args in (PTAPT_RUN, TAPT_RUN)
            )
            assert ptapt.returncode == 0 and tapt.returncode == 0, (
                ptapt.stderr[-3000:] + tapt.stderr[-3000:]
            )
            runs[recipe] = out, ptapt
        return runs[recipe]

    return get


def test_tapt_and_ptapt_end_to_end(corpus, straight_runs, tmp_path):
    """Both methods run on fold 2's training sessions only and feed finetune.py --init."""
    out, r = straight_runs("release")
    assert "NMI between pseudo-labels and emotion" in r.stdout
    fold = out / "ptapt" / "fold2"
    labels = load_labels(fold / "labels.pt")
    assert labels["uids"] and not any(
        u.startswith("Ses02") for u in labels["uids"]
    )  # never the test session
    assert sorted(int(k) for k in labels["labels"]) == [4, 16]
    assert not list(fold.glob("*.state.pt"))
    r = script("pretrain.py", *PTAPT_RUN, "--data", corpus, "--out", out)
    assert r.returncode == 0 and "fold 2 done" in r.stdout
    init = os.path.join(out, "ptapt", "fold2", "pretrained.pt")
    assert r.stdout.strip().splitlines()[-1].endswith(f"--data {corpus} --init {init}"), r.stdout
    # pseudo-labels that do not match the audio: one frame moved from the first utterance to the second
    broken = tmp_path / "broken" / "fold2"
    shutil.copytree(fold, broken)
    (broken / "pretrained.pt").unlink()
    stored = torch.load(broken / "labels.pt", weights_only=True)
    stored["frame_counts"][0] -= 1
    stored["frame_counts"][1] += 1
    torch.save(stored, broken / "labels.pt")
    r = script("pretrain.py", *PTAPT_RUN, "--data", corpus, "--out", tmp_path, "--name", "broken")
    assert (
        r.returncode == 2 and stored["uids"][0] in r.stderr and "do not match the audio" in r.stderr
    )
    for mode in ("tapt", "ptapt"):
        r = script(
            "finetune.py",
            "--fold",
            2,
            "--data",
            corpus,
            "--out",
            tmp_path,
            "--epochs",
            1,
            "--train-fraction",
            0.25,
            "--init",
            out / mode / "fold2" / "pretrained.pt",
            *TINY_RUN[2:],
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert (tmp_path / f"ft-{mode}" / "fold2" / "run0" / "metrics.json").exists()


def test_tapt_feature_penalty_flag_weights_the_penalty(corpus, tmp_path):
    """--feature-penalty reaches TAPT's loss: the first update (same batch and masks, lr 0 in warm-up)
    logs a loss linear in the weight, and the weight is recorded with the run."""
    loss = {}
    for weight in (0, 10, 20):
        r = script(
            "pretrain.py",
            "--mode",
            "tapt",
            "--fold",
            1,
            "--data",
            corpus,
            "--out",
            tmp_path,
            "--name",
            f"w{weight}",
            "--checkpoint",
            "random-tiny",
            "--batch-size",
            4,
            "--updates",
            1,
            "--warmup",
            1,
            "--workers",
            0,
            "--no-progress",
            "--feature-penalty",
            weight,
            "--recipe",
            "clean",
            env=ONE_THREAD,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        loss[weight] = read_log(tmp_path / f"w{weight}" / "fold1" / "tapt.log.jsonl")[0]["loss"]
        assert (
            json.loads((tmp_path / f"w{weight}" / "fold1" / "config.json").read_text())[
                "feature_penalty"
            ]
            == weight
        )
    assert loss[10] - loss[0] > 0.01  # the penalty term is there, and weighted
    assert loss[20] - loss[10] == pytest.approx(loss[10] - loss[0], rel=1e-4)


def test_teacher_lstm_runs_in_float32_under_autocast():
    """The teacher's BiLSTM leaves autocast: cuDNN would run it in fp16, without loss scaling, even under
    bf16 autocast (the CPU's autocast would run it in bf16)."""
    teacher = P.Teacher(random_model(tiny_config()), num_classes=4)
    seen = []
    teacher.lstm.register_forward_hook(
        lambda module, inputs, output: seen.append((inputs[0].dtype, output[0].dtype))
    )
    wav = torch.randn(2, 8000, generator=torch.Generator().manual_seed(0)) * 0.1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        frame_logits, utterance_logits, _ = teacher(wav, torch.tensor([8000, 8000]))
    assert seen == [(torch.float32, torch.float32)]
    assert torch.isfinite(utterance_logits.float()).all()


def test_mixed_precision_runs_on_the_cpu(corpus, tmp_path):
    """The autocast paths a GPU takes (bf16; fp16 with its gradient scaler), run on the CPU's autocast:
    V-FT and TAPT finish with finite losses."""
    for precision in ("bf16", "fp16"):
        out = tmp_path / precision
        r = script(
            "finetune.py",
            "--fold",
            1,
            "--data",
            corpus,
            "--out",
            out,
            "--epochs",
            1,
            "--train-fraction",
            0.25,
            "--precision",
            precision,
            *TINY_RUN,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        r = script(
            "pretrain.py",
            "--mode",
            "tapt",
            "--fold",
            1,
            "--data",
            corpus,
            "--out",
            out,
            "--checkpoint",
            "random-tiny",
            "--batch-size",
            4,
            "--updates",
            2,
            "--warmup",
            1,
            "--workers",
            0,
            "--no-progress",
            "--precision",
            precision,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        for run in (out / "vft" / "fold1" / "run0", out / "tapt" / "fold1"):
            assert json.loads((run / "config.json").read_text())["precision"] == precision
            assert all(math.isfinite(row["loss"]) for row in read_log(next(run.glob("*log.jsonl"))))


def test_tapt_refuses_a_checkpoint_without_quantizer(corpus, tmp_path):
    net = random_model(tiny_config())
    write_fairseq(tmp_path / "asr.pt", net, "asr")
    r = script(
        "pretrain.py",
        "--mode",
        "tapt",
        "--fold",
        1,
        "--data",
        corpus,
        "--checkpoint",
        tmp_path / "asr.pt",
        "--out",
        tmp_path,
        "--updates",
        2,
        "--warmup",
        1,
        "--workers",
        0,
        "--no-progress",
    )
    assert r.returncode == 2 and "quantizer" in r.stderr and "asr.pt" in r.stderr


@pytest.mark.usefixtures("one_thread")
def test_kmeans_on_real_model_features_matches_sklearn(synth):
    """Frame features of a (random) wav2vec 2.0 on the synthetic corpus, not just blobs."""
    from sklearn.cluster import KMeans

    import kmeans

    splits, _ = data.load_corpus(synth, 1)
    net = random_model(tiny_config(), seed=2)
    feats, counts = kmeans.extract_features(
        lambda wav, n: net(wav, n, layer=net.cfg.num_layers),
        splits["train"],
        "cpu",
        progress=False,
        workers=0,
    )
    assert int(counts.sum()) == len(feats) and len(counts) == len(splits["train"])
    x = feats.float().numpy()
    for k in (8, 32):
        init = x[np.random.default_rng(k).choice(len(x), k, replace=False)]
        ours = fit_kmeans(
            feats.float(),
            ks=(k,),
            iters=20,
            init=torch.from_numpy(init),
            max_samples=BIG,
            progress=False,
        )[k]
        sk = KMeans(k, init=init, n_init=1, max_iter=20, algorithm="lloyd", tol=0).fit(x)
        assert abs(ours.inertia[-1] / sk.inertia_ - 1) < 0.01
        own = fit_kmeans(feats.float(), ks=(k,), iters=20, max_samples=BIG, progress=False)[k]
        sk_own = KMeans(k, n_init=1, max_iter=20, algorithm="lloyd", tol=0, random_state=0).fit(x)
        assert own.inertia[-1] <= 1.01 * sk_own.inertia_


# ----------------------------------------------------------------------------- the release's P-TAPT teacher (pretrain.py --teacher)
# the 90/10 split, best-validation selection, label alignment; end to end, killed, two processes

# Large's geometry (100 Hz, receptive field 465, so the teacher's frame counts are Large's) at width 16, 3 agg layers
TINY_V1 = {
    **LARGE,
    "conv_feature_layers": LARGE["conv_feature_layers"].replace("512", "16"),
    "conv_aggregator_layers": "[(16, 2, 1), (16, 3, 1), (16, 4, 1)]",
}


@pytest.fixture(scope="module")
def tiny_v1(tmp_path_factory):
    path = tmp_path_factory.mktemp("v1") / "tiny_v1.pt"
    write_v1(path, TINY_V1, "args", v1_fairseq_state(TINY_V1, seed=0))
    return path


def v1_teacher_args(corpus, v1):
    return [
        "--mode",
        "ptapt",
        "--fold",
        1,
        "--data",
        corpus,
        "--checkpoint",
        "random-tiny",
        "--teacher",
        v1,
        "--batch-size",
        8,
        "--warmup",
        2,
        "--lr",
        "5e-4",
        "--ks",
        4,
        8,
        "--workers",
        0,
        "--no-progress",
        "--device",
        "cpu",
    ]


# 86 fitted utterances / batch 8 = 10 updates an epoch: two validated epochs and a partial one
V1_RUN = ["--teacher-updates", 24, "--updates", 4, "--save-every", 3]


@pytest.fixture(scope="module")
def v1_run(corpus, tiny_v1, tmp_path_factory):
    """A finished P-TAPT run with the v1 teacher (V1_RUN) on one thread, computed once: tests read it."""
    out = tmp_path_factory.mktemp("runs")
    r = script(
        "pretrain.py", *v1_teacher_args(corpus, tiny_v1), *V1_RUN, "--out", out, env=ONE_THREAD
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "ptapt" / "fold1", r


def test_release_split_is_torch_random_split_seed_58(corpus):
    utterances = data.load_corpus(corpus, 1)[0]["train"]
    fit, held_out = P.release_split(utterances)
    ordered = sorted(utterances, key=lambda u: u.uid)
    n = len(ordered)
    a, b = torch.utils.data.random_split(
        ordered, [int(0.9 * n), n - int(0.9 * n)], generator=torch.Generator().manual_seed(58)
    )
    assert [u.uid for u in fit] == [u.uid for u in a] and [u.uid for u in held_out] == [
        u.uid for u in b
    ]
    assert (len(fit), len(held_out)) == (86, 10) and not {u.uid for u in fit} & {
        u.uid for u in held_out
    }
    assert (
        P.release_split(list(reversed(utterances)))[1] == held_out
    )  # independent of the corpus reader's order


def test_keep_best_keeps_the_lowest_validation_loss_once_per_update():
    net = torch.nn.Linear(2, 2)
    losses = iter([3.0, 2.0, 2.5, 2.0, 1.5])
    calls = []
    hook = P.keep_best(net, lambda: calls.append(1) or next(losses))
    pos = {"update": 0}
    weights = {}
    for update in (5, 10, 15, 20):
        pos["update"] = update
        with torch.no_grad():
            net.weight.fill_(update)
        weights[update] = net.weight.clone()
        hook(pos)
    hook(
        pos
    )  # the same update again (a stop at an epoch's last batch, then the resume): not validated twice
    assert len(calls) == 4
    assert (pos["best_valid"], pos["best_update"]) == (
        2.0,
        10,
    )  # a tie (update 20) does not replace it
    assert torch.equal(pos["best_model"]["weight"], weights[10])
    pos["update"] = 25
    hook(pos)
    assert (pos["best_valid"], pos["best_update"]) == (1.5, 25)


def test_labels_aligned_to_wav2vec2_frames_from_frame_0(tmp_path):
    """Stored at the teacher's frames, read at wav2vec 2.0's: the same labels from frame 0, then -100 for the
    one or two frames the teacher lacks, exactly (L - 400) // 320 + 1 - ((L - 945) // 320 + 1)."""
    teacher = M.Wav2Vec1Teacher(M.Wav2Vec1(C.config_from_v1(TINY_V1)))
    backbone = M.Wav2Vec2(M.Wav2Vec2Config())
    lengths = [945, 1264, 1265, 1520, 16000, 16224, 16225]
    utterances = [data.Utterance(f"u{i}", "x.wav", "neu", n) for i, n in enumerate(lengths)]
    counts = [(n - 945) // 320 + 1 for n in lengths]
    labels = {4: torch.cat([torch.arange(c) % 4 for c in counts])}
    save_labels(tmp_path / "l.pt", [u.uid for u in utterances], counts, labels, {})
    aligned = P.aligned_labels(load_labels(tmp_path / "l.pt"), utterances, backbone, teacher)
    for n, c, a in zip(lengths, counts, aligned):
        w = (n - 400) // 320 + 1
        assert len(a[4]) == w and w - c == (2 if (n - 400) % 320 <= 224 else 1)
        assert torch.equal(a[4][:c], torch.arange(c) % 4) and (a[4][c:] == -100).all()


def test_pseudo_label_loss_leaves_out_unlabelled_frames():
    logits, targets = torch.randn(5, 4), torch.tensor([1, 2, -100, 3, -100])
    ((total, count),) = P.pseudo_label_loss([logits], [targets])
    keep = targets != -100
    assert int(count) == 3
    torch.testing.assert_close(
        total, torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
    )


def test_ptapt_end_to_end_with_a_v1_teacher(corpus, v1_run, tmp_path):
    fold, r = v1_run
    config = json.loads((fold / "config.json").read_text())
    assert config["release_teacher"]["split_seed"] == 58 and config["kmeans_init"] == "random"
    teacher = torch.load(fold / "teacher.pt", weights_only=True)
    assert teacher["format"] == "w2v2-ser/wav2vec1-teacher"
    # validated at 10 and 20, not at the partial last epoch (V1_RUN)
    lines = [line for line in r.stdout.splitlines() if line.startswith("teacher: validation loss")]
    assert [int(line.split(" at update ")[1].split()[0]) for line in lines] == [10, 20]
    losses = [float(line.split()[3]) for line in lines]
    assert teacher["meta"]["best_update"] == [10, 20][int(np.argmin(losses))]
    utterances = data.load_corpus(corpus, 1)[0]["train"]
    assert teacher["meta"]["validation_utterances"] == [
        u.uid for u in P.release_split(utterances)[1]
    ]
    # labels at the teacher's own frame counts; the heads and the stride-2 conv of the release's sizes
    stored = load_labels(fold / "labels.pt")
    samples = {u.uid: u.num_samples for u in utterances}
    assert stored["frame_counts"].tolist() == [
        (samples[u] - 945) // 320 + 1 for u in stored["uids"]
    ]
    assert stored["meta"]["teacher_model"] == "wav2vec (v1)"
    assert teacher["model"]["conv.weight"].shape == (16, 16, 4)
    assert (fold / "pretrained.pt").exists() and not list(fold.glob("*.state.pt*"))
    r = script(
        "finetune.py",
        "--fold",
        1,
        "--data",
        corpus,
        "--out",
        tmp_path,
        "--epochs",
        1,
        "--train-fraction",
        0.25,
        "--init",
        fold / "pretrained.pt",
        "--batch-size",
        8,
        "--workers",
        0,
        "--no-progress",
        "--channel-mask-span",
        8,
    )
    assert r.returncode == 0, r.stderr[-2000:]


def test_v1_teacher_refusals_are_one_line(corpus, tiny_v1, tmp_path):
    args = [*v1_teacher_args(corpus, tiny_v1), "--teacher-updates", 2, "--updates", 2]
    for extra, pattern in [
        (["--recipe", "clean"], "the wav2vec (v1) teacher is the release recipe's"),
        (["--layer", 2], "--layer: the wav2vec (v1) teacher"),
    ]:
        r = script("pretrain.py", *args, *extra, "--out", tmp_path / extra[0].strip("-"))
        assert (
            r.returncode == 2 and pattern in r.stderr and len(r.stderr.strip().splitlines()) == 1
        ), r.stderr
    # a wav2vec 2.0 file as --teacher; the v1 file as a V-FT backbone
    C.save_wav2vec2(
        M.Wav2Vec2(
            M.Wav2Vec2Config(
                conv_layers=[(8, 10, 5)] + [(8, 3, 2)] * 4 + [(8, 2, 2)] * 2,
                embed_dim=16,
                ffn_dim=16,
                num_layers=1,
                num_heads=2,
                pos_conv_kernel=4,
                pos_conv_groups=2,
            )
        ),
        tmp_path / "w2v2.pt",
    )
    args[args.index(tiny_v1)] = tmp_path / "w2v2.pt"
    r = script("pretrain.py", *args, "--out", tmp_path / "w2v2")
    assert (
        r.returncode == 2 and "--teacher" in r.stderr and "not fairseq's wav2vec (v1)" in r.stderr
    ), r.stderr
    r = script(
        "finetune.py", "--fold", 1, "--data", corpus, "--checkpoint", tiny_v1, "--out", tmp_path
    )
    assert (
        r.returncode == 2 and "wav2vec (v1)" in r.stderr and "pretrain.py --teacher" in r.stderr
    ), r.stderr


def test_killed_v1_teacher_resumes_to_the_same_teacher(corpus, tiny_v1, v1_run, tmp_path):
    """SIGKILL inside the teacher stage (V1_RUN: validated epochs, best-validation selection) and inside k-means;
    the same teacher.pt bit for bit, the same labels."""
    args = [*v1_teacher_args(corpus, tiny_v1), *V1_RUN]
    cmd = [
        sys.executable,
        os.path.join(HERE, "pretrain.py"),
        *map(str, args),
        "--out",
        str(tmp_path / "killed"),
    ]
    fold = tmp_path / "killed" / "ptapt" / "fold1"
    run_killed_in_stages(
        cmd,
        [
            (fold / "teacher.state.pt", fold / "teacher.pt"),
            (fold / "teacher.pt", fold / "labels.pt"),
        ],
        np.random.default_rng(),
    )
    straight = v1_run[0]
    assert_same_weights(straight / "teacher.pt", fold / "teacher.pt", atol=0)
    a, b = (
        torch.load(straight / "teacher.pt", weights_only=True),
        torch.load(fold / "teacher.pt", weights_only=True),
    )
    assert (
        a["meta"]["best_update"] == b["meta"]["best_update"]
        and a["meta"]["best_valid_loss"] == b["meta"]["best_valid_loss"]
    )
    la, lb = load_labels(straight / "labels.pt"), load_labels(fold / "labels.pt")
    assert all(torch.equal(la["labels"][k], lb["labels"][k]) for k in la["labels"])
    assert (
        read_log(straight / "teacher.log.jsonl")[-1]["loss"]
        == read_log(fold / "teacher.log.jsonl")[-1]["loss"]
    )


def test_torchrun_v1_teacher_equals_one_process(corpus, tiny_v1, v1_run, tmp_path):
    """Two processes: crops to the whole batch's shortest, the batch's span count, every process validating;
    the same teacher (v1 Large has no dropout; nor do the heads and the LSTM)."""
    two = torchrun(
        "pretrain.py", *v1_teacher_args(corpus, tiny_v1), *V1_RUN, "--out", tmp_path / "two"
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = v1_run[0], tmp_path / "two" / "ptapt" / "fold1"
    assert_same_weights(a / "teacher.pt", b / "teacher.pt", atol=1e-4)
    la, lb = read_log(a / "teacher.log.jsonl"), read_log(b / "teacher.log.jsonl")
    assert [r["update"] for r in la] == [r["update"] for r in lb]
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], abs=1e-5)
    ta, tb = (torch.load(x / "teacher.pt", weights_only=True)["meta"] for x in (a, b))
    assert ta["best_update"] == tb["best_update"] and ta["best_valid_loss"] == pytest.approx(
        tb["best_valid_loss"], abs=1e-5
    )


# =============================================================================
# faults: killed runs lose nothing (SIGKILL inside every stage, rerun, same result as never killed)


def run_killed_in_stages(cmd, stages, rng):
    """Start cmd; for each (ready, done) pair of paths, SIGKILL the run a random moment (up to 0.3 s)
    after `ready` appears, before `done` does, then start it again; finally let it finish."""
    import time

    for ready, done in stages:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ONE_THREAD
        )
        try:
            while not ready.exists() and proc.poll() is None:
                time.sleep(0.02)
            time.sleep(float(rng.uniform(0.0, 0.3)))
            proc.kill()
        finally:
            proc.wait()
        assert ready.exists() and not done.exists(), (
            f"not killed inside the stage: {proc.stderr.read()[-2000:]}"
        )
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.parametrize("recipe", ["release", "clean"])
def test_killed_pretraining_stages_resume_to_the_same_result(
    corpus, straight_runs, tmp_path, recipe
):
    rng = np.random.default_rng()  # a different kill point every time the suite runs
    straight = straight_runs(recipe)[0]
    cmd = lambda args: [
        sys.executable,
        os.path.join(HERE, "pretrain.py"),
        *map(str, args),
        "--data",
        str(corpus),
        "--recipe",
        recipe,
        "--out",
        str(tmp_path / "killed"),
    ]
    fold = tmp_path / "killed" / "ptapt" / "fold2"
    run_killed_in_stages(
        cmd(PTAPT_RUN),
        [
            (fold / "teacher.state.pt", fold / "teacher.pt"),  # teacher
            (fold / "teacher.pt", fold / "labels.pt"),  # k-means
            (fold / "ptapt.state.pt", fold / "pretrained.pt"),
        ],
        rng,
    )  # pseudo-labels
    tfold = tmp_path / "killed" / "tapt" / "fold2"
    run_killed_in_stages(cmd(TAPT_RUN), [(tfold / "tapt.state.pt", tfold / "pretrained.pt")], rng)
    for f in ("ptapt/fold2/teacher.pt", "ptapt/fold2/pretrained.pt", "tapt/fold2/pretrained.pt"):
        assert_same_weights(straight / f, tmp_path / "killed" / f, atol=0)
    a, b = load_labels(straight / "ptapt/fold2/labels.pt"), load_labels(fold / "labels.pt")
    assert all(torch.equal(a["labels"][k], b["labels"][k]) for k in a["labels"])
    for name in (
        "ptapt/fold2/teacher",
        "ptapt/fold2/ptapt",
        "tapt/fold2/tapt",
    ):  # the last epoch's loss
        assert (
            read_log(straight / f"{name}.log.jsonl")[-1]["loss"]
            == read_log(tmp_path / "killed" / f"{name}.log.jsonl")[-1]["loss"]
        )
    assert not list((tmp_path / "killed").rglob("*.state.pt*"))


def test_damaged_resume_point_falls_back_to_the_previous_one(tmp_path, capsys):
    path = str(tmp_path / "state.pt")
    T.save_training_state({"update": 1}, path)
    T.save_training_state({"update": 2}, path)
    assert T.load_training_state(path)["update"] == 2
    with open(path, "r+b") as f:  # cut short, as by a crash or a full disk on a copy
        f.truncate(100)
    assert T.load_training_state(path)["update"] == 1
    assert "state.pt is unreadable" in capsys.readouterr().err
    T.remove_training_state(path)
    assert T.load_training_state(path) is None and not os.listdir(tmp_path)


def test_unwritable_or_full_output_folder_fails_before_training(
    corpus, tmp_path, monkeypatch, capsys
):
    import finetune

    (tmp_path / "a-file").write_text("")
    for out in (tmp_path / "a-file", "/proc/no-such-folder"):
        r = script("finetune.py", "--fold", 1, "--data", corpus, "--out", out, *TINY_RUN)
        assert r.returncode == 2 and "cannot write to the output folder" in r.stderr, r.stderr[
            -2000:
        ]
        assert "Traceback" not in r.stderr
    monkeypatch.setattr(
        T.shutil, "disk_usage", lambda path: argparse.Namespace(total=10**6, used=0, free=1000)
    )
    with pytest.raises(SystemExit) as e:
        finetune.main(
            list(map(str, ["--fold", 1, "--data", corpus, "--out", tmp_path / "full", *TINY_RUN]))
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "GiB free" in err and "checkpoints need about" in err
    assert not (tmp_path / "full" / "vft" / "fold1" / "run0" / "log.jsonl").exists()


# ----------------------------------------------------------------------------- bad input: one line, exit 2, nothing written

BAD_ARGUMENTS = [  # (script, flags, what the one line must name)
    ("finetune", ["--batch-size", "0"], "--batch-size"),
    ("finetune", ["--batch-size", "-1"], "--batch-size"),
    ("finetune", ["--lr", "nan"], "--lr"),
    ("finetune", ["--lr", "-1"], "--lr"),
    ("finetune", ["--max-seconds", "0"], "--max-seconds"),
    ("finetune", ["--workers", "-1"], "--workers"),
    ("finetune", ["--epochs", "0"], "--epochs"),
    ("finetune", ["--runs", "0"], "--runs"),
    ("finetune", ["--time-mask-prob", "2"], "--time-mask-prob"),
    ("finetune", ["--fold", "6"], "--fold"),
    (
        "finetune",
        ["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"],
        "device",
    ),
    ("pretrain", ["--save-every", "0"], "--save-every"),
    ("pretrain", ["--updates", "0"], "--updates"),
    ("pretrain", ["--teacher-updates", "0"], "--teacher-updates"),
    ("pretrain", ["--ks", "4", "4"], "--ks"),
    ("pretrain", ["--warmup", "50", "--updates", "10"], "--warmup"),
    ("pretrain", ["--feature-penalty", "nan"], "--feature-penalty"),
    ("pretrain", ["--mask-prob", "1.5"], "--mask-prob"),
    (
        "evaluate",
        ["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"],
        "device",
    ),
    ("pretrain", ["--mode", "kmeans", "--ks", "0"], "--ks"),
    ("pretrain", ["--mode", "kmeans", "--kmeans-iters", "0"], "--kmeans-iters"),
    ("finetune", ["--device", "mps"], "--device"),
    ("finetune", ["--device", "meta"], "--device"),
    ("evaluate", ["--device", "meta"], "--device"),
    ("finetune", ["--seed", "-1"], "--seed"),
    ("finetune", ["--max-seconds", "0.02"], "--max-seconds"),
    ("finetune", ["--epoch", "2"], "--epoch"),  # no abbreviations: --epoch is not --epochs
    ("finetune", ["--checkpoint", "no-such.pt"], "no-such.pt"),
    ("pretrain", ["--checkpoint", "no-such.pt"], "no-such.pt"),
    ("pretrain", ["--feature-penalty", "3"], "--feature-penalty"),  # the release objective has none
    ("pretrain", ["--mode", "tapt", "--bucket"], "--bucket"),  # the P-TAPT teacher's only
]


@pytest.mark.parametrize(
    "name, flags, named", BAD_ARGUMENTS, ids=[f"{s} {' '.join(f)}" for s, f, _ in BAD_ARGUMENTS]
)
def test_bad_argument_is_one_line_and_writes_nothing(name, flags, named, corpus, tmp_path, capsys):
    import evaluate
    import finetune

    out = tmp_path / "runs"
    argv = {
        "finetune": ["--data", corpus, "--fold", "1", "--out", out, *TINY_RUN],
        "pretrain": [
            "--mode",
            "ptapt",
            "--data",
            corpus,
            "--fold",
            "1",
            "--out",
            out,
            "--checkpoint",
            "random-tiny",
            "--no-progress",
        ],
        "evaluate": ["--checkpoint", tmp_path / "model.pt", "--predict", tmp_path / "a.wav"],
    }[name]
    with pytest.raises(SystemExit) as e:
        {"finetune": finetune, "pretrain": P, "evaluate": evaluate}[name].main(
            list(map(str, argv + flags))
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        e.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and named in err[0]
    ), err
    assert not out.exists()


def test_default_names_keep_the_recipes_apart_and_given_flags_win():
    """The README's second command (the quick start with --recipe clean) gets its own folder; a
    flag given with --quickstart wins even when it equals the script's default."""
    import finetune

    assert finetune.parse_args(["--quickstart"]).name == "quickstart"
    assert finetune.parse_args(["--quickstart", "--recipe", "clean"]).name == "quickstart-clean"
    init = "runs/tapt-clean/fold{fold}/pretrained.pt"
    assert finetune.default_run_name(init, "clean") == "ft-tapt-clean"
    assert finetune.default_run_name("runs/tapt/fold3/pretrained.pt", "release") == "ft-tapt"
    assert finetune.default_run_name(init, "clean", quickstart=True) == "quickstart-ft-tapt-clean"
    args = finetune.parse_args(["--quickstart", "--max-seconds", "10", "--batch-size", "64"])
    assert (args.max_seconds, args.batch_size, args.epochs) == (10.0, 64, 15)
    release, clean = (finetune.parse_args(["--quickstart", "--recipe", r]) for r in T.RECIPES)
    assert (release.skip_last_frame, clean.skip_last_frame) == (True, False)
    assert finetune.parse_args(["--quickstart", "--no-skip-last-frame"]).skip_last_frame is False
    tapt = P.parse_args(["--mode", "tapt", "--data", "x", "--checkpoint", "random-tiny"])
    fairseq = P.parse_args(["--mode", "tapt", "--data", "x", "--checkpoint", "random-tiny",
                            "--objective", "fairseq"])  # fmt: skip
    assert (tapt.feature_penalty, fairseq.feature_penalty) == (None, 10.0)


def test_paths_are_compared_as_files_and_a_lost_config_retires_the_run(tmp_path):
    """data/synth/ is data/synth; a run folder whose config.json is gone cannot be resumed under
    whatever settings the next command brings."""
    corpus = tmp_path / "synth"
    corpus.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    assert not T.check_run_config(str(run), {"data": str(corpus), "lr": 1e-4})
    assert T.check_run_config(str(run), {"data": str(corpus) + "/", "lr": 1e-4})
    (run / "state.pt").write_bytes(b"resume point")
    with pytest.raises(data.DataError, match="computed with other settings"):
        T.check_run_config(str(run), {"data": str(corpus), "lr": 0.5})
    (run / "config.json").unlink()
    assert not T.check_run_config(str(run), {"data": str(corpus), "lr": 0.5})  # a new run
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "state.pt.orphaned"]
    assert json.loads((run / "config.json").read_text())["lr"] == 0.5


def test_a_list_corpus_runs_once(tmp_path):
    """A .json or .csv corpus has one train/test split: "all folds" runs it once, another fold is
    refused rather than trained on the same split again."""
    (tmp_path / "iemocap").mkdir()
    assert T.folds_of(str(tmp_path / "iemocap"), None) == [1, 2, 3, 4, 5]
    assert T.folds_of(str(tmp_path / "iemocap"), "3") == [3]
    listed = str(tmp_path / "labels.json")
    assert T.folds_of(listed, None) == T.folds_of(listed, "all") == T.folds_of(listed, "1") == [1]
    with pytest.raises(data.DataError, match="one train/test split"):
        T.folds_of(listed, 3)


def test_pretrain_hint_is_the_readmes_next_command():
    """After every fold, one line: the README's V-FT over those folds, with this run's recipe."""
    args = argparse.Namespace(recipe="release", checkpoint="wav2vec_small.pt", data="IEMOCAP")
    assert P.next_command(args, [1, 2, 3, 4, 5], "runs/tapt") == (
        "  next: python finetune.py --fold all --runs 5 --data IEMOCAP "
        "--init 'runs/tapt/fold{fold}/pretrained.pt'"
    )
    args.recipe = "clean"
    assert P.next_command(args, [3], "runs/tapt-clean") == (
        "  next: python finetune.py --fold 3 --data IEMOCAP --recipe clean "
        "--init runs/tapt-clean/fold3/pretrained.pt"
    )
    args.checkpoint = "random-tiny"
    assert P.next_command(args, [1], "runs/ptapt-clean").startswith(
        "  next: python finetune.py --quickstart --data IEMOCAP --recipe clean --init"
    )


def test_clean_tapt_trains_through_batches_with_nothing_masked(corpus, tmp_path):
    """Nothing masked (here --mask-prob 0 --mask-min 0; in a run, a bucket of utterances shorter
    than a span): no loss and no crash; before, every rerun resumed into the same crash."""
    r = script("pretrain.py", "--mode", "tapt", "--recipe", "clean", "--fold", 1, "--data", corpus,
               "--checkpoint", "random-tiny", "--updates", 2, "--warmup", 1, "--batch-size", 4,
               "--mask-prob", 0, "--mask-min", 0, "--workers", 0, "--no-progress", "--out", tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    log = read_log(tmp_path / "tapt-clean" / "fold1" / "tapt.log.jsonl")
    assert [(row["update"], row["loss"]) for row in log] == [(2, 0.0)]


def test_ptapt_reads_its_checkpoint_before_the_teacher_trains(corpus, tiny_v1, tmp_path):
    """A wrong --checkpoint is one line before the (hours-long) teacher and k-means stages."""
    wrong = tmp_path / "wav2vec_small.pt"
    wrong.write_bytes(b"not a checkpoint")
    args = v1_teacher_args(corpus, tiny_v1)
    args[args.index("random-tiny")] = wrong
    r = script("pretrain.py", *args, "--out", tmp_path / "runs")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error:"), r.stderr
    assert "wav2vec_small.pt" in r.stderr and "Traceback" not in r.stderr
    assert not list((tmp_path / "runs").rglob("teacher*"))


def test_finetune_reads_every_folds_init_before_the_first_fold(corpus, tmp_path, capsys):
    """--fold all --init 'runs/x/fold{fold}/pretrained.pt': a missing fold-2 file or a damaged
    fold-3 one is one line before fold 1 trains, and no run folder is made."""
    import finetune

    pretrained = tmp_path / "tapt" / "fold{fold}" / "pretrained.pt"
    for fold in (1, 3, 4, 5):
        path = tmp_path / "tapt" / f"fold{fold}" / "pretrained.pt"
        path.parent.mkdir(parents=True)
        C.save_wav2vec2(M.Wav2Vec2(T.tiny_random_config()), path)
    argv = ["--fold", "all", "--data", corpus, "--out", tmp_path / "runs", "--no-progress"]
    for damaged, named in ((None, "fold2"), (3, "fold3")):
        if damaged:
            (tmp_path / "tapt" / "fold2").mkdir()
            C.save_wav2vec2(
                M.Wav2Vec2(T.tiny_random_config()), tmp_path / "tapt/fold2/pretrained.pt"
            )
            (tmp_path / "tapt" / f"fold{damaged}" / "pretrained.pt").write_bytes(b"not a file")
        with pytest.raises(SystemExit) as e:
            finetune.main(list(map(str, argv + ["--init", pretrained])))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:"), err
        assert named in err[0] and not (tmp_path / "runs").exists(), err


def test_runs_that_would_train_on_nothing_are_refused_and_the_fix_is_not_blocked(corpus, tmp_path):
    """A batch larger than the training set (the last partial batch is dropped), a mistyped checkpoint:
    refused before any training, and the corrected command then runs in the same folder."""
    args = [
        "--fold",
        1,
        "--data",
        corpus,
        "--out",
        tmp_path,
        "--epochs",
        1,
        "--train-fraction",
        0.25,
        *TINY_RUN,
    ]
    r = script("finetune.py", *args, "--batch-size", 1000)
    assert (
        r.returncode == 2
        and "no full batch of 1000 utterances" in r.stderr
        and "Traceback" not in r.stderr
    )
    r = script("finetune.py", *args, "--checkpoint", tmp_path / "wav2vec_smal.pt")
    assert r.returncode == 2 and "wav2vec_smal.pt" in r.stderr and "Traceback" not in r.stderr
    r = script("finetune.py", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    r = script(
        "pretrain.py",
        "--mode",
        "tapt",
        "--fold",
        1,
        "--data",
        corpus,
        "--out",
        tmp_path,
        "--checkpoint",
        "random-tiny",
        "--workers",
        0,
        "--no-progress",
        "--batch-size",
        1000,
        "--updates",
        2,
        "--warmup",
        1,
    )
    assert r.returncode == 2 and "no full batch" in r.stderr and "Traceback" not in r.stderr


def test_ptapt_checks_k_before_the_teacher_and_keeps_a_finished_teacher(
    corpus, straight_runs, tmp_path
):
    common = [*PTAPT_RUN, "--data", corpus, "--out", tmp_path]  # (a later --ks wins)
    fold = tmp_path / "ptapt" / "fold2"
    r = script("pretrain.py", *common, "--ks", 10**7)  # K larger than the number of frames
    assert (
        r.returncode == 2
        and "10000000" in r.stderr
        and "frames" in r.stderr
        and "Traceback" not in r.stderr
    )
    assert (
        not (fold / "teacher.pt").exists() and not (fold / "teacher.log.jsonl").exists()
    )  # found before training
    shutil.copytree(
        straight_runs("release")[0] / "ptapt" / "fold2", fold, dirs_exist_ok=True
    )  # finished, K = 4, 16
    teacher = (fold / "teacher.pt").stat().st_mtime_ns
    r = script(
        "pretrain.py", *common, "--ks", 8
    )  # labels.pt and pretrained.pt were computed with K = 4, 16
    assert r.returncode == 2 and "labels.pt" in r.stderr and "pretrained.pt" in r.stderr
    assert "teacher.pt" not in r.stderr
    for name in ("labels.pt", "pretrained.pt", "ptapt.log.jsonl"):
        (fold / name).unlink()
    r = script("pretrain.py", *common, "--ks", 8)
    assert r.returncode == 0 and "teacher done" in r.stdout, r.stderr[-2000:]
    assert (fold / "teacher.pt").stat().st_mtime_ns == teacher
    assert sorted(int(k) for k in load_labels(fold / "labels.pt")["labels"]) == [8]


def test_nan_wav_read_by_a_worker_is_one_line(corpus, tmp_path):
    broken = tmp_path / "corpus"
    shutil.copytree(corpus, broken)
    wav = sorted(broken.glob("Session2/sentences/wav/*/Ses*.wav"))[0]  # not the decoy "._" files
    x, sr = sf.read(wav, dtype="float32")
    x[100] = np.nan
    sf.write(wav, x, sr, subtype="FLOAT")
    r = script(
        "finetune.py",
        "--fold",
        1,
        "--data",
        broken,
        "--out",
        tmp_path,
        *TINY_RUN[:-4],
        "--workers",
        2,
        "--no-progress",
    )
    err = r.stderr.strip().splitlines()
    assert (
        r.returncode == 2 and err[-1] == f"error: {wav}: audio contains NaN or infinite samples"
    ), err[-5:]
    assert "Traceback" not in r.stderr and "DataLoader worker" not in r.stderr


def test_a_run_folder_is_locked(corpus, tmp_path):
    """A second run on a folder in use exits 2 at once; a lock left by a process that has ended is taken over."""
    run = tmp_path / "vft" / "fold1" / "run0"
    run.mkdir(parents=True)
    (run / "lock").write_text(f"{os.getpid()} {socket.gethostname()}")  # this test's process: alive
    args = [
        "--fold",
        1,
        "--data",
        corpus,
        "--out",
        tmp_path,
        "--epochs",
        1,
        "--train-fraction",
        0.25,
        *TINY_RUN,
    ]
    r = script("finetune.py", *args)
    assert r.returncode == 2 and "in use by process" in r.stderr and str(os.getpid()) in r.stderr
    assert not (run / "config.json").exists()
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (run / "lock").write_text(f"{ended.stdout.strip()} {socket.gethostname()}")
    r = script("finetune.py", *args)
    assert r.returncode == 0 and "has ended; taking over" in r.stderr, r.stderr[-2000:]
    assert not (run / "lock").exists() and (run / "metrics.json").exists()


@pytest.mark.parametrize("mode", ["vft", "tapt", "ptapt"])
def test_booby_trapped_resume_point_of_every_stage_is_never_run(corpus, tmp_path, mode):
    marker = tmp_path / "ran"
    run = {"vft": tmp_path / "vft" / "fold1" / "run0"}.get(mode, tmp_path / mode / "fold1")
    run.mkdir(parents=True)
    stages = {
        "vft": ["state.pt"],
        "tapt": ["tapt.state.pt"],
        "ptapt": ["teacher.state.pt", "ptapt.state.pt"],
    }[mode]
    for name in stages:
        torch.save({"position": RunsCommand(f"touch {marker}")}, run / name)
    common = [
        "--fold",
        1,
        "--data",
        corpus,
        "--out",
        tmp_path,
        "--batch-size",
        8,
        "--workers",
        0,
        "--no-progress",
    ]
    if mode == "vft":
        r = script(
            "finetune.py",
            *common,
            "--epochs",
            1,
            "--train-fraction",
            0.25,
            "--checkpoint",
            "random-tiny",
        )
    else:
        r = script(
            "pretrain.py",
            "--mode",
            mode,
            *common,
            "--checkpoint",
            "random-tiny",
            "--updates",
            2,
            "--teacher-updates",
            2,
            "--warmup",
            1,
            "--ks",
            4,
        )
    assert r.returncode == 0, r.stderr[-2000:]
    assert not marker.exists()
    for name in stages:  # no config.json beside them: set aside unread
        assert name in r.stderr and "no config.json" in r.stderr
        assert (run / f"{name}.orphaned").exists()


def test_a_failed_save_is_one_line_and_the_rerun_logs_each_epoch_once(
    corpus, tmp_path, monkeypatch, capsys
):
    """torch.save reports a full disk as a RuntimeError: one line saying what was kept; the epoch whose
    save failed runs again and is logged once."""
    import finetune

    real, calls = C.save_atomic, []

    def full_disk(obj, path):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError(
                "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                "data/3: file write failed"
            )
        real(obj, path)

    monkeypatch.setattr(T, "save_atomic", full_disk)
    argv = list(
        map(
            str,
            [
                "--fold",
                1,
                "--data",
                corpus,
                "--out",
                tmp_path,
                "--epochs",
                3,
                "--train-fraction",
                0.25,
                *TINY_RUN,
            ],
        )
    )
    with pytest.raises(SystemExit) as e:
        finetune.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "could not write the resume point" in err[0]
    assert "is intact" in err[0] and "file write failed" in err[0]
    monkeypatch.setattr(T, "save_atomic", real)
    finetune.main(argv)
    log = read_log(tmp_path / "vft" / "fold1" / "run0" / "log.jsonl")
    assert [row["epoch"] for row in log] == [1, 2, 3]


def test_ctrl_c_while_the_quick_start_writes_its_corpus(tmp_path):
    """Interrupted: one line, exit 130, no half-written corpus; the rerun writes it again."""
    corpus_dir = tmp_path / "synth"
    # Ctrl-C's default action in the child, whatever the test process inherited (an ignored SIGINT is inherited)
    p = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "synth.py"), corpus_dir],
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 60
    while (
        not (tmp_path / "synth.partial" / "Session2").exists()
        and time.time() < deadline
        and p.poll() is None
    ):
        time.sleep(0.01)
    assert p.poll() is None, f"synth.py ended before it was interrupted: {p.communicate()}"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.strip().startswith("interrupted") and "Traceback" not in err
    assert not corpus_dir.exists() and not (tmp_path / "synth.partial").exists()
    r = run_cli(str(corpus_dir), "--per-session", "2", "--max-seconds", "2", name="synth.py")
    assert r.returncode == 0 and len(data.load_iemocap(corpus_dir)) == 10


def test_a_closed_pipe_is_quiet(corpus, vft_run):
    """`python data.py --data ... | head`: no BrokenPipeError traceback; evaluate.py writes results.json first."""
    run_dir, _ = vft_run
    results = run_dir.parent.parent / "results.json"
    for cmd in (
        [os.path.join(HERE, "data.py"), "--data", corpus],
        [os.path.join(HERE, "evaluate.py"), run_dir.parent.parent],
    ):
        # `true` has exited before Python has imported torch: the first write meets a closed pipe
        p = subprocess.run(
            f"{sys.executable} {' '.join(map(str, cmd))} | true",
            shell=True,
            capture_output=True,
            text=True,
        )
        assert p.stderr == "", p.stderr
    assert json.loads(results.read_text())["folds"]["1"]["runs"] == 1


# =============================================================================
# distributed: torchrun, 2 gloo processes on CPU train exactly what one process trains


def torchrun(name, *args, timeout=300):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            os.path.join(HERE, name),
            *map(str, args),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ONE_THREAD,
    )


@pytest.fixture(scope="module")
def deterministic_tiny(tmp_path_factory):
    """The quick start's tiny model without dropout: a run is then a function of data, masks and
    seed alone, so one process and two can be compared weight for weight."""
    cfg = T.tiny_random_config()
    for k in (
        "dropout",
        "attention_dropout",
        "activation_dropout",
        "dropout_input",
        "dropout_features",
    ):
        setattr(cfg, k, 0.0)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-no-dropout.pt"
    C.save_wav2vec2(M.Wav2Vec2(cfg), path)
    return path


def read_log(path):
    return [json.loads(line) for line in open(path).read().splitlines()]


def assert_same_weights(a, b, atol):
    wa, wb = torch.load(a, weights_only=True)["model"], torch.load(b, weights_only=True)["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=k)


def assert_same_logs(a, b):
    la, lb = read_log(a), read_log(b)
    assert [r["update"] for r in la] == [r["update"] for r in lb]
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], abs=1e-5)


@pytest.mark.parametrize("recipe", ["release", "clean"])
def test_torchrun_finetuning_equals_one_process(corpus, deterministic_tiny, tmp_path, recipe):
    """In the release recipe each process pads its share to the whole batch's longest utterance and the
    span count is the batch's: the two processes still compute the one-process updates."""
    args = [
        "--name",
        "vft",
        "--fold",
        1,
        "--data",
        corpus,
        "--checkpoint",
        deterministic_tiny,
        "--epochs",
        2,
        "--train-fraction",
        0.25,
        "--batch-size",
        8,
        "--lr",
        "5e-4",
        "--channel-mask-span",
        8,
        "--workers",
        0,
        "--no-progress",
        "--device",
        "cpu",
        "--recipe",
        recipe,
    ]
    one = script("finetune.py", *args, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun("finetune.py", *args, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = tmp_path / "one" / "vft" / "fold1" / "run0", tmp_path / "two" / "vft" / "fold1" / "run0"
    assert [r["update"] for r in read_log(a / "log.jsonl")] == [
        3,
        6,
    ]  # 24 utterances / batch 8, per epoch
    assert_same_logs(a / "log.jsonl", b / "log.jsonl")
    assert_same_weights(a / "model.pt", b / "model.pt", atol=1e-4)
    assert (
        (a / "predictions.csv").read_text().count("\n")
        == (b / "predictions.csv").read_text().count("\n")
        == 25
    )
    ma, mb = (
        json.loads((a / "metrics.json").read_text()),
        json.loads((b / "metrics.json").read_text()),
    )
    assert ma["confusion"] == mb["confusion"]
    assert two.stdout.count("UA ") == 1  # rank 0 reports, once


@pytest.mark.parametrize("recipe", ["release", "clean"])
def test_torchrun_ptapt_equals_one_process(corpus, deterministic_tiny, tmp_path, recipe):
    """Teacher, k-means (sharded extraction, all-reduced centroids) and pseudo-label pretraining.
    The second torchrun run starts from the one-process teacher, so k-means sees identical features."""
    import shutil

    args = [
        "--name",
        "ptapt",
        "--mode",
        "ptapt",
        "--fold",
        1,
        "--data",
        corpus,
        "--checkpoint",
        deterministic_tiny,
        "--updates",
        4,
        "--teacher-updates",
        4,
        "--ks",
        4,
        8,
        "--batch-size",
        8,
        "--warmup",
        2,
        "--lr",
        "5e-4",
        "--workers",
        0,
        "--no-progress",
        "--device",
        "cpu",
        "--recipe",
        recipe,
    ]
    one = script("pretrain.py", *args, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun("pretrain.py", *args, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = tmp_path / "one" / "ptapt" / "fold1", tmp_path / "two" / "ptapt" / "fold1"
    assert_same_weights(a / "teacher.pt", b / "teacher.pt", atol=1e-4)
    assert_same_logs(a / "teacher.log.jsonl", b / "teacher.log.jsonl")
    c = tmp_path / "three" / "ptapt" / "fold1"
    c.mkdir(parents=True)
    shutil.copy(a / "teacher.pt", c / "teacher.pt")
    three = torchrun("pretrain.py", *args, "--out", tmp_path / "three")
    assert three.returncode == 0, three.stderr[-3000:]
    la, lc = load_labels(a / "labels.pt"), load_labels(c / "labels.pt")
    assert la["uids"] == lc["uids"] and torch.equal(
        torch.as_tensor(la["frame_counts"]), torch.as_tensor(lc["frame_counts"])
    )
    for k in la["labels"]:
        assert torch.equal(la["labels"][k], lc["labels"][k])
    assert_same_logs(a / "ptapt.log.jsonl", c / "ptapt.log.jsonl")
    assert_same_weights(a / "pretrained.pt", c / "pretrained.pt", atol=1e-4)


@pytest.mark.parametrize("recipe", ["release", "clean"])
def test_same_command_same_log_bytes_even_beside_busy_processes(corpus, tmp_path, recipe):
    """Two runs of one TAPT command on the CPU, with torch's default threads, the second beside two
    busy processes (descheduled threads change the order of any atomic adds): the logs and the model
    are the same bytes. Before the distractors went through index_select, the second run's loss moved
    in the 7th digit within 5 updates under load."""
    args = [
        "--name",
        "tapt",
        "--mode",
        "tapt",
        "--recipe",
        recipe,
        "--fold",
        1,
        "--data",
        corpus,
        "--checkpoint",
        "random-tiny",
        "--updates",
        16,
        "--warmup",
        4,
        "--batch-size",
        8,
        "--max-seconds",
        2,
        "--lr",
        "2e-3",
        "--workers",
        0,
        "--no-progress",
        "--device",
        "cpu",
    ]
    quiet = script("pretrain.py", *args, "--out", tmp_path / "quiet")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        loaded = script("pretrain.py", *args, "--out", tmp_path / "loaded")
    finally:
        for p in busy:
            p.kill()
            p.wait()
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    a, b = tmp_path / "quiet" / "tapt" / "fold1", tmp_path / "loaded" / "tapt" / "fold1"
    assert len(read_log(a / "tapt.log.jsonl")) >= 2
    assert (a / "tapt.log.jsonl").read_bytes() == (b / "tapt.log.jsonl").read_bytes()
    assert_same_weights(a / "pretrained.pt", b / "pretrained.pt", atol=0)


def test_torchrun_tapt_runs_the_same_updates(corpus, tmp_path):
    """TAPT's Gumbel noise and per-process codebook perplexity (as in fairseq's multi-GPU runs) make
    two processes differ from one; the run must still take the same updates and write one model."""
    args = [
        "--mode",
        "tapt",
        "--fold",
        1,
        "--data",
        corpus,
        "--checkpoint",
        "random-tiny",
        "--updates",
        5,
        "--batch-size",
        8,
        "--warmup",
        2,
        "--lr",
        "5e-4",
        "--workers",
        0,
        "--no-progress",
        "--device",
        "cpu",
        "--out",
        tmp_path,
    ]
    two = torchrun("pretrain.py", *args)
    assert two.returncode == 0, two.stderr[-3000:]
    log = read_log(tmp_path / "tapt" / "fold1" / "tapt.log.jsonl")
    assert log[-1]["update"] == 5 and all(np.isfinite(r["loss"]) for r in log)
    assert C.load_wav2vec2(tmp_path / "tapt" / "fold1" / "pretrained.pt").cfg.has_quantizer


# =============================================================================
# GPU: on a CUDA GPU only, skipped elsewhere: `pytest test_all.py -k gpu` (two minutes, estimated). The first checks
# to run when a GPU is lent; BENCHMARKS.md says which of them have ever run.

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def no_tf32():
    # float32 comparisons against the CPU need full float32 matmuls and convolutions
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@needs_gpu
@pytest.mark.usefixtures("no_tf32")
def test_gpu_forward_matches_cpu():
    """A padded batch on the GPU (per-utterance group norm, CUDA attention kernels) gives the CPU's frame
    features; under bf16 autocast they stay within a few percent."""
    net = random_model(tiny_config(), seed=3)
    wav = torch.randn(3, 16000, generator=torch.Generator().manual_seed(0)) * 0.1
    lengths = torch.tensor([16000, 9000, 12345])
    with torch.no_grad():
        ref, ref_lengths = net(wav, lengths)
        gpu = net.cuda()
        out, out_lengths = gpu(wav.cuda(), lengths.cuda())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low, _ = gpu(wav.cuda(), lengths.cuda())
    assert torch.equal(out_lengths.cpu(), ref_lengths)
    for i, n in enumerate(ref_lengths.tolist()):
        torch.testing.assert_close(out[i, :n].cpu(), ref[i, :n], atol=1e-4, rtol=1e-4)
        assert float((low[i, :n].float().cpu() - ref[i, :n]).abs().max()) < 0.05 * float(
            ref[i, :n].abs().max()
        )


@needs_gpu
def test_gpu_kmeans_matches_cpu(monkeypatch):
    """k-means on the GPU, with the frames staged there or streamed from the CPU in chunks, ends where
    the CPU fit ends, under TF32 allowed globally too (kmeans.no_tf32 guards its matmuls); labelling on the
    GPU gives the CPU's labels."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    x = frames_like(6000, dim=384)
    init = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:32]].clone()
    fit = lambda device: fit_kmeans(
        x, ks=(32,), iters=10, init=init, max_samples=BIG, device=device, progress=False
    )[32]
    cpu, gpu = fit("cpu"), fit("cuda")
    free, total = torch.cuda.mem_get_info()
    monkeypatch.setattr(
        torch.cuda, "mem_get_info", lambda device=None: (0, total)
    )  # as when they do not fit
    streamed = fit("cuda")  # the frames stay on the CPU, chunks go to the GPU
    for r in (gpu, streamed):
        torch.testing.assert_close(r.centroids, cpu.centroids, atol=1e-3, rtol=0)
        assert r.inertia[-1] == pytest.approx(cpu.inertia[-1], rel=1e-5) and r.counts.sum() == len(
            x
        )
    assert (
        assign(x, gpu.centroids, device="cuda") == assign(x, gpu.centroids, device="cpu")
    ).float().mean() > 0.999


@needs_gpu
def test_gpu_training_scripts_run(corpus, tmp_path):
    """V-FT (bf16 where the GPU has it), TAPT and P-TAPT on the GPU finish with finite losses, and evaluate.py
    retests the fine-tuned model there."""
    common = ["--fold", 1, "--data", corpus, "--out", tmp_path, "--device", "cuda"]
    r = script("finetune.py", *common, "--epochs", 2, "--train-fraction", 0.5, *TINY_RUN)
    assert r.returncode == 0, r.stderr[-3000:]
    pre = [
        *common,
        "--checkpoint",
        "random-tiny",
        "--batch-size",
        4,
        "--warmup",
        1,
        "--workers",
        0,
        "--no-progress",
    ]
    r = script("pretrain.py", "--mode", "tapt", "--updates", 3, *pre)
    assert r.returncode == 0, r.stderr[-3000:]
    r = script(
        "pretrain.py", "--mode", "ptapt", "--updates", 3, "--teacher-updates", 3, "--ks", 4, 8, *pre
    )
    assert r.returncode == 0, r.stderr[-3000:]
    logs = [
        tmp_path / "vft" / "fold1" / "run0" / "log.jsonl",
        tmp_path / "tapt" / "fold1" / "tapt.log.jsonl",
        tmp_path / "ptapt" / "fold1" / "teacher.log.jsonl",
        tmp_path / "ptapt" / "fold1" / "ptapt.log.jsonl",
    ]
    for log in logs:
        assert all(math.isfinite(row["loss"]) for row in read_log(log)), log
    run_dir = tmp_path / "vft" / "fold1" / "run0"
    r = script(
        "evaluate.py",
        "--checkpoint",
        run_dir / "model.pt",
        "--data",
        corpus,
        "--fold",
        1,
        "--device",
        "cuda",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads(r.stdout.strip().splitlines()[-1])
    # (the run tested under bf16 autocast, evaluate.py in float32: a near-tie may flip, 1 of 24 is 0.042 of UA)
    assert again["ua"] == pytest.approx(
        json.loads((run_dir / "metrics.json").read_text())["ua"], abs=0.15
    )


@needs_gpu
def test_gpu_bench_small_runs(tmp_path):
    """bench.py's GPU paths (CUDA timing and peak memory, bf16, fused Adam, pinned copies, MFU) run end
    to end at the small scale; the numbers themselves belong in BENCHMARKS.md, not here."""
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(HERE, "bench.py"),
            "--small",
            "--device",
            "cuda",
            "--cases",
            "1,3,4,5,6,7",
            "--repeats",
            "2",
            "--warmup",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    mfu = [row["mfu"] for row in results["6"]["rows"]]
    assert mfu and all(0 < m <= 1 for m in mfu)
    assert all(row["peak_mb"] for row in results["1"]["rows"])
