"""V-FT: fine-tune wav2vec 2.0 for emotion, leave-one-session-out (RECIPE.md "V-FT").

    python finetune.py --fold 3 --data IEMOCAP_full_release --checkpoint wav2vec_small.pt
    python finetune.py --fold all --runs 5 --data ... --init runs/ptapt/fold{fold}/pretrained.pt
    python finetune.py --quickstart  # synthetic corpus, tiny random model: under 2 minutes on a CPU

The conv feature encoder, its layer norm and the projection are frozen; the transformer and a head
(ReLU, mean over valid frames, ReLU, Linear) are trained with class-weighted cross-entropy under
SpecAugment-like masks (time 0.08 / 15 frames / at least 2, with the mask embedding; channels
0.05 / 64 / at least 1, zeroed), Adam 1e-4 constant, 15 epochs of batches of 64 utterances
truncated to 10 s; then every utterance of the held-out session is classified at full length.

--recipe release (the default) computes what the authors' code computed: random batches, the conv
encoder's group norm over the padded batch, transformers 4.10's span counts (one per batch, from its
padded length), a mean that leaves out each utterance's last frame; --recipe clean does all of it
per utterance (README "The two recipes"; every value and its source: RECIPE.md).

Output: runs/<name>/fold<k>/run<r>/{config.json, log.jsonl, timing.jsonl, model.pt, predictions.csv,
metrics.json}. The training loop (train.py's `train`) is the one every stage of pretrain.py uses.
"""

import argparse
import json
import os
import re
import sys

import numpy as np
import torch
import torch.nn.functional as F

import train as T  # what every stage shares: the loop, recipes, resume, torchrun, flag types
from checkpoints import save_classifier, write_json
from data import AudioDataset, DataError, count_table, format_count_table, load_corpus
from evaluate import compute_metrics, predict, write_predictions
from model import EmotionClassifier, vft_masks
from synth import synthesize_iemocap

# -----------------------------------------------------------------------------
# the method: V-FT


def vft_loss(logits, labels, weights):
    """Class-weighted cross-entropy (RECIPE.md "V-FT"): sum_i w_{y_i} CE_i / sum_i w_{y_i}.
    Returned as its (numerator, denominator) pair, which `train` adds up over processes."""
    ce = F.cross_entropy(logits.float(), labels, weight=weights, reduction="sum")
    return ce, weights[labels].sum()


def finetune_run(args, fold, run, splits, classes, run_dir):
    """One V-FT run: a fixed number of epochs, then the test (the release had no validation set)."""
    device, seed = T.resolve_device(args.device), args.seed + run
    config = {k: v for k, v in vars(args).items() if k not in ("fold", "runs")}
    config.update(fold=fold, run=run, seed_of_run=seed, classes=list(classes))
    metrics_path = os.path.join(run_dir, "metrics.json")
    if T.check_run_config(run_dir, config) and os.path.exists(metrics_path):
        print(f"{run_dir}: finished already (metrics.json): skipped; to redo it, remove the folder")
        with open(metrics_path) as f:
            return json.load(f)
    T.seed_everything(seed)
    train_set = stratified_fraction(splits["train"], args.train_fraction, seed)
    backbone = T.load_backbone(args.init or args.checkpoint, args.seed)
    padded = args.group_norm == "padded"
    clf = EmotionClassifier(
        backbone, classes, skip_last_frame=args.skip_last_frame, norm_over_padding=padded
    ).to(device)
    params = backbone.freeze_feature_encoder() + list(clf.head.parameters())
    dataset = AudioDataset(
        train_set, classes, max_seconds=args.max_seconds, crop="head", cache=args.cache
    )
    weights = T.class_weights(dataset.labels, len(classes))
    lengths = dataset.lengths
    sampler = T.train_batches(lengths, args.batch_size, args.max_batch_seconds, args.bucket, seed)
    T.train(
        clf,
        params,
        vft_batch_loss(args, clf, backbone, seed, weights, device),
        dataset,
        sampler,
        updates=args.epochs * len(sampler),
        lr=args.lr,
        schedule=lambda update: 1.0,
        device=device,
        precision=args.precision,
        run_dir=run_dir,
        name="",
        save_every=None,
        desc=f"fold {fold} run {run}",
        workers=args.workers,
        progress=args.progress,
    )
    metrics = test_run(args, clf, splits["test"], classes, device, fold, run, run_dir)
    T.barrier()
    return metrics


def vft_batch_loss(args, clf, backbone, seed, weights, device):
    """batch_loss for `train`: the batch's V-FT masks (one generator per utterance and update), the
    classifier's logits under them, vft_loss."""
    time = (args.time_mask_prob, args.time_mask_span, args.time_mask_min)
    channel = (args.channel_mask_prob, args.channel_mask_span, args.channel_mask_min)
    dim = backbone.cfg.embed_dim

    def batch_loss(batch, update):
        wav = T.pad_to_whole_batch(batch["wav"]) if args.group_norm == "padded" else batch["wav"]
        rngs = T.batch_rngs(seed, update, batch["indices"])
        frames = backbone.frame_lengths(batch["lengths"])
        padded_frames = int(backbone.frame_lengths(torch.tensor(wav.shape[1])))
        batch_rng = T.utterance_rng(seed, update, -1)
        masks = vft_masks(
            args.mask_semantics, frames, padded_frames, dim, rngs, batch_rng, time, channel
        )
        masks = [m if m is None else m.to(device) for m in masks]
        logits = clf(wav.to(device), batch["lengths"], *masks)
        return [vft_loss(logits, batch["labels"].to(device), weights.to(device))]

    return batch_loss


def test_run(args, clf, test, classes, device, fold, run, run_dir):
    """Every test utterance classified at full length; rank 0 writes model.pt, predictions.csv and,
    last, metrics.json, and drops the resume point. Returns the metrics."""
    dtype = T.autocast_dtype(device, args.precision)
    probs = predict(clf, test, classes, device, dtype, workers=args.workers, progress=args.progress)
    labels = [classes.index(u.label) for u in test]
    metrics = compute_metrics(labels, probs.argmax(-1).tolist(), classes)
    if T.world()[0] == 0:
        meta = {"fold": fold, "run": run, "source": args.init or args.checkpoint}
        save_classifier(clf, os.path.join(run_dir, "model.pt"), meta=meta)
        write_predictions(os.path.join(run_dir, "predictions.csv"), test, probs, classes)
        # written last: its presence means the run is complete
        write_json(os.path.join(run_dir, "metrics.json"), metrics)
        T.remove_training_state(os.path.join(run_dir, "state.pt"))
        print(
            f"fold {fold} run {run}: UA {metrics['ua']:.4f}  WA {metrics['wa']:.4f}  "
            f"macro-F1 {metrics['macro_f1']:.4f}  ({len(test)} test utterances)"
        )
    return metrics


def stratified_fraction(utterances, fraction, seed):
    """The paper's low-resource setting: the same fraction of every class, drawn with a seed."""
    if fraction == 1:
        return utterances
    rng = np.random.default_rng(seed)
    keep = []
    for label in sorted({u.label for u in utterances}):
        members = [u for u in utterances if u.label == label]
        n = max(1, round(fraction * len(members)))
        keep += [members[i] for i in sorted(rng.choice(len(members), n, replace=False))]
    return sorted(keep, key=lambda u: u.uid)


# -----------------------------------------------------------------------------
# command line

# (flag, type, default, help), in the order config.json lists them
NUMBERS = [
    ("--runs", T.COUNT, 1, "runs per fold, with seeds seed, seed+1, ... (the paper: 5)"),
    ("--train-fraction", T.FRACTION, 1.0, "a stratified fraction of the training utterances"),
    ("--epochs", T.COUNT, 15, "passes over the training set (RECIPE.md V-FT)"),
    ("--batch-size", T.COUNT, 64, "utterances per update, the last partial batch dropped"),
    ("--max-batch-seconds", T.POSITIVE, None, "cap each batch's padded audio too (none dropped)"),
    ("--lr", T.POSITIVE, 1e-4, "Adam, constant, no weight decay"),
    ("--max-seconds", T.AUDIO_SECONDS, 10.0, "training audio truncated to its first N seconds"),
    ("--time-mask-prob", T.PROBABILITY, 0.08, "time masks"),
    ("--time-mask-span", T.COUNT, 15, "frames"),
    ("--time-mask-min", T.NATURAL, 2, "at least this many spans"),
    ("--channel-mask-prob", T.PROBABILITY, 0.05, "channel masks"),
    ("--channel-mask-span", T.COUNT, 64, "channels"),
    ("--channel-mask-min", T.NATURAL, 1, "at least this many spans"),
]
# where the recipes differ: each takes either recipe's value (train.RECIPES), by default --recipe's
RECIPE_FLAGS = {
    "--bucket": "batches of similar lengths (less padding)",
    "--mask-semantics": "span counts of transformers 4.10, one per padded batch, or per utterance",
    "--skip-last-frame": "the head's mean leaves out each utterance's last frame, as the release's",
    "--group-norm": "the conv encoder's group norm over the padded batch, or per utterance",
}


def build_parser():
    p = T.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    T.add_run_flags(p)
    a = p.add_argument
    fold = "test session 1-5, or 'all'; a .json/.csv corpus has one split and runs once"
    a("--fold", default="1", help=fold + T.DEFAULT)
    a("--checkpoint", help="a fairseq .pt or Hugging Face folder of wav2vec 2.0, or random-tiny")
    a("--init", help="a pretrain.py output instead of --checkpoint; '{fold}' becomes the fold")
    for flag, kind, default, text in NUMBERS:
        a(flag, type=kind, default=default, help=text + T.DEFAULT)
    for flag, text in RECIPE_FLAGS.items():
        setting = flag[2:].replace("-", "_")
        values = [recipe[setting] for recipe in T.RECIPES.values()]
        on_off = isinstance(values[0], bool)
        kind = {"action": argparse.BooleanOptionalAction} if on_off else {"choices": values}
        a(flag, **kind, default=None, help=text + T.recipe_default(setting))
    a("--name", help="runs/<name>/... (default: vft; ft-<method> for --init runs/<method>/...)")
    a(
        "--quickstart",
        action="store_true",
        help="write the synthetic corpus (data/synth), fine-tune a tiny random model on fold 1",
    )
    return p


# The quick start's tiny model has 96 channels, not 768: the channel-mask span shrinks in proportion
# (64 / 768 * 96 = 8). Small batches give its 320 training utterances enough updates (a random
# transformer needs ~150 to start separating the classes); truncation to 4 s halves the CPU time.
QUICKSTART = dict(
    data="data/synth",
    checkpoint="random-tiny",
    batch_size=8,
    lr=5e-4,
    max_seconds=4.0,
    channel_mask_span=8,
    workers=0,
    cache=True,
)


def default_run_name(init, recipe, quickstart=False):
    """vft, or ft-<method> for --init runs/<method>/fold{fold}/pretrained.pt (ft-<file stem>
    otherwise); quickstart(-ft-<method>) for the quick start; "-clean" appended for the clean
    recipe, so that the two recipes' runs never share a folder."""
    if not init:
        name = "vft"
    elif re.fullmatch(r"fold(\d+|\{fold\})", os.path.basename(os.path.dirname(init))):
        name = "ft-" + os.path.basename(os.path.dirname(os.path.dirname(init)))
    else:
        name = "ft-" + os.path.splitext(os.path.basename(init))[0]
    if quickstart:
        name = "quickstart" if name == "vft" else "quickstart-" + name
    return name + "-clean" if recipe == "clean" and not name.endswith("-clean") else name


def parse_args(argv):
    p = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    # its settings as defaults: a flag given still wins, whatever its value
    if "--quickstart" in argv:
        p.set_defaults(**QUICKSTART)
    args = p.parse_args(argv)
    T.finish_args(p, args, T.RECIPES[args.recipe])
    if args.fold not in ("1", "2", "3", "4", "5", "all"):
        p.error(f"argument --fold: {args.fold!r}, expected 1-5 or 'all'")
    if not args.checkpoint and not args.init:
        p.error("give --checkpoint (a fairseq .pt, a Hugging Face folder or random-tiny) or --init")
    args.name = args.name or default_run_name(args.init, args.recipe, args.quickstart)
    return args


def check_backbones(args, folds):
    """Every fold's model file read before fold 1 trains: a wrong --checkpoint, or a missing or
    damaged fold-5 --init, fails now, not after folds 1-4 (each run still loads its own)."""
    sources = (
        [args.init.replace("{fold}", str(f)) for f in folds] if args.init else [args.checkpoint]
    )
    for source in dict.fromkeys(sources):
        if source == "random-tiny":
            continue
        if not os.path.exists(source):
            raise DataError(f"--init: {source}: no such file (the pretrain.py output for its fold)")
        T.load_backbone(source, args.seed)


def main(argv=None):
    args = parse_args(argv)
    with T.user_errors():
        T.init_distributed(args.device)
        T.resolve_device(args.device)
        rank0 = T.world()[0] == 0
        if args.quickstart and not os.path.isdir(args.data) and rank0:
            print(f"writing the synthetic corpus to {args.data}")
            synthesize_iemocap(args.data)
        T.barrier()
        results, template, folds = [], args.init, T.folds_of(args.data, args.fold)
        check_backbones(args, folds)
        for fold in folds:
            splits, classes = load_corpus(args.data, fold, args.wav_dir)
            if not results and rank0:
                utterances = [u for split in splits.values() for u in split]
                print(format_count_table(count_table(utterances)))
            args.init = template.replace("{fold}", str(fold)) if template else None
            for run in range(args.runs):
                run_dir = os.path.join(args.out, args.name, f"fold{fold}", f"run{run}")
                with T.run_lock(run_dir):
                    results.append(finetune_run(args, fold, run, splits, classes, run_dir))
        if rank0:
            root = os.path.join(args.out, args.name)
            if len(results) > 1:
                ua, wa = (np.mean([r[k] for r in results]) for k in ("ua", "wa"))
                print(f"mean over {len(results)} runs: UA {ua:.4f}  WA {wa:.4f}")
            print(f"runs in {root}; the table: python evaluate.py {root}")


if __name__ == "__main__":
    main()
