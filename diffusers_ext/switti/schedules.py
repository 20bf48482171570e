"""Scale schedules of Switti (``patch_nums``): the side of each scale's token grid, coarse to fine.

The official checkpoints fix them by resolution (``yandex-research/switti``, ``utils/arg_util.py``):

* 512 px: ``(1, 2, 3, 4, 6, 9, 13, 18, 24, 32)``: K = 10 scales on a 32 x 32 final grid (VQ-VAE downsample 16);
* 1024 px: ``(1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)``: K = 14 scales on 64 x 64.

The toy world (32 px, VQ-VAE downsample 4) uses ``(1, 2, 3, 4, 6, 8)``: K = 6 scales on 8 x 8 tokens.
"""

from __future__ import annotations

from ..errors import EditSteerConfigError

#: Official resolution -> scale schedule (``RESOLUTION_PATCH_NUMS_MAPPING`` of the Switti code).
RESOLUTION_PATCH_NUMS: dict[int, tuple[int, ...]] = {
    256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    1024: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}
#: The toy world's schedule (32 px images, 8 x 8 tokens).
TOY_PATCH_NUMS: tuple[int, ...] = (1, 2, 3, 4, 6, 8)


def patch_nums_for_resolution(reso: int) -> tuple[int, ...]:
    """The official schedule of a resolution (256, 512 or 1024)."""
    try:
        return RESOLUTION_PATCH_NUMS[int(reso)]
    except (KeyError, TypeError, ValueError):
        raise EditSteerConfigError(f"Switti has scale schedules for {sorted(RESOLUTION_PATCH_NUMS)} px, not {reso!r}; "
                                   "pass patch_nums explicitly for another schedule") from None


def validate_patch_nums(patch_nums) -> tuple[int, ...]:
    pn = tuple(int(p) for p in patch_nums)
    if not pn or any(p < 1 for p in pn) or any(b <= a for a, b in zip(pn, pn[1:])):
        raise EditSteerConfigError(f"patch_nums must be strictly increasing positive grid sides, got {patch_nums!r}")
    return pn


def scale_slices(patch_nums) -> list[tuple[int, int]]:
    """``[(begin, end), ...]``: where each scale's tokens sit in the flattened sequence of all scales."""
    out, cur = [], 0
    for p in patch_nums:
        out.append((cur, cur + p * p))
        cur += p * p
    return out
