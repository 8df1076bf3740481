"""The paper's figures from one seed's results (matplotlib, Agg backend: no display needed).

- fig1_lr_momentum.png: the cosine lr, and mu of baseline / 1cycle / physics with the unclamped
  critical curve mu_c = 1 - 2 sqrt(lr); red above it (underdamped), blue below (overdamped).
- fig2_test_accuracy.png: test accuracy per epoch of every trained method.
- fig3_regimes.png: the damping regime of every epoch, one strip per method.
- grad_norms.png: per-group grad norm on misclassified vs correctly classified test images.
- corrections.png: errors fixed / new / net of corrections A-E.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = {"baseline": "tab:blue", "1cycle": "tab:orange", "physics": "tab:green",
          "ikfad": "tab:purple", "cd": "tab:brown", "adam": "tab:gray",
          "hybrid-mid": "tab:red", "hybrid-epoch": "tab:pink"}  # fmt: skip
REGIME_COLORS = {"underdamped": "#d62728", "critical": "#2ca02c", "overdamped": "#1f77b4"}
CAPTIONS = {
    "fig1_lr_momentum.png": "Fig. 1: cosine lr and momentum trajectories with the critical curve",
    "fig2_test_accuracy.png": "Fig. 2: test accuracy during training",
    "fig3_regimes.png": "Fig. 3: damping regime of every epoch",
    "grad_norms.png": "Per-group gradient norm on errors vs correct images (baseline)",
    "corrections.png": "Errors fixed / new / net of corrections A-E",
}


def _save(fig, path: Path) -> None:
    temporary = path.with_name(path.stem + ".tmp.png")
    fig.savefig(temporary, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(temporary, path)


def figure_1(methods: dict, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = np.arange(1, len(methods["baseline"]["lr"]) + 1)
    lr = np.array(methods["baseline"]["lr"])
    left.plot(epochs, lr, color="black")
    left.set(xlabel="epoch", ylabel="learning rate", title="Cosine learning rate")
    mu_c = 1 - 2 * np.sqrt(lr)
    right.fill_between(epochs, mu_c, 1.0, color=REGIME_COLORS["underdamped"], alpha=0.12,
                       label="underdamped (mu > mu_c)")
    right.fill_between(epochs, min(mu_c.min(), 0.3), mu_c, color=REGIME_COLORS["overdamped"],
                       alpha=0.12, label="overdamped (mu < mu_c)")  # fmt: skip
    right.plot(epochs, mu_c, "--", color="gray", label="mu_c = 1 - 2 sqrt(lr)")
    for name in ("baseline", "1cycle", "physics"):
        right.plot(epochs, methods[name]["mu"], color=COLORS[name], label=name)
    right.set(xlabel="epoch", ylabel="momentum", title="Momentum", ylim=(min(mu_c.min(), 0.3), 1))
    right.legend(fontsize=7)
    _save(fig, path)


def figure_2(methods: dict, thresholds, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, summary in methods.items():
        accuracy = summary["test_accuracy"]
        ax.plot(range(1, len(accuracy) + 1), accuracy, color=COLORS.get(name), label=name)
    for threshold in thresholds:
        ax.axhline(threshold, color="gray", lw=0.5, ls=":")
    ax.set(xlabel="epoch", ylabel="test accuracy", title="Test accuracy during training")
    ax.legend(fontsize=8)
    _save(fig, path)


MOMENTUM_METHODS = ("baseline", "1cycle", "physics", "hybrid-mid", "hybrid-epoch")


def figure_3(methods: dict, path: Path) -> None:
    # SGD-momentum methods only: Adam's beta1 is not the heavy-ball momentum of the oscillator.
    names = [n for n in MOMENTUM_METHODS if n in methods]
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.5 * len(names)))
    order = list(REGIME_COLORS)
    for row, name in enumerate(names):
        for epoch, regime in enumerate(methods[name]["regime_per_epoch"], start=1):
            ax.barh(row, 1, left=epoch - 0.5, color=REGIME_COLORS[regime], edgecolor="none")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="epoch", title="Damping regime (red under-, green critically, blue overdamped)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=REGIME_COLORS[r]) for r in order]
    ax.legend(handles, order, fontsize=7, loc="upper right", bbox_to_anchor=(1, -0.25), ncol=3)
    _save(fig, path)


def grad_norm_figure(localization: dict, path: Path) -> None:
    groups = list(localization["grad_norms"])
    errors = np.array([localization["grad_norms"][g] for g in groups])
    specificity = [localization["specificity"].get(g) for g in groups]
    correct = np.array([e / s if s else 0.0 for e, s in zip(errors, specificity)])
    x = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(x - 0.2, errors, 0.4, label="misclassified images", color="tab:red")
    ax.bar(x + 0.2, correct, 0.4, label="correctly classified sample", color="tab:blue")
    for i, g in enumerate(groups):
        if g in localization["problem_layers"]:
            ax.annotate("flagged", (i - 0.2, errors[i]), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, groups)
    ax.set(ylabel="grad norm of the mean loss", title="Gradient attribution (baseline)")
    ax.legend(fontsize=8)
    _save(fig, path)


def corrections_figure(corrections: dict, path: Path) -> None:
    keys = list(corrections)
    fixed = [corrections[k]["fixed"] for k in keys]
    new = [corrections[k]["new"] for k in keys]
    net = [corrections[k]["net"] for k in keys]
    x = np.arange(len(keys))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(x - 0.27, fixed, 0.27, label="fixed", color="tab:green")
    ax.bar(x, new, 0.27, label="new errors", color="tab:red")
    ax.bar(x + 0.27, net, 0.27, label="net", color="tab:gray")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(x, [f"{k}\n{', '.join(corrections[k]['layers']) or 'mask'}" for k in keys],
                  fontsize=7)  # fmt: skip
    ax.set(ylabel="test images", title="Before/after correction")
    ax.legend(fontsize=8)
    _save(fig, path)


def write_figures(results: dict, preset, directory: Path) -> dict:
    """All figures for one seed's ``results``; returns {file name: caption}."""
    directory.mkdir(parents=True, exist_ok=True)
    e1, e2, e3, e4 = (results[f"experiment_{i}"] for i in range(1, 5))
    every_method = {**e3["trainings"], **e4["methods"]}
    figure_1(e1["methods"], directory / "fig1_lr_momentum.png")
    figure_2(every_method, preset.thresholds, directory / "fig2_test_accuracy.png")
    figure_3(every_method, directory / "fig3_regimes.png")
    grad_norm_figure(e2["localization"], directory / "grad_norms.png")
    corrections_figure(e3["corrections"], directory / "corrections.png")
    return dict(CAPTIONS)
