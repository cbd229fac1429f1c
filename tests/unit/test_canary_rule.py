"""The canary rule: a CPU difference passes, a different model fails, each with the reason named."""

from __future__ import annotations

import pytest

from agent.wire.canary import LEAD_TOLERANCE, judge_leads, judge_without_leads, token_lead

# Leads of SmolLM2-135M INT4 (block 32) on its canary, teacher forced: the x86 build host and an
# aarch64 device (qemu-user, ARM kernels), as measured for the README. The aarch64 greedy decode
# diverges at position 5, where x86's lead was 0.084.
X86 = [0.309, 3.313, 0.138, 2.258, 4.016, 0.084, 0.035, 4.699, 1.283, 0.402, 0.097, 0.264, 0.036, 0.82, 0.31,
       0.686]
AARCH64 = [0.176, 2.689, 0.079, 2.420, 3.929, -0.572, 0.576, 4.241, 0.853, 0.274, -0.022, -0.034, -0.065, 0.580,
           0.090, 0.990]
# The same model quantized with block 128 instead of 32: other weights, the same tokenizer.
BLOCK_128 = [x + d for x, d in zip(X86, [-0.54, -3.52, -0.89, -1.25, -2.47, -0.26, -2.92, -0.99, 0.12, -0.15,
                                          -1.76, -1.44, -0.22, -4.91, -0.89, 0.1], strict=True)]


def test_token_lead_is_the_margin_over_the_best_other_token() -> None:
    assert token_lead([0.0, 3.0, 1.0], 1) == 2.0
    assert token_lead([0.0, 3.0, 1.0], 2) == -2.0
    assert token_lead([5.0, 5.0], 0) == 0.0
    with pytest.raises(ValueError, match="not in a vocabulary of 3"):
        token_lead([0.0, 1.0, 2.0], 3)


def test_an_arm_device_passes_where_exact_greedy_tokens_differ() -> None:
    verdict = judge_leads(X86, AARCH64)
    assert verdict.passed, verdict.reason
    assert abs(verdict.worst_change) < LEAD_TOLERANCE and verdict.worst_position == 5
    assert min(AARCH64) < 0  # the greedy choice did flip: an exact-token canary would refuse it


def test_other_weights_fail_naming_the_position_and_both_leads() -> None:
    verdict = judge_leads(X86, BLOCK_128)
    assert not verdict.passed and verdict.worst_position == 13
    assert "moved -4.910 logits" in verdict.reason and "build host +0.820" in verdict.reason


def test_a_different_number_of_positions_fails() -> None:
    verdict = judge_leads(X86, AARCH64[:-1])
    assert not verdict.passed and "15 canary positions, the manifest has 16" in verdict.reason


def test_manifests_without_leads_need_the_exact_tokens_as_they_were_built_to() -> None:
    assert judge_without_leads(X86).passed
    assert judge_without_leads([0.5, 0.0, 1.0]).passed  # a tie is the greedy choice too
    verdict = judge_without_leads(AARCH64)
    assert not verdict.passed and verdict.worst_position == 5
    assert "differ from the manifest's at position 5" in verdict.reason and "rebuild" in verdict.reason
    assert not judge_without_leads([]).passed
