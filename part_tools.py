"""part_tools: what goes beyond the card. `part.py` is the method and its three commands
(train, attack, export); this module adds the tools a researcher uses around them:

    python part.py report runs/*/ eval/*.json --compare method=part method=at
    python part.py cam runs/X/best.safetensors --data-dir DIR --out cam.png
    python part.py bench --model resnet18
    python part.py attack CKPT --sweep --save-adv adv/ --json r.json   # attack's tool options

It imports `part`, adds its commands to `part.app` and its options to the card's `attack`
and `export`; `part.py` never imports it except when run as a program (its `__main__` block
and the `part` command), so `import part` stays the card alone. Optional packages
(matplotlib, timm, robustbench, huggingface_hub, wandb, tensorboard) are imported where used.

Sections: the card's commands extended, timm models (timm:NAME), RobustBench models
(robustbench:NAME), model folders (export --format hf), trackers (TensorBoard, W&B), attack's
tools (sweeps, saved and replayed examples, the resumable evaluation state), leaderboard entry
(leaderboard), comparing runs (report), CAM figures (cam), benchmark (bench).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import importlib.util
import inspect
import json
import math
import os
import sys
import time
import typing
import warnings
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import typer
from rich.markup import escape as escape_markup
from rich.table import Table

import part
from part import app, Arch, ARCH_HELP, atomic_write, _attack_row, AttackRequest, AttackSetup
from part import AttackSpec, autocast, budget_for, build_model, CacheDir, CAM_METHODS, CamLayer
from part import channels_last, check_budget, check_output, Checkpoint, CheckpointMeta
from part import class_activation, _class_activation, cli_errors, CliError, COMPILE_MODES
from part import CONFIG_FIELDS, console, cpu_bf16, cpu_model, csv_text, DataDir, DatasetOpt
from part import DEFAULT_CACHE, DEFAULT_STEP_LEVELS, Device, device_name, _eps_map, eps_map
from part import eval_mode, EvalHooks, EvalTarget, first_line, fmt_pct, FORMAT, fraction
from part import from_levels, full_fp32, HF_WEIGHTS, IMAGENET_MEAN, IMAGENET_STD, jet, JsonOut
from part import load_for_eval, machine, make_adversarial, MASK_RULES, MAX_IMAGE_SIZE
from part import NOT_THE_EXPERIMENT, note, ONE_PROCESS, _opt, parse_levels, PART_ONLY, PENDING
from part import per_class_accuracy, pgd, pick_device, PointFlags, predict, pyplot
from part import require_file, ROBUSTBENCH, RunFiles, safetensors_metadata, save_checkpoint
from part import save_figure_png, save_tensors, Seed, set_threads, Split, Tensor, tensors_of
from part import text_table, Threads, to_float, to_levels, TOKEN_FAMILIES, train_step, TrainConfig
from part import TrainingModules, unknown, upsample, versions, wrap_for_training, write_bytes
from part import write_json, write_text


# ============================================================================ the card's commands, extended
# This module's options for `attack` and `export` are added to the card's own, in the help's
# panel "With part_tools"; the command then takes the card's place in part.app.

TOOLS_PANEL = "With part_tools"
SWEEP_STEPS, SWEEP_RESTARTS = "10,20,50,100,200", "1,2,4"


def _in_tools_panel(annotation: Any) -> Any:
    """An Annotated option shown in the help's panel of this module's options."""
    base, *infos = typing.get_args(annotation)
    infos = [copy.copy(info) for info in infos]  # the same option type may serve elsewhere
    for info in infos:
        info.rich_help_panel = TOOLS_PANEL
    return Annotated[(base, *infos)]


def extend_command(name: str, options: Callable, run: Callable, doc: str = "") -> None:
    """The card's command `name` with the parameters of `options` added after its own (typer
    reads a command's options from its signature); `run(the card's options, these)` carries
    it out."""
    info = next(c for c in app.registered_commands if c.name == name)
    card, extra = info.callback, inspect.signature(options, eval_str=True).parameters

    def command(**given):
        tools = {k: given.pop(k) for k in extra}
        run(given, tools)

    kw = inspect.Parameter.KEYWORD_ONLY
    params = [*inspect.signature(card, eval_str=True).parameters.values()]
    params += [p.replace(kind=kw, annotation=_in_tools_panel(p.annotation)) for p in extra.values()]
    command.__doc__ = card.__doc__ + doc
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    info.callback = command


# ============================================================================ timm models
# `timm:NAME` (train --model, --arch, --init): added to part's ZOO_BUILDERS.


def timm_zoo(name: str, num_classes: int, image_size: int) -> tuple:
    """The model, its own input normalisation and its stages (the last one the CAM's first
    choice). Transformers are built for the image size (their position embeddings depend on
    it)."""
    try:
        import timm
    except ImportError:
        raise CliError("timm:NAME needs the timm package: pip install timm") from None
    if not timm.is_model(name):
        raise CliError(
            f"unknown timm model {name!r} (e.g. resnet18, convnext_atto, mobilenetv3_small_050, "
            "efficientnet_b0; timm.list_models() lists them)"
        )
    try:
        net = timm.create_model(
            name,
            pretrained=False,
            num_classes=num_classes,
            **({"img_size": image_size} if name.startswith(TOKEN_FAMILIES) else {}),
        )
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise CliError(
            f"timm model {name!r} cannot be built for {image_size} px images ({first_line(e)})"
        ) from None
    cfg = getattr(net, "pretrained_cfg", None) or {}
    mean, std = tuple(cfg.get("mean") or IMAGENET_MEAN), tuple(cfg.get("std") or IMAGENET_STD)
    if len(mean) != 3 or len(std) != 3:
        raise CliError(
            f"timm model {name!r} does not take RGB images (its normalisation has {len(mean)} channels)"
        )
    stages = [
        f["module"]
        for f in getattr(net, "feature_info", [])
        if isinstance(f, dict) and f.get("module")
    ]
    return net, mean, std, stages, stages[-1] if stages else None


part.ZOO_BUILDERS["timm"] = timm_zoo


# ============================================================================ RobustBench models
# `robustbench:NAME` (train --init/--model, attack, export, cam): the architecture built by the
# robustbench package (added to part's ZOO_BUILDERS), the weights from RobustBench's own folder
# layout (part's NAMED_CHECKPOINTS); `--threat` and `--model-dir` say where.

Threat = Annotated[str, _opt("Threat model of a robustbench:NAME model: linf, l2 or corruptions.")]
ModelDir = Annotated[
    str, _opt("RobustBench's model folder (its layout: DIR/<dataset>/<Threat>/<NAME>.pt).")
]


RB_THREATS = {
    "linf": "Linf",
    "l2": "L2",
    "corruptions": "corruptions",
}  # ours -> RobustBench's names


RB_DATASETS = ("cifar10", "cifar100")  # the RobustBench data sets that are ours too


def robustbench_arch(text: str, dataset: Optional[str], threat: str = "linf") -> str:
    """robustbench:NAME with the data set and threat model it belongs to, as one name that
    checkpoints keep: robustbench:<dataset>/<Threat>/<NAME>."""
    name = text[len(ROBUSTBENCH) :]
    if name.count("/") == 2:
        return text
    if threat.lower() not in RB_THREATS:
        raise unknown("threat model", threat, RB_THREATS)
    dataset = dataset or "cifar10"
    if dataset not in RB_DATASETS:
        raise CliError(
            f"robustbench:{name}: RobustBench models here are for {' and '.join(RB_DATASETS)}, not {dataset}"
        )
    return f"{ROBUSTBENCH}{dataset}/{RB_THREATS[threat.lower()]}/{name}"


def robustbench_entry(dataset: str, threat: str, name: str) -> dict:
    """The robustbench package's zoo entry of a model (an unknown name said in one line)."""
    try:
        # its imports warn about torch.jit and pkg_resources deprecations
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if (
                importlib.util.find_spec("autoattack") is None
                and importlib.util.find_spec("pyautoattack") is not None
            ):
                # its PyPI name
                sys.modules.setdefault("autoattack", importlib.import_module("pyautoattack"))
            from robustbench.model_zoo import model_dicts
            from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    except ImportError as e:
        raise CliError(
            f"robustbench:NAME needs the robustbench package (pip install robustbench; {first_line(e)})"
        ) from None
    zoo = model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat)]
    if name not in zoo:
        raise CliError(
            f"unknown RobustBench model {name!r} for {dataset} {threat} (e.g. {', '.join(list(zoo)[-3:])})"
        )
    return zoo[name]


def robustbench_source(
    path: Path, arch: Optional[str], dataset: Optional[str], threat: str, model_dir: str | Path
) -> tuple[Path, Optional[str]]:
    """A checkpoint argument `robustbench:NAME`: the weights in RobustBench's own model folder
    layout (<model_dir>/<dataset>/<Threat>/<NAME>.pt) and the architecture; `--arch
    robustbench:NAME` with a file: the file and the architecture. Anything else: as given."""
    if str(path).startswith(ROBUSTBENCH):
        arch = robustbench_arch(str(path), dataset, threat)
        dataset, threat, name = arch[len(ROBUSTBENCH) :].split("/")
        robustbench_entry(dataset, threat, name)
        file = Path(model_dir, dataset, threat, f"{name}.pt")
        if not file.is_file():
            raise CliError(
                f"{arch}: its weights are not in {file} (RobustBench's layout under --model-dir; "
                f"`robustbench.utils.load_model({name!r}, {str(model_dir)!r}, {dataset!r}, {threat!r})` downloads them there)"
            )
        return file, arch
    if arch is not None and arch.startswith(ROBUSTBENCH):
        return path, robustbench_arch(arch, dataset, threat)
    return path, arch


def _robustbench_net(spec: str) -> nn.Module:
    """A RobustBench zoo architecture (random weights), built by the robustbench package."""
    if spec.count("/") != 2:
        raise CliError(
            f"robustbench:{spec}: give --dataset and --threat, or name it robustbench:<dataset>/<threat>/<name>"
        )
    return robustbench_entry(*spec.split("/"))["model"]()


def robustbench_zoo(name: str, num_classes: int, image_size: int) -> tuple:
    """RobustBench's architecture: it takes [0, 1] and normalises itself."""
    return _robustbench_net(name), (0.0,) * 3, (1.0,) * 3, None, None


part.ZOO_BUILDERS["robustbench"] = robustbench_zoo
part.NAMED_CHECKPOINTS[ROBUSTBENCH] = robustbench_source


def _export_tool_options(
    dataset: Annotated[
        Optional[str], _opt("Data set of a robustbench:NAME model (cifar10 or cifar100).")
    ] = None,
    threat: Threat = "linf",
    model_dir: ModelDir = "models",
    license: Annotated[
        str, _opt("License in the hf model card's front matter (an SPDX id or a Hub license name).")
    ] = "mit",
):
    """The options this module adds to `export` (typer reads them from this signature)."""


extend_command(
    "export",
    _export_tool_options,
    lambda card, t: part.export_with(
        card, (t["dataset"], t["threat"], t["model_dir"]), license=t["license"]
    ),
    " A checkpoint may be robustbench:NAME (its file in --model-dir).",
)


# ============================================================================ model folders
# `export --format hf`: a model folder in the layout people share on a model hub, its card
# written by huggingface_hub's own ModelCardData / EvalResult (the Hub parses what it wrote).

HF_METRIC_NAMES = {
    "natural": "natural accuracy",
    "pgd20": "PGD-20",
    "aa": "AutoAttack",
    "worst": "worst case over the attacks",
}


def export_hf(
    model: nn.Module,
    meta: CheckpointMeta,
    card: dict,
    out: Path,
    name: str,
    source: Path,
    license: str = "mit",
) -> Path:
    """model.safetensors (our checkpoint format: `attack`, `cam` and `export` load the folder
    itself; our checkpoint's own bytes, so its sha256 and the reports that name it still
    hold), config.json (architecture, classes, input contract) and README.md, a model card
    whose front matter carries the license, tags, data set and, from `export --report`, the
    attack results as `model-index` metrics (accuracy in %, at the report's eps and point
    count). Returns the card's path."""
    try:
        from huggingface_hub import EvalResult, ModelCardData
    except ImportError:
        raise CliError(
            "--format hf needs the huggingface_hub package: pip install huggingface_hub"
        ) from None
    if meta.format == FORMAT:
        source = source / HF_WEIGHTS if source.is_dir() else source
        write_bytes(out / HF_WEIGHTS, source.read_bytes())
    else:  # now self-describing
        save_checkpoint(out / HF_WEIGHTS, model, dataclasses.replace(meta, format=FORMAT))
    write_json(out / "config.json", _hf_config(meta, card))
    dataset = meta.dataset or "unknown"
    robustness = card.get("robustness") or {}
    n, eps = robustness.get("n_examples"), robustness.get("eps_levels")
    labels = {a: HF_METRIC_NAMES.get(a, a) for a in robustness.get("accuracy", {})}
    results = [
        EvalResult(
            task_type="image-classification",
            task_name="Image Classification",
            dataset_type=dataset,
            dataset_name=dataset,
            dataset_split="test",
            metric_type="accuracy",
            metric_name=f"{labels[attack]} (eps {eps:g}/255, {n} test images)",
            metric_value=round(100 * value, 2),
        )
        for attack, value in robustness.get("accuracy", {}).items()
    ]
    data = ModelCardData(
        license=license,
        library_name="part",
        pipeline_tag="image-classification",
        tags=["image-classification", "adversarial-robustness", "adversarial-training", "part"]
        + [meta.arch],
        datasets=[dataset] if meta.dataset else None,
        model_name=name,
        eval_results=results or None,
    )
    lines = [
        f"# {name}",
        "",
        f"A {meta.arch} image classifier for {dataset} ({meta.num_classes} classes), {_how(meta, name)}.",
        "",
    ]
    if results:
        lines += _hf_results(robustness, labels, dataset)
    lines += HF_USE
    path = out / "README.md"
    write_text(path, f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    return path


def _hf_results(robustness: dict, labels: dict[str, str], dataset: str) -> list[str]:
    """The card's lines on what `attack` ran and found (the report's own evaluation record)."""
    ran, n, eps = robustness["evaluation"], robustness["n_examples"], robustness["eps_levels"]
    kind = "the standard" if ran["standard"] else "not the standard"
    lines = [
        f"Evaluated by `part attack`: {', '.join(ran['attacks'])} on the first {n} {dataset} "
        f"test images at eps {eps:g}/255; {kind} evaluation (AutoAttack on 10,000 test "
        "images at 8/255).",
        "",
        f"| accuracy (%), eps {eps:g}/255, first {n} test images | |",
        "|---|---|",
    ]
    lines += [f"| {labels[a]} | {100 * v:.2f} |" for a, v in robustness["accuracy"].items()]
    return [*lines, ""]


def _hf_config(meta: CheckpointMeta, card: dict) -> dict:
    """The model folder's config.json: architecture, classes and the input contract."""
    classes = card["classes"]
    return {
        "library_name": "part",
        "architecture": meta.arch,
        "num_classes": meta.num_classes,
        "id2label": dict(enumerate(classes)),
        "label2id": {c: i for i, c in enumerate(classes)},
        "input": card["input"],
        "dataset": meta.dataset,
        "format": FORMAT,
        "training_config": card["config"],
        "cam_layer": meta.cam_layer,
        "checkpoint_sha256": card["checkpoint_sha256"],
        "robustness": card["robustness"],
        "versions": versions(),
    }


def _how(meta: CheckpointMeta, name: str) -> str:
    cfg = meta.config
    if cfg is None:
        return f"weights from {Path(meta.source or name).name}"
    method = (
        "pixel-reweighted adversarial training (PART, Zhang et al., ICML 2024)"
        if cfg.method == "part"
        else "adversarial training"
    )
    return f"trained with {method} ({cfg.loss} loss, eps {cfg.eps:g}/255) for {meta.epoch} epochs by `part`"


HF_USE = [
    "## Use",
    "",
    "Inputs: float32 RGB in [0, 1], shape [N, 3, H, W]; the model normalises inside.",
    "",
    "```bash",
    "python part.py attack MODEL_FOLDER --attacks natural,pgd20,aa   # this folder: evaluate it",
    "python part.py export MODEL_FOLDER --format onnx --out export  # or deploy it",
    "```",
    "",
    "```python",
    "import part",
    "model, meta = part.load_checkpoint('MODEL_FOLDER/model.safetensors')",
    "```",
    "",
]
part.FOLDER_EXPORTS["hf"] = export_hf


# ============================================================================ trackers
# train --tensorboard / --wandb and attack --wandb, added to part's TRACKERS: every figure is
# in the run's metrics.jsonl and summary.csv anyway; these copy them where people look.

TRACKED = ("train_loss", "train_acc", "natural", "pgd20", "lr", "img_per_s")


class TensorBoard:
    """train --tensorboard: the epoch's figures as scalars in runs/X/tensorboard."""

    def __init__(self, cfg: TrainConfig, files: RunFiles, preset: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(files.tensorboard))

    def log(self, metrics: dict, epoch: int) -> None:
        for key in TRACKED:
            if metrics.get(key) is not None:
                self.writer.add_scalar(key, metrics[key], epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def start_wandb(
    project: str, folder: Path, name: str, config: dict, job: str, run_id: Optional[str] = None
) -> Any:
    """A W&B run that writes under `folder` (resumed when `run_id` is given and known)."""
    import wandb

    folder.mkdir(parents=True, exist_ok=True)
    try:
        return wandb.init(
            project=project,
            dir=str(folder),
            name=name,
            config=config,
            job_type=job,
            id=run_id,
            resume="allow" if run_id else None,
            reinit="create_new",
        )
    except Exception as e:  # no login, no network, a bad project name: one line (what was asked for would be missing)
        raise CliError(
            f"--wandb {project}: W&B did not start ({first_line(e)}); WANDB_MODE=offline logs without an account"
        ) from None


class WandB:
    """One W&B run per training run: its id is kept in the run folder, so a resumed run
    goes on logging into the same W&B run."""

    def __init__(self, cfg: TrainConfig, files: RunFiles, preset: str):
        id_file = files.folder / "wandb-id.txt"
        run_id = (
            id_file.read_text().strip()
            if id_file.is_file()
            else hashlib.sha256(os.urandom(16)).hexdigest()[:16]
        )
        write_text(id_file, run_id + "\n")
        self.run = start_wandb(
            cfg.wandb,
            files.folder,
            files.folder.name,
            {**dataclasses.asdict(cfg), "preset": preset},
            "train",
            run_id,
        )

    def log(self, metrics: dict, epoch: int) -> None:
        self.run.log(
            {
                k: v
                for k, v in metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            },
            step=epoch,
        )

    def close(self) -> None:
        self.run.finish()

    @staticmethod
    def log_report(project: str, rows: list[dict], names: list[str], folder: Path) -> None:
        """attack --wandb: the results table and each checkpoint's figures as the run's summary."""
        import wandb

        first = rows[0]
        run = start_wandb(
            project,
            folder,
            "attack " + ", ".join(Path(r["path"]).name for r in rows),
            {
                "attacks": names,
                "eps_levels": first["eps_levels"],
                "step_levels": first["step_levels"],
                "n_examples": first["n_examples"],
                "dataset": first["dataset"],
                "seed": first["seed"],
                "checkpoints": {r["path"]: r["sha256"] for r in rows},
            },
            "attack",
        )
        columns = ["checkpoint", "sha256", *names, "worst"]
        run.log(
            {
                "robust_accuracy": wandb.Table(
                    columns=columns,
                    data=[
                        [
                            r["path"],
                            r["sha256"],
                            *[r["accuracy"].get(a) for a in names],
                            r["accuracy"]["worst"],
                        ]
                        for r in rows
                    ],
                )
            }
        )
        for r in rows:
            run.summary.update({f"{r['path']}/{a}": v for a, v in r["accuracy"].items()})
        run.finish()


part.TRACKERS.update(tensorboard=TensorBoard, wandb=WandB)


# ============================================================================ attack's tools
# Added to `attack` when this module is there (its options in the help's panel "part_tools"):
# robustbench:NAME models, sweeps of the attack's strength, saved and replayed adversarial
# examples, an evaluation state that makes an interrupted evaluation continue, W&B.


class EvalState(PointFlags):
    """An evaluation's per-point flags on disk, so that the same command continues where an
    interrupted one stopped. Saved atomically at most every few seconds and at the end of
    each attack; refused when it belongs to another evaluation (another signature)."""

    SAVE_EVERY_S = 2.0  # at most one write every 2 s: a kill loses at most that much work

    def __init__(self, path: Optional[Path], signature: dict, writer: bool = True):
        super().__init__()
        self.path, self.signature, self.writer = path, signature, writer
        self.saved_at = time.monotonic()
        if path is not None and Path(path).is_file():
            self._load(Path(path))

    def _load(self, path: Path) -> None:
        try:
            tensors, meta, _ = tensors_of(path)
            signature, seconds = (
                json.loads(meta["signature"]),
                json.loads(meta.get("seconds", "{}")),
            )
        except Exception as e:
            raise CliError(
                f"the evaluation state {path} is damaged ({first_line(e)}); delete it to start again"
            ) from None
        if signature != json.loads(json.dumps(self.signature)):
            raise CliError(
                f"{path} holds the state of another evaluation (other checkpoints, points or settings); "
                "delete it, or give another --state"
            )
        n = self.signature.get("n")
        for (
            key,
            flags,
        ) in tensors.items():  # only what part writes: int8 flags of n points, each -1, 0 or 1
            if (
                flags.dtype != torch.int8
                or flags.dim() != 1
                or (n is not None and len(flags) != n)
                or not bool(((flags >= PENDING) & (flags <= 1)).all())
            ):
                raise CliError(
                    f"the evaluation state {path} holds flags part never writes ({key}: {flags.dtype}, "
                    f"{tuple(flags.shape)}); delete it to start again"
                )
        if meta.get("checksum") != self._checksum(tensors):
            raise CliError(
                f"the evaluation state {path} does not match its checksum (changed after it was written); "
                "delete it to start again"
            )
        self.flags, self.seconds = dict(tensors), seconds
        note(f"resuming the evaluation from {path}")

    @staticmethod
    def _checksum(flags: dict[str, Tensor]) -> str:
        h = hashlib.sha256()
        for key in sorted(flags):
            h.update(
                key.encode()
                + b"\0"
                + flags[key].to(torch.int8).contiguous().numpy().tobytes()
                + b"\0"
            )
        return h.hexdigest()

    def put(
        self, key: str, flags: Tensor, seconds: Optional[float] = None, force: bool = False
    ) -> None:
        super().put(key, flags, seconds)
        if force or time.monotonic() - self.saved_at >= self.SAVE_EVERY_S:
            self.save()

    def save(self) -> None:
        if self.path is not None and self.writer:
            meta = {
                "format": "part/1-eval",
                "signature": json.dumps(self.signature),
                "seconds": json.dumps(self.seconds),
                "checksum": self._checksum(self.flags),
            }
            save_tensors(Path(self.path), {k: v.contiguous() for k, v in self.flags.items()}, meta)
            self.saved_at = time.monotonic()


class AdvWriter:
    """--save-adv: the adversarial examples of one checkpoint, float32 (uint8 rounding would
    change results), one safetensors file per attack with the test indices, labels, eps,
    step, attack, seed, the checkpoint's sha256 and the id of the evaluation (a hash of
    everything that decides the examples). Batches land in .parts/ as they finish, named by
    that id, so a resumed evaluation keeps its own and never merges another's; a batch the
    state calls done but whose examples are missing is attacked again (same seed, same
    result). The folder is locked for the run by the caller."""

    def __init__(self, folder: Path, info: dict, evaluation: dict):
        self.folder, self.info = Path(folder), info
        self.id = hashlib.sha256(json.dumps(evaluation, sort_keys=True).encode()).hexdigest()[:16]
        parts = self.folder / ".parts"
        parts.mkdir(parents=True, exist_ok=True)
        for stale in [p for p in parts.glob("*.safetensors") if not p.name.startswith(self.id)]:
            # left by a killed evaluation of other settings: never ours to merge
            stale.unlink(missing_ok=True)
        for done in self.folder.glob("*.safetensors"):
            if safetensors_metadata(done).get("evaluation") != json.dumps(self.id):
                raise CliError(
                    f"--save-adv {self.folder} already holds examples of another evaluation ({done.name}); "
                    "choose another folder or remove it"
                )

    def _part(self, key: str, batch: int) -> Path:
        return self.folder / ".parts" / f"{self.id}-{key}-{batch:06d}.safetensors"

    def _complete(self, key: str) -> bool:
        """The attack's file of this very evaluation is already written (its parts are gone)."""
        return safetensors_metadata(self.folder / f"{key}.safetensors").get(
            "evaluation"
        ) == json.dumps(self.id)

    def has(self, key: str, batch: int) -> bool:
        return self._part(key, batch).is_file() or self._complete(key)

    def write(self, key: str, batch: int, index: Tensor, x_adv: Tensor) -> None:
        save_tensors(
            self._part(key, batch),
            {
                "x_adv": x_adv.detach().float().cpu().contiguous(),
                "indices": index.cpu().contiguous(),
            },
            {},
        )

    def finish(self, spec: AttackSpec, x_all: Tensor, y_all: Tensor, attacked: Tensor) -> Path:
        """One file of the attack: saved examples where the points were attacked, the clean
        image where the model was already wrong (no attack needed). Every attacked point
        must have its example."""
        path = self.folder / f"{spec.key}.safetensors"
        parts = sorted((self.folder / ".parts").glob(f"{self.id}-{spec.key}-*.safetensors"))
        # written before an interruption: nothing left to add
        if not parts and self._complete(spec.key):
            return path
        x_adv = x_all.detach().float().cpu().clone()
        covered = torch.zeros(len(y_all), dtype=torch.bool)
        for piece in parts:
            t = tensors_of(piece)[0]
            x_adv[t["indices"]] = t["x_adv"]
            covered[t["indices"]] = True
        missing = int((attacked.cpu() & ~covered).sum())
        if missing:
            raise CliError(
                f"--save-adv: the examples of {missing} attacked points of {spec.name} are missing from "
                f"{self.folder / '.parts'}; run the same command again to attack them again"
            )
        meta = {
            **{k: json.dumps(v) for k, v in self.info.items()},
            "format": "part/1-adv",
            "attack": json.dumps(spec.key),
            "evaluation": json.dumps(self.id),
        }
        save_tensors(
            path,
            {
                "x_adv": x_adv.contiguous(),
                "indices": torch.arange(len(y_all)),
                "labels": y_all.cpu(),
            },
            meta,
        )
        for piece in parts:
            piece.unlink(missing_ok=True)
        return path


ADV_METADATA = {
    "eps": (int, float),
    "eps_levels": (int, float),
    "seed": int,
    "attack": str,
    "checkpoint_sha256": str,
    "n": int,
    "evaluation": str,
}


def load_adversarial(path: Path) -> tuple[Tensor, Tensor, Tensor, dict]:
    """A --save-adv file: (x_adv, test indices, labels, metadata), every part of its claim
    checked: the metadata part writes with the types it writes, eps and eps_levels that
    agree, float32 examples, int64 indices that are the first N test points in order."""

    require_file(path, "--adv-from")
    try:
        raw = safetensors_metadata(path)
        if raw.get("format") != "part/1-adv":
            raise ValueError("not a file written by part attack --save-adv")
        meta = {k: json.loads(v) for k, v in raw.items() if k != "format"}
        t = tensors_of(path)[0]
        x_adv, index, labels = t["x_adv"], t["indices"], t["labels"]
    except Exception as e:
        raise CliError(
            f"{path}: not a readable file of adversarial examples ({first_line(e)})"
        ) from None
    wrong = [
        f"{k} {meta.get(k)!r}"
        for k, kind in ADV_METADATA.items()
        if isinstance(meta.get(k), bool) or not isinstance(meta.get(k), kind)
    ]
    if wrong:
        raise CliError(f"{path}: its metadata is not what part writes ({', '.join(wrong)})")
    eps, levels = float(meta["eps"]), float(meta["eps_levels"])
    if not (
        math.isfinite(eps)
        and 0 <= eps <= 1
        and math.isclose(eps, from_levels(levels), rel_tol=1e-9, abs_tol=1e-12)
    ):
        raise CliError(
            f"{path}: its eps ({eps!r}) and eps_levels ({levels:g}/255) disagree; not a file part wrote"
        )
    if x_adv.dtype != torch.float32 or index.dtype != torch.int64 or labels.dtype != torch.int64:
        raise CliError(
            f"{path}: x_adv {x_adv.dtype}, indices {index.dtype}, labels {labels.dtype}; "
            "part writes float32 examples and int64 indices and labels"
        )
    if x_adv.dim() != 4 or len(x_adv) != len(index) or len(index) != len(labels) or not len(index):
        raise CliError(
            f"{path}: inconsistent adversarial examples ({tuple(x_adv.shape)}, {len(index)} indices, {len(labels)} labels)"
        )
    if meta["n"] != len(index) or not torch.equal(index, torch.arange(len(index))):
        raise CliError(
            f"{path}: its indices are not the first {len(index)} test points in order (repeated, reordered or "
            "picked); part saves the first N, and a replay must score those"
        )
    meta["eps"] = eps
    return x_adv, index, labels, meta


def transfer_flags(
    model: nn.Module, test: Split, path: Path, batch_size: int
) -> tuple[Tensor, Tensor, dict]:
    """The model's results on saved adversarial examples (transfer / black-box studies), after
    checking that each lies inside the budget of the test point it claims.
    Returns (test indices, robust flags, metadata)."""
    x_adv, index, labels, meta = load_adversarial(path)
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= len(test.y)):
        raise CliError(f"{path}: indices beyond the {len(test.y)} test images")
    points = test.select(index.to(test.y.device))
    if not torch.equal(labels.to(points.y.device), points.y):
        raise CliError(
            f"{path}: its labels differ from those of the test points it names (another data set?)"
        )
    x = to_float(points.x)
    x_adv = x_adv.to(x.device)
    if x_adv.shape != x.shape:
        raise CliError(
            f"{path}: examples of shape {tuple(x_adv.shape[1:])}, test images of {tuple(x.shape[1:])}"
        )
    check_budget(x_adv, x, meta["eps"], f"{path.name} (saved examples)")
    with eval_mode(model), full_fp32():
        robust = (predict(model, x, batch_size) == points.y) & (
            predict(model, x_adv, batch_size) == points.y
        )
    return index, robust, meta


def _transfer_row(t: EvalTarget, source: Path, request: AttackRequest, dev: torch.device) -> dict:
    """--adv-from: the checkpoint on every saved file (a folder of them, or one file). The
    row says where each file came from; a file made on this very checkpoint is a replay and
    gives exactly the accuracy its evaluation reported."""
    if not source.is_dir():
        require_file(source, "--adv-from")
    files = (
        sorted(p for p in source.rglob("*.safetensors") if ".parts" not in p.parts and p.is_file())
        if source.is_dir()
        else [source]
    )
    if not files:
        raise CliError(f"--adv-from {source}: no saved adversarial examples there")
    test = t.test.to(dev)
    flags, origins, n, eps_levels = {}, [], None, None
    for f in files:
        idx, robust, meta = transfer_flags(t.model, test, f, request.batch_size)
        if n is not None and len(idx) != n:
            raise CliError(
                f"{f}: holds {len(idx)} test points, {files[0]} {n}; evaluate them separately"
            )
        if eps_levels is not None and meta["eps_levels"] != eps_levels:
            raise CliError(
                f"{f}: made at eps {meta['eps_levels']:g}/255, {files[0]} at {eps_levels:g}/255; evaluate them separately"
            )
        n, eps_levels = len(idx), meta["eps_levels"]
        name = f"adv:{f.parent.name}/{f.stem}" if source.is_dir() else f"adv:{f.stem}"
        flags[name] = robust
        origins.append(
            {
                "file": str(f),
                "column": name,
                "attack": meta["attack"],
                "eps_levels": eps_levels,
                "seed": meta["seed"],
                "checkpoint": meta.get("checkpoint"),
                "checkpoint_sha256": meta["checkpoint_sha256"],
                "replay": meta["checkpoint_sha256"] == t.sha256,
            }
        )
    points = test.first(n)
    with eval_mode(t.model), full_fp32():
        clean = predict(t.model, to_float(points.x), request.batch_size) == points.y
    main = {"natural": clean, **flags}
    result = {"accuracy": {k: fraction(v) for k, v in main.items()}, "seconds": {}}
    worst = torch.stack(list(main.values())).all(0)
    result["accuracy"]["worst"] = fraction(worst)
    if request.per_class:
        result["per_class"] = per_class_accuracy(points, {**main, "worst": worst})
    setup = AttackSetup(
        eps=from_levels(eps_levels), step=from_levels(DEFAULT_STEP_LEVELS), seed=request.seed
    )
    row = _attack_row(t, n, setup, result, [], dev, [], (eps_levels, 0.0))
    row["adv_from"] = origins
    for origin in origins:
        kind = (
            "a replay on the checkpoint that made them"
            if origin["replay"]
            else f"transferred from {origin['checkpoint']} (sha256 {origin['checkpoint_sha256'][:12]})"
        )
        console.print(f"{t.path}: {origin['column']}: {kind}")
    return row


def expand_sweep(
    specs: list[AttackSpec], steps: list[int], restarts: list[int]
) -> list[AttackSpec]:
    """--sweep: every iterative family asked for (pgdK, cwK) at each step count, and at the
    largest step count with each number of restarts."""
    families = [s.family for s in specs if s.family in ("pgd", "cw")]
    if not families:
        raise CliError(
            "--sweep: nothing to sweep; it varies the steps of the pgdK and cwK attacks, and --attacks names none"
        )
    extra = [AttackSpec(f"{f}{k}", f, k, 1) for f in dict.fromkeys(families) for k in steps]
    extra += [
        AttackSpec(f"{f}{max(steps)}x{r}", f, max(steps), r)
        for f in dict.fromkeys(families)
        for r in restarts
        if r > 1
    ]
    unique = {s.key: s for s in specs}
    for s in extra:
        unique.setdefault(s.key, s)
    swept = sorted(
        (s for s in unique.values() if s.family in families),
        key=lambda s: (families.index(s.family), s.steps, s.restarts),
    )
    return [
        s for s in unique.values() if s.family not in families
    ] + swept  # the curve's columns in order


def sweep_curves(specs: list[AttackSpec], acc: dict) -> dict[str, list[tuple[int, int, float]]]:
    curves: dict[str, list] = {}
    for spec in specs:
        if spec.family in ("pgd", "cw") and spec.name in acc:
            curves.setdefault(spec.family, []).append((spec.steps, spec.restarts, acc[spec.name]))
    return curves


def convergence_warnings(
    specs: list[AttackSpec], result: dict, n: int, steps: list[int]
) -> list[str]:
    """--sweep: an attack whose accuracy still falls between the two largest step counts has
    not converged (its figure overstates robustness)."""
    if len(steps) < 2:
        return []
    acc, (a, b), found = result["accuracy"], sorted(steps)[-2:], []
    by_key = {s.key: acc[s.name] for s in specs if s.name in acc}
    for family in dict.fromkeys(s.family for s in specs if s.family in ("pgd", "cw")):
        before, after = by_key.get(f"{family}{a}"), by_key.get(f"{family}{b}")
        if (
            before is not None
            and after is not None
            and before - after > max(0.005, 1 / max(n, 1)) - 1e-12
        ):
            found.append(
                f"{family}: accuracy still falls from {a} to {b} steps ({fmt_pct(before)}% -> {fmt_pct(after)}%): "
                "the attack has not converged; try more steps or restarts"
            )
    return found


def plot_sweep(
    path: Path,
    curves: dict[str, list[tuple[int, int, float]]],
    n: int,
    eps_levels: float,
    title: str = "",
) -> bool:
    """Accuracy against attack steps (log axis), one line per family; restarts as crosses."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for family, points in curves.items():
        single = sorted((k, acc) for k, r, acc in points if r == 1)
        line = ax.plot(
            [k for k, _ in single],
            [100 * a for _, a in single],
            marker="o",
            label=f"{family}, 1 restart",
        )
        for i, (k, r, acc) in enumerate(sorted(p for p in points if p[1] > 1)):
            ax.scatter([k], [100 * acc], marker="x", color=line[0].get_color())
            ax.annotate(
                f"{r} restarts: {100 * acc:.2f}",
                (k, 100 * acc),
                textcoords="offset points",
                xytext=(-90, 8 + 11 * i),
                fontsize=8,
            )
    steps = sorted({k for points in curves.values() for k, _, _ in points})
    ax.set_xscale("log")
    ax.set_xticks(steps, [str(k) for k in steps])
    ax.set(
        xlabel="attack steps",
        ylabel="robust accuracy (%)",
        title=f"{title}attack strength, eps {eps_levels:g}/255, {n} points",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure_png(fig, path)
    return True


def show_sweep(
    rows: list[dict], specs: list[AttackSpec], plot: Optional[Path], eps_levels: float
) -> None:
    """--sweep: each checkpoint's curve in a line, and the first one's plot."""
    for row in rows:
        curves = sweep_curves(specs, row["accuracy"])
        points = {
            f: ", ".join(
                f"{k}{'x' + str(r) if r > 1 else ''} {fmt_pct(a)}" for k, r, a in sorted(p)
            )
            for f, p in curves.items()
        }
        console.print(f"{row['path']}: sweep " + "; ".join(f"{f}: {p}" for f, p in points.items()))
    first = rows[0]
    curves = sweep_curves(specs, first["accuracy"])
    if plot is None:
        note("note: no sweep plot without a report file or --sweep-plot FILE")
    elif plot_sweep(plot, curves, first["n_examples"], eps_levels, f"{first['path']}\n"):
        console.print(f"sweep plot ({first['path']}): {plot}")


def _int_list(text: str, option: str, high: int) -> list[int]:
    """A comma-separated list of integers in [1, high] (the bounds pgdK and xR have)."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise CliError(f"{option}: expected integers like 10,20,50, got {text!r}") from None
    if not values or min(values) < 1 or max(values) > high:
        raise CliError(f"{option}: expected integers from 1 to {high}, got {text!r}")
    return sorted(set(values))


def _refuse_with_adv_from(given: dict[str, Any]) -> None:
    """--adv-from: the saved files fix the attack, budget and points; a value given beside
    them would mislabel the result."""
    named = [option for option, value in given.items() if value is not None]
    if named:
        raise CliError(
            f"{', '.join(named)} cannot be given with --adv-from: the saved examples fix the "
            "attack, the budget and the points"
        )


def _sweep_of(o: dict[str, Any], reports: list[Optional[Path]]) -> Optional[tuple]:
    """--sweep's (steps, restarts, plot or None); its options refused without it. The plot
    goes to --sweep-plot, else beside the first report; with neither, the curve is printed."""
    given = {f"--sweep-{k}": o[f"sweep_{k}"] for k in ("steps", "restarts", "plot")}
    if not o["sweep"]:
        for option in (k for k, v in given.items() if v is not None):
            raise CliError(f"{option} goes with --sweep; without it nothing is swept")
        return None
    return (
        _int_list(o["sweep_steps"] or SWEEP_STEPS, "--sweep-steps", part.MAX_ATTACK_STEPS),
        _int_list(o["sweep_restarts"] or SWEEP_RESTARTS, "--sweep-restarts", part.MAX_RESTARTS),
        o["sweep_plot"] or next((p.with_name(p.stem + "-sweep.png") for p in reports if p), None),
    )


@dataclasses.dataclass
class AttackTools(part.AttackExtras):
    """What this module adds to `attack`, from its options (checked by `from_options`)."""

    threat: str
    model_dir: str
    state: Optional[Path]  # None: the evaluation is not kept on disk
    save_adv: Optional[Path]
    adv_from: Optional[Path]
    sweep: Optional[tuple[list[int], list[int], Optional[Path]]]  # steps, restarts, the plot
    wandb: Optional[str]
    folder: Path  # where the reports go (W&B's files)

    @classmethod
    def from_options(cls, o: dict[str, Any], card: dict[str, Any]) -> "AttackTools":
        reports = [card["json_out"]]
        if o["adv_from"] is not None:
            names = ("attacks", "eps", "step", "restarts", "n_examples", "eps_low")
            _refuse_with_adv_from(
                {f"--{k.replace('_', '-')}": card[k] for k in names}
                | {"--save-adv": o["save_adv"], "--sweep": o["sweep"] or None}
                | {"--state": o["state"]}
            )
        sweep = _sweep_of(o, reports)
        state = o["state"] or next(
            (p.with_name(p.name + ".state.safetensors") for p in reports if p), None
        )
        check_output(sweep and sweep[2], "--sweep-plot")
        check_output(o["state"], "--state")
        if o["wandb"] and importlib.util.find_spec("wandb") is None:
            raise CliError("--wandb needs the wandb package: pip install wandb")
        folder = next((p.parent for p in reports if p is not None), Path("."))
        return cls(
            **{k: o[k] for k in ("threat", "model_dir", "save_adv", "adv_from", "wandb")},
            state=None if o["adv_from"] else state,
            sweep=sweep,
            folder=folder,
        )

    def sources(self, paths: list[Path], request: AttackRequest) -> list[tuple[Path, Any]]:
        return [
            robustbench_source(p, request.arch, request.dataset, self.threat, self.model_dir)
            for p in paths
        ]

    def specs(self, specs: list[AttackSpec]) -> list[AttackSpec]:
        return expand_sweep(specs, *self.sweep[:2]) if self.sweep else specs

    def replaces(self, targets: list[EvalTarget], n: int, request: AttackRequest, dev):
        if self.adv_from is None:
            return None
        return [_transfer_row(t, Path(self.adv_from), request, dev) for t in targets]

    @contextlib.contextmanager
    def evaluation(self, targets, n, specs, request, dist):
        """One evaluation at a time writes a state file or a --save-adv folder: both locked."""
        signature = {
            "checkpoints": [t.sha256 for t in targets],
            "points": [part.fingerprint(t.test.first(n)) for t in targets],
            "attacks": [s.key for s in specs],
            "n": n,
            "eps": request.eps_levels,
            "step": request.step_levels,
            "eps_low": request.eps_low,
            "seed": request.seed,
            "batch_size": request.batch_size,
            "save_adv": str(self.save_adv) if self.save_adv else None,
        }
        with contextlib.ExitStack() as locks:
            if dist.main and self.state is not None:
                self.state.parent.mkdir(parents=True, exist_ok=True)
                lock = self.state.with_name(f".{self.state.name}.lock")
                locks.enter_context(
                    part.file_lock(lock, "an evaluation", str(self.state), remove=True)
                )
            if dist.main and self.save_adv is not None:
                part.check_output(self.save_adv, "--save-adv", folder=True)
                locks.enter_context(part.folder_lock(self.save_adv, "an evaluation"))
            state = EvalState(self.state, signature, writer=dist.main)

            def hooks_for(t: EvalTarget, setup: AttackSetup) -> EvalHooks:
                adv = self._writer(t, setup, request, signature) if self.save_adv else None
                return EvalHooks(state=state, prefix=f"{t.sha256[:16]}/", dist=dist, adv=adv)

            try:
                yield hooks_for
            except KeyboardInterrupt:
                state.save()  # what finished since the last save is kept too
                raise

    def interrupted(self) -> str:
        if self.state is None:
            return "nothing was kept; with --state FILE (or a --json report) the same command continues where it stops"
        return f"the finished work is kept in {self.state}; the same command continues from there"

    def _writer(self, t: EvalTarget, setup: AttackSetup, r: AttackRequest, signature: dict):
        info = {
            "eps": setup.eps,
            "eps_levels": r.eps_levels,
            "step_levels": r.step_levels,
            "seed": r.seed,
            "checkpoint": str(t.path),
            "checkpoint_sha256": t.sha256,
            "dataset": t.dataset,
            "n": signature["n"],
            "versions": versions(),
        }
        folder = self.save_adv / f"{t.path.stem.split('.')[0]}-{t.sha256[:8]}"
        return AdvWriter(folder, info, {**signature, "checkpoint": t.sha256})

    def warnings(self, specs: list[AttackSpec], result: dict, n: int) -> list[str]:
        return convergence_warnings(specs, result, n, self.sweep[0]) if self.sweep else []

    def finish(self, rows: list[dict], names: list[str], specs: list[AttackSpec]) -> None:
        if self.wandb:
            part.TRACKERS["wandb"].log_report(self.wandb, rows, names, self.folder)
        if self.sweep:
            show_sweep(rows, specs, self.sweep[2], rows[0]["eps_levels"])
        if self.state is not None:  # the evaluation is complete: its reports hold everything
            self.state.unlink(missing_ok=True)


def _attack_tool_options(
    threat: Threat = "linf",
    model_dir: ModelDir = "models",
    state: Annotated[
        Optional[Path],
        _opt(
            "Keep per-point results here as batches finish; the same command resumes "
            "(default: beside --json)."
        ),
    ] = None,
    save_adv: Annotated[
        Optional[Path],
        _opt("Save the adversarial examples (float32 safetensors) in this folder."),
    ] = None,
    adv_from: Annotated[
        Optional[Path],
        _opt(
            "Evaluate on saved adversarial examples (a --save-adv folder or file) instead of attacking."
        ),
    ] = None,
    sweep: Annotated[
        bool,
        _opt(
            "Accuracy against attack steps and restarts, with a plot and convergence warnings.",
            "--sweep",
        ),
    ] = False,
    sweep_steps: Annotated[
        Optional[str],
        _opt(f"Steps of the sweep. [default: {SWEEP_STEPS}]"),
    ] = None,
    sweep_restarts: Annotated[
        Optional[str],
        _opt(f"Restarts of the sweep (at its largest step count). [default: {SWEEP_RESTARTS}]"),
    ] = None,
    sweep_plot: Annotated[
        Optional[Path],
        _opt("PNG of the sweep (default: beside the first report; without one, no plot)."),
    ] = None,
    wandb: Annotated[
        Optional[str],
        _opt("Also log the results to this Weights & Biases project (needs the wandb package)."),
    ] = None,
):
    """The options this module adds to `attack` (typer reads them from this signature)."""


def _attack(card: dict[str, Any], tools: dict[str, Any]) -> None:
    with cli_errors():
        extras = AttackTools.from_options(tools, card)
    part.attack_with(card, extras)


extend_command(
    "attack",
    _attack_tool_options,
    _attack,
    " Interrupted (with a report file or --state), the same command continues where it stopped.",
)


# ============================================================================ leaderboard entry
# `leaderboard`: RobustBench's model-info entry from an `attack --json` report, for the
# standard evaluation (AutoAttack on the 10,000 test points at eps 8/255) unless --partial.


def leaderboard_row(report: Path) -> dict:
    """The one checkpoint of an `attack --json` report, its figures checked as `report`
    checks them (fractions in [0, 1]) before they go into a public entry."""
    require_file(report, "the report")
    try:
        rows = json.loads(report.read_text())["checkpoints"]
        row = rows[0]
        keys = ("path", "sha256", "arch", "dataset", "n_examples", "eps_levels", "accuracy")
        missing = [k for k in keys if k not in row]
        fractions = list(row["accuracy"].values())
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
        raise CliError(f"{report} is not an `attack --json` report") from None
    if missing:
        raise CliError(f"{report}: the report has no {', '.join(missing)}")
    if len(rows) != 1:
        raise CliError(f"{report} holds {len(rows)} checkpoints; an entry describes one model")
    if not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in fractions):  # NaN fails too
        raise CliError(f"{report}: accuracies must be fractions in [0, 1]")
    return row


def leaderboard_problems(row: dict) -> list[str]:
    """How an evaluation differs from RobustBench's standard one."""
    return (
        ([] if "aa" in row["accuracy"] else ["the attacks do not include aa (AutoAttack)"])
        + ([] if row["eps_levels"] == 8 else [f"eps is {row['eps_levels']:g}/255, not 8/255"])
        + ([] if row["n_examples"] == 10_000 else [f"{row['n_examples']} points, not 10,000"])
    )


def robustbench_entry_of(row: dict, partial: bool) -> dict:
    """RobustBench's model-info entry (model_info/<dataset>/Linf/<name>.json): accuracies as
    percent strings with two decimals, eps as a fraction; what was run in the footnote."""
    n, acc = row["n_examples"], row["accuracy"]
    aa = acc.get("aa")
    footnote = (
        f"Evaluated with part {row['versions']['part']} (PART: Zhang et al., ICML 2024): {', '.join(acc)} on the "
        f"first {n} {row['dataset']} test points at eps {row['eps_levels']:g}/255, checkpoint sha256 {row['sha256'][:12]}."
    )
    if partial:
        footnote += " A partial evaluation, not the leaderboard's standard one."
    return {
        "link": "",
        "name": Path(row["path"]).stem,
        "authors": "",
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": row["dataset"],
        "venue": "",
        "architecture": row["arch"],
        "eps": f"{row['eps_levels']:g}/255",
        "clean_acc": f"{100 * acc['natural']:.2f}",
        "reported": f"{100 * aa:.2f}" if aa is not None else "",
        "autoattack_acc": f"{100 * aa:.2f}" if aa is not None else "",
        "footnote": footnote,
        "unreliable": False,
    }


@app.command("leaderboard")
def leaderboard_command(
    report: Annotated[
        Path,
        typer.Argument(help="An `attack --json` report of one checkpoint.", show_default=False),
    ],
    out: Annotated[Path, _opt("Write RobustBench's model-info entry here.")] = Path("entry.json"),
    partial: Annotated[
        bool, _opt("Allow a partial evaluation (the entry's footnote says so).", "--partial")
    ] = False,
):
    """RobustBench's model-info entry (clean and AutoAttack accuracy) from an `attack --json`
    report; the standard evaluation only (aa, 10,000 points, eps 8/255) unless --partial."""
    with cli_errors():
        check_output(out, "--out")
        row = leaderboard_row(report)
        problems = leaderboard_problems(row)
        if problems and not partial:
            raise CliError(
                f"an entry is for the standard evaluation: {'; '.join(problems)} "
                "(add --partial for a partial one)"
            )
        write_json(out, robustbench_entry_of(row, partial))
        console.print(f"RobustBench model info: {out}")


# ============================================================================ comparing runs
# `report` reads run folders and `attack --json` reports, groups the runs whose configs
# differ only in the seed (and in settings that do not change what is computed), and
# gives mean +- std per group and, for two groups, the seed-paired difference with a 95%
# confidence interval.

# Student's t, 97.5% quantile, for 1..30 degrees of freedom (two-sided 95% intervals).
T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def plot_tradeoff(path: Path, groups: list[dict], robust_key: str) -> bool:
    """One point per group: natural against robust accuracy, mean +- std, a marker per method."""
    plt = pyplot()
    if plt is None:
        return False
    markers = {}
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for g in groups:
        nat, rob = g["stats"].get("natural"), g["stats"].get(robust_key)
        if not nat or not rob:
            continue
        marker = markers.setdefault(g.get("method", "?"), "osD^v<>p*h"[len(markers) % 10])
        ax.errorbar(
            100 * rob["mean"],
            100 * nat["mean"],
            xerr=100 * rob["std"],
            yerr=100 * nat["std"],
            marker=marker,
            capsize=3,
            linestyle="none",
            label=f"{g['label']} (n={nat['n']})",
        )
    ax.set(
        xlabel=f"{robust_key} accuracy (%)",
        ylabel="natural accuracy (%)",
        title="accuracy-robustness trade-off (mean +- std)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure_png(fig, path)
    return True


def t975(df: int) -> float:
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964  # Cornish-Fisher expansion beyond the table (error < 1e-3)
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_std(values: list[float]) -> dict:
    """Mean, sample standard deviation (n - 1) and n."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


# Settings part 0.5 added, at the values that give what 0.4 computed (a 0.4 report groups with 0.5 runs).
SETTINGS_ADDED_IN_0_5 = {
    "optimizer": "sgd",
    "schedule": "step",
    "lr_warmup": 0.0,
    "ema": 0.0,
    "init_sha256": "",
}


@dataclasses.dataclass
class Observation:
    """The figures of one trained model (one seed of one setting)."""

    config: dict
    figures: dict[str, float]  # natural, each attack, worst (fractions)
    source: str
    evaluation: str  # how the figures were measured (they are only compared like with like)
    points: Optional[int] = None  # how many test points each figure counts (None: unknown)

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    def setting(self) -> tuple:
        """What was computed: the config without seed, paths and speed settings (and, for AT,
        without the settings that only PART reads, so that AT runs group whatever they hold).
        A config written before a setting existed reads as that setting's default, which is
        what the code did then."""
        ignored = NOT_THE_EXPERIMENT | (PART_ONLY if self.config.get("method") == "at" else set())
        config = {**SETTINGS_ADDED_IN_0_5, **self.config}
        return tuple(sorted((k, json.dumps(v)) for k, v in config.items() if k not in ignored))


def checked_observation(
    config: Any, figures: Any, source: str, evaluation: str, where: str = "", points=None
) -> Observation:
    """An observation only with what part writes: a config with an integer seed, and
    accuracies that are fractions in [0, 1] (NaN, 5.0 or a string would be averaged)."""
    source, shown = str(source), where or str(source)
    if not isinstance(config, dict):
        raise CliError(f"{shown}: its config is not a table of settings")
    seed = config.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CliError(f"{shown}: its seed {seed!r} is not an integer")
    if not isinstance(figures, dict) or not figures:
        raise CliError(f"{shown}: holds no accuracy figures")
    bad = [
        f"{k}={v!r}"
        for k, v in figures.items()
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1
    ]
    if bad:
        raise CliError(
            f"{shown}: accuracies must be fractions in [0, 1], found {', '.join(bad[:3])}"
        )
    return Observation(config, dict(figures), source, evaluation, points)


def _from_run_folder(folder: Path) -> Optional[Observation]:
    """The training-time figures of a finished run; None (left out) for an unfinished one."""
    files = RunFiles(folder)
    if not files.metrics.is_file() or not files.metrics.read_text().strip():
        return None  # stopped before its first epoch ended
    try:
        stored = json.loads(files.config.read_text())
        rows = [json.loads(line) for line in files.metrics.read_text().splitlines() if line.strip()]
        last = rows[-1]
        figures = {k: last[k] for k in ("natural", "pgd20") if last.get(k) is not None}
        where, epoch, epochs = (
            last.get("eval_on", "test"),
            last["epoch"],
            stored["config"]["epochs"],
        )
    except (RecursionError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise CliError(f"{folder}: not a finished run folder ({first_line(e)})") from None
    if epoch != epochs:
        return None
    return checked_observation(
        stored["config"],
        figures,
        str(folder),
        f"training-time PGD-20 on {where} images, epoch {epoch}",
        points=last.get("eval_points") or stored["config"].get("val_size") or None,
    )


def _from_attack_report(path: Path) -> list[Observation]:
    try:
        rows = json.loads(path.read_text())["checkpoints"]
        found = []
        for row in rows:
            if row.get("config") is None:
                raise CliError(
                    f"{path}: {row['path']} has no training config (a foreign checkpoint); report compares our runs"
                )
            # what was computed: the attacks, the points, the budget, the attack seed (only like is compared with like)
            attacks = ",".join(k for k in row["accuracy"] if k != "worst")
            evaluation = (
                f"attack on {row['n_examples']} {row['dataset']} test points at eps {row['eps_levels']:g}/255, "
                f"seed {row['seed']}: {attacks}"
            )
            found.append(
                checked_observation(
                    row["config"],
                    row["accuracy"],
                    row["path"],
                    evaluation,
                    f"{path} ({row['path']})",
                    row["n_examples"],
                )
            )
        return found
    except CliError:
        raise
    except (RecursionError, OSError, ValueError, KeyError, TypeError) as e:
        raise CliError(f"{path}: not an `attack --json` report ({first_line(e)})") from None


def _is_attack_report(path: Path) -> bool:
    """A JSON file with the `checkpoints` of an `attack --json` report (a damaged JSON file
    counts, so that its error is said; report's own JSON and other files do not)."""
    if path.suffix.lower() != ".json":
        return False
    try:
        return "checkpoints" in json.loads(path.read_text())
    except (RecursionError, OSError, ValueError, TypeError):
        return True


def read_observations(paths: list[Path]) -> list[Observation]:
    """Run folders and attack reports; a run evaluated by `attack` counts once, with the
    attack figures. Other paths (a glob also picks up report.md, plots, exports) are
    skipped with one note."""
    found: list[Observation] = []
    skipped, unfinished, empty = [], [], []
    for path in paths:
        if path.is_dir() and (RunFiles(path).config.exists() or RunFiles(path).metrics.exists()):
            observation = _from_run_folder(path)
            (found if observation else unfinished).append(observation or str(path))
        elif path.is_file() and _is_attack_report(path):
            observations = _from_attack_report(path)
            found.extend(observations)
            empty += [] if observations else [str(path)]
        elif path.exists():
            skipped.append(str(path))
        else:
            raise CliError(f"{path} not found")
    if skipped:
        note(
            f"note: skipped {len(skipped)} path(s) that are neither run folders nor `attack --json` reports: "
            + ", ".join(skipped)
        )
    if unfinished:
        note(
            f"note: left out {len(unfinished)} unfinished run(s) (fewer epochs than their config): "
            + ", ".join(unfinished)
        )
    if empty:
        note(
            f"note: left out {len(empty)} report(s) that evaluated no checkpoint: "
            + ", ".join(empty)
        )
    if not found:
        raise CliError("no run folder or `attack --json` report among the paths given")
    attacked = {
        str(Path(o.source).parent.resolve()) for o in found if o.evaluation.startswith("attack")
    }
    return [
        o
        for o in found
        if o.evaluation.startswith("attack") or str(Path(o.source).resolve()) not in attacked
    ]


def in_config_order(keys: Iterable[str]) -> list[str]:
    """Setting names in TrainConfig's order (as `train --help` and config.json list them), others after."""
    keys = set(keys)
    return [k for k in CONFIG_FIELDS if k in keys] + sorted(keys - set(CONFIG_FIELDS))


def group_observations(observations: list[Observation]) -> list[dict]:
    """Groups of one setting and one kind of evaluation; labelled by the settings that
    differ between groups (the rest is shared)."""
    groups: dict[tuple, list[Observation]] = {}
    for o in observations:
        groups.setdefault((o.setting(), o.evaluation.split(", epoch")[0]), []).append(o)
    settings = [dict(key[0]) for key in groups]
    # A setting differs when two groups that have it hold different values (AT groups lack the PART-only ones).
    differing = in_config_order(
        {k for s in settings for k in s if any(k in t and t[k] != s[k] for t in settings)}
    )
    result = []
    for (setting, evaluation), members in groups.items():
        config = {k: json.loads(v) for k, v in setting}
        label = ", ".join(f"{k}={config[k]}" for k in differing if k in config) or "all runs"
        if any(g["label"] == label for g in result):
            label += f" [{evaluation}]"
        seeds = [o.seed for o in members]
        if len(set(seeds)) < len(seeds):
            raise CliError(
                f"two runs of the group {label} have the same seed ({', '.join(o.source for o in members)})"
            )
        columns = [k for k in members[0].figures if all(k in o.figures for o in members)]
        stats = {k: mean_std([o.figures[k] for o in members]) for k in columns}
        points = members[0].points if len({o.points for o in members}) == 1 else None
        for k in columns if points else []:  # one evaluation's own sampling noise
            stats[k]["binomial95"] = part.half_width(stats[k]["mean"], points)
        result.append(
            {
                "label": label,
                "config": config,
                "method": config.get("method", "?"),
                "evaluation": evaluation,
                "seeds": seeds,
                "members": members,
                "stats": stats,
                "differing": differing,
            }
        )
    return result


def pick_group(groups: list[dict], selector: str) -> dict:
    """A group by its label or by key=value pairs (comma-separated) that only it matches."""
    wanted = dict(part.split("=", 1) for part in selector.split(",") if "=" in part)
    matches = [
        g
        for g in groups
        if g["label"] == selector
        or (wanted and all(str(g["config"].get(k)) == v for k, v in wanted.items()))
    ]
    if len(matches) != 1:
        labels = "; ".join(g["label"] for g in groups)
        raise CliError(f"--compare {selector!r} matches {len(matches)} groups (groups: {labels})")
    return matches[0]


def paired_difference(a: dict, b: dict) -> dict:
    """A - B per column over the seeds both groups have, with a 95% t interval."""
    if a is b:
        raise CliError(
            f"--compare names the group {a['label']} twice; compare two different groups"
        )
    measured = [
        g["evaluation"].split(": ")[0] for g in (a, b)
    ]  # the points, budget and attack seed
    if measured[0] != measured[1]:
        raise CliError(
            f"the groups {a['label']} and {b['label']} were measured differently ({measured[0]} vs {measured[1]}); "
            "a paired comparison needs the same points, budget and seed"
        )
    by_seed = lambda g: {o.seed: o.figures for o in g["members"]}  # noqa: E731
    fa, fb = by_seed(a), by_seed(b)
    seeds = sorted(set(fa) & set(fb))
    if not seeds:
        raise CliError(
            f"the groups {a['label']} and {b['label']} share no seed; a paired comparison needs the same seeds"
        )
    result = {}
    # `worst` is over each group's own attacks: like with like only
    same_attacks = a["evaluation"] == b["evaluation"]
    for key in [k for k in a["stats"] if k in b["stats"] and (k != "worst" or same_attacks)]:
        d = [fa[s][key] - fb[s][key] for s in seeds]
        stats = mean_std(d)
        half = t975(len(d) - 1) * stats["std"] / math.sqrt(len(d)) if len(d) > 1 else math.inf
        floored = len(d) > 1 and stats["std"] == 0  # seeds that agree exactly: no spread to use
        half = sampling_floor(a, b, key, len(d)) if floored else half
        low, high = stats["mean"] - half, stats["mean"] + half
        result[key] = {
            **stats,
            "ci95": [low, high],
            "sampling_floor": floored,
            "differences": d,
            "distinguishable": bool(len(d) > 1 and (low > 0 or high < 0)),
        }
    return {"a": a["label"], "b": b["label"], "seeds": seeds, "columns": result}


def sampling_floor(a: dict, b: dict, key: str, pairs: int) -> float:
    """The interval of a mean difference whose seeds agree exactly (two seeds, the same
    difference: a t interval of zero width): the binomial noise of the two groups'
    evaluations (n points each, as if drawn apart: an upper bound) over the pairs; where
    the points are unknown, nothing can be said."""
    points = {o.points for o in a["members"] + b["members"]}
    if len(points) != 1 or None in points:
        return math.inf
    (n,), pa, pb = points, a["stats"][key]["mean"], b["stats"][key]["mean"]
    return 1.96 * math.sqrt((pa * (1 - pa) + pb * (1 - pb)) / n / pairs)


def difference_sentence(key: str, d: dict) -> str:
    low, high = d["ci95"]
    if d["n"] < 2:
        return f"{key}: {100 * d['mean']:+.2f} points from a single pair; no interval, nothing can be concluded"
    verdict = (
        "distinguishable from zero" if d["distinguishable"] else "NOT distinguishable from zero"
    )
    floor = (
        "; the seeds agree exactly: the evaluations' binomial noise" if d["sampling_floor"] else ""
    )
    return f"{key}: {100 * d['mean']:+.2f} points (95% CI {100 * low:+.2f} to {100 * high:+.2f}, n={d['n']} seeds{floor}): {verdict}"


@app.command("report")
def report_command(
    paths: Annotated[
        list[Path],
        typer.Argument(
            help=escape_markup(
                "Run folders and/or `attack --json` reports (other paths are skipped)."
            ),
            show_default=False,
        ),
    ],
    compare: Annotated[
        Optional[tuple[str, str]],
        _opt("Two groups, A B (labels or key=value), compared paired by seed.", metavar="A B"),
    ] = None,
    markdown_out: Annotated[
        Optional[Path], _opt("Write the table (and the comparison) as markdown here.", "--markdown")
    ] = None,
    csv_out: Annotated[Optional[Path], _opt("Write the table as CSV here.", "--csv")] = None,
    json_out: JsonOut = None,
    plot: Annotated[
        Optional[Path], _opt("Draw the accuracy-robustness trade-off here (PNG).")
    ] = None,
):
    """Many runs -> a claim: mean +- std per group of runs that differ only in the seed,
    the trade-off plot, and the seed-paired difference of two groups with a 95% CI."""
    with cli_errors():
        outputs = {"--markdown": markdown_out, "--csv": csv_out, "--json": json_out}
        for option, path in {**outputs, "--plot": plot}.items():
            check_output(path, option)
        groups = group_observations(read_observations(paths))
        columns = list(dict.fromkeys(k for g in groups for k in g["stats"]))
        table = show_groups(groups, columns)
        comparison, lines = None, []
        if compare is not None:
            comparison = paired_difference(*(pick_group(groups, c) for c in compare))
            lines = [
                f"{comparison['a']} minus {comparison['b']}, paired by seed {comparison['seeds']} "
                "(intervals over the seeds, on the same test points):"
            ]
            lines += [difference_sentence(k, d) for k, d in comparison["columns"].items()]
            for line in lines:
                console.print(line)
        write_group_reports(outputs, groups, columns, table, (comparison, lines))
        if plot is not None:
            robust = "worst" if "worst" in columns else "pgd20"
            if plot_tradeoff(plot, groups, robust):
                console.print(f"trade-off plot: {plot}")


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]) + "\n"


def _cell(g: dict, k: str) -> str:
    if k not in g["stats"]:
        return "-"
    st = g["stats"][k]
    shown = f"{100 * st['mean']:.2f}" + (f" ± {100 * st['std']:.2f}" if st["n"] > 1 else "")
    return shown + (f" (±{100 * st['binomial95']:.1f})" if "binomial95" in st else "")


def show_groups(groups: list[dict], columns: list[str]) -> tuple[list[str], list[list[str]], dict]:
    """The table of groups and the settings they share, printed; returns (headers, rows,
    shared settings) for the report files."""
    headers = ["group", "n", "seeds", *columns, "evaluation"]
    rows = [
        [
            g["label"],
            str(len(g["members"])),
            ",".join(map(str, sorted(g["seeds"]))),
            *[_cell(g, k) for k in columns],
            g["evaluation"],
        ]
        for g in groups
    ]
    title = "accuracy (%), mean ± std over seeds (±: one evaluation's 95% binomial interval)"
    console.print(text_table(title, headers, rows, left=("group", "evaluation", "seeds")))
    # AT groups lack PART-only keys
    values = {k: v for g in groups for k, v in g["config"].items() if k not in g["differing"]}
    shared = {k: values[k] for k in in_config_order(values)}
    console.print("shared settings: " + " ".join(f"{k}={v}" for k, v in shared.items()))
    return headers, rows, shared


def write_group_reports(
    outputs: dict[str, Optional[Path]],
    groups: list[dict],
    columns: list[str],
    table: tuple[list[str], list[list[str]], dict],
    compared: tuple[Optional[dict], list[str]],
) -> None:
    """`report`'s --markdown (table, shared settings, comparison), --csv (means and stds as
    numbers) and --json (everything)."""
    (headers, rows, shared), (comparison, lines) = table, compared
    if outputs["--markdown"] is not None:
        text = markdown_table(headers, rows) + "\nShared settings: "
        text += ", ".join(f"`{k}={v}`" for k, v in shared.items()) + "\n"
        if lines:
            text += "\n" + lines[0] + "\n\n" + "\n".join(f"- {line}" for line in lines[1:]) + "\n"
        write_text(outputs["--markdown"], text)
    if outputs["--csv"] is not None:
        stats = lambda g, k: (
            (g["stats"][k]["mean"], g["stats"][k]["std"]) if k in g["stats"] else ("", "")
        )  # noqa: E731
        values = [
            [g["label"], len(g["members"]), " ".join(map(str, sorted(g["seeds"])))]
            + [v for k in columns for v in stats(g, k)]
            for g in groups
        ]
        names = ["group", "n", "seeds", *[f"{k}_{m}" for k in columns for m in ("mean", "std")]]
        write_text(outputs["--csv"], csv_text(names, values))
    if outputs["--json"] is not None:
        found = [
            {k: v for k, v in g.items() if k != "members"}
            | {"sources": [o.source for o in g["members"]]}
            for g in groups
        ]
        report = {"groups": found, "comparison": comparison}
        write_json(outputs["--json"], report | {"versions": versions(), "machine": machine()})


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


def save_grid(
    path: Path, columns: list[tuple[str, Tensor]], captions: list[str], scale: int
) -> tuple[int, int]:
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
            canvas[:, top : top + tile, left : left + tile] = big[i]
    image = Image.fromarray((canvas * 255).round().byte().permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(image)
    for j, (title, _) in enumerate(columns):
        draw.text((TILE_PAD + j * (tile + TILE_PAD) + 2, 1), title, fill=(0, 0, 0))
    for i, caption in enumerate(captions):
        draw.text(
            (TILE_PAD + 2, HEADER_PX + i * (tile + CAPTION_PX) + tile + 1), caption, fill=(0, 0, 0)
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = Image.registered_extensions()[path.suffix.lower()]
    atomic_write(path, lambda tmp: image.save(tmp, format=fmt))
    return width, height


@app.command("cam")
def cam_command(
    checkpoint: Checkpoint,
    dataset: DatasetOpt = None,
    data_dir: DataDir = None,
    cache_dir: CacheDir = DEFAULT_CACHE,
    arch: Arch = None,
    threat: Threat = "linf",
    model_dir: ModelDir = "models",
    cam_layer: CamLayer = None,
    n_examples: Annotated[
        int, _opt("The first N test images.", "--n-examples", "--n", min=1, max=4096)
    ] = 16,
    cam_method: Annotated[
        Optional[Literal[CAM_METHODS]], _opt("CAM method (default: the checkpoint's).", "--cam")
    ] = None,
    mask_rule: Annotated[
        Optional[Literal[tuple(MASK_RULES)]], _opt("Mask rule (default: the checkpoint's).")
    ] = None,
    compare_rules: Annotated[
        bool,
        _opt("Add a budget-map column per rule (zscore, official, random).", "--compare-rules"),
    ] = False,
    eps: Annotated[
        Optional[str], _opt("Full budget, 1/255 levels (default: the checkpoint's, else 8).")
    ] = None,
    eps_low: Annotated[
        Optional[str], _opt("Low budget, 1/255 levels (default: the checkpoint's, else 7).")
    ] = None,
    step: Annotated[str, _opt("Attack step, 1/255 levels.")] = "2",
    steps: Annotated[
        int, _opt("Attack steps for the PART adversarial example.", min=1, max=10_000)
    ] = 10,
    scale: Annotated[int, _opt("Upscaling of every tile.", min=1, max=16)] = 4,
    out: Annotated[Path, _opt("PNG to write.")] = Path("cams.png"),
    seed: Seed = 0,
    device: Device = "auto",
    threads: Threads = 0,
):
    """What PART protects: image, CAM, budget map and a PART adversarial example per row."""
    with cli_errors():
        set_threads(threads)
        from PIL import Image

        if out.is_dir() or out.suffix.lower() not in Image.registered_extensions():
            raise CliError(f"--out {out} is not an image file name (e.g. cams.png)")
        check_output(out, "--out")
        dev = pick_device(device)
        checkpoint, arch = robustbench_source(checkpoint, arch, dataset, threat, model_dir)
        target = load_for_eval(checkpoint, arch, dev, dataset, data_dir, cache_dir, cam_layer)
        trained = target.meta.config or TrainConfig()
        eps_levels = parse_levels(eps, "eps") if eps is not None else trained.eps
        low_levels = (
            parse_levels(eps_low, "eps_low")
            if eps_low is not None
            else min(trained.eps_low, eps_levels)
        )
        setup = AttackSetup.from_levels(
            eps_levels,
            parse_levels(step, "step"),
            low_levels,
            seed=seed,
            steps=steps,
            cam=cam_method or trained.cam,
            mask_rule=mask_rule or trained.mask_rule,
        )
        if n_examples > len(target.test.y):
            raise CliError(
                f"--n-examples {n_examples} is more than the {len(target.test.y)} test images"
            )
        _cam_figure(target, setup, n_examples, compare_rules, scale, out)


def _cam_figure(
    target: EvalTarget, setup: AttackSetup, n: int, compare_rules: bool, scale: int, out: Path
) -> None:
    points = target.test.first(n).to(next(target.model.parameters()).device)
    x, y, model = to_float(points.x), points.y, target.model
    torch.manual_seed(setup.seed)
    low_res = class_activation(model, x, setup.cam)
    maps = {r: eps_map(low_res, setup.eps, setup.eps_low, r, size=x.shape[-2:]) for r in MASK_RULES}
    x_adv = pgd(model, x, y, maps[setup.mask_rule], setup.step, setup.steps)
    with torch.no_grad():
        pred, adv_pred = model(x).argmax(1), model(x_adv).argmax(1)
    heat = upsample(low_res, x.shape[-2:]).clamp(0, 1)
    shown = ("zscore", "official", "random") if compare_rules else (setup.mask_rule,)
    columns = [("image", x), (setup.cam, overlay(x, heat))]
    columns += [
        (f"budget {r}", budget_picture(maps[r], setup.eps, setup.eps_low, x)) for r in shown
    ]
    columns += [("PART AE", x_adv), ("delta x eps", perturbation_picture(x_adv, x, setup.eps))]
    names = points.classes
    captions = [
        f"true {names[int(a)]} | pred {names[int(b)]} | adv {names[int(c)]}"
        for a, b, c in zip(y, pred, adv_pred, strict=True)
    ]
    width, height = save_grid(out, columns, captions, scale)
    shares = {
        rule: fraction(m == torch.tensor(setup.eps, dtype=m.dtype, device=m.device))
        for rule, m in maps.items()
    }
    console.print(
        text_table(
            f"budget maps of {n} images ({setup.cam}, eps {to_levels(setup.eps):g}/255, "
            f"eps_low {to_levels(setup.eps_low):g}/255)",
            ("rule", "share at eps", "mean budget (/255)"),
            [
                [rule, f"{100 * shares[rule]:.1f}%", f"{to_levels(m.mean().item()):.3f}"]
                for rule, m in maps.items()
            ],
            left=("rule",),
        )
    )
    console.print(f"wrote {out} ({width}x{height} px)")


# (label, compile, amp, compile mode): is compilation worth it, is bf16, are CUDA graphs on top


# ============================================================================ benchmark
# Pieces of a training step timed interleaved (A B C ... A B C ...), so that a machine
# whose speed drifts affects every piece alike; medians and quartiles, the PART/AT ratio
# per round, the first call (compilation) apart, peak memory, and achieved FLOP/s.

# Dense peak TFLOP/s of known GPUs (bf16 with --amp, else TF32, which cuDNN convolutions use).
PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "tf32": 494.7},
    "H200": {"bf16": 989.0, "tf32": 494.7},
    "A100": {"bf16": 312.0, "tf32": 156.0},
}


def quartiles(values: list[float]) -> list[float]:
    """First quartile, median, third quartile (linear interpolation)."""
    return torch.quantile(
        torch.tensor(values, dtype=torch.float64),
        torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64),
    ).tolist()


class PeakMemory:
    """Peak memory a piece adds: CUDA's allocator statistics, else the process's resident
    set sampled every millisecond by a thread (Linux /proc; 0 where unavailable)."""

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return 0

    @contextlib.contextmanager
    def measure(self, into: list):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            torch.cuda.synchronize(self.device)
            into.append(torch.cuda.max_memory_allocated(self.device) - base)
            return
        import threading

        base, peak, stop = self._rss(), [0], threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], self._rss())
                time.sleep(0.001)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            into.append(max(peak[0], self._rss()) - base)


def count_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of one call (forward and backward), counted with the
    formulas of torch.utils.flop_counter (FlopCounterMode's own registry). FlopCounterMode
    itself tracks modules with backward hooks that torch.autograd.grad, which every attack
    step calls, does not allow; a plain dispatch mode needs no hooks."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if func._overloadpacket in flop_registry:
                Count.total += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
            return out

    with Count():
        fn()
    return Count.total


def bench_pieces(
    net: nn.Module, parts: TrainingModules, cfg: TrainConfig, x: Tensor, y: Tensor
) -> dict[str, Callable]:
    """The pieces of a PART training step on one batch (the same calls training makes)."""
    setup = AttackSetup.from_config(cfg)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)
    cam_fn = parts.cam or _class_activation
    low_res = class_activation(net, x)
    budget = budget_for(net, x, setup, part_phase=True)

    def forward():
        with torch.no_grad(), eval_mode(net):
            net(x)

    def attack():
        with autocast(x.device, cfg.amp):
            make_adversarial(net, x, y, budget, setup, "ce", "pgd", parts.stepper)

    return {
        "forward (eval, no grad)": forward,
        "CAM (gradcam)": lambda: cam_fn(net, x, "gradcam"),
        "budget map (zscore)": lambda: _eps_map(
            low_res, setup.eps, setup.eps_low, "zscore", x.shape[-2:]
        ),
        f"PGD-{cfg.steps} attack": attack,
        "AT step": lambda: train_step(parts, optimizer, x, y, cfg, setup, part_phase=False),
        "PART step": lambda: train_step(parts, optimizer, x, y, cfg, setup, part_phase=True),
    }


def bench_run(
    cfg: TrainConfig, image_size: int, rounds: int, device: torch.device, peak: Optional[float]
) -> dict:
    """Every piece of a training step of `cfg` (model, batch size, steps, compile, amp),
    timed interleaved over `rounds` rounds after one first (compiling) call."""
    torch.manual_seed(0)
    net = channels_last(build_model(cfg.model, 10, image_size=image_size).to(device))
    x = torch.rand(cfg.batch_size, 3, image_size, image_size, device=device)
    y = torch.randint(0, 10, (cfg.batch_size,), device=device)
    eager_cfg = dataclasses.replace(cfg, compile=False)
    eager = bench_pieces(net, wrap_for_training(net, eager_cfg, ONE_PROCESS, device), cfg, x, y)
    pieces = bench_pieces(net, wrap_for_training(net, cfg, ONE_PROCESS, device), cfg, x, y)
    first, times, peaks = time_pieces(pieces, rounds, device)
    flops = {label: count_flops(fn) for label, fn in eager.items()}
    name = device_name(device)
    peak = peak or next(
        (v["bf16" if cfg.amp else "tf32"] for k, v in PEAK_TFLOPS.items() if k in name), None
    )
    results = {}
    for label in pieces:
        q1, median, q3 = quartiles(times[label])
        tflops = flops[label] / median / 1e12
        results[label] = {
            "ms_median": 1000 * median,
            "ms_q1": 1000 * q1,
            "ms_q3": 1000 * q3,
            "images_per_s": cfg.batch_size / median,
            "first_call_ms": 1000 * first[label],
            "peak_memory_mb": max(peaks[label]) / 2**20,
            "gflop_per_image": flops[label] / cfg.batch_size / 1e9,
            "tflops": tflops,
            "share_of_peak": tflops / peak if peak else None,
        }
    ratios = [p / a for p, a in zip(times["PART step"], times["AT step"], strict=True)]
    r1, r_median, r3 = quartiles(ratios)
    return {
        "model": cfg.model,
        "batch_size": cfg.batch_size,
        "image_size": image_size,
        "steps": cfg.steps,
        "rounds": rounds,
        "device": name,
        "compile": cfg.compile,
        "compile_mode": cfg.compile_mode if cfg.compile else None,
        "amp": cfg.amp,
        "peak_tflops": peak,
        "versions": versions(),
        "machine": machine(),
        "results": results,
        "part_over_at": {"median": r_median, "q1": r1, "q3": r3, "per_round": ratios},
    }


def time_pieces(pieces: dict[str, Callable], rounds: int, device: torch.device) -> tuple:
    """(first call's seconds, each round's seconds, each round's peak memory) per piece: the
    pieces take turns in every round, so that a machine's drift touches them alike."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    memory = PeakMemory(device)
    first, times, peaks = {}, {k: [] for k in pieces}, {k: [] for k in pieces}
    for label, fn in pieces.items():
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        first[label] = time.perf_counter() - t0
    for _ in range(rounds):
        for label, fn in pieces.items():
            with memory.measure(peaks[label]):
                t0 = time.perf_counter()
                fn()
                sync()
                times[label].append(time.perf_counter() - t0)
    return first, times, peaks


def bench_table(r: dict) -> Table:
    title = (
        f"{r['model']}, batch {r['batch_size']}, {r['image_size']} px, {r['device']}, compile "
        f"{r['compile_mode'] or 'off'}, amp {'on' if r['amp'] else 'off'}, {r['rounds']} interleaved rounds"
    )
    headers = (
        "piece",
        "ms median",
        "ms q1-q3",
        "images/s",
        "first call ms",
        "peak MB",
        "GFLOP/img",
        "TFLOP/s",
        "% of peak",
    )
    rows = [
        [
            label,
            f"{v['ms_median']:.1f}",
            f"{v['ms_q1']:.1f}-{v['ms_q3']:.1f}",
            f"{v['images_per_s']:.0f}",
            f"{v['first_call_ms']:.0f}",
            f"{v['peak_memory_mb']:.0f}",
            f"{v['gflop_per_image']:.2f}",
            f"{v['tflops']:.3f}",
            "-" if v["share_of_peak"] is None else f"{100 * v['share_of_peak']:.1f}",
        ]
        for label, v in r["results"].items()
    ]
    return text_table(title, headers, rows, left=("piece",))


GPU_SUITE = (
    ("eager", False, False, "default"),
    ("compiled", True, False, "default"),
    ("compiled + bf16", True, True, "default"),
    ("compiled + bf16 + CUDA graphs", True, True, "reduce-overhead"),
)


CPU_SUITE = (("fp32", False, False), ("bf16", False, True), ("compiled + bf16", True, True))


def bench_cpu_suite(model: str, batch_size: int, image_size: int, steps: int, rounds: int) -> dict:
    """fp32 against bf16 autocast (eager, and compiled) on this CPU: one PART step of the
    same model on the same batch, the three taking turns in every round."""
    pieces = {}
    for label, use_compile, use_amp in CPU_SUITE:
        torch.manual_seed(0)  # the same weights and batch for each
        net = channels_last(build_model(model, 10, image_size=image_size))
        x, y = (
            torch.rand(batch_size, 3, image_size, image_size),
            torch.randint(0, 10, (batch_size,)),
        )
        cfg = TrainConfig(model=model, steps=steps, amp=use_amp, compile=use_compile)
        parts = wrap_for_training(net, cfg, ONE_PROCESS, torch.device("cpu"))
        pieces[label] = bench_pieces(net, parts, cfg, x, y)["PART step"]
    first, times, _ = time_pieces(pieces, rounds, torch.device("cpu"))
    q = {label: quartiles(t) for label, t in times.items()}
    results = {
        label: {
            "ms_median": 1000 * q[label][1],
            "ms_q1_q3": [1000 * q[label][0], 1000 * q[label][2]],
            "images_per_s": batch_size / q[label][1],
            "speedup_over_fp32": q["fp32"][1] / q[label][1],
            "first_call_ms": 1000 * first[label],
        }
        for label in pieces
    }
    bf16 = cpu_bf16() or "none"
    return {
        **{"suite": "cpu", "model": model, "batch_size": batch_size, "image_size": image_size},
        **{"steps": steps, "rounds": rounds, "cpu": cpu_model(), "bf16_units": bf16},
        "capability": torch.backends.cpu.get_cpu_capability(),
        "amp_by_default": bf16 in part.AMP_BY_DEFAULT,
        **{"threads": torch.get_num_threads(), "versions": versions(), "results": results},
    }


def show_cpu_suite(r: dict) -> None:
    title = (
        f"PART step, {r['model']}, batch {r['batch_size']}, {r['image_size']} px, PGD-{r['steps']}: "
        f"{r['cpu']} ({r['capability']}, bf16 units: {r['bf16_units']}), {r['threads']} threads, "
        f"{r['rounds']} interleaved rounds; --amp by default: {'on' if r['amp_by_default'] else 'off'}"
    )
    headers = ("mode", "ms median", "ms q1-q3", "images/s", "x fp32", "first call ms")
    rows = [
        [label, f"{v['ms_median']:.1f}", "{:.1f}-{:.1f}".format(*v["ms_q1_q3"])]
        + [f"{v['images_per_s']:.0f}", f"{v['speedup_over_fp32']:.2f}", f"{v['first_call_ms']:.0f}"]
        for label, v in r["results"].items()
    ]
    console.print(text_table(title, headers, rows, left=("mode",)))


@app.command("bench")
def bench_command(
    model: Annotated[str, _opt(f"Architecture: {ARCH_HELP}.")] = "resnet18",
    batch_size: Annotated[int, _opt("Batch size.", min=2, max=65_536)] = 128,
    image_size: Annotated[int, _opt("Input side.", min=8, max=MAX_IMAGE_SIZE)] = 32,
    steps: Annotated[int, _opt("Attack steps (training uses 10).", min=1, max=10_000)] = 10,
    rounds: Annotated[
        int,
        _opt(
            "Interleaved timing rounds (each piece once per round).", "--rounds", min=1, max=10_000
        ),
    ] = 7,
    device: Device = "auto",
    compile: Annotated[
        Optional[bool],
        _opt(
            "torch.compile the attack step, CAM and update (default: on with CUDA).",
            "--compile/--no-compile",
        ),
    ] = None,
    compile_mode: Annotated[Literal[COMPILE_MODES], _opt("torch.compile mode.")] = "default",
    amp: Annotated[
        bool, _opt("bf16 autocast for the attack and update (CUDA or CPU).", "--amp/--no-amp")
    ] = False,
    peak_tflops: Annotated[
        Optional[float], _opt("The device's peak TFLOP/s (default: known for H100/H200/A100).")
    ] = None,
    suite: Annotated[
        Optional[Literal["gpu", "cpu"]],
        _opt(
            "gpu: eager, compiled, compiled + bf16, + CUDA graphs; cpu: a PART step in fp32, "
            "bf16 and compiled bf16 side by side (both ignore --compile/--amp)."
        ),
    ] = None,
    json_out: JsonOut = None,
    threads: Threads = 0,
):
    """Time each piece of a PART training step on this machine (random data): medians of
    interleaved rounds, the PART/AT step ratio, compile time, peak memory, FLOP/s."""
    with cli_errors():
        set_threads(threads)
        check_output(json_out, "--json")
        if peak_tflops is not None and not (math.isfinite(peak_tflops) and peak_tflops > 0):
            raise CliError(f"--peak-tflops must be a positive number, got {peak_tflops}")
        dev = pick_device(device)
        build_model(model, 10)  # an unknown name fails here, before any work
        if suite == "gpu" and dev.type != "cuda":
            raise CliError(
                f"--suite gpu compares compiled, bf16 and CUDA-graph steps: it needs a CUDA device, not {dev.type}"
            )
        if suite == "cpu":
            if dev.type != "cpu":
                raise CliError(f"--suite cpu compares fp32 and bf16 on the CPU, not on {dev.type}")
            r = bench_cpu_suite(model, batch_size, image_size, steps, rounds)
            show_cpu_suite(r)
            if json_out is not None:
                write_json(json_out, r)
            return
        configs = (
            GPU_SUITE
            if suite == "gpu"
            else (("", compile if compile is not None else dev.type == "cuda", amp, compile_mode),)
        )
        runs = []
        for label, use_compile, use_amp, mode in configs:
            cfg = TrainConfig(
                model=model,
                steps=steps,
                amp=use_amp,
                compile=use_compile,
                compile_mode=mode,
                batch_size=batch_size,
            )
            r = bench_run(cfg, image_size, rounds, dev, peak_tflops)
            r["label"] = label
            console.print(bench_table(r))
            ratio = r["part_over_at"]
            console.print(
                f"PART step / AT step: {ratio['median']:.3f} (q1-q3 {ratio['q1']:.3f}-{ratio['q3']:.3f}, {rounds} rounds)",
            )
            runs.append(r)
        if suite == "gpu":
            base = runs[0]["results"]["PART step"]["ms_median"]
            for r in runs[1:]:
                console.print(
                    f"{r['label']}: PART step {base / r['results']['PART step']['ms_median']:.2f}x eager",
                )
        if json_out is not None:
            write_json(json_out, runs[0] if len(runs) == 1 else {"suite": suite, "runs": runs})
