"""Reconstruction metrics for autoencoders: PSNR, SSIM, high-frequency energy, Fréchet distance.

All image functions take batches `(N, C, H, W)` with values in [0, 1] (the project's [-1, 1]
tensors are mapped with `(x + 1) / 2` first) and return one value per image, so that a caller
can average over a whole evaluation set batch by batch.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# Wang, Bovik, Sheikh & Simoncelli 2004 ("Image quality assessment: from error visibility to
# structural similarity"): 11x11 gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, L = 1.
SSIM_WINDOW_PX = 11
SSIM_SIGMA_PX = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of `y` against `x`, both in [0, 1]: 10 log10(1 / MSE).

    Identical images give +inf (a lossless reconstruction has no finite PSNR)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse)  # 1/0 = inf -> inf dB, as intended


def _gaussian_window(size_px: int, sigma_px: float, device, dtype) -> torch.Tensor:
    k = torch.arange(size_px, device=device, dtype=dtype) - (size_px - 1) / 2
    g = torch.exp(-k.pow(2) / (2 * sigma_px ** 2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, window_px: int = SSIM_WINDOW_PX,
         sigma_px: float = SSIM_SIGMA_PX) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) of images in [0, 1], averaged over channels.

    Local statistics use a normalised gaussian window (11x11, sigma 1.5 by default) applied
    without padding, as in the authors' reference code (`filter2(..., 'valid')`): the SSIM
    map covers the (H-10) x (W-10) positions where the window fits, and its mean over
    positions and channels is the image's score. C1 = (0.01 L)^2, C2 = (0.03 L)^2 with L = 1.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim needs two (N, C, H, W) batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < window_px:
        raise ValueError(f"ssim needs images of at least {window_px}x{window_px} pixels, got {tuple(x.shape[-2:])}")
    x, y = x.float(), y.float()
    c = x.shape[1]
    g = _gaussian_window(window_px, sigma_px, x.device, x.dtype)
    # separable filter: rows then columns, one group per channel
    gh = g.view(1, 1, 1, -1).expand(c, 1, 1, window_px)
    gv = g.view(1, 1, -1, 1).expand(c, 1, window_px, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, gh, groups=c), gv, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.pow(2)
    var_y = blur(y * y) - mu_y.pow(2)
    cov_xy = blur(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x.pow(2) + mu_y.pow(2) + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


def radial_frequency(h_px: int, w_px: int, device=None) -> torch.Tensor:
    """|f| in cycles per pixel for each bin of an (h, w) 2-D FFT (Nyquist is 0.5)."""
    fy = torch.fft.fftfreq(h_px, device=device).view(-1, 1)
    fx = torch.fft.fftfreq(w_px, device=device).view(1, -1)
    return torch.sqrt(fy.pow(2) + fx.pow(2))


def hf_energy(x: torch.Tensor, cutoff: float = 0.5) -> torch.Tensor:
    """Per-image spectral energy above a radial cut-off, summed over channels.

    Definition: for each channel, X = FFT2(x) (unnormalised, no window, no mean removal: the
    DC bin is below any cut-off > 0); a bin's radial frequency is sqrt(fx^2 + fy^2) in cycles
    per pixel (numpy's fftfreq); the energy is the sum of |X|^2 over the bins with radial
    frequency strictly above `cutoff` x Nyquist = `cutoff` x 0.5 cycles/pixel. The default
    0.5 keeps the upper half of the spectrum (periods shorter than 4 pixels); the diagonal
    corners beyond Nyquist (up to 0.707 cycles/pixel) count as high frequency too.
    """
    spectrum = torch.fft.fft2(x.float())
    mask = radial_frequency(x.shape[-2], x.shape[-1], x.device) > cutoff * 0.5
    return (spectrum.abs().pow(2) * mask).flatten(1).sum(1)


def hf_energy_ratio(original: torch.Tensor, recon: torch.Tensor, cutoff: float = 0.5) -> float:
    """High-frequency energy kept: sum of `hf_energy(recon)` over the batch divided by the
    originals' sum (1.0 perfect; a blurry decoder scores well below 1; added noise or
    ringing scores above 1, so read it together with PSNR/LPIPS).

    A ratio of sums, not a mean of per-image ratios: flat images with almost no
    high-frequency energy would otherwise dominate with huge ratios."""
    return float(hf_energy(recon, cutoff).sum() / hf_energy(original, cutoff).sum())


class GaussianStats:
    """Running mean and covariance of feature vectors (float64), for Fréchet distances.

    Memory is O(d^2) whatever the number of images, so rFID over 50k images needs no
    feature bank."""

    def __init__(self, dim: int | None = None):
        """`dim`: the feature size, or None to take it from the first update."""
        self.n = 0
        self.sum = np.zeros(dim, dtype=np.float64) if dim else None
        self.outer = np.zeros((dim, dim), dtype=np.float64) if dim else None

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        """Add a batch of feature vectors, shape (N, dim)."""
        f = features.detach().double().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, np.float64)
        if self.sum is None:
            self.sum, self.outer = np.zeros(f.shape[1]), np.zeros((f.shape[1], f.shape[1]))
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, unbiased covariance), as numpy.cov(rowvar=False) gives; needs n >= 2."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.n}")
        mu = self.sum / self.n
        cov = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, cov


def _trace_sqrt_product_scipy(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr(sqrtm(s1 s2)) as pytorch-fid computes it (scipy's sqrtm, an offset when singular)."""
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean[0] if isinstance(covmean, tuple) else covmean
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
        covmean = covmean[0] if isinstance(covmean, tuple) else covmean
    return float(np.real(np.trace(covmean)))


def _trace_sqrt_product_eigh(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr(sqrt(s1 s2)) from symmetric eigendecompositions: s1 s2 has the eigenvalues of the
    symmetric PSD matrix sqrt(s1) s2 sqrt(s1), so the trace is the sum of their square roots
    (tiny negative eigenvalues from rounding are clipped to 0)."""
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     method: str = "auto") -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)).

    `method`: "scipy" (scipy.linalg.sqrtm, as pytorch-fid), "eigh" (own, numpy only), or
    "auto" (scipy when installed, else eigh)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if method == "auto":
        try:
            import scipy.linalg  # noqa: F401
            method = "scipy"
        except ImportError:
            method = "eigh"
    if method == "scipy":
        tr_covmean = _trace_sqrt_product_scipy(s1, s2)
    elif method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(s1, s2)
    else:
        raise ValueError(f"unknown method {method!r}: auto, scipy or eigh")
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
    return max(value, 0.0) if math.isfinite(value) else value
