"""Task-adaptive pretraining on a fold's training sessions: TAPT and P-TAPT (RECIPE.md).

    python pretrain.py --mode tapt  --fold 3 --data IEMOCAP_full_release --checkpoint wav2vec_small.pt
    python pretrain.py --mode ptapt --fold 3 --data IEMOCAP_full_release --checkpoint wav2vec_small.pt
    python finetune.py --fold 3 --data ... --init runs/ptapt/fold3/pretrained.pt

TAPT continues wav2vec 2.0's own objective (`tapt_loss`) on the fold's training audio. P-TAPT
replaces its targets by frame pseudo-labels that carry emotion, in three stages: an emotion-aware
teacher (`teacher_loss`), k-means on the teacher's frames (`pseudo_label_stage`, kmeans.py), and pretraining the
original checkpoint to predict each masked frame's cluster for every K (`pseudo_label_loss`). Either result
then goes through V-FT (finetune.py --init). The teacher is the wav2vec 2.0 checkpoint itself, or with
--teacher wav2vec_large.pt the release's: fairseq's wav2vec (v1) Large, trained as the release trained it
(`run_release_teacher`).

--recipe release (the default) computes what the authors' code computed: TAPT with transformers 4.10's
loss (`release_tapt_loss`), span counts per batch, dynamic batches of about 250 s of audio; --recipe
clean uses fairseq's objective (`tapt_loss`) and per-utterance masks (README "The two recipes";
RECIPE.md).

Without --fold every fold runs in turn. Output per fold: runs/<mode>/fold<k>/pretrained.pt. P-TAPT's
stages (teacher.pt, labels.pt, pretrained.pt) are each skipped when their output exists and resume
when interrupted. Only the fold's training sessions are ever read. --mode kmeans runs the k-means stage
alone on the untouched --checkpoint (runs/kmeans/fold<k>/labels.pt: how much emotion its clusters carry).
"""

import argparse
import math
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import kmeans
from checkpoints import (
    CheckpointError,
    load_wav2vec1,
    load_wav2vec1_teacher,
    save_wav2vec1_teacher,
    save_wav2vec2,
)
from data import (
    SAMPLE_RATE,
    AudioDataset,
    DataError,
    collate,
    labels_for,
    load_corpus,
    load_labels,
    save_labels,
)
from evaluate import emotion_nmi
from model import Wav2Vec1Teacher, span_masks, vft_masks
from train import (
    AUDIO_SECONDS,
    COUNT,
    HOST_GROUP,
    NATURAL,
    POSITIVE,
    PROBABILITY,
    RECIPES,
    SECONDS,
    WEIGHT,
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
    run_files,
    run_lock,
    seed_everything,
    train,
    train_batches,
    tri_stage_lr,
    user_errors,
    utterance_rng,
    world,
)

# -----------------------------------------------------------------------------
# TAPT: wav2vec 2.0's objective, as fairseq defines it (RECIPE.md "TAPT")


def contrastive(context, targets, candidates, logit_temp):
    """sum over masked frames t of CE(cos(c_t, q_j) / logit_temp over j in {target, distractors}),
    target at index 0; a distractor equal to its target gets -inf. candidates (N, K, D)."""
    candidates = torch.cat([targets.unsqueeze(1), candidates], 1)  # (N, 1 + K, D)
    logits = (
        F.cosine_similarity(context.float().unsqueeze(1), candidates.float(), dim=-1) / logit_temp
    )
    same = (candidates[:, 1:] == targets.unsqueeze(1)).all(-1)
    logits[:, 1:] = logits[:, 1:].masked_fill(same, float("-inf"))
    return F.cross_entropy(
        logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device), reduction="sum"
    )


def distractors(quantized, negatives):
    """quantized[negatives] (N, K, D), through index_select: the backward of advanced indexing adds
    repeated indices with atomic adds on the CPU, whose order (and so the rounding) follows thread
    timing; index_select's backward adds them in index order, the same every run."""
    index = negatives.to(quantized.device)
    return quantized.index_select(0, index.flatten()).unflatten(0, index.shape)


def nothing_masked(encoded):
    """A batch without a masked frame (every utterance shorter than a span, or --mask-prob 0): no
    loss and zero gradients, through the graph so that every process and the fp16 scaler see
    them."""
    zero = encoded.hidden.sum() * 0.0
    return {
        "contrastive": zero,
        "diversity": zero,
        "feature_penalty": zero,
        "n_masked": 0,
        "loss": zero,
    }


def tapt_loss(model, encoded, time_mask, negatives, penalty_weight=10.0):
    """fairseq's wav2vec 2.0 loss (the clean recipe) for given masks and distractors, with its
    terms:
        contrastive = `contrastive` of c_t = final_proj(context) against q = project_q(quantized
                      *unmasked* features) of the target and of the distractors
        diversity   = (G V - perplexity) / (G V) * n_masked, perplexity of the batch-averaged
        softmax penalty     = mean(conv features^2) * n_masked
        loss        = contrastive + 0.1 diversity + penalty_weight penalty
    (RECIPE.md "TAPT": penalty_weight 10, as fairseq.) negatives (n_masked, K) index the masked
    frames in time_mask order, from the same utterance (sample_negatives)."""
    if not time_mask.any():
        return nothing_masked(encoded)
    targets, perplexity = model.quantizer(encoded.features[time_mask])
    targets = model.project_q(targets)
    context = model.final_proj(encoded.hidden[time_mask])
    n = time_mask.sum()
    gv = model.quantizer.groups * model.quantizer.num_vars
    terms = {
        "contrastive": contrastive(
            context, targets, distractors(targets, negatives), model.cfg.logit_temp
        ),
        "diversity": (gv - perplexity) / gv * n,
        "feature_penalty": encoded.feature_penalty * n,
        "n_masked": n,
    }
    terms["loss"] = (
        terms["contrastive"] + 0.1 * terms["diversity"] + penalty_weight * terms["feature_penalty"]
    )
    return terms


def release_tapt_loss(model, encoded, time_mask, negatives):
    """The TAPT objective the release ran, transformers 4.10's Wav2Vec2ForPreTraining loss as
    returned (RECIPE.md "What the release actually computed"), with its terms:
        contrastive = as in tapt_loss, but every frame of the padded batch is quantized and the
                      distractors are drawn from all of them (padding included: the release called
                      the model without attention mask, so `encoded` treats padding as audio)
        diversity   = (G V - perplexity) / (G V), perplexity of the masked frames' averaged softmax
        loss        = contrastive + 0.1 diversity      (not scaled by n_masked; no feature penalty)
    The Gumbel softmax at temperature 1, never annealed (4.10's quantizer as the release ran it).
    negatives (n_masked, K) index the B * T frames (padded_negatives)."""
    if not time_mask.any():
        return nothing_masked(encoded)
    rows = time_mask.flatten()
    quantized, perplexity = model.quantizer(
        encoded.features.flatten(0, 1), rows=rows, temperature=1.0
    )
    quantized = model.project_q(quantized)
    context = model.final_proj(encoded.hidden[time_mask])
    gv = model.quantizer.groups * model.quantizer.num_vars
    terms = {
        "contrastive": contrastive(
            context, quantized[rows], distractors(quantized, negatives), model.cfg.logit_temp
        ),
        "diversity": (gv - perplexity) / gv,
        "n_masked": time_mask.sum(),
    }
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
    draw = (
        torch.rand(len(row), num_negatives, generator=generator) * (n - 1).clamp(min=1)[:, None]
    ).long()
    draw = draw + (draw >= local[:, None]).long()  # skip the frame itself
    # a lone masked frame has no distractor
    draw = torch.where((n > 1)[:, None], draw, local[:, None])
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
    every masked frame t of row b, num_negatives indices into the B * T frames, drawn uniformly with
    replacement from the row's other T - 1 frames, padding included."""
    B, T = time_mask.shape
    parts = []
    for row, rng in enumerate(rngs):
        frames = time_mask[row].nonzero().squeeze(1)
        draw = torch.randint(0, max(T - 1, 1), (len(frames), num_negatives), generator=rng)
        # skip the frame itself
        parts.append(row * T + (draw + (draw >= frames[:, None]).long()).clamp(max=T - 1))
    return torch.cat(parts)


# -----------------------------------------------------------------------------
# P-TAPT: the emotion-aware teacher and the pseudo-label heads (RECIPE.md "P-TAPT")


def mlp_head(dim, hidden, out):
    """Linear - Tanh - Linear (the release's frame and pseudo-label heads)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, out))


class Teacher(nn.Module):
    """A backbone fine-tuned with every frame labelled with its utterance's emotion: a frame head on
    every frame, and an utterance head (BiLSTM of `hidden` outputs, mean over time, ReLU,
    Linear-Tanh-Linear). wav2vec 2.0's: heads Linear(768, 256)-Tanh-Linear, BiLSTM 2 x 128. The
    release's v1 teacher (dim 512, hidden 512, head_hidden 128): its LinearHead(512, 128, C) and
    RNNLayer(512, 512) (release modules/NN.py)."""

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
        # autocast; batches are cropped to equal length, so the mean over time has no padding to
        # leave out
        with torch.autocast(hidden.device.type, enabled=False):
            pooled = self.lstm(hidden.float())[0].mean(1)
        return frame_logits, self.utterance_head(F.relu(pooled)), frames


def teacher_loss(frame_logits, utterance_logits, labels, weights):
    """The teacher's two class-weighted cross-entropies (w as V-FT's), each a (sum, count) pair:
        frames:     sum_{u,t} w_{y_u} CE(frame_logits[u, t], y_u) / sum_{u,t} w_{y_u}
        utterances: sum_u w_{y_u} CE(utterance_logits[u], y_u) / sum_u w_{y_u}
    Batches are cropped to equal length, so every frame is a real one."""
    frame_labels = labels[:, None].expand(-1, frame_logits.shape[1])
    frame_ce = F.cross_entropy(
        frame_logits.flatten(0, 1).float(), frame_labels.flatten(), weight=weights, reduction="sum"
    )
    utterance_ce = F.cross_entropy(
        utterance_logits.float(), labels, weight=weights, reduction="sum"
    )
    return [(frame_ce, weights[frame_labels].sum()), (utterance_ce, weights[labels].sum())]


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
    masked frames that have a label; logits and targets hold the masked frames only (padding is
    never masked; -100, the frames the v1 teacher has no label for, is left out as the release's
    ignore_index)."""
    return [
        (F.cross_entropy(lk.float(), tk, reduction="sum"), (tk != -100).sum())
        for lk, tk in zip(logits, targets)
    ]


class WithHeads(nn.Module):  # one module, so the resumable state holds backbone and heads together
    def __init__(self, backbone, heads):
        super().__init__()
        self.backbone, self.heads = backbone, heads


def crop_to_shortest(batch, rngs, across_processes=True, release=False):
    """The teacher's batches: every utterance randomly cropped to the shortest one of the whole
    batch, across processes (no padding). A longer utterance starts at 0..over samples, or as the
    release (np.random.randint(over), pretrain/dataloader.py:88-89) at 0..over - 1."""
    shortest = batch["lengths"].min()
    if world()[1] > 1 and across_processes:
        dist.all_reduce(shortest, op=dist.ReduceOp.MIN, group=HOST_GROUP[0])
    n = int(shortest)
    starts = [
        int(torch.randint(0, max(int(length) - n + (not release), 1), (), generator=rng))
        for length, rng in zip(batch["lengths"], rngs)
    ]
    wav = torch.stack([row[s : s + n] for row, s in zip(batch["wav"], starts)])
    return wav, torch.full((len(wav),), n, dtype=torch.long)


def crop_labels(labels, indices, starts, frames, width):
    """Each utterance's pseudo-labels for the frames of its crop, one (B, width) tensor per K; -100
    on padding. labels[index]: {K: the utterance's labels at wav2vec 2.0's frames} (aligned_labels);
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
    if world()[1] > 1:  # the release's one process saw the whole batch
        dist.all_reduce(target, op=dist.ReduceOp.MAX, group=HOST_GROUP[0])
    return [
        release_start(int(offset), conv_layers) if full_lengths[i] >= int(target) else 0
        for i, offset in zip(batch["indices"].tolist(), batch["offsets"])
    ]


def release_start(offset, conv_layers):
    """The release's first label of a crop starting at `offset` samples (pretrain/dataloader.py:
    189-193): its conv-length formula (L - k) // s + 1 applied to the offset, with Python's floor.
    A start at 320 j (j >= 2) gives frame j - 1, the frame before the crop's; every start below
    400 samples gives -1, whose slice holds no label, so such a crop has none."""
    for _, k, s in conv_layers:
        offset = (offset - k) // s + 1
    return offset


# -----------------------------------------------------------------------------
# the stages


def run_tapt(args, fold, train_set, classes, run_dir, device):
    # every stage starts from its own seed, whichever stages ran before
    seed_everything(args.seed + fold)
    model = load_backbone(args.checkpoint, args.seed).to(device)  # checked: check_stage_inputs
    release = args.objective == "release"
    dataset = AudioDataset(
        train_set,
        classes,
        max_seconds=args.max_seconds,
        crop="random",
        cache=args.cache,
        seed=args.seed,
    )
    stage_train(
        args,
        model,
        list(model.parameters()),
        tapt_batch_loss(args, model, release, device),
        dataset,
        run_dir,
        f"TAPT fold {fold}",
        device,
        on_update=None if release else model.quantizer.set_num_updates,
    )
    finish_stage(
        run_dir,
        "tapt",
        model,
        "pretrained.pt",
        {"mode": "tapt", "fold": fold, "source": args.checkpoint, "updates": args.updates},
    )


def tapt_batch_loss(args, model, release, device):
    """batch_loss for `train`: the batch's time mask and distractors, and the release's TAPT loss as
    returned (a sum) or fairseq's (over the masked frames)."""
    recipe = dict(
        norm_over_padding=args.group_norm == "padded",
        feature_grad_mult=args.feature_grad_mult,
        feature_dropout=not release,  # transformers 4.10's feat_quantizer_dropout: 0
    )

    def batch_loss(batch, update):
        wav, rngs, mask = masked_batch(args, model, batch, update, padded=release)
        # the release called the model without attention mask: to it the padding is audio
        if release:
            encoded = model.encode(wav.to(device), None, time_mask=mask.to(device), **recipe)
            negatives = padded_negatives(mask, model.cfg.num_negatives, rngs)
            # a sum, as returned
            return [(release_tapt_loss(model, encoded, mask.to(device), negatives)["loss"], 1)]
        encoded = model.encode(
            wav.to(device), batch["lengths"], time_mask=mask.to(device), **recipe
        )
        terms = tapt_loss(
            model,
            encoded,
            mask.to(device),
            utterance_negatives(mask, model.cfg.num_negatives, rngs),
            args.feature_penalty,
        )
        # fairseq divides by the masked frames (its sample size)
        return [(terms["loss"], terms["n_masked"])]

    return batch_loss


def run_teacher(args, fold, train_set, classes, run_dir, device):
    seed_everything(args.seed + fold)
    backbone = load_backbone(args.checkpoint, args.seed)
    # now, not after the teacher's hours of training
    check_kmeans_settings(args, backbone, train_set)
    teacher = Teacher(backbone, len(classes)).to(device)
    params = backbone.freeze_feature_encoder() + [
        p for n, p in teacher.named_parameters() if not n.startswith("backbone.")
    ]
    dataset = AudioDataset(
        train_set,
        classes,
        max_seconds=args.max_seconds,
        crop="random",
        cache=args.cache,
        seed=args.seed,
    )
    weights = class_weights(dataset.labels, len(classes)).to(device)

    def batch_loss(batch, update):
        rngs = batch_rngs(args.seed, update, batch["indices"])
        wav, lengths = crop_to_shortest(batch, rngs, release=args.crops == "release")
        frame_logits, utterance_logits, _ = teacher(wav.to(device), lengths)
        return teacher_loss(frame_logits, utterance_logits, batch["labels"].to(device), weights)

    stage_train(
        args,
        teacher,
        params,
        batch_loss,
        dataset,
        run_dir,
        f"P-TAPT teacher fold {fold}",
        device,
        teacher=True,
    )
    finish_stage(
        run_dir,
        "teacher",
        backbone,
        "teacher.pt",
        {"mode": "ptapt-teacher", "fold": fold, "source": args.checkpoint},
    )


# The release's teacher (RECIPE.md "What the release actually computed"; release
# pretrain/trainer.py:12-106 PretrainedEmoClassifier, modules/FeatureFuser.py:11-62 Wav2vecWrapper,
# modules/NN.py): what --teacher sets. Recorded in config.json as `release_teacher`.
RELEASE_TEACHER = {
    "model": "fairseq wav2vec (v1): feature extractor frozen (no grad), aggregator trained; "
    "Conv1d(512, 512, 4, stride 2) + ReLU to 50 Hz",
    "specaugment_time": [0.08, 15, 2],  # (prob, span, min spans) on v1's 100 Hz features, as zeros
    "specaugment_channel": [0.05, 64, 1],  # over the 512 channels: always one span of 64
    "heads": "frame LinearHead(512, 128, C); BiLSTM(512, 2 x 256), mean, ReLU, LinearHead(512, "
    "128, C)",
    "train_fraction": 0.9,  # int(0.9 n) train, the rest validate (torch random_split)
    "split_seed": 58,  # torch.Generator().manual_seed(58)
    "selection": "the epoch end with the lowest validation loss",
}


def release_split(utterances):
    """The release's 90/10 split: torch's random_split(data, [int(0.9 n), n - int(0.9 n)],
    generator=torch.Generator().manual_seed(58)), i.e. a randperm of that generator. The release
    permuted os.listdir order (filesystem-dependent); here the utterances sorted by uid."""
    ordered = sorted(utterances, key=lambda u: u.uid)
    n = len(ordered)
    fit = int(n * RELEASE_TEACHER["train_fraction"])
    perm = torch.randperm(
        n, generator=torch.Generator().manual_seed(RELEASE_TEACHER["split_seed"])
    ).tolist()
    return [ordered[i] for i in perm[:fit]], [ordered[i] for i in perm[fit:]]


def validation_loss(teacher, dataset, weights, batch_size, seed, device, dtype, release_crops):
    """The release's validation loss (validation_step, mean over the epoch as Lightning 1.4 logs it,
    batches weighted by their size): batches of batch_size in split order, the last one partial,
    each cropped to its shortest utterance (crops from a fixed seed: the same every epoch), eval
    mode (no SpecAugment); per batch the frame and utterance weighted CEs summed. Every process
    computes all."""
    teacher.eval()
    total = 0.0
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for start in range(0, len(dataset), batch_size):
            batch = collate(
                [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            )
            # update -2: validation's own
            rngs = batch_rngs(seed, -2, batch["indices"])
            wav, lengths = crop_to_shortest(batch, rngs, False, release_crops)
            frame_logits, utterance_logits, _ = teacher(wav.to(device), None)
            terms = teacher_loss(
                frame_logits, utterance_logits, batch["labels"].to(device), weights
            )
            total += len(wav) * float(sum(s / c for s, c in terms))
    teacher.train()
    return total / len(dataset)


def keep_best(teacher, valid_loss):
    """on_epoch_end for `train`: validate, and keep the weights of the lowest validation loss so far
    in the position (so the resume point holds them: a resumed run keeps the same ones). Lightning's
    ModelCheckpoint(monitor='valid_loss', mode='min', save_top_k=1) (release
    run_pretrain.py:24-31)."""

    def on_epoch_end(pos):
        # validated already (stopped at an epoch's last batch)
        if pos.get("valid_update") == pos["update"]:
            return
        loss = torch.tensor([valid_loss()], dtype=torch.float64)
        # every process computed it; rank 0's decides, so all keep the same weights
        if world()[1] > 1:
            dist.broadcast(loss, 0, group=HOST_GROUP[0])
        pos["valid_update"], loss = pos["update"], float(loss)
        if loss < pos.get("best_valid", float("inf")):
            pos.update(
                best_valid=loss,
                best_update=pos["update"],
                best_model={k: v.detach().cpu().clone() for k, v in teacher.state_dict().items()},
            )
        if world()[0] == 0:
            print(
                f"teacher: validation loss {loss:.4f} at update {pos['update']} "
                f"(best {pos['best_valid']:.4f} at update {pos['best_update']})"
            )

    return on_epoch_end


def run_release_teacher(args, fold, train_set, classes, run_dir, device):
    """The release's teacher (RELEASE_TEACHER): wav2vec (v1) from --teacher, trained on 90% of the
    fold's training utterances in random batches cropped to their shortest utterance, validated on
    the other 10% after every epoch; the weights of the lowest validation loss become teacher.pt."""
    seed_everything(args.seed + fold)
    front = load_release_teacher(args.teacher, train_set)
    check_kmeans_settings(args, front, train_set)
    teacher = Teacher(front, len(classes), hidden=512, dim=front.dim, head_hidden=128).to(device)
    params = front.v1.freeze_feature_extractor() + [
        p for n, p in teacher.named_parameters() if not n.startswith("backbone.v1.")
    ]
    fit, held_out = release_split(train_set)
    # class weights over every training utterance, the held-out 10% included (release
    # trainer.py:26-35)
    weights = class_weights(AudioDataset(train_set, classes).labels, len(classes)).to(device)
    # whole utterances
    dataset = AudioDataset(fit, classes, crop="random", cache=args.cache, seed=args.seed)
    valid = AudioDataset(held_out, classes, cache=args.cache)
    valid_loss = lambda: validation_loss(
        teacher,
        valid,
        weights,
        args.batch_size,
        args.seed,
        device,
        autocast_dtype(device, args.precision),
        args.crops == "release",
    )
    pos = stage_train(
        args,
        teacher,
        params,
        release_teacher_batch_loss(args, teacher, front, weights, device),
        dataset,
        run_dir,
        f"P-TAPT teacher (wav2vec v1) fold {fold}",
        device,
        teacher=True,
        on_epoch_end=keep_best(teacher, valid_loss),
    )
    finish_release_teacher(args, fold, teacher, front, pos, held_out, run_dir)


def load_release_teacher(path, train_set):
    """The wav2vec (v1) checkpoint of --teacher, wrapped as the release's front end; a DataError for
    a training utterance too short for it to give a frame."""
    try:
        front = Wav2Vec1Teacher(load_wav2vec1(path))
    except CheckpointError as e:
        raise DataError(f"--teacher: {e}") from None
    short = [u.uid for u in train_set if u.num_samples < front.min_samples]
    if short:
        raise DataError(
            f"{len(short)} training utterances (first {short[0]}) are shorter than "
            f"{front.min_samples} "
            "samples, the least the wav2vec (v1) teacher gives a frame for"
        )
    return front


def release_teacher_batch_loss(args, teacher, front, weights, device):
    """batch_loss for `train`: the batch cropped to its shortest utterance, the release's
    SpecAugment on v1's 100 Hz features (RELEASE_TEACHER), teacher_loss."""
    time, channel = RELEASE_TEACHER["specaugment_time"], RELEASE_TEACHER["specaugment_channel"]

    def batch_loss(batch, update):
        rngs = batch_rngs(args.seed, update, batch["indices"])
        wav, _ = crop_to_shortest(batch, rngs, release=args.crops == "release")
        # crops are equal: the batch's span count
        t100 = int(front.v1.frame_lengths(torch.tensor(wav.shape[1])))
        time_mask, channel_mask = vft_masks(
            "release",
            [t100] * len(wav),
            t100,
            front.dim,
            rngs,
            utterance_rng(args.seed, update, -1),
            time,
            channel,
        )
        frame_logits, utterance_logits, _ = teacher(
            wav.to(device), None, time_mask=time_mask, channel_mask=channel_mask
        )
        return teacher_loss(frame_logits, utterance_logits, batch["labels"].to(device), weights)

    return batch_loss


def finish_release_teacher(args, fold, teacher, front, pos, held_out, run_dir):
    """teacher.pt: the weights of the lowest validation loss (the last ones when no epoch ended),
    with the validation's record in its meta."""
    if "best_model" in pos:
        teacher.load_state_dict(pos["best_model"])
    elif world()[0] == 0:
        print(
            "warning: the teacher trained less than one epoch, so it was never validated: its last "
            "weights are used",
            file=sys.stderr,
        )
    meta = {
        "mode": "ptapt-teacher",
        "fold": fold,
        "source": args.teacher,
        "teacher_model": "wav2vec (v1)",
        "best_valid_loss": pos.get("best_valid"),
        "best_update": pos.get("best_update"),
        "validation_utterances": [u.uid for u in held_out],
    }
    finish_stage(run_dir, "teacher", front, "teacher.pt", meta, save=save_wav2vec1_teacher)


def run_pseudo_labels(args, fold, train_set, run_dir, teacher_path, device):
    """P-TAPT's k-means stage (pseudo_label_stage) on the teacher's frames; --mode kmeans: on
    --checkpoint's."""
    teacher = (
        load_wav2vec1_teacher(teacher_path)
        if args.teacher
        else load_backbone(teacher_path, args.seed)
    )
    teacher.eval().to(device)
    layer = check_kmeans_settings(args, teacher, train_set)
    # the release's: its ReLU'd 50 Hz output, fp32, eval, one utterance at a time (cluster.py)
    if args.teacher:
        features_of, meta = (
            lambda wav, lengths: unpadded(teacher, wav, lengths),
            {"teacher_model": "wav2vec (v1)"},
        )
    else:
        features_of, meta = (
            lambda wav, lengths: teacher(wav, lengths, layer=layer),
            {"layer": layer},
        )
    try:
        pseudo_label_stage(
            features_of,
            train_set,
            args.ks,
            args.kmeans_iters,
            args.kmeans_init,
            args.seed,
            device,
            os.path.join(run_dir, "labels.pt"),
            {"teacher": teacher_path, **meta, "fold": fold},
            progress=args.progress,
            workers=args.workers,
        )
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
    """P-TAPT's k-means stage: the frames of `utterances` (kmeans.extract_features), fit_kmeans for
    every K, every frame labelled, written to out_path (data.save_labels; meta gains the settings,
    the inertia and each K's NMI with emotion, printed) and returned as {K: (frames,) long}. Under
    torch.distributed every rank calls it: each extracts a contiguous shard of the utterances (cut
    by audio length), rank 0 writes, all return all."""
    (rank, size), device = world(), resolve_device(device)
    cum = torch.tensor([u.num_samples for u in utterances], dtype=torch.float64).cumsum(0)
    feats, counts = shard_features(features_of, utterances, cum, device, progress, workers)
    fits = kmeans.fit_kmeans(
        feats,
        ks,
        iters,
        init,
        seed,
        chunk_size=chunk_size,
        max_samples=max_samples,
        device=device,
        progress=progress,
    )
    labels = {
        k: kmeans.gather_rows(kmeans.assign(feats, f.centroids, chunk_size, device), device)
        for k, f in fits.items()
    }
    counts = kmeans.gather_rows(counts, device)
    if rank == 0:
        settings = {
            "iters": iters,
            "init": init if isinstance(init, str) else "given",
            "seed": seed,
            "max_samples": max(fits) * 1000 if max_samples is None else max_samples,
        }
        hours = float(cum[-1]) / SAMPLE_RATE / 3600
        save_pseudo_labels(out_path, utterances, counts, labels, fits, meta, hours, settings)
    if size > 1:
        dist.barrier()  # the file exists on return, on every rank
    return labels


def shard_features(features_of, utterances, cum, device, progress, workers):
    """This rank's frames and frame counts (kmeans.extract_features) of its contiguous shard of the
    utterances, cut where the cumulative audio length `cum` crosses each rank's share."""
    rank, size = world()
    cut = (
        [0]
        + [int(torch.searchsorted(cum, cum[-1] * r / size)) for r in range(1, size)]
        + [len(utterances)]
    )
    feats, counts = kmeans.extract_features(
        features_of,
        utterances[cut[rank] : cut[rank + 1]],
        device,
        progress=progress and rank == 0,
        workers=workers,
    )
    if size > 1:  # a rank without frames learns D
        dim = torch.tensor(feats.shape[1], device=device)
        dist.all_reduce(dim, dist.ReduceOp.MAX)
        feats = feats if len(feats) else torch.zeros(0, int(dim), dtype=torch.float16)
    return feats, counts


def save_pseudo_labels(out_path, utterances, counts, labels, fits, meta, hours, settings):
    """Rank 0's end of the k-means stage: each K's NMI with emotion, printed with its fit, and the
    labels written (data.save_labels) with meta and what the stage computed them from."""
    names = sorted({str(u.label) for u in utterances})
    nmi = {
        k: emotion_nmi(labels[k], counts, [names.index(str(u.label)) for u in utterances])
        for k in fits
    }
    meta = {
        **meta,
        "num_frames": int(counts.sum()),
        "hours": hours,
        "nmi": nmi,
        "ks": list(fits),
        **settings,
        "num_fit_frames": int(fits[max(fits)].counts.sum()),
        "inertia": {k: f.inertia for k, f in fits.items()},
    }
    for k, f in fits.items():
        print(
            f"K={k}: NMI between pseudo-labels and emotion {nmi[k]:.4f}, inertia "
            f"{f.inertia[0]:.5g} -> "
            f"{f.inertia[-1]:.5g} in {len(f.inertia) - 1} iterations, "
            f"{int((f.counts > 0).sum())}/{k} clusters used"
        )
    save_labels(out_path, [u.uid for u in utterances], counts, labels, meta)


def unpadded(teacher, wav, lengths):
    """A padded batch's features, each utterance run alone: v1's one-group norms would see the
    padding."""
    frames = teacher.frame_lengths(lengths)
    out = wav.new_zeros(len(wav), int(frames.max()), teacher.dim)
    for row, n in enumerate(lengths.tolist()):
        out[row, : frames[row]] = teacher(wav[row : row + 1, :n])[0][0]
    return out, frames


def check_kmeans_settings(args, backbone, train_set):
    """--layer within the model, every K at most the number of frames; returns the layer."""
    if isinstance(backbone, Wav2Vec1Teacher):
        if args.layer is not None:
            raise DataError(
                "--layer: the wav2vec (v1) teacher's features are its one output (ReLU of its "
                "stride-2 conv)"
            )
        layer = None
    else:
        layer = args.layer or backbone.cfg.num_layers
        if not 1 <= layer <= backbone.cfg.num_layers:
            raise DataError(f"--layer {layer}: the teacher has layers 1..{backbone.cfg.num_layers}")
    frames = int(backbone.frame_lengths(torch.tensor([u.num_samples for u in train_set])).sum())
    if max(args.ks) > frames:
        raise DataError(
            f"--ks {max(args.ks)}: more clusters than the {frames} frames of the training audio"
        )
    return layer


def run_ptapt(args, fold, train_set, classes, run_dir, labels_path, device):
    stored = load_labels(labels_path)
    seed_everything(args.seed + fold)
    # from the original checkpoint again, not the teacher
    backbone = load_backbone(args.checkpoint, args.seed)
    model = WithHeads(backbone, PseudoLabelHeads(backbone.cfg.embed_dim, stored["labels"])).to(
        device
    )
    params = backbone.freeze_feature_encoder() + list(model.heads.parameters())
    hop = math.prod(s for _, _, s in backbone.cfg.conv_layers)
    release_crops = args.crops == "release"
    full_lengths = [u.num_samples for u in train_set]
    dataset = AudioDataset(
        train_set,
        classes,
        max_seconds=args.max_seconds,
        crop="random",
        crop_align=1 if release_crops else hop,  # the release: any sample
        cache=args.cache,
        seed=args.seed,
    )
    # labels for exactly every utterance's frames: checked now, not hours in
    teacher = load_wav2vec1_teacher(os.path.join(run_dir, "teacher.pt")) if args.teacher else None
    labels = aligned_labels(stored, train_set, backbone, teacher)

    def batch_loss(batch, update):
        wav, _, mask = masked_batch(
            args, backbone, batch, update, padded=args.group_norm == "padded"
        )
        starts = crop_starts(batch, full_lengths, hop, backbone.cfg.conv_layers, release_crops)
        frames = backbone.frame_lengths(batch["lengths"])
        targets = crop_labels(labels, batch["indices"].tolist(), starts, frames, mask.shape[1])
        targets = [t[mask].to(device) for t in targets]
        mask = mask.to(device)
        hidden, _ = backbone(
            wav.to(device),
            batch["lengths"],
            time_mask=mask,
            norm_over_padding=args.group_norm == "padded",
        )
        # the heads see masked frames only
        return pseudo_label_loss(model.heads(hidden[mask]), targets)

    stage_train(args, model, params, batch_loss, dataset, run_dir, f"P-TAPT fold {fold}", device)
    finish_stage(
        run_dir,
        "ptapt",
        backbone,
        "pretrained.pt",
        {"mode": "ptapt", "fold": fold, "source": args.checkpoint, "labels": labels_path},
    )


def aligned_labels(stored, utterances, backbone, teacher=None):
    """Every utterance's pseudo-labels at wav2vec 2.0's frames, [{K: (frames,) long}]. The v1
    teacher's labels are stored at its own frames, (L - 945) // 320 + 1 for Large against wav2vec
    2.0's (L - 400) // 320 + 1: one or two fewer, never more. As the release
    (pretrain/dataloader.py:180-210), teacher frame j labels wav2vec 2.0 frame j from frame 0, and
    the last one or two frames get -100 (no label: left out of the loss)."""
    lengths = torch.tensor([u.num_samples for u in utterances])
    frames = backbone.frame_lengths(lengths).tolist()
    ours = frames if teacher is None else teacher.frame_lengths(lengths).tolist()
    out = []
    for u, n, t in zip(utterances, frames, ours):
        per_k = labels_for(stored, u.uid, t)
        if not 0 <= n - t <= 2:  # the conv formulas above: what else would mean another alignment
            raise DataError(
                f"utterance {u.uid}: {n} wav2vec 2.0 frames but {t} teacher frames; expected 0-2 "
                "fewer"
            )
        out.append({k: F.pad(v, (0, n - t), value=-100) for k, v in per_k.items()})
    return out


def masked_batch(args, model, batch, update, padded):
    """A batch's audio (padded to the whole batch's longest utterance when `padded`), its
    utterances' generators and its time mask (semantics as model.span_masks)."""
    wav = pad_to_whole_batch(batch["wav"]) if padded else batch["wav"]
    rngs = batch_rngs(args.seed, update, batch["indices"])
    mask = span_masks(
        args.mask_semantics,
        model.frame_lengths(batch["lengths"]),
        int(model.frame_lengths(torch.tensor(wav.shape[1]))),
        rngs,
        utterance_rng(args.seed, update, -1),
        args.mask_prob,
        args.mask_span,
        args.mask_min,
    )
    return wav, rngs, mask


def stage_train(
    args,
    model,
    params,
    batch_loss,
    dataset,
    run_dir,
    desc,
    device,
    teacher=False,
    on_update=None,
    on_epoch_end=None,
):
    """Every stage's schedule (RECIPE.md: linear warm-up, flat for 5%, linear decay to 0) and
    batches, the teacher's or (TAPT, P-TAPT) the mode's; returns train's final position."""
    if teacher:  # the release's teacher: random batches of batch_size utterances; clean: bucketed
        name, updates = "teacher", args.teacher_updates
        warmup = int(round(args.teacher_warmup_fraction * updates))
        batches = train_batches(
            dataset.lengths,
            args.batch_size,
            args.max_batch_seconds,
            args.bucket,
            args.seed,
        )
    else:
        name, updates, warmup = args.mode, args.updates, args.warmup
        # the release's RandomBucketSampler scales it so
        budget = args.batch_seconds * args.batch_size / 64
        batches = train_batches(
            dataset.lengths,
            args.batch_size,
            args.max_batch_seconds,
            True,
            args.seed,
            budget or None,
        )
    flat = int(round(args.flat_fraction * updates))
    return train(
        model,
        params,
        batch_loss,
        dataset,
        batches,
        updates=updates,
        lr=args.lr,
        schedule=lambda update: tri_stage_lr(update, updates, warmup, flat, args.warmup_from_zero),
        device=device,
        precision=args.precision,
        run_dir=run_dir,
        name=f"{name}.",
        save_every=args.save_every,
        desc=desc,
        workers=args.workers,
        progress=args.progress,
        on_update=on_update,
        on_epoch_end=on_epoch_end,
    )


def finish_stage(run_dir, name, model, filename, meta, save=save_wav2vec2):
    """Rank 0 writes the stage's output, then drops its resume state (it holds the optimizer: 3x the
    model); the other processes wait for the file."""
    if world()[0] == 0:
        save(model, os.path.join(run_dir, filename), meta=meta)
        remove_training_state(os.path.join(run_dir, f"{name}.state.pt"))
    barrier()


# P-TAPT's stages in order, with the files each computes; a setting belongs to the first stage that
# reads it
PTAPT_STAGES = [
    ("teacher", ("teacher.",)),
    ("k-means", ("labels.",)),
    ("pseudo-label", ("ptapt.", "pretrained.")),
]
KMEANS_SETTINGS = {"ks", "kmeans_iters", "kmeans_init", "layer"}
PSEUDO_LABEL_SETTINGS = {
    "updates",
    "warmup",
    "mask_prob",
    "mask_span",
    "mask_min",
    "mask_semantics",
    "batch_seconds",
    "group_norm",
    "objective",
    "feature_grad_mult",
    "feature_penalty",
}


def computed_with(run_dir, changed, mode):
    """The run folder's files computed with any of the `changed` settings: for P-TAPT, a finished
    teacher is kept when only the k-means or pseudo-label settings change."""
    files = run_files(run_dir)
    if mode != "ptapt":
        return files
    first = (
        0
        if changed - KMEANS_SETTINGS - PSEUDO_LABEL_SETTINGS
        else 1
        if changed & KMEANS_SETTINGS
        else 2
    )
    prefixes = tuple(p for _, stage_prefixes in PTAPT_STAGES[first:] for p in stage_prefixes)
    return [f for f in files if f.startswith(prefixes)]


def check_stage_inputs(args):
    """Every stage's input files, read before the first stage starts: a wrong --checkpoint is found
    now, not after the teacher has trained and k-means has run."""
    backbone = load_backbone(args.checkpoint, args.seed)
    if args.mode == "tapt" and not backbone.cfg.has_quantizer:
        raise DataError(
            f"{args.checkpoint}: TAPT needs the pretraining modules (quantizer, project_q, "
            "final_proj); this checkpoint has none (an ASR fine-tuned model, or a Hugging Face "
            "Wav2Vec2Model / ForCTC folder?). Use the pretrained checkpoint, e.g. wav2vec_small.pt "
            "rather than wav2vec_small_960h.pt"
        )
    if args.teacher:
        try:
            load_wav2vec1(args.teacher)
        except CheckpointError as e:
            raise DataError(f"--teacher: {e}") from None


def run_fold(args, fold, splits, classes, run_dir, device):
    """TAPT, or P-TAPT's three stages, each skipped when its output exists."""
    train_set = splits["train"]
    if args.mode == "tapt":
        return run_tapt(args, fold, train_set, classes, run_dir, device)
    if args.mode == "kmeans":
        return run_pseudo_labels(args, fold, train_set, run_dir, args.checkpoint, device)
    teacher = os.path.join(run_dir, "teacher.pt")
    if not os.path.exists(teacher):
        (run_release_teacher if args.teacher else run_teacher)(
            args, fold, train_set, classes, run_dir, device
        )
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
MODE_DEFAULTS = {
    "tapt": dict(mask_prob=0.05, mask_span=10, mask_min=2),
    "ptapt": dict(mask_prob=0.06, mask_span=15, mask_min=2),
    "kmeans": {},  # masks nothing
}


def build_parser():
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--mode",
        choices=["tapt", "ptapt", "kmeans"],
        required=True,
        help="kmeans: P-TAPT's k-means stage alone, on the untouched --checkpoint "
        "(runs/kmeans/fold<k>/labels.pt)",
    )
    add_run_flags(p)
    add_fold_flags(p)
    add_training_flags(p)
    add_mask_flags(p)
    add_recipe_flags(p)
    add_release_detail_flags(p)
    add_teacher_flags(p)
    add_kmeans_flags(p)
    p.add_argument(
        "--save-every",
        type=COUNT,
        default=500,
        help="updates between resumable checkpoints (default: %(default)s)",
    )
    return p


def add_fold_flags(p):
    """Which fold, from which checkpoint, under which name."""
    a = p.add_argument
    a(
        "--fold",
        type=int,
        choices=[1, 2, 3, 4, 5],
        default=None,
        help="test session whose other sessions are pretrained on (default: all five, where "
        "finetune.py's is 1); a .json/.csv corpus has one split of its own and runs once",
    )
    a(
        "--checkpoint",
        required=True,
        help="wav2vec 2.0 with its pretraining modules: a fairseq checkpoint (e.g. "
        "wav2vec_small.pt), "
        "a Hugging Face Wav2Vec2ForPreTraining folder, or random-tiny (a tiny random model, for "
        "the "
        "synthetic corpus)",
    )
    a(
        "--name",
        default=None,
        help="runs/<name>/fold<k> (default: the mode, with -clean for the clean recipe)",
    )


def add_training_flags(p):
    """Updates, batches and the learning-rate schedule of TAPT and the pseudo-label pretraining."""
    a = p.add_argument
    a(
        "--updates",
        type=COUNT,
        default=20000,
        help="TAPT / pseudo-label pretraining updates (default: %(default)s)",
    )
    a("--batch-size", type=COUNT, default=64, help="(default: %(default)s)")
    a(
        "--max-batch-seconds",
        type=POSITIVE,
        default=None,
        help="also cap each batch's padded audio (default: %(default)s)",
    )
    a("--lr", type=POSITIVE, default=1e-4, help="Adam (default: %(default)s)")
    a("--warmup", type=NATURAL, default=100, help="linear warm-up updates (default: %(default)s)")
    a(
        "--flat-fraction",
        type=PROBABILITY,
        default=0.05,
        help="flat part of the schedule, then linear decay to 0 (default: %(default)s)",
    )
    a(
        "--max-seconds",
        type=AUDIO_SECONDS,
        default=10.0,
        help="random crops of at most N seconds (default: %(default)s)",
    )


def add_mask_flags(p):
    """The time masks (default: the mode's, MODE_DEFAULTS)."""
    a = p.add_argument
    a(
        "--mask-prob",
        type=PROBABILITY,
        default=None,
        help="time-mask probability (default: 0.05 tapt, 0.06 ptapt)",
    )
    a("--mask-span", type=COUNT, default=None, help="frames per span (default: 10 tapt, 15 ptapt)")
    a("--mask-min", type=NATURAL, default=None, help="at least this many spans (default: 2)")


def add_recipe_flags(p):
    """What the release's code computed or the method as written (train.RECIPES; default: the
    recipe's): TAPT's loss, the span counts, the batches, the conv encoder's group norm."""
    a = p.add_argument
    a(
        "--objective",
        choices=["release", "fairseq"],
        default=None,
        help="TAPT: transformers 4.10's loss as the release ran it, or fairseq's (default: the "
        "recipe's)",
    )
    a(
        "--mask-semantics",
        choices=["release", "utterance", "fairseq"],
        default=None,
        help="span counts of transformers 4.10 (one per batch), per utterance, or fairseq's "
        "pretraining "
        "(default: the recipe's: release for release, utterance for clean)",
    )
    a(
        "--batch-seconds",
        type=SECONDS,
        default=None,
        help="TAPT / P-TAPT: the release's dynamic batches of batch_seconds x batch_size / 64 "
        "seconds of audio "
        "(250 s at batch size 64); 0: batches of --batch-size utterances (default: the recipe's: "
        "release 250, "
        "clean 0)",
    )
    a(
        "--group-norm",
        choices=["padded", "valid"],
        default=None,
        help="P-TAPT: the conv encoder's group norm over the padded batch or each utterance's own "
        "samples "
        "(default: the recipe's: release padded, clean valid)",
    )


def add_release_detail_flags(p):
    """The finer differences between the release's code, fairseq's and the method as written: the
    conv encoder's gradient, P-TAPT's crops, the warm-up's first update, the teacher's batches,
    TAPT's feature penalty."""
    a = p.add_argument
    a(
        "--feature-grad-mult",
        type=WEIGHT,
        default=1.0,
        help="TAPT: gradient scale into the conv encoder; fairseq used 0.1, the release 1.0 "
        "(default: %(default)s)",
    )
    a(
        "--crops",
        choices=["release", "aligned"],
        default=None,
        help="P-TAPT: release: crops start at any sample and take their first label from the conv "
        "formula (pretrain/dataloader.py:189-193; the teacher's crops start below the longest "
        "start); aligned: at whole frames, with that frame's label (default: the recipe's)",
    )
    a(
        "--warmup-from-zero",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the warm-up's first update at lr 0, as the release's schedule (default: the "
        "recipe's: "
        "release yes, clean no)",
    )
    a(
        "--bucket",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="P-TAPT's teacher: batches of similar lengths (default: the recipe's: release random, "
        "clean bucketed)",
    )
    a(
        "--feature-penalty",
        type=WEIGHT,
        default=None,
        help="TAPT, fairseq's objective only: weight of the feature penalty mean(conv features^2) "
        "(RECIPE.md, fairseq); 0 = Hugging Face's objective. A tiny model trained from scratch "
        "with 10 "
        "and 5%% masking collapses: README, Results (default: 10 with --objective fairseq)",
    )


def add_teacher_flags(p):
    """P-TAPT's teacher."""
    a = p.add_argument
    a(
        "--teacher",
        default=None,
        metavar="WAV2VEC_V1.pt",
        help="P-TAPT: the release's teacher, fairseq's wav2vec (v1) (wav2vec_large.pt), trained as "
        "the release trained "
        "it (release recipe only; README, P-TAPT) (default: the wav2vec 2.0 --checkpoint itself)",
    )
    a("--teacher-updates", type=COUNT, default=10000, help="P-TAPT teacher (default: %(default)s)")
    a("--teacher-warmup-fraction", type=PROBABILITY, default=0.05, help="(default: %(default)s)")


def add_kmeans_flags(p):
    """P-TAPT's k-means stage (and --mode kmeans)."""
    a = p.add_argument
    a(
        "--ks",
        type=COUNT,
        nargs="+",
        default=[64, 512, 4096],
        help="k-means cluster counts (default: %(default)s)",
    )
    a(
        "--kmeans-iters",
        type=COUNT,
        default=20,
        help="Lloyd iterations at most (RECIPE.md: faiss's default) (default: %(default)s)",
    )
    a(
        "--kmeans-init",
        choices=["k-means++", "random"],
        default=None,
        help="(default: random, K random frames as faiss, with --teacher; k-means++ otherwise)",
    )
    a(
        "--layer",
        type=COUNT,
        default=None,
        help="teacher layer for k-means features (default: the last)",
    )


def parse_args(argv):
    p = build_parser()
    args = p.parse_args(argv)
    given = {k for k in ("bucket", "feature_penalty", "crops") if getattr(args, k) is not None}
    finish_args(p, args, {**MODE_DEFAULTS[args.mode], **RECIPES[args.recipe]})
    if "bucket" in given and args.mode != "ptapt":
        p.error("argument --bucket: only P-TAPT's teacher takes it (TAPT's batches are by length)")
    if "crops" in given and args.mode != "ptapt":
        p.error("argument --crops: only P-TAPT's stages crop with labels (--mode ptapt)")
    if "feature_penalty" in given and args.objective != "fairseq":
        p.error(
            "argument --feature-penalty: the release objective has no feature penalty "
            "(add --objective fairseq, or --recipe clean)"
        )
    if args.objective == "fairseq" and args.feature_penalty is None:
        args.feature_penalty = 10.0  # fairseq's (RECIPE.md "TAPT")
    if args.teacher is not None and args.mode != "ptapt":
        p.error("argument --teacher: only P-TAPT has a teacher (--mode ptapt)")
    if args.teacher is not None and args.recipe == "clean":  # README, P-TAPT: why
        p.error(
            "argument --teacher: the wav2vec (v1) teacher is the release recipe's; the clean "
            "recipe's teacher is "
            "the wav2vec 2.0 --checkpoint itself (leave out --teacher or --recipe clean)"
        )
    args.release_teacher = RELEASE_TEACHER if args.teacher else None  # recorded in config.json
    args.kmeans_init = args.kmeans_init or ("random" if args.teacher else "k-means++")
    if len(set(args.ks)) != len(args.ks):
        p.error(f"argument --ks: {args.ks} repeats a K")
    if args.warmup > args.updates:
        p.error(
            f"argument --warmup: {args.warmup} warm-up updates, more than --updates "
            f"{args.updates}: "
            "the learning rate would never reach --lr"
        )
    return args


def next_command(args, folds, root):
    """The V-FT that follows, with this run's recipe: over every fold pretrained here, 5 runs each
    as the paper's table (the quick start's settings after a run on the synthetic corpus's tiny
    random model, as the README's synthetic rows use them)."""
    recipe = " --recipe clean" if args.recipe == "clean" else ""
    several = len(folds) > 1
    init = os.path.join(root, "fold{fold}" if several else f"fold{folds[0]}", "pretrained.pt")
    init = f"'{init}'" if several else init
    rest = f"--data {args.data}{recipe} --init {init}"
    if args.checkpoint == "random-tiny":
        return (
            "  next: python finetune.py --quickstart" + (" --fold all " if several else " ") + rest
        )
    return f"  next: python finetune.py --fold {'all --runs 5' if several else folds[0]} {rest}"


def main(argv=None):
    args = parse_args(argv)
    name = args.name or args.mode + ("-clean" if args.recipe == "clean" else "")
    with user_errors():
        init_distributed(args.device)
        device = resolve_device(args.device)
        folds = folds_of(args.data, args.fold)
        check_stage_inputs(args)
        for fold in folds:
            splits, classes = load_corpus(args.data, fold, args.wav_dir)
            run_dir = os.path.join(args.out, name, f"fold{fold}")
            with run_lock(run_dir):
                check_run_config(
                    run_dir,
                    {**vars(args), "fold": fold},
                    lambda changed, run_dir=run_dir: computed_with(run_dir, changed, args.mode),
                )
                out = os.path.join(
                    run_dir, "labels.pt" if args.mode == "kmeans" else "pretrained.pt"
                )
                if os.path.exists(out):
                    if world()[0] == 0:
                        print(f"{out} exists: fold {fold} done (remove it to redo)")
                    continue
                run_fold(args, fold, splits, classes, run_dir, device)
            if world()[0] == 0:
                print(f"fold {fold}: {out}")
        if world()[0] == 0 and args.mode != "kmeans":
            print(next_command(args, folds, os.path.join(args.out, name)))


if __name__ == "__main__":
    main()
