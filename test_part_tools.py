"""Property tests for part_tools.py (report, cam, bench): CPU only, synthetic data.

Run: python -m pytest -q test_part_tools.py (the README's test command runs both files).
"""

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import part
import part_tools  # it adds report, cam and bench to part.app
from test_part import (
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
