"""How a call's x and y become same-shape batches, and how per-batch results come back in the caller's order.

Owns the forms every metric (`ssim`, `psnr`, `ms_ssim`) accepts, checked by `ssim_ray.metric.checks`: one
tensor pair, (H, W), (C, H, W) or (N, C, H, W); or two equal-length lists of (H, W) / (C, H, W) tensors of
different sizes (ragged), grouped here by shape into stacked batches. A metric computes each batch on its
own; since a pair's value never depends on its batch, grouping changes nothing but speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple, Union

import torch

from ssim_ray.metric.checks import as_batch, check_same, check_tensor, ragged_pairs

ImageInput = Union[torch.Tensor, Sequence[torch.Tensor]]


@dataclass(frozen=True)
class PairBatches:
    """A call's pairs as same-shape batches.

    groups: (indices of the pairs in the caller's order, x (n, C, H, W), y (n, C, H, W)) per shape.
    count: pairs in the call.
    single: 2 or 3 for one unbatched (H, W) / (C, H, W) tensor pair (its results drop the batch dimension),
        0 for a batch or a list.
    ragged: whether the input was a list.
    device: where the tensors are.
    """

    groups: Tuple[Tuple[Tuple[int, ...], torch.Tensor, torch.Tensor], ...]
    count: int
    single: int
    ragged: bool
    device: torch.device


def pair_batches(x: ImageInput, y: ImageInput) -> PairBatches:
    """The checked pairs of a call, grouped into same-shape (n, C, H, W) batches (views where possible).

    Args:
        x: Reference image(s): a tensor (H, W), (C, H, W) or (N, C, H, W), or a list of (C, H, W) / (H, W)
            tensors of one dtype, device and channel count.
        y: Distorted image(s), the same form.

    Returns:
        The batches; a tensor input is one batch (possibly of 0 pairs), a list one batch per shape.

    Raises:
        TypeError: Not tensors or lists of tensors, unsupported or different dtypes.
        ValueError: Shapes or devices differ, wrong number of dimensions, an empty list, or pairs of a list
            that differ in dtype, device or channel count.

    Example:
        >>> b = pair_batches([torch.zeros(8, 9), torch.zeros(5, 5), torch.ones(8, 9)],
        ...                  [torch.zeros(8, 9), torch.zeros(5, 5), torch.ones(8, 9)])
        >>> [(indices, tuple(xb.shape)) for indices, xb, _ in b.groups]
        [((0, 2), (2, 1, 8, 9)), ((1,), (1, 1, 5, 5))]
    """
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        x, y = check_tensor("x", x), check_tensor("y", y)
        check_same(x, y)
        xb, yb = as_batch(x, y)
        single = x.dim() if x.dim() < 4 else 0
        return PairBatches(((tuple(range(xb.shape[0])), xb, yb),), xb.shape[0], single, False, x.device)
    pairs = ragged_pairs(x, y)
    if not pairs:
        raise ValueError("x and y are empty lists; give at least one pair")
    by_shape: Dict[tuple, List[int]] = {}
    for i, (xi, _) in enumerate(pairs):
        by_shape.setdefault(tuple(xi.shape), []).append(i)
    groups = tuple((tuple(indices), torch.stack([pairs[i][0] for i in indices]),
                    torch.stack([pairs[i][1] for i in indices])) for indices in by_shape.values())
    return PairBatches(groups, len(pairs), 0, True, pairs[0][0].device)


def in_caller_order(batches: PairBatches, results: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-batch results (n_i, ...) as one (count, ...) tensor in the caller's order ([0] for a single pair).

    Args:
        batches: What `pair_batches` returned.
        results: One tensor per group, in `batches.groups` order, pairs first.

    Returns:
        The results of every pair in the order the caller gave them.

    Example:
        >>> b = pair_batches([torch.zeros(8, 9), torch.zeros(5, 5), torch.ones(8, 9)],
        ...                  [torch.zeros(8, 9), torch.zeros(5, 5), torch.ones(8, 9)])
        >>> in_caller_order(b, [torch.tensor([10.0, 30.0]), torch.tensor([20.0])])
        tensor([10., 20., 30.])
    """
    if not batches.ragged:
        out = results[0]
    else:
        first = results[0]
        out = torch.empty((batches.count,) + tuple(first.shape[1:]), dtype=first.dtype, device=first.device)
        for (indices, _, _), result in zip(batches.groups, results):
            out[list(indices)] = result
    return out[0] if batches.single else out
