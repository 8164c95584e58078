"""INT8 weight clipping weighted by input power: it clips a row's outlier weight where the input is quiet, and
leaves alone the large weight column that smoothing created for a loud input channel."""

import torch

from calibration.gptq import rtn
from calibration.weight_clip import CLIP_RATIOS, clipped_int8, clipping_errors


def rows_with_one_large_weight(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(2, 256, generator=g) * 0.02
    w[:, 7] = 0.5  # one large weight per row (25x the others), in channel 7
    return w


def test_no_clipping_reproduces_round_to_nearest():
    w, power = rows_with_one_large_weight(), torch.rand(256) + 0.5
    unclipped = ((w.double() - rtn(w, 8, -1, False).dequantize().double()) ** 2 * power).sum(dim=1)
    assert torch.allclose(clipping_errors(w, power, (1.0,))[:, 0], unclipped)


def test_clips_an_outlier_weight_on_a_quiet_channel_but_not_on_a_loud_one():
    w = rows_with_one_large_weight()
    quiet, loud = torch.ones(256), torch.ones(256)
    quiet[7], loud[7] = 1e-4, 1e4  # channel 7's input: nearly silent / an outlier channel after smoothing
    clipped, ratios = clipped_int8(w, quiet)
    kept, kept_ratios = clipped_int8(w, loud)
    assert (ratios < 0.7).all()  # the rest of the row gets a finer step, channel 7 is clipped
    assert torch.equal(kept_ratios, torch.ones(2))  # the loud channel's weight must stay exact: no clipping
    assert torch.equal(kept.codes, rtn(w, 8, -1, False).codes)
    for q, power, r in ((clipped, quiet, ratios), (kept, loud, kept_ratios)):
        error = ((w.double() - q.dequantize().double()) ** 2 * power).sum(dim=1)
        assert torch.allclose(error, clipping_errors(w, power, CLIP_RATIOS).min(dim=1).values)
        assert torch.allclose(q.scales[:, 0], w.abs().amax(dim=1) * r / 127)
        assert q.codes.dtype == torch.int8
