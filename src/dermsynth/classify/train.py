"""Train one classifier on a split: the whole loop, readable top to bottom.

    data (split + synthetic, checked) -> uint8 cache -> tensors (GPU-resident when they fit)
    -> timm model -> AdamW + warm-up/cosine -> epochs of [batched GPU augmentation, step, val macro-F1]
    -> early stopping -> best epoch -> predictions.csv + metrics.json

Resumable to the same result: every random draw of a step is seeded by (seed, epoch, step, rank) and the epoch order
by (seed, epoch), so a checkpoint only needs model, optimizer, scheduler, counters and history; a resumed run then
replays exactly the batches and augmentations an uninterrupted one would (bit-exact on CPU).
Multi-process (DDP) through accelerate: ``accelerate launch --multi_gpu --num_processes N -m dermsynth.cli train-clf
...`` with the same config (on a machine without GPUs the same command runs N CPU processes over gloo; accelerate's
``--cpu`` flag alone starts one process unless MPI is set up). train.batch_size is per process: each step takes
N x batch_size rows of the epoch order, one slice per rank, and DDP averages the gradients; val/test probabilities
are gathered back in order, and rank 0 alone writes the run folder.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from dermsynth.classify.augment import augment_batch, normalize
from dermsynth.device import to_device
from dermsynth.classify.config import ClfConfig, check_train
from dermsynth.classify.decision import decide, fit_decision
from dermsynth.classify.data import ClfData, labels_of, load_clf_data, load_images, open_caches
from dermsynth.classify.losses import build_loss
from dermsynth.classify.models import Normalize, build_model
from dermsynth.classify.predict import BEST_META, BEST_WEIGHTS, autocast, predict_probs
from dermsynth.classify.sampling import epoch_order, epoch_rows, shard_batches
from dermsynth.config import ConfigError, config_diff, config_hash, read_saved, read_yaml, save_config
from dermsynth.data.labels import CLASSES
from dermsynth.io import atomic_open, atomic_write_bytes, atomic_write_csv, atomic_write_json
from dermsynth.metrics.classification import classification_metrics
from dermsynth.paths import RunPaths
from dermsynth.runlog import get_logger, run_log

StepHook = Callable[[int, int, int], None]  # (epoch, step in epoch, global step), called after every step
HEADLINE = ("macro_f1", "minority_f1", "balanced_accuracy", "accuracy")
SUMMARY_COLUMNS = ["epoch", "train_loss", "val_macro_f1", "val_balanced_accuracy", "val_minority_f1", "val_accuracy",
                   "lr", "img_s", "elapsed_s"]


@dataclass
class Progress:
    """Everything besides tensors that a checkpoint must restore."""

    epoch: int = 0  # epochs finished
    step: int = 0  # steps finished within the current epoch
    global_step: int = 0
    best_f1: float = -math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped: bool = False
    history: list[dict] = field(default_factory=list)
    loss_sum: float = 0.0  # current epoch so far
    n_batches: int = 0
    train_s: float = 0.0  # current epoch's training time so far
    wall_s: float = 0.0  # all earlier sessions of this run


# ----------------------------------------------------------------------------------------------------------------------
# Devices and processes
# ----------------------------------------------------------------------------------------------------------------------

def _processes(choice: str) -> tuple[Any, torch.device]:
    """accelerate's process state (rank, world size; initialises DDP when launched by accelerate) and our device."""
    from accelerate import PartialState

    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use auto or cpu")
    use_cuda = torch.cuda.is_available() and choice != "cpu"
    state = PartialState(cpu=not use_cuda)
    if state.num_processes > 1:
        return state, state.device
    return state, torch.device("cuda" if use_cuda else "cpu")


def _step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    return ((seed * 1_000_003 + epoch) * 100_003 + step) * 1_009 + rank


def _summed(state: Any, t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over all processes (``t`` itself in one process)."""
    if state.num_processes == 1:
        return t
    from accelerate.utils import reduce

    return reduce(t, reduction="sum")


def _gather(state: Any, t: torch.Tensor) -> torch.Tensor:
    if state.num_processes == 1:
        return t
    from accelerate.utils import gather

    return gather(t)


# ----------------------------------------------------------------------------------------------------------------------
# Run folder: config check, checkpoints, best weights
# ----------------------------------------------------------------------------------------------------------------------

def _check_run_folder(cfg: ClfConfig, paths: RunPaths, resume: bool) -> bool:
    """True when the run already finished (resume then just returns its metrics)."""
    if not paths.config.is_file():
        return False
    if not resume:
        raise ConfigError(f"{paths.root} already holds a classifier run; pass --resume to continue it, or choose "
                          f"another --out")
    # read through the dataclass: a field added in a later release takes its default, which keeps the old behaviour
    diff = config_diff(read_saved(ClfConfig, read_yaml(paths.config), paths.config), cfg)
    if diff:
        raise ConfigError(f"{paths.root}: cannot resume with a different config; changed: "
                          + ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in list(diff.items())[:6]))
    return paths.metrics.is_file()


def _latest_checkpoint(paths: RunPaths) -> Path | None:
    found = sorted(paths.checkpoints.glob("step_*/state.pt"))
    return found[-1] if found else None


def _save_checkpoint(paths: RunPaths, prog: Progress, net: nn.Module, opt: Any, sched: Any,
                     best_state: dict | None, keep: int, ema: Any = None) -> Path:
    path = paths.checkpoint(prog.global_step) / "state.pt"
    payload = {"progress": asdict(prog), "model": net.state_dict(), "optimizer": opt.state_dict(),
               "scheduler": sched.state_dict(), "best_model": best_state,
               "ema": None if ema is None else ema.module.state_dict()}
    with atomic_open(path, "wb") as f:
        torch.save(payload, f)
    for old in sorted(paths.checkpoints.glob("step_*"))[:-max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _write_best(paths: RunPaths, state: dict, meta: dict) -> None:
    from safetensors.torch import save

    atomic_write_bytes(paths.best / BEST_WEIGHTS, save({k: v.contiguous() for k, v in state.items()}))
    atomic_write_json(paths.best / BEST_META, meta)


def _cpu_copy(net: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation (sharded over processes, gathered back in order)
# ----------------------------------------------------------------------------------------------------------------------

def _evaluate(net: nn.Module, images: torch.Tensor, norm: Normalize, device: torch.device, cfg: ClfConfig,
              state: Any, tta: bool = False) -> np.ndarray:
    kw = dict(batch_size=cfg.eval.batch_size, amp=cfg.train.amp, channels_last=cfg.train.channels_last, tta=tta)
    world, rank, n = state.num_processes, state.process_index, len(images)
    if world == 1:
        return predict_probs(net, images, norm, device, **kw).cpu().numpy()
    idx = np.r_[np.arange(n), np.full((-n) % world, n - 1)]  # pad so every rank scores the same count
    mine = torch.from_numpy(idx[rank::world])
    probs = _gather(state, predict_probs(net, images[mine.to(images.device)], norm, device, **kw))
    return probs.view(world, len(mine), -1).transpose(0, 1).reshape(-1, probs.shape[-1])[:n].cpu().numpy()


def _score(df: pd.DataFrame, probs: np.ndarray, cfg: ClfConfig, n_boot: int,
           offsets: np.ndarray | None = None) -> dict:
    return classification_metrics(df["label"].tolist(), probs, groups=df["group_id"].tolist(),
                                   rare=cfg.eval.rare_classes, n_boot=n_boot, seed=cfg.train.seed, offsets=offsets)


def _predictions(df: pd.DataFrame, probs: np.ndarray, offsets: np.ndarray | None = None) -> pd.DataFrame:
    out = df[["image_id", "group_id", "label", "source"]].reset_index(drop=True).copy()
    for i, c in enumerate(CLASSES):
        out[f"prob_{c}"] = probs[:, i]
    out["pred"] = [CLASSES[i] for i in decide(probs, offsets)]
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The training run
# ----------------------------------------------------------------------------------------------------------------------

def train_classifier(cfg: ClfConfig, out: str | Path, resume: bool = False, *, on_step: StepHook | None = None) -> dict:
    """Train, select the best epoch by val macro-F1, score val/test/extra sets; return metrics.json's content.

    ``resume=True`` continues from the latest checkpoint in ``out`` (or returns the metrics of a finished run); the
    config must equal the saved one. ``on_step`` is called after every optimisation step (tests use it to interrupt).
    """
    paths = RunPaths(out)
    state, device = _processes(cfg.train.device)
    check_train(cfg.train)
    main = state.is_main_process
    finished = _check_run_folder(cfg, paths, resume)  # every rank reads it before rank 0 writes config.yaml
    state.wait_for_everyone()
    if finished:
        return json.loads(paths.metrics.read_text()) if main else {}
    with run_log(paths.root) if main else _quiet():
        return _train(cfg, paths, resume, state, device, on_step)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Ranks other than 0 log warnings only: one copy of every progress line is enough."""
    logger = get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _train(cfg: ClfConfig, paths: RunPaths, resume: bool, state: Any, device: torch.device,
           on_step: StepHook | None) -> dict:
    log = get_logger("classify")
    main, world, rank = state.is_main_process, state.num_processes, state.process_index
    t_start = time.monotonic()
    tc = cfg.train
    if main:
        save_config(cfg, paths.config)
        log.info("classifier run %s on %s (processes: %d)", paths.root, device, world)

    # --- data -------------------------------------------------------------------------------------------------------
    data: ClfData = load_clf_data(cfg)
    for c, n in data.synthetic.get("per_class", {}).items():
        log.info("synthetic %s: %d real, ratio %.3g -> requested %d, available %d, used %d",
                 c, n["real"], n["ratio"], n["requested"], n["available"], n["used"])
    counts = data.train_counts()
    log.info("train images per class (real/synthetic): %s",
             ", ".join(f"{c} {v['real']}/{v['synthetic']}" for c, v in counts.items()))
    if main:
        atomic_write_csv(paths.train_set, data.train[["image_id", "group_id", "label", "source", "path"]])
    size = cfg.data.image_size
    with state.main_process_first():  # one process builds the caches, the others then read them
        caches = open_caches(data.manifests, size, cfg.data.cache_dir)
    arrays = {p: load_images(getattr(data, p), size, cfg.data.cache_dir, caches) for p in ("train", "val", "test")}
    resident = device.type == "cuda" and sum(a.nbytes for a in arrays.values()) <= cfg.data.gpu_resident_max_gb * 1e9
    images = {p: _image_tensor(a, device, resident) for p, a in arrays.items()}
    log.info("images %dpx: train %d, val %d, test %d (%s)", size, len(arrays["train"]), len(arrays["val"]),
             len(arrays["test"]), "GPU-resident" if resident else f"host memory -> {device}")
    y_np = labels_of(data.train)
    y_train = torch.from_numpy(y_np).to(device)
    syn_mask = data.synthetic_mask()
    real_rows = np.flatnonzero(~syn_mask)
    quota = data.synthetic_quota()
    n_epoch = len(epoch_rows(y_np, syn_mask, quota, 0, tc.seed))  # rows an epoch draws from: the same every epoch
    if quota:
        log.info("each epoch draws its %d synthetic images afresh from the %d that exist", n_epoch - len(real_rows),
                 int(syn_mask.sum()))
    real_from = tc.epochs - tc.real_only_last_epochs if 0 < len(real_rows) < len(y_np) else tc.epochs
    if real_from < tc.epochs:
        log.info("epochs %d-%d draw the %d real training images only", real_from + 1, tc.epochs, len(real_rows))
    sample_weight = None
    if tc.synthetic_loss_weight != 1 and len(real_rows) < len(y_np):
        sample_weight = np.where(syn_mask, tc.synthetic_loss_weight, 1.0).astype(np.float32)
        log.info("a synthetic image weighs %g in the loss, a real one 1", tc.synthetic_loss_weight)

    # --- model, optimiser, schedule, loss -------------------------------------------------------------------------
    torch.manual_seed(tc.seed)  # same initial weights on every rank and every run of this seed
    net, norm = build_model(cfg.model)
    net.to(device)
    if device.type == "cuda" and tc.channels_last:
        net.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = tc.cudnn_benchmark
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    opt = create_optimizer_v2(net, opt="adamw", lr=tc.lr, weight_decay=tc.weight_decay)
    steps_per_epoch = len(shard_batches(np.arange(n_epoch), tc.batch_size, rank, world))
    total = max(tc.epochs * steps_per_epoch, 1)
    warmup = min(int(round(tc.warmup_epochs * steps_per_epoch)), total - 1)
    sched = CosineLRScheduler(opt, t_initial=total - warmup, lr_min=tc.lr * tc.min_lr_ratio, warmup_t=warmup,
                              warmup_lr_init=tc.lr * 0.01, warmup_prefix=True, t_in_epochs=False)
    loss_fn = build_loss(tc, np.bincount(y_np, minlength=len(CLASSES))).to(device)
    ema = None
    if tc.ema_decay > 0:
        from timm.utils import ModelEmaV3

        # warm-up power 3/4: the decay reaches 0.99 after ~460 steps and 0.995 after ~1,200, then stays at ema_decay
        ema = ModelEmaV3(net, decay=tc.ema_decay, use_warmup=True, warmup_power=0.75)
    scored = net if ema is None else ema.module  # the weights that are validated, kept as best and scored
    model: nn.Module = net
    if world > 1:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if tc.compile and device.type == "cuda":
        model = torch.compile(model)

    # --- resume -------------------------------------------------------------------------------------------------------
    prog, best_state = Progress(), None
    ckpt = _latest_checkpoint(paths) if resume else None
    if ckpt is not None:
        payload = torch.load(ckpt, map_location="cpu", weights_only=True)
        net.load_state_dict(payload["model"])
        if ema is not None:
            ema.module.load_state_dict(payload["ema"])
        opt.load_state_dict(payload["optimizer"])
        sched.load_state_dict(payload["scheduler"])
        prog, best_state = Progress(**payload["progress"]), payload["best_model"]
        if main and best_state is not None:  # the best file on disk may come from beyond this checkpoint
            _write_best(paths, best_state, _best_meta(cfg, prog, norm))
        log.info("resumed from %s: epoch %d, step %d", ckpt, prog.epoch, prog.step)
    elif resume:
        log.info("no checkpoint in %s: starting from scratch", paths.checkpoints)
    if main:
        atomic_write_csv(paths.summary, pd.DataFrame(prog.history, columns=SUMMARY_COLUMNS))

    # --- epochs -------------------------------------------------------------------------------------------------------
    last_save = time.monotonic()
    bar = tqdm(total=tc.epochs * steps_per_epoch, initial=prog.global_step, desc="train-clf", disable=not main,
               leave=False)
    while prog.epoch < tc.epochs and not prog.stopped:
        if prog.epoch < real_from:
            rows = epoch_rows(y_np, syn_mask, quota, prog.epoch, tc.seed)
            order = rows[epoch_order(y_np[rows], prog.epoch, tc.seed, tc.sampler, tc.oversample_power)]
        else:  # as many draws as a full epoch, so the schedule's steps per epoch hold
            order = real_rows[epoch_order(y_np[real_rows], prog.epoch, tc.seed, tc.sampler, tc.oversample_power,
                                          n=n_epoch)]
        batches = shard_batches(order, tc.batch_size, rank, world)
        model.train()
        t0 = time.monotonic()
        loss_sum = torch.tensor(prog.loss_sum, dtype=torch.float64, device=device)
        for step in range(prog.step, len(batches)):
            s = _step_seed(tc.seed, prog.epoch, step, rank)
            torch.manual_seed(s)  # dropout, drop-path and RandAugment draw from the global RNG
            x, y = _batch(images["train"], y_train, batches[step], device, cfg, norm, torch.Generator().manual_seed(s))
            sched.step_update(prog.global_step)
            with autocast(device, tc.amp):
                logits = model(x)
            w = None if sample_weight is None else to_device(torch.from_numpy(sample_weight[batches[step]]), device)
            loss = loss_fn(logits.float(), y, w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            # summed over the ranks at every step, so every rank holds the epoch's total so far: the mid-epoch
            # checkpoint that rank 0 alone writes then restores every rank's share, not rank 0's on every rank
            loss_sum += _summed(state, loss.detach().double())
            prog.step, prog.global_step, prog.n_batches = step + 1, prog.global_step + 1, prog.n_batches + 1
            if ema is not None:
                ema.update(net, step=prog.global_step)
            bar.update(1)
            if main and tc.checkpoint_minutes > 0 and time.monotonic() - last_save > tc.checkpoint_minutes * 60:
                prog.loss_sum, prog.train_s = float(loss_sum), prog.train_s + time.monotonic() - t0
                t0 = time.monotonic()
                _save_checkpoint(paths, _with_wall(prog, t_start), net, opt, sched, best_state, tc.keep_checkpoints,
                                 ema)
                last_save = time.monotonic()
            if on_step is not None:
                on_step(prog.epoch, step, prog.global_step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_s = prog.train_s + time.monotonic() - t0
        train_loss = float(loss_sum.float()) / max(prog.n_batches * world, 1)  # the mean over ranks and steps

        # validation and bookkeeping, identical on every rank (gathered probabilities)
        if world > 1:  # each rank's last step moved its BatchNorm statistics by its own batch: score with rank 0's,
            for buf in scored.buffers():  # which are the ones saved, so a resumed run scores as an uninterrupted one
                torch.distributed.broadcast(buf, 0)
        # the epoch choice: plain views, 8x cheaper than TTA
        val_probs = _evaluate(scored, images["val"], norm, device, cfg, state)
        vm = _score(data.val, val_probs, cfg, n_boot=0)
        row = {"epoch": prog.epoch + 1, "train_loss": train_loss, "val_macro_f1": vm["macro_f1"],
               "val_balanced_accuracy": vm["balanced_accuracy"], "val_minority_f1": vm["minority_f1"],
               "val_accuracy": vm["accuracy"], "lr": opt.param_groups[0]["lr"],
               "img_s": prog.n_batches * len(batches[0]) * world / max(train_s, 1e-9),
               "elapsed_s": prog.wall_s + time.monotonic() - t_start}
        prog.history.append(row)
        prog.epoch, prog.step, prog.loss_sum, prog.n_batches, prog.train_s = prog.epoch + 1, 0, 0.0, 0, 0.0
        if vm["macro_f1"] > prog.best_f1:
            prog.best_f1, prog.best_epoch, prog.bad_epochs = vm["macro_f1"], prog.epoch, 0
            best_state = _cpu_copy(scored)
            if main:
                _write_best(paths, best_state, _best_meta(cfg, prog, norm))
        else:
            prog.bad_epochs += 1
        prog.stopped = prog.bad_epochs >= tc.patience
        log.info("epoch %d/%d: loss %.4f, val macro-F1 %.4f, balanced acc %.4f, minority F1 %.4f, %.0f img/s%s",
                 prog.epoch, tc.epochs, train_loss, vm["macro_f1"], vm["balanced_accuracy"], vm["minority_f1"],
                 row["img_s"], " (best)" if prog.best_epoch == prog.epoch else "")
        if prog.stopped and prog.epoch < real_from < tc.epochs:  # a real-only phase is planned and not begun
            log.info("early stop after epoch %d: skipping to the real-only epochs %d-%d", prog.epoch, real_from + 1,
                     tc.epochs)
            bar.update((real_from - prog.epoch) * steps_per_epoch)
            prog.epoch, prog.global_step = real_from, real_from * steps_per_epoch
            prog.bad_epochs, prog.stopped = 0, False
        if main:
            atomic_write_csv(paths.summary, pd.DataFrame(prog.history, columns=SUMMARY_COLUMNS))
            every = tc.checkpoint_every > 0 and prog.epoch % tc.checkpoint_every == 0
            if every or prog.stopped or prog.epoch == tc.epochs:
                _save_checkpoint(paths, _with_wall(prog, t_start), net, opt, sched, best_state, tc.keep_checkpoints,
                                 ema)
                last_save = time.monotonic()
    bar.close()
    if prog.stopped:
        log.info("early stop after epoch %d: no better val macro-F1 for %d epochs", prog.epoch, tc.patience)

    # --- best epoch: predictions and metrics ------------------------------------------------------------------------
    net.load_state_dict(best_state)
    tta = cfg.eval.tta
    probs = {p: _evaluate(net, images[p], norm, device, cfg, state, tta) for p in ("val", "test")}
    extra_probs = {}
    for name, df in data.extra.items():
        with state.main_process_first():
            arr = load_images(df, size, cfg.data.cache_dir)
        extra_probs[name] = _evaluate(net, _image_tensor(arr, device, resident), norm, device, cfg, state, tta)
    if not main:
        state.wait_for_everyone()
        return {}
    rule = fit_decision(cfg.eval.decision, counts, probs["val"], labels_of(data.val), cfg.eval.decision_taus)
    offsets, decision = rule.offsets, rule.record()
    if offsets is not None:
        # the plain-argmax scores beside the rule's, so that what the rule adds is visible in every run
        plain = {p: _score(getattr(data, p), probs[p], cfg, 0) for p in ("val", "test")}
        decision["argmax"] = {p: {m: sc[m] for m in HEADLINE} for p, sc in plain.items()}
        log.info("decision rule %s: tau %+.2f (val macro-F1 %.4f -> %.4f)", decision["rule"], decision["tau"],
                 decision["argmax"]["val"]["macro_f1"], decision["val_macro_f1_by_tau"][str(decision["tau"])])
    metrics = {
        "test": _score(data.test, probs["test"], cfg, cfg.eval.n_boot, offsets),
        "val": _score(data.val, probs["val"], cfg, cfg.eval.n_boot, offsets),
        "decision": decision,
        "best_epoch": prog.best_epoch,
        "best_val_macro_f1": prog.best_f1,
        "epochs_run": len(prog.history),  # fewer than the last epoch's number when early stopping skipped ahead
        "real_only_from_epoch": real_from + 1 if real_from < tc.epochs else None,
        # early stopping fired: the run stopped, or it skipped ahead to its real-only epochs (fewer epochs ran)
        "stopped_early": prog.stopped or len(prog.history) < prog.epoch,
        "extra": {name: _score(data.extra[name], p, cfg, cfg.eval.n_boot, offsets) for name, p in extra_probs.items()},
        "wall_s": prog.wall_s + time.monotonic() - t_start,
        "train_counts": counts,
        "synthetic": data.synthetic,
        "split": str(data.split.path),
        "split_fingerprint": data.split.fingerprint,
        "model": cfg.model.name,
        "pretrained": cfg.model.pretrained,
        "image_size": size,
        "seed": tc.seed,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "processes": world,
        "config_hash": config_hash(cfg),
    }
    atomic_write_csv(paths.predictions, _predictions(data.test, probs["test"], offsets))
    atomic_write_csv(paths.val_predictions, _predictions(data.val, probs["val"], offsets))
    for name, p in extra_probs.items():
        atomic_write_csv(paths.extra_predictions(name), _predictions(data.extra[name], p, offsets))
    atomic_write_json(paths.metrics, metrics)
    if not tc.keep_final_state:  # a finished run resumes from metrics.json; its optimiser state is dead weight
        for old in paths.checkpoints.glob("step_*"):
            shutil.rmtree(old, ignore_errors=True)
    t = metrics["test"]
    log.info("best epoch %d: test macro-F1 %.4f, minority F1 %.4f, balanced acc %.4f, acc %.4f (%.0f s)",
             prog.best_epoch, t["macro_f1"], t["minority_f1"], t["balanced_accuracy"], t["accuracy"], metrics["wall_s"])
    state.wait_for_everyone()
    return metrics


def _with_wall(prog: Progress, t_start: float) -> Progress:
    """A copy of ``prog`` whose wall_s includes this session so far (what a resumed session starts from)."""
    return Progress(**{**asdict(prog), "wall_s": prog.wall_s + time.monotonic() - t_start})


def _best_meta(cfg: ClfConfig, prog: Progress, norm: Normalize) -> dict:
    return {"epoch": prog.best_epoch, "val_macro_f1": prog.best_f1, "model": cfg.model.name,
            "image_size": cfg.data.image_size, "classes": list(CLASSES), "mean": list(norm.mean), "std": list(norm.std)}


def _image_tensor(arr: np.ndarray, device: torch.device, resident: bool) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if device.type != "cuda":
        return t
    return t.to(device) if resident else t.pin_memory()


def _batch(images: torch.Tensor, labels: torch.Tensor, idx: np.ndarray, device: torch.device, cfg: ClfConfig,
           norm: Normalize, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather, augment and normalise one batch on ``device``: uint8 NHWC rows -> float NCHW (channels_last on CUDA)."""
    ii = torch.from_numpy(idx)
    if images.device.type == "cuda":  # GPU-resident: gather on the GPU
        x = images[to_device(ii, images.device)]
    else:  # host memory: gather there, then one (pinned, asynchronous) copy of the uint8 batch
        x = to_device(images[ii], device)
    x = normalize(augment_batch(x.permute(0, 3, 1, 2), cfg.train.augment, gen), norm.mean, norm.std)
    if device.type == "cuda" and cfg.train.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, labels[to_device(ii, labels.device)]
