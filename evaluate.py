"""Metrics, prediction and the results table (RECIPE.md "Metrics").

python evaluate.py runs/vft                                   # folds x runs -> the paper's table
python evaluate.py --checkpoint FT.pt --data DIR --fold 3     # re-test a fine-tuned model
python evaluate.py --checkpoint FT.pt --predict a.wav b.wav   # emotion of each file
"""

import argparse
import csv
import glob
import json
import os
import re

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from checkpoints import CheckpointError, load_classifier, write_json, write_text_atomic
from data import AudioDataset, BucketBatchSampler, DataError, collate, load_corpus, read_audio
from train import OneLineParser, resolve_device, user_errors, world

# -----------------------------------------------------------------------------
# metrics


def compute_metrics(y_true, y_pred, classes):
    """UA: mean recall over the classes present in the test set (a class with no test utterance
    has no recall and is left out). WA: accuracy. Macro-F1: mean F1 over the classes present in
    the test set or the predictions, F1 = 0 where a class is never predicted or never true."""
    m = np.zeros(
        (len(classes), len(classes)), dtype=np.int64
    )  # rows: true class, columns: predicted class
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
    """Normalised mutual information (arithmetic normalisation, scikit-learn's default) between frame labels
    and the emotion of each frame's utterance: how much emotion the clusters carry (0 to 1)."""
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


def aggregate(run_root):
    """Per fold: mean and std over runs of UA, WA and macro-F1 (the population std, ddof 0, as the
    release's run_downstream_custom_multiple_fold.py reported it); average over folds; summed
    confusion. Folds are test sessions for IEMOCAP."""
    found = sorted(glob.glob(os.path.join(run_root, "fold*", "run*", "metrics.json")))
    if not found:
        raise DataError(
            f"{run_root}: no fold*/run*/metrics.json found (has finetune.py finished a run here?)"
        )
    folds, classes, confusion = {}, None, None
    for path in found:
        fold = int(re.search(r"fold(\d+)", path).group(1))
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
    for fold, runs in sorted(folds.items()):
        row = {"runs": len(runs)}
        for key in ("ua", "wa", "macro_f1"):
            values = np.array([r[key] for r in runs], dtype=float)
            row[key] = float(values.mean())
            row[f"{key}_std"] = float(values.std(ddof=0))
        table[str(fold)] = row
    average = {
        key: float(np.mean([row[key] for row in table.values()]))
        for key in ("ua", "wa", "macro_f1")
    }
    return {
        "folds": table,
        "average": average,
        "std": "population (ddof 0), as the release",
        "classes": classes,
        "confusion": confusion.tolist(),
    }


def format_table(result, name="run"):
    folds = result["folds"]
    head = "| method | " + " | ".join(f"Ses{f}" for f in folds) + " | Average |"
    lines = [head, "|---" * (len(folds) + 2) + "|"]
    for key in ("ua", "wa"):
        cells = [f"{100 * r[key]:.1f} ± {100 * r[key + '_std']:.1f}" for r in folds.values()]
        lines.append(
            f"| {name} {key.upper()} | "
            + " | ".join(cells)
            + f" | {100 * result['average'][key]:.1f} |"
        )
    classes = result["classes"]
    lines += [
        "",
        "mean ± population std (ddof 0, as the release) over runs per fold: "
        + ", ".join(f"Ses{f}: {r['runs']}" for f, r in folds.items()),
        "confusion matrix summed over folds and runs (rows true, columns predicted):",
        "| | " + " | ".join(classes) + " |",
        "|---" * (len(classes) + 1) + "|",
    ]
    for c, row in zip(classes, result["confusion"]):
        lines.append(f"| {c} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
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
        default="auto",
        help="auto (the GPU when there is one), cpu, cuda, cuda:N (default: %(default)s)",
    )
    p.add_argument("--out", help="where to write the JSON (default: <run_dir>/results.json)")
    args = p.parse_args(argv)
    with user_errors():
        if args.run_dir:
            result = aggregate(args.run_dir)
            out = args.out or os.path.join(args.run_dir, "results.json")
            write_json(out, result)  # before printing: a reader that closes the pipe loses nothing
            print(format_table(result, os.path.basename(os.path.normpath(args.run_dir))))
            print(f"\nwritten: {out}")
        elif args.checkpoint:
            device = resolve_device(args.device)
            try:
                clf = load_classifier(args.checkpoint).to(device)
            except CheckpointError as e:
                raise DataError(str(e)) from None
            if args.predict:
                for path in args.predict:
                    wav = read_audio(path)
                    with torch.no_grad():
                        probs = clf(wav[None].to(device)).softmax(-1)[0].cpu()
                    print(
                        f"{path}\t{clf.classes[int(probs.argmax())]}\t"
                        + " ".join(f"{c}={float(x):.3f}" for c, x in zip(clf.classes, probs))
                    )
            elif args.data:
                splits, classes = load_corpus(args.data, args.fold, args.wav_dir)
                if list(classes) != clf.classes:
                    raise DataError(
                        f"{args.checkpoint} predicts {clf.classes}, the data has {list(classes)}"
                    )
                test = splits["test"]
                probs = predict(clf, test, classes, device)
                metrics = compute_metrics(
                    [classes.index(u.label) for u in test], probs.argmax(-1).tolist(), classes
                )
                print(json.dumps({k: metrics[k] for k in ("ua", "wa", "macro_f1", "n")}))
                if args.out:
                    write_json(args.out, metrics)
            else:
                p.error("--checkpoint needs --data (and --fold) or --predict")
        else:
            p.error("give a run folder, or --checkpoint with --data or --predict")


if __name__ == "__main__":
    main()
