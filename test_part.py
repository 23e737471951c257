"""Property tests for part.py: CPU only, synthetic data, seconds each.

Run: python -m pytest -q test_part.py
"""

import ast
import dataclasses
import hashlib
import importlib.util
import inspect
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import typer
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import part

ROOT = Path(__file__).resolve().parent
EPS, EPS_LOW = 8 / 255, 3 / 255  # a wide gap makes a wrong budget visible


def cli(*args, timeout=600):
    """Run the real command line in a fresh process."""
    return subprocess.run(
        [sys.executable, str(ROOT / "part.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )


def in_terminal(*args, cwd=ROOT, timeout=600, command=None, columns=160):
    """Run the real command line as a person does, in a pseudo-terminal: rich draws its live
    progress bars only there. Returns (exit code, everything the terminal showed)."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TERM", "COLUMNS", "LINES")}
    env["TERM"] = "xterm-256color"
    argv = command or [sys.executable, str(ROOT / "part.py"), *map(str, args)]
    proc = subprocess.Popen(
        argv,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=cwd,
        env=env,
        close_fds=True,
        start_new_session=True,
    )
    os.close(slave)
    shown, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO: the terminal closed with the process
                break
            if not data:
                break
            shown.append(data)
    finally:
        if proc.poll() is None and time.monotonic() >= deadline:
            proc.kill()
        proc.wait()
        os.close(master)
    return proc.returncode, b"".join(shown).decode(errors="replace")


def drew_a_bar(screen: str) -> bool:
    """rich's live bar: its bar characters and the cursor moves that redraw it in place."""
    return "━" in screen and "\x1b[" in screen


def invoke(*args):
    """Run the command line in this process (faster; for the error paths)."""
    return CliRunner().invoke(part.app, [str(a) for a in args])


def seeded(arch="cnn", num_classes=10, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return part.build_model(arch, num_classes).to(dtype).eval()


@pytest.fixture(scope="module")
def batch():
    s = part.synthetic_split(24, seed=5)
    return part.to_float(s.x), s.y


@pytest.fixture(scope="module")
def cnn():
    return seeded()


# ---------------------------------------------------------------- the attack


@pytest.mark.parametrize("rule", part.MASK_RULES)
@pytest.mark.parametrize("start", [True, False, 0.001])
def test_pgd_never_exceeds_the_per_pixel_budget(cnn, batch, rule, start):
    x, y = batch
    budget = part.eps_map(part.class_activation(cnn, x), EPS, EPS_LOW, rule, size=x.shape[-2:])
    x_adv = part.pgd(cnn, x, y, budget, 2 / 255, 5, random_start=start)
    delta = (x_adv - x).abs()
    assert (delta <= budget).all()  # no tolerance: in float32, and exactly (below)
    assert ((x_adv.double() - x.double()).abs() <= budget.double()).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert ((delta - budget).abs() < 1e-6).float().mean() > 0.3  # the attack does use its budget


@pytest.mark.parametrize("loss", ["ce", "cw", "kl"])
def test_every_attack_loss_stays_in_budget_and_raises_its_loss(cnn, batch, loss):
    x, y = batch
    x_adv = part.pgd(
        cnn, x, y, EPS, 2 / 255, 5, loss=loss, random_start=0.001 if loss == "kl" else True
    )
    assert (
        x_adv.double() - x.double()
    ).abs().max().item() <= EPS  # exactly within 8/255, not only within float32(8/255)
    assert ((x_adv - x).abs() - EPS).abs().min() < 1e-7  # and it goes up to the edge
    with torch.no_grad():
        ref = F.softmax(cnn(x), 1)
        before = part.ATTACK_LOSSES[loss](cnn((x + 1e-3 * torch.randn_like(x)).clamp(0, 1)), y, ref)
        after = part.ATTACK_LOSSES[loss](cnn(x_adv), y, ref)
    assert after > before


def test_mma_stays_in_a_per_pixel_budget_and_breaks_at_least_as_much_as_its_candidates(cnn, batch):
    x, y = batch
    budget = part.eps_map(part.class_activation(cnn, x), EPS, EPS_LOW, "zscore", size=x.shape[-2:])
    x_adv = part.mma(cnn, x, y, budget, 2 / 255, 5)
    assert ((x_adv - x).abs() <= budget).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        margin = -part.cw_margin(cnn(x_adv), y, kappa=float("inf"))
        clean = -part.cw_margin(cnn(x), y, kappa=float("inf"))
    assert (
        margin <= clean + 1e-4
    ).float().mean() > 0.9  # the kept candidate lowers the true margin


def test_uniform_tensor_budget_equals_the_scalar_budget(cnn, batch):
    x, y = batch
    for eps, ulp in [
        (2**-5, 0),
        (EPS, 4e-9),
    ]:  # a float32 tensor can only hold 8/255 rounded (1.9e-9 above)
        torch.manual_seed(1)
        a = part.pgd(cnn, x, y, eps, 2 / 255, 4)
        torch.manual_seed(1)
        b = part.pgd(cnn, x, y, torch.full_like(x, eps), 2 / 255, 4)
        assert (a - b).abs().max() <= ulp and (a != b).float().mean() < 0.5


def test_batch_result_equals_per_example_result(batch):
    model = seeded(dtype=torch.float64)
    x, y = batch[0][:6].double(), batch[1][:6]
    budget = (
        torch.rand(6, 1, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        * EPS
    )
    together = part.pgd(model, x, y, budget, 2 / 255, 5, random_start=False)
    alone = torch.cat(
        [
            part.pgd(
                model, x[i : i + 1], y[i : i + 1], budget[i : i + 1], 2 / 255, 5, random_start=False
            )
            for i in range(6)
        ]
    )
    assert torch.allclose(together, alone, atol=1e-12)


def test_attacks_leave_the_input_the_model_mode_and_parameter_grads_alone(cnn, batch):
    x, y = batch
    x0 = x.clone()
    cnn.train()
    try:
        part.pgd(cnn, x, y, EPS, 2 / 255, 2)
        part.mma(cnn, x, y, EPS, 2 / 255, 2)
        part.grad_cam(cnn, x)
        assert cnn.training
    finally:
        cnn.eval()
    assert torch.equal(x, x0)
    assert all(p.grad is None for p in cnn.parameters())


# ---------------------------------------------------------------- CAM


@pytest.mark.parametrize("method", part.CAM_METHODS)
@pytest.mark.parametrize("arch", ["cnn", "resnet18", "preact-resnet18"])
def test_batched_cam_equals_a_per_image_loop(batch, method, arch):
    model = seeded(arch, dtype=torch.float64)
    x = batch[0][:5].double()
    together = part.grad_cam(model, x, method)
    alone = torch.cat([part.grad_cam(model, x[i : i + 1], method) for i in range(5)])
    assert together.shape == (5, 1, 32, 32)
    assert torch.allclose(together, alone, atol=1e-10)
    assert together.min() >= 0 and together.max() <= 1


def _textbook_cam(model, x, method):
    """Per image, straight from the definitions (Selvaraju 2017, Fu 2020, Jiang 2021)."""
    maps = []
    for xi in x.split(1):
        a = model.features(xi).detach().requires_grad_(True)
        logits = model.head(a)
        (g,) = torch.autograd.grad(logits[0, logits[0].argmax()], a)
        a, g = a[0], g[0]  # [K, h, w]
        if method == "gradcam":
            cam = torch.relu(sum(g[k].mean() * a[k] for k in range(a.shape[0])))
        elif method == "xgradcam":
            cam = torch.relu(
                sum((g[k] * a[k]).sum() / (a[k].sum() + 1e-7) * a[k] for k in range(a.shape[0]))
            )
        else:
            cam = torch.relu(sum(torch.relu(g[k]) * a[k] for k in range(a.shape[0])))
        cam = (cam - cam.min()) / (cam.max() - cam.min()).clamp(min=1e-12)
        maps.append(cam[None, None])
    return torch.cat(maps)


@pytest.mark.parametrize("method", part.CAM_METHODS)
def test_cam_matches_the_textbook_definitions(batch, method):
    model = seeded("resnet18", dtype=torch.float64)
    x = batch[0][:3].double()
    assert torch.allclose(
        part.class_activation(model, x, method), _textbook_cam(model, x, method), atol=1e-10
    )


def test_gradcam_equals_xgradcam_behind_a_pooled_linear_head_but_not_on_wrn(batch):
    x = batch[0][:2]
    resnet = seeded("resnet18")
    assert torch.allclose(
        part.grad_cam(resnet, x, "gradcam"), part.grad_cam(resnet, x, "xgradcam"), atol=1e-4
    )
    assert not torch.allclose(
        part.grad_cam(resnet, x, "gradcam"), part.grad_cam(resnet, x, "layercam"), atol=1e-2
    )
    wrn = seeded("wrn-34-10")  # bn + ReLU between block3 and the pooling: gradients vary in space
    assert not torch.allclose(
        part.grad_cam(wrn, x, "gradcam"), part.grad_cam(wrn, x, "xgradcam"), atol=1e-2
    )


class QuadrantModel(nn.Module):
    """Sees only the top-left quadrant of the image: a known answer for the CAM."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.linear = nn.Linear(8, 10)
        with torch.no_grad():
            self.linear.weight.abs_()
        self.register_buffer("mask", torch.zeros(1, 1, 8, 8))
        self.mask[..., :4, :4] = 1

    def features(self, x):
        return F.relu(self.conv(F.avg_pool2d(x, 4))) * self.mask

    def head(self, a):
        return self.linear(a.mean((2, 3)))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.mark.parametrize("method", part.CAM_METHODS)
def test_cam_of_a_model_that_sees_one_quadrant_peaks_there_and_gets_the_full_budget_there(
    batch, method
):
    model, x = QuadrantModel().eval(), batch[0][:8]
    cam = part.grad_cam(model, x, method)
    peak = cam.flatten(1).argmax(1)
    assert ((peak // 32 < 16) & (peak % 32 < 16)).all()
    budget = part.eps_map(
        part.class_activation(model, x, method), EPS, EPS_LOW, "zscore", size=(32, 32)
    )
    full = budget[:, 0] == torch.tensor(EPS, dtype=torch.float32)
    rows, cols = torch.arange(32).view(32, 1), torch.arange(32).view(1, 32)
    assert full.flatten(1).any(1).all()
    assert not (full & ((rows >= 18) | (cols >= 18))).any()  # bilinear upsampling bleeds <= 2 px


def test_a_degenerate_all_zero_cam_gives_no_nan(batch):
    model = QuadrantModel().eval()
    with torch.no_grad():
        model.conv.weight.zero_()
        model.conv.bias.fill_(-1)  # ReLU -> every feature is 0
    x = batch[0][:4]
    for method in part.CAM_METHODS:
        cam = part.grad_cam(model, x, method)
        assert torch.isfinite(cam).all() and (cam == 0).all()
        for rule in part.MASK_RULES:
            budget = part.eps_map(
                part.class_activation(model, x, method), EPS, EPS_LOW, rule, size=(32, 32)
            )
            assert torch.isfinite(budget).all()


# ---------------------------------------------------------------- budget maps


@pytest.fixture(scope="module")
def cams(batch):
    return part.class_activation(seeded("resnet18"), batch[0])


def test_masks_hold_only_the_two_budgets(cams):
    allowed = torch.tensor([EPS_LOW, EPS], dtype=torch.float32)
    for rule, channels in (
        ("zscore", 1),
        ("official", 3),
        ("random", 1),
        ("inverse", 1),
        *((q, 1) for q in part.NO_CAM_RULES),
    ):
        m = part.eps_map(cams, EPS, EPS_LOW, rule, size=(32, 32))
        assert m.shape == (len(cams), channels, 32, 32)
        assert torch.isin(m.unique(), allowed).all()
        assert (m == EPS_LOW).any() and (m == torch.tensor(EPS, dtype=torch.float32)).any()


def test_random_rule_has_zscores_density_per_image_at_other_positions(cams):
    z = part.eps_map(cams, EPS, EPS_LOW, "zscore", size=(32, 32)) > EPS_LOW
    r = (
        part.eps_map(
            cams, EPS, EPS_LOW, "random", size=(32, 32), generator=torch.Generator().manual_seed(0)
        )
        > EPS_LOW
    )
    assert torch.equal(z.sum((1, 2, 3)), r.sum((1, 2, 3)))
    assert not torch.equal(z, r)


def test_inverse_has_zscores_count_on_the_least_important_pixels_and_a_quadrant_is_a_quarter(cams):
    heat = part.upsample(cams, (32, 32)).flatten(1)
    z = part.eps_map(cams, EPS, EPS_LOW, "zscore", size=(32, 32)).flatten(1) > EPS_LOW
    inv = part.eps_map(cams, EPS, EPS_LOW, "inverse", size=(32, 32)).flatten(1) > EPS_LOW
    assert (
        torch.equal(z.sum(1), inv.sum(1)) and (z.sum(1) > 0).sum() >= 2
    )  # the same density and mean budget as PART
    # every full-budget pixel ranks at or below every other pixel
    for h, full in zip(heat, inv, strict=True):
        assert not full.any() or h[full].max() <= h[~full].min()
    for corner in ("tl", "tr", "bl", "br"):
        low = part.eps_map(cams, EPS, EPS_LOW, f"quadrant-{corner}", size=(32, 32)) == EPS_LOW
        assert (low.sum((1, 2, 3)) == 32 * 32 // 4).all()
        rows, cols = (
            slice(0, 16) if corner[0] == "t" else slice(16, 32),
            slice(0, 16) if corner[1] == "l" else slice(16, 32),
        )
        assert low[:, :, rows, cols].all()


def test_a_model_whose_cam_is_known_gets_the_full_budget_where_each_rule_says():
    class Known(part.FeaturesHead):  # Grad-CAM of class 0 = the image's first channel, pooled 4 x 4
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(1, 2, bias=False)
            self.linear.weight.data = torch.tensor([[1.0], [-1.0]])

        def features(self, x):
            return F.avg_pool2d(x[:, :1], 4)

        def head(self, a):
            return self.linear(a.mean((2, 3)))

    x = torch.full((2, 3, 32, 32), 0.1) + 0.01 * torch.rand(
        2, 3, 32, 32, generator=torch.Generator().manual_seed(0)
    )
    x[:, :, :8, :8] = 0.9  # the bright corner: what the model relies on
    cam = part.class_activation(Known().eval(), x)
    near = torch.zeros(32, 32, dtype=torch.bool)
    near[:12, :12] = (
        True  # the corner and one CAM cell around it (upsampling spreads the map that far)
    )
    full = {
        rule: (part.eps_map(cam, EPS, EPS_LOW, rule, size=(32, 32)) > EPS_LOW)[:, 0]
        for rule in part.MASK_RULES
    }
    assert (
        full["zscore"][:, :6, :6].all() and not (full["zscore"] & ~near).any()
    )  # PART: the full budget on it
    assert (
        full["inverse"].sum() == full["zscore"].sum() and not full["inverse"][:, :8, :8].any()
    )  # inverse: never on it
    assert (
        not full["quadrant-tl"][:, :16, :16].any() and full["quadrant-tl"][:, 16:].all()
    )  # Fig. 1: no CAM at all
    assert full["quadrant-br"][:, :8, :8].all()


@pytest.mark.slow  # a real run, processes or a terminal: over 2 s
def test_the_fig1_presets_run_the_papers_quadrant_experiment_without_a_cam(tmp_path):
    for name in ("cifar10-quadrant", "cifar10-study-quadrant"):
        cfg, _ = part.resolve_config({"out": str(tmp_path / name)}, name, None)
        assert (cfg.method, cfg.mask_rule, cfg.eps, cfg.eps_low, cfg.warmup_epochs) == (
            "part",
            "quadrant-tl",
            12,
            6,
            0,
        )
    r = invoke(
        "train",
        *MICRO,
        "--mask-rule",
        "quadrant-br",
        "--eps",
        12,
        "--eps-low",
        6,
        "--warmup-epochs",
        0,
        "--epochs",
        1,
        "--model",
        "torchvision:resnet18",
        "--cam-layer",
        "avgpool",
        "--out",
        tmp_path / "q",
    )  # a 1x1 CAM layer: unused here
    assert r.exit_code == 0, r.stderr
    assert (
        json.loads((tmp_path / "q" / "metrics.jsonl").read_text().splitlines()[0])["phase"]
        == "PART"
    )


def test_uniform_rule_is_zscores_mean_budget(cams):
    z = part.eps_map(cams, EPS, EPS_LOW, "zscore", size=(32, 32))
    u = part.eps_map(cams, EPS, EPS_LOW, "uniform", size=(32, 32))
    assert u.shape == (len(cams), 1, 1, 1)
    assert torch.allclose(u.flatten(), z.mean((1, 2, 3)), atol=1e-7)


def test_zscore_rule_marks_pixels_more_than_one_std_above_the_mean(cams):
    up = F.interpolate(cams, size=(32, 32), mode="bilinear", align_corners=False)
    z = (up - up.mean((1, 2, 3), keepdim=True)) / up.std((1, 2, 3), keepdim=True, correction=0)
    m = part.eps_map(cams, EPS, EPS_LOW, "zscore", size=(32, 32))
    assert torch.equal(m == torch.tensor(EPS, dtype=torch.float32), z > 1)


def test_official_rule_is_per_channel_and_never_gives_the_full_budget_on_all_channels(cams):
    m = part.eps_map(cams, EPS, EPS_LOW, "official", size=(32, 32))
    full = m == torch.tensor(EPS, dtype=torch.float32)
    assert not full.all(1).any()
    assert 0.05 < full.float().mean() < 0.5


def test_pil_bicubic_resampling_matches_pillow():
    import numpy as np
    from PIL import Image

    a = np.random.default_rng(0).random((4, 4)).astype(np.float32)
    for size in (32, 64):
        ref = np.asarray(Image.fromarray(a, mode="F").resize((size, size), Image.BICUBIC))
        got = part.pil_bicubic(torch.from_numpy(a)[None, None], (size, size))[0, 0].numpy()
        assert np.abs(got - ref).max() < 1e-6


def test_jet_matches_matplotlibs_table():
    # matplotlib.colormaps["jet"](v)[:3], read off matplotlib 3.x
    expected = {
        0.0: (0, 0, 0.5),
        0.1: (0, 0, 0.9456328),
        0.25: (0, 0.50392157, 1),
        0.5: (0.49019608, 1, 0.47754586),
        0.7: (1, 0.77051561, 0),
        0.9: (0.9456328, 0.02977487, 0),
        1.0: (0.5, 0, 0),
    }
    v = torch.tensor(list(expected)).view(1, 1, 1, -1)
    got = part.jet(v)[0, :, 0].T
    assert torch.allclose(got, torch.tensor(list(expected.values())), atol=1e-6)


# ---------------------------------------------------------------- models, data, checkpoints


@pytest.mark.parametrize(
    "arch, shape",
    [
        ("resnet18", (512, 4, 4)),
        ("preact-resnet18", (512, 4, 4)),
        ("wrn-34-10", (640, 8, 8)),
        ("cnn", (128, 8, 8)),
    ],
)
def test_models_expose_their_cam_layer_and_forward_through_it(batch, arch, shape):
    model, x = seeded(arch), batch[0][:2]
    with torch.no_grad():
        a = model.features(x)
        assert a.shape[1:] == shape
        assert torch.allclose(model(x), model.head(a))


@pytest.mark.parametrize("arch", ["cnn", "resnet18"])
def test_the_channels_last_layout_changes_speed_not_results_and_checkpoints_stay_plain(
    batch, arch, tmp_path
):
    x, y = batch[0][:6], batch[1][:6]
    plain, fast = seeded(arch), part.channels_last(seeded(arch))
    assert all(
        p.is_contiguous(memory_format=torch.channels_last)
        for p in fast.parameters()
        if p.dim() == 4
    )
    with torch.no_grad():
        assert torch.allclose(plain(x), fast(x), atol=1e-5)
    assert torch.allclose(part.grad_cam(plain, x), part.grad_cam(fast, x), atol=1e-5)
    grads = []
    for model in (plain, fast):
        xr = x.clone().requires_grad_()
        grads.append(torch.autograd.grad(F.cross_entropy(model(xr), y), xr)[0])
    # what the attacks follow (their sign may flip where ~0)
    assert torch.allclose(*grads, rtol=1e-3, atol=1e-7)
    part.save_checkpoint(
        tmp_path / "m.safetensors", fast, part.CheckpointMeta(arch=arch, num_classes=10)
    )
    assert all(t.is_contiguous() for t in load_file(tmp_path / "m.safetensors").values())
    loaded = part.load_checkpoint(tmp_path / "m.safetensors")[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), plain(x))


def test_state_dict_names_follow_the_reference_cifar_models():
    keys = {
        a: set(part.build_model(a).state_dict())
        for a in ("resnet18", "preact-resnet18", "wrn-34-10")
    }
    assert {
        "conv1.weight",
        "bn1.running_mean",
        "layer2.0.shortcut.0.weight",
        "layer2.0.shortcut.1.weight",
        "linear.weight",
    } <= keys["resnet18"]
    assert len(keys["resnet18"]) == 122
    assert {"layer2.0.shortcut.0.weight", "bn.weight", "linear.bias"} <= keys["preact-resnet18"]
    assert {
        "block1.layer.0.convShortcut.weight",
        "block3.layer.4.bn2.running_var",
        "bn1.weight",
        "fc.weight",
    } <= keys["wrn-34-10"]


def test_autoattacks_example_resnet18_loads_and_gives_the_same_logits(batch, tmp_path):
    spec = importlib.util.find_spec("pyautoattack")
    if spec is None:
        pytest.skip("pyautoattack not installed")
    path = Path(spec.origin).parent / "examples" / "resnet.py"
    mod_spec = importlib.util.spec_from_file_location("aa_resnet", path)
    ref_module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(ref_module)
    torch.manual_seed(0)
    ref = ref_module.ResNet18().eval()
    torch.save({"module." + k: v for k, v in ref.state_dict().items()}, tmp_path / "ref.pth")
    ours, meta = part.load_checkpoint(tmp_path / "ref.pth", arch="resnet18")
    assert meta.num_classes == 10
    with torch.no_grad():
        assert torch.allclose(ours(batch[0][:4]), ref(batch[0][:4]), atol=1e-5)


def test_foreign_state_dicts_load_with_wrappers_and_prefixes(batch, tmp_path):
    model = seeded("cnn", num_classes=7)
    state = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "a.pt")
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "b.safetensors")
    )
    for name in ("a.pt", "b.safetensors"):
        loaded, meta = part.load_checkpoint(tmp_path / name, arch="cnn")
        assert meta.num_classes == 7 and not loaded.training
        with torch.no_grad():
            assert torch.equal(loaded(batch[0][:2]), model(batch[0][:2]))


@pytest.mark.slow
def test_a_trades_style_wrn_state_dict_with_module_prefix_and_spare_block_loads(batch):
    ref = seeded("wrn-34-10")
    state = {f"module.{k}": v for k, v in ref.state_dict().items()}
    # TRADES' unused block
    state.update({f"module.sub_block1.{k}": v for k, v in ref.block1.state_dict().items()})
    ours = part.build_model("wrn-34-10").eval()
    part.load_state_into(
        ours, part._clean_state_dict(state, Path("wrn.pt")), "wrn-34-10", Path("wrn.pt")
    )
    with torch.no_grad():
        assert torch.equal(ours(batch[0][:2]), ref(batch[0][:2]))


class NotAWeight:
    pass


def test_pickles_that_need_code_are_refused_and_mismatches_explained(tmp_path):
    torch.save({"w": torch.zeros(1), "obj": NotAWeight()}, tmp_path / "evil.pt")
    with pytest.raises(part.CliError, match="weights-only") as refused:
        part.load_checkpoint(tmp_path / "evil.pt", arch="cnn")
    assert "NotAWeight" in str(refused.value) and "weights_only=False" not in str(refused.value)
    torch.save(seeded("cnn").state_dict(), tmp_path / "cnn.pt")
    with pytest.raises(part.CliError, match="does not match architecture resnet18"):
        part.load_checkpoint(tmp_path / "cnn.pt", arch="resnet18")
    with pytest.raises(part.CliError, match="--arch"):
        part.load_checkpoint(tmp_path / "cnn.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(part.CliError, match="not a readable safetensors"):
        part.load_checkpoint(tmp_path / "bad.safetensors", arch="cnn")
    with pytest.raises(part.CliError, match="not found"):
        part.load_checkpoint(tmp_path / "missing.safetensors")


def test_augmentation_is_a_padded_crop_and_a_flip():
    x = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    padded = F.pad(x, (4, 4, 4, 4))
    for flip in (False, True):
        out = part.augment(x, flip, torch.Generator().manual_seed(0))
        flips = 0
        for i in range(len(x)):
            windows = [padded[i, :, r : r + 8, c : c + 8] for r in range(9) for c in range(9)]
            plain = any(torch.equal(out[i], w) for w in windows)
            mirrored = any(torch.equal(out[i].flip(2), w) for w in windows)
            assert plain or (flip and mirrored)
            flips += not plain
        assert (flips > 4) == flip


def _write_folder(root, split, classes, per_class, size=12):
    from PIL import Image

    images = {}
    for c in classes:
        (root / split / c).mkdir(parents=True)
        for i in range(per_class):
            img = torch.randint(0, 256, (3, size, size), dtype=torch.uint8)
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / split / c / f"{i:04d}.png")
            images[(c, i)] = img
    return images


def test_image_folders_decode_once_in_class_interleaved_order(tmp_path):
    images = _write_folder(tmp_path / "data", "train", ["b_cls", "a_cls", "c_cls"], 3)
    s = part.load_split(
        "imagefolder", "train", tmp_path / "data", tmp_path / "cache", image_size=12
    )
    assert s.classes == ["a_cls", "b_cls", "c_cls"]
    assert s.y.tolist() == [0, 1, 2] * 3
    assert torch.equal(s.x[1], images[("b_cls", 0)]) and torch.equal(s.x[5], images[("c_cls", 1)])
    assert len(list((tmp_path / "cache").iterdir())) == 1
    again = part.load_split(
        "imagefolder", "train", tmp_path / "data", tmp_path / "cache", image_size=12
    )
    assert torch.equal(again.x, s.x) and torch.equal(again.y, s.y)


def test_tinyimagenet_layout_reads_train_and_the_annotated_val_split(tmp_path):
    from PIL import Image

    root = tmp_path / "tiny-imagenet-200"
    for wnid in ("n02", "n01"):
        (root / "train" / wnid / "images").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (64, 64), (10 * i, 0, 0)).save(
                root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG"
            )
    (root / "val" / "images").mkdir(parents=True)
    for i in range(3):
        # greyscale becomes RGB
        Image.new("L", (64, 64), 100 + i).save(root / "val" / "images" / f"val_{i}.JPEG")
    (root / "val" / "val_annotations.txt").write_text(
        "val_0.JPEG\tn02\t0\t0\t1\t1\nval_1.JPEG\tn01\t0\t0\t1\t1\nval_2.JPEG\tn02\t0\t0\t1\t1\n"
    )
    train = part.load_split("tinyimagenet", "train", tmp_path, tmp_path / "cache")
    test = part.load_split("tinyimagenet", "test", tmp_path, tmp_path / "cache")
    assert train.classes == test.classes == ["n01", "n02"] and train.y.tolist() == [0, 1, 0, 1]
    assert test.y.tolist() == [1, 0, 1] and test.x.shape == (3, 3, 64, 64)
    assert (test.x[1].float().mean(0) - 101).abs().max() <= 2  # file order of the annotations kept


def test_a_test_only_cifar_folder_copy_is_read_interleaved_and_checked_against_the_model(
    tmp_path, fake_run
):
    classes = list(part.SYNTHETIC_CLASSES)
    _write_folder(tmp_path / "copy", "test", classes, 2, size=32)
    s = part.load_split("cifar10", "test", tmp_path / "copy", tmp_path / "cache")
    assert s.classes == sorted(classes) and s.y.tolist()[:10] == list(range(10))
    r = invoke(
        "attack",
        fake_run / "best.safetensors",
        "--dataset",
        "cifar10",
        "--data-dir",
        tmp_path / "copy",
        "--cache-dir",
        tmp_path / "cache",
    )
    assert (
        r.exit_code == 1 and "differ from those of cifar10" in r.stderr
    )  # the smoke model's classes are in another order


def test_synthetic_data_is_fixed_and_balanced():
    a, b = (
        part.load_split("synthetic", "train", "unused"),
        part.load_split("synthetic", "train", "unused"),
    )
    assert torch.equal(a.x, b.x) and a.x.dtype == torch.uint8 and a.x.shape[1:] == (3, 32, 32)
    assert a.y.bincount().min() > 400


@pytest.mark.parametrize(
    "loss, generator, rule",
    [
        ("ce", "pgd", "zscore"),
        ("trades", "pgd", "official"),
        ("mart", "pgd", "random"),
        ("ce", "mma", "uniform"),
        ("trades", "mma", "zscore"),
        ("ce", "pgd", "inverse"),
        ("mart", "pgd", "quadrant-br"),
    ],
)
def test_every_loss_generator_and_rule_makes_a_finite_update(batch, loss, generator, rule):
    model = seeded()
    cfg = part.TrainConfig(loss=loss, generator=generator, mask_rule=rule, steps=2, eps_low=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    parts = part.TrainingModules(model, part.MultiInput(model))
    loss_value, correct = part.train_step(
        parts, optimizer, *batch, cfg, part.AttackSetup.from_config(cfg), part_phase=True
    )
    assert torch.isfinite(loss_value) and 0 <= correct <= len(batch[1])
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_mart_and_trades_objectives_match_their_reference_formulas():
    torch.manual_seed(0)
    nat, adv, y = torch.randn(6, 10), torch.randn(6, 10), torch.randint(0, 10, (6,))
    kl = (F.softmax(nat, 1) * (F.log_softmax(nat, 1) - F.log_softmax(adv, 1))).sum(1)
    assert torch.allclose(
        part.outer_loss("trades", nat, adv, y, 6.0),
        F.cross_entropy(nat, y) + 6.0 * kl.mean(),
        atol=1e-6,
    )
    p_adv, p_nat = F.softmax(adv, 1), F.softmax(nat, 1)
    wrong = p_adv.clone()
    wrong[torch.arange(6), y] = -1
    runner_up = wrong.argmax(1)
    bce = (
        F.cross_entropy(adv, y)
        - torch.log(1.0001 - p_adv[torch.arange(6), runner_up] + 1e-12).mean()
    )
    kl_m = (p_nat * (torch.log(p_nat + 1e-12) - torch.log(p_adv + 1e-12))).sum(1)
    mart = bce + 6.0 * (kl_m * (1.0000001 - p_nat[torch.arange(6), y])).mean()
    assert torch.allclose(part.outer_loss("mart", nat, adv, y, 6.0), mart, atol=1e-5)


@pytest.fixture(scope="session")
def fake_run(tmp_path_factory):
    """A run folder of untrained smoke-preset models written by the real writers (`last`,
    another `best`, the resume state): for the tests whose property does not depend on
    learning, so that the fast tier needs no training."""
    folder = tmp_path_factory.mktemp("fake") / "run"
    folder.mkdir()
    cfg, preset = part.resolve_config({"out": str(folder)}, "smoke", None)
    for seed, name in ((0, "last"), (1, "best")):
        torch.manual_seed(seed)
        model = part.build_model(cfg.model, 10)
        meta = part.CheckpointMeta(
            arch=cfg.model,
            num_classes=10,
            classes=list(part.SYNTHETIC_CLASSES),
            dataset="synthetic",
            image_size=32,
            config=cfg,
            preset=preset,
            epoch=1,
            versions=part.versions(),
            machine=part.machine(),
        )
        part.save_checkpoint(folder / f"{name}.safetensors", model, meta)
        if name == "last":
            part.save_resume_state(
                folder / "last.state.safetensors",
                model,
                torch.optim.SGD(model.parameters(), lr=0.1),
                meta,
                [],
            )
    return folder


@pytest.fixture(scope="session")
def fake_ckpt(fake_run):
    return fake_run / "last.safetensors"


@pytest.fixture(scope="module")
def fake_model(fake_ckpt):
    return part.load_checkpoint(fake_ckpt)[0]


# ---------------------------------------------------------------- training through the CLI

SMALL = ["--preset", "smoke", "--train-subset", 512, "--eval-subset", 128]
# the smallest real run: the options every quick training test shares
MICRO = "--preset smoke --train-subset 64 --eval-subset 16 --val-size 0 --steps 1 --batch-size 32".split()


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    r = cli("train", "--preset", "smoke", "--out", out)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
def test_smoke_training_writes_a_loadable_checkpoint_and_learns(smoke_run):
    rows = [json.loads(line) for line in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert [row["phase"] for row in rows] == ["warm-up"] * 2 + ["PART"] * 5
    assert (
        rows[-1]["natural"] > 0.45 and rows[-1]["pgd20"] > 0.15
    )  # chance: 0.1 (seeds 0-1 give 0.81-0.95 and 0.24)
    model, meta = part.load_checkpoint(smoke_run / "last.safetensors")
    assert meta.arch == "cnn" and meta.epoch == 7 and meta.classes == list(part.SYNTHETIC_CLASSES)
    assert meta.config.eps == 8 and meta.metrics["natural"] == rows[-1]["natural"]
    test = part.load_split("synthetic", "test", "unused").first(128)
    assert part.evaluate(model, test, part.AttackSetup(8 / 255, 2 / 255, batch_size=128, steps=1))[
        "natural"
    ] == pytest.approx(rows[-1]["natural"])
    best = part.load_checkpoint(smoke_run / "best.safetensors")[1]
    assert best.metrics["pgd20"] == max(row["pgd20"] for row in rows)


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe",
    [
        [],
        [
            "--optimizer",
            "adamw",
            "--lr",
            0.002,
            "--schedule",
            "cosine",
            "--lr-warmup",
            0.5,
            "--ema",
            0.9,
        ],
        ["--amp"],  # bf16 autocast on the CPU
    ],
    ids=["paper", "adamw-cosine-ema", "bf16"],
)
def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, recipe):
    args = ["train", *SMALL, "--epochs", 3, "--warmup-epochs", 1, *recipe]
    assert cli(*args, "--out", tmp_path / "full").returncode == 0
    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "part.py"), *map(str, args), "--out", str(cut)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while (
        not ((cut / "metrics.jsonl").exists() and (cut / "metrics.jsonl").read_text().strip())
        and time.time() < deadline
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    assert part.load_checkpoint(cut / "last.safetensors")[1].epoch < 3
    r = cli("train", "--out", cut, "--resume")
    assert r.returncode == 0, r.stderr
    full, resumed = (
        load_file(str(tmp_path / "full" / "last.safetensors")),
        load_file(str(cut / "last.safetensors")),
    )
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert [
        json.loads(line)["epoch"] for line in (cut / "metrics.jsonl").read_text().splitlines()
    ] == [1, 2, 3]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "vgg"], "unknown model 'vgg'"),
        (["--dataset", "mnist"], "'mnist' is not one of"),
        (["--cam", "scorecam"], "'scorecam' is not one of"),
        (["--eps", "4", "--eps-low", "6"], "must not exceed eps"),
        (["--eps", "-1"], "non-negative"),
        (["--eps", "eight"], "1/255 levels"),
        (["--steps", "0"], "steps must be at least 1"),
        (["--warmup-epochs", "9", "--epochs", "3"], "warmup-epochs (9)"),
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--resume"], "--resume needs --out"),
        (["--optimizer", "adam"], "'adam' is not one of"),
        (["--lr-warmup", "1"], "goes with --schedule cosine"),
        (["--ema", "1"], "ema must be at most"),
        (["--init", "no-such-file.pt"], "--init no-such-file.pt not found"),
    ],
)
def test_bad_training_input_gives_one_line_and_a_nonzero_exit(tmp_path, args, message):
    out = [] if "--resume" in args else ["--out", tmp_path / "run"]
    r = (
        invoke("train", "--preset", "smoke", *out, *args)
        if args[0] != "--preset"
        else invoke("train", *args, *out)
    )
    assert r.exit_code != 0
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_bad_config_files_are_reported(tmp_path):
    (tmp_path / "c.toml").write_text('[p]\nmodel = "cnn"\nepochz = 3\n')
    r = invoke("train", "--presets", tmp_path / "c.toml", "--preset", "p")
    assert r.exit_code == 1 and "unknown key 'epochz'" in r.stderr
    (tmp_path / "c.toml").write_text('[p]\nepochs = "three"\n')
    assert (
        "epochs = 'three'"
        in invoke("train", "--presets", tmp_path / "c.toml", "--preset", "p").stderr
    )


def test_a_run_says_what_it_will_take_where_it_resumes_and_a_schedule_that_never_decays(
    tmp_path,
):
    run = [*MICRO, "--epochs", 2, "--warmup-epochs", 1, "--out", tmp_path / "run"]
    r = invoke("train", *run)
    assert r.exit_code == 0, r.stderr
    assert "ends before lr milestone 6: the learning rate never decays" in r.stdout  # smoke's [6]
    assert re.search(r"about \d+ s for the epoch left \(\d+ s each at this warm-up epoch", r.stdout)
    r = invoke("train", *run, "--epochs", 3, "--resume")  # the last --epochs counts
    assert r.exit_code == 0, r.stderr
    assert "resuming at epoch 3 of 3" in r.stdout and "epoch left" not in r.stdout


@pytest.fixture(autouse=True)
def _no_bf16_units(monkeypatch):
    """In-process runs train in fp32 whatever this machine's CPU (the default rule is
    tested with the detection stubbed)."""
    monkeypatch.setattr(part, "cpu_bf16", lambda: "")


def test_a_bf16_training_step_on_the_cpu_stays_in_budget_and_its_evaluation_in_fp32():
    torch.manual_seed(0)
    model = part.build_model("cnn", 10)
    cfg = part.TrainConfig(model="cnn", amp=True, steps=3, batch_size=16)
    parts = part.wrap_for_training(model, cfg, part.ONE_PROCESS, torch.device("cpu"))
    setup = part.AttackSetup.from_config(cfg)
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    budget = part.budget_for(model, x, setup, part_phase=True)
    with part.autocast(x.device, True):
        x_adv = part.make_adversarial(model, x, y, budget, setup, "ce", "pgd", parts.stepper)
    assert x_adv.dtype == torch.float32 and budget.dtype == torch.float32
    assert bool(((x_adv - x).abs() <= budget).all()) and 0 <= x_adv.min() <= x_adv.max() <= 1
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss, _ = part.train_step(parts, optimizer, x, y, cfg, setup, part_phase=True)
    assert torch.isfinite(loss)
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as a notebook might call it
        part.evaluate(model, (x, y), part.eval_setup(16))
        part.evaluate_suite(model, (x, y), ["natural", "fgsm"])
    assert seen and set(seen) == {torch.float32}


@pytest.mark.parametrize(
    "device, bf16, on, said",
    [
        ("cpu", "amx", True, ""),  # the run's header says so
        ("cpu", "avx512_bf16", False, "hint: this CPU computes bf16 natively (avx512_bf16)"),
        ("cpu", "", False, ""),
        ("cuda", "amx", False, ""),
    ],
)
def test_amp_by_default_follows_the_cpus_bf16_units(device, bf16, on, said):
    got, text = part.default_amp(torch.device(device), bf16)
    assert got == on and said in text and bool(text) == bool(said)


def test_a_run_on_a_cpu_with_amx_trains_in_bf16_records_it_and_says_how_to_turn_it_off(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(part, "cpu_bf16", lambda: "amx")
    r = invoke("train", *MICRO, "--epochs", 1, "--warmup-epochs", 0, "--out", tmp_path / "a")
    assert r.exit_code == 0, r.stderr
    assert "amp=bf16 (--no-amp: fp32)" in r.stdout.splitlines()[0]
    assert json.loads((tmp_path / "a" / "config.json").read_text())["config"]["amp"] is True
    assert part.load_checkpoint(tmp_path / "a" / "last.safetensors")[1].config.amp is True
    r = invoke(
        "train", *MICRO, "--epochs", 1, "--warmup-epochs", 0, "--no-amp", "--out", tmp_path / "b"
    )
    assert r.exit_code == 0 and "amp=bf16" not in r.stdout
    assert json.loads((tmp_path / "b" / "config.json").read_text())["config"]["amp"] is False


def test_a_busy_machine_is_said_in_a_terminal_with_what_threads_would_do(monkeypatch, capsys):
    threads = torch.get_num_threads()
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    part.set_threads(0)
    assert capsys.readouterr().err == ""  # a log or a pipe keeps its lines
    monkeypatch.setattr(type(part.console), "is_terminal", property(lambda self: True))
    part.set_threads(0)
    said = capsys.readouterr().err
    assert "load 9.0 on 2 cores" in said and "--threads 1" in said
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    part.set_threads(0)
    assert capsys.readouterr().err == "" and torch.get_num_threads() == threads


def test_attack_reads_the_test_images_where_the_model_was_trained(fake_run, tmp_path, monkeypatch):
    meta = part.load_checkpoint(fake_run / "last.safetensors")[1]
    elsewhere = tmp_path / "my-data"
    elsewhere.mkdir()
    trained = dataclasses.replace(meta.config, dataset="cifar10", data_dir=str(elsewhere))
    meta = dataclasses.replace(meta, config=trained)
    assert part.trained_data_dir(meta, "cifar10") == str(elsewhere)
    assert part.trained_data_dir(meta, "svhn") == "data"  # another data set: the default
    monkeypatch.chdir(tmp_path / "my-data")  # the folder is not here (relative to the run)
    gone = dataclasses.replace(meta, config=dataclasses.replace(trained, data_dir="my-data"))
    assert part.trained_data_dir(gone, "cifar10") == "data"


def test_an_interrupted_attack_says_how_to_go_on(fake_ckpt, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(part, "evaluate_suite", interrupted)
    r = invoke("attack", fake_ckpt, "--attacks", "natural,fgsm", "--n", 8)
    assert r.exit_code == 130 and r.stderr.startswith("interrupted: nothing was kept")
    assert "error" not in r.stderr and len(r.stderr.splitlines()) == 1


def test_a_run_is_rerun_exactly_from_its_config_json_and_user_presets_add_to_the_shipped_ones(
    tmp_path,
):
    tiny = [
        *MICRO,
        "--epochs",
        1,
        "--warmup-epochs",
        0,
        "--seed",
        3,
        "--lr",
        0.02,
    ]
    assert invoke("train", *tiny, "--out", tmp_path / "a").exit_code == 0
    r = invoke("train", "--config", tmp_path / "a" / "config.json", "--out", tmp_path / "b")
    assert r.exit_code == 0, r.stderr
    first, again = (json.loads((tmp_path / d / "config.json").read_text()) for d in "ab")
    assert again["preset"] == "smoke" and again["config"] == {
        **first["config"],
        "out": str(tmp_path / "b"),
    }
    a, b = (load_file(tmp_path / d / "last.safetensors") for d in "ab")
    # the same run, bit for bit
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the options given win over the file; the help says where each default is from
    r = invoke(
        "train",
        "--config",
        tmp_path / "a" / "config.json",
        "--seed",
        4,
        "--epochs",
        1,
        "--out",
        tmp_path / "c",
    )
    assert (
        r.exit_code == 0
        and json.loads((tmp_path / "c" / "config.json").read_text())["config"]["seed"] == 4
    )
    (tmp_path / "s.toml").write_text("lr = 0.03\nmodel = 'cnn'\n")
    text = (
        CliRunner()
        .invoke(
            part.app,
            ["train", "--config", str(tmp_path / "s.toml"), "--help"],
            env={"COLUMNS": "400"},
        )
        .output
    )
    assert "[default: 0.01]" in text and "[default: 80]" in text  # built in; a preset may differ
    # a user's presets file adds presets (and may extend the shipped ones); the shipped ones stay
    (tmp_path / "mine.toml").write_text('[tiny]\nextends = "smoke"\nlr = 0.07\n')
    assert part.preset_names(tmp_path / "mine.toml")[
        -1
    ] == "tiny" and "cifar10" in part.preset_names(tmp_path / "mine.toml")
    values, name, origins = part.preset_settings("tiny", tmp_path / "mine.toml", None)
    assert (
        name == "tiny"
        and values["lr"] == 0.07
        and values["model"] == "cnn"
        and origins["lr"] == "preset tiny"
    )
    for args, message in [
        (["--config", tmp_path / "none.json"], "not found"),
        (["--config", tmp_path / "mine.toml"], "unknown key 'tiny'"),
        (["--presets", tmp_path / "none.toml"], "not found"),
    ]:
        (tmp_path / "bad.json").write_text("{")
        r = invoke("train", *args, "--out", tmp_path / "x")
        assert (
            r.exit_code == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
        ), r.stderr
    r = invoke("train", "--config", tmp_path / "bad.json", "--out", tmp_path / "x")
    assert r.exit_code == 1 and "is not valid JSON" in r.stderr and not (tmp_path / "x").exists()


def test_the_cosine_schedule_warms_up_linearly_then_falls_to_zero_and_ema_is_an_exact_moving_average():
    cfg = part.TrainConfig(lr=0.1, epochs=10, schedule="cosine", lr_warmup=2)
    lrs = [part.lr_at(cfg, e, i, 4) for e in range(10) for i in range(4)]
    # linear, per step, reaching lr
    assert lrs[:8] == pytest.approx([0.1 * k / 8 for k in range(1, 9)])
    assert (
        all(a >= b for a, b in zip(lrs[7:-1], lrs[8:], strict=True))
        and lrs[-1] < 0.1 * 0.01
        and lrs[8] == pytest.approx(0.1)
    )
    step = part.TrainConfig(lr=0.1, lr_milestones=[3, 6], lr_gamma=0.5)
    assert [part.lr_at(step, e, 2, 4) for e in (0, 3, 6)] == pytest.approx([0.1, 0.05, 0.025])
    torch.manual_seed(0)
    model, ema = part.build_model("cnn", 10), part.build_model("cnn", 10)
    model(torch.rand(4, 3, 32, 32))  # train mode: BatchNorm statistics move
    before = [p.clone() for p in ema.parameters()]
    part.ema_update(ema, model, 0.9)
    assert all(
        torch.allclose(e, 0.9 * b + 0.1 * m)
        for e, b, m in zip(ema.parameters(), before, model.parameters(), strict=True)
    )
    assert all(torch.equal(a, b) for a, b in zip(ema.buffers(), model.buffers(), strict=True))


def test_init_starts_a_run_from_given_weights_records_their_hash_and_a_new_head_starts_afresh(
    tmp_path,
):
    torch.manual_seed(1)
    # a foreign state dict for 5 classes; the synthetic data have 10
    five = part.build_model("cnn", 5)
    torch.save(five.state_dict(), tmp_path / "five.pt")
    frozen = [
        *MICRO,
        "--epochs",
        1,
        "--warmup-epochs",
        0,
        "--lr",
        1e-12,
        "--momentum",
        0,
        "--weight-decay",
        0,
    ]
    r = invoke("train", *frozen, "--init", tmp_path / "five.pt", "--out", tmp_path / "a")
    assert r.exit_code == 0, r.stderr
    assert "classifier for 5 classes" in r.stderr and "linear.weight" in r.stderr
    stored = json.loads((tmp_path / "a" / "config.json").read_text())["config"]
    assert stored["init_sha256"] == hashlib.sha256((tmp_path / "five.pt").read_bytes()).hexdigest()
    model, _ = part.load_checkpoint(tmp_path / "a" / "last.safetensors")
    mine, theirs = dict(model.named_parameters()), dict(five.named_parameters())
    assert all(
        torch.allclose(mine[k], theirs[k], atol=1e-9) for k in mine if not k.startswith("linear")
    )  # lr 1e-12
    assert mine["linear.weight"].shape == (10, theirs["linear.weight"].shape[1])
    # our own checkpoint as --init, with an EMA; then the config run again checks it is the same file
    r = invoke(
        "train",
        *frozen,
        "--init",
        tmp_path / "a" / "last.safetensors",
        "--ema",
        0.5,
        "--out",
        tmp_path / "b",
    )
    assert r.exit_code == 0, r.stderr
    b = load_file(tmp_path / "b" / "last.safetensors")
    assert torch.allclose(b["linear.weight"], mine["linear.weight"].detach(), atol=1e-9)
    torch.save(part.build_model("cnn", 10).state_dict(), tmp_path / "five.pt")
    r = invoke("train", "--config", tmp_path / "a" / "config.json", "--out", tmp_path / "c")
    assert r.exit_code == 1 and "not the file this config started from" in r.stderr
    r = invoke(
        "train",
        *frozen,
        "--init",
        tmp_path / "a" / "last.safetensors",
        "--model",
        "resnet18",
        "--out",
        tmp_path / "d",
    )
    assert r.exit_code == 1 and "holds a cnn model, not --model resnet18" in r.stderr


def test_missing_data_exits_2_and_says_where_to_put_it(tmp_path):
    for dataset in ("imagefolder", "tinyimagenet"):
        r = invoke(
            "train",
            "--preset",
            "smoke",
            "--dataset",
            dataset,
            "--data-dir",
            tmp_path / "nothing",
            "--out",
            tmp_path / "r",
        )
        assert r.exit_code == 2 and str(tmp_path / "nothing") in r.stderr


@pytest.mark.slow
def test_a_folder_with_a_run_is_never_overwritten_and_nan_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    r = cli(
        "train",
        *SMALL,
        "--epochs",
        2,
        "--warmup-epochs",
        1,
        "--lr-milestones",
        1,
        "--lr-gamma",
        1e30,
        "--out",
        run,
    )
    assert r.returncode == 3 and "NaN" in r.stderr and "Traceback" not in r.stderr
    model, meta = part.load_checkpoint(run / "last.safetensors")
    assert meta.epoch == 1 and all(
        torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point()
    )
    before = (run / "last.safetensors").read_bytes()
    r = invoke("train", "--preset", "smoke", "--out", run)
    assert r.exit_code == 1 and "already holds a run" in r.stderr
    assert (run / "last.safetensors").read_bytes() == before


def test_attack_rejects_missing_and_corrupt_checkpoints(tmp_path):
    r = invoke("attack", tmp_path / "none.safetensors", "--dataset", "synthetic")
    assert r.exit_code == 1 and "not found" in r.stderr
    (tmp_path / "c.safetensors").write_bytes(b"not a checkpoint")
    r = invoke("attack", tmp_path / "c.safetensors", "--dataset", "synthetic")
    assert (
        r.exit_code == 1
        and "not a readable safetensors" in r.stderr
        and len(r.stderr.strip().splitlines()) == 1
    )


# ---------------------------------------------------------------- evaluation


def reference_pgd(model, x, y, eps, alpha, steps, generator):
    """An independent textbook PGD (Madry et al.): delta parametrisation, its own RNG."""
    delta = (torch.rand(x.shape, generator=generator) * 2 - 1) * eps
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x + delta), y), delta)
        delta = (delta.detach() + alpha * g.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


@pytest.fixture(scope="module")
def smoke_model(smoke_run):
    return part.load_checkpoint(smoke_run / "best.safetensors")[0]


@pytest.fixture(scope="module")
def test_points():
    return part.load_split("synthetic", "test", "unused").first(256)


@pytest.fixture(scope="module")
def suite_with_aa(smoke_model, test_points):
    pytest.importorskip("pyautoattack")
    setup = part.AttackSetup(eps=8 / 255, step=2 / 255, seed=3, batch_size=64)
    shown = []
    result = part.evaluate_suite(
        smoke_model,
        test_points.first(16),
        ["natural", "fgsm", "pgd20", "aa"],
        setup,
        lambda name, done, total, extra: shown.append((name, done, total, extra)),
    )
    result["shown"] = shown
    return result


@pytest.mark.slow
def test_pgd20_agrees_with_an_independent_pgd(smoke_model, test_points):
    x, y = part.to_float(test_points.x), test_points.y
    ours = part.evaluate_suite(
        smoke_model,
        test_points,
        ["natural", "pgd20"],
        part.AttackSetup(8 / 255, 2 / 255, batch_size=128),
    )
    x_ref = reference_pgd(smoke_model, x, y, 8 / 255, 2 / 255, 20, torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = (
            ((smoke_model(x_ref).argmax(1) == y) & (smoke_model(x).argmax(1) == y))
            .float()
            .mean()
            .item()
        )
    assert 0.05 < ref < ours["accuracy"]["natural"] - 0.05  # the comparison means something
    assert abs(ours["accuracy"]["pgd20"] - ref) <= 0.04  # sampling noise of the random starts


@pytest.mark.slow
def test_stronger_attacks_find_more_fgsm_then_pgd20_then_autoattack(suite_with_aa):
    acc = suite_with_aa["accuracy"]
    assert acc["natural"] >= acc["fgsm"] >= acc["pgd20"] >= acc["aa"] >= acc["worst"]
    assert acc["worst"] == min(acc.values())
    assert acc["natural"] > acc["pgd20"]


@pytest.mark.slow
def test_autoattack_shows_each_component_and_reports_its_robust_accuracy(suite_with_aa):
    parts, acc = suite_with_aa["components"]["aa"], suite_with_aa["accuracy"]
    assert list(parts) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert (
        acc["natural"]
        >= parts["apgd-ce"]
        >= parts["apgd-t"]
        >= parts["fab-t"]
        >= parts["square"]
        == acc["aa"]
    )
    shown = [extra for name, done, total, extra in suite_with_aa["shown"] if name == "aa"]
    assert shown and all(c in shown[-1] for c in ("clean", "APGD-CE", "APGD-T", "FAB-T", "SQUARE"))


@pytest.mark.slow
def test_autoattacks_bar_moves_with_each_component_inside_a_batch(suite_with_aa):
    done = [d for name, d, total, extra in suite_with_aa["shown"] if name == "aa"]
    assert done[0] == 0 and done == sorted(done)  # shown at once, then only forward
    assert len(set(done)) == 5, done  # the start and after each of 4 components: one batch


@pytest.mark.slow
def test_an_interrupted_autoattack_batch_keeps_its_finished_components(
    smoke_model, test_points, suite_with_aa, monkeypatch
):
    setup, state = part.AttackSetup(8 / 255, 2 / 255, seed=3, batch_size=64), part.PointFlags()
    ran, real = [], part._aa_component

    def component(adversary, name, *args):
        if name == "apgd-t" and "stopped" not in ran:
            ran.append("stopped")
            raise KeyboardInterrupt
        ran.append(name)
        return real(adversary, name, *args)

    monkeypatch.setattr(part, "_aa_component", component)
    run = lambda: part.evaluate_suite(  # noqa: E731
        smoke_model,
        test_points.first(16),
        ["natural", "fgsm", "pgd20", "aa"],
        setup,
        hooks=part.EvalHooks(state=state),
    )
    with pytest.raises(KeyboardInterrupt):
        run()
    assert ran == ["apgd-ce", "stopped"]
    result = run()
    assert ran[2:] == ["apgd-t", "fab-t", "square"][: len(ran) - 2] and "apgd-ce" not in ran[2:]
    assert result["accuracy"] == suite_with_aa["accuracy"]
    assert result["components"] == suite_with_aa["components"]


@pytest.mark.slow
def test_the_aa_path_gives_exactly_what_pyautoattack_gives_directly(
    smoke_model, test_points, suite_with_aa
):
    from pyautoattack import AutoAttack

    x, y = part.to_float(test_points.x[:16]), test_points.y[:16]
    torch.manual_seed(12345)  # whatever the global state, AutoAttack's seed decides
    seed = part.batch_seed(3, "aa", 0)  # the seed of the evaluation's first (and only) batch
    x_adv, _ = AutoAttack(
        smoke_model, norm="Linf", eps=8 / 255, version="standard", seed=seed, device="cpu"
    ).run_standard_evaluation(x, y, batch_size=64)
    with torch.no_grad():
        direct = (smoke_model(x_adv).argmax(1) == y).float().mean().item()
    assert suite_with_aa["accuracy"]["aa"] == direct


@pytest.mark.slow
def test_an_undefended_model_falls_to_about_zero_under_pgd20(tmp_path, test_points):
    out = tmp_path / "natural"
    r = cli(
        "train",
        "--preset",
        "smoke",
        "--method",
        "at",
        "--eps",
        0,
        "--eps-low",
        0,
        "--steps",
        1,
        "--epochs",
        4,
        "--warmup-epochs",
        0,
        "--train-subset",
        2560,
        "--lr-milestones",
        3,
        "--eval-subset",
        64,
        "--out",
        out,
    )
    assert r.returncode == 0, r.stderr
    model = part.load_checkpoint(out / "last.safetensors")[0]
    acc = part.evaluate_suite(
        model, test_points, ["natural", "pgd20"], part.AttackSetup(8 / 255, 2 / 255, batch_size=128)
    )["accuracy"]
    assert acc["natural"] > 0.5 and acc["pgd20"] <= 0.03


class Recorder(nn.Module):
    """Wraps a model; notes the mode and the TF32 switches each forward runs under."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, set()

    def forward(self, x):
        self.seen.add(
            (
                self.training,
                x.dtype,
                torch.is_autocast_enabled("cpu"),
                torch.backends.cudnn.allow_tf32,
                torch.backends.cuda.matmul.allow_tf32,
            )
        )
        return self.model(x)


@pytest.fixture
def tf32_on():
    """Both TF32 switches on for the test, the previous values back afterwards. (pytest's
    monkeypatch cannot restore torch.backends.cuda.matmul.allow_tf32, a computed attribute,
    from pytest 9.2 on.)"""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_evaluation_runs_in_eval_mode_and_true_fp32_and_restores_the_switches(
    fake_model, test_points, tf32_on
):
    model = Recorder(fake_model).train()
    part.evaluate_suite(
        model,
        test_points.first(16),
        ["natural", "fgsm", "pgd20", "mma"],
        part.AttackSetup(8 / 255, 2 / 255),
    )
    part.evaluate(
        model, test_points.first(16), part.AttackSetup(8 / 255, 2 / 255, batch_size=16, steps=2)
    )
    assert model.seen == {(False, torch.float32, False, False, False)}
    assert (
        model.training and torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    )


@pytest.mark.slow
def test_evaluation_is_reproducible_for_a_seed_and_leaves_the_global_rng_alone(
    smoke_model, test_points
):
    setup = part.AttackSetup(8 / 255, 2 / 255, seed=11, batch_size=64, restarts=2)
    attacks = ["natural", "pgd20", "cw20", "mma", "pgd20-part"]
    state = torch.get_rng_state()
    a = part.evaluate_suite(smoke_model, test_points.first(48), attacks, setup)
    assert torch.equal(torch.get_rng_state(), state)
    b = part.evaluate_suite(smoke_model, test_points.first(48), attacks, setup)
    assert a["accuracy"] == b["accuracy"] and set(a["accuracy"]) == {*attacks, "worst"}


def test_the_attack_command_writes_the_json_report(fake_run, tmp_path):
    report = tmp_path / "r.json"
    r = invoke(
        "attack",
        fake_run / "best.safetensors",
        fake_run / "last.safetensors",
        "--attacks",
        "fgsm,pgd20,cw20",
        "--n-examples",
        64,
        "--per-class",
        "--json",
        report,
    )
    assert r.exit_code == 0, r.stderr
    rows = json.loads(report.read_text())["checkpoints"]
    assert [row["path"] for row in rows] == [
        str(fake_run / "best.safetensors"),
        str(fake_run / "last.safetensors"),
    ]
    for row in rows:
        acc = row["accuracy"]
        assert (
            row["arch"] == "cnn"
            and row["n_examples"] == 64
            and row["eps"] == pytest.approx(8 / 255)
        )
        assert set(acc) == {"natural", "fgsm", "pgd20", "cw20", "worst"} and set(
            row["seconds"]
        ) == set(acc) - {"worst"}
        assert all(0 <= v <= 1 for v in acc.values()) and acc["worst"] == min(acc.values())
        assert set(row["per_class"]) == set(part.SYNTHETIC_CLASSES)
    assert "pgd20" in r.stdout and "worst" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--attacks", "pgdx"], "unknown attack 'pgdx'"),
        (["--n-examples", 5000], "more than the 1000 test images"),
        (["--eps", "x"], "1/255 levels"),
        (["--arch", "resnet18"], "holds a cnn model, not resnet18"),
    ],
)
def test_bad_attack_input_gives_one_line_and_a_nonzero_exit(fake_run, args, message):
    r = invoke("attack", fake_run / "last.safetensors", *args)
    assert r.exit_code != 0 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_foreign_checkpoints_must_fit_the_arch_and_the_classes(tmp_path):
    torch.save(seeded("cnn", num_classes=7).state_dict(), tmp_path / "seven.pt")
    r = invoke("attack", tmp_path / "seven.pt", "--arch", "cnn", "--dataset", "synthetic")
    assert r.exit_code == 1 and "predicts 7 classes but synthetic" in r.stderr
    r = invoke("attack", tmp_path / "seven.pt", "--arch", "wrn-34-10", "--dataset", "synthetic")
    assert r.exit_code == 1 and "does not match architecture wrn-34-10" in r.stderr


def test_aa_without_the_package_says_how_to_install_it(fake_run, monkeypatch):
    real = part.importlib.util.find_spec
    monkeypatch.setattr(
        part.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "pyautoattack" else real(name, *a),
    )
    r = invoke("attack", fake_run / "last.safetensors", "--attacks", "pgd20,aa")
    assert r.exit_code == 1 and "pip install pyautoattack" in r.stderr


class Softmaxed(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return F.softmax(self.model(x), 1)


class Noisy(Softmaxed):
    def forward(self, x):
        return self.model(x) + torch.randn(len(x), 10)


class Flat(Softmaxed):
    def forward(self, x):
        return self.model(x.round() * 0 + x.detach())  # no gradient reaches the input


def test_sanity_checks_flag_probabilities_randomness_and_masked_gradients(cnn, batch):
    x, y = batch
    assert part.sanity_warnings(cnn, x, y) == []
    assert "probabilities" in " ".join(part.sanity_warnings(Softmaxed(cnn), x, y))
    assert "randomised" in " ".join(part.sanity_warnings(Noisy(cnn), x, y))
    assert "zero input gradient" in " ".join(part.sanity_warnings(Flat(cnn), x, y))


# ---------------------------------------------------------------- export and CAM figures


def _our_checkpoint(path, arch, num_classes=10):
    model = seeded(arch, num_classes)
    meta = part.CheckpointMeta(
        arch=arch,
        num_classes=num_classes,
        classes=list(part.SYNTHETIC_CLASSES)[:num_classes],
        dataset="synthetic",
        image_size=32,
        epoch=1,
        config=part.TrainConfig(eps=8.0),
        metrics={"natural": 0.5, "pgd20": 0.25},
    )
    part.save_checkpoint(path, model, meta)
    return model


STANDALONE = """
import sys, torch
x = torch.load(sys.argv[2], weights_only=True)
torch.save(torch.jit.load(sys.argv[1])(x), sys.argv[3])
print("part" in sys.modules)
"""


@pytest.mark.parametrize("arch", ["cnn", "resnet18"])
@pytest.mark.slow
def test_torchscript_and_onnx_exports_give_the_same_logits(tmp_path, arch):
    import onnx

    model = _our_checkpoint(tmp_path / "model.safetensors", arch)
    r = invoke(
        "export",
        tmp_path / "model.safetensors",
        "--format",
        "torchscript,onnx",
        "--out",
        tmp_path / "exp",
    )
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == [
        "model.json",
        "model.onnx",
        "model.ts.pt",
    ]
    # TorchScript, in a process that never imports part
    x = torch.rand(5, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            STANDALONE,
            tmp_path / "exp" / "model.ts.pt",
            tmp_path / "x.pt",
            tmp_path / "y.pt",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"
    with torch.no_grad():
        ref = model(x)
    assert (torch.load(tmp_path / "y.pt", weights_only=True) - ref).abs().max() <= 1e-4
    # ONNX: self-contained, named, dynamic batch, opset >= 18, the model card inside
    proto = onnx.load(str(tmp_path / "exp" / "model.onnx"))
    assert [i.name for i in proto.graph.input] == ["image"] and [
        o.name for o in proto.graph.output
    ] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 18
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["classes"]) == list(part.SYNTHETIC_CLASSES) and json.loads(
        props["input"]
    )["range"] == [0.0, 1.0]
    assert np_logits(tmp_path / "exp" / "model.onnx", x).sub(ref).abs().max() <= 1e-4
    card = json.loads((tmp_path / "exp" / "model.json").read_text())
    assert (
        card["input"]["shape"] == ["N", 3, 32, 32]
        and card["training_metrics"]["pgd20"] == 0.25
        and card["config"]["eps"] == 8.0
    )
    assert "same" in r.stdout and "FAILED" not in r.stdout


def np_logits(path, x):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"image": x.numpy()})[0])


@pytest.mark.slow
def test_a_foreign_state_dict_exports_to_every_format(tmp_path):
    model = seeded("cnn", num_classes=4)
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "foreign.pth")
    r = invoke("export", tmp_path / "foreign.pth", "--arch", "cnn", "--out", tmp_path / "exp")
    assert r.exit_code == 0, r.output
    assert {p.name for p in (tmp_path / "exp").iterdir()} >= {
        "foreign.onnx",
        "foreign.pt2",
        "foreign.json",
    }
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        got, ref = part.run_exported("pt2", tmp_path / "exp" / "foreign.pt2", x), model(x)
    assert (got - ref).abs().max() <= 1e-4
    assert json.loads((tmp_path / "exp" / "foreign.json").read_text())["classes"] == [
        "0",
        "1",
        "2",
        "3",
    ]


@pytest.mark.slow
def test_a_failed_export_check_exits_nonzero_and_names_the_format(tmp_path, monkeypatch):
    _our_checkpoint(tmp_path / "m.safetensors", "cnn")
    real = part.run_exported
    monkeypatch.setattr(
        part,
        "run_exported",
        lambda fmt, path, x: real(fmt, path, x) + (0.01 if fmt == "onnx" else 0),
    )
    r = invoke(
        "export", tmp_path / "m.safetensors", "--format", "onnx,pt2", "--out", tmp_path / "exp"
    )
    assert r.exit_code == 1 and "export check failed for onnx" in r.stderr


def test_export_of_a_missing_or_corrupt_checkpoint_fails_cleanly(tmp_path):
    r = invoke("export", tmp_path / "nope.safetensors", "--out", tmp_path / "exp")
    assert r.exit_code == 1 and "not found" in r.stderr
    (tmp_path / "bad.pt").write_bytes(b"\x80\x04garbage")
    r = invoke("export", tmp_path / "bad.pt", "--arch", "cnn", "--out", tmp_path / "exp")
    assert (
        r.exit_code == 1 and "weights-only" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    )
    r = invoke("export", tmp_path / "bad.pt", "--format", "tflite", "--out", tmp_path / "exp")
    assert r.exit_code == 1 and "unknown export format 'tflite'" in r.stderr
    assert not (tmp_path / "exp").exists()


def test_paths_of_the_wrong_kind_give_one_line_and_keep_what_is_there(fake_run, tmp_path):
    ckpt = fake_run / "last.safetensors"
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    cases = [
        (invoke("train", "--preset", "smoke", "--out", taken), "is a file, not a folder"),
        (invoke("export", ckpt, "--out", taken), "is a file, not a folder"),
        (invoke("attack", tmp_path, "--arch", "cnn"), "is a folder, not a file"),
        (
            invoke(
                "attack",
                ckpt,
                "--n-examples",
                8,
                "--attacks",
                "natural",
                "--json",
                taken / "r.json",
            ),
            "error: ",
        ),
    ]
    for r, message in cases:
        assert (
            r.exit_code == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
        ), r.stderr
        assert "Traceback" not in r.stderr
    assert taken.read_text() == "keep me"


# ---------------------------------------------------------------- several processes (torchrun / DDP)


def test_epoch_shards_are_disjoint_and_cover_the_epoch():
    n, batch = 203, 16
    order = torch.randperm(n, generator=torch.Generator().manual_seed(5))
    for world in (1, 2, 3):
        shards = [
            part.epoch_batches(n, batch, part.Dist(r, r, world), torch.Generator().manual_seed(5))
            for r in range(world)
        ]
        assert len({len(s) for s in shards}) == 1  # every rank takes the same number of steps
        seen = torch.cat([torch.cat(s) for s in shards]).tolist()
        assert len(seen) == len(set(seen))  # disjoint
        tail = n % batch
        assert len(seen) == n - (
            tail if tail < 2 * world else 0
        )  # the whole epoch (but a too-small last batch)
        for step, global_batch in enumerate(order.split(batch)[: len(shards[0])]):
            assert torch.equal(torch.cat([s[step] for s in shards]), global_batch)


class TwoConvs(nn.Module):
    """Two strided convolutions (the CAM layer), global average pooling, a linear head."""

    def __init__(self, *body: nn.Module, width: int):
        super().__init__()
        self.body, self.linear = nn.Sequential(*body), nn.Linear(width, 10)

    def features(self, x):
        return self.body(x)

    def head(self, a):
        return self.linear(a.mean((2, 3)))

    def forward(self, x):
        return self.head(self.features(x))


def NoBatchStats():
    """A model without batch statistics, so that a split batch computes the same thing."""
    torch.manual_seed(0)
    return TwoConvs(
        nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(), width=32
    )


def _one_step(model, update_model, x, y, loss):
    cfg = part.TrainConfig(eps=8, eps_low=4, step=2, steps=3, loss=loss)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    part.train_step(
        part.TrainingModules(model, update_model),
        optimizer,
        x,
        y,
        cfg,
        part.AttackSetup.from_config(cfg),
        part_phase=True,
    )


def _ddp_step(rank, world, x, y, loss, out):
    model = NoBatchStats()
    ddp = nn.parallel.DistributedDataParallel(part.MultiInput(model))
    _one_step(model, ddp, x.tensor_split(world)[rank], y.tensor_split(world)[rank], loss)
    if rank == 0:
        torch.save(model.state_dict(), out)


def _ddp_worker(rank, world, init_file, x, y, loss, out):
    import gc
    import os

    import torch.distributed as td

    # no random start: the step is deterministic
    part.LOSSES[loss] = dataclasses.replace(part.LOSSES[loss], start=False)
    td.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    # returns with the DDP wrapper (and its hold on the group) gone
    _ddp_step(rank, world, x, y, loss, out)
    gc.collect()
    td.barrier()  # leave together (as part.process_group does)
    td.destroy_process_group()
    # The result is on disk. Skip interpreter finalisation, where gloo's worker threads can
    # abort a process under load (SIGABRT "terminate called without an active exception").
    os._exit(0)


@pytest.mark.parametrize("loss", ["ce", "trades"])
@pytest.mark.slow
def test_two_processes_holding_half_a_batch_each_make_the_same_update_as_one(
    tmp_path, monkeypatch, batch, loss
):
    x, y = batch[0][:16], batch[1][:16]
    monkeypatch.setitem(part.LOSSES, loss, dataclasses.replace(part.LOSSES[loss], start=False))
    single = NoBatchStats()
    _one_step(single, part.MultiInput(single), x, y, loss)
    torch.multiprocessing.spawn(
        _ddp_worker,
        args=(2, str(tmp_path / "init"), x, y, loss, str(tmp_path / "ddp.pt")),
        nprocs=2,
    )
    synced = torch.load(tmp_path / "ddp.pt", weights_only=True)
    start = NoBatchStats().state_dict()
    for key, value in single.state_dict().items():
        assert torch.allclose(value, synced[key], atol=1e-6), key
    # the step did move the weights
    assert not torch.allclose(start["linear.weight"], synced["linear.weight"])


def torchrun(*args):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(ROOT / "part.py"),
            *map(str, args),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )


@pytest.mark.slow
def test_torchrun_with_two_cpu_processes_writes_one_model_and_resumes_bit_exactly(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    r = torchrun("train", *SMALL, "--epochs", 2, "--warmup-epochs", 1, "--out", whole)
    assert r.returncode == 0, r.stderr[-2000:]
    files = {"best.safetensors", "last.safetensors", "last.state.safetensors", "metrics.jsonl"}
    assert files | {"config.json", "summary.csv"} <= {p.name for p in whole.iterdir()}
    assert r.stdout.count("part train") == 1 and "processes=2" in r.stdout, r.stdout  # rank 0 only
    rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    # the figures of the log are those of the saved model (each process once kept its own
    # BatchNorm statistics: the log and the file disagreed)
    model, meta = part.load_checkpoint(whole / "last.safetensors")
    evaluation = part.load_run_data(meta.config)[1]
    assert part.evaluate(model, evaluation)["natural"] == rows[-1]["natural"]
    r = torchrun("train", *SMALL, "--epochs", 1, "--warmup-epochs", 1, "--out", cut)
    assert r.returncode == 0, r.stderr[-2000:]
    r = torchrun("train", "--out", cut, "--resume", "--epochs", 2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _same_weights(whole / "last.safetensors", cut / "last.safetensors")
    # the count is recorded: the run's config.json re-runs it as it ran, and a resume at
    # another count says that it is not bit-exact
    assert json.loads((whole / "config.json").read_text())["machine"]["processes"] == 2
    r = cli("train", "--config", whole / "config.json", "--out", tmp_path / "again")
    assert r.returncode == 0, r.stderr[-2000:]
    assert _same_weights(whole / "last.safetensors", tmp_path / "again" / "last.safetensors")
    r = cli("train", "--out", cut, "--resume", "--epochs", 3)
    assert r.returncode == 0 and "the run used 2 processes, this resume 1" in r.stderr, r.stderr


@pytest.mark.slow  # a real run, processes or a terminal: over 2 s
def test_nproc_says_an_error_once_and_no_launcher_traceback(monkeypatch):
    r = cli("attack", "missing.safetensors", "--nproc", 2)  # both processes find the same bad input
    assert r.returncode == 1 and r.stderr == "error: checkpoint missing.safetensors not found\n", (
        r.stderr
    )
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = invoke("train", "--preset", "smoke", "--nproc", 2)
    assert r.exit_code == 1 and "--nproc cannot be given under torchrun" in r.stderr
    assert part.without_option(
        ["--out", "x", "--nproc", "2", "--nproc=3", "--lr", "1"], "--nproc"
    ) == ["--out", "x", "--lr", "1"]


def _children(pid: int) -> dict[int, str]:
    """The processes started by `pid`, each with its RANK."""
    found = {}
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                # a child read between fork and exec still has the launcher's environment (no RANK yet)
                environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
                found[int(child)] = next(
                    (e[5:].decode() for e in environ if e.startswith(b"RANK=")), ""
                )
    except OSError:  # a process that ended while it was read
        pass
    return found


@pytest.mark.slow
def test_nproc_interrupted_says_how_to_go_on_and_a_killed_process_is_named(tmp_path):
    out, args = tmp_path / "run", [*map(str, TINY), "--train-subset", "1024", "--nproc", "2"]
    launch = [sys.executable, str(ROOT / "part.py"), "train", *args, "--out", str(out)]
    proc = subprocess.Popen(
        launch,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 300
    while not (out / "config.json").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # passed on once to each process, which stops as it would alone
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert (
        err
        == f"interrupted in epoch 1 (no epoch had finished). Continue with: python part.py train --out {out} --resume --nproc 2\n"
    )
    # the way on works, and a process killed from outside is named by the launcher
    proc = subprocess.Popen(
        [*launch, "--resume"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    ranks, deadline = {}, time.time() + 300
    while "1" not in ranks.values() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
        ranks = _children(proc.pid)  # a child has its RANK only once it has exec-ed
    assert "1" in ranks.values(), (proc.poll(), ranks)
    os.kill(next(pid for pid, rank in ranks.items() if rank == "1"), signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert (
        proc.returncode == 137
        and "error: process 1 of 2 was killed by SIGKILL" in err
        and "Traceback" not in err
    ), err
    r = cli("train", "--out", out, "--resume", "--nproc", 2)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert part.load_checkpoint(out / "last.safetensors")[1].epoch == 2


def test_one_read_gives_a_safetensors_files_tensors_metadata_and_hash(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "f.safetensors"
    save_file(
        {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(2, dtype=torch.int8)},
        str(path),
        metadata={"k": '{"v": 1}'},
    )
    tensors, metadata, sha = part.tensors_of(path)
    with safe_open(str(path), "pt") as f:
        assert metadata == f.metadata() == part.safetensors_metadata(path)
    assert sha == part.file_hash(path) and torch.equal(tensors["a"], load_file(str(path))["a"])
    # truncated: no tensors, and a clear error from the reader that says so
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(part.CliError, match="not a readable safetensors file"):
        part.read_safetensors(path)
    (tmp_path / "junk").write_bytes(b"\xff" * 64)
    assert (
        part.safetensors_metadata(tmp_path / "junk")
        == {}
        == part.safetensors_metadata(tmp_path / "missing")
    )


BLOCKER = """
import sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
sys.meta_path.insert(0, Blocked())
"""


@pytest.mark.slow
def test_part_py_alone_trains_attacks_and_exports_without_the_optional_packages(tmp_path):
    optional = ("timm", "robustbench", "wandb", "huggingface_hub", "tensorboard", "matplotlib")
    blocked = {*optional, "pyautoattack", "part_tools"}
    (tmp_path / "sitecustomize.py").write_text(BLOCKER.format(blocked=blocked))
    shutil.copy(ROOT / "part.py", tmp_path)
    shutil.copy(ROOT / "configs.toml", tmp_path)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}

    def python(*args):
        return subprocess.run(
            [sys.executable, *map(str, args)], capture_output=True, text=True, cwd=tmp_path, env=env
        )

    r = python("-c", "import matplotlib")
    assert r.returncode != 0 and "blocked" in r.stderr  # the blocker does block
    for command in (
        ["train", *TINY, "--out", "run"],
        ["attack", "run/best.safetensors", "--attacks", "natural,pgd3", "--n-examples", 16],
        ["export", "run/best.safetensors", "--format", "torchscript,onnx", "--out", "export"],
    ):
        r = python("part.py", *command)
        assert r.returncode == 0, f"{command}: {r.stderr[-2000:]}"
    assert "report" not in python("part.py", "--help").stdout
    # what comes with the tools is said to be missing, in one line
    r = python("part.py", "export", "run/best.safetensors", "--format", "hf")
    assert r.returncode == 1 and "unknown export format 'hf'" in r.stderr, r.stderr
    r = python("part.py", "train", "--out", "run", "--resume", "--epochs", 3, "--tensorboard")
    assert r.returncode == 0 and "--tensorboard comes with part_tools.py" in r.stderr, r.stderr
    for command in ("attack", "export"):
        r = python("part.py", command, "robustbench:Wong2020Fast")
        assert r.returncode == 1 and "robustbench:NAME models come with part_tools.py" in r.stderr
    assert "--sweep" not in python("part.py", "attack", "--help").stdout


@pytest.mark.slow  # a real run, processes or a terminal: over 2 s
def test_import_part_is_the_card_alone_and_running_it_adds_the_tools():
    code = "import sys, part; print(sorted(c.name for c in part.app.registered_commands), 'part_tools' in sys.modules)"
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert r.returncode == 0 and r.stdout.split() == [
        "['attack',",
        "'export',",
        "'train']",
        "False",
    ], r.stdout + r.stderr
    r = cli("--help")
    assert r.returncode == 0 and all(
        name in r.stdout for name in ("train", "attack", "export", "report", "cam", "bench")
    )
    tree = ast.parse((ROOT / "part.py").read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    outside_main = [n for n in imports if "part_tools" in ast.unparse(n) and n.col_offset == 0]
    assert not outside_main  # only main() imports the tools, when the program runs
    # the method reads in one sitting: CAM to train_epoch, one stretch with nothing else between
    spans = {n.name: (n.lineno, n.end_lineno) for n in tree.body if isinstance(n, ast.FunctionDef)}
    first, last = spans["_gradcam_weights"][0], spans["train_epoch"][1]
    assert last - first <= 900
    source = (ROOT / "part.py").read_text().splitlines()
    banners = [line.split()[-1] for line in source[first:last] if line.startswith("# =====")]
    assert banners == ["maps", "losses", "attacks", "evaluation"], (
        banners
    )  # budget maps ... step and evaluation
    # the card's attack has the options of a standard evaluation; the tools' come with the tools
    card = [p for p in inspect.signature(part.attack_command).parameters if p != "checkpoints"]
    assert len(card) <= 20 and "sweep" not in card and "state" not in card


# ---------------------------------------------------------------- the code's shape: one list of settings, registries


def test_every_training_setting_is_a_train_option_with_its_choices():
    import typer.main

    command = typer.main.get_command(part.app).commands["train"]
    options = {p.name for p in command.params} - {"help"}
    recorded = {"init_sha256"}  # recorded in the config by the run itself, never an option
    assert options == set(part.CONFIG_FIELDS) - recorded | {
        "preset",
        "presets",
        "config",
        "resume",
        "nproc",
    }
    text = invoke("train", "--help").output
    for choice in (
        *part.CAM_WEIGHTS,
        *part.MASK_RULES,
        *part.LOSSES,
        *part.OPTIMIZERS,
        *part.SCHEDULES,
    ):
        assert choice in text


def test_config_values_are_checked_by_their_real_types():
    assert part._base_type(bool | None) == (bool, True) and part._base_type(
        typing.Optional[bool]
    ) == (bool, True)
    assert part.coerce("compile", None, "t") is None and part.coerce("amp", True, "t") is True
    assert (
        part.coerce("lr_milestones", "60, 75", "t") == [60, 75]
        and part.coerce("eps", "8/255", "t") == 8.0
    )
    for key, bad in (
        ("compile", "yes"),
        ("sync_bn", None),  # amp may be None (the machine decides), sync_bn may not
        ("epochs", 2.5),
        ("epochs", True),
        ("lr", "fast"),
        ("lr_milestones", "6,x"),
    ):
        with pytest.raises(part.CliError):
            part.coerce(key, bad, "t")


def test_a_new_cam_method_mask_rule_and_attack_are_one_function_and_one_registry_line(
    monkeypatch, cnn, batch
):
    x, y = batch
    monkeypatch.setitem(
        part.CAM_WEIGHTS, "ones", lambda acts, grads: torch.ones_like(grads[:, :, :1, :1])
    )
    cam = part.class_activation(cnn, x, "ones")
    acts = cnn.features(x)
    ref = acts.sum(1, keepdim=True).clamp(min=0)
    ref = (ref - ref.amin((2, 3), keepdim=True)) / (
        ref.amax((2, 3), keepdim=True) - ref.amin((2, 3), keepdim=True)
    )
    assert torch.allclose(cam, ref, atol=1e-5)
    monkeypatch.setitem(
        part.MASK_RULES,
        "everywhere",
        lambda cam, eps, eps_low, size, generator=None: torch.full((len(cam), 1, *size), eps),
    )
    assert torch.equal(
        part.eps_map(cam, EPS, EPS_LOW, "everywhere", size=(32, 32)),
        torch.full((len(x), 1, 32, 32), EPS),
    )
    monkeypatch.setitem(
        part.ATTACKS,
        "noise",
        part.AttackFamily(
            lambda model, x, y, s, spec, seed: (
                (x + s.eps * torch.randn_like(x).sign()).clamp(0, 1),
                {},
            )
        ),
    )
    result = part.evaluate_suite(
        cnn, part.synthetic_split(32, 3), ["natural", "noise"], part.AttackSetup(EPS, 2 / 255)
    )
    assert set(result["accuracy"]) == {"natural", "noise", "worst"}


# ---------------------------------------------------------------- a fresh install, versions


def test_the_version_is_printed_and_stored_in_checkpoints_and_reports(fake_run, tmp_path):
    r = invoke("--version")
    assert r.exit_code == 0 and part.__version__ in r.output and torch.__version__ in r.output
    meta = part.load_checkpoint(fake_run / "last.safetensors")[1]
    assert meta.versions["part"] == part.__version__ and meta.versions["torch"] == torch.__version__
    r = invoke(
        "attack",
        fake_run / "last.safetensors",
        "--attacks",
        "fgsm",
        "--n-examples",
        16,
        "--json",
        tmp_path / "r.json",
    )
    report = json.loads((tmp_path / "r.json").read_text())
    assert (
        report["versions"]["part"] == part.__version__
        and report["checkpoints"][0]["versions"]["torch"] == torch.__version__
    )


@pytest.mark.slow
def test_pip_install_gives_a_part_command_that_finds_its_presets(tmp_path):
    pytest.importorskip("setuptools")
    import shutil

    source, prefix = (
        tmp_path / "source",
        tmp_path / "prefix",
    )  # a copy: setuptools builds inside the source folder
    source.mkdir()
    for name in ("part.py", "pyproject.toml", "README.md", "configs.toml"):
        shutil.copy(ROOT / name, source / name)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--prefix",
            str(prefix),
            str(source),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    site = next(prefix.glob("lib/python*/site-packages"))
    assert (prefix / "share" / "part" / "configs.toml").is_file() and (site / "part.py").is_file()
    env = {**os.environ, "PYTHONPATH": str(site)}
    script = subprocess.run(
        [str(prefix / "bin" / "part"), "--version"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert script.returncode == 0 and part.__version__ in script.stdout, script.stderr
    # the installed module reads the presets installed beside it, from anywhere
    check = "import sys, part; sys.prefix = sys.argv[1]; print(part.preset_values(part.read_presets(next(p for p in part.config_paths() if p.is_file())), 'smoke', 'x')['model'])"
    out = subprocess.run(
        [sys.executable, "-c", check, str(prefix)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert out.returncode == 0 and out.stdout.strip() == "cnn", out.stderr


# ---------------------------------------------------------------- validation split


def test_the_validation_split_is_class_balanced_disjoint_and_a_function_of_the_seed():
    full = part.synthetic_split(600, seed=4)
    train, val = part.carve_validation(full, 100, seed=0)
    counts = torch.bincount(val.y, minlength=10)
    assert len(val.y) == 100 and counts.max() - counts.min() <= 0 and len(train.y) == 500
    assert torch.equal(part.carve_validation(full, 100, seed=0)[1].x, val.x)
    assert not torch.equal(part.carve_validation(full, 100, seed=1)[1].x, val.x)
    pixels = lambda s: {bytes(img.numpy().tobytes()) for img in s.x}  # noqa: E731
    assert not pixels(train) & pixels(val) and len(pixels(train) | pixels(val)) == len(pixels(full))
    with pytest.raises(part.CliError, match="too large"):
        part.carve_validation(full, 595, seed=0)


@pytest.mark.slow
def test_best_is_chosen_on_the_validation_split_when_there_is_one(tmp_path):
    r = cli(
        "train",
        *SMALL[:-2],  # --eval-subset would do nothing with a validation split: it is refused
        "--epochs",
        1,
        "--warmup-epochs",
        0,
        "--val-size",
        100,
        "--out",
        tmp_path / "v",
    )
    assert r.returncode == 0, r.stderr
    assert "100 validation images held out" in r.stdout
    meta = part.load_checkpoint(tmp_path / "v" / "best.safetensors")[1]
    assert meta.best["eval_on"] == "val" and meta.metrics["eval_on"] == "val"
    assert json.loads((tmp_path / "v" / "config.json").read_text())["eval_on"] == "val"


# ---------------------------------------------------------------- no invented numbers


@pytest.mark.parametrize(
    "args, message",
    [
        (["--step", "nan"], "finite"),
        (["--step", "inf"], "finite"),
        (["--step", "0"], "--step must be"),
        (["--eps", "0"], "--eps must be positive"),
        (["--eps", "-8"], "non-negative"),
        (["--attacks", "pgd20-part", "--eps-low", "40"], "must not exceed eps"),
        (["--attacks", "pgd20-part", "--eps-low", "-8"], "non-negative"),
        (["--attacks", "pgd20-part", "--eps", "4"], "exceeds --eps 4/255"),
    ],
)
def test_attack_refuses_budgets_and_steps_that_would_invent_a_number(fake_run, args, message):
    r = invoke("attack", fake_run / "last.safetensors", "--n-examples", 8, *args)
    assert r.exit_code == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (
        r.stderr
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--step", "inf"], "finite"),
        (["--step", "nan"], "finite"),
        (["--lr-gamma", "-1"], "lr-gamma must be positive"),
        (["--lr", "nan"], "finite"),
        (["--seed", "99999999999999999999999"], "seed must be at most"),
        (["--image-size", "200000"], "image-size must be at most"),
        (["--batch-size", "10000000"], "batch-size must be at most"),
        (["--device", "gpu"], "unknown device 'gpu'"),
        (["--model", "torchvision:nonet"], "unknown torchvision classifier"),
    ],
)
def test_train_refuses_impossible_settings_in_one_line(tmp_path, args, message):
    r = invoke("train", "--preset", "smoke", "--out", tmp_path / "run", *args)
    assert r.exit_code != 0 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (
        r.stderr
    )
    assert not (tmp_path / "run" / "config.json").exists()


def test_the_api_refuses_nan_budgets_and_the_budget_check_fails_on_nan(cnn, batch):
    x, y = batch
    for eps, step in (
        (EPS, math.nan),
        (EPS, math.inf),
        (EPS, 0.0),
        (math.nan, 2 / 255),
        (-EPS, 2 / 255),
        (torch.full_like(x, math.nan), 2 / 255),
        (torch.full_like(x, -EPS), 2 / 255),
    ):
        with pytest.raises(ValueError):
            part.pgd(cnn, x, y, eps, step, 2)
    with pytest.raises(ValueError):
        part.AttackSetup(EPS, math.nan)
    with pytest.raises(part.CliError, match="not finite"):
        part.check_budget(torch.full_like(x, math.nan), x, EPS, "pgd20")
    part.check_budget(x, x, EPS, "natural")  # the clean images are inside the ball


def test_evaluate_names_its_pgd_result_by_its_steps(cnn):
    result = part.evaluate(
        cnn, part.synthetic_split(8, 1), part.AttackSetup(EPS, 2 / 255, batch_size=8, steps=3)
    )
    assert set(result) == {"natural", "pgd3"}


def test_16_bit_pngs_decode_to_8_bits_instead_of_saturating(tmp_path):
    import numpy as np
    from PIL import Image

    grey = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    Image.fromarray(grey).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I;16")
    decoded = part._decode_image(tmp_path / "deep.png", 8)
    expected = torch.from_numpy((grey / 257.0).round().astype(np.uint8))
    assert torch.equal(decoded[0], expected) and torch.equal(decoded[1], expected)


# ---------------------------------------------------------------- no lost or stuck runs

TINY = "--preset smoke --train-subset 192 --eval-subset 32 --epochs 2 --warmup-epochs 1".split()

KILLER = """
import os, signal, sys
import part
count, at, when = [0], int(os.environ["KILL_AT"]), os.environ["KILL_WHEN"]
real = os.replace
def replace(src, dst):
    count[0] += 1
    if count[0] == at and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)  # the temporary file is complete, the rename not done
    real(src, dst)
    if count[0] == at and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)  # e.g. between the resume state and `last`
os.replace = replace
sys.argv[0] = "part.py"
part.app()
"""


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    r = cli("train", *TINY, "--out", out)
    assert r.returncode == 0, r.stderr
    return out


# os.replace calls of a TINY run: 1 config.json; epoch 1: 2 state, 3 last, 4 best, 5 metrics, 6 summary, 7 curves; epoch 2: 8 state, 9 last, ...
@pytest.mark.parametrize("at, when", [(2, "before"), (2, "after"), (4, "before"), (9, "after")])
@pytest.mark.slow
def test_a_kill_at_any_instant_resumes_to_the_uninterrupted_result(
    tiny_reference, tmp_path, at, when
):
    out = tmp_path / "run"
    env = {**os.environ, "KILL_AT": str(at), "KILL_WHEN": when}
    crashed = subprocess.run(
        [sys.executable, "-c", KILLER, "train", *map(str, TINY), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    r = cli("train", "--out", out, "--resume")
    assert r.returncode == 0, r.stderr
    reference, resumed = (
        load_file(str(tiny_reference / "last.safetensors")),
        load_file(str(out / "last.safetensors")),
    )
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert (
        part.load_checkpoint(out / "best.safetensors")[1].epoch
        == part.load_checkpoint(tiny_reference / "best.safetensors")[1].epoch
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2] and len(
        (out / "summary.csv").read_text().splitlines()
    ) == 3
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


@pytest.mark.slow
def test_a_full_disk_stops_the_run_in_one_line_and_resume_finishes_it(
    tiny_reference, tmp_path, monkeypatch
):
    import errno

    real, writes = part.save_tensors, []

    def full(path, tensors, metadata):
        writes.append(path.name)
        if len(writes) == 4:  # epoch 2's resume state
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, tensors, metadata)

    monkeypatch.setattr(part, "save_tensors", full)
    out = tmp_path / "run"
    r = invoke("train", *TINY, "--out", out)
    assert (
        r.exit_code == 1
        and "No space left" in r.stderr
        and "--resume" in r.stderr
        and len(r.stderr.strip().splitlines()) == 1
    )
    monkeypatch.setattr(part, "save_tensors", real)
    assert invoke("train", "--out", out, "--resume").exit_code == 0
    reference, resumed = (
        load_file(str(tiny_reference / "last.safetensors")),
        load_file(str(out / "last.safetensors")),
    )
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_any_file_of_a_run_makes_the_folder_taken(tmp_path):
    for name in ("best.safetensors", "summary.csv", "config.json"):
        out = tmp_path / name.split(".")[0]
        out.mkdir()
        (out / name).write_text("keep")
        r = invoke("train", "--preset", "smoke", "--out", out)
        assert (
            r.exit_code == 1
            and "already holds a run" in r.stderr
            and (out / name).read_text() == "keep"
        )


def test_two_trainings_on_one_folder_cannot_both_write(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with part.folder_lock(out, "a test"):
        r = invoke("train", "--preset", "smoke", "--out", out)
    assert r.exit_code == 1 and "in use by a test" in r.stderr
    assert not (out / "config.json").exists()


@pytest.mark.slow
def test_resume_keeps_the_runs_own_settings_and_data(tiny_reference, tmp_path):
    # the run was started from preset smoke with --train-subset 192: the preset alone says 4096, which is refused by name
    r = invoke("train", "--out", tiny_reference, "--resume", "--preset", "smoke")
    assert (
        r.exit_code == 1
        and "--train-subset 4096 (from preset smoke) differs from the run's own 192" in r.stderr
    )
    r = invoke("train", "--out", tiny_reference, "--resume", "--lr", 0.5)
    assert r.exit_code == 1 and "--lr 0.5 differs from the run's own 0.05" in r.stderr
    classes = ["a", "b"]
    for name in ("one", "two"):
        _write_folder(tmp_path / name, "train", classes, 4, size=8)
        _write_folder(tmp_path / name, "test", classes, 2, size=8)
    args = [
        "--dataset",
        "imagefolder",
        "--image-size",
        8,
        "--model",
        "cnn",
        "--batch-size",
        4,
        "--eval-subset",
        4,
        "--epochs",
        1,
        "--warmup-epochs",
        0,
        "--steps",
        1,
        "--cache-dir",
        tmp_path / "cache",
        "--out",
        tmp_path / "run",
    ]
    assert invoke("train", *args, "--data-dir", tmp_path / "one").exit_code == 0
    r = invoke(
        "train",
        "--out",
        tmp_path / "run",
        "--resume",
        "--epochs",
        2,
        "--data-dir",
        tmp_path / "two",
        "--cache-dir",
        tmp_path / "cache",
    )
    assert r.exit_code == 1 and "differ from the data this run was trained on" in r.stderr


@pytest.mark.slow
def test_ctrl_c_before_the_first_epoch_ends_says_what_works_and_it_does(tmp_path):
    out = tmp_path / "run"
    # 1,024 images: an epoch of a few seconds, so that the signal surely lands inside the first one
    # (a shell's background job inherits SIGINT ignored, and Python then keeps ignoring it: restore the default)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "part.py"),
            "train",
            *map(str, TINY),
            "--train-subset",
            "1024",
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 300
    while not (out / "config.json").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "no epoch had finished" in err and "--resume" in err, err
    r = cli("train", "--out", out, "--resume")
    assert r.returncode == 0, r.stderr
    assert part.load_checkpoint(out / "last.safetensors")[1].epoch == 2


def test_ctrl_c_after_the_config_is_written_but_before_the_loop_says_how_to_go_on(
    tmp_path, monkeypatch
):
    # the window the test above can hit under load: config.json is there, the epoch loop not yet
    written = part.write_run_config

    def interrupted(*args):
        written(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(part, "write_run_config", interrupted)
    r = invoke("train", *TINY, "--out", tmp_path / "run")
    assert r.exit_code == 130 and "no epoch had finished" in r.stderr and "--resume" in r.stderr, (
        r.stderr
    )
    monkeypatch.undo()
    r = invoke("train", "--out", tmp_path / "run", "--resume")
    assert r.exit_code == 0, r.stderr
    assert part.load_checkpoint(tmp_path / "run" / "last.safetensors")[1].epoch == 2


def _same_weights(a, b) -> bool:
    first, second = load_file(str(a)), load_file(str(b))
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.slow
@pytest.mark.parametrize(
    "stop, code", [(KeyboardInterrupt, 130), (FloatingPointError, 3)], ids=["ctrl-c", "nan"]
)
def test_a_fine_tune_stopped_in_its_first_epoch_resumes_from_its_init_weights(
    tmp_path, monkeypatch, fake_run, stop, code
):
    args = [*TINY, "--init", fake_run / "best.safetensors"]  # not the weights seed 0 starts from
    assert invoke("train", *args, "--out", tmp_path / "whole").exit_code == 0

    def stopped(*a):
        raise stop

    monkeypatch.setattr(part, "train_epoch", stopped)
    r = invoke("train", *args, "--out", tmp_path / "cut")
    assert r.exit_code == code and "--resume" in r.stderr + r.stdout or code == 3, r.stderr
    monkeypatch.undo()
    r = invoke("train", *args, "--out", tmp_path / "cut", "--resume")
    assert r.exit_code == 0, r.stderr
    assert _same_weights(
        tmp_path / "whole" / "last.safetensors", tmp_path / "cut" / "last.safetensors"
    )


def test_a_resume_takes_the_settings_it_may_change_from_a_config_file_as_from_options(tmp_path):
    run = tmp_path / "run"
    assert invoke("train", *TINY, "--out", run).exit_code == 0
    (tmp_path / "more.toml").write_text("epochs = 3\neval_every = 3\n")
    r = invoke("train", "--out", run, "--resume", "--config", tmp_path / "more.toml")
    assert r.exit_code == 0 and "nothing to do" not in r.stdout, r.stderr
    assert part.load_checkpoint(run / "last.safetensors")[1].epoch == 3
    assert json.loads((run / "config.json").read_text())["config"]["eval_every"] == 3
    (tmp_path / "other.toml").write_text("lr = 0.5\n")  # one it may not: refused, naming the file
    r = invoke("train", "--out", run, "--resume", "--config", tmp_path / "other.toml")
    assert r.exit_code == 1 and f"--lr 0.5 (from {tmp_path / 'other.toml'})" in r.stderr, r.stderr


def test_a_damaged_cache_entry_is_rebuilt_not_kept(tmp_path):
    images = _write_folder(tmp_path / "data", "train", ["a", "b", "c"], 2)
    args = ("imagefolder", "train", tmp_path / "data", tmp_path / "cache", 12)
    first = part.load_split(*args)
    (entry,) = (tmp_path / "cache").iterdir()
    save_file(
        {
            "x": torch.zeros(5, 3, 12, 12, dtype=torch.uint8),
            "y": torch.zeros(24, dtype=torch.int64),
        },
        str(entry),
        metadata={"classes": json.dumps(["a", "b", "c"])},
    )
    again = part.load_split(*args)
    assert torch.equal(again.x, first.x) and torch.equal(again.x[1], images[("b", 0)])
    assert load_file(str(entry))["y"].shape == (6,)


def test_a_cache_that_cannot_be_written_only_costs_time(tmp_path, monkeypatch, capsys):
    _write_folder(tmp_path / "data", "train", ["a", "b"], 2)

    def refuse(path, tensors, metadata):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(part, "save_tensors", refuse)
    split = part.load_split("imagefolder", "train", tmp_path / "data", tmp_path / "cache", 12)
    assert len(split.y) == 4 and "cannot write the cache" in capsys.readouterr().err


# ---------------------------------------------------------------- no tracebacks, messages that help


def test_resume_states_among_checkpoints_are_skipped_and_alone_refused(fake_run, tmp_path):
    r = invoke(
        "attack",
        fake_run / "last.state.safetensors",
        fake_run / "last.safetensors",
        "--attacks",
        "fgsm",
        "--n-examples",
        8,
        "--json",
        tmp_path / "r.json",
    )
    assert r.exit_code == 0 and "skipping" in r.stderr
    assert [
        row["path"] for row in json.loads((tmp_path / "r.json").read_text())["checkpoints"]
    ] == [str(fake_run / "last.safetensors")]
    r = invoke("attack", fake_run / "last.state.safetensors")
    assert r.exit_code == 1 and "no model checkpoint" in r.stderr
    with pytest.raises(part.CliError, match="resume state"):
        part.load_checkpoint(fake_run / "last.state.safetensors")


def test_unknown_devices_give_one_line(fake_run):
    for device in ("foo", "gpu"):
        r = invoke("attack", fake_run / "last.safetensors", "--device", device)
        assert (
            r.exit_code == 1
            and f"unknown device '{device}'" in r.stderr
            and len(r.stderr.strip().splitlines()) == 1
        )


def _png_claiming(width, height):
    """A tiny, valid PNG whose header claims width x height pixels."""
    import struct
    import zlib

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def test_decompression_bombs_and_broken_headers_give_one_line(tmp_path):
    from PIL import Image

    for name, payload in (("bomb.png", _png_claiming(15000, 15000)), ("broken.bmp", None)):
        _write_folder(tmp_path / name, "train", ["a", "b"], 2)
        bad = tmp_path / name / "train" / "a" / name
        if payload is None:
            Image.new("RGB", (12, 12)).save(bad)
            data = bytearray(bad.read_bytes())
            data[28] = 7  # bits per pixel: no such BMP
            payload = bytes(data)
        bad.write_bytes(payload)
        r = invoke(
            "train",
            "--preset",
            "smoke",
            "--dataset",
            "imagefolder",
            "--data-dir",
            tmp_path / name,
            "--image-size",
            12,
            "--cache-dir",
            tmp_path / "cache",
            "--out",
            tmp_path / f"out-{name}",
        )
        assert (
            r.exit_code == 1
            and f"cannot decode image {bad}" in r.stderr
            and len(r.stderr.strip().splitlines()) == 1
        ), r.stderr


@pytest.mark.parametrize(
    "metadata, message",
    [
        ({"format": "part/1", "arch": "{not json"}, "not JSON"),
        ({"format": "part/1", "num_classes": "10"}, "lacks 'arch'"),
        ({"format": "part/1", "arch": '"cnn"', "num_classes": '"10"'}, "invalid num_classes"),
        (
            {"format": "part/1", "arch": '"cnn"', "num_classes": "10", "config": '{"eps": "lots"}'},
            "1/255 levels",
        ),
    ],
)
def test_our_checkpoints_with_damaged_metadata_give_one_line(tmp_path, metadata, message):
    save_file(
        {k: v.contiguous() for k, v in seeded().state_dict().items()},
        str(tmp_path / "m.safetensors"),
        metadata=metadata,
    )
    r = invoke("attack", tmp_path / "m.safetensors", "--dataset", "synthetic")
    assert r.exit_code == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (
        r.stderr
    )


def test_output_paths_are_checked_before_the_work(fake_run, tmp_path):
    r = invoke("attack", fake_run / "last.safetensors", "--json", tmp_path, "--attacks", "pgd20")
    assert (
        r.exit_code == 1 and "is a folder, not a file name" in r.stderr and "pgd20" not in r.stdout
    )


def test_class_folders_skip_hidden_files_and_warn_when_empty(tmp_path, capsys):
    images = _write_folder(tmp_path / "data", "train", ["a", "b"], 2)
    (tmp_path / "data" / "train" / "a" / "._0000.png").write_bytes(
        b"\x00\x05\x16\x07 resource fork"
    )
    (tmp_path / "data" / "train" / "empty").mkdir()
    split = part.load_split("imagefolder", "train", tmp_path / "data", tmp_path / "cache", 12)
    assert (
        split.classes == ["a", "b", "empty"]
        and len(split.y) == 4
        and torch.equal(split.x[0], images[("a", 0)])
    )
    assert "hold no images (empty)" in capsys.readouterr().err


def test_a_failed_download_leaves_nothing_behind(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    class Offline:
        def __init__(self, root, train=True, download=False):
            if not download:
                raise RuntimeError("Dataset not found")
            Path(root).mkdir(parents=True, exist_ok=True)
            (Path(root) / "cifar-10-python.tar.gz").write_bytes(b"half a file")
            raise ConnectionError("no network")

    monkeypatch.setattr(tvd, "CIFAR10", Offline)
    with pytest.raises(part.DataMissing, match="could not be downloaded"):
        part.load_split("cifar10", "train", tmp_path / "new")
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "mine.txt").write_text("keep")
    with pytest.raises(part.DataMissing):
        part.load_split("cifar10", "train", tmp_path / "old")
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["mine.txt"]


# ---------------------------------------------------------------- the compiled path (inductor on this CPU; CUDA below)


def Tiny():
    """The smallest model with a CAM layer and BatchNorm: compiles in seconds."""
    torch.manual_seed(0)
    return TwoConvs(
        nn.Conv2d(3, 8, 3, 2, 1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, 2, 1),
        nn.ReLU(),
        width=16,
    )


@pytest.mark.parametrize("loss", ["ce", "cw", "kl"])
@pytest.mark.slow
def test_the_compiled_attack_equals_the_eager_one_and_holds_the_budget_exactly(batch, loss):
    # float64, so that no gradient is so close to 0 that float rounding flips its sign
    model, x, y = Tiny().double().eval(), batch[0].double(), batch[1]
    start = 0.001 if loss == "kl" else True
    for budget in (
        EPS,
        part.eps_map(
            part.class_activation(model, x), EPS, EPS_LOW, "zscore", size=(32, 32)
        ).double(),
    ):
        runs = []
        for stepper in (None, part.compiled_ascent_step()):
            torch.manual_seed(3)
            with part.stepping(stepper):
                runs.append(part.pgd(model, x, y, budget, 2 / 255, 5, loss, start))
        eager, compiled = runs
        assert (
            ((compiled - x).abs() <= torch.as_tensor(budget)).all()
            and compiled.min() >= 0
            and compiled.max() <= 1
        )
        assert torch.allclose(compiled, eager, atol=1e-12)


@pytest.mark.slow
def test_the_compiled_attack_holds_a_float32_per_pixel_budget_exactly(batch):
    model, (x, y) = Tiny().eval(), batch
    budget = part.eps_map(part.class_activation(model, x), EPS, EPS_LOW, "zscore", size=(32, 32))
    with part.stepping(part.compiled_ascent_step()):
        x_adv = part.pgd(model, x, y, budget, 2 / 255, 5)
    assert ((x_adv - x).abs() <= budget).all() and (
        (x_adv.double() - x.double()).abs() <= budget.double()
    ).all()


@pytest.mark.slow
def test_the_attack_step_is_one_graph_and_is_not_recompiled_for_batches_of_a_known_size(batch):
    model, (x, y) = Tiny().eval(), batch
    box = part.budget_box(x, EPS)
    explained = torch._dynamo.explain(part._functional_ascent_step)(
        model, x, y, None, *box, 2 / 255, "ce"
    )
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    step = part.compiled_ascent_step()
    graphs = lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]  # noqa: E731
    for n in (16, 5):  # a full batch and an epoch's last, shorter one
        step(model, x[:n], y[:n], None, box[0][:n], box[1][:n], 2 / 255, "ce")
    before = graphs()
    for _ in range(2):  # the next epochs
        for n in (16, 5):
            step(model, x[:n], y[:n], None, box[0][:n], box[1][:n], 2 / 255, "ce")
    assert graphs() == before


@pytest.mark.slow
def test_a_compiled_training_step_makes_the_same_update_as_the_eager_one(batch):
    x, y = batch[0][:16], batch[1][:16]
    results = []
    for compile in (False, True):
        model = Tiny()
        cfg = part.TrainConfig(steps=2, eps_low=3, compile=compile)
        parts = part.wrap_for_training(model, cfg, part.Dist(), torch.device("cpu"))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        torch.manual_seed(5)
        part.train_step(
            parts, optimizer, x, y, cfg, part.AttackSetup.from_config(cfg), part_phase=True
        )
        results.append(model.state_dict())
    eager, compiled = results
    for key in eager:
        assert torch.allclose(eager[key], compiled[key], atol=1e-5), key
    assert not torch.equal(eager["linear.weight"], Tiny().state_dict()["linear.weight"])


@pytest.mark.slow
def test_the_compiled_cam_equals_the_eager_one(batch):
    model, x = Tiny().eval(), batch[0]
    assert torch.allclose(
        part.compiled_cam()(model, x, "gradcam"),
        part.class_activation(model, x, "gradcam"),
        atol=1e-5,
    )


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_compiled_bf16_attack_holds_the_budget_exactly(batch):
    model = part.channels_last(part.build_model("resnet18").cuda().eval())
    x, y = batch[0].cuda(), batch[1].cuda()
    budget = part.eps_map(part.class_activation(model, x), EPS, EPS_LOW, size=(32, 32))
    with part.autocast(x.device, True), part.stepping(part.compiled_ascent_step()):
        x_adv = part.pgd(model, x, y, budget, 2 / 255, 5)
    assert x_adv.dtype == torch.float32
    assert (
        ((x_adv.double() - x.double()).abs() <= budget.double()).all()
        and x_adv.min() >= 0
        and x_adv.max() <= 1
    )


@cuda
def test_cuda_evaluation_runs_in_true_fp32_with_tf32_off(smoke_model, test_points, tf32_on):
    model = Recorder(smoke_model.cuda()).train()
    part.evaluate_suite(
        model,
        test_points.first(16).to(torch.device("cuda")),
        ["natural", "pgd20"],
        part.AttackSetup(8 / 255, 2 / 255),
    )
    assert model.seen == {(False, torch.float32, False, False, False)}
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    smoke_model.cpu()


@cuda
def test_cuda_channels_last_changes_nothing_but_speed(batch):
    x = batch[0][:8].cuda()
    plain, fast = seeded("resnet18").cuda(), part.channels_last(seeded("resnet18").cuda())
    with part.full_fp32(), torch.no_grad():
        assert torch.allclose(plain(x), fast(x), atol=1e-4)
    with part.full_fp32():
        assert torch.allclose(part.grad_cam(plain, x), part.grad_cam(fast, x), atol=1e-4)


def _nccl_worker(rank, world, init_file, x, y, out):
    import torch.distributed as td

    torch.cuda.set_device(rank)
    td.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world)
    part.LOSSES["ce"] = dataclasses.replace(part.LOSSES["ce"], start=False)
    model = NoBatchStats().cuda()
    ddp = nn.parallel.DistributedDataParallel(part.MultiInput(model), device_ids=[rank])
    _one_step(
        model, ddp, x.tensor_split(world)[rank].cuda(), y.tensor_split(world)[rank].cuda(), "ce"
    )
    if rank == 0:
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, out)
    del ddp
    td.barrier()
    td.destroy_process_group()


@cuda
def test_cuda_ddp_with_nccl_makes_the_same_update_as_one_process(tmp_path, batch, monkeypatch):
    x, y = batch[0][:16], batch[1][:16]
    monkeypatch.setitem(part.LOSSES, "ce", dataclasses.replace(part.LOSSES["ce"], start=False))
    single = NoBatchStats().cuda()
    _one_step(single, part.MultiInput(single), x.cuda(), y.cuda(), "ce")
    world = min(2, torch.cuda.device_count())
    torch.multiprocessing.spawn(
        _nccl_worker,
        args=(world, str(tmp_path / "init"), x, y, str(tmp_path / "ddp.pt")),
        nprocs=world,
    )
    synced = torch.load(tmp_path / "ddp.pt", weights_only=True)
    for key, value in single.state_dict().items():
        assert torch.allclose(value.cpu(), synced[key], atol=1e-5), key


# ---------------------------------------------------------------- evaluation at research scale


def _accuracies(path):
    return [
        (row["path"], row["accuracy"]) for row in json.loads(Path(path).read_text())["checkpoints"]
    ]


@pytest.mark.slow
def test_attack_strength_is_a_parameter_and_restarts_only_find_more(smoke_model, test_points):
    specs = part.parse_attacks("pgd5,cw7,mma3,pgd4-part,pgd5x3,apgd-ce,square,pgd5", restarts=2)
    assert [s.key for s in specs] == [
        "natural",
        "pgd5x2",
        "cw7x2",
        "mma3x2",
        "pgd4-partx2",
        "pgd5x3",
        "apgd-ce",
        "square",
    ]
    assert [(s.family, s.steps, s.restarts) for s in specs[1:3]] == [("pgd", 5, 2), ("cw", 7, 2)]
    for bad in ("pgd0", "cw20-part", "pgdx", "apgd"):
        with pytest.raises(part.CliError, match="attack"):
            part.parse_attack(bad)
    setup = part.AttackSetup(8 / 255, 2 / 255, batch_size=64, seed=1)
    result = part.evaluate_suite(
        smoke_model, test_points.first(128), ["natural", "pgd3", "pgd3x4"], setup
    )
    assert result["accuracy"]["pgd3x4"] <= result["accuracy"]["pgd3"]


def test_a_single_step_beating_a_multi_step_attack_is_a_warning():
    specs = part.parse_attacks("natural,fgsm,pgd20,cw20")
    accuracy = {"natural": 0.8, "pgd20": 0.2, "cw20": 0.21, "worst": 0.19}
    found = part.robustness_warnings(specs, {"accuracy": {**accuracy, "fgsm": 0.195}})
    assert len(found) == 1 and "FGSM (19.50%) beats cw20 (21.00%)" in found[0]
    assert part.robustness_warnings(specs, {"accuracy": {**accuracy, "fgsm": 0.3}}) == []


@pytest.mark.parametrize("p, n", [(0.5, 200), (0.2, 1000), (0.0, 50), (1.0, 10_000), (0.97, 30)])
def test_each_accuracy_has_a_binomial_interval_for_its_number_of_points(p, n):
    low, high = part.binomial_interval(p, n)
    assert 0 <= low <= p <= high <= 1 and high - low > 0
    assert part.half_width(p, 4 * n) < part.half_width(p, n)  # more points, narrower
    if (p, n) == (0.5, 200):
        assert 0.065 < part.half_width(p, n) < 0.072  # +-1.96 sqrt(p (1 - p) / n)


def test_attacks_table_and_json_carry_each_figures_interval(fake_ckpt, tmp_path):
    out = tmp_path / "r.json"
    r = invoke("attack", fake_ckpt, "--attacks", "natural,fgsm", "--n", 16, "--json", out)
    assert r.exit_code == 0, r.stderr
    row = json.loads(out.read_text())["checkpoints"][0]
    for name, value in row["accuracy"].items():
        assert row["interval95"][name] == list(part.binomial_interval(value, 16)), name
    assert "±95%" in r.stdout


def test_a_black_box_attack_beating_the_white_box_ones_is_a_warning():
    specs = part.parse_attacks("pgd10,pgd20,square")
    accuracy = {"natural": 0.8, "pgd10": 0.5, "pgd20": 0.45, "worst": 0.3}
    masked = {"accuracy": {**accuracy, "square": 0.3}}
    assert any("gradient masking" in w for w in part.robustness_warnings(specs, masked))
    assert part.robustness_warnings(specs, {"accuracy": {**accuracy, "square": 0.46}}) == []


def test_the_json_report_carries_what_a_reader_needs(fake_run, tmp_path):
    ckpt = fake_run / "last.safetensors"
    args = ("--attacks", "fgsm,pgd5", "--n-examples", 32, "--seed", 2)
    r = invoke("attack", ckpt, *args, "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.stderr
    row = json.loads((tmp_path / "r.json").read_text())["checkpoints"][0]
    assert (
        row["sha256"] == part.file_hash(ckpt)
        and row["selection"]["first"] == 32
        and row["seed"] == 2
    )
    assert (
        row["device"]
        and row["versions"]["part"] == part.__version__
        and row["config"]["model"] == "cnn"
    )


def test_an_out_of_memory_batch_is_halved_once_said(fake_model, test_points, monkeypatch, capsys):
    real = part.ATTACKS["pgd"]

    def picky(model, x, y, s, spec, seed):
        if len(x) > 8:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real.run(model, x, y, s, spec, seed)

    monkeypatch.setitem(part.ATTACKS, "pgd", dataclasses.replace(real, run=picky))
    points = test_points.first(64)
    with (
        torch.no_grad(),
        part.eval_mode(fake_model),
    ):  # labels the untrained model gets right: every batch is attacked
        points = part.Split(points.x, fake_model(part.to_float(points.x)).argmax(1), points.classes)
    result = part.evaluate_suite(
        fake_model, points, ["natural", "pgd5"], part.AttackSetup(8 / 255, 2 / 255, batch_size=32)
    )
    err = capsys.readouterr().err
    assert err.count("out of memory") == 1 and "8 images at a time" in err
    assert (
        0 <= result["accuracy"]["pgd5"] <= result["accuracy"]["natural"] == 1
        and len(result["seconds"]) == 2
    )


def _onnx_export(ckpt, out, report=None):
    """`export CKPT --format onnx --out OUT [--report REPORT]`, as typed."""
    return invoke(
        "export", ckpt, "--format", "onnx", "--out", out, *(["--report", report] if report else [])
    )


def test_the_model_card_carries_the_attack_results(fake_run, tmp_path):
    ckpt = fake_run / "best.safetensors"
    assert (
        invoke(
            "attack", ckpt, "--attacks", "fgsm", "--n-examples", 16, "--json", tmp_path / "r.json"
        ).exit_code
        == 0
    )
    r = _onnx_export(ckpt, tmp_path / "exp", tmp_path / "r.json")
    assert r.exit_code == 0, r.stderr
    card = json.loads((tmp_path / "exp" / "best.json").read_text())
    assert (
        card["robustness"]["accuracy"] == _accuracies(tmp_path / "r.json")[0][1]
        and card["robustness"]["n_examples"] == 16
    )
    import onnx

    props = {p.key: p.value for p in onnx.load(str(tmp_path / "exp" / "best.onnx")).metadata_props}
    assert (
        json.loads(props["robustness"])["accuracy"]["fgsm"]
        == card["robustness"]["accuracy"]["fgsm"]
    )
    r = invoke(
        "export",
        fake_run / "last.safetensors",
        "--out",
        tmp_path / "exp2",
        "--report",
        tmp_path / "r.json",
    )
    assert r.exit_code == 1 and "no results for this checkpoint" in r.stderr


def test_a_report_is_checked_before_it_reaches_a_card_and_the_card_says_what_was_run(
    fake_run, tmp_path
):
    ckpt = fake_run / "best.safetensors"
    r = invoke("attack", ckpt, "--attacks", "fgsm", "--n", 16, "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.stderr
    report = json.loads((tmp_path / "r.json").read_text())

    def forged(name, **changes):
        row = {**report["checkpoints"][0], **changes}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**report, "checkpoints": [row]}))
        return path

    accuracy = report["checkpoints"][0]["accuracy"]
    forgeries = {
        "above one": ({"accuracy": {**accuracy, "fgsm": 5.0}}, "fractions in [0, 1]"),
        "nan": ({"accuracy": {**accuracy, "fgsm": math.nan}}, "fractions in [0, 1]"),
        "negative": ({"accuracy": {**accuracy, "worst": -1}}, "fractions in [0, 1]"),
        "never run": ({"accuracy": {**accuracy, "aa": 0.99}}, "aa was not run"),
        "points": ({"n_examples": 10000}, "10000 points"),
        "budget": ({"eps_levels": 16}, "16/255"),
        "row": ({"accuracy": "high"}, "not an `attack --json` report"),
    }
    for name, (changes, message) in forgeries.items():
        r = _onnx_export(ckpt, tmp_path / name, forged(name, **changes))
        assert r.exit_code == 1 and message in r.stderr and len(r.stderr.splitlines()) == 1, (
            name,
            r.stderr,
        )
        assert not (tmp_path / name).exists()
    r = _onnx_export(ckpt, tmp_path / "e", tmp_path / "r.json")
    assert r.exit_code == 0, r.stderr
    said = json.loads((tmp_path / "e" / "best.json").read_text())["robustness"]["evaluation"]
    assert said == {
        "attacks": ["natural", "fgsm"],
        "n_examples": 16,
        "eps_levels": 8.0,
        "standard": False,
    }


needs_hub = pytest.mark.skipif(
    importlib.util.find_spec("huggingface_hub") is None,
    reason="huggingface_hub not installed (pip install huggingface_hub)",
)


@pytest.mark.slow  # a real run, processes or a terminal: over 2 s
def test_import_part_loads_none_of_the_optional_packages():
    extras = (
        "timm",
        "robustbench",
        "wandb",
        "huggingface_hub",
        "tensorboard",
        "matplotlib",
        "pyautoattack",
        "onnx",
        "onnxruntime",
        "torchvision",
    )
    code = f"import sys, part; print([m for m in {extras!r} if m in sys.modules])"
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def robustbench_zoo():
    """The robustbench package's model zoo (its PyPI release imports `autoattack`, which the
    pyautoattack package provides under its own name)."""
    if importlib.util.find_spec("autoattack") is None:
        sys.modules.setdefault("autoattack", importlib.import_module("pyautoattack"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from robustbench.model_zoo import model_dicts
        from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    return model_dicts[BenchmarkDataset("cifar10")][ThreatModel("Linf")]


needs_robustbench = pytest.mark.skipif(
    importlib.util.find_spec("robustbench") is None
    or importlib.util.find_spec("pkg_resources") is None,
    reason="robustbench not installed (pip install robustbench setuptools<81)",
)


@needs_robustbench
def test_our_wide_resnet_loads_the_trades_layout_and_gives_its_logits():
    robustbench_zoo()  # first: it makes the package importable (see there)
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet

    torch.manual_seed(0)
    theirs, ours = WideResNet(depth=16, widen_factor=2, sub_block1=True), part.WideResNet(10, 16, 2)
    for m in theirs.modules():  # statistics that are not the initial ones, so that a mix-up shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
    part.load_state_into(ours, theirs.state_dict(), "wrn-34-10", Path("x"))  # sub_block1 unused
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), theirs.eval()(x), atol=1e-5)


REFERENCE_ATTACK = "--attacks pgd20,cw20 --n-examples 64 --batch-size 16 --seed 4".split()


@pytest.fixture(scope="module")
def attack_reference(smoke_run, tmp_path_factory):
    """The report of an uninterrupted evaluation of the smoke run's two checkpoints."""
    out = tmp_path_factory.mktemp("attack") / "ref.json"
    checkpoints = [smoke_run / "best.safetensors", smoke_run / "last.safetensors"]
    r = cli("attack", *checkpoints, *REFERENCE_ATTACK, "--json", out)
    assert r.returncode == 0, r.stderr
    return out


def torchrun_attack(*args):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(ROOT / "part.py"),
            "attack",
            *map(str, args),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )


@pytest.mark.slow
def test_torchrun_shares_the_points_out_and_gives_the_single_process_result(
    smoke_run, attack_reference, tmp_path
):
    r = torchrun_attack(
        smoke_run / "best.safetensors",
        smoke_run / "last.safetensors",
        "--attacks",
        "pgd20,cw20",
        "--n-examples",
        64,
        "--batch-size",
        16,
        "--seed",
        4,
        "--json",
        tmp_path / "r.json",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert _accuracies(tmp_path / "r.json") == _accuracies(attack_reference)
    assert r.stdout.count("accuracy (%)") == 1  # only rank 0 speaks


# ---------------------------------------------------------------- the research workflow


@pytest.mark.slow
def test_every_run_explains_itself(smoke_run):
    stored = json.loads((smoke_run / "config.json").read_text())
    assert (
        stored["config"]["model"] == "cnn"
        and stored["preset"] == "smoke"
        and stored["versions"]["part"] == part.__version__
    )
    import csv

    rows = list(csv.DictReader((smoke_run / "summary.csv").read_text().splitlines()))
    metrics = [json.loads(line) for line in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    assert [int(r["epoch"]) for r in rows] == [m["epoch"] for m in metrics] == list(range(1, 8))
    assert (
        float(rows[-1]["pgd20"]) == metrics[-1]["pgd20"]
        and rows[0]["phase"] == "warm-up"
        and rows[-1]["phase"] == "PART"
    )
    from PIL import Image

    with Image.open(smoke_run / "curves.png") as im:
        assert im.size[0] > 600 and im.size[1] > 200


needs_timm = pytest.mark.skipif(
    importlib.util.find_spec("timm") is None, reason="timm not installed (pip install timm)"
)


@pytest.mark.parametrize("name", ["torchvision:resnet18", "torchvision:mobilenet_v3_small"])
def test_zoo_models_train_with_part_and_their_batched_cam_equals_a_loop(batch, name):
    zoo_model_trains_and_its_cam_equals_a_loop(batch, name)


def zoo_model_trains_and_its_cam_equals_a_loop(batch, name):
    model = part.build_model(name, 10).double().eval()
    x = batch[0][:4].double()
    together = part.grad_cam(model, x)
    alone = torch.cat([part.grad_cam(model, x[i : i + 1]) for i in range(4)])
    assert (
        together.shape == (4, 1, 32, 32)
        and torch.allclose(together, alone, atol=1e-8)
        and together.max() > 0
    )
    seen = []  # the default CAM layer keeps a map of at least 4 x 4 at 32 px
    handle = model.get_submodule(model.cam_layer).register_forward_hook(
        lambda m, i, o: seen.append(o.shape)
    )
    model(x)
    handle.remove()
    assert min(seen[0][2:]) >= 4
    model = part.build_model(name, 10).float()
    cfg = part.TrainConfig(model=name, steps=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss, _ = part.train_step(
        part.TrainingModules(model, part.MultiInput(model)),
        optimizer,
        batch[0][:8],
        batch[1][:8],
        cfg,
        part.AttackSetup.from_config(cfg),
        part_phase=True,
    )
    assert torch.isfinite(loss)


def test_the_cam_layer_can_be_chosen_and_a_plain_torchvision_state_dict_loads(batch, tmp_path):
    x = batch[0][:2]
    # the third block: 16 x 16 at 32 px
    deeper = part.build_model("cnn", 10, cam_layer="body.5").eval()
    assert part.class_activation(deeper, x).shape == (2, 1, 16, 16)
    with pytest.raises(part.CliError, match="no such module"):
        part.build_model("cnn", 10, cam_layer="body.99")
    import torchvision

    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=10).eval()
    torch.save(plain.state_dict(), tmp_path / "tv.pth")
    ours, meta = part.load_checkpoint(tmp_path / "tv.pth", arch="torchvision:resnet18")
    mean, std = (
        torch.tensor(part.IMAGENET_MEAN).view(1, 3, 1, 1),
        torch.tensor(part.IMAGENET_STD).view(1, 3, 1, 1),
    )
    with torch.no_grad():
        assert meta.num_classes == 10 and torch.allclose(
            ours(x), plain((x - mean) / std), atol=1e-5
        )


# ---------------------------------------------------------------- as people use it: a terminal, a notebook, a second run

QUICK = "--preset smoke --train-subset 256 --eval-subset 64 --epochs 2 --warmup-epochs 1".split()


@pytest.mark.slow
def test_every_commands_help_reads_at_80_columns_in_a_terminal():
    names = ["", *typer.main.get_command(part.app).commands]  # with part_tools' when it is here
    for name in names:
        code, screen = in_terminal(*([name] if name else []), "--help", columns=80)
        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)
        assert code == 0, text
        assert max(map(len, text.splitlines())) <= 80, text
        for cut in ("…", "<bool>", "<str", "<int", "<float", "<path>..."):
            assert cut not in text, (name, cut, text)  # nothing cut short, no type noise
        if name:  # every option is there, with its description's first word
            command = typer.main.get_command(part.app).commands[name]
            for p in command.params:
                if p.param_type_name == "option":
                    assert p.opts[0] in text and (p.help or " ").split()[0] in text, (name, p.opts)


@pytest.mark.slow
def test_train_in_a_terminal_draws_its_bars_and_finishes(tmp_path):
    code, screen = in_terminal(
        "train", *QUICK, "--epochs", 1, "--warmup-epochs", 0, "--out", tmp_path / "run"
    )
    assert code == 0, screen[-2000:]
    assert drew_a_bar(screen) and "epoch 1" in screen and "done:" in screen
    assert "eval 1" in screen and "elapsed" in screen and "left" in screen  # labelled columns
    assert (tmp_path / "run" / "last.safetensors").is_file() and (
        tmp_path / "run" / "summary.csv"
    ).is_file()
    code, screen = in_terminal(
        "train", *QUICK, "--epochs", 2, "--warmup-epochs", 0, "--out", tmp_path / "run", "--resume"
    )
    assert code == 0 and "resuming at epoch 2 of 2" in screen, screen[-2000:]


@pytest.mark.slow
def test_attack_and_export_in_a_terminal(fake_ckpt, tmp_path):
    attacks = "natural,pgd5,aa" if importlib.util.find_spec("pyautoattack") else "natural,pgd5,cw5"
    code, screen = in_terminal(
        "attack", fake_ckpt, "--attacks", attacks, "--n-examples", 48, "--json", tmp_path / "r.json"
    )
    assert code == 0 and drew_a_bar(screen), screen[-2000:]
    assert json.loads((tmp_path / "r.json").read_text())["checkpoints"][0]["n_examples"] == 48
    code, screen = in_terminal(
        "export", fake_ckpt, "--format", "onnx", "--out", tmp_path / "export"
    )
    assert code == 0 and (tmp_path / "export" / "last.onnx").is_file() and "ok" in screen, screen[
        -2000:
    ]


def readme_block(after: str) -> str:
    """The first ``` block of the README after the line that contains `after`."""
    text = (ROOT / "README.md").read_text()
    rest = text[text.index(after) :]
    start = rest.index("```", 0) + len(rest[rest.index("```") :].split("\n", 1)[0]) + 1
    return rest[start : rest.index("```", start)]


def readme_commands(block: str) -> list[str]:
    """The command lines of a bash block (continuations joined)."""
    return [
        c.strip()
        for c in block.replace("\\\n", " ").splitlines()
        if c.strip() and not c.startswith("#")
    ]


@pytest.mark.slow
def test_the_readme_tour_runs_as_written_in_a_terminal_and_again(tmp_path):
    commands = readme_commands(readme_block("A tour of the other commands"))
    assert commands[0].startswith("python part.py train") and len(commands) >= 5
    shutil.copy(ROOT / "part.py", tmp_path)
    shutil.copy(ROOT / "part_tools.py", tmp_path)
    shutil.copy(ROOT / "configs.toml", tmp_path)
    for round_ in (1, 2):
        for command in commands:
            argv = [sys.executable if w == "python" else w for w in shlex.split(command)]
            code, screen = in_terminal(command=argv, cwd=tmp_path)
            assert code == 0, f"round {round_}: {command}\n{screen[-3000:]}"
            if round_ == 1 and (" train " in command or " attack " in command):
                assert drew_a_bar(screen), command
    tour = tmp_path / "runs" / "tour"
    assert (
        (tour / "best.safetensors").is_file()
        and (tour / "report.json").is_file()
        and (tour / "cams.png").is_file()
    )
    assert (tour / "export" / "best.onnx").is_file() and json.loads(
        (tour / "export" / "best.json").read_text()
    )["robustness"]


@pytest.mark.slow
def test_the_readme_api_round_trip_runs_as_written_and_again(tmp_path):
    code = readme_block("## Python API")
    assert (
        "part.fit(" in code and "part.evaluate_suite(" in code and "part.export_checkpoint(" in code
    )
    script = tmp_path / "snippet.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(2):  # the second time it continues the finished run: nothing to do
        r = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=900,
        )
        assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "runs" / "api" / "export" / "best.onnx").is_file()
    assert "'natural'" in r.stdout and "worst" in r.stdout


def test_api_calls_take_float_images_and_pairs_and_refuse_what_they_would_misread():
    torch.manual_seed(0)
    model = part.build_model("cnn").eval()
    test = part.load_split("synthetic", "test", "unused").first(32)
    setup = part.AttackSetup(8 / 255, 2 / 255, seed=1)
    as_uint8 = part.evaluate_suite(model, test, ["natural", "pgd3"], setup)["accuracy"]
    x, y = part.to_float(test.x), test.y
    assert part.evaluate_suite(model, (x, y), "natural,pgd3", setup)["accuracy"] == as_uint8
    assert (
        part.evaluate_suite(model, part.Split(x, y, test.classes), ["natural", "pgd3"], setup)[
            "accuracy"
        ]
        == as_uint8
    )
    assert (
        part.evaluate_suite(model, (x.numpy(), y.numpy()), ["natural", "pgd3"], setup)["accuracy"]
        == as_uint8
    )
    assert torch.equal(part.to_float(x), x)  # floats in [0, 1] are never divided again
    bad = [
        ((x * 255, y), "in [0, 1]"),
        ((test.x.long(), y), "in [0, 1]"),
        ((x.permute(0, 2, 3, 1), y), "channels-last"),
        ((x, y.float()), "integer class indices"),
        ((x, y[:5]), "5 labels for 32 images"),
        ((x[0], y), "[N, C, H, W]"),
        ((x, y + 10), "the model has 10 outputs"),
        ((x.clone().fill_(math.nan), y), "in [0, 1]"),
        (x, "(images, labels) pair"),
    ]
    for data, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            part.evaluate_suite(model, data, ["natural"], setup)
    with pytest.raises(ValueError, match="outside the 10 classes"):
        part.Split(x, y + 10, test.classes)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        part.to_float(x * 255)
    with pytest.raises(ValueError, match="8/255, not 8"):
        part.pgd(model, x, y, 8, 2 / 255, 3)
    with pytest.raises(ValueError, match="floating point"):
        part.pgd(model, test.x, y, 8 / 255, 2 / 255, 3)
    with pytest.raises(ValueError, match="does not fit"):
        part.pgd(model, x, y, torch.full((3, 3, 32, 32), 8 / 255), 2 / 255, 3)
    for attack in (part.pgd, part.mma):  # no steps would return the random start as an attack
        with pytest.raises(ValueError, match="steps must be an integer from 1"):
            attack(model, x, y, 8 / 255, 2 / 255, 0)
    with pytest.raises(ValueError, match="8/255, not 8"):
        part.eps_map(part.class_activation(model, x), 8, 7)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        part.grad_cam(model, x * 255)
    assert set(part.__all__) <= set(dir(part)) and {
        "fit",
        "evaluate_suite",
        "export_checkpoint",
        "Split",
    } <= set(part.__all__)


@pytest.mark.slow
def test_fit_makes_its_folder_and_resume_starts_then_continues(tmp_path):
    out = tmp_path / "deep" / "run"
    run = part.fit(
        preset="smoke",
        out=out,
        resume=True,
        train_subset=128,
        eval_subset=32,
        epochs=1,
        warmup_epochs=0,
    )
    assert run.last.is_file() and run.metrics["epoch"] == 1 and run.config.epochs == 1
    stored = json.loads((out / "config.json").read_text())
    assert stored["machine"]["threads"] == torch.get_num_threads() and stored["machine"]["cpu"]
    assert part.load_checkpoint(run.last)[1].machine["threads"] == torch.get_num_threads()
    again = part.fit(
        preset="smoke",
        out=out,
        resume=True,
        train_subset=128,
        eval_subset=32,
        epochs=2,
        warmup_epochs=0,
    )
    assert again.metrics["epoch"] == 2
    with pytest.raises(ValueError, match="unknown setting 'epoch'"):
        part.fit(preset="smoke", out=tmp_path / "x", epoch=3)
    with pytest.raises(ValueError, match="differs from the run's own"):
        part.fit(preset="smoke", out=out, resume=True, lr=0.5)


@pytest.mark.slow
def test_the_same_command_again_with_resume_continues_and_only_a_different_value_is_refused(
    tmp_path,
):
    out = tmp_path / "run"
    assert cli("train", *QUICK, "--out", out).returncode == 0
    # the job script's own line, plus --resume
    r = cli("train", *QUICK, "--epochs", 3, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr
    assert [
        json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()
    ] == [1, 2, 3]
    r = cli("train", *QUICK, "--lr", 0.2, "--out", out, "--resume")
    assert r.returncode == 1 and "--lr 0.2 differs from the run's own 0.05" in r.stderr
    r = cli("train", "--preset", "cifar10-cpu", "--out", out, "--resume")
    assert (
        r.returncode == 1
        and "--preset cifar10-cpu: this run was started from preset 'smoke'" in r.stderr
    )
    r = cli("train", *QUICK, "--epochs", 3, "--out", out, "--resume")
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stderr


@pytest.mark.slow
def test_a_resume_at_another_thread_count_says_it_is_not_bit_exact(tmp_path):
    out = tmp_path / "run"
    assert cli("train", *QUICK, "--epochs", 1, "--threads", 1, "--out", out).returncode == 0
    assert json.loads((out / "config.json").read_text())["machine"]["threads"] == 1
    r = cli("train", *QUICK, "--out", out, "--resume", "--threads", 2)
    assert (
        r.returncode == 0
        and "the run used 1 thread, this resume 2" in r.stderr
        and "threads=2" in r.stdout
    )


def test_every_help_text_is_shown_as_written():
    """typer's rich mode reads [x] in help as markup and drops it (it ate `<preset>` and
    `[default: ...]` once): every help text must render to itself."""
    from rich.text import Text

    for command in part.app.registered_commands:
        click_command = typer.main.get_command(part.app).commands[command.name]
        texts = [click_command.help or ""] + [
            p.help or "" for p in click_command.params if getattr(p, "help", None)
        ]
        for text in texts:
            assert Text.from_markup(text).plain.replace("\\[", "[") == text.replace(
                "\\[", "["
            ).replace("\\\\", "\\"), text
    text = (
        CliRunner()
        .invoke(part.app, ["train", "--preset", "smoke", "--help"], env={"COLUMNS": "250"})
        .output
    )
    assert "runs/PRESET-METHOD-TIME" in text
    assert "[default: 0.01]" in text and "[default: 8]" in text  # the built-in values
    # the presets are listed
    assert all(name in text for name in ("cifar10-cpu", "cifar10-study", "tinyimagenet"))


def test_shell_completion_offers_presets_and_attack_names():
    def complete(words: str) -> list[str]:
        env = {
            "_PART.PY_COMPLETE": "complete_bash",
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(words.split())),
        }
        return CliRunner().invoke(part.app, [], env=env, prog_name="part.py").output.split()

    assert {"smoke", "cifar10", "cifar10-study"} <= set(complete("part.py train --preset "))
    assert part.complete_attacks("natural,pg") == [
        "natural,pgd20",
        "natural,pgd50",
        "natural,pgd100",
        "natural,pgd20-part",
    ]
    assert "apgd-ce" in part.complete_attacks("apgd")


def module_level_names(path: Path) -> list[str]:
    """Every name a file binds at module level (defs, classes, imports, assignments), repeats included."""
    bound = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.append(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound += [(a.asname or a.name).split(".")[0] for a in node.names]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            bound += [t.id for t in targets if isinstance(t, ast.Name)]
    return bound


def test_no_module_level_name_is_bound_twice_and_commands_are_named_apart():
    files = ("part.py", "part_tools.py", "test_part.py", "test_part_tools.py")
    for path in (
        ROOT / name for name in files
    ):  # a second helper of one name once replaced the first
        bound = module_level_names(path)
        twice = {n for n in bound if bound.count(n) > 1}
        assert not twice, f"{path.name}: module-level names bound twice: {twice}"
    import part_tools  # noqa: F401  (its commands too)

    tree = ast.parse((ROOT / "part.py").read_text() + "\n" + (ROOT / "part_tools.py").read_text())
    commands = {c.callback.__name__ for c in part.app.registered_commands}
    used = {
        n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
    }
    used |= {
        a.arg
        for n in ast.walk(tree)
        if isinstance(n, (ast.FunctionDef, ast.Lambda))
        for a in n.args.args + n.args.kwonlyargs
    }
    options = {
        p.name
        for c in part.app.registered_commands
        for p in typer.main.get_command(part.app).commands[c.name].params
    }
    assert not commands & (used | options | set(sys.modules)), commands & (
        used | options | set(sys.modules)
    )
    assert {c.name for c in part.app.registered_commands} == {
        "train",
        "attack",
        "export",
        "cam",
        "bench",
        "report",
        "leaderboard",
    }


def test_the_linter_finds_nothing_and_the_files_are_formatted():
    if not shutil.which("ruff") and not importlib.util.find_spec("ruff"):
        pytest.skip("ruff is not installed (pip install -r requirements.txt)")
    files = ["part.py", "part_tools.py", "test_part.py", "test_part_tools.py"]
    for check in (["check"], ["format", "--check"]):
        ruff = [sys.executable, "-m", "ruff", *check, *files]
        r = subprocess.run(ruff, capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------- the new surface never invents a number or loses work


@pytest.mark.slow
@pytest.mark.skipif(not importlib.util.find_spec("pyautoattack"), reason="needs pyautoattack")
@pytest.mark.parametrize("component", part.AA_STANDARD)
def test_every_autoattack_component_runs_alone(fake_ckpt, component):
    r = invoke("attack", fake_ckpt, "--attacks", component, "--n-examples", 16)
    assert r.exit_code == 0 and component in r.stdout, r.stderr


def _attack_json(path, rows):
    path.write_text(json.dumps({"checkpoints": rows}))
    return path


def _row(seed, accuracy, **config):
    return {
        "path": f"runs/s{seed}/last.safetensors",
        "n_examples": 100,
        "dataset": "cifar10",
        "eps_levels": 8,
        "seed": 0,
        "accuracy": accuracy,
        "config": dataclasses.asdict(part.TrainConfig(seed=seed, **config)),
    }


@pytest.mark.slow
def test_runs_that_would_strand_or_lose_work_are_refused_before_they_do(tmp_path):
    r = invoke("train", *QUICK, "--cam-layer", "linear", "--out", tmp_path / "a")
    assert r.exit_code == 1 and "not a [N, C, H, W] feature map" in r.stderr
    assert not (tmp_path / "a" / "last.safetensors").exists()
    r = invoke(
        "train",
        *QUICK,
        "--model",
        "torchvision:resnet18",
        "--cam-layer",
        "avgpool",
        "--out",
        tmp_path / "b",
    )
    assert r.exit_code == 1 and "1x1 map" in r.stderr
    out = tmp_path / "run"
    assert invoke("train", *QUICK, "--epochs", 1, "--warmup-epochs", 0, "--out", out).exit_code == 0
    r = invoke("train", "--out", out, "--resume", "--epochs", 2)
    assert r.exit_code == 0, r.stderr
    config = (out / "config.json").read_text()
    r = invoke("train", "--out", out, "--resume", "--epochs", 1)
    assert (
        r.exit_code == 1
        and "already finished 2 epochs" in r.stderr
        and (out / "config.json").read_text() == config
    )
    (out / "last.state.safetensors").unlink()
    before = (out / "last.safetensors").read_bytes()
    r = invoke("train", "--out", out, "--resume", "--epochs", 3)
    way_on = f"--init {out / 'last.safetensors'}"  # a new run from its weights
    assert r.exit_code == 1 and "is missing" in r.stderr and "holds epoch 2" in r.stderr
    assert way_on in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert (out / "last.safetensors").read_bytes() == before
    r = invoke(
        "train", *QUICK, "--epochs", 1, "--init", out / "last.safetensors", "--out", tmp_path / "on"
    )
    assert r.exit_code == 0, r.stderr  # the way on works
    state = out / "last.state.safetensors"
    state.write_bytes((tmp_path / "on" / "last.state.safetensors").read_bytes()[:1000])  # truncated
    r = invoke("train", "--out", out, "--resume", "--epochs", 4)
    assert r.exit_code == 1 and way_on in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_files_are_never_written_through_links_and_inputs_must_be_regular_files(
    fake_ckpt, tmp_path
):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").symlink_to(target)
    r = invoke("train", *QUICK, "--out", tmp_path / "run")
    assert r.exit_code == 1 and "symbolic link" in r.stderr and target.read_text() == "keep me"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    r = invoke("attack", fifo)
    assert r.exit_code == 1 and "not a regular file" in r.stderr
    r = invoke("export", fake_ckpt, "--format", "onnx", "--out", tmp_path / "e", "--report", fifo)
    assert r.exit_code == 1 and "not a regular file" in r.stderr
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    r = invoke("export", fake_ckpt, "--out", blocked / "sub")
    assert r.exit_code == 1 and "cannot create" in r.stderr


def test_a_full_disk_while_exporting_is_one_line_and_leaves_no_temporary(
    fake_ckpt, tmp_path, monkeypatch
):
    import errno

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", full)
    r = invoke("export", fake_ckpt, "--format", "torchscript", "--out", tmp_path / "e")
    assert (
        r.exit_code == 1 and "No space left on device" in r.stderr and "unexpected" not in r.stderr
    )
    assert not [p for p in (tmp_path / "e").iterdir()]


def test_user_text_in_brackets_is_printed_as_text(fake_ckpt, tmp_path):
    # the path holds "[/]" and "[bold]"
    odd = tmp_path / "runs[" / "]odd[bold]" / "model.safetensors"
    odd.parent.mkdir(parents=True)
    shutil.copy(fake_ckpt, odd)
    r = invoke("attack", odd, "--attacks", "fgsm", "--n-examples", 8, "--json", tmp_path / "r.json")
    assert r.exit_code == 0 and "runs[/]odd[bold]/model.safetensors" in r.stdout, r.stderr
    assert json.loads((tmp_path / "r.json").read_text())["checkpoints"][0]["path"] == str(odd)


def test_a_model_whose_outputs_are_not_finite_is_not_scored(fake_ckpt, tmp_path):
    tensors = load_file(str(fake_ckpt))
    key = next(k for k in tensors if k.endswith("weight"))
    tensors[key].view(-1)[0] = math.nan
    from safetensors import safe_open

    with safe_open(str(fake_ckpt), "pt") as f:
        save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=f.metadata())
    r = invoke("attack", tmp_path / "nan.safetensors", "--attacks", "pgd3", "--n-examples", 8)
    assert r.exit_code == 1 and "NaN or inf" in r.stderr
    model = part.build_model("cnn")
    with torch.no_grad():
        [m for m in model.modules() if isinstance(m, nn.Linear)][-1].bias.fill_(math.inf)
    with pytest.raises(part.CliError, match="NaN or inf"):
        part.evaluate_suite(
            model, part.load_split("synthetic", "test", "unused").first(8), "natural"
        )


def test_odd_inputs_give_one_clear_line(fake_ckpt, tmp_path):
    with pytest.raises(part.CliError, match="between 2 and"):
        part.build_model("cnn", 1)
    from PIL import Image

    big = tmp_path / "folder" / "train" / "a"
    big.mkdir(parents=True)
    # about 140 KB on disk, 144 M pixels decoded
    Image.new("L", (12000, 12000)).save(big / "big.png")
    with pytest.raises(part.CliError, match="more than part decodes"):
        part.load_split("imagefolder", "train", tmp_path / "folder", tmp_path / "cache")
    deep = "[" * 100_000 + "]" * 100_000
    from safetensors import safe_open

    with safe_open(str(fake_ckpt), "pt") as f:
        meta = {**f.metadata(), "metrics": deep}
    save_file(load_file(str(fake_ckpt)), str(tmp_path / "deep.safetensors"), metadata=meta)
    r = invoke("attack", tmp_path / "deep.safetensors", "--attacks", "fgsm", "--n-examples", 4)
    assert r.exit_code == 1 and "unexpected" not in r.stderr, r.stderr
    with safe_open(str(fake_ckpt), "pt") as f:
        meta = f.metadata()
    config = json.loads(meta["config"])
    config["eps"] = math.nan
    save_file(
        load_file(str(fake_ckpt)),
        str(tmp_path / "nanconfig.safetensors"),
        metadata={**meta, "config": json.dumps(config)},
    )
    r = invoke("attack", tmp_path / "nanconfig.safetensors", "--attacks", "fgsm", "--n-examples", 4)
    assert r.exit_code == 1 and "stored" in r.stderr and "--eps" not in r.stderr, r.stderr


# ---------------------------------------------------------------- options that would do nothing are refused


@pytest.mark.parametrize(
    "options, message",
    [
        (
            ["--schedule", "cosine", "--lr-milestones", "3,5"],
            "--lr-milestones goes with --schedule step",
        ),
        (["--optimizer", "adamw", "--momentum", "0.5"], "--momentum goes with --optimizer sgd"),
        (["--val-size", "32"], "--eval-subset goes with --val-size 0"),  # MICRO gives 16
    ],
)
def test_a_training_option_that_would_do_nothing_is_refused_naming_what_makes_it_count(
    tmp_path, options, message
):
    r = invoke("train", *MICRO, *options, "--out", tmp_path / "run")
    assert r.exit_code == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    # the same values from a preset the options replace are no option given: they run
    presets = tmp_path / "p.toml"
    presets.write_text('[mine]\nextends = "smoke"\nlr_milestones = [3, 5]\nmomentum = 0.5\n')
    cfg, _ = part.resolve_config({"schedule": "cosine", "optimizer": "adamw"}, "mine", presets)
    assert cfg.schedule == "cosine" and cfg.optimizer == "adamw"


def test_a_restart_count_below_one_is_refused_not_scored(fake_ckpt):
    r = invoke("attack", fake_ckpt, "--attacks", "natural,pgd5", "--restarts", 0, "--n-examples", 8)
    assert r.exit_code != 0 and "--restarts" in r.stderr and "pgd5" not in r.stdout


def test_an_export_never_replaces_another_models_and_keeps_its_own_results(fake_run, tmp_path):
    ckpt, other = fake_run / "best.safetensors", tmp_path / "other" / "best.safetensors"
    other.parent.mkdir()
    other.write_bytes((fake_run / "last.safetensors").read_bytes())  # another model, same name
    r = invoke("attack", ckpt, "--attacks", "fgsm", "--n", 8, "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.stderr
    out = ["--format", "onnx", "--no-verify", "--out", tmp_path / "e"]
    assert invoke("export", ckpt, *out, "--report", tmp_path / "r.json").exit_code == 0
    card = (tmp_path / "e" / "best.json").read_text()
    r = invoke("export", other, *out)
    assert r.exit_code == 1 and "holds the export of another model" in r.stderr
    assert "--replace" in r.stderr and len(r.stderr.splitlines()) == 1
    assert (tmp_path / "e" / "best.json").read_text() == card
    # the same model again keeps its results and its other files; --replace makes way for another
    assert invoke("export", ckpt, *out[2:], "--format", "torchscript").exit_code == 0
    kept = json.loads((tmp_path / "e" / "best.json").read_text())
    assert kept["robustness"] == json.loads(card)["robustness"] is not None
    assert kept["files"] == {"onnx": "best.onnx", "torchscript": "best.ts.pt"}
    assert invoke("export", other, *out, "--replace").exit_code == 0
    replaced = json.loads((tmp_path / "e" / "best.json").read_text())
    assert replaced["checkpoint_sha256"] == part.file_hash(other) and replaced["robustness"] is None


# ---------------------------------------------------------------- messages that point the right way


def test_a_fifo_given_as_a_file_is_said_to_be_no_regular_file(fake_ckpt, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for args in (
        ["train", *MICRO, "--config", fifo, "--out", tmp_path / "a"],
        ["train", *MICRO, "--presets", fifo, "--out", tmp_path / "b"],
        ["train", *MICRO, "--init", fifo, "--out", tmp_path / "c"],
        ["attack", fifo],
        ["export", fifo, "--out", tmp_path / "d"],
    ):
        r = invoke(*args)
        assert r.exit_code == 1 and "is not a regular file" in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1


def test_a_user_preset_may_extend_the_shipped_one_it_replaces_and_replacing_is_said(
    tmp_path, capsys
):
    presets = tmp_path / "p.toml"
    presets.write_text('[smoke]\nextends = "smoke"\nepochs = 3\n')
    cfg, _ = part.resolve_config({}, "smoke", presets)
    shipped, _ = part.resolve_config({}, "smoke", None)
    assert cfg.epochs == 3 and dataclasses.replace(cfg, epochs=shipped.epochs) == shipped
    assert "replaces the shipped" not in capsys.readouterr().err
    presets.write_text(
        '[smoke]\ndataset = "synthetic"\nmodel = "cnn"\nepochs = 3\nwarmup_epochs = 1\n'
    )
    cfg, _ = part.resolve_config({}, "smoke", presets)
    said = capsys.readouterr().err
    assert cfg.epochs == 3 and said.count("replaces the shipped preset smoke") == 1, said
    assert "smoke" in part.preset_names(presets) and not any(
        ":" in n for n in part.preset_names(presets)
    )


def test_init_weights_that_are_not_finite_or_not_floating_point_are_refused_at_load(
    fake_ckpt, tmp_path
):
    from safetensors import safe_open

    with safe_open(str(fake_ckpt), "pt") as f:
        metadata = f.metadata()
    weights = load_file(str(fake_ckpt))
    key = next(k for k, v in weights.items() if v.is_floating_point() and v.dim() > 1)
    for name, value, message in (
        ("nan", weights[key].clone().fill_(math.nan), "NaN or inf"),
        ("int", weights[key].round().long(), "not floating point"),
    ):
        bad = tmp_path / f"{name}.safetensors"
        save_file({**weights, key: value}, str(bad), metadata=metadata)
        r = invoke("train", *MICRO, "--init", bad, "--out", tmp_path / name)
        assert r.exit_code == 1 and message in r.stderr and key in r.stderr, r.stderr
        assert "learning rate" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
        r = invoke("attack", bad, "--attacks", "natural", "--n", 8)
        assert r.exit_code == 1 and message in r.stderr, r.stderr


# ---------------------------------------------------------------- the notebook gets the command line's care


def test_float64_images_from_numpy_work_like_float32_everywhere_in_the_api():
    torch.manual_seed(0)
    model = part.build_model("cnn").eval()
    test = part.load_split("synthetic", "test", "unused").first(16)
    x, y = part.to_float(test.x), test.y
    setup = part.AttackSetup(8 / 255, 2 / 255, seed=1)
    as_float32 = part.evaluate_suite(model, (x, y), "natural,pgd3", setup)["accuracy"]
    as_numpy = part.evaluate_suite(model, (x.double().numpy(), y.numpy()), "natural,pgd3", setup)
    assert as_numpy["accuracy"] == as_float32
    assert torch.equal(part.grad_cam(model, x.double()), part.grad_cam(model, x))
    torch.manual_seed(3)
    a = part.pgd(model, x.double(), y, 8 / 255, 2 / 255, 3)
    torch.manual_seed(3)
    b = part.pgd(model, x, y, 8 / 255, 2 / 255, 3)
    assert a.dtype == torch.float32 and torch.equal(a, b)


def test_images_the_model_cannot_take_and_a_missing_device_are_said_in_one_line(fake_ckpt):
    model = part.build_model("cnn").eval()
    x = part.to_float(part.load_split("synthetic", "test", "unused").first(4).x)
    y = torch.zeros(4, dtype=torch.long)
    for bad in (x[:, :1], torch.cat([x, x[:, :1]], 1)):
        channels = bad.shape[1]
        for call, args in (
            (part.evaluate_suite, (model, (bad, y), "natural")),
            (part.pgd, (model, bad, y, 8 / 255, 2 / 255, 2)),
            (part.grad_cam, (model, bad)),
        ):
            with pytest.raises(ValueError, match=f"{channels} channels; the model takes 3"):
                call(*args)
    fixed = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 10)).eval()
    small = torch.rand(4, 3, 16, 16)
    for call, args in (
        (part.pgd, (fixed, small, y, 8 / 255, 2 / 255, 2)),
        (part.grad_cam, (fixed, small)),
    ):
        with pytest.raises(ValueError, match=re.escape("cannot take images of shape (3, 16, 16)")):
            call(*args)
    if not torch.cuda.is_available():
        with pytest.raises(part.CliError, match="no CUDA device"):
            part.load_checkpoint(fake_ckpt, device="cuda")
