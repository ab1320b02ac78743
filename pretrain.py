"""Task-adaptive pretraining on a fold's training sessions: TAPT and P-TAPT (RECIPE.md).

    python pretrain.py --mode tapt  --fold 3 --data IEMOCAP_full_release --checkpoint wav2vec_small.pt
    python pretrain.py --mode ptapt --fold 3 --data IEMOCAP_full_release --checkpoint wav2vec_small.pt
    python finetune.py --fold 3 --data ... --init runs/ptapt/fold3/pretrained.pt

TAPT continues wav2vec 2.0's own objective (`tapt_loss`) on the fold's training audio. P-TAPT
replaces its targets by frame pseudo-labels that carry emotion, in three stages: an emotion-aware
teacher (`teacher_loss`), k-means on the teacher's frames (kmeans.py), and pretraining the original
checkpoint to predict each masked frame's cluster for every K (`pseudo_label_loss`). Either result
then goes through V-FT (finetune.py --init).

--recipe release (the default) computes what the authors' code computed: TAPT with transformers 4.10's
loss (`release_tapt_loss`), span counts per batch, dynamic batches of about 250 s of audio; --recipe
clean uses fairseq's objective (`tapt_loss`) and per-utterance masks (RECIPES below).

Without --fold every fold runs in turn. Output per fold: runs/<mode>/fold<k>/pretrained.pt. P-TAPT's
stages (teacher.pt, labels.pt, pretrained.pt) are each skipped when their output exists and resume
when interrupted. Only the fold's training sessions are ever read.
"""
import argparse
import math
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import kmeans
from data import AudioDataset, DataError, OneLineParser, load_corpus, user_errors
from finetune import (COUNT, NATURAL, POSITIVE, PROBABILITY, SECONDS, WEIGHT, HOST_GROUP, add_run_flags, apply_recipe, barrier,
                      check_run_config, class_weights, run_files, run_lock, init_distributed, load_backbone, pad_to_whole_batch,
                      remove_training_state, seed_everything, train, train_batches, tri_stage_lr, utterance_rng)
from model import load_wav2vec2, resolve_device, save_wav2vec2, span_masks, world

# -----------------------------------------------------------------------------
# TAPT: wav2vec 2.0's objective, as fairseq defines it (RECIPE.md "TAPT")


def contrastive(context, targets, candidates, logit_temp):
    """sum over masked frames t of CE(cos(c_t, q_j) / logit_temp over j in {target, distractors}),
    target at index 0; a distractor equal to its target gets -inf. candidates (N, K, D)."""
    candidates = torch.cat([targets.unsqueeze(1), candidates], 1)  # (N, 1 + K, D)
    logits = F.cosine_similarity(context.float().unsqueeze(1), candidates.float(), dim=-1) / logit_temp
    same = (candidates[:, 1:] == targets.unsqueeze(1)).all(-1)
    logits[:, 1:] = logits[:, 1:].masked_fill(same, float("-inf"))
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device), reduction="sum")


def tapt_loss(model, encoded, time_mask, negatives, penalty_weight=10.0):
    """fairseq's wav2vec 2.0 loss (the clean recipe) for given masks and distractors, with its terms:
        contrastive = `contrastive` of c_t = final_proj(context) against q = project_q(quantized
                      *unmasked* features) of the target and of the distractors
        diversity   = (G V - perplexity) / (G V) * n_masked, perplexity of the batch-averaged softmax
        penalty     = mean(conv features^2) * n_masked
        loss        = contrastive + 0.1 diversity + penalty_weight penalty
    (RECIPE.md "TAPT": penalty_weight 10, as fairseq.) negatives (n_masked, K) index the masked frames
    in time_mask order, from the same utterance (sample_negatives)."""
    targets, perplexity = model.quantizer(encoded.features[time_mask])
    targets = model.project_q(targets)
    context = model.final_proj(encoded.hidden[time_mask])
    n = time_mask.sum()
    gv = model.quantizer.groups * model.quantizer.num_vars
    terms = {"contrastive": contrastive(context, targets, targets[negatives.to(targets.device)], model.cfg.logit_temp),
             "diversity": (gv - perplexity) / gv * n, "feature_penalty": encoded.feature_penalty * n, "n_masked": n}
    terms["loss"] = terms["contrastive"] + 0.1 * terms["diversity"] + penalty_weight * terms["feature_penalty"]
    return terms


def release_tapt_loss(model, encoded, time_mask, negatives):
    """The TAPT objective the release ran, transformers 4.10's Wav2Vec2ForPreTraining loss as returned
    (RECIPE.md "What the release actually computed"), with its terms:
        contrastive = as in tapt_loss, but every frame of the padded batch is quantized and the
                      distractors are drawn from all of them (padding included: the release called the
                      model without attention mask, so `encoded` treats padding as audio)
        diversity   = (G V - perplexity) / (G V), perplexity of the masked frames' averaged softmax
        loss        = contrastive + 0.1 diversity      (not scaled by n_masked; no feature penalty)
    negatives (n_masked, K) index the B * T frames (padded_negatives)."""
    rows = time_mask.flatten()
    quantized, perplexity = model.quantizer(encoded.features.flatten(0, 1), rows=rows)
    quantized = model.project_q(quantized)
    context = model.final_proj(encoded.hidden[time_mask])
    gv = model.quantizer.groups * model.quantizer.num_vars
    terms = {"contrastive": contrastive(context, quantized[rows], quantized[negatives.to(quantized.device)],
                                        model.cfg.logit_temp),
             "diversity": (gv - perplexity) / gv, "n_masked": time_mask.sum()}
    terms["loss"] = terms["contrastive"] + 0.1 * terms["diversity"]
    return terms


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
    return starts[row][:, None] + draw


def utterance_negatives(time_mask, num_negatives, rngs):
    """sample_negatives with one generator per utterance (independent of the batch it is in)."""
    offset, parts = 0, []
    for row, rng in enumerate(rngs):
        parts.append(sample_negatives(time_mask[row:row + 1], num_negatives, rng) + offset)
        offset += int(time_mask[row].sum())
    return torch.cat(parts)


def padded_negatives(time_mask, num_negatives, rngs):
    """The release's distractors (transformers 4.10 _sample_negatives without attention mask): for
    every masked frame t of row b, num_negatives indices into the B * T frames, drawn uniformly with
    replacement from the row's other T - 1 frames, padding included."""
    B, T = time_mask.shape
    parts = []
    for row, rng in enumerate(rngs):
        frames = time_mask[row].nonzero().squeeze(1)
        draw = torch.randint(0, max(T - 1, 1), (len(frames), num_negatives), generator=rng)
        parts.append(row * T + (draw + (draw >= frames[:, None]).long()).clamp(max=T - 1))  # skip the frame itself
    return torch.cat(parts)


# -----------------------------------------------------------------------------
# P-TAPT: the emotion-aware teacher and the pseudo-label heads (RECIPE.md "P-TAPT")


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
        with torch.autocast(hidden.device.type, enabled=False):
            pooled = self.lstm(hidden.float())[0].mean(1)
        return frame_logits, self.utterance_head(F.relu(pooled)), frames


def teacher_loss(frame_logits, utterance_logits, labels, weights):
    """The teacher's two class-weighted cross-entropies (w as V-FT's), each a (sum, count) pair:
        frames:     sum_{u,t} w_{y_u} CE(frame_logits[u, t], y_u) / sum_{u,t} w_{y_u}
        utterances: sum_u w_{y_u} CE(utterance_logits[u], y_u) / sum_u w_{y_u}
    Batches are cropped to equal length, so every frame is a real one."""
    frame_labels = labels[:, None].expand(-1, frame_logits.shape[1])
    frame_ce = F.cross_entropy(frame_logits.flatten(0, 1).float(), frame_labels.flatten(), weight=weights,
                               reduction="sum")
    utterance_ce = F.cross_entropy(utterance_logits.float(), labels, weight=weights, reduction="sum")
    return [(frame_ce, weights[frame_labels].sum()), (utterance_ce, weights[labels].sum())]


class PseudoLabelHeads(nn.Module):
    """One Linear(dim, 256) - Tanh - Linear(256, K) head per K, on ReLU(transformer output)."""

    def __init__(self, dim, ks, hidden=256):
        super().__init__()
        self.ks = list(ks)
        self.heads = nn.ModuleList(mlp_head(dim, hidden, k) for k in self.ks)

    def forward(self, hidden):
        x = F.relu(hidden)
        return [head(x) for head in self.heads]


def pseudo_label_loss(logits, targets):
    """For each K: sum over masked frames of CE(head_K(ReLU(h_t)), cluster_K(t)), over the number of
    masked frames; logits and targets hold the masked frames only (padding is never masked)."""
    return [(F.cross_entropy(lk.float(), tk, reduction="sum"), len(tk)) for lk, tk in zip(logits, targets)]


class WithHeads(nn.Module):  # one module, so the resumable state holds backbone and heads together
    def __init__(self, backbone, heads):
        super().__init__()
        self.backbone, self.heads = backbone, heads


def crop_to_shortest(batch, rngs):
    """The teacher's batches: every utterance randomly cropped to the shortest one of the whole
    batch, across processes (no padding)."""
    shortest = batch["lengths"].min()
    if world()[1] > 1:
        dist.all_reduce(shortest, op=dist.ReduceOp.MIN, group=HOST_GROUP[0])
    n = int(shortest)
    starts = [int(torch.randint(0, int(length) - n + 1, (), generator=rng)) for length, rng in zip(batch["lengths"], rngs)]
    wav = torch.stack([row[s:s + n] for row, s in zip(batch["wav"], starts)])
    return wav, torch.full((len(wav),), n, dtype=torch.long)


def crop_labels(stored, utterances, batch, frames, width, hop, full_frames):
    """Each utterance's pseudo-labels for the frames of its crop, one (B, width) tensor per K; -100 on padding."""
    targets = {k: torch.full((len(frames), width), -100, dtype=torch.long) for k in stored["labels"]}
    for row, (index, offset) in enumerate(zip(batch["indices"].tolist(), batch["offsets"].tolist())):
        per_k = kmeans.labels_for(stored, utterances[index].uid, full_frames[index])
        first, n = offset // hop, int(frames[row])
        for k, t in targets.items():
            t[row, :n] = per_k[k][first:first + n].long()
    return list(targets.values())


# -----------------------------------------------------------------------------
# the stages


def run_tapt(args, fold, train_set, classes, run_dir, device):
    seed_everything(args.seed + fold)  # every stage starts from its own seed, whichever stages ran before
    model = load_backbone(args.checkpoint, args.seed)
    if not model.cfg.has_quantizer:
        raise DataError(f"{args.checkpoint}: TAPT needs the pretraining modules (quantizer, project_q, final_proj); "
                        "this checkpoint has none (an ASR fine-tuned model, or a Hugging Face Wav2Vec2Model / ForCTC folder?). "
                        "Use the pretrained checkpoint, e.g. wav2vec_small.pt rather than wav2vec_small_960h.pt")
    model.to(device)
    model.feature_grad_mult = args.feature_grad_mult
    release = args.objective == "release"
    if release:  # transformers 4.10's quantizer: temperature 1, never annealed; feat_quantizer_dropout 0
        model.quantizer.temperature, model.dropout_features.p = 1.0, 0.0
    dataset = AudioDataset(train_set, classes, max_seconds=args.max_seconds, crop="random", cache=args.cache,
                           seed=args.seed)

    def batch_loss(batch, update):
        wav, rngs, mask = masked_batch(args, model, batch, update, padded=release)
        if release:  # the release called the model without attention mask: to it the padding is audio
            encoded = model.encode(wav.to(device), None, time_mask=mask.to(device))
            negatives = padded_negatives(mask, model.cfg.num_negatives, rngs)
            return [(release_tapt_loss(model, encoded, mask.to(device), negatives)["loss"], 1)]  # a sum, as returned
        encoded = model.encode(wav.to(device), batch["lengths"], time_mask=mask.to(device))
        terms = tapt_loss(model, encoded, mask.to(device), utterance_negatives(mask, model.cfg.num_negatives, rngs),
                          args.feature_penalty)
        return [(terms["loss"], terms["n_masked"])]  # fairseq divides by the masked frames (its sample size)

    stage_train(args, model, list(model.parameters()), batch_loss, dataset, run_dir, "tapt", args.updates,
                args.warmup, f"TAPT fold {fold}", device, on_update=None if release else model.quantizer.set_num_updates)
    return finish_stage(run_dir, "tapt", model, "pretrained.pt", {"mode": "tapt", "fold": fold,
                                                                  "source": args.checkpoint, "updates": args.updates})


def run_teacher(args, fold, train_set, classes, run_dir, device):
    seed_everything(args.seed + fold)
    backbone = load_backbone(args.checkpoint, args.seed)
    check_kmeans_settings(args, backbone, train_set)  # now, not after the teacher's hours of training
    teacher = Teacher(backbone, len(classes)).to(device)
    params = backbone.freeze_feature_encoder() + [p for n, p in teacher.named_parameters()
                                                  if not n.startswith("backbone.")]
    dataset = AudioDataset(train_set, classes, max_seconds=args.max_seconds, crop="random", cache=args.cache,
                           seed=args.seed)
    weights = class_weights(dataset.labels, len(classes)).to(device)

    def batch_loss(batch, update):
        wav, lengths = crop_to_shortest(batch, [utterance_rng(args.seed, update, i) for i in batch["indices"].tolist()])
        frame_logits, utterance_logits, _ = teacher(wav.to(device), lengths)
        return teacher_loss(frame_logits, utterance_logits, batch["labels"].to(device), weights)

    warmup = int(round(args.teacher_warmup_fraction * args.teacher_updates))
    stage_train(args, teacher, params, batch_loss, dataset, run_dir, "teacher", args.teacher_updates, warmup,
                f"P-TAPT teacher fold {fold}", device, teacher=True)
    return finish_stage(run_dir, "teacher", backbone, "teacher.pt", {"mode": "ptapt-teacher", "fold": fold,
                                                                     "source": args.checkpoint})


def run_pseudo_labels(args, fold, train_set, run_dir, teacher_path, device):
    """Teacher features of every training frame, k-means for each K, one label per frame and K."""
    out = os.path.join(run_dir, "labels.pt")
    teacher = load_wav2vec2(teacher_path).to(device)
    layer = check_kmeans_settings(args, teacher, train_set)
    try:
        kmeans.pseudo_label_stage(lambda wav, lengths: teacher(wav, lengths, layer=layer), train_set, args.ks,
                                  args.kmeans_iters, args.kmeans_init, args.seed, device, out,
                                  {"teacher": teacher_path, "layer": layer, "fold": fold}, progress=args.progress,
                                  workers=args.workers)
    except ValueError as e:  # e.g. K larger than the number of frames
        raise DataError(f"k-means on fold {fold}'s teacher frames: {e}") from None
    return out


def check_kmeans_settings(args, backbone, train_set):
    """--layer within the model, every K at most the number of frames; returns the layer."""
    layer = args.layer or backbone.cfg.num_layers
    if not 1 <= layer <= backbone.cfg.num_layers:
        raise DataError(f"--layer {layer}: the teacher has layers 1..{backbone.cfg.num_layers}")
    frames = int(backbone.frame_lengths(torch.tensor([u.num_samples for u in train_set])).sum())
    if max(args.ks) > frames:
        raise DataError(f"--ks {max(args.ks)}: more clusters than the {frames} frames of the training audio")
    return layer


def run_ptapt(args, fold, train_set, classes, run_dir, labels_path, device):
    try:
        stored = kmeans.load_labels(labels_path)
    except ValueError as e:
        raise DataError(str(e)) from None
    seed_everything(args.seed + fold)
    backbone = load_backbone(args.checkpoint, args.seed)  # from the original checkpoint again, not the teacher
    backbone.norm_over_padding = args.group_norm == "padded"
    model = WithHeads(backbone, PseudoLabelHeads(backbone.cfg.embed_dim, stored["labels"])).to(device)
    params = backbone.freeze_feature_encoder() + list(model.heads.parameters())
    hop = math.prod(s for _, _, s in backbone.cfg.conv_layers)
    dataset = AudioDataset(train_set, classes, max_seconds=args.max_seconds, crop="random", crop_align=hop,
                           cache=args.cache, seed=args.seed)
    full_frames = backbone.frame_lengths(torch.tensor([u.num_samples for u in train_set])).tolist()
    for u, n in zip(train_set, full_frames):  # labels for exactly every utterance's frames: checked now, not hours in
        try:
            kmeans.labels_for(stored, u.uid, n)
        except ValueError as e:
            raise DataError(str(e)) from None

    def batch_loss(batch, update):
        wav, _, mask = masked_batch(args, backbone, batch, update, padded=args.group_norm == "padded")
        targets = crop_labels(stored, train_set, batch, backbone.frame_lengths(batch["lengths"]), mask.shape[1], hop,
                              full_frames)
        targets = [t[mask].to(device) for t in targets]
        mask = mask.to(device)
        hidden, _ = backbone(wav.to(device), batch["lengths"], time_mask=mask)
        return pseudo_label_loss(model.heads(hidden[mask]), targets)  # the heads see masked frames only

    stage_train(args, model, params, batch_loss, dataset, run_dir, "ptapt", args.updates, args.warmup,
                f"P-TAPT fold {fold}", device)
    return finish_stage(run_dir, "ptapt", backbone, "pretrained.pt", {"mode": "ptapt", "fold": fold,
                                                                      "source": args.checkpoint, "labels": labels_path})


def masked_batch(args, model, batch, update, padded):
    """A batch's audio (padded to the whole batch's longest utterance when `padded`), its utterances'
    generators and its time mask (semantics as model.span_masks)."""
    wav = pad_to_whole_batch(batch["wav"]) if padded else batch["wav"]
    rngs = [utterance_rng(args.seed, update, i) for i in batch["indices"].tolist()]
    mask = span_masks(args.mask_semantics, model.frame_lengths(batch["lengths"]),
                      int(model.frame_lengths(torch.tensor(wav.shape[1]))), rngs, utterance_rng(args.seed, update, -1),
                      args.mask_prob, args.mask_span, args.mask_min)
    return wav, rngs, mask


def stage_train(args, model, params, batch_loss, dataset, run_dir, name, updates, warmup, desc, device, on_update=None,
                teacher=False):
    """Every stage's schedule (RECIPE.md: linear warm-up, flat for 5%, linear decay to 0) and batches."""
    flat = int(round(args.flat_fraction * updates))
    if teacher:  # the release's teacher: random batches of batch_size utterances; clean: bucketed
        batches = train_batches(dataset.lengths, args.batch_size, args.max_batch_seconds, args.recipe == "clean",
                                args.seed)
    else:
        budget = args.batch_seconds * args.batch_size / 64  # the release's RandomBucketSampler scales it so
        batches = train_batches(dataset.lengths, args.batch_size, args.max_batch_seconds, True, args.seed,
                                budget or None)
    train(model, params, batch_loss, dataset, batches,
          updates=updates, lr=args.lr, schedule=lambda update: tri_stage_lr(update, updates, warmup, flat),
          device=device, precision=args.precision, run_dir=run_dir, name=f"{name}.", save_every=args.save_every,
          desc=desc, workers=args.workers, progress=args.progress, on_update=on_update)


def finish_stage(run_dir, name, model, filename, meta):
    """Rank 0 writes the stage's output, then drops its resume state (it holds the optimizer: 3x the
    model); the other processes wait for the file."""
    out = os.path.join(run_dir, filename)
    if world()[0] == 0:
        save_wav2vec2(model, out, meta=meta)
        remove_training_state(os.path.join(run_dir, f"{name}.state.pt"))
    barrier()
    return out


# P-TAPT's stages in order, with the files each computes; a setting belongs to the first stage that reads it
PTAPT_STAGES = [("teacher", ("teacher.",)), ("k-means", ("labels.",)), ("pseudo-label", ("ptapt.", "pretrained."))]
KMEANS_SETTINGS = {"ks", "kmeans_iters", "kmeans_init", "layer"}
PSEUDO_LABEL_SETTINGS = {"updates", "warmup", "mask_prob", "mask_span", "mask_min", "mask_semantics",
                         "batch_seconds", "group_norm", "objective", "feature_grad_mult", "feature_penalty"}


def computed_with(run_dir, changed, mode):
    """The run folder's files computed with any of the `changed` settings: for P-TAPT, a finished
    teacher is kept when only the k-means or pseudo-label settings change."""
    files = run_files(run_dir)
    if mode != "ptapt":
        return files
    first = 0 if changed - KMEANS_SETTINGS - PSEUDO_LABEL_SETTINGS else 1 if changed & KMEANS_SETTINGS else 2
    prefixes = tuple(p for _, stage_prefixes in PTAPT_STAGES[first:] for p in stage_prefixes)
    return [f for f in files if f.startswith(prefixes)]


def run_fold(args, fold, splits, classes, run_dir, device):
    """TAPT, or P-TAPT's three stages, each skipped when its output exists."""
    train_set = splits["train"]
    if args.mode == "tapt":
        return run_tapt(args, fold, train_set, classes, run_dir, device)
    teacher = os.path.join(run_dir, "teacher.pt")
    if not os.path.exists(teacher):
        run_teacher(args, fold, train_set, classes, run_dir, device)
    elif world()[0] == 0:
        print(f"{teacher} exists: teacher done")
    labels = os.path.join(run_dir, "labels.pt")
    if not os.path.exists(labels):
        run_pseudo_labels(args, fold, train_set, run_dir, teacher, device)
    elif world()[0] == 0:
        print(f"{labels} exists: k-means done")
    return run_ptapt(args, fold, train_set, classes, run_dir, labels, device)


# -----------------------------------------------------------------------------
# command line

# the settings that differ between the modes (RECIPE.md "TAPT" and "P-TAPT")
MODE_DEFAULTS = {"tapt": dict(mask_prob=0.05, mask_span=10, mask_min=2),
                 "ptapt": dict(mask_prob=0.06, mask_span=15, mask_min=2)}
# What each recipe sets (README "Where every default comes from"); a flag given on the command line wins.
# release: RECIPE.md "What the release actually computed"; clean: RECIPE.md "TAPT", "P-TAPT" as fairseq.
RECIPES = {"release": dict(objective="release", mask_semantics="batch", batch_seconds=250.0, group_norm="padded"),
           "clean": dict(objective="fairseq", mask_semantics="utterance", batch_seconds=0.0, group_norm="valid")}


def build_parser():
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--mode", choices=["tapt", "ptapt"], required=True)
    a("--data", help="IEMOCAP_full_release folder, a label .json or a .csv manifest (train split only is used)")
    a("--wav-dir", help="folder of the wavs named in a label .json")
    a("--fold", type=int, choices=[1, 2, 3, 4, 5], default=None,
      help="test session whose other sessions are pretrained on; default: all five")
    a("--checkpoint", help="wav2vec 2.0 with its pretraining modules: a fairseq checkpoint (e.g. wav2vec_small.pt) "
                           "or a Hugging Face Wav2Vec2ForPreTraining folder")
    a("--name", default=None, help="runs/<name>/fold<k> (default: the mode)")
    a("--seed", type=int, default=0, help="(default: %(default)s)")
    a("--updates", type=COUNT, default=20000, help="TAPT / pseudo-label pretraining updates (default: %(default)s)")
    a("--batch-size", type=COUNT, default=64, help="(default: %(default)s)")
    a("--max-batch-seconds", type=POSITIVE, default=None, help="also cap each batch's padded audio (default: %(default)s)")
    a("--lr", type=POSITIVE, default=1e-4, help="Adam (default: %(default)s)")
    a("--warmup", type=NATURAL, default=100, help="linear warm-up updates (default: %(default)s)")
    a("--flat-fraction", type=PROBABILITY, default=0.05, help="flat part of the schedule, then linear decay to 0 (default: %(default)s)")
    a("--max-seconds", type=POSITIVE, default=10.0, help="random crops of at most N seconds (default: %(default)s)")
    a("--mask-prob", type=PROBABILITY, default=None, help="time-mask probability (default: 0.05 tapt, 0.06 ptapt)")
    a("--mask-span", type=COUNT, default=None, help="frames per span (default: 10 tapt, 15 ptapt)")
    a("--mask-min", type=NATURAL, default=None, help="at least this many spans (default: 2)")
    a("--recipe", choices=["release", "clean"], default="release",
      help="release: what the authors' code computed; clean: the method as written, per utterance (README, "
           "'Where every default comes from') (default: %(default)s)")
    a("--objective", choices=["release", "fairseq"], default=None,
      help="TAPT: transformers 4.10's loss as the release ran it, or fairseq's (default: the recipe's)")
    a("--mask-semantics", choices=["batch", "utterance", "fairseq"], default=None,
      help="span counts of transformers 4.10 (one per batch), per utterance, or fairseq's pretraining "
           "(default: the recipe's: release batch, clean utterance)")
    a("--batch-seconds", type=SECONDS, default=None,
      help="TAPT / P-TAPT: the release's dynamic batches of batch_seconds x batch_size / 64 seconds of audio "
           "(250 s at batch size 64); 0: batches of --batch-size utterances (default: the recipe's: release 250, "
           "clean 0)")
    a("--group-norm", choices=["padded", "valid"], default=None,
      help="P-TAPT: the conv encoder's group norm over the padded batch or each utterance's own samples "
           "(default: the recipe's: release padded, clean valid)")
    a("--feature-grad-mult", type=WEIGHT, default=1.0,
      help="TAPT: gradient scale into the conv encoder; fairseq used 0.1, the release 1.0 (default: %(default)s)")
    a("--feature-penalty", type=WEIGHT, default=10.0,
      help="TAPT: weight of the feature penalty mean(conv features^2) (RECIPE.md, fairseq); 0 = Hugging Face's "
           "objective. A tiny model trained from scratch with 10 and 5%% masking collapses: README, Results "
           "(default: %(default)s)")
    a("--teacher-updates", type=COUNT, default=10000, help="P-TAPT teacher (default: %(default)s)")
    a("--teacher-warmup-fraction", type=PROBABILITY, default=0.05, help="(default: %(default)s)")
    a("--ks", type=COUNT, nargs="+", default=[64, 512, 4096], help="k-means cluster counts (default: %(default)s)")
    a("--kmeans-iters", type=COUNT, default=20, help="(default: %(default)s)")
    a("--kmeans-init", choices=["k-means++", "random"], default="k-means++", help="(default: %(default)s)")
    a("--layer", type=COUNT, default=None, help="teacher layer for k-means features (default: the last)")
    a("--save-every", type=COUNT, default=500, help="updates between resumable checkpoints (default: %(default)s)")
    add_run_flags(p)
    return p


def parse_args(argv):
    p = build_parser()
    args = p.parse_args(argv)
    for k, v in MODE_DEFAULTS[args.mode].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    apply_recipe(args, RECIPES)
    if not args.data:
        p.error("--data is required")
    if len(set(args.ks)) != len(args.ks):
        p.error(f"argument --ks: {args.ks} repeats a K")
    if args.warmup > args.updates:
        p.error(f"argument --warmup: {args.warmup} warm-up updates, more than --updates {args.updates}: "
                "the learning rate would never reach --lr")
    args.workers = 0 if args.cache else args.workers
    return args


def main(argv=None):
    args = parse_args(argv)
    name = args.name or args.mode
    with user_errors():
        init_distributed(args.device)
        device = resolve_device(args.device)
        for fold in [args.fold] if args.fold is not None else [1, 2, 3, 4, 5]:
            splits, classes = load_corpus(args.data, fold, args.wav_dir)
            run_dir = os.path.join(args.out, name, f"fold{fold}")
            with run_lock(run_dir):
                check_run_config(run_dir, {**vars(args), "fold": fold}, lambda changed: computed_with(run_dir, changed, args.mode))
                out = os.path.join(run_dir, "pretrained.pt")
                if os.path.exists(out):
                    if world()[0] == 0:
                        print(f"{out} exists: fold {fold} done (remove it to redo)")
                    continue
                run_fold(args, fold, splits, classes, run_dir, device)
            if world()[0] == 0:
                print(f"fold {fold}: {out}\n  next: python finetune.py --fold {fold} --data {args.data} --init {out}")


if __name__ == "__main__":
    main()
