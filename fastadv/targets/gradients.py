"""The gradient of a table's lookups, from each lookup's dL/de: summed per token id, or per position."""

from __future__ import annotations

import torch

from ..errors import MissingGradientError
from ..ops import RowSet, segment_sum_by_id
from ..ops.backend import Backend

LookupGradients = list[tuple[torch.Tensor, torch.Tensor]]  # (token ids, dL/de of that lookup) per lookup


def gradient_rows(
    lookups: LookupGradients,
    num_rows: int,
    padding_idx: int | None,
    share_rows: bool,
    backend: Backend,
    name: str,
    scale_grad_by_freq: bool = False,
) -> tuple[RowSet, torch.Tensor]:
    """The gradient of a table's lookups: per distinct id (summed, the weight gradient) or per position.

    Args:
        lookups: (ids of any shape, dL/de [*ids.shape, d]) per lookup.
        num_rows: the table's rows (V); the per-id sums take at most min(N, V) rows for N ids.
        padding_idx: the table's padding row, which gets no gradient (as in the weight gradient).
        share_rows: True sums per id; False keeps one row per position (a single lookup only).
        scale_grad_by_freq: the modules' flag (``nn.Embedding(scale_grad_by_freq=True)``): each lookup's rows are
            divided by their id's count in that lookup before the sums, as the weight gradient's are.

    Returns:
        (row_set, grad): grad [N, d] addressed through ``row_set.grad_rows``; rows sorted.
    """
    d = lookups[0][1].shape[-1]
    if share_rows and scale_grad_by_freq:
        lookups = [(i, _divided_by_frequency(i.reshape(-1).to(torch.int64), g.reshape(-1, d))) for i, g in lookups]
    ids = _joined([i.reshape(-1) for i, _ in lookups]).to(torch.int64)
    grads = _joined([g.reshape(-1, d) for _, g in lookups])
    if share_rows:
        return segment_sum_by_id(grads, ids, num_rows, padding_idx, backend=backend)
    if len(lookups) > 1:
        raise MissingGradientError(
            f"share_rows=False perturbs each token position of one batch, but '{name}' was looked "
            f"up {len(lookups)} times in the last backward pass. Use share_rows=True."
        )
    positions = torch.arange(ids.numel(), device=ids.device)
    return RowSet(positions, positions, rows_below=ids.numel(), grad_rows_below=ids.numel()), grads


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat, without the copy when there is one part (the usual single lookup per pass)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _divided_by_frequency(ids: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """``grads`` ([N, d], one lookup's) divided row-wise by how often each row's id occurs among ``ids`` ([N]);
    no host sync (two binary searches in the sorted ids)."""
    in_order = torch.sort(ids).values
    counts = torch.searchsorted(in_order, ids, right=True) - torch.searchsorted(in_order, ids)
    return grads / counts[:, None].to(grads.dtype)
