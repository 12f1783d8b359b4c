"""The per-layer noise scale: the micro-batch and per-example estimators' breakdowns by module, on
small transformers, against exact ground truth from torch.func per-sample gradients."""

import asyncio

import pytest
import torch
import torch.nn.functional as F
from textual.widgets import Static
from torch import nn
from torch.func import functional_call, grad, vmap

import bsmon
from bsmon import store
from bsmon.client import Feed
from bsmon.model import SessionModel, Stats
from bsmon.probe.modules import MAX_MODULES, module_partition
from bsmon.tui import BsmonApp
from bsmon.tui.screens import LayersScreen, layers_details

VOCAB, WIDTH, CONTEXT = 32, 16, 8


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, 2, batch_first=True)
        self.up, self.down = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyTransformer(nn.Module):
    def __init__(self, blocks: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.Sequential(*(Block() for _ in range(blocks)))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids):
        return self.head(self.norm(self.blocks(self.embed(ids))))


def train(steps: int = 80):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = TinyTransformer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, VOCAB, (512, CONTEXT + 1))
    with bsmon.watch(model, optimizer, noise_budget=1.0) as monitor:
        for _ in range(steps):
            for _ in range(4):
                batch = data[torch.randint(0, 512, (8,))]
                logits = model(batch[:, :-1])
                (F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1)) / 4).backward()
            optimizer.step()
            optimizer.zero_grad()
    return monitor


def layers_screen_text(session_id: str) -> str:
    """The Layers screen (key l) of a recorded session, replayed in the real app."""
    async def screen() -> str:
        feed = Feed().replay(store.resolve_session(session_id))
        async with BsmonApp(feed, mode="replay").run_test(size=(120, 40)) as pilot:
            await pilot.pause()
            await pilot.press("l")
            await pilot.pause()
            assert isinstance(pilot.app.screen, LayersScreen)
            return str(pilot.app.screen.query_one("#layers-table", Static).visual)

    return asyncio.run(screen())


def test_module_rows_are_bounded_and_group_small_modules_by_type():
    model = TinyTransformer(blocks=4)
    params = list(model.parameters())
    labels, row_of, counts = module_partition(model, params)
    assert len(labels) <= MAX_MODULES and len(row_of) == len(params)
    assert sum(counts) == sum(p.numel() for p in params)
    assert any(label.startswith("LayerNorm x ") for label in labels)  # 9 norms, all small: one row
    small = TinyTransformer(blocks=1)
    labels, _, _ = module_partition(small, list(small.parameters()))
    assert "norm (LayerNorm)" in labels and "head (Linear)" in labels  # few modules: each its own row


def test_the_breakdown_adds_back_to_the_whole_model_and_the_screen_shows_it():
    monitor = train()
    stats = monitor.stats()
    rows = stats.noise_modules
    assert stats.noise_estimator == "microbatch" and 1 < len(rows) <= MAX_MODULES
    assert sum(share for _, share, _ in rows) == pytest.approx(1.0)
    assert sum(noise.grad_sq for _, _, noise in rows) == pytest.approx(stats.grad_sq, rel=1e-5)
    assert sum(noise.trace_sigma for _, _, noise in rows) == pytest.approx(stats.trace_sigma, rel=1e-5)
    assert all(noise.steps == stats.noise_steps for _, _, noise in rows)

    text = layers_screen_text(monitor.session_id)
    assert "microbatch estimator" in text and "whole model" in text and "norm layers together" in text
    for label, _, noise in rows:
        assert label in text


# ---- the per-example estimator's breakdown ---------------------------------------------------


class CoveredBlock(nn.Module):
    """A pre-norm block the per-example estimator covers whole: attention from Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.up, self.down = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x):
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        weights = (q @ k.mT / WIDTH ** 0.5).masked_fill(torch.ones(CONTEXT, CONTEXT).triu(1).bool(), -torch.inf)
        x = x + self.proj(weights.softmax(-1) @ v)
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class CoveredTransformer(TinyTransformer):
    def __init__(self, blocks: int = 2) -> None:
        super().__init__(blocks)
        self.blocks = nn.Sequential(*(CoveredBlock() for _ in range(blocks)))


N_SEQUENCES, BATCH, STEPS = 256, 16, 800


def sequence_loss(model, batch):
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))


def exact_row_scales(model, data, rows):
    """{label: (|G|^2, tr(Sigma))} of each row over the whole data set, from every sequence's own
    gradient (torch.func); a sequence is one example."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    per_example = vmap(grad(lambda p, seq: sequence_loss(lambda ids: functional_call(model, p, (ids,)), seq[None])),
                       in_dims=(None, 0))(params, data)
    names = {id(p): name for name, p in model.named_parameters()}
    labels, row_of, _ = rows
    exact = {}
    for k, label in enumerate(labels):
        members = [names[id(p)] for p, r in zip(model.parameters(), row_of) if r == k]
        flat = torch.cat([per_example[n].reshape(len(data), -1) for n in members], 1).double()
        mean = flat.mean(0)
        exact[label] = (float(mean.square().sum()), float((flat - mean).square().sum(1).mean()))
    return exact


def test_per_example_breakdown_matches_exact_per_sample_gradients():
    """At fixed parameters (lr 0) each row's B_simple converges to the row's exact value, and
    every measured step's rows add back to the whole model's pe and big."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = CoveredTransformer()
    data = torch.randint(0, VOCAB, (N_SEQUENCES, CONTEXT + 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    sampler = torch.Generator().manual_seed(1)
    with bsmon.watch(model, optimizer, noise="per_example", horizon_samples=1e12, noise_budget=1.0) as monitor:
        for _ in range(STEPS):
            sequence_loss(model, data[torch.randint(0, N_SEQUENCES, (BATCH,), generator=sampler)]).backward()
            optimizer.step()
            optimizer.zero_grad()
    stats = monitor.stats()
    rows = stats.noise_modules
    assert stats.noise_estimator == "per_example" and stats.noise_covered_fraction == 1.0
    partition = module_partition(model, list(model.parameters()))
    assert [label for label, _, _ in rows] == partition[0] and 1 < len(rows) <= MAX_MODULES
    assert all(noise.steps == stats.noise_steps == STEPS for _, _, noise in rows)

    # Every step: the rows are the same per-parameter sums as the whole model's, regrouped.
    records, _ = store.read_records(store.resolve_session(monitor.session_id).records_path)
    payloads = [r["noise"] for r in records if r["k"] == "step" and "noise" in r]
    assert len(payloads) == STEPS
    for noise in payloads:
        assert len(noise["mod_pe"]) == len(noise["mod_big"]) == len(rows)
        assert sum(noise["mod_pe"]) == pytest.approx(sum(noise["pe"]), rel=1e-6)
        assert sum(noise["mod_big"]) == pytest.approx(sum(noise["big"]), rel=1e-6)
    assert sum(noise.grad_sq for _, _, noise in rows) == pytest.approx(stats.grad_sq, rel=1e-6)
    assert sum(noise.trace_sigma for _, _, noise in rows) == pytest.approx(stats.trace_sigma, rel=1e-6)

    # Against the exact values over the data set: every row's band covers its own, and the
    # LayerNorm row (the best-measured here) is within a few percent.
    exact = exact_row_scales(model, data, partition)
    for label, _, noise in rows:
        grad_sq, trace = exact[label]
        assert noise.b_simple_low <= trace / grad_sq <= noise.b_simple_high, (label, noise, trace / grad_sq)
    norms = dict((label, noise) for label, _, noise in rows)["LayerNorm x 5 (smaller)"]
    grad_sq, trace = exact["LayerNorm x 5 (smaller)"]
    assert norms.b_simple == pytest.approx(trace / grad_sq, rel=0.05)
    whole = sum(t for _, t in exact.values()) / sum(g for g, _ in exact.values())
    assert stats.b_simple_low <= whole <= stats.b_simple_high

    # Replayed, the model gives the same rows, and the Layers screen shows them.
    replay = SessionModel()
    replay.ingest_all(records)
    assert [(label, noise.b_simple) for label, _, noise in replay.stats().noise_modules] == \
        [(label, noise.b_simple) for label, _, noise in rows]
    text = layers_screen_text(monitor.session_id)
    assert "per_example estimator" in text and "norm layers together" in text
    assert all(label in text for label, _, _ in rows)


def test_no_per_example_breakdown_over_part_of_the_model_and_the_screen_says_why():
    """MultiheadAttention's parameters are applied functionally: the per-example estimator would
    cover part of the model, so it is refused, and with it every row (none shows a partial sum)."""
    torch.manual_seed(0)
    model = TinyTransformer(blocks=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    data = torch.randint(0, VOCAB, (BATCH, CONTEXT + 1))
    with bsmon.watch(model, optimizer, noise="per_example", noise_budget=1.0) as monitor:
        for _ in range(3):
            sequence_loss(model, data).backward()
            optimizer.step()
            optimizer.zero_grad()
    stats = monitor.stats()
    assert stats.noise_estimator is None and stats.noise_modules == ()
    assert "cover only" in stats.noise_reason
    text = layers_screen_text(monitor.session_id)
    assert "No per-layer breakdown" in text and "cover only" in text and "MultiheadAttention" in text


def test_the_data_parallel_estimator_says_why_it_has_no_breakdown():
    text = layers_details(Stats(noise_estimator="ddp"))
    assert "No per-layer breakdown" in text and "buckets" in text and "module boundaries" in text
