"""One training engine for every method (``wsss.methods``).

* SGD with a poly learning-rate schedule (``lr = lr0 * (1 - step/max_step)^power``), per-group
  learning-rate multipliers for new layers and weight decay.
* ``momentum_mode="reference"`` reproduces the PolyOptimizer quirk of the official IRN/PSA-derived
  code (``PolyOptimizer``; docs/official_code.md): the weight decay is passed where SGD expects the
  momentum, so the effective momentum equals the weight decay (~0). The published numbers were
  obtained that way, so it is the default; ``"standard"`` uses ``momentum`` (0.9).
* AMP (autocast + GradScaler) on CUDA; seeded and deterministic on CPU.
* Every loss term and each group's lr are logged to a CSV per step; a checkpoint (model, optimizer,
  scheduler, scaler, epoch, step, resolved config, package version) is written atomically after
  every epoch, and training resumes from it after an interruption. The resumed run equals an
  uninterrupted one because all randomness is a function of (seed, epoch, index).
* Multi-GPU (DDP): under ``torchrun`` (``WORLD_SIZE`` > 1) or with ``distributed=True`` the
  process group is joined (NCCL on CUDA, gloo on CPU), each process reads its share of every epoch
  through a ``DistributedSampler`` (``set_epoch`` per epoch), ``cfg.batch_size`` stays the *total*
  batch (each process takes ``batch_size / world_size``), the method's ``losses`` run inside a
  ``DistributedDataParallel`` wrapper (gradients averaged over processes), and only rank 0 writes
  the step log (its own loss values), the checkpoints and the model file, with barriers around them.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import __version__
from .config import config_hash
from .io import atomic_path
from .methods.base import Method, StepContext

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


#: ``sgd``: the papers' SGD (momentum per ``momentum_mode``); ``adamw``: AdamW (decoupled weight
#: decay, default betas), for training from random weights where SGD at the papers' learning
#: rates barely fits (docs/pretrain.md); the poly schedule applies to both.
OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    batch_size: int = 16
    lr: float = 0.1
    weight_decay: float = 1e-4
    optimizer: str = "sgd"  # sgd | adamw
    momentum_mode: str = "reference"  # reference | standard (SGD only)
    momentum: float = 0.9
    poly_power: float = 0.9
    amp: bool = True
    seed: int = 0
    drop_last: bool = True

    def __post_init__(self):
        if self.momentum_mode not in ("reference", "standard"):
            raise ValueError(f"momentum_mode must be 'reference' or 'standard', got {self.momentum_mode!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")


def effective_momentum(cfg: TrainConfig) -> float:
    return cfg.weight_decay if cfg.momentum_mode == "reference" else cfg.momentum


def build_optimizer(groups: List[Dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """``cfg.optimizer`` (SGD or AdamW) over the method's groups; each group's lr is ``lr * lr_mult``."""
    param_groups = []
    for g in groups:
        params = [p for p in g["params"] if p.requires_grad]
        if not params:
            continue
        param_groups.append(
            {
                "params": params,
                "lr": cfg.lr * g.get("lr_mult", 1.0),
                "weight_decay": g.get("weight_decay", cfg.weight_decay),
                "name": g.get("name", f"group{len(param_groups)}"),
            }
        )
    if not param_groups:
        raise ValueError("the method has no trainable parameters")
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=effective_momentum(cfg), weight_decay=cfg.weight_decay)


def poly_scheduler(optimizer: torch.optim.Optimizer, max_step: int, power: float):
    """``lr0 * (1 - step/max_step)^power``, frozen at the last value after ``max_step``."""

    def factor(step: int) -> float:
        return (1.0 - min(step, max_step - 1) / max_step) ** power

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def steps_per_epoch(n_images: int, batch_size: int, drop_last: bool) -> int:
    return n_images // batch_size if drop_last else math.ceil(n_images / batch_size)


class CheckpointWriteError(OSError):
    """A checkpoint or model file could not be written; the message names the file and the cause.

    ``errno`` is ``ENOSPC`` when the disk is (most likely) full. Nothing is left at the target: the
    temporary file is removed and a previous file at that path is unchanged.
    """

    def __init__(self, message: str, code: Optional[int] = None, path: Optional[Path] = None):
        super().__init__(message)
        self.errno = code
        self.path = path

    def __str__(self) -> str:
        return str(self.args[0])


#: torch's zip writer reports failed writes (a full disk among them) as a RuntimeError with these words
_TORCH_WRITE_FAILURE = ("PytorchStreamWriter", "inline_container", "file write failed", "unexpected pos")


def _state_nbytes(obj: Any) -> int:
    """Bytes of tensor data in a (nested) checkpoint state, about what ``torch.save`` writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_state_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_nbytes(v) for v in obj)
    return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _checkpoint_write_error(path: Path, state: Mapping[str, Any], e: BaseException) -> CheckpointWriteError:
    folder = path.parent
    needed = _state_nbytes(state)
    try:
        free: Optional[int] = shutil.disk_usage(folder).free
    except OSError:
        free = None
    code = getattr(e, "errno", None) if isinstance(e, OSError) else None
    if code == errno.ENOSPC:
        cause = "no space left on device"
    elif code is None and free is not None and free < max(needed, 1 << 20):
        cause, code = "no space left on device (the disk is full or nearly so)", errno.ENOSPC
    elif code is not None:
        cause = os.strerror(code).lower()
    else:
        cause = "the write failed"
    space = f"{_mib(free)} free in {folder}" if free is not None else f"free space in {folder} unknown"
    msg = (
        f"could not write checkpoint {path}: {cause} ({space}; the checkpoint needs about {_mib(needed)}). "
        f"No partial file was left; a previous file at that path is unchanged. Error: {type(e).__name__}: {e}"
    )
    return CheckpointWriteError(msg, code, path)


def save_checkpoint(path: Path, **state: Any) -> None:
    """Write ``state`` (plus version fields) with ``torch.save``, atomically.

    A failed write (full disk, quota, I/O error; torch reports these as a RuntimeError from its
    ``inline_container.cc`` writer) raises :class:`CheckpointWriteError` naming the file, the
    cause and the free space; no partial file is left.
    """
    path = Path(path)
    state = dict(state, checkpoint_version=CHECKPOINT_VERSION, package_version=__version__)
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except OSError as e:
        raise _checkpoint_write_error(path, state, e) from e
    except RuntimeError as e:
        if not any(word in str(e) for word in _TORCH_WRITE_FAILURE):
            raise
        raise _checkpoint_write_error(path, state, e) from e


def load_checkpoint(path: Path) -> Dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"cannot read checkpoint {path}: {e}; delete it to train from scratch") from e


def _to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class StepLogger:
    """Per-step CSV log (step, epoch, lr of each group, each loss term, total)."""

    def __init__(self, path: Path, resume_step: int):
        self.path = Path(path)
        self.fieldnames: Optional[List[str]] = None
        rows: List[Dict[str, str]] = []
        if self.path.exists() and resume_step > 0:
            with open(self.path, newline="") as fh:
                reader = csv.DictReader(fh)
                self.fieldnames = reader.fieldnames
                rows = [r for r in reader if int(r["step"]) < resume_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "w", newline="")
        self.writer: Optional[csv.DictWriter] = None
        if self.fieldnames:
            self._open_writer(self.fieldnames)
            self.writer.writerows(rows)

    def _open_writer(self, fieldnames: List[str]) -> None:
        self.fieldnames = fieldnames
        self.writer = csv.DictWriter(self.fh, fieldnames=fieldnames, extrasaction="ignore")
        self.writer.writeheader()

    def write(self, row: Dict[str, Any]) -> None:
        if self.writer is None:
            self._open_writer(list(row))
        self.writer.writerow(row)

    def flush(self) -> None:
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def train(
    method: Method,
    train_set,
    cfg: TrainConfig,
    out_path: Path,
    work_dir: Path,
    *,
    resolved_config: Mapping[str, Any],
    device: Optional[torch.device] = None,
    num_workers: int = 0,
    stop_after_epochs: Optional[int] = None,
    progress: bool = True,
    on_epoch_end: Optional[Callable[[int], None]] = None,
    on_step_end: Optional[Callable[[int], None]] = None,
    distributed: Optional[bool] = None,
    keep_checkpoint: bool = False,
) -> Path:
    """Train ``method`` on ``train_set`` and write the final weights to ``out_path``.

    ``work_dir`` holds ``last.pt`` (the resume checkpoint) and ``train_log.csv``. If ``last.pt``
    exists and was made with the same resolved config, training continues after its epoch; a
    checkpoint of another config is refused. Once ``out_path`` is written, ``last.pt`` (model plus
    optimiser state, twice the model's size or more) is deleted; ``keep_checkpoint`` leaves it for a
    caller whose stage goes on after training (IRN's mean shift) and deletes it itself at the end.
    ``stop_after_epochs`` ends this call early (used to test resuming). The final file holds ``model`` (state_dict), ``config``, ``config_hash``,
    ``package_version`` and ``method``. ``distributed``: ``None`` = DDP when ``WORLD_SIZE`` > 1
    (see the module docstring). ``on_step_end(n)`` runs after each update with the number of updates
    done so far (1, 2, ...; on every rank), ``on_epoch_end(epoch)`` after each epoch's checkpoint;
    state a hook keeps must live in the method's ``extra_state_dict`` to survive a resume.
    """
    world, rank, device = distributed_setup(distributed, device)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work_dir = Path(work_dir)
    ckpt_path = work_dir / "last.pt"
    chash = config_hash(resolved_config)
    torch.manual_seed(cfg.seed)
    method.to(device)

    n = len(train_set)
    epoch_steps = [
        rank_steps_per_epoch(n, method.batch_size_for_epoch(e, cfg.batch_size), cfg.drop_last, world)
        for e in range(cfg.epochs)
    ]
    max_step = sum(epoch_steps)
    if max_step == 0:
        raise ValueError(f"{n} training images give no full batch of {cfg.batch_size}; lower classifier.batch_size")
    optimizer = build_optimizer(method.param_groups(), cfg)
    # a method may keep its official code's schedule length (AEFT, KTSE: Method.schedule_max_step)
    schedule_steps = getattr(method, "schedule_max_step", lambda n, e: None)(n, cfg.epochs)
    scheduler = poly_scheduler(optimizer, schedule_steps or max_step, cfg.poly_power)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start_epoch, step = 0, 0
    if world > 1:
        torch.distributed.barrier()  # rank 0 may have set a stale checkpoint aside before calling train
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        if state.get("config_hash") != chash:
            raise RuntimeError(
                f"checkpoint {ckpt_path} was made with another config (hash {state.get('config_hash')} != {chash}); "
                "delete it (or the folder) to start over"
            )
        try:
            method.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            if hasattr(method, "load_extra_state_dict"):  # a method's own state (ACR: 2nd optimiser)
                method.load_extra_state_dict(state.get("method_extra"))
        except (RuntimeError, ValueError, KeyError) as e:
            raise RuntimeError(
                f"checkpoint {ckpt_path} (wsss {state.get('package_version')}) does not fit the model or optimizer "
                f"built by wsss {__version__}: {e}. The code changed since it was written; delete it to start over"
            ) from e
        if state.get("package_version") != __version__:
            log.warning("resuming a checkpoint of wsss %s with wsss %s", state.get("package_version"), __version__)
        start_epoch, step = state["epoch"] + 1, state["step"]
        log.info("resuming from %s after epoch %d (step %d)", ckpt_path, state["epoch"], step)

    loss_fn = ddp_loss_fn(method, device) if world > 1 else None
    logger = StepLogger(work_dir / "train_log.csv", resume_step=step) if rank == 0 else _NullLogger()
    progress = progress and rank == 0
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if stop_after_epochs is not None and epoch >= start_epoch + stop_after_epochs:
                return ckpt_path
            torch.manual_seed(
                cfg.seed * 1000003 + epoch + 7919 * rank
            )  # dropout etc.: a function of (seed, epoch, rank)
            if hasattr(train_set, "set_epoch"):
                train_set.set_epoch(epoch)
            bs = method.batch_size_for_epoch(epoch, cfg.batch_size)
            gen = torch.Generator().manual_seed(cfg.seed * 1000003 + epoch)
            if world > 1:
                sampler = torch.utils.data.DistributedSampler(
                    train_set,
                    num_replicas=world,
                    rank=rank,
                    shuffle=True,
                    seed=cfg.seed,
                    drop_last=cfg.drop_last,
                )
                sampler.set_epoch(epoch)
                loader = DataLoader(
                    train_set,
                    batch_size=bs // world,
                    sampler=sampler,
                    drop_last=cfg.drop_last,
                    num_workers=num_workers,
                    pin_memory=device.type == "cuda",
                    persistent_workers=False,
                )
            else:
                loader = DataLoader(
                    train_set,
                    batch_size=bs,
                    shuffle=True,
                    drop_last=cfg.drop_last,
                    generator=gen,
                    num_workers=num_workers,
                    pin_memory=device.type == "cuda",
                    persistent_workers=False,
                )
            method.train()
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, mininterval=2.0)
            for batch in bar:
                batch = _to_device(batch, device)
                ctx = StepContext(step=step, max_step=max_step, epoch=epoch, max_epoch=cfg.epochs, device=device)
                terms = train_step(method, batch, ctx, optimizer, scaler, use_amp, loss_fn=loss_fn)
                lrs = {f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups}
                scheduler.step()
                row = {"step": step, "epoch": epoch, **lrs, **terms}
                logger.write(row)
                bar.set_postfix({k: f"{v:.4f}" for k, v in terms.items()})
                step += 1
                if on_step_end is not None:
                    on_step_end(step)
            logger.flush()
            if rank == 0:
                save_checkpoint(
                    ckpt_path,
                    model=method.state_dict(),
                    optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(),
                    scaler=scaler.state_dict(),
                    epoch=epoch,
                    step=step,
                    config=dict(resolved_config),
                    config_hash=chash,
                    **({"method_extra": method.extra_state_dict()} if hasattr(method, "extra_state_dict") else {}),
                )
            if world > 1:
                torch.distributed.barrier()
            log.info("epoch %d done (step %d): %s", epoch, step, {k: round(v, 5) for k, v in terms.items()})
            if on_epoch_end is not None:
                on_epoch_end(epoch)
    finally:
        logger.close()

    if rank == 0:
        save_model(out_path, method, resolved_config)
        if not keep_checkpoint:
            discard_checkpoints(work_dir)
    if world > 1:
        torch.distributed.barrier()
    return Path(out_path)


def train_step(
    method: Method, batch, ctx: StepContext, optimizer, scaler, use_amp: bool, loss_fn: Optional[Callable] = None
) -> Dict[str, float]:
    """One update; a method may override it with its own ``train_step`` (several optimisers/phases).
    ``loss_fn`` replaces ``method.losses`` (the DDP wrapper of :func:`ddp_loss_fn`)."""
    custom = getattr(method, "train_step", None)
    if custom is not None:
        return custom(batch, ctx, optimizer, scaler)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=ctx.device.type, enabled=use_amp):
        terms = (loss_fn or method.losses)(batch, ctx)
    if not terms:
        raise RuntimeError(f"method {method.name!r} returned no loss terms")
    total = sum(terms.values())
    if not torch.isfinite(total):
        raise FloatingPointError(f"non-finite loss at step {ctx.step}: { {k: float(v) for k, v in terms.items()} }")
    scaler.scale(total).backward()
    scaler.step(optimizer)
    scaler.update()
    out = {f"loss_{k}": float(v.detach()) for k, v in terms.items()}
    out["loss_total"] = float(total.detach())
    return out


class _NullLogger:
    """Step logger of ranks other than 0: writes nothing."""

    def write(self, row: Dict[str, Any]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def distributed_setup(distributed: Optional[bool], device: Optional[torch.device]):
    """``(world_size, rank, device)``; joins the process group when distributed and not joined yet.

    ``distributed=None`` means "when ``WORLD_SIZE`` > 1" (torchrun). On CUDA the device becomes
    ``cuda:LOCAL_RANK`` unless a device with an index is given. Single process: ``(1, 0, device)``.
    """
    import torch.distributed as dist

    if distributed is None:
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or (dist.is_available() and dist.is_initialized())
    if not distributed:
        return 1, 0, device
    if not dist.is_available():
        raise RuntimeError("distributed training requested but torch.distributed is not available")
    use_cuda = (device.type == "cuda") if device is not None else torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda and (device is None or device.index is None):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)
    return dist.get_world_size(), dist.get_rank(), device


def rank_steps_per_epoch(n_images: int, batch_size: int, drop_last: bool, world_size: int = 1) -> int:
    """Steps of one epoch in each process: ``DistributedSampler`` gives every rank
    ``floor(n / world)`` (``drop_last``) or ``ceil(n / world)`` samples, taken ``batch_size / world``
    at a time. ``world_size=1`` is :func:`steps_per_epoch`."""
    if world_size == 1:
        return steps_per_epoch(n_images, batch_size, drop_last)
    if batch_size % world_size:
        raise ValueError(
            f"batch size {batch_size} is not divisible by the {world_size} processes of the distributed run"
        )
    per_rank = n_images // world_size if drop_last else math.ceil(n_images / world_size)
    return steps_per_epoch(per_rank, batch_size // world_size, drop_last)


class _LossModule(torch.nn.Module):
    """Routes DDP's ``forward`` to ``method.losses``, so DDP's gradient hooks see the loss graph."""

    def __init__(self, method: Method):
        super().__init__()
        self.method = method

    def forward(self, batch, ctx):
        return self.method.losses(batch, ctx)


def ddp_loss_fn(method: Method, device: torch.device) -> Callable:
    """``method.losses`` behind ``DistributedDataParallel`` (gradients averaged over processes)."""
    if getattr(method, "train_step", None) is not None:
        raise NotImplementedError(
            f"method {method.name!r} has its own train_step; distributed training does not support it"
        )
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(_LossModule(method), device_ids=ids)


def discard_checkpoints(work_dir: Path, *others: Path) -> None:
    """Delete the resume checkpoint ``work_dir/last.pt`` and the files ``others`` once a stage's
    final output is written (what :func:`train` does itself unless ``keep_checkpoint``)."""
    for path in (Path(work_dir) / "last.pt", *others):
        Path(path).unlink(missing_ok=True)


def save_model(path: Path, method: Method, resolved_config: Mapping[str, Any]) -> None:
    save_checkpoint(
        Path(path),
        model=method.state_dict(),
        method=method.name,
        config=dict(resolved_config),
        config_hash=config_hash(resolved_config),
    )


def load_model_state(path: Path) -> Dict[str, Any]:
    """Read a final model file written by :func:`train` (weights_only, no pickled objects)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    return load_checkpoint(path)


def train_config_from(section: Mapping[str, Any]) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in section.items() if k in names})
