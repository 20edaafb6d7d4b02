"""Issue 23: reconstruction metrics on Fashion-MNIST's native 28x28 basis, checked against
hand-computed PSNR and skimage-default SSIM (7x7 uniform window, sample covariance, data_range 1)."""
import math

import torch

from groupgen.data import DataConfig
from eval.native_metrics import NativeMeter, native_box, ssim_skimage


def _checker() -> torch.Tensor:
    i, j = torch.meshgrid(torch.arange(28), torch.arange(28), indexing="ij")
    return torch.where((i + j) % 2 == 0, torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64))


def _ssim_by_hand(a: float, b: float, shift_only: bool = False) -> float:
    """SSIM of the checkerboard x against y = a x + b: every 7x7 window holds 25 or 24 of the 0.7
    cells (242 windows of each kind among the 22 x 22 full windows), so the map has two values."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    for nh in (25, 24):
        ux = (nh * 0.7 + (49 - nh) * 0.3) / 49
        uxx = (nh * 0.49 + (49 - nh) * 0.09) / 49
        vx = 49 / 48 * (uxx - ux * ux)                   # sample variance (skimage's default)
        uy, vy, vxy = a * ux + b, a * a * vx, a * vx
        vals.append((2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2)))
    return sum(vals) / 2


def test_native_psnr_and_ssim_on_a_known_pair_ignore_the_padding():
    x = _checker()
    y1 = 0.5 * x + 0.15          # 0.7 -> 0.5, 0.3 -> 0.3: error 0.2 on half the pixels
    y2 = x + 0.05                # a uniform shift: error 0.05 everywhere
    to_model = lambda t, border: torch.nn.functional.pad(t * 2 - 1, (2, 2, 2, 2), value=border)  # noqa: E731
    X = torch.stack([to_model(x, -1.0), to_model(x, -1.0)])[:, None].float()
    Y = torch.stack([to_model(y1, 0.3), to_model(y2, 0.3)])[:, None].float()   # a wrong border
    box = native_box(DataConfig(name="fmnist", image_size=32))
    assert box == (2, 28)
    m = NativeMeter(box)
    m.update(X[:1], Y[:1])
    m.update(X[1:], Y[1:])
    r = m.result()
    mse1, mse2 = 0.5 * 0.2 ** 2, 0.05 ** 2                 # 0.02 and 0.0025
    assert math.isclose(r["psnr_native_per_image"], (10 * math.log10(1 / mse1) + 10 * math.log10(1 / mse2)) / 2,
                        abs_tol=1e-4)                       # (16.990 + 26.021) / 2 = 21.505 dB
    assert math.isclose(r["psnr_native"], 10 * math.log10(1 / ((mse1 + mse2) / 2)), abs_tol=1e-4)  # 19.488 dB
    want = (_ssim_by_hand(0.5, 0.15) + _ssim_by_hand(1.0, 0.05)) / 2
    assert math.isclose(r["ssim_native"], want, abs_tol=1e-6)
    assert r["native_basis"].startswith("28x28")


def test_ssim_skimage_window_and_covariance_by_hand():
    x = _checker()[None, None]
    s = ssim_skimage(x, 0.5 * x + 0.15, data_range=1.0)
    assert math.isclose(float(s), _ssim_by_hand(0.5, 0.15), rel_tol=0, abs_tol=1e-12)
    # the shift-only pair: contrast-structure is exactly 1, luminance by hand
    s2 = float(ssim_skimage(x, x + 0.05))
    assert math.isclose(s2, _ssim_by_hand(1.0, 0.05), abs_tol=1e-12) and s2 < 1
    assert float(ssim_skimage(x, x)) == 1.0


def test_native_box_only_for_padded_fmnist():
    assert native_box(DataConfig(name="fmnist", image_size=28)) is None
    assert native_box(DataConfig(name="fmnist", image_size=32, resize="resize")) is None
    assert native_box(DataConfig(name="digits", image_size=32)) is None
    assert native_box(DataConfig(name="fmnist", image_size=36)) == (4, 28)
