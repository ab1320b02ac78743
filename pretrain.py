"""Task-adaptive pretraining on a fold's training sessions: TAPT and P-TAPT (RECIPE.md).

    python pretrain.py --mode tapt  --fold 3 --data IEMOCAP_full_release --checkpoint wav2vec_small.pt
    python pretrain.py --mode ptapt --fold 3 --data IEMOCAP_full_release --checkpoint wav2vec_small.pt
    python finetune.py --fold 3 --data ... --init runs/ptapt/fold3/pretrained.pt

Without --fold every fold runs in turn. Output per fold: runs/<mode>/fold<k>/pretrained.pt. P-TAPT's
stages (teacher/, labels.pt, pretrained.pt) are each skipped when their output exists and resume
when interrupted. Only the fold's training sessions are ever read for training.
"""
import argparse
import math
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from data import AudioDataset, DataError, load_corpus
from finetune import (autocast_dtype, barrier, check_run_config, class_weights, host_group, init_distributed, is_main,
                      load_backbone, remove_training_state, resolve_device, run_updates, seed_everything,
                      train_sampler, tri_stage_lr, utterance_rng, utterance_span_masks, world)
from model import autocast_off, compute_span_mask, save_wav2vec2, to_device

# -----------------------------------------------------------------------------
# the wav2vec 2.0 objective (TAPT), as fairseq defines it


def sample_negatives(time_mask, num_negatives, generator=None):
    """For every masked frame (in time_mask[time_mask] order), `num_negatives` indices into that
    same flat list, drawn uniformly with replacement from the *other* masked frames of the same
    utterance (fairseq's sample_negatives over masked targets)."""
    counts = time_mask.sum(1).cpu()
    starts = torch.cumsum(counts, 0) - counts
    row = torch.repeat_interleave(torch.arange(len(counts)), counts)
    local = torch.arange(int(counts.sum())) - starts[row]
    n = counts[row]
    draw = (torch.rand(len(row), num_negatives, generator=generator) * (n - 1).clamp(min=1)[:, None]).long()
    draw = draw + (draw >= local[:, None]).long()          # skip the frame itself
    draw = torch.where((n > 1)[:, None], draw, local[:, None])  # a lone masked frame has no distractor
    return (starts[row][:, None] + draw).to(time_mask.device)


def utterance_negatives(time_mask, num_negatives, rngs):
    """sample_negatives with one generator per utterance (independent of the batch it is in)."""
    counts = time_mask.sum(1).tolist()
    offsets = [sum(counts[:row]) for row in range(len(counts))]
    parts = [sample_negatives(time_mask[row:row + 1].cpu(), num_negatives, rng) + offset
             for row, (rng, offset) in enumerate(zip(rngs, offsets))]
    return torch.cat(parts).to(time_mask.device)


def pretraining_masks(frames, rngs, args):
    """Time masks for TAPT / P-TAPT: Hugging Face semantics per utterance; fairseq's semantics make
    every utterance of a batch (of a rank's share, as in fairseq's own multi-GPU runs) mask equally
    many frames, so those are drawn for the batch."""
    if args.mask_semantics == "hf":
        return utterance_span_masks(frames, int(frames.max()), rngs, args.mask_prob, args.mask_span, args.mask_min)
    return compute_span_mask(frames, int(frames.max()), args.mask_prob, args.mask_span, args.mask_min, "fairseq",
                             rngs[0])


def masked_frames(x, time_mask):
    """x[time_mask] for x (B, F, C). With the mask on the CPU (as training makes it) the frames are
    counted there and gathered on x's device: boolean indexing of a GPU tensor waits for the GPU to
    count them."""
    rows = time_mask.flatten().nonzero().squeeze(1)
    return x.flatten(0, 1).index_select(0, to_device(rows, x.device))


def contrastive_loss(model, encoded, time_mask, negatives, penalty_weight=10.0):
    """fairseq's wav2vec 2.0 loss for given masks and negatives. Returns its terms:
    contrastive = sum over masked frames of CE(cosine logits / logit_temp, target at index 0),
    diversity = (GV - perplexity) / GV * n_masked, feature_penalty = mean(features^2) * n_masked,
    loss = contrastive + 0.1 * diversity + penalty_weight * feature_penalty (RECIPE.md: 10, as fairseq;
    0 is Hugging Face's Wav2Vec2ForPreTraining, which has no feature penalty). time_mask and negatives
    may stay on the CPU (then nothing here waits for the GPU)."""
    cfg = model.cfg
    targets, perplexity = model.quantizer(masked_frames(encoded.features, time_mask))  # the *unmasked* features
    targets = model.project_q(targets)
    context = model.final_proj(masked_frames(encoded.hidden, time_mask))
    negatives = to_device(negatives, targets.device)
    candidates = torch.cat([targets.unsqueeze(1), targets[negatives]], 1)  # (N, 1 + K, D)
    logits = F.cosine_similarity(context.float().unsqueeze(1), candidates.float(), dim=-1) / cfg.logit_temp
    same = (targets[negatives] == targets.unsqueeze(1)).all(-1)  # a distractor equal to the target
    logits[:, 1:] = logits[:, 1:].masked_fill(same, float("-inf"))
    n = time_mask.sum()
    contrastive = F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device),
                                  reduction="sum")
    gv = model.quantizer.groups * model.quantizer.num_vars
    diversity = (gv - perplexity) / gv * n
    penalty = encoded.feature_penalty * n
    return {"loss": contrastive + 0.1 * diversity + penalty_weight * penalty, "contrastive": contrastive,
            "diversity": diversity, "feature_penalty": penalty, "n_masked": n}


# -----------------------------------------------------------------------------
# P-TAPT: the emotion-aware teacher and the pseudo-label heads


def mlp_head(dim, hidden, out):
    """Linear - Tanh - Linear (the release's frame and pseudo-label heads)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, out))


class Teacher(nn.Module):
    """wav2vec 2.0 fine-tuned with every frame labelled with its utterance's emotion: a frame
    head on every frame, and an utterance head (BiLSTM, mean over time, ReLU, Linear-Tanh-Linear)."""

    def __init__(self, backbone, num_classes, hidden=256):
        super().__init__()
        dim = backbone.cfg.embed_dim
        self.backbone = backbone
        self.frame_head = mlp_head(dim, hidden, num_classes)
        self.lstm = nn.LSTM(dim, hidden // 2, batch_first=True, bidirectional=True)
        self.utterance_head = mlp_head(hidden, hidden, num_classes)

    def forward(self, wav, lengths):
        hidden, frames = self.backbone(wav, lengths)
        frame_logits = self.frame_head(hidden)
        # outside autocast: cuDNN's LSTM would run in fp16, without loss scaling, even under bf16 autocast;
        # batches are cropped to equal length, so the mean over time has no padding to leave out
        with autocast_off(hidden.device):
            pooled = self.lstm(hidden.float())[0].mean(1)
        return frame_logits, self.utterance_head(F.relu(pooled)), frames


class PseudoLabelHeads(nn.Module):
    """One Linear(dim, 256) - Tanh - Linear(256, K) head per K, on ReLU(transformer output)."""

    def __init__(self, dim, ks, hidden=256):
        super().__init__()
        self.ks = list(ks)
        self.heads = nn.ModuleList(mlp_head(dim, hidden, k) for k in self.ks)

    def forward(self, hidden):
        x = F.relu(hidden)
        return [head(x) for head in self.heads]


class WithHeads(nn.Module):  # one module so the resumable state holds backbone and heads together
    def __init__(self, backbone, heads):
        super().__init__()
        self.backbone, self.heads = backbone, heads


# -----------------------------------------------------------------------------
# stages


def schedule_for(args, warmup, total):
    flat = int(round(args.flat_fraction * total))
    return lambda update: tri_stage_lr(update, total, warmup, flat)


def stage_common(args, device, desc, run_dir, name):
    return dict(device=device, dtype=autocast_dtype(device, args.precision), lr=args.lr,
                state_path=os.path.join(run_dir, f"{name}.state.pt"), save_every=args.save_every,
                log_path=os.path.join(run_dir, f"{name}.log.jsonl"), desc=desc, workers=args.workers,
                progress=args.progress, log_every_epoch=True)


def finish_stage(run_dir, name, model, out, meta):
    """Rank 0 writes the stage's output, then drops its resume state (it holds the optimizer: 3x
    the model); the other ranks wait for the file."""
    if is_main():
        save_wav2vec2(model, out, meta=meta)
        remove_training_state(os.path.join(run_dir, f"{name}.state.pt"))
    barrier()


def run_tapt(args, fold, train, classes, run_dir, device):
    out = os.path.join(run_dir, "pretrained.pt")
    seed_everything(args.seed + fold)  # every stage starts from its own seed, whichever stages ran before
    model = load_backbone(args)
    if not model.cfg.has_quantizer:
        raise DataError(f"{args.checkpoint}: TAPT needs the pretraining modules (quantizer, project_q, final_proj); "
                        "this checkpoint has none (an ASR fine-tuned model?). Use the pretrained checkpoint, "
                        "e.g. wav2vec_small.pt rather than wav2vec_small_960h.pt")
    model.to(device)
    model.feature_grad_mult = args.feature_grad_mult
    dataset = AudioDataset(train, classes, max_seconds=args.max_seconds, crop="random", cache=args.cache, seed=args.seed)
    sampler = train_sampler(dataset.lengths, args, args.seed)

    def loss_fn(batch, update):  # masks, negatives and lengths made and read on the CPU: no wait for the GPU
        frames = model.frame_lengths(batch["lengths"])
        rngs = [utterance_rng(args.seed, update, i) for i in batch["indices"].tolist()]
        mask = pretraining_masks(frames, rngs, args)
        negatives = utterance_negatives(mask, model.cfg.num_negatives, rngs)
        encoded = model.encode(to_device(batch["wav"], device), batch["lengths"], time_mask=to_device(mask, device))
        terms = contrastive_loss(model, encoded, mask, negatives, args.feature_penalty)
        # fairseq divides the gradient by the number of masked frames (its sample size)
        return [(terms["loss"], terms["n_masked"])], float(batch["lengths"].sum()) / 16000

    run_updates(model=model, params=list(model.parameters()), loss_fn=loss_fn, dataset=dataset, sampler=sampler,
                total_updates=args.updates, schedule=schedule_for(args, args.warmup, args.updates),
                on_update=model.quantizer.set_num_updates,
                **stage_common(args, device, f"TAPT fold {fold}", run_dir, "tapt"))
    finish_stage(run_dir, "tapt", model, out, {"mode": "tapt", "fold": fold, "source": args.checkpoint,
                                               "updates": args.updates})
    return out


def crop_to_shortest(batch, rngs):
    """The teacher's batches: every utterance randomly cropped to the shortest one of the whole
    batch, across ranks (no padding)."""
    shortest = batch["lengths"].min()
    if world()[1] > 1:  # agreed on the host: an NCCL reduction would wait for the GPU to read it back
        dist.all_reduce(shortest, op=dist.ReduceOp.MIN, group=host_group())
    n = int(shortest)
    starts = [int(torch.randint(0, int(length) - n + 1, (), generator=rng)) for length, rng in zip(batch["lengths"], rngs)]
    wav = torch.stack([row[s:s + n] for row, s in zip(batch["wav"], starts)])
    return wav, torch.full((len(wav),), n, dtype=torch.long)


def run_teacher(args, fold, train, classes, run_dir, device):
    out = os.path.join(run_dir, "teacher.pt")
    if os.path.exists(out):
        if is_main():
            print(f"{out} exists: teacher done")
        return out
    seed_everything(args.seed + fold)
    backbone = load_backbone(args)
    backbone.freeze_feature_encoder = True  # the release froze the conv encoder
    teacher = Teacher(backbone, len(classes)).to(device)
    params = [p for n, p in teacher.named_parameters()
              if not n.startswith(("backbone.feature_encoder", "backbone.layer_norm", "backbone.post_extract_proj",
                                   "backbone.quantizer", "backbone.project_q", "backbone.final_proj", "backbone.mask_emb"))]
    dataset = AudioDataset(train, classes, max_seconds=args.max_seconds, crop="random", cache=args.cache, seed=args.seed)
    sampler = train_sampler(dataset.lengths, args, args.seed)
    weights = class_weights(dataset.labels, len(classes)).to(device)

    def loss_fn(batch, update):  # crops and lengths made and read on the CPU: no wait for the GPU
        wav, lengths = crop_to_shortest(batch, [utterance_rng(args.seed, update, i) for i in batch["indices"].tolist()])
        frame_logits, utt_logits, _ = teacher(to_device(wav, device), lengths)
        labels = to_device(batch["labels"], device)
        frame_labels = labels[:, None].expand(-1, frame_logits.shape[1])
        # two class-weighted CE means (frames, utterances), each as (sum of w_y * CE, sum of w_y)
        frame_ce = F.cross_entropy(frame_logits.flatten(0, 1).float(), frame_labels.flatten(), weight=weights,
                                   reduction="sum")
        utterance_ce = F.cross_entropy(utt_logits.float(), labels, weight=weights, reduction="sum")
        return ([(frame_ce, weights[frame_labels].sum()), (utterance_ce, weights[labels].sum())],
                float(lengths.sum()) / 16000)

    total = args.teacher_updates
    warmup = int(round(args.teacher_warmup_fraction * total))
    run_updates(model=teacher, params=params, loss_fn=loss_fn, dataset=dataset, sampler=sampler, total_updates=total,
                schedule=schedule_for(args, warmup, total),
                **stage_common(args, device, f"P-TAPT teacher fold {fold}", run_dir, "teacher"))
    finish_stage(run_dir, "teacher", backbone, out, {"mode": "ptapt-teacher", "fold": fold, "source": args.checkpoint})
    return out


def run_pseudo_labels(args, fold, splits, classes, run_dir, teacher_path, device):
    """Teacher features of every training frame, k-means for each K, one label per frame and K
    (kmeans.pseudo_label_stage: sharded over torchrun's ranks, features streamed through run_dir)."""
    import kmeans
    out = os.path.join(run_dir, "labels.pt")
    if os.path.exists(out):
        if is_main():
            print(f"{out} exists: k-means done")
        return out
    from model import load_wav2vec2
    teacher = load_wav2vec2(teacher_path).to(device)
    layer = args.layer or teacher.cfg.num_layers
    try:
        kmeans.pseudo_label_stage(teacher, splits["train"], layer, args.ks, args.kmeans_iters, args.kmeans_init,
                                  args.seed, device, out, {"teacher": teacher_path, "layer": layer, "fold": fold},
                                  progress=args.progress, feature_dir=run_dir, workers=args.workers)
    except ValueError as e:  # e.g. K larger than the number of frames
        raise DataError(f"k-means on fold {fold}'s teacher frames: {e}") from None
    return out


def run_pseudo_label_pretraining(args, fold, train, classes, run_dir, labels_path, device):
    import kmeans
    out = os.path.join(run_dir, "pretrained.pt")
    try:
        stored = kmeans.load_labels(labels_path)
    except ValueError as e:
        raise DataError(str(e)) from None
    ks = [int(k) for k in stored["labels"]]
    seed_everything(args.seed + fold)
    backbone = load_backbone(args)  # from the original checkpoint again, not from the teacher
    backbone.freeze_feature_encoder = True
    model = WithHeads(backbone, PseudoLabelHeads(backbone.cfg.embed_dim, ks)).to(device)
    params = list(backbone.encoder.parameters()) + list(model.heads.parameters())
    dataset = AudioDataset(train, classes, max_seconds=args.max_seconds, crop="random", crop_align=320,
                           cache=args.cache, seed=args.seed)
    sampler = train_sampler(dataset.lengths, args, args.seed)
    hop = math.prod(s for _, _, s in backbone.cfg.conv_layers)
    if hop != 320:
        raise DataError(f"the model's frame hop is {hop} samples; pseudo-label crops assume 320")

    # every training utterance must have labels for exactly its frames: check now, not hours in
    for u in train:
        try:
            kmeans.labels_for(stored, u.uid, int(backbone.frame_lengths(torch.tensor([u.num_samples]))[0]))
        except ValueError as e:
            raise DataError(str(e)) from None

    def frame_targets(batch, frames):
        """Each utterance's labels for the frames of its crop; -100 (ignored) on padding."""
        targets = [torch.full((len(frames), int(frames.max())), -100, dtype=torch.long) for _ in ks]
        for row, (index, offset) in enumerate(zip(batch["indices"].tolist(), batch["offsets"].tolist())):
            u = train[index]
            full = backbone.frame_lengths(torch.tensor([u.num_samples]))[0]
            per_k = kmeans.labels_for(stored, u.uid, int(full))
            first = offset // hop
            n = int(frames[row])
            for t, k in zip(targets, ks):
                t[row, :n] = per_k[k][first:first + n].long()
        return targets

    def loss_fn(batch, update):  # masks, targets and lengths made and read on the CPU: no wait for the GPU
        frames = backbone.frame_lengths(batch["lengths"])
        mask = pretraining_masks(frames, [utterance_rng(args.seed, update, i) for i in batch["indices"].tolist()], args)
        hidden, _ = backbone(to_device(batch["wav"], device), batch["lengths"], time_mask=to_device(mask, device))
        # CE on masked frames only (never padding): the heads run on those frames alone
        terms = [(F.cross_entropy(logits.float(), to_device(target[mask], device), reduction="sum"), mask.sum())
                 for logits, target in zip(model.heads(masked_frames(hidden, mask)), frame_targets(batch, frames))]
        return terms, float(batch["lengths"].sum()) / 16000

    run_updates(model=model, params=params, loss_fn=loss_fn, dataset=dataset, sampler=sampler,
                total_updates=args.updates, schedule=schedule_for(args, args.warmup, args.updates),
                **stage_common(args, device, f"P-TAPT fold {fold}", run_dir, "ptapt"))
    finish_stage(run_dir, "ptapt", backbone, out, {"mode": "ptapt", "fold": fold, "source": args.checkpoint,
                                                   "labels": labels_path})
    return out


# -----------------------------------------------------------------------------
# command line

# the release's settings (RECIPE.md "TAPT" and "P-TAPT"); --mode picks the masking defaults
MODE_DEFAULTS = {"tapt": dict(mask_prob=0.05, mask_span=10, mask_min=2),
                 "ptapt": dict(mask_prob=0.06, mask_span=15, mask_min=2)}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--mode", choices=["tapt", "ptapt"], required=True)
    a("--data", help="IEMOCAP_full_release folder, a label .json or a .csv manifest (train split only is used)")
    a("--wav-dir", help="folder of the wavs named in a label .json")
    a("--fold", type=int, default=None, help="test session whose other sessions are pretrained on; default: all five")
    a("--checkpoint", help="fairseq wav2vec 2.0 pretrained checkpoint (with quantizer), e.g. wav2vec_small.pt")
    a("--out", default="runs", help="(default: %(default)s)")
    a("--name", default=None, help="runs/<name>/fold<k> (default: the mode)")
    a("--seed", type=int, default=0, help="(default: %(default)s)")
    a("--updates", type=int, default=20000, help="TAPT / pseudo-label pretraining updates (default: %(default)s)")
    a("--batch-size", type=int, default=64, help="(default: %(default)s)")
    a("--max-batch-seconds", type=float, default=None, help="also cap each batch's padded audio (default: %(default)s)")
    a("--lr", type=float, default=1e-4, help="Adam (default: %(default)s)")
    a("--warmup", type=int, default=100, help="linear warm-up updates (default: %(default)s)")
    a("--flat-fraction", type=float, default=0.05, help="flat part of the schedule, then linear decay to 0 (default: %(default)s)")
    a("--max-seconds", type=float, default=10.0, help="random crops of at most N seconds (default: %(default)s)")
    a("--mask-prob", type=float, default=None, help="time-mask probability (default: 0.05 tapt, 0.06 ptapt)")
    a("--mask-span", type=int, default=None, help="frames per span (default: 10 tapt, 15 ptapt)")
    a("--mask-min", type=int, default=None, help="at least this many spans (default: 2)")
    a("--mask-semantics", choices=["hf", "fairseq"], default="hf",
      help="span counting of Hugging Face (the release) or fairseq's own pretraining (default: %(default)s)")
    a("--feature-grad-mult", type=float, default=1.0,
      help="TAPT: gradient scale into the conv encoder; fairseq used 0.1, the release 1.0 (default: %(default)s)")
    a("--feature-penalty", type=float, default=10.0,
      help="TAPT: weight of the feature penalty mean(conv features^2) (RECIPE.md, fairseq); 0 = Hugging Face's "
           "objective. A tiny model trained from scratch with 10 and 5%% masking collapses: README, Results "
           "(default: %(default)s)")
    a("--teacher-updates", type=int, default=10000, help="P-TAPT teacher (default: %(default)s)")
    a("--teacher-warmup-fraction", type=float, default=0.05, help="(default: %(default)s)")
    a("--ks", type=int, nargs="+", default=[64, 512, 4096], help="k-means cluster counts (default: %(default)s)")
    a("--kmeans-iters", type=int, default=20, help="(default: %(default)s)")
    a("--kmeans-init", choices=["k-means++", "random"], default="k-means++", help="(default: %(default)s)")
    a("--layer", type=int, default=None, help="teacher layer for k-means features (default: the last)")
    a("--save-every", type=int, default=500, help="updates between resumable checkpoints (default: %(default)s)")
    a("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="(default: %(default)s)")
    a("--device", default="auto", help="(default: %(default)s)")
    a("--workers", type=int, default=2, help="(default: %(default)s)")
    a("--cache", action="store_true",
      help="keep decoded audio in memory after the first epoch; loads in the main process (implies --workers 0), "
           "since worker processes would each rebuild their own copy every epoch")
    a("--progress", action=argparse.BooleanOptionalAction, default=True, help="(default: %(default)s)")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for k, v in MODE_DEFAULTS[args.mode].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.init = None
    if args.cache:
        args.workers = 0
    name = args.name or args.mode
    init_distributed(args.device)
    device = resolve_device(args.device)
    try:
        if not args.data:
            raise DataError("--data is required")
        for fold in [args.fold] if args.fold is not None else [1, 2, 3, 4, 5]:
            splits, classes = load_corpus(args.data, fold, args.wav_dir)
            run_dir = os.path.join(args.out, name, f"fold{fold}")
            check_run_config(run_dir, {**vars(args), "fold": fold}, parser)
            out = os.path.join(run_dir, "pretrained.pt")
            if os.path.exists(out):
                if is_main():
                    print(f"{out} exists: fold {fold} done (remove it to redo)")
                continue
            if args.mode == "tapt":
                run_tapt(args, fold, splits["train"], classes, run_dir, device)
            else:
                teacher = run_teacher(args, fold, splits["train"], classes, run_dir, device)
                labels = run_pseudo_labels(args, fold, splits, classes, run_dir, teacher, device)
                run_pseudo_label_pretraining(args, fold, splits["train"], classes, run_dir, labels, device)
            if is_main():
                print(f"fold {fold}: {out}\n  next: python finetune.py --fold {fold} --data {args.data} --init {out}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
