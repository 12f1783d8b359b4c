"""B_pre, the noise scale in Adam's geometry, through the real probe against exact ground truth.

At learning rate 0 the parameters stay put, so Adam's second moment v converges to the
elementwise E[g_B^2] = G^2 + diag(Sigma)/B of the step's batch gradient (B = the whole step's
batch). P = 1/(sqrt(G^2 + diag(Sigma)/B) + eps) from the exact per-example gradients (torch.func)
then gives the exact B_pre = tr(P Sigma P)/|P G|^2 at those parameters. Both single-process
estimators are run on the same batch of 64: the micro-batch one as 4 passes of 16, the
per-example one as one pass of 64 (the data-parallel one: tests/test_distributed.py).
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import bsmon
from bsmon import store
from bsmon.model import SessionModel

N_EXAMPLES = 2048
MICRO, ACCUMULATE = 16, 4
BATCH = MICRO * ACCUMULATE


def _problem(seed: int = 0):
    """A small MLP on features of very different scales, so that P reweights the gradient strongly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_EXAMPLES, 12, generator=g) * torch.logspace(-1, 1, 12)
    y = (x[:, :3] / x[:, :3].std(0) + 0.7 * torch.randn(N_EXAMPLES, 3, generator=g)).argmax(1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))
    for p in model.parameters():
        nn.init.normal_(p, std=0.3)
    return model, x, y


def exact_noise_scales(model, x, y, eps: float) -> tuple[float, float]:
    """(B_simple, B_pre) at the model's parameters, from every example's gradient."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def example_loss(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([g.reshape(N_EXAMPLES, -1) for g in per_example.values()], dim=1).double()
    mean = flat.mean(0)
    variance = ((flat - mean) ** 2).mean(0)  # diag(Sigma), the population's
    p = 1.0 / ((mean**2 + variance / BATCH).sqrt() + eps)
    b_simple = float(variance.sum() / mean.pow(2).sum())
    b_pre = float((p**2 * variance).sum() / (p**2 * mean**2).sum())
    return b_simple, b_pre


#: (micro-batch size, passes per step) of each estimator's runs
ESTIMATORS = {"microbatch": (MICRO, ACCUMULATE), "per_example": (BATCH, 1)}


def run(steps: int, *, warmup: int = 1000, summed: bool = False, scaler: torch.amp.GradScaler | None = None,
        optimizer_cls=torch.optim.AdamW, seed: int = 0, estimator: str = "microbatch", **watch):
    """lr = 0 steps: ``warmup`` unwatched (Adam's v converges), then ``steps`` watched and measured."""
    micro, accumulate = ESTIMATORS[estimator]
    torch.set_num_threads(1)
    model, x, y = _problem()
    optimizer = (optimizer_cls(model.parameters(), lr=0.0, betas=(0.9, 0.999), eps=1e-8)
                 if optimizer_cls is not torch.optim.SGD else torch.optim.SGD(model.parameters(), lr=0.0))
    sampler = torch.Generator().manual_seed(seed)

    def step():
        for _ in range(accumulate):
            idx = torch.randint(0, N_EXAMPLES, (micro,), generator=sampler)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx], reduction="sum" if summed else "mean")
            loss = loss if summed else loss / accumulate
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad()

    for _ in range(warmup):
        step()
    with bsmon.watch(model, optimizer, horizon_samples=1e12, noise_budget=1.0, **watch) as monitor:
        for _ in range(steps):
            step()
    return monitor, model, x, y


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_b_pre_converges_to_the_exact_value_in_adams_geometry(estimator):
    monitor, model, x, y = run(1200, estimator=estimator)
    stats = monitor.stats()
    b_simple, b_pre = exact_noise_scales(model, x, y, eps=1e-8)
    assert abs(b_pre / b_simple - 1) > 0.3, (b_simple, b_pre)  # the geometry matters on this problem
    assert stats.noise_estimator == estimator
    assert stats.b_simple_precond == pytest.approx(b_pre, rel=0.05), f"exact B_pre {b_pre:.2f}"
    assert stats.b_simple_precond_low <= b_pre <= stats.b_simple_precond_high
    assert stats.b_simple == pytest.approx(b_simple, rel=0.05), f"exact B_simple {b_simple:.2f}"
    assert stats.b_simple_precond_reason is None
    assert stats.noise_geometry == "optimizer"
    assert "AdamW" in stats.noise_geometry_reason


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_a_loss_scale_and_the_loss_reduction_leave_b_pre_unchanged_up_to_eps(estimator):
    """P comes from the optimizer's unscaled state; the loss scale (GradScaler) and the reduction
    (sum = mean times the batch) multiply every .grad of a step alike and cancel in the ratio.
    A summed loss also scales v, so P by 1/B, exactly but for eps (1e-8 against |g| ~ 1e-2 here)."""
    reference = run(150, warmup=300, estimator=estimator)[0].stats()
    scaled = run(150, warmup=300, estimator=estimator,
                 scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12))[0].stats()
    summed = run(150, warmup=300, estimator=estimator, summed=True)[0].stats()
    assert reference.b_simple_precond is not None
    for variant in (scaled, summed):
        assert variant.b_simple_precond == pytest.approx(reference.b_simple_precond, rel=1e-3)
        assert variant.b_simple_precond_low == pytest.approx(reference.b_simple_precond_low, rel=1e-3)


def test_sgd_has_no_optimizer_geometry_and_the_advice_uses_b_simple():
    stats = run(40, warmup=0, optimizer_cls=torch.optim.SGD)[0].stats()
    assert stats.b_simple is not None
    assert stats.b_simple_precond is None
    assert "SGD keeps no per-element second moment" in stats.b_simple_precond_reason
    assert stats.noise_geometry == "sgd"


def test_noise_geometry_overrides_which_scale_drives_the_advice():
    monitor, *_ = run(60, warmup=300, noise_geometry="sgd")
    stats = monitor.stats()
    assert stats.noise_geometry == "sgd" and "noise_geometry='sgd'" in stats.noise_geometry_reason
    assert stats.b_simple_precond is not None  # still measured and shown
    with pytest.raises(ValueError, match="noise_geometry='optimizer' needs an optimizer"):
        model = nn.Linear(2, 1)
        bsmon.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_geometry="optimizer")
    with pytest.raises(ValueError, match="noise_geometry='adam'"):
        model = nn.Linear(2, 1)
        bsmon.watch(model, torch.optim.AdamW(model.parameters()), noise_geometry="adam")


def test_the_first_step_and_an_optimizer_without_exp_avg_sq_say_why_b_pre_is_missing():
    first = run(1, warmup=0)[0].stats()  # the only measured step came before Adam's first step
    assert first.b_simple_precond is None
    assert "optimizer's first step" in first.b_simple_precond_reason
    adamax = run(20, warmup=2, optimizer_cls=torch.optim.Adamax)[0].stats()  # betas and eps, but exp_inf
    assert adamax.b_simple_precond is None
    assert "Adamax keeps no per-element second moment" in adamax.b_simple_precond_reason
    assert adamax.noise_geometry == "sgd"


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_the_advice_follows_b_pre_for_adam_and_b_simple_when_overridden(estimator):
    """The recorded session replayed: the advice's B_noise column is B_pre for AdamW, B_simple under 'sgd'."""
    for geometry, column in (("auto", "b_simple_precond"), ("sgd", "b_simple")):
        monitor, *_ = run(60, warmup=300, noise_geometry=geometry, estimator=estimator)
        replay = SessionModel()
        replay.ingest_all(store.read_records(store.resolve_session(monitor.session_id).records_path)[0])
        h = replay.history
        assert h.b_noise[-1] == pytest.approx(getattr(h, column)[-1]), geometry


def test_a_session_recorded_without_b_pre_for_its_estimator_falls_back_to_b_simple_saying_why():
    """A bsmon before this one recorded per-example and data-parallel sessions of AdamW without B_pre."""
    model = SessionModel()
    model.ingest_all([
        {"k": "hello", "v": 1, "session": "old", "name": "n", "pid": 1, "t0": 0.0, "command": [], "host": "h",
         "user": "u", "unit": "samples", "optimizer": "AdamW"},
        {"k": "estimator", "name": "per_example", "reason": None, "groups": ["group 0"], "second_moment": True,
         "precond_reason": "the per-example estimator sums per-example norms without the rescaling"},
    ])
    geometry, reason = model.noise_geometry()
    assert geometry == "sgd"
    assert reason.startswith("AdamW has its own geometry, but B_pre is not measured (the per-example estimator")
    assert "falls back to B_simple" in reason
    assert model.precond_reason().startswith("the per-example estimator sums")
