"""Data for speech emotion recognition: audio reading; IEMOCAP read from the release's own label
files; custom corpora (the original release's label .json, or a .csv manifest); the dataset and
the batch sampler; P-TAPT's pseudo-label file; the command line, `python data.py --data X`, which
prints X's utterances per session (or split) and class.

Every problem in a user's data raises DataError naming the file or value and what was expected
(a file that cannot be read at all: OSError); the scripts print either as one line, exit code 2."""

import argparse
import csv
import json
import os
import pickle
import re
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import torch

from checkpoints import save_atomic
from model import MIN_SAMPLES, SAMPLE_RATE

# The release's label order is alphabetical over its label names; exc is merged into hap, the
# other labels are dropped.
CLASSES = ("ang", "hap", "neu", "sad")
IEMOCAP_LABELS = {"neu": "neu", "ang": "ang", "sad": "sad", "hap": "hap", "exc": "hap"}
SESSIONS = (1, 2, 3, 4, 5)
IEMOCAP_SESSION_SIZES = {1: 1085, 2: 1023, 3: 1151, 4: 1031, 5: 1241}  # 5531 in all, for reference
SPLITS = ("train", "val", "test")


class DataError(Exception):
    """A problem with the user's data. Scripts print the message and exit with code 2."""


class DataWarning(UserWarning):
    """Files skipped while reading a corpus (a few bad files should not stop a run)."""


def _format_warning(message, category, *args, _default=warnings.formatwarning, **kwargs):
    # A DataWarning is for the scripts' users: one line "warning: ...", as their errors are one line
    # "error: ...", not Python's "file:line: DataWarning: ..." and the source line that warned.
    if issubclass(category, DataWarning):
        return f"warning: {message}\n"
    return _default(message, category, *args, **kwargs)


warnings.formatwarning = _format_warning


@dataclass(frozen=True)
class Utterance:
    # unique in its corpus. IEMOCAP: the release's name, e.g. "Ses01F_impro01_F000"; a .json or .csv
    # corpus: the wav's path relative to the corpus folder without its extension, e.g. "spk1/001"
    uid: str
    path: str  # wav path
    label: str  # class name after mapping
    num_samples: int  # length at 16 kHz, from the header (no decoding)
    session: int | None = None  # IEMOCAP session 1..5
    split: str | None = None  # "train" / "val" / "test" for custom corpora


# -----------------------------------------------------------------------------
# Audio files


def audio_num_samples(path):
    """Length in samples at 16 kHz, read from the file header; DataError if the file is unusable."""
    info = _soundfile(sf.info, path)
    return checked_length(path, info.frames, info.samplerate)


def read_audio(path):
    """Decode a file to a float32 (T,) mono tensor at 16 kHz (channels averaged)."""
    samples, samplerate = _soundfile(sf.read, path, dtype="float32", always_2d=True)
    checked_length(path, len(samples), samplerate)
    wav = torch.from_numpy(np.ascontiguousarray(samples.mean(axis=1, dtype=np.float32)))
    if not torch.isfinite(wav).all():
        raise DataError(f"{path}: audio contains NaN or infinite samples")
    if samplerate != SAMPLE_RATE:
        import torchaudio.functional  # here: slow to import, needed for non-16 kHz files only

        wav = torchaudio.functional.resample(wav, samplerate, SAMPLE_RATE)
    return wav


def _soundfile(read, path, **kwargs):
    if not os.path.isfile(path):
        raise DataError(f"{path}: audio file not found")
    try:
        return read(path, **kwargs)
    except Exception as e:  # libsndfile raises several types for garbage; all mean "not audio"
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{path}: not a readable audio file ({first_line})") from None


def checked_length(path, frames, samplerate):
    # Rounded up, exactly as torchaudio's resample does, so num_samples == len(read_audio(path)).
    n = -(-frames * SAMPLE_RATE // samplerate)
    if n < MIN_SAMPLES:
        raise DataError(f"{path}: {n} samples at 16 kHz, expected at least {MIN_SAMPLES} (25 ms)")
    return n


# -----------------------------------------------------------------------------
# IEMOCAP, read from the release's label files

# "[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5000, 2.5000, 2.5000]"; the uid must hold an
# underscore because the dialog folder is the uid without its last "_xxx" part.
LABEL_LINE = re.compile(
    r"^\[\s*\d+(?:\.\d*)?\s*-\s*\d+(?:\.\d*)?\s*\]\s+"
    r"([A-Za-z0-9]+(?:_[A-Za-z0-9]+)+)\s+([A-Za-z]+)\s+\[[^\]]*\]\s*$"
)
LINE_FORMAT = "'[start - end]<TAB>uid<TAB>label<TAB>[v, a, d]'"  # for messages


def parse_label_file(path):
    """([(uid, label)], [(line_number, line)] of lines that look like labels but do not parse).
    A file that is not UTF-8 text (the release's are ASCII; an editor may save UTF-16) is a
    DataError, not a file whose lines all fail to parse."""
    labels, bad = [], []
    with open(path, "rb") as f:
        raw = f.read()
    problem = "it holds NUL bytes: UTF-16?" if b"\0" in raw else None
    try:
        lines = raw.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        problem = problem or f"byte 0x{raw[e.start]:02x} at offset {e.start} is not UTF-8"
    if problem:
        expected = "expected the release's label file in UTF-8 (or ASCII): re-save it as UTF-8"
        raise DataError(f"{path}: not a UTF-8 text file ({problem}); {expected}")
    for number, line in enumerate(lines, start=1):
        match = LABEL_LINE.match(line)
        if match:
            labels.append((match.group(1), match.group(2).lower()))
        elif line.lstrip().startswith("["):
            bad.append((number, line))
    return labels, bad


def load_iemocap(root):
    """All 4-class utterances of an IEMOCAP_full_release folder, sorted by uid."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"IEMOCAP root {root} not found (expected the IEMOCAP_full_release folder)")
    utterances, skipped = [], []
    for uid, (s, label) in read_iemocap_labels(root).items():
        if label not in IEMOCAP_LABELS:
            continue
        dialog = uid.rsplit("_", 1)[0]
        wav = os.path.join(root, f"Session{s}", "sentences", "wav", dialog, uid + ".wav")
        try:
            num_samples = audio_num_samples(wav)
        except DataError as e:
            skipped.append(str(e))
            continue
        utterances.append(Utterance(uid, wav, IEMOCAP_LABELS[label], num_samples, session=s))
    if skipped:
        first = "; ".join(skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
        why = f"audio is missing, unreadable or shorter than {MIN_SAMPLES} samples"
        message = f"skipped {len(skipped)} labelled utterance(s) whose {why}: {first}"
        warnings.warn(message, DataWarning, stacklevel=2)
    if not utterances:
        raise DataError(f"no usable 4-class utterances under {root}")
    return sorted(utterances, key=lambda u: u.uid)


def read_iemocap_labels(root):
    """{uid: (session, label)} from every session's label files, a uid's first label kept. Warns of
    a session without a label, of lines that do not parse and of uids labelled twice (stacklevel 3:
    naming load_iemocap's caller, as its own warning does)."""
    labels, bad, duplicates, unlabelled = {}, [], 0, []
    for s in SESSIONS:
        session_dir = os.path.join(root, f"Session{s}")
        emo_dir = os.path.join(session_dir, "dialog", "EmoEvaluation")
        if not os.path.isdir(session_dir):
            where = f"the IEMOCAP release has Session1..Session5 under {root}"
            raise DataError(f"{session_dir} not found: {where}")
        if not os.path.isdir(emo_dir):
            raise DataError(f"{emo_dir} not found: expected the label files <dialog>.txt there")
        # Only the .txt files directly in EmoEvaluation: its subfolders (Categorical/, Attribute/,
        # Self-evaluation/) hold per-annotator files in other formats, and "._*" are macOS junk.
        names = sorted(n for n in os.listdir(emo_dir) if n.endswith(".txt") and n[0] != ".")
        read = 0
        for name in names:
            path = os.path.join(emo_dir, name)
            pairs, bad_lines = parse_label_file(path)
            for uid, label in pairs:
                duplicates += uid in labels
                labels.setdefault(uid, (s, label))
            read += len(pairs)
            bad += [(path, number, line) for number, line in bad_lines]
        if not read:
            unlabelled.append(f"Session{s} ({len(names)} label file(s) in {emo_dir})")
    messages = []
    if unlabelled:
        messages.append(
            f"no labelled utterance read for {', '.join(unlabelled)}: that session is left out; "
            f"expected <dialog>.txt files with lines {LINE_FORMAT}"
        )
    if bad:
        path, number, line = bad[0]
        messages.append(
            f"skipped {len(bad)} label line(s) that do not parse as {LINE_FORMAT}, first: "
            f"{path} line {number}: {line!r}"
        )
    if duplicates:
        messages.append(
            f"{duplicates} utterance(s) labelled more than once under {root}; kept the first label"
        )
    for message in messages:
        warnings.warn(message, DataWarning, stacklevel=3)
    return labels


def count_table(utterances):
    """{"sessions": {"1": {"ang": n, ...}, ...}, "total": n}; a custom corpus's rows are splits."""
    labels = {u.label for u in utterances}
    classes = CLASSES if labels <= set(CLASSES) else tuple(sorted(labels))
    rows = {}
    for u in utterances:
        key = str(u.session) if u.session is not None else (u.split or "all")
        rows.setdefault(key, dict.fromkeys(classes, 0))[u.label] += 1
    keys = sorted(rows, key=lambda k: (SPLITS.index(k) if k in SPLITS else -1, k))  # 1..5 or splits
    return {"sessions": {k: rows[k] for k in keys}, "total": len(utterances)}


def format_count_table(table):
    """count_table's result as a Markdown table: a row per session (or split), then the totals."""
    rows = table["sessions"]
    classes = list(next(iter(rows.values()))) if rows else list(CLASSES)
    body = [[key, *(row[c] for c in classes), sum(row.values())] for key, row in rows.items()]
    body.append(["total", *(sum(row[c] for row in rows.values()) for c in classes), table["total"]])
    cells = [[str(cell) for cell in r] for r in [["session", *classes, "total"], *body]]
    widths = [max(len(r[j]) for r in cells) for j in range(len(cells[0]))]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def split_fold(utterances, fold):
    """Leave-one-session-out: test = every utterance of session `fold` (both speakers)."""
    if isinstance(fold, bool) or fold not in SESSIONS:
        raise DataError(f"fold {fold!r} is not an IEMOCAP session, expected one of 1..5")
    train = [u for u in utterances if u.session != fold]
    test = [u for u in utterances if u.session == fold]
    if not train or not test:
        sizes = f"{len(train)} / {len(test)} utterances"
        raise DataError(f"fold {fold}: empty train or test split ({sizes})")
    return train, test


# -----------------------------------------------------------------------------
# Custom corpora


class _JSONObject(dict):
    """json.load's object_pairs_hook: a JSON object that remembers the keys it lists more than once
    as (key, first value, second value) in .twice, where json alone keeps the last silently."""

    def __init__(self, pairs):
        super().__init__()
        self.twice = []
        for key, value in pairs:
            if key in self:
                self.twice.append((key, self[key], value))
            self[key] = value


def load_label_json(json_path, wav_dir=None):
    """The original release's format: {"Train": {"a.wav": "ang", ...}, "Val": {...}, "Test": {...}}.
    A wav listed twice is refused, whether with two labels or the same one twice."""
    json_path = os.fspath(json_path)
    wav_dir = os.path.dirname(json_path) if wav_dir is None else os.fspath(wav_dir)
    try:
        with open(json_path, encoding="utf-8") as f:
            obj = json.load(f, object_pairs_hook=_JSONObject)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{json_path}: not valid JSON ({e})") from None
    keys = {"Train": "train", "Val": "val", "Test": "test"}
    if not isinstance(obj, dict) or not {"Train", "Test"} <= set(obj) <= set(keys):
        raise DataError(f"{json_path}: expected an object with keys Train, Val (optional), Test")
    if obj.twice:
        raise DataError(f'{json_path}: "{obj.twice[0][0]}" is there twice, expected it once')
    for key in keys:  # every split's shape before any audio is read
        entries = obj.get(key, {})
        if not isinstance(entries, dict):
            example = '{"a.wav": "ang", ...}'
            raise DataError(f'{json_path}: "{key}" should map wav names to labels, {example}')
        if getattr(entries, "twice", None):  # a missing "Val" is a plain {}
            name, first, second = entries.twice[0]
            raise DataError(
                f"{json_path}: {key} lists {name!r} twice (labels {first!r} and {second!r}), "
                "expected each wav once with its one label"
            )
    utterances = []
    for key, split in keys.items():
        for name, label in obj.get(key, {}).items():
            where = f"{json_path}: {key} entry {name!r}"
            if not isinstance(label, str) or not label.strip():
                raise DataError(f"{where} has label {label!r}, expected a non-empty string")
            path = os.path.join(wav_dir, name)
            utterances.append((where, _utterance(where, path, label.strip(), split, wav_dir)))
    return _unique(utterances)


def load_manifest(csv_path):
    """CSV with header path,label,split; relative paths are resolved against the CSV's folder."""
    csv_path = os.fspath(csv_path)
    folder, utterances, fields = os.path.dirname(csv_path), [], ("path", "label", "split")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets' BOM
            reader = csv.DictReader(f)
            columns = [c.strip().lower() for c in (reader.fieldnames or [])]
            if not set(fields) <= set(columns):
                expected = "expected a header with columns path,label,split"
                raise DataError(f"{csv_path}: {expected}, found {columns}")
            reader.fieldnames = columns
            for row in reader:
                where = f"{csv_path} line {reader.line_num}"
                path, label, split = ((row.get(k) or "").strip() for k in fields)
                if not path or not label:
                    raise DataError(f"{where}: empty path or label")
                if split.lower() not in SPLITS:
                    raise DataError(f"{where}: split {split!r}, expected one of train, val, test")
                path = os.path.join(folder, path)  # an absolute path stays as it is
                utterances.append((where, _utterance(where, path, label, split.lower(), folder)))
    except (csv.Error, UnicodeDecodeError) as e:
        raise DataError(f"{csv_path}: not a valid CSV file ({e})") from None
    return _unique(utterances)


def _utterance(where, path, label, split, folder):
    """An utterance of a .json or .csv corpus. Its uid is the wav's path relative to the corpus
    folder, without its extension, '/'-separated ("spk1/001"): unique where names repeat across
    folders."""
    try:
        num_samples = audio_num_samples(path)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    try:
        relative = os.path.relpath(path, folder or os.curdir)
    except ValueError:  # another drive (Windows)
        relative = os.path.abspath(path)
    uid = os.path.splitext(relative)[0].replace(os.sep, "/")
    return Utterance(uid, path, label, num_samples, split=split)


def _unique(entries):
    """The utterances of [(where listed, Utterance)], each uid once; a file listed twice, or two
    files whose uids coincide (a.wav and a.flac), is a DataError naming both entries."""
    seen = {}
    for where, u in entries:
        if u.uid in seen:
            first_where, first = seen[u.uid]
            if os.path.realpath(first.path) != os.path.realpath(u.path):
                raise DataError(
                    f"{where}: {u.path} and {first.path} ({first_where}) both have the utterance "
                    f"id {u.uid!r} (the path relative to the corpus folder, without its "
                    "extension); rename one"
                )
            if first.split != u.split:
                both = f"in both {first.split} and {u.split}"
                raise DataError(f"{where}: {u.path} is {both} (also {first_where})")
            raise DataError(
                f"{where}: {u.path} is listed twice (also {first_where}), expected once"
            )
        seen[u.uid] = where, u
    return [u for _, u in entries]


def load_utterances(data, wav_dir=None):
    """Every usable utterance of an IEMOCAP folder, a .json label file or a .csv manifest."""
    if os.path.isdir(data):
        return load_iemocap(data)
    expected = "expected an IEMOCAP folder, a .json label file or a .csv manifest"
    if not os.path.isfile(data):
        raise DataError(f"{data} not found ({expected})")
    if data.lower().endswith(".json"):
        return load_label_json(data, wav_dir)
    if data.lower().endswith(".csv"):
        return load_manifest(data)
    raise DataError(f"{data}: {expected}")


def load_corpus(data, fold=None, wav_dir=None):
    """An IEMOCAP folder (fold 1..5 required) -> ({"train", "test"}, CLASSES); a .json or .csv
    corpus -> ({"train", "test"} plus "val" when it has one, the sorted labels of train)."""
    data = os.fspath(data)
    if os.path.isdir(data):
        if fold is None:
            raise DataError(f"{data} is an IEMOCAP folder: a fold (test session 1..5) is required")
        train, test = split_fold(load_iemocap(data), fold)
        splits, classes = {"train": train, "test": test}, CLASSES
    else:
        utterances = load_utterances(data, wav_dir)
        splits = {s: [u for u in utterances if u.split == s] for s in SPLITS}
        if not splits["val"]:
            del splits["val"]
        for name in ("train", "test"):
            if not splits[name]:
                raise DataError(f"{data}: the {name} split is empty")
        classes = tuple(sorted({u.label for u in splits["train"]}))
        if len(classes) < 2:
            found = f"{len(classes)} label(s) {list(classes)}"
            raise DataError(f"{data}: the train split has {found}, expected at least 2")
        for name, split in splits.items():
            for u in split:
                if u.label not in classes:
                    raise DataError(
                        f"{data}: label {u.label!r} of {u.path} ({name}) never occurs in the "
                        f"train split, whose labels are {list(classes)}"
                    )
    # An utterance in both train and a held-out split would make the held-out score meaningless.
    train = {os.path.realpath(u.path) for u in splits["train"]}
    for name in ("val", "test"):
        for u in splits.get(name, []):
            if os.path.realpath(u.path) in train:
                raise DataError(f"{data}: {u.path} is in both train and {name}")
    return splits, classes


# -----------------------------------------------------------------------------
# Dataset and batching


class AudioDataset(torch.utils.data.Dataset):
    """Utterances as {"wav", "label", "index", "offset"}. crop="head" keeps the first max_seconds
    (fine-tuning), crop="random" a random window whose start is a multiple of crop_align samples
    (pretraining: 320 keeps frame labels aligned). Random crops depend only on (seed, epoch, index),
    so they are the same whatever the worker or order; call set_epoch() each epoch (with persistent
    DataLoader workers the new epoch does not reach the workers' copies). cache=True keeps decoded
    audio in memory (per worker process)."""

    def __init__(
        self, utterances, classes, max_seconds=None, crop="head", crop_align=1, cache=False, seed=0
    ):
        self.utterances = list(utterances)
        self.classes = tuple(classes)
        index = {c: i for i, c in enumerate(self.classes)}
        self.labels = [index.get(u.label, -1) for u in self.utterances]
        self.max_samples = None if max_seconds is None else int(round(max_seconds * SAMPLE_RATE))
        cap = self.max_samples or max((u.num_samples for u in self.utterances), default=0)
        self.lengths = [min(u.num_samples, cap) for u in self.utterances]
        self.crop, self.crop_align, self.seed, self.epoch = crop, int(crop_align), int(seed), 0
        self.cache = {} if cache else None

    def __len__(self):
        return len(self.utterances)

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def audio(self, i):
        if self.cache is None:
            return read_audio(self.utterances[i].path)
        if i not in self.cache:
            self.cache[i] = read_audio(self.utterances[i].path)
        return self.cache[i]

    def crop_offset(self, i, length):
        if self.max_samples is None or length <= self.max_samples or self.crop == "head":
            return 0
        rng = np.random.default_rng([self.seed, self.epoch, i])
        starts = (length - self.max_samples) // self.crop_align + 1
        return self.crop_align * int(rng.integers(starts))

    def __getitem__(self, i):
        wav = self.audio(i)
        offset = self.crop_offset(i, len(wav))
        if self.max_samples is not None:
            wav = wav[offset : offset + self.max_samples]
        return {"wav": wav, "label": self.labels[i], "index": i, "offset": offset}


def collate(items):
    """Items zero-padded into one batch: "wav" (B, T), "lengths", "labels", "indices", "offsets"."""
    lengths = torch.tensor([len(item["wav"]) for item in items], dtype=torch.long)
    wav = torch.zeros(len(items), int(lengths.max()), dtype=torch.float32)
    for row, item in enumerate(items):
        wav[row, : len(item["wav"])] = item["wav"]
    columns = {"labels": "label", "indices": "index", "offsets": "offset"}
    batch = {"wav": wav, "lengths": lengths}
    for name, key in columns.items():
        batch[name] = torch.tensor([item[key] for item in items], dtype=torch.long)
    return batch


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of indices. Each epoch (seeded by (seed, epoch), the same on every rank): shuffle,
    cut into pools of batch_size * 50, sort each pool by length (bucket=True; bucket=False keeps
    the release's random batches), cut each pool into batches of at most batch_size utterances and
    at most max_batch_seconds of padded audio, drop the short batches (drop_last, only without
    max_batch_seconds), shuffle the batch order. shuffle=False: one pool, no shuffling, no dropping
    (evaluation). Batches are longest-first so an out-of-memory shows up at once. batch_seconds:
    the release's dynamic batches instead (see dynamic_batches).

    Distributed: rank r keeps global_batch[r::num_replicas], so the ranks' shards of one step
    together are exactly the single-process batch and every rank takes the same number of steps.
    A batch with fewer utterances than replicas is dropped under drop_last; otherwise its last
    utterance is repeated until every rank gets one (evaluation should dedupe by index)."""

    def __init__(
        self,
        lengths,
        batch_size=64,
        max_batch_seconds=None,
        bucket=True,
        shuffle=True,
        drop_last=True,
        seed=0,
        num_replicas=1,
        rank=0,
        batch_seconds=None,
    ):
        super().__init__()
        samples = lambda seconds: None if seconds is None else seconds * SAMPLE_RATE
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size, self.bucket, self.shuffle = int(batch_size), bucket, shuffle
        self.max_batch_samples = samples(max_batch_seconds)
        self.drop_last = drop_last and shuffle
        self.batch_samples = samples(batch_seconds)
        self.seed, self.num_replicas, self.rank = int(seed), int(num_replicas), int(rank)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        """start_batch skips the first batches of the epoch, to resume mid-epoch."""
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def global_batches(self, epoch):
        """The epoch's batches before sharding over ranks (the same on every rank)."""
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.lengths)
        if self.batch_samples is not None:
            batches = self.dynamic_batches(rng)
            return [batches[j] for j in rng.permutation(len(batches))]
        if self.shuffle:
            order = rng.permutation(n)
            pool = self.batch_size * 50
            pools = [order[i : i + pool] for i in range(0, n, pool)]
        else:
            pools = [np.arange(n)]
        batches = []
        for pool in pools:
            if self.bucket:
                pool = pool[np.argsort(-self.lengths[pool], kind="stable")]
            batches += self.cut(pool)
        if self.drop_last and self.max_batch_samples is None:
            batches = [b for b in batches if len(b) == self.batch_size]
        if self.shuffle:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        return batches

    def dynamic_batches(self, rng):
        """The release's RandomBucketSampler(dynamic_batch=True) (pretrain/dataloader.py): sorted
        by length into 50 buckets of n // 50 (and one of the rest), each shuffled, read in ascending
        order and cut whenever a batch holds at least batch_seconds of audio (lengths as cropped,
        padding not counted); the last, partial batch is dropped."""
        order = np.argsort(self.lengths, kind="stable")
        size = max(1, len(order) // 50)
        batches, batch, total = [], [], 0
        for start in range(0, len(order), size):
            for i in rng.permutation(order[start : start + size]).tolist():
                batch.append(i)
                total += int(self.lengths[i])
                if total >= self.batch_samples:
                    batches.append(batch)
                    batch, total = [], 0
        return batches

    def cut(self, pool):
        # Greedy: start a new batch when it is full or would hold too much padded audio. An
        # utterance longer than max_batch_seconds on its own still gets a batch of one.
        batches, batch, longest = [], [], 0
        for i in pool.tolist():
            longer = max(longest, int(self.lengths[i]))
            limit = self.max_batch_samples
            too_much = limit is not None and (len(batch) + 1) * longer > limit
            if batch and (len(batch) == self.batch_size or too_much):
                batches.append(batch)
                batch, longer = [], int(self.lengths[i])
            batch.append(i)
            longest = longer
        if batch:
            batches.append(batch)
        return batches

    def shard(self, batch):
        batch = batch + batch[-1:] * (self.num_replicas - len(batch))  # one index per rank at least
        return batch[self.rank :: self.num_replicas]

    def batches(self):
        """This rank's batches for the current epoch, from start_batch on."""
        batches = self.global_batches(self.epoch)
        if self.drop_last:
            batches = [b for b in batches if len(b) >= self.num_replicas]
        return [self.shard(b) for b in batches[self.start_batch :]]

    def __iter__(self):
        return iter(self.batches())

    def __len__(self):
        return len(self.batches())

    def padding_fraction(self):
        """Fraction of the samples in this rank's padded batches this epoch that are padding."""
        lengths = [self.lengths[batch] for batch in self.batches()]
        padded = sum(len(x) * int(x.max()) for x in lengths)
        real = sum(int(x.sum()) for x in lengths)
        return 1.0 - real / padded if padded else 0.0


# -----------------------------------------------------------------------------
# P-TAPT's pseudo-label file (pretrain.py's k-means stage writes it, its P-TAPT stage reads it)
#
# {"uids": [str], "frame_counts": (U,) long, "labels": {K: (sum of counts,) int}, "meta": {}}


def _index(content, path):
    """{uid: (first frame, frame count)}; anything inconsistent is a ValueError naming the file."""

    def check(ok, problem):
        if not ok:
            raise ValueError(f"{path}: invalid pseudo-label file: {problem}")

    types = {"uids": list, "meta": dict, "frame_counts": torch.Tensor, "labels": dict}
    ok = isinstance(content, dict) and all(isinstance(content.get(k), t) for k, t in types.items())
    layout = "{uids: [str], frame_counts: tensor, labels: {K: tensor}, meta: {}}"
    check(ok and content["labels"], f"expected {layout}")
    uids, counts, labels = content["uids"], content["frame_counts"], content["labels"]
    ok = len(counts) == len(uids) == len(set(uids)) and all(isinstance(u, str) for u in uids)
    ok = ok and counts.dim() == 1 and counts.dtype == torch.long and bool((counts >= 0).all())
    counted = f"{len(uids)} uids but {len(counts)} frame counts"
    check(ok, f"{counted}: need a long count >= 0 for each distinct uid")
    for k, lab in labels.items():
        integer = torch.is_tensor(lab) and lab.dim() == 1 and not lab.is_floating_point()
        ok = isinstance(k, int) and k > 0 and integer
        check(ok, f"labels[{k!r}] must be a 1-D integer tensor under an integer K > 0")
        entries = f"{len(lab)} entries but frame_counts sum to {counts.sum()}"
        check(len(lab) == counts.sum(), f"labels[{k}] has {entries}")
        in_range = not len(lab) or 0 <= lab.min() <= lab.max() < k
        check(in_range, f"labels[{k}] has values outside [0, {k})")
    starts = (counts.cumsum(0) - counts).tolist()
    return {u: (s, c) for u, s, c in zip(uids, starts, counts.tolist())}


def save_labels(path, uids, frame_counts, labels, meta):
    """Writes the labels of the frames of `uids`, concatenated in uid order, atomically; never a
    file that load_labels would refuse; int16 when K allows (half the file and P-TAPT's memory)."""
    content = {
        "uids": [str(u) for u in uids],
        "frame_counts": torch.as_tensor(frame_counts, dtype=torch.long).cpu(),
        "labels": {int(k): torch.as_tensor(v).cpu() for k, v in labels.items()},
        "meta": dict(meta),
    }
    _index(content, path)
    small = lambda k: torch.int16 if k <= 32767 else torch.int32
    content["labels"] = {k: v.to(small(k)) for k, v in content["labels"].items()}
    save_atomic(content, path)


def load_labels(path):
    """A checked pseudo-label file, plus "index": {uid: (first frame, frame count)} and "path"."""
    try:
        content = torch.load(str(path), map_location="cpu", weights_only=True)
    # a missing, truncated or foreign file: torch raises many different things, whose messages
    # (several lines, advice to unpickle without weights_only) are not for this file's user
    except Exception as e:
        why = "missing, truncated or not a PyTorch file"
        if isinstance(e, pickle.UnpicklingError):
            why = "it holds objects other than tensors and plain containers"
        raise ValueError(
            f"{path}: not a readable pseudo-label file ({why}); pretrain.py --mode ptapt or "
            "--mode kmeans writes it again when it is removed"
        ) from None
    return {**content, "index": _index(content, path), "path": str(path)}


def labels_for(label_file, uid, num_frames):
    """{K: (num_frames,) long}: the pseudo-labels of one utterance of a load_labels() result."""
    if uid not in label_file["index"]:
        raise ValueError(f"{label_file['path']}: no pseudo-labels for utterance {uid}")
    start, count = label_file["index"][uid]
    if count != num_frames:
        raise ValueError(
            f"{label_file['path']}: utterance {uid} has {count} pseudo-labels but {num_frames} "
            "frames were expected: pseudo-labels do not match the audio"
        )
    return {k: v[start : start + count].long() for k, v in label_file["labels"].items()}


# -----------------------------------------------------------------------------
# Command line


def build_parser():
    from train import OneLineParser  # the scripts' shared CLI layer, which imports this file

    parser = OneLineParser(
        description="Count an emotion corpus's utterances per session (or split) and class.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    counted = "whose utterances to count per session (per split) and class"
    corpus = f"IEMOCAP_full_release folder (or .json label file / .csv manifest) {counted}"
    parser.add_argument("--data", required=True, help=corpus)
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    wav_dir = (
        "with a .json label file: folder its wav names are relative to (None: the json's folder)"
    )
    parser.add_argument("--wav-dir", help=wav_dir)
    return parser


def report(args):
    """What the command prints: the corpus's counts."""
    table = count_table(load_utterances(args.data, args.wav_dir))
    if args.json:
        return json.dumps(table, indent=2)
    text = format_count_table(table)
    if os.path.isdir(args.data):
        sizes = IEMOCAP_SESSION_SIZES.values()
        total = f"{sum(sizes)} = {' + '.join(str(n) for n in sizes)}"
        text += f"\n(the full IEMOCAP release: {total})"
    return text


def main(argv=None):
    from train import user_errors

    args = build_parser().parse_args(argv)
    with user_errors():
        print(report(args))
        sys.stdout.flush()  # here, so that a reader that stopped early (| head) is caught
    return 0


if __name__ == "__main__":
    # no source line for users
    warnings.formatwarning = lambda message, *rest, **kw: f"warning: {message}\n"
    import data  # the module train.user_errors knows: its DataError, not a second one in __main__

    sys.exit(data.main())
