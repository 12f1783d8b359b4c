"""The per-layer noise scale: the micro-batch estimator's breakdown by module, on a small transformer."""

import asyncio

import pytest
import torch
import torch.nn.functional as F
from textual.widgets import Static
from torch import nn

import bsmon
from bsmon import store
from bsmon.client import Feed
from bsmon.probe.modules import MAX_MODULES, module_partition
from bsmon.tui import BsmonApp
from bsmon.tui.screens import LayersScreen

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

    async def screen() -> str:
        feed = Feed().replay(store.resolve_session(monitor.session_id))
        async with BsmonApp(feed, mode="replay").run_test(size=(120, 40)) as pilot:
            await pilot.pause()
            await pilot.press("l")
            await pilot.pause()
            assert isinstance(pilot.app.screen, LayersScreen)
            return str(pilot.app.screen.query_one("#layers-table", Static).visual)

    text = asyncio.run(screen())
    assert "whole model" in text and "norm layers together" in text
    for label, _, noise in rows:
        assert label in text
