"""Metrics, prediction and the results table (RECIPE.md "Metrics").

python evaluate.py runs/vft                                   # folds x runs -> the paper's table
python evaluate.py --checkpoint FT.pt --data DIR --fold 3     # re-test a fine-tuned model
python evaluate.py --checkpoint FT.pt --predict a.wav b.wav   # emotion of each file
"""

import argparse
import csv
import json
import os
import re
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

import train as T
from checkpoints import CheckpointError, load_classifier, write_json, write_text_atomic
from data import AudioDataset, BucketBatchSampler, DataError, collate, load_corpus, read_audio

# -----------------------------------------------------------------------------
# metrics


def compute_metrics(y_true, y_pred, classes):
    """UA: mean recall over the classes present in the test set (a class with no test utterance
    has no recall and is left out). WA: accuracy. Macro-F1: mean F1 over the classes present in
    the test set or the predictions, F1 = 0 where a class is never predicted or never true."""
    # rows: true class, columns: predicted class
    m = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    support, predicted, hits = m.sum(1), m.sum(0), np.diag(m)
    present = support > 0
    recall = np.divide(hits, support, out=np.zeros(len(classes)), where=present)
    precision = np.divide(hits, predicted, out=np.zeros(len(classes)), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(len(classes)), where=denom > 0)
    seen = present | (predicted > 0)
    return {
        "ua": float(recall[present].mean()) if present.any() else float("nan"),
        "wa": float(hits.sum() / m.sum()) if m.sum() else float("nan"),
        "macro_f1": float(f1[seen].mean()) if seen.any() else float("nan"),
        "confusion": m.tolist(),
        "classes": list(classes),
        "recall": {c: float(r) for c, r, p in zip(classes, recall, present) if p},
        "n": int(m.sum()),
    }


def emotion_nmi(labels, frame_counts, utterance_labels):
    """How much emotion the clusters carry (0 to 1): the normalised mutual information (arithmetic
    normalisation, scikit-learn's default) of frame labels and their utterance's emotion."""
    counts = torch.as_tensor(frame_counts)
    emotion = torch.repeat_interleave(torch.as_tensor(utterance_labels), counts)
    labels = torch.as_tensor(labels).long()
    p = torch.zeros(int(labels.max()) + 1, int(emotion.max()) + 1, dtype=torch.float64)
    ones = torch.ones(len(labels), dtype=torch.float64)
    p = p.index_put_((labels, emotion), ones, accumulate=True) / len(labels)
    pa, pb, nz = p.sum(1), p.sum(0), p > 0
    mi = (p[nz] * (p[nz] / (pa[:, None] * pb[None, :])[nz]).log()).sum()
    ha, hb = (-(q[q > 0] * q[q > 0].log()).sum() for q in (pa, pb))
    return float(mi / ((ha + hb) / 2)) if ha + hb > 0 else 1.0


# -----------------------------------------------------------------------------
# prediction


@torch.no_grad()
def predict(
    clf, utterances, classes, device, dtype=None, batch_seconds=320.0, workers=0, progress=True
):
    """Class probabilities (N, C) for utterances at full length, in the given order. Batches of
    similar lengths keep padding low; the result does not depend on batching. Under torchrun each
    rank predicts every world_size-th utterance and every rank gets all N rows back."""
    clf.eval()
    rank, world_size = T.world()
    mine = list(range(rank, len(utterances), world_size))
    dataset = AudioDataset([utterances[i] for i in mine], classes)
    lengths = dataset.lengths
    sampler = BucketBatchSampler(
        lengths, batch_size=64, max_batch_seconds=batch_seconds, shuffle=False, drop_last=False
    )
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
    probs = torch.zeros(len(mine), len(classes))
    for batch in tqdm(loader, "test", unit="batch", disable=not progress or rank != 0, leave=False):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = clf(batch["wav"].to(device), batch["lengths"])  # lengths read on the host
        probs[batch["indices"]] = logits.float().softmax(-1).cpu()
    if world_size == 1:
        return probs
    shards = [None] * world_size
    dist.all_gather_object(shards, probs)
    full = torch.zeros(len(utterances), len(classes))
    for r, shard in enumerate(shards):
        full[r::world_size] = shard
    return full


def write_predictions(path, utterances, probs, classes):
    rows = [["uid", "path", "label", "prediction"] + [f"p_{c}" for c in classes]]
    rows += [
        [u.uid, u.path, u.label, classes[int(np.argmax(p))]] + [f"{x:.6f}" for x in p]
        for u, p in zip(utterances, probs.tolist())
    ]
    write_text_atomic(path, lambda f: csv.writer(f).writerows(rows))


# -----------------------------------------------------------------------------
# the results table: runs/<name>/fold<k>/run<r>/metrics.json

# the folder names finetune.py writes, matched whole: runs/manifold3/fold1 is fold 1, fold1.bak none
FOLD_FOLDER, RUN_FOLDER = re.compile(r"fold([1-9][0-9]*)"), re.compile(r"run(0|[1-9][0-9]*)")
# config.json's settings that may differ between the runs of one table: where and how a run went
# (train.UNCOMPUTED_SETTINGS), and what tells the runs apart (fold, run number, its seed)
NOT_COMPARED = T.UNCOMPUTED_SETTINGS | {"fold", "run", "seed", "seed_of_run"}
METRICS = ("ua", "wa", "macro_f1")


class _Absent:  # a setting one config.json has and another lacks (another finetune.py's)
    def __repr__(self):
        return "(absent)"


ABSENT = _Absent()


def find_runs(run_root):
    """([(fold, run, folder)] of the finished runs <run_root>/fold<k>/run<r>/metrics.json, sorted;
    [each other folder there, and why it is left out])."""
    if not os.path.isdir(run_root):
        raise DataError(f"{run_root}: not a folder (expected runs/<name> with fold<k>/run<r>/)")

    def folders(path):  # hidden ones left out; results.json is a file
        names = sorted(os.listdir(path))
        return [n for n in names if not n.startswith(".") and os.path.isdir(os.path.join(path, n))]

    runs, skipped = [], []
    for name in folders(run_root):
        fold = FOLD_FOLDER.fullmatch(name)
        if not fold:
            skipped.append(f"{name} (not fold<k>)")
            continue
        for sub in folders(os.path.join(run_root, name)):
            run, run_dir = RUN_FOLDER.fullmatch(sub), os.path.join(run_root, name, sub)
            if not run:
                skipped.append(f"{name}/{sub} (not run<r>)")
            elif not os.path.isfile(os.path.join(run_dir, "metrics.json")):
                skipped.append(f"{name}/{sub} (unfinished: no metrics.json)")
            else:
                runs.append((int(fold.group(1)), int(run.group(1)), run_dir))
    return sorted(runs), skipped


def read_run_json(path, keys=()):
    """A run's config.json or metrics.json: a JSON object, with `keys`."""
    try:
        with open(path) as f:
            obj = json.load(f)
        if not isinstance(obj, dict):
            raise ValueError(f"a JSON {type(obj).__name__}, expected an object")
        for key in keys:
            obj[key]
    except (OSError, ValueError, KeyError) as e:
        what = f"{os.path.basename(path)} written by finetune.py ({type(e).__name__}: {e})"
        raise DataError(f"{path}: not a {what}") from None
    return obj


def run_settings(run_dir, fold, run):
    """What a run was computed with: its config.json less NOT_COMPARED, the fold's own folder in
    --init's path read as fold{fold}; None without a config.json."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        return None
    config = read_run_json(path)
    for key, value in (("fold", fold), ("run", run)):
        if key in config and config[key] != value:
            raise DataError(
                f"{path}: {key} {config[key]!r}, but the run is in fold{fold}/run{run}/ (a copied "
                "or renamed run?); put it back where finetune.py wrote it"
            )
    settings = {k: v for k, v in config.items() if k not in NOT_COMPARED}
    if isinstance(settings.get("init"), str):  # --init runs/<method>/fold{fold}/pretrained.pt
        own_fold = rf"(^|[/\\])fold{fold}(?=$|[/\\])"
        settings["init"] = re.sub(own_fold, r"\1fold{fold}", settings["init"])
    return settings


def check_same_settings(run_root, runs):
    """Refuse to average runs computed with different settings (another recipe, learning rate,
    corpus, starting checkpoint...): they are not runs of one method. Returns the runs without a
    config.json."""
    reference, unchecked = None, []
    for fold, run, run_dir in runs:
        settings, where = run_settings(run_dir, fold, run), f"fold{fold}/run{run}"
        if settings is None:
            unchecked.append(where)
            continue
        if reference is None:
            reference = where, settings
            continue
        first, theirs = reference
        pairs = {k: (theirs.get(k, ABSENT), settings.get(k, ABSENT)) for k in theirs | settings}
        differ = sorted(k for k, (a, b) in pairs.items() if not T.same_setting(k, a, b))
        if differ:
            shown = ", ".join(f"{k} {pairs[k][0]!r} vs {pairs[k][1]!r}" for k in differ)
            raise DataError(
                f"{run_root}: {first} and {where} were computed with different settings ({shown}; "
                "their config.json): not runs of one method to average; give each its own --name, "
                "or move the odd runs out"
            )
    return unchecked


def aggregate(run_root):
    """Per fold: mean and std over runs of UA, WA and macro-F1 (the population std, ddof 0, as the
    release's run_downstream_custom_multiple_fold.py reported it); average over folds; summed
    confusion. Folds are test sessions for IEMOCAP. Only <run_root>/fold<k>/run<r>/metrics.json
    counts (what else is there is listed under "skipped"), and only runs of the same settings."""
    runs, skipped = find_runs(run_root)
    if not runs:
        why = f"; skipped: {', '.join(skipped)}" if skipped else ""
        raise DataError(
            f"{run_root}: no fold<k>/run<r>/metrics.json found "
            f"(has finetune.py finished a run here?){why}"
        )
    unchecked = check_same_settings(run_root, runs)
    folds, classes, confusion = {}, None, None
    for fold, _, run_dir in runs:
        path = os.path.join(run_dir, "metrics.json")
        m = read_run_json(path, ("classes", "confusion", *METRICS))
        if classes is None:
            classes, confusion = m["classes"], np.zeros_like(np.array(m["confusion"]))
        if m["classes"] != classes:
            raise DataError(
                f"{path}: classes {m['classes']} differ from {classes} of the other runs"
            )
        confusion = confusion + np.array(m["confusion"])
        folds.setdefault(fold, []).append(m)
    table = {}
    for fold, fold_runs in sorted(folds.items()):
        table[str(fold)] = row = {"runs": len(fold_runs)}
        for key in METRICS:
            values = np.array([r[key] for r in fold_runs], dtype=float)
            row[key] = float(values.mean())
            row[f"{key}_std"] = float(values.std(ddof=0))  # 0 for one run: format_table omits it
    return {
        "folds": table,
        "average": {k: float(np.mean([row[k] for row in table.values()])) for k in METRICS},
        "std": "population (ddof 0), as the release",
        "runs": len(runs),
        "classes": classes,
        "confusion": confusion.tolist(),
        "skipped": skipped,
        "settings_not_checked": unchecked,
    }


def format_table(result, name="run"):
    """UA and WA per fold (mean ± std; a single run's value alone: it has no spread) and their
    average, the runs per fold, the confusion matrix summed over folds and runs: Markdown."""
    folds, classes = result["folds"], result["classes"]

    def cell(row, key):
        spread = f" ± {100 * row[key + '_std']:.1f}" if row["runs"] > 1 else " (1 run)"
        return f"{100 * row[key]:.1f}{spread}"

    lines = ["| method | " + " | ".join(f"Ses{f}" for f in folds) + " | Average |"]
    lines.append("|---" * (len(folds) + 2) + "|")
    for key in ("ua", "wa"):
        cells = " | ".join(cell(row, key) for row in folds.values())
        lines.append(f"| {name} {key.upper()} | {cells} | {100 * result['average'][key]:.1f} |")
    runs = ", ".join(f"Ses{f}: {row['runs']}" for f, row in folds.items())
    lines += [
        "",
        f"mean ± population std (ddof 0, as the release) over runs per fold, runs: {runs}",
        "confusion matrix summed over folds and runs (rows true, columns predicted):",
        "| | " + " | ".join(classes) + " |",
        "|---" * (len(classes) + 1) + "|",
    ]
    for c, row in zip(classes, result["confusion"]):
        lines.append(f"| {c} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)


def write_table(run_dir, out=None):
    """The results table of a run folder: written as JSON (default <run_dir>/results.json), then
    printed, after one warning line on what it leaves out or could not check."""
    result = aggregate(run_dir)
    out = out or os.path.join(run_dir, "results.json")
    write_json(out, result)  # before printing: a reader that closes the pipe loses nothing
    notes = ["skipped: " + ", ".join(result["skipped"])] if result["skipped"] else []
    if result["settings_not_checked"]:
        unchecked = ", ".join(result["settings_not_checked"])
        notes.append(f"settings not checked (no config.json): {unchecked}")
    if notes:
        print(f"warning: {run_dir}: {'; '.join(notes)}", file=sys.stderr)
    print(format_table(result, os.path.basename(os.path.normpath(run_dir))))
    print(f"\nwritten: {out}")


# -----------------------------------------------------------------------------
# one fine-tuned model: re-test it, or predict the emotion of audio files


def retest(clf, args, device):
    """A fine-tuned classifier on a corpus's test split (--fold): its metrics printed, and written
    to --out."""
    splits, classes = load_corpus(args.data, args.fold, args.wav_dir)
    if list(classes) != clf.classes:
        raise DataError(f"{args.checkpoint} predicts {clf.classes}, the data has {list(classes)}")
    test = splits["test"]
    probs = predict(clf, test, classes, device)
    labels = [classes.index(u.label) for u in test]
    metrics = compute_metrics(labels, probs.argmax(-1).tolist(), classes)
    print(json.dumps({k: metrics[k] for k in (*METRICS, "n")}))
    if args.out:
        write_json(args.out, metrics)


def print_predictions(clf, paths, device):
    """One line per audio file: its path, the predicted emotion, every class's probability."""
    for path in paths:
        wav = read_audio(path)
        with torch.no_grad():
            probs = clf(wav[None].to(device)).softmax(-1)[0].cpu()
        shown = " ".join(f"{c}={float(x):.3f}" for c, x in zip(clf.classes, probs))
        print(f"{path}\t{clf.classes[int(probs.argmax())]}\t{shown}")


# -----------------------------------------------------------------------------
# command line


def device_flag(text):
    """The devices evaluate.py runs on (train.resolve_device would take any torch device name)."""
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto, cpu, cuda or cuda:N")
    return text


def build_parser():
    p = T.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("run_dir", nargs="?", help="runs/<name>: aggregate fold*/run*/metrics.json into the table")
    a("--checkpoint", help="a fine-tuned classifier written by finetune.py (model.pt)")
    a(
        "--data",
        help="IEMOCAP_full_release folder, label .json or .csv manifest (with --checkpoint)",
    )
    a("--fold", type=int, help="test session 1-5 for IEMOCAP (with --checkpoint --data)")
    a("--wav-dir", help="folder of the wavs named in a label .json (default: the json's folder)")
    a("--predict", nargs="+", metavar="WAV", help="print the emotion of each audio file")
    devices = "auto (the GPU when there is one), cpu, cuda, cuda:N (default: %(default)s)"
    a("--device", type=device_flag, default="auto", help=devices)
    a("--out", help="where to write the JSON (default: <run_dir>/results.json)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    with T.user_errors():
        if args.run_dir:
            write_table(args.run_dir, args.out)
        elif args.checkpoint:
            device = T.resolve_device(args.device)
            try:
                clf = load_classifier(args.checkpoint).to(device)
            except CheckpointError as e:
                raise DataError(str(e)) from None
            if args.predict:
                print_predictions(clf, args.predict, device)
            elif args.data:
                retest(clf, args, device)
            else:
                p.error("--checkpoint needs --data (and --fold) or --predict")
        else:
            p.error("give a run folder, or --checkpoint with --data or --predict")


if __name__ == "__main__":
    main()
