"""The project's tests: `pytest test_all.py`. Independent references where they exist
(torchaudio's wav2vec 2.0 and fairseq key converter, scikit-learn's k-means, hand-computed
metrics, loss references written from the formulas)."""
import argparse
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import model as M

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# fairseq-format checkpoints written by the tests


def tiny_config(**kw):
    base = dict(conv_layers=[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2, embed_dim=64, ffn_dim=128,
                num_layers=3, num_heads=4, pos_conv_kernel=16, pos_conv_groups=4, final_dim=32, latent_vars=20)
    base.update(kw)
    return M.Wav2Vec2Config(**base)


TINY_GN = dict()                                                           # group norm, post-LN
TINY_LN = dict(extractor_mode="layer_norm", conv_bias=True, layer_norm_first=True, normalize=True)
BASE = dict(conv_layers=list(M.BASE_CONV_LAYERS), embed_dim=768, ffn_dim=3072, num_layers=12, num_heads=12,
            pos_conv_kernel=128, pos_conv_groups=16, final_dim=256, latent_vars=320)


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
    """This model's parameters under fairseq's names (the inverse of model.fairseq_key)."""
    out = {}
    ln_mode = net.cfg.extractor_mode == "layer_norm"
    for k, v in net.state_dict().items():
        if k.startswith("feature_encoder.convs."):
            i, what = k.split(".")[2:]
            k = f"feature_extractor.conv_layers.{i}.0.{what}"
        elif k.startswith("feature_encoder.norms."):
            i, what = k.split(".")[2:]
            k = f"feature_extractor.conv_layers.{i}.2.1.{what}" if ln_mode else f"feature_extractor.conv_layers.{i}.2.{what}"
        elif k.startswith("encoder.pos_conv."):
            k = "encoder.pos_conv.0." + k.split(".")[-1]
        out[k] = v.clone()
    return out


def fairseq_args(cfg):
    layers = " + ".join(f"[{tuple(x)}]" for x in cfg.conv_layers)
    return dict(arch="wav2vec2", extractor_mode=cfg.extractor_mode, conv_feature_layers=layers,
                conv_bias=cfg.conv_bias, encoder_embed_dim=cfg.embed_dim, encoder_ffn_embed_dim=cfg.ffn_dim,
                encoder_layers=cfg.num_layers, encoder_attention_heads=cfg.num_heads,
                layer_norm_first=cfg.layer_norm_first, conv_pos=cfg.pos_conv_kernel,
                conv_pos_groups=cfg.pos_conv_groups, final_dim=cfg.final_dim, latent_vars=cfg.latent_vars,
                latent_groups=cfg.latent_groups, latent_temp="(2,0.5,0.999995)", dropout=0.1,
                encoder_layerdrop=0.05, feature_grad_mult=0.1, normalize=cfg.normalize, quantize_targets=True)


def write_fairseq(path, net, style):
    """Write `net` as fairseq would: style in args | cfg | omegaconf | asr | legacy."""
    state, a = to_fairseq_state(net), fairseq_args(net.cfg)
    extra = {"optimizer_history": [{"criterion_name": "Wav2vecCriterion", "num_updates": 400000}],
             "extra_state": {"epoch": 57, "train_iterator": {"epoch": 57}}}
    if style in ("args", "legacy"):
        obj = {"args": argparse.Namespace(**a), "model": state, **extra}
    elif style == "cfg":
        obj = {"cfg": {"model": {"_name": "wav2vec2", **a}, "task": {"_name": "audio_pretraining",
                                                                   "normalize": net.cfg.normalize}},
               "model": state, **extra}
    elif style == "omegaconf":
        from omegaconf import OmegaConf  # only the test writes omegaconf objects; the loader never imports it
        cfg = OmegaConf.create({"model": {"_name": "wav2vec2", **a},
                                "task": {"_name": "audio_pretraining", "normalize": net.cfg.normalize}})
        obj = {"cfg": cfg, "model": state, **extra}
    elif style == "asr":
        inner = {"model": {"_name": "wav2vec2", **a}, "task": {"normalize": net.cfg.normalize}}
        asr_state = {f"w2v_encoder.w2v_model.{k}": v for k, v in state.items()
                     if not k.startswith(("quantizer", "project_q", "final_proj"))}
        asr_state["w2v_encoder.proj.weight"] = torch.randn(32, net.cfg.embed_dim)
        asr_state["w2v_encoder.proj.bias"] = torch.randn(32)
        obj = {"cfg": {"model": {"_name": "wav2vec_ctc", "w2v_args": inner, "dropout": 0.0},
                       "task": {"normalize": net.cfg.normalize}}, "model": asr_state, **extra}
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
        extractor_conv_layer_config=[tuple(x) for x in cfg.conv_layers], extractor_conv_bias=cfg.conv_bias,
        encoder_embed_dim=cfg.embed_dim, encoder_projection_dropout=0.0, encoder_pos_conv_kernel=cfg.pos_conv_kernel,
        encoder_pos_conv_groups=cfg.pos_conv_groups, encoder_num_layers=cfg.num_layers,
        encoder_num_heads=cfg.num_heads, encoder_attention_dropout=0.0, encoder_ff_interm_features=cfg.ffn_dim,
        encoder_ff_interm_dropout=0.0, encoder_dropout=0.0, encoder_layer_norm_first=cfg.layer_norm_first,
        encoder_layer_drop=0.0, aux_num_out=None)
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


@pytest.mark.parametrize("variant,style", [("gn", "args"), ("gn", "omegaconf"), ("gn", "legacy"),
                                           ("ln", "cfg"), ("ln", "asr"), ("base", "args")])
def test_matches_torchaudio(tmp_path, variant, style):
    cfg = tiny_config(**{"gn": TINY_GN, "ln": TINY_LN}[variant]) if variant != "base" else M.Wav2Vec2Config(**BASE)
    net = random_model(cfg)
    path = tmp_path / "ckpt.pt"
    fs_state = write_fairseq(path, net, style)
    ours = M.load_wav2vec2(path)
    assert not ours.training and ours.cfg.normalize == cfg.normalize
    assert ours.cfg.has_quantizer == (style != "asr")
    ta = torchaudio_model(cfg, fs_state)
    g = torch.Generator().manual_seed(1)
    lengths = [16000, 11000, 6400] if variant != "base" else [8000, 4800]
    wav = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        wav[i, :n] = torch.randn(n, generator=g) * 0.1
    lens = torch.tensor(lengths)
    with torch.no_grad():
        for k in list(range(1, cfg.num_layers + 1)) + [None]:
            hidden, frames = ours(wav, lens, layer=k)
            for i, n in enumerate(lengths):
                ta_layers, ta_final = torchaudio_layers(ta, cfg, wav[i:i + 1, :n])
                ref = ta_final[0] if k is None else ta_layers[k - 1][0]
                assert frames[i] == ref.shape[0]
                # batched (padded) and single unpadded utterances both match the reference
                torch.testing.assert_close(hidden[i, :frames[i]], ref, atol=1e-4, rtol=1e-4)
                single, _ = ours(wav[i:i + 1, :n], layer=k)
                torch.testing.assert_close(single[0], ref, atol=1e-4, rtol=1e-4)
            assert hidden[2:, frames[-1]:].abs().sum() == 0 if len(lengths) > 2 else True


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
        torch.testing.assert_close(ours[i, :frames[i]], ref[i, :frames[i]], atol=1e-4, rtol=1e-4)


def test_batch_invariance_group_norm():
    """An utterance's features do not depend on its batch-mates (group norm over valid frames)."""
    net = random_model(tiny_config())
    wav, lens = torch.randn(2, 20000), torch.tensor([20000, 5000])
    with torch.no_grad():
        batched, frames = net(wav, lens)
        alone, _ = net(wav[1:, :5000])
    torch.testing.assert_close(batched[1, :frames[1]], alone[0], atol=1e-5, rtol=1e-5)


def test_frame_lengths_conv_arithmetic():
    net = M.Wav2Vec2(M.Wav2Vec2Config(**BASE))
    # fairseq base: 400-sample receptive field, 320-sample hop: 1 s -> 49 frames
    assert net.frame_lengths(torch.tensor([400, 719, 720, 16000, 160000])).tolist() == [1, 1, 2, 49, 499]


def test_project_checkpoint_roundtrip_weights_only(tmp_path):
    net = random_model(tiny_config(**TINY_LN))
    path = tmp_path / "ours.pt"
    M.save_wav2vec2(net, path, meta={"note": "x"})
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "w2v2-ser/wav2vec2" and raw["meta"] == {"note": "x"}
    back = M.load_wav2vec2(path)
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
    with pytest.raises(M.CheckpointError, match="refusing to load"):
        M.load_wav2vec2(path)
    assert not os.path.exists("/tmp/w2v2_ser_pwned")


def test_bad_checkpoints_get_clear_errors(tmp_path):
    net = random_model(tiny_config())
    good = tmp_path / "good.pt"
    write_fairseq(good, net, "args")
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(M.CheckpointError, match="trunc.pt.*not a readable"):
        M.load_wav2vec2(tmp_path / "trunc.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(M.CheckpointError, match="text.pt"):
        M.load_wav2vec2(tmp_path / "text.pt")
    with pytest.raises(M.CheckpointError, match="no such checkpoint"):
        M.load_wav2vec2(tmp_path / "absent.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(M.CheckpointError, match="not a model checkpoint"):
        M.load_wav2vec2(tmp_path / "other.pt")
    # another model family, named as such
    state = to_fairseq_state(net)
    torch.save({"cfg": {"model": {"_name": "hubert"}}, "model": {**state, "label_embs_concat": torch.zeros(3)}},
               tmp_path / "hubert.pt")
    with pytest.raises(M.CheckpointError, match="HuBERT"):
        M.load_wav2vec2(tmp_path / "hubert.pt")
    torch.save({"args": argparse.Namespace(arch="wav2vec"), "model": {"feature_aggregator.0.weight": torch.zeros(1)}},
               tmp_path / "v1.pt")
    with pytest.raises(M.CheckpointError, match=r"wav2vec \(v1\)"):
        M.load_wav2vec2(tmp_path / "v1.pt")
    # a missing key, an unexpected key, a shape that does not fit the configuration: all named
    for edit, pattern in [(lambda s: s.pop("encoder.layers.0.fc1.weight"), "missing.*encoder.layers.0.fc1.weight"),
                          (lambda s: s.__setitem__("encoder.layers.0.extra.weight", torch.zeros(1)), "encoder.layers.0.extra"),
                          (lambda s: s.__setitem__("post_extract_proj.weight", torch.zeros(64, 31)),
                           "post_extract_proj.weight: file \\(64, 31\\)")]:
        s = to_fairseq_state(net)
        edit(s)
        torch.save({"args": argparse.Namespace(**fairseq_args(net.cfg)), "model": s}, tmp_path / "bad.pt")
        with pytest.raises(M.CheckpointError, match=pattern):
            M.load_wav2vec2(tmp_path / "bad.pt")


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
    expect = torch.cat([q.vars[0, g * q.num_vars + logits[:, g].argmax(-1)] for g in range(q.groups)], -1)
    torch.testing.assert_close(codes, expect)
    assert 1 <= ppl.item() <= q.groups * q.num_vars
    q.set_num_updates(0)
    assert q.temperature == 2.0
    q.set_num_updates(1000)
    assert q.temperature == pytest.approx(2.0 * 0.999995 ** 1000)
    q.set_num_updates(10 ** 7)
    assert q.temperature == 0.5
