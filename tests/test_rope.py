import math

import pytest
import torch

from dsv3lite import ModelArgs
from dsv3lite.rope import (apply_rope, precompute_rope, rope_frequencies, softmax_scale,
                           yarn_correction_range, yarn_mscale)


def test_v3_yarn_ramp_spans_indices_10_to_23():
    assert yarn_correction_range(ModelArgs.deepseek_v3()) == (10, 23)  # [V3] §4.3


def test_v3_softmax_scale_includes_mscale_squared():
    args = ModelArgs.deepseek_v3()
    assert yarn_mscale(args) == pytest.approx(1.36889, abs=1e-5)
    assert softmax_scale(args) == pytest.approx(0.13523, abs=1e-5)  # [V3-code] MLA.__init__
    short = args.replace(max_seq_len=4096)
    assert softmax_scale(short) == pytest.approx(192 ** -0.5)  # 0.07217, no YaRN


def test_yarn_keeps_fast_pairs_and_slows_slow_pairs_by_the_factor():
    args = ModelArgs.deepseek_v3()
    plain = rope_frequencies(args.replace(max_seq_len=4096))
    yarn = rope_frequencies(args)
    low, high = yarn_correction_range(args)
    torch.testing.assert_close(yarn[:low], plain[:low])
    torch.testing.assert_close(yarn[high + 1:], plain[high + 1:] / 40)
    ratio = yarn[low:high + 1] / plain[low:high + 1]
    assert torch.all(ratio[1:] <= ratio[:-1])  # monotone blend in between
    assert ratio.min() >= 1 / 40 and ratio.max() <= 1


def test_rotation_preserves_norm_and_rotates_interleaved_pairs():
    args = ModelArgs.tiny()
    cos, sin = precompute_rope(args)
    x = torch.randn(2, args.max_seq_len, 3, args.qk_rope_head_dim)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    # pair (0, 1) at position t turns by angle t * freq[0] = t radians
    t = 5
    angle = t * rope_frequencies(args)[0]
    x0, x1 = x[0, t, 0, 0], x[0, t, 0, 1]
    expected = torch.stack([x0 * angle.cos() - x1 * angle.sin(), x0 * angle.sin() + x1 * angle.cos()])
    torch.testing.assert_close(y[0, t, 0, :2], expected)


def test_scores_depend_only_on_relative_position():
    args = ModelArgs.tiny()
    cos, sin = precompute_rope(args)
    q = torch.randn(1, 1, 1, args.qk_rope_head_dim).expand(1, args.max_seq_len, 1, -1)
    k = torch.randn(1, 1, 1, args.qk_rope_head_dim).expand(1, args.max_seq_len, 1, -1)
    rq, rk = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    s_a = (rq[0, 10, 0] * rk[0, 7, 0]).sum()
    s_b = (rq[0, 30, 0] * rk[0, 27, 0]).sum()
    assert s_a == pytest.approx(float(s_b), abs=1e-4)
    assert not math.isclose(float(s_a), float((rq[0, 10, 0] * rk[0, 3, 0]).sum()), abs_tol=1e-3)
