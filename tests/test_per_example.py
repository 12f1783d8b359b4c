"""Per-example squared gradient norms, checked against exact per-example gradients from torch.func."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from bsmon.probe.modules import module_partition
from bsmon.probe.per_example import (
    LAYER_SETS,
    PerExampleNorms,
    conv_sq_norms,
    embedding_sq_norms,
    layer_norm_sq_norms,
    linear_sq_norms,
    prefer_gram,
)

# torch.func has no batching rule for the CPU flash-attention kernel; it falls back, correctly, to a loop.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

RTOL = 1e-6


@pytest.fixture(autouse=True)
def _float64_single_thread():
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


def squared_error(output, target):
    return ((output.tanh() - target) ** 2).sum()


def cross_entropy(logits, labels):
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="sum")


def exact_sq_norms(model, x, target, loss_fn):
    """{parameter name: (B,) squared norm of the gradient of example i's loss}, from torch.func."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def example_loss(params, x_i, target_i):
        return loss_fn(functional_call(model, params, (x_i.unsqueeze(0),)), target_i.unsqueeze(0))

    grads = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, target)
    return {name: g.flatten(1).square().sum(1) for name, g in grads.items()}


def layer_delta(layer, x, target, loss_fn=squared_error):
    """delta = d(summed loss)/d(layer output), as the backward hands it to the layer."""
    output = layer(x)
    output.retain_grad()
    loss_fn(output, target).backward()
    return output.grad


def check_layer(layer, x, norms_fn, loss_fn=squared_error, target=None):
    """norms_fn(x, delta) -> (B, k) must match the exact per-example norms of weight, then bias."""
    if target is None:
        target = torch.randn_like(layer(x))
    exact = exact_sq_norms(layer, x, target, loss_fn)
    got = norms_fn(x, layer_delta(layer, x, target, loss_fn))
    want = torch.stack([exact[name] for name in ("weight", "bias") if name in exact], 1)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=0)


def train_step(model, probe, x, target, loss_fn, reduction="sum"):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), target)
    (loss / x.shape[0] if reduction == "mean" else loss).backward()
    return probe.pop()


def covered_total(exact, probe):
    return sum(exact[name].sum() for name in probe.covered_names)


def assert_step_matches(model, probe, x, target, loss_fn, exact):
    popped = train_step(model, probe, x, target, loss_fn)
    assert popped is not None, probe.skip_reason
    batch, totals = popped
    assert batch == x.shape[0]
    torch.testing.assert_close(totals.sum(), covered_total(exact, probe), rtol=RTOL, atol=0)


# ---- one layer at a time: per-example values ------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_linear_non_sequence_input(bias):
    layer = nn.Linear(5, 4, bias=bias)
    check_layer(layer, torch.randn(6, 5), lambda x, d: linear_sq_norms(x, d, bias=bias))


def test_linear_bias_alone():
    layer = nn.Linear(5, 4)
    x, target = torch.randn(6, 5), torch.randn(6, 4)
    exact = exact_sq_norms(layer, x, target, squared_error)
    got = linear_sq_norms(x, layer_delta(layer, x, target), weight=False)
    torch.testing.assert_close(got[:, 0], exact["bias"], rtol=RTOL, atol=0)


@pytest.mark.parametrize("gram", [True, False, None])
@pytest.mark.parametrize("shape", [(4, 7, 5), (3, 2, 4, 5)])
def test_linear_sequence_input_both_paths(gram, shape):
    layer = nn.Linear(5, 6)
    check_layer(layer, torch.randn(shape), lambda x, d: linear_sq_norms(x, d, gram=gram))


def test_prefer_gram_compares_the_two_costs():
    assert prefer_gram(positions=4, in_features=64, out_features=64)  # 4 * 128 < 64 * 64
    assert not prefer_gram(positions=64, in_features=16, out_features=16)  # 64 * 32 > 16 * 16


CONV2D_CASES = [
    dict(kernel_size=3, stride=2, padding=1, dilation=2),
    dict(kernel_size=(2, 3), stride=(2, 1), padding=(1, 2), groups=2),
    dict(kernel_size=4, padding="same", dilation=2, padding_mode="reflect"),
    dict(kernel_size=3, padding=1, padding_mode="circular", bias=False),
    dict(kernel_size=3, padding="valid", groups=4),  # depthwise
]


@pytest.mark.parametrize("gram", [True, False])
@pytest.mark.parametrize("options", CONV2D_CASES)
def test_conv2d(options, gram):
    layer = nn.Conv2d(4, 8, **options)
    norms = partial(conv_sq_norms, layer, bias=layer.bias is not None, gram=gram)
    check_layer(layer, torch.randn(3, 4, 9, 8), norms)


CONV1D_CASES = [
    dict(kernel_size=3, stride=2, padding=2, dilation=2),
    dict(kernel_size=4, padding="same", padding_mode="replicate", groups=2),
    dict(kernel_size=2, padding=1, padding_mode="circular", bias=False),
]


@pytest.mark.parametrize("gram", [True, False])
@pytest.mark.parametrize("options", CONV1D_CASES)
def test_conv1d(options, gram):
    layer = nn.Conv1d(4, 6, **options)
    norms = partial(conv_sq_norms, layer, bias=layer.bias is not None, gram=gram)
    check_layer(layer, torch.randn(3, 4, 11), norms)


@pytest.mark.parametrize(
    "normalized_shape, x_shape, bias",
    [(6, (5, 6), True), (6, (5, 7, 6), True), ((3, 6), (5, 2, 3, 6), False)],
)
def test_layer_norm(normalized_shape, x_shape, bias):
    layer = nn.LayerNorm(normalized_shape, eps=0.1, bias=bias)
    with torch.no_grad():  # away from the initial weight 1 and bias 0
        layer.weight.normal_()
    check_layer(layer, 3 * torch.randn(x_shape) + 1, lambda x, d: layer_norm_sq_norms(layer, x, d, bias=bias))


@pytest.mark.parametrize("padding_idx", [None, 1])
@pytest.mark.parametrize("ids_shape", [(6,), (4, 9), (3, 2, 5)])
def test_embedding_with_repeated_tokens(padding_idx, ids_shape):
    layer = nn.Embedding(5, 3, padding_idx=padding_idx)  # 5 ids over many positions: many repeats
    ids = torch.randint(0, 5, ids_shape)
    ids.view(-1)[:3] = 1  # padding_idx occurs for sure
    check_layer(layer, ids, lambda i, d: embedding_sq_norms(layer, i, d), target=torch.randn(*ids_shape, 3))


LOW_PRECISION_CASES = {  # name: (norms, input, delta)
    "linear": (lambda x, d: linear_sq_norms(x, d), (5, 8), (5, 6)),
    "linear sequence gram": (lambda x, d: linear_sq_norms(x, d, gram=True), (5, 2, 4), (5, 2, 3)),
    "linear sequence materialised": (lambda x, d: linear_sq_norms(x, d, gram=False), (5, 2, 4), (5, 2, 3)),
    "layer norm": (lambda x, d: layer_norm_sq_norms(nn.LayerNorm(4), x, d), (5, 2, 4), (5, 2, 4)),
    "conv1d": (lambda x, d: conv_sq_norms(nn.Conv1d(2, 3, 3, padding=1), x, d), (5, 2, 4), (5, 3, 4)),
    "embedding": (lambda x, d: embedding_sq_norms(nn.Embedding(3, 3), (x > 0).long(), d), (5, 4), (5, 4, 3)),
}


@pytest.mark.parametrize("case", LOW_PRECISION_CASES)
def test_low_precision_inputs_are_summed_in_float32(case):
    """bf16 values are exact in float32, so the sums must equal the float32 computation exactly."""
    norms, x_shape, delta_shape = LOW_PRECISION_CASES[case]
    x, delta = torch.randn(x_shape).bfloat16(), torch.randn(delta_shape).bfloat16()
    got = norms(x, delta)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, norms(x.float(), delta.float()), rtol=0, atol=0)


class DoubledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class RenamedLinear(nn.Linear):
    pass


def test_subclasses_are_covered_only_if_they_keep_the_forward():
    probe = PerExampleNorms(nn.Sequential(DoubledLinear(3, 3), RenamedLinear(3, 2)))
    assert probe.uncovered["0.weight"] == "unsupported layer DoubledLinear"
    assert probe.covered_names == ["1.weight", "1.bias"]


# ---- whole models through the hooks ---------------------------------------------------------


def mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_mlp_sum_and_mean_losses(reduction):
    model = mlp()
    x, labels = torch.randn(7, 6), torch.randint(0, 3, (7,))
    exact = exact_sq_norms(model, x, labels, cross_entropy)
    probe = PerExampleNorms(model)
    assert probe.covered_fraction == 1.0 and probe.uncovered == {}
    batch, totals = train_step(model, probe, x, labels, cross_entropy, reduction)
    assert not totals.requires_grad  # the hooks record nothing in the autograd graph
    scale = 1.0 if reduction == "sum" else 1.0 / batch**2
    torch.testing.assert_close(totals, torch.stack([covered_total(exact, probe)]) * scale, rtol=RTOL, atol=0)


def test_loss_scale_cancels_between_per_example_and_batch_norms():
    """S/B against |.grad|^2/B^2 (the B_small = 1 and B_big = B inputs) is the same for a sum and a mean."""
    model, x, labels = mlp(), torch.randn(7, 6), torch.randint(0, 3, (7,))
    probe = PerExampleNorms(model)
    ratios = []
    for reduction in ("sum", "mean"):
        batch, totals = train_step(model, probe, x, labels, cross_entropy, reduction)
        grad_sq = sum(p.grad.square().sum() for p in probe.covered_params)
        ratios.append((totals.sum() / batch) / (grad_sq / batch**2))
    torch.testing.assert_close(ratios[0], ratios[1], rtol=RTOL, atol=0)


def test_sequence_model_takes_both_linear_paths():
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 2))
    positions = 5
    assert prefer_gram(positions, 12, 16) and not prefer_gram(positions, 16, 2)
    x, target = torch.randn(4, positions, 12), torch.randn(4, positions, 2)
    exact = exact_sq_norms(model, x, target, squared_error)
    assert_step_matches(model, PerExampleNorms(model), x, target, squared_error, exact)


def test_conv_net():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding="same", groups=2, bias=False),
        nn.Flatten(),
        nn.Linear(64, 3),
    )
    x, labels = torch.randn(5, 3, 8, 8), torch.randint(0, 3, (5,))
    exact = exact_sq_norms(model, x, labels, cross_entropy)
    assert_step_matches(model, PerExampleNorms(model), x, labels, cross_entropy, exact)


class TinyLM(nn.Module):
    def __init__(self, vocab=11, d=8, tied=False, position_embedding=False, padding_idx=None):
        super().__init__()
        self.tok = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.pos = nn.Embedding(16, d) if position_embedding else None
        self.position_ids_2d = False  # look positions up with ids (T,), or (1, T) as GPT-2 does
        self.block = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, ids):
        h = self.tok(ids)
        if self.pos is not None:  # looked up once, broadcast over the batch
            positions = torch.arange(ids.shape[1])
            h = h + self.pos(positions.unsqueeze(0) if self.position_ids_2d else positions)
        return self.head(self.norm(self.block(h)))


def lm_batch(batch=4, positions=6, vocab=11):
    return torch.randint(0, vocab, (batch, positions)), torch.randint(0, vocab, (batch, positions))


def test_transformer_block_covers_what_it_can():
    model = TinyLM()
    ids, labels = lm_batch()
    exact = exact_sq_norms(model, ids, labels, cross_entropy)
    probe = PerExampleNorms(model)
    attention_params = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
    attention = {f"block.self_attn.{name}" for name in attention_params}
    assert set(probe.uncovered) == attention
    assert "MultiheadAttention" in probe.uncovered["block.self_attn.out_proj.weight"]
    assert {"block.linear1.weight", "block.norm2.bias", "tok.weight", "head.bias"} <= set(probe.covered_names)
    numel = {name: p.numel() for name, p in model.named_parameters()}
    covered = sum(numel[name] for name in probe.covered_names)
    assert probe.covered_fraction == pytest.approx(covered / sum(numel.values()))
    assert_step_matches(model, probe, ids, labels, cross_entropy, exact)


def test_norm_embed_covers_only_norms_and_embeddings():
    model = TinyLM()
    ids, labels = lm_batch()
    exact = exact_sq_norms(model, ids, labels, cross_entropy)
    probe = PerExampleNorms(model, "norm_embed")
    norms = {f"{layer}.{name}" for layer in ("block.norm1", "block.norm2", "norm") for name in ("weight", "bias")}
    assert set(probe.covered_names) == norms | {"tok.weight"}
    assert probe.uncovered["head.weight"] == "layer Linear not in the chosen layer set"
    assert LAYER_SETS["norm_embed"] == (nn.LayerNorm, nn.RMSNorm, nn.Embedding)
    assert_step_matches(model, probe, ids, labels, cross_entropy, exact)


def test_sequence_first_transformer_layer_is_uncovered():
    model = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)  # batch_first=False
    probe = PerExampleNorms(model)
    assert probe.covered_params == []
    assert "batch_first=False" in probe.uncovered["linear1.weight"]


def test_position_embedding_broadcast_over_batch_is_excluded_at_run_time():
    model = TinyLM(position_embedding=True)
    ids, labels = lm_batch(batch=4, positions=6)
    exact = exact_sq_norms(model, ids, labels, cross_entropy)
    probe = PerExampleNorms(model)
    assert "pos.weight" in probe.covered_names
    assert train_step(model, probe, ids, labels, cross_entropy) is None
    assert "pos.weight" in probe.skip_reason
    assert "not the batch size 4" in probe.uncovered["pos.weight"]
    assert "pos.weight" not in probe.covered_names
    assert_step_matches(model, probe, ids, labels, cross_entropy, exact)


def test_position_embedding_is_excluded_even_when_positions_equal_the_batch_size():
    model = TinyLM(position_embedding=True)
    ids, labels = lm_batch(batch=6, positions=6)
    probe = PerExampleNorms(model)
    assert train_step(model, probe, ids, labels, cross_entropy) is None
    assert "1-d ids" in probe.uncovered["pos.weight"]


def test_param_groups_break_the_sum_down():
    model = mlp()
    x, labels = torch.randn(7, 6), torch.randint(0, 3, (7,))
    exact = exact_sq_norms(model, x, labels, cross_entropy)
    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    optimizer = torch.optim.SGD([{"params": weights}, {"params": biases, "weight_decay": 0.0}], lr=0.1)
    probe = PerExampleNorms(model, param_groups=optimizer.param_groups)
    assert probe.covered_groups == [0 if name.endswith("weight") else 1 for name in probe.covered_names]
    _, totals = train_step(model, probe, x, labels, cross_entropy)
    want = [sum(exact[n].sum() for n in probe.covered_names if n.endswith(kind)) for kind in ("weight", "bias")]
    torch.testing.assert_close(totals, torch.stack(want), rtol=RTOL, atol=0)


def test_parameters_outside_the_groups_are_uncovered():
    model = mlp()
    probe = PerExampleNorms(model, param_groups=[[model[0].weight]])
    assert probe.covered_names == ["0.weight"]
    assert probe.uncovered["2.bias"] == "not in any of the given param_groups"


# ---- what must be excluded ------------------------------------------------------------------


def test_weights_tied_other_than_embedding_to_linear_are_uncovered():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    x, target = torch.randn(5, 4), torch.randn(5, 4)
    exact = exact_sq_norms(model, x, target, squared_error)
    probe = PerExampleNorms(model)
    assert "tied weight" in probe.uncovered["0.weight"] and "2.weight" in probe.uncovered["0.weight"]
    assert probe.covered_names == ["0.bias", "2.bias"]
    assert_step_matches(model, probe, x, target, squared_error, exact)


def test_layer_registered_twice_is_uncovered():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(4, 2))
    probe = PerExampleNorms(model)
    assert probe.covered_names == ["3.weight", "3.bias"]
    assert "tied weight" in probe.uncovered["0.weight"]


def test_unsupported_layers_are_reported():
    model = nn.Sequential(nn.Conv3d(1, 2, 1), nn.Flatten(), nn.BatchNorm1d(2), nn.Linear(2, 2))
    probe = PerExampleNorms(model)
    assert probe.uncovered["0.weight"] == "unsupported layer Conv3d"
    assert probe.uncovered["2.bias"] == "unsupported layer BatchNorm1d"
    assert probe.covered_fraction == pytest.approx(6 / 14)  # Conv3d 4, BatchNorm1d 4, Linear 6


def test_embedding_scaled_by_batch_frequency_is_uncovered():
    probe = PerExampleNorms(nn.Embedding(5, 2, scale_grad_by_freq=True))
    assert probe.covered_params == [] and "scale_grad_by_freq" in probe.uncovered["weight"]


class CallsTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.inner(self.inner(x).tanh()))


def test_layer_called_twice_per_forward_is_excluded_at_run_time():
    model = CallsTwice()
    x, target = torch.randn(5, 4), torch.randn(5, 2)
    exact = exact_sq_norms(model, x, target, squared_error)
    probe = PerExampleNorms(model)
    assert train_step(model, probe, x, target, squared_error) is None
    assert "more than once" in probe.skip_reason and "more than once" in probe.uncovered["inner.weight"]
    assert probe.covered_names == ["out.weight", "out.bias"]
    assert_step_matches(model, probe, x, target, squared_error, exact)


class FunctionalUse(nn.Module):
    """Holds a Linear but applies its weight functionally, as MultiheadAttention does with out_proj."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(F.linear(x, self.proj.weight, self.proj.bias).tanh())


def test_parameters_used_outside_their_layer_are_excluded_at_run_time():
    model = FunctionalUse()
    x, target = torch.randn(5, 4), torch.randn(5, 2)
    exact = exact_sq_norms(model, x, target, squared_error)
    probe = PerExampleNorms(model)
    assert train_step(model, probe, x, target, squared_error) is None
    assert "outside its forward" in probe.uncovered["proj.weight"]
    assert probe.covered_names == ["out.weight", "out.bias"]
    assert_step_matches(model, probe, x, target, squared_error, exact)


# ---- robustness -----------------------------------------------------------------------------


def test_eval_and_no_grad_forwards_are_ignored():
    model = mlp()
    x, labels = torch.randn(7, 6), torch.randint(0, 3, (7,))
    exact = exact_sq_norms(model, x, labels, cross_entropy)
    probe = PerExampleNorms(model)
    model.zero_grad()
    loss = cross_entropy(model(x), labels)
    with torch.no_grad():
        model(torch.randn(3, 6))
    model.eval()
    model(torch.randn(2, 6))
    model.train()
    loss.backward()
    batch, totals = probe.pop()
    torch.testing.assert_close(totals.sum(), covered_total(exact, probe), rtol=RTOL, atol=0)

    model.eval()  # a backward through an eval-mode forward gives no per-example norms
    model.zero_grad()
    cross_entropy(model(x), labels).backward()
    assert probe.pop() is None and probe.skip_reason == "no backward pass since the last pop()"
    model.train()
    assert probe.covered_fraction == 1.0


def test_forward_without_backward_does_not_leak_into_the_next_step():
    model = mlp()
    x, labels = torch.randn(7, 6), torch.randint(0, 3, (7,))
    exact = exact_sq_norms(model, x, labels, cross_entropy)
    probe = PerExampleNorms(model)
    stale = cross_entropy(model(torch.randn(3, 6)), labels[:3])  # never backpropagated in its step
    assert_step_matches(model, probe, x, labels, cross_entropy, exact)
    stale.backward()  # its saved inputs were dropped when the next forward started
    assert probe.pop() is None and "stale" in probe.skip_reason


class KeywordInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(input=x)


def test_layer_called_with_a_keyword_input():
    model = KeywordInput()
    x, target = torch.randn(5, 4), torch.randn(5, 2)
    exact = exact_sq_norms(model, x, target, squared_error)
    assert_step_matches(model, PerExampleNorms(model), x, target, squared_error, exact)


def test_layer_run_outside_the_model_forward_gives_none():
    model = mlp()
    probe = PerExampleNorms(model)
    model.zero_grad()
    cross_entropy(model(torch.randn(7, 6)), torch.randint(0, 3, (7,))).backward()
    model[0](torch.randn(7, 6)).sum().backward()
    assert probe.pop() is None and "outside the model's forward" in probe.skip_reason


def test_unbatched_input_gives_none():
    model = nn.Linear(3, 2)  # the model is itself the covered layer
    probe = PerExampleNorms(model)
    model(torch.randn(3)).sum().backward()
    assert probe.pop() is None and "no batch dimension" in probe.skip_reason
    model(torch.randn(4, 3)).sum().backward()
    assert probe.pop()[0] == 4


def test_several_backward_passes_give_none():
    model = mlp()
    x, labels = torch.randn(8, 6), torch.randint(0, 3, (8,))
    probe = PerExampleNorms(model)
    model.zero_grad()
    for part in (slice(0, 4), slice(4, 8)):  # gradient accumulation
        cross_entropy(model(x[part]), labels[part]).backward()
    assert probe.pop() is None and "several forwards or backward passes" in probe.skip_reason
    assert probe.pop() is None and probe.skip_reason == "no backward pass since the last pop()"


def test_parameter_frozen_after_construction_contributes_nothing():
    model = mlp()
    x, labels = torch.randn(7, 6), torch.randint(0, 3, (7,))
    exact = exact_sq_norms(model, x, labels, cross_entropy)
    probe = PerExampleNorms(model)
    model[2].bias.requires_grad_(False)
    _, totals = train_step(model, probe, x, labels, cross_entropy)
    want = covered_total(exact, probe) - exact["2.bias"].sum()
    torch.testing.assert_close(totals.sum(), want, rtol=RTOL, atol=0)


def test_backward_with_create_graph_records_nothing():
    model = mlp()
    x, labels = torch.randn(7, 6), torch.randint(0, 3, (7,))
    exact = exact_sq_norms(model, x, labels, cross_entropy)
    probe = PerExampleNorms(model)
    torch.autograd.grad(cross_entropy(model(x), labels), list(model.parameters()), create_graph=True)
    _, totals = probe.pop()
    assert not totals.requires_grad
    torch.testing.assert_close(totals.sum(), covered_total(exact, probe), rtol=RTOL, atol=0)


def test_autocast_bfloat16_sums_in_float32():
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).float()
    x, labels = torch.randn(7, 6, dtype=torch.float32), torch.randint(0, 3, (7,))
    exact = exact_sq_norms(model, x, labels, cross_entropy)
    probe = PerExampleNorms(model)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = cross_entropy(model(x), labels)
    loss.backward()
    _, totals = probe.pop()
    assert totals.dtype == torch.float32
    torch.testing.assert_close(totals.sum(), covered_total(exact, probe).float(), rtol=0.05, atol=0)


def test_remove_restores_the_model():
    model = TinyLM()
    ids, labels = lm_batch()
    probe = PerExampleNorms(model)
    train_step(model, probe, ids, labels, cross_entropy)
    probe.remove()
    probe.remove()
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert train_step(model, probe, ids, labels, cross_entropy) is None


def test_bad_arguments_are_rejected_with_a_message():
    model = mlp()
    with pytest.raises(ValueError, match="not a known set"):
        PerExampleNorms(model, "everything")
    with pytest.raises(ValueError, match="supported layer types"):
        PerExampleNorms(model, (nn.Conv3d,))
    with pytest.raises(ValueError, match="both param_groups"):
        PerExampleNorms(model, param_groups=[[model[0].weight], [model[0].weight]])
    with pytest.raises(TypeError, match="nn.Parameter"):
        PerExampleNorms(model, param_groups=[[torch.zeros(2)]])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        PerExampleNorms(lambda x: x)


# ---- the layers real models use: tied embeddings, position tables, RMSNorm, GPT-2's Conv1D ----


def exact_sq_norms_by_loop(model, inputs, loss_of):
    """{parameter name: (B,) per-example squared gradient norm}, one backward per example.

    For models torch.func cannot vmap (Hugging Face's mask building); ``loss_of(model, inputs_i)``
    is example i's loss. A tied weight appears once, under its first name, with its whole gradient.
    """
    norms = {name: [] for name, _ in model.named_parameters()}
    for i in range(inputs.shape[0]):
        model.zero_grad(set_to_none=True)
        loss_of(model, inputs[i : i + 1]).backward()
        for name, param in model.named_parameters():
            norms[name].append(param.grad.square().sum())
    model.zero_grad(set_to_none=True)
    return {name: torch.stack(values) for name, values in norms.items()}


@pytest.mark.parametrize("padding_idx", [None, 3])
def test_tied_input_and_output_embedding_includes_the_cross_term(padding_idx):
    model = TinyLM(tied=True, padding_idx=padding_idx)
    ids, labels = lm_batch(batch=5, positions=7)
    ids[0, :3] = 3  # repeated ids, and padding where there is a padding_idx
    exact = exact_sq_norms(model, ids, labels, cross_entropy)
    probe = PerExampleNorms(model)
    assert "tok.weight" in probe.covered_names and "tok.weight" not in probe.uncovered
    assert probe.covered_names.count("tok.weight") == 1
    assert_step_matches(model, probe, ids, labels, cross_entropy, exact)
    # Without the cross term the tied weight's norms would be off: check the test can tell.
    cross_free = PerExampleNorms(model)
    for tie in cross_free._ties:
        tie.backward = lambda tap, delta, scale=None: None
    _, totals = train_step(model, cross_free, ids, labels, cross_entropy)
    assert not torch.allclose(totals.sum(), covered_total(exact, probe), rtol=1e-3)


def test_tied_weight_in_its_own_param_group():
    model = TinyLM(tied=True)
    ids, labels = lm_batch()
    exact = exact_sq_norms(model, ids, labels, cross_entropy)
    tied = [model.tok.weight]
    rest = [p for p in model.parameters() if p is not model.tok.weight]
    probe = PerExampleNorms(model, param_groups=[rest, tied])
    _, totals = train_step(model, probe, ids, labels, cross_entropy)
    want = [sum(exact[n].sum() for n in probe.covered_names if n != "tok.weight"), exact["tok.weight"].sum()]
    torch.testing.assert_close(totals, torch.stack(want), rtol=RTOL, atol=0)


@pytest.mark.parametrize("padding_idx", [None, 3])
def test_rows_break_the_sum_down_per_module_with_the_tied_cross_term(padding_idx):
    """The per-module breakdown (bsmon/probe/modules.py rows): each row's sum is its parameters'
    exact per-example squared norms, the tied weight's cross term in its row, and the rows add
    up to the groups."""
    model = TinyLM(tied=True, padding_idx=padding_idx)
    model.block.self_attn.requires_grad_(False)  # applied functionally: uncovered
    ids, labels = lm_batch(batch=5, positions=7)
    ids[0, :3] = 3
    exact = exact_sq_norms(model, ids, labels, cross_entropy)
    trainable = [p for p in model.parameters() if p.requires_grad]
    names = {id(p): name for name, p in model.named_parameters()}
    weights = [p for p in trainable if p.dim() > 1]
    groups = [weights, [p for p in trainable if p.dim() == 1]]
    row_labels, row_of, _ = module_partition(model, trainable, limit=4)
    rows = [[p for p, r in zip(trainable, row_of) if r == k] for k in range(len(row_labels))]
    probe = PerExampleNorms(model, param_groups=groups, rows=rows)
    assert probe.covered_fraction == 1.0 and probe.n_rows == len(row_labels) == 4
    _, totals = train_step(model, probe, ids, labels, cross_entropy)
    want = torch.stack([sum(exact[names[id(p)]].sum() for p in row) for row in rows])
    torch.testing.assert_close(probe.per_row, want, rtol=RTOL, atol=0)
    torch.testing.assert_close(probe.per_row.sum(), totals.sum(), rtol=RTOL, atol=0)
    # Without the cross term the tied weight's row would be off: check the test can tell.
    cross_free = PerExampleNorms(model, param_groups=groups, rows=rows)
    for tie in cross_free._ties:
        tie.backward = lambda tap, delta, scale=None: None
    train_step(model, cross_free, ids, labels, cross_entropy)
    tied_row = row_of[next(i for i, p in enumerate(trainable) if p is model.tok.weight)]
    assert not torch.allclose(cross_free.per_row[tied_row], want[tied_row], rtol=1e-3)


def test_rows_must_hold_every_covered_parameter():
    model = mlp()
    with pytest.raises(ValueError, match="rows must hold every covered parameter; 2.weight"):
        PerExampleNorms(model, rows=[[model[0].weight, model[0].bias]])
    with pytest.raises(ValueError, match="both rows"):
        PerExampleNorms(model, rows=[[model[0].weight], [model[0].weight]])


def test_tied_embedding_when_the_head_sees_one_position():
    """The output projection applied to the last position only (a classifier over the vocabulary)."""

    class LastToken(TinyLM):
        def forward(self, ids):
            return self.head(self.norm(self.block(self.tok(ids))[:, -1]))

    model = LastToken(tied=True)
    ids, labels = torch.randint(0, 11, (4, 6)), torch.randint(0, 11, (4,))
    exact = exact_sq_norms(model, ids, labels, cross_entropy)
    assert_step_matches(model, PerExampleNorms(model), ids, labels, cross_entropy, exact)


class HeadTwice(TinyLM):
    def forward(self, ids):
        return super().forward(ids) + self.head(torch.ones(*ids.shape, 8))


def test_tied_weight_is_excluded_with_its_partner():
    model = HeadTwice(tied=True)
    ids, labels = lm_batch()
    exact = exact_sq_norms(model, ids, labels, cross_entropy)
    probe = PerExampleNorms(model)
    assert train_step(model, probe, ids, labels, cross_entropy) is None  # head called twice
    assert "called more than once" in probe.uncovered["head.bias"]
    assert "tied with head.weight, which is excluded" in probe.uncovered["tok.weight"]
    assert "tok.weight" not in probe.covered_names
    assert_step_matches(model, probe, ids, labels, cross_entropy, exact)


def test_position_table_looked_up_with_ids_of_batch_size_one_is_covered():
    model = TinyLM(position_embedding=True)
    model.position_ids_2d = True
    ids, labels = lm_batch(batch=4, positions=6)
    exact = exact_sq_norms(model, ids, labels, cross_entropy)
    probe = PerExampleNorms(model)
    assert_step_matches(model, probe, ids, labels, cross_entropy, exact)
    assert "pos.weight" in probe.covered_names and "pos.weight" not in probe.uncovered
    # The expanded output is a view: the forward's values and the table's gradient are unchanged.
    probe.remove()
    model.zero_grad(set_to_none=True)
    cross_entropy(model(ids), labels).backward()
    unhooked = model.pos.weight.grad.clone()
    probe = PerExampleNorms(model)
    train_step(model, probe, ids, labels, cross_entropy)
    torch.testing.assert_close(model.pos.weight.grad, unhooked, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("eps", [None, 1e-3])
def test_rms_norm(eps):
    model = nn.Sequential(nn.Linear(6, 6), nn.RMSNorm(6, eps=eps), nn.Linear(6, 2))
    nn.init.normal_(model[1].weight)
    x, target = torch.randn(5, 4, 6), torch.randn(5, 4, 2)
    exact = exact_sq_norms(model, x, target, squared_error)
    probe = PerExampleNorms(model)
    assert probe.covered_fraction == 1.0
    assert_step_matches(model, probe, x, target, squared_error, exact)


def gpt2(**overrides):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
        attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, bos_token_id=0, eos_token_id=0, **overrides,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def gpt2_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_gpt2_is_covered_whole_and_exactly():
    """Conv1D, the tied wte/lm_head, the wpe position table and LayerNorm: every parameter."""
    model = gpt2()
    ids = torch.randint(0, 64, (4, 12))
    exact = exact_sq_norms_by_loop(model, ids, gpt2_loss)
    probe = PerExampleNorms(model)
    assert probe.uncovered == {} and probe.covered_fraction == 1.0
    model.zero_grad(set_to_none=True)
    gpt2_loss(model, ids).backward()  # a mean over the batch's tokens: each example's carries 1/B
    batch, totals = probe.pop()
    assert batch == 4
    torch.testing.assert_close(totals.sum() * batch**2, covered_total(exact, probe), rtol=RTOL, atol=0)


def test_conv1d_of_transformers_is_a_layer_type_of_its_own():
    transformers = pytest.importorskip("transformers")
    layer = transformers.pytorch_utils.Conv1D(5, 3)  # nf=5 outputs, nx=3 inputs: weight (3, 5)
    nn.init.normal_(layer.bias)
    x, target = torch.randn(4, 6, 3), torch.randn(4, 6, 5)
    exact = exact_sq_norms(layer, x, target, squared_error)
    probe = PerExampleNorms(layer, layers=(transformers.pytorch_utils.Conv1D,))
    assert probe.covered_names == ["weight", "bias"]
    assert_step_matches(layer, probe, x, target, squared_error, exact)
    assert PerExampleNorms(layer, layers=(nn.Linear,)).uncovered["weight"] == "layer Conv1D not in the chosen layer set"


# ---- modules that mix the samples of a batch ------------------------------------------------


def bn_mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, affine=False), nn.ReLU(), nn.Linear(8, 3))


def test_batch_norm_in_training_mode_gives_no_per_example_norms():
    model = bn_mlp()
    x, labels = torch.randn(7, 6), torch.randint(0, 3, (7,))
    probe = PerExampleNorms(model)
    assert probe.covered_fraction == 1.0  # affine=False: nothing to cover, and still wrong to use
    assert probe.mixing_now() == "1 (BatchNorm1d)"
    assert train_step(model, probe, x, labels, cross_entropy) is None
    assert probe.mixed_by == "1 (BatchNorm1d)"
    assert "BatchNorm1d mixes the samples of the batch" in probe.skip_reason
    model[1].eval()  # running statistics: each example's output is its own again
    assert probe.mixing_now() is None
    probe.active = False  # torch.func's forwards are not training steps
    exact = exact_sq_norms(model, x, labels, cross_entropy)
    probe.active = True
    assert_step_matches(model, probe, x, labels, cross_entropy, exact)
    assert probe.mixed_by is None


class InBatchNegatives(nn.Module):
    def forward(self, h):
        return h @ h.T  # each row scores against every example of the batch


def test_declared_sample_mixing_module():
    model = nn.Sequential(nn.Linear(6, 8), InBatchNegatives())
    probe = PerExampleNorms(model, mixes_samples=(InBatchNegatives,))
    x = torch.randn(5, 6)
    assert train_step(model, probe, x, torch.arange(5), cross_entropy) is None
    assert probe.mixed_by == "1 (InBatchNegatives)"
    with pytest.raises(TypeError, match="mixes_samples must be a tuple of nn.Module subclasses"):
        PerExampleNorms(model, mixes_samples=InBatchNegatives)


# ---- norms in the optimizer's geometry (B_pre) ----------------------------------------------


def random_scales(model, seed=1):
    """A stand-in for Adam's P^2 per parameter: positive, spread over two orders of magnitude."""
    gen = torch.Generator().manual_seed(seed)
    return {id(p): 10 ** (2 * torch.rand(p.shape, generator=gen) - 1) for p in model.parameters()}


def rescaling(model, scales):
    """PerExampleNorms' ``rescale``: P^2 of the parameters asked for."""
    return lambda params: [scales[id(p)] for p in params]


def exact_rescaled_sum(model, per_example_grads, scales, names):
    """sum_i |P * g_i|^2 over the named parameters, from exact per-example gradients."""
    params = dict(model.named_parameters())
    return sum((per_example_grads[name].square() * scales[id(params[name])]).sum() for name in names)


def exact_grads(model, x, target, loss_fn):
    params = {name: p.detach() for name, p in model.named_parameters()}

    def example_loss(params, x_i, target_i):
        return loss_fn(functional_call(model, params, (x_i.unsqueeze(0),)), target_i.unsqueeze(0))

    return vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, target)


def assert_rescaled_matches(model, x, target, loss_fn):
    """Both the plain and the rescaled per-example norms of one step match the exact ones."""
    per_example_grads = exact_grads(model, x, target, loss_fn)
    scales = random_scales(model)
    probe = PerExampleNorms(model, rescale=rescaling(model, scales))
    exact_plain = {name: g.flatten(1).square().sum(1) for name, g in per_example_grads.items()}
    assert_step_matches(model, probe, x, target, loss_fn, exact_plain)  # the plain norms stay exact
    train_step(model, probe, x, target, loss_fn)
    assert probe.rescaled is not None, probe.rescaled_reason
    want = exact_rescaled_sum(model, per_example_grads, scales, probe.covered_names)
    torch.testing.assert_close(probe.rescaled, want, rtol=RTOL, atol=0)
    return probe


@pytest.mark.parametrize("shape", [(6, 12), (4, 5, 12), (3, 2, 4, 12)])
def test_rescaled_norms_of_linear_layers_with_and_without_a_sequence(shape):
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 2))
    x = torch.randn(shape)
    assert_rescaled_matches(model, x, torch.randn(*shape[:-1], 2), squared_error)


def test_rescaled_norms_of_a_bias_whose_weight_is_frozen():
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 2))
    model[2].weight.requires_grad_(False)
    assert_rescaled_matches(model, torch.randn(6, 12), torch.randn(6, 2), squared_error)


def test_rescaled_norms_materialise_in_chunks(monkeypatch):
    import bsmon.probe.per_example as per_example

    monkeypatch.setattr(per_example, "MATERIALISE_ELEMENTS", 12 * 16 * 2)  # two examples at a time
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 2))
    assert_rescaled_matches(model, torch.randn(5, 3, 12), torch.randn(5, 3, 2), squared_error)


def test_rescaled_norms_of_a_conv_net_with_groups():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding="same", groups=2, bias=False), nn.ReLU(),
        nn.Flatten(1, 2), nn.Conv1d(4 * 4, 6, 2, groups=2), nn.Flatten(), nn.Linear(18, 3),
    )
    x, labels = torch.randn(5, 3, 8, 8), torch.randint(0, 3, (5,))
    assert_rescaled_matches(model, x, labels, cross_entropy)


def test_rescaled_norms_of_norm_layers():
    model = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.RMSNorm(6), nn.Linear(6, 2))
    nn.init.normal_(model[1].weight)
    nn.init.normal_(model[1].bias)
    nn.init.normal_(model[2].weight)
    assert_rescaled_matches(model, torch.randn(5, 4, 6), torch.randn(5, 4, 2), squared_error)


@pytest.mark.parametrize("padding_idx", [None, 3])
def test_rescaled_norms_of_embeddings_and_the_tied_cross_term(padding_idx):
    model = TinyLM(tied=True, padding_idx=padding_idx, position_embedding=True)
    model.position_ids_2d = True  # a shared lookup, expanded to the batch
    model.block = nn.Identity()  # MultiheadAttention is not covered; the rest is, tie included
    ids, labels = lm_batch(batch=5, positions=7)
    ids[0, :3] = 3
    probe = assert_rescaled_matches(model, ids, labels, cross_entropy)
    assert probe.covered_fraction == 1.0 and probe._ties


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_rescaled_norms_of_gpt2_whole_and_exact():
    model = gpt2()
    ids = torch.randint(0, 64, (3, 10))
    per_example = {name: [] for name, _ in model.named_parameters()}
    for i in range(ids.shape[0]):
        model.zero_grad(set_to_none=True)
        gpt2_loss(model, ids[i:i + 1]).backward()
        for name, param in model.named_parameters():
            per_example[name].append(param.grad.clone())
    per_example = {name: torch.stack(g) for name, g in per_example.items()}
    scales = random_scales(model)
    probe = PerExampleNorms(model, rescale=rescaling(model, scales))
    model.zero_grad(set_to_none=True)
    gpt2_loss(model, ids).backward()  # a mean over the batch: each example's gradient carries 1/B
    batch, _ = probe.pop()
    assert probe.covered_fraction == 1.0
    want = exact_rescaled_sum(model, per_example, scales, probe.covered_names)
    torch.testing.assert_close(probe.rescaled * batch**2, want, rtol=RTOL, atol=0)


def test_no_second_moment_for_a_layer_gives_no_rescaled_norms_and_says_which():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    scales = random_scales(model)
    missing = model[2].weight

    def rescale(params):
        return None if any(p is missing for p in params) else [scales[id(p)] for p in params]

    probe = PerExampleNorms(model, rescale=rescale)
    x, target = torch.randn(5, 4), torch.randn(5, 2)
    assert train_step(model, probe, x, target, squared_error) is not None  # the plain norms are kept
    assert probe.rescaled is None and "2.weight" in probe.rescaled_reason
    missing = None
    train_step(model, probe, x, target, squared_error)
    assert probe.rescaled is not None and probe.rescaled_reason is None
