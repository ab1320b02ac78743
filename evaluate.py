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
from tqdm import tqdm

from checkpoints import CheckpointError, load_classifier, write_json, write_text_atomic
from data import AudioDataset, BucketBatchSampler, DataError, collate, load_corpus, read_audio
from train import (
    UNCOMPUTED_SETTINGS,
    OneLineParser,
    resolve_device,
    same_setting,
    user_errors,
    world,
)

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
    """Normalised mutual information (arithmetic normalisation, scikit-learn's default) between
    frame labels and the emotion of each frame's utterance: how much emotion the clusters carry (0
    to 1)."""
    emotion = torch.repeat_interleave(
        torch.as_tensor(utterance_labels), torch.as_tensor(frame_counts)
    )
    labels = torch.as_tensor(labels).long()
    p = torch.zeros(int(labels.max()) + 1, int(emotion.max()) + 1, dtype=torch.float64)
    p = p.index_put_(
        (labels, emotion), torch.ones(len(labels), dtype=torch.float64), accumulate=True
    ) / len(labels)
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
    rank, world_size = world()
    mine = list(range(rank, len(utterances), world_size))
    dataset = AudioDataset([utterances[i] for i in mine], classes)
    sampler = BucketBatchSampler(
        dataset.lengths,
        batch_size=64,
        max_batch_seconds=batch_seconds,
        shuffle=False,
        drop_last=False,
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers
    )
    probs = torch.zeros(len(mine), len(classes))
    for batch in tqdm(
        loader, desc="test", unit="batch", disable=not progress or rank != 0, leave=False
    ):
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

# the folder names finetune.py writes, matched whole: runs/manifold3/fold1 is fold 1, fold1.bak no
# fold
FOLD_FOLDER, RUN_FOLDER = re.compile(r"fold([1-9][0-9]*)"), re.compile(r"run(0|[1-9][0-9]*)")
# config.json's settings that may differ between the runs of one table: where and how a run went
# (train.py's UNCOMPUTED_SETTINGS), and what tells the runs apart (fold, run number, the seed it
# gives)
NOT_COMPARED = UNCOMPUTED_SETTINGS | {"fold", "run", "seed", "seed_of_run"}


class _Absent:
    """A setting one config.json has and another lacks (written by another version of
    finetune.py)."""

    def __repr__(self):
        return "(absent)"


ABSENT = _Absent()


def find_runs(run_root):
    """([(fold, run, folder)] of the finished runs <run_root>/fold<k>/run<r>/metrics.json, sorted;
    [each other folder there, and why it is left out])."""
    if not os.path.isdir(run_root):
        raise DataError(f"{run_root}: not a folder (expected runs/<name> with fold<k>/run<r>/)")
    runs, skipped = [], []
    for name in sorted(os.listdir(run_root)):
        fold_dir = os.path.join(run_root, name)
        if name.startswith(".") or not os.path.isdir(fold_dir):
            continue  # results.json, hidden folders
        fold = FOLD_FOLDER.fullmatch(name)
        if not fold:
            skipped.append(f"{name} (not fold<k>)")
            continue
        for sub in sorted(os.listdir(fold_dir)):
            run_dir = os.path.join(fold_dir, sub)
            if sub.startswith(".") or not os.path.isdir(run_dir):
                continue
            run = RUN_FOLDER.fullmatch(sub)
            if not run:
                skipped.append(f"{name}/{sub} (not run<r>)")
            elif not os.path.isfile(os.path.join(run_dir, "metrics.json")):
                skipped.append(f"{name}/{sub} (unfinished: no metrics.json)")
            else:
                runs.append((int(fold.group(1)), int(run.group(1)), run_dir))
    return sorted(runs), skipped


def run_settings(run_dir, fold, run):
    """What a run was computed with: its config.json (finetune.py writes every setting there) less
    NOT_COMPARED, with the fold's own folder in --init's path read as fold{fold}; None without
    one."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            config = json.load(f)
        if not isinstance(config, dict):
            raise ValueError(f"a JSON {type(config).__name__}, expected an object")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a config.json written by finetune.py ({e})") from None
    for key, value in (("fold", fold), ("run", run)):
        if key in config and config[key] != value:
            raise DataError(
                f"{path}: {key} {config[key]!r}, but the run is in fold{fold}/run{run}/ "
                "(a copied or renamed run?); put it back where finetune.py wrote it"
            )
    settings = {k: v for k, v in config.items() if k not in NOT_COMPARED}
    if isinstance(settings.get("init"), str):  # --init runs/<method>/fold{fold}/pretrained.pt
        settings["init"] = re.sub(
            rf"(^|[/\\])fold{fold}(?=$|[/\\])", r"\1fold{fold}", settings["init"]
        )
    return settings


def check_same_settings(run_root, runs):
    """Refuse to average runs computed with different settings (another recipe, learning rate,
    corpus, starting checkpoint...): they are not runs of one method. Returns the runs without a
    config.json."""
    reference, unchecked = None, []
    for fold, run, run_dir in runs:
        settings = run_settings(run_dir, fold, run)
        where = f"fold{fold}/run{run}"
        if settings is None:
            unchecked.append(where)
            continue
        if reference is None:
            reference = where, settings
            continue
        first, theirs = reference
        differ = sorted(
            k
            for k in theirs.keys() | settings.keys()
            if not same_setting(k, theirs.get(k, ABSENT), settings.get(k, ABSENT))
        )
        if differ:
            shown = ", ".join(
                f"{k} {theirs.get(k, ABSENT)!r} vs {settings.get(k, ABSENT)!r}" for k in differ
            )
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
        raise DataError(
            f"{run_root}: no fold<k>/run<r>/metrics.json found (has finetune.py finished a run "
            "here?)" + (f"; skipped: {', '.join(skipped)}" if skipped else "")
        )
    unchecked = check_same_settings(run_root, runs)
    folds, classes, confusion = {}, None, None
    for fold, _, run_dir in runs:
        path = os.path.join(run_dir, "metrics.json")
        try:
            with open(path) as f:
                m = json.load(f)
            m["classes"], m["confusion"], m["ua"], m["wa"], m["macro_f1"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(
                f"{path}: not a metrics.json written by finetune.py ({type(e).__name__}: {e})"
            ) from None
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
        row = {"runs": len(fold_runs)}
        for key in ("ua", "wa", "macro_f1"):
            values = np.array([r[key] for r in fold_runs], dtype=float)
            row[key] = float(values.mean())
            row[f"{key}_std"] = float(values.std(ddof=0))  # 0 for one run: format_table omits it
        table[str(fold)] = row
    average = {
        key: float(np.mean([row[key] for row in table.values()]))
        for key in ("ua", "wa", "macro_f1")
    }
    return {
        "folds": table,
        "average": average,
        "std": "population (ddof 0), as the release",
        "runs": len(runs),
        "classes": classes,
        "confusion": confusion.tolist(),
        "skipped": skipped,
        "settings_not_checked": unchecked,
    }


def left_out_note(result):
    """One line on what the table leaves out or could not check; None when nothing."""
    parts = []
    if result.get("skipped"):
        parts.append("skipped: " + ", ".join(result["skipped"]))
    if result.get("settings_not_checked"):
        parts.append(
            "settings not checked (no config.json): " + ", ".join(result["settings_not_checked"])
        )
    return "; ".join(parts) or None


def format_cell(row, key):
    """mean ± std over a fold's runs; a single run's value alone (it has no spread to show)."""
    if row["runs"] < 2:
        return f"{100 * row[key]:.1f} (1 run)"
    return f"{100 * row[key]:.1f} ± {100 * row[key + '_std']:.1f}"


def format_table(result, name="run"):
    folds = result["folds"]
    head = "| method | " + " | ".join(f"Ses{f}" for f in folds) + " | Average |"
    lines = [head, "|---" * (len(folds) + 2) + "|"]
    for key in ("ua", "wa"):
        cells = [format_cell(r, key) for r in folds.values()]
        lines.append(
            f"| {name} {key.upper()} | "
            + " | ".join(cells)
            + f" | {100 * result['average'][key]:.1f} |"
        )
    classes = result["classes"]
    lines += [
        "",
        "mean ± population std (ddof 0, as the release) over runs per fold, runs: "
        + ", ".join(f"Ses{f}: {r['runs']}" for f, r in folds.items()),
        "confusion matrix summed over folds and runs (rows true, columns predicted):",
        "| | " + " | ".join(classes) + " |",
        "|---" * (len(classes) + 1) + "|",
    ]
    for c, row in zip(classes, result["confusion"]):
        lines.append(f"| {c} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)


# the devices evaluate.py can run on (train.resolve_device takes any torch device name)
DEVICE_NAME = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def device_flag(text):
    if not DEVICE_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto, cpu, cuda or cuda:N")
    return text


# -----------------------------------------------------------------------------
# command line


def build_parser():
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "run_dir", nargs="?", help="runs/<name>: aggregate fold*/run*/metrics.json into the table"
    )
    p.add_argument("--checkpoint", help="a fine-tuned classifier written by finetune.py (model.pt)")
    p.add_argument(
        "--data",
        help="IEMOCAP_full_release folder, label .json or .csv manifest (with --checkpoint)",
    )
    p.add_argument(
        "--fold", type=int, help="test session 1-5 for IEMOCAP (with --checkpoint --data)"
    )
    p.add_argument(
        "--wav-dir", help="folder of the wavs named in a label .json (default: the json's folder)"
    )
    p.add_argument(
        "--predict", nargs="+", metavar="WAV", help="print the emotion of each audio file"
    )
    p.add_argument(
        "--device",
        type=device_flag,
        default="auto",
        help="auto (the GPU when there is one), cpu, cuda, cuda:N (default: %(default)s)",
    )
    p.add_argument("--out", help="where to write the JSON (default: <run_dir>/results.json)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    with user_errors():
        if args.run_dir:
            write_table(args.run_dir, args.out)
        elif args.checkpoint:
            device = resolve_device(args.device)
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


def write_table(run_dir, out=None):
    """The results table of a run folder: written as JSON (default <run_dir>/results.json), then
    printed."""
    result = aggregate(run_dir)
    out = out or os.path.join(run_dir, "results.json")
    write_json(out, result)  # before printing: a reader that closes the pipe loses nothing
    note = left_out_note(result)
    if note:
        print(f"warning: {run_dir}: {note}", file=sys.stderr)
    print(format_table(result, os.path.basename(os.path.normpath(run_dir))))
    print(f"\nwritten: {out}")


def print_predictions(clf, paths, device):
    """One line per audio file: its path, the predicted emotion, every class's probability."""
    for path in paths:
        wav = read_audio(path)
        with torch.no_grad():
            probs = clf(wav[None].to(device)).softmax(-1)[0].cpu()
        print(
            f"{path}\t{clf.classes[int(probs.argmax())]}\t"
            + " ".join(f"{c}={float(x):.3f}" for c, x in zip(clf.classes, probs))
        )


def retest(clf, args, device):
    """A fine-tuned classifier on a corpus's test split (--fold): its metrics printed, and written
    to --out."""
    splits, classes = load_corpus(args.data, args.fold, args.wav_dir)
    if list(classes) != clf.classes:
        raise DataError(f"{args.checkpoint} predicts {clf.classes}, the data has {list(classes)}")
    test = splits["test"]
    probs = predict(clf, test, classes, device)
    metrics = compute_metrics(
        [classes.index(u.label) for u in test], probs.argmax(-1).tolist(), classes
    )
    print(json.dumps({k: metrics[k] for k in ("ua", "wa", "macro_f1", "n")}))
    if args.out:
        write_json(args.out, metrics)


if __name__ == "__main__":
    main()
