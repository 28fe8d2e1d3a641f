"""Input checks of the public ops: ids the kernels would read or write through unchecked."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .row_set import RowSet


def check_ids(what: str, ids: torch.Tensor, bound: int) -> None:
    """Refuse ids outside ``[0, bound)``: the kernels read and write through them unchecked.

    A device-side assert, as nn.Embedding's own on CUDA: the host never waits for the device. On the CPU it
    raises at once, here an IndexError that names the ids found."""
    if ids.numel() == 0 or torch.compiler.is_compiling():
        return
    message = f"fastadv: {what} holds ids outside [0, {bound}); each must name a row of the matrix it indexes"
    try:
        torch._assert_async(((ids >= 0) & (ids < bound)).all(), message)
    except RuntimeError:  # only where the assert runs on the host
        low, high = int(ids.min()), int(ids.max())
        raise IndexError(
            f"{what} holds ids from {low} to {high}, outside [0, {bound}): each must name one of the {bound} rows "
            "of the matrix it indexes (token ids of that table, positions of that gradient)."
        ) from None


def check_row_set(row_set: RowSet, weight_rows: int | None, grad_rows: int | None) -> None:
    """Refuse a row set whose slots name rows outside the weight ([weight_rows, D]) or the gradient ([grad_rows, D]),
    or whose fields differ in length.

    Ids are checked once, where a row set is built from them: a bound the row set already carries
    (``rows_below``, ``grad_rows_below``) that fits the matrix spares the ops a check per call."""
    n = len(row_set)
    if row_set.grad_rows.numel() != n or (row_set.first is not None and row_set.first.numel() != n):
        first = None if row_set.first is None else row_set.first.numel()
        raise ValueError(
            f"a RowSet's rows, grad_rows and first must have one entry per slot; found {n}, "
            f"{row_set.grad_rows.numel()} and {first}."
        )
    if weight_rows is not None and not _within(row_set.rows_below, weight_rows):
        check_ids("row_set.rows", row_set.rows, weight_rows)
    if grad_rows is not None and not _within(row_set.grad_rows_below, grad_rows):
        check_ids("row_set.grad_rows", row_set.grad_rows, grad_rows)


def _within(known_bound: int | None, rows: int) -> bool:
    """Whether ids known to lie in [0, known_bound) are in [0, rows)."""
    return known_bound is not None and known_bound <= rows
