"""Augmentation: geometric (numpy, per sample, applied to image and label layers alike) and
photometric (torch, per batch: HED stain jitter, Gaussian blur)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["resize_image", "resize_labels", "random_crop", "random_flip_rot", "hed_jitter", "random_blur"]

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB), as in skimage.color.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float32)
_RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED).astype(np.float32)


def resize_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize an (H, W, 3) uint8 image to ``shape`` (h, w) with antialiased bicubic interpolation."""
    h, w = int(shape[0]), int(shape[1])
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BICUBIC))


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D label map to ``shape``, sampling at pixel centres."""
    h, w = int(shape[0]), int(shape[1])
    if labels.shape[:2] == (h, w):
        return labels
    rows = np.minimum(((np.arange(h) + 0.5) * labels.shape[0] / h).astype(np.int64), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * labels.shape[1] / w).astype(np.int64), labels.shape[1] - 1)
    return labels[rows[:, None], cols[None, :]]


def random_crop(
    rng: np.random.Generator,
    image: np.ndarray,
    layers: list[np.ndarray],
    *,
    size_px: int,
    scale_range: tuple[float, float] = (1.0, 1.0),
    fills: list[int] | None = None,
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """A random ``size_px`` square crop, zoomed by a random factor, of an image and its label layers.

    A window of ``round(size_px * f)`` source pixels, f log-uniform in ``scale_range``, is cut and
    resized to ``size_px``. Where the window leaves the image, the image is reflected and the layers
    are filled with ``fills`` (default 0); the returned ``valid`` mask is False there.

    Returns
    -------
    image : (size_px, size_px, 3) uint8
    layers : list of (size_px, size_px) arrays
    valid : (size_px, size_px) bool
    """
    lo, hi = scale_range
    f = float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) if hi > lo else lo
    src = max(8, int(round(size_px * f)))
    h, w = image.shape[:2]
    fills = fills if fills is not None else [0] * len(layers)
    # Top-left, allowing the window to hang over an image smaller than it (centred jitter).
    y0 = int(rng.integers(0, h - src + 1)) if h >= src else -int(rng.integers(0, src - h + 1))
    x0 = int(rng.integers(0, w - src + 1)) if w >= src else -int(rng.integers(0, src - w + 1))
    pad = ((max(0, -y0), max(0, y0 + src - h)), (max(0, -x0), max(0, x0 + src - w)))
    ys, xs = slice(max(0, y0), min(h, y0 + src)), slice(max(0, x0), min(w, x0 + src))
    img = image[ys, xs]
    valid = np.ones(img.shape[:2], bool)
    outs = [layer[ys, xs] for layer in layers]
    if any(p for pair in pad for p in pair):
        mode = "reflect" if min(img.shape[:2]) > max(max(p) for p in pad) else "symmetric"
        img = np.pad(img, pad + ((0, 0),), mode=mode)
        valid = np.pad(valid, pad, constant_values=False)
        outs = [np.pad(o, pad, constant_values=fv) for o, fv in zip(outs, fills)]
    img = resize_image(np.ascontiguousarray(img), (size_px, size_px))
    valid = resize_labels(valid, (size_px, size_px))
    outs = [resize_labels(o, (size_px, size_px)) for o in outs]
    return img, outs, valid


def random_flip_rot(rng: np.random.Generator, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """The same random 90-degree rotation and horizontal flip applied to each array (first two axes)."""
    k = int(rng.integers(0, 4))
    flip = bool(rng.integers(0, 2))
    out = []
    for a in arrays:
        a = np.rot90(a, k, axes=(0, 1))
        if flip:
            a = a[:, ::-1]
        out.append(np.ascontiguousarray(a))
    return out


def hed_jitter(images: torch.Tensor, *, sigma: float = 0.05, bias: float = 0.02, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random stain jitter in HED optical-density space (Tellez et al. 2018).

    Parameters
    ----------
    images : (N, 3, H, W) float tensor
        RGB in 0-255.
    sigma, bias
        Each stain channel is scaled by U(1 - sigma, 1 + sigma) and shifted by U(-bias, bias).

    Returns
    -------
    (N, 3, H, W) float tensor in 0-255.
    """
    n = images.shape[0]
    m_in = torch.from_numpy(_HED_FROM_RGB).to(images)
    m_out = torch.from_numpy(_RGB_FROM_HED).to(images)
    od = -torch.log((images.clamp(0, 255) + 1.0) / 256.0)  # (N, 3, H, W), >= 0
    hed = torch.einsum("nchw,cd->ndhw", od, m_in)
    alpha = 1.0 + (torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1).to(images) * sigma
    beta = (torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1).to(images) * bias
    hed = hed * alpha + beta
    od = torch.einsum("ndhw,dc->nchw", hed, m_out)
    return (256.0 * torch.exp(-od) - 1.0).clamp(0, 255)


def random_blur(images: torch.Tensor, *, p: float = 0.2, max_sigma: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian blur of a random subset (probability ``p``) of the batch with sigma ~ U(0.3, max_sigma)."""
    n = images.shape[0]
    pick = torch.rand(n, generator=generator) < p
    if not bool(pick.any()):
        return images
    out = images.clone()
    for i in torch.nonzero(pick).flatten().tolist():
        s = 0.3 + float(torch.rand(1, generator=generator)) * (max_sigma - 0.3)
        r = max(1, int(round(2 * s)))
        x = torch.arange(-r, r + 1, dtype=images.dtype)
        k = torch.exp(-(x**2) / (2 * s * s))
        k = k / k.sum()
        img = images[i : i + 1]
        img = F.conv2d(F.pad(img, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
        img = F.conv2d(F.pad(img, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)
        out[i : i + 1] = img
    return out
