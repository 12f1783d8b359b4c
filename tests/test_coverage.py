"""The right number on the models people run, or none with the reason: through bsmon.watch().

Parameters are held fixed (learning rate 0), so the noise scale is a fixed population value:
exact from every example's gradient (one backward per example, or torch.func), or, where the
samples of a batch interact (BatchNorm), the noise of batch gradients at the batch size used,
from 20,000 batch gradients.
"""

import copy
import io
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap

import bsmon
import bsmon.store
from bsmon.headless import stats_json, status_line
from bsmon.export import write_csv
from bsmon.model import SessionModel
from bsmon.probe.noise import REASON_COMPILED, REASON_MIXES_SAMPLES

# torch.func has no batching rule for the CPU flash-attention kernel; it falls back, correctly, to a loop.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(model, loss_of, data, *, steps, batch, accumulate=1, seed=0, **watch_options):
    """A fixed-parameter training loop under bsmon.watch(); returns the monitor (closed)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    sampler = torch.Generator().manual_seed(seed)
    micro = batch // accumulate
    options = dict(horizon_samples=1e12, noise_budget=1.0) | watch_options
    with bsmon.watch(model, optimizer, **options) as monitor:
        for _ in range(steps):
            for _ in range(accumulate):
                index = torch.randint(0, len(data[0]), (micro,), generator=sampler)
                (loss_of(model, *(d[index] for d in data)) / accumulate).backward()
            optimizer.step()
            optimizer.zero_grad()
    return monitor


def exact_b_simple(model, loss_of, data):
    """tr(Sigma)/|G|^2 over the population, from one backward per example (all parameters)."""
    grads = []
    for i in range(len(data[0])):
        model.zero_grad(set_to_none=True)
        loss_of(model, *(d[i : i + 1] for d in data)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).double())
    model.zero_grad(set_to_none=True)
    flat = torch.stack(grads)
    mean = flat.mean(0)
    return float(((flat - mean) ** 2).sum(1).mean() / mean.square().sum())


def session_model(monitor) -> SessionModel:
    """The recorded session, read back as `bsmon replay` and `bsmon export` read it."""
    records, _ = bsmon.store.read_records(bsmon.store.resolve_session(monitor.session_id).records_path)
    model = SessionModel()
    model.ingest_all(records)
    return model


def assert_inside_band(stats, exact):
    assert stats.b_simple_low <= exact <= stats.b_simple_high, (exact, stats.b_simple_low, stats.b_simple_high)


# ---- GPT-2 from transformers: Conv1D, tied wte/lm_head, the wpe table, LayerNorm -------------


def markov_tokens(count, length, vocab=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    transitions = torch.softmax(3 * torch.randn(vocab, vocab, generator=g), 1)
    ids = torch.empty(count, length, dtype=torch.long)
    ids[:, 0] = torch.randint(0, vocab, (count,), generator=g)
    for t in range(1, length):
        ids[:, t] = torch.multinomial(transitions[ids[:, t - 1]], 1, generator=g).squeeze(1)
    return ids


def gpt2_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss  # the mean over the batch's tokens


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_gpt2_without_accumulation_shows_the_whole_model_number():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0,
        attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    ids = markov_tokens(256, 16)
    exact = exact_b_simple(model, gpt2_loss, (ids,))
    monitor = train(model, gpt2_loss, (ids,), steps=600, batch=8, seed=3)
    stats = monitor.stats()
    assert stats.noise_estimator == "per_example"
    assert stats.noise_covered_fraction == 1.0
    assert stats.b_simple == pytest.approx(exact, rel=0.10)
    assert_inside_band(stats, exact)


class TiedLM(nn.Module):
    """Token and position embeddings, a LayerNorm, and an output projection tied to the tokens."""

    def __init__(self, vocab=16, d=8, positions=6):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(positions, d)
        self.mix = nn.Linear(d, d)
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, ids):
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        h = self.tok(ids) + self.pos(positions)
        return self.head(self.norm(torch.tanh(self.mix(h)).cumsum(1)))


def lm_loss(model, ids):
    return F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())


def test_tied_embedding_model_without_accumulation():
    torch.manual_seed(0)
    model = TiedLM()
    ids = markov_tokens(512, 7, vocab=16, seed=2)
    exact = exact_b_simple(model, lm_loss, (ids,))
    monitor = train(model, lm_loss, (ids,), steps=600, batch=16)
    stats = monitor.stats()
    assert (stats.noise_estimator, stats.noise_covered_fraction) == ("per_example", 1.0)
    assert_inside_band(stats, exact)


# ---- partial coverage: withheld, and the coverage shown everywhere ---------------------------


class AttentionLM(nn.Module):
    """nn.MultiheadAttention applies its projections functionally: per-example norms cannot see them."""

    def __init__(self, vocab=16, d=8):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.attention = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        h = self.tok(ids)
        return self.head(self.attention(h, h, h, need_weights=False)[0])


def test_partial_coverage_is_withheld_with_the_coverage_everywhere():
    torch.manual_seed(0)
    model = AttentionLM()
    ids = markov_tokens(256, 7, vocab=16)
    monitor = train(model, lm_loss, (ids,), steps=40, batch=8)
    stats = monitor.stats()
    covered = sum(p.numel() for n, p in model.named_parameters() if "attention" not in n)
    fraction = covered / sum(p.numel() for p in model.parameters())
    assert stats.b_simple is None and stats.b_simple_low is None and stats.noise_estimator is None
    assert stats.noise_covered_fraction == pytest.approx(fraction)
    assert stats.noise_reason.startswith(f"per-example norms cover only {fraction:.0%} of the trainable parameters "
                                         "(not covered: attention.in_proj_weight [unsupported layer "
                                         "MultiheadAttention] and 3 more), and part of a model does not give")
    assert "Accumulate >= 2 micro-batches per step (noise='auto' then measures the whole model" in stats.noise_reason
    assert stats.efficiency is None and stats.b_opt is None
    replay = session_model(monitor)
    line = status_line(replay, "ended")
    assert f"B_simple N/A, coverage {fraction:.0%}: per-example norms cover only" in line
    assert json.loads(stats_json(replay, "ended"))["noise_covered_fraction"] == pytest.approx(fraction)
    out = io.StringIO()
    write_csv(bsmon.store.resolve_session(monitor.session_id), out)
    header, *rows = out.getvalue().splitlines()
    columns = header.split(",")
    last = dict(zip(columns, rows[-1].split(",")))
    assert last["b_simple"] == "" and float(last["noise_coverage"]) == pytest.approx(fraction)


def test_with_accumulation_the_micro_batch_estimator_covers_the_whole_model():
    torch.manual_seed(0)
    model = AttentionLM()
    ids = markov_tokens(256, 7, vocab=16)
    stats = train(model, lm_loss, (ids,), steps=40, batch=16, accumulate=2).stats()
    assert (stats.noise_estimator, stats.noise_covered_fraction) == ("microbatch", 1.0)
    assert stats.b_simple is not None


def test_a_recording_that_showed_a_partial_value_is_withheld_on_replay():
    model = SessionModel()
    model.ingest({"k": "hello", "v": 1, "session": "s", "name": "n", "pid": 1, "t0": 0.0, "command": [],
                  "host": "h", "user": "u", "unit": "samples"})
    model.ingest({"k": "estimator", "name": "per_example", "reason": None, "groups": ["all"],
                  "covered_fraction": 0.04, "uncovered": {"h.0.attn.c_attn.weight": "unsupported layer Conv1D"}})
    for step in range(1, 50):
        model.ingest({"k": "step", "step": step, "t": float(step), "dt": 1.0, "n": 8, "mb": 1, "dropped": 0,
                      "noise": {"est": "per_example", "batch": 8, "pe": [2.0 + step % 3], "big": [0.5]}})
    stats = model.stats()
    assert stats.b_simple is None and stats.noise_covered_fraction == 0.04
    assert stats.noise_reason.startswith("per-example norms cover only 4% of the trainable parameters "
                                         "(not covered: h.0.attn.c_attn.weight [unsupported layer Conv1D])")


# ---- samples that interact in the forward: BatchNorm, declared modules -----------------------


def bn_problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 12, generator=g)
    y = (x[:, :3] + 0.5 * torch.randn(2048, 3, generator=g)).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))
    return model, x, y


def classification_loss(model, x, y):
    return F.cross_entropy(model(x), y)


def batch_gradient_noise_scale(model, x, y, batch, count=20_000, seed=5):
    """b * tr(Cov G_b) / |E G_b|^2 over random batches of b, BatchNorm using each batch's statistics.

    The noise of the batch gradient the job actually takes, in samples: what the micro-batch
    estimator measures when BatchNorm normalises each micro-batch of b.
    """
    reference = replace_all_batch_norm_modules_(copy.deepcopy(model))
    params = {name: p.detach() for name, p in reference.named_parameters()}

    def batch_loss(p, xb, yb):
        return F.cross_entropy(functional_call(reference, p, (xb,)), yb)

    index = torch.randint(0, len(x), (count, batch), generator=torch.Generator().manual_seed(seed))
    grads = vmap(grad(batch_loss), in_dims=(None, 0, 0))(params, x[index], y[index])
    flat = torch.cat([g.reshape(count, -1) for g in grads.values()], 1).double()
    mean = flat.mean(0)
    trace = float(((flat - mean) ** 2).sum() / (count - 1))
    grad_sq = float(mean.square().sum()) - trace / count  # unbiased
    return batch * trace / grad_sq


def test_batch_norm_without_accumulation_is_withheld_with_the_reason():
    model, x, y = bn_problem()
    stats = train(model, classification_loss, (x, y), steps=40, batch=32).stats()
    assert stats.b_simple is None and stats.noise_estimator is None
    assert stats.noise_reason == REASON_MIXES_SAMPLES.format(module="1 (BatchNorm1d)")
    assert stats.noise_reason == (
        "1 (BatchNorm1d) mixes the samples of a batch in its training forward, so the loss is not a sum of "
        "per-sample losses and per-example gradients do not exist. Accumulate >= 2 micro-batches per step: "
        "the micro-batch estimator then measures the noise of batch gradients at the micro-batch size used")


def test_batch_norm_with_accumulation_measures_its_batch_gradients():
    model, x, y = bn_problem()
    reference = batch_gradient_noise_scale(model, x, y, batch=8)
    stats = train(model, classification_loss, (x, y), steps=600, batch=32, accumulate=4).stats()
    assert stats.noise_estimator == "microbatch"
    assert_inside_band(stats, reference)


class InBatchNegatives(nn.Module):
    def forward(self, h):
        return h @ h.T  # each example scored against every other of the batch


def test_declared_sample_mixing_module_is_named_in_the_reason():
    model = nn.Sequential(nn.Linear(12, 8), InBatchNegatives())
    x = torch.randn(256, 12)
    loss_of = lambda m, xb: F.cross_entropy(m(xb), torch.arange(len(xb)))  # noqa: E731
    stats = train(model, loss_of, (x,), steps=10, batch=8, mixes_samples=(InBatchNegatives,)).stats()
    assert stats.b_simple is None
    assert stats.noise_reason == REASON_MIXES_SAMPLES.format(module="1 (InBatchNegatives)")
    with pytest.raises(TypeError, match="mixes_samples=.*give a tuple of nn.Module subclasses"):
        bsmon.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), mixes_samples=InBatchNegatives)


# ---- torch.compile after watch() ----------------------------------------------------------


def compiled_run(accumulate):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(512, 12), torch.randint(0, 3, (512,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    sampler = torch.Generator().manual_seed(1)
    with bsmon.watch(model, optimizer, noise_budget=0.5) as monitor:
        compiled = torch.compile(model, backend="aot_eager")
        for _ in range(40):
            for _ in range(accumulate):
                index = torch.randint(0, 512, (16,), generator=sampler)
                (F.cross_entropy(compiled(x[index]), y[index]) / accumulate).backward()
            optimizer.step()
            optimizer.zero_grad()
    return monitor.stats(), dict(counters["graph_break"]), counters["stats"]["unique_graphs"]


def test_compiled_model_without_accumulation_says_why_per_example_norms_are_missing():
    stats, graph_breaks, graphs = compiled_run(accumulate=1)
    assert graph_breaks == {}
    assert graphs <= 3  # compiled once, and again when the per-example hooks come and go
    assert stats.b_simple is None and stats.noise_reason == REASON_COMPILED
    assert stats.noise_reason.startswith("the model runs under torch.compile, which leaves bsmon's per-example "
                                         "hooks out of the compiled graph")
    assert stats.batch_size == 16 and stats.micro_batches == 1


def test_compiled_model_with_accumulation_is_measured_without_graph_breaks():
    stats, graph_breaks, graphs = compiled_run(accumulate=4)
    assert graph_breaks == {}
    assert graphs == 1  # measuring on some steps and not others recompiles nothing
    assert stats.noise_estimator == "microbatch" and stats.noise_steps >= 30
    assert stats.batch_size == 64 and stats.micro_batches == 4
