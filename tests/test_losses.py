"""Losses against hand-computed values (written with math, not with the code under test)."""

import math

import pytest
import torch

from ktray.errors import KtrayError
from ktray.losses import (
    FEATURE_LOSSES,
    KD_LOSSES,
    LOSSES,
    FeatureProjector,
    feature_loss,
    get_loss,
    kd_loss,
    soft_cross_entropy,
)

S = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
T_ = torch.tensor([[3.0, 2.0, 1.0], [1.0, 0.0, 0.0]])


def _kl_reference(student, teacher, temperature):
    """KL(softmax(t/T) || softmax(s/T)) * T^2, batch mean, in plain Python."""

    def log_softmax(z):
        m = max(z)
        log_z = m + math.log(sum(math.exp(v - m) for v in z))
        return [v - log_z for v in z]

    total = 0.0
    for s_row, t_row in zip(student, teacher):
        ls = log_softmax([v / temperature for v in s_row])
        lt = log_softmax([v / temperature for v in t_row])
        total += sum(math.exp(q) * (q - p) for p, q in zip(ls, lt))
    return total / len(student) * temperature**2


def test_kd_loss_hand_value_2x3():
    # With T=2 each row's student logits are a permutation of the teacher's, so the partition
    # functions cancel and KL_row = sum_i p_t,i * (t_i - s_i) / T.
    e = math.exp
    row1 = (e(1.5) * 1 + e(1.0) * 0 + e(0.5) * -1) / (e(1.5) + e(1.0) + e(0.5))
    row2 = (e(0.5) * 0.5 + 1 * 0 + 1 * -0.5) / (e(0.5) + 1 + 1)
    expected = (row1 + row2) / 2 * 2.0**2
    assert expected == pytest.approx(0.8181074784760219, abs=1e-12)
    assert kd_loss(S, T_, 2.0).item() == pytest.approx(expected, abs=1e-6)
    assert kd_loss(S, T_, 2.0).item() == pytest.approx(
        _kl_reference(S.tolist(), T_.tolist(), 2.0), abs=1e-6
    )


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0, 8.0])
def test_kd_loss_has_t_squared_factor(temperature):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 5, generator=g) * 3, torch.randn(4, 5, generator=g) * 3
    ref = _kl_reference(s.tolist(), t.tolist(), temperature)
    got = kd_loss(s, t, temperature).item()
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-7)
    # the same KL without the factor is ref / T^2
    plain = torch.nn.functional.kl_div(
        torch.log_softmax(s / temperature, -1),
        torch.softmax(t / temperature, -1),
        reduction="batchmean",
    ).item()
    assert got == pytest.approx(plain * temperature**2, rel=1e-5, abs=1e-7)


def test_kd_loss_large_temperature_matches_centred_logit_mse():
    # Hinton et al.: as T -> inf, T^2 * KL -> sum_i ((t_i - mean t) - (s_i - mean s))^2 / (2C).
    s, t = S.tolist(), T_.tolist()
    c = 3
    limit = 0.0
    for s_row, t_row in zip(s, t):
        ms, mt = sum(s_row) / c, sum(t_row) / c
        limit += sum(((b - mt) - (a - ms)) ** 2 for a, b in zip(s_row, t_row)) / (2 * c)
    limit /= len(s)
    assert kd_loss(S.double(), T_.double(), 1000.0).item() == pytest.approx(limit, rel=1e-3)


def test_kd_loss_zero_when_equal_and_shift_invariant():
    assert kd_loss(S, S, 3.0).item() == pytest.approx(0.0, abs=1e-7)
    assert kd_loss(S, S + 100.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    big = torch.tensor([[1000.0, 0.0, -1000.0]])
    assert torch.isfinite(kd_loss(big, -big, 1.0))


def test_kd_loss_gradient_only_to_student():
    s = S.clone().requires_grad_(True)
    t = T_.clone().requires_grad_(True)
    kd_loss(s, t, 2.0).backward()
    assert s.grad is not None and t.grad is None


def test_soft_cross_entropy_is_kd_plus_teacher_entropy():
    temperature = 2.0
    p = torch.softmax(T_ / temperature, -1)
    entropy = -(p * p.log()).sum(-1).mean().item() * temperature**2
    got = soft_cross_entropy(S, T_, temperature).item()
    assert got == pytest.approx(kd_loss(S, T_, temperature).item() + entropy, abs=1e-5)


def test_kd_loss_errors():
    with pytest.raises(KtrayError, match="class count mismatch"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)
    with pytest.raises(KtrayError, match="batch size"):
        kd_loss(torch.zeros(2, 3), torch.zeros(3, 3), 1.0)
    with pytest.raises(KtrayError, match="temperature"):
        kd_loss(S, T_, 0.0)
    with pytest.raises(KtrayError, match=r"\[B, C\]"):
        kd_loss(torch.zeros(3), torch.zeros(3), 1.0)


def test_cosine_loss_values():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert feature_loss(a, a, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    assert feature_loss(a, 5 * a, "cosine").item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    orth = torch.tensor([[0.0, 3.0], [-1.0, 0.0]])
    assert feature_loss(a, orth, "cosine").item() == pytest.approx(1.0, abs=1e-6)
    assert feature_loss(a, -a, "cosine").item() == pytest.approx(2.0, abs=1e-6)
    mixed = torch.tensor([[1.0, 0.0], [0.0, -1.0]])  # row 1 identical (0), row 2 opposite (2)
    assert feature_loss(a, mixed, "cosine").item() == pytest.approx(1.0, abs=1e-6)


def test_mse_loss_hand_value():
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # squared differences 1, 4, 4, 9 -> mean 18 / 4 (raw features, no normalisation)
    assert feature_loss(s, t, "mse").item() == pytest.approx(4.5, abs=1e-6)


def test_contrastive_aligned_lower_than_shuffled():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(16, 32, generator=g)
    s = t + 0.1 * torch.randn(16, 32, generator=g)
    aligned = feature_loss(s, t, "contrastive", temperature=0.1).item()
    shuffled = feature_loss(
        s, t[torch.roll(torch.arange(16), 1)], "contrastive", temperature=0.1
    ).item()
    assert aligned < 0.1 < math.log(16) < shuffled


@pytest.mark.parametrize("batch", [1, 2, 7])
def test_contrastive_constant_features_is_log_b(batch):
    s = torch.ones(batch, 4)
    t = torch.full((batch, 4), 2.0)
    assert feature_loss(s, t, "contrastive", temperature=0.07).item() == pytest.approx(
        math.log(batch), abs=1e-5
    )


def test_feature_dim_mismatch_suggests_projector():
    with pytest.raises(KtrayError, match="FeatureProjector"):
        feature_loss(torch.zeros(2, 3), torch.zeros(2, 4), "cosine")


def test_loss_tables_and_unknown_name():
    assert (
        set(LOSSES)
        == set(KD_LOSSES) | set(FEATURE_LOSSES)
        == {"kl", "soft_ce", "cosine", "mse", "contrastive"}
    )
    assert get_loss("kl") is kd_loss
    with pytest.raises(KtrayError, match=r"unknown loss 'nope'.*contrastive.*kl"):
        LOSSES["nope"]
    with pytest.raises(KtrayError, match="unknown loss"):
        get_loss("nope")
    with pytest.raises(
        KtrayError,
        match=r"unknown feature loss 'kl'; choose one of \['contrastive', 'cosine', 'mse'\]",
    ):
        feature_loss(S, T_, "kl")
    # every loss shares the (student, teacher, temperature) signature
    for name, fn in LOSSES.items():
        a = torch.randn(3, 4)
        assert fn(a, a.clone(), 1.0).ndim == 0, name


def test_feature_projector_shapes_and_errors():
    x = torch.randn(5, 96)
    assert FeatureProjector(96, 24)(x).shape == (5, 24)
    mlp = FeatureProjector(96, 24, hidden_dim=48)
    assert mlp(x).shape == (5, 24) and len(list(mlp.parameters())) == 4
    with pytest.raises(KtrayError, match="teacher_dim"):
        FeatureProjector(96, 0)
