import math

import pytest

from dampopt import classify_regime, critical_momentum, physics_momentum


def test_critical_momentum_is_one_minus_two_sqrt_curvature_lr():
    assert critical_momentum(0.01) == pytest.approx(0.8)
    assert critical_momentum(0.1) == pytest.approx(1 - 2 * math.sqrt(0.1))  # 0.368, Table 15
    assert critical_momentum(0.01, curvature=4.0) == pytest.approx(0.6)
    assert critical_momentum(1.0) == pytest.approx(-1.0)  # unclamped
    assert critical_momentum(0.0) == 1.0


def test_physics_momentum_clamps_to_paper_bounds():
    assert physics_momentum(0.1) == 0.5  # raw 0.368 clamped up (paper Sec. 4.1)
    assert physics_momentum(1e-4) == pytest.approx(0.98)
    assert physics_momentum(1e-8) == 0.99
    assert physics_momentum(0.01, mu_min=0.85, mu_max=0.95) == 0.85


@pytest.mark.parametrize(
    "mu, lr, expected",
    [
        (0.9, 0.1, "underdamped"),  # Table 15 epoch 1: dmu = +0.532
        (0.9, 0.00279, "critical"),  # epoch 180: +0.006
        (0.9, 0.00011, "overdamped"),  # epoch 200: -0.079
    ],
)
def test_classify_regime_matches_table_15(mu, lr, expected):
    assert classify_regime(mu, lr) == expected


def test_classify_regime_band_edges():
    lr = 0.01  # mu_c = 0.8
    assert classify_regime(0.86, lr) == "underdamped"
    assert classify_regime(0.84, lr) == "critical"
    assert classify_regime(0.76, lr) == "critical"
    assert classify_regime(0.74, lr) == "overdamped"
    assert classify_regime(0.84, lr, tol=0.01) == "underdamped"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: critical_momentum(-0.1), "lr must be >= 0"),
        (lambda: critical_momentum(float("nan")), "lr must be finite"),
        (lambda: critical_momentum(0.1, curvature=-1), "curvature"),
        (lambda: physics_momentum(0.1, mu_min=0.9, mu_max=0.5), "mu_min must be <= mu_max"),
        (lambda: physics_momentum(0.1, mu_max=1.0), r"mu_max must be in \[0, 1\)"),
        (lambda: physics_momentum(0.1, mu_min=-0.1), r"mu_min must be in \[0, 1\)"),
        (lambda: classify_regime(0.9, 0.1, tol=-1), "tol"),
        (lambda: classify_regime(1.5, 0.1), "mu must be in"),
    ],
)
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_non_numbers_are_type_errors():
    with pytest.raises(TypeError, match="lr must be a real number"):
        critical_momentum("0.1")
