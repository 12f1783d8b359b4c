"""Per-example squared gradient norms, computed inside the training step's backward pass.

For a loss that is a sum (or a mean) of per-example losses, the backward pass through a
layer hands us delta = dL/d(output). Each example's gradient for that layer's parameters
is a function of its own input x_i and delta_i alone, so its squared norm can be had
without forming per-example gradients for the whole model. ``PerExampleNorms`` adds a
forward hook to every supported layer that keeps the input (or something smaller derived
from it) and hooks the output's gradient; when that gradient arrives it computes the
per-example squared norms, which ``pop()`` sums per optimizer group, on the device.

Scale: with a loss of c * sum_i loss_i (c = 1 for a sum, 1/B for a mean, times any AMP loss
scale) the hooks see c * grad loss_i, so ``pop()`` returns S = c^2 sum_i |grad loss_i|^2,
while the squared norm N of the covered ``.grad`` is c^2 |sum_i grad loss_i|^2. The
noise-scale inputs |G_small|^2 (B_small = 1) and |G_big|^2 (B_big = B) are S/B and N/B^2 up to
the same factor c^2, which cancels in B_simple.

Assumptions, each checked where it can be:
- The loss is a sum (or mean) of per-example losses: no example's output depends on another's.
  BatchNorm in training mode breaks that, as do modules the caller declares in
  ``mixes_samples`` (in-batch negatives, say); a step in which one runs gives None
  (``mixed_by`` names it). A contrastive loss computed outside any module cannot be detected.
- Dimension 0 of every covered layer's input indexes examples. A layer whose dimension 0
  differs from that of the model's first tensor input, or an ``nn.Embedding`` given 1-d ids
  while that input has more dimensions, is excluded at run time; ``nn.Transformer*Layer
  (batch_first=False)`` is excluded up front. A layout that is sequence-first throughout, with
  the sequence as long as the batch, cannot be told apart. An ``nn.Embedding`` looked up with
  ids whose dimension 0 is 1 (GPT-2's ``wpe(position_ids)``, position_ids (1, T)) is a table
  shared by the batch: its output is expanded to the batch (a view), which is exact when the
  output is used by broadcasting over the batch, as position tables are; code that indexes that
  output along dimension 0 would make the split wrong and cannot be detected.
- One training forward of ``model`` and one backward per ``pop()``. Several backward
  passes, several forwards feeding one backward, or covered layers running outside
  ``model``'s forward (such as recomputation by activation checkpointing) make ``pop()``
  return None. Under ``torch.compile`` the hooks are traced away (``compiled`` says so).
- A covered parameter gets its gradient only through its own layer's forward, once. The one
  exception is a weight shared by an ``nn.Embedding`` and an ``nn.Linear`` (tied input and
  output embeddings), whose cross term is computed exactly (``_Tie``); other tied weights and
  layers registered in several places are excluded up front. A layer called twice in one
  forward, or whose parameters get gradients without its forward being seen (used
  functionally, as ``MultiheadAttention`` uses ``out_proj``), is excluded at run time, with
  its tied partner. Using a covered layer's weight functionally *in addition to* calling the
  layer cannot be detected.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Whether dynamo is tracing the caller (torch >= 2.3; older versions run the hooks as before).
is_compiling: Callable[[], bool] = getattr(torch.compiler, "is_compiling", lambda: False)

__all__ = [
    "LAYER_SETS",
    "PerExampleNorms",
    "conv_sq_norms",
    "embedding_sq_norms",
    "layer_norm_sq_norms",
    "linear_sq_norms",
    "prefer_gram",
]


def _float(t: Tensor) -> Tensor:
    """t in at least float32, so bf16/fp16 activations under autocast keep precision in the sums."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _rows_sq(t: Tensor) -> Tensor:
    """Squared norm of each t[n], in one fused reduction (no copy of a strided t); returns (N,)."""
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim()))).square()


def prefer_gram(positions: int, in_features: int, out_features: int) -> bool:
    """Whether the Gram form is cheaper than materialising the per-example gradient.

    Per example, the Gram form costs about positions^2 * (in + out) multiply-adds and the
    materialised gradient positions * in * out.
    """
    return positions * (in_features + out_features) < in_features * out_features


#: Elements of materialised per-example gradients held at once, for the norms in the optimizer's
#: geometry of a layer with a sequence (or spatial) dimension: 64 MiB in float32.
MATERIALISE_ELEMENTS = 1 << 24


def _materialised_sq(x: Tensor, delta: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """(|G_n|^2, sum scale * G_n^2) of each example's gradient G_n = x_n^T delta_n.

    x (N, ..., T, a), delta (N, ..., T, b), scale broadcastable to (..., a, b): the optimizer's
    P^2. The rescaling is elementwise, so it does not factor through the Gram form: each
    G_n is formed, a chunk of examples at a time (MATERIALISE_ELEMENTS), at about the cost of
    the layer's own weight gradient.
    """
    per_example = math.prod(x.shape[1:-2]) * x.shape[-1] * delta.shape[-1]
    chunk = max(1, MATERIALISE_ELEMENTS // max(per_example, 1))
    plain, rescaled = [], []
    for start in range(0, x.shape[0], chunk):
        g = x[start:start + chunk].mT @ delta[start:start + chunk]
        plain.append(_rows_sq(g))
        rescaled.append(g.square_().mul_(scale).flatten(1).sum(1))
    return torch.cat(plain), torch.cat(rescaled)


def _weight_sq(x: Tensor, delta: Tensor, gram: bool | None) -> Tensor:
    """|x_n^T delta_n|_F^2 for x (N, T, in) and delta (N, T, out); returns (N,)."""
    if gram is None:
        gram = prefer_gram(x.shape[1], x.shape[2], delta.shape[2])
    if gram:  # sum_{t,s} (x_t . x_s)(delta_t . delta_s)
        return (x @ x.mT).mul_(delta @ delta.mT).sum((1, 2))
    return _rows_sq(x.mT @ delta)


# Each layer's norms come in two halves. ``prepare`` runs in the forward hook and returns
# what the backward will need: the input itself, or something smaller computed while the
# input is still in cache (``rescale``: the backward will also need the rescaled norms).
# ``finish`` runs when delta arrives and returns the per-example squared norms, a (B,) tensor
# per requested parameter, weight before bias; given ``scales`` (the optimizer's P^2 of each
# requested parameter, shaped like it) the norms of the rescaled gradients P * g_i follow, in
# the same order. Both get tensors detached from the graph, so nothing they do is recorded by
# autograd.


def _keep_input(module: nn.Module, x: Tensor, weight: bool, rescale: bool = False) -> Tensor | None:
    return x if weight else None  # a bias's norms need delta alone


def _linear_prepare(module: nn.Linear | None, x: Tensor, weight: bool, rescale: bool = False) -> Tensor | None:
    """A non-sequence input (B, in) is reduced to |x_i|^2 at once, unless the rescaled norms need
    its elements; a sequence input is kept."""
    if not weight:
        return None
    return _rows_sq(_float(x)) if x.dim() == 2 and not rescale else x


def _in_out(module: nn.Module | None, scale: Tensor) -> Tensor:
    """A linear weight's P^2 as (in, out): nn.Linear stores (out, in), transformers' Conv1D (in, out)."""
    return scale.T if isinstance(module, nn.Linear) else scale


def _linear_finish(
    module: nn.Linear | None, kept: Tensor | None, delta: Tensor, weight: bool, bias: bool,
    gram: bool | None = None, scales: list[Tensor] | None = None,
) -> list[Tensor]:
    columns, rescaled = [], []
    if delta.dim() == 2:  # |x_i|^2 |delta_i|^2, and the bias's |delta_i|^2
        delta = _float(delta)
        if scales is not None:  # sum_{k,o} x_ik^2 P^2_ko delta_io^2: one matmul-shaped pass
            delta_sq = delta.square()
            if weight:
                x_sq = _float(kept).square()
                columns.append(x_sq.sum(1) * delta_sq.sum(1))
                rescaled.append((x_sq @ _in_out(module, scales[0])).mul_(delta_sq).sum(1))
            if bias:
                columns.append(delta_sq.sum(1))
                rescaled.append(delta_sq @ scales[-1])
            return columns + rescaled
        delta_sq = _rows_sq(delta)
        if weight:  # kept is |x_i|^2, or x itself where rescaled norms were expected
            columns.append((kept if kept.dim() == 1 else _rows_sq(_float(kept))) * delta_sq)
        if bias:
            columns.append(delta_sq)
        return columns
    batch = delta.shape[0]
    delta = _float(delta.reshape(batch, -1, delta.shape[-1]))
    if weight:
        x = _float(kept.reshape(batch, -1, kept.shape[-1]))
        if scales is None:
            columns.append(_weight_sq(x, delta, gram))
        else:
            plain, pre = _materialised_sq(x, delta, _in_out(module, scales[0]))
            columns.append(plain)
            rescaled.append(pre)
    if bias:
        summed = delta.sum(1)
        columns.append(_rows_sq(summed))
        if scales is not None:
            rescaled.append(summed.square() @ scales[-1])
    return columns + rescaled


_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def _conv_pads(module: nn.Conv1d | nn.Conv2d) -> list[tuple[int, int]]:
    """(left, right) padding of each spatial dimension, as the convolution applies it."""
    if module.padding == "valid":
        return [(0, 0)] * len(module.kernel_size)
    if module.padding == "same":
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        return [(total // 2, total - total // 2) for total in totals]
    return [(p, p) for p in module.padding]


def _grouped_patches(module: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """What each output position sees: (B * groups, positions, in_channels / groups * kernel size).

    Unfolded this way, each group of the convolution is a linear layer applied at every
    output position.
    """
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    pads = _conv_pads(module)
    if len(kernel) == 1:  # a 1-d convolution is a 2-d one over images of height 1
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
        pads = [(0, 0), *pads]
    if module.padding_mode == "zeros" and all(left == right for left, right in pads):
        unfold_padding = tuple(left for left, _ in pads)
    else:
        flat = [p for pair in reversed(pads) for p in pair]  # F.pad wants the last dimension first
        x = F.pad(x, flat, mode=_PAD_MODES[module.padding_mode])
        unfold_padding = 0
    patches = F.unfold(x, kernel, dilation=dilation, padding=unfold_padding, stride=stride)
    return patches.reshape(x.shape[0] * module.groups, -1, patches.shape[-1]).mT


def _conv_finish(
    module: nn.Conv1d | nn.Conv2d, x: Tensor | None, delta: Tensor, weight: bool, bias: bool,
    gram: bool | None = None, scales: list[Tensor] | None = None,
) -> list[Tensor]:
    batch, groups = delta.shape[0], module.groups
    delta = _float(delta.reshape(batch, module.out_channels, -1))
    columns, rescaled = [], []
    if weight:
        patches = _grouped_patches(module, _float(x))
        per_group_delta = delta.reshape(batch * groups, -1, delta.shape[-1]).mT
        if scales is None:
            columns.append(_weight_sq(patches, per_group_delta, gram).view(batch, groups).sum(1))
        else:  # the weight (out, in/groups, *kernel) as each group's (in/groups * kernel, out/groups)
            scale = scales[0].reshape(groups, module.out_channels // groups, -1).mT
            plain, pre = _materialised_sq(patches.reshape(batch, groups, *patches.shape[1:]),
                                          per_group_delta.reshape(batch, groups, *per_group_delta.shape[1:]), scale)
            columns.append(plain)
            rescaled.append(pre)
    if bias:
        summed = delta.sum(2)
        columns.append(_rows_sq(summed))
        if scales is not None:
            rescaled.append(summed.square() @ scales[-1])
    return columns + rescaled


def _norm_columns(
    x_hat: Tensor, delta: Tensor, features: int, weight: bool, bias: bool, scales: list[Tensor] | None
) -> list[Tensor]:
    """An elementwise affine after a normalisation: the weight's per-example gradient is the sum
    over positions of delta * x_hat, the bias's the sum of delta (both (B, features), so the
    rescaled norms are one more elementwise product)."""
    batch = delta.shape[0]
    delta = _float(delta).reshape(batch, -1, features)
    gradients = []
    if weight:
        gradients.append(x_hat.reshape(batch, -1, features).mul_(delta).sum(1))
    if bias:
        gradients.append(delta.sum(1))
    columns = [_rows_sq(g) for g in gradients]
    if scales is not None:
        columns += [g.square() @ scale.reshape(-1) for g, scale in zip(gradients, scales)]
    return columns


def _layer_norm_finish(
    module: nn.LayerNorm, x: Tensor | None, delta: Tensor, weight: bool, bias: bool,
    scales: list[Tensor] | None = None,
) -> list[Tensor]:
    """x_hat, the normalised input, is recomputed with the layer's eps here rather than kept
    from the forward: it would cost as much memory as the input, and the layer's own backward
    is about to read the same input.
    """
    x_hat = None
    if weight:
        x = _float(x)
        # A unit weight, rather than none, takes a faster CPU kernel (about 1.5x, torch 2.13).
        unit = torch.ones(module.normalized_shape, dtype=x.dtype, device=x.device)
        x_hat = F.layer_norm(x, module.normalized_shape, unit, eps=module.eps)
    return _norm_columns(x_hat, delta, math.prod(module.normalized_shape), weight, bias, scales)


def _rms_norm_finish(
    module: nn.Module, x: Tensor | None, delta: Tensor, weight: bool, bias: bool, scales: list[Tensor] | None = None
) -> list[Tensor]:
    """As LayerNorm, with x_hat = x / rms(x) (eps None: that of the input's dtype, as the layer does)."""
    x_hat = None
    if weight:
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        x_hat = F.rms_norm(_float(x), module.normalized_shape, eps=eps)
    return _norm_columns(x_hat, delta, math.prod(module.normalized_shape), weight, False, scales)


def _embedding_finish(
    module: nn.Embedding, ids: Tensor, delta: Tensor, weight: bool, bias: bool, scales: list[Tensor] | None = None
) -> list[Tensor]:
    """Example i's gradient has a row per distinct token id: the sum of delta where it occurs.

    Sorting each example's ids numbers those rows in O(T log T), against the O(T^2) of
    comparing every pair of positions. Rows of ``padding_idx`` get no gradient: their
    positions are summed into a spare last row, which is left out.
    """
    batch = ids.shape[0]
    ids = ids.reshape(batch, -1)
    positions = ids.shape[1]
    delta = _float(delta).reshape(batch, positions, -1)
    sorted_ids, order = ids.sort(1)
    # Row numbers in sorted order: 0 for the first id, one more at each new id.
    row_of_sorted = F.pad((sorted_ids.diff(dim=1) != 0).cumsum(1), (1, 0))
    row_of_position = torch.empty_like(row_of_sorted).scatter_(1, order, row_of_sorted)
    if module.padding_idx is not None:
        row_of_position.masked_fill_(ids == module.padding_idx, positions)
    # One table of rows for the whole batch: index_add_ over whole rows is much faster than
    # scatter_add_ over elements.
    first_row = torch.arange(0, batch * (positions + 1), positions + 1, device=ids.device)
    row_of_position += first_row.unsqueeze(1)
    rows = delta.new_zeros(batch * (positions + 1), delta.shape[-1])
    rows.index_add_(0, row_of_position.flatten(), delta.reshape(batch * positions, -1))
    columns = [_rows_sq(rows.view(batch, positions + 1, -1)[:, :positions])]
    if scales is not None:  # each row weighted by P^2 of its token id's row of the table
        id_of_row = ids.new_zeros(batch * (positions + 1)).index_put_((row_of_position.flatten(),), ids.flatten())
        weighted = rows.square_().mul_(scales[0][id_of_row]).view(batch, positions + 1, -1)
        columns.append(weighted[:, :positions].sum((1, 2)))
    return columns


@dataclass(frozen=True)
class _Recipe:
    """How one supported layer type gets its per-example squared norms."""

    prepare: Callable[..., object]  # (module, input, weight, rescale) -> kept for the backward
    finish: Callable[..., list[Tensor]]  # (module, kept, delta, weight, bias, scales=) -> k (or 2k) tensors (B,)
    batched_dims: Callable[[nn.Module], int]  # input dimensions of a batched call
    #: A call whose input has dimension 0 of size 1 while the batch is larger is a lookup shared
    #: by the batch (a position table): its output is expanded to the batch, a view that leaves
    #: the forward's values and the parameter's gradient unchanged, so that each example's delta
    #: reaches the hook instead of their sum.
    shared_lookup: bool = False


#: The one place a layer type is added: keyed by the class or, for a library the probe does not
#: import, the class's qualified name. A subclass counts when it keeps the class's forward.
_SUPPORTED: dict[type[nn.Module] | str, _Recipe] = {
    nn.Linear: _Recipe(_linear_prepare, _linear_finish, lambda m: 2),
    # Hugging Face's GPT-2-family Conv1D is a linear layer with a transposed weight,
    # y = x @ W + b with W (in, out): |x_i^T delta_i|_F is the same either way round.
    "transformers.pytorch_utils.Conv1D": _Recipe(_linear_prepare, _linear_finish, lambda m: 2),
    nn.Conv1d: _Recipe(_keep_input, _conv_finish, lambda m: 3),
    nn.Conv2d: _Recipe(_keep_input, _conv_finish, lambda m: 4),
    nn.LayerNorm: _Recipe(_keep_input, _layer_norm_finish, lambda m: len(m.normalized_shape) + 1),
    nn.Embedding: _Recipe(_keep_input, _embedding_finish, lambda m: 1, shared_lookup=True),
}
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    _SUPPORTED[nn.RMSNorm] = _Recipe(_keep_input, _rms_norm_finish, lambda m: len(m.normalized_shape) + 1)

LAYER_SETS: dict[str, tuple[type[nn.Module] | str, ...]] = {
    "all": tuple(_SUPPORTED),
    # The cheap choice: Gray et al. report that LayerNorm parameters alone track a transformer's
    # noise scale. watch() shows a number from it only where it covers every trainable parameter.
    "norm_embed": tuple(k for k in (nn.LayerNorm, getattr(nn, "RMSNorm", None), nn.Embedding) if k is not None),
}

#: Modules that mix the samples of a batch in a training forward, besides those the user declares.
SAMPLE_MIXING: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)  # BatchNorm*d, SyncBatchNorm


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _key_name(key: type | str) -> str:
    return key.__name__ if isinstance(key, type) else key.rsplit(".", 1)[-1]


def _sq_norms(
    kind: type[nn.Module], module: nn.Module | None, x: Tensor, delta: Tensor, weight: bool, bias: bool,
    **options,
) -> Tensor:
    recipe = _SUPPORTED[kind]
    x, delta = x.detach(), delta.detach()
    kept = recipe.prepare(module, x, weight)
    return torch.stack(recipe.finish(module, kept, delta, weight, bias, **options), 1)


def linear_sq_norms(
    x: Tensor, delta: Tensor, *, weight: bool = True, bias: bool = True, gram: bool | None = None
) -> Tensor:
    """Per-example squared gradient norms of an ``nn.Linear``'s weight and bias.

    x is the layer's input (B, ..., in) and delta the gradient of the loss with respect to its
    output (B, ..., out). Returns (B, k): one column per requested parameter, weight first.
    For sequence inputs ``gram`` forces the Gram form (True) or the materialised per-example
    gradient (False); None picks the cheaper (``prefer_gram``).
    """
    return _sq_norms(nn.Linear, None, x, delta, weight, bias, gram=gram)


def conv_sq_norms(
    module: nn.Conv1d | nn.Conv2d, x: Tensor, delta: Tensor, *,
    weight: bool = True, bias: bool = True, gram: bool | None = None,
) -> Tensor:
    """Per-example squared gradient norms of a batched ``nn.Conv1d``/``nn.Conv2d``; as ``linear_sq_norms``."""
    return _sq_norms(type(module), module, x, delta, weight, bias, gram=gram)


def layer_norm_sq_norms(
    module: nn.LayerNorm, x: Tensor, delta: Tensor, *, weight: bool = True, bias: bool = True
) -> Tensor:
    """Per-example squared gradient norms of an ``nn.LayerNorm``'s weight and bias; returns (B, k)."""
    return _sq_norms(nn.LayerNorm, module, x, delta, weight, bias)


def embedding_sq_norms(module: nn.Embedding, ids: Tensor, delta: Tensor) -> Tensor:
    """Per-example squared gradient norms of an ``nn.Embedding``'s weight; returns (B, 1)."""
    return _sq_norms(nn.Embedding, module, ids, delta, True, False)


def _supported_key(module: nn.Module) -> type[nn.Module] | str | None:
    """The ``_SUPPORTED`` key ``module`` behaves as; a subclass counts only if it keeps the forward."""
    for cls in type(module).__mro__:
        key = cls if cls in _SUPPORTED else _qualified_name(cls)
        if key in _SUPPORTED:
            return key if type(module).forward is cls.forward else None
    return None


def _mixes_now(module: nn.Module) -> bool:
    """Whether ``module`` would mix the batch's samples if called now: BatchNorm uses batch
    statistics in training mode, or always when it keeps no running statistics."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.training or module.running_mean is None
    return module.training


@dataclass(eq=False)
class _Tap:
    """One covered layer: which of its parameters are covered, and their optimizer groups."""

    module: nn.Module
    recipe: _Recipe
    batched_dims: int
    param_names: list[str]  # qualified names, weight before bias
    params: list[nn.Parameter]
    groups: list[int]
    weight: nn.Parameter | None  # the layer's weight if covered
    bias: nn.Parameter | None
    rows: list[int]  # the breakdown row of each covered parameter (all 0 without one)
    handle: torch.utils.hooks.RemovableHandle | None = None
    generation: int = -1  # the forward of ``model`` this layer last ran in
    group_index: dict[tuple[torch.device, bool, bool, bool], Tensor] = field(default_factory=dict)
    tie: "_Tie | None" = None  # when its weight is shared with another tap

    def index_for(self, device: torch.device, weight: bool, bias: bool, rows: bool = False) -> Tensor:
        """Group (with ``rows``: breakdown row) of each computed column, cached per device so that
        a step copies nothing."""
        key = (device, weight, bias, rows)
        if key not in self.group_index:
            wanted = [weight] * (self.weight is not None) + [bias] * (self.bias is not None)
            values = [g for g, keep in zip(self.rows if rows else self.groups, wanted) if keep]
            self.group_index[key] = torch.tensor(values, dtype=torch.long).to(device)
        return self.group_index[key]


@dataclass(eq=False)
class _Tie:
    """A weight shared by an Embedding and a Linear: a language model's tied input embedding
    and output projection.

    Example i's gradient of the weight is the sum of its two uses, E_i + L_i, so its squared
    norm is |E_i|^2 + |L_i|^2 (each tap's own column) plus the cross term 2<E_i, L_i>. With
    ids t -> id_t and delta_e[t] at the embedding, and input x_s and delta Delta[s] (one entry
    per row of the weight) at the Linear,

        <E_i, L_i> = sum_t delta_e[t] . (sum_s Delta[s, id_t] x_s),

    positions with the padding id left out. The Linear's backward reduces Delta to the
    bracket, shaped like the embedding's output; whichever of the two backward passes comes
    second takes the dot product.
    """

    param: nn.Parameter
    embedding: _Tap
    linear: _Tap
    group: int
    row: int  # of the breakdown (0 without one)
    ids: Tensor | None = None  # this forward's lookups (B, T)
    mask: Tensor | None = None  # (B, T, 1), 0 at padding positions; None without padding_idx
    head_input: Tensor | None = None  # the Linear's input (B, S, d)
    half: Tensor | None = None  # the first backward's (B, T, d) factor
    group_index: dict[tuple[torch.device, bool], Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        self.ids = self.mask = self.head_input = self.half = None

    def partner(self, tap: _Tap) -> _Tap:
        return self.linear if tap is self.embedding else self.embedding

    def forward(self, tap: _Tap, x: Tensor) -> None:
        batch = x.shape[0]
        if tap is self.embedding:
            self.ids = x.reshape(batch, -1)
            padding = tap.module.padding_idx
            self.mask = None if padding is None else (self.ids != padding).unsqueeze(2)
        else:
            self.head_input = _float(x).reshape(batch, -1, x.shape[-1])

    def backward(self, tap: _Tap, delta: Tensor, scale: Tensor | None = None) -> list[Tensor] | None:
        """The cross term 2<E_i, L_i> (B,) once both backward passes have run, else None; given
        ``scale`` (the weight's P^2), then also 2<P E_i, P L_i>."""
        batch = delta.shape[0]
        if tap is self.embedding:
            factor = _float(delta).reshape(batch, -1, delta.shape[-1])
        elif self.ids is None or self.head_input is None:
            return None  # the embedding did not run in this forward: no cross term
        else:
            delta = _float(delta).reshape(batch, -1, delta.shape[-1])  # (B, S, rows)
            ids = self.ids.unsqueeze(1).expand(batch, delta.shape[1], self.ids.shape[1])
            factor = torch.gather(delta, 2, ids).mT @ self.head_input  # (B, T, d)
        if self.half is None:
            self.half = factor
            return None
        product = self.half * factor
        if self.mask is not None:
            product *= self.mask
        self.half = None
        cross = [2 * product.sum((1, 2))]
        if scale is not None:
            cross.append(2 * product.mul_(scale[self.ids]).sum((1, 2)))
        return cross

    def index_for(self, device: torch.device, rows: bool = False) -> Tensor:
        """The cross term's group (with ``rows``: breakdown row), as _Tap.index_for."""
        key = (device, rows)
        if key not in self.group_index:
            value = self.row if rows else self.group
            self.group_index[key] = torch.tensor([value], dtype=torch.long).to(device)
        return self.group_index[key]


class PerExampleNorms:
    """Sum over the batch of per-example squared gradient norms, per optimizer group.

    ``layers`` is a key of ``LAYER_SETS`` or a tuple of supported layer types. ``param_groups``
    lists the optimizer's groups (iterables of parameters, or the optimizer's own
    ``param_groups`` dicts) to break the sum down per group; None means one group. ``rows``, a
    second partition of the parameters in the same form (the per-module breakdown's rows,
    bsmon/probe/modules.py), makes ``pop()`` also leave ``per_row``: the sum per row, from the
    same per-parameter sums (one more index_add per step).
    ``mixes_samples`` names module types that, like BatchNorm in training mode, make one
    example's output depend on the others: a step in which one runs gives None (``mixed_by``
    says which), because per-example gradients of the loss do not exist there.
    Parameters frozen when this object is made are ignored; ones frozen later contribute
    nothing while frozen, matching their absent ``.grad``.

    ``rescale`` (the optimizer's geometry, bsmon/probe/precond.py) maps a list of parameters to
    their P^2 = 1/(sqrt(v_hat) + eps)^2, or None where the optimizer has no second moment for one
    yet. Given it, ``pop()`` also leaves ``rescaled``: sum_i |P * g_i|^2 over every covered
    parameter (or None, ``rescaled_reason`` saying why).

    After each step's backward, call ``pop()`` and take |.grad|^2 over ``covered_params``
    (``covered_groups`` holds each one's group). The covered set keeps its order and only
    ever shrinks, and only in a step whose ``pop()`` returns None; ``uncovered`` says why
    each other trainable parameter is left out.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | tuple[type[nn.Module], ...] = "all",
        param_groups: Sequence[Iterable[nn.Parameter] | Mapping] | None = None,
        mixes_samples: tuple[type[nn.Module], ...] = (),
        guard: Callable[[Callable], Callable] = lambda f: f,
        rescale: Callable[[list[nn.Parameter]], list[Tensor] | None] | None = None,
        rows: Sequence[Iterable[nn.Parameter]] | None = None,
    ) -> None:
        """``guard`` wraps every hook (bsmon/probe/guard.py)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        layer_types = _resolve_layers(layers)
        group_of, self.n_groups = _group_lookup(param_groups)
        row_of, n_rows = _group_lookup(rows, "rows")
        self.n_rows = 0 if row_of is None else n_rows
        mixing = SAMPLE_MIXING + _resolve_mixing(mixes_samples)
        self._mixers = [(name or type(m).__name__, m) for name, m in model.named_modules() if isinstance(m, mixing)]
        self.uncovered: dict[str, str] = {}
        self._taps: list[_Tap] = []
        self._ties: list[_Tie] = []
        self._trainable_numel = 0
        self._find_taps(model, layer_types, group_of, row_of)
        self._refresh_coverage()
        self.mixed_by: str | None = None  # the sample-mixing module that made the last pop() None
        #: The model's forward ran under torch.compile, which traces these hooks away.
        self.compiled = False

        self.skip_reason: str | None = None  # why the last pop() returned None
        self._rescale = rescale
        self.rescaled: Tensor | None = None  # the last pop()'s sum of |P * g_i|^2 (0-d), with ``rescale``
        self.rescaled_reason: str | None = None  # why it is None
        self.per_row: Tensor | None = None  # the last pop()'s sum_i |g_i|^2 per row, with ``rows``
        #: host seconds spent inside the hooks, for the probe's cost budget
        self.spent_s = 0.0
        self._model = model
        self._guard = guard
        self._removed = False
        self._generation = 0  # counts training forwards of ``model``
        self._in_forward = False
        self._forward_batch: int | None = None
        self._forward_ndim = 0  # dimensions of the model input the batch size was read from
        self._pending: list[list] = []  # what the current forward's layers keep for the backward
        self._start_step()
        self._handles: list = []
        self._active = False
        self.active = True

    @property
    def active(self) -> bool:
        """Whether the hooks are in place. The probe sets it False for steps it does not
        measure (its cost budget): the hooks are then removed, so such a step pays nothing."""
        return self._active

    @active.setter
    def active(self, value: bool) -> None:
        if value == self._active or self._removed:
            return
        self._active = value
        if not value:
            self._remove_hooks()
            return
        model = self._model
        guard = self._guard
        self._handles = [model.register_forward_pre_hook(guard(self._on_forward_start), with_kwargs=True)]
        self._handles += [m.register_forward_pre_hook(guard(partial(self._on_mixer_forward, name)))
                          for name, m in self._mixers]
        for tap in self._taps:
            hook = guard(partial(self._on_layer_forward, tap))
            tap.handle = tap.module.register_forward_hook(hook, with_kwargs=True)
        # Registered last so that, when ``model`` is itself a covered layer, its tap runs first.
        self._handles.append(model.register_forward_hook(guard(self._on_forward_end), always_call=True))

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for tap in self._taps:
            tap.handle.remove()

    # ---- set-up -------------------------------------------------------------------------

    def _find_taps(
        self, model: nn.Module, layer_types: tuple[type | str, ...], group_of: dict[int, int] | None,
        row_of: dict[int, int] | None,
    ) -> None:
        uses: dict[int, list[tuple[str, nn.Module, str]]] = {}  # every (name, module, local name) of a parameter
        for module_name, module in model.named_modules(remove_duplicate=False):
            for local_name, param in module.named_parameters(recurse=False):
                name = f"{module_name}.{local_name}" if module_name else local_name
                uses.setdefault(id(param), []).append((name, module, local_name))
        blocked = _blocked_modules(model)
        tied = {pid for pid, param_uses in uses.items() if _splittable_tie(param_uses, layer_types, blocked)}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if isinstance(param, nn.parameter.UninitializedParameter):
                raise ValueError(
                    f"Parameter {name} is not initialised yet (a lazy layer): "
                    "run one forward pass before creating PerExampleNorms."
                )
            self._trainable_numel += param.numel()
            if len(uses[id(param)]) > 1 and id(param) not in tied:
                shared_by = ", ".join(use[0] for use in uses[id(param)])
                self.uncovered[name] = (
                    f"tied weight, shared by {shared_by} (only an Embedding's weight tied to a Linear's is split exactly)"
                )
        for module_name, module in model.named_modules():
            key = _supported_key(module)
            covered: dict[str, nn.Parameter] = {}
            for local_name, param in module.named_parameters(recurse=False):
                name = f"{module_name}.{local_name}" if module_name else local_name
                if not param.requires_grad or (len(uses[id(param)]) > 1 and id(param) not in tied):
                    continue
                if key is None:
                    self.uncovered[name] = f"unsupported layer {type(module).__name__}"
                elif key not in layer_types:
                    self.uncovered[name] = f"layer {_key_name(key)} not in the chosen layer set"
                elif id(module) in blocked:
                    self.uncovered[name] = blocked[id(module)]
                elif group_of is not None and id(param) not in group_of:
                    self.uncovered[name] = "not in any of the given param_groups"
                else:
                    covered[name] = param
            if covered and row_of is not None and (missing := [n for n, p in covered.items() if id(p) not in row_of]):
                raise ValueError(f"rows must hold every covered parameter; {missing[0]} is in none of them.")
            if covered:
                recipe = _SUPPORTED[key]
                self._taps.append(
                    _Tap(
                        module=module,
                        recipe=recipe,
                        batched_dims=recipe.batched_dims(module),
                        param_names=list(covered),
                        params=list(covered.values()),
                        groups=[0 if group_of is None else group_of[id(p)] for p in covered.values()],
                        weight=next((p for p in covered.values() if p is module.weight), None),
                        bias=next((p for p in covered.values() if p is getattr(module, "bias", None)), None),
                        rows=[0 if row_of is None else row_of[id(p)] for p in covered.values()],
                    )
                )
        for pid in tied:
            sharing = [tap for tap in self._taps if tap.weight is not None and id(tap.weight) == pid]
            if not sharing:
                continue  # not covered (outside the param_groups, say)
            embedding, linear = sorted(sharing, key=lambda tap: not isinstance(tap.module, nn.Embedding))
            group = 0 if group_of is None else group_of[pid]
            tie = _Tie(param=embedding.weight, embedding=embedding, linear=linear, group=group,
                       row=embedding.rows[0])
            embedding.tie = linear.tie = tie
            self._ties.append(tie)

    def _refresh_coverage(self) -> None:
        unique = {}  # a tied weight is in two taps; it counts once, under its first name
        for tap in self._taps:
            for param, name, group in zip(tap.params, tap.param_names, tap.groups):
                unique.setdefault(id(param), (param, name, group))
        self.covered_params: list[nn.Parameter] = [param for param, _, _ in unique.values()]
        self.covered_names: list[str] = [name for _, name, _ in unique.values()]
        self.covered_groups: list[int] = [group for _, _, group in unique.values()]
        covered = sum(p.numel() for p in self.covered_params)
        self.covered_fraction: float = covered / self._trainable_numel if self._trainable_numel else 0.0

    def _exclude(self, tap: _Tap, reason: str) -> None:
        """Stop covering a layer found at run time to break the per-example assumptions."""
        if tap.handle is not None:
            tap.handle.remove()
        self._taps.remove(tap)
        for name in tap.param_names:
            self.uncovered[name] = reason
        tie, tap.tie = tap.tie, None
        if tie is not None:  # without both uses the tied weight's cross term is missing
            self._ties.remove(tie)
            partner = tie.partner(tap)
            partner.tie = None
            self._exclude(partner, f"tied with {tap.param_names[0]}, which is excluded: {reason}")
            return
        self._refresh_coverage()

    # ---- hooks ---------------------------------------------------------------------------

    def _start_step(self) -> None:
        self._columns: list[Tensor] = []  # per-example squared norms (B,), one per parameter
        self._rescaled_columns: list[Tensor] = []  # the same in the optimizer's geometry
        self._rescaled_invalid: str | None = None
        self._groups: list[Tensor] = []  # the group of each, a tensor per layer
        self._row_indices: list[Tensor] = []  # the breakdown row of each, a tensor per layer
        self._batch_size: int | None = None
        self._backward_generation: int | None = None
        self._backward_taps: set[int] = set()
        self._invalid: str | None = None
        self._mixer: str | None = None
        for tie in self._ties:
            tie.clear()

    def _invalidate(self, reason: str) -> None:
        if self._invalid is None:
            self._invalid = reason

    # Under torch.compile every hook below is traced as a no-op: tensor hooks and timing inside
    # a compiled graph would break it. Only the flag is set, a side effect dynamo replays.

    def _on_forward_start(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        if is_compiling():
            self.compiled = True
            return
        if not (model.training and torch.is_grad_enabled()):
            return
        self._generation += 1
        self._in_forward = True
        # The batch size: dimension 0 of the model's first tensor input, else of the first
        # covered layer's input.
        inputs = (*args, *kwargs.values())
        first = next((t for t in inputs if isinstance(t, Tensor) and t.dim() > 0), None)
        self._forward_batch = None if first is None else first.shape[0]
        self._forward_ndim = 0 if first is None else first.dim()
        for kept in self._pending:  # from a forward that never got its backward
            kept.clear()
        self._pending = []
        for tie in self._ties:
            tie.clear()

    def _on_mixer_forward(self, name: str, module: nn.Module, args: tuple) -> None:
        if not is_compiling() and self._in_forward and torch.is_grad_enabled() and _mixes_now(module):
            if self._mixer is None:
                self._mixer = f"{name} ({type(module).__name__})"
            self._invalidate(f"{name}: {type(module).__name__} mixes the samples of the batch")

    def mixing_now(self) -> str | None:
        """The first module that would mix the batch's samples in a training forward now, if any."""
        return next((f"{name} ({type(m).__name__})" for name, m in self._mixers if _mixes_now(m)), None)

    def _on_forward_end(self, model: nn.Module, args: tuple, output: object) -> None:
        if not is_compiling():
            self._in_forward = False

    def _on_layer_forward(
        self, tap: _Tap, module: nn.Module, args: tuple, kwargs: dict, output: object
    ) -> Tensor | None:
        if is_compiling():
            return None
        start = time.perf_counter()
        try:
            return self._layer_forward(tap, module, args, kwargs, output)
        finally:
            self.spent_s += time.perf_counter() - start

    def _layer_forward(
        self, tap: _Tap, module: nn.Module, args: tuple, kwargs: dict, output: object
    ) -> Tensor | None:
        """Keep what the backward needs and hook the output's gradient; returns a replacement
        output (a shared lookup expanded to the batch) or None."""
        if not (module.training and torch.is_grad_enabled()):
            return
        name = tap.param_names[0]  # for messages
        if not self._in_forward:
            self._invalidate(f"{name}: layer ran outside the model's forward")
            return
        if tap.generation == self._generation:
            self._exclude(tap, "layer called more than once per forward (per-example norms are not additive)")
            self._invalidate(f"{name}: layer called more than once per forward")
            return
        tap.generation = self._generation
        weight = tap.weight is not None and tap.weight.requires_grad
        bias = tap.bias is not None and tap.bias.requires_grad
        if not (weight or bias) or not isinstance(output, Tensor) or not output.requires_grad:
            return
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, Tensor) or x.dim() < tap.batched_dims:
            self._invalidate(f"{name}: input has no batch dimension")
            return
        batch = self._forward_batch
        if batch is None:
            batch = self._forward_batch = x.shape[0]
        replaced = None
        if tap.recipe.shared_lookup and x.dim() >= 2 and x.shape[0] == 1 < batch and output.shape[0] == 1:
            # ``wpe(position_ids)`` with position_ids (1, T), broadcast over the batch downstream
            x = x.expand(batch, *x.shape[1:])
            output = replaced = output.expand(batch, *output.shape[1:])
        reason = None
        if x.shape[0] != batch:
            reason = f"input dimension 0 is {x.shape[0]}, not the batch size {batch}"
        elif isinstance(module, nn.Embedding) and x.dim() == 1 and self._forward_ndim > 1:
            # Most likely ``wpe(arange(T))`` with T equal to the batch size: excluded on suspicion.
            reason = ("1-d ids while the model input has more dimensions: taken as one lookup shared by the "
                      "batch; look it up with ids of shape (1, T) to have it covered")
        if reason is not None:
            self._exclude(tap, reason + " (per-example norms need the batch in dimension 0)")
            self._invalidate(f"{name}: {reason}")
            return None
        x = x.detach()
        kept = [tap.recipe.prepare(module, x, weight, self._rescale is not None)]
        self._pending.append(kept)
        if tap.tie is not None:
            tap.tie.forward(tap, x)
        hook = partial(self._on_layer_backward, tap, kept, self._generation, x.shape[0], weight, bias)
        output.register_hook(self._guard(hook))
        return replaced

    def _on_layer_backward(
        self, tap: _Tap, kept: list, generation: int, batch_size: int, weight: bool, bias: bool, delta: Tensor
    ) -> None:
        start = time.perf_counter()
        try:
            self._layer_backward(tap, kept, generation, batch_size, weight, bias, delta)
        finally:
            self.spent_s += time.perf_counter() - start

    def _layer_backward(
        self, tap: _Tap, kept: list, generation: int, batch_size: int, weight: bool, bias: bool, delta: Tensor
    ) -> None:
        if self._removed:
            return
        if not kept:
            self._invalidate(f"{tap.param_names[0]}: backward of a stale forward, or a second backward")
            return
        prepared = kept.pop()  # from here on only this call holds what the forward kept
        if self._backward_generation is None:
            self._backward_generation = generation
            self._batch_size = batch_size
        elif generation != self._backward_generation:
            self._invalidate("several forwards or backward passes since the last pop()")
        self._backward_taps.add(id(tap))
        if self._invalid is not None:
            return
        if delta.requires_grad:  # a backward with create_graph=True
            delta = delta.detach()
        scales = self._scales(tap, weight, bias)
        columns = tap.recipe.finish(tap.module, prepared, delta, weight, bias, scales=scales)
        requested = weight + bias
        self._columns.extend(columns[:requested])
        self._rescaled_columns.extend(columns[requested:])
        if self.n_groups > 1:
            self._groups.append(tap.index_for(delta.device, weight, bias))
        if self.n_rows:
            self._row_indices.append(tap.index_for(delta.device, weight, bias, rows=True))
        cross = tap.tie.backward(tap, delta, scales and scales[0]) if tap.tie is not None and weight else None
        if cross is not None:
            self._columns.append(cross[0])
            self._rescaled_columns.extend(cross[1:])
            if self.n_groups > 1:
                self._groups.append(tap.tie.index_for(delta.device))
            if self.n_rows:
                self._row_indices.append(tap.tie.index_for(delta.device, rows=True))

    def _scales(self, tap: _Tap, weight: bool, bias: bool) -> list[Tensor] | None:
        """The optimizer's P^2 for the layer's requested parameters, or None (no rescaled norms)."""
        if self._rescale is None or self._rescaled_invalid is not None:
            return None
        params = [tap.weight] * weight + [tap.bias] * bias
        scales = self._rescale(params)
        if scales is not None:
            scales = [_float(scale) for scale in scales]
        if scales is None:
            self._rescaled_invalid = (f"the optimizer has no second moment for {tap.param_names[0]} yet "
                                      "(it appears with the parameter's first optimizer step)")
        return scales

    # ---- public --------------------------------------------------------------------------

    def pop(self) -> tuple[int, Tensor] | None:
        """(batch size, per-group sum_i |g_i|^2) accumulated since the last pop, or None.

        The tensor has shape (n_groups,), lives on the parameters' device, is at least
        float32, and is new each step. None when no backward ran, or when the step broke an
        assumption; ``skip_reason`` then says which. With ``rows``, ``per_row`` (n_rows,) holds
        the same sum per row, from the same per-parameter sums, so the rows add up to the groups.
        """
        columns, groups, batch_size = self._columns, self._groups, self._batch_size
        invalid, backward_taps, self.mixed_by = self._invalid, self._backward_taps, self._mixer
        rescaled, self.rescaled_reason = self._rescaled_columns, self._rescaled_invalid
        row_indices = self._row_indices
        self.rescaled = self.per_row = None
        self._start_step()
        if invalid is None and batch_size is not None:
            invalid = self._check_gradient_sources(backward_taps)
        if batch_size is None:
            invalid = invalid or ("the model ran under torch.compile, which traces the per-example hooks away"
                                  if self.compiled else "no backward pass since the last pop()")
        elif invalid is None and not columns:
            invalid = "no covered parameter needed a gradient"
        self.skip_reason = invalid
        if invalid is not None:
            return None
        if self._rescale is not None and self.rescaled_reason is None:
            self.rescaled = torch.cat(rescaled).sum()
        if self.n_groups == 1 and not self.n_rows:
            return batch_size, torch.cat(columns).sum(0, keepdim=True)
        per_param = torch.stack(columns).sum(1)
        if self.n_rows:
            self.per_row = per_param.new_zeros(self.n_rows).index_add_(0, torch.cat(row_indices), per_param)
        if self.n_groups == 1:
            return batch_size, per_param.sum(0, keepdim=True)
        return batch_size, per_param.new_zeros(self.n_groups).index_add_(0, torch.cat(groups), per_param)

    def _check_gradient_sources(self, backward_taps: set[int]) -> str | None:
        """Exclude layers whose parameters got gradients without their forward being seen."""
        def fed_elsewhere(tap: _Tap, param: nn.Parameter) -> bool:
            return tap.tie is not None and param is tap.tie.param and id(tap.tie.partner(tap)) in backward_taps

        silent = [
            tap for tap in self._taps
            if id(tap) not in backward_taps
            and any(p.grad is not None and not fed_elsewhere(tap, p) for p in tap.params)
        ]
        for tap in silent:
            if tap not in self._taps:
                continue  # excluded with its tied partner
            self._exclude(
                tap,
                "parameters got gradients while the layer's forward was not seen "
                "(used outside its forward, or run in eval mode)",
            )
        return f"{silent[0].param_names[0]}: gradient from outside the layer's forward" if silent else None

    def remove(self) -> None:
        """Remove every hook and drop what the hooks keep; safe to call more than once."""
        if self._removed:
            return
        self._removed = True
        self._remove_hooks()
        for kept in self._pending:
            kept.clear()
        self._pending = []
        self._start_step()


def _resolve_layers(layers: str | tuple[type[nn.Module], ...]) -> tuple[type[nn.Module] | str, ...]:
    """The ``_SUPPORTED`` keys of a layer set's name or a tuple of layer types."""
    if isinstance(layers, str):
        if layers not in LAYER_SETS:
            raise ValueError(
                f"layers={layers!r} is not a known set; use one of {sorted(LAYER_SETS)} or a tuple of layer types."
            )
        return LAYER_SETS[layers]
    if not isinstance(layers, tuple) or not layers:
        raise TypeError("layers must be a name from LAYER_SETS or a non-empty tuple of layer types.")
    keys = []
    for layer_type in layers:
        key = _qualified_name(layer_type) if isinstance(layer_type, type) and layer_type not in _SUPPORTED else layer_type
        if key not in _SUPPORTED:
            names = ", ".join(_key_name(k) for k in _SUPPORTED)
            raise ValueError(f"layers contains {layer_type!r}; the supported layer types are {names}.")
        keys.append(key)
    return tuple(keys)


def _resolve_mixing(mixes_samples: tuple[type[nn.Module], ...]) -> tuple[type[nn.Module], ...]:
    if not isinstance(mixes_samples, tuple) or not all(
        isinstance(t, type) and issubclass(t, nn.Module) for t in mixes_samples
    ):
        raise TypeError(
            f"mixes_samples must be a tuple of nn.Module subclasses (such as (MyBatchNorm,)); got {mixes_samples!r}."
        )
    return mixes_samples


def _splittable_tie(
    uses: list[tuple[str, nn.Module, str]], layer_types: tuple, blocked: dict[int, str]
) -> bool:
    """Whether a shared parameter is the weight of exactly one Embedding and one Linear, both covered."""
    if len(uses) != 2 or uses[0][1] is uses[1][1] or any(local != "weight" for _, _, local in uses):
        return False
    keys = {_supported_key(module) for _, module, _ in uses}
    return (
        keys == {nn.Embedding, nn.Linear}
        and all(key in layer_types for key in keys)
        and not any(id(module) in blocked for _, module, _ in uses)
    )


def _group_lookup(
    param_groups: Sequence[Iterable[nn.Parameter] | Mapping] | None, what: str = "param_groups",
) -> tuple[dict[int, int] | None, int]:
    """Map id(parameter) -> group index, and the number of groups; None for a single group.
    ``what`` names the argument in messages."""
    if param_groups is None:
        return None, 1
    if isinstance(param_groups, (str, Mapping)) or not isinstance(param_groups, Sequence) or not param_groups:
        raise TypeError(
            f"{what} must be a non-empty sequence of parameter iterables, such as optimizer.param_groups."
        )
    group_of: dict[int, int] = {}
    for index, group in enumerate(param_groups):
        for param in group["params"] if isinstance(group, Mapping) else group:
            if not isinstance(param, nn.Parameter):
                raise TypeError(
                    f"{what}[{index}] holds a {type(param).__name__}; each group must hold nn.Parameter objects."
                )
            if group_of.setdefault(id(param), index) != index:
                raise ValueError(
                    f"A parameter is in both {what}[{group_of[id(param)]}] and {what}[{index}]; "
                    "give each parameter one group."
                )
    return group_of, len(param_groups)


def _blocked_modules(model: nn.Module) -> dict[int, str]:
    """Supported layers whose per-example gradient cannot be read from their forward: id -> reason."""
    blocked: dict[int, str] = {}
    transformer_layers = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            for child in module.modules():
                blocked[id(child)] = "applied functionally inside MultiheadAttention, not through its forward"
        elif isinstance(module, transformer_layers) and not module.self_attn.batch_first:
            reason = f"inside {type(module).__name__} with batch_first=False (batch is not dimension 0)"
            for child in module.modules():
                blocked.setdefault(id(child), reason)
        elif isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
            blocked[id(module)] = (
                "Embedding with scale_grad_by_freq=True (each example's gradient depends on the whole batch)"
            )
    return blocked
