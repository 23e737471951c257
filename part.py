"""part: Pixel-reweighted Adversarial Training (PART) in one file.

PART (Zhang, Liu, Zhou, Zhang, Liu, ICML 2024, arXiv 2406.00685) keeps the full L-inf
budget `eps` on the pixels a class activation map (Grad-CAM, XGradCAM or LayerCAM) marks
as important and lowers it to `eps_low` elsewhere, then trains on those pixel-reweighted
adversarial examples (base losses: AT = PART, TRADES = PART-T, MART = PART-M).

    python part.py train --preset smoke                      # about a minute, synthetic data
    python part.py train --dataset cifar10 --data-dir DIR    # the paper's settings
    python part.py attack runs/X/best.safetensors --data-dir DIR --attacks natural,pgd20,aa
    python part.py export runs/X/best.safetensors --format all --out export/

Units: budgets on the command line and in configs.toml are in 1/255 intensity levels
(`--eps 8` or `--eps 8/255`); everything inside works on images in [0, 1]. The one
conversion is `from_levels()`, applied once when a threat model (`AttackSetup`) is built;
names that still hold levels say so (`eps_levels`). The Python API (`grad_cam`, `eps_map`,
`pgd`, ...) takes budgets in [0, 1] units.

This file is the card and runs alone. part_tools.py, beside it, holds what goes beyond
(report, cam, bench); `import part` never loads it, running this file (or the `part`
command) adds its commands when it is there.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import datetime
import errno
import functools
import gc
import hashlib
import importlib.util
import inspect
import io
import itertools
import json
import logging
import math
import os
import re
import signal
import sys
import tempfile
import time
import tomllib
import typing
import warnings
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import typer
from rich.console import Console
from rich.markup import escape as escape_markup
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.progress import TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

Tensor = torch.Tensor
__version__ = "0.5.0"
# The Python API (budgets in [0, 1] units; images as uint8 or floats in [0, 1]). Everything
# else is internal and may change.
__all__ = [
    *"Split as_split load_split synthetic_split to_float DATASETS".split(),  # data
    *"build_model load_checkpoint save_checkpoint CheckpointMeta".split(),  # models
    *"class_activation grad_cam eps_map CAM_METHODS MASK_RULES".split(),  # CAM and budgets
    *"pgd mma compiled_ascent_step stepping AttackSetup".split(),  # attacks
    *"evaluate evaluate_suite EvalHooks".split(),  # evaluation
    *"TrainConfig fit TrainedRun export_checkpoint app CliError __version__".split(),
]

# ============================================================================ specs and units

FORMAT = "part/1"  # checkpoint format, stored in every file we write
HF_WEIGHTS = "model.safetensors"  # the weights of a shared model folder (export --format hf)
STATE_FORMAT = FORMAT + "-state"  # the resume state beside `last`
SYNTHETIC_CLASSES = tuple("disk square ring plus cross triangle hbar vbar diamond frame".split())
DEFAULT_CACHE = "~/.cache/part"
# the paper's budgets, 1/255 levels
DEFAULT_EPS_LEVELS, DEFAULT_EPS_LOW_LEVELS, DEFAULT_STEP_LEVELS = 8.0, 7.0, 2.0
MAX_SEED = 2**63 - 1


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    image_size: int  # native side; 0: --image-size (imagefolder)
    flip: bool  # horizontal flip in training augmentation (not for digits)


DATASETS = {
    "cifar10": DatasetSpec(32, True),
    "cifar100": DatasetSpec(32, True),
    "svhn": DatasetSpec(32, False),
    "tinyimagenet": DatasetSpec(64, True),
    "imagefolder": DatasetSpec(0, True),
    "synthetic": DatasetSpec(32, True),
}
METHODS = ("at", "part")
GENERATORS = ("pgd", "mma")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
# The training-time evaluation is the standard protocol whatever the training budget.
EVAL_EPS_LEVELS, EVAL_STEP_LEVELS, EVAL_STEPS = 8.0, 2.0, 20


class CliError(ValueError):
    """A user-facing error: printed as one line on stderr, exit code `code`. A ValueError, so
    that API callers who pass a bad value get the exception they expect."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class DataMissing(CliError):
    def __init__(self, message: str):
        super().__init__(message, code=2)


def first_line(e: BaseException | str, limit: int = 200) -> str:
    """An exception's first line (or its type), for one-line error messages."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else type(e).__name__


def unknown(kind: str, value: Any, choices) -> CliError:
    """The one message for a name that is not in a registry."""
    return CliError(f"unknown {kind} {value!r} (choose from {', '.join(map(str, choices))})")


def from_levels(levels: float) -> float:
    """1/255 intensity levels (command line, configs) -> [0, 1] image units."""
    return levels / 255.0


def to_levels(value: float) -> float:
    """[0, 1] image units -> 1/255 intensity levels (for messages and reports)."""
    return value * 255.0


def parse_levels(text: str | float | int, name: str) -> float:
    """'8', '8/255' or 8 -> 8.0 (in 1/255 levels); anything else, NaN and inf are refused."""
    option = f"--{name.replace('_', '-')}"
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        s = str(text).strip()
        try:
            value = float(s[:-4] if s.endswith("/255") else s)
        except ValueError:
            raise CliError(
                f"{option}: expected 1/255 levels like 8 or 8/255, got {text!r}"
            ) from None
    if not math.isfinite(value):
        raise CliError(f"{option}: {text!r} is not a finite number of 1/255 levels")
    return value


UNITS_HINT = "budgets are in [0, 1] units here: 8/255, not 8"


def check_threat(
    eps: float | Tensor,
    eps_low: Optional[float],
    step: Optional[float],
    unit: float = 1.0,
    where: str = "",
    zero_eps: bool = False,
) -> None:
    """The one check of a threat model: 0 <= eps_low <= eps <= unit, eps > 0 (unless
    `zero_eps`), 0 < step <= unit. `unit` 255: 1/255 levels (the command line, configs);
    1: the API's [0, 1] units. `eps` may be a budget map; None is not checked."""
    at, hint = f" ({where})" if where else "", "" if unit == 255 else f" ({UNITS_HINT})"
    for name, v in (("eps", eps), ("eps-low", eps_low), ("step", step)):
        flag = f"--{name}" if unit == 255 else name.replace("-", "_")
        if v is None:
            continue
        if torch.is_tensor(v) and v.is_floating_point():  # an empty map holds nothing to check
            low, high = (float(t) for t in torch.aminmax(v.detach())) if v.numel() else (0.0, 0.0)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            low = high = float(v)
        else:
            raise CliError(f"{flag} must be a number{hint}, got {type(v).__name__}{at}")
        if not (math.isfinite(low) and math.isfinite(high)):
            raise CliError(f"{flag} must be a finite number, got {v}{at}")
        if name == "step" and low <= 0:
            raise CliError(f"{flag} must be positive, got {low:g}{at}")
        if low < 0:
            raise CliError(f"budgets must be non-negative: {flag} {low:g}{at}")
        if high > unit:
            raise CliError(f"{flag} {high:g} is larger than the whole intensity range{hint}{at}")
    if not torch.is_tensor(eps) and eps == 0 and not zero_eps:
        raise CliError(f"--eps must be positive, got 0{at}")
    if eps_low is not None and eps_low > eps:
        raise CliError(f"eps-low ({eps_low:g}) must not exceed eps ({eps:g}){at}")


# ============================================================================ console
# Tables keep their columns in logs and pipes too (rich would assume 80 columns there).

# markup=False, set once here: what we print holds user text (paths, class names, group labels) that rich
# would read as markup ("runs/[x]/best" lost its "[x]", "[/]" raised MarkupError).
console = Console(
    highlight=False, soft_wrap=True, markup=False, width=None if sys.stdout.isatty() else 200
)
err_console = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)


def note(message: str, once: bool = False) -> None:
    """A one-line notice on stderr (never markup: paths may hold brackets); `once`: at most
    once in this process (what the help's defaults and the run both meet)."""
    if once and message in _SAID:
        return
    _SAID.add(message)
    err_console.print(message)


_SAID: set[str] = set()


@contextlib.contextmanager
def live_progress(enabled: bool = True):
    """The one progress display: rich bars with elapsed time and ETA on a terminal (each
    task has an `extra` text field), None elsewhere (logs and pipes get lines instead)."""
    if not (enabled and console.is_terminal):
        yield None
        return
    columns = (
        TextColumn("{task.description:>11}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("elapsed"),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[extra]}", markup=False),
    )
    # ETA from the last 10 minutes of progress: one step of a GPU recipe on a CPU takes half a minute
    with Progress(*columns, console=console, transient=True, speed_estimate_period=600) as bars:
        yield bars


def fmt_pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def versions() -> dict[str, str]:
    """Stored in every checkpoint and report."""
    return {"part": __version__, "torch": torch.__version__, "python": sys.version.split()[0]}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def set_threads(threads: int) -> None:
    """PyTorch's CPU threads (0 keeps its default, one per core). On a machine shared with
    other jobs one thread is often much faster than one per core."""
    if threads:
        torch.set_num_threads(threads)
        return
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores and console.is_terminal:  # said to a person; logs keep their lines
        note(
            f"note: other jobs keep this machine busy (load {load:.1f} on {cores} cores): "
            f"PyTorch's {threads_text(torch.get_num_threads())} then wait on each other, "
            "--threads 1 is often several times faster"
        )


def threads_text(n: int) -> str:
    return f"{n} thread{'s' * (n != 1)}"


def machine() -> dict[str, Any]:
    """Where a result was computed, stored beside the versions: the CPU, PyTorch's thread
    count (CPU results are bit-exact only at the same count) and the number of processes."""
    return {
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "processes": dist_from_env().world,
    }


# ============================================================================ files
# One writer for every file the tool produces: a temporary name in the same folder,
# flushed to disk, then renamed over the target, so a crash (even kill -9) or a full
# disk leaves either the old file or the new one, never half of one.

TMP_SUFFIX = ".tmp"


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a temporary file; it replaces `path` once it is safely on disk."""
    path = Path(path)
    tmp = _tmp_name(path)
    tmp.unlink(missing_ok=True)  # never write through a link planted at the temporary name
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # some writers create 0600 files; keep the usual mode
        os.replace(tmp, path)
        # make the rename itself durable (not possible everywhere)
        with contextlib.suppress(OSError):
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_bytes(path: Path, data: bytes) -> None:
    """Every binary file is serialised in memory and written here by Python: a full disk is
    an OSError with a message, not a C++ abort or a library's own exception type."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    write_bytes(path, save(tensors, metadata=metadata))


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Temporary files that interrupted writes left behind (`.NAME.PID.tmp`)."""
    stale = [p for p in folder.glob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def check_output(path: Optional[Path], option: str, folder: bool = False) -> None:
    """Before any work: an output file (or `folder`) that can be made and written. Tried for
    real: os.access says yes to root even where a write fails (a read-only mount)."""
    if path is None:
        return
    path = Path(path)
    where = path if folder else path.parent
    if path.exists() and path.is_dir() != folder:
        kind = "a file, not a folder" if folder else "a folder, not a file name"
        raise CliError(f"{option} {path} is {kind}")
    try:
        where.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=where).close()
    except OSError as e:
        raise CliError(f"{option} {path}: cannot create or write {where} ({e.strerror})") from None


def require_file(path: Path, what: str, folder: str = "is a folder, not a file") -> None:
    """An input that must be a regular file: a FIFO or a device would hang the read."""
    path = Path(path)
    if not path.is_file():
        why = folder if path.is_dir() else "is not a regular file"
        why = why if path.exists() else "not found"
        raise CliError(f"{what} {path} {why}")


def file_hash(path: Path) -> str:
    """sha256 of a file, the identity of a checkpoint in reports and saved examples."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tensors_of(path: Path) -> tuple[dict[str, Tensor], dict[str, str], str]:
    """One read of a safetensors file: (tensors, metadata, sha256); raises if it is not one."""
    from safetensors.torch import load

    data = Path(path).read_bytes()
    tensors = load(data)  # validates the whole file
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError("the metadata is not a mapping")
    return tensors, metadata, hashlib.sha256(data).hexdigest()


def safetensors_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata from its header alone ({} when it is not readable as one)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception:  # missing, not a safetensors file, damaged: no metadata
        return {}


@contextlib.contextmanager
def file_lock(lock: Path, what: str, used: str, remove: bool = False):
    """An exclusive lock for the life of a process (filelock's flock: released by the OS even
    after kill -9), so that two runs never write the same files. The lock file names its
    holder (`what`, pid) for the message a second process gets; `used` names what is
    locked; `remove` deletes the lock file when done."""
    import filelock

    lock = Path(lock)
    if lock.is_symlink():  # filelock refuses one too; this says what to do
        raise CliError(f"{lock} is a symbolic link; part never writes through one: remove it")

    def name_the_holder(fd: int) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{what} (pid {os.getpid()})".encode(), 0)

    held = filelock.FileLock(lock, timeout=0, is_singleton=False, on_acquired=name_the_holder)
    try:
        held.acquire()
    except filelock.Timeout:
        holder = "another process"
        with contextlib.suppress(OSError):
            holder = lock.read_text().strip() or holder
        raise CliError(f"{used} is in use by {holder}; wait for it or choose another") from None
    try:
        yield
    finally:
        if remove:
            with contextlib.suppress(OSError):
                lock.unlink()
        held.release()


def folder_lock(folder: Path, what: str):
    """The lock of a folder that one process writes (a run folder, a --save-adv folder)."""
    return file_lock(Path(folder) / ".lock", what, str(folder))


# ============================================================================ runtime


def pick_device(name: str) -> torch.device:
    """'auto' (CUDA when there is one), 'cpu', 'cuda', 'cuda:N' or 'mps'; anything else is refused."""
    name = str(name).strip().lower()
    if not DEVICE_PATTERN.match(name):
        raise unknown("device", name, DEVICES)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    kind = {"cuda": torch.cuda.device_count(), "mps": int(torch.backends.mps.is_available())}
    if (device.index or 0) >= kind.get(device.type, 1):
        raise CliError(f"--device {name}: this machine has no {device.type.upper()} device there")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type.upper()}, {threads_text(torch.get_num_threads())}"


def model_device(model: nn.Module) -> Optional[torch.device]:
    """Where a model's weights are (None for a model without any)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return None


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA and on a CPU; a no-op context elsewhere."""
    if enabled and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_bf16() -> str:
    """What this CPU has for bf16 matrix products: "amx" (Intel's AMX tiles), "avx512_bf16"
    (dot-product instructions, e.g. AMD Zen 4) or "" (none known: bf16 is converted, slower)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = set(next(x for x in lines if x.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration, IndexError):
        flags = set()
    if "amx_bf16" in flags:
        return "amx"
    return "avx512_bf16" if "avx512_bf16" in flags else ""


# Where --amp is on unless said otherwise: the CPUs whose bf16 units the README's study
# measured without a loss of accuracy.
AMP_BY_DEFAULT = {"amx"}


def default_amp(device: torch.device, bf16: str) -> tuple[bool, str]:
    """--amp when not given, and a hint: on where the CPU has bf16 matrix units; off elsewhere
    (CUDA included), with a hint where the CPU computes bf16 natively."""
    if device.type != "cpu" or not bf16:
        return False, ""
    if bf16 in AMP_BY_DEFAULT:
        return True, ""
    return False, (
        f"hint: this CPU computes bf16 natively ({bf16}): --amp made PART epochs 1.4x faster "
        "with the same accuracy on a 2-core AMD EPYC (README: Speed)"
    )


def derived_seed(*parts: int | str) -> int:
    """A 63-bit seed from (seed, epoch, rank, ...): independent streams, reproducible."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def rng_fork(device: torch.device):
    """A scope whose changes to the global RNG (CPU, and this GPU) are undone on exit."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode inside, the previous mode restored on exit."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def full_fp32():
    """True fp32 for evaluation: PyTorch lets cuDNN convolutions use TF32 (10-bit mantissa)
    on Ampere and newer GPUs by default; here neither convolutions nor matmuls may. No
    effect on the CPU. An autocast around it (bf16 training, a notebook's) is off inside.
    The previous settings come back on exit."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    try:
        with contextlib.ExitStack() as stack:
            for device in devices:
                stack.enter_context(torch.autocast(device, enabled=False))
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@dataclasses.dataclass(frozen=True)
class Dist:
    """The process group as seen by this process (world 1: plain single process)."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


ONE_PROCESS = Dist()


def dist_from_env() -> Dist:
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return ONE_PROCESS
        return Dist(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world)
    except ValueError:
        raise CliError("WORLD_SIZE, RANK and LOCAL_RANK must be integers") from None


def process_device(name: str, dist: Dist) -> torch.device:
    """This process's device: under torchrun on CUDA, the GPU of its local rank."""
    device = pick_device(name)
    if dist.world > 1 and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    return device


@contextlib.contextmanager
def process_group(dist: Dist, device: torch.device):
    """torch.distributed for torchrun launches (NCCL on CUDA, gloo on CPU); nothing otherwise."""
    if dist.world == 1:
        yield
        return
    import torch.distributed as td

    if device.type == "cuda":
        torch.cuda.set_device(device)
    td.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        rank=dist.rank,
        world_size=dist.world,
        device_id=device if device.type == "cuda" else None,
    )
    try:
        yield
        gc.collect()  # drop any DDP wrapper still holding the group before it is torn down
        td.barrier()  # leave together: a rank that tears the group down under a busy one aborts it
    finally:
        td.destroy_process_group()


def all_sum(t: Tensor, dist: Dist) -> Tensor:
    """Sum over processes (in place); the tensor itself in a single process."""
    if dist.world > 1:
        torch.distributed.all_reduce(t)
    return t


def same_buffers(model: Optional[nn.Module], dist: Dist) -> None:
    """Every process takes rank 0's buffers (BatchNorm statistics, updated on each shard): the
    epoch's figures, `best`, the saved weights and a resume are then of one model."""
    if model is not None and dist.world > 1:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, 0)


# ============================================================================ data


def check_images(x: Any, what: str = "images", uint8: bool = False) -> None:
    """Images as the models and attacks take them: a tensor [N, C, H, W] (not channels-last),
    floating point in [0, 1], or uint8 (0..255) where `uint8`. Floats of 0..255 are refused,
    never rescaled by a guess. One reduction (a sync on a GPU) per call."""
    if not torch.is_tensor(x) or x.dim() != 4:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{what} must be a torch.Tensor batch [N, C, H, W], got {shape}")
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        raise ValueError(
            f"{what} of shape {tuple(x.shape)} look channels-last [N, H, W, C]: pass x.permute(0, 3, 1, 2)"
        )
    if uint8 and x.dtype == torch.uint8:
        return
    if not x.is_floating_point():
        raise ValueError(
            f"{what} must be floating point in [0, 1], got {x.dtype} (part.to_float(x) converts uint8)"
        )
    low, high = (float(v) for v in torch.aminmax(x.detach())) if x.numel() else (0.0, 0.0)
    if not (0 <= low and high <= 1):  # written so that NaN fails too
        hint = (
            " (0..255 values: divide by 255, or pass uint8 to part.to_float)" if high > 1.5 else ""
        )
        raise ValueError(f"{what} must be in [0, 1], these range over [{low:g}, {high:g}]{hint}")


def check_labels(y: Any, n: int, device: torch.device, what: str = "labels") -> None:
    """Labels [N] of integer class indices, beside their images."""
    ints = (torch.int8, torch.int16, torch.int32, torch.int64)
    if not torch.is_tensor(y) or y.dim() != 1 or y.dtype not in ints:
        shape = tuple(y.shape) if torch.is_tensor(y) else type(y).__name__
        raise ValueError(
            f"{what} must be a 1-D tensor of integer class indices, got {getattr(y, 'dtype', '')} {shape}"
        )
    if len(y) != n:
        raise ValueError(f"{what}: {len(y)} labels for {n} images")
    if y.device != device:
        raise ValueError(f"{what} are on {y.device}, the images on {device}")


def in_model_dtype(model: nn.Module, x: Tensor) -> Tensor:
    """Images in the dtype of the model's weights: numpy's float64 for a float32 model."""
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    return x if weight is None or x.dtype == weight.dtype else x.to(weight.dtype)


def check_model_takes(model: nn.Module, x: Tensor) -> int:
    """Images the model can take: the channels its first convolution takes (when it has
    one), and a size it computes on (one image through it). Returns its number of outputs."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and x.shape[1] != first.in_channels:
        raise ValueError(
            f"images of {x.shape[1]} channels; the model takes {first.in_channels} "
            f"(its first convolution), images of shape {tuple(x.shape)}"
        )
    try:
        with torch.no_grad(), eval_mode(model), full_fp32():
            return model(in_model_dtype(model, to_float(x[:1]))).shape[-1]
    except RuntimeError as e:
        raise ValueError(
            f"the model cannot take images of shape {tuple(x.shape[1:])} ({first_line(e)})"
        ) from None


@dataclasses.dataclass
class Split:
    """One split: images [N, C, H, W] as uint8 (0..255, as decoded and cached) or floating
    point in [0, 1] (what torchvision's ToTensor and RobustBench give), int64 labels [N],
    class names (default "0", "1", ...). Checked when made: a split never holds input it
    would misread."""

    x: Tensor
    y: Tensor
    classes: Optional[list[str]] = None

    def __post_init__(self):
        self.x, self.y = torch.as_tensor(self.x), torch.as_tensor(self.y)
        check_images(self.x, "Split images", uint8=True)
        check_labels(self.y, len(self.x), self.x.device, "Split labels")
        self.y = self.y.long()
        if self.classes is None:
            self.classes = [str(c) for c in range(int(self.y.max()) + 1 if len(self.y) else 0)]
        if len(self.y) and not 0 <= int(self.y.min()) <= int(self.y.max()) < len(self.classes):
            raise ValueError(
                f"Split labels range over [{int(self.y.min())}, {int(self.y.max())}], "
                f"outside the {len(self.classes)} classes"
            )

    def first(self, n: int) -> "Split":
        """The first n images (all of them if there are fewer)."""
        return Split(self.x[:n], self.y[:n], self.classes)

    def limited(self, limit: int) -> "Split":
        """The first `limit` images; a limit of 0 means no limit (as train-subset / eval-subset)."""
        return self.first(limit) if limit else self

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.x.to(device), self.y.to(device), self.classes)

    def select(self, index: Tensor) -> "Split":
        return Split(self.x[index], self.y[index], self.classes)


def as_split(data: Any) -> Split:
    """What a notebook passes as data: a Split, or an (images, labels) pair of tensors or
    arrays (uint8 0..255 or floating point in [0, 1], RobustBench's convention)."""
    if isinstance(data, Split):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return Split(torch.as_tensor(data[0]), torch.as_tensor(data[1]))
    raise ValueError(
        f"data must be a part.Split or an (images, labels) pair, got {type(data).__name__}"
    )


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
MAX_DECODE_PIXELS = (
    40_000_000  # a 40 MP photo decodes to 120 MB; a 12000 x 12000 PNG of 140 KB would take 1.3 GB
)
MAX_IMAGE_SIZE = (
    1024  # the largest --image-size; a 1024 px split of 50k images is already 150 GB of uint8
)


def synthetic_split(n: int, seed: int, size: int = 32) -> Split:
    """Procedural, learnable images: one of ten shapes (the class) in a random colour, position
    and scale on a textured background. Deterministic in (n, seed, size); no per-image Python."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    y = torch.randint(0, 10, (n,), generator=g)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = coords.view(1, 1, size, 1), coords.view(1, 1, 1, size)
    bg = F.interpolate(
        rand(n, 3, 4, 4) * 0.6 + 0.2, size=(size, size), mode="bilinear", align_corners=False
    )
    angle, freq, phase = (
        rand(n, 1, 1, 1) * math.pi,
        0.3 + rand(n, 1, 1, 1) * 0.6,
        rand(n, 1, 1, 1) * 2 * math.pi,
    )
    bg = bg + 0.08 * torch.sin(freq * (xx * angle.cos() + yy * angle.sin()) + phase)
    bg = bg + 0.03 * torch.randn(n, 3, size, size, generator=g)
    r = size * (0.18 + 0.12 * rand(n, 1, 1, 1))
    cx, cy = size * (0.3 + 0.4 * rand(n, 1, 1, 1)), size * (0.3 + 0.4 * rand(n, 1, 1, 1))
    dx, dy = (xx - cx) / r, (yy - cy) / r  # shape coordinates, outer radius 1
    ax, ay = dx.abs(), dy.abs()
    d, box = (dx**2 + dy**2).sqrt(), torch.maximum(ax, ay)
    shapes = torch.stack(
        [
            d < 1,  # disk
            box < 0.8,  # square
            (d > 0.55) & (d < 1),  # ring
            ((ax < 0.3) & (ay < 1)) | ((ay < 0.3) & (ax < 1)),  # plus
            ((ax - ay).abs() < 0.3) & (box < 0.9),  # cross
            (dy > -0.8) & (dy < 0.8) & (ax < (dy + 0.8) * 0.56),  # triangle
            (ay < 0.3) & (ax < 1),  # hbar
            (ax < 0.3) & (ay < 1),  # vbar
            ax + ay < 1,  # diamond
            (box < 0.9) & (box > 0.55),  # frame
        ]
    )  # [10, n, 1, H, W]
    mask = shapes[y, torch.arange(n)].float()
    # Moderate contrast (0.2-0.3 per channel, brighter on dark backgrounds): easy to learn, yet an
    # undefended model falls to ~0% at 8/255, as on natural images.
    dark = bg.mean((1, 2, 3), keepdim=True) < 0.5
    fg = bg.mean((2, 3), keepdim=True) + torch.where(dark, 1.0, -1.0) * (
        0.2 + 0.1 * rand(n, 3, 1, 1)
    )
    x = (bg * (1 - mask) + fg * mask).clamp(0, 1)
    return Split((x * 255).round().to(torch.uint8), y, list(SYNTHETIC_CLASSES))


def _is_image(p: Path) -> bool:
    # Hidden files are never images of the data set (macOS writes `._name.jpg` resource forks).
    return p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_image(p)) if folder.is_dir() else []


def interleave(per_class: list[list[Any]]) -> list[tuple[Any, int]]:
    """(item, label) pairs in the canonical class-interleaved order: the first item of every
    class, then the second, ..., so that any first N items are class-balanced."""
    longest = max((len(items) for items in per_class), default=0)
    return [
        (items[i], label)
        for i in range(longest)
        for label, items in enumerate(per_class)
        if i < len(items)
    ]


def _class_folder_files(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """root/<class>/* with classes sorted = labels, class-interleaved."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = [_list_images(root / c) for c in classes]
    empty = [c for c, files in zip(classes, per_class, strict=True) if not files]
    if empty and len(empty) < len(classes):
        note(
            f"warning: {len(empty)} class folder(s) of {root} hold no images ({', '.join(empty[:5])}); "
            "they stay classes of the model but are never seen"
        )
    pairs = interleave(per_class)
    return [p for p, _ in pairs], [label for _, label in pairs], classes


def _decode_image(path: Path, size: int) -> Tensor:
    """One image file -> uint8 [3, size, size]: 8-bit modes through RGB, 16-bit greyscale
    scaled (not clipped) to 8 bits, resized (bilinear) where it differs."""
    import numpy as np
    from PIL import Image

    # PIL warns of a bomb at open; the size check below says it in one line
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        opened = Image.open(path)  # reads the header only: the size is known before decoding
    with opened as im:
        if im.width * im.height > MAX_DECODE_PIXELS:
            raise ValueError(
                f"{im.width}x{im.height} pixels is more than part decodes ({MAX_DECODE_PIXELS / 1e6:.0f} M); "
                "resize the image"
            )
        if im.mode.startswith("I;16"):
            grey = np.asarray(im).astype(np.float64) / 257.0  # 65535 -> 255
            im = Image.fromarray(grey.round().clip(0, 255).astype(np.uint8), mode="L")
        elif im.mode in ("I", "F"):
            raise ValueError(
                f"{'32-bit integer' if im.mode == 'I' else 'floating-point'} pixels are not supported; "
                "save it as 8-bit RGB or greyscale"
            )
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        return torch.from_numpy(np.array(im)).permute(2, 0, 1)


def _decode_files(files: list[Path], size: int) -> Tensor:
    """Decode image files to uint8 [N, 3, size, size]; a file that fails stops with its name.
    Large folders say so (and show a bar with an ETA on a terminal): 50,000 JPEGs take minutes."""
    out = torch.empty(len(files), 3, size, size, dtype=torch.uint8)
    if len(files) >= 1000:
        note(f"decoding {len(files):,} images of {files[0].parent.parent} (once: they are cached)")
    with live_progress(len(files) >= 1000) as bars:
        task = bars.add_task("decoding", total=len(files), extra="") if bars else None
        for i, path in enumerate(files):
            try:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
                out[i] = _decode_image(path, size)
            except Exception as e:
                raise CliError(f"cannot decode image {path}: {first_line(e)}") from None
            if bars is not None and ((i + 1) % 100 == 0 or i + 1 == len(files)):
                bars.update(task, completed=i + 1)
    return out


def _cached(
    cache_dir: str, name: str, size: int, files: list, labels: list, classes: list
) -> Split:
    """The images decoded once and kept as uint8 in the cache (keyed by the files, sizes and
    mtimes); a damaged entry is decoded again, an unwritable cache only costs time."""
    h = hashlib.sha1(f"{FORMAT}|{name}|{size}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    path = Path(cache_dir).expanduser() / f"{name}-{size}px-{h.hexdigest()[:16]}.safetensors"
    if path.is_file():
        from safetensors.torch import load_file

        try:  # memory-mapped: a data set's cache need not be read into memory twice or hashed
            t, kept = load_file(str(path)), json.loads(safetensors_metadata(path)["classes"])
            if kept == classes and tuple(t["x"].shape) == (len(files), 3, size, size):
                return Split(t["x"], t["y"], classes)  # which checks dtypes and labels
        except Exception:  # unreadable or inconsistent: decoded again below
            pass
        note(f"note: the cache entry {path} was damaged; decoding the images again")
    split = Split(_decode_files(files, size), torch.tensor(labels, dtype=torch.int64), classes)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(path, {"x": split.x, "y": split.y}, {"classes": json.dumps(classes)})
    except Exception as e:  # read-only folder, full disk, ...
        note(
            f"note: cannot write the cache in {path.parent} ({first_line(e)}); images will be decoded again next run"
        )
    return split


def _folder_split(root: Path, split: str, size: int, cache_dir: str, name: str) -> Split:
    folder = root / split
    if split == "test" and not folder.is_dir() and (root / "val").is_dir():
        folder = root / "val"
    if not folder.is_dir():
        raise DataMissing(f"{folder} not found: expected image folders {folder}/<class>/*")
    files, labels, classes = _class_folder_files(folder)
    if not files:
        raise DataMissing(f"no images in {folder}/<class>/")
    return _cached(cache_dir, f"{name}-{split}", size, files, labels, classes)


def _has_class_folders(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_dir() for p in folder.iterdir())


@contextlib.contextmanager
def _undo_partial_download(root: Path):
    """A failed download leaves nothing behind: files (and the folder) it created go again."""
    import shutil

    existed = root.exists()
    before = set(root.iterdir()) if existed and root.is_dir() else set()
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(root, ignore_errors=True)
        elif root.is_dir():
            for p in set(root.iterdir()) - before:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        raise


def _torchvision_split(dataset: str, split: str, root: Path) -> Split:
    import socket

    import torchvision.datasets as tvd

    train = split == "train"
    make = {
        "cifar10": lambda dl: tvd.CIFAR10(str(root), train=train, download=dl),
        "cifar100": lambda dl: tvd.CIFAR100(str(root), train=train, download=dl),
        "svhn": lambda dl: tvd.SVHN(str(root), split=split, download=dl),
    }[dataset]
    old = socket.getdefaulttimeout()
    try:
        try:
            ds = make(False)
        except RuntimeError:  # not there (or corrupt): download it, where the network allows
            socket.setdefaulttimeout(30)
            with _undo_partial_download(root), contextlib.redirect_stdout(sys.stderr):
                ds = make(True)
    except ImportError as e:  # torchvision reads SVHN's .mat files with scipy
        raise CliError(f"{dataset} needs an extra package ({e}): pip install scipy") from None
    except Exception as e:  # network errors come in many types; all mean the same here
        raise DataMissing(
            f"{dataset} not found in {root} and could not be downloaded ({type(e).__name__}). "
            f"Put torchvision's copy in {root}, or an image-folder copy as {root}/train/<class>/ and {root}/test/<class>/"
        ) from None
    finally:
        socket.setdefaulttimeout(old)
    if dataset == "svhn":
        x, y, classes = torch.from_numpy(ds.data), ds.labels, [str(d) for d in range(10)]
    else:
        x, y, classes = torch.from_numpy(ds.data).permute(0, 3, 1, 2), ds.targets, ds.classes
    return Split(x.contiguous(), torch.as_tensor(y, dtype=torch.int64), list(classes))


def _tinyimagenet_split(root: Path, split: str, cache_dir: str) -> Split:
    if (root / "tiny-imagenet-200").is_dir():
        root = root / "tiny-imagenet-200"
    if not (root / "train").is_dir():
        raise DataMissing(
            f"tiny-imagenet-200 not found in {root}: expected train/<wnid>/images and val/images + val/val_annotations.txt"
        )
    classes = sorted(
        p.name for p in (root / "train").iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    index = {c: i for i, c in enumerate(classes)}
    if split == "train":
        pairs = interleave([_list_images(root / "train" / c / "images") for c in classes])
    else:
        ann = root / "val" / "val_annotations.txt"
        if not ann.is_file():
            raise DataMissing(f"{ann} not found")
        rows = [line.split("\t") + [""] for line in ann.read_text(errors="replace").splitlines()]
        pairs = [(root / "val/images" / r[0], index[r[1]]) for r in rows if r[1] in index]
    if not pairs:
        raise DataMissing(f"no images for the {split} split of tiny-imagenet-200 in {root}")
    files, labels = [p for p, _ in pairs], [label for _, label in pairs]
    return _cached(cache_dir, f"tinyimagenet-{split}", 64, files, labels, classes)


def load_split(
    dataset: str,
    split: str,
    data_dir: str | Path,
    cache_dir: str | Path = DEFAULT_CACHE,
    image_size: int = 32,
) -> Split:
    """One split ('train' or 'test') as uint8 tensors on the CPU, in canonical order."""
    if dataset not in DATASETS:
        raise unknown("dataset", dataset, DATASETS)
    if dataset == "synthetic":  # fixed seeds: the same data in every run, whatever --seed
        return synthetic_split(
            5000 if split == "train" else 1000, seed=1 if split == "train" else 2, size=32
        )
    if not 8 <= image_size <= MAX_IMAGE_SIZE:
        raise CliError(f"image size must be 8 to {MAX_IMAGE_SIZE} pixels, got {image_size}")
    root, cache_dir = Path(data_dir).expanduser(), str(cache_dir)
    if dataset == "tinyimagenet":
        return _tinyimagenet_split(root, split, cache_dir)
    if dataset == "imagefolder":
        if not root.is_dir():
            raise DataMissing(
                f"data folder {root} not found: imagefolder expects {root}/train/<class>/ and {root}/test/<class>/ (or val/)"
            )
        return _folder_split(
            root.resolve(), split, image_size, cache_dir, f"imagefolder-{root.resolve().name}"
        )
    if dataset in ("cifar10", "cifar100") and (
        _has_class_folders(root / split) or (split == "test" and _has_class_folders(root / "val"))
    ):
        return _folder_split(root.resolve(), split, 32, cache_dir, dataset)
    return _torchvision_split(dataset, split, root)


def carve_validation(train: Split, size: int, seed: int) -> tuple[Split, Split]:
    """(train, validation): size // C images per class (the remainder to the first classes)
    taken out of the training split, chosen by the seed alone; both in canonical order."""
    if size == 0:
        return train, train.first(0)
    classes = len(train.classes)
    counts = torch.bincount(train.y, minlength=classes)
    want = torch.full((classes,), size // classes) + (torch.arange(classes) < size % classes)
    if size > len(train.y) - classes or bool((want >= counts).any()):
        raise CliError(
            f"--val-size {size} is too large for a training set of {len(train.y)} images in {classes} classes"
        )
    g = torch.Generator().manual_seed(derived_seed(seed, "validation"))
    chosen = torch.zeros(len(train.y), dtype=torch.bool)
    for c in range(classes):
        members = (train.y == c).nonzero().squeeze(1)
        chosen[members[torch.randperm(len(members), generator=g)[: int(want[c])]]] = True
    return train.select(~chosen), train.select(chosen)


def fingerprint(split: Split) -> str:
    """A short hash of a split's pixels, labels and classes (to recognise the data on --resume)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(split.x.contiguous().cpu().numpy().tobytes())
    h.update(split.y.contiguous().cpu().numpy().tobytes())
    h.update(json.dumps(split.classes).encode())
    return h.hexdigest()


def augment(x: Tensor, flip: bool, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Random crop with zero padding + horizontal flip on a whole uint8 batch, on its device."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    off = torch.randint(0, 2 * pad + 1, (2, b, 1, 1), device=x.device, generator=generator)
    rows = (off[0] + torch.arange(h, device=x.device).view(1, h, 1)).expand(b, h, w)
    cols = (off[1] + torch.arange(w, device=x.device).view(1, 1, w)).expand(b, h, w)
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # [B, C, H, W]
    if flip:
        mirror = torch.rand(b, 1, 1, 1, device=x.device, generator=generator) < 0.5
        out = torch.where(mirror, out.flip(3), out)
    return out


def to_float(images: Tensor) -> Tensor:
    """Images as the models take them: uint8 divided by 255; floating point checked to lie in
    [0, 1] and returned as it is (float32 at least), never divided again."""
    if torch.is_tensor(images) and images.dtype == torch.uint8:
        return images.float().div_(255)
    check_images(images)
    return images if images.dtype in (torch.float32, torch.float64) else images.float()


# ============================================================================ models
# All models take images in [0, 1]. The built-in ones expose features(x) -> last-block
# feature map and head(a) -> logits, so the CAM needs no hooks; their parameter names match
# the reference CIFAR code (kuangliu/pytorch-cifar ResNet-18 as in TRADES/MART/AutoAttack,
# fast_adversarial's PreAct ResNet-18, TRADES' WRN-34-10) so their state dicts load. Any
# torchvision or timm classifier can be used as `torchvision:NAME` / `timm:NAME`; its CAM
# layer is found by a forward hook (`cam_layer`).


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        return self.conv2(F.relu(self.bn2(out))) + skip


def _stages(block: type, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2)) -> list[nn.Sequential]:
    stages, cin = [], 64
    for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
        layers = []
        for j in range(n):
            layers.append(block(cin, w, 2 if (i > 0 and j == 0) else 1))
            cin = w
        stages.append(nn.Sequential(*layers))
    return stages


class FeaturesHead(nn.Module):
    """The built-in models: features() up to the CAM layer (a [B, C, h, w] map), head() from
    there to the logits. The CAM, compiled or not, hooks in between."""

    def features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def head(self, a: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class ResNet18(FeaturesHead):
    """CIFAR ResNet-18: 3x3 stem, no max-pool; CAM layer `layer4` (512x4x4 at 32x32)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1, self.layer2, self.layer3, self.layer4 = _stages(BasicBlock)
        self.linear = nn.Linear(512, num_classes)

    def features(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(out))))

    def head(self, a: Tensor) -> Tensor:
        return self.linear(F.adaptive_avg_pool2d(a, 1).flatten(1))


class PreActResNet18(FeaturesHead):
    """PreAct ResNet-18 (fast_adversarial); CAM layer `layer4`, final bn + ReLU in the head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.layer1, self.layer2, self.layer3, self.layer4 = _stages(PreActBlock)
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))

    def head(self, a: Tensor) -> Tensor:
        return self.linear(F.adaptive_avg_pool2d(F.relu(self.bn(a)), 1).flatten(1))


class WideBlock(nn.Module):
    """TRADES' WRN block (names bn1 relu1 conv1 bn2 relu2 conv2 convShortcut; dropout 0)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        return out + (x if self.equal else self.convShortcut(pre))


class NetworkBlock(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            *[WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(FeaturesHead):
    """WRN-34-10 as in TRADES/MART; CAM layer `block3` (640x8x8 at 32x32)."""

    def __init__(self, num_classes: int = 10, depth: int = 34, widen: int = 10):
        super().__init__()
        n, w = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, w[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, w[0], w[1], 1)
        self.block2 = NetworkBlock(n, w[1], w[2], 2)
        self.block3 = NetworkBlock(n, w[2], w[3], 2)
        self.bn1 = nn.BatchNorm2d(w[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(w[3], num_classes)
        for m in self.modules():  # TRADES' initialisation
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def features(self, x: Tensor) -> Tensor:
        return self.block3(self.block2(self.block1(self.conv1(x))))

    def head(self, a: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.relu(self.bn1(a)), 1).flatten(1))


class SmallCNN(FeaturesHead):
    """A small, fast network for CPU runs and tests: four conv-BN-ReLU layers, GAP, linear."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (32, 64, 128, 128)):
        super().__init__()
        layers, cin = [], 3
        for i, w in enumerate(widths):
            layers += [
                nn.Conv2d(cin, w, 3, 2 if i in (1, 2) else 1, 1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(),
            ]
            cin = w
        self.body = nn.Sequential(*layers)
        self.linear = nn.Linear(cin, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def head(self, a: Tensor) -> Tensor:
        return self.linear(F.adaptive_avg_pool2d(a, 1).flatten(1))


# A new built-in architecture: a class with features()/head() and one line here.
BUILTIN_MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet18": ResNet18,
    "preact-resnet18": PreActResNet18,
    "wrn-34-10": WideResNet,
    "cnn": SmallCNN,
}
ARCHS = tuple(BUILTIN_MODELS)
TORCHVISION, TIMM, ROBUSTBENCH = "torchvision:", "timm:", "robustbench:"
ZOOS = (TORCHVISION, TIMM, ROBUSTBENCH)
# The CAM layer of common torchvision families: their last convolutional stage. timm
# models list their stages themselves (`feature_info`).
TORCHVISION_CAM_LAYERS = {
    "resnet": "layer4",
    "resnext": "layer4",
    "wide_resnet": "layer4",
    "regnet": "trunk_output",
    "densenet": "features",
    "mobilenet": "features",
    "efficientnet": "features",
    "convnext": "features",
    "vgg": "features",
    "squeezenet": "features",
    "alexnet": "features",
    "mnasnet": "layers",
    "shufflenet": "conv5",
    "googlenet": "inception5b",
    "inception": "Mixed_7c",
}
# transformers: their blocks give tokens, not [N, C, H, W] maps
TOKEN_FAMILIES = ("vit", "swin", "maxvit", "deit", "beit", "eva")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ARCH_HELP = (
    f"{', '.join(ARCHS)}, torchvision:NAME, timm:NAME or robustbench:NAME (e.g. "
    "torchvision:resnet50, timm:convnext_atto, robustbench:Standard)"
)


def is_zoo(name: str) -> bool:
    return name.startswith(ZOOS)


def torchvision_zoo(name: str, num_classes: int, image_size: int) -> tuple:
    """torchvision's classifier with ImageNet's normalisation; its family's CAM layer."""
    import torchvision.models as tvm

    if name not in tvm.list_models(module=tvm):
        raise CliError(
            f"unknown torchvision classifier {name!r} (e.g. resnet18, resnet50, mobilenet_v3_small, "
            f"efficientnet_b0, convnext_tiny, densenet121)"
        )
    inception = name.startswith(("googlenet", "inception"))
    extra = {"aux_logits": False, "init_weights": True} if inception else {}
    net = tvm.get_model(name, weights=None, num_classes=num_classes, **extra)
    family = max((f for f in TORCHVISION_CAM_LAYERS if name.startswith(f)), key=len, default=None)
    return net, IMAGENET_MEAN, IMAGENET_STD, None, TORCHVISION_CAM_LAYERS.get(family)


# Model zoos: prefix -> builder(name, num_classes, image_size) -> (net, mean, std, its stages
# or None, the preferred CAM stage). part_tools adds timm's and RobustBench's.
ZOO_BUILDERS: dict[str, Callable[..., tuple]] = {"torchvision": torchvision_zoo}
# Checkpoints named in a zoo instead of a file, added by other modules (part_tools:
# robustbench:NAME in RobustBench's folder layout): prefix -> fn(path, arch, dataset, threat,
# model_dir) -> (the file, its architecture).
NAMED_CHECKPOINTS: dict[str, Callable[..., tuple[Path, Optional[str]]]] = {}


def checkpoint_source(
    path: Path,
    arch: Optional[str],
    dataset: Optional[str],
    threat: str = "linf",
    model_dir: str | Path = "models",
) -> tuple[Path, Optional[str]]:
    """A checkpoint argument and --arch as a file and its architecture: a file as given, a
    zoo's name (or an --arch of a zoo) through NAMED_CHECKPOINTS."""
    for prefix, resolve in NAMED_CHECKPOINTS.items():
        if str(path).startswith(prefix) or (arch or "").startswith(prefix):
            return resolve(path, arch, dataset, threat, model_dir)
    if ROBUSTBENCH in (str(path)[: len(ROBUSTBENCH)], (arch or "")[: len(ROBUSTBENCH)]):
        raise CliError("robustbench:NAME models come with part_tools.py (pip install .)")
    return path, arch


class ZooNet(nn.Module):
    """A torchvision, timm or RobustBench classifier (random weights until loaded) that takes
    images in [0, 1]: the normalisation of its recipes (ImageNet's; a timm model's own) is the
    first step of its forward (RobustBench models normalise themselves). `cam_layer` names the
    module (inside `net`) whose output the CAM uses."""

    def __init__(
        self, name: str, num_classes: int, cam_layer: Optional[str] = None, image_size: int = 32
    ):
        super().__init__()
        zoo, name = name.split(":", 1)
        self.zoo = zoo
        if zoo not in ZOO_BUILDERS:
            raise CliError(f"{zoo}:NAME models come with part_tools.py (pip install .)")
        self.net, mean, std, stages, preferred = ZOO_BUILDERS[zoo](name, num_classes, image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        if cam_layer:
            self.cam_layer = f"net.{cam_layer}"
        else:  # a transformer's blocks give tokens: no default, but the probe still checks the image size
            tokens = name.startswith(TOKEN_FAMILIES)
            self.cam_layer = self._default_cam_layer(
                None if tokens else preferred, image_size, [] if tokens else stages
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std)

    def _default_cam_layer(
        self, preferred: Optional[str], image_size: int, stages: Optional[list[str]]
    ) -> Optional[str]:
        """The family's last stage if its feature map is at least 4 x 4 at this image size
        (ImageNet models shrink 32 px inputs to 1 x 1 there, a CAM of one value), else the
        deepest stage that still is: among `stages` (timm's own list; none for transformers),
        else among the modules one or two levels down; found by one forward."""
        shapes: dict[str, tuple] = {}  # in the order of their last call
        pools = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Identity, nn.Dropout)  # add nothing

        def seen(name: str, output: Any) -> None:
            shapes.pop(name, None)
            shapes[name] = tuple(getattr(output, "shape", ()))

        hooks = [
            m.register_forward_hook(lambda m, i, o, name=name: seen(name, o))
            for name, m in self.net.named_modules()
            if name
            and (name in stages if stages is not None else name.count(".") <= 1)
            and not (stages is None and isinstance(m, pools))
        ]
        try:
            with torch.no_grad(), eval_mode(self):
                self(torch.zeros(1, 3, image_size, image_size))
        except (RuntimeError, AssertionError, ValueError) as e:
            raise CliError(
                f"the model cannot take {image_size} px images ({first_line(e)})"
            ) from None
        finally:
            for h in hooks:
                h.remove()
        usable = [name for name, shape in shapes.items() if len(shape) == 4 and min(shape[2:]) >= 4]
        if preferred in usable:
            return f"net.{preferred}"
        return f"net.{usable[-1]}" if usable else None

    def adapt_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A plain torchvision/timm/RobustBench state dict (no `net.` prefix, no normalisation
        buffers) fits too. RobustBench files leave out the constants some of its models set
        when built (mu/sigma, normalize.mean, ...): those buffers keep their built values,
        as RobustBench's own loader does."""
        if not any(k.startswith("net.") for k in state):
            state = {f"net.{k}": v for k, v in state.items()}
        if self.zoo == "robustbench":
            learned = ("running_mean", "running_var", "num_batches_tracked")
            state = {
                **{f"net.{k}": b for k, b in self.net.named_buffers() if not k.endswith(learned)},
                **state,
            }
        return {"mean": self.mean, "std": self.std, **state}


def build_model(
    name: str, num_classes: int = 10, cam_layer: Optional[str] = None, image_size: int = 32
) -> nn.Module:
    """A fresh model taking images in [0, 1]: a built-in name or a zoo's (torchvision:NAME, ...).
    `cam_layer` moves the CAM to that module; zoo models choose theirs for `image_size`."""
    if not isinstance(num_classes, int) or not 2 <= num_classes <= 100_000:
        raise CliError(f"a classifier needs between 2 and 100000 classes, got {num_classes!r}")
    if is_zoo(name):
        model = ZooNet(name, num_classes, cam_layer, image_size)
    elif name in BUILTIN_MODELS:
        model = BUILTIN_MODELS[name](num_classes)
        model.cam_layer = cam_layer
    else:
        raise unknown("model", name, [ARCH_HELP])
    if model.cam_layer is not None:
        try:
            model.get_submodule(model.cam_layer)
        except AttributeError:
            tops = ", ".join(
                n for n, _ in (model.net if isinstance(model, ZooNet) else model).named_children()
            )
            raise CliError(
                f"--cam-layer {cam_layer}: {name} has no such module (its top-level modules: {tops})"
            ) from None
    return model


def channels_last(model: nn.Module) -> nn.Module:
    """NHWC weights: every convolution then runs in the channels-last layout (the first one
    converts its NCHW input), which oneDNN and cuDNN run faster; values are unchanged.
    Measured on 2 CPU cores, a PART step (median, interleaved runs): cnn batch 128 PGD-10
    687 -> 501 ms, resnet18 batch 64 PGD-3 2050 -> 1760 ms. Checkpoints store plain tensors."""
    return model.to(memory_format=torch.channels_last)


# ============================================================================ CAM
# One core (activations A at the CAM layer, dY_c/dA, weight, sum over channels, ReLU,
# min-max per image) and one small weight function per method, as in pytorch-grad-cam.
# A new CAM method is one function and one line in CAM_WEIGHTS.


def _gradcam_weights(acts: Tensor, grads: Tensor) -> Tensor:
    """Grad-CAM (Selvaraju et al. 2017): w_k = mean_ij dY_c/dA_kij."""
    return grads.mean((2, 3), keepdim=True)


def _xgradcam_weights(acts: Tensor, grads: Tensor) -> Tensor:
    """XGradCAM (Fu et al. 2020): w_k = sum_ij dY_c/dA_kij A_kij / sum_ij A_kij."""
    return (grads * acts).sum((2, 3), keepdim=True) / (acts.sum((2, 3), keepdim=True) + 1e-7)


def _layercam_weights(acts: Tensor, grads: Tensor) -> Tensor:
    """LayerCAM (Jiang et al. 2021): spatial weights ReLU(dY_c/dA_kij)."""
    return grads.clamp(min=0)


CAM_WEIGHTS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "gradcam": _gradcam_weights,
    "xgradcam": _xgradcam_weights,
    "layercam": _layercam_weights,
}
CAM_METHODS = tuple(CAM_WEIGHTS)


def activations_and_logits(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(A, logits): A [B, K, h, w] at the CAM layer as a leaf that requires grad, and the
    logits computed from it. Only the part after the CAM layer records a graph. Built-in
    models split at features()/head(); others (or a `cam_layer` set by the user) through a
    forward hook that swaps the layer's output for the leaf and turns grad mode on there."""
    layer = getattr(model, "cam_layer", None)
    off = torch.autocast(x.device.type, enabled=False)  # the CAM is computed in fp32
    if layer is None and hasattr(model, "features") and hasattr(model, "head"):
        with torch.no_grad():
            acts = model.features(x)
        acts = acts.to(torch.promote_types(acts.dtype, torch.float32)).requires_grad_(True)
        with torch.enable_grad(), off:
            return acts, model.head(acts)
    if layer is None:
        raise CliError(
            "this model has no convolutional layer known for the CAM: name one with --cam-layer"
        )
    captured: dict[str, Tensor] = {}

    def swap(module: nn.Module, inputs: Any, output: Any) -> Tensor:
        if not torch.is_tensor(output) or output.dim() != 4:
            shape = tuple(output.shape) if torch.is_tensor(output) else type(output).__name__
            raise CliError(
                f"the CAM layer {layer} gives {shape}, not a [N, C, H, W] feature map; choose another --cam-layer"
            )
        # the rest of the forward records a graph (undone by no_grad's exit)
        torch.set_grad_enabled(True)
        captured["acts"] = (
            output.detach()
            .to(torch.promote_types(output.dtype, torch.float32))
            .requires_grad_(True)
        )
        return captured["acts"]

    handle = model.get_submodule(layer).register_forward_hook(swap)
    try:
        with torch.no_grad(), off:
            logits = model(x)
    finally:
        handle.remove()
    return captured["acts"], logits


def cam_from(acts: Tensor, grads: Tensor, method: str) -> Tensor:
    """L = ReLU(sum_k w_k A_k), min-max normalised per image to [0, 1] (zero stays zero)."""
    heat = (CAM_WEIGHTS[method](acts, grads) * acts).sum(1, keepdim=True).clamp(min=0)
    low, high = heat.amin((2, 3), keepdim=True), heat.amax((2, 3), keepdim=True)
    return (heat - low) / (high - low).clamp(min=1e-12)


def class_activation(
    model: nn.Module, x: Tensor, method: str = "gradcam", target: Optional[Tensor] = None
) -> Tensor:
    """Batched CAM at the model's CAM layer, at feature resolution: [B, 1, h, w] in [0, 1].
    One forward and one backward for the whole batch; the gradient is taken with
    torch.autograd.grad w.r.t. the feature map only, so parameter .grad is never touched.
    Y_c is the logit of `target` (default: the predicted class). Runs in eval mode. The
    API's entry: its input is checked here; the loops call _class_activation."""
    if method not in CAM_WEIGHTS:
        raise unknown("CAM method", method, CAM_WEIGHTS)
    check_attack_inputs(model, x, target)
    return _class_activation(model, in_model_dtype(model, x), method, target)


def _class_activation(
    model: nn.Module, x: Tensor, method: str, target: Optional[Tensor] = None
) -> Tensor:
    with eval_mode(model):
        acts, logits = activations_and_logits(model, x)
        with torch.enable_grad():
            if target is None:
                target = logits.argmax(1)
            score = logits.gather(1, target.view(-1, 1)).sum()
            (grads,) = torch.autograd.grad(score, acts)
    return cam_from(acts.detach(), grads, method)


def upsample(cam: Tensor, size: tuple[int, ...]) -> Tensor:
    """A feature-resolution CAM [B, 1, h, w] resized (bilinear) to the image size."""
    if tuple(cam.shape[-2:]) == tuple(size):
        return cam
    return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)


def grad_cam(
    model: nn.Module, x: Tensor, method: str = "gradcam", target: Optional[Tensor] = None
) -> Tensor:
    """The CAM upsampled (bilinear) to the input size: [B, 1, H, W] in [0, 1]."""
    return upsample(class_activation(model, x, method, target), x.shape[-2:]).clamp(0, 1)


# ============================================================================ budget maps
# A rule turns a feature-resolution CAM into a per-pixel L-inf budget ([0, 1] units).
# A new rule is one function (cam, eps, eps_low, size, generator) -> budget and one line in
# MASK_RULES.

Size = tuple[int, int]  # an image's height and width
# matplotlib's `jet` segment data (x, value) per channel, as the authors' mask uses it.
JET = (
    ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
)


def jet(v: Tensor) -> Tensor:
    """matplotlib's 256-entry `jet` lookup table applied to v in [0, 1]: [B,1,H,W] -> [B,3,H,W]."""
    grid = torch.linspace(0, 1, 256, dtype=torch.float64)
    lut = []
    for segments in JET:
        xs = torch.tensor([s[0] for s in segments], dtype=torch.float64)
        ys = torch.tensor([s[1] for s in segments], dtype=torch.float64)
        k = torch.searchsorted(xs, grid, right=True).clamp(1, len(xs) - 1)
        t = (grid - xs[k - 1]) / (xs[k] - xs[k - 1])
        lut.append(ys[k - 1] + t * (ys[k] - ys[k - 1]))
    lut = torch.stack(lut, 1).to(v.device, torch.float32)  # [256, 3]
    index = (v * 256).floor().clamp(0, 255).long()  # matplotlib: x*N, over/under -> ends
    return lut[index.squeeze(1)].permute(0, 3, 1, 2)


def pil_bicubic(cam: Tensor, size: tuple[int, int]) -> Tensor:
    """Pillow's BICUBIC resize of float images (a = -0.5, window clipped and renormalised),
    which the authors' torchcam overlay applies: torch's antialiased bicubic is the same
    filter (within 2e-7 for 4 -> 32 and 8 -> 32/64; tested against Pillow)."""
    return F.interpolate(cam, size=size, mode="bicubic", antialias=True, align_corners=False)


def _zscore_hot(v: Tensor) -> Tensor:
    """Per image, standardise over all its values and mark those above 1 (std: population)."""
    mean = v.mean((1, 2, 3), keepdim=True)
    std = v.std((1, 2, 3), keepdim=True, correction=0)
    return (v - mean) / std.clamp(min=1e-12) > 1


def zscore_rule(cam: Tensor, eps: float, eps_low: float, size: Size, generator=None) -> Tensor:
    """The paper's rule: standardise the upsampled CAM per image; z > 1 keeps `eps` on all
    channels, the rest get `eps_low`. -> [B, 1, H, W]"""
    return torch.where(_zscore_hot(upsample(cam, size)), eps, eps_low)


def official_rule(cam: Tensor, eps: float, eps_low: float, size: Size, generator=None) -> Tensor:
    """The authors' code re-created: Pillow bicubic upsampling, squared, coloured with jet,
    standardised over all H x W x 3 values, > 1 gets `eps`. -> [B, 3, H, W]"""
    heat = pil_bicubic(cam, size)  # Pillow's float images are not clipped; matplotlib clips below
    rgb = (jet(heat.square()) * 255).floor()  # torchcam's uint8 overlay
    return torch.where(_zscore_hot(rgb), eps, eps_low)


def random_rule(cam: Tensor, eps: float, eps_low: float, size: Size, generator=None) -> Tensor:
    """As many `eps` pixels per image as zscore gives, at random positions. -> [B, 1, H, W]"""
    b, n = cam.shape[0], size[0] * size[1]
    count = _zscore_hot(upsample(cam, size)).flatten(1).sum(1, keepdim=True)
    rank = torch.rand(b, n, device=cam.device, generator=generator).argsort(1).argsort(1)
    return torch.where((rank < count).view(b, 1, *size), eps, eps_low)


def uniform_rule(cam: Tensor, eps: float, eps_low: float, size: Size, generator=None) -> Tensor:
    """Every pixel at the per-image mean budget zscore gives (plain AT at PART's budget). -> [B, 1, 1, 1]"""
    return eps_low + (eps - eps_low) * _zscore_hot(upsample(cam, size)).float().mean(
        (1, 2, 3), keepdim=True
    )


def inverse_rule(cam: Tensor, eps: float, eps_low: float, size: Size, generator=None) -> Tensor:
    """The control for "where": as many `eps` pixels per image as zscore gives, on the pixels
    the CAM ranks least important (ties in pixel order). -> [B, 1, H, W]"""
    heat = upsample(cam, size)
    count = _zscore_hot(heat).flatten(1).sum(1, keepdim=True)
    rank = heat.flatten(1).argsort(dim=1, stable=True).argsort(1)  # 0: the least important pixel
    return torch.where((rank < count).view(cam.shape[0], 1, *size), eps, eps_low)


def quadrant_rule(corner: str) -> Callable[..., Tensor]:
    """The paper's Fig. 1: `eps_low` on one image quadrant (tl, tr, bl, br), `eps` on the
    other three; no CAM. -> [B, 1, H, W]"""

    def rule(cam: Tensor, eps: float, eps_low: float, size: Size, generator=None) -> Tensor:
        (h, w), low = size, torch.zeros(size, dtype=torch.bool, device=cam.device)
        rows = slice(0, h // 2) if corner[0] == "t" else slice(h - h // 2, h)
        cols = slice(0, w // 2) if corner[1] == "l" else slice(w - w // 2, w)
        low[rows, cols] = True
        return torch.where(low, eps_low, eps).expand(cam.shape[0], 1, h, w)

    rule.__doc__ = f"eps_low on the {corner} quadrant, eps elsewhere (Fig. 1 of the paper)."
    return rule


MASK_RULES: dict[str, Callable[..., Tensor]] = {
    "zscore": zscore_rule,
    "official": official_rule,
    "random": random_rule,
    "uniform": uniform_rule,
    "inverse": inverse_rule,
    **{f"quadrant-{c}": quadrant_rule(c) for c in ("tl", "tr", "bl", "br")},
}
NO_CAM_RULES = {name for name in MASK_RULES if name.startswith("quadrant-")}  # need no CAM


def eps_map(
    cam: Tensor,
    eps: float,
    eps_low: float,
    rule: str = "zscore",
    size: Optional[tuple[int, int]] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Per-pixel L-inf budget ([0, 1] units) of the image `size` (default: the CAM's) from a
    CAM [B, 1, h, w] in [0, 1] by a MASK_RULE. Checked here; the loops call _eps_map."""
    if rule not in MASK_RULES:
        raise unknown("mask rule", rule, MASK_RULES)
    check_images(cam, "cam")
    check_threat(eps, eps_low, None, zero_eps=True)
    return _eps_map(cam, eps, eps_low, rule, tuple(size or cam.shape[-2:]), generator)


def _eps_map(
    cam: Tensor,
    eps: float,
    eps_low: float,
    rule: str,
    size: tuple[int, int],
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    return MASK_RULES[rule](cam.float(), eps, eps_low, tuple(size), generator)


# ============================================================================ losses
# Inner (attack) losses take (logits, y, aux) and return a sum to maximise; outer
# objectives take (natural logits or None, adversarial logits, y, beta). A base method is
# one LossSpec: which inner loss, which random start, which objective.


def upcast(logits: Tensor) -> Tensor:
    """Logits in at least fp32 (bf16 under autocast becomes fp32; fp64 stays fp64)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def cw_margin(logits: Tensor, y: Tensor, kappa: float = 50.0) -> Tensor:
    """Per example: max_{j != y} z_j - z_y, capped at kappa (the CW loss, to be maximised)."""
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    other = logits.scatter(1, y.view(-1, 1), float("-inf")).amax(1)
    return (other - true).clamp(max=kappa)


ATTACK_LOSSES: dict[str, Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]] = {
    "ce": lambda logits, y, aux: F.cross_entropy(upcast(logits), y, reduction="sum"),
    "cw": lambda logits, y, aux: cw_margin(upcast(logits), y).sum(),
    # TRADES: KL(p(x) || p(x')), aux = p(x)
    "kl": lambda logits, y, aux: F.kl_div(F.log_softmax(upcast(logits), 1), aux, reduction="sum"),
    # MMA's targeted margin z_t - z_y capped at 50, aux = the target classes
    "target-margin": lambda logits, y, aux: (
        (upcast(logits).gather(1, aux.view(-1, 1)) - upcast(logits).gather(1, y.view(-1, 1)))
        .clamp(max=50.0)
        .sum()
    ),
}


def ce_objective(nat: Optional[Tensor], adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """Madry AT: cross-entropy on the adversarial examples."""
    return F.cross_entropy(upcast(adv), y)


def trades_objective(nat: Tensor, adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(f(x) || f(x'))."""
    nat, adv = upcast(nat), upcast(adv)
    return F.cross_entropy(nat, y) + beta * F.kl_div(
        F.log_softmax(adv, 1), F.softmax(nat, 1), reduction="batchmean"
    )


def mart_objective(nat: Tensor, adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """MART (Wang et al. 2020): boosted CE on x' + beta * KL weighted by (1 - p_y(x))."""
    nat, adv = upcast(nat), upcast(adv)
    adv_probs = F.softmax(adv, 1)
    top2 = adv_probs.argsort(1)[:, -2:]
    runner_up = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    bce = F.cross_entropy(adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), runner_up)
    nat_probs = F.softmax(nat, 1)
    true_probs = nat_probs.gather(1, y.view(-1, 1)).squeeze(1)
    kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(1)
    return bce + beta * (kl * (1.0000001 - true_probs)).mean()


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """A base method: the inner loss, the random start (True: uniform in the budget; a
    float s: x + s N(0, 1)) and the training objective (natural logits too or not)."""

    inner: str
    start: bool | float
    objective: Callable[[Optional[Tensor], Tensor, Tensor, float], Tensor]
    needs_natural: bool


LOSSES: dict[str, LossSpec] = {
    "ce": LossSpec("ce", True, ce_objective, False),  # AT / PART
    "trades": LossSpec("kl", 0.001, trades_objective, True),  # TRADES / PART-T
    "mart": LossSpec("ce", 0.001, mart_objective, True),  # MART / PART-M
}


def outer_loss(kind: str, nat: Optional[Tensor], adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """The training objective of base loss `kind` on the adversarial (and natural) logits."""
    return LOSSES[kind].objective(nat, adv, y, beta)


# ============================================================================ attacks


def _round_inward(v: Tensor, dtype: torch.dtype, down: bool) -> Tensor:
    """float64 values -> `dtype`, rounded toward -inf (down) or +inf instead of to nearest."""
    r = v.to(dtype)
    if dtype == torch.float64:
        return r
    past = r.double() > v if down else r.double() < v
    return torch.where(
        past, torch.nextafter(r, torch.full_like(r, -math.inf if down else math.inf)), r
    )


def budget_box(x: Tensor, eps: float | Tensor) -> tuple[Tensor, Tensor]:
    """Element-wise bounds (lowest, highest) of the feasible set {x' : |x' - x| <= eps,
    0 <= x' <= 1}. Worked out in float64 and rounded inward, so |x' - x| <= eps holds
    exactly, whatever precision a check uses: float32(8/255) itself is 1.9e-9 above 8/255,
    and x + eps rounded to nearest can land above x + eps."""
    eps = _round_inward(
        torch.as_tensor(eps, dtype=torch.float64, device=x.device), x.dtype, down=True
    ).double()
    x64 = x.double()
    lowest = _round_inward((x64 - eps).clamp(min=0), x.dtype, down=False)
    highest = _round_inward((x64 + eps).clamp(max=1), x.dtype, down=True)
    return lowest, highest


def check_attack_inputs(
    model: nn.Module, x: Tensor, y: Optional[Tensor], eps: float | Tensor = 0.0
) -> None:
    """What an attack or CAM is given from the API: images in [0, 1] on the model's device,
    labels beside them, a budget tensor that fits the images."""
    check_images(x)
    device = model_device(model)
    if device is not None and device != x.device:
        raise ValueError(
            f"the model is on {device}, the images on {x.device}: move one of them (x.to(...) or model.to(...))"
        )
    if len(x):
        check_model_takes(model, x)
    if y is not None:
        check_labels(y, len(x), x.device)
    if torch.is_tensor(eps) and eps.dim():
        if eps.device != x.device:
            raise ValueError(f"the budget map is on {eps.device}, the images on {x.device}")
        try:
            fits = torch.broadcast_shapes(eps.shape, x.shape) == x.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"a budget map of shape {tuple(eps.shape)} does not fit images of shape {tuple(x.shape)}"
            )


def api_attack(attack: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """The API's entry to a loop's attack (_pgd, _mma: same arguments and docs): its input
    checked once (each check a device sync) and cast to the model's dtype."""
    signature = inspect.signature(attack)

    @functools.wraps(attack)
    def checked(*args: Any, **kwargs: Any) -> Tensor:
        bound = signature.bind(*args, **kwargs)  # a wrong call: the attack's own TypeError
        bound.apply_defaults()
        given = bound.arguments
        check_threat(given["eps"], None, given["step"], zero_eps=True)
        steps = given["steps"]
        if type(steps) is not int or not 0 < steps <= MAX_ATTACK_STEPS:
            raise ValueError(
                f"steps must be an integer from 1 to {MAX_ATTACK_STEPS}, got {steps!r}"
            )
        check_attack_inputs(given["model"], given["x"], given["y"], given["eps"])
        given["x"] = in_model_dtype(given["model"], given["x"])
        return attack(*bound.args, **bound.kwargs)

    checked.__name__ = checked.__qualname__ = attack.__name__.lstrip("_")
    return checked


def ascent_step(
    model: nn.Module,
    x_adv: Tensor,
    y: Tensor,
    aux: Optional[Tensor],
    lowest: Tensor,
    highest: Tensor,
    step: float,
    loss: str,
) -> Tensor:
    """One signed-gradient ascent step of ATTACK_LOSSES[loss], projected onto [lowest, highest]."""
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        value = ATTACK_LOSSES[loss](model(x_adv), y, aux)
    (grad,) = torch.autograd.grad(value, x_adv)
    return torch.clamp(x_adv.detach() + step * grad.sign(), lowest, highest)


def _functional_ascent_step(
    model: nn.Module,
    x_adv: Tensor,
    y: Tensor,
    aux: Optional[Tensor],
    lowest: Tensor,
    highest: Tensor,
    step: float,
    loss: str,
) -> Tensor:
    """The same step written with torch.func.grad, which dynamo traces into one graph
    (torch.autograd.grad would break the graph): forward, input gradient, sign, projection."""
    grad = torch.func.grad(lambda z: ATTACK_LOSSES[loss](model(z), y, aux))(x_adv)
    return torch.clamp(x_adv + step * grad.sign(), lowest, highest)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_compiled_steps: dict[str, Callable] = {}


def compiled_ascent_step(mode: str = "default") -> Callable:
    """The attack step as one torch.compile graph, made once per mode and process.
    fullgraph: a graph break (a silent fall back to eager) is an error, not a slowdown.
    dynamic=False: one specialised graph per batch shape, so an epoch compiles at most
    twice (full batches and the last short one) and later epochs reuse both; dynamic
    shapes do not survive torch.func.grad here and recompiled for every new size.
    `reduce-overhead` adds CUDA graphs, which pay off once shapes are fixed: `part.py bench
    --suite gpu` compares the modes."""
    if mode not in _compiled_steps:
        _compiled_steps[mode] = torch.compile(
            _functional_ascent_step, fullgraph=True, dynamic=False, mode=mode
        )
    return _compiled_steps[mode]


Stepper = Callable[..., Tensor]
_STEPPER: contextvars.ContextVar[Optional[Stepper]] = contextvars.ContextVar("step", default=None)


@contextlib.contextmanager
def stepping(stepper: Optional[Stepper]):
    """Inside, pgd and mma take their ascent steps with `stepper` (compiled_ascent_step():
    one torch.compile graph a step); None: the eager ascent_step."""
    token = _STEPPER.set(stepper)
    try:
        yield
    finally:
        _STEPPER.reset(token)


def _ascend(
    model: nn.Module,
    x_adv: Tensor,
    y: Tensor,
    aux: Optional[Tensor],
    box: tuple[Tensor, Tensor],
    step: float,
    steps: int,
    loss: str,
) -> Tensor:
    step_fn = _STEPPER.get() or ascent_step
    for _ in range(steps):
        x_adv = step_fn(model, x_adv, y, aux, *box, step, loss)
    return x_adv.detach()


def start_point(
    x: Tensor, eps: float | Tensor, start: bool | float, box: tuple[Tensor, Tensor]
) -> Tensor:
    """True: uniform in the per-pixel budget; a float s: x + s N(0, 1) (the TRADES/MART
    start); False: x itself. Projected onto the feasible box."""
    if start is True:
        x0 = x + (2 * torch.rand_like(x) - 1) * torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    elif start:
        x0 = x + float(start) * torch.randn_like(x)
    else:
        x0 = x
    return torch.clamp(x0, *box)


def _pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    step: float,
    steps: int,
    loss: str = "ce",
    random_start: bool | float = True,
) -> Tensor:
    """L-inf PGD inside a per-pixel budget; returns x' with |x' - x| <= eps element-wise and
    x' in [0, 1]. `eps` is a float or a tensor broadcastable to x ([0, 1] units).
    random_start: True = uniform in the per-pixel budget; a float s = N(0, s^2) noise (the
    TRADES/MART start, e.g. 0.001); False = start at x. loss: ce, cw or kl (TRADES' inner
    KL against the model's clean prediction). Inside `stepping(compiled_ascent_step())` each
    step is one torch.compile graph. Runs the model in eval mode, restores it; the
    input is never modified; no per-example Python. As the API's `pgd` its input is checked
    first (each check a device sync); the training and evaluation loops call _pgd."""
    box = budget_box(x, eps)
    with eval_mode(model):
        ref = None
        if loss == "kl":
            with torch.no_grad():
                ref = F.softmax(upcast(model(x)), 1)
        return _ascend(
            model, start_point(x, eps, random_start, box), y, ref, box, step, steps, loss
        )


pgd = api_attack(_pgd)


def _tile(eps: float | Tensor, x: Tensor, k: int) -> float | Tensor:
    """A budget for x repeated k times along the batch (a scalar stays a scalar)."""
    if not torch.is_tensor(eps) or eps.dim() == 0:
        return eps
    return eps.expand_as(x).repeat(k, 1, 1, 1) if eps.dim() == 4 else eps


def _mma(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    step: float,
    steps: int = 20,
    k: int = 3,
    random_start: bool = True,
) -> Tensor:
    """Minimum-margin attack (as in the PART paper): a targeted PGD on the CW-type margin
    z_t - z_y (capped at 50) for each of the k highest wrong classes of the clean
    prediction, run as one batch of k*B; per example the candidate with the smallest true
    margin z_y - max_{j != y} z_j is kept (so if any target succeeds, the result fails).
    As the API's `mma` its input is checked first; the loops call _mma."""
    b = x.shape[0]
    with eval_mode(model):
        with torch.no_grad():
            logits = model(x).float()
        k = min(k, logits.shape[1] - 1)
        # [k*B]
        targets = logits.scatter(1, y.view(-1, 1), float("-inf")).topk(k, 1).indices.T.reshape(-1)
        x_k, y_k, eps_k = x.repeat(k, 1, 1, 1), y.repeat(k), _tile(eps, x, k)
        box = budget_box(x_k, eps_k)
        candidates = _ascend(
            model,
            start_point(x_k, eps_k, random_start, box),
            y_k,
            targets,
            box,
            step,
            steps,
            "target-margin",
        )
        with torch.no_grad():
            margin = -cw_margin(model(candidates).float(), y_k, kappa=float("inf")).view(k, b)
    best = margin.argmin(0)
    return candidates.view(k, b, *x.shape[1:])[best, torch.arange(b, device=x.device)]


mma = api_attack(_mma)


# ============================================================================ training step and evaluation


class MultiInput(nn.Module):
    """One forward call over several batches, each through the model on its own (so every
    batch keeps its own BatchNorm statistics, as in TRADES/MART) and DDP sees one forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *xs: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.model(x) for x in xs)


def _functional_cam(model: nn.Module, x: Tensor, method: str) -> Tensor:
    """class_activation for features()/head() models, with torch.func.grad so that dynamo
    traces it into one graph."""
    acts = model.features(x).detach()
    target = model.head(acts).argmax(1)
    grads = torch.func.grad(lambda a: model.head(a).gather(1, target.view(-1, 1)).sum())(acts)
    return cam_from(acts, grads, method)


def compiled_cam(mode: str = "default") -> Callable[[nn.Module, Tensor, str], Tensor]:
    """The training CAM as one compiled graph (fp32, eval mode, no parameter graph)."""
    graph = torch.compile(_functional_cam, fullgraph=True, dynamic=False, mode=mode)

    def cam(model: nn.Module, x: Tensor, method: str) -> Tensor:
        with eval_mode(model), torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            return graph(model, x, method)

    return cam


@dataclasses.dataclass
class TrainingModules:
    """The model as each part of a training step uses it."""

    model: nn.Module  # plain module: evaluation, checkpoints
    update: nn.Module  # MultiInput(model), under DDP and/or torch.compile
    stepper: Optional[Stepper] = None  # the compiled attack step; None: eager
    cam: Optional[Callable[[nn.Module, Tensor, str], Tensor]] = None  # compiled CAM; None: eager


def wrap_for_training(
    model: nn.Module, cfg: TrainConfig, dist: Dist, device: torch.device
) -> TrainingModules:
    """DDP under torchrun; torch.compile (default: on CUDA only; on a CPU it costs more than
    it saves) of the update, the attack step and the CAM."""
    use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
    update: nn.Module = MultiInput(model)
    if dist.world > 1:
        update = nn.parallel.DistributedDataParallel(
            update, device_ids=[device] if device.type == "cuda" else None
        )
    if not use_compile:
        return TrainingModules(model, update)
    splits = hasattr(model, "features") and getattr(model, "cam_layer", None) is None
    return TrainingModules(
        model,
        torch.compile(update, mode=cfg.compile_mode),
        compiled_ascent_step(cfg.compile_mode),
        compiled_cam(cfg.compile_mode) if splits else None,
    )


def budget_for(
    model: nn.Module,
    x: Tensor,
    setup: AttackSetup,
    part_phase: bool,
    cam: Optional[Callable[[nn.Module, Tensor, str], Tensor]] = None,
) -> float | Tensor:
    """The per-pixel budget of this exact (augmented) batch: CAM -> eps map in PART epochs."""
    if not part_phase:
        return setup.eps
    if setup.mask_rule in NO_CAM_RULES:  # the batch size and device are all such a rule reads
        zeros = x[:, :1, :1, :1].detach() * 0
        return _eps_map(zeros, setup.eps, setup.eps_low, setup.mask_rule, x.shape[-2:])
    low_res = (cam or _class_activation)(model, x, setup.cam)
    return _eps_map(low_res, setup.eps, setup.eps_low, setup.mask_rule, x.shape[-2:])


def make_adversarial(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    budget: float | Tensor,
    setup: AttackSetup,
    loss: str,
    generator: str,
    stepper: Optional[Stepper] = None,
) -> Tensor:
    """Training AEs: PGD with the base loss's inner loss and start, or MMA."""
    with stepping(stepper):
        if generator == "mma":
            return _mma(model, x, y, budget, setup.step, setup.steps)
        spec = LOSSES[loss]
        return _pgd(model, x, y, budget, setup.step, setup.steps, spec.inner, spec.start)


def train_step(
    parts: TrainingModules,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    cfg: TrainConfig,
    setup: AttackSetup,
    part_phase: bool,
) -> tuple[Tensor, Tensor]:
    """CAM + budget map on this batch, the adversarial examples, one SGD update.
    Returns (loss, #correct on x') on the device."""
    amp = autocast(x.device, cfg.amp)
    budget = budget_for(parts.model, x, setup, part_phase, parts.cam)
    with amp:
        x_adv = make_adversarial(
            parts.model, x, y, budget, setup, cfg.loss, cfg.generator, parts.stepper
        )
    parts.update.train()
    with amp:
        if LOSSES[cfg.loss].needs_natural:
            nat, adv = parts.update(x, x_adv)
        else:
            (adv,), nat = parts.update(x_adv), None
        loss = outer_loss(cfg.loss, nat, adv, y, cfg.beta)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (adv.argmax(1) == y).sum()


def epoch_batches(n: int, batch: int, dist: Dist, shuffle: torch.Generator) -> list[Tensor]:
    """This process's share of each global batch: one shuffled order on every rank, each batch
    cut into `world` parts; a last batch under two images a process (BatchNorm) is dropped."""
    order = torch.randperm(n, device=shuffle.device, generator=shuffle)
    return [
        idx.tensor_split(dist.world)[dist.rank]
        for idx in order.split(batch)
        if len(idx) >= 2 * dist.world
    ]


def lr_at(cfg: TrainConfig, epoch: int, step: int = 0, steps: int = 1) -> float:
    """The lr at `step` of `steps` in `epoch` (from 0): step, lr * gamma^(milestones reached);
    cosine, linear warm-up over lr_warmup epochs, then half a cosine down to 0."""
    if cfg.schedule == "step":
        return cfg.lr * cfg.lr_gamma ** sum(epoch >= m for m in cfg.lr_milestones)
    done = epoch + step / steps  # epochs elapsed before this step
    if done < cfg.lr_warmup:
        return cfg.lr * (done + 1 / steps) / cfg.lr_warmup
    progress = (done - cfg.lr_warmup) / max(cfg.epochs - cfg.lr_warmup, 1e-12)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * weights; BatchNorm statistics (buffers) copied."""
    torch._foreach_lerp_(
        list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - decay
    )
    for mine, theirs in zip(ema.buffers(), model.buffers(), strict=True):
        mine.copy_(theirs)


def train_epoch(run: Run, epoch: int) -> dict:
    """One pass over the training split; returns the epoch's training figures."""
    cfg, dist, device = run.cfg, run.dist, run.device
    t0 = time.perf_counter()
    part_phase = cfg.method == "part" and epoch >= cfg.warmup_epochs
    # Every random stream of an epoch is a function of (seed, epoch[, rank]): a resumed run
    # replays exactly what the uninterrupted one would have done.
    torch.manual_seed(derived_seed(cfg.seed, epoch, dist.rank))
    # the same on every rank
    shuffle = torch.Generator(device).manual_seed(derived_seed(cfg.seed, epoch, -1))
    aug = torch.Generator(device).manual_seed(derived_seed(cfg.seed, epoch, dist.rank, 1))
    batches = epoch_batches(len(run.train.y), cfg.batch_size, dist, shuffle)
    # the epoch's first lr: the one a step schedule keeps all epoch
    lr = lr_at(cfg, epoch, 0, len(batches))
    totals = torch.zeros(3, device=device)  # loss sum, correct, count (this rank)
    steady = None  # (time, images) after 10 steps: compilation and warm-up are over by then
    with run.report.bar(f"epoch {epoch + 1}", len(batches)) as show:
        for i, index in enumerate(batches):
            x = to_float(augment(run.train.x[index], DATASETS[cfg.dataset].flip, aug))
            y = run.train.y[index]
            for group in run.optimizer.param_groups:
                group["lr"] = lr_at(cfg, epoch, i, len(batches))
            loss, correct = train_step(run.parts, run.optimizer, x, y, cfg, run.setup, part_phase)
            if run.ema is not None:
                ema_update(run.ema, run.parts.model, cfg.ema)
            totals += torch.stack([loss * len(y), correct, torch.tensor(len(y), device=device)])
            show(i + 1)  # the count only (no device sync): the bar's ETA needs every step
            if (i + 1) % 10 == 0 or i + 1 == len(batches):
                t = totals.tolist()  # a device sync: only every 10 steps
                if dist.world == 1 and not math.isfinite(t[0]):
                    raise FloatingPointError
                show(i + 1, t[0] / t[2], t[1] / t[2])
                if steady is None:
                    steady = (time.perf_counter(), t[2])
                    if device.type == "cpu" and i + 1 < len(batches) and not run.estimated:
                        run.estimated = True
                        say_cpu_estimate(run, epoch, (steady[0] - t0) / (i + 1) * len(batches))
    end, local_images = time.perf_counter(), totals[2].item()
    t = all_sum(totals, dist).tolist()
    same_buffers(run.parts.model, dist)
    same_buffers(run.ema, dist)
    if not math.isfinite(t[0]):
        raise FloatingPointError
    phase = "PART" if part_phase else ("warm-up" if cfg.method == "part" else "AT")
    # images/s after the first 10 steps (all processes): what an epoch costs once compiled
    rate = (
        dist.world * (local_images - steady[1]) / (end - steady[0])
        if steady and local_images > steady[1]
        else None
    )
    return {
        "epoch": epoch + 1,
        "phase": phase,
        "lr": lr,
        "train_loss": t[0] / t[2],
        "train_acc": t[1] / t[2],
        "train_seconds": end - t0,
        "img_per_s": t[2] / (end - t0),
        "steady_img_per_s": rate,
    }


def on_model_device(model: nn.Module, data: Split | tuple) -> Split:
    """Evaluation data (a Split or an (images, labels) pair) on the model's device, its
    labels checked against the model's outputs."""
    data = as_split(data)
    device = model_device(model)
    data = data if device is None or data.y.device == device else data.to(device)
    if len(data.y):
        outputs = check_model_takes(model, data.x)
        if int(data.y.max()) >= outputs:
            raise ValueError(
                f"labels go up to {int(data.y.max())}, but the model has {outputs} outputs (another data set?)"
            )
    return data


def evaluate(
    model: nn.Module,
    data: Split | tuple,
    setup: Optional[AttackSetup] = None,
    dist: Dist = ONE_PROCESS,
    progress: Callable[[int], None] = lambda done: None,
) -> dict[str, float]:
    """Natural and PGD-`setup.steps` accuracy on `data` (a Split or (images, labels); moved
    to the model's device), fp32, eval mode, random start; sharded across processes,
    counts summed. The PGD result is named by its steps (pgd20 for the standard protocol,
    the default setup). `progress(points done)` is told after each batch (all processes')."""
    data, setup = on_model_device(model, data), setup or eval_setup(256)
    n = len(data.y)
    shard = torch.arange(dist.rank, n, dist.world, device=data.y.device)
    counts = torch.zeros(3, device=data.y.device)
    with eval_mode(model), full_fp32():
        for chunk in shard.split(setup.batch_size):
            x, y = to_float(data.x[chunk]), data.y[chunk]
            with torch.no_grad():
                counts[0] += (model(x).argmax(1) == y).sum()
            x_adv = _pgd(model, x, y, setup.eps, setup.step, setup.steps)
            with torch.no_grad():
                counts[1] += (model(x_adv).argmax(1) == y).sum()
            counts[2] += len(y)
            progress(min(n, int(counts[2]) * dist.world))
    counts = all_sum(counts, dist).tolist()
    return {
        "natural": counts[0] / max(counts[2], 1),
        f"pgd{setup.steps}": counts[1] / max(counts[2], 1),
    }


# ============================================================================ config
# The one list of training settings: each field of TrainConfig carries its help text,
# its panel in `train --help`, its choices (from the registries above), its bounds and
# whether --resume may change it. The `train` command's options, the preset checks and
# the resume rules are all derived from it.


def setting(
    default: Any,
    help: str,
    panel: Optional[str],
    *,
    choices: Optional[tuple] = None,
    bounds: Optional[tuple] = None,
    levels: bool = False,
    on_resume: bool = False,
) -> Any:
    """A TrainConfig field with what the command line and the checks need to know (panel
    None: recorded, never an option)."""
    meta = dict(locals())  # help, panel, choices, bounds, levels, on_resume
    del meta["default"]
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


DATA, MODEL, METHOD, SCHEDULE, RUN = "Data", "Model", "Method", "Schedule", "Run"
THREAT, EVALUATION = "Threat model (1/255 levels)", "Evaluation during training"
OPTIMIZERS, SCHEDULES = ("sgd", "adamw"), ("step", "cosine")


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on. Defaults: the paper's CIFAR-10 settings."""

    dataset: str = setting("cifar10", "Dataset.", DATA, choices=tuple(DATASETS))
    data_dir: str = setting(
        "data", "Dataset folder (torchvision's copies download here).", DATA, on_resume=True
    )
    cache_dir: str = setting(DEFAULT_CACHE, "Cache of decoded image folders.", DATA, on_resume=True)
    image_size: int = setting(
        32, "Image side of --dataset imagefolder.", DATA, bounds=(8, MAX_IMAGE_SIZE)
    )
    train_subset: int = setting(
        0, "Train on the first N training images (0: all).", DATA, bounds=(0, 10**8)
    )
    val_size: int = setting(
        0,
        "Hold out N training images (class-balanced, by the seed) to pick `best`; 0: pick it "
        "on the first --eval-subset test images.",
        DATA,
        bounds=(0, 10**7),
    )
    model: str = setting("resnet18", f"Architecture: {ARCH_HELP}.", MODEL)
    cam_layer: Optional[str] = setting(
        None, "Module whose output the CAM uses (default: the last block).", MODEL, on_resume=True
    )
    init: str = setting(
        "",
        "Start from this checkpoint's weights (fine-tuning): ours, or a state dict of --model "
        "(.safetensors/.pt/.pth); a classifier for another number of classes starts afresh.",
        MODEL,
    )
    init_sha256: str = setting("", "sha256 of the --init file (checked on a re-run).", None)
    model_dir: str = setting(
        "models", "RobustBench's model folder (DIR/<dataset>/Linf/<NAME>.pt).", MODEL
    )
    method: str = setting(
        "part", "at: uniform budget; part: reweighted after the warm-up.", METHOD, choices=METHODS
    )
    loss: str = setting(
        "ce", "ce (AT/PART), trades (PART-T), mart (PART-M).", METHOD, choices=tuple(LOSSES)
    )
    beta: float = setting(6.0, "TRADES/MART regulariser weight.", METHOD, bounds=(0, 1e6))
    generator: str = setting("pgd", "How training AEs are made.", METHOD, choices=GENERATORS)
    cam: str = setting("gradcam", "CAM method.", METHOD, choices=CAM_METHODS)
    mask_rule: str = setting(
        "zscore",
        "zscore (paper), official (authors' code); controls: random, uniform (same budget, no "
        "placement), inverse (least important pixels), quadrant-tl/tr/bl/br (Fig. 1, no CAM).",
        METHOD,
        choices=tuple(MASK_RULES),
    )
    eps: float = setting(DEFAULT_EPS_LEVELS, "Full budget: 8 or 8/255.", THREAT, levels=True)
    eps_low: float = setting(
        DEFAULT_EPS_LOW_LEVELS, "Budget of the unimportant pixels.", THREAT, levels=True
    )
    step: float = setting(DEFAULT_STEP_LEVELS, "Attack step.", THREAT, levels=True)
    steps: int = setting(10, "Attack steps in training.", THREAT, bounds=(1, 10_000))
    epochs: int = setting(
        80, "Total epochs (warm-up included).", SCHEDULE, bounds=(1, 100_000), on_resume=True
    )
    warmup_epochs: int = setting(
        20, "Epochs of the base method at uniform eps before PART.", SCHEDULE, bounds=(0, 100_000)
    )
    batch_size: int = setting(
        128, "Global batch size (split across processes).", SCHEDULE, bounds=(2, 65_536)
    )
    optimizer: str = setting(
        "sgd", "sgd (the paper's) or adamw (--momentum unused).", SCHEDULE, choices=OPTIMIZERS
    )
    lr: float = setting(0.01, "Learning rate.", SCHEDULE, bounds=(1e-12, 100))
    momentum: float = setting(0.9, "SGD momentum.", SCHEDULE, bounds=(0, 1))
    weight_decay: float = setting(
        2e-4, "Weight decay (decoupled with adamw).", SCHEDULE, bounds=(0, 1)
    )
    schedule: str = setting(
        "step",
        "step: lr * gamma at each milestone (the paper's); cosine: --lr-warmup epochs of linear "
        "warm-up, then down to 0, set at every step.",
        SCHEDULE,
        choices=SCHEDULES,
    )
    lr_milestones: list[int] = setting(
        [79], "Epochs where lr *= gamma, e.g. 79 or 60,75 (step schedule).", SCHEDULE
    )
    lr_gamma: float = setting(
        0.1, "LR factor at each milestone (step schedule).", SCHEDULE, bounds=(1e-12, math.inf)
    )
    lr_warmup: float = setting(
        0.0, "Epochs of lr warm-up from 0 (cosine schedule).", SCHEDULE, bounds=(0, 100_000)
    )
    ema: float = setting(
        0.0,
        "Decay of a moving average of the weights (e.g. 0.999), evaluated and saved as the "
        "model (0: off).",
        SCHEDULE,
        bounds=(0, 0.999999),
    )
    eval_subset: int = setting(
        1000,
        "With --val-size 0: evaluate each epoch, and pick `best`, on the first N test images "
        "(0: all).",
        EVALUATION,
        bounds=(0, 10**8),
    )
    eval_every: int = setting(
        1, "Evaluate every N epochs.", EVALUATION, bounds=(1, 10**5), on_resume=True
    )
    out: str = setting("", "Run folder.", RUN, on_resume=True)
    seed: int = setting(0, "Random seed.", RUN, bounds=(0, MAX_SEED))
    device: str = setting("auto", "auto, cpu, cuda, cuda:N or mps.", RUN, on_resume=True)
    compile: Optional[bool] = setting(
        None, "torch.compile attack, CAM and update (default: with CUDA).", RUN, on_resume=True
    )
    compile_mode: str = setting(
        "default", "torch.compile mode.", RUN, choices=COMPILE_MODES, on_resume=True
    )
    amp: Optional[bool] = setting(
        None,
        "bf16 autocast for the training attack and update (CUDA or CPU); CAM, budget maps and "
        "evaluation stay fp32 (default: on a CPU with AMX bf16 units).",
        RUN,
    )
    sync_bn: bool = setting(False, "SyncBatchNorm across processes (CUDA).", RUN)
    tensorboard: bool = setting(
        False, "Also log to TensorBoard (runs/X/tensorboard).", RUN, on_resume=True
    )
    wandb: str = setting("", "Also log to this Weights & Biases project.", RUN, on_resume=True)
    threads: int = setting(
        0,
        "CPU threads for PyTorch (0: one per core; 1 is often fastest on a shared machine). A "
        "resume is bit-exact only at the same count.",
        RUN,
        bounds=(0, 4096),
        on_resume=True,
    )


CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
CONFIG_TYPES = typing.get_type_hints(TrainConfig)
# Settings that say where or how fast a run computes, not what: they may differ between
# seeds of one experiment (and between a run and its resume).
NOT_THE_EXPERIMENT = set(  # init: the file's name; its sha256 is the experiment
    "data_dir cache_dir out device compile compile_mode eval_every tensorboard seed threads "
    "init wandb model_dir".split()
)
# Settings that only the PART phase reads: an AT run computes the same whatever they hold.
PART_ONLY = {"cam", "cam_layer", "mask_rule", "eps_low", "warmup_epochs"}


def _base_type(kind: Any) -> tuple[Any, bool]:
    """(the type inside Optional[...] / X | None, whether None is allowed)."""
    args = typing.get_args(kind)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return kind, False


def coerce(key: str, value: Any, origin: str) -> Any:
    """Type-check one config value (from TOML or the command line), by the field's real type."""
    field = CONFIG_FIELDS[key]
    base, optional = _base_type(CONFIG_TYPES[key])
    bad = CliError(
        f"{origin}: {key} = {value!r} is not a valid {getattr(base, '__name__', str(base))}"
    )
    if value is None:
        if optional:
            return None
        raise bad
    if field.metadata["levels"]:
        return parse_levels(value, key)
    listed = typing.get_origin(base) is list
    if listed and isinstance(value, str):
        try:
            value = [int(v) for v in value.replace(" ", "").split(",") if v]
        except ValueError:
            raise bad from None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if listed:
        ok = isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        )
    else:
        ok = {bool: isinstance(value, bool), int: number and isinstance(value, int), float: number}
        ok = ok.get(base, isinstance(value, str))
    if not ok:
        raise bad
    value = float(value) if base is float else list(value) if listed else value
    choices = field.metadata["choices"]
    if choices is not None and value not in choices:
        raise CliError(f"{origin}: {unknown(key.replace('_', '-'), value, choices)}")
    return value


def validate_config(cfg: TrainConfig) -> None:
    """Bounds of every field, finite floats, and the checks that involve several fields."""
    for name, field in CONFIG_FIELDS.items():
        value, bounds = getattr(cfg, name), field.metadata["bounds"]
        if isinstance(value, float) and not math.isfinite(value):
            raise CliError(f"{name.replace('_', '-')} must be a finite number, got {value}")
        if bounds and value is not None and not bounds[0] <= value <= bounds[1]:
            low, high = bounds
            what = "positive" if 0 < low < 1e-9 else f"at least {low:g}"
            what = f"at most {high:g}" if value > high else what
            raise CliError(f"{name.replace('_', '-')} must be {what}, got {value}")
    check_threat(cfg.eps, cfg.eps_low, cfg.step, 255, zero_eps=True)
    if not is_zoo(cfg.model) and cfg.model not in BUILTIN_MODELS:
        raise unknown("model", cfg.model, [ARCH_HELP])
    if not DEVICE_PATTERN.match(cfg.device):
        raise unknown("device", cfg.device, DEVICES)
    if cfg.warmup_epochs > cfg.epochs:
        raise CliError(
            f"warmup-epochs ({cfg.warmup_epochs}) must be between 0 and epochs ({cfg.epochs})"
        )
    if not all(1 <= m <= 100_000 for m in cfg.lr_milestones):
        raise CliError("lr-milestones are global epochs, each at least 1")
    if cfg.lr_warmup > cfg.epochs or (cfg.lr_warmup and cfg.schedule != "cosine"):
        raise CliError(
            f"lr-warmup ({cfg.lr_warmup:g}) goes with --schedule cosine and at most --epochs ({cfg.epochs})"
        )


def config_paths() -> list[Path]:
    """Where the presets live: beside part.py (a checkout or an editable install), then
    where `pip install .` puts them (<prefix>/share/part/configs.toml)."""
    return [
        Path(__file__).resolve().parent / "configs.toml",
        Path(sys.prefix) / "share" / "part" / "configs.toml",
    ]


def read_presets(path: Path, what: str = "--presets") -> dict[str, dict]:
    require_file(path, what)
    try:
        return tomllib.loads(path.read_text())
    except (RecursionError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CliError(f"config file {path} is not valid TOML: {e}") from None


SHIPPED = "shipped:"  # the key of a shipped preset that a user's preset of its name replaces


def all_presets(presets_file: Optional[Path] = None) -> tuple[dict[str, dict], dict[str, Path]]:
    """(tables, where each is from): the shipped presets, then the --presets file's; one of the
    same name replaces the shipped one, which stays reachable as its `extends`."""
    shipped = next((p for p in config_paths() if p.is_file()), None)
    tables: dict[str, dict] = {}
    where: dict[str, Path] = {}
    for path, what in ((shipped, "config file"), (presets_file, "--presets")):
        for name, table in (read_presets(path, what) if path is not None else {}).items():
            if isinstance(table, dict):
                if name in tables:
                    tables[SHIPPED + name], where[SHIPPED + name] = tables[name], where[name]
                tables[name], where[name] = table, path
    return tables, where


def preset_values(presets: dict[str, dict], name: str, path: Path | dict, seen: tuple = ()) -> dict:
    """The preset's values with `extends` resolved (the named preset first, then its own keys).
    `path`: the file the presets are from, or a preset -> file table."""
    at = path.get(name, "the presets") if isinstance(path, dict) else path
    if name not in presets or not isinstance(presets[name], dict):
        raise CliError(
            f"unknown preset {name!r} in {at} (presets: {', '.join(k for k, v in presets.items() if isinstance(v, dict) and SHIPPED not in k)})"
        )
    if name in seen:
        raise CliError(f"preset {name!r} in {at} extends itself")
    table = dict(presets[name])
    values, base = {}, str(table.pop("extends", ""))
    if base == name and SHIPPED + name in presets:  # the user's preset tweaks the shipped one
        base = SHIPPED + name
    elif SHIPPED + name in presets and not seen:
        note(f"note: preset {name} of {at} replaces the shipped preset {name}", once=True)
    if base:
        values = preset_values(presets, base, path, seen + (name,))
    for key, value in table.items():
        if key not in CONFIG_FIELDS:
            raise CliError(f"{at} [{name}]: unknown key {key!r}")
        values[key] = coerce(key, value, f"{at} [{name}]")
    return values


def read_settings_file(path: Path) -> tuple[dict, Optional[str]]:
    """--config: a run's config.json (every setting but its folder, `out`, and its preset's
    name) or a TOML/JSON table of settings. Returns (values, preset name or None)."""
    require_file(path, "--config")
    kind = "JSON" if path.suffix == ".json" else "TOML"
    try:
        text = path.read_text()
        data = json.loads(text) if kind == "JSON" else tomllib.loads(text)
    except (RecursionError, OSError, ValueError) as e:  # JSON, TOML or Unicode decode errors
        raise CliError(f"--config {path} is not valid {kind}: {first_line(e)}") from None
    if not isinstance(data, dict):
        raise CliError(f"--config {path} is not a table of settings")
    preset = None
    # a run's config.json: the new run goes to a new folder
    if isinstance(data.get("config"), dict):
        preset = data.get("preset") if isinstance(data.get("preset"), str) else None
        data = {k: v for k, v in data["config"].items() if k != "out"}
    for key in data:
        if key not in CONFIG_FIELDS:
            raise CliError(f"--config {path}: unknown key {key!r}")
    return {k: coerce(k, v, str(path)) for k, v in data.items()}, preset


def preset_settings(
    preset: Optional[str],
    presets_file: Optional[Path],
    dataset: Optional[str],
    config_file: Optional[Path] = None,
) -> tuple[dict, Optional[str], dict[str, str]]:
    """(the values, the preset's name, where each value is from): the preset's (without
    --preset the dataset's own, when there is one), then the --config file's."""
    from_file, file_preset = read_settings_file(config_file) if config_file else ({}, None)
    presets, where = all_presets(presets_file)
    name = dataset or from_file.get("dataset") or "cifar10"
    preset = preset or (file_preset if file_preset in presets else None)
    preset = preset or (name if name in presets else None)
    values = preset_values(presets, preset, where) if preset else {}
    origins = dict.fromkeys(values, f"preset {preset}") | dict.fromkeys(from_file, str(config_file))
    return {**values, **from_file}, preset or file_preset, origins


# Settings that only count beside another's value: setting -> (that setting, the value).
IDLE_UNLESS = {
    "lr_milestones": ("schedule", "step"),
    "lr_gamma": ("schedule", "step"),
    "momentum": ("optimizer", "sgd"),
    "eval_subset": ("val_size", 0),
}


def refuse_idle_options(given: dict[str, Any], cfg: TrainConfig) -> None:
    """An option given that the other settings make do nothing is refused, naming the one
    that would make it count (a value from a preset or file is no option given)."""
    flag = lambda key: "--" + key.replace("_", "-")  # noqa: E731
    for key, (other, value) in IDLE_UNLESS.items():
        if key in given and getattr(cfg, other) != value:
            raise CliError(
                f"{flag(key)} goes with {flag(other)} {value}; with {flag(other)} "
                f"{getattr(cfg, other)} it would do nothing"
            )


def resolve_config(
    overrides: dict[str, Any],
    preset: Optional[str],
    presets_file: Optional[Path],
    config_file: Optional[Path] = None,
) -> tuple[TrainConfig, str]:
    """Code defaults < preset (configs.toml, --presets) < --config file < command line.
    Returns the config and the preset name."""
    given = {k: coerce(k, v, "command line") for k, v in overrides.items() if v is not None}
    values, preset, _ = preset_settings(preset, presets_file, given.get("dataset"), config_file)
    if "init" in given:  # another file: its own hash is recorded at the start
        values.pop("init_sha256", None)
        # the zoo entry is the architecture too
        if given["init"].startswith(ROBUSTBENCH) and "model" not in given:
            given["model"] = given["init"]
    cfg = TrainConfig(**{**values, **given})
    refuse_idle_options(given, cfg)
    if cfg.model.startswith(ROBUSTBENCH):  # with its data set: robustbench:cifar10/Linf/NAME
        cfg.model = checkpoint_source(Path(), cfg.model, cfg.dataset)[1]
    validate_config(cfg)
    return cfg, preset or cfg.dataset


def config_from_dict(values: dict, origin: str) -> TrainConfig:
    """A stored config (checkpoint metadata, config.json), every value checked again."""
    if not isinstance(values, dict):
        raise CliError(f"{origin}: the stored config is not a table of settings")
    try:
        cfg = TrainConfig(
            **{k: coerce(k, v, origin) for k, v in values.items() if k in CONFIG_FIELDS}
        )
        validate_config(cfg)
    except CliError as e:  # the stored value is wrong, not an option the user gave: say where it is
        text = str(e).replace("--", "")
        raise CliError(
            text if text.startswith(origin) else f"{origin}: a stored setting is invalid: {text}"
        ) from None
    return cfg


@dataclasses.dataclass(frozen=True)
class AttackSetup:
    """One threat model in [0, 1] units, built once from the command line or a config,
    with the settings of the PART map and of the evaluation that uses it."""

    eps: float
    step: float
    restarts: int = 1
    seed: int = 0
    batch_size: int = 256
    eps_low: float = from_levels(DEFAULT_EPS_LOW_LEVELS)
    cam: str = "gradcam"
    mask_rule: str = "zscore"
    steps: int = 10

    def __post_init__(self):
        check_threat(self.eps, self.eps_low, self.step, zero_eps=True)
        if not (isinstance(self.restarts, int) and 1 <= self.restarts <= 10_000):
            raise CliError(f"restarts must be between 1 and 10000, got {self.restarts}")
        if not (isinstance(self.batch_size, int) and 1 <= self.batch_size <= 1 << 20):
            raise CliError(f"batch size must be between 1 and {1 << 20}, got {self.batch_size}")
        if not (isinstance(self.seed, int) and 0 <= self.seed <= MAX_SEED):
            raise CliError(f"seed must be between 0 and {MAX_SEED}, got {self.seed}")
        if self.cam not in CAM_WEIGHTS:
            raise unknown("cam", self.cam, CAM_WEIGHTS)
        if self.mask_rule not in MASK_RULES:
            raise unknown("mask rule", self.mask_rule, MASK_RULES)

    @classmethod
    def from_levels(
        cls,
        eps_levels: float,
        step_levels: float,
        eps_low_levels: float = DEFAULT_EPS_LOW_LEVELS,
        where: str = "",
        **settings,
    ) -> "AttackSetup":
        """The command line's budgets (1/255 levels), checked with the message a user needs."""
        check_threat(eps_levels, eps_low_levels, step_levels, 255, where)
        return cls(
            eps=from_levels(eps_levels),
            step=from_levels(step_levels),
            eps_low=from_levels(eps_low_levels),
            **settings,
        )

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "AttackSetup":
        """The training threat model of a run."""
        return cls(
            eps=from_levels(cfg.eps),
            step=from_levels(cfg.step),
            eps_low=from_levels(cfg.eps_low),
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            cam=cfg.cam,
            mask_rule=cfg.mask_rule,
            steps=cfg.steps,
        )


def eval_setup(batch_size: int) -> AttackSetup:
    """The training-time evaluation: the standard PGD-20 at 8/255, step 2/255, whatever the training budget."""
    return AttackSetup(
        eps=from_levels(EVAL_EPS_LEVELS),
        step=from_levels(EVAL_STEP_LEVELS),
        batch_size=batch_size,
        steps=EVAL_STEPS,
    )


# ============================================================================ checkpoints
# Weights: safetensors with typed metadata (CheckpointMeta, stored as JSON strings). The
# resume state (weights again, optimizer buffers, epoch, best, the metrics so far) is a
# second safetensors file that is written first: on its own it is always a consistent
# epoch, so --resume works after a kill at any instant and repairs the other files.


@dataclasses.dataclass
class CheckpointMeta:
    """What a checkpoint says about its model."""

    arch: str
    num_classes: int
    classes: list[str] = dataclasses.field(default_factory=list)
    dataset: Optional[str] = None
    image_size: Optional[int] = None
    cam_layer: Optional[str] = None
    format: str = FORMAT  # FORMAT for ours, "foreign" for other state dicts
    config: Optional[TrainConfig] = None
    preset: Optional[str] = None
    epoch: Optional[int] = None
    metrics: Optional[dict] = None
    best: Optional[dict] = None
    data_fingerprint: Optional[str] = None
    source: Optional[str] = None
    versions: dict = dataclasses.field(default_factory=dict)
    machine: dict = dataclasses.field(default_factory=dict)  # machine(): CPU, threads

    def to_metadata(self) -> dict[str, str]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["config"] = dataclasses.asdict(self.config) if self.config else None
        return {
            "format": self.format,
            **{k: json.dumps(v) for k, v in values.items() if k != "format"},
        }

    @classmethod
    def from_metadata(cls, raw: dict[str, str], path: Path) -> "CheckpointMeta":
        """Our metadata, every field checked: a damaged file gives one line, not a traceback."""
        try:
            values = {
                k: json.loads(v) for k, v in raw.items() if k != "format" and k in CHECKPOINT_FIELDS
            }
        except (RecursionError, json.JSONDecodeError, TypeError) as e:
            raise CliError(f"{path}: its metadata is damaged (not JSON: {first_line(e)})") from None
        checks = {
            "arch": lambda v: isinstance(v, str),
            "num_classes": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 2,
            "classes": lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v),
            "dataset": lambda v: v is None or v in DATASETS,
            "image_size": lambda v: v is None or (isinstance(v, int) and 8 <= v <= MAX_IMAGE_SIZE),
            "cam_layer": lambda v: v is None or isinstance(v, str),
            "epoch": lambda v: v is None or isinstance(v, int),
            "metrics": lambda v: v is None or isinstance(v, dict),
            "best": lambda v: v is None or isinstance(v, dict),
            "config": lambda v: v is None or isinstance(v, dict),
            "versions": lambda v: isinstance(v, dict),
            "machine": lambda v: isinstance(v, dict),
        }
        for key in ("arch", "num_classes"):
            if key not in values:
                raise CliError(f"{path}: its metadata lacks {key!r}; not a usable checkpoint")
        for key, ok in checks.items():
            if key in values and not ok(values[key]):
                raise CliError(
                    f"{path}: its metadata has an invalid {key} ({json.dumps(values[key])[:60]})"
                )
        if values.get("classes") and len(values["classes"]) != values["num_classes"]:
            raise CliError(
                f"{path}: its metadata names {len(values['classes'])} classes for {values['num_classes']} outputs"
            )
        if values.get("config") is not None:
            values["config"] = config_from_dict(values["config"], f"{path} (stored config)")
        return cls(format=raw.get("format", FORMAT), **values)


CHECKPOINT_FIELDS = {f.name for f in dataclasses.fields(CheckpointMeta)}


def save_checkpoint(path: Path, model: nn.Module, meta: CheckpointMeta) -> None:
    """Weights of the plain (uncompiled, unwrapped) model + metadata."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_tensors(path, tensors, meta.to_metadata())


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str], str]:
    """The tensors, the metadata and the sha256 of a safetensors file, from one read (so the
    hash is that of the bytes loaded). A clear error when it is not one."""
    try:
        return tensors_of(path)
    except Exception as e:  # SafetensorError, OSError, and whatever a damaged header raises
        raise CliError(f"{path} is not a readable safetensors file ({first_line(e)})") from None


def _clean_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    """Foreign checkpoints: unwrap {'state_dict': ...}-style containers and strip the
    `module.` (DataParallel/DDP) and `_orig_mod.` (torch.compile) prefixes."""
    for key in ("state_dict", "model_state_dict", "model", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CliError(f"{path} does not hold a state dict of tensors")
    clean = {}
    for key, value in obj.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        clean[key] = value
    return clean


def _unpickling_reason(e: Exception) -> str:
    """Why torch.load(weights_only=True) refused a file, in a few words (never the advice to
    turn weights_only off: files that need code are not opened at all)."""
    found = re.search(r"unsupported global:?\s*(?:GLOBAL\s+)?([\w.]+)", str(e), re.IGNORECASE)
    if found:
        return f"it needs the Python object {found.group(1)}, i.e. code, not only tensors"
    if isinstance(e, EOFError):
        return "it is empty or truncated"
    return "it is damaged, or not a PyTorch pickle of tensors"


def _head_size(state: dict[str, Tensor], arch: str) -> Optional[int]:
    """The number of classes: rows of the classifier's weight."""
    if is_zoo(arch):
        weights = [v for k, v in state.items() if k.endswith("weight") and v.dim() in (2, 4)]
        return weights[-1].shape[0] if weights else None
    for key in ("linear.weight", "fc.weight"):
        if key in state and state[key].dim() == 2:
            return state[key].shape[0]
    return None


def check_weights(state: dict[str, Tensor], own: dict[str, Tensor], path: Path) -> None:
    """Weights a model can compute with: floating point where the model's are (an integer
    file would be cast silently) and finite (a model that computes NaN cannot be scored,
    nor trained on)."""
    floats = [k for k, v in own.items() if v.is_floating_point() and k in state]
    cast = [k for k in floats if not state[k].is_floating_point()]
    if cast:
        raise CliError(
            f"{path}: {len(cast)} weight tensor(s) are not floating point ({', '.join(cast[:3])}: "
            f"{state[cast[0]].dtype}); part loads the floating-point weights it saves"
        )
    broken = [k for k in floats if not bool(torch.isfinite(state[k]).all())]
    if broken:
        raise CliError(
            f"{path}: {len(broken)} weight tensor(s) hold NaN or inf ({', '.join(broken[:3])}); "
            "a model that computes NaN cannot be scored or trained"
        )


def load_state_into(model: nn.Module, state: dict[str, Tensor], arch: str, path: Path) -> None:
    """Strict load with a one-line explanation when the file does not fit the architecture."""
    unused = arch == "wrn-34-10"  # TRADES' unused sub_block1
    state = {k: v for k, v in state.items() if not (unused and k.startswith("sub_block1."))}
    if hasattr(model, "adapt_state"):
        state = model.adapt_state(state)
    own = model.state_dict()
    check_weights(state, own, path)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        k = (missing or unexpected or wrong)[0]
        shapes = f" ({tuple(state[k].shape)} vs {tuple(own[k].shape)})" if k in wrong else ""
        raise CliError(
            f"{path} does not match architecture {arch}: {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(wrong)} of another shape keys (e.g. {k}{shapes})"
        )
    model.load_state_dict(state)


def _read_pickle(path: Path) -> tuple[Any, str]:
    """A foreign .pt/.pth file, opened with weights_only=True and nothing else, and the
    sha256 of the bytes read."""
    data = path.read_bytes()
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols; failures raise below
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, ...: all mean the same
        raise CliError(
            f"{path} was not loaded: {_unpickling_reason(e)}. part never unpickles files that need code "
            "(weights-only loading); convert it to a state dict of tensors with code you trust"
        ) from None
    return obj, hashlib.sha256(data).hexdigest()


def read_weights(
    path: Path, arch: Optional[str], given: str = ""
) -> tuple[dict, CheckpointMeta, str]:
    """(tensors, metadata, sha256) of model weights: ours, or a foreign state dict of `arch`
    (.pt/.pth/.bin/.ckpt opened weights-only). `given`: how the user named `arch`."""
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        (state, sha256), metadata = _read_pickle(path), {}
    else:
        state, metadata, sha256 = read_safetensors(path)
    fmt = metadata.get("format", "")
    if fmt == STATE_FORMAT or path.name.endswith(".state.safetensors"):
        raise CliError(
            f"{path} is a resume state (for train --resume), not a model checkpoint; use last.safetensors or best.safetensors"
        )
    if fmt.startswith("part/") and fmt != FORMAT:
        raise CliError(f"{path} is a file of part ({fmt}), not a model checkpoint")
    if fmt == FORMAT:
        meta = CheckpointMeta.from_metadata(metadata, path)
        if arch is not None and arch != meta.arch:
            raise CliError(f"{path} holds a {meta.arch} model, not {given}{arch}")
        return state, meta, sha256
    if arch is None:
        raise CliError(
            f"{path} is a foreign state dict: say which architecture with --arch ({ARCH_HELP})"
        )
    state = _clean_state_dict(state, path)
    meta = CheckpointMeta(arch, _head_size(state, arch), format="foreign", source=str(path))
    return state, meta, sha256


def init_path(cfg: TrainConfig) -> Optional[Path]:
    """The --init file: a path, or robustbench:NAME in RobustBench's model folder layout."""
    if not cfg.init:
        return None
    return checkpoint_source(Path(cfg.init), None, cfg.dataset, "linf", cfg.model_dir)[0]


def load_init(model: nn.Module, cfg: TrainConfig, num_classes: int) -> None:
    """--init: a checkpoint's weights start the run, its sha256 recorded (and checked on a
    re-run); a classifier for another number of classes keeps its fresh initialisation."""
    path = init_path(cfg)
    path = path / HF_WEIGHTS if path.is_dir() else path
    state, _, sha256 = read_weights(path, cfg.model, "--model ")
    if cfg.init_sha256 and cfg.init_sha256 != sha256:
        raise CliError(
            f"--init {path}: its sha256 ({sha256[:12]}...) is not the recorded {cfg.init_sha256[:12]}...: "
            "not the file this config started from"
        )
    if hasattr(model, "adapt_state"):
        state = model.adapt_state(state)
    own = model.state_dict()
    head = [  # the classifier's layers, made for another number of classes
        k
        for k, v in own.items()
        if k in state
        and v.dim()
        and state[k].shape != v.shape
        and v.shape[0] == num_classes
        and state[k].shape[1:] == v.shape[1:]
    ]
    if head:
        note(
            f"note: --init {path.name} has a classifier for {state[head[0]].shape[0]} classes: "
            f"{', '.join(head)} start afresh for {num_classes}"
        )
    load_state_into(model, {**state, **{k: own[k] for k in head}}, cfg.model, path)
    cfg.init_sha256 = sha256


def load_checkpoint(
    path: str | Path,
    arch: Optional[str] = None,
    device: str | torch.device = "cpu",
    cam_layer: Optional[str] = None,
) -> tuple[nn.Module, CheckpointMeta]:
    """(model in eval mode, metadata) of our checkpoint, or of a foreign state dict with
    `arch` (.safetensors, or .pt/.pth opened with weights_only=True)."""
    device = pick_device(device) if isinstance(device, str) else device
    return _load_checkpoint(Path(path), arch, device, cam_layer)[:2]


def _load_checkpoint(
    path: Path, arch: Optional[str], device: str | torch.device, cam_layer: Optional[str]
) -> tuple[nn.Module, CheckpointMeta, str]:
    """load_checkpoint, and the sha256 of the bytes the weights came from."""
    if arch is not None and arch not in BUILTIN_MODELS and not is_zoo(arch):
        raise unknown("architecture", arch, [ARCH_HELP])
    if path.is_dir() and (path / HF_WEIGHTS).is_file():  # a model folder (export --format hf)
        path = path / HF_WEIGHTS
    require_file(path, "checkpoint")
    state, meta, sha256 = read_weights(path, arch, "")
    if meta.num_classes is None:
        raise CliError(f"{path} does not match architecture {arch}: no classifier weight found")
    meta.cam_layer = cam_layer or meta.cam_layer
    model = build_model(meta.arch, meta.num_classes, meta.cam_layer, meta.image_size or 32)
    load_state_into(model, state, meta.arch, path)
    return model.to(device).eval(), meta, sha256


def save_resume_state(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: CheckpointMeta,
    history: list[dict],
    ema: Optional[nn.Module] = None,
) -> None:
    """One file with everything a run needs to continue from this epoch: the weights (and
    their moving average with --ema), the optimizer buffers, the checkpoint's metadata and
    the metrics of every epoch so far. The lr follows from (config, epoch, step) and the RNG
    streams from (seed, epoch, rank)."""
    sd = optimizer.state_dict()
    tensors = {
        f"model.{k}": v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
    }
    if ema is not None:
        tensors |= {
            f"ema.{k}": v.detach().to("cpu").contiguous() for k, v in ema.state_dict().items()
        }
    scalars = {}
    for idx, entry in sd["state"].items():
        for name, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{idx}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    info = {
        "checkpoint": meta.to_metadata(),
        "param_groups": sd["param_groups"],
        "scalars": scalars,
        "history": history,
    }
    save_tensors(
        path, tensors, {"format": STATE_FORMAT, **{k: json.dumps(v) for k, v in info.items()}}
    )


def load_resume_state(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema: Optional[nn.Module] = None
) -> tuple[CheckpointMeta, list[dict]]:
    """Weights (and their average), optimizer from a resume state; returns its checkpoint
    metadata and history."""
    tensors, metadata, _ = read_safetensors(path)
    if metadata.get("format") != STATE_FORMAT:
        raise CliError(f"{path} is not a resume state of this version of part")
    try:
        info = {k: json.loads(v) for k, v in metadata.items() if k != "format"}
        meta = CheckpointMeta.from_metadata(info["checkpoint"], path)
        optim_state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                optim_state.setdefault(int(idx), {})[name] = value
        for key, value in info["scalars"].items():
            idx, name = key.split(".", 1)
            optim_state.setdefault(int(idx), {})[name] = value
        weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        history = list(info["history"])
    except (RecursionError, KeyError, ValueError, TypeError, AttributeError) as e:
        raise CliError(f"{path}: a damaged resume state ({first_line(e)})") from None
    load_state_into(model, weights, meta.arch, path)
    if ema is not None:
        averaged = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
        load_state_into(ema, averaged, meta.arch, path)
    try:
        optimizer.load_state_dict({"state": optim_state, "param_groups": info["param_groups"]})
    except (RecursionError, ValueError, KeyError, TypeError) as e:
        raise CliError(f"{path} does not fit this model's optimizer ({first_line(e)})") from None
    return meta, history


def trained_data_dir(meta: CheckpointMeta, dataset: str) -> str:
    """No --data-dir: the folder the model was trained from, when it holds this data set
    and is here; else `data`."""
    cfg = meta.config
    if cfg and cfg.dataset == dataset and cfg.data_dir != "data" and Path(cfg.data_dir).is_dir():
        note(f"note: test images from {cfg.data_dir}, where the model was trained", once=True)
        return cfg.data_dir
    return "data"


@dataclasses.dataclass
class EvalTarget:
    """A checkpoint ready to be evaluated: the model (eval mode, channels-last, on its
    device), its metadata, its test split (on the CPU) and the file's sha256."""

    path: Path
    model: nn.Module
    meta: CheckpointMeta
    dataset: str
    test: Split
    sha256: str


def load_for_eval(
    path: Path,
    arch: Optional[str],
    device: torch.device,
    dataset: Optional[str],
    data_dir: Optional[str],
    cache_dir: str,
    cam_layer: Optional[str] = None,
    splits: Optional[dict] = None,
) -> EvalTarget:
    """What `attack` and `cam` share: the model, channels-last, and its test split (once per
    data set in `splits`; from `data_dir`, else where it was trained), checked to fit."""
    model, meta, sha256 = _load_checkpoint(Path(path), arch, device, cam_layer)
    name = dataset or meta.dataset or "cifar10"  # --dataset, else its own, else cifar10
    if name not in DATASETS:
        raise unknown("dataset", name, DATASETS)
    key = name, meta.image_size or DATASETS[name].image_size or 32
    data_dir = data_dir or trained_data_dir(meta, name)
    splits = {} if splits is None else splits
    if key not in splits:
        splits[key] = load_split(name, "test", data_dir, cache_dir, key[1])
    classes, side = splits[key].classes, splits[key].x.shape[-1]
    if len(classes) != meta.num_classes:
        raise CliError(
            f"the model predicts {meta.num_classes} classes but {name} in {data_dir} has {len(classes)}"
        )
    if meta.classes and list(meta.classes) != list(classes):
        raise CliError(
            f"the model's classes ({', '.join(meta.classes[:4])}, ...) differ from those of {name} in {data_dir}"
        )
    if side != key[1]:
        raise CliError(
            f"the model was trained on {key[1]} px images, the test images of {name} are {side} px"
        )
    return EvalTarget(Path(path), channels_last(model), meta, name, splits[key], sha256)


# ============================================================================ plots and tables
# Plots use matplotlib, an optional extra (`pip install matplotlib`): line plots with
# axes, legends and error bars are what it does well, and nothing else here needs it.
# Without it the PNGs are skipped with one note; every number is in the CSV/JSON anyway.

_said_no_matplotlib = []


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (said once) when not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        if not _said_no_matplotlib:
            note("note: plots need matplotlib (pip install matplotlib); skipping the PNG files")
            _said_no_matplotlib.append(True)
        return None
    return plt


def save_figure_png(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)


def plot_curves(
    path: Path, rows: list[dict], warmup_epochs: int, milestones: list[int], method: str
) -> bool:
    """curves.png of a run: training loss, and accuracy (training AEs, natural, PGD-20)
    against epoch; the warm-up -> PART switch and the lr drops marked."""
    plt = pyplot()
    if plt is None or not rows:
        return False
    epochs = [r["epoch"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(epochs, [r["train_loss"] for r in rows], marker=".", color="tab:gray")
    left.set(xlabel="epoch", ylabel="training loss", title="loss")
    for key, label, colour in (
        ("train_acc", "training AEs", "tab:gray"),
        ("natural", "natural", "tab:blue"),
        ("pgd20", "PGD-20", "tab:red"),
    ):
        points = [(r["epoch"], 100 * r[key]) for r in rows if r.get(key) is not None]
        if points:
            right.plot(*zip(*points, strict=True), marker=".", label=label, color=colour)
    where = rows[-1].get("eval_on", "test")
    right.set(xlabel="epoch", ylabel="accuracy (%)", title=f"natural, PGD-20 on {where} images")
    marks = [(m, "black", ":", "lr drop") for m in milestones if m < epochs[-1]]
    if method == "part" and 0 < warmup_epochs < epochs[-1] + 1:
        marks.append((warmup_epochs, "tab:green", "--", "PART starts"))
    for ax in (left, right):
        for i, (epoch, colour, style, label) in enumerate(marks):
            first = label == "PART starts" or i == 0
            ax.axvline(
                epoch + 0.5, color=colour, linestyle=style, lw=1, label=label if first else None
            )
        ax.grid(alpha=0.3)
    right.legend(fontsize=8)
    save_figure_png(fig, path)
    return True


def text_table(
    title: str, headers: Iterable[str], rows: Iterable[Iterable[Any]], left: Iterable[str] = ()
) -> Table:
    """The one terminal table: columns named in `left` are left-aligned, the rest (numbers)
    right-aligned; cells are plain text (the console reads no markup)."""
    table, left = Table(title=title), set(left)
    for h in headers:
        table.add_column(h, justify="left" if h in left else "right")
    for r in rows:
        table.add_row(*map(str, r))
    return table


def csv_text(headers: list[str], rows: list[list[Any]]) -> str:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(headers)
    writer.writerows(rows)
    return buffer.getvalue()


# ============================================================================ the training run

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def stop_signals_deferred():
    """Hold Ctrl-C / SIGTERM back while an epoch's files are written."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {s: signal.signal(s, lambda *a: caught.append(a)) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            raise KeyboardInterrupt


SUMMARY_COLUMNS = tuple(
    "epoch phase lr train_loss train_acc natural pgd20 eval_on eval_points seconds img_per_s "
    "steady_img_per_s".split()
)


class Reporter:
    """Run output: the resolved config, a live progress bar per epoch on a terminal, and one
    row per epoch (plain lines when stdout is not a terminal). Silent on ranks other than 0."""

    COLUMNS = "epoch phase lr loss train% nat% pgd20% sec img/s".split()
    WIDTHS = (7, 8, 9, 8, 7, 7, 7, 7, 8)

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def print(self, *args, **kwargs) -> None:
        if self.enabled:
            console.print(*args, **kwargs)

    def config(
        self, cfg: TrainConfig, preset: str, out: Path, device: torch.device, extra: str = ""
    ) -> None:
        items = " ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items())
        self.print(f"part train preset={preset} out={out} device={device}{extra}", style="bold")
        self.print(f"config: {items}")

    def header(self) -> None:
        names = zip(self.COLUMNS, self.WIDTHS, strict=True)
        self.print("  ".join(name.rjust(width) for name, width in names), style="bold")

    @contextlib.contextmanager
    def bar(self, label: str, total: int):
        """A bar on a terminal (`label`, done of `total`, loss and accuracy so far)."""
        with live_progress(self.enabled) as bars:
            if bars is None:
                yield lambda done, loss=None, acc=None: None
                return
            task = bars.add_task(label, total=total, extra="")

            def update(done: int, loss: Optional[float] = None, acc: float = 0.0) -> None:
                stats = {} if loss is None else {"extra": f"loss {loss:.4f} acc {100 * acc:.1f}%"}
                bars.update(task, completed=done, **stats)

            yield update

    def time_left(self, done: list[dict], left: int) -> None:
        """After the run's first epoch, and the first of a new phase (PART's CAM costs more
        than the warm-up's AT): the rest at this epoch's pace."""
        if left and (len(done) == 1 or done[-1]["phase"] != done[-2]["phase"]):
            pace, epochs = done[-1]["seconds"], "epoch" if left == 1 else f"{left} epochs"
            self.print(
                f"about {fmt_duration(pace * left)} for the {epochs} left "
                f"({pace:.0f} s each at this {done[-1]['phase']} epoch's pace)"
            )

    def row(self, m: dict) -> None:
        values = [f"{m['epoch']}", m["phase"], f"{m['lr']:.2e}", f"{m['train_loss']:.4f}"]
        values += [fmt_pct(m.get(k)) for k in ("train_acc", "natural", "pgd20")]
        values += [f"{m['seconds']:.1f}", f"{m['img_per_s']:.0f}"]
        self.print("  ".join(v.rjust(w) for v, w in zip(values, self.WIDTHS, strict=True)))
        console.file.flush()  # a row per epoch also reaches logs and pipes at once


@dataclasses.dataclass(frozen=True)
class RunFiles:
    """The files of a run folder."""

    folder: Path

    last = property(lambda self: self.folder / "last.safetensors")
    state = property(lambda self: self.folder / "last.state.safetensors")
    best = property(lambda self: self.folder / "best.safetensors")
    metrics = property(lambda self: self.folder / "metrics.jsonl")
    config = property(lambda self: self.folder / "config.json")
    summary = property(lambda self: self.folder / "summary.csv")
    curves = property(lambda self: self.folder / "curves.png")
    tensorboard = property(lambda self: self.folder / "tensorboard")

    def present(self) -> list[Path]:
        """The files of a run that are there (any one of them makes the folder a run)."""
        names = ("last", "state", "best", "metrics", "config", "summary", "curves", "tensorboard")
        return [p for n in names if (p := getattr(self, n)).exists()]


def command_name() -> str:
    """How the user started us, for messages that say what to run next (--nproc tells the
    processes it starts)."""
    name = "python part.py" if Path(sys.argv[0]).name == "part.py" else "part"
    return os.environ.get("PART_COMMAND") or name


def resume_command(folder: Path) -> str:
    nproc = f" --nproc {os.environ['PART_NPROC']}" if os.environ.get("PART_NPROC") else ""
    return f"{command_name()} train --out {folder} --resume{nproc}"


def cannot_continue(files: RunFiles, problem: str) -> str:
    """A lost or damaged resume state: the run cannot continue exactly; its weights can
    start a new one."""
    done = _epoch_of(files.last)
    then = f"start a new --out with --init {files.last} to train on from its weights"
    return f"{problem}; {files.last.name} holds epoch {done}: {then}" if done else problem


def stored_config(files: RunFiles) -> tuple[TrainConfig, str]:
    """A run's own config and preset: from its resume state, or config.json when no epoch
    finished."""
    if files.state.is_file():
        try:
            _, metadata, _ = read_safetensors(files.state)
            meta = CheckpointMeta.from_metadata(json.loads(metadata["checkpoint"]), files.state)
        except (RecursionError, KeyError, ValueError, TypeError) as e:  # CliError is a ValueError
            why = f"{files.state}: not a resume state of this version of part ({first_line(e)})"
            raise CliError(
                cannot_continue(files, str(e) if isinstance(e, CliError) else why)
            ) from None
        if meta.config is None:
            raise CliError(f"{files.state} holds no config; the run cannot resume")
        return meta.config, meta.preset or meta.config.dataset
    try:
        stored = json.loads(files.config.read_text())
        cfg = config_from_dict(stored["config"], str(files.config))
        return cfg, str(stored.get("preset") or "") or cfg.dataset
    except (RecursionError, OSError, ValueError, KeyError, TypeError) as e:
        raise CliError(f"{files.config} is damaged ({first_line(e)}); cannot resume") from None


def resume_config(
    files: RunFiles,
    overrides: dict[str, Any],
    preset: Optional[str] = None,
    presets_file: Optional[Path] = None,
    config_file: Optional[Path] = None,
) -> tuple[TrainConfig, str]:
    """The run's own config. The command that started it may be given again (a pre-empted
    job reruns its own command line): a setting it repeats, from an option, --config or
    --preset, must equal the run's; only a different value is refused, by name. Settings
    that do not change what is computed (device, data location, threads, more epochs, ...)
    are taken from an option, the --config file or a given --preset alike."""
    cfg, run_preset = stored_config(files)
    values = dataclasses.asdict(cfg)
    given = {k: coerce(k, v, "command line") for k, v in overrides.items() if v is not None}
    said, origins = {}, {}  # what the files named here say about each setting, and where from
    if preset is not None or presets_file is not None:
        said, asked, origins = preset_settings(
            preset or run_preset, presets_file, given.get("dataset", cfg.dataset), config_file
        )
        if asked != run_preset:
            raise CliError(
                f"--preset {preset}: this run was started from preset {run_preset!r}; "
                f"resume it with --preset {run_preset} or without --preset"
            )
        if preset is None:  # --presets alone: the run's preset is compared, not applied
            said = {k: v for k, v in said.items() if origins[k] == str(config_file)}
    elif config_file is not None:
        said = read_settings_file(config_file)[0]
        origins = dict.fromkeys(said, str(config_file))
    for key, value in {**said, **given}.items():
        if CONFIG_FIELDS[key].metadata["on_resume"]:
            values[key] = value
        elif value != values.get(key):
            origin = "" if key in given else f" (from {origins[key]})"
            raise CliError(
                f"--{key.replace('_', '-')} {value!r}{origin} differs from the run's own "
                f"{values.get(key)!r}: a resumed run keeps its settings (drop the option, or "
                "start a new --out)"
            )
    values["out"] = str(files.folder)
    cfg = TrainConfig(**values)
    validate_config(cfg)
    return cfg, run_preset


@dataclasses.dataclass
class Run:
    """What a training run holds between epochs."""

    cfg: TrainConfig
    files: RunFiles
    dist: Dist
    device: torch.device
    train: Split  # on the device
    evaluation: Split  # validation split, or the first eval_subset test images
    parts: TrainingModules
    optimizer: torch.optim.Optimizer
    setup: AttackSetup
    meta: CheckpointMeta  # what every checkpoint of this run says, before the epoch's figures
    report: Reporter
    history: list[dict] = dataclasses.field(default_factory=list)
    best: dict = dataclasses.field(default_factory=lambda: {"pgd20": None, "epoch": None})
    start: int = 0
    # TensorBoard / W&B writers, when asked for
    trackers: list = dataclasses.field(default_factory=list)
    estimated: bool = False  # the CPU time estimate has been said
    ema: Optional[nn.Module] = None  # --ema: the moving average of the weights

    @property
    def scored(self) -> nn.Module:
        """The model that is evaluated and saved: the moving average when there is one."""
        return self.ema if self.ema is not None else self.parts.model


def load_run_data(cfg: TrainConfig) -> tuple[Split, Split, str, str]:
    """(training split, evaluation split, where `best` is chosen, fingerprint of the data)."""
    full = load_split(cfg.dataset, "train", cfg.data_dir, cfg.cache_dir, cfg.image_size)
    test = load_split(cfg.dataset, "test", cfg.data_dir, cfg.cache_dir, cfg.image_size)
    if full.classes != test.classes:
        raise CliError(f"the train and test splits of {cfg.data_dir} have different classes")
    train, val = carve_validation(full, cfg.val_size, cfg.seed)
    train = train.limited(cfg.train_subset)
    if len(train.y) < cfg.batch_size:
        raise CliError(
            f"the training set has {len(train.y)} images, fewer than one batch ({cfg.batch_size})"
        )
    if cfg.val_size:
        return train, val, "val", fingerprint(full)
    return train, test.limited(cfg.eval_subset), "test", fingerprint(full)


def run_model(cfg: TrainConfig, train: Split, device: torch.device, dist: Dist, init: bool):
    """The run's model, channels-last on its device: its weights from the seed, or from --init
    (`init`: also for a run stopped before its first epoch); PART's CAM layer checked."""
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed only
    model = channels_last(
        build_model(cfg.model, len(train.classes), cfg.cam_layer, int(train.x.shape[-1])).to(device)
    )
    if cfg.sync_bn and dist.world > 1:
        if device.type != "cuda":
            raise CliError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm does not run on the CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if init:
        load_init(model, cfg, len(train.classes))
    if cfg.method == "part" and cfg.mask_rule not in NO_CAM_RULES:
        check_cam_layer(model, to_float(train.x[:2]).to(device), cfg)
    return model


def write_run_config(files: RunFiles, cfg: TrainConfig, preset: str, data_hash: str, eval_on: str):
    """config.json: the settings and where the run ran; `--config` re-runs it from there."""
    write_json(
        files.config,
        {
            "config": dataclasses.asdict(cfg),
            "preset": preset,
            "data_fingerprint": data_hash,
            "eval_on": eval_on,
            "versions": versions(),
            "machine": machine(),
            "command": sys.argv[1:],
        },
    )


def run_header(
    report: Reporter, cfg: TrainConfig, preset: str, out: Path, device: torch.device, dist: Dist
) -> None:
    """The run's first lines: its settings (--amp not given: this machine's default, set in
    `cfg` and recorded as chosen) and what they will do that a reader might not expect."""
    hint = ""
    if cfg.amp is None:
        cfg.amp, hint = default_amp(device, cpu_bf16())
    extra = f" threads={torch.get_num_threads()}" if device.type == "cpu" else ""
    extra += f" processes={dist.world}" if dist.world > 1 else ""
    extra += " amp=bf16 (--no-amp: fp32)" if cfg.amp and device.type == "cpu" else ""
    report.config(cfg, preset, out, device, extra)
    if hint:
        report.print(hint)
    if cfg.amp and device.type not in ("cuda", "cpu"):
        report.print(f"note: --amp is for CUDA and CPUs; training in fp32 on {device.type}")
    late = [m for m in cfg.lr_milestones if m >= cfg.epochs] if cfg.schedule == "step" else []
    if late:
        report.print(
            f"note: --epochs {cfg.epochs} ends before lr milestone {','.join(map(str, late))}: "
            f"the learning rate {'never decays' if late == cfg.lr_milestones else 'decays less'} "
            f"(--lr-milestones moves them, e.g. --lr-milestones {cfg.epochs - 1})"
        )


def prepare_run(cfg: TrainConfig, preset: str, files: RunFiles, resume: bool, dist: Dist) -> Run:
    """Data, model, optimizer and wrappers; on --resume the state of the last finished epoch."""
    device = process_device(cfg.device, dist)
    report = Reporter(enabled=dist.main)
    run_header(report, cfg, preset, files.folder, device, dist)
    train, evaluation, eval_on, data_hash = load_run_data(cfg)
    n = len(evaluation.y)
    where = f"the first {n} test images (--val-size 0: no validation split)"
    where = f"{n} validation images held out of the training set" if eval_on == "val" else where
    report.print(f"natural / PGD-20 each epoch and `best` on {where}")
    init = cfg.init and not (resume and files.state.is_file())  # else the run's own weights
    model = run_model(cfg, train, device, dist, bool(init))
    optimizer = make_optimizer(model, cfg)
    meta = CheckpointMeta(
        arch=cfg.model,
        num_classes=len(train.classes),
        classes=train.classes,
        dataset=cfg.dataset,
        image_size=int(train.x.shape[-1]),
        cam_layer=cfg.cam_layer,
        config=cfg,
        preset=preset,
        data_fingerprint=data_hash,
        versions=versions(),
        machine=machine(),
    )
    run = Run(
        cfg,
        files,
        dist,
        device,
        train.to(device),
        evaluation.to(device),
        wrap_for_training(model, cfg, dist, device),
        optimizer,
        AttackSetup.from_config(cfg),
        meta,
        report,
    )
    if cfg.ema:
        run.ema = copy.deepcopy(model).requires_grad_(False).eval()
    if resume:
        continue_run(run, data_hash)
    if dist.main:  # trackers first: one that fails to start leaves no run in the folder
        run.trackers = open_trackers(cfg, files, preset)
        write_run_config(files, cfg, preset, data_hash, eval_on)
    return run


def continue_run(run: Run, data_hash: str) -> None:
    """--resume on a folder that holds a run: the state of its last finished epoch, checked
    against these settings and data; said where the result will not be bit-exact."""
    cfg, files, dist = run.cfg, run.files, run.dist
    if not files.state.is_file():
        if _epoch_of(files.last):  # starting again at epoch 1 would overwrite later epochs
            problem = f"{files.state} is missing: the run cannot continue exactly (its optimizer state is gone)"
            raise CliError(cannot_continue(files, problem))
        return  # stopped before its first epoch ended: it starts again
    try:
        saved, history = load_resume_state(files.state, run.parts.model, run.optimizer, run.ema)
    except CliError as e:
        raise CliError(cannot_continue(files, str(e))) from None
    if cfg.epochs < (saved.epoch or 0):
        raise CliError(f"--epochs {cfg.epochs}: this run has already finished {saved.epoch} epochs")
    if saved.classes != run.meta.classes or saved.data_fingerprint != data_hash:
        raise CliError(
            f"the training data in {cfg.data_dir} differ from the data this run was trained on "
            f"(classes or fingerprint {saved.data_fingerprint} vs {data_hash}); give the run's own --data-dir"
        )
    run.start, run.best = saved.epoch or 0, saved.best or run.best
    run.history = [r for r in history if r["epoch"] <= run.start]
    before, now = saved.machine.get("threads"), torch.get_num_threads()
    if dist.main and run.device.type == "cpu" and before not in (None, now):
        note(
            f"note: the run used {threads_text(before)}, this resume {now}: it continues exactly, but floating-point "
            f"sums may round differently, so the weights will not be bit-identical to an uninterrupted run "
            f"(--threads {before} keeps them so)"
        )
    before = saved.machine.get("processes", 1)
    if dist.main and before != dist.world:
        note(
            f"note: the run used {before} process{'es' * (before != 1)}, this resume {dist.world}: "
            "each process takes another share of every batch, so the weights will not be "
            f"bit-identical to an uninterrupted run (--nproc {before} keeps them so)"
        )
    if dist.main:
        repair_run_files(run, saved)


def check_cam_layer(model: nn.Module, x: Tensor, cfg: TrainConfig) -> None:
    """Before the first epoch: the CAM layer's map has more than one position (at 1 x 1 every
    pixel has the same budget: PART would be plain AT at eps_low)."""
    low_res = _class_activation(model, x, cfg.cam)
    if low_res.shape[-2] * low_res.shape[-1] < 2:
        layer = cfg.cam_layer or "the default CAM layer"
        raise CliError(
            f"{layer} gives a 1x1 map at {x.shape[-1]} px: PART would give every pixel the same budget; "
            "choose an earlier layer with --cam-layer (--resume may change it)"
        )


# Experiment trackers, added by other modules (part_tools: tensorboard, wandb): name -> a
# class made with (cfg, files, preset), with log(metrics, epoch) and close(), and a static
# log_report(project, rows, names, folder) for `attack`'s results where it has one.
TRACKERS: dict[str, Any] = {}


def open_trackers(cfg: TrainConfig, files: RunFiles, preset: str) -> list:
    """The experiment trackers asked for; a missing one is said once and the run goes on
    (every figure is in metrics.jsonl and summary.csv anyway)."""
    trackers: list = []
    # W&B, the one that may fail to start (no login, no network), first
    for name in (n for n in ("wandb", "tensorboard") if getattr(cfg, n)):
        if name not in TRACKERS:
            note(
                f"note: --{name} comes with part_tools.py (pip install .); logging to the CSV only"
            )
        elif importlib.util.find_spec(name) is None:
            note(
                f"note: --{name} needs the {name} package (pip install {name}); logging to the CSV only"
            )
        else:
            trackers.append(TRACKERS[name](cfg, files, preset))
    return trackers


def repair_run_files(run: Run, saved: CheckpointMeta) -> None:
    """After a kill between the writes of an epoch: `last` and `best` as the resume state
    says they should be, metrics/summary/curves rebuilt from its history, no temporaries."""
    files, model = run.files, run.scored
    for stale in remove_stale_temporaries(files.folder):
        note(f"note: removed {stale.name}, left by an interrupted write")
    if _epoch_of(files.last) != saved.epoch:
        save_checkpoint(files.last, model, saved)
        note(f"note: {files.last.name} rewritten from the resume state (epoch {saved.epoch})")
    if run.best.get("epoch") == saved.epoch and _epoch_of(files.best) != saved.epoch:
        save_checkpoint(files.best, model, saved)
    write_history(run)


def _epoch_of(path: Path) -> Optional[int]:
    try:
        return json.loads(safetensors_metadata(path).get("epoch", "null"))
    except Exception:  # damaged: it will be written again
        return None


def write_history(run: Run) -> None:
    """metrics.jsonl, summary.csv and curves.png from the history of finished epochs."""
    files, rows = run.files, run.history
    write_text(files.metrics, "".join(json.dumps(r) + "\n" for r in rows))
    write_text(
        files.summary,
        csv_text(list(SUMMARY_COLUMNS), [[r.get(c, "") for c in SUMMARY_COLUMNS] for r in rows]),
    )
    try:
        milestones = run.cfg.lr_milestones if run.cfg.schedule == "step" else []
        plot_curves(files.curves, rows, run.cfg.warmup_epochs, milestones, run.cfg.method)
    except OSError:
        raise
    except Exception as e:  # a plotting problem must never stop training
        note(f"note: curves.png not drawn ({first_line(e)})")


def fmt_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"
    return f"{max(1, round(seconds / 60))} min"


def say_cpu_estimate(run: Run, epoch: int, epoch_seconds: float) -> None:
    """On a CPU, once per run, after the first steps: what an epoch and the rest of the run
    will take, when that is long (a GPU recipe started on a CPU)."""
    if epoch_seconds < 300:
        return
    left = run.cfg.epochs - epoch
    text = (
        f"note: on this CPU ({threads_text(torch.get_num_threads())}) an epoch takes about {fmt_duration(epoch_seconds)} "
        f"(estimated from its first steps); {left} epoch{'s' * (left != 1)} to go: about {fmt_duration(left * epoch_seconds)}"
    )
    if run.cfg.model != "cnn":
        text += (
            f". {run.cfg.model} is a GPU recipe: on a CPU, --preset cifar10-cpu trains a small CNN"
        )
    run.report.print(text)


def finish_epoch(run: Run, metrics: dict) -> dict:
    """Evaluation, `best`, and the epoch's files: the resume state first (on its own always a
    consistent epoch), then `last`, `best`, metrics, summary and curves."""
    cfg, epoch = run.cfg, metrics["epoch"]
    t0 = time.perf_counter()
    if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
        with run.report.bar(f"eval {epoch}", len(run.evaluation.y)) as show:
            setup = eval_setup(2 * cfg.batch_size)
            result = evaluate(run.scored, run.evaluation, setup, run.dist, show)
        metrics.update(
            natural=result["natural"],
            pgd20=result[f"pgd{EVAL_STEPS}"],
            eval_on="val" if cfg.val_size else "test",
            eval_points=len(run.evaluation.y),
        )
    metrics["seconds"] = metrics["train_seconds"] + time.perf_counter() - t0
    improved = metrics.get("pgd20") is not None and (
        run.best["pgd20"] is None or metrics["pgd20"] > run.best["pgd20"]
    )
    if improved:
        run.best = {
            "pgd20": metrics["pgd20"],
            "natural": metrics["natural"],
            "epoch": epoch,
            "eval_on": metrics["eval_on"],
        }
    run.history.append(metrics)
    if run.dist.main:
        meta = dataclasses.replace(run.meta, epoch=epoch, metrics=metrics, best=dict(run.best))
        with stop_signals_deferred():
            try:
                save_resume_state(
                    run.files.state, run.parts.model, run.optimizer, meta, run.history, run.ema
                )
                save_checkpoint(run.files.last, run.scored, meta)
                if improved:
                    save_checkpoint(run.files.best, run.scored, meta)
                write_history(run)
            except OSError as e:
                raise CliError(
                    f"cannot write {e.filename or run.files.folder} ({e.strerror or first_line(e)}); the run keeps its "
                    f"last complete epoch: free the space, then `{resume_command(run.files.folder)}`"
                ) from None
        for tracker in run.trackers:
            tracker.log(metrics, epoch)
    run.report.row(metrics)
    return metrics


def run_training(
    cfg: TrainConfig, preset: str, files: RunFiles, resume: bool, dist: Dist = ONE_PROCESS
) -> dict:
    """The whole run: data, model, warm-up + PART epochs, evaluation, checkpoints.
    Returns the last epoch's metrics."""
    out = files.folder
    run: Optional[Run] = None
    metrics: dict = {}
    epoch = 0
    try:  # from the set-up on: once config.json is written, an interrupt says how to go on
        run = prepare_run(cfg, preset, files, resume, dist)
        if 0 < run.start < cfg.epochs:
            run.report.print(f"resuming at epoch {run.start + 1} of {cfg.epochs}")
        run.report.header()
        if run.start >= cfg.epochs:
            run.report.print(
                f"{out} already finished {run.start} of {cfg.epochs} epochs; nothing to do"
            )
        metrics = run.history[-1] if run.history else {}
        for epoch in range(run.start, cfg.epochs):
            metrics = finish_epoch(run, train_epoch(run, epoch))
            run.report.time_left(run.history[run.start :], cfg.epochs - epoch - 1)
    except KeyboardInterrupt:
        if run is None:
            if not files.config.is_file():
                raise  # nothing was written: the same command starts again
            kept = "its files are as they were" if resume else "no epoch had finished"
            raise CliError(
                f"interrupted while the run was set up ({kept}). Continue with: {resume_command(out)}",
                code=130,
            ) from None
        done = len(run.history)
        kept = f"{run.files.last} holds epoch {done}" if done else "no epoch had finished"
        raise CliError(
            f"interrupted in epoch {max(epoch, run.start) + 1} ({kept}). Continue with: {resume_command(out)}",
            code=130,
        ) from None
    except FloatingPointError:
        kept = (
            f"{run.files.last} keeps epoch {len(run.history)}" if run.history else "no checkpoint"
        )
        raise CliError(
            f"the training loss became NaN/inf in epoch {epoch + 1}; stopped ({kept}). Try a lower --lr",
            code=3,
        ) from None
    finally:
        for tracker in run.trackers if run is not None else ():
            tracker.close()
    if dist.main and metrics and run.best["epoch"]:
        run.report.print(
            f"done: {run.files.last}; best PGD-20 {fmt_pct(run.best['pgd20'])}% ({run.best.get('eval_on', 'test')}) "
            f"at epoch {run.best['epoch']} ({run.files.best})"
        )
    return metrics


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """What `fit` returns: the run folder, the config it ran with, the last epoch's figures;
    `.last` and `.best` are its checkpoints."""

    folder: Path
    config: TrainConfig
    metrics: dict

    last = property(lambda self: RunFiles(self.folder).last)
    best = property(lambda self: RunFiles(self.folder).best)


def fit(
    config: TrainConfig | dict | None = None,
    *,
    preset: Optional[str] = None,
    out: str | Path | None = None,
    resume: bool = False,
    presets: str | Path | None = None,
    config_file: str | Path | None = None,
    **settings: Any,
) -> TrainedRun:
    """Train from Python exactly as `python part.py train` does (same run folder, files,
    lock, checks and output). Settings: a TrainConfig (taken as it is), a dict, and/or
    keywords (epochs=10, eps=8, method="at", ...; budgets in 1/255 levels, as in
    configs.toml), on top of `config_file` (a run's config.json, or a TOML/JSON table of
    settings), on top of `preset` (default: the dataset's own) from configs.toml and the
    user's `presets` file. `out`: the run folder, made if missing (default
    runs/<preset>-<method>-<timestamp>). `resume=True` starts the run in `out`, or
    continues it exactly where it stopped when `out` already holds one, so that the same
    call works again after an interruption. Bad settings raise ValueError with the message
    the command line prints."""
    values = dataclasses.asdict(config) if isinstance(config, TrainConfig) else dict(config or {})
    values.update(settings)
    if out is not None:
        values["out"] = str(out)
    for key in values:
        if key not in CONFIG_FIELDS:
            raise unknown("setting", key, CONFIG_FIELDS)
    if not isinstance(resume, bool):
        raise CliError(f"resume must be True or False, got {resume!r}")
    dist = dist_from_env()
    if resume and not values.get("out"):
        raise CliError("--resume needs --out DIR, the run folder to start or continue")
    given = RunFiles(Path(values["out"])) if values.get("out") else None
    resume = resume and (given.state.is_file() or given.config.is_file())  # else it starts
    files_given = [Path(f) if f is not None else None for f in (presets, config_file)]
    if resume:
        cfg, preset_name = resume_config(given, values, preset, *files_given)
    else:
        cfg, preset_name = resolve_config(values, preset, *files_given)
        init = init_path(cfg)
        if init is not None and not (init / HF_WEIGHTS).is_file():  # before the run folder is made
            require_file(init, "--init", folder=f"is a folder without {HF_WEIGHTS}")
    set_threads(cfg.threads)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    files = given or RunFiles(Path(cfg.out or f"runs/{preset_name}-{cfg.method}-{stamp}"))
    cfg.out = str(files.folder)
    if cfg.batch_size < 2 * dist.world:
        raise CliError(
            f"--batch-size {cfg.batch_size} is too small for {dist.world} processes (at least 2 each)"
        )
    lock = contextlib.nullcontext()
    if dist.main:
        check_output(files.folder, "--out", folder=True)
        lock = folder_lock(files.folder, "a training run")
    with lock:
        if dist.main and not resume and files.present():  # under the lock: no run overwritten
            raise CliError(
                f"{files.folder} already holds a run ({files.present()[0].name}); pass --resume to "
                "continue it, or choose another --out"
            )
        if dist.main:
            remove_stale_temporaries(files.folder)
        with process_group(dist, process_device(cfg.device, dist)):
            metrics = run_training(cfg, preset_name, files, resume, dist)
    return TrainedRun(files.folder, cfg, metrics)


# ============================================================================ robustness evaluation
# Attack names: natural, fgsm, pgdK, cwK, mmaK, pgdK-part (K steps; an `xR` suffix asks for
# R random restarts, worst case kept), aa (the reference AutoAttack) and its components
# apgd-ce, apgd-t, fab-t, square. A new attack is one function (model, x, y, setup, spec,
# seed) -> (x_adv, extras) and one line in ATTACKS.


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """One attack as asked for: `name` as written, `key` its canonical form."""

    name: str
    family: str
    steps: int = 0
    restarts: int = 1

    @property
    def key(self) -> str:
        return self.seed_key + (f"x{self.restarts}" if self.restarts > 1 else "")

    @property
    def seed_key(self) -> str:
        """The key without the restarts: R restarts begin with the very run of one restart,
        so more restarts can only find more (a tested property)."""
        if not ATTACKS[self.family].iterative:
            return self.family
        return (
            f"pgd{self.steps}-part" if self.family == "pgd-part" else f"{self.family}{self.steps}"
        )


def fraction(flags: Tensor) -> float:
    """The share of True flags, exact in Python (0.414, not float32's 0.41400000453)."""
    return flags.sum().item() / flags.numel()


def predict(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """Predicted classes of x, batch by batch, without a graph. Outputs that are not finite
    stop the evaluation: the argmax of NaN is a made-up class, not a prediction."""
    found = []
    with torch.no_grad():
        for chunk in x.split(batch_size):
            logits = model(chunk)
            if not bool(torch.isfinite(logits).all()):
                raise CliError("the model's outputs are NaN or inf: no accuracy is reported")
            found.append(logits.argmax(1))
    return torch.cat(found) if found else x.new_zeros(0, dtype=torch.long)


def worst_of_restarts(
    model: nn.Module, y: Tensor, restarts: int, attack: Callable[[], Tensor]
) -> Tensor:
    """Run `attack` up to `restarts` times, keeping per example an AE that fools the model."""
    best = attack()
    for _ in range(restarts - 1):
        with torch.no_grad():
            holding = model(best).argmax(1) == y
        if not holding.any():
            break
        best = torch.where(holding.view(-1, 1, 1, 1), attack(), best)
    return best


def attack_natural(model, x, y, setup: AttackSetup, spec: AttackSpec, seed: int):
    return x, {}


def attack_fgsm(model, x, y, setup: AttackSetup, spec: AttackSpec, seed: int):
    return _pgd(model, x, y, setup.eps, setup.eps, 1, random_start=False), {}


def attack_iterative(model, x, y, setup: AttackSetup, spec: AttackSpec, seed: int):
    """pgdK, cwK, mmaK and pgdK-part (PGD inside the model's own PART budget map of these
    clean images, for analysis): K steps, the worst case of R restarts."""
    eps = budget_for(model, x, setup, part_phase=True) if spec.family == "pgd-part" else setup.eps
    if spec.family == "mma":
        run = lambda: _mma(model, x, y, eps, setup.step, spec.steps, k=3)  # noqa: E731
    else:
        loss = "cw" if spec.family == "cw" else "ce"
        run = lambda: _pgd(model, x, y, eps, setup.step, spec.steps, loss)  # noqa: E731
    return worst_of_restarts(model, y, spec.restarts, run), {}


AA_STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")


def _aa_component(adversary: Any, name: str, x: Tensor, y: Tensor, seed: int) -> Tensor:
    """One AutoAttack component, set up exactly as pyautoattack's run_standard_evaluation does."""
    if name == "apgd-ce":
        adversary.apgd.loss, adversary.apgd.seed = "ce", seed
        return adversary.apgd.perturb(x, y)
    if name == "apgd-t":
        adversary.apgd_targeted.seed = seed
        return adversary.apgd_targeted.perturb(x, y)
    if name == "fab-t":
        adversary.fab.targeted, adversary.fab.n_restarts, adversary.fab.seed = True, 1, seed
        return adversary.fab.perturb(x, y)
    adversary.square.seed = seed
    return adversary.square.perturb(x, y)


def autoattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    seed: int,
    components: tuple[str, ...] = AA_STANDARD,
    known: Optional[dict[str, Tensor]] = None,
    tell: Optional[Callable[[str, Tensor], None]] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The reference AutoAttack, standard version, from pyautoattack: its components run one
    after the other on the points still robust, each seeded as in run_standard_evaluation,
    so the result is what that gives (a test checks). Returns the AEs and, per component,
    which points were still robust after it. The global RNG is left as it was. `known`:
    the flags of the first components from an interrupted run (each component seeds
    itself, so the rest is as if they had run; their AEs are not kept); `tell(component,
    flags)` hears each component's flags as it finishes."""
    try:
        from pyautoattack import AutoAttack
    except ImportError:
        raise CliError("AutoAttack needs pyautoattack: pip install pyautoattack") from None
    with rng_fork(x.device), torch.no_grad():
        adversary = AutoAttack(
            model, norm="Linf", eps=eps, version="standard", seed=seed, device=x.device
        )
        num_classes = model(x[:1]).shape[1]
        if num_classes < 10:  # the standard version targets 9 classes; fewer exist here
            adversary.apgd_targeted.n_target_classes = adversary.fab.n_target_classes = (
                num_classes - 1
            )
        x_adv, robust, after = x.clone(), model(x).argmax(1) == y, {}
        for name in components:
            idx = robust.nonzero().squeeze(1)
            if name in (known or {}):
                robust &= known[name].to(robust.device)
            elif len(idx):
                adv = _aa_component(adversary, name, x[idx], y[idx], seed)
                fooled = model(adv).argmax(1) != y[idx]
                x_adv[idx[fooled]] = adv[fooled].to(x_adv.dtype)
                robust[idx[fooled]] = False
            after[name] = robust.clone()
            if tell is not None:
                tell(name, after[name])
    return x_adv, after


def attack_aa(model, x, y, setup: AttackSetup, spec: AttackSpec, seed: int, known=None, tell=None):
    """aa: the four components in order, with the robust flags after each (for its log and
    a continued evaluation: `known`, `tell` as in autoattack); a component asked for alone
    (apgd-ce, ..., square): that one, its flags are the attack's."""
    if spec.family != "aa":
        return autoattack(model, x, y, setup.eps, seed, (spec.family,))[0], {}
    return autoattack(model, x, y, setup.eps, seed, AA_STANDARD, known, tell)


@dataclasses.dataclass(frozen=True)
class AttackFamily:
    run: Callable[..., tuple[Tensor, dict[str, Tensor]]]
    iterative: bool = False  # takes K steps (pgdK) and R restarts (xR)
    default_steps: int = 0
    white_box: bool = True
    needs: Optional[str] = None  # an optional package


ATTACKS: dict[str, AttackFamily] = {
    "natural": AttackFamily(attack_natural),
    "fgsm": AttackFamily(attack_fgsm),
    "pgd": AttackFamily(attack_iterative, iterative=True, default_steps=20),
    "cw": AttackFamily(attack_iterative, iterative=True, default_steps=20),
    "mma": AttackFamily(attack_iterative, iterative=True, default_steps=20),
    "pgd-part": AttackFamily(attack_iterative, iterative=True, default_steps=20),
    "aa": AttackFamily(attack_aa, needs="pyautoattack"),
    "apgd-ce": AttackFamily(attack_aa, needs="pyautoattack"),
    "apgd-t": AttackFamily(attack_aa, needs="pyautoattack"),
    "fab-t": AttackFamily(attack_aa, needs="pyautoattack"),
    "square": AttackFamily(attack_aa, white_box=False, needs="pyautoattack"),
}
# What shell completion offers for --attacks (any K steps and xR restarts work too).
ATTACK_NAMES = tuple(
    "natural fgsm pgd20 pgd50 pgd100 cw20 cw50 mma pgd20-part aa apgd-ce apgd-t fab-t square".split()
)
DEFAULT_ATTACKS = "natural,fgsm,pgd20,cw20,mma"
ATTACK_HELP = "natural, fgsm, pgdK, cwK, mmaK, pgdK-part (K steps, e.g. pgd50; add xR for R restarts: pgd50x5), aa, apgd-ce, apgd-t, fab-t, square"
MAX_ATTACK_STEPS, MAX_RESTARTS = 100_000, 10_000
_ITERATIVE_NAME = re.compile(
    r"^(?P<family>pgd|cw|mma)(?P<steps>\d*)(?P<part>-part)?(?:x(?P<restarts>\d+))?$"
)


def parse_attack(name: str, restarts: int = 1) -> AttackSpec:
    """'pgd50' -> PGD, 50 steps; 'pgd50x5' -> 5 restarts; 'aa' -> AutoAttack; ...
    `restarts` applies to iterative attacks that do not name their own."""
    text = name.strip().lower()
    m = _ITERATIVE_NAME.match(text)
    if m and not (m["part"] and m["family"] != "pgd"):
        family = "pgd-part" if m["part"] else m["family"]
        steps = int(m["steps"]) if m["steps"] else ATTACKS[family].default_steps
        tries = int(m["restarts"]) if m["restarts"] else restarts
        if not (1 <= steps <= MAX_ATTACK_STEPS and 1 <= tries <= MAX_RESTARTS):
            raise CliError(
                f"attack {name!r}: steps must be 1-{MAX_ATTACK_STEPS} and restarts 1-{MAX_RESTARTS}"
            )
        return AttackSpec(text, family, steps, tries)
    if text in ATTACKS and not ATTACKS[text].iterative:
        return AttackSpec(text, text)
    raise unknown("attack", name, [ATTACK_HELP])


def parse_attacks(text: str, restarts: int = 1) -> list[AttackSpec]:
    """A comma-separated list; natural always first, duplicates (same canonical key) once."""
    specs = [parse_attack(a, restarts) for a in text.split(",") if a.strip()]
    if not specs:
        raise unknown("attack list", text, [ATTACK_HELP])
    for spec in specs:
        needs = ATTACKS[spec.family].needs
        if needs and importlib.util.find_spec(needs) is None:
            raise CliError(
                f"the {spec.name} attack needs the optional package {needs}: pip install {needs}"
            )
    unique = {"natural": AttackSpec("natural", "natural")}
    for spec in specs:
        unique.setdefault(spec.key, spec)
    return list(unique.values())


def batch_seed(seed: int, attack_key: str, batch: int) -> int:
    """The seed of one batch of one attack: results do not depend on which process runs the
    batch, or on whether the evaluation was interrupted and resumed."""
    return derived_seed(seed, attack_key, batch)


def check_budget(
    x_adv: Tensor, x: Tensor, eps: float | Tensor, name: str, tolerance: float = 1e-6
) -> None:
    """Every AE inside the eps ball and [0, 1], finite (NaN fails: its comparisons are false).
    The tolerance admits AutoAttack's float32 rounding; ours hold the budget exactly."""
    if not len(x):
        return
    inside = (x_adv - x).abs() <= torch.as_tensor(eps, dtype=x.dtype, device=x.device) + tolerance
    in_range = (x_adv >= 0) & (x_adv <= 1)
    if not bool((inside & in_range & torch.isfinite(x_adv)).all()):
        over = (x_adv - x).abs() - torch.as_tensor(eps, dtype=x.dtype, device=x.device)
        excess = over.nan_to_num(math.inf).max().item()
        raise CliError(
            f"{name} produced inputs outside the eps ball or [0, 1] (by {excess:.2e}) or not finite; no accuracy reported"
        )


class Chunker:
    """Runs an attack on a batch in chunks; CUDA out of memory halves the chunk (for the rest
    of the evaluation) and retries, said once, instead of a traceback."""

    def __init__(self, size: int):
        self.size, self.said = size, size

    def __call__(self, fn: Callable[..., tuple[Tensor, dict]], x: Tensor, y: Tensor, seed: int):
        while True:
            try:
                chunks = zip(x.split(self.size), y.split(self.size), strict=True)
                one = len(x) <= self.size  # a whole batch keeps the batch's seed
                pieces = [
                    fn(a, b, seed if one else derived_seed(seed, k))
                    for k, (a, b) in enumerate(chunks)
                ]
                break
            except torch.OutOfMemoryError:
                if self.size == 1:
                    raise CliError("out of memory even with one image at a time") from None
                torch.cuda.empty_cache()
                self.size = max(1, self.size // 2)
        if self.size < self.said:
            note(f"note: out of memory with larger batches; attacking {self.size} images at a time")
            self.said = self.size
        extras = {k: torch.cat([p[1][k] for p in pieces]) for k in pieces[0][1]}
        return torch.cat([p[0] for p in pieces]), extras


def sanity_warnings(model: nn.Module, x: Tensor, y: Tensor) -> list[str]:
    """AutoAttack-style checks that a gradient-based evaluation means something here."""
    found = []
    with torch.no_grad():
        a, b = model(x), model(x)
    if not bool(torch.isfinite(a).all()):  # before the equality test: NaN != NaN
        raise CliError("the model's outputs are NaN or inf on some inputs: no accuracy is reported")
    if not torch.equal(a, b):
        found.append(
            "the model gives different outputs for the same input (a randomised defence?): "
            "these attacks do not average over its randomness, robustness may be overstated"
        )
    if (a >= 0).all() and torch.allclose(a.sum(1), torch.ones_like(a[:, 0]), atol=1e-4):
        found.append(
            "the outputs look like probabilities (non-negative, rows sum to 1): the attacks expect logits"
        )
    x_ = x.clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(
            F.cross_entropy(model(x_).float(), y, reduction="sum"), x_, allow_unused=True
        )
    zero = 1.0 if grad is None else fraction(grad.flatten(1).abs().amax(1) == 0)
    if zero > 0:
        found.append(
            f"{zero:.0%} of the inputs have an all-zero input gradient (gradient masking?): "
            "gradient-based accuracy may be overstated"
        )
    return found


PENDING = -1  # a point's flag before its batch is done; then 0 (broken) or 1 (robust)


class PointFlags:
    """Per-point results by key (int8: PENDING, 0 broken, 1 robust) and each attack's seconds,
    in memory; part_tools' EvalState also saves them, so an evaluation can continue."""

    def __init__(self):
        self.flags: dict[str, Tensor] = {}
        self.seconds: dict[str, float] = {}

    def get(self, key: str, n: int, device: torch.device) -> Tensor:
        if key not in self.flags:
            self.flags[key] = torch.full((n,), PENDING, dtype=torch.int8)
        return self.flags[key].to(device)

    def put(
        self, key: str, flags: Tensor, seconds: Optional[float] = None, force: bool = False
    ) -> None:
        """After every round of batches; `force` at the end of each attack."""
        self.flags[key] = flags.to("cpu", torch.int8)
        if seconds is not None:
            self.seconds[key] = seconds


def _sync_flags(flags: list[Tensor], dist: Dist) -> None:
    """Every process ends a round with every process's results: each batch was done by one
    process, the others hold PENDING (-1) there, so an element-wise max merges them."""
    if dist.world == 1:
        return
    for f in flags:
        merged = f.to(torch.int32)
        torch.distributed.all_reduce(merged, op=torch.distributed.ReduceOp.MAX)
        f.copy_(merged.to(torch.int8))


ProgressFn = Callable[[str, int, int, str], None]  # (attack, points done, total, extra text)


@dataclasses.dataclass
class EvalHooks:
    """What a caller adds around the core loop of evaluate_suite, all optional: a progress
    callback, where the per-point results live (keys under `prefix`; part_tools' EvalState
    makes them resumable), the processes that share the batches out, and a writer of the
    adversarial examples (part_tools' --save-adv: `has(key, batch)`, `write(key, batch,
    indices, x_adv)`, `finish(spec, x, y, attacked)`)."""

    progress: ProgressFn = lambda name, done, total, extra: None
    state: PointFlags = dataclasses.field(default_factory=PointFlags)
    prefix: str = ""
    dist: Dist = ONE_PROCESS
    adv: Optional[Any] = None


def _run_attack(
    spec: AttackSpec,
    model: nn.Module,
    x_all: Tensor,
    y_all: Tensor,
    clean: Tensor,
    setup: AttackSetup,
    hooks: EvalHooks,
) -> dict[str, Tensor]:
    """Per point: is it still classified correctly under `spec`? Only the points the model
    gets right are attacked, in batches of setup.batch_size; batch i is run by process
    i % world with its own seed. Returns the flags of the attack (and of AutoAttack's
    components), as bool tensors."""
    n, device = len(y_all), y_all.device
    state, prefix, dist, adv = hooks.state, hooks.prefix, hooks.dist, hooks.adv
    flags = state.get(f"{prefix}{spec.key}", n, device)
    flags[~clean] = 0
    names = list(AA_STANDARD) if spec.family == "aa" else []
    parts = {c: state.get(f"{prefix}{spec.key}/{c}", n, device) for c in names}
    for f in parts.values():
        f[~clean] = 0
    batches = list(clean.nonzero().squeeze(1).split(setup.batch_size))
    chunker, attack = Chunker(setup.batch_size), ATTACKS[spec.family].run
    t0, before = time.perf_counter(), state.seconds.get(f"{prefix}{spec.key}", 0.0)

    aa: dict[str, Any] = {}  # AutoAttack's batch: the components known, who hears the next

    def one(xs: Tensor, ys: Tensor, seed: int) -> tuple[Tensor, dict]:
        torch.manual_seed(seed)
        whole = len(xs) == len(aa.get("idx", ()))  # not split by the Chunker
        kw = {"known": aa["known"], "tell": aa["tell"]} if whole else {}
        return attack(model, xs, ys, setup, spec, seed, **kw)

    def show(more: int = 0, summary: str = "") -> None:  # the points done, and `more` of a batch
        done = int((flags[clean] != PENDING).sum()) + more
        hooks.progress(spec.name, done, int(clean.sum()), summary)

    def tell(c: str, robust: Tensor) -> None:  # a component finished: kept, and shown
        idx = aa["idx"]
        parts[c][idx] = robust.to(torch.int8)
        state.put(f"{prefix}{spec.key}/{c}", parts[c])
        show(len(idx) * (names.index(c) + 1) // len(names), _component_summary(clean, flags, parts))

    show()
    for first in range(0, len(batches), dist.world):
        i = first + dist.rank
        redo = adv is not None and i < len(batches) and not adv.has(spec.key, i)  # AEs gone
        if i < len(batches) and (redo or bool((flags[batches[i]] == PENDING).any())):
            idx = batches[i]
            if parts:  # an interrupted batch keeps its finished components (not their AEs)
                known = _known_components(parts, idx) if adv is None else {}
                aa.update(idx=idx, known=known, tell=tell)
            with rng_fork(device):
                x_adv, extras = chunker(
                    one, x_all[idx], y_all[idx], batch_seed(setup.seed, spec.seed_key, i)
                )
            check_budget(x_adv, x_all[idx], setup.eps, spec.name)
            if adv is not None:
                adv.write(spec.key, i, idx, x_adv)
            robust = predict(model, x_adv, setup.batch_size) == y_all[idx]
            if aa.get("known"):
                robust &= extras[names[-1]]
            flags[idx] = robust.to(torch.int8)
            for c, robust in extras.items():
                parts[c][idx] = robust.to(torch.int8)
        _sync_flags([flags, *parts.values()], dist)
        last = first + dist.world >= len(batches)
        seconds = before + time.perf_counter() - t0
        state.put(f"{prefix}{spec.key}", flags, seconds, force=last)
        for c, f in parts.items():
            state.put(f"{prefix}{spec.key}/{c}", f, force=last)
        show(0, _component_summary(clean, flags, parts))
    return {spec.key: flags == 1, **{f"{spec.key}/{c}": f == 1 for c, f in parts.items()}}


def _known_components(parts: dict[str, Tensor], idx: Tensor) -> dict[str, Tensor]:
    """The leading AutoAttack components an interrupted run finished on these points."""
    known = {}
    for c, f in parts.items():
        if bool((f[idx] == PENDING).any()):
            break
        known[c] = f[idx] == 1
    return known


def _component_summary(clean: Tensor, flags: Tensor, parts: dict[str, Tensor]) -> str:
    """AutoAttack's log line, so far: robust accuracy after each component over all points,
    the points not attacked yet counted as robust (as AutoAttack counts them)."""
    if not parts:
        return ""
    n = max(len(flags), 1)
    text = [f"clean {100 * int(clean.sum()) / n:.1f}%"]
    text += [f"{c.upper()} {100 * int((f != 0).sum()) / n:.1f}%" for c, f in parts.items()]
    return " | ".join(text)


def evaluate_suite(
    model: nn.Module,
    data: Split | tuple,
    attacks: str | list[str] | list[AttackSpec],
    setup: Optional[AttackSetup] = None,
    progress: Optional[ProgressFn] = None,
    *,
    hooks: Optional[EvalHooks] = None,
) -> dict:
    """Accuracy under every attack on `data` (a Split or (images, labels), uint8 or float in
    [0, 1]; moved to the model's device), each attack run on the points the model
    classifies correctly, fp32, eval mode; `worst` counts a point robust only if no attack
    broke it. `attacks`: names ("natural,pgd20,aa" or a list); `setup`: the threat model
    (default eps 8/255, step 2/255, seed 0). Every AE is checked against the budget before
    it counts. Each batch draws its randomness from (seed, attack, batch), so the result
    does not depend on the process count or on interruptions; the global RNG is left alone.
    `progress(attack, done, total, extra)` is told as batches finish; `hooks` (EvalHooks)
    make it resumable, sharded or saving."""
    data, setup = on_model_device(model, data), setup or eval_setup(256)
    attacks = attacks.split(",") if isinstance(attacks, str) else attacks
    specs = [a if isinstance(a, AttackSpec) else parse_attack(a, setup.restarts) for a in attacks]
    hooks = hooks or EvalHooks()
    if progress is not None:  # the caller's hooks stay as they were
        hooks = dataclasses.replace(hooks, progress=progress)
    state, adv = hooks.state, hooks.adv
    device, x_all = data.y.device, in_model_dtype(model, to_float(data.x))
    with eval_mode(model), full_fp32():
        clean = predict(model, x_all, setup.batch_size) == data.y
        correct, seconds = {"natural": clean}, {"natural": 0.0}
        for spec in specs:
            if spec.family == "natural":
                continue
            t0 = time.perf_counter()
            with rng_fork(device):
                correct.update(_run_attack(spec, model, x_all, data.y, clean, setup, hooks))
            if adv is not None and hooks.dist.main:
                adv.finish(spec, x_all, data.y, clean)
            if device.type == "cuda":
                torch.cuda.synchronize()
            spent = time.perf_counter() - t0  # or, continued, the state's total
            seconds[spec.name] = state.seconds.get(f"{hooks.prefix}{spec.key}", spent)
    names = ["natural"] + [spec.name for spec in specs if spec.family != "natural"]
    keys = {spec.name: spec.key for spec in specs}
    main = {name: correct[keys.get(name, name)] for name in names}
    worst = torch.stack(list(main.values())).all(0)
    accuracy = {k: fraction(v) for k, v in {**main, "worst": worst}.items()}
    per_class = per_class_accuracy(data, {**main, "worst": worst})
    result = {"accuracy": accuracy, "seconds": seconds, "per_class": per_class}
    for spec in (s for s in specs if s.family == "aa"):
        parts = {c: fraction(correct[f"{spec.key}/{c}"]) for c in AA_STANDARD}
        result.setdefault("components", {})[spec.name] = parts
    return result


def per_class_accuracy(data: Split, flags: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """Accuracy per class (of the classes present) under each set of flags."""
    found = {}
    for c, name in enumerate(data.classes):
        members = data.y == c
        if members.any():
            found[name] = {k: fraction(v[members]) for k, v in flags.items()}
    return found


# ============================================================================ export

EXPORT_FORMATS = ("torchscript", "onnx", "pt2")
EXAMPLE_BATCH = 2  # of the example input an export traces; the batch dimension stays dynamic
SUFFIX = {"torchscript": ".ts.pt", "onnx": ".onnx", "pt2": ".pt2"}


def model_card(
    meta: CheckpointMeta, sha256: str, image_size: int, robustness: Optional[dict] = None
) -> dict:
    """What a deployment needs to know, stored beside the exported files and inside the ONNX.
    `robustness`: the `attack` results of this checkpoint (export --report)."""
    return {
        "checkpoint_sha256": sha256,
        "input": {
            "name": "image",
            "dtype": "float32",
            "shape": ["N", 3, image_size, image_size],
            "layout": "NCHW, RGB",
            "range": [0.0, 1.0],
            "normalisation": "none: feed RGB values in [0, 1]; the model normalises inside",
        },
        "output": {"name": "logits", "dtype": "float32", "shape": ["N", meta.num_classes]},
        "classes": meta.classes or [str(i) for i in range(meta.num_classes)],
        "arch": meta.arch,
        "dataset": meta.dataset,
        "epoch": meta.epoch,
        "config": dataclasses.asdict(meta.config) if meta.config else None,
        "training_metrics": meta.metrics,
        "best": meta.best,
        "robustness": robustness,
        "source": meta.source,
        "exported_with": {**versions(), "format": FORMAT},
    }


@contextlib.contextmanager
def torchscript_warnings(say: bool):
    """TorchScript is deprecated in recent PyTorch: its deprecation warnings become one note
    (when `say`); every other warning (a tracer warning, say) is still shown, one line each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    old = (FutureWarning, DeprecationWarning)
    deprecated = [
        w for w in caught if issubclass(w.category, old) and "deprecated" in str(w.message)
    ]
    if deprecated and say:
        note(
            f"note: TorchScript is deprecated in torch {torch.__version__}; the .ts.pt file is for older "
            "deployments, .pt2 and .onnx are the lasting formats"
        )
    for w in caught:
        if w not in deprecated:
            note(f"warning: {w.category.__name__}: {first_line(w.message)}")


def export_torchscript(model: nn.Module, example: Tensor, path: Path) -> None:
    with torchscript_warnings(say=True):
        traced = torch.jit.trace(model, (example,), check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
    write_bytes(path, buffer.getvalue())


def export_onnx(model: nn.Module, example: Tensor, path: Path, card: dict) -> None:
    """Dynamo exporter, weights inside the file, dynamic batch; the model card as metadata_props."""
    import onnx

    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        input_names=["image"],
        output_names=["logits"],
        verbose=False,
        opset_version=18,
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        external_data=False,
    )  # opset 18: the dynamo exporter's oldest
    proto = program.model_proto
    for key, value in card.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(proto)
    write_bytes(path, proto.SerializeToString())


def export_pt2(model: nn.Module, example: Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()  # torch.export.save wants a .pt2 name or a buffer, not our temporary name
    torch.export.save(program, buffer)
    write_bytes(path, buffer.getvalue())


EXPORTERS = {
    "torchscript": lambda model, x, path, card: export_torchscript(model, x, path),
    "onnx": export_onnx,
    "pt2": lambda model, x, path, card: export_pt2(model, x, path),
}


def run_exported(fmt: str, path: Path, x: Tensor) -> Tensor:
    """Logits of an exported file, run the way a deployment would run it."""
    if fmt == "torchscript":
        with torchscript_warnings(say=False):
            return torch.jit.load(str(path), map_location="cpu")(x)
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(["logits"], {"image": x.numpy()})[0])
    return torch.export.load(str(path)).module()(x)


def robustness_of(report: Path, sha256: str) -> dict:
    """This checkpoint's row of an `attack --json` report (by its sha256), checked as `report`
    checks one before it reaches a card; the card then says what ran."""
    require_file(report, "--report")
    try:
        rows = json.loads(Path(report).read_text())["checkpoints"]
        row = [r for r in rows if isinstance(r, dict) and r.get("sha256") == sha256][-1:]
        evaluation = row and checked_evaluation(row[0])
    except (RecursionError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        if isinstance(e, CliError):
            raise CliError(f"--report {report}: {e}") from None
        why = first_line(e)
        raise CliError(f"--report {report}: not an `attack --json` report ({why})") from None
    if not row:
        raise CliError(
            f"--report {report} has no results for this checkpoint (its sha256 {sha256[:12]}... is not there)"
        )
    keep = ("accuracy", "step_levels", "restarts", "seed", "dataset", "selection", "components")
    return {k: row[0][k] for k in (*keep, "versions", "device") if k in row[0]} | {
        "n_examples": evaluation["n_examples"],
        "eps_levels": evaluation["eps_levels"],
        "evaluation": evaluation,
    }


def checked_evaluation(row: dict) -> dict:
    """What a row's evaluation ran (attacks, points, budget, whether it is the standard one:
    AutoAttack, 10,000 points, 8/255) from its own record; a figure it could not measure is
    refused."""
    fractions = [row["accuracy"], *row.get("components", {}).values()]
    bad = [f"{k}={v!r}" for f in fractions for k, v in f.items() if not _is_fraction(v)]
    if bad or not {"natural", "worst"} <= set(row["accuracy"]):
        raise CliError(
            f"accuracies must be fractions in [0, 1] with natural and worst ({', '.join(bad[:3])})"
        )
    ran = {"natural", *row["attacks"], *(o["column"] for o in row.get("adv_from", []))}
    for name in set(row["accuracy"]) - ran - {"worst"}:
        raise CliError(f"{name} was not run (the evaluation ran {', '.join(sorted(ran))})")
    n, first = row["n_examples"], row["selection"]["first"]
    if n != first:
        raise CliError(f"the row claims {n} points; its evaluation took the first {first}")
    eps = to_levels(row["eps"])
    if not math.isclose(eps, row["eps_levels"], abs_tol=1e-6):
        raise CliError(
            f"the row claims eps {row['eps_levels']:g}/255; its evaluation's budget is {eps:g}/255"
        )
    attacks = [k for k in row["accuracy"] if k != "worst"]
    keys = set(row["attacks"].values())
    standard = "aa" in keys and n == 10_000 and math.isclose(eps, EVAL_EPS_LEVELS)
    return {"attacks": attacks, "n_examples": n, "eps_levels": round(eps, 6), "standard": standard}


def _is_fraction(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1


# ============================================================================ commands

# typer vendors click from 0.22 on
_click = getattr(typer.core, "_click", None) or importlib.import_module("click")


class OneLineErrors(typer.core.TyperGroup):
    """Usage errors (an unknown option, a value not among the choices) end like our own
    errors: one line on stderr and a non-zero exit, not a usage box."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        for each in (self, *self.commands.values()):
            readable_help(each)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except _click.exceptions.ClickException as e:
            if not standalone_mode:
                raise
            if type(e).__name__ == "NoArgsIsHelpError":
                e.show()
            else:
                err_console.print(f"error: {first_line(e.format_message(), 400)}")
            sys.exit(e.exit_code)
        except typer.Abort:
            if not standalone_mode:
                raise
            err_console.print("aborted")
            sys.exit(1)
        if standalone_mode:
            sys.exit(code if isinstance(code, int) else 0)
        return code


def readable_help(cli_command: Any) -> None:
    """`--help` that reads at 80 columns: short value names (none for a flag, NAME for a long
    list of choices, then listed), no bounds, paragraphs rewrapped to the screen."""
    paragraphs = inspect.cleandoc(cli_command.help or "").split("\n\n")
    cli_command.help = "\n\n".join(" ".join(text.split()) for text in paragraphs)
    if not hasattr(cli_command, "plain_help_option"):  # --help is made per call, as a flag
        cli_command.plain_help_option = cli_command.get_help_option
        cli_command.get_help_option = lambda ctx: _flag(
            cli_command, cli_command.plain_help_option(ctx)
        )
    for p in cli_command.params:
        if p.param_type_name != "option":
            continue
        p._get_number_range_help_str = lambda: None
        kind = p.type_descriptor
        choices = [str(c) for c in kind.choices or ()] if kind.is_choice else []
        if p.metavar is None and (p.is_flag or not choices):
            base = _base_type(kind.annotation)[0]
            p.metavar = "PATH" if kind.is_path else {int: "N", float: "X"}.get(base, "TEXT")
            p.metavar = "" if p.is_flag else p.metavar
        elif p.metavar is None:
            p.metavar = "|".join(choices) if len("|".join(choices)) <= 16 else "NAME"
        if p.metavar == "NAME" and not all(c in (p.help or "") for c in choices):
            p.help = f"{p.help or ''} One of: {', '.join(choices)}.".strip()


def _flag(cli_command: Any, option: Any) -> Any:
    """--help without a value name, in the last panel when every option has one."""
    if option is not None:
        option.metavar = ""
        panels = [p.rich_help_panel for p in cli_command.params if p.param_type_name == "option"]
        if panels and all(panels):
            option.rich_help_panel = panels[-1]
    return option


app = typer.Typer(
    cls=OneLineErrors,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    help="PART: pixel-reweighted adversarial training, evaluation and export. Budgets in 1/255 levels.",
)


def _show_version(value: bool) -> None:
    if value:
        console.print(f"part {__version__} (torch {torch.__version__})")
        raise typer.Exit()


VERSION = typer.Option(
    "--version", help="Print the versions.", callback=_show_version, is_eager=True
)


@app.callback()
def cli_root(version: Annotated[bool, VERSION] = False):
    """PART: pixel-reweighted adversarial training, evaluation and export. Budgets in 1/255 levels."""


@contextlib.contextmanager
def cli_errors():
    """Bad input ends in one line on stderr and a non-zero exit, never a traceback."""
    try:
        yield
    except CliError as e:  # a Ctrl-C (130) was asked for: not an error, but how to go on
        err_console.print(str(e) if e.code == 130 else f"error: {e}")
        raise typer.Exit(e.code) from None
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise typer.Exit(130) from None
    except OSError as e:  # a folder that is a file, no permission, a full disk: nothing is lost
        full = (
            "; free some space, then run the same command again" if e.errno == errno.ENOSPC else ""
        )
        where = f": {e.filename}" if e.filename else ""
        err_console.print(f"error: {e.strerror or first_line(e)}{where}{full}")
        raise typer.Exit(1) from None
    except (MemoryError, torch.OutOfMemoryError) as e:
        err_console.print(
            f"error: out of memory ({first_line(e, 120)}); try a smaller --batch-size"
        )
        raise typer.Exit(1) from None
    except Exception as e:  # a case nobody foresaw still ends in one line
        if os.environ.get("PART_TRACEBACK"):
            raise
        err_console.print(
            f"error: unexpected {type(e).__name__}: {first_line(e)} (PART_TRACEBACK=1 shows where)"
        )
        raise typer.Exit(1) from None


def _opt(help: str, *names: str, panel: Optional[str] = None, **kw):
    """An option whose help is shown as written (typer's rich mode would read `[default: x]`
    or `[tag]` in it as markup and drop it), in the help's `panel`."""
    return typer.Option(*names, help=escape_markup(help), rich_help_panel=panel, **kw)


# Options shared by several commands, declared once.
ON_DATA, ATTACKING, REPORTS = "Model and data", "Attacks", "Reports"
Device = Annotated[str, _opt("auto, cpu, cuda, cuda:N or mps.", panel=RUN)]
DataDir = Annotated[
    Optional[str], _opt("Dataset folder (default: the model's own, else data).", panel=ON_DATA)
]
CacheDir = Annotated[str, _opt("Cache of decoded image folders.", panel=ON_DATA)]
DatasetOpt = Annotated[
    Optional[Literal[tuple(DATASETS)]],
    _opt("Dataset (default: the checkpoint's, else cifar10).", panel=ON_DATA),
]
Arch = Annotated[
    Optional[str], _opt(f"A foreign state dict's architecture: {ARCH_HELP}.", panel=ON_DATA)
]
CamLayer = Annotated[Optional[str], _opt("The CAM's module (default: the model's).", panel=ON_DATA)]
CHECKPOINT_HELP = (
    "Our .safetensors checkpoint, a model folder (export --format hf), or a foreign state dict "
    "with --arch (with part_tools: robustbench:NAME, its file in --model-dir)."
)
Checkpoint = Annotated[Path, typer.Argument(help=CHECKPOINT_HELP, show_default=False)]
Seed = Annotated[int, _opt("Random seed.", min=0, max=MAX_SEED, panel=RUN)]
THREADS_HELP = "CPU threads for PyTorch (0: one per core; 1 is often fastest on a shared machine)."
Threads = Annotated[int, _opt(THREADS_HELP, min=0, max=4096, panel=RUN)]
JsonOut = Annotated[Optional[Path], _opt("Write the figures as JSON here.", "--json")]
NPROC_HELP = (
    "Run as N processes on this machine (one per GPU on CUDA; gloo on a CPU), as torchrun would, with one "
    "line per error and no launcher traceback."
)
NProc = Annotated[int, _opt(NPROC_HELP, min=1, max=1024, panel=RUN)]


class KeepsArgs(typer.core.TyperCommand):
    """Keeps the command line as typed, so that --nproc can start the same command N times."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        ctx.meta["part.args"] = list(args)
        return super().parse_args(ctx, args)


def without_option(args: list[str], flag: str) -> list[str]:
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            kept.append(arg)
    return kept


def run_processes(nproc: int, device: str) -> int:
    """--nproc N: this same command as N processes, started by torch's elastic launcher as
    `torchrun --standalone` would. Every process finds the same bad input, so process 0's
    output is the one shown (all are in one log each); a process that fails alone, or is
    killed, is named in one line, with no launcher traceback. Returns the exit code."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if dist_from_env().world > 1:
        raise CliError(
            "--nproc cannot be given under torchrun: torchrun has started the processes already"
        )
    dev = pick_device(device)
    if dev.type == "cuda" and nproc > torch.cuda.device_count():
        raise CliError(
            f"--nproc {nproc} is more than the {torch.cuda.device_count()} CUDA devices here"
        )
    ctx = importlib.import_module(_click.__name__ + ".globals").get_current_context()
    args = [
        str(Path(__file__).resolve()),
        ctx.info_name,
        *without_option(ctx.meta["part.args"], "--nproc"),
    ]
    os.environ.update(PART_COMMAND=command_name(), PART_NPROC=str(nproc), PYTHONUNBUFFERED="1")
    if dev.type == "cpu":  # N processes share the cores instead of each taking all
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    with tempfile.TemporaryDirectory(prefix="part-logs-") as logs:
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nproc,
            run_id=f"part-{os.getpid()}",
            rdzv_backend="c10d",
            rdzv_endpoint="localhost:0",
            max_restarts=0,
            monitor_interval=0.1,
            logs_specs=DefaultLogsSpecs(log_dir=logs, tee=Std.ALL, local_ranks_filter={0}),
            role="",  # with this template: process 0's lines as it writes them, untagged
            log_line_prefix_template="${role_name}",
        )
        logging.disable(logging.CRITICAL)  # the agent's own notes and its failure report
        try:
            elastic_launch(config, entrypoint=sys.executable)(*args)
        except SignalException as e:  # passed on to every process, which stops as it would alone
            return 128 + int(e.sigval)
        except ChildFailedError as e:
            return _launch_failure(e.failures, nproc, Path(logs))
        finally:
            logging.disable(logging.NOTSET)
    return 0


def _launch_failure(failures: dict, nproc: int, logs: Path) -> int:
    """The exit code of a failed launch, said once: a killed process or one other than 0 could
    not say so here. The launcher stops the others with SIGTERM: theirs are not the cause."""
    order = lambda kv: (kv[1].exitcode == -signal.SIGTERM, kv[1].exitcode >= 0, kv[0])  # noqa: E731
    rank, failure = min(failures.items(), key=order)
    if failure.exitcode < 0:
        err_console.print(f"error: process {rank} of {nproc} was killed by {failure.signal_name()}")
        return 128 - failure.exitcode
    if 0 not in failures:
        for log in logs.rglob(f"{rank}/stderr.log"):
            said = [line for line in log.read_text(errors="replace").splitlines() if line]
            err_console.print(said[-1] if said else f"error: process {rank} of {nproc} failed")
    return failure.exitcode


N_HELP = "The first N test images in canonical order (default: all)."
NExamples = Annotated[Optional[int], _opt(N_HELP, "--n-examples", "--n", min=1, panel=ATTACKING)]


def shown_value(value: Any) -> Optional[str]:
    """A setting as the command line writes it (None: nothing to show)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _config_option(name: str, field: dataclasses.Field) -> inspect.Parameter:
    """The `train` option of a TrainConfig field: its command-line type, choices as a Literal
    (for --help and completion), help, panel and built-in default."""
    meta = field.metadata
    base, _ = _base_type(CONFIG_TYPES[name])
    if meta["levels"] or typing.get_origin(base) is list:
        cli_type = str
    elif meta["choices"]:
        cli_type = Literal[meta["choices"]]
    else:
        cli_type = base
    flag = "--" + name.replace("_", "-")
    decls = (f"{flag}/--no-{flag[2:]}",) if base is bool else (flag,)
    default = field.default_factory() if callable(field.default_factory) else field.default
    shown = "runs/PRESET-METHOD-TIME" if name == "out" else shown_value(default)
    text = meta["help"] + (f" [default: {shown}]" if shown is not None else "")
    option = _opt(text, *decls, panel=meta["panel"], show_default=False)
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[Optional[cli_type], option],
    )


def preset_names(presets_file: Optional[Path] = None) -> list[str]:
    """The presets of configs.toml and of the user's file; none when they cannot be read."""
    try:
        return [name for name in all_presets(presets_file)[0] if not name.startswith(SHIPPED)]
    except CliError:
        return []


def complete_preset(incomplete: str) -> list[str]:
    return [name for name in preset_names() if name.startswith(incomplete)]


def complete_attacks(incomplete: str) -> list[str]:
    """--attacks is a comma-separated list: complete its last name."""
    done, _, last = incomplete.rpartition(",")
    return [f"{done}," * bool(done) + name for name in ATTACK_NAMES if name.startswith(last)]


class TrainCommand(KeepsArgs):
    """`train --help` lists the presets of configs.toml and of a --presets file."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        after = dict(zip(args, args[1:], strict=False))
        given = after.get("--presets") or next(
            (a[10:] for a in args if a.startswith("--presets=")), None
        )
        names = preset_names(Path(given) if given else None)
        for param in (p for p in self.params if p.name == "preset"):
            param.help = escape_markup(
                f"Preset: {', '.join(names) or 'none found'} (default: the dataset's own, else "
                "cifar10)."
            )
        readable_help(self)
        return super().parse_args(ctx, args)


def recorded_processes(config: Path) -> int:
    """The process count a run's config.json records (1 for any other settings file; a file
    that cannot be read is said by the run itself)."""
    if not config.is_file():  # a FIFO would block the read; the run says what it is
        return 1
    try:
        return max(1, int(json.loads(config.read_text())["machine"]["processes"]))
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return 1


PRESETS = "Presets"
PRESET_HELP = "Preset: of configs.toml or --presets (default: the dataset's own, else cifar10)."
PresetOpt = Annotated[
    Optional[str], _opt(PRESET_HELP, panel=PRESETS, autocompletion=complete_preset)
]
PresetsOpt = Annotated[
    Optional[Path], _opt("Your presets file (TOML, as configs.toml), added.", panel=PRESETS)
]
CONFIG_HELP = (
    "Settings file: a run's config.json (re-runs it exactly, in a new --out) or a TOML/JSON "
    "table of settings; over the preset, under the options given here."
)
ConfigOpt = Annotated[Optional[Path], _opt(CONFIG_HELP, panel=PRESETS)]
RESUME_HELP = (
    "Start the run in --out, or continue it exactly where it stopped if --out holds one. A "
    "continued run keeps its settings: the same values are accepted, a different one is refused "
    "(where/how fast, --epochs and --threads may change)."
)
ResumeOpt = Annotated[bool, _opt(RESUME_HELP, "--resume", panel=PRESETS)]
TRAIN_NPROC_HELP = NPROC_HELP + " [default: 1, or the count a --config run file records]"
TrainNProc = Annotated[Optional[int], _opt(TRAIN_NPROC_HELP, min=1, max=1024, panel=RUN)]


def train_command(
    preset: PresetOpt = None,
    presets: PresetsOpt = None,
    config: ConfigOpt = None,
    resume: ResumeOpt = False,
    nproc: TrainNProc = None,
    **settings,
):
    """Train a PART (or plain AT) model; writes checkpoints, metrics, summary.csv and curves.png.

    Settings: built in < the preset (configs.toml, --presets) < --config < the options given here.
    Launch with --nproc N (or torchrun) for several GPUs/processes: --batch-size stays the global
    batch."""
    if nproc is None and config is not None and dist_from_env().world == 1:
        nproc = recorded_processes(config)  # a run's config.json re-runs it as it ran
    if (nproc or 1) > 1:
        with cli_errors():
            code = run_processes(nproc, settings.get("device") or "auto")
        raise typer.Exit(code)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's stop is like Ctrl-C
    try:
        with cli_errors():
            fit(None, preset=preset, presets=presets, config_file=config, resume=resume, **settings)
    finally:
        signal.signal(signal.SIGTERM, previous)


# typer reads a command's options from its signature: train's are its own five, then one per
# TrainConfig field (made by _config_option), so that a new setting is one line in TrainConfig.
_own = inspect.signature(train_command, eval_str=True).parameters.values()
train_command.__signature__ = inspect.Signature(
    [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in _own if p.kind != p.VAR_KEYWORD]
    + [_config_option(k, f) for k, f in CONFIG_FIELDS.items() if f.metadata["panel"] is not None]
)
train_command.__annotations__ = {
    p.name: p.annotation for p in train_command.__signature__.parameters.values()
}
app.command("train", cls=TrainCommand)(train_command)


@contextlib.contextmanager
def attack_progress(enabled: bool):
    """A bar per attack on a terminal (points attacked so far; AutoAttack's components so
    far); in logs, one line per finished batch of AutoAttack only (the slow one)."""
    if not enabled:
        yield lambda name, done, total, extra: None
        return
    with live_progress() as bars:
        if bars is None:
            yield _progress_lines()
            return
        tasks: dict[str, Any] = {}

        def show(name: str, done: int, total: int, extra: str) -> None:
            if name not in tasks:
                tasks[name] = bars.add_task(name, total=total, extra="")
            bars.update(tasks[name], completed=done, extra=extra)

        yield show


def _progress_lines() -> ProgressFn:
    """Progress in a log: each attack's time left once its first batch is done (a bar's
    `left` on a terminal), and AutoAttack's figures after each component."""
    started: dict[str, tuple[float, Optional[int]]] = {}

    def line(name: str, done: int, total: int, extra: str) -> None:
        now = time.perf_counter()
        t0, first = started.setdefault(name, (now, done))
        if first is not None and first < done < total:
            left = (now - t0) / (done - first) * (total - done)
            console.print(f"{name}: {done}/{total} points, about {fmt_duration(left)} left")
            started[name] = (t0, None)
        if extra:
            console.print(f"{name}: {done}/{total} points | {extra}")

    return line


def _attack_row(
    target: EvalTarget,
    n: int,
    setup: AttackSetup,
    result: dict,
    specs: list[AttackSpec],
    device: torch.device,
    warnings_found: list[str],
    levels: tuple[float, float],
) -> dict:
    """A checkpoint's line of the report: what was evaluated, how, where, and the result.
    `levels`: the budget and the step as given (1/255 levels)."""
    meta, (eps_levels, step_levels) = target.meta, levels
    return {
        "path": str(target.path),
        "sha256": target.sha256,
        "arch": meta.arch,
        "dataset": target.dataset,
        "n_examples": n,
        "eps": setup.eps,
        "eps_levels": eps_levels,
        "step_levels": step_levels,
        "restarts": setup.restarts,
        "seed": setup.seed,
        "selection": {
            "split": "test",
            "first": n,
            "order": "canonical (file order; class-interleaved for image folders)",
        },
        "attacks": {s.name: s.key for s in specs},
        "device": device_name(device),
        "versions": versions(),
        "machine": machine(),
        "config": dataclasses.asdict(meta.config) if meta.config else None,
        "warnings": warnings_found,
        **result,
        "interval95": {k: binomial_interval(v, n) for k, v in result["accuracy"].items()},
    }


def _model_paths(checkpoints: list[Path]) -> list[Path]:
    """The checkpoints to evaluate; resume states picked up by a glob are skipped."""
    kept = []
    for path in checkpoints:
        if path.name.endswith(".state.safetensors"):
            note(f"note: skipping {path}: a resume state, not a model checkpoint")
        else:
            kept.append(path)
    if not kept:
        raise CliError("no model checkpoint to evaluate (resume states are not models)")
    return kept


def _eps_low_for(
    target: EvalTarget, eps_low: Optional[str], eps_levels: float, specs: list[AttackSpec]
) -> float:
    """pgdK-part's low budget: --eps-low, else the checkpoint's; unused (= eps) otherwise."""
    if not any(s.family == "pgd-part" for s in specs):
        return eps_levels
    if eps_low is not None:
        return parse_levels(eps_low, "eps_low")
    low = target.meta.config.eps_low if target.meta.config else DEFAULT_EPS_LOW_LEVELS
    if low > eps_levels:
        raise CliError(
            f"{target.path}: its eps-low ({low:g}/255) exceeds --eps {eps_levels:g}/255; give --eps-low for pgd-part"
        )
    return low


def _print_attack_tables(
    rows: list[dict], names: list[str], eps_levels: float, per_class: bool
) -> None:
    def cells(acc: dict) -> list[str]:
        return [fmt_pct(acc.get(a)) for a in [*names, "worst"]]

    def widest(r: dict) -> str:
        return fmt_pct(max(half_width(v, r["n_examples"]) for v in r["accuracy"].values()))

    table = [
        [r["path"], r["arch"], r["n_examples"], *cells(r["accuracy"]), widest(r)] for r in rows
    ]
    headers = ["checkpoint", "arch", "n", *names, "worst", "±95%"]
    title = f"accuracy (%) at eps {eps_levels:g}/255"
    console.print(text_table(title, headers, table, left=("checkpoint", "arch")))
    for r in rows if per_class else []:
        table = [[name, *cells(acc)] for name, acc in r["per_class"].items()]
        title = f"per class: {r['path']}"
        console.print(text_table(title, ["class", *names, "worst"], table, left=("class",)))


def binomial_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's 95% interval of an accuracy measured on n points: how far another draw of
    n test points could move it (+-7 points at 50% on 200 points, +-3 on 1,000)."""
    if n <= 0:
        return 0.0, 1.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))  # p inside: rounding


def half_width(p: float, n: int) -> float:
    low, high = binomial_interval(p, n)
    return (high - low) / 2


def robustness_warnings(specs: list[AttackSpec], result: dict) -> list[str]:
    """Signs of gradient masking: black-box Square beating the white-box attacks (alone or in
    AutoAttack); the single-step FGSM beating a multi-step attack."""
    acc, found, alpha = result["accuracy"], [], 0.002
    steps = [s for s in specs if s.family in ("pgd", "cw") and s.name in acc]
    weakest = max(steps, key=lambda s: acc[s.name], default=None)
    if weakest and "fgsm" in acc and acc["fgsm"] < acc[weakest.name] - alpha:
        found.append(
            f"the single-step FGSM ({fmt_pct(acc['fgsm'])}%) beats {weakest.name} "
            f"({fmt_pct(acc[weakest.name])}%): the multi-step attack is not converging (gradient "
            "masking?); its figure overstates robustness"
        )
    white = [
        acc[s.name]
        for s in specs
        if ATTACKS[s.family].white_box and s.family != "natural" and s.name in acc
    ]
    square = [acc[s.name] for s in specs if s.family == "square" and s.name in acc]
    if square and white and square[0] < min(white) - alpha:
        found.append(
            f"the black-box Square attack ({fmt_pct(square[0])}%) beats every white-box attack ({fmt_pct(min(white))}%): "
            "a sign of gradient masking; the white-box figures overstate robustness"
        )
    for name, parts in result.get("components", {}).items():
        if parts["fab-t"] - parts["square"] > alpha:
            found.append(
                f"{name}: Square broke {fmt_pct(parts['fab-t'] - parts['square'])}% of the points the white-box "
                "components left robust: a sign of gradient masking"
            )
    return found


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttackRequest:
    """What `attack` was asked, checked where it came in; budgets in 1/255 levels."""

    arch: Optional[str]
    dataset: Optional[str]
    data_dir: str
    cache_dir: str
    cam_layer: Optional[str]
    n_examples: Optional[int]
    batch_size: int
    eps_levels: float
    step_levels: float
    restarts: int
    eps_low: Optional[str]
    seed: int
    per_class: bool
    json_out: Optional[Path]
    device: str


def attack_request(o: dict[str, Any]) -> tuple[AttackRequest, list[AttackSpec]]:
    """`attack`'s options (as typed) checked once: the request and its attacks."""
    eps_levels = parse_levels(o["eps"] or DEFAULT_EPS_LEVELS, "eps")
    step_levels = parse_levels(o["step"] or DEFAULT_STEP_LEVELS, "step")
    check_threat(eps_levels, 0.0, step_levels, 255)
    check_output(o["json_out"], "--json")
    request = AttackRequest(
        **{k: o[k] for k in ("arch", "dataset", "data_dir", "cache_dir", "cam_layer")},
        **{k: o[k] for k in ("n_examples", "batch_size", "eps_low", "seed", "per_class")},
        eps_levels=eps_levels,
        step_levels=step_levels,
        restarts=o["restarts"] or 1,
        json_out=o["json_out"],
        device=o["device"],
    )
    return request, parse_attacks(o["attacks"] or DEFAULT_ATTACKS, request.restarts)


class AttackExtras:
    """What another module adds to `attack` (part_tools: RobustBench models, sweeps, saved
    and replayed adversarial examples, a resumable state, W&B); this one adds nothing. In
    the order `attack` calls them: `sources` (the models to load), `specs` (the attacks),
    `replaces` (rows made instead of attacking), `evaluation` (around the attacks: yields
    each checkpoint's EvalHooks), `warnings` (per checkpoint), `finish` (after the reports,
    on the main process)."""

    def sources(self, paths: list[Path], request: AttackRequest) -> list[tuple[Path, Any]]:
        return [checkpoint_source(path, request.arch, request.dataset) for path in paths]

    def specs(self, specs: list[AttackSpec]) -> list[AttackSpec]:
        return specs

    def replaces(self, targets: list[EvalTarget], n: int, request: AttackRequest, dev):
        return None

    @contextlib.contextmanager
    def evaluation(self, targets: list[EvalTarget], n: int, specs, request, dist: Dist):
        yield lambda target, setup: EvalHooks(dist=dist)

    def warnings(self, specs: list[AttackSpec], result: dict, n: int) -> list[str]:
        return []

    def finish(self, rows: list[dict], names: list[str], specs: list[AttackSpec]) -> None:
        pass

    def interrupted(self) -> str:
        """How an interrupted evaluation goes on."""
        return "nothing was kept (part_tools.py adds --state, which keeps finished batches)"


def attack_with(options: dict[str, Any], extras: AttackExtras) -> None:
    """The `attack` command with what `extras` adds; `options` as typed."""
    if options["nproc"] > 1:
        with cli_errors():
            code = run_processes(options["nproc"], options["device"])
        raise typer.Exit(code)
    with cli_errors():
        set_threads(options["threads"])
        request, specs = attack_request(options)
        specs, dist = extras.specs(specs), dist_from_env()
        dev = process_device(request.device, dist)
        with process_group(dist, dev):
            sources = extras.sources(_model_paths(options["checkpoints"]), request)
            targets, n = load_targets(sources, request, dev)
            rows = extras.replaces(targets, n, request, dev)
            try:
                if rows is None:
                    with extras.evaluation(targets, n, specs, request, dist) as hooks_for:
                        rows = [
                            evaluate_target(t, n, specs, request, (dev, dist), hooks_for, extras)
                            for t in targets
                        ]
            except KeyboardInterrupt:
                raise CliError(f"interrupted: {extras.interrupted()}", code=130) from None
        if dist.main:
            names = [k for k in rows[0]["accuracy"] if k != "worst"]
            _print_attack_tables(rows, names, request.eps_levels, request.per_class)
            if request.json_out is not None:
                report = {"checkpoints": rows, "versions": versions(), "machine": machine()}
                write_json(request.json_out, report)
            for row in rows:
                for warning in row["warnings"]:
                    note(f"warning: {row['path']}: {warning}")
            extras.finish(rows, names, specs)


def load_targets(
    sources: list[tuple[Path, Optional[str]]], request: AttackRequest, dev: torch.device
) -> tuple[list[EvalTarget], int]:
    """The checkpoints (path, architecture) ready to evaluate, and the number of points:
    --n-examples, else the whole (smallest) test set."""
    r, splits = request, {}
    targets = [
        load_for_eval(p, arch, dev, r.dataset, r.data_dir, r.cache_dir, r.cam_layer, splits)
        for p, arch in sources
    ]
    n = r.n_examples or min(len(t.test.y) for t in targets)
    if not r.n_examples and dev.type == "cpu" and n > 1000:
        note(
            f"note: all {n} test images on a CPU can take hours (each attack says its time left); "
            "--n-examples 1000 is a first look"
        )
    for t in targets:
        if n > len(t.test.y):
            raise CliError(f"--n-examples {n} is more than the {len(t.test.y)} test images")
    return targets, n


def evaluate_target(
    t: EvalTarget,
    n: int,
    specs: list[AttackSpec],
    request: AttackRequest,
    where: tuple[torch.device, Dist],
    hooks_for: Callable[[EvalTarget, AttackSetup], EvalHooks],
    extras: AttackExtras,
) -> dict:
    """One checkpoint's report row: its first n test points through every attack."""
    (dev, dist), r, trained = where, request, t.meta.config
    setup = AttackSetup.from_levels(
        r.eps_levels,
        r.step_levels,
        _eps_low_for(t, r.eps_low, r.eps_levels, specs),
        where=str(t.path),
        restarts=r.restarts,
        seed=r.seed,
        batch_size=r.batch_size,
        cam=trained.cam if trained else "gradcam",
        mask_rule=trained.mask_rule if trained else "zscore",
    )
    points = t.test.first(n).to(dev)
    if dist.main:
        for warning in sanity_warnings(
            t.model, to_float(points.x[: r.batch_size]), points.y[: r.batch_size]
        ):
            note(f"warning: {t.path}: {warning}")
    with attack_progress(dist.main) as show:
        result = evaluate_suite(t.model, points, specs, setup, show, hooks=hooks_for(t, setup))
    if not r.per_class:
        result.pop("per_class")
    found = robustness_warnings(specs, result) + extras.warnings(specs, result, n)
    if dist.main:
        _say_result(t, specs, result)
    levels = (r.eps_levels, r.step_levels)
    return _attack_row(t, n, setup, result, specs, dev, found, levels)


def _say_result(t: EvalTarget, specs: list[AttackSpec], result: dict) -> None:
    acc = result["accuracy"]
    said = [f"{s.name} {fmt_pct(acc[s.name])}% ({result['seconds'][s.name]:.1f} s)" for s in specs]
    console.print(f"{t.path}: {', '.join(said)}, worst {fmt_pct(acc['worst'])}%")
    for name, parts in result.get("components", {}).items():
        console.print(
            f"{t.path}: {name} robust accuracy after "
            + ", ".join(f"{c.upper()} {fmt_pct(a)}%" for c, a in parts.items()),
        )


def _attacking(help: str, **kw) -> Any:
    return _opt(help, panel=ATTACKING, **kw)


ATTACKS_HELP = f"Comma-separated: {ATTACK_HELP}. natural always runs. [default: {DEFAULT_ATTACKS}]"
CHECKPOINTS_HELP = "Checkpoints: ours, model folders, or foreign state dicts with --arch."
RESTARTS_HELP = "Restarts of each iterative attack without its own xR (worst kept). [default: 1]"
EPS_LOW_HELP = "pgdK-part's low budget, 1/255 levels (default: the model's eps-low, else 7)."


@app.command("attack", cls=KeepsArgs)
def attack_command(
    checkpoints: Annotated[list[Path], typer.Argument(help=CHECKPOINTS_HELP, show_default=False)],
    attacks: Annotated[
        Optional[str], _attacking(ATTACKS_HELP, autocompletion=complete_attacks)
    ] = None,
    dataset: DatasetOpt = None,
    data_dir: DataDir = None,
    cache_dir: CacheDir = DEFAULT_CACHE,
    arch: Arch = None,
    cam_layer: CamLayer = None,
    n_examples: NExamples = None,
    batch_size: Annotated[
        int, _attacking("Batch size (halved on CUDA out-of-memory).", min=1, max=1 << 20)
    ] = 256,
    eps: Annotated[Optional[str], _attacking("L-inf budget, 1/255 levels. [default: 8]")] = None,
    step: Annotated[Optional[str], _attacking("PGD step, 1/255 levels. [default: 2]")] = None,
    restarts: Annotated[Optional[int], _attacking(RESTARTS_HELP, min=1, max=MAX_RESTARTS)] = None,
    eps_low: Annotated[Optional[str], _attacking(EPS_LOW_HELP)] = None,
    per_class: Annotated[bool, _opt("Also per class.", "--per-class", panel=REPORTS)] = False,
    json_out: Annotated[
        Optional[Path], _opt("Write the figures as JSON here.", "--json", panel=REPORTS)
    ] = None,
    seed: Seed = 0,
    device: Device = "auto",
    threads: Threads = 0,
    nproc: NProc = 1,
):
    """Robust accuracy of checkpoints on the first N test images: a table, and JSON.

    Standard protocol: inputs in [0, 1], eval mode, fp32; each attack runs on the points the
    model gets right; `worst` counts a point robust only if no attack broke it. With --nproc N
    (or torchrun) the points are shared out."""
    attack_with(dict(locals()), AttackExtras())


# Exports that make a folder to share, added by other modules (part_tools: "hf", a model hub
# folder): name -> fn(model, meta, card, out, name, source, **options) -> the folder's card.
FOLDER_EXPORTS: dict[str, Callable[..., Path]] = {}


def parse_formats(text: str) -> list[str]:
    names = [f.strip() for f in text.split(",") if f.strip()]
    names = list(EXPORT_FORMATS) if names == ["all"] else names
    known = (*EXPORT_FORMATS, *FOLDER_EXPORTS)
    bad = [f for f in names if f not in known]
    if bad or not names:
        raise unknown("export format", ", ".join(bad) or text, (*known, "all"))
    return list(dict.fromkeys(names))


FORMATS_HELP = (
    "torchscript|onnx|pt2|all (the three), or hf: a model folder to share (with part_tools.py); "
    "a comma-separated list."
)
VERIFY_HELP = "Run every exported file on a batch of another size and compare with PyTorch."
REPORT_HELP = "An `attack --json` report: its results for this checkpoint go into the card."


@app.command("export")
def export_command(
    checkpoint: Checkpoint,
    formats: Annotated[str, _opt(FORMATS_HELP, "--format")] = "all",
    out: Annotated[Path, _opt("Output folder.")] = Path("export"),
    verify: Annotated[bool, _opt(VERIFY_HELP, "--verify/--no-verify")] = True,
    arch: Arch = None,
    image_size: Annotated[
        Optional[int],
        _opt("Input side (default: the model's, else 32).", min=8, max=MAX_IMAGE_SIZE),
    ] = None,
    report: Annotated[Optional[Path], _opt(REPORT_HELP)] = None,
    replace: Annotated[bool, _opt("Overwrite another model's export of this name.")] = False,
):
    """Export a checkpoint for deployment: TorchScript, ONNX and/or torch.export (.pt2), with
    <name>.json beside them (input contract, classes, config, robustness)."""
    export_with(dict(locals()))


def export_with(o: dict[str, Any], zoo: tuple = (None, "linf", "models"), **folder: Any) -> None:
    """The `export` command, its options as typed; `zoo` and `folder`: part_tools' --dataset,
    --threat, --model-dir of a zoo's checkpoint, and --license of a folder format."""
    with cli_errors():
        checkpoint, arch = checkpoint_source(o["checkpoint"], o["arch"], *zoo)
        given = {k: o[k] for k in ("image_size", "verify", "report", "replace")}
        export_checkpoint(checkpoint, o["out"], o["formats"], arch=arch, **given, **folder)


def previous_export(out: Path, name: str, formats: list[str], sha256: str, replace: bool) -> dict:
    """The card of what `out` holds under `name` (a model folder's config.json for a folder
    format): {} for none, or with `replace`; another model's is refused."""
    card = out / ("config.json" if any(f in FOLDER_EXPORTS for f in formats) else f"{name}.json")
    if replace or not card.is_file():
        return {}
    try:
        before = json.loads(card.read_text())
        theirs = before.get("checkpoint_sha256") if isinstance(before, dict) else None
    except (OSError, ValueError, RecursionError):
        before, theirs = {}, None
    if theirs != sha256:
        whose = f"sha256 {theirs[:12]}" if isinstance(theirs, str) else "no sha256 part can check"
        raise CliError(
            f"--out {out} holds the export of another model ({card.name}: {whose}); give "
            "another --out, or --replace to overwrite it"
        )
    return before


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path = "export",
    formats: str | list[str] = "all",
    *,
    arch: Optional[str] = None,
    image_size: Optional[int] = None,
    verify: bool = True,
    report: str | Path | None = None,
    replace: bool = False,
    **folder: Any,
) -> dict[str, Path]:
    """What `export` does, from Python: the checkpoint as TorchScript / ONNX / torch.export
    files in `out` with the model card <name>.json; `verify` runs each file on a batch of
    another size against PyTorch. A format of FOLDER_EXPORTS ("hf", with part_tools) makes
    `out` a model folder to share (`folder`: its options, e.g. license). Another model's
    export of the same name in `out` is refused unless `replace`; the same model's keeps its
    results when no `report` is given.
    Returns {format: path, ..., "card": path}."""
    checkpoint, out = Path(checkpoint), Path(out)
    chosen = parse_formats(formats if isinstance(formats, str) else ",".join(formats))
    model, meta, sha256 = _load_checkpoint(checkpoint, arch, "cpu", None)
    robustness = robustness_of(Path(report), sha256) if report is not None else None
    check_output(out, "--out", folder=True)  # before the exports, the slow part
    name = checkpoint.name.split(".")[0] if checkpoint.is_file() else checkpoint.name
    before = previous_export(out, name, chosen, sha256, replace)
    size = image_size or meta.image_size or 32
    card = model_card(meta, sha256, size, robustness or before.get("robustness"))
    example = torch.rand(EXAMPLE_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for fmt in (f for f in chosen if f in FOLDER_EXPORTS):
        folder_card = FOLDER_EXPORTS[fmt](model, meta, card, out, name, checkpoint, **folder)
        files[fmt] = out
        shown = ", ".join(sorted(p.name for p in out.iterdir() if p.is_file()))
        console.print(f"{fmt}: {out} (model folder: {shown})")
        if all(f in FOLDER_EXPORTS for f in chosen):
            return {**files, "card": folder_card}
    for fmt in (f for f in chosen if f not in FOLDER_EXPORTS):
        path = out / f"{name}{SUFFIX[fmt]}"
        try:
            EXPORTERS[fmt](model, example, path, card)
        except OSError:  # a full disk or a folder that cannot be written: not the exporter's fault
            raise
        except Exception as e:  # exporters fail in many ways; each is reported in one line
            if fmt == "torchscript":
                note(f"torchscript: skipped, this PyTorch refuses it ({first_line(e)})")
                continue
            raise CliError(f"{fmt} export failed: {first_line(e)}") from None
        files[fmt] = path
        console.print(f"{fmt}: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    # the same model's files of other formats stay, and stay listed
    kept = {f: n for f, n in before.get("files", {}).items() if (out / str(n)).is_file()}
    card["files"] = kept | {fmt: p.name for fmt, p in files.items()}
    write_json(out / f"{name}.json", card)
    console.print(f"model card: {out / f'{name}.json'}")
    runtimes = {fmt: p for fmt, p in files.items() if fmt not in FOLDER_EXPORTS}
    if verify and runtimes:
        check_exports(model, runtimes, EXAMPLE_BATCH + 3, size)  # another batch size
    return {**files, "card": out / f"{name}.json"}


def check_exports(
    model: nn.Module, files: dict[str, Path], batch: int, size: int, tolerance: float = 1e-4
) -> None:
    """Each file against the PyTorch model on a random batch of another size than the export's."""
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    rows, failed = [], []
    for fmt, path in files.items():
        try:
            with torch.no_grad():
                got = run_exported(fmt, path, x).float()
            diff = (got - ref).abs().max().item() if got.shape == ref.shape else float("inf")
            same = got.shape == ref.shape and torch.equal(got.argmax(1), ref.argmax(1))
        except Exception as e:  # a file that does not even run is a failed check, not a crash
            diff, same = float("inf"), False
            note(f"{fmt}: {first_line(e)}")
        ok = diff <= tolerance and same
        failed += [] if ok else [fmt]
        verdict = ["same" if same else "DIFFERENT", "ok" if ok else "FAILED"]
        rows.append([fmt, path.name, f"{diff:.2e}", *verdict])
    headers = ["format", "file", "max |diff|", "argmax", "result"]
    title = f"export check: batch of {batch}, max |diff| <= {tolerance:g}, same argmax"
    console.print(text_table(title, headers, rows, left=headers))
    if failed:
        raise CliError(f"export check failed for {', '.join(failed)}")


def main() -> None:
    """The `part` command: the card's commands, and the tools' (report, cam, bench) where
    part_tools.py is installed beside this file."""
    try:
        import part_tools  # noqa: F401  (it adds its commands to `app`)
    except ModuleNotFoundError as e:
        if e.name != "part_tools":
            raise
    app()


if __name__ == "__main__":
    # the tools extend this module, not a second copy
    sys.modules.setdefault("part", sys.modules[__name__])
    main()
