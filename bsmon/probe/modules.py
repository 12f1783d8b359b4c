"""A bounded partition of the measured parameters by module, for the per-layer noise scale.

The micro-batch and per-example estimators' squared norms add over disjoint parameter sets, so
the same per-parameter norms (and per-example sums) summed per module give each module's |G|^2
and tr(Sigma) at no extra norm: the modules' shares add back to the whole model's.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

#: At most this many rows in the breakdown: the largest modules on their own (half of it), the
#: rest grouped by type (nn.LayerNorm x 25), and the smallest types merged into one "other" row.
MAX_MODULES = 12


def module_partition(model: nn.Module, params: Sequence[nn.Parameter],
                     limit: int = MAX_MODULES) -> tuple[list[str], list[int], list[int]]:
    """(labels, the row of each of ``params``, parameters per row), at most ``limit`` rows."""
    owner: dict[int, tuple[str, str]] = {}
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            owner.setdefault(id(param), (name or type(module).__name__, type(module).__name__))
    sizes: dict[tuple[str, str], int] = {}
    keys = []
    for param in params:
        key = owner.get(id(param), ("other", "other"))
        keys.append(key)
        sizes[key] = sizes.get(key, 0) + param.numel()
    if len(sizes) <= limit:
        rows = {key: f"{key[0]} ({key[1]})" for key in sizes}
    else:
        keep = sorted(sizes, key=sizes.get, reverse=True)[:limit // 2]
        rows = {key: f"{key[0]} ({key[1]})" for key in keep}
        by_type: dict[str, list[tuple[str, str]]] = {}
        for key in sizes:
            if key not in rows:
                by_type.setdefault(key[1], []).append(key)
        types = sorted(by_type, key=lambda t: sum(sizes[k] for k in by_type[t]), reverse=True)
        room = limit - len(rows)
        for index, kind in enumerate(types):
            merged = index >= room - 1 and len(types) > room
            members = by_type[kind]
            label = ("other modules" if merged else f"{members[0][0]} ({kind})" if len(members) == 1
                     else f"{kind} x {len(members)} (smaller)")
            rows.update({key: label for key in members})
    labels = list(dict.fromkeys(rows.values()))
    index = {label: i for i, label in enumerate(labels)}
    row_of = [index[rows[key]] for key in keys]
    counts = [0] * len(labels)
    for row, param in zip(row_of, params):
        counts[row] += param.numel()
    return labels, row_of, counts
