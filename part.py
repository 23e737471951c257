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
(`--eps 8` or `--eps 8/255`); everything inside works on images in [0, 1], and the one
conversion is `levels()`. The Python API (`grad_cam`, `eps_map`, `pgd`, ...) takes
budgets in [0, 1] units.

Sections, each using only those above it: specs, config, runtime, data, models, CAM and
budget maps, attacks, training and evaluation, robustness evaluation, checkpoints, export,
console output, the training run, CAM figures, commands (train, attack, export, cam, bench).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import hashlib
import importlib.util
import json
import math
import os
import signal
import sys
import time
import tomllib
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

Tensor = torch.Tensor

# ============================================================================ specs

FORMAT = "part/1"  # checkpoint format version, stored in every file we write
SYNTHETIC_CLASSES = ("disk", "square", "ring", "plus", "cross", "triangle", "hbar", "vbar", "diamond", "frame")


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
ARCHS = ("resnet18", "preact-resnet18", "wrn-34-10", "cnn")
METHODS = ("at", "part")
LOSSES = ("ce", "trades", "mart")
GENERATORS = ("pgd", "mma")
CAM_METHODS = ("gradcam", "xgradcam", "layercam")
MASK_RULES = ("zscore", "official", "random", "uniform")
# The training-time evaluation is the standard protocol whatever the training budget.
EVAL_EPS, EVAL_STEP, EVAL_STEPS = 8.0, 2.0, 20


class CliError(Exception):
    """A user-facing error: printed as one line on stderr, exit code `code`."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's first line (or its type), for one-line error messages."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else type(e).__name__


def levels(value: float) -> float:
    """1/255 intensity levels (command line, configs) -> [0, 1] image units."""
    return value / 255.0


def parse_levels(text: str | float | int, name: str) -> float:
    """'8', '8/255' or 8 -> 8.0 (in 1/255 levels)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    s = str(text).strip()
    try:
        if s.endswith("/255"):
            return float(s[:-4])
        return float(s)
    except ValueError:
        raise CliError(f"--{name.replace('_', '-')}: expected a number of 1/255 levels like 8 or 8/255, got {text!r}") from None


# ============================================================================ config


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on. Defaults: the paper's CIFAR-10 settings."""

    dataset: str = "cifar10"
    data_dir: str = "data"
    cache_dir: str = "~/.cache/part"
    image_size: int = 32  # imagefolder only; fixed datasets use their native size
    model: str = "resnet18"
    method: str = "part"  # at: uniform budget; part: pixel-reweighted after warm-up
    loss: str = "ce"  # ce (AT/PART), trades (PART-T), mart (PART-M)
    beta: float = 6.0  # TRADES / MART regulariser weight
    generator: str = "pgd"  # how training AEs are made: pgd or mma
    cam: str = "gradcam"
    mask_rule: str = "zscore"
    eps: float = 8.0  # 1/255 levels
    eps_low: float = 7.0  # 1/255 levels, budget of the unimportant pixels
    step: float = 2.0  # 1/255 levels
    steps: int = 10
    epochs: int = 80
    warmup_epochs: int = 20
    batch_size: int = 128  # global batch (split across processes under torchrun)
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 2e-4
    lr_milestones: list[int] = dataclasses.field(default_factory=lambda: [79])  # global epochs
    lr_gamma: float = 0.1
    train_subset: int = 0  # first N training images, 0 = all
    eval_subset: int = 1000  # first N test images, 0 = all
    eval_every: int = 1
    out: str = ""  # default runs/<preset>-<method>-<timestamp>
    seed: int = 0
    device: str = "auto"
    compile: Optional[bool] = None  # None: on with CUDA only
    amp: bool = False  # bf16 autocast for the training attack and update (CUDA only)
    sync_bn: bool = False  # SyncBatchNorm under torchrun


CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
CHOICES = {"dataset": tuple(DATASETS), "model": ARCHS, "method": METHODS, "loss": LOSSES, "generator": GENERATORS,
           "cam": CAM_METHODS, "mask_rule": MASK_RULES, "device": ("auto", "cpu", "cuda")}
BUDGET_KEYS = ("eps", "eps_low", "step")
# On --resume these may change without changing what is computed.
RESUME_MUTABLE = {"data_dir", "cache_dir", "device", "compile", "epochs", "eval_every", "out"}


def default_config_path() -> Path:
    return Path(__file__).resolve().parent / "configs.toml"


def _coerce(key: str, value: Any, origin: str) -> Any:
    """Type-check one config value (from TOML or the command line)."""
    kind = CONFIG_FIELDS[key].type
    bad = CliError(f"{origin}: {key} = {value!r} is not a valid {kind}")
    if key in BUDGET_KEYS:
        return parse_levels(value, key)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if kind in ("bool", "Optional[bool]"):
        if not isinstance(value, bool) and not (kind == "Optional[bool]" and value is None):
            raise bad
        return value
    if kind == "list[int]":
        if isinstance(value, str):
            try:
                value = [int(v) for v in value.replace(" ", "").split(",") if v]
            except ValueError:
                raise bad from None
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise bad
        return list(value)
    if not isinstance(value, str):
        raise bad
    if key in CHOICES and value not in CHOICES[key]:
        raise CliError(f"{origin}: unknown {key.replace('_', '-')} {value!r} (choose from {', '.join(CHOICES[key])})")
    return value


def read_presets(path: Path) -> dict[str, dict]:
    if not path.is_file():
        raise CliError(f"config file {path} not found")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CliError(f"config file {path} is not valid TOML: {e}") from None


def preset_values(presets: dict[str, dict], name: str, path: Path, seen: tuple = ()) -> dict:
    """The preset's values with `extends` resolved (the named preset first, then its own keys)."""
    if name not in presets or not isinstance(presets[name], dict):
        raise CliError(f"unknown preset {name!r} in {path} (presets: {', '.join(k for k, v in presets.items() if isinstance(v, dict))})")
    if name in seen:
        raise CliError(f"preset {name!r} in {path} extends itself")
    table = dict(presets[name])
    values = {}
    if "extends" in table:
        values = preset_values(presets, str(table.pop("extends")), path, seen + (name,))
    for key, value in table.items():
        if key not in CONFIG_FIELDS:
            raise CliError(f"{path} [{name}]: unknown key {key!r}")
        values[key] = _coerce(key, value, f"{path} [{name}]")
    return values


def resolve_config(overrides: dict[str, Any], preset: Optional[str], config_path: Optional[Path]) -> tuple[TrainConfig, str]:
    """Code defaults < preset (configs.toml) < command line. Returns the config and the preset name."""
    path = config_path or default_config_path()
    presets = read_presets(path) if (config_path or path.is_file()) else {}
    given = {k: _coerce(k, v, "command line") for k, v in overrides.items() if v is not None}
    if preset is None:  # the dataset's own preset when there is one
        name = given.get("dataset", "cifar10")
        preset = name if name in presets else None
    values = preset_values(presets, preset, path) if preset else {}
    values.update(given)
    cfg = TrainConfig(**values)
    validate_config(cfg)
    return cfg, preset or cfg.dataset


def validate_config(cfg: TrainConfig) -> None:
    checks = [
        (cfg.eps >= 0 and cfg.eps_low >= 0, f"budgets must be non-negative (eps {cfg.eps}, eps-low {cfg.eps_low})"),
        (cfg.eps_low <= cfg.eps, f"eps-low ({cfg.eps_low}/255) must not exceed eps ({cfg.eps}/255)"),
        (cfg.eps <= 255, f"eps {cfg.eps}/255 is larger than the whole intensity range"),
        (cfg.step > 0, f"step must be positive, got {cfg.step}"),
        (cfg.steps >= 1, f"steps must be at least 1, got {cfg.steps}"),
        (cfg.epochs >= 1, f"epochs must be at least 1, got {cfg.epochs}"),
        (0 <= cfg.warmup_epochs <= cfg.epochs, f"warmup-epochs ({cfg.warmup_epochs}) must be between 0 and epochs ({cfg.epochs})"),
        (cfg.batch_size >= 2, f"batch-size must be at least 2, got {cfg.batch_size}"),
        (cfg.lr > 0, f"lr must be positive, got {cfg.lr}"),
        (cfg.momentum >= 0 and cfg.weight_decay >= 0 and cfg.beta >= 0, "momentum, weight-decay and beta must be non-negative"),
        (cfg.train_subset >= 0 and cfg.eval_subset >= 0, "train-subset and eval-subset must be non-negative"),
        (cfg.eval_every >= 1, f"eval-every must be at least 1, got {cfg.eval_every}"),
        (cfg.image_size >= 8, f"image-size must be at least 8, got {cfg.image_size}"),
        (all(m >= 1 for m in cfg.lr_milestones), "lr-milestones are global epochs, each at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise CliError(message)


# ============================================================================ runtime


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CliError("--device cuda asked for, but this PyTorch sees no CUDA device")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA; a no-op context elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from (seed, epoch, rank, ...): independent streams, reproducible."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclasses.dataclass
class Dist:
    """The process group as seen by this process (world 1: plain single process)."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world)


def _atomic_save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors to a temporary name, synced, then renamed: a crash never leaves half a file."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the library writes 0600; keep the usual file mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ============================================================================ data


@dataclasses.dataclass
class Split:
    """One split decoded once: uint8 images [N, 3, H, W] and int64 labels [N]."""

    x: Tensor
    y: Tensor
    classes: list[str]

    def first(self, n: int) -> "Split":
        return Split(self.x[:n], self.y[:n], self.classes) if n else self

    def to(self, device: torch.device) -> "Split":
        return Split(self.x.to(device), self.y.to(device), self.classes)


class DataMissing(CliError):
    def __init__(self, message: str):
        super().__init__(message, code=2)


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def synthetic_split(n: int, seed: int, size: int = 32) -> Split:
    """Procedural, learnable images: one of ten shapes (the class) in a random colour at a
    random position and scale, on a textured background (smooth colour field + stripes +
    noise). Deterministic in (n, seed, size); made in memory with no per-image Python."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    y = torch.randint(0, 10, (n,), generator=g)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = coords.view(1, 1, size, 1), coords.view(1, 1, 1, size)
    bg = F.interpolate(rand(n, 3, 4, 4) * 0.6 + 0.2, size=(size, size), mode="bilinear", align_corners=False)
    angle, freq, phase = rand(n, 1, 1, 1) * math.pi, 0.3 + rand(n, 1, 1, 1) * 0.6, rand(n, 1, 1, 1) * 2 * math.pi
    bg = bg + 0.08 * torch.sin(freq * (xx * angle.cos() + yy * angle.sin()) + phase)
    bg = bg + 0.03 * torch.randn(n, 3, size, size, generator=g)
    r = size * (0.18 + 0.12 * rand(n, 1, 1, 1))
    cx, cy = size * (0.3 + 0.4 * rand(n, 1, 1, 1)), size * (0.3 + 0.4 * rand(n, 1, 1, 1))
    dx, dy = (xx - cx) / r, (yy - cy) / r  # shape coordinates, outer radius 1
    ax, ay = dx.abs(), dy.abs()
    d, box = (dx**2 + dy**2).sqrt(), torch.maximum(ax, ay)
    shapes = torch.stack([
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
    ])  # [10, n, 1, H, W]
    mask = shapes[y, torch.arange(n)].float()
    # Moderate contrast (0.2-0.3 per channel, brighter on dark backgrounds): easy to learn, yet an
    # undefended model falls to ~0% at 8/255, as on natural images.
    dark = bg.mean((1, 2, 3), keepdim=True) < 0.5
    fg = bg.mean((2, 3), keepdim=True) + torch.where(dark, 1.0, -1.0) * (0.2 + 0.1 * rand(n, 3, 1, 1))
    x = (bg * (1 - mask) + fg * mask).clamp(0, 1)
    return Split((x * 255).round().to(torch.uint8), y, list(SYNTHETIC_CLASSES))


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _class_folder_files(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """root/<class>/* with classes sorted = labels, in the canonical class-interleaved order
    (the first file of every class, then the second, ...) so that any first N is balanced."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = [_list_images(root / c) for c in classes]
    files, labels = [], []
    for i in range(max((len(f) for f in per_class), default=0)):
        for label, class_files in enumerate(per_class):
            if i < len(class_files):
                files.append(class_files[i])
                labels.append(label)
    return files, labels, classes


def _decode_files(files: list[Path], size: int) -> Tensor:
    """Decode image files to uint8 [N, 3, size, size], resized (bilinear) where they differ."""
    from PIL import Image, UnidentifiedImageError

    out = torch.empty(len(files), 3, size, size, dtype=torch.uint8)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                out[i] = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
        except (OSError, UnidentifiedImageError) as e:
            raise CliError(f"cannot decode image {path}: {e}") from None
    return out


def _cached(cache_dir: str, name: str, files: list[Path], size: int, build: Callable[[], Split]) -> Split:
    """Decode once, keep a uint8 copy in the cache (keyed by the file list, sizes and mtimes)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    h = hashlib.sha1(f"{FORMAT}|{name}|{size}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    path = Path(cache_dir).expanduser() / f"{name}-{size}px-{h.hexdigest()[:16]}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), "pt") as f:
                classes = json.loads(f.metadata()["classes"])
            t = load_file(str(path))
            return Split(t["x"], t["y"], classes)
        except (SafetensorError, OSError, KeyError, ValueError):
            pass  # a broken cache entry is rebuilt below
    split = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save({"x": split.x.contiguous(), "y": split.y}, path, {"classes": json.dumps(split.classes)})
    except OSError:
        pass  # a read-only cache only costs the decoding time next run
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
    build = lambda: Split(_decode_files(files, size), torch.tensor(labels, dtype=torch.int64), classes)  # noqa: E731
    return _cached(cache_dir, f"{name}-{split}", files, size, build)


def _has_class_folders(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_dir() for p in folder.iterdir())


def _torchvision_split(dataset: str, split: str, root: Path) -> Split:
    import socket

    import torchvision.datasets as tvd

    train = split == "train"
    make = {
        "cifar10": lambda dl: tvd.CIFAR10(str(root), train=train, download=dl),
        "cifar100": lambda dl: tvd.CIFAR100(str(root), train=train, download=dl),
        "svhn": lambda dl: tvd.SVHN(str(root), split="train" if train else "test", download=dl),
    }[dataset]
    try:
        try:
            ds = make(False)
        except RuntimeError:  # not there (or corrupt): download it, where the network allows
            old = socket.getdefaulttimeout()
            socket.setdefaulttimeout(30)
            try:
                with contextlib.redirect_stdout(sys.stderr):
                    ds = make(True)
            except ImportError:
                raise
            except Exception as e:  # network errors come in many types; all mean the same here
                raise DataMissing(
                    f"{dataset} not found in {root} and could not be downloaded ({type(e).__name__}). "
                    f"Put torchvision's copy in {root}, or an image-folder copy as {root}/train/<class>/ and {root}/test/<class>/"
                ) from None
            finally:
                socket.setdefaulttimeout(old)
    except ImportError as e:  # torchvision reads SVHN's .mat files with scipy
        raise CliError(f"{dataset} needs an extra package ({e}): pip install scipy") from None
    if dataset == "svhn":
        x, y = torch.from_numpy(ds.data), torch.as_tensor(ds.labels, dtype=torch.int64)
        classes = [str(d) for d in range(10)]
    else:
        x, y = torch.from_numpy(ds.data).permute(0, 3, 1, 2), torch.as_tensor(ds.targets, dtype=torch.int64)
        classes = list(ds.classes)
    return Split(x.contiguous(), y, classes)


def _tinyimagenet_split(root: Path, split: str, cache_dir: str) -> Split:
    if (root / "tiny-imagenet-200").is_dir():
        root = root / "tiny-imagenet-200"
    if not (root / "train").is_dir():
        raise DataMissing(f"tiny-imagenet-200 not found in {root}: expected train/<wnid>/images and val/images + val/val_annotations.txt")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    index = {c: i for i, c in enumerate(classes)}
    if split == "train":
        per_class = [_list_images(root / "train" / c / "images") for c in classes]
        pairs = [(f[i], lab) for i in range(max(map(len, per_class), default=0)) for lab, f in enumerate(per_class) if i < len(f)]
    else:
        ann = root / "val" / "val_annotations.txt"
        if not ann.is_file():
            raise DataMissing(f"{ann} not found")
        rows = [line.split("\t") for line in ann.read_text().splitlines() if line.strip()]
        pairs = [(root / "val" / "images" / r[0], index[r[1]]) for r in rows if len(r) > 1 and r[1] in index]
    files, labels = [p for p, _ in pairs], [lab for _, lab in pairs]
    build = lambda: Split(_decode_files(files, 64), torch.tensor(labels, dtype=torch.int64), classes)  # noqa: E731
    return _cached(cache_dir, f"tinyimagenet-{split}", files, 64, build)


def load_split(dataset: str, split: str, data_dir: str, cache_dir: str = "~/.cache/part", image_size: int = 32) -> Split:
    """One split ('train' or 'test') as uint8 tensors on the CPU, in canonical order."""
    if dataset not in DATASETS:
        raise CliError(f"unknown dataset {dataset!r} (choose from {', '.join(DATASETS)})")
    if dataset == "synthetic":  # fixed seeds: the same data in every run, whatever --seed
        return synthetic_split(5000 if split == "train" else 1000, seed=1 if split == "train" else 2, size=32)
    root = Path(data_dir).expanduser()
    if dataset == "tinyimagenet":
        return _tinyimagenet_split(root, split, cache_dir)
    if dataset == "imagefolder":
        if not root.is_dir():
            raise DataMissing(f"data folder {root} not found: imagefolder expects {root}/train/<class>/ and {root}/test/<class>/ (or val/)")
        return _folder_split(root.resolve(), split, image_size, cache_dir, f"imagefolder-{root.resolve().name}")
    if dataset in ("cifar10", "cifar100") and (_has_class_folders(root / split) or (split == "test" and _has_class_folders(root / "val"))):
        return _folder_split(root.resolve(), split, 32, cache_dir, dataset)
    return _torchvision_split(dataset, split, root)


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


def to_float(x_u8: Tensor) -> Tensor:
    return x_u8.float().div_(255)


def channels_last(model: nn.Module) -> nn.Module:
    """NHWC weights: every convolution then runs in the channels-last layout (the first one
    converts its NCHW input), which oneDNN and cuDNN run faster; values are unchanged.
    Measured on 2 CPU cores, a PART step (median, interleaved runs): cnn batch 128 PGD-10
    687 -> 501 ms, resnet18 batch 64 PGD-3 2050 -> 1760 ms. Checkpoints store plain tensors."""
    return model.to(memory_format=torch.channels_last)


# ============================================================================ models
# All models take images in [0, 1] and expose features(x) -> last-block feature map and
# head(a) -> logits, so the CAM needs no hooks. Parameter names match the reference CIFAR
# code (kuangliu/pytorch-cifar ResNet-18 as in TRADES/MART/AutoAttack, fast_adversarial's
# PreAct ResNet-18, TRADES' WRN-34-10) so their state dicts load.


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

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
    for i, (w, n) in enumerate(zip(widths, blocks)):
        layers = []
        for j in range(n):
            layers.append(block(cin, w, 2 if (i > 0 and j == 0) else 1))
            cin = w
        stages.append(nn.Sequential(*layers))
    return stages


class ResNet18(nn.Module):
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

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class PreActResNet18(nn.Module):
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

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


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
        self.layer = nn.Sequential(*[WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
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
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def features(self, x: Tensor) -> Tensor:
        return self.block3(self.block2(self.block1(self.conv1(x))))

    def head(self, a: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.relu(self.bn1(a)), 1).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class SmallCNN(nn.Module):
    """A small, fast network for CPU runs and tests: four conv-BN-ReLU layers, GAP, linear."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (32, 64, 128, 128)):
        super().__init__()
        layers, cin = [], 3
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(cin, w, 3, 2 if i in (1, 2) else 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            cin = w
        self.body = nn.Sequential(*layers)
        self.linear = nn.Linear(cin, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def head(self, a: Tensor) -> Tensor:
        return self.linear(F.adaptive_avg_pool2d(a, 1).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    builders = {"resnet18": ResNet18, "preact-resnet18": PreActResNet18, "wrn-34-10": WideResNet, "cnn": SmallCNN}
    if name not in builders:
        raise CliError(f"unknown model {name!r} (choose from {', '.join(ARCHS)})")
    return builders[name](num_classes)


# ============================================================================ CAM and budget maps


def class_activation(model: nn.Module, x: Tensor, method: str = "gradcam", target: Optional[Tensor] = None) -> Tensor:
    """Batched CAM at the model's last block, at feature resolution: [B, 1, h, w], each map
    min-max normalised to [0, 1] (an all-zero map stays zero). One forward and one backward
    for the whole batch; the gradient is taken with torch.autograd.grad w.r.t. the feature
    map only, so parameter .grad is never touched. Runs in eval mode, restores the mode.

    Grad-CAM:  w_k = mean_ij dY_c/dA_kij,                      L = ReLU(sum_k w_k A_k)
    XGradCAM:  w_k = sum_ij dY_c/dA_kij A_kij / sum_ij A_kij,   L = ReLU(sum_k w_k A_k)
    LayerCAM:  L = ReLU(sum_k ReLU(dY_c/dA_k) * A_k)            (spatial weights)
    with Y_c the logit of `target` (default: the predicted class)."""
    if method not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {method!r} (choose from {', '.join(CAM_METHODS)})")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():  # the features need no graph: only d(score)/d(features) is used
            acts = model.features(x)
        acts = acts.to(torch.promote_types(acts.dtype, torch.float32)).requires_grad_(True)
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            logits = model.head(acts)
            if target is None:
                target = logits.argmax(1)
            score = logits.gather(1, target.view(-1, 1)).sum()
            (grads,) = torch.autograd.grad(score, acts)
    finally:
        model.train(was_training)
    acts = acts.detach()
    if method == "gradcam":
        weights = grads.mean((2, 3), keepdim=True)
    elif method == "xgradcam":
        weights = (grads * acts).sum((2, 3), keepdim=True) / (acts.sum((2, 3), keepdim=True) + 1e-7)
    else:
        weights = grads.clamp(min=0)
    cam = (weights * acts).sum(1, keepdim=True).clamp(min=0)
    low, high = cam.amin((2, 3), keepdim=True), cam.amax((2, 3), keepdim=True)
    return (cam - low) / (high - low).clamp(min=1e-12)


def upsample(cam: Tensor, size: tuple[int, ...]) -> Tensor:
    """A feature-resolution CAM [B, 1, h, w] resized (bilinear) to the image size."""
    return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)


def grad_cam(model: nn.Module, x: Tensor, method: str = "gradcam", target: Optional[Tensor] = None) -> Tensor:
    """The CAM upsampled (bilinear) to the input size: [B, 1, H, W] in [0, 1]."""
    return upsample(class_activation(model, x, method, target), x.shape[-2:]).clamp(0, 1)


def _pil_bicubic_matrix(n_in: int, n_out: int) -> Tensor:
    """The resampling matrix [n_out, n_in] of PIL's BICUBIC filter (a = -0.5, window
    clipped to the image and renormalised), as the authors' torchcam overlay applies it."""

    def cubic(t: float) -> float:
        a, t = -0.5, abs(t)
        if t < 1:
            return ((a + 2) * t - (a + 3)) * t * t + 1
        return (((t - 5) * t + 8) * t - 4) * a if t < 2 else 0.0

    scale = n_in / n_out
    filter_scale = max(scale, 1.0)
    support = 2.0 * filter_scale
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        w = torch.tensor([cubic((j - center + 0.5) / filter_scale) for j in range(lo, hi)], dtype=torch.float64)
        m[i, lo:hi] = w / w.sum() if w.sum() != 0 else w
    return m


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


def _zscore_hot(v: Tensor) -> Tensor:
    """Per image, standardise over all its values and mark those above 1 (std: population)."""
    mean = v.mean((1, 2, 3), keepdim=True)
    std = v.std((1, 2, 3), keepdim=True, correction=0)
    return (v - mean) / std.clamp(min=1e-12) > 1


def eps_map(cam: Tensor, eps: float, eps_low: float, rule: str = "zscore",
            size: Optional[tuple[int, int]] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """Per-pixel L-inf budget ([0, 1] units) from a CAM [B, 1, h, w] in [0, 1].

    zscore:   the paper's rule: standardise the (upsampled) CAM per image, z > 1 keeps
              `eps` on all channels, the rest `eps_low`.            -> [B, 1, H, W]
    official: the authors' rule re-created: bicubic upsampling (PIL), squared, coloured
              with jet, standardised over all H x W x 3 values, > 1 gets `eps`. -> [B, 3, H, W]
    random:   as many `eps` pixels per image as zscore, at random positions.
    uniform:  every pixel at the per-image mean budget zscore gives. -> [B, 1, 1, 1]
    `size` is the output (input image) size; default the CAM's own."""
    if rule not in MASK_RULES:
        raise ValueError(f"unknown mask rule {rule!r} (choose from {', '.join(MASK_RULES)})")
    size = tuple(size or cam.shape[-2:])
    cam = cam.float()
    hi, lo = torch.tensor(eps, dtype=torch.float32, device=cam.device), torch.tensor(eps_low, dtype=torch.float32, device=cam.device)
    if rule == "official":
        rows = _pil_bicubic_matrix(cam.shape[-2], size[0]).to(cam.device, torch.float32)
        cols = _pil_bicubic_matrix(cam.shape[-1], size[1]).to(cam.device, torch.float32)
        heat = rows @ cam @ cols.T  # PIL float images are not clipped; matplotlib clips below
        rgb = (jet(heat.square()) * 255).floor()  # torchcam's uint8 overlay
        return torch.where(_zscore_hot(rgb), hi, lo)
    if cam.shape[-2:] != size:
        cam = upsample(cam, size)
    hot = _zscore_hot(cam)
    if rule == "random":
        b, n = cam.shape[0], size[0] * size[1]
        count = hot.flatten(1).sum(1, keepdim=True)
        rank = torch.rand(b, n, device=cam.device, generator=generator).argsort(1).argsort(1)
        hot = (rank < count).view(b, 1, *size)
    elif rule == "uniform":
        return lo + (hi - lo) * hot.float().mean((1, 2, 3), keepdim=True)
    return torch.where(hot, hi, lo)


# ============================================================================ attacks


def cw_margin(logits: Tensor, y: Tensor, kappa: float = 50.0) -> Tensor:
    """Per example: max_{j != y} z_j - z_y, capped at kappa (the CW loss, to be maximised)."""
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    other = logits.scatter(1, y.view(-1, 1), float("-inf")).amax(1)
    return (other - true).clamp(max=kappa)


def attack_loss(name: str, logits: Tensor, y: Tensor, ref: Optional[Tensor] = None) -> Tensor:
    """Summed inner-maximisation loss: ce, cw (margin) or kl (TRADES: KL(ref || p(x')))."""
    logits = logits.float()
    if name == "ce":
        return F.cross_entropy(logits, y, reduction="sum")
    if name == "cw":
        return cw_margin(logits, y).sum()
    if name == "kl":
        return F.kl_div(F.log_softmax(logits, 1), ref, reduction="sum")
    raise ValueError(f"unknown attack loss {name!r}")


def _round_inward(v: Tensor, dtype: torch.dtype, down: bool) -> Tensor:
    """float64 values -> `dtype`, rounded toward -inf (down) or +inf instead of to nearest."""
    r = v.to(dtype)
    if dtype == torch.float64:
        return r
    past = r.double() > v if down else r.double() < v
    return torch.where(past, torch.nextafter(r, torch.full_like(r, -math.inf if down else math.inf)), r)


def _budget_box(x: Tensor, eps: float | Tensor) -> tuple[Tensor, Tensor]:
    """Element-wise bounds of the feasible set {x' : |x' - x| <= eps, 0 <= x' <= 1}.
    Worked out in float64 and rounded inward, so |x' - x| <= eps holds exactly, whatever
    precision a check uses: float32(8/255) itself is 1.9e-9 above 8/255, and x + eps
    rounded to nearest can land above x + eps."""
    eps = _round_inward(torch.as_tensor(eps, dtype=torch.float64, device=x.device), x.dtype, down=True).double()
    x64 = x.double()
    low = _round_inward((x64 - eps).clamp(min=0), x.dtype, down=False)
    high = _round_inward((x64 + eps).clamp(max=1), x.dtype, down=True)
    return low, high


def _ascend(model: nn.Module, x_adv: Tensor, low: Tensor, high: Tensor, step: float, steps: int,
            loss_fn: Callable[[Tensor], Tensor]) -> Tensor:
    """`steps` signed-gradient ascent steps of loss_fn(model(x')) projected onto [low, high]."""
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(model(x_adv))
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.clamp(x_adv.detach() + step * grad.sign(), low, high)
    return x_adv.detach()


@contextlib.contextmanager
def eval_mode(model: nn.Module):
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
    effect on the CPU. The previous settings come back on exit."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor, step: float, steps: int,
        loss: str = "ce", random_start: bool | float = True) -> Tensor:
    """L-inf PGD inside a per-pixel budget; returns x' with |x' - x| <= eps element-wise and
    x' in [0, 1]. `eps` is a float or a tensor broadcastable to x ([0, 1] units).
    random_start: True = uniform in the per-pixel budget; a float s = N(0, s^2) noise (the
    TRADES/MART start, e.g. 0.001); False = start at x. loss: ce, cw or kl (TRADES' inner
    KL against the model's clean prediction). Runs the model in eval mode, restores it;
    the input is never modified; no per-example Python."""
    low, high = _budget_box(x, eps)
    with eval_mode(model):
        ref = None
        if loss == "kl":
            with torch.no_grad():
                ref = F.softmax(model(x).float(), 1)
        if random_start is True:
            start = x + (2 * torch.rand_like(x) - 1) * torch.as_tensor(eps, dtype=x.dtype, device=x.device)
        elif random_start:
            start = x + float(random_start) * torch.randn_like(x)
        else:
            start = x
        start = torch.clamp(start, low, high)
        return _ascend(model, start, low, high, step, steps, lambda logits: attack_loss(loss, logits, y, ref))


def _repeat(eps: float | Tensor, x: Tensor, k: int) -> float | Tensor:
    if not torch.is_tensor(eps) or eps.dim() == 0:
        return eps
    return eps.expand_as(x).repeat(k, 1, 1, 1) if eps.dim() == 4 else eps


def mma(model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor, step: float, steps: int = 20,
        k: int = 3, kappa: float = 50.0, random_start: bool = True) -> Tensor:
    """Minimum-margin attack (as in the PART paper): a targeted PGD on the CW-type margin
    z_t - z_y (capped at kappa) for each of the k highest wrong classes of the clean
    prediction, run as one batch of k*B; per example the candidate with the smallest true
    margin z_y - max_{j != y} z_j is kept (so if any target succeeds, the result fails)."""
    b = x.shape[0]
    with eval_mode(model):
        with torch.no_grad():
            logits = model(x).float()
        k = min(k, logits.shape[1] - 1)
        targets = logits.scatter(1, y.view(-1, 1), float("-inf")).topk(k, 1).indices.T.reshape(-1)  # [k*B]
        xr, yr, er = x.repeat(k, 1, 1, 1), y.repeat(k), _repeat(eps, x, k)
        low, high = _budget_box(xr, er)
        start = xr + (2 * torch.rand_like(xr) - 1) * torch.as_tensor(er, dtype=x.dtype, device=x.device) if random_start else xr
        start = torch.clamp(start, low, high)

        def targeted(out: Tensor) -> Tensor:
            out = out.float()
            gap = out.gather(1, targets.view(-1, 1)) - out.gather(1, yr.view(-1, 1))
            return gap.clamp(max=kappa).sum()

        cand = _ascend(model, start, low, high, step, steps, targeted)
        with torch.no_grad():
            margin = -cw_margin(model(cand).float(), yr, kappa=float("inf")).view(k, b)
    best = margin.argmin(0)
    return cand.view(k, b, *x.shape[1:])[best, torch.arange(b, device=x.device)]


# ============================================================================ training and evaluation

INNER_LOSS = {"ce": "ce", "trades": "kl", "mart": "ce"}
# Madry AT starts uniformly in the budget; TRADES and MART from x + 0.001 N(0, 1).
START = {"ce": True, "trades": 0.001, "mart": 0.001}


class MultiInput(nn.Module):
    """One forward call over several batches, each through the model on its own (so every
    batch keeps its own BatchNorm statistics, as in TRADES/MART) and DDP sees one forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *xs: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.model(x) for x in xs)


def outer_loss(kind: str, nat: Optional[Tensor], adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """The training objective on the adversarial (and, for TRADES/MART, natural) logits."""
    adv = adv.float()
    if kind == "ce":
        return F.cross_entropy(adv, y)
    nat = nat.float()
    if kind == "trades":  # CE(f(x), y) + beta * KL(f(x) || f(x')), Zhang et al. 2019
        return F.cross_entropy(nat, y) + beta * F.kl_div(F.log_softmax(adv, 1), F.softmax(nat, 1), reduction="batchmean")
    # MART (Wang et al. 2020): boosted CE on x' + beta * KL weighted by (1 - p_y(x))
    adv_probs = F.softmax(adv, 1)
    top2 = adv_probs.argsort(1)[:, -2:]
    runner_up = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    bce = F.cross_entropy(adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), runner_up)
    nat_probs = F.softmax(nat, 1)
    true_probs = nat_probs.gather(1, y.view(-1, 1)).squeeze(1)
    kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(1)
    return bce + beta * (kl * (1.0000001 - true_probs)).mean()


def budget_for(model: nn.Module, x: Tensor, cfg: TrainConfig, part_phase: bool) -> float | Tensor:
    """The per-pixel budget of this exact (augmented) batch: CAM -> eps map in PART epochs."""
    if not part_phase:
        return levels(cfg.eps)
    cam = class_activation(model, x, cfg.cam)
    return eps_map(cam, levels(cfg.eps), levels(cfg.eps_low), cfg.mask_rule, size=x.shape[-2:])


def make_adversarial(attack_model: nn.Module, x: Tensor, y: Tensor, budget: float | Tensor, cfg: TrainConfig) -> Tensor:
    if cfg.generator == "mma":
        return mma(attack_model, x, y, budget, levels(cfg.step), cfg.steps)
    return pgd(attack_model, x, y, budget, levels(cfg.step), cfg.steps, INNER_LOSS[cfg.loss], START[cfg.loss])


def train_step(model: nn.Module, attack_model: nn.Module, update_model: nn.Module, optimizer: torch.optim.Optimizer,
               x: Tensor, y: Tensor, cfg: TrainConfig, part_phase: bool) -> tuple[Tensor, Tensor]:
    """CAM + budget map on this batch, the adversarial examples, one SGD update.
    `model` is the plain module (CAM), `attack_model` may be compiled, `update_model` wraps
    MultiInput(model) (compiled and/or DDP). Returns (loss, #correct on x') on the device."""
    amp = autocast(x.device, cfg.amp)
    budget = budget_for(model, x, cfg, part_phase)
    with amp:
        x_adv = make_adversarial(attack_model, x, y, budget, cfg)
    update_model.train()
    with amp:
        if cfg.loss == "ce":
            (adv,), nat = update_model(x_adv), None
        else:
            nat, adv = update_model(x, x_adv)
        loss = outer_loss(cfg.loss, nat, adv, y, cfg.beta)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (adv.argmax(1) == y).sum()


def epoch_batches(n: int, batch: int, dist: Dist, shuffle: torch.Generator) -> list[Tensor]:
    """This process's share of every global batch of an epoch: one shuffled order on every
    rank, each global batch cut into `world` contiguous parts (disjoint, together the whole
    batch). A last batch too small for two images per process (BatchNorm) is dropped."""
    order = torch.randperm(n, device=shuffle.device, generator=shuffle)
    return [idx.tensor_split(dist.world)[dist.rank] for idx in order.split(batch) if len(idx) >= 2 * dist.world]


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Step schedule: lr * gamma^(number of milestones reached); epochs count from 0."""
    return cfg.lr * cfg.lr_gamma ** sum(epoch >= m for m in cfg.lr_milestones)


def _reduce(t: Tensor, dist: Dist) -> Tensor:
    if dist.world > 1:
        torch.distributed.all_reduce(t)
    return t


def evaluate(model: nn.Module, data: Split, batch_size: int, eps: float, step: float, steps: int,
             dist: Dist = Dist()) -> dict[str, float]:
    """Natural and PGD accuracy on `data` (already on the model's device), fp32, eval mode,
    random start; sharded across processes, counts summed. Budgets in [0, 1] units."""
    n = len(data.y)
    mine = torch.arange(dist.rank, n, dist.world, device=data.y.device)
    counts = torch.zeros(3, device=data.y.device)
    with eval_mode(model), full_fp32():
        for chunk in mine.split(batch_size):
            x, y = to_float(data.x[chunk]), data.y[chunk]
            with torch.no_grad():
                counts[0] += (model(x).argmax(1) == y).sum()
            x_adv = pgd(model, x, y, eps, step, steps)
            with torch.no_grad():
                counts[1] += (model(x_adv).argmax(1) == y).sum()
            counts[2] += len(y)
    counts = _reduce(counts, dist).tolist()
    return {"natural": counts[0] / max(counts[2], 1), "pgd20": counts[1] / max(counts[2], 1)}


# ============================================================================ robustness evaluation

SUITE = ("natural", "fgsm", "pgd20", "cw20", "mma", "aa", "pgd20-part")


@dataclasses.dataclass
class AttackSetup:
    """One evaluation's threat model ([0, 1] units) and the settings of the PART map."""

    eps: float
    step: float
    restarts: int = 1
    seed: int = 0
    batch_size: int = 256
    eps_low: float = levels(7)
    cam: str = "gradcam"
    mask_rule: str = "zscore"


def predict(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """Predicted classes of x, batch by batch, without a graph."""
    with torch.no_grad():
        return torch.cat([model(chunk).argmax(1) for chunk in x.split(batch_size)])


def rng_fork(device: torch.device):
    """A scope whose changes to the global RNG (CPU, and this GPU) are undone on exit."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def worst_of_restarts(model: nn.Module, y: Tensor, restarts: int, attack: Callable[[], Tensor]) -> Tensor:
    """Run `attack` up to `restarts` times, keeping per example an AE that fools the model."""
    best = attack()
    for _ in range(restarts - 1):
        with torch.no_grad():
            holding = model(best).argmax(1) == y
        if not holding.any():
            break
        best = torch.where(holding.view(-1, 1, 1, 1), attack(), best)
    return best


def run_attack(name: str, model: nn.Module, x: Tensor, y: Tensor, s: AttackSetup) -> Tensor:
    """Adversarial examples of one suite attack (not `aa`) for a batch, model in eval mode."""
    if name == "natural":
        return x
    if name == "fgsm":
        return pgd(model, x, y, s.eps, s.eps, 1, random_start=False)
    if name in ("pgd20", "cw20"):
        loss = "ce" if name == "pgd20" else "cw"
        return worst_of_restarts(model, y, s.restarts, lambda: pgd(model, x, y, s.eps, s.step, 20, loss))
    if name == "mma":
        return mma(model, x, y, s.eps, s.step, 20, k=3)
    if name == "pgd20-part":  # inside the model's own PART budget map of these clean images
        budget = eps_map(class_activation(model, x, s.cam), s.eps, s.eps_low, s.mask_rule, size=x.shape[-2:])
        return worst_of_restarts(model, y, s.restarts, lambda: pgd(model, x, y, budget, s.step, 20))
    raise ValueError(f"unknown attack {name!r}")


def autoattack(model: nn.Module, x: Tensor, y: Tensor, eps: float, seed: int, batch_size: int) -> Tensor:
    """The reference AutoAttack, standard version (APGD-CE, APGD-T, FAB-T, Square), from
    pyautoattack. It reseeds the global generator, so it runs inside fork_rng."""
    try:
        from pyautoattack import AutoAttack
    except ImportError:
        raise CliError("the aa attack needs the optional package pyautoattack: pip install pyautoattack") from None
    device = x.device
    with rng_fork(device):
        adversary = AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=seed, device=device)
        with torch.no_grad():
            num_classes = model(x[:1]).shape[1]
        if num_classes < 10:  # the standard version targets 9 classes; fewer exist here
            adversary.apgd_targeted.n_target_classes = adversary.fab.n_target_classes = num_classes - 1
        x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    return x_adv


def sanity_warnings(model: nn.Module, x: Tensor, y: Tensor) -> list[str]:
    """AutoAttack-style checks that a gradient-based evaluation means something here."""
    found = []
    with torch.no_grad():
        a, b = model(x), model(x)
    if not torch.equal(a, b):
        found.append("the model gives different outputs for the same input (a randomised defence?): "
                     "these attacks do not average over its randomness, robustness may be overstated")
    if (a >= 0).all() and torch.allclose(a.sum(1), torch.ones_like(a[:, 0]), atol=1e-4):
        found.append("the outputs look like probabilities (non-negative, rows sum to 1): the attacks expect logits")
    x_ = x.clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_).float(), y, reduction="sum"), x_, allow_unused=True)
    zero = 1.0 if grad is None else (grad.flatten(1).abs().amax(1) == 0).float().mean().item()
    if zero > 0:
        found.append(f"{zero:.0%} of the inputs have an all-zero input gradient (gradient masking?): "
                     "gradient-based accuracy may be overstated")
    return found


def evaluate_suite(model: nn.Module, data: Split, attacks: list[str], s: AttackSetup,
                   on_batch: Callable[[str, int, int], None] = lambda name, done, total: None) -> dict:
    """Accuracy of every attack on `data` (on the model's device), each attack run on the
    points the model classifies correctly, fp32, eval mode; `worst` counts a point robust
    only if no attack broke it. Every AE is checked against the budget before it counts."""
    n, device = len(data.y), data.y.device
    x_all = to_float(data.x)
    with eval_mode(model), full_fp32():
        clean = predict(model, x_all, s.batch_size) == data.y
        correct, seconds = {"natural": clean}, {"natural": 0.0}
        todo = clean.nonzero().squeeze(1)
        for name in attacks:
            if name == "natural":
                continue
            t0 = time.perf_counter()
            with rng_fork(device):
                torch.manual_seed(s.seed)  # each attack's randomness is independent of the others
                correct[name] = _attack_all(name, model, x_all, data.y, todo, s, on_batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name] = time.perf_counter() - t0
    worst = torch.stack(list(correct.values())).all(0)
    accuracy = {k: v.float().mean().item() for k, v in correct.items()}
    accuracy["worst"] = worst.float().mean().item()
    per_class = {}
    for c, name in enumerate(data.classes):
        members = data.y == c
        if members.any():
            per_class[name] = {k: v[members].float().mean().item() for k, v in {**correct, "worst": worst}.items()}
    return {"accuracy": accuracy, "seconds": seconds, "per_class": per_class}


def _attack_all(name: str, model: nn.Module, x_all: Tensor, y_all: Tensor, todo: Tensor, s: AttackSetup,
                on_batch: Callable[[str, int, int], None]) -> Tensor:
    """Per point: is it still classified correctly under attack `name`? (`todo`: the points
    to attack; the others count as broken.) AutoAttack gets every point, as when called directly."""
    n = len(y_all)
    if name == "aa":
        x_adv = autoattack(model, x_all, y_all, s.eps, s.seed, s.batch_size)
        _check_budget(x_adv, x_all, s.eps, name)
        robust = predict(model, x_adv, s.batch_size) == y_all
        on_batch(name, n, n)
        return robust
    robust, done = torch.zeros(n, dtype=torch.bool, device=y_all.device), 0
    for idx in todo.split(s.batch_size):
        x, y = x_all[idx], y_all[idx]
        x_adv = run_attack(name, model, x, y, s)
        _check_budget(x_adv, x, s.eps, name)
        with torch.no_grad():
            robust[idx] = model(x_adv).argmax(1) == y
        done += len(idx)
        on_batch(name, done, len(todo))
    return robust


def _check_budget(x_adv: Tensor, x: Tensor, eps: float, name: str) -> None:
    excess = ((x_adv - x).abs().max() - eps).item() if len(x) else 0.0
    if excess > 1e-5 or (len(x) and (x_adv.min() < 0 or x_adv.max() > 1)):
        raise CliError(f"{name} produced inputs outside the eps ball or [0, 1] (by {excess:.2e}); no accuracy reported")


# ============================================================================ checkpoints
# Weights: safetensors with the run's metadata (strings; JSON where structured). Resume
# state (optimizer buffers, epoch, best) in a second safetensors file beside it. Every
# file is written to a temporary name and renamed, so a crash never leaves half a file.


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def stop_signals_deferred():
    """Hold Ctrl-C / SIGTERM back while files are written (the checkpoint pair stays consistent)."""
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


def save_checkpoint(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Weights of the plain (uncompiled, unwrapped) model + metadata (JSON-encoded values)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    _atomic_save(tensors, path, {"format": FORMAT, **{k: json.dumps(v) for k, v in meta.items()}})


def _open_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.torch import load, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        return load(path.read_bytes()), metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
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
    """The informative part of torch.load's long weights-only message."""
    text = str(e)
    if isinstance(e, EOFError):
        return "empty or truncated file"
    if "Unsupported global" in text:
        name = text.split("GLOBAL", 1)[1].split()[0] if "GLOBAL" in text else "a Python object"
        return f"it pickles {name}, i.e. code, not only tensors"
    if "WeightsUnpickler error" in text:
        return "damaged, or not a PyTorch pickle"
    return first_line(e, 160)


def _head_size(state: dict[str, Tensor]) -> Optional[int]:
    for key in ("linear.weight", "fc.weight"):
        if key in state and state[key].dim() == 2:
            return state[key].shape[0]
    return None


def load_state_into(model: nn.Module, state: dict[str, Tensor], arch: str, path: Path) -> None:
    """Strict load with a one-line explanation when the file does not fit the architecture."""
    state = {k: v for k, v in state.items() if not (arch == "wrn-34-10" and k.startswith("sub_block1."))}  # TRADES' unused block
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                 f"{len(wrong)} of another shape (e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)})" if wrong else ""]
        raise CliError(f"{path} does not match architecture {arch}: " + ", ".join(p for p in parts if p) + " keys")
    model.load_state_dict(state)


def load_checkpoint(path: str | Path, arch: Optional[str] = None, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Our .safetensors checkpoints (architecture and classes from the metadata), or a
    foreign state dict (.safetensors, or .pt/.pth opened with weights_only=True) with `arch`.
    Returns (model in eval mode, metadata)."""
    path = Path(path)
    if arch is not None and arch not in ARCHS:
        raise CliError(f"unknown architecture {arch!r} (choose from {', '.join(ARCHS)})")
    if not path.is_file():
        raise CliError(f"checkpoint {path} {'is a folder, not a file' if path.is_dir() else 'not found'}")
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        import pickle
        import warnings

        try:
            with warnings.catch_warnings():  # torch's notes on pickle protocols; failures raise below
                warnings.simplefilter("ignore", UserWarning)
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError, ImportError) as e:
            raise CliError(f"{path} cannot be loaded safely as a weights-only checkpoint ({_unpickling_reason(e)})") from None
        state, metadata = _clean_state_dict(obj, path), {}
    else:
        state, metadata = _open_safetensors(path)
    ours = metadata.get("format", "").startswith("part/")
    if ours:
        meta = {k: json.loads(v) for k, v in metadata.items() if k != "format"}
        meta["format"] = metadata["format"]
        if arch is not None and arch != meta["arch"]:
            raise CliError(f"{path} holds a {meta['arch']} model, not {arch}")
    else:
        if arch is None:
            raise CliError(f"{path} is a foreign state dict: say which architecture with --arch ({', '.join(ARCHS)})")
        state = _clean_state_dict(state, path)
        num_classes = _head_size(state)
        if num_classes is None:
            raise CliError(f"{path} does not match architecture {arch}: no linear.weight or fc.weight classifier")
        meta = {"format": "foreign", "arch": arch, "num_classes": num_classes, "classes": [], "dataset": None, "source": str(path)}
    if meta["arch"] not in ARCHS:
        raise CliError(f"unknown architecture {meta['arch']!r} (choose from {', '.join(ARCHS)})")
    model = build_model(meta["arch"], meta["num_classes"])
    load_state_into(model, state, meta["arch"], path)
    return model.to(device).eval(), meta


def save_resume_state(path: Path, optimizer: torch.optim.Optimizer, epoch: int, best: dict) -> None:
    """Optimizer buffers + JSON scalars; the lr follows from (config, epoch) and the RNG
    streams from (seed, epoch, rank), so this is everything a resumed run needs."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for name, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    meta = {"epoch": epoch, "best": best, "param_groups": sd["param_groups"], "scalars": scalars}
    _atomic_save(tensors, path, {"format": FORMAT + "-state", **{k: json.dumps(v) for k, v in meta.items()}})


def load_resume_state(path: Path, optimizer: torch.optim.Optimizer) -> dict:
    tensors, metadata = _open_safetensors(path)
    if metadata.get("format") != FORMAT + "-state":
        raise CliError(f"{path} is not a resume-state file of this tool")
    meta = {k: json.loads(v) for k, v in metadata.items() if k != "format"}
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError) as e:
        raise CliError(f"{path} does not fit this model's optimizer ({e})") from None
    return meta


# ============================================================================ export

EXPORT_FORMATS = ("torchscript", "onnx", "pt2")
SUFFIX = {"torchscript": ".ts.pt", "onnx": ".onnx", "pt2": ".pt2"}


def model_card(meta: dict, image_size: int) -> dict:
    """What a deployment needs to know, stored beside the exported files and inside the ONNX."""
    return {
        "input": {"name": "image", "dtype": "float32", "shape": ["N", 3, image_size, image_size], "layout": "NCHW, RGB",
                  "range": [0.0, 1.0], "normalisation": "none: feed RGB values in [0, 1]; the model normalises nothing"},
        "output": {"name": "logits", "dtype": "float32", "shape": ["N", meta["num_classes"]]},
        "classes": meta.get("classes") or [str(i) for i in range(meta["num_classes"])],
        "arch": meta["arch"], "dataset": meta.get("dataset"), "epoch": meta.get("epoch"),
        "config": meta.get("config"), "metrics": meta.get("metrics"), "best": meta.get("best"),
        "source": meta.get("source"), "exported_with": f"part ({FORMAT}), torch {torch.__version__}",
    }


@contextlib.contextmanager
def torchscript_warnings(note: bool):
    """TorchScript is deprecated in recent PyTorch: its deprecation warnings become one note
    (when `note`); every other warning (a tracer warning, say) is still shown, in one line each."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    deprecated = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning)) and "deprecated" in str(w.message)]
    if deprecated and note:
        err_console.print(f"note: TorchScript is deprecated in torch {torch.__version__}; the .ts.pt file is for older "
                          "deployments, .pt2 and .onnx are the lasting formats")
    for w in caught:
        if w not in deprecated:
            err_console.print(f"warning: {w.category.__name__}: {first_line(w.message)}", markup=False)


def export_torchscript(model: nn.Module, example: Tensor, path: Path) -> None:
    with torchscript_warnings(note=True):
        traced = torch.jit.trace(model, (example,), check_trace=False)
        traced.save(str(path))


def export_onnx(model: nn.Module, example: Tensor, path: Path, opset: int, card: dict) -> None:
    """Dynamo exporter, weights inside the file, dynamic batch; the model card as metadata_props."""
    import onnx

    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(model, (example,), dynamo=True, input_names=["image"], output_names=["logits"],
                                opset_version=opset, dynamic_shapes=({0: batch},), external_data=False, verbose=False)
    proto = program.model_proto
    for key, value in card.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(proto)
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save_model(proto, str(tmp))
    os.replace(tmp, path)


def export_pt2(model: nn.Module, example: Tensor, path: Path) -> None:
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, str(path))


def run_exported(fmt: str, path: Path, x: Tensor) -> Tensor:
    """Logits of an exported file, run the way a deployment would run it."""
    if fmt == "torchscript":
        with torchscript_warnings(note=False):
            return torch.jit.load(str(path), map_location="cpu")(x)
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(["logits"], {"image": x.numpy()})[0])
    return torch.export.load(str(path)).module()(x)


# ============================================================================ console output

# Tables keep their columns in logs and pipes too (rich would assume 80 columns there).
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def fmt_pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


class Reporter:
    """Run output: the resolved config, a live progress bar per epoch on a terminal, and one
    row per epoch (plain lines when stdout is not a terminal). Silent on ranks other than 0."""

    COLUMNS = (("epoch", 7), ("phase", 8), ("lr", 9), ("loss", 8), ("train%", 7), ("nat%", 7), ("pgd20%", 7), ("sec", 7), ("img/s", 8))

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.live = enabled and console.is_terminal

    def print(self, *args, **kwargs) -> None:
        if self.enabled:
            console.print(*args, **kwargs)

    def config(self, cfg: TrainConfig, preset: str, out: Path, device: torch.device, extra: str = "") -> None:
        items = " ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items())
        self.print(f"part train preset={preset} out={out} device={device}{extra}", markup=False, style="bold")
        self.print(f"config: {items}", markup=False)

    def header(self) -> None:
        self.print("  ".join(name.rjust(width) for name, width in self.COLUMNS), style="bold")

    @contextlib.contextmanager
    def epoch(self, epoch: int, total: int):
        if not self.live:
            yield lambda done, loss, acc: None
            return
        progress = Progress(TextColumn(f"epoch {epoch}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True)
        with progress:
            task = progress.add_task("", total=total, stats="")
            yield lambda done, loss, acc: progress.update(task, completed=done, stats=f"loss {loss:.4f} acc {100 * acc:.1f}%")

    def row(self, m: dict) -> None:
        values = (f"{m['epoch']}", m["phase"], f"{m['lr']:.2e}", f"{m['train_loss']:.4f}", fmt_pct(m["train_acc"]),
                  fmt_pct(m.get("natural")), fmt_pct(m.get("pgd20")), f"{m['seconds']:.1f}", f"{m['img_per_s']:.0f}")
        self.print("  ".join(v.rjust(width) for v, (_, width) in zip(values, self.COLUMNS)))
        console.file.flush()  # a row per epoch also reaches logs and pipes at once


# ============================================================================ the training run


def check_out_dir(out: Path, resume: bool) -> None:
    last, state = out / "last.safetensors", out / "last.state.safetensors"
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is a file, not a folder")
    if resume:
        for p in (last, state):
            if not p.is_file():
                raise CliError(f"cannot resume: {p} not found")
    elif out.exists() and (last.exists() or (out / "metrics.jsonl").exists()):
        raise CliError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")


def resume_config(out: Path, overrides: dict[str, Any]) -> tuple[TrainConfig, str]:
    """The run's own config from its checkpoint; only settings that do not change what is
    computed (device, data location, more epochs, ...) may be given again."""
    check_out_dir(out, resume=True)
    _, metadata = _open_safetensors(out / "last.safetensors")
    if not metadata.get("format", "").startswith("part/"):
        raise CliError(f"{out / 'last.safetensors'} is not a checkpoint of this tool")
    saved = json.loads(metadata["config"])
    values = {k: v for k, v in saved.items() if k in CONFIG_FIELDS}
    for key, value in overrides.items():
        if value is None:
            continue
        value = _coerce(key, value, "command line")
        if key in RESUME_MUTABLE:
            values[key] = value
        elif value != values.get(key):
            raise CliError(f"--{key.replace('_', '-')} cannot change on --resume (the run used {values.get(key)!r})")
    cfg = TrainConfig(**values)
    validate_config(cfg)
    return cfg, json.loads(metadata.get("preset", json.dumps(cfg.dataset)))


@contextlib.contextmanager
def process_group(dist: Dist, device: torch.device):
    """torch.distributed for torchrun launches (NCCL on CUDA, gloo on CPU); nothing otherwise."""
    if dist.world == 1:
        yield
        return
    import torch.distributed as td

    if device.type == "cuda":
        torch.cuda.set_device(device)
    td.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=dist.rank, world_size=dist.world,
                          device_id=device if device.type == "cuda" else None)
    try:
        yield
        gc.collect()  # drop any DDP wrapper still holding the group before it is torn down
        td.barrier()  # leave together: a rank that tears the group down under a busy one aborts it
    finally:
        td.destroy_process_group()


def run_device(cfg: TrainConfig, dist: Dist) -> torch.device:
    device = pick_device(cfg.device)
    if dist.world > 1 and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    return device


def run_training(cfg: TrainConfig, preset: str, out: Path, resume: bool, dist: Dist = Dist()) -> dict:
    """The whole run: data, model, warm-up + PART epochs, evaluation, checkpoints.
    Returns the last epoch's metrics."""
    device = run_device(cfg, dist)
    report = Reporter(enabled=dist.main)
    report.config(cfg, preset, out, device, f" processes={dist.world}" if dist.world > 1 else "")
    if cfg.amp and device.type != "cuda":
        report.print("note: --amp is CUDA-only; training in fp32 on the CPU")
    spec = DATASETS[cfg.dataset]
    train_data = load_split(cfg.dataset, "train", cfg.data_dir, cfg.cache_dir, cfg.image_size).first(cfg.train_subset)
    test_data = load_split(cfg.dataset, "test", cfg.data_dir, cfg.cache_dir, cfg.image_size).first(cfg.eval_subset)
    if train_data.classes != test_data.classes:
        raise CliError(f"train and test splits of {cfg.data_dir} have different classes")
    classes = train_data.classes
    if len(train_data.y) < cfg.batch_size:
        raise CliError(f"the training set has {len(train_data.y)} images, fewer than one batch ({cfg.batch_size})")

    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed only
    model = channels_last(build_model(cfg.model, len(classes)).to(device))
    if cfg.sync_bn and dist.world > 1:
        if device.type != "cuda":
            raise CliError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm does not run on the CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    last, state_path, metrics_path = out / "last.safetensors", out / "last.state.safetensors", out / "metrics.jsonl"
    start, best = 0, {"pgd20": None, "epoch": None}
    if resume:
        tensors, metadata = _open_safetensors(last)
        load_state_into(model, tensors, cfg.model, last)
        state = load_resume_state(state_path, optimizer)
        start, best = state["epoch"], state["best"]
        if json.loads(metadata["epoch"]) != start:
            raise CliError(f"{last} (epoch {metadata['epoch']}) and {state_path} (epoch {start}) disagree; the run cannot resume exactly")
    elif dist.main:
        out.mkdir(parents=True, exist_ok=True)

    train_data, test_data = train_data.to(device), test_data.to(device)
    use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
    attack_model = torch.compile(model) if use_compile else model
    update_model: nn.Module = MultiInput(model)
    if dist.world > 1:
        update_model = nn.parallel.DistributedDataParallel(update_model, device_ids=[device] if device.type == "cuda" else None)
    if use_compile:
        update_model = torch.compile(update_model)

    report.header()
    if start >= cfg.epochs:
        report.print(f"{out} already finished {start} of {cfg.epochs} epochs; nothing to do")
    n = len(train_data.y)
    meta_base = {"arch": cfg.model, "dataset": cfg.dataset, "classes": classes, "num_classes": len(classes),
                 "image_size": int(train_data.x.shape[-1]), "preset": preset, "config": dataclasses.asdict(cfg)}
    metrics: dict = {}
    epoch = completed = start
    try:
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            part_phase = cfg.method == "part" and epoch >= cfg.warmup_epochs
            phase = "PART" if part_phase else ("warm-up" if cfg.method == "part" else "AT")
            lr = lr_at(cfg, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # Every random stream of an epoch is a function of (seed, epoch[, rank]): a resumed
            # run replays exactly what the uninterrupted one would have done.
            torch.manual_seed(derived_seed(cfg.seed, epoch, dist.rank))
            shuffle = torch.Generator(device).manual_seed(derived_seed(cfg.seed, epoch, -1))  # same on every rank
            aug = torch.Generator(device).manual_seed(derived_seed(cfg.seed, epoch, dist.rank, 1))
            batches = epoch_batches(n, cfg.batch_size, dist, shuffle)
            totals = torch.zeros(3, device=device)  # loss sum, correct, count (this rank)
            with report.epoch(epoch + 1, len(batches)) as show:
                for i, mine in enumerate(batches):
                    x = to_float(augment(train_data.x[mine], spec.flip, aug))
                    y = train_data.y[mine]
                    loss, correct = train_step(model, attack_model, update_model, optimizer, x, y, cfg, part_phase)
                    totals += torch.stack([loss * len(y), correct, torch.tensor(len(y), device=device)])
                    if (i + 1) % 10 == 0 or i + 1 == len(batches):
                        t = totals.tolist()  # a device sync: only every 10 steps
                        if dist.world == 1 and not math.isfinite(t[0]):
                            raise FloatingPointError
                        show(i + 1, t[0] / t[2], t[1] / t[2])
            t = _reduce(totals, dist).tolist()
            if not math.isfinite(t[0]):
                raise FloatingPointError
            train_seconds = time.perf_counter() - t0
            metrics = {"epoch": epoch + 1, "phase": phase, "lr": lr, "train_loss": t[0] / t[2], "train_acc": t[1] / t[2]}
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                metrics.update(evaluate(model, test_data, 2 * cfg.batch_size, levels(EVAL_EPS), levels(EVAL_STEP), EVAL_STEPS, dist))
            seconds = time.perf_counter() - t0
            metrics.update(seconds=seconds, train_seconds=train_seconds, img_per_s=t[2] / train_seconds)
            improved = metrics.get("pgd20") is not None and (best["pgd20"] is None or metrics["pgd20"] > best["pgd20"])
            if improved:
                best = {"pgd20": metrics["pgd20"], "natural": metrics["natural"], "epoch": epoch + 1}
            if dist.main:
                with stop_signals_deferred():
                    meta = {**meta_base, "epoch": epoch + 1, "metrics": metrics, "best": best}
                    save_checkpoint(last, model, meta)
                    save_resume_state(state_path, optimizer, epoch + 1, best)
                    if improved:
                        save_checkpoint(out / "best.safetensors", model, meta)
                    _append_metrics(metrics_path, metrics, epoch)
            completed = epoch + 1
            report.row(metrics)
    except KeyboardInterrupt:
        done = f"{last} holds epoch {completed}" if completed else "no epoch finished, nothing was saved"
        raise CliError(f"interrupted in epoch {completed + 1}: {done}. Continue with: python part.py train --out {out} --resume", code=130) from None
    except FloatingPointError:
        kept = f"{last} keeps epoch {completed}" if completed else "no checkpoint was written"
        raise CliError(f"the training loss became NaN/inf in epoch {epoch + 1}; stopped ({kept}). Try a lower --lr", code=3) from None
    if dist.main and metrics:
        b = f"best PGD-20 {fmt_pct(best['pgd20'])}% at epoch {best['epoch']} ({out / 'best.safetensors'})" if best["epoch"] else ""
        report.print(f"done: {last} {b}")
    return metrics


def _append_metrics(path: Path, metrics: dict, epoch: int) -> None:
    """Append one JSON line; rows past `epoch` (from an interrupted run) are dropped first."""
    rows = []
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["epoch"] <= epoch]
    rows.append(json.dumps(metrics))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(rows) + "\n")
    os.replace(tmp, path)


# ============================================================================ CAM figures
# A PNG grid written with torch and Pillow (torchvision's own image library) only.

TILE_PAD, HEADER_PX, CAPTION_PX = 2, 14, 14


def overlay(x: Tensor, heat: Tensor, alpha: float = 0.5) -> Tensor:
    """The CAM [B,1,H,W] in [0,1] coloured with jet over the image."""
    return (1 - alpha) * x + alpha * jet(heat)


def budget_picture(budget: Tensor, eps: float, eps_low: float, like: Tensor) -> Tensor:
    """Black = eps_low, white = eps; a per-channel (official) map shows in colour."""
    return ((budget - eps_low) / max(eps - eps_low, 1e-12)).clamp(0, 1).expand_as(like)


def perturbation_picture(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """delta magnified so that +-eps spans the whole range (grey = 0)."""
    return (0.5 + (x_adv - x) / (2 * eps)).clamp(0, 1)


def figure_size(n: int, columns: int, image_size: int, scale: int) -> tuple[int, int]:
    """(width, height) in pixels of a figure with n rows."""
    tile = image_size * scale
    return TILE_PAD + columns * (tile + TILE_PAD), HEADER_PX + n * (tile + CAPTION_PX)


def save_figure(path: Path, columns: list[tuple[str, Tensor]], captions: list[str], scale: int) -> tuple[int, int]:
    """Columns of [N,3,H,W] tiles in [0,1] (upscaled `scale` x), a caption under each row."""
    from PIL import Image, ImageDraw

    n, _, h, _ = columns[0][1].shape
    width, height = figure_size(n, len(columns), h, scale)
    tile = h * scale
    canvas = torch.ones(3, height, width)
    for j, (_, pictures) in enumerate(columns):
        big = F.interpolate(pictures.float().cpu(), scale_factor=scale, mode="nearest")
        left = TILE_PAD + j * (tile + TILE_PAD)
        for i in range(n):
            top = HEADER_PX + i * (tile + CAPTION_PX)
            canvas[:, top:top + tile, left:left + tile] = big[i]
    image = Image.fromarray((canvas * 255).round().byte().permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(image)
    for j, (title, _) in enumerate(columns):
        draw.text((TILE_PAD + j * (tile + TILE_PAD) + 2, 1), title, fill=(0, 0, 0))
    for i, caption in enumerate(captions):
        draw.text((TILE_PAD + 2, HEADER_PX + i * (tile + CAPTION_PX) + tile + 1), caption, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return width, height


# ============================================================================ commands

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="PART: pixel-reweighted adversarial training, evaluation and export. Budgets in 1/255 levels.")


@contextlib.contextmanager
def cli_errors():
    """Bad input ends in one line on stderr and a non-zero exit, never a traceback."""
    try:
        yield
    except CliError as e:
        err_console.print(f"error: {e}", markup=False)
        raise typer.Exit(e.code) from None
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise typer.Exit(130) from None
    except OSError as e:  # a folder that is a file, no permission, a full disk: writes are atomic, nothing is lost
        where = f": {e.filename}" if e.filename else ""
        err_console.print(f"error: {e.strerror or first_line(e)}{where}", markup=False)
        raise typer.Exit(1) from None


def _opt(help: str, *names: str, **kw):
    return typer.Option(*names, help=help, **kw)


@app.command()
def train(
    preset: Annotated[Optional[str], _opt("Preset in the config file (default: the dataset's name, else cifar10).")] = None,
    config: Annotated[Optional[Path], _opt("Preset file (default: configs.toml beside part.py).")] = None,
    dataset: Annotated[Optional[str], _opt("cifar10|cifar100|svhn|tinyimagenet|imagefolder|synthetic")] = None,
    data_dir: Annotated[Optional[str], _opt("Dataset folder (torchvision copies download here when possible).")] = None,
    cache_dir: Annotated[Optional[str], _opt("Where decoded image folders are cached (default ~/.cache/part).")] = None,
    image_size: Annotated[Optional[int], _opt("Image side for --dataset imagefolder.")] = None,
    model: Annotated[Optional[str], _opt("resnet18|preact-resnet18|wrn-34-10|cnn")] = None,
    method: Annotated[Optional[str], _opt("at (uniform budget) | part (pixel-reweighted after warm-up)")] = None,
    loss: Annotated[Optional[str], _opt("ce | trades (part: PART-T) | mart (part: PART-M)")] = None,
    beta: Annotated[Optional[float], _opt("TRADES/MART weight (default 6).")] = None,
    generator: Annotated[Optional[str], _opt("How training AEs are made: pgd | mma")] = None,
    cam: Annotated[Optional[str], _opt("gradcam|xgradcam|layercam")] = None,
    mask_rule: Annotated[Optional[str], _opt("zscore (paper) | official (authors' code) | random | uniform")] = None,
    eps: Annotated[Optional[str], _opt("Full budget, 1/255 levels: 8 or 8/255.")] = None,
    eps_low: Annotated[Optional[str], _opt("Budget of the unimportant pixels, 1/255 levels.")] = None,
    step: Annotated[Optional[str], _opt("Attack step, 1/255 levels.")] = None,
    steps: Annotated[Optional[int], _opt("Attack steps in training.")] = None,
    epochs: Annotated[Optional[int], _opt("Total epochs (warm-up included).")] = None,
    warmup_epochs: Annotated[Optional[int], _opt("Epochs of the base method at uniform eps before PART.")] = None,
    batch_size: Annotated[Optional[int], _opt("Global batch size (split across processes under torchrun).")] = None,
    lr: Annotated[Optional[float], _opt("SGD learning rate.")] = None,
    momentum: Annotated[Optional[float], _opt("SGD momentum.")] = None,
    weight_decay: Annotated[Optional[float], _opt("SGD weight decay.")] = None,
    lr_milestones: Annotated[Optional[str], _opt("Global epochs where lr *= gamma, e.g. 79 or 60,75.")] = None,
    lr_gamma: Annotated[Optional[float], _opt("LR decay factor.")] = None,
    train_subset: Annotated[Optional[int], _opt("Train on the first N images (0: all).")] = None,
    eval_subset: Annotated[Optional[int], _opt("Evaluate on the first N test images (0: all).")] = None,
    eval_every: Annotated[Optional[int], _opt("Evaluate every N epochs (and after the last).")] = None,
    out: Annotated[Optional[str], _opt("Run folder (default runs/<preset>-<method>-<timestamp>).")] = None,
    resume: Annotated[bool, _opt("Continue the run in --out exactly where it stopped.")] = False,
    seed: Annotated[Optional[int], _opt("Random seed.")] = None,
    device: Annotated[Optional[str], _opt("auto|cpu|cuda")] = None,
    compile: Annotated[Optional[bool], _opt("torch.compile the attack and update (default: on with CUDA).", "--compile/--no-compile")] = None,
    amp: Annotated[Optional[bool], _opt("bf16 autocast for the training attack and update (CUDA only).", "--amp/--no-amp")] = None,
    sync_bn: Annotated[Optional[bool], _opt("SyncBatchNorm across processes (torchrun).", "--sync-bn/--no-sync-bn")] = None,
):
    """Train a PART (or plain AT) model; writes last/best checkpoints and metrics.jsonl.

    Settings come from the preset (configs.toml), then the options given here. Launch with
    torchrun for several GPUs/processes: --batch-size stays the global batch."""
    overrides = dict(dataset=dataset, data_dir=data_dir, cache_dir=cache_dir, image_size=image_size, model=model, method=method,
                     loss=loss, beta=beta, generator=generator, cam=cam, mask_rule=mask_rule, eps=eps, eps_low=eps_low, step=step,
                     steps=steps, epochs=epochs, warmup_epochs=warmup_epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                     weight_decay=weight_decay, lr_milestones=lr_milestones, lr_gamma=lr_gamma, train_subset=train_subset,
                     eval_subset=eval_subset, eval_every=eval_every, out=out, seed=seed, device=device, compile=compile, amp=amp,
                     sync_bn=sync_bn)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's stop is handled like Ctrl-C
    try:
        with cli_errors():
            _train(overrides, preset, config, resume, out)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _train(overrides: dict, preset: Optional[str], config: Optional[Path], resume: bool, out: Optional[str]) -> None:
    """The train command once its options are collected: config, run folder, process group."""
    dist = dist_from_env()
    if resume:
        if not out:
            raise CliError("--resume needs --out DIR, the run folder to continue")
        cfg, preset_name = resume_config(Path(out), overrides)
    else:
        cfg, preset_name = resolve_config(overrides, preset, config)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(cfg.out or f"runs/{preset_name}-{cfg.method}-{stamp}")
    if dist.main:
        check_out_dir(out_dir, resume)
    cfg.out = str(out_dir)
    if cfg.batch_size < 2 * dist.world:
        raise CliError(f"--batch-size {cfg.batch_size} is too small for {dist.world} processes (at least 2 each)")
    with process_group(dist, run_device(cfg, dist)):
        run_training(cfg, preset_name, out_dir, resume, dist)


def test_set_of(meta: dict, dataset: Optional[str]) -> tuple[str, int]:
    """(dataset, image side) to evaluate a checkpoint on: --dataset, else its own, else cifar10."""
    name = dataset or meta.get("dataset") or "cifar10"
    if name not in DATASETS:
        raise CliError(f"unknown dataset {name!r} (choose from {', '.join(DATASETS)})")
    return name, meta.get("image_size") or DATASETS[name].image_size or 32


def check_fits(meta: dict, data: Split, name: str, data_dir: str) -> None:
    if len(data.classes) != meta["num_classes"]:
        raise CliError(f"the model predicts {meta['num_classes']} classes but {name} in {data_dir} has {len(data.classes)}")
    if meta.get("classes") and list(meta["classes"]) != list(data.classes):
        raise CliError(f"the model's classes ({', '.join(meta['classes'][:4])}, ...) differ from those of {name} in {data_dir}")


def parse_attacks(text: str) -> list[str]:
    names = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in names if a not in SUITE]
    if unknown or not names:
        raise CliError(f"unknown attack {', '.join(unknown) or repr(text)} (choose from {', '.join(SUITE)})")
    if "aa" in names and importlib.util.find_spec("pyautoattack") is None:
        raise CliError("the aa attack needs the optional package pyautoattack: pip install pyautoattack")
    return list(dict.fromkeys(["natural", *names]))


@contextlib.contextmanager
def attack_progress():
    """A bar per attack on a terminal (points attacked so far); nothing otherwise."""
    if not console.is_terminal:
        yield lambda name, done, total: None
        return
    columns = (TextColumn("{task.description:>11}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        tasks: dict[str, Any] = {}

        def show(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = progress.add_task(name, total=total)
            progress.update(tasks[name], completed=done)

        yield show


@app.command()
def attack(
    checkpoints: Annotated[list[Path], typer.Argument(help="Checkpoints: ours (.safetensors) or foreign state dicts with --arch.", show_default=False)],
    attacks: Annotated[str, _opt(f"Comma-separated, from {','.join(SUITE)} (natural is always run).")] = "natural,fgsm,pgd20,cw20,mma",
    dataset: Annotated[Optional[str], _opt("Dataset (default: the checkpoint's, else cifar10).")] = None,
    data_dir: Annotated[str, _opt("Dataset folder (only the test split is read).")] = "data",
    cache_dir: Annotated[str, _opt("Cache of decoded image folders.")] = "~/.cache/part",
    arch: Annotated[Optional[str], _opt("Architecture of foreign state dicts: resnet18|preact-resnet18|wrn-34-10|cnn")] = None,
    n_examples: Annotated[Optional[int], _opt("The first N test images in canonical order (default: all).", min=1)] = None,
    batch_size: Annotated[int, _opt("Batch size.", min=1)] = 256,
    eps: Annotated[str, _opt("L-inf budget, 1/255 levels (8 or 8/255).")] = "8",
    step: Annotated[str, _opt("PGD/CW/MMA step, 1/255 levels.")] = "2",
    restarts: Annotated[int, _opt("Random restarts of pgd20/cw20/pgd20-part (worst case kept).", min=1)] = 1,
    eps_low: Annotated[Optional[str], _opt("pgd20-part: low budget (default: the checkpoint's, else 7).")] = None,
    per_class: Annotated[bool, _opt("Also report accuracy per class.")] = False,
    json_out: Annotated[Optional[Path], _opt("Write the report as JSON here.", "--json")] = None,
    seed: Annotated[int, _opt("Random seed (each attack starts from it).")] = 0,
    device: Annotated[str, _opt("auto|cpu|cuda")] = "auto",
):
    """Robust accuracy of checkpoints on the first N test images: a table, optionally JSON.

    Standard protocol: inputs in [0, 1], eval mode, fp32; each attack runs on the points the
    model gets right; `worst` counts a point robust only if no attack broke it."""
    with cli_errors():
        names = parse_attacks(attacks)
        dev = pick_device(device)
        eps_v, step_v = levels(parse_levels(eps, "eps")), levels(parse_levels(step, "step"))
        if not 0 < eps_v <= 1 or step_v <= 0:
            raise CliError(f"--eps must be in (0, 255] and --step positive (got {eps} and {step})")
        reports, table = [], Table(title=f"accuracy (%) at eps {parse_levels(eps, 'eps'):g}/255")
        for col in ["checkpoint", "arch", "n", *names, "worst"]:
            table.add_column(col, justify="left" if col in ("checkpoint", "arch") else "right")
        datasets: dict = {}
        for path in checkpoints:
            model, meta = load_checkpoint(path, arch, dev)
            model = channels_last(model)
            trained = meta.get("config") or {}
            low = parse_levels(eps_low, "eps_low") if eps_low is not None else trained.get("eps_low", 7.0)
            setup = AttackSetup(eps_v, step_v, restarts, seed, batch_size, levels(low),
                                trained.get("cam", "gradcam"), trained.get("mask_rule", "zscore"))
            key = test_set_of(meta, dataset)
            if key not in datasets:
                datasets[key] = load_split(key[0], "test", data_dir, cache_dir, key[1])
            data = datasets[key]
            check_fits(meta, data, key[0], data_dir)
            n = n_examples or len(data.y)
            if n > len(data.y):
                raise CliError(f"--n-examples {n} is more than the {len(data.y)} test images of {key[0]} in {data_dir}")
            points = data.first(n).to(dev)
            for warning in sanity_warnings(model, to_float(points.x[:batch_size]), points.y[:batch_size]):
                err_console.print(f"warning: {path}: {warning}", markup=False)
            with attack_progress() as show:
                result = evaluate_suite(model, points, names, setup, show)
            console.print(f"{path}: " + ", ".join(f"{a} {fmt_pct(result['accuracy'][a])}% ({result['seconds'][a]:.1f} s)" for a in names)
                          + f", worst {fmt_pct(result['accuracy']['worst'])}%", markup=False)
            row = {"path": str(path), "arch": meta["arch"], "dataset": key[0], "n_examples": n, "eps": eps_v,
                   "eps_levels": parse_levels(eps, "eps"), "step": step_v, "restarts": restarts, "seed": seed, **result}
            if not per_class:
                row.pop("per_class")
            reports.append(row)
            table.add_row(str(path), meta["arch"], str(n), *[fmt_pct(result["accuracy"][a]) for a in [*names, "worst"]])
        console.print(table)
        if per_class:
            for row in reports:
                pc = Table(title=f"per class: {row['path']}")
                for col in ["class", *names, "worst"]:
                    pc.add_column(col, justify="left" if col == "class" else "right")
                for cls, acc in row["per_class"].items():
                    pc.add_row(cls, *[fmt_pct(acc[a]) for a in [*names, "worst"]])
                console.print(pc)
        if json_out is not None:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps({"checkpoints": reports}, indent=2) + "\n")


def parse_formats(text: str) -> list[str]:
    names = EXPORT_FORMATS if text == "all" else tuple(f.strip() for f in text.split(",") if f.strip())
    unknown = [f for f in names if f not in EXPORT_FORMATS]
    if unknown or not names:
        raise CliError(f"unknown export format {', '.join(unknown) or repr(text)} (choose from {', '.join(EXPORT_FORMATS)}, all)")
    return list(dict.fromkeys(names))


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Our .safetensors checkpoint, or a foreign state dict with --arch.", show_default=False)],
    format: Annotated[str, _opt("torchscript|onnx|pt2|all (or a comma-separated list).")] = "all",
    out: Annotated[Path, _opt("Output folder.")] = Path("export"),
    batch_size: Annotated[int, _opt("Batch size of the example input (the batch dimension stays dynamic).", min=2)] = 2,
    opset: Annotated[int, _opt("ONNX opset.", min=18)] = 18,
    verify: Annotated[bool, _opt("Run every exported file on a batch of another size and compare with PyTorch.", "--verify/--no-verify")] = True,
    arch: Annotated[Optional[str], _opt("Architecture of a foreign state dict: resnet18|preact-resnet18|wrn-34-10|cnn")] = None,
    image_size: Annotated[Optional[int], _opt("Input side (default: the checkpoint's, else 32).", min=8)] = None,
):
    """Export a checkpoint for deployment: TorchScript, ONNX and/or torch.export (.pt2),
    with <name>.json beside them (input contract, classes, training config, accuracy)."""
    with cli_errors():
        formats = parse_formats(format)
        model, meta = load_checkpoint(checkpoint, arch, "cpu")
        size = image_size or meta.get("image_size") or 32
        card = model_card(meta, size)
        example = torch.rand(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
        name = checkpoint.name.split(".")[0]
        if out.exists() and not out.is_dir():
            raise CliError(f"--out {out} is a file, not a folder")
        out.mkdir(parents=True, exist_ok=True)
        files: dict[str, Path] = {}
        for fmt in formats:
            path = out / f"{name}{SUFFIX[fmt]}"
            try:
                if fmt == "torchscript":
                    export_torchscript(model, example, path)
                elif fmt == "onnx":
                    export_onnx(model, example, path, opset, card)
                else:
                    export_pt2(model, example, path)
            except Exception as e:  # exporters fail in many ways; each is reported in one line
                if fmt == "torchscript":
                    err_console.print(f"torchscript: skipped, this PyTorch refuses it ({first_line(e)})", markup=False)
                    continue
                raise CliError(f"{fmt} export failed: {first_line(e)}") from None
            files[fmt] = path
            console.print(f"{fmt}: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
        card["files"] = {fmt: p.name for fmt, p in files.items()}
        sidecar = out / f"{name}.json"
        sidecar.write_text(json.dumps(card, indent=2) + "\n")
        console.print(f"model card: {sidecar}")
        if verify and files:
            check_exports(model, files, batch_size + 3, size)


def check_exports(model: nn.Module, files: dict[str, Path], batch: int, size: int, tolerance: float = 1e-4) -> None:
    """Each file against the PyTorch model on a random batch of another size than the export's."""
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    table, failed = Table(title=f"export check: batch of {batch}, max |diff| <= {tolerance:g}, same argmax"), []
    for col in ("format", "file", "max |diff|", "argmax", "result"):
        table.add_column(col)
    for fmt, path in files.items():
        try:
            with torch.no_grad():
                got = run_exported(fmt, path, x).float()
            diff = (got - ref).abs().max().item() if got.shape == ref.shape else float("inf")
            same = got.shape == ref.shape and torch.equal(got.argmax(1), ref.argmax(1))
        except Exception as e:  # a file that does not even run is a failed check, not a crash
            diff, same = float("inf"), False
            err_console.print(f"{fmt}: {first_line(e)}", markup=False)
        ok = diff <= tolerance and same
        failed += [] if ok else [fmt]
        table.add_row(fmt, path.name, f"{diff:.2e}", "same" if same else "DIFFERENT", "ok" if ok else "FAILED")
    console.print(table)
    if failed:
        raise CliError(f"export check failed for {', '.join(failed)}")


@app.command()
def cam(
    checkpoint: Annotated[Path, typer.Argument(help="Our .safetensors checkpoint, or a foreign state dict with --arch.", show_default=False)],
    dataset: Annotated[Optional[str], _opt("Dataset (default: the checkpoint's, else cifar10).")] = None,
    data_dir: Annotated[str, _opt("Dataset folder (only the test split is read).")] = "data",
    cache_dir: Annotated[str, _opt("Cache of decoded image folders.")] = "~/.cache/part",
    arch: Annotated[Optional[str], _opt("Architecture of a foreign state dict.")] = None,
    n: Annotated[int, _opt("The first N test images.", min=1)] = 16,
    cam_method: Annotated[Optional[str], _opt("gradcam|xgradcam|layercam (default: the checkpoint's).", "--cam")] = None,
    mask_rule: Annotated[Optional[str], _opt("zscore|official|random|uniform (default: the checkpoint's).")] = None,
    compare_rules: Annotated[bool, _opt("Add a budget-map column per rule (zscore, official, random).")] = False,
    eps: Annotated[Optional[str], _opt("Full budget, 1/255 levels (default: the checkpoint's, else 8).")] = None,
    eps_low: Annotated[Optional[str], _opt("Low budget, 1/255 levels (default: the checkpoint's, else 7).")] = None,
    step: Annotated[str, _opt("Attack step, 1/255 levels.")] = "2",
    steps: Annotated[int, _opt("Attack steps for the PART adversarial example.", min=1)] = 10,
    scale: Annotated[int, _opt("Upscaling of every tile.", min=1, max=16)] = 4,
    out: Annotated[Path, _opt("PNG to write.")] = Path("cams.png"),
    seed: Annotated[int, _opt("Random seed (random rule, attack start).")] = 0,
    device: Annotated[str, _opt("auto|cpu|cuda")] = "auto",
):
    """What PART protects: image, CAM, budget map and a PART adversarial example per row."""
    with cli_errors():
        from PIL import Image

        if out.is_dir() or out.suffix.lower() not in Image.registered_extensions():
            raise CliError(f"--out {out} is not an image file name (e.g. cams.png)")
        dev = pick_device(device)
        model, meta = load_checkpoint(checkpoint, arch, dev)
        model = channels_last(model)
        trained = meta.get("config") or {}
        method = cam_method or trained.get("cam", "gradcam")
        rule = mask_rule or trained.get("mask_rule", "zscore")
        for key, value in (("cam", method), ("mask_rule", rule)):
            _coerce(key, value, "command line")
        hi = levels(parse_levels(eps, "eps") if eps is not None else trained.get("eps", 8.0))
        lo = levels(parse_levels(eps_low, "eps_low") if eps_low is not None else trained.get("eps_low", 7.0))
        if not 0 <= lo <= hi:
            raise CliError(f"eps-low ({lo * 255:g}/255) must be between 0 and eps ({hi * 255:g}/255)")
        name, size = test_set_of(meta, dataset)
        data = load_split(name, "test", data_dir, cache_dir, size)
        check_fits(meta, data, name, data_dir)
        if n > len(data.y):
            raise CliError(f"--n {n} is more than the {len(data.y)} test images")
        points = data.first(n).to(dev)
        x, y = to_float(points.x), points.y
        torch.manual_seed(seed)
        low_res = class_activation(model, x, method)
        maps = {r: eps_map(low_res, hi, lo, r, size=x.shape[-2:]) for r in MASK_RULES}
        x_adv = pgd(model, x, y, maps[rule], levels(parse_levels(step, "step")), steps)
        with torch.no_grad():
            pred, adv_pred = model(x).argmax(1), model(x_adv).argmax(1)
        heat = upsample(low_res, x.shape[-2:]).clamp(0, 1)
        shown = ("zscore", "official", "random") if compare_rules else (rule,)
        columns = [("image", x), (f"{method}", overlay(x, heat))]
        columns += [(f"budget {r}", budget_picture(maps[r], hi, lo, x)) for r in shown]
        columns += [("PART AE", x_adv), ("delta x eps", perturbation_picture(x_adv, x, hi))]
        names = data.classes
        captions = [f"true {names[int(a)]} | pred {names[int(b)]} | adv {names[int(c)]}" for a, b, c in zip(y, pred, adv_pred)]
        width, height = save_figure(out, columns, captions, scale)
        table = Table(title=f"budget maps of {n} images ({method}, eps {hi * 255:g}/255, eps_low {lo * 255:g}/255)")
        for col in ("rule", "share at eps", "mean budget (/255)"):
            table.add_column(col, justify="left" if col == "rule" else "right")
        for r, m in maps.items():
            full = (m == torch.tensor(hi, dtype=m.dtype, device=m.device)).float().mean().item()
            table.add_row(r, f"{100 * full:.1f}%", f"{m.mean().item() * 255:.3f}")
        console.print(table)
        console.print(f"wrote {out} ({width}x{height} px)")


@app.command()
def bench(
    model: Annotated[str, _opt("resnet18|preact-resnet18|wrn-34-10|cnn")] = "resnet18",
    batch_size: Annotated[int, _opt("Batch size.", min=2)] = 128,
    image_size: Annotated[int, _opt("Input side.", min=8)] = 32,
    steps: Annotated[int, _opt("Attack steps (training uses 10).", min=1)] = 10,
    iters: Annotated[int, _opt("Timed repetitions of each piece.", min=1)] = 5,
    device: Annotated[str, _opt("auto|cpu|cuda")] = "auto",
    compile: Annotated[Optional[bool], _opt("torch.compile the attack and update (default: on with CUDA).", "--compile/--no-compile")] = None,
    amp: Annotated[bool, _opt("bf16 autocast for the attack and update (CUDA only).", "--amp/--no-amp")] = False,
    json_out: Annotated[Optional[Path], _opt("Write the figures as JSON here.", "--json")] = None,
):
    """Images per second of each piece of a PART training step on this machine (random data)."""
    with cli_errors():
        dev = pick_device(device)
        use_compile = compile if compile is not None else dev.type == "cuda"
        torch.manual_seed(0)
        net = channels_last(build_model(model, 10).to(dev))
        x = torch.rand(batch_size, 3, image_size, image_size, device=dev)
        y = torch.randint(0, 10, (batch_size,), device=dev)
        cfg = TrainConfig(model=model, steps=steps, amp=amp)
        attack_model = torch.compile(net) if use_compile else net
        update_model = torch.compile(MultiInput(net)) if use_compile else MultiInput(net)
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)
        cam = class_activation(net, x)
        budget = eps_map(cam, levels(8), levels(7), size=x.shape[-2:])

        def forward():
            with torch.no_grad(), eval_mode(net):
                net(x)

        pieces = {
            "forward (eval, no grad)": forward,
            "CAM (gradcam)": lambda: class_activation(net, x),
            "budget map (zscore)": lambda: eps_map(cam, levels(8), levels(7), size=x.shape[-2:]),
            f"PGD-{steps} attack": lambda: pgd(attack_model, x, y, budget, levels(2), steps),
            "AT step (attack + update)": lambda: train_step(net, attack_model, update_model, optimizer, x, y, cfg, False),
            "PART step (CAM + map + attack + update)": lambda: train_step(net, attack_model, update_model, optimizer, x, y, cfg, True),
        }
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        table = Table(title=f"{model}, batch {batch_size}, {image_size}px, {name}, compile {'on' if use_compile else 'off'}, amp {'on' if amp else 'off'}")
        table.add_column("piece")
        table.add_column("ms / batch", justify="right")
        table.add_column("images / s", justify="right")
        results = {}
        for label, fn in pieces.items():
            with autocast(dev, amp and label.startswith("PGD")):  # train_step applies cfg.amp itself
                for _ in range(2):  # warm-up (compilation, allocator, kernel selection)
                    fn()
                sync()
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn()
                sync()
            seconds = (time.perf_counter() - t0) / iters
            results[label] = {"ms_per_batch": 1000 * seconds, "images_per_s": batch_size / seconds}
            table.add_row(label, f"{1000 * seconds:.1f}", f"{batch_size / seconds:.0f}")
        console.print(table)
        if json_out is not None:
            info = {"model": model, "batch_size": batch_size, "image_size": image_size, "device": name,
                    "compile": use_compile, "amp": amp, "torch": torch.__version__, "results": results}
            json_out.write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    app()
