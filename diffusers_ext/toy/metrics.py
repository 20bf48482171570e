"""Exact pixel metrics for the toy world (and any image pair with a ground-truth edit mask).

Images are uint8 HxWx3 (or float in [0, 1]); a mask is bool HxW, True where the edit may change pixels.
Definitions (all on the [0, 1] scale, averaged over pixels and channels):

* ``edit_region_mse``: MSE against the target inside the mask; ``edit_region_psnr`` its PSNR.
* ``edit_accuracy``: share of mask pixels whose largest channel error is below ``TOLERANCE``.
* ``edit_success``: 1 when ``edit_accuracy >= SUCCESS_ACCURACY`` (a case-level pass/fail).
* ``background_mse`` / ``background_psnr``: against the target (= the source) outside the mask, a true masked mean.
* ``leakage``: share of outside pixels whose largest channel change exceeds ``TOLERANCE``.
* ``psnr``, ``ssim``: whole image against the target; SSIM with a Gaussian window 11, sigma 1.5, per channel.

PSNR of identical images is capped at ``PSNR_MAX`` (100 dB) so that means and JSON stay finite.
"""

from __future__ import annotations

import math

import numpy as np

TOLERANCE = 0.2  # [0, 1] scale; object and background colours of the world are >= 0.3 apart in some channel
SUCCESS_ACCURACY = 0.9
PSNR_MAX = 100.0


def as_float(img) -> np.ndarray:
    a = np.asarray(img)
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    return a.astype(np.float64)


def mse(a, b, mask: np.ndarray | None = None) -> float:
    """Mean squared error over the pixels in ``mask`` (all pixels when None); NaN for an empty mask."""
    d = (as_float(a) - as_float(b)) ** 2
    if mask is None:
        return float(d.mean())
    m = np.asarray(mask, bool)
    if not m.any():
        return float("nan")
    return float(d[m].mean())


def psnr_from_mse(m: float) -> float:
    if math.isnan(m):
        return float("nan")
    return PSNR_MAX if m <= 10 ** (-PSNR_MAX / 10) else float(-10.0 * math.log10(m))


def psnr(a, b, mask: np.ndarray | None = None) -> float:
    return psnr_from_mse(mse(a, b, mask))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter2(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of an HxW array."""
    k = len(g)
    h = np.stack([img[:, i:i + img.shape[1] - k + 1] for i in range(k)], 0)
    h = np.tensordot(g, h, axes=(0, 0))
    v = np.stack([h[i:i + h.shape[0] - k + 1, :] for i in range(k)], 0)
    return np.tensordot(g, v, axes=(0, 0))


def ssim(a, b, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004), data range 1, Gaussian window, averaged over channels."""
    x, y = as_float(a), as_float(b)
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    g = _gaussian_window(window, sigma)
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for ch in range(x.shape[-1]):
        xa, ya = x[..., ch], y[..., ch]
        mx, my = _filter2(xa, g), _filter2(ya, g)
        sxx = _filter2(xa * xa, g) - mx * mx
        syy = _filter2(ya * ya, g) - my * my
        sxy = _filter2(xa * ya, g) - mx * my
        s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
        vals.append(s.mean())
    return float(np.mean(vals))


def pixel_error(a, b) -> np.ndarray:
    """HxW map of the largest channel absolute difference."""
    return np.abs(as_float(a) - as_float(b)).max(-1)


def case_metrics(output, target, mask: np.ndarray, source=None) -> dict[str, float]:
    """All single-edit metrics of one output against its ground truth."""
    mask = np.asarray(mask, bool)
    outside = ~mask
    err = pixel_error(output, target)
    acc = float((err[mask] < TOLERANCE).mean()) if mask.any() else float("nan")
    ref_out = target if source is None else source  # outside the mask target == source
    m = {
        "edit_region_mse": mse(output, target, mask),
        "edit_accuracy": acc,
        "edit_success": float(acc >= SUCCESS_ACCURACY) if not math.isnan(acc) else float("nan"),
        "background_mse": mse(output, ref_out, outside),
        "leakage": float((pixel_error(output, ref_out)[outside] >= TOLERANCE).mean()) if outside.any() else 0.0,
        "psnr": psnr(output, target),
        "ssim": ssim(output, target),
    }
    m["edit_region_psnr"] = psnr_from_mse(m["edit_region_mse"])
    m["background_psnr"] = psnr_from_mse(m["background_mse"])
    return m


def aggregate(per_case: list[dict[str, float]]) -> dict[str, float]:
    """Means over cases (NaNs skipped); ``edit_success_rate`` is the mean of ``edit_success``."""
    if not per_case:
        return {}
    out = {}
    for k in per_case[0]:
        vals = [c[k] for c in per_case if isinstance(c.get(k), (int, float)) and not math.isnan(c[k])]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    if "edit_success" in out:
        out["edit_success_rate"] = out.pop("edit_success")
    return out


def sequence_metrics(outputs: list, seq) -> dict:
    """Per-turn metrics of a multi-turn run.

    ``outputs[t-1]`` is the image after turn t; ``seq`` an :class:`~diffusers_ext.toy.world.EditSequence`.
    Returns per-turn lists: ``drift_mse``/``drift_psnr`` (the never-touched pixels against the source: identity
    drift), ``chain_mse``/``chain_psnr`` (whole image against the ground-truth chain), ``success``
    (that turn's edit, judged inside its mask against the turn's target), ``leakage``.
    """
    res = {"drift_mse": [], "drift_psnr": [], "chain_mse": [], "chain_psnr": [], "success": [], "accuracy": []}
    for t, out in enumerate(outputs, start=1):
        tgt = seq.images[t]
        d = mse(out, seq.source, seq.untouched)
        res["drift_mse"].append(d)
        res["drift_psnr"].append(psnr_from_mse(d))
        c = mse(out, tgt)
        res["chain_mse"].append(c)
        res["chain_psnr"].append(psnr_from_mse(c))
        m = seq.masks[t - 1]
        acc = float((pixel_error(out, tgt)[m] < TOLERANCE).mean()) if m.any() else float("nan")
        res["accuracy"].append(acc)
        res["success"].append(float(acc >= SUCCESS_ACCURACY))
    return res


def aggregate_sequences(per_seq: list[dict]) -> dict:
    """Turn-wise means over sequences: ``drift_by_turn`` (drift MSE), ``drift_psnr_by_turn``, ``success_by_turn``,
    ``chain_psnr_by_turn``, plus the least-squares drift slope (MSE per turn)."""
    if not per_seq:
        return {}
    turns = min(len(s["drift_mse"]) for s in per_seq)

    def by_turn(k):
        return [float(np.nanmean([s[k][t] for s in per_seq])) for t in range(turns)]

    drift = by_turn("drift_mse")
    slope = float(np.polyfit(np.arange(1, turns + 1), drift, 1)[0]) if turns >= 2 else float("nan")
    return {
        "drift_by_turn": drift,
        "drift_psnr_by_turn": by_turn("drift_psnr"),
        "chain_psnr_by_turn": by_turn("chain_psnr"),
        "success_by_turn": by_turn("success"),
        "drift_slope": slope,
        "edit_success_rate": float(np.nanmean([np.mean(s["success"]) for s in per_seq])),
    }
