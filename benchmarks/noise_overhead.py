"""What bsmon's gradient-noise estimators cost a training step.

Each case times a CPU training loop without bsmon and with bsmon.watch(noise=...),
interleaved round by round in this process (method and statistics: benchmarks/_timing.py).
The ratios include the whole probe, not just the estimator, because that is what a job pays:

  micro-batch     MLP 256-512x3-10, 4 micro-batches of 32 accumulated per step,
                  noise="microbatch": one fused gradient norm per backward pass;
  micro-batch AdamW the same with AdamW, which adds B_pre: per backward pass, .grad rescaled by
                  AdamW's 1/(sqrt(v_hat) + eps) and its fused norm;
  per-example MLP the same MLP, one batch of 128 per step, noise="per_example": per-example
                  squared norms summed inside backward, from each layer's input and output
                  gradient;
  per-example MLP AdamW the same with AdamW, which adds B_pre: per layer, the per-example norms
                  weighted by AdamW's P^2 (one more matmul-shaped pass per Linear);
  transformer     a small decoder (token embedding, a position table looked up with ids (1, T)
                  as GPT-2 does, 2 pre-norm blocks of causal attention and a 4x MLP, width 128,
                  4 heads, 64 tokens, batch 8), noise="per_example", covering every parameter,
                  with AdamW: B_pre materialises each sequence layer's per-example gradients;
  transformer SGD the same decoder with SGD: B_simple alone, in the Gram form where cheaper.
                  (layers="norm_embed" is not timed: watch() refuses a per-example estimate over
                  part of the model, docs/noise-scale.md.)

Every estimator is timed twice: as users get it, measuring within its cost budget
(watch(noise_budget=0.01): a step is measured while measuring has cost at most 1% of the
training time), and measuring every step (noise_budget=1.0), which is what the measurement
itself costs. The issue's targets are checked against both.

Before timing, each watched variant runs a few steps under a fresh watch and prints what
Monitor.stats() says: the estimator in use, the fraction of trainable parameters it covers
and how many steps it measured, so a variant that silently measured nothing would show.

Sizes: a step takes several milliseconds (MLP) to tens of milliseconds (transformer) on one
thread, like a small real job; the transformer's 64 positions per example exercise the
sequence path of the per-example norms, which an MLP never takes.

Run: .venv/bin/python benchmarks/noise_overhead.py [--quick]
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from _timing import (Budget, Variant, benchmark_process, compare, estimator_summary, parse_budget,
                     print_environment, print_table, run_rounds, watching)
from overhead import make_mlp_loop

QUICK = Budget(rounds=3, chunks=2, chunk_s=0.3, warmup_s=0.1)
FULL = Budget(rounds=24, chunks=3, chunk_s=0.3, warmup_s=0.1)
MICRO_BATCHES = 4
VOCAB, WIDTH, HEADS, CONTEXT, BLOCKS, SEQUENCES = 256, 128, 4, 64, 2, 8


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a 4x GELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp_norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (self.qkv(self.attn_norm(x)).view(batch, length, 3, self.heads, width // self.heads)
                   .permute(2, 0, 3, 1, 4))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.down(F.gelu(self.up(self.mlp_norm(x))))


class TinyDecoder(nn.Module):
    """Token ids (batch, length) to next-token logits (batch, length, vocab)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.position = nn.Embedding(CONTEXT, WIDTH)
        self.blocks = nn.Sequential(*(Block(WIDTH, HEADS) for _ in range(BLOCKS)))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)  # shared by the batch
        return self.head(self.norm(self.blocks(self.embed(ids) + self.position(positions))))


def make_transformer_loop(seed: int = 0, adamw: bool = True
                          ) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[], None]]:
    """The decoder, AdamW (or SGD with momentum), and one step of next-token prediction on random
    token sequences."""
    torch.manual_seed(seed)
    model = TinyDecoder()
    optimizer = (torch.optim.AdamW(model.parameters(), lr=3e-4) if adamw
                 else torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    batches = itertools.cycle([torch.randint(0, VOCAB, (SEQUENCES, CONTEXT + 1)) for _ in range(16)])

    def step() -> None:
        tokens = next(batches)
        optimizer.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).backward()
        optimizer.step()

    return model, optimizer, step


def watched_variant(name: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                    step: Callable[[], None], **watch_kwargs) -> Variant:
    """A Variant running the loop under watch(**watch_kwargs); prints its estimator first."""
    print(f"  {name}: {estimator_summary(model, optimizer, step, **watch_kwargs)}")
    return Variant(name, lambda: watching(model, optimizer, **watch_kwargs))


def budget_and_every_step(name: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                          step: Callable[[], None], **watch_kwargs) -> list[Variant]:
    """The estimator as users get it (measuring within its 1% cost budget), and measuring every step."""
    return [watched_variant(name, model, optimizer, step, **watch_kwargs),
            watched_variant(f"{name}, every step", model, optimizer, step, noise_budget=1.0, **watch_kwargs)]


def compare_both(rounds, variants: list[Variant], target: float, case: str) -> list:
    default, every_step = variants
    return [compare(rounds, "no bsmon", default.name, target, case=case),
            compare(rounds, "no bsmon", every_step.name, target, case=f"{case}, every step")]


def main() -> None:
    budget = parse_budget(__doc__, quick=QUICK, full=FULL)
    rows = []
    with benchmark_process():
        print_environment()
        print(budget.describe())

        model, optimizer, step = make_mlp_loop(micro_batches=MICRO_BATCHES)
        watched = budget_and_every_step("micro-batch", model, optimizer, step, noise="microbatch")
        rounds = run_rounds(step, [Variant("no bsmon"), *watched], budget, label="micro-batch")
        rows += compare_both(rounds, watched, 1.02, f"micro-batch, MLP, {MICRO_BATCHES} micro-batches")

        model, optimizer, step = make_mlp_loop(micro_batches=MICRO_BATCHES, adamw=True)
        watched = budget_and_every_step("micro-batch AdamW", model, optimizer, step, noise="microbatch")
        rounds = run_rounds(step, [Variant("no bsmon"), *watched], budget, label="micro-batch AdamW")
        rows += compare_both(rounds, watched, 1.02, f"micro-batch + B_pre, MLP, AdamW, {MICRO_BATCHES} micro-batches")

        model, optimizer, step = make_mlp_loop()
        watched = budget_and_every_step("per-example", model, optimizer, step, noise="per_example")
        rounds = run_rounds(step, [Variant("no bsmon"), *watched], budget, label="per-example MLP")
        rows += compare_both(rounds, watched, 1.10, "per-example, MLP")

        model, optimizer, step = make_mlp_loop(adamw=True)
        watched = budget_and_every_step("per-example AdamW", model, optimizer, step, noise="per_example")
        rounds = run_rounds(step, [Variant("no bsmon"), *watched], budget, label="per-example MLP AdamW")
        rows += compare_both(rounds, watched, 1.10, "per-example + B_pre, MLP, AdamW")

        for adamw, label in ((True, "per-example + B_pre, transformer, AdamW"),
                             (False, "per-example, transformer, SGD")):
            model, optimizer, step = make_transformer_loop(adamw=adamw)
            every_layer = budget_and_every_step("all", model, optimizer, step, noise="per_example")
            rounds = run_rounds(step, [Variant("no bsmon"), *every_layer], budget, label=label)
            rows += compare_both(rounds, every_layer, 1.25, label)
    print_table("Step time against the same loop without bsmon", rows)


if __name__ == "__main__":
    main()
