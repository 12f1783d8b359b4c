"""The demos: exact checks of their building blocks, and a --quick run of each script end to end.

The quick runs check the shape and sanity of the output, not the scientific result (that needs
the full runs recorded in docs/demos.md).
"""

import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from bsmon.stats.optimal import optimal_batch_size
from conftest import ROOT

sys.path.insert(0, str(ROOT / "demos"))
import adaptive_batch  # noqa: E402
import critical_batch  # noqa: E402


def run_demo(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "demos" / script), "--quick", *args], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_excess_loss_is_the_kl_from_teacher_to_student():
    task = adaptive_batch.TeacherTask(pool=64, eval_size=256)
    teacher_logits = task.teacher(task.eval_x)
    assert float(task.excess_loss(teacher_logits)) == pytest.approx(0.0, abs=1e-6)
    other = torch.zeros_like(teacher_logits)  # uniform prediction
    p = torch.softmax(teacher_logits, 1)
    kl = (p * (torch.log(p) - math.log(1 / task.classes))).sum(1).mean()
    assert float(task.excess_loss(other)) == pytest.approx(float(kl), rel=1e-5)
    assert float(task.excess_loss(other)) + task.bayes_loss() == pytest.approx(math.log(task.classes), rel=1e-5)


def test_sgd_lr_factor_matches_bsmons_advice():
    rec = optimal_batch_size({16: 4_000.0, 64: 12_000.0, 256: 20_000.0}, 700.0, current_batch=16)
    assert rec.batch_size != 16
    assert adaptive_batch.sgd_lr_factor(700.0, 16, rec.batch_size) == pytest.approx(rec.lr_factor_sgd, rel=1e-12)


def test_ensemble_step_equals_independent_sgd_steps():
    task = adaptive_batch.TeacherTask(pool=512, eval_size=16)
    hidden, lrs, seeds = (8, 6), [0.1, 0.7], [3, 4]
    ensemble = critical_batch.Ensemble(task, hidden, lrs, seeds)
    x, y = task.batch((ensemble.size, 5), torch.Generator().manual_seed(0))
    ensemble.step(x, y)
    for m, (lr, seed) in enumerate((lr, seed) for lr in lrs for seed in seeds):
        model = adaptive_batch.student(task.inputs, hidden, task.classes, seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        nn.functional.cross_entropy(model(x[m]), y[m]).backward()
        optimizer.step()
        linears = [layer for layer in model if isinstance(layer, nn.Linear)]
        for layer, weight, bias in zip(linears, ensemble.weights, ensemble.biases):
            torch.testing.assert_close(weight[m].T, layer.weight.detach())
            torch.testing.assert_close(bias[m], layer.bias.detach())


def test_ensemble_adamw_steps_equal_independent_adamw_steps():
    task = adaptive_batch.TeacherTask(pool=512, eval_size=16)
    hidden, lrs, seeds = (8, 6), [0.01, 0.05], [3, 4]
    ensemble = critical_batch.Ensemble(task, hidden, lrs, seeds, optimizer="adamw")
    batches = [task.batch((ensemble.size, 5), torch.Generator().manual_seed(k)) for k in range(3)]
    for x, y in batches:
        ensemble.step(x, y)
    for m, (lr, seed) in enumerate((lr, seed) for lr in lrs for seed in seeds):
        model = adaptive_batch.student(task.inputs, hidden, task.classes, seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, **critical_batch.ADAMW)
        for x, y in batches:  # three steps: the moments and their bias corrections matter
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[m]), y[m]).backward()
            optimizer.step()
        linears = [layer for layer in model if isinstance(layer, nn.Linear)]
        for layer, weight, bias in zip(linears, ensemble.weights, ensemble.biases):
            torch.testing.assert_close(weight[m].T, layer.weight.detach())
            torch.testing.assert_close(bias[m], layer.bias.detach())


def test_fit_recovers_s_min_and_e_min_exactly():
    sizes = [8, 32, 128, 512]
    fit = critical_batch.fit_steps(sizes, [300 + 24_000 / b for b in sizes])
    assert (fit.s_min, fit.e_min, fit.b_crit) == pytest.approx((300, 24_000, 80))
    assert fit.max_rel_residual == pytest.approx(0, abs=1e-9)


def test_crossing_interpolates_between_evaluations():
    assert critical_batch.crossing(20, 0.1, 10, 0.3, target=0.2) == pytest.approx(15)
    assert critical_batch.crossing(1, 0.1, 0, math.inf, target=0.2) == 1  # below at the first evaluation


def test_sweep_stops_once_no_rate_can_win():
    # targets x (2 rates x 2 seeds); rate 0 has both seeds there, averaging 100 steps.
    hit = np.array([[90.0, 110.0, 95.0, np.nan]])
    diverged = np.zeros(4, dtype=bool)
    assert not critical_batch.decided(hit, diverged, step=100, n_lrs=2, n_seeds=2)  # (95 + 100)/2 < 100
    assert critical_batch.decided(hit, diverged, step=106, n_lrs=2, n_seeds=2)
    diverged[3] = True
    assert critical_batch.decided(hit, diverged, step=100, n_lrs=2, n_seeds=2)


def test_adaptive_demo_quick():
    out = run_demo("adaptive_batch.py")
    assert "throughput profile" in out and "adaptive batch-size changes" in out
    row = re.search(r"^\s+0 \|\s+([\d.]+) s\s+([\d.]+) s\s+([\d.]+)x \|\s+([\d.]+)x \|\s+([\d.]+)x \|"
                    r"\s+([\d.]+|nan)x \| (\S+)$", out, re.MULTILINE)
    assert row, out
    fixed_s, adaptive_s = float(row[1]), float(row[2])
    assert fixed_s > 0 and adaptive_s > 0
    half = 0.05  # the times are printed to 0.1 s
    assert (fixed_s - half) / (adaptive_s + half) <= float(row[3]) <= (fixed_s + half) / max(adaptive_s - half, 1e-9)
    sizes = [int(b) for b in row[7].split("->")]
    assert sizes[0] == 32 and all(1 <= b <= 256 for b in sizes)  # the start, and the largest size profiled


def test_critical_demo_quick():
    out = run_demo("critical_batch.py")
    steps = {int(m[1]): float(m[2]) for m in re.finditer(r"^\s+(\d+)\s+[\d.]+s \|\s+(\d+) \[", out, re.MULTILINE)}
    assert sorted(steps) == [16, 64, 256], out
    assert steps[16] > steps[256]  # more, smaller steps
    row = re.search(r"^\s+0\.3 \|\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+\d+% \|\s+([\d.]+)\s+([\d.]+)", out, re.MULTILINE)
    assert row, out
    s_min, e_min, b_crit, b_simple, b_simple_mean = map(float, row.groups())
    assert b_crit == pytest.approx(e_min / s_min, rel=0.05)
    assert b_simple > 0 and b_simple_mean > 0
    # the branch checks' table: one row per target, the sweep's B_crit beside the check's reading
    branch = re.search(r"^\s+0\.3 \|\s+([\d.]+) \|\s+(>?\s*[\d.]+)\s+\S+\s+(\d+) \|", out, re.MULTILINE)
    assert branch and float(branch[1]) == pytest.approx(b_crit, abs=1), out


def test_critical_demo_quick_adamw_reads_b_simple_and_b_pre():
    out = run_demo("critical_batch.py", "--optimizer", "adamw")
    assert "AdamW" in out.splitlines()[0]
    steps = {int(m[1]): float(m[2]) for m in re.finditer(r"^\s+(\d+)\s+[\d.]+s \|\s+(\d+) \[", out, re.MULTILINE)}
    assert sorted(steps) == [16, 64, 256], out
    row = re.search(r"^\s+0\.3 \|\s+([\d.]+) \|\s+([\d.]+)\s+([\d.]+) \|\s+([\d.]+) \|\s+([\d.]+)$", out, re.MULTILINE)
    assert row, out
    b_crit, b_pre, b_pre_mean, pre_ratio, simple_ratio = map(float, row.groups())
    assert b_crit > 0 and b_pre > 0 and b_pre_mean > 0
    assert pre_ratio == pytest.approx(b_pre / b_crit, abs=0.01)
    assert "branch checks" not in out  # SGD's only
