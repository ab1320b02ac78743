"""What every stage shares: the training loop, its schedule, batches and per-utterance random
generators, the backbone a stage starts from, the recipe table, resumable state, run folders and
their locks, torchrun, and every script's one-line errors and flag types. `train` is the loop of
V-FT (finetune.py) and of TAPT, the P-TAPT teacher and P-TAPT (pretrain.py): Adam on a loss each
stage passes in as a function of the batch.
"""

import argparse
import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from checkpoints import CheckpointError, load_wav2vec2, save_atomic, write_json, write_text_atomic
from data import SAMPLE_RATE, BucketBatchSampler, DataError, collate
from model import Wav2Vec2, Wav2Vec2Config

# -----------------------------------------------------------------------------
# the training loop every stage uses


def train(
    model,
    params,
    batch_loss,
    dataset,
    sampler,
    *,
    updates,
    lr,
    schedule,
    device,
    precision,
    run_dir,
    name,
    save_every,
    desc,
    workers,
    progress,
    on_update=None,
    on_epoch_end=None,
):
    """Adam (no weight decay) on `params` for `updates` updates at lr * schedule(update), under
    autocast. batch_loss(batch, update) returns [(sum, count)] terms over this process's share of
    the batch; the update minimises sum_t (sum_t over processes) / (count_t over processes), so N
    processes take the updates one process takes on the whole batch (fairseq's sample-size
    normalisation). Saved to <run_dir>/<name>state.pt every `save_every` updates, after each epoch
    and on SIGTERM / Ctrl-C; the same call resumes. on_epoch_end(position) runs after each whole
    epoch, before the save (the release teacher's validation: what it adds is saved)."""
    dtype = autocast_dtype(device, precision)
    ckpt = Checkpoint(os.path.join(run_dir, name), model, params, lr, dtype, device, desc)
    opt, pos = ckpt.opt, ckpt.load()
    rng = torch.Generator()  # the loader's own: the global one drives dropout
    loader = DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers, generator=rng
    )
    hide = not progress or world()[0]
    bar = tqdm(total=updates, initial=pos["update"], desc=desc, unit="update", disable=hide)
    with StopRequested() as stop:
        while pos["update"] < updates:
            epoch_batches = start_epoch(model, dataset, sampler, pos)
            t0 = time.time()
            for batch in loader:
                for group in opt.param_groups:
                    group["lr"] = lr * schedule(pos["update"])
                if on_update is not None:
                    on_update(pos["update"])
                update_step(batch, pos, batch_loss, params, opt, ckpt.scaler, device, dtype)
                show_progress(bar, pos)
                if stop.agreed() or pos["update"] == updates:
                    break
                if save_every and pos["update"] % save_every == 0:
                    ckpt.save(pos)
            else:
                pos["epoch"], pos["batch_in_epoch"] = pos["epoch"] + 1, 0
            end_epoch(pos, epoch_batches, on_epoch_end, t0, ckpt)
            if stop.flag:
                stop.exit(desc, pos["update"])
    bar.close()
    return pos


def start_epoch(model, dataset, sampler, pos):
    """The epoch's batches and crops from the position on, the model in training mode; returns the
    batch_in_epoch at which the epoch is whole."""
    sampler.set_epoch(pos["epoch"], pos["batch_in_epoch"])
    epoch_batches = pos["batch_in_epoch"] + len(sampler)
    dataset.set_epoch(pos["epoch"])
    model.train()
    return epoch_batches


def update_step(batch, pos, batch_loss, params, opt, scaler, device, dtype):
    """One update at the lr already set: the loss (global_loss), the gradients summed over
    processes, the (scaled) Adam step. The position moves on one update and adds the batch's [loss,
    1, audio seconds] to its running sums."""
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        terms = batch_loss(batch, pos["update"])
    loss, logged = global_loss(terms, float(batch["lengths"].sum()) / SAMPLE_RATE, device)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    all_reduce_gradients(params)
    scaler.step(opt)
    scaler.update()
    pos["update"], pos["batch_in_epoch"] = pos["update"] + 1, pos["batch_in_epoch"] + 1
    pos["running"] = pos["running"] + logged


def show_progress(bar, pos):
    bar.update(1)
    if pos["update"] % 10 == 0:  # reading the loss waits for the GPU: only now and then
        bar.set_postfix(loss=f"{pos['running'][0] / pos['running'][1]:.3f}")


def end_epoch(pos, epoch_batches, on_epoch_end, t0, ckpt):
    """After an epoch, or the part of one a run ended or was stopped in: on_epoch_end (whole epochs
    only); rank 0's line in <run_dir>/<name>log.jsonl, the mean loss and the lr, the same bytes on
    every run of the same command on the CPU, and in <name>timing.jsonl the wall-clock figures,
    which no two runs share; the resume point."""
    whole = pos["batch_in_epoch"] in (0, epoch_batches)
    if on_epoch_end is not None and whole:
        on_epoch_end(pos)
    seconds = time.time() - t0
    loss, steps, audio = pos["running"].tolist()
    if world()[0] == 0 and steps:
        epoch, lr = pos["epoch"] + (pos["batch_in_epoch"] > 0), ckpt.opt.param_groups[0]["lr"]
        record = {"update": pos["update"], "epoch": epoch, "loss": loss / steps, "lr": lr}
        if not whole:  # a run's last updates, or a stop: not an epoch's mean
            record["partial"] = f"{int(steps)} updates"
        timing = {"update": pos["update"], "seconds": round(seconds, 2)}
        timing["audio_seconds_per_second"] = round(audio / seconds, 1)
        for log, line in (("log.jsonl", record), ("timing.jsonl", timing)):
            with open(f"{ckpt.prefix}{log}", "a") as f:
                f.write(json.dumps(line) + "\n")
    if pos["batch_in_epoch"] == 0:
        pos["running"] = torch.zeros_like(pos["running"])
    ckpt.save(pos)


def global_loss(terms, audio_seconds, device):
    """The update's loss sum_t S_t / C_t, with the counts C_t summed over processes (each process's
    gradient of S_t / C_t is then summed by all_reduce_gradients). Also returns [loss, 1, audio
    seconds] of the whole batch for the log."""
    values = torch.stack(
        [s.detach().float() for s, _ in terms]
        + [torch.as_tensor(c).float().to(device) for _, c in terms]
        + [torch.tensor(audio_seconds, device=device)]
    )
    if world()[1] > 1:
        dist.all_reduce(values)
    sums, counts = values[: len(terms)], values[len(terms) : -1].clamp(min=1e-12)
    loss = sum(s / c for (s, _), c in zip(terms, counts))
    logged = torch.stack([(sums / counts).sum(), torch.ones_like(values[-1]), values[-1]])
    return loss, logged.detach()


def tri_stage_lr(step, total, warmup, flat, from_zero=False):
    """The release's schedule, a factor on the base lr: linear warm-up over `warmup` updates, flat
    for `flat` updates, then linear decay to 0 at `total`. from_zero: the warm-up's first update at
    lr 0, step / warmup, as the release's LambdaLR (pretrain/trainer.py:197-204); otherwise
    (step + 1) / warmup, so that no update is wasted."""
    if step < warmup:
        return (step + (not from_zero)) / warmup
    if step < warmup + flat:
        return 1.0
    return max(0.0, (total - step) / max(1, total - warmup - flat))


def train_batches(lengths, batch_size, max_batch_seconds, bucket, seed, batch_seconds=None):
    """The epoch's batches of batch_size utterances in all (the recipe's global batch; or the
    release's dynamic batches of batch_seconds of audio), this process taking utterances rank,
    rank + N, ... of each."""
    rank, world_size = world()
    shard = dict(seed=seed, num_replicas=world_size, rank=rank, batch_seconds=batch_seconds)
    sampler = BucketBatchSampler(lengths, batch_size, max_batch_seconds, bucket, **shard)
    if len(sampler) == 0:  # the last partial batch is dropped: nothing would be trained
        size = f"{batch_seconds:g} s of audio" if batch_seconds else f"{batch_size} utterances"
        message = f"the {len(lengths)} training utterances make no full batch of {size}"
        raise DataError(f"{message}: lower --batch-size")
    return sampler


def utterance_rng(seed, update, index):
    """One generator per utterance per update for its masks, negatives and crops (index -1: the
    batch's own): they then depend neither on the number of processes nor on a resume."""
    key = ((seed * 1_000_003 + update) * 1_000_003 + int(index)) % 2**63
    return torch.Generator().manual_seed(key)


def batch_rngs(seed, update, indices):
    """utterance_rng of each utterance of a batch (its dataset indices, a tensor), in order."""
    return [utterance_rng(seed, update, i) for i in indices.tolist()]


def pad_to_whole_batch(wav):
    """The release recipe: every process pads its share of the batch to the whole batch's longest
    utterance, as the release's one process did (its group norm and masks see that padding)."""
    longest = torch.tensor([wav.shape[1]])
    if world()[1] > 1:
        dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=HOST_GROUP[0])
    return F.pad(wav, (0, int(longest) - wav.shape[1]))


def autocast_dtype(device, precision):
    """None = float32. On the CPU, 'auto' and 'auto-fp16' are float32; on a GPU 'auto' is bf16 where
    the GPU has it natively, else fp16; 'auto-fp16' is fp16 (with a grad scaler, as the release)."""
    if precision in ("auto", "auto-fp16"):
        if device.type != "cuda":
            return None
        if precision == "auto-fp16":
            return torch.float16
        # native bf16 from Ampere (8.0) on; is_bf16_supported() also says yes where it is emulated
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def seed_everything(seed):
    np.random.seed(seed)
    torch.manual_seed(seed)


def class_weights(labels, num_classes):
    """w_c proportional to N / n_c over the training split, normalised to sum 1 (RECIPE.md
    "V-FT")."""
    counts = torch.bincount(torch.as_tensor(labels), minlength=num_classes).double()
    if (counts == 0).any():
        raise DataError(f"a class has no training utterance (counts {counts.long().tolist()})")
    w = counts.sum() / counts
    return (w / w.sum()).float()


def folds_of(data, fold):
    """The folds to run. IEMOCAP: test session `fold` (None or "all": the five). A .json or .csv
    corpus holds one train/test split of its own, so it runs once, as fold 1; another fold is
    refused rather than run on the same split again."""
    if os.path.isdir(data):
        return [1, 2, 3, 4, 5] if fold in (None, "all") else [int(fold)]
    if str(fold) not in ("None", "all", "1"):
        raise DataError(
            f"--fold {fold}: {data} is a list corpus with one train/test split of its own, run "
            "once as fold 1 (folds are IEMOCAP's sessions); leave out --fold"
        )
    return [1]


def tiny_random_config():
    """A small wav2vec 2.0 for the quick start and tests: same architecture, fewer channels."""
    convs = [(64, 10, 5)] + [(64, 3, 2)] * 4 + [(64, 2, 2)] * 2
    widths = dict(embed_dim=96, ffn_dim=192, final_dim=64, latent_vars=32, pos_conv_kernel=16)
    layers = dict(num_layers=2, num_heads=4, pos_conv_groups=4)
    dropouts = dict(dropout=0.1, attention_dropout=0.1, layerdrop=0.0)
    return Wav2Vec2Config(conv_layers=convs, **widths, **layers, **dropouts)


def load_backbone(source, seed):
    """A pretrain.py output or a fairseq checkpoint, or 'random-tiny' (quick start, tests)."""
    if source == "random-tiny":
        torch.manual_seed(seed)
        return Wav2Vec2(tiny_random_config())
    if source is None:
        raise DataError(
            "give --checkpoint (a fairseq wav2vec 2.0 .pt, e.g. wav2vec_small.pt, or a Hugging "
            "Face wav2vec 2.0 folder) or --init"
        )
    try:
        return load_wav2vec2(source)
    except CheckpointError as e:
        raise DataError(f"{e} (expected a wav2vec 2.0 checkpoint)") from None


# -----------------------------------------------------------------------------
# engineering: resumable state, interruption, torchrun, run folders


class Checkpoint:
    """A stage's resumable state <prefix>state.pt: the model, Adam, the grad scaler (on for fp16
    only), every process's random state (only torch's generators draw in training) and the position
    {update, epoch, batch_in_epoch, running: the epoch's sums of loss, updates, audio seconds}. Rank
    0 reads and writes it (only its disk needs the run folder) and sends it to the others."""

    def __init__(self, prefix, model, params, lr, dtype, device, desc):
        self.prefix, self.path, self.device, self.desc = prefix, f"{prefix}state.pt", device, desc
        self.model = model
        self.opt = torch.optim.Adam(params, lr=lr, weight_decay=0.0)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        if world()[0] == 0:  # room for two resume points (with Adam's 2 moments), final weights
            weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            moments = 2 * sum(p.numel() * p.element_size() for p in params)
            check_output_dir(os.path.dirname(os.path.abspath(self.path)), 3 * weights + 2 * moments)

    def load(self):
        """The position to start from (a new run's: all 0); the logs are cut back to it."""
        rank, world_size = world()
        shared = [load_training_state(self.path) if rank == 0 else None]
        if world_size > 1:
            dist.broadcast_object_list(shared, src=0)
            if rank > 0:  # dropout differs between processes, as their data do
                torch.manual_seed(torch.initial_seed() + rank)
        state = shared[0]
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            if state["scaler"]:  # empty when saved without fp16 (auto may be fp16 on another GPU)
                self.scaler.load_state_dict(state["scaler"])
            if len(state["rng"]) == world_size:
                self.set_rng_state(state["rng"][rank])
            elif rank == 0:
                print(
                    f"warning: {self.path} was written by {len(state['rng'])} processes, this run "
                    f"has {world_size}: random streams (dropout) restart",
                    file=sys.stderr,
                )
            if rank == 0:
                print(f"{self.desc}: resuming at update {state['position']['update']}")
        if world_size > 1:
            for t in self.model.state_dict().values():  # every process starts from rank 0's weights
                dist.broadcast(t, 0)
        new = {"update": 0, "epoch": 0, "batch_in_epoch": 0, "running": torch.zeros(3)}
        position = state["position"] if state else new
        for log in ("log.jsonl", "timing.jsonl"):
            trim_log(f"{self.prefix}{log}", position["update"])
        return {**position, "running": position["running"].to(self.device)}

    def save(self, position):
        rngs = [self.rng_state()]
        if world()[1] > 1:
            rngs = [None] * world()[1]
            dist.all_gather_object(rngs, self.rng_state())
        if world()[0] == 0:
            state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}
            state.update(scaler=self.scaler.state_dict(), rng=rngs, position=dict(position))
            save_training_state(state, self.path)

    def rng_state(self):  # numpy's generator only seeds crops, per utterance and epoch
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def set_rng_state(self, state):
        torch.set_rng_state(state["torch"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)


def save_training_state(state, path):
    """Atomic, and the previous resume point stays as <path>.prev until the new one is complete."""
    try:
        save_atomic(state, f"{path}.new")
        if os.path.exists(path):
            os.replace(path, f"{path}.prev")
        os.replace(f"{path}.new", path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        raise DataError(
            f"could not write the resume point {path}: {str(e).splitlines()[0]}; the previous one "
            f"({path} or {path}.prev) is intact: free some space and run the same command again"
        ) from None


def load_training_state(path):
    """The newest readable resume point, read without running code from the file (weights_only): a
    damaged file (a crash, a full disk) is reported and the one before it used."""
    for candidate in (f"{path}.new", path, f"{path}.prev"):
        if os.path.exists(candidate):
            try:
                return torch.load(candidate, map_location="cpu", weights_only=True)
            except Exception as e:
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                warning = f"{candidate} is unreadable or not a resume point ({reason})"
                print(f"warning: {warning}; trying the previous one", file=sys.stderr)
    return None


def trim_log(path, update):
    """Drop log lines past the resume point (and lines cut short by a kill): an epoch whose save
    failed (a full disk, a kill) is run and logged again."""
    if world()[0] != 0 or not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = [line for line in lines if logged_update(line) <= update]
    if len(keep) < len(lines):
        write_text_atomic(path, lambda f: f.writelines(keep))


def logged_update(line):
    try:
        return json.loads(line)["update"]
    except (ValueError, KeyError, TypeError):  # a line cut short by a kill
        return float("inf")


def remove_training_state(path):
    """The resume point, its neighbours and any temporary file a killed save left (save_atomic's
    .tmp<pid>)."""
    temporaries = glob.glob(f"{glob.escape(path)}*.tmp*")
    for candidate in [path, f"{path}.new", f"{path}.prev"] + temporaries:
        if os.path.exists(candidate):
            os.remove(candidate)


class StopRequested:
    """SIGTERM / Ctrl-C: finish the current update, save, exit with status 130; a second Ctrl-C
    stops at once. Under torchrun the processes agree on stopping at the same update."""

    def __enter__(self):
        self.flag = False
        signals = (signal.SIGINT, signal.SIGTERM)
        self.previous = {sig: signal.signal(sig, self.handle) for sig in signals}
        return self

    def handle(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        message = "saving at the end of this update, then stopping"
        print(f"\nsignal {signum}: {message}", file=sys.stderr)
        self.flag = True

    def agreed(self):
        if world()[1] > 1:  # over the host group: no GPU round trip
            flag = torch.tensor([float(self.flag)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=HOST_GROUP[0])
            self.flag = bool(flag.item())
        return self.flag

    def exit(self, desc, update):
        if world()[0] == 0:
            message = f"{desc}: stopped at update {update}; run the same command again to resume"
            print(message, file=sys.stderr)
        sys.exit(130)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def resolve_device(name="auto"):
    """'auto': the GPU when there is one. Under torchrun each process takes GPU LOCAL_RANK. A device
    that is not there is a ValueError naming it."""
    try:
        device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
        )
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA GPU is available here (use cpu or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def world():
    """(rank, world size) under torch.distributed (torchrun); (0, 1) in a single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# a gloo group of every process (made by init_distributed), for values kept on the host
HOST_GROUP = [None]


def init_distributed(device_name):
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on GPUs, gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or dist.is_initialized():
        return
    wants_gpu = device_name == "cuda" or device_name == "auto" and torch.cuda.is_available()
    if wants_gpu and "LOCAL_RANK" not in os.environ:  # every process would take GPU 0
        raise DataError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but no LOCAL_RANK to choose this process's "
            "GPU: start the processes with torchrun (it sets both), or give each its own "
            "--device cuda:N"
        )
    device = resolve_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    HOST_GROUP[0] = dist.new_group(backend="gloo")


def all_reduce_gradients(params):
    """Sum every process's gradients in one collective (a parameter without a gradient counts as
    zero, so every process sends the same layout)."""
    if world()[1] == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p)


def barrier():
    if world()[1] > 1:
        dist.barrier()


# where and how a run goes, not what it computes: never blocks a resume
UNCOMPUTED_SETTINGS = set("workers device progress name out cache save_every quickstart".split())
# compared as files (data/synth/ is data/synth)
PATH_SETTINGS = {"data", "wav_dir", "checkpoint", "init", "teacher"}


def run_files(run_dir):
    """The folder's computed files (results, resume points, logs): all but config.json, the lock,
    temporaries, hidden and retired (*.orphaned) files and timing files (wall-clock records)."""

    def computed(n):
        skipped = ".tmp" in n or n.startswith(".") or n.endswith((".orphaned", "timing.jsonl"))
        return n not in ("config.json", "lock") and not skipped

    return sorted(filter(computed, os.listdir(run_dir) if os.path.isdir(run_dir) else []))


def same_setting(key, old, new):
    """Settings compare equal; paths (PATH_SETTINGS) compare as the same file."""
    if old == new:
        return True
    if key not in PATH_SETTINGS or not (isinstance(old, str) and isinstance(new, str)):
        return False
    return os.path.exists(old) and os.path.exists(new) and os.path.samefile(old, new)


def check_run_config(run_dir, config, computed_with=None):
    """Refuse to resume or skip into a folder whose files were computed with other settings; returns
    True when the folder holds this run already. A setting may change while nothing was computed
    with it yet (a failed start leaves only config.json): computed_with(changed settings) lists
    those files (default: every computed file), and config.json is then rewritten. Resume points
    with no config.json (removed, as an unreadable one's error says) were computed with unknown
    settings: they are renamed *.orphaned (kept, never resumed) and the run starts again; finished
    outputs stay (a teacher.pt copied in to be reused)."""
    path = os.path.join(run_dir, "config.json")
    barrier()  # every process looks before rank 0 writes
    old = None
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(
                f"{path}: unreadable ({e}): the settings of what {run_dir} holds are unknown; "
                "remove the whole folder to start this run again"
            ) from None
    elif any("state.pt" in name for name in run_files(run_dir)):
        retire_orphans(run_dir)
    diff = {
        k: (old.get(k), v)
        for k, v in config.items()
        if old is not None and k not in UNCOMPUTED_SETTINGS and not same_setting(k, old.get(k), v)
    }
    done = (computed_with or (lambda changed: run_files(run_dir)))(set(diff)) if diff else []
    if done:
        raise DataError(
            f"{run_dir} holds {done} computed with other settings {diff} (old, new); "
            "use another --name, or remove those files to recompute them"
        )
    if world()[0] == 0 and (old is None or diff):
        write_json(path, config)
    barrier()
    return old is not None


def retire_orphans(run_dir):
    names = [name for name in run_files(run_dir) if "state.pt" in name]
    if world()[0] == 0:
        for name in names:
            os.replace(os.path.join(run_dir, name), os.path.join(run_dir, name + ".orphaned"))
        print(
            f"warning: {run_dir} holds {names} but no config.json: they were computed with "
            "settings no file records, so they are kept as *.orphaned and this run starts again",
            file=sys.stderr,
        )
    barrier()


@contextlib.contextmanager
def run_lock(run_dir):
    """One run per folder at a time: <run_dir>/lock holds the holder's pid and host. A lock left by
    a process of this host that has ended (SIGKILL, power loss) is taken over, with a message."""
    path, me, error = os.path.join(run_dir, "lock"), f"{os.getpid()} {socket.gethostname()}", [None]
    if world()[0] == 0:
        check_output_dir(run_dir)
        error[0] = take_lock(path, me)
    if world()[1] > 1:  # every process stops when rank 0 could not take the folder
        dist.broadcast_object_list(error, src=0, group=HOST_GROUP[0])
    if error[0]:
        raise DataError(error[0])
    try:
        yield
    finally:
        if world()[0] == 0 and read_text(path) == me:
            os.remove(path)


def take_lock(path, me):
    """None when taken, else the reason."""
    if os.path.exists(path):
        pid, _, host = read_text(path).partition(" ")
        if host != socket.gethostname() or not pid.isdigit() or process_alive(int(pid)):
            return (
                f"{os.path.dirname(path)} is in use by process {pid} on {host or '?'} ({path}); "
                "wait for it to finish, or remove the lock file if that process has ended"
            )
        message = f"process {pid} has ended; taking over its run folder"
        print(f"warning: {path}: {message}", file=sys.stderr)
        os.remove(path)
    try:
        with os.fdopen(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY), "w") as f:
            f.write(me)
    except FileExistsError:  # another process took it meanwhile
        return f"{path}: could not take the lock"


def read_text(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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
        raise DataError(
            f"{path}: {free / 2**30:.2f} GiB free, but this run's checkpoints need about "
            f"{need_bytes / 2**30:.2f} GiB; free some space or choose another --out"
        )


# -----------------------------------------------------------------------------
# every script's command line: shared flags, one-line errors

# The two recipes (RECIPE.md), as {setting: (release, clean)}. Each setting is a flag of the
# scripts that use it, whose default is the recipe's; a flag given on the command line wins.
#   release: what the authors' code computed (RECIPE.md "What the release actually computed")
#   clean:   the method as written, each utterance on its own (RECIPE.md "The clean recipe")
# The comments say what the release does.
RECIPE_SETTINGS = {
    "bucket": (False, True),  # V-FT and the P-TAPT teacher: random batches
    "mask_semantics": ("release", "utterance"),  # transformers 4.10's span counts, one per batch
    "group_norm": ("padded", "valid"),  # the conv encoder's, over the padded batch, in training
    "skip_last_frame": (True, False),  # V-FT: the head's mean leaves out the last frame
    "objective": ("release", "fairseq"),  # TAPT: transformers 4.10's loss as returned
    "batch_seconds": (250.0, 0.0),  # TAPT, P-TAPT: dynamic batches of 250 s at batch size 64
    "crops": ("release", "aligned"),  # P-TAPT: at any sample, labels from the conv formula
    "warmup_from_zero": (True, False),  # TAPT, P-TAPT: the first update at lr 0
    "precision": ("auto-fp16", "auto"),  # fp16 with a gradient scaler on a GPU, fp32 on the CPU
}
RECIPES = {
    recipe: {setting: values[i] for setting, values in RECIPE_SETTINGS.items()}
    for i, recipe in enumerate(["release", "clean"])
}
DEFAULT = " (default: %(default)s)"  # the end of a flag's help


def recipe_default(setting):
    """The end of the help of a flag whose default is --recipe's (RECIPES)."""
    values = ", ".join(f"{RECIPES[recipe][setting]} for {recipe}" for recipe in RECIPES)
    return f" (default: the recipe's: {values})"


def add_run_flags(p):
    """The flags finetune.py and pretrain.py share."""
    a, default = p.add_argument, DEFAULT
    a("--data", help="IEMOCAP_full_release folder, a label .json (release format) or .csv manifest")
    a("--wav-dir", help="folder of the wavs named in a label .json (default: the json's folder)")
    a("--seed", type=NATURAL, default=0, help="the seed of every random draw" + default)
    a(
        "--recipe",
        choices=["release", "clean"],
        default="release",
        help="release: what the authors' code computed; clean: the method as written, per "
        "utterance (README, 'The two recipes')" + default,
    )
    a(
        "--precision",
        choices=["auto", "auto-fp16", "fp32", "bf16", "fp16"],
        help="on a GPU, auto: bf16 where the GPU has it, else fp16 with a grad scaler; auto-fp16: "
        "fp16 with a grad scaler, as the release trained; both fp32 on the CPU"
        + recipe_default("precision"),
    )
    a("--device", default="auto", help="auto, cpu, cuda, cuda:1 ..." + default)
    a("--workers", type=NATURAL, default=2, help="data loader processes" + default)
    a(
        "--cache",
        action="store_true",
        help="keep decoded audio in memory after the first epoch; loads in the main process "
        "(implies --workers 0), since worker processes would each rebuild their own copy every "
        "epoch",
    )
    a("--out", default="runs", help="where runs go: <out>/<name>/fold<k>/..." + default)
    progress = argparse.BooleanOptionalAction
    a("--progress", action=progress, default=True, help="progress bars" + default)


def finish_args(p, args, defaults):
    """Both scripts: the settings left unset (None) that the script has from `defaults` (RECIPES
    and the mode's), --data required, --cache implies --workers 0."""
    for k, v in defaults.items():
        if hasattr(args, k) and getattr(args, k) is None:
            setattr(args, k, v)
    if not args.data:
        p.error("--data is required (IEMOCAP_full_release folder, label .json or .csv manifest)")
    for flag in ("checkpoint", "init", "teacher"):  # before any run folder is touched
        path = getattr(args, flag, None)
        if path and path != "random-tiny" and "{fold}" not in path and not os.path.exists(path):
            p.error(f"argument --{flag}: {path}: no such file or folder")
    args.workers = 0 if args.cache else args.workers


@contextlib.contextmanager
def user_errors():
    """Every script's errors, as its user sees them: bad input is one line and exit status 2 (a
    DataLoader worker's too: torch re-raises it with the worker's traceback in the message, whose
    last line is the error itself), and so is a file that cannot be written; Ctrl-C one line and
    130; a reader that closed the pipe (| head) ends the output quietly."""
    try:
        yield
    # before OSError, its base: stdout to devnull, so Python's own flush at exit is quiet
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    # OSError: a file that cannot be written (a full disk)
    except (DataError, ValueError, OSError) as e:
        text = str(e)
        if "\nOriginal Traceback" in text:
            text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
        print(f"error: {text}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        message = "interrupted: what was written is complete; run the same command again to go on"
        print(f"\n{message}", file=sys.stderr)
        sys.exit(130)


class OneLineParser(argparse.ArgumentParser):
    """Every script's parser: a bad flag or value is one line (the flag, the value, what is allowed)
    and exit status 2, as every other error of these scripts."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)  # --epoch is not --epochs

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def flag_type(kind, check, expected):
    """An argparse type: a bad value is one line naming the flag, the value and what is allowed."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            number = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {number}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}")
        return value

    return parse


COUNT = flag_type(int, lambda v: v >= 1, "an integer >= 1")
NATURAL = flag_type(int, lambda v: v >= 0, "an integer >= 0")
POSITIVE = flag_type(float, lambda v: 0 < v < float("inf"), "a finite number > 0")
PROBABILITY = flag_type(float, lambda v: 0 <= v <= 1, "a probability in [0, 1]")
AUDIO_SECONDS = flag_type(  # model.MIN_SAMPLES: shorter audio gives no frame
    float, lambda v: 0.025 <= v < float("inf"), "seconds >= 0.025 (400 samples: one frame)"
)
FRACTION = flag_type(float, lambda v: 0 < v <= 1, "a fraction in (0, 1]")
SECONDS = flag_type(float, lambda v: 0 <= v < float("inf"), "a finite number of seconds >= 0")
WEIGHT = flag_type(float, lambda v: 0 <= v < float("inf"), "a finite number >= 0")
