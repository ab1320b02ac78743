"""A synthetic corpus in IEMOCAP's exact layout, for the quick start and the tests.

    python synth.py data/synth          # 5 sessions x 80 utterances, 1-8 s, about 6 s to write

Each utterance is a voiced syllable train whose prosody (pitch, range, slope, rate, pauses, level,
...) follows one of the four emotions, spoken by a session's two speakers; the label files, dialog
folders, dropped labels ("fru", "xxx", ...), annotator lines and macOS "._*" files are laid out as
IEMOCAP_full_release lays them out, so data.load_iemocap reads it through the real code path.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import soundfile as sf

from data import SAMPLE_RATE, SESSIONS, DataError, load_iemocap

# Each cue overlaps between some classes (ang and hap both high and loud, neu and sad both low and
# flat) and loudness varies by speaker and recording, so several cues are needed. pitch: x the
# speaker's f0; range: sd of syllable accents (semitones); slope, glide: pitch change over a phrase,
# a syllable (st); rate: syllables/s; pause: x phrase pauses; level: dBFS of the voiced part;
# stress: sd of syllable loudness (dB); sharp: exponent of the syllable envelope (low: abrupt
# onsets); tilt: spectral slope (dB/octave, low: bright); breath: aspiration noise / harmonics;
# jitter: f0 perturbation.
CUES = "pitch range slope glide rate pause level stress sharp tilt breath jitter".split()
EMOTION_STYLE = {
    name: dict(zip(CUES, values))
    for name, values in (
        ("neu", (1.00, 1.0, -1.5, 0.0, 4.0, 1.0, -30.0, 1.5, 1.0, 9.0, 0.10, 0.003)),
        ("ang", (1.22, 2.0, -3.0, -1.0, 5.2, 0.7, -24.0, 3.0, 0.4, 4.5, 0.05, 0.015)),
        ("hap", (1.40, 3.5, 1.5, 2.0, 4.6, 0.9, -27.0, 2.5, 0.8, 7.0, 0.12, 0.004)),
        ("sad", (0.86, 0.6, -2.5, -0.5, 2.8, 1.8, -34.0, 1.0, 2.0, 12.0, 0.35, 0.003)),
    )
}
EMOTION_STYLE["exc"] = EMOTION_STYLE["hap"]
FOUR_CLASSES = ("neu", "ang", "sad", "hap")
DROPPED_LABELS = ("fru", "sur", "xxx", "fea", "oth", "dis")  # voiced in a random one of the four
ANNOTATOR_NAMES = dict(neu="Neutral", ang="Anger", sad="Sadness", hap="Happiness", exc="Excited")
ANNOTATOR_NAMES.update(fru="Frustration", sur="Surprise", fea="Fear", oth="Other", dis="Disgust")
VAD = dict(neu=(3, 2.5, 2.5), ang=(1.5, 4, 4), sad=(2, 2, 2), hap=(4, 3.5, 3), exc=(4, 4, 3.5))
DECOY_LABELS = dict(neu="ang", ang="sad", sad="hap", hap="neu", exc="neu")
DIALOGS = ("F_impro01", "M_impro01", "F_script01_1", "M_script01_2")
DIALOGS += ("F_impro02", "M_impro02", "F_script02_1", "M_script02_2")
APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(56)  # "._*" files' start
LABEL_FILE_HEADER = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"
MARKER = "SYNTHETIC_CORPUS.json"  # marks a folder as this generator's, which it may replace

# 80 per session: the quick start's test session then has 80 utterances (one is 1.25 points of UA)
# and 320 to train on.
SYNTH_PER_SESSION = 80


def speaker_voice(rng, sex):
    female = sex == "F"
    formants = np.array([620, 1500, 2650]) * (1.17 if female else 1.0)
    return dict(
        f0=rng.uniform(195, 235) if female else rng.uniform(100, 125),
        formants=formants * rng.uniform(0.92, 1.08, 3),
        tilt=rng.normal(0, 1.0) + (1.0 if female else 0.0),
        level=rng.normal(0, 2.0),
        rate=rng.uniform(0.9, 1.1),
        breath=rng.uniform(0.7, 1.4),
    )


def syllables(rng, rate, pause, seconds):
    """Syllable (start, end) and the (start, end) of their phrase, in seconds."""
    spans, phrases = [], []
    t = rng.uniform(0.05, 0.2)
    while t < seconds - 0.15:
        first = len(spans)
        for _ in range(rng.integers(3, 9)):
            period = rng.gamma(6.0, 1.0 / (6.0 * rate))
            if t + 0.75 * period > seconds - 0.05:
                break
            spans.append((t, t + 0.75 * period))  # the last quarter is a consonant-like gap
            t += period
        if len(spans) > first:
            phrases += [(spans[first][0], spans[-1][1])] * (len(spans) - first)
        t += rng.uniform(0.1, 0.3) * pause
    if not spans:  # a very short utterance: one syllable
        spans, phrases = [(0.02, seconds - 0.02)], [(0.02, seconds - 0.02)]
    spans, phrases = np.array(spans), np.array(phrases)
    return spans[:, 0], spans[:, 1], phrases[:, 0], phrases[:, 1]


def synth_utterance(rng, voice, style, seconds, noise_floor_db):
    """Harmonics of a syllable-wise f0 contour, shaped by the voice, plus breath noise."""
    sr, cr = SAMPLE_RATE, 200  # envelopes and pitch are drawn at a 200 Hz control rate
    rms = lambda v: float(np.sqrt(np.mean(np.square(v)))) + 1e-12
    n = int(round(seconds * sr))
    rate = style["rate"] * voice["rate"] * math.exp(rng.normal(0, 0.08))
    starts, ends, phrase_starts, phrase_ends = syllables(rng, rate, style["pause"], seconds)
    tc = np.arange(int(seconds * cr) + 2) / cr
    k = np.clip(np.searchsorted(starts, tc, side="right") - 1, 0, None)
    inside = (tc >= starts[k]) & (tc < ends[k])
    frac = np.clip((tc - starts[k]) / (ends[k] - starts[k]), 0, 1)
    stress = 10 ** (rng.normal(0, style["stress"], len(starts)) / 20)
    envelope = np.where(inside, np.sin(np.pi * frac) ** style["sharp"], 0.0) * stress[k]
    accents = rng.normal(0, style["range"] * math.exp(rng.normal(0, 0.15)), len(starts))
    progress = np.clip((tc - phrase_starts[k]) / (phrase_ends[k] - phrase_starts[k] + 1e-9), 0, 1)
    semitones = accents[k] + style["slope"] * progress + style["glide"] * frac
    semitones = np.convolve(semitones, np.ones(8) / 8, mode="same")  # smooth syllable jumps
    f0c = voice["f0"] * style["pitch"] * math.exp(rng.normal(0, 0.04)) * 2 ** (semitones / 12)
    f0c *= 1 + style["jitter"] * rng.standard_normal(len(tc))
    t = np.arange(n) / sr
    f0, amplitude = np.interp(t, tc, f0c), np.interp(t, tc, envelope)
    # Wrapped in float64, then float32: the sines below are several times faster in float32.
    phase = np.mod(2 * np.pi * np.cumsum(f0) / sr, 2 * np.pi).astype(np.float32)
    # Band-limited pulse train: sum_{h=1..H} cos(h phase) in closed form (Dirichlet kernel), O(n).
    harmonics = max(1, int(7000 / f0.max()))
    half = np.sin(phase / 2)
    ok = np.abs(half) > 1e-6
    safe_half = np.where(ok, half, 1.0)
    pulses = np.where(ok, np.sin((harmonics + 0.5) * phase) / (2 * safe_half) - 0.5, harmonics)
    # Shape harmonics and breath noise in the frequency domain, with the smallest FFT size
    # 2^a 3^b 5^c >= n: other sizes (large primes above all) are many times slower.
    odd = [3**b * 5**c for b in range(n.bit_length() + 1) for c in range(n.bit_length() + 1)]
    nfft = min(p << max(0, (-(-n // p) - 1).bit_length()) for p in odd)
    freqs = np.fft.rfftfreq(nfft, 1 / sr)
    octaves = np.log2(np.maximum(freqs, 100.0) / 100.0)
    formants = sum(
        12.0 * np.exp(-0.5 * ((freqs - f) / (60 + 0.06 * f)) ** 2) for f in voice["formants"]
    )
    tilt = style["tilt"] + voice["tilt"] + rng.normal(0, 0.8)
    gains = 10 ** (np.stack([formants - tilt * octaves, 0.5 * formants - 2 * octaves]) / 20)
    spectra = np.fft.rfft(np.stack([pulses, rng.standard_normal(n)]), nfft) * gains
    voiced, breath = np.fft.irfft(spectra, nfft)[:, :n]
    breath_ratio = style["breath"] * voice["breath"] * math.exp(rng.normal(0, 0.2))
    x = amplitude * (voiced / rms(voiced) + breath_ratio * breath / rms(breath))
    # speaker and recording gain vary too; the level is that of the voiced part
    level_db = style["level"] + voice["level"] + rng.normal(0, 2.5)
    x *= 10 ** (level_db / 20) / rms(x[amplitude >= 0.1 * amplitude.max()])
    x += 10 ** (noise_floor_db / 20) * rng.standard_normal(n)
    peak = np.abs(x).max()
    return (x * (0.99 / peak) if peak > 0.99 else x).astype(np.float32)


def plan_session(rng, session, per_session, min_seconds, max_seconds):
    """[(dialog, uid, label, sex, seconds)] in dialog order, both speakers in every dialog."""
    labels = [FOUR_CLASSES[i % 4] for i in range(per_session)]
    labels = ["exc" if lab == "hap" and rng.random() < 0.6 else lab for lab in labels]  # 595/1041
    sexes = ["FM"[(i // 4) % 2] for i in range(per_session)]  # every speaker voices every emotion
    extra = round(0.2 * per_session)
    labels += [str(lab) for lab in rng.choice(DROPPED_LABELS, extra)]
    sexes += ["FM"[i % 2] for i in range(extra)]
    names = DIALOGS[: max(1, min(len(DIALOGS), len(labels) // 12))]
    dialogs = [f"Ses0{session}{name}" for name in names]
    turns = {d: [] for d in dialogs}
    for sex in "FM":  # deal each speaker's turns round-robin so every dialog has both speakers
        mine = [i for i in rng.permutation(len(labels)) if sexes[i] == sex]
        for j, i in enumerate(mine):
            turns[dialogs[j % len(dialogs)]].append(i)
    plan = []
    for d in dialogs:
        counters = {"F": 0, "M": 0}
        for i in rng.permutation(turns[d]):
            sex = sexes[i]
            uid = f"{d}_{sex}{counters[sex]:03d}"
            counters[sex] += 1
            seconds = min_seconds + (max_seconds - min_seconds) * rng.beta(2.0, 2.6)  # mean ~4 s
            plan.append((d, uid, labels[i], sex, seconds))
    return plan


def label_block(rng, uid, label, times):
    """The release's block for one turn: label line, evaluators' categories and attributes."""
    v, a, d = (np.clip(x + rng.normal(0, 0.3), 1, 5) for x in VAD.get(label, (3, 3, 3)))
    no_majority = ["Frustration", "Anger", "Neutral"]
    names = no_majority if label == "xxx" else [ANNOTATOR_NAMES[label]] * 3
    lines = [f"{times}\t{uid}\t{label}\t[{v:.4f}, {a:.4f}, {d:.4f}]"]
    lines += [f"C-{who}:\t{name};\t()" for who, name in zip(("E2", "E3", "F1"), names)]
    scores = f"val {round(v)}; act {round(a)}; dom  {round(d)};"
    lines += [f"A-{who}:\t{scores}\t()" for who in ("E1", "F1")]
    return "\n".join(lines) + "\n\n"


def synthesize_session(root, s, per_session, seed, min_seconds, max_seconds):
    """One session: two speakers' wavs, their dialogs' label files, decoys and "._*" junk."""
    rng_for = lambda *key: np.random.default_rng([seed, s, *key])
    voices = {sex: speaker_voice(rng_for(1, j), sex) for j, sex in enumerate("FM")}
    noise_floor_db = rng_for(2).uniform(-58, -48)
    plan = plan_session(rng_for(3), s, per_session, min_seconds, max_seconds)
    texts, clock = {}, {}  # texts: file under EmoEvaluation -> its text
    for j, (dialog, uid, label, sex, seconds) in enumerate(plan):
        rng = rng_for(4, j)
        style = EMOTION_STYLE.get(label) or EMOTION_STYLE[FOUR_CLASSES[rng.integers(4)]]
        wav = synth_utterance(rng, voices[sex], style, seconds, noise_floor_db)
        wav_dir = os.path.join(root, f"Session{s}", "sentences", "wav", dialog)
        write_file(os.path.join(wav_dir, f"._{uid}.wav"), APPLEDOUBLE)  # makes the folder
        sf.write(os.path.join(wav_dir, uid + ".wav"), wav, SAMPLE_RATE, subtype="PCM_16")
        start = clock.get(dialog, 0.0) + rng.uniform(0.3, 2.0)
        clock[dialog] = start + len(wav) / SAMPLE_RATE
        times = f"[{start:.4f} - {clock[dialog]:.4f}]"
        block = label_block(rng, uid, label, times)
        texts[dialog + ".txt"] = texts.get(dialog + ".txt", LABEL_FILE_HEADER) + block
        texts[f"._{dialog}.txt"] = APPLEDOUBLE
        # Decoys parse as label lines with other labels: a reader walking the subfolders miscounts.
        decoy = f"{times}\t{uid}\t{DECOY_LABELS.get(label, 'neu')}\t[3.0000, 3.0000, 3.0000]\n"
        for name in ("Categorical/{}_e2_cat", "Attribute/{}_e2_atr", "Self-evaluation/{}"):
            name = name.format(dialog) + ".txt"
            texts[name] = texts.get(name, "") + decoy
    for name, text in texts.items():
        write_file(os.path.join(root, f"Session{s}", "dialog", "EmoEvaluation", name), text)


def write_file(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)


def synthesize_iemocap(
    out_dir, utterances_per_session=SYNTH_PER_SESSION, seed=0, min_seconds=1.0, max_seconds=8.0
):
    """A synthetic corpus with out_dir as the release root: per session, two speakers'
    utterances_per_session 4-class utterances (plus ~20% labelled fru/sur/xxx/fea/oth/dis, which the
    reader drops), the release's label files, decoy annotator folders and "._*" files."""
    out_dir, per_session = os.fspath(out_dir), utterances_per_session
    if int(per_session) < 1:
        raise DataError(f"utterances per session {per_session}, expected >= 1")
    if not 0.05 < min_seconds <= max_seconds:
        durations = f"utterance durations {min_seconds}..{max_seconds} s"
        raise DataError(f"{durations}, expected 0.05 < min <= max")
    # Written beside out_dir and renamed when complete: an interrupted run leaves no half corpus.
    # The marker goes in first: a killed run's leftovers are recognised as this generator's.
    marker = dict(generator="synth.py synthesize_iemocap", utterances_per_session=per_session)
    marker.update(seed=seed, min_seconds=min_seconds, max_seconds=max_seconds)
    partial = os.path.normpath(out_dir) + ".partial"
    try:
        for folder in (out_dir, partial):  # replace only an empty folder or what this wrote
            mine = os.path.isfile(os.path.join(folder, MARKER))
            if os.path.isdir(folder) and os.listdir(folder) and not mine:
                why = "exists and is not empty (and is not a synthetic corpus)"
                raise DataError(f"{folder} {why}: choose a new folder")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            write_file(os.path.join(partial, MARKER), json.dumps(marker) + "\n")
            for s in SESSIONS:
                synthesize_session(partial, s, int(per_session), seed, min_seconds, max_seconds)
            if os.path.isdir(out_dir):
                shutil.rmtree(out_dir)
            os.rename(partial, out_dir)
        except BaseException:  # KeyboardInterrupt included
            shutil.rmtree(partial, ignore_errors=True)
            raise
    except (OSError, sf.LibsndfileError) as e:
        raise DataError(f"{out_dir}: cannot write the synthetic corpus ({e})") from None


# ============================================================================ command line


def build_parser():
    from train import COUNT, POSITIVE, OneLineParser

    parser = OneLineParser(
        description="Write a synthetic corpus in IEMOCAP's layout, with OUT as the release root.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("out", metavar="OUT", help="the folder to write (refused if it holds anything else)")
    per_session = "4-class utterances per session (plus about 20%% with dropped labels)"
    add("--per-session", type=COUNT, default=SYNTH_PER_SESSION, help=per_session)
    add("--seed", type=int, default=0, help="random seed: the same seed, the same bytes")
    add("--min-seconds", type=POSITIVE, default=1.0, help="shortest utterance")
    add("--max-seconds", type=POSITIVE, default=8.0, help="longest utterance")
    return parser


def main(argv=None):
    from train import user_errors

    args = build_parser().parse_args(argv)
    with user_errors():
        t0 = time.time()
        synthesize_iemocap(
            args.out, args.per_session, args.seed, args.min_seconds, args.max_seconds
        )
        utterances = load_iemocap(args.out)
        hours = sum(u.num_samples for u in utterances) / SAMPLE_RATE / 3600
        n, took = len(utterances), time.time() - t0
        print(f"wrote {n} 4-class utterances ({hours:.2f} h) to {args.out} in {took:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
