"""Online block-Hadamard rotation (calibration/rotation.py): the same function, exact in FP16, outliers spread."""

import pytest
import torch

from calibration import CalibrationError
from calibration.rotation import RotatedLinear, hadamard, rotate_inputs
from calibration.rotation_blocks import valid_block


def test_valid_blocks_are_the_powers_of_4_whose_hadamard_is_exact_in_fp16():
    assert [b for b in range(1, 1025) if valid_block(b)] == [4, 16, 64, 256, 1024]
    for block in (4, 16, 64, 256):
        h = hadamard(block)
        torch.testing.assert_close(h @ h.T, torch.eye(block), rtol=0, atol=1e-6)
        assert torch.equal(h.half().float(), h)  # +-1/sqrt(block) is a power of two


def test_rotated_linear_computes_the_same_function_with_its_weight_rotated():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 48)
    rotated = RotatedLinear(linear, 16)
    r = rotated.rotation(torch.eye(128))  # x R for the rows of the identity: R itself
    torch.testing.assert_close(r @ r.T, torch.eye(128), rtol=0, atol=1e-6)
    torch.testing.assert_close(rotated.weight, linear.weight @ r, rtol=0, atol=1e-6)
    x = torch.randn(3, 5, 128) * 4
    torch.testing.assert_close(rotated(x), linear(x), rtol=1e-5, atol=1e-5)


def test_an_outlier_channel_is_spread_over_its_block():
    x = torch.randn(1000, 256) * 0.1
    x[:, 7] = 100.0  # one massive channel, as at SmolLM2's down_proj input
    spread = RotatedLinear(torch.nn.Linear(256, 8), 64).rotation(x)
    assert spread.abs().max() < 100.0 / 8 * 1.1  # 1/sqrt(64) of it in each of its block's 64 channels, plus noise
    torch.testing.assert_close(spread.pow(2).sum(1), x.pow(2).sum(1), rtol=1e-5, atol=1e-3)  # energy kept


def test_a_block_that_does_not_divide_the_channels_is_refused_by_name():
    model = torch.nn.Sequential(torch.nn.Linear(48, 8))
    with pytest.raises(CalibrationError, match=r"--rotate-block 64 does not divide the 48 input channels of 0"):
        rotate_inputs(model, ["0"], 64)
