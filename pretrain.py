"""Task-adaptive pretraining on a fold's training sessions: TAPT and P-TAPT (RECIPE.md).

  python pretrain.py --mode tapt  --fold 3 --data IEMOCAP_full_release --checkpoint wav2vec_small.pt
  python pretrain.py --mode ptapt --fold 3 --data IEMOCAP_full_release --checkpoint wav2vec_small.pt
  python finetune.py --fold 3 --data ... --init runs/ptapt/fold3/pretrained.pt

TAPT continues wav2vec 2.0's own objective (`tapt_loss`) on the fold's training audio. P-TAPT's
targets are frame pseudo-labels that carry emotion, in three stages: an emotion-aware teacher
(`teacher_loss`: the checkpoint itself, or with --teacher wav2vec_large.pt the release's wav2vec
(v1) Large, `run_release_teacher`), k-means on its frames (`pseudo_label_stage`), and pretraining
the original checkpoint to predict each masked frame's cluster for every K (`pseudo_label_loss`).
Either result then goes through V-FT (finetune.py --init). --recipe release (the default) computes
what the authors' code computed (`release_tapt_loss`, span counts per batch, batches of about 250 s
of audio); --recipe clean the method as written (`tapt_loss`, per-utterance masks; README "The two
recipes").

Without --fold every fold runs in turn. Output: runs/<mode>/fold<k>/pretrained.pt. P-TAPT's stages
(teacher.pt, labels.pt, pretrained.pt) are each skipped when their output exists and resume when
interrupted. Only the fold's training sessions are read. --mode kmeans runs the k-means stage alone
on the untouched --checkpoint (runs/kmeans/fold<k>/labels.pt: how much emotion its clusters carry).
"""

import argparse
import math
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import checkpoints as C
import data
import kmeans
import train as T
from data import AudioDataset, DataError
from evaluate import emotion_nmi
from model import Wav2Vec1Teacher, span_masks, vft_masks

# -----------------------------------------------------------------------------
# TAPT: wav2vec 2.0's objective, as fairseq defines it (RECIPE.md "TAPT")


def contrastive(context, targets, candidates, logit_temp):
    """sum over masked frames t of CE(cos(c_t, q_j) / logit_temp over j in {target, distractors}),
    target at index 0; a distractor equal to its target gets -inf. candidates (N, K, D)."""
    candidates = torch.cat([targets.unsqueeze(1), candidates], 1)  # (N, 1 + K, D)
    cosine = F.cosine_similarity(context.float().unsqueeze(1), candidates.float(), dim=-1)
    logits = cosine / logit_temp
    same = (candidates[:, 1:] == targets.unsqueeze(1)).all(-1)
    logits[:, 1:] = logits[:, 1:].masked_fill(same, float("-inf"))
    target = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target, reduction="sum")


def distractors(quantized, negatives):
    """quantized[negatives] (N, K, D) through index_select: its backward adds repeated indices in
    index order, where advanced indexing's CPU atomics add them in thread-timing order."""
    index = negatives.to(quantized.device)
    return quantized.index_select(0, index.flatten()).unflatten(0, index.shape)


def nothing_masked(encoded):
    """No masked frame: no loss, and zero gradients through the graph for every process and the
    fp16 scaler to see."""
    zero = encoded.hidden.sum() * 0.0
    return dict(contrastive=zero, diversity=zero, feature_penalty=zero, n_masked=0, loss=zero)


def tapt_loss(model, encoded, time_mask, negatives, penalty_weight=10.0):
    """fairseq's wav2vec 2.0 loss (the clean recipe) for given masks and distractors:
        contrastive = `contrastive` of c_t = final_proj(context) against q = project_q(quantized
                      *unmasked* features) of the target and of the distractors
        diversity   = (G V - perplexity) / (G V) * n_masked, perplexity of the batch-averaged
                      softmax
        penalty     = mean(conv features^2) * n_masked
        loss        = contrastive + 0.1 diversity + penalty_weight penalty   (10 as fairseq)
    negatives (n_masked, K) index the masked frames in time_mask order (sample_negatives)."""
    if not time_mask.any():
        return nothing_masked(encoded)
    targets, perplexity = model.quantizer(encoded.features[time_mask])
    targets = model.project_q(targets)
    context = model.final_proj(encoded.hidden[time_mask])
    n = time_mask.sum()
    gv = model.quantizer.groups * model.quantizer.num_vars
    c = contrastive(context, targets, distractors(targets, negatives), model.cfg.logit_temp)
    d, p = (gv - perplexity) / gv * n, encoded.feature_penalty * n
    loss = c + 0.1 * d + penalty_weight * p
    return dict(contrastive=c, diversity=d, feature_penalty=p, n_masked=n, loss=loss)


def release_tapt_loss(model, encoded, time_mask, negatives):
    """The TAPT loss the release ran, transformers 4.10's Wav2Vec2ForPreTraining loss as returned
    (RECIPE.md "What the release actually computed"):
        contrastive = as in tapt_loss, but every frame of the padded batch is quantized and the
                      distractors are drawn from all of them (padding included: the release called
                      the model without attention mask, so `encoded` treats padding as audio)
        diversity   = (G V - perplexity) / (G V), perplexity of the masked frames' averaged softmax
        loss        = contrastive + 0.1 diversity      (not scaled by n_masked; no feature penalty)
    Gumbel softmax at temperature 1, never annealed (4.10's quantizer as the release ran it).
    negatives (n_masked, K) index the B * T frames (padded_negatives)."""
    if not time_mask.any():
        return nothing_masked(encoded)
    rows = time_mask.flatten()
    features = encoded.features.flatten(0, 1)
    quantized, perplexity = model.quantizer(features, rows=rows, temperature=1.0)
    quantized = model.project_q(quantized)
    context = model.final_proj(encoded.hidden[time_mask])
    gv = model.quantizer.groups * model.quantizer.num_vars
    negs = distractors(quantized, negatives)
    c = contrastive(context, quantized[rows], negs, model.cfg.logit_temp)
    d = (gv - perplexity) / gv
    return dict(contrastive=c, diversity=d, n_masked=time_mask.sum(), loss=c + 0.1 * d)


def sample_negatives(time_mask, num_negatives, generator=None):
    """For every masked frame (time_mask[time_mask] order), `num_negatives` indices into that flat
    list, uniform with replacement over the *other* masked frames of the same utterance (fairseq's
    sample_negatives over masked targets)."""
    counts = time_mask.sum(1).cpu()
    starts = torch.cumsum(counts, 0) - counts
    row = torch.repeat_interleave(torch.arange(len(counts)), counts)
    local = torch.arange(int(counts.sum())) - starts[row]
    n = counts[row]
    uniform = torch.rand(len(row), num_negatives, generator=generator)
    draw = (uniform * (n - 1).clamp(min=1)[:, None]).long()
    draw = draw + (draw >= local[:, None]).long()  # skip the frame itself
    draw = torch.where((n > 1)[:, None], draw, local[:, None])  # a lone frame has no distractor
    return starts[row][:, None] + draw


def utterance_negatives(time_mask, num_negatives, rngs):
    """sample_negatives with one generator per utterance (independent of the batch it is in)."""
    offset, parts = 0, []
    for row, rng in enumerate(rngs):
        parts.append(sample_negatives(time_mask[row : row + 1], num_negatives, rng) + offset)
        offset += int(time_mask[row].sum())
    return torch.cat(parts)


def padded_negatives(time_mask, num_negatives, rngs):
    """The release's distractors (transformers 4.10 _sample_negatives without attention mask): for
    each masked frame of a row, num_negatives indices into the B * width frames, uniform with
    replacement over the row's other width - 1 frames, padding included."""
    width, parts = time_mask.shape[1], []
    for row, rng in enumerate(rngs):
        frames = time_mask[row].nonzero().squeeze(1)
        draw = torch.randint(0, max(width - 1, 1), (len(frames), num_negatives), generator=rng)
        draw = draw + (draw >= frames[:, None]).long()  # skip the frame itself
        parts.append(row * width + draw.clamp(max=width - 1))
    return torch.cat(parts)


# -----------------------------------------------------------------------------
# P-TAPT: the emotion-aware teacher and the pseudo-label heads (RECIPE.md "P-TAPT")


def mlp_head(dim, hidden, out):
    """Linear - Tanh - Linear (the release's frame and pseudo-label heads)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, out))


class Teacher(nn.Module):
    """A backbone with a frame head on every frame and an utterance head (BiLSTM of `hidden`
    outputs, mean over time, ReLU, Linear-Tanh-Linear). wav2vec 2.0's: heads Linear(768, 256)-Tanh-
    Linear, BiLSTM 2 x 128. The release's v1 teacher (dim 512, hidden 512, head_hidden 128): its
    LinearHead(512, 128, C) and RNNLayer(512, 512) (release modules/NN.py)."""

    def __init__(self, backbone, num_classes, hidden=256, dim=None, head_hidden=None):
        super().__init__()
        dim, head_hidden = dim or backbone.cfg.embed_dim, head_hidden or hidden
        self.backbone = backbone
        self.frame_head = mlp_head(dim, head_hidden, num_classes)
        self.lstm = nn.LSTM(dim, hidden // 2, batch_first=True, bidirectional=True)
        self.utterance_head = mlp_head(hidden, head_hidden, num_classes)

    def forward(self, wav, lengths, **masks):
        hidden, frames = self.backbone(wav, lengths, **masks)
        frame_logits = self.frame_head(hidden)
        # outside autocast: cuDNN's LSTM would run in fp16, without loss scaling, even under bf16
        # autocast; the crops are of equal length, so the mean has no padding to leave out
        with torch.autocast(hidden.device.type, enabled=False):
            pooled = self.lstm(hidden.float())[0].mean(1)
        return frame_logits, self.utterance_head(F.relu(pooled)), frames


def teacher_loss(frame_logits, utterance_logits, labels, weights):
    """The teacher's two class-weighted cross-entropies (w as V-FT's), each a (sum, count) pair:
        frames:     sum_{u,t} w_{y_u} CE(frame_logits[u, t], y_u) / sum_{u,t} w_{y_u}
        utterances: sum_u w_{y_u} CE(utterance_logits[u], y_u) / sum_u w_{y_u}
    Batches are cropped to equal length, so every frame is a real one."""
    frame_labels = labels[:, None].expand(-1, frame_logits.shape[1])
    frames = frame_logits.flatten(0, 1).float()
    frame_ce = F.cross_entropy(frames, frame_labels.flatten(), weight=weights, reduction="sum")
    ce = F.cross_entropy(utterance_logits.float(), labels, weight=weights, reduction="sum")
    return [(frame_ce, weights[frame_labels].sum()), (ce, weights[labels].sum())]


class PseudoLabelHeads(nn.Module):
    """One Linear(dim, 256) - Tanh - Linear(256, K) head per K, on ReLU(transformer output)."""

    def __init__(self, dim, ks, hidden=256):
        super().__init__()
        self.heads = nn.ModuleList(mlp_head(dim, hidden, k) for k in ks)

    def forward(self, hidden):
        x = F.relu(hidden)
        return [head(x) for head in self.heads]


def pseudo_label_loss(logits, targets):
    """For each K: sum over masked frames of CE(head_K(ReLU(h_t)), cluster_K(t)), over the number of
    masked frames that have a label (the masked frames only: padding is never masked; -100, a frame
    the v1 teacher has no label for, is left out as the release's ignore_index)."""
    return [
        (F.cross_entropy(lk.float(), tk, reduction="sum"), (tk != -100).sum())
        for lk, tk in zip(logits, targets)
    ]


def crop_to_shortest(batch, rngs, across_processes=True, release=False):
    """The teacher's batches: every utterance randomly cropped to the whole batch's shortest, across
    processes. A longer one starts at 0..over samples, or as the release (np.random.randint(over),
    pretrain/dataloader.py:88-89) at 0..over - 1."""
    shortest = batch["lengths"].min()
    if T.world()[1] > 1 and across_processes:
        dist.all_reduce(shortest, op=dist.ReduceOp.MIN, group=T.HOST_GROUP[0])
    n = int(shortest)
    starts = [
        int(torch.randint(0, max(int(length) - n + (not release), 1), (), generator=rng))
        for length, rng in zip(batch["lengths"], rngs)
    ]
    wav = torch.stack([row[s : s + n] for row, s in zip(batch["wav"], starts)])
    return wav, torch.full((len(wav),), n, dtype=torch.long)


def crop_labels(labels, indices, starts, frames, width):
    """Each utterance's pseudo-labels for its crop's frames, one (B, width) tensor per K, -100 on
    padding. labels[index]: {K: the utterance's labels at wav2vec 2.0's frames} (aligned_labels);
    starts[row]: the label of the crop's first frame (crop_starts)."""
    targets = {k: torch.full((len(frames), width), -100, dtype=torch.long) for k in labels[0]}
    for row, (index, first) in enumerate(zip(indices, starts)):
        per_k, n = labels[index], int(frames[row])
        for k, t in targets.items():
            piece = per_k[k][first : first + n]  # Python's slice: what the release's -1 gives
            t[row, : len(piece)] = piece.long()
    return list(targets.values())


def crop_starts(batch, full_lengths, hop, conv_layers, release):
    """The label of each crop's first frame. Aligned crops start at whole frames: offset / hop.
    The release (pretrain/dataloader.py:182-193) cropped every utterance at least as long as the
    batch's target, min(crop, longest in the batch), at any sample, and took release_start of the
    offset; so the longest utterance of a batch without a longer one is "cropped" at 0 too."""
    if not release:
        return [int(offset) // hop for offset in batch["offsets"]]
    target = batch["lengths"].max()
    if T.world()[1] > 1:  # the release's one process saw the whole batch
        dist.all_reduce(target, op=dist.ReduceOp.MAX, group=T.HOST_GROUP[0])
    return [
        release_start(int(offset), conv_layers) if full_lengths[i] >= int(target) else 0
        for i, offset in zip(batch["indices"].tolist(), batch["offsets"])
    ]


def release_start(offset, conv_layers):
    """The release's first label of a crop at `offset` samples (pretrain/dataloader.py:189-193):
    its conv-length formula (L - k) // s + 1 applied to the offset, with Python's floor. A start at
    320 j (j >= 2) gives frame j - 1; every start below 400 samples gives -1 (no label)."""
    for _, k, s in conv_layers:
        offset = (offset - k) // s + 1
    return offset


def aligned_labels(stored, utterances, backbone, teacher=None):
    """Every utterance's pseudo-labels at wav2vec 2.0's frames, [{K: (frames,) long}]. The v1
    teacher's are at its own frames, (L - 945) // 320 + 1 for Large against (L - 400) // 320 + 1:
    one or two fewer. As the release (pretrain/dataloader.py:180-210), teacher frame j labels frame
    j from 0, and the last one or two frames get -100 (no label)."""
    lengths = torch.tensor([u.num_samples for u in utterances])
    frames = backbone.frame_lengths(lengths).tolist()
    ours = frames if teacher is None else teacher.frame_lengths(lengths).tolist()
    out = []
    for u, n, t in zip(utterances, frames, ours):
        per_k = data.labels_for(stored, u.uid, t)
        if not 0 <= n - t <= 2:  # the conv formulas above: what else would mean another alignment
            raise DataError(
                f"utterance {u.uid}: {n} wav2vec 2.0 frames but {t} teacher frames; expected 0-2 "
                "fewer"
            )
        out.append({k: F.pad(v, (0, n - t), value=-100) for k, v in per_k.items()})
    return out


# -----------------------------------------------------------------------------
# the stages: each from its own seed (whichever stages ran before) builds its model, trained
# parameters, crops and batch_loss; stage_train trains them, resumably; finish_stage saves


def crop_dataset(args, utterances, classes, **options):
    """A stage's training audio: random crops of at most --max-seconds."""
    crops = dict(max_seconds=args.max_seconds, crop="random", cache=args.cache, seed=args.seed)
    return AudioDataset(utterances, classes, **{**crops, **options})


def stage_train(args, stage, model, params, batch_loss, dataset, run_dir, device, desc, **hooks):
    """`train` with the stage's schedule (RECIPE.md: linear warm-up, flat for 5%, linear decay to 0)
    and batches: the teacher's of --batch-size utterances (--bucket), TAPT's and P-TAPT's bucketed,
    the release's of batch_seconds x batch_size / 64 s of audio (its RandomBucketSampler)."""
    if stage == "teacher":
        updates, bucket, budget = args.teacher_updates, args.bucket, None
        warmup = int(round(args.teacher_warmup_fraction * updates))
    else:
        updates, warmup, bucket = args.updates, args.warmup, True
        budget = args.batch_seconds * args.batch_size / 64 or None
    sizes = (args.batch_size, args.max_batch_seconds)
    batches = T.train_batches(dataset.lengths, *sizes, bucket, args.seed, budget)
    flat = int(round(args.flat_fraction * updates))
    schedule = lambda update: T.tri_stage_lr(update, updates, warmup, flat, args.warmup_from_zero)
    name = f"{stage}."
    run = dict(updates=updates, schedule=schedule, device=device, run_dir=run_dir, name=name)
    flags = {k: getattr(args, k) for k in ("lr", "precision", "save_every", "workers", "progress")}
    return T.train(model, params, batch_loss, dataset, batches, desc=desc, **run, **flags, **hooks)


def finish_stage(run_dir, stage, model, filename, meta, save=C.save_wav2vec2):
    """Rank 0 writes the stage's output, then drops its resume state (it holds the optimizer: 3x the
    model); the other processes wait for the file."""
    if T.world()[0] == 0:
        save(model, os.path.join(run_dir, filename), meta=meta)
        T.remove_training_state(os.path.join(run_dir, f"{stage}.state.pt"))
    T.barrier()


def masked_batch(args, model, batch, update, padded):
    """A batch's audio (padded to the whole batch's longest utterance when `padded`), its
    utterances' generators and its time mask (model.span_masks)."""
    wav = T.pad_to_whole_batch(batch["wav"]) if padded else batch["wav"]
    rngs = T.batch_rngs(args.seed, update, batch["indices"])
    frames = model.frame_lengths(batch["lengths"])
    width = int(model.frame_lengths(torch.tensor(wav.shape[1])))
    spans = (args.mask_prob, args.mask_span, args.mask_min)
    batch_rng = T.utterance_rng(args.seed, update, -1)
    return wav, rngs, span_masks(args.mask_semantics, frames, width, rngs, batch_rng, *spans)


def run_tapt(args, fold, train_set, classes, run_dir, device):
    """TAPT: the release's loss as returned (a sum), or fairseq's over the masked frames (its sample
    size)."""
    T.seed_everything(args.seed + fold)
    model = T.load_backbone(args.checkpoint, args.seed).to(device)  # checked: check_stage_inputs
    release = args.objective == "release"
    padded, grad_mult = args.group_norm == "padded", args.feature_grad_mult
    # transformers 4.10's feat_quantizer_dropout: 0
    recipe = dict(
        norm_over_padding=padded, feature_grad_mult=grad_mult, feature_dropout=not release
    )

    def batch_loss(batch, update):
        wav, rngs, mask = masked_batch(args, model, batch, update, padded=release)
        lengths = None if release else batch["lengths"]  # the release's: padding is audio
        encoded = model.encode(wav.to(device), lengths, time_mask=mask.to(device), **recipe)
        if release:
            negatives = padded_negatives(mask, model.cfg.num_negatives, rngs)
            return [(release_tapt_loss(model, encoded, mask.to(device), negatives)["loss"], 1)]
        negatives = utterance_negatives(mask, model.cfg.num_negatives, rngs)
        terms = tapt_loss(model, encoded, mask.to(device), negatives, args.feature_penalty)
        return [(terms["loss"], terms["n_masked"])]

    hook = None if release else model.quantizer.set_num_updates
    params, dataset = list(model.parameters()), crop_dataset(args, train_set, classes)
    desc = f"TAPT fold {fold}"
    stage_train(
        args, "tapt", model, params, batch_loss, dataset, run_dir, device, desc, on_update=hook
    )
    meta = dict(mode="tapt", fold=fold, source=args.checkpoint, updates=args.updates)
    finish_stage(run_dir, "tapt", model, "pretrained.pt", meta)


def run_teacher(args, fold, train_set, classes, run_dir, device):
    """P-TAPT's teacher from the wav2vec 2.0 checkpoint, its conv encoder frozen."""
    T.seed_everything(args.seed + fold)
    backbone = T.load_backbone(args.checkpoint, args.seed)
    check_kmeans_settings(args, backbone, train_set)  # now, not after the teacher's hours
    teacher = Teacher(backbone, len(classes)).to(device)
    params = backbone.freeze_feature_encoder()
    params += [p for n, p in teacher.named_parameters() if not n.startswith("backbone.")]
    dataset = crop_dataset(args, train_set, classes)
    weights = T.class_weights(dataset.labels, len(classes)).to(device)

    def batch_loss(batch, update):
        rngs = T.batch_rngs(args.seed, update, batch["indices"])
        wav, lengths = crop_to_shortest(batch, rngs, release=args.crops == "release")
        frame_logits, utterance_logits, _ = teacher(wav.to(device), lengths)
        return teacher_loss(frame_logits, utterance_logits, batch["labels"].to(device), weights)

    desc = f"P-TAPT teacher fold {fold}"
    stage_train(args, "teacher", teacher, params, batch_loss, dataset, run_dir, device, desc)
    meta = {"mode": "ptapt-teacher", "fold": fold, "source": args.checkpoint}
    finish_stage(run_dir, "teacher", backbone, "teacher.pt", meta)


def run_ptapt(args, fold, train_set, classes, run_dir, labels_path, device):
    """P-TAPT's pseudo-label pretraining, from the original checkpoint (not the teacher)."""
    stored = data.load_labels(labels_path)
    T.seed_everything(args.seed + fold)
    backbone = T.load_backbone(args.checkpoint, args.seed)
    heads = PseudoLabelHeads(backbone.cfg.embed_dim, stored["labels"])
    # one module, so the resumable state holds backbone and heads together
    model = nn.ModuleDict(dict(backbone=backbone, heads=heads)).to(device)
    params = backbone.freeze_feature_encoder() + list(model.heads.parameters())
    hop = math.prod(s for _, _, s in backbone.cfg.conv_layers)
    release_crops, padded = args.crops == "release", args.group_norm == "padded"
    full_lengths = [u.num_samples for u in train_set]
    # the release's crops start at any sample
    dataset = crop_dataset(args, train_set, classes, crop_align=1 if release_crops else hop)
    # labels for exactly every utterance's frames: checked now, not hours in
    teacher = C.load_wav2vec1_teacher(os.path.join(run_dir, "teacher.pt")) if args.teacher else None
    labels = aligned_labels(stored, train_set, backbone, teacher)

    def batch_loss(batch, update):
        wav, _, mask = masked_batch(args, backbone, batch, update, padded=padded)
        starts = crop_starts(batch, full_lengths, hop, backbone.cfg.conv_layers, release_crops)
        frames = backbone.frame_lengths(batch["lengths"])
        targets = crop_labels(labels, batch["indices"].tolist(), starts, frames, mask.shape[1])
        targets = [t[mask].to(device) for t in targets]
        mask, lengths = mask.to(device), batch["lengths"]
        hidden, _ = backbone(wav.to(device), lengths, time_mask=mask, norm_over_padding=padded)
        return pseudo_label_loss(model.heads(hidden[mask]), targets)  # masked frames only

    desc = f"P-TAPT fold {fold}"
    stage_train(args, "ptapt", model, params, batch_loss, dataset, run_dir, device, desc)
    meta = dict(mode="ptapt", fold=fold, source=args.checkpoint, labels=labels_path)
    finish_stage(run_dir, "ptapt", backbone, "pretrained.pt", meta)


# The release's teacher (RECIPE.md "What the release actually computed"; release
# pretrain/trainer.py:12-106 PretrainedEmoClassifier, modules/FeatureFuser.py:11-62 Wav2vecWrapper,
# modules/NN.py): what --teacher sets. Recorded in config.json as `release_teacher`.
RELEASE_TEACHER = {
    "model": "fairseq wav2vec (v1): feature extractor frozen (no grad), aggregator trained; "
    "Conv1d(512, 512, 4, stride 2) + ReLU to 50 Hz",
    "specaugment_time": [0.08, 15, 2],  # (prob, span, min spans) on v1's 100 Hz features, as zeros
    "specaugment_channel": [0.05, 64, 1],  # over the 512 channels: always one span of 64
    "heads": "frame LinearHead(512, 128, C); BiLSTM(512, 2 x 256), mean, ReLU, "
    "LinearHead(512, 128, C)",
    "train_fraction": 0.9,  # int(0.9 n) train, the rest validate (torch random_split)
    "split_seed": 58,  # torch.Generator().manual_seed(58)
    "selection": "the epoch end with the lowest validation loss",
}


def run_release_teacher(args, fold, train_set, classes, run_dir, device):
    """RELEASE_TEACHER: wav2vec (v1) from --teacher, trained on 90% of the fold's training
    utterances in random batches cropped to their shortest, with SpecAugment on v1's 100 Hz
    features; validated on the other 10% after every epoch, its best weights kept (keep_best)."""
    T.seed_everything(args.seed + fold)
    front = load_release_teacher(args.teacher, train_set)
    check_kmeans_settings(args, front, train_set)
    teacher = Teacher(front, len(classes), hidden=512, dim=front.dim, head_hidden=128).to(device)
    params = front.v1.freeze_feature_extractor()
    params += [p for n, p in teacher.named_parameters() if not n.startswith("backbone.v1.")]
    fit, held_out = release_split(train_set)
    # class weights over every training utterance, the held-out 10% too (release trainer.py:26-35)
    weights = T.class_weights(AudioDataset(train_set, classes).labels, len(classes)).to(device)
    dataset = crop_dataset(args, fit, classes, max_seconds=None)  # whole utterances
    valid = AudioDataset(held_out, classes, cache=args.cache)
    dtype, crops = T.autocast_dtype(device, args.precision), args.crops == "release"
    spec = (RELEASE_TEACHER["specaugment_time"], RELEASE_TEACHER["specaugment_channel"])

    def batch_loss(batch, update):
        rngs = T.batch_rngs(args.seed, update, batch["indices"])
        wav, _ = crop_to_shortest(batch, rngs, release=crops)
        t100 = int(front.v1.frame_lengths(torch.tensor(wav.shape[1])))  # equal crops: one count
        batch_rng = T.utterance_rng(args.seed, update, -1)
        time, channel = vft_masks(
            "release", [t100] * len(wav), t100, front.dim, rngs, batch_rng, *spec
        )
        frame_logits, utterance_logits, _ = teacher(
            wav.to(device), None, time_mask=time, channel_mask=channel
        )
        return teacher_loss(frame_logits, utterance_logits, batch["labels"].to(device), weights)

    valid_loss = lambda: validation_loss(teacher, valid, weights, args, device, dtype, crops)
    desc = f"P-TAPT teacher (wav2vec v1) fold {fold}"
    hooks = dict(on_epoch_end=keep_best(teacher, valid_loss))
    pos = stage_train(
        args, "teacher", teacher, params, batch_loss, dataset, run_dir, device, desc, **hooks
    )
    if "best_model" in pos:
        teacher.load_state_dict(pos["best_model"])
    elif T.world()[0] == 0:
        never = "the teacher trained less than one epoch, so it was never validated"
        print(f"warning: {never}: its last weights are used", file=sys.stderr)
    meta = {"mode": "ptapt-teacher", "fold": fold, "source": args.teacher}
    meta.update(teacher_model="wav2vec (v1)", best_valid_loss=pos.get("best_valid"))
    meta.update(best_update=pos.get("best_update"), validation_utterances=[u.uid for u in held_out])
    finish_stage(run_dir, "teacher", front, "teacher.pt", meta, save=C.save_wav2vec1_teacher)


def read_teacher(path):
    """The wav2vec (v1) file of --teacher; a DataError naming the flag when it is not one."""
    try:
        return C.load_wav2vec1(path)
    except C.CheckpointError as e:
        raise DataError(f"--teacher: {e}") from None


def load_release_teacher(path, train_set):
    """The wav2vec (v1) of --teacher as the release's front end; refused when a training utterance
    is too short to give it a frame."""
    front = Wav2Vec1Teacher(read_teacher(path))
    short = [u.uid for u in train_set if u.num_samples < front.min_samples]
    if short:
        raise DataError(
            f"{len(short)} training utterances (first {short[0]}) are shorter than "
            f"{front.min_samples} samples, the least the wav2vec (v1) teacher gives a frame for"
        )
    return front


def release_split(utterances):
    """The release's 90/10 split: torch's random_split(data, [int(0.9 n), n - int(0.9 n)],
    generator=torch.Generator().manual_seed(58)), a randperm of that generator, of the utterances
    sorted by uid (the release's: of os.listdir's order, which depends on the filesystem)."""
    ordered = sorted(utterances, key=lambda u: u.uid)
    n = len(ordered)
    fit = int(n * RELEASE_TEACHER["train_fraction"])
    generator = torch.Generator().manual_seed(RELEASE_TEACHER["split_seed"])
    perm = torch.randperm(n, generator=generator).tolist()
    return [ordered[i] for i in perm[:fit]], [ordered[i] for i in perm[fit:]]


def validation_loss(teacher, dataset, weights, args, device, dtype, release_crops):
    """The release's validation loss (validation_step; the epoch's mean as Lightning 1.4 logs it,
    batches weighted by size): batches of --batch-size in split order, cropped to their shortest
    utterance (from a fixed seed: the same crops every epoch), eval mode (no SpecAugment), per
    batch the frame and utterance CEs summed. Every process computes all."""
    teacher.eval()
    total, size = 0.0, args.batch_size
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for start in range(0, len(dataset), size):
            batch = data.collate(
                [dataset[i] for i in range(start, min(start + size, len(dataset)))]
            )
            rngs = T.batch_rngs(args.seed, -2, batch["indices"])  # update -2: validation's own
            wav, _ = crop_to_shortest(batch, rngs, False, release_crops)
            frame_logits, utterance_logits, _ = teacher(wav.to(device), None)
            labels = batch["labels"].to(device)
            terms = teacher_loss(frame_logits, utterance_logits, labels, weights)
            total += len(wav) * float(sum(s / c for s, c in terms))
    teacher.train()
    return total / len(dataset)


def keep_best(teacher, valid_loss):
    """on_epoch_end for `train`: validate, and keep the weights of the lowest validation loss so far
    in the position (so a resumed run keeps the same ones). Lightning's ModelCheckpoint(monitor=
    'valid_loss', mode='min', save_top_k=1) (release run_pretrain.py:24-31)."""

    def on_epoch_end(pos):
        if pos.get("valid_update") == pos["update"]:  # stopped at an epoch's last batch
            return
        loss = torch.tensor([valid_loss()], dtype=torch.float64)
        if T.world()[1] > 1:  # every process computed it; rank 0's decides, so all keep the same
            dist.broadcast(loss, 0, group=T.HOST_GROUP[0])
        pos["valid_update"], loss = pos["update"], float(loss)
        if loss < pos.get("best_valid", float("inf")):
            best = {k: v.detach().cpu().clone() for k, v in teacher.state_dict().items()}
            pos.update(best_valid=loss, best_update=pos["update"], best_model=best)
        if T.world()[0] == 0:
            best = f"(best {pos['best_valid']:.4f} at update {pos['best_update']})"
            print(f"teacher: validation loss {loss:.4f} at update {pos['update']} {best}")

    return on_epoch_end


# -----------------------------------------------------------------------------
# P-TAPT's k-means stage (kmeans.py)


def run_pseudo_labels(args, fold, train_set, run_dir, teacher_path, device):
    """P-TAPT's k-means stage on the teacher's frames; --mode kmeans: on --checkpoint's."""
    load = C.load_wav2vec1_teacher if args.teacher else lambda p: T.load_backbone(p, args.seed)
    teacher = load(teacher_path).eval().to(device)
    layer = check_kmeans_settings(args, teacher, train_set)
    meta = {"teacher": teacher_path}
    if args.teacher:  # the release's: its ReLU'd 50 Hz output, fp32, eval, one utterance at a time
        features_of = lambda wav, lengths: unpadded(teacher, wav, lengths)
        meta["teacher_model"] = "wav2vec (v1)"
    else:
        features_of = lambda wav, lengths: teacher(wav, lengths, layer=layer)
        meta["layer"] = layer
    meta["fold"], out = fold, os.path.join(run_dir, "labels.pt")
    settings = (args.ks, args.kmeans_iters, args.kmeans_init, args.seed, device, out, meta)
    try:
        pseudo_label_stage(features_of, train_set, *settings, args.progress, workers=args.workers)
    except ValueError as e:  # e.g. K larger than the number of frames
        raise DataError(f"k-means on fold {fold}'s teacher frames: {e}") from None


def pseudo_label_stage(
    features_of,
    utterances,
    ks,
    iters,
    init,
    seed,
    device,
    out_path,
    meta,
    progress=True,
    max_samples=None,
    workers=2,
    chunk_size=16384,
):
    """The frames of `utterances` (kmeans.extract_features), fit_kmeans for every K, every frame
    labelled, written to out_path (data.save_labels; meta gains the settings, the inertia and each
    K's NMI with emotion, printed) and returned as {K: (frames,) long}. Under torch.distributed
    every rank extracts a contiguous shard, cut by audio length; rank 0 writes, all return all."""
    (rank, size), device = T.world(), T.resolve_device(device)
    cum = torch.tensor([u.num_samples for u in utterances], dtype=torch.float64).cumsum(0)
    cuts = [int(torch.searchsorted(cum, cum[-1] * r / size)) for r in range(1, size)]
    cut = [0, *cuts, len(utterances)]
    shard, show = utterances[cut[rank] : cut[rank + 1]], progress and rank == 0
    feats, counts = kmeans.extract_features(
        features_of, shard, device, progress=show, workers=workers
    )
    if size > 1:  # a rank without frames learns D
        dim = torch.tensor(feats.shape[1], device=device)
        dist.all_reduce(dim, dist.ReduceOp.MAX)
        feats = feats if len(feats) else torch.zeros(0, int(dim), dtype=torch.float16)
    sizes = dict(chunk_size=chunk_size, max_samples=max_samples, device=device)
    fits = kmeans.fit_kmeans(feats, ks, iters, init, seed, **sizes, progress=progress)
    assign = lambda fit: kmeans.assign(feats, fit.centroids, chunk_size, device)
    labels = {k: kmeans.gather_rows(assign(fit), device) for k, fit in fits.items()}
    counts = kmeans.gather_rows(counts, device)
    if rank == 0:
        fit_max = max(fits) * 1000 if max_samples is None else max_samples
        init = init if isinstance(init, str) else "given"
        settings = dict(iters=iters, init=init, seed=seed, max_samples=fit_max)
        hours = float(cum[-1]) / data.SAMPLE_RATE / 3600
        save_pseudo_labels(out_path, utterances, counts, labels, fits, meta, hours, settings)
    if size > 1:
        dist.barrier()  # the file exists on return, on every rank
    return labels


def save_pseudo_labels(out_path, utterances, counts, labels, fits, meta, hours, settings):
    """Rank 0's end of the k-means stage: each K's NMI with emotion, printed with its fit, and the
    labels written (data.save_labels) with meta and what the stage computed them from."""
    names = sorted({str(u.label) for u in utterances})
    emotions = [names.index(str(u.label)) for u in utterances]
    nmi = {k: emotion_nmi(labels[k], counts, emotions) for k in fits}
    meta = {**meta, "num_frames": int(counts.sum()), "hours": hours, "nmi": nmi, "ks": list(fits)}
    meta.update(settings, num_fit_frames=int(fits[max(fits)].counts.sum()))
    meta["inertia"] = {k: f.inertia for k, f in fits.items()}
    for k, f in fits.items():
        inertia = f"{f.inertia[0]:.5g} -> {f.inertia[-1]:.5g} in {len(f.inertia) - 1} iterations"
        used = f"{int((f.counts > 0).sum())}/{k} clusters used"
        print(
            f"K={k}: NMI between pseudo-labels and emotion {nmi[k]:.4f}, inertia {inertia}, {used}"
        )
    data.save_labels(out_path, [u.uid for u in utterances], counts, labels, meta)


def unpadded(teacher, wav, lengths):
    """A padded batch's features, each utterance run alone (v1's one-group norms would see the
    padding)."""
    frames = teacher.frame_lengths(lengths)
    out = wav.new_zeros(len(wav), int(frames.max()), teacher.dim)
    for row, n in enumerate(lengths.tolist()):
        out[row, : frames[row]] = teacher(wav[row : row + 1, :n])[0][0]
    return out, frames


def check_kmeans_settings(args, backbone, train_set):
    """--layer within the model, every K at most the number of frames; returns the layer."""
    if isinstance(backbone, Wav2Vec1Teacher):
        if args.layer is not None:
            raise DataError("--layer: the wav2vec (v1) teacher's features are its one output")
        layer = None
    else:
        layer, top = args.layer or backbone.cfg.num_layers, backbone.cfg.num_layers
        if not 1 <= layer <= top:
            raise DataError(f"--layer {layer}: the teacher has layers 1..{top}")
    frames = int(backbone.frame_lengths(torch.tensor([u.num_samples for u in train_set])).sum())
    if max(args.ks) > frames:
        raise DataError(f"--ks {max(args.ks)}: more clusters than the {frames} training frames")
    return layer


# -----------------------------------------------------------------------------
# folds and run folders

# P-TAPT's stages in order, with the files each computes; a setting belongs to the first stage that
# reads it
PTAPT_STAGES = [
    ("teacher", ("teacher.",)),
    ("k-means", ("labels.",)),
    ("pseudo-label", ("ptapt.", "pretrained.")),
]
KMEANS_SETTINGS = {"ks", "kmeans_iters", "kmeans_init", "layer"}
PSEUDO_LABEL_SETTINGS = set(
    "updates warmup mask_prob mask_span mask_min mask_semantics batch_seconds group_norm objective "
    "feature_grad_mult feature_penalty".split()
)


def computed_with(run_dir, changed, mode):
    """The run folder's files computed with any of the `changed` settings: for P-TAPT, a finished
    teacher is kept when only the k-means or pseudo-label settings change."""
    files = T.run_files(run_dir)
    if mode != "ptapt":
        return files
    teacher_kept = not changed - KMEANS_SETTINGS - PSEUDO_LABEL_SETTINGS
    first = (1 if changed & KMEANS_SETTINGS else 2) if teacher_kept else 0
    prefixes = tuple(p for _, stage_prefixes in PTAPT_STAGES[first:] for p in stage_prefixes)
    return [f for f in files if f.startswith(prefixes)]


def check_stage_inputs(args):
    """Every stage's input files, read before the first stage starts: a wrong --checkpoint is found
    now, not after the teacher has trained and k-means has run."""
    backbone = T.load_backbone(args.checkpoint, args.seed)
    if args.mode == "tapt" and not backbone.cfg.has_quantizer:
        raise DataError(
            f"{args.checkpoint}: TAPT needs the pretraining modules (quantizer, project_q, "
            "final_proj), which an ASR fine-tuned model or a Hugging Face Wav2Vec2Model / ForCTC "
            "folder lacks: use the pretrained one (wav2vec_small.pt, not wav2vec_small_960h.pt)"
        )
    if args.teacher:
        read_teacher(args.teacher)


def run_fold(args, fold, splits, classes, run_dir, device):
    """TAPT, or P-TAPT's three stages, each skipped when its output exists."""
    train_set = splits["train"]
    if args.mode == "tapt":
        return run_tapt(args, fold, train_set, classes, run_dir, device)
    if args.mode == "kmeans":
        return run_pseudo_labels(args, fold, train_set, run_dir, args.checkpoint, device)
    teacher, labels = os.path.join(run_dir, "teacher.pt"), os.path.join(run_dir, "labels.pt")
    if not os.path.exists(teacher):
        run = run_release_teacher if args.teacher else run_teacher
        run(args, fold, train_set, classes, run_dir, device)
    elif T.world()[0] == 0:
        print(f"{teacher} exists: teacher done")
    if not os.path.exists(labels):
        run_pseudo_labels(args, fold, train_set, run_dir, teacher, device)
    elif T.world()[0] == 0:
        print(f"{labels} exists: k-means done")
    return run_ptapt(args, fold, train_set, classes, run_dir, labels, device)


# -----------------------------------------------------------------------------
# command line

# the settings that differ between the modes (RECIPE.md "TAPT" and "P-TAPT")
MODE_DEFAULTS = {
    "tapt": dict(mask_prob=0.05, mask_span=10, mask_min=2),
    "ptapt": dict(mask_prob=0.06, mask_span=15, mask_min=2),
    "kmeans": {},  # masks nothing
}


def build_parser():
    p = T.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a, D, recipe = p.add_argument, T.DEFAULT, T.recipe_default
    yes_no = argparse.BooleanOptionalAction
    mode = "kmeans: P-TAPT's k-means stage alone, on the untouched --checkpoint (its labels.pt)"
    a("--mode", choices=["tapt", "ptapt", "kmeans"], required=True, help=mode)
    T.add_run_flags(p)
    # which fold, from which checkpoint, under which name
    fold = "test session (default: all five); a .json/.csv corpus has one split and runs once"
    a("--fold", type=int, choices=[1, 2, 3, 4, 5], help=fold)
    source = (
        "wav2vec 2.0 with its pretraining modules: fairseq .pt, Hugging Face folder, random-tiny"
    )
    a("--checkpoint", required=True, help=source)
    a("--name", help="runs/<name>/fold<k> (default: the mode, -clean for the clean recipe)")
    # TAPT's and the pseudo-label pretraining's batches, schedule and masks (MODE_DEFAULTS)
    a("--updates", type=T.COUNT, default=20000, help="TAPT / pseudo-label pretraining updates" + D)
    a("--batch-size", type=T.COUNT, default=64, help="utterances" + D)
    a("--max-batch-seconds", type=T.POSITIVE, help="also cap each batch's padded audio" + D)
    a("--lr", type=T.POSITIVE, default=1e-4, help="Adam" + D)
    a("--warmup", type=T.NATURAL, default=100, help="linear warm-up updates" + D)
    a("--flat-fraction", type=T.PROBABILITY, default=0.05, help="flat, then linear decay to 0" + D)
    a("--max-seconds", type=T.AUDIO_SECONDS, default=10.0, help="random crops of at most N s" + D)
    a("--mask-prob", type=T.PROBABILITY, help="time masks (default: 0.05 tapt, 0.06 ptapt)")
    a("--mask-span", type=T.COUNT, help="frames per span (default: 10 tapt, 15 ptapt)")
    a("--mask-min", type=T.NATURAL, help="at least this many spans (default: 2)")
    # what the release's code computed or the method as written (README "The two recipes")
    a("--objective", choices=["release", "fairseq"], help="TAPT's loss" + recipe("objective"))
    semantics = "span counts: 4.10's (one per batch), per utterance, fairseq's"
    choices = ["release", "utterance", "fairseq"]
    a("--mask-semantics", choices=choices, help=semantics + recipe("mask_semantics"))
    budget = "TAPT / P-TAPT: batches of N x batch size / 64 s of audio; 0: of batch size utterances"
    a("--batch-seconds", type=T.SECONDS, help=budget + recipe("batch_seconds"))
    norm = "P-TAPT: the conv encoder's group norm over the padded batch or each utterance"
    a("--group-norm", choices=["padded", "valid"], help=norm + recipe("group_norm"))
    grad = "TAPT: gradient scale into the conv encoder (fairseq's: 0.1)"
    a("--feature-grad-mult", type=T.WEIGHT, default=1.0, help=grad + D)
    crops = "P-TAPT: at any sample, first label by the conv formula (release) or at whole frames"
    a("--crops", choices=["release", "aligned"], help=crops + recipe("crops"))
    a("--warmup-from-zero", action=yes_no, help="first update at lr 0" + recipe("warmup_from_zero"))
    a("--bucket", action=yes_no, help="P-TAPT's teacher: by length" + recipe("bucket"))
    penalty = "TAPT, --objective fairseq only: weight of mean(conv features^2); 0: Hugging Face's"
    penalty += " (default: 10)"
    a("--feature-penalty", type=T.WEIGHT, help=penalty)
    # P-TAPT's teacher and k-means stage (and --mode kmeans)
    v1 = "P-TAPT, release recipe: the release's wav2vec (v1) teacher (default: --checkpoint)"
    a("--teacher", metavar="WAV2VEC_V1.pt", help=v1)
    a("--teacher-updates", type=T.COUNT, default=10000, help="P-TAPT teacher" + D)
    a("--teacher-warmup-fraction", type=T.PROBABILITY, default=0.05, help=D)
    a("--ks", type=T.COUNT, nargs="+", default=[64, 512, 4096], help="k-means cluster counts" + D)
    a("--kmeans-iters", type=T.COUNT, default=20, help="Lloyd iterations at most" + D)
    init = "(default: random, K random frames as faiss, with --teacher; k-means++ otherwise)"
    a("--kmeans-init", choices=kmeans.INITS, help=init)
    a("--layer", type=T.COUNT, help="teacher layer for k-means features (default: the last)")
    a("--save-every", type=T.COUNT, default=500, help="updates between resumable checkpoints" + D)
    return p


def parse_args(argv):
    p = build_parser()
    args = p.parse_args(argv)
    given = {k for k in ("bucket", "feature_penalty", "crops") if getattr(args, k) is not None}
    T.finish_args(p, args, {**MODE_DEFAULTS[args.mode], **T.RECIPES[args.recipe]})
    if "bucket" in given and args.mode != "ptapt":
        p.error("argument --bucket: only P-TAPT's teacher takes it (TAPT's batches are by length)")
    if "crops" in given and args.mode != "ptapt":
        p.error("argument --crops: only P-TAPT's stages crop with labels (--mode ptapt)")
    if "feature_penalty" in given and args.objective != "fairseq":
        p.error(
            "argument --feature-penalty: the release objective has none (add --objective fairseq)"
        )
    if args.objective == "fairseq" and args.feature_penalty is None:
        args.feature_penalty = 10.0  # fairseq's (RECIPE.md "TAPT")
    if args.teacher is not None and args.mode != "ptapt":
        p.error("argument --teacher: only P-TAPT has a teacher (--mode ptapt)")
    if args.teacher is not None and args.recipe == "clean":  # README, P-TAPT: why
        clean = "the clean recipe's is the wav2vec 2.0 --checkpoint itself (leave out --teacher)"
        p.error(f"argument --teacher: the wav2vec (v1) teacher is the release recipe's; {clean}")
    args.release_teacher = RELEASE_TEACHER if args.teacher else None  # recorded in config.json
    args.kmeans_init = args.kmeans_init or ("random" if args.teacher else "k-means++")
    if len(set(args.ks)) != len(args.ks):
        p.error(f"argument --ks: {args.ks} repeats a K")
    if args.warmup > args.updates:
        never = "the learning rate would never reach --lr"
        p.error(f"argument --warmup: {args.warmup} is more than --updates {args.updates}: {never}")
    return args


def next_command(args, folds, root):
    """The V-FT that follows, with this run's recipe: over every fold pretrained here, 5 runs each
    as the paper's table (the quick start's settings after a run of the tiny random model)."""
    recipe = " --recipe clean" if args.recipe == "clean" else ""
    several = len(folds) > 1
    init = os.path.join(root, "fold{fold}" if several else f"fold{folds[0]}", "pretrained.pt")
    rest = f"--data {args.data}{recipe} --init " + (f"'{init}'" if several else init)
    if args.checkpoint == "random-tiny":
        return (
            "  next: python finetune.py --quickstart" + (" --fold all " if several else " ") + rest
        )
    return f"  next: python finetune.py --fold {'all --runs 5' if several else folds[0]} {rest}"


def main(argv=None):
    args = parse_args(argv)
    name = args.name or args.mode + ("-clean" if args.recipe == "clean" else "")
    output = "labels.pt" if args.mode == "kmeans" else "pretrained.pt"
    with T.user_errors():
        T.init_distributed(args.device)
        device = T.resolve_device(args.device)
        folds = T.folds_of(args.data, args.fold)
        check_stage_inputs(args)
        for fold in folds:
            splits, classes = data.load_corpus(args.data, fold, args.wav_dir)
            run_dir = os.path.join(args.out, name, f"fold{fold}")
            out = os.path.join(run_dir, output)
            with T.run_lock(run_dir):
                files = lambda changed, run_dir=run_dir: computed_with(run_dir, changed, args.mode)
                T.check_run_config(run_dir, {**vars(args), "fold": fold}, files)
                if os.path.exists(out):
                    if T.world()[0] == 0:
                        print(f"{out} exists: fold {fold} done (remove it to redo)")
                    continue
                run_fold(args, fold, splits, classes, run_dir, device)
            if T.world()[0] == 0:
                print(f"fold {fold}: {out}")
        if T.world()[0] == 0 and args.mode != "kmeans":
            print(next_command(args, folds, os.path.join(args.out, name)))


if __name__ == "__main__":
    main()
