"""Property tests for part_tools.py (report, cam, bench): CPU only, synthetic data.

Run: python -m pytest -q test_part_tools.py (the README's test command runs both files).
"""

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import part
import part_tools  # it adds report, cam and bench to part.app
from test_part import (
    REFERENCE_ATTACK,
    _no_bf16_units,  # noqa: F401  (an autouse fixture: in-process runs in fp32)
    attack_reference,  # noqa: F401  (a fixture)
    ROOT,
    _write_folder,
    cli,
    needs_robustbench,
    robustbench_zoo,
    smoke_run,  # noqa: F401  (a fixture)
    MICRO,
    batch,  # noqa: F401  (a fixture)
    needs_timm,
    zoo_model_trains_and_its_cam_equals_a_loop,
    _accuracies,
    needs_hub,
    TINY,
    _attack_json,
    _row,
    fake_ckpt,  # noqa: F401  (a fixture)
    fake_run,  # noqa: F401  (a fixture)
    in_terminal,
    invoke,
    seeded,
)


@pytest.mark.parametrize("command", ["cam", "bench"])
def test_the_tools_say_an_unknown_device_in_one_line(fake_run, tmp_path, command):
    target = [] if command == "bench" else [fake_run / "last.safetensors"]
    extra = ["--out", tmp_path / "c.png"] if command == "cam" else []
    for device in ("foo", "gpu"):
        r = invoke(command, *target, "--device", device, *extra)
        assert (
            r.exit_code == 1
            and f"unknown device '{device}'" in r.stderr
            and len(r.stderr.strip().splitlines()) == 1
        )


# ---------------------------------------------------------------- timm models


@needs_timm
@pytest.mark.parametrize("name", ["timm:resnet18", "timm:mobilenetv3_small_050"])
def test_timm_models_train_with_part_and_their_batched_cam_equals_a_loop(batch, name):
    zoo_model_trains_and_its_cam_equals_a_loop(batch, name)


@pytest.mark.slow  # a real run, processes or a terminal: over 2 s
@needs_timm
def test_a_plain_timm_state_dict_loads_with_its_own_normalisation_and_the_cam_layer_can_be_chosen(
    batch, tmp_path
):
    import timm

    x = batch[0][:2]
    torch.manual_seed(0)
    plain = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    torch.save(plain.state_dict(), tmp_path / "t.pth")
    ours, meta = part.load_checkpoint(tmp_path / "t.pth", arch="timm:resnet18")
    cfg = plain.pretrained_cfg
    mean, std = (
        torch.tensor(cfg["mean"]).view(1, 3, 1, 1),
        torch.tensor(cfg["std"]).view(1, 3, 1, 1),
    )
    with torch.no_grad():
        assert meta.num_classes == 10 and torch.allclose(
            ours(x), plain((x - mean) / std), atol=1e-5
        )
    assert part.build_model("timm:resnet18", 10, cam_layer="layer1").cam_layer == "net.layer1"
    assert part.class_activation(
        part.build_model("timm:resnet18", 10, cam_layer="layer1").eval(), x
    ).shape == (2, 1, 8, 8)
    r = invoke(
        "attack",
        tmp_path / "t.pth",
        "--arch",
        "timm:resnet18",
        "--dataset",
        "synthetic",
        "--attacks",
        "natural,pgd2",
        "--n-examples",
        16,
        "--json",
        tmp_path / "r.json",
    )
    assert r.exit_code == 0, r.stderr
    assert (
        json.loads((tmp_path / "r.json").read_text())["checkpoints"][0]["arch"] == "timm:resnet18"
    )
    for args, message in [
        (["--model", "timm:nonet"], "unknown timm model 'nonet'"),
        (["--model", "timm:resnet18", "--cam-layer", "nolayer"], "has no such module"),
    ]:
        r = invoke("train", "--preset", "smoke", *args, "--out", tmp_path / "bad")
        assert r.exit_code == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---------------------------------------------------------------- model folders (export --format hf)


@needs_hub
def test_an_hf_model_folder_has_a_card_the_hub_parses_and_loads_as_a_checkpoint(fake_run, tmp_path):
    from huggingface_hub import ModelCard

    ckpt = fake_run / "best.safetensors"
    assert (
        invoke(
            "attack",
            ckpt,
            "--attacks",
            "fgsm,pgd2",
            "--n-examples",
            16,
            "--json",
            tmp_path / "r.json",
        ).exit_code
        == 0
    )
    accuracy = _accuracies(tmp_path / "r.json")[0][1]
    r = invoke(
        "export",
        ckpt,
        "--format",
        "hf",
        "--out",
        tmp_path / "hf",
        "--report",
        tmp_path / "r.json",
        "--license",
        "apache-2.0",
    )
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    card = ModelCard.load(tmp_path / "hf" / "README.md")
    assert (
        card.data.license == "apache-2.0"
        and card.data.library_name == "part"
        and card.data.datasets == ["synthetic"]
    )
    found = {e.metric_name.split(" (")[0]: e.metric_value for e in card.data.eval_results}
    assert found == {
        part_tools.HF_METRIC_NAMES.get(k, k): round(100 * v, 2) for k, v in accuracy.items()
    }
    assert all(
        e.dataset_type == "synthetic" and "16 test images" in e.metric_name
        for e in card.data.eval_results
    )
    assert "on the first 16 synthetic test images at eps 8/255; not the standard" in card.text
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architecture"] == "cnn" and config["id2label"]["0"] == part.SYNTHETIC_CLASSES[0]
    # the folder is a checkpoint: same weights, same sha256 (so the report still matches it)
    model, meta = part.load_checkpoint(tmp_path / "hf")
    original = part.load_checkpoint(ckpt)[0]
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), original.state_dict().values(), strict=True)
    )
    r = invoke(
        "attack",
        tmp_path / "hf",
        "--attacks",
        "fgsm,pgd2",
        "--n-examples",
        16,
        "--json",
        tmp_path / "again.json",
    )
    assert r.exit_code == 0 and _accuracies(tmp_path / "again.json")[0][1] == accuracy
    r = invoke(
        "export",
        tmp_path / "hf",
        "--format",
        "onnx",
        "--out",
        tmp_path / "onnx",
        "--report",
        tmp_path / "r.json",
    )
    assert r.exit_code == 0 and (tmp_path / "onnx" / "hf.onnx").is_file(), r.stderr


# ---------------------------------------------------------------- trackers (TensorBoard, W&B)


def wandb_records(folder: Path) -> list:
    """The records of W&B's offline run files under `folder` (a LevelDB-style log of
    protobuf records after a 7-byte header), read the way `wandb sync` reads them."""
    import struct

    from wandb.proto import wandb_internal_pb2

    records = []
    for path in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, pieces = path.read_bytes(), 7, b""
        assert data.startswith(b":W&B")
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            pieces, pos = pieces + data[pos + 7 : pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # a whole record, or the last piece of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pieces)
                records.append(record)
                pieces = b""
            elif kind == 0:
                break
    return records


def wandb_key(item) -> str:
    return item.key or "/".join(item.nested_key)


@pytest.mark.skipif(
    importlib.util.find_spec("wandb") is None, reason="wandb not installed (pip install wandb)"
)
@pytest.mark.slow  # a real run, processes or a terminal: over 2 s
def test_wandb_offline_logs_the_config_and_every_epoch_and_a_resume_continues_the_same_run(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tiny = [
        *MICRO,
        "--warmup-epochs",
        0,
        "--wandb",
        "part-test",
        "--out",
        tmp_path / "run",
    ]
    assert invoke("train", *tiny, "--epochs", 1).exit_code == 0
    r = invoke("train", *tiny, "--epochs", 2, "--resume")
    assert r.exit_code == 0, r.stderr
    records = wandb_records(tmp_path / "run")
    runs = [rec.run for rec in records if rec.WhichOneof("record_type") == "run"]
    # resumed: one W&B run
    assert {run.project for run in runs} == {"part-test"} and len({run.run_id for run in runs}) == 1
    config = {wandb_key(u): json.loads(u.value_json) for u in runs[0].config.update}
    assert config["method"] == "part" and config["preset"] == "smoke" and config["epochs"] == 1
    history = [
        {wandb_key(i): json.loads(i.value_json) for i in rec.history.item}
        for rec in records
        if rec.WhichOneof("record_type") == "history"
    ]
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [h["epoch"] for h in history] == [1, 2] and [h["pgd20"] for h in history] == [
        row["pgd20"] for row in rows
    ]
    r = invoke(
        "attack",
        tmp_path / "run" / "last.safetensors",
        "--attacks",
        "natural,fgsm",
        "--n-examples",
        16,
        "--json",
        tmp_path / "rep" / "r.json",
        "--wandb",
        "part-test",
    )
    assert r.exit_code == 0, r.stderr
    summary = {
        wandb_key(i): json.loads(i.value_json)
        for rec in wandb_records(tmp_path / "rep")
        if rec.WhichOneof("record_type") == "summary"
        for i in rec.summary.update
    }
    assert (
        summary[f"{tmp_path / 'run' / 'last.safetensors'}/fgsm"]
        == _accuracies(tmp_path / "rep" / "r.json")[0][1]["fgsm"]
    )


@pytest.mark.slow
def test_tensorboard_is_used_when_installed_and_otherwise_said(tmp_path):
    r = invoke(
        "train",
        *TINY,
        "--epochs",
        1,
        "--warmup-epochs",
        0,
        "--tensorboard",
        "--out",
        tmp_path / "run",
    )
    assert r.exit_code == 0, r.stderr
    if importlib.util.find_spec("tensorboard") is None:
        assert "needs the tensorboard package" in r.stderr
    else:
        assert any((tmp_path / "run" / "tensorboard").iterdir())


# ---------------------------------------------------------------- leaderboard entry


def test_a_leaderboard_entry_is_written_only_for_the_standard_evaluation_unless_partial(
    fake_run, tmp_path
):
    ckpt, report = fake_run / "best.safetensors", tmp_path / "r.json"
    args = ["--attacks", "natural,fgsm", "--n-examples", 32, "--json", report]
    assert invoke("attack", ckpt, *args).exit_code == 0
    two = tmp_path / "two.json"
    assert invoke("attack", ckpt, fake_run / "last.safetensors", *args[:-1], two).exit_code == 0
    edited = json.loads(report.read_text())
    edited["checkpoints"][0]["accuracy"]["fgsm"] = 1.5
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    for path, message in [
        (report, "do not include aa (AutoAttack); 32 points, not 10,000"),
        (two, "holds 2 checkpoints"),
        (tmp_path / "edited.json", "fractions in [0, 1]"),
        (tmp_path / "missing.json", "not found"),
    ]:
        r = invoke("leaderboard", path, "--out", tmp_path / "rb.json")
        assert r.exit_code == 1 and message in r.stderr and len(r.stderr.splitlines()) == 1, (
            r.stderr
        )
    assert not (tmp_path / "rb.json").exists()
    r = invoke("leaderboard", report, "--out", tmp_path / "rb.json", "--partial")
    assert r.exit_code == 0, r.stderr
    entry, accuracy = json.loads((tmp_path / "rb.json").read_text()), _accuracies(report)[0][1]
    assert entry["clean_acc"] == f"{100 * accuracy['natural']:.2f}" and entry["eps"] == "8/255"
    assert entry["autoattack_acc"] == "" and entry["architecture"] == "cnn"
    assert "partial" in entry["footnote"] and "first 32 synthetic test points" in entry["footnote"]


# ---------------------------------------------------------------- comparing runs (report)


def _report_file(path, rows, **settings):
    """An `attack --json` report as `attack` writes it, with made-up figures."""
    checkpoints = [
        {
            "path": f"runs/{method}-s{seed}/last.safetensors",
            "n_examples": 1000,
            "dataset": "cifar10",
            "eps_levels": 8.0,
            "seed": 0,
            "accuracy": accuracy,
            "config": dataclasses.asdict(
                part.TrainConfig(method=method, seed=seed, out=f"runs/{method}-s{seed}", **settings)
            ),
        }
        for method, seed, accuracy in rows
    ]
    path.write_text(json.dumps({"checkpoints": checkpoints}))
    return path


def test_report_gives_mean_std_and_the_seed_paired_difference_a_hand_computation_gives(tmp_path):
    a = [
        ("part", 0, {"natural": 0.52, "pgd20": 0.30, "worst": 0.26}),
        ("part", 1, {"natural": 0.55, "pgd20": 0.29, "worst": 0.25}),
    ]
    b = [
        ("at", 0, {"natural": 0.50, "pgd20": 0.31, "worst": 0.27}),
        ("at", 1, {"natural": 0.51, "pgd20": 0.30, "worst": 0.25}),
    ]
    _report_file(tmp_path / "a.json", a)
    _report_file(tmp_path / "b.json", b)
    r = invoke(
        "report",
        tmp_path / "a.json",
        tmp_path / "b.json",
        "--compare",
        "method=part",
        "method=at",
        "--json",
        tmp_path / "r.json",
        "--markdown",
        tmp_path / "r.md",
        "--csv",
        tmp_path / "r.csv",
        "--plot",
        tmp_path / "tradeoff.png",
    )
    assert r.exit_code == 0, r.stderr
    out = json.loads((tmp_path / "r.json").read_text())
    groups = {g["label"]: g for g in out["groups"]}
    assert set(groups) == {"method=part", "method=at"} and groups["method=part"]["seeds"] == [0, 1]
    nat = groups["method=part"]["stats"]["natural"]
    assert (
        nat["mean"] == pytest.approx(0.535)
        and nat["std"] == pytest.approx(math.sqrt(2 * 0.015**2))
        and nat["n"] == 2
    )
    d = out["comparison"]["columns"]["natural"]
    diffs = [0.52 - 0.50, 0.55 - 0.51]
    mean, sd = sum(diffs) / 2, math.sqrt(sum((v - 0.03) ** 2 for v in diffs))
    assert d["mean"] == pytest.approx(mean) and d["std"] == pytest.approx(sd)
    assert d["ci95"] == pytest.approx(
        [mean - 12.706 * sd / math.sqrt(2), mean + 12.706 * sd / math.sqrt(2)]
    )
    assert d["distinguishable"] is False and "NOT distinguishable from zero" in r.stdout
    assert (
        "method=part" in (tmp_path / "r.md").read_text()
        and (tmp_path / "tradeoff.png").stat().st_size > 1000
    )
    assert "53.50 ± 2.12" in (tmp_path / "r.md").read_text()


def test_report_compares_new_arms_measured_with_fewer_attacks_on_their_common_columns_and_reads_old_configs(
    tmp_path,
):
    old = [
        (
            "part",
            s,
            {"natural": 0.42 + s / 100, "pgd20": 0.25, "cw20": 0.21, "aa": 0.20, "worst": 0.20},
        )
        for s in (0, 1, 2)
    ]
    new = [
        ("part", s, {"natural": 0.40 + s / 100, "pgd20": 0.26, "cw20": 0.22, "worst": 0.22})
        for s in (0, 1, 2)
    ]
    _report_file(tmp_path / "old.json", old)
    # written by part 0.4: no optimizer, schedule, ... keys
    added = set(part_tools.SETTINGS_ADDED_IN_0_5)
    report = json.loads((tmp_path / "old.json").read_text())
    for row in report["checkpoints"]:
        row["config"] = {k: v for k, v in row["config"].items() if k not in added}
    (tmp_path / "old.json").write_text(json.dumps(report))
    _report_file(tmp_path / "new.json", new, mask_rule="inverse")
    r = invoke(
        "report",
        tmp_path / "old.json",
        tmp_path / "new.json",
        "--compare",
        "mask_rule=zscore",
        "mask_rule=inverse",
        "--json",
        tmp_path / "r.json",
    )
    assert r.exit_code == 0, r.stderr
    out = json.loads((tmp_path / "r.json").read_text())
    assert {g["label"] for g in out["groups"]} == {
        "mask_rule=zscore",
        "mask_rule=inverse",
    }  # only the rule differs
    columns = out["comparison"]["columns"]
    assert set(columns) == {
        "natural",
        "pgd20",
        "cw20",
    }  # aa only in one; worst is over different attacks
    assert columns["natural"]["mean"] == pytest.approx(0.02) and columns["pgd20"][
        "mean"
    ] == pytest.approx(-0.01)
    _report_file(tmp_path / "other.json", [(m, s, f) for m, s, f in new], mask_rule="random")
    report = json.loads((tmp_path / "other.json").read_text())
    for row in report["checkpoints"]:
        row["n_examples"] = 500
    (tmp_path / "other.json").write_text(json.dumps(report))
    r = invoke(
        "report",
        tmp_path / "old.json",
        tmp_path / "other.json",
        "--compare",
        "mask_rule=zscore",
        "mask_rule=random",
    )
    assert r.exit_code == 1 and "were measured differently" in r.stderr


def test_report_groups_at_runs_whatever_their_part_only_settings_hold(tmp_path):
    figures = {"natural": 0.5, "worst": 0.2}
    _report_file(
        tmp_path / "zscore.json", [("part", 0, figures), ("at", 0, figures)], mask_rule="zscore"
    )
    _report_file(
        tmp_path / "uniform.json",
        [("part", 0, figures), ("at", 1, figures)],
        mask_rule="uniform",
        cam="layercam",
    )
    r = invoke(
        "report", tmp_path / "zscore.json", tmp_path / "uniform.json", "--json", tmp_path / "r.json"
    )
    assert r.exit_code == 0, r.stderr
    groups = {
        g["label"]: g["seeds"] for g in json.loads((tmp_path / "r.json").read_text())["groups"]
    }
    assert groups == {
        "method=part, cam=gradcam, mask_rule=zscore": [0],
        "method=at": [0, 1],
        "method=part, cam=layercam, mask_rule=uniform": [0],
    }


def test_report_refuses_groups_that_cannot_be_paired(tmp_path):
    _report_file(tmp_path / "a.json", [("part", 0, {"natural": 0.5, "worst": 0.2})])
    _report_file(tmp_path / "b.json", [("at", 1, {"natural": 0.5, "worst": 0.2})])
    r = invoke(
        "report", tmp_path / "a.json", tmp_path / "b.json", "--compare", "method=part", "method=at"
    )
    assert r.exit_code == 1 and "share no seed" in r.stderr
    r = invoke(
        "report", tmp_path / "a.json", tmp_path / "b.json", "--compare", "method=mart", "method=at"
    )
    assert r.exit_code == 1 and "matches 0 groups" in r.stderr


def test_report_reads_run_folders_too(tmp_path):
    assert invoke("train", *TINY, "--out", tmp_path / "run").exit_code == 0
    r = invoke("report", tmp_path / "run")
    assert r.exit_code == 0 and "training-time PGD-20" in r.stdout


def test_report_skips_what_is_not_a_run_or_an_attack_report_with_one_note(tmp_path):
    for seed in (0, 1):
        folder = tmp_path / f"at-s{seed}"
        folder.mkdir()
        cfg = dataclasses.asdict(part.TrainConfig(seed=seed, method="at", epochs=1))
        (folder / "config.json").write_text(json.dumps({"config": cfg}))
        (folder / "metrics.jsonl").write_text(
            json.dumps({"epoch": 1, "natural": 0.5 + seed / 10, "pgd20": 0.2}) + "\n"
        )
    (tmp_path / "report.md").write_text("| a |")
    (tmp_path / "plots").mkdir()
    (tmp_path / "summary.json").write_text(json.dumps({"groups": []}))
    paths = sorted(tmp_path.iterdir())
    for _ in range(2):  # the second time its own report.md/json sit in the glob too
        r = invoke(
            "report",
            *paths,
            "--markdown",
            tmp_path / "report.md",
            "--json",
            tmp_path / "summary.json",
        )
        assert r.exit_code == 0, r.output
        assert "skipped 3 path(s)" in r.output and "55.00 ± 7.07" in r.output
    assert invoke("report", tmp_path / "report.md").exit_code == 1


def test_an_interrupted_attack_says_where_its_finished_work_is_kept(
    fake_ckpt, tmp_path, monkeypatch
):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(part, "evaluate_suite", interrupted)
    r = invoke("attack", fake_ckpt, "--attacks", "fgsm", "--n", 8, "--json", tmp_path / "r.json")
    state = tmp_path / "r.json.state.safetensors"
    assert r.exit_code == 130 and f"kept in {state}; the same command continues" in r.stderr
    r = invoke("attack", fake_ckpt, "--attacks", "fgsm", "--n", 8)
    assert r.exit_code == 130 and "with --state FILE (or a --json report)" in r.stderr


def test_seeds_that_agree_exactly_get_an_interval_not_a_zero_width_one(tmp_path):
    same = {"natural": 0.5, "pgd20": 0.2, "worst": 0.2}
    rows = [_row(s, same, method="at") for s in (0, 1)]
    rows += [_row(s, {**same, "natural": 0.52}) for s in (0, 1)]  # +2 points on both seeds
    r = invoke(
        "report",
        _attack_json(tmp_path / "a.json", rows),
        "--compare",
        "method=part",
        "method=at",
        "--json",
        tmp_path / "out.json",
    )
    assert r.exit_code == 0, r.stderr
    natural = json.loads((tmp_path / "out.json").read_text())["comparison"]["columns"]["natural"]
    low, high = natural["ci95"]
    assert natural["sampling_floor"] and low < 0.02 < high and high - low > 0.1  # 100 points
    assert "binomial noise" in r.stdout and "+0.00 to +0.00" not in r.stdout
    shown = f"(±{100 * part.half_width(0.5, 100):.1f})"  # one evaluation of 100 points
    assert shown == "(±9.6)" and shown in r.stdout


def test_report_compares_only_what_is_comparable(tmp_path):
    a = _attack_json(
        tmp_path / "a.json",
        [
            _row(0, {"natural": 0.5, "pgd20": 0.2, "worst": 0.2}),
            _row(1, {"natural": 0.6, "pgd20": 0.3, "worst": 0.3}),
        ],
    )
    b = _attack_json(tmp_path / "b.json", [_row(2, {"natural": 0.5, "pgd50": 0.1, "worst": 0.1})])
    r = invoke("report", a, b, "--json", tmp_path / "out.json")
    assert r.exit_code == 0, r.stderr
    groups = json.loads((tmp_path / "out.json").read_text())["groups"]
    assert sorted(len(g["seeds"]) for g in groups) == [
        1,
        2,
    ]  # other attacks: another group, never pooled
    for name, accuracy, seed in (
        ("nan", {"natural": math.nan, "worst": 0.1}, 0),
        ("500", {"natural": 5.0, "worst": 0.1}, 0),
        ("seed", {"natural": 0.5, "worst": 0.1}, "1"),
    ):
        row = _row(0, accuracy)
        row["config"]["seed"] = seed
        r = invoke("report", _attack_json(tmp_path / f"{name}.json", [row]))
        assert r.exit_code == 1 and (
            "fractions in [0, 1]" in r.stderr or "not an integer" in r.stderr
        ), (name, r.stderr)
    r = invoke("report", a, _attack_json(tmp_path / "empty.json", []))
    assert r.exit_code == 0 and "evaluated no checkpoint" in r.stderr
    r = invoke("report", a, "--compare", "method=part", "method=part")
    assert r.exit_code == 1 and "twice" in r.stderr
    for seed, epochs_done in (
        (0, 4),
        (1, 1),
    ):  # a run killed after epoch 1 of 4 is left out, and said
        folder = tmp_path / f"run{seed}"
        folder.mkdir()
        (folder / "config.json").write_text(
            json.dumps({"config": dataclasses.asdict(part.TrainConfig(seed=seed, epochs=4))})
        )
        (folder / "metrics.jsonl").write_text(
            "".join(
                json.dumps({"epoch": e + 1, "natural": 0.5, "pgd20": 0.2}) + "\n"
                for e in range(epochs_done)
            )
        )
    r = invoke("report", tmp_path / "run0", tmp_path / "run1")
    assert r.exit_code == 0 and "left out 1 unfinished run" in r.stderr and "run1" in r.stderr
    (tmp_path / "run2").mkdir()  # stopped in epoch 1: a config, no epoch yet
    (tmp_path / "run2" / "config.json").write_text((tmp_path / "run1" / "config.json").read_text())
    r = invoke("report", tmp_path / "run0", tmp_path / "run1", tmp_path / "run2")
    assert r.exit_code == 0 and "left out 2 unfinished run" in r.stderr and "run2" in r.stderr


# ---------------------------------------------------------------- CAM figures (cam)


def test_the_cam_figure_has_the_expected_size_and_reports_each_rule(fake_run, tmp_path):
    out = tmp_path / "cams.png"
    import numpy as np
    from PIL import Image

    r = invoke(
        "cam",
        fake_run / "best.safetensors",
        "--n",
        5,
        "--compare-rules",
        "--scale",
        3,
        "--out",
        out,
    )
    assert r.exit_code == 0, r.output

    with Image.open(out) as im:
        assert (
            im.size == part_tools.figure_size(5, 7, 32, 3) == (2 + 7 * (96 + 2), 14 + 5 * (96 + 14))
        )
        pixels = torch.from_numpy(np.asarray(im).copy()).float()
    assert pixels.std() > 20  # a picture, not a blank page
    for rule in part.MASK_RULES:
        assert rule in r.stdout
    assert "share at eps" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--step", "-5"], "--step must be"),
        (["--step", "nan"], "finite"),
        (["--eps", "1000"], "larger than the whole"),
        (["--device", "foo"], "unknown device 'foo'"),
        (["--seed", "99999999999999999999999"], "Invalid value for '--seed'"),
    ],
)
def test_cam_refuses_bad_budgets_and_devices(fake_run, tmp_path, args, message):
    r = invoke("cam", fake_run / "last.safetensors", "--n", 2, "--out", tmp_path / "c.png", *args)
    assert r.exit_code != 0 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (
        r.stderr
    )


def test_cam_refuses_an_output_that_is_not_an_image_file_and_keeps_what_is_there(
    fake_ckpt, tmp_path
):
    for out in (tmp_path, tmp_path / "cams.txt"):
        r = invoke("cam", fake_ckpt, "--n", 2, "--out", out)
        assert r.exit_code == 1 and "not an image file name" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


@needs_hub
def test_cam_draws_from_a_model_folder_as_from_its_checkpoint(fake_ckpt, tmp_path):
    assert invoke("export", fake_ckpt, "--format", "hf", "--out", tmp_path / "hf").exit_code == 0
    assert (
        invoke("cam", tmp_path / "hf", "--n-examples", 4, "--out", tmp_path / "cam.png").exit_code
        == 0
    )
    assert (tmp_path / "cam.png").stat().st_size > 0


@pytest.mark.slow  # a real run, processes or a terminal: over 2 s
def test_report_and_cam_in_a_terminal(fake_ckpt, tmp_path):
    r = invoke(
        "attack",
        fake_ckpt,
        "--attacks",
        "natural,pgd2",
        "--n-examples",
        16,
        "--json",
        tmp_path / "r.json",
    )
    assert r.exit_code == 0, r.stderr
    code, screen = in_terminal("cam", fake_ckpt, "--n-examples", 4, "--out", tmp_path / "cams.png")
    assert code == 0 and (tmp_path / "cams.png").stat().st_size > 0, screen[-2000:]
    (tmp_path / "export").mkdir()
    # the folder is skipped, said once
    code, screen = in_terminal("report", tmp_path / "r.json", tmp_path / "export")
    assert code == 0 and "skipped 1 path" in screen and "natural" in screen, screen[-2000:]


# ---------------------------------------------------------------- benchmark (bench)


def test_bench_interleaves_the_pieces_and_reports_ratio_memory_and_flops(tmp_path):
    r = invoke(
        "bench",
        "--model",
        "cnn",
        "--batch-size",
        4,
        "--rounds",
        3,
        "--steps",
        2,
        "--json",
        tmp_path / "b.json",
    )
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "b.json").read_text())
    results = info["results"]
    assert len(results) == 6 and all(
        v["ms_q1"] <= v["ms_median"] <= v["ms_q3"] for v in results.values()
    )
    assert len(info["part_over_at"]["per_round"]) == 3 and info["part_over_at"]["median"] > 0
    forward = results["forward (eval, no grad)"]["gflop_per_image"]
    assert forward == pytest.approx(
        part_tools.count_flops(lambda: seeded()(torch.rand(1, 3, 32, 32))) / 1e9
    )
    # 2 x (forward + input gradient)
    assert results["PGD-2 attack"]["gflop_per_image"] == pytest.approx(4 * forward, rel=0.05)
    assert all(v["first_call_ms"] > 0 and v["peak_memory_mb"] >= 0 for v in results.values())
    assert info["versions"]["torch"] == torch.__version__ and info["compile"] is False


@pytest.mark.slow
def test_bench_cpu_suite_times_fp32_and_bf16_side_by_side_and_names_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(part_tools, "cpu_bf16", lambda: "amx")  # the rule, not this machine
    out = tmp_path / "cpu.json"
    suite = ["--suite", "cpu", "--model", "cnn", "--batch-size", 4, "--steps", 1, "--rounds", 2]
    r = invoke("bench", *suite, "--json", out)
    assert r.exit_code == 0, r.output
    info = json.loads(out.read_text())
    assert list(info["results"]) == ["fp32", "bf16", "compiled + bf16"]
    assert info["results"]["fp32"]["speedup_over_fp32"] == 1.0
    assert all(v["images_per_s"] > 0 and v["first_call_ms"] > 0 for v in info["results"].values())
    assert info["capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["bf16_units"] == "amx" and info["amp_by_default"] is True
    assert "bf16 units: amx" in r.stdout and "--amp by default: on" in r.stdout


def test_bench_checks_its_options_before_the_work(tmp_path):
    r = invoke(
        "bench",
        "--model",
        "cnn",
        "--batch-size",
        4,
        "--rounds",
        1,
        "--steps",
        1,
        "--json",
        tmp_path / "new" / "b.json",
    )
    assert r.exit_code == 0, r.output
    results = json.loads((tmp_path / "new" / "b.json").read_text())["results"]
    assert len(results) == 6 and all(v["images_per_s"] > 0 for v in results.values())
    r = invoke("bench", "--suite", "gpu", "--device", "cpu")
    assert r.exit_code == 1 and "needs a CUDA device" in r.stderr


# ---------------------------------------------------------------- attack's tools: sweeps, saved examples, resumable evaluation, RobustBench models


ATTACKER = """
import os, signal, sys
import part, part_tools
part_tools.EvalState.SAVE_EVERY_S = 0  # write the state after every batch
at, count, real = int(os.environ["KILL_AT"]), [0], part.save_tensors
def save(path, tensors, metadata):
    real(path, tensors, metadata)
    if str(path).endswith(".state.safetensors"):
        count[0] += 1
        if count[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
part.save_tensors = part_tools.save_tensors = save
sys.argv[0] = "part.py"
part.app()
"""


def test_a_sweep_whose_accuracy_still_falls_has_not_converged():
    specs = part.parse_attacks("pgd10,pgd20,pgd50")
    falling = {"accuracy": {"natural": 0.8, "pgd10": 0.5, "pgd20": 0.45, "pgd50": 0.40}}
    flat = {"accuracy": {"natural": 0.8, "pgd10": 0.41, "pgd20": 0.40, "pgd50": 0.40}}
    found = part_tools.convergence_warnings(specs, falling, 1000, [10, 20, 50])
    assert len(found) == 1 and "pgd: accuracy still falls from 20 to 50 steps" in found[0]
    assert part_tools.convergence_warnings(specs, flat, 1000, [10, 20, 50]) == []


@pytest.mark.parametrize("at", [2, 9])
@pytest.mark.slow
def test_a_killed_attack_continues_to_the_uninterrupted_report(
    smoke_run, attack_reference, tmp_path, at
):
    checkpoints = [smoke_run / "best.safetensors", smoke_run / "last.safetensors"]
    args = ["attack", *checkpoints, *REFERENCE_ATTACK, "--save-adv", tmp_path / "adv"]
    args += ["--json", tmp_path / "r.json"]  # args[:-4]: the attack without these two
    killed = subprocess.run(
        [sys.executable, "-c", ATTACKER, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "KILL_AT": str(at)},
        timeout=600,
    )
    assert (
        killed.returncode == -signal.SIGKILL and (tmp_path / "r.json.state.safetensors").is_file()
    )
    r = cli(*args)
    assert r.returncode == 0 and "resuming the evaluation" in r.stderr, r.stderr
    assert _accuracies(tmp_path / "r.json") == _accuracies(attack_reference)
    assert not (tmp_path / "r.json.state.safetensors").exists()  # done: the report holds everything
    # the examples saved across the kill are the attack's: replayed, they give exactly the report's figures
    r = cli("attack", *args[1:3], "--adv-from", tmp_path / "adv", "--json", tmp_path / "t.json")
    assert r.returncode == 0, r.stderr
    reported = dict(_accuracies(tmp_path / "r.json"))
    replays = [
        (row, o)
        for row in json.loads((tmp_path / "t.json").read_text())["checkpoints"]
        for o in row["adv_from"]
        if o["replay"]
    ]
    assert len(replays) == 4 and all(
        row["accuracy"][o["column"]] == reported[row["path"]][o["attack"]] for row, o in replays
    )
    # a state of another evaluation is never mixed in
    r = cli(*args[:-4], "--json", tmp_path / "r.json", "--seed", 5)
    assert r.returncode == 0


def test_another_evaluations_state_is_refused(fake_run, tmp_path):
    state = tmp_path / "s.safetensors"
    part.save_tensors(
        state, {}, {"format": "part/1-eval", "signature": json.dumps({"other": 1}), "seconds": "{}"}
    )
    r = invoke(
        "attack",
        fake_run / "last.safetensors",
        "--attacks",
        "fgsm",
        "--n-examples",
        8,
        "--state",
        state,
    )
    assert r.exit_code == 1 and "another evaluation" in r.stderr


@pytest.mark.slow
def test_saved_adversarial_examples_reproduce_the_attack_and_are_checked(smoke_run, tmp_path):
    ckpt = smoke_run / "best.safetensors"
    r = invoke(
        "attack",
        ckpt,
        "--attacks",
        "pgd20",
        "--n-examples",
        48,
        "--save-adv",
        tmp_path / "adv",
        "--json",
        tmp_path / "a.json",
    )
    assert r.exit_code == 0, r.stderr
    (folder,) = [
        p for p in (tmp_path / "adv").iterdir() if p.is_dir()
    ]  # beside it: the folder's .lock
    x_adv, index, labels, meta = part_tools.load_adversarial(folder / "pgd20.safetensors")
    assert (
        x_adv.dtype == torch.float32
        and x_adv.shape == (48, 3, 32, 32)
        and torch.equal(index, torch.arange(48))
    )
    assert (
        meta["attack"] == "pgd20"
        and meta["checkpoint_sha256"] == part.file_hash(ckpt)
        and meta["eps"] == pytest.approx(8 / 255)
    )
    assert not list(folder.glob(".parts/*"))
    r = invoke("attack", ckpt, "--adv-from", tmp_path / "adv", "--json", tmp_path / "t.json")
    assert r.exit_code == 0, r.stderr
    attacked, transferred = (
        _accuracies(tmp_path / "a.json")[0][1],
        _accuracies(tmp_path / "t.json")[0][1],
    )
    assert (
        transferred[f"adv:{folder.name}/pgd20"] == attacked["pgd20"]
        and transferred["natural"] == attacked["natural"]
    )
    tampered = dict(load_file(str(folder / "pgd20.safetensors")))
    tampered["x_adv"][3] = (tampered["x_adv"][3] + 0.2).clamp(0, 1)
    from safetensors import safe_open

    with safe_open(str(folder / "pgd20.safetensors"), "pt") as f:
        save_file(tampered, str(tmp_path / "bad.safetensors"), metadata=f.metadata())
    r = invoke("attack", ckpt, "--adv-from", tmp_path / "bad.safetensors")
    assert r.exit_code == 1 and "outside the eps ball" in r.stderr


def test_the_sweep_evaluates_steps_and_restarts_and_draws_the_curve(fake_run, tmp_path):
    r = invoke(
        "attack",
        fake_run / "best.safetensors",
        "--attacks",
        "pgd1",
        "--sweep",
        "--sweep-steps",
        "1,3",
        "--sweep-restarts",
        "1,2",
        "--n-examples",
        32,
        "--json",
        tmp_path / "s.json",
    )
    assert r.exit_code == 0, r.stderr
    accuracy = _accuracies(tmp_path / "s.json")[0][1]
    assert (
        set(accuracy) == {"natural", "pgd1", "pgd3", "pgd3x2", "worst"}
        and accuracy["pgd3x2"] <= accuracy["pgd3"]
    )
    assert "sweep" in r.stdout and (tmp_path / "s-sweep.png").stat().st_size > 1000


@needs_robustbench
@pytest.mark.slow
def test_a_robustbench_zoo_entry_in_its_own_layout_is_attacked_exported_and_fine_tuned(tmp_path):
    zoo = robustbench_zoo()  # first: it makes the package importable (see there)
    import robustbench.utils

    torch.manual_seed(0)
    zoo_model = zoo["Wong2020Fast"]["model"]()
    for m in zoo_model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
    folder = tmp_path / "models" / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    state = {
        k: v for k, v in zoo_model.state_dict().items() if k not in ("mu", "sigma")
    }  # as the real file: no constants
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in state.items()}}, folder / "Wong2020Fast.pt"
    )
    theirs = robustbench.utils.load_model(
        "Wong2020Fast", tmp_path / "models", "cifar10", "Linf"
    ).eval()
    ours, meta = part.load_checkpoint(
        folder / "Wong2020Fast.pt", arch="robustbench:cifar10/Linf/Wong2020Fast"
    )
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert (
            torch.allclose(ours(x), theirs(x), atol=1e-5) and meta.num_classes == 10
        )  # inputs in [0, 1], as RobustBench's
    _write_folder(tmp_path / "data", "test", list(part.SYNTHETIC_CLASSES), 2, size=32)
    where = [
        "--dataset",
        "cifar10",
        "--data-dir",
        tmp_path / "data",
        "--cache-dir",
        tmp_path / "cache",
        "--model-dir",
        tmp_path / "models",
    ]
    r = invoke(
        "attack",
        "robustbench:Wong2020Fast",
        *where,
        "--attacks",
        "natural,pgd2",
        "--json",
        tmp_path / "r.json",
    )
    assert r.exit_code == 0, r.stderr
    row = json.loads((tmp_path / "r.json").read_text())["checkpoints"][0]
    assert row["arch"] == "robustbench:cifar10/Linf/Wong2020Fast" and row["n_examples"] == 20
    points = part.load_split("cifar10", "test", tmp_path / "data", tmp_path / "cache")
    with torch.no_grad():
        right = (theirs(part.to_float(points.x)).argmax(1) == points.y).sum().item()
    # RobustBench's own model on the same points
    assert row["accuracy"]["natural"] == pytest.approx(right / 20)
    r = invoke(
        "attack",
        folder / "Wong2020Fast.pt",
        "--arch",
        "robustbench:Wong2020Fast",
        *where,
        "--attacks",
        "natural",
        "--json",
        tmp_path / "r2.json",
    )
    assert (
        r.exit_code == 0
        and _accuracies(tmp_path / "r2.json")[0][1]["natural"] == row["accuracy"]["natural"]
    ), r.stderr
    r = invoke(
        "export",
        "robustbench:Wong2020Fast",
        "--dataset",
        "cifar10",
        "--model-dir",
        tmp_path / "models",
        "--format",
        "onnx",
        "--out",
        tmp_path / "exp",
    )
    assert r.exit_code == 0 and "ok" in r.stdout, r.stderr
    r = invoke("attack", "robustbench:NoSuchModel", *where)
    assert r.exit_code == 1 and "unknown RobustBench model 'NoSuchModel'" in r.stderr
    _write_folder(tmp_path / "data", "train", list(part.SYNTHETIC_CLASSES), 4, size=32)
    r = invoke(
        "train",
        "--preset",
        "smoke",
        *where,
        "--init",
        "robustbench:Wong2020Fast",
        "--val-size",
        0,
        "--eval-subset",
        8,
        "--epochs",
        1,
        "--warmup-epochs",
        0,
        "--steps",
        1,
        "--batch-size",
        20,
        "--lr",
        1e-12,
        "--momentum",
        0,
        "--weight-decay",
        0,
        "--out",
        tmp_path / "run",
    )
    assert r.exit_code == 0, r.stderr
    stored = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert stored["model"] == "robustbench:cifar10/Linf/Wong2020Fast"
    assert (
        stored["init_sha256"]
        == hashlib.sha256((folder / "Wong2020Fast.pt").read_bytes()).hexdigest()
    )
    tuned = load_file(tmp_path / "run" / "last.safetensors")
    # lr 1e-12: the zoo's weights
    assert torch.allclose(tuned["net.conv1.weight"], state["conv1.weight"], atol=1e-9)


def test_a_sweep_lists_its_attacks_in_the_order_of_the_curve():
    specs = part_tools.expand_sweep(part.parse_attacks("pgd10,fgsm,cw20"), [5, 10, 20], [1, 2])
    assert [s.name for s in specs] == [
        "natural",
        "fgsm",
        "pgd5",
        "pgd10",
        "pgd20",
        "pgd20x2",
        "cw5",
        "cw10",
        "cw20",
        "cw20x2",
    ]


def _adv_file(tmp_path, fake_ckpt, name="adv"):
    """An attack with --save-adv on the untrained model; returns (its saved file, the report's accuracies)."""
    r = invoke(
        "attack",
        fake_ckpt,
        "--attacks",
        "pgd3",
        "--n-examples",
        24,
        "--save-adv",
        tmp_path / name,
        "--json",
        tmp_path / f"{name}.json",
    )
    assert r.exit_code == 0, r.stderr
    (folder,) = [p for p in (tmp_path / name).iterdir() if p.is_dir()]
    return folder / "pgd3.safetensors", _accuracies(tmp_path / f"{name}.json")[0][1]


def _rewrite(src, dst, tensors=None, **metadata):
    """A copy of a saved file with some tensors or metadata changed (a forgery)."""
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        meta = {**f.metadata(), **{k: json.dumps(v) for k, v in metadata.items()}}
    save_file({**load_file(str(src)), **(tensors or {})}, str(dst), metadata=meta)
    return dst


def test_saved_examples_are_a_claim_and_every_part_of_it_is_checked(fake_ckpt, tmp_path):
    saved, report = _adv_file(tmp_path, fake_ckpt)
    r = invoke(
        "attack", fake_ckpt, "--adv-from", saved, "--per-class", "--json", tmp_path / "t.json"
    )
    assert r.exit_code == 0 and "a replay on the checkpoint that made them" in r.stdout, r.stderr
    row = json.loads((tmp_path / "t.json").read_text())["checkpoints"][0]
    assert (
        row["accuracy"]["adv:pgd3"] == report["pgd3"]
        and row["per_class"]
        and row["adv_from"][0]["replay"] is True
    )
    assert (
        row["adv_from"][0]["checkpoint_sha256"] == part.file_hash(fake_ckpt)
        and row["selection"]["first"] == 24
    )
    t = load_file(str(saved))
    forged = {
        "repeated": (
            {"indices": torch.zeros(24, dtype=torch.int64)},
            {},
            "not the first 24 test points in order",
        ),
        "picked": ({"indices": torch.arange(24) + 3}, {}, "not the first 24 test points in order"),
        "eps": ({}, {"eps": 1.0}, "disagree"),
        "float indices": ({"indices": torch.arange(24).double()}, {}, "int64"),
        "float64": ({"x_adv": t["x_adv"].double()}, {}, "float32"),
        "empty": (
            {"x_adv": t["x_adv"][:0], "indices": t["indices"][:0], "labels": t["labels"][:0]},
            {"n": 0},
            "inconsistent",
        ),
        "string eps": ({}, {"eps": "0.03"}, "not what part writes"),
    }
    for name, (tensors, metadata, message) in forged.items():
        bad = _rewrite(saved, tmp_path / f"{name}.safetensors", tensors, **metadata)
        r = invoke("attack", fake_ckpt, "--adv-from", bad)
        assert r.exit_code == 1 and message in r.stderr and "unexpected" not in r.stderr, (
            name,
            r.stderr,
        )
    for option in (["--eps", 4], ["--n-examples", 8], ["--attacks", "pgd20"]):
        r = invoke("attack", fake_ckpt, "--adv-from", saved, *option)
        assert r.exit_code == 1 and f"{option[0]} cannot be given with --adv-from" in r.stderr


def test_saved_examples_of_another_evaluation_are_never_mixed_in(fake_ckpt, tmp_path):
    _adv_file(tmp_path, fake_ckpt)
    r = invoke(
        "attack",
        fake_ckpt,
        "--attacks",
        "pgd3",
        "--eps",
        4,
        "--n-examples",
        24,
        "--save-adv",
        tmp_path / "adv",
    )
    assert r.exit_code == 1 and "holds examples of another evaluation" in r.stderr
    model = part.load_checkpoint(fake_ckpt)[0]
    points = part.load_split("synthetic", "test", "unused").first(24)
    with torch.no_grad(), part.eval_mode(model):  # labels it gets right: every point is attacked
        points = part.Split(points.x, model(part.to_float(points.x)).argmax(1), points.classes)
    setup = part.AttackSetup(8 / 255, 2 / 255, seed=0, batch_size=8)
    folder = tmp_path / "w"
    stale = part_tools.AdvWriter(
        folder, {}, {"eps": 4}
    )  # a killed run of other settings left its parts
    stale.write("pgd3", 0, torch.arange(8), torch.zeros(8, 3, 32, 32))
    signature = {"eps": 8}
    info = {"eps": setup.eps, "eps_levels": 8.0, "seed": 0, "checkpoint_sha256": "0" * 64, "n": 24}

    def evaluate():  # with the state on disk and the examples saved, as `attack` runs it
        state = part_tools.EvalState(tmp_path / "s.safetensors", signature)
        adv = part_tools.AdvWriter(folder, info, signature)
        return part.evaluate_suite(
            model, points, ["pgd3"], setup, hooks=part.EvalHooks(state=state, adv=adv)
        )

    first = evaluate()
    assert not any(p.name.startswith(stale.id) for p in (folder / ".parts").iterdir())
    # the final file and the parts are lost, the state says every batch is done: the batches are attacked again
    (folder / "pgd3.safetensors").unlink()
    again = evaluate()
    x_adv = load_file(str(folder / "pgd3.safetensors"))["x_adv"]
    replay = (model(x_adv).argmax(1) == points.y).float().mean().item()
    assert first["accuracy"] == again["accuracy"] and replay == pytest.approx(
        again["accuracy"]["pgd3"]
    )
    assert not torch.equal(x_adv, part.to_float(points.x))


def test_a_running_evaluation_locks_its_state_and_its_saved_examples(fake_ckpt, tmp_path):
    (tmp_path / "adv").mkdir()
    with part.folder_lock(tmp_path / "adv", "another evaluation"):
        r = invoke(
            "attack",
            fake_ckpt,
            "--attacks",
            "fgsm",
            "--n-examples",
            8,
            "--save-adv",
            tmp_path / "adv",
        )
    assert r.exit_code == 1 and "in use by another evaluation" in r.stderr
    state = tmp_path / "r.json.state.safetensors"
    with part.file_lock(tmp_path / f".{state.name}.lock", "another evaluation", str(state)):
        r = invoke(
            "attack",
            fake_ckpt,
            "--attacks",
            "fgsm",
            "--n-examples",
            8,
            "--json",
            tmp_path / "r.json",
        )
    assert r.exit_code == 1 and "in use by another evaluation" in r.stderr
    # the lock a killed evaluation left is taken over, and a finished one leaves no lock beside its report
    (tmp_path / f".{state.name}.lock").write_text("an evaluation (pid 999999999)")
    r = invoke(
        "attack", fake_ckpt, "--attacks", "fgsm", "--n-examples", 8, "--json", tmp_path / "r.json"
    )
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adv", "r.json"]


def test_a_forged_evaluation_state_is_refused(tmp_path):
    path, signature = tmp_path / "s.safetensors", {"n": 8}
    state = part_tools.EvalState(path, signature)
    state.put("pgd20", torch.tensor([1, 0, 1, 1, -1, -1, 0, 1], dtype=torch.int8), 1.0, force=True)
    assert part_tools.EvalState(path, signature).flags["pgd20"].tolist() == [
        1,
        0,
        1,
        1,
        -1,
        -1,
        0,
        1,
    ]
    forgeries = {
        "value 7": torch.full((8,), 7, dtype=torch.int8),
        "all ones": torch.ones(8, dtype=torch.int8),
        "length": torch.ones(5, dtype=torch.int8),
        "dtype": torch.ones(8, dtype=torch.float32),
    }
    for name, flags in forgeries.items():
        _rewrite(path, tmp_path / f"{name}.safetensors", {"pgd20": flags})
        with pytest.raises(part.CliError, match="delete it to start again"):
            part_tools.EvalState(tmp_path / f"{name}.safetensors", signature)


def test_sweeps_keep_the_bounds_of_the_attack_names(fake_ckpt):
    for option, value in (("--sweep-steps", "99999999999999999999"), ("--sweep-restarts", "99999")):
        r = invoke(
            "attack", fake_ckpt, "--attacks", "pgd5", "--sweep", option, value, "--n-examples", 8
        )
        assert r.exit_code == 1 and "expected integers from 1 to" in r.stderr


def test_sweep_options_without_the_sweep_are_refused_and_a_sweep_needs_something_to_sweep(
    fake_ckpt, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    base = ["attack", fake_ckpt, "--attacks", "pgd2", "--n-examples", 8]
    for option, value in (
        ("--sweep-steps", "1,2"),
        ("--sweep-restarts", "1,2"),
        ("--sweep-plot", "s.png"),
    ):
        r = invoke(*base, option, value)
        assert r.exit_code == 1 and f"{option} goes with --sweep" in r.stderr, r.stderr
    r = invoke("attack", fake_ckpt, "--attacks", "natural,fgsm", "--sweep", "--n-examples", 8)
    assert r.exit_code == 1 and "nothing to sweep" in r.stderr, r.stderr
    # no report and no --sweep-plot: the curve is printed, no PNG lands in the current folder
    r = invoke(*base, "--sweep", "--sweep-steps", "1,2", "--sweep-restarts", "1")
    assert r.exit_code == 0 and "sweep" in r.stdout, r.stderr
    assert list(tmp_path.iterdir()) == []


@needs_hub
def test_a_model_folder_is_never_replaced_by_another_models(fake_run, tmp_path):
    a, b = fake_run / "best.safetensors", fake_run / "last.safetensors"
    r = invoke("attack", a, "--attacks", "fgsm", "--n", 8, "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.stderr
    hf = ["--format", "hf", "--out", tmp_path / "hf"]
    assert invoke("export", a, *hf, "--report", tmp_path / "r.json").exit_code == 0
    readme = (tmp_path / "hf" / "README.md").read_text()
    r = invoke("export", b, *hf)
    assert r.exit_code == 1 and "holds the export of another model" in r.stderr, r.stderr
    assert (tmp_path / "hf" / "README.md").read_text() == readme
    assert invoke("export", a, *hf).exit_code == 0  # the same model: its results stay
    assert (tmp_path / "hf" / "README.md").read_text() == readme


def test_a_tracker_that_fails_to_start_leaves_no_run_in_the_way(tmp_path, monkeypatch):
    import wandb

    def refuse(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", refuse)
    args = ["train", *MICRO, "--epochs", 1, "--warmup-epochs", 0, "--out", tmp_path / "run"]
    r = invoke(*args, "--wandb", "proj")
    assert r.exit_code == 1 and "W&B did not start" in r.stderr, r.stderr
    assert part.RunFiles(tmp_path / "run").present() == []
    assert invoke(*args).exit_code == 0  # the same folder, now without W&B: no run in the way
