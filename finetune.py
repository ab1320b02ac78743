"""V-FT: fine-tune wav2vec 2.0 for emotion, leave-one-session-out (RECIPE.md "V-FT").

    python finetune.py --fold 3 --data IEMOCAP_full_release --checkpoint wav2vec_small.pt
    python finetune.py --fold all --runs 5 --data ... --checkpoint ... --init runs/ptapt/fold{fold}/pretrained.pt
    python finetune.py --quickstart          # synthetic corpus + tiny random model, under 2 minutes on a CPU

Output: runs/<name>/fold<k>/run<r>/{config.json, log.jsonl, model.pt, predictions.csv, metrics.json}.
An interrupted run resumes from its last completed epoch; a finished run is skipped, never overwritten.
The training plumbing (devices, precision, schedule, resumable state) lives here and pretrain.py imports it.
"""
import argparse
import glob
import json
import os
import random
import re
import shutil
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from data import (SYNTH_PER_SESSION, AudioDataset, BucketBatchSampler, DataError, collate, count_table,
                  format_count_table, load_corpus, synthesize_iemocap, synthetic_settings)
from evaluate import compute_metrics, predict, write_json, write_predictions
from model import (CheckpointError, EmotionClassifier, Wav2Vec2, Wav2Vec2Config, compute_span_mask,
                   load_wav2vec2, save_atomic, save_classifier, to_device, world)

# -----------------------------------------------------------------------------
# training plumbing (shared with pretrain.py)


def resolve_device(name):
    """'auto': the GPU when there is one. Under torchrun each process takes GPU LOCAL_RANK."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def autocast_dtype(device, precision):
    """None = float32. 'auto': bf16 on GPUs that support it, else fp16 (with a grad scaler); fp32 on CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        # native bf16 from Ampere (8.0) on; is_bf16_supported() also says yes where it is only emulated
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def tri_stage_lr(step, total, warmup, flat):
    """The release's schedule: linear warm-up over `warmup` updates, flat for `flat` updates,
    then linear decay to 0 at `total` (a factor on the base lr)."""
    if step < warmup:
        return (step + 1) / warmup
    if step < warmup + flat:
        return 1.0
    return max(0.0, (total - step) / max(1, total - warmup - flat))


def as_device_scalar(x, device):
    """A float32 scalar on `device`: a Python number goes there by a fill kernel, without the blocking
    host-to-device copy (and GPU wait) that torch.tensor(x, device=...) makes."""
    if torch.is_tensor(x):
        return to_device(x.detach(), device).float()
    return torch.full((), float(x), device=device)


def rng_state(device):
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)  # the training GPU's only: a resume may see other GPUs
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # written by an earlier version: every visible GPU's, in index order
        cuda = cuda[device.index or 0] if device.type == "cuda" and (device.index or 0) < len(cuda) else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


# -----------------------------------------------------------------------------
# several processes (torchrun): every rank trains on its shard of each global batch


def init_distributed(device_name):
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on GPUs, gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or dist.is_initialized():
        return
    device = resolve_device(device_name)
    if device.type == "cuda":
        if device.index is None:  # every process would take GPU 0
            print(f"error: WORLD_SIZE={os.environ['WORLD_SIZE']} but no LOCAL_RANK to choose this process's GPU: "
                  "start the processes with torchrun (it sets both), or give each its own --device cuda:N",
                  file=sys.stderr)
            sys.exit(2)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def is_main():
    return world()[0] == 0


def barrier():
    """Wait until every rank is here (after rank 0 wrote a file the others read)."""
    if world()[1] > 1:
        dist.barrier()


_host_groups = {}


def host_group():
    """A gloo group of every rank, made once (every rank must first ask at the same point): what is
    agreed through it (a stop flag, a crop length) travels between the hosts and never waits for the
    GPU, as reading back an NCCL result does. None when the default group is gloo already."""
    if dist.get_backend() == "gloo":
        return None
    if dist.group.WORLD not in _host_groups:  # keyed by the default group: a new one after a re-init
        _host_groups[dist.group.WORLD] = dist.new_group(backend="gloo")
    return _host_groups[dist.group.WORLD]


def utterance_rng(seed, update, index):
    """One generator per utterance per update for its masks, negatives and crops: they then depend
    neither on the batch the utterance shares nor on the number of processes nor on a resume."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + update) * 1_000_003 + int(index)) % 2 ** 63)


def utterance_span_masks(lengths, max_len, rngs, prob, span, min_spans):
    """Hugging Face span masks (the release's) drawn per utterance: the U[0,1) in the span count is
    drawn per utterance instead of once per batch, which leaves each utterance's distribution as it
    was (and equal for utterances of at least two spans' length, where the batch length never caps)."""
    mask = torch.zeros(len(lengths), max_len, dtype=torch.bool)
    for row, (n, rng) in enumerate(zip(lengths, rngs)):
        n = int(n)
        mask[row, :n] = compute_span_mask([n], n, prob, span, min_spans, "hf", rng)[0]
    return mask


def train_sampler(lengths, args, seed):
    """The length-bucketed training batches of args.batch_size utterances in all (the recipe's
    batch), each rank taking its share."""
    rank, world_size = world()
    return BucketBatchSampler(lengths, batch_size=args.batch_size, max_batch_seconds=args.max_batch_seconds,
                              bucket=getattr(args, "bucket", True), seed=seed, num_replicas=world_size, rank=rank)


# -----------------------------------------------------------------------------
# resume points and output folders


def save_training_state(state, path):
    """Atomic, and the previous resume point stays as <path>.prev until the new one is complete."""
    try:
        save_atomic(state, f"{path}.new")
        if os.path.exists(path):
            os.replace(path, f"{path}.prev")
        os.replace(f"{path}.new", path)
    except OSError as e:
        raise DataError(f"could not write the resume point {path}: {e.strerror or e}; "
                        f"the previous one ({path} or {path}.prev) is intact") from None


def load_training_state(path):
    """The newest readable resume point: a damaged file (a crash, a full disk) is reported and the
    one before it used. Half-written files of a killed run are removed."""
    for leftover in glob.glob(f"{glob.escape(path)}*.tmp*"):
        os.remove(leftover)
    for candidate in (f"{path}.new", path, f"{path}.prev"):
        if not os.path.exists(candidate):
            continue
        try:
            return torch.load(candidate, map_location="cpu", weights_only=False)
        except Exception as e:
            print(f"warning: {candidate} is unreadable ({type(e).__name__}: {e}); trying the previous resume point",
                  file=sys.stderr)
    return None


def remove_training_state(path):
    for candidate in [path, f"{path}.new", f"{path}.prev"] + glob.glob(f"{glob.escape(path)}*.tmp*"):
        if os.path.exists(candidate):
            os.remove(candidate)


def check_output_dir(path, need_bytes=0):
    """Fail before any work when the output folder cannot be written or has too little room."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise DataError(f"cannot write to the output folder {path}: {e.strerror or e}") from None
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise DataError(f"{path}: {free / 2 ** 30:.2f} GiB free, but this run's checkpoints need about "
                        f"{need_bytes / 2 ** 30:.2f} GiB; free some space or choose another --out")


def checkpoint_bytes(model, params):
    """Room a stage needs: two resume points (weights + Adam's two moments) and the final weights."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    moments = 2 * sum(p.numel() * p.element_size() for p in params)
    return 3 * weights + 2 * moments


class StopRequested:
    """SIGTERM / Ctrl-C: finish the current update, save, exit cleanly (see run_updates)."""

    def __init__(self):
        self.flag = False

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.flag:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        print(f"\nsignal {signum}: saving at the end of this update, then stopping", file=sys.stderr)
        self.flag = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def all_reduce_gradients(params):
    """Sum every rank's gradients in one collective (a parameter without a gradient counts as zero,
    so every rank sends the same layout)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p)


def update_loss(terms, seconds, device):
    """One update's loss from loss_fn's (sum, count) terms: every rank's sums and counts, and the audio
    seconds, in one small collective; then the sum over terms of all ranks' sum / all ranks' count.
    Returns (loss, totals, counts)."""
    totals = torch.stack([as_device_scalar(x, device) for pair in terms for x in pair]
                         + [as_device_scalar(seconds, device)])
    if world()[1] > 1:
        dist.all_reduce(totals)
    counts = totals[1:-1:2].clamp(min=1e-12)
    return sum(total / count for (total, _), count in zip(terms, counts)), totals, counts


def run_updates(*, model, params, loss_fn, dataset, sampler, total_updates, lr, schedule, device, dtype,
                state_path, save_every, log_path, desc, workers=0, progress=True, on_update=None, log_every_epoch=True):
    """The training loop every stage shares: Adam, a schedule (factor of lr per update), mixed
    precision, data parallel over torchrun's ranks, and a resumable state (model, optimizer,
    schedule, scaler, every rank's RNG, position in the epoch) saved atomically every `save_every`
    updates, at the end of every epoch and on SIGTERM / Ctrl-C.

    loss_fn(batch, update) returns (terms, audio_seconds) with terms a list of (sum, count) pairs
    over this rank's utterances; the update minimises sum over terms of (sum over all ranks of sum) /
    (sum over all ranks of count), so N processes compute the single-process loss of the whole
    batch, however its utterances are shared out (fairseq's sample-size normalisation)."""
    rank, world_size = world()
    opt = torch.optim.Adam(params, lr=lr, weight_decay=0.0, **({"fused": True} if device.type == "cuda" else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    update, epoch, batch_in_epoch, partial = 0, 0, 0, (0.0, 0, 0.0)  # partial: loss sum, steps, audio of this epoch
    if rank == 0:
        check_output_dir(os.path.dirname(os.path.abspath(state_path)), checkpoint_bytes(model, params))
    state = load_training_state(state_path) if rank == 0 else None
    if world_size > 1:  # rank 0 reads (the others may not share its disk) and sends
        shared = [state]
        dist.broadcast_object_list(shared, src=0)
        state = shared[0]
        if rank > 0:  # dropout differs between ranks, as their data do; rank 0 draws what one process draws
            torch.manual_seed(torch.initial_seed() + rank)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when saved without fp16 (--precision auto may mean fp16 on another GPU)
            scaler.load_state_dict(state["scaler"])
        if len(state["rng"]) == world_size:
            set_rng_state(state["rng"][rank], device)
        elif rank == 0:
            print(f"warning: {state_path} was written by {len(state['rng'])} processes, this run has {world_size}: "
                  "random streams (dropout) restart", file=sys.stderr)
        update, epoch, batch_in_epoch, partial = state["update"], state["epoch"], state["batch_in_epoch"], state["partial"]
        if rank == 0:
            print(f"{desc}: resuming at update {update} (epoch {epoch + 1}, batch {batch_in_epoch})")
    if world_size > 1:
        for t in model.state_dict().values():  # every rank starts from rank 0's weights
            dist.broadcast(t, 0)
        control = host_group()  # the stop flag is agreed on the host

    def save():
        rngs = [None] * world_size
        if world_size > 1:
            dist.all_gather_object(rngs, rng_state(device))
        else:
            rngs = [rng_state(device)]
        if rank == 0:
            save_training_state({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                 "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "rng": rngs,
                                 "update": update, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                                 "partial": (epoch_loss.item(), steps, audio.item())}, state_path)

    def stop_everywhere():
        if world_size == 1:
            return stop.flag
        flag = torch.tensor([float(stop.flag)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=control)
        return bool(flag.item())

    bar = tqdm(total=total_updates, initial=update, desc=desc, unit="update", disable=not progress or rank != 0)
    # its own generator: starting an epoch then leaves the global random stream (dropout) alone, so a
    # run resumed mid-epoch draws what the uninterrupted run draws
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                                         pin_memory=device.type == "cuda", generator=torch.Generator())
    with StopRequested() as stop:
        while update < total_updates:
            sampler.set_epoch(epoch, batch_in_epoch)
            dataset.set_epoch(epoch)
            if len(sampler) == 0 and batch_in_epoch == 0:
                raise DataError(f"{desc}: the training data make no full batch (batch size {sampler.batch_size})")
            model.train()
            if batch_in_epoch == 0:
                partial = (0.0, 0, 0.0)
            # the epoch's running loss and audio, carried over a resume so the epoch's log line is whole
            t0, epoch_loss, steps, audio = (time.time(), as_device_scalar(partial[0], device), partial[1],
                                            as_device_scalar(partial[2], device))
            stopping = False
            for batch in loader:
                if on_update is not None:
                    on_update(update)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    terms, seconds = loss_fn(batch, update)
                loss, totals, counts = update_loss(terms, seconds, device)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if world_size > 1:
                    all_reduce_gradients(params)
                scaler.step(opt)
                scaler.update()
                sched.step()
                update, batch_in_epoch, steps = update + 1, batch_in_epoch + 1, steps + 1
                epoch_loss += (totals[0:-1:2] / counts).sum()
                audio += totals[-1]
                bar.update(1)
                if steps % 10 == 0:  # .item() waits for the GPU: only now and then
                    bar.set_postfix(loss=f"{epoch_loss.item() / steps:.3f}",
                                    audio_s_per_s=f"{audio.item() / (time.time() - t0):.0f}")
                stopping = stop_everywhere()
                if update == total_updates or stopping:
                    break
                if update % save_every == 0:
                    save()
            else:
                epoch, batch_in_epoch = epoch + 1, 0
            if rank == 0 and steps and (log_every_epoch or update == total_updates):
                record = {"update": update, "epoch": epoch if batch_in_epoch == 0 else epoch + 1,
                          "loss": epoch_loss.item() / steps, "lr": sched.get_last_lr()[0], "seconds": round(time.time() - t0, 2),
                          "audio_seconds_per_second": round(audio.item() / (time.time() - t0), 1)}
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            save()
            if stopping:
                bar.close()
                if rank == 0:
                    print(f"{desc}: stopped at update {update}; run the same command again to resume", file=sys.stderr)
                sys.exit(130)
    bar.close()


def check_run_config(run_dir, config, parser):
    """Refuse to resume or skip into a folder made with different settings; fail early on a folder
    that cannot be written. A setting missing from an older folder's config.json (a flag added since)
    counts as the parser's default, which is what that run used."""
    path = os.path.join(run_dir, "config.json")
    barrier()  # every rank looks before rank 0 writes
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        old = {**{k: parser.get_default(k) for k in config if k not in old}, **old}
        ignore = {"workers", "device", "progress", "name", "out", "cache"}  # where and how, not what
        diff = {k: (old.get(k), v) for k, v in config.items() if k not in ignore and old.get(k) != v}
        if diff:
            raise DataError(f"{run_dir} holds a run with other settings {diff} (old, new); "
                            "use another --name or remove the folder")
    elif is_main():
        check_output_dir(run_dir)
        write_json(path, config)
    barrier()


def class_weights(labels, num_classes):
    """w_c proportional to N / n_c over the training split, normalised to sum 1 (RECIPE.md "V-FT")."""
    counts = torch.bincount(torch.as_tensor(labels), minlength=num_classes).double()
    if (counts == 0).any():
        raise DataError(f"a class has no training utterance (counts {counts.long().tolist()})")
    w = counts.sum() / counts
    return (w / w.sum()).float()


def stratified_fraction(utterances, fraction, seed):
    """The paper's low-resource setting: the same fraction of every class, drawn with a seed."""
    if not 0 < fraction <= 1:
        raise DataError(f"--train-fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return utterances
    rng = np.random.default_rng(seed)
    keep = []
    for label in sorted({u.label for u in utterances}):
        members = [u for u in utterances if u.label == label]
        n = max(1, round(fraction * len(members)))
        keep += [members[i] for i in sorted(rng.choice(len(members), n, replace=False))]
    return sorted(keep, key=lambda u: u.uid)


def tiny_random_config():
    """A small wav2vec 2.0 for the quick start and tests: same architecture, fewer channels."""
    return Wav2Vec2Config(conv_layers=[(64, 10, 5)] + [(64, 3, 2)] * 4 + [(64, 2, 2)] * 2, embed_dim=96,
                          ffn_dim=192, num_layers=2, num_heads=4, pos_conv_kernel=16, pos_conv_groups=4,
                          final_dim=64, latent_vars=32, dropout=0.1, attention_dropout=0.1, layerdrop=0.0)


def load_backbone(args):
    """--init (a pretrain.py output) or --checkpoint (fairseq) or a tiny random model (quick start)."""
    source = args.init or args.checkpoint
    if source == "random-tiny":
        torch.manual_seed(args.seed)
        return Wav2Vec2(tiny_random_config())
    if source is None:
        raise DataError("give --checkpoint (a fairseq wav2vec 2.0 .pt, e.g. wav2vec_small.pt) or --init")
    try:
        return load_wav2vec2(source)
    except CheckpointError as e:
        raise DataError(f"{e} (expected a wav2vec 2.0 checkpoint)") from None


# -----------------------------------------------------------------------------
# one V-FT run: train a fixed number of epochs, test at the end (the release had no validation set)


def finetune_run(args, fold, run, splits, classes, run_dir):
    device = resolve_device(args.device)
    dtype = autocast_dtype(device, args.precision)
    seed = args.seed + run
    config = {**{k: v for k, v in vars(args).items() if k not in ("fold", "runs")}, "fold": fold, "run": run,
              "seed_of_run": seed, "classes": list(classes)}
    check_run_config(run_dir, config, build_parser())
    metrics_path = os.path.join(run_dir, "metrics.json")
    if os.path.exists(metrics_path):
        print(f"{run_dir}: finished already (metrics.json); skipping. Remove the folder to redo it.")
        with open(metrics_path) as f:
            return json.load(f)

    seed_everything(seed)
    train = stratified_fraction(splits["train"], args.train_fraction, seed)
    backbone = load_backbone(args)
    clf = EmotionClassifier(backbone, classes).to(device)
    # Frozen: conv encoder, its layer norm, the projection (run without grad), the mask embedding and
    # the pretraining heads; trained: the transformer and the classifier head.
    backbone.freeze_feature_encoder = True
    for p in backbone.parameters():
        p.requires_grad = False
    for p in list(backbone.encoder.parameters()) + list(clf.head.parameters()):
        p.requires_grad = True
    params = [p for p in clf.parameters() if p.requires_grad]
    dataset = AudioDataset(train, classes, max_seconds=args.max_seconds, crop="head", cache=args.cache)
    sampler = train_sampler(dataset.lengths, args, seed)
    weights = class_weights(dataset.labels, len(classes)).to(device)
    dim = backbone.cfg.embed_dim

    def loss_fn(batch, update):  # nothing here waits for the GPU: masks and lengths are made and read on the CPU
        wav, labels = to_device(batch["wav"], device), to_device(batch["labels"], device)
        frames = backbone.frame_lengths(batch["lengths"])
        # SpecAugment-like masks, drawn per utterance and update (the same after a resume, on any number of GPUs)
        rngs = [utterance_rng(seed, update, i) for i in batch["indices"].tolist()]
        time_mask = channel_mask = None
        if args.time_mask_prob > 0:
            time_mask = to_device(utterance_span_masks(frames, int(frames.max()), rngs, args.time_mask_prob,
                                                       args.time_mask_span, args.time_mask_min), device)
        if args.channel_mask_prob > 0:
            channel_mask = to_device(utterance_span_masks([dim] * len(rngs), dim, rngs, args.channel_mask_prob,
                                                          args.channel_mask_span, args.channel_mask_min), device)
        logits = clf(wav, batch["lengths"], time_mask, channel_mask)
        # class-weighted CE = sum of w_y * CE / sum of w_y, kept as the pair so that ranks add up
        loss_sum = F.cross_entropy(logits.float(), labels, weight=weights, reduction="sum")
        return [(loss_sum, weights[labels].sum())], float(batch["lengths"].sum()) / 16000

    run_updates(model=clf, params=params, loss_fn=loss_fn, dataset=dataset, sampler=sampler,
                total_updates=args.epochs * len(sampler), lr=args.lr, schedule=lambda update: 1.0,
                device=device, dtype=dtype, state_path=os.path.join(run_dir, "state.pt"), save_every=10 ** 9,
                log_path=os.path.join(run_dir, "log.jsonl"), desc=f"fold {fold} run {run}", workers=args.workers,
                progress=args.progress)

    test = splits["test"]
    probs = predict(clf, test, classes, device, dtype, workers=args.workers, progress=args.progress)
    y_true = [classes.index(u.label) for u in test]
    metrics = compute_metrics(y_true, probs.argmax(-1).tolist(), classes)
    if is_main():
        save_classifier(clf, os.path.join(run_dir, "model.pt"),
                        meta={"fold": fold, "run": run, "source": args.init or args.checkpoint})
        write_predictions(os.path.join(run_dir, "predictions.csv"), test, probs, classes)
        write_json(metrics_path, metrics)  # written last: its presence means the run is complete
        remove_training_state(os.path.join(run_dir, "state.pt"))
        print(f"fold {fold} run {run}: UA {metrics['ua']:.4f}  WA {metrics['wa']:.4f}  macro-F1 {metrics['macro_f1']:.4f}"
              f"  ({len(test)} test utterances)")
    barrier()
    return metrics


# -----------------------------------------------------------------------------
# command line


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data", help="IEMOCAP_full_release folder, a label .json (the release's format) or a .csv manifest")
    a("--wav-dir", help="folder of the wavs named in a label .json (default: the json's folder)")
    a("--fold", default="1", help="test session 1-5, or 'all' (IEMOCAP; ignored for .json/.csv) (default: %(default)s)")
    a("--checkpoint", help="fairseq wav2vec 2.0 checkpoint, e.g. wav2vec_small.pt")
    a("--init", help="start from a pretrain.py output instead of --checkpoint; '{fold}' is replaced by the fold")
    a("--runs", type=int, default=1, help="runs per fold with seeds seed, seed+1, ... (the paper: 5) (default: %(default)s)")
    a("--seed", type=int, default=0, help="(default: %(default)s)")
    a("--train-fraction", type=float, default=1.0,
      help="fine-tune on this stratified fraction of the training utterances (low-resource) (default: %(default)s)")
    a("--epochs", type=int, default=15, help="RECIPE.md V-FT (default: %(default)s)")
    a("--batch-size", type=int, default=64, help="utterances per update, last partial batch dropped (default: %(default)s)")
    a("--max-batch-seconds", type=float, default=None,
      help="also cap each batch at this much padded audio; smaller batches then count as full (default: %(default)s)")
    a("--lr", type=float, default=1e-4, help="Adam, constant, no weight decay (default: %(default)s)")
    a("--max-seconds", type=float, default=10.0, help="training audio truncated to its first N seconds (default: %(default)s)")
    a("--time-mask-prob", type=float, default=0.08, help="(default: %(default)s)")
    a("--time-mask-span", type=int, default=15, help="frames (default: %(default)s)")
    a("--time-mask-min", type=int, default=2, help="at least this many spans (default: %(default)s)")
    a("--channel-mask-prob", type=float, default=0.05, help="(default: %(default)s)")
    a("--channel-mask-span", type=int, default=64, help="channels (default: %(default)s)")
    a("--channel-mask-min", type=int, default=1, help="(default: %(default)s)")
    a("--bucket", action=argparse.BooleanOptionalAction, default=True,
      help="batches of similar lengths (less padding); --no-bucket: the release's random batches (default: %(default)s)")
    a("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
      help="auto: bf16 on GPUs that have it, else fp16 with a grad scaler; fp32 on CPU (default: %(default)s)")
    a("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default: %(default)s)")
    a("--workers", type=int, default=2, help="data loader processes (default: %(default)s)")
    a("--cache", action="store_true",
      help="keep decoded audio in memory after the first epoch; loads in the main process (implies --workers 0), "
           "since worker processes would each rebuild their own copy every epoch")
    a("--out", default="runs", help="(default: %(default)s)")
    a("--name", default=None, help="run name: runs/<name>/fold<k>/run<r> (default: vft; ft-<method> with "
                                   "--init runs/<method>/fold<k>/pretrained.pt)")
    a("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars (default: %(default)s)")
    a("--quickstart", action="store_true",
      help="generate the synthetic corpus (data/synth) and fine-tune a tiny random wav2vec 2.0 on fold 1: "
           "no data or checkpoint needed")
    return p


# The quick start's tiny model: 96 channels instead of 768, so the channel-mask span shrinks in
# proportion (64 / 768 * 96 = 8); small batches give the 320-utterance training set enough updates
# (a random transformer needs ~150 before it starts to separate the classes); 4 s truncation halves
# the CPU time of the synthetic 1-8 s utterances.
QUICKSTART = dict(data="data/synth", checkpoint="random-tiny", fold="1", epochs=15, batch_size=8, lr=5e-4,
                  max_seconds=4.0, channel_mask_span=8, name="quickstart", workers=0, cache=True)


def default_run_name(init):
    """vft, or ft-<method> for --init runs/<method>/fold{fold}/pretrained.pt (ft-<file stem> otherwise)."""
    if not init:
        return "vft"
    folder, stem = os.path.split(os.path.dirname(init))[1], os.path.splitext(os.path.basename(init))[0]
    if folder == "fold{fold}" or re.fullmatch(r"fold\d+", folder):
        return "ft-" + os.path.basename(os.path.dirname(os.path.dirname(init)))
    return "ft-" + stem


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    init_distributed(args.device)
    if args.quickstart:
        for k, v in QUICKSTART.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
        if not os.path.isdir(args.data) and is_main():
            print(f"writing the synthetic corpus to {args.data}")
            synthesize_iemocap(args.data)
        elif is_main():  # a corpus written before the default grew (or with --per-session) gives other figures
            per_session = (synthetic_settings(args.data) or {}).get("utterances_per_session", SYNTH_PER_SESSION)
            if per_session != SYNTH_PER_SESSION:
                print(f"note: {args.data} holds {per_session} utterances per session, the quick start's figures are "
                      f"for {SYNTH_PER_SESSION}: delete the folder to have it written anew")
        barrier()
    if args.name is None:
        args.name = default_run_name(args.init)
    if args.cache:
        args.workers = 0
    try:
        if not args.data:
            raise DataError("--data is required (IEMOCAP_full_release folder, label .json or .csv manifest)")
        if args.fold == "all":
            folds = [1, 2, 3, 4, 5]
        else:
            try:
                folds = [int(args.fold)]
            except ValueError:
                raise DataError(f"--fold must be 1-5 or 'all', got {args.fold!r}") from None
        template = args.init
        results = []
        for fold in folds:
            splits, classes = load_corpus(args.data, fold, args.wav_dir)
            if fold == folds[0] and is_main():
                print(format_count_table(count_table([u for split in splits.values() for u in split])))
            args.init = template.replace("{fold}", str(fold)) if template else None
            for run in range(args.runs):
                run_dir = os.path.join(args.out, args.name, f"fold{fold}", f"run{run}")
                results.append(finetune_run(args, fold, run, splits, classes, run_dir))
        if len(results) > 1 and is_main():
            print(f"mean over {len(results)} runs: UA {np.mean([r['ua'] for r in results]):.4f}  "
                  f"WA {np.mean([r['wa'] for r in results]):.4f}; table: python evaluate.py {os.path.join(args.out, args.name)}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
