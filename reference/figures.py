"""The paper's figures from a run's results (matplotlib, Agg backend: no display needed).

- fig1_lr_momentum.png: the cosine lr, and mu of baseline / 1cycle / physics with the unclamped
  critical curve mu_c = 1 - 2 sqrt(lr); red above it (underdamped), blue below (overdamped).
- fig2_test_accuracy.png: test accuracy per epoch of every trained method.
- fig3_regimes.png: the damping regime of every epoch, one strip per method.
- grad_norms.png: per-group grad norm on misclassified test images (the paper's criterion)
  beside the size-free specificity with its 95% intervals.
- corrections.png: errors fixed / new / net of corrections A-E (first seed), and the net of
  correction A's control arms (and the specific criterion's), pooled over every run seed and
  treatment seed, with min-max bars.
- per_class_A.png: per-class test accuracy before and after correction A.

With several seeds the per-epoch curves (figures 1 and 2) are the mean over seeds with the
min-max range shaded (:func:`mean_and_band`), figure 3 has one thin strip per seed in each
method's row, and the per-class bars are means with min-max error bars; the gradient and
correction figures are the first seed's. Every caption says which seeds it shows.
"""

from __future__ import annotations

from pathlib import Path

import dampopt

from . import files, needs_extra

with needs_extra():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

COLORS = {"baseline": "tab:blue", "1cycle": "tab:orange", "physics": "tab:green",
          "ikfad": "tab:purple", "cd": "tab:brown", "adam": "tab:gray",
          "hybrid-mid": "tab:red", "hybrid-epoch": "tab:pink"}  # fmt: skip
REGIME_COLORS = {"underdamped": "#d62728", "critical": "#2ca02c", "overdamped": "#1f77b4"}
CAPTIONS = {
    "fig1_lr_momentum.png": "Fig. 1: cosine lr and momentum trajectories with the critical curve",
    "fig2_test_accuracy.png": "Fig. 2: test accuracy during training",
    "fig3_regimes.png": "Fig. 3: damping regime of every epoch",
    "grad_norms.png": "Per-group gradient norm on errors and specificity (baseline)",
    "corrections.png": "Corrections A-E (first seed), and correction A against control arms "
                       "(pooled over every seed)",
    "per_class_A.png": "Per-class test accuracy before / after correction A",
}
# drawn from every seed's results; the other figures from the first seed's
EVERY_SEED = ("fig1_lr_momentum.png", "fig2_test_accuracy.png", "fig3_regimes.png",
             "per_class_A.png")  # fmt: skip


def mean_and_band(curves) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean, min, max)`` over seeds, per epoch, of equal-length curves (one per seed).

    None (a value a method does not have) becomes NaN, which matplotlib leaves out.
    """
    values = np.array([[np.nan if v is None else v for v in curve] for curve in curves],
                      dtype=float)  # fmt: skip
    if values.ndim != 2 or not len(values):
        raise ValueError("mean_and_band needs one or more curves of the same length")
    return values.mean(axis=0), values.min(axis=0), values.max(axis=0)


def _seeds_note(count: int) -> str:
    return "" if count == 1 else f" (mean of {count} seeds, shaded: min-max)"


def _curve(ax, epochs, curves, color, label, **style) -> None:
    """The mean of ``curves``, and with several seeds their min-max band."""
    mean, low, high = mean_and_band(curves)
    ax.plot(epochs, mean, color=color, label=label, **style)
    if len(curves) > 1:
        ax.fill_between(epochs, low, high, color=color, alpha=0.2, linewidth=0)


def _save(fig, path: Path) -> None:
    try:
        with files.atomic_path(path) as temporary:
            fig.savefig(temporary, dpi=110, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)


def figure_1(runs: list, path: Path) -> None:
    """``runs``: Experiment 1's ``methods`` of every seed."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    note = _seeds_note(len(runs))
    lr, _, _ = mean_and_band([methods["baseline"]["lr"] for methods in runs])
    epochs = np.arange(1, len(lr) + 1)
    _curve(left, epochs, [methods["baseline"]["lr"] for methods in runs], "black", None)
    left.set(xlabel="epoch", ylabel="learning rate", title="Cosine learning rate" + note)
    mu_c = np.array([dampopt.critical_momentum(x) for x in lr])
    right.fill_between(epochs, mu_c, 1.0, color=REGIME_COLORS["underdamped"], alpha=0.12,
                       label="underdamped (mu > mu_c)")
    right.fill_between(epochs, min(mu_c.min(), 0.3), mu_c, color=REGIME_COLORS["overdamped"],
                       alpha=0.12, label="overdamped (mu < mu_c)")  # fmt: skip
    right.plot(epochs, mu_c, "--", color="gray", label="mu_c = 1 - 2 sqrt(lr)")
    for name in ("baseline", "1cycle", "physics"):
        _curve(right, epochs, [methods[name]["mu"] for methods in runs], COLORS[name], name)
    right.set(xlabel="epoch", ylabel="momentum", title="Momentum" + note,
              ylim=(min(mu_c.min(), 0.3), 1))  # fmt: skip
    right.legend(fontsize=7)
    _save(fig, path)


def figure_2(runs: list, thresholds, path: Path) -> None:
    """``runs``: every trained method's summary, one dict per seed."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in runs[0]:
        curves = [methods[name]["test_accuracy"] for methods in runs]
        _curve(ax, range(1, len(curves[0]) + 1), curves, COLORS.get(name), name)
    for threshold in thresholds:
        ax.axhline(threshold, color="gray", lw=0.5, ls=":")
    ax.set(xlabel="epoch", ylabel="test accuracy",
           title="Test accuracy during training" + _seeds_note(len(runs)))  # fmt: skip
    ax.legend(fontsize=8)
    _save(fig, path)


MOMENTUM_METHODS = ("baseline", "1cycle", "physics", "hybrid-mid", "hybrid-epoch")


def figure_3(runs: list, path: Path) -> None:
    """``runs``: every trained method's summary, one dict per seed; a strip per seed."""
    # SGD-momentum methods only: Adam's beta1 is not the heavy-ball momentum of the oscillator.
    names = [n for n in MOMENTUM_METHODS if n in runs[0]]
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.5 * len(names)))
    order = list(REGIME_COLORS)
    height = 0.8 / len(runs)  # the row's 0.8, one strip per seed (bottom: the first seed)
    strip = height if len(runs) == 1 else 0.85 * height  # with a gap between seeds
    for row, name in enumerate(names):
        for k, methods in enumerate(runs):
            center = row - 0.4 + height * (k + 0.5)
            for epoch, regime in enumerate(methods[name]["regime_per_epoch"], start=1):
                ax.barh(center, 1, height=strip, left=epoch - 0.5, color=REGIME_COLORS[regime],
                        edgecolor="none")  # fmt: skip
    ax.set_yticks(range(len(names)), names)
    seeds = "" if len(runs) == 1 else f"; one strip per seed, {len(runs)} seeds"
    ax.set(xlabel="epoch",
           title=f"Damping regime (red under-, green critically, blue overdamped{seeds})")
    handles = [plt.Rectangle((0, 0), 1, 1, color=REGIME_COLORS[r]) for r in order]
    ax.legend(handles, order, fontsize=7, loc="upper right", bbox_to_anchor=(1, -0.25), ncol=3)
    _save(fig, path)


def grad_norm_figure(localization: dict, specific: dict, path: Path) -> None:
    """Left: grad norm on the errors (the paper's criterion); right: specificity, 95% intervals."""
    groups = list(localization["grad_norms"])
    x = np.arange(len(groups))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    errors = np.array([localization["grad_norms"][g] for g in groups])
    left.bar(x, errors, 0.6, color=["tab:red" if g in localization["problem_layers"] else
                                    "tab:gray" for g in groups])  # fmt: skip
    left.set_xticks(x, groups, fontsize=8)
    left.set(ylabel="grad norm of the mean loss on the errors",
             title="Paper's criterion (red: flagged, above the median)")  # fmt: skip
    values = [specific["specificity"].get(g) for g in groups]
    for i, g in enumerate(groups):
        if values[i] is None:
            continue
        interval = specific["intervals"].get(g)
        low, high = interval if interval is not None else (values[i], values[i])
        color = "tab:red" if g in specific["problem_layers"] else "tab:gray"
        right.errorbar(i, values[i], yerr=[[values[i] - low], [high - values[i]]], fmt="o",
                       color=color, capsize=3)  # fmt: skip
    right.axhline(1.0, color="black", lw=0.6, ls=":")
    right.set_xticks(x, groups, fontsize=8)
    right.set(ylabel="specificity (1 = as other images)",
              title="Size-free specificity, 95% interval (red: Holm p < 0.05)")  # fmt: skip
    _save(fig, path)


def corrections_figure(corrections: dict, controls: list, path: Path) -> None:
    """Left: fixed / new / net of A-E; right: net of each control arm over treatment seeds.

    ``controls``: ``(label, [treat_controls result or None, one per run seed])`` pairs; each
    arm's bar is the mean net over every run seed and treatment seed, its error bar the min-max.
    """
    keys = list(corrections)
    fixed = [corrections[k]["fixed"] for k in keys]
    new = [corrections[k]["new"] for k in keys]
    net = [corrections[k]["net"] for k in keys]
    x = np.arange(len(keys))
    fig, (ax, arms_ax) = plt.subplots(1, 2, figsize=(12, 4.2),
                                      gridspec_kw={"width_ratios": [1, 1.3]})  # fmt: skip
    ax.bar(x - 0.27, fixed, 0.27, label="fixed", color="tab:green")
    ax.bar(x, new, 0.27, label="new errors", color="tab:red")
    ax.bar(x + 0.27, net, 0.27, label="net", color="tab:gray")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(x, [k + "\n" + ("\n".join(corrections[k]["layers"]) or "mask") for k in keys],
                  fontsize=7)  # fmt: skip
    ax.set(ylabel="verify-half images", title="Before/after correction")
    ax.legend(fontsize=8)
    shown = []
    for label, per_seed in controls:
        runs = [found for found in per_seed if found is not None]
        if runs:
            pooled = {}
            for found in runs:
                for arm, info in found["summary"].items():
                    pooled.setdefault(arm, []).extend(info["net"])
            shown.append((label, {"arms": pooled, "summary": {a: {"net": n}
                                                               for a, n in pooled.items()}}))
    width = 0.8 / max(len(shown), 1)
    names = []
    for _, found in shown:
        for arm in found["arms"]:
            if arm not in names:
                names.append(arm)
    for k, (label, found) in enumerate(shown):
        for i, arm in enumerate(names):
            if arm not in found["summary"]:
                continue
            nets = found["summary"][arm]["net"]
            mean = float(np.mean(nets))
            arms_ax.bar(i - 0.4 + width * (k + 0.5), mean, width,
                        yerr=[[mean - min(nets)], [max(nets) - mean]], capsize=2,
                        color="tab:red" if arm == "flagged" else f"C{k}",
                        label=label if i == 1 else None)  # fmt: skip
    arms_ax.axhline(0, color="black", lw=0.6)
    arms_ax.set_xticks(range(len(names)), names, fontsize=7, rotation=20)
    arms_ax.set(ylabel="net (verify half)",
                title="Same budget, other groups (mean; bars: min-max over all seeds)")
    if shown:
        arms_ax.legend(fontsize=7)
    _save(fig, path)


def per_class_figure(corrections: list, classes, path: Path) -> None:
    """Grouped bars: each class's accuracy before and after correction A (one dict per seed)."""
    before = mean_and_band([c["per_class_before"] for c in corrections])
    after = mean_and_band([c["per_class_after"] for c in corrections])
    x = np.arange(len(before[0]))
    names = list(classes) if classes is not None and len(classes) == len(x) else x.tolist()
    fig, ax = plt.subplots(figsize=(max(7, 0.7 * len(x)), 4))
    for offset, (mean, low, high), label, color in (
        (-0.2, before, "before", "tab:blue"), (0.2, after, "after", "tab:green"),
    ):  # fmt: skip
        errors = np.array([mean - low, high - mean]) if len(corrections) > 1 else None
        ax.bar(x + offset, mean, 0.4, yerr=errors, capsize=2, label=label, color=color)
    ax.set_xticks(x, [str(n) for n in names], rotation=30, ha="right", fontsize=8)
    seeds = "" if len(corrections) == 1 else f" (mean of {len(corrections)} seeds, bars: min-max)"
    layers = ", ".join(corrections[0]["layers"]) or "mask"
    ax.set(ylabel="test accuracy of the class", ylim=(0, 1.05),
           title=f"Per-class accuracy, correction A ({layers}){seeds}")  # fmt: skip
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    _save(fig, path)


def write_figures(per_seed: dict, preset, directory: Path, classes=None) -> dict:
    """All figures for ``per_seed`` ({seed: results}, in seed order); {file name: caption}.

    ``classes``: the class names for the per-class figure (else class indices). The figure is
    left out when correction A's results hold no per-class accuracies (a correction cached
    by an older version and resumed).
    """
    directory.mkdir(parents=True, exist_ok=True)
    seeds = list(per_seed)
    runs = [per_seed[s] for s in seeds]
    every_method = [{**r["experiment_3"]["trainings"], **r["experiment_4"]["methods"]}
                    for r in runs]  # fmt: skip
    first = runs[0]
    figure_1([r["experiment_1"]["methods"] for r in runs], directory / "fig1_lr_momentum.png")
    figure_2(every_method, preset.thresholds, directory / "fig2_test_accuracy.png")
    figure_3(every_method, directory / "fig3_regimes.png")
    e2 = first["experiment_2"]
    grad_norm_figure(e2["localization"], e2["specific_localization"],
                     directory / "grad_norms.png")  # fmt: skip
    corrections_figure(first["experiment_3"]["corrections"],
                       [("paper's flagged", [r["experiment_2"]["controls"] for r in runs]),
                        ("specific flagged",
                         [r["experiment_2"]["specific_controls"] for r in runs])],
                       directory / "corrections.png")  # fmt: skip
    written = ["fig1_lr_momentum.png", "fig2_test_accuracy.png", "fig3_regimes.png",
               "grad_norms.png", "corrections.png"]  # fmt: skip
    a = [r["experiment_3"]["corrections"]["A"] for r in runs]
    if all("per_class_before" in c and "per_class_after" in c for c in a):
        per_class_figure(a, classes, directory / "per_class_A.png")
        written.append("per_class_A.png")
    every_seed = ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))
    return {name: f"{CAPTIONS[name]} ({every_seed if name in EVERY_SEED else f'seed {seeds[0]}'})"
            for name in written}  # fmt: skip
