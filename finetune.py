"""V-FT: fine-tune wav2vec 2.0 for emotion, leave-one-session-out (RECIPE.md "V-FT").

    python finetune.py --fold 3 --data IEMOCAP_full_release --checkpoint wav2vec_small.pt
    python finetune.py --fold all --runs 5 --data ... --checkpoint ... --init runs/ptapt/fold{fold}/pretrained.pt
    python finetune.py --quickstart          # synthetic corpus + tiny random model, under 2 minutes on a CPU

The method: the conv feature encoder, its layer norm and the projection are frozen; the transformer
and a head (ReLU, mean over valid frames, ReLU, Linear) are trained with class-weighted cross-entropy
under SpecAugment-like masks (time 0.08 / 15 frames / at least 2, with the mask embedding; channels
0.05 / 64 / at least 1, zeroed), Adam 1e-4 constant, 15 epochs of batches of 64 utterances truncated
to 10 s; then every utterance of the held-out session is classified at full length.

--recipe release (the default) computes what the authors' code computed: random batches, the conv
encoder's group norm over the padded batch, transformers 4.10's span counts (one per batch, from its
padded length), a mean that leaves out each utterance's last frame; --recipe clean does all of it per
utterance (README "The two recipes"; every value and its source: RECIPE.md).

Output: runs/<name>/fold<k>/run<r>/{config.json, log.jsonl, timing.jsonl, model.pt, predictions.csv,
metrics.json}.
The training loop (train.py's `train`) is the one every stage of pretrain.py uses too.
"""

import argparse
import json
import os
import re
import sys

import numpy as np
import torch
import torch.nn.functional as F

from checkpoints import save_classifier, write_json
from data import AudioDataset, DataError, count_table, format_count_table, load_corpus
from evaluate import compute_metrics, predict, write_predictions
from model import EmotionClassifier, vft_masks
from synth import synthesize_iemocap
from train import (
    AUDIO_SECONDS,
    COUNT,
    FRACTION,
    NATURAL,
    POSITIVE,
    PROBABILITY,
    RECIPES,
    OneLineParser,
    add_run_flags,
    autocast_dtype,
    barrier,
    batch_rngs,
    check_run_config,
    class_weights,
    finish_args,
    folds_of,
    init_distributed,
    load_backbone,
    pad_to_whole_batch,
    remove_training_state,
    resolve_device,
    run_lock,
    seed_everything,
    train,
    train_batches,
    user_errors,
    utterance_rng,
    world,
)

# -----------------------------------------------------------------------------
# the method: V-FT


def vft_loss(logits, labels, weights):
    """Class-weighted cross-entropy (RECIPE.md "V-FT"): sum_i w_{y_i} CE_i / sum_i w_{y_i}.
    Returned as its (numerator, denominator) pair, which `train` adds up over processes."""
    ce = F.cross_entropy(logits.float(), labels, weight=weights, reduction="sum")
    return ce, weights[labels].sum()


def finetune_run(args, fold, run, splits, classes, run_dir):
    """One V-FT run: train a fixed number of epochs, test at the end (the release had no validation
    set)."""
    device, seed = resolve_device(args.device), args.seed + run
    config = {
        **{k: v for k, v in vars(args).items() if k not in ("fold", "runs")},
        "fold": fold,
        "run": run,
        "seed_of_run": seed,
        "classes": list(classes),
    }
    metrics_path = os.path.join(run_dir, "metrics.json")
    if check_run_config(run_dir, config) and os.path.exists(metrics_path):
        print(
            f"{run_dir}: finished already (metrics.json); skipping. Remove the folder to redo it."
        )
        with open(metrics_path) as f:
            return json.load(f)
    seed_everything(seed)
    train_set = stratified_fraction(splits["train"], args.train_fraction, seed)
    backbone = load_backbone(args.init or args.checkpoint, args.seed)
    clf = EmotionClassifier(
        backbone,
        classes,
        skip_last_frame=args.skip_last_frame,
        norm_over_padding=args.group_norm == "padded",
    ).to(device)
    params = backbone.freeze_feature_encoder() + list(clf.head.parameters())
    dataset = AudioDataset(
        train_set, classes, max_seconds=args.max_seconds, crop="head", cache=args.cache
    )
    weights = class_weights(dataset.labels, len(classes))
    sampler = train_batches(
        dataset.lengths, args.batch_size, args.max_batch_seconds, args.bucket, seed
    )
    train(
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
    barrier()
    return metrics


def vft_batch_loss(args, clf, backbone, seed, weights, device):
    """batch_loss for `train`: the batch's V-FT masks (one generator per utterance and update), the
    classifier's (on `backbone`) logits under them, vft_loss."""
    time_masks = (args.time_mask_prob, args.time_mask_span, args.time_mask_min)
    channel_masks = (args.channel_mask_prob, args.channel_mask_span, args.channel_mask_min)

    def batch_loss(batch, update):
        wav = pad_to_whole_batch(batch["wav"]) if args.group_norm == "padded" else batch["wav"]
        rngs = batch_rngs(seed, update, batch["indices"])
        masks = vft_masks(
            args.mask_semantics,
            backbone.frame_lengths(batch["lengths"]),
            int(backbone.frame_lengths(torch.tensor(wav.shape[1]))),
            backbone.cfg.embed_dim,
            rngs,
            utterance_rng(seed, update, -1),
            time_masks,
            channel_masks,
        )
        logits = clf(
            wav.to(device), batch["lengths"], *(m if m is None else m.to(device) for m in masks)
        )
        return [vft_loss(logits, batch["labels"].to(device), weights.to(device))]

    return batch_loss


def test_run(args, clf, test, classes, device, fold, run, run_dir):
    """Every test utterance classified at full length; rank 0 writes model.pt, predictions.csv and,
    last, metrics.json, and drops the resume point. Returns the metrics."""
    probs = predict(
        clf,
        test,
        classes,
        device,
        autocast_dtype(device, args.precision),
        workers=args.workers,
        progress=args.progress,
    )
    metrics = compute_metrics(
        [classes.index(u.label) for u in test], probs.argmax(-1).tolist(), classes
    )
    if world()[0] == 0:
        save_classifier(
            clf,
            os.path.join(run_dir, "model.pt"),
            meta={"fold": fold, "run": run, "source": args.init or args.checkpoint},
        )
        write_predictions(os.path.join(run_dir, "predictions.csv"), test, probs, classes)
        # written last: its presence means the run is complete
        write_json(os.path.join(run_dir, "metrics.json"), metrics)
        remove_training_state(os.path.join(run_dir, "state.pt"))
        print(
            f"fold {fold} run {run}: UA {metrics['ua']:.4f}  WA {metrics['wa']:.4f}  macro-F1 "
            f"{metrics['macro_f1']:.4f}"
            f"  ({len(test)} test utterances)"
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
# the training loop every stage uses (V-FT here; TAPT, the P-TAPT teacher and P-TAPT in pretrain.py)


# -----------------------------------------------------------------------------
# engineering: resume points, interruption, several processes, output folders


# -----------------------------------------------------------------------------
# command line


def build_parser():
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_flags(p)
    add_source_flags(p)
    add_training_flags(p)
    add_mask_flags(p)
    add_recipe_flags(p)
    a = p.add_argument
    a(
        "--name",
        default=None,
        help="run name: runs/<name>/fold<k>/run<r> (default: vft; ft-<method> with "
        "--init runs/<method>/fold<k>/pretrained.pt)",
    )
    a(
        "--quickstart",
        action="store_true",
        help="generate the synthetic corpus (data/synth) and fine-tune a tiny random wav2vec 2.0 "
        "on fold 1: "
        "no data or checkpoint needed",
    )
    return p


def add_source_flags(p):
    """What is fine-tuned, on which fold, how many times, on how much of the training data."""
    a = p.add_argument
    a(
        "--fold",
        default="1",
        help="test session 1-5, or 'all' (default: %(default)s, one fold, where pretrain.py's "
        "default is all five); a .json/.csv corpus has one split of its own and runs once",
    )
    a(
        "--checkpoint",
        help="fairseq wav2vec 2.0 checkpoint (e.g. wav2vec_small.pt), Hugging Face wav2vec 2.0 "
        "folder, "
        "or random-tiny (a tiny randomly initialised model, for the synthetic corpus)",
    )
    a(
        "--init",
        help="start from a pretrain.py output instead of --checkpoint; '{fold}' is replaced by the "
        "fold",
    )
    a(
        "--runs",
        type=COUNT,
        default=1,
        help="runs per fold with seeds seed, seed+1, ... (the paper: 5) (default: %(default)s)",
    )
    a(
        "--train-fraction",
        type=FRACTION,
        default=1.0,
        help="fine-tune on this stratified fraction of the training utterances (low-resource) "
        "(default: %(default)s)",
    )


def add_training_flags(p):
    """Epochs, batches, learning rate, truncation (RECIPE.md V-FT)."""
    a = p.add_argument
    a("--epochs", type=COUNT, default=15, help="RECIPE.md V-FT (default: %(default)s)")
    a(
        "--batch-size",
        type=COUNT,
        default=64,
        help="utterances per update, last partial batch dropped (default: %(default)s)",
    )
    a(
        "--max-batch-seconds",
        type=POSITIVE,
        default=None,
        help="also cap each batch at this much padded audio; smaller batches then count as full "
        "(default: %(default)s)",
    )
    a(
        "--lr",
        type=POSITIVE,
        default=1e-4,
        help="Adam, constant, no weight decay (default: %(default)s)",
    )
    a(
        "--max-seconds",
        type=AUDIO_SECONDS,
        default=10.0,
        help="training audio truncated to its first N seconds (default: %(default)s)",
    )


def add_mask_flags(p):
    """The SpecAugment-like time and channel masks."""
    a = p.add_argument
    a("--time-mask-prob", type=PROBABILITY, default=0.08, help="(default: %(default)s)")
    a("--time-mask-span", type=COUNT, default=15, help="frames (default: %(default)s)")
    a(
        "--time-mask-min",
        type=NATURAL,
        default=2,
        help="at least this many spans (default: %(default)s)",
    )
    a("--channel-mask-prob", type=PROBABILITY, default=0.05, help="(default: %(default)s)")
    a("--channel-mask-span", type=COUNT, default=64, help="channels (default: %(default)s)")
    a("--channel-mask-min", type=NATURAL, default=1, help="(default: %(default)s)")


def add_recipe_flags(p):
    """The settings where the recipes differ (train.RECIPES): default None, the recipe's."""
    a = p.add_argument
    a(
        "--bucket",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="batches of similar lengths (less padding) (default: the recipe's: release random, "
        "clean bucketed)",
    )
    a(
        "--mask-semantics",
        choices=["release", "utterance"],
        default=None,
        help="span counts of transformers 4.10, one per batch from its padded length, or per "
        "utterance "
        "(default: the recipe's: release for release, utterance for clean)",
    )
    a(
        "--skip-last-frame",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the head's mean leaves out each utterance's last frame, as the release's did "
        "(default: the recipe's: release yes, clean no)",
    )
    a(
        "--group-norm",
        choices=["padded", "valid"],
        default=None,
        help="the conv encoder's group norm over the padded batch, or over each utterance's own "
        "samples "
        "(default: the recipe's: release padded, clean valid)",
    )


# The quick start's tiny model: 96 channels instead of 768, so the channel-mask span shrinks in
# proportion (64 / 768 * 96 = 8); small batches give the 320-utterance training set enough updates
# (a random transformer needs ~150 before it starts to separate the classes); 4 s truncation halves
# the CPU time of the synthetic 1-8 s utterances.
QUICKSTART = dict(
    data="data/synth",
    checkpoint="random-tiny",
    fold="1",
    epochs=15,
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
    finish_args(p, args, RECIPES[args.recipe])
    if args.fold not in ("1", "2", "3", "4", "5", "all"):
        p.error(f"argument --fold: {args.fold!r}, expected 1-5 or 'all'")
    if not args.checkpoint and not args.init:
        p.error(
            "give --checkpoint (a fairseq wav2vec 2.0 .pt, e.g. wav2vec_small.pt, a Hugging Face "
            "wav2vec 2.0 folder, or random-tiny) or --init (a pretrain.py output)"
        )
    args.name = args.name or default_run_name(args.init, args.recipe, args.quickstart)
    return args


def check_backbones(args, folds):
    """Every fold's model file read before the first fold trains: a wrong --checkpoint, or a
    missing or damaged fold-5 --init, is found now rather than after folds 1-4 (reading only: each
    run still loads its own, after seeding)."""
    sources = (
        [args.init.replace("{fold}", str(f)) for f in folds] if args.init else [args.checkpoint]
    )
    for source in dict.fromkeys(sources):
        if source == "random-tiny":
            continue
        if not os.path.exists(source):
            raise DataError(f"--init: {source}: no such file (the pretrain.py output for its fold)")
        load_backbone(source, args.seed)


def main(argv=None):
    args = parse_args(argv)
    with user_errors():
        init_distributed(args.device)
        resolve_device(args.device)
        if args.quickstart and not os.path.isdir(args.data) and world()[0] == 0:
            print(f"writing the synthetic corpus to {args.data}")
            synthesize_iemocap(args.data)
        barrier()
        results, template, folds = [], args.init, folds_of(args.data, args.fold)
        check_backbones(args, folds)
        for fold in folds:
            splits, classes = load_corpus(args.data, fold, args.wav_dir)
            if not results and world()[0] == 0:
                print(
                    format_count_table(count_table([u for split in splits.values() for u in split]))
                )
            args.init = template.replace("{fold}", str(fold)) if template else None
            for run in range(args.runs):
                run_dir = os.path.join(args.out, args.name, f"fold{fold}", f"run{run}")
                with run_lock(run_dir):
                    results.append(finetune_run(args, fold, run, splits, classes, run_dir))
        if world()[0] == 0:
            root = os.path.join(args.out, args.name)
            if len(results) > 1:
                ua, wa = (np.mean([r[k] for r in results]) for k in ("ua", "wa"))
                print(f"mean over {len(results)} runs: UA {ua:.4f}  WA {wa:.4f}")
            print(f"runs in {root}; the table: python evaluate.py {root}")


if __name__ == "__main__":
    main()
