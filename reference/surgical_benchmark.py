#!/usr/bin/env python
"""Does the diagnosis pick the right layers? Surgical fine-tuning under shift, against an oracle.

    python reference/surgical_benchmark.py                   # quick preset, seeds 42 43 44
    python reference/surgical_benchmark.py --preset smoke    # what the tests run
    python reference/surgical_benchmark.py --out runs/b --resume

Method (after Lee et al. 2023, "Surgical fine-tuning improves adaptation to distribution
shifts"). A source model - the preset's baseline (SGD, mu = 0.9), trained as in
reproduce_paper.py - is adapted to shifted data: the preset's test set is split in two (by
the seed), and each shift (shifts.py: Gaussian noise, blur, contrast and impulse noise at two
severities; a permutation of some labels) is applied to both halves, one a small labelled
target training set, the other the target test set. The oracle fine-tunes each single layer
group alone, and all groups, for the same budget (``FINE_TUNE_EPOCHS`` epochs of physics
momentum from ``FINE_TUNE_LR``, the same batches) and records the target test accuracy; its
ranking of the groups by gain is the ground truth. Each localizer runs on the source model with
the target training set's errors as failures: grad_norm with the paper's median rule,
relative (Auto-RGN's signal), rms, specificity and probe (flagging by ``rule="significant"``),
and a random ranking. (Friction needs an iKFAD-trained source model; not run here.) Scores per
shift and localizer: is the oracle's best group ranked first / flagged, the Spearman correlation
of the localizer's values with the oracle's gains, and the gain of fine-tuning the localizer's
top group as a fraction of the oracle-best group's gain, at what fraction of the oracle's cost.
Cost is counted in example passes (forward 1, backward 2); measured seconds are shown beside.

Writes ``runs/bench-<timestamp>/`` (or ``--out``): report.md, results.json, figures/ (one per
shift), checkpoints/ (the source models and each finished shift, for ``--resume``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: the package runs it
    from dampopt.reference import run_file

    run_file(__file__)

import torch  # noqa: E402

from dampopt import diagnostics  # noqa: E402

from . import data as datasets  # noqa: E402
from . import experiments, files  # noqa: E402
from . import shifts as shift_builders  # noqa: E402
from .data import TensorLoader, epoch_seed  # noqa: E402
from .models import LAYER_GROUPS  # noqa: E402
from .presets import PRESETS  # noqa: E402
from .reproduce_paper import (  # noqa: E402
    UsageError,
    choose_device,
    common_arguments,
    environment,
    load_arrays,
    output_directory,
)
from .training import Settings  # noqa: E402

FINE_TUNE_EPOCHS = 2
FINE_TUNE_LR = 0.05
TARGET_BATCH = 128
PROBE_STEPS = 10
LOCALIZERS = ("grad_norm", "relative", "rms", "specificity", "probe", "random")
EARLY_GROUPS = ("conv1", "bn1", "layer1")  # Lee et al.: input shifts want the first blocks
SHIFT_STREAM = 0x5EED_0001  # epoch_seed stream of the corruption draws
SMOKE_SHIFTS = ("noise-1", "labels-1")


def parse_args(argv=None) -> argparse.Namespace:
    parser = common_arguments(__doc__.split("\n")[0], [42, 43, 44], "runs/bench-<timestamp>")
    return parser.parse_args(argv)


# -- the oracle ----------------------------------------------------------------------------------


def passes(examples_forward: int, examples_backward: int) -> int:
    """Cost in example passes: a forward counts 1, a backward 2."""
    return examples_forward + 3 * examples_backward


def oracle(model, train_loader, test_loader, groups, epochs=FINE_TUNE_EPOCHS, lr=FINE_TUNE_LR,
           seed=0, weight_decay=0.0) -> dict:  # fmt: skip
    """Fine-tune each group alone, and all of them, at the same budget; test accuracy of each.

    ``train_loader``: a ``seed -> loader`` factory (every arm the same batches). Returns
    ``{arm: {"layers", "accuracy", "steps", "trainable_elements", "seconds", "cost"}}`` with
    ``"all"`` last.
    """
    arms = {name: [name] for name in groups}
    arms["all"] = list(groups)
    labels, _ = diagnostics.predict(model, test_loader)
    out = {}
    for arm, layers in arms.items():
        loader = train_loader(seed)
        corrected, report = diagnostics.treat(
            model, loader, layers=layers, epochs=epochs, lr=lr, optimizer="physics", seed=seed,
            weight_decay=weight_decay, progress=False,
        )  # fmt: skip
        _, after = diagnostics.predict(corrected, test_loader)
        examples = report.steps * TARGET_BATCH
        out[arm] = {
            "layers": layers,
            "accuracy": float((after == labels).double().mean()),
            "steps": report.steps,
            "trainable_elements": report.trainable_elements,
            "seconds": report.wall_time_s,
            "cost": passes(examples + len(labels), examples),
        }
    return out


# -- scoring -------------------------------------------------------------------------------------


def spearman(a: list, b: list) -> float | None:
    """Spearman rank correlation (average ranks for ties); None when either side is constant."""

    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return None
    return sum((x - ma) * (y - mb) for x, y in zip(ra, rb)) / math.sqrt(va * vb)


def score(values: dict, flagged: list, gains: dict, cost: int, oracle_cost: int) -> dict:
    """One localizer on one shift: its top group against the oracle's gains per group."""
    groups = list(gains)
    top = max(groups, key=lambda g: values[g])
    best = max(groups, key=lambda g: gains[g])
    fraction = gains[top] / gains[best] if gains[best] > 0 else None
    return {
        "top": top,
        "best": best,
        "top_is_best": top == best,
        "best_flagged": best in flagged,
        "flagged": list(flagged),
        "spearman": spearman([values[g] for g in groups], [gains[g] for g in groups]),
        "top_gain": gains[top],
        "best_gain": gains[best],
        "fraction_of_best": fraction,
        "cost": cost,
        "cost_fraction": cost / oracle_cost,
    }


def localizers(model, train_loader, fixed_train, groups, seed) -> dict:
    """Every localizer's values per group, flagged groups, counted cost and measured seconds.

    grad_norm, relative, rms and specificity come from one pass (``localize`` computes the
    grad norms and the specificity test in every gradient pass; relative and rms only rescale
    the grad norm per group, and all four share the significant rule's test), each counted at
    the cost of that one pass, as a user running only one of them would pay.
    """
    start = time.perf_counter()
    where = diagnostics.localize(model, fixed_train, criterion="specificity", rule="significant",
                                 seed=seed, progress=False)  # fmt: skip
    seconds = time.perf_counter() - start
    backward = where.num_errors + where.correct_sample_size
    cost = passes(where.num_examples + backward, backward)
    params = diagnostics.layer_groups(model)
    weight = {g: math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in params[g]))
              for g in groups}  # fmt: skip
    grad = where.grad_norms
    values = {
        "grad_norm": dict(grad),
        "relative": {g: grad[g] / weight[g] if weight[g] else 0.0 for g in groups},
        "rms": {g: grad[g] / math.sqrt(where.group_sizes[g]) for g in groups},
        "specificity": dict(where.norms),
    }
    out = {name: {"values": v, "flagged": list(where.problem_layers),
                  "adjusted_p_values": dict(where.adjusted_p_values), "cost": cost,
                  "seconds": seconds} for name, v in values.items()}  # fmt: skip
    # grad_norm flags with the paper's rule (above the median), the others with their test
    out["grad_norm"]["flagged"] = diagnostics.select_problem_layers(grad, "median")
    start = time.perf_counter()
    probe = diagnostics.localize(model, fixed_train, criterion="probe", rule="significant",
                                 seed=seed, probe_loader=train_loader(seed),
                                 probe_steps=PROBE_STEPS, progress=False)  # fmt: skip
    trained = probe.probe_cost["training_steps"] * TARGET_BATCH
    out["probe"] = {"values": dict(probe.norms), "flagged": list(probe.problem_layers),
                    "adjusted_p_values": dict(probe.adjusted_p_values),
                    "cost": cost + passes(trained + len(groups) * backward, trained),
                    "seconds": time.perf_counter() - start}  # fmt: skip
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed))
    out["random"] = {"values": {g: float(len(groups) - int(order[i])) for i, g in
                                enumerate(groups)}, "flagged": [], "cost": 0, "seconds": 0.0}
    return out


# -- one seed ------------------------------------------------------------------------------------


def run_seed(preset, data, settings, shifts, progress=False) -> dict:
    lab = experiments.Lab(preset, data, settings)
    source = lab.trained("baseline")
    first, second = diagnostics.split_halves(range(len(data.test_labels)), seed=settings.seed)
    device = data.test_labels.device
    train_rows = torch.tensor(first.indices, device=device)
    test_rows = torch.tensor(second.indices, device=device)
    unit = data.to_unit(data.test_images)
    results = {}
    for k, shift in enumerate(shifts):
        cache = settings.checkpoint_dir / f"shift-{shift.name}.pt"
        if settings.resume and cache.exists():
            results[shift.name] = files.load(cache)
            continue
        images, labels = shift_builders.apply(shift, unit, data.test_labels,
                                              seed=epoch_seed(settings.seed, k, SHIFT_STREAM))
        images = data.from_unit(images)
        x_train, y_train = images[train_rows], labels[train_rows]
        x_test, y_test = images[test_rows], labels[test_rows]

        def train_loader(seed, x=x_train, y=y_train):
            return TensorLoader(x, y, TARGET_BATCH, train=True, seed=seed,
                                crop_padding=settings.crop_padding)  # fmt: skip

        test_loader = TensorLoader(x_test, y_test, 500, train=False)
        fixed_train = TensorLoader(x_train, y_train, 250, train=False)
        labels_test, before = diagnostics.predict(source.model, test_loader)
        source_accuracy = float((before == labels_test).double().mean())
        arms = oracle(source.model, train_loader, test_loader, LAYER_GROUPS, seed=settings.seed,
                      weight_decay=preset.weight_decay)  # fmt: skip
        gains = {g: arms[g]["accuracy"] - source_accuracy for g in LAYER_GROUPS}
        oracle_cost = sum(arm["cost"] for arm in arms.values())
        found = localizers(source.model, train_loader, fixed_train, LAYER_GROUPS, settings.seed)
        scores = {name: score(info["values"], info["flagged"], gains, info["cost"], oracle_cost)
                  for name, info in found.items()}  # fmt: skip
        results[shift.name] = {
            "shift": vars(shift), "source_accuracy": source_accuracy, "oracle": arms,
            "gains": gains, "all_gain": arms["all"]["accuracy"] - source_accuracy,
            "oracle_cost": oracle_cost,
            "oracle_seconds": sum(arm["seconds"] for arm in arms.values()),
            "localizers": found, "scores": scores,
        }  # fmt: skip
        files.save(results[shift.name], cache)
        if progress:
            best = max(gains, key=gains.get)
            print(f"seed {settings.seed} {shift.name}: source {source_accuracy:.1%}, best "
                  f"{best} {gains[best]:+.1%}, all {results[shift.name]['all_gain']:+.1%}; "
                  + ", ".join(f"{n} {s['top']}" for n, s in scores.items()), flush=True)
    return results


# -- summary, report, figures -------------------------------------------------------------------


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(per_seed: dict, shifts) -> dict:
    """Means over seeds per shift and localizer, the aim, and Lee et al.'s pattern."""
    seeds = list(per_seed)
    table, best_groups = {}, {}
    for shift in shifts:
        runs = [per_seed[s][shift.name] for s in seeds]
        mean_gain = {g: statistics.fmean(r["gains"][g] for r in runs) for g in LAYER_GROUPS}
        best_groups[shift.name] = max(mean_gain, key=mean_gain.get)
        row = {"source_accuracy": _mean_std([r["source_accuracy"] for r in runs]),
               "gains": {g: _mean_std([r["gains"][g] for r in runs]) for g in LAYER_GROUPS},
               "all_gain": _mean_std([r["all_gain"] for r in runs]),
               "best_group": best_groups[shift.name], "localizers": {}}  # fmt: skip
        for name in LOCALIZERS:
            s = [r["scores"][name] for r in runs]
            row["localizers"][name] = {
                "fraction_of_best": _mean_std([x["fraction_of_best"] for x in s]),
                "top_is_best": sum(x["top_is_best"] for x in s),
                "best_flagged": sum(x["best_flagged"] for x in s),
                "spearman": _mean_std([x["spearman"] for x in s]),
                "cost_fraction": _mean_std([x["cost_fraction"] for x in s]),
                "tops": [x["top"] for x in s],
            }
        table[shift.name] = row
    aim = {}
    for name in LOCALIZERS:
        fractions = [table[sh.name]["localizers"][name]["fraction_of_best"][0] for sh in shifts]
        costs = [table[sh.name]["localizers"][name]["cost_fraction"][0] for sh in shifts]
        worst = min((f for f in fractions if f is not None), default=None)
        aim[name] = {"worst_fraction": worst, "max_cost_fraction": max(costs),
                     "reached": worst is not None and worst >= 0.9 and max(costs) <= 1 / 3}
    inputs = [sh.name for sh in shifts if sh.kind == "input"]
    outputs = [sh.name for sh in shifts if sh.kind == "output"]
    early = sum(best_groups[n] in EARLY_GROUPS for n in inputs)
    last = sum(best_groups[n] == "fc" for n in outputs)
    pattern = {"input_shifts_early_best": f"{early}/{len(inputs)}",
               "output_shifts_last_best": f"{last}/{len(outputs)}",
               "held": early == len(inputs) and last == len(outputs)}  # fmt: skip
    return {"seeds": seeds, "table": table, "aim": aim, "lee_pattern": pattern}


def _fmt(pair, percent=False, signed=False):
    mean, std = pair
    if mean is None:
        return "-"
    if percent:
        text = f"{mean:+.1%}" if signed else f"{mean:.1%}"
        return text if std is None else f"{text} ± {std:.1%}"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def render(summary: dict, preset, shifts, wall: float) -> str:
    seeds = summary["seeds"]
    n = len(seeds)
    lines = [
        "# Surgical fine-tuning benchmark: does the diagnosis pick the right layers?", "",
        f"Preset **{preset.name}** ({preset.description}); seeds {', '.join(map(str, seeds))} "
        f"(mean ± std over seeds). Source: the preset's baseline model. Target: the test set "
        f"split by the seed into a target training half and a target test half, both shifted. "
        f"Oracle and localizer choices fine-tune {FINE_TUNE_EPOCHS} epochs, physics momentum "
        f"from lr {FINE_TUNE_LR} (cosine to lr/100), batch {TARGET_BATCH}, the same batches "
        f"per seed. Probe: {PROBE_STEPS} steps per group. Wall time {wall:.0f} s.", "",
        "## Oracle: target test accuracy gain of fine-tuning one group (or all)", "",
        "| shift | source acc. | " + " | ".join(LAYER_GROUPS) + " | all | best |",
        "|---" * (len(LAYER_GROUPS) + 4) + "|",
    ]  # fmt: skip
    table = summary["table"]
    for sh in shifts:
        row = table[sh.name]
        lines.append(f"| {sh.name} | {_fmt(row['source_accuracy'], True)} | " + " | ".join(
            _fmt(row["gains"][g], True, True) for g in LAYER_GROUPS)
            + f" | {_fmt(row['all_gain'], True, True)} | {row['best_group']} |")  # fmt: skip
    lines += [
        "", "## Localizers: the top group's gain as a fraction of the oracle-best group's", "",
        f"Cell: fraction (mean ± std over seeds); top = best in k/{n} seeds; best flagged in "
        f"k/{n} (grad_norm: above the median, the paper's rule; the others: the significant "
        "rule); rho: Spearman of the values vs the gains.", "",
        "| shift | " + " | ".join(LOCALIZERS) + " |", "|---" * (len(LOCALIZERS) + 1) + "|",
    ]  # fmt: skip
    for sh in shifts:
        cells = []
        for name in LOCALIZERS:
            info = table[sh.name]["localizers"][name]
            cells.append(f"{_fmt(info['fraction_of_best'])}; top {info['top_is_best']}/{n}; "
                         f"flagged {info['best_flagged']}/{n}; rho {_fmt(info['spearman'])}")
        lines.append(f"| {sh.name} | " + " | ".join(cells) + " |")
    lines += ["", "## The aim: >= 90% of the oracle-best gain on every shift at <= 1/3 of its "
              "cost", "", "| localizer | worst shift's fraction | largest cost fraction | "
              "reached |", "|---|---|---|---|"]  # fmt: skip
    for name, aim in summary["aim"].items():
        worst = "-" if aim["worst_fraction"] is None else f"{aim['worst_fraction']:.2f}"
        lines.append(f"| {name} | {worst} | {aim['max_cost_fraction']:.3f} | "
                     f"{'yes' if aim['reached'] else '**no**'} |")
    pattern = summary["lee_pattern"]
    lines += ["", "## Lee et al.'s pattern", "",
              f"Early groups ({', '.join(EARLY_GROUPS)}) best for input shifts: "
              f"{pattern['input_shifts_early_best']}; the last (fc) best for the label shift: "
              f"{pattern['output_shifts_last_best']} -> "
              + ("**held**" if pattern["held"] else "**not held**") + " on this data.", "",
              "## Figures", ""]  # fmt: skip
    lines += [f"![{sh.name}](figures/{sh.name}.png)" for sh in shifts]
    return "\n".join(lines) + "\n"


def write_figures(summary: dict, shifts, directory: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    for sh in shifts:
        row = summary["table"][sh.name]
        means = [row["gains"][g][0] for g in LAYER_GROUPS]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar(range(len(LAYER_GROUPS)), means, color="tab:gray")
        for k, name in enumerate(LOCALIZERS):
            for top in set(row["localizers"][name]["tops"]):
                i = LAYER_GROUPS.index(top)
                ax.plot(i, means[i] + (k + 1) * 0.004, marker="v", ls="none", color=f"C{k}",
                        label=name if top == row["localizers"][name]["tops"][0] else None)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(range(len(LAYER_GROUPS)), LAYER_GROUPS)
        ax.set(ylabel="target accuracy gain (mean over seeds)",
               title=f"{sh.name}: oracle gain per group; markers: each localizer's top group")
        ax.legend(fontsize=7)
        fig.tight_layout()
        with files.atomic_path(directory / f"{sh.name}.png") as temporary:
            fig.savefig(temporary, dpi=110, format="png")
        plt.close(fig)


def run(args) -> dict:
    if args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}: choose one of {', '.join(PRESETS)}")
    preset = PRESETS[args.preset]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = choose_device(args.device)
    out = output_directory(args, prefix="bench-")
    arrays = load_arrays(preset, args.data_dir, not args.no_download)
    data = datasets.prepare(arrays, device, preset.train_size, preset.test_size,
                            preset.image_size, seed=0)  # fmt: skip
    shifts = shift_builders.all_shifts()
    if preset.name == "smoke":
        shifts = [sh for sh in shifts if sh.name in SMOKE_SHIFTS]
    start = time.perf_counter()
    per_seed = {}
    for seed in args.seeds:
        checkpoints = out / "checkpoints" / f"seed{seed}"
        checkpoints.mkdir(parents=True, exist_ok=True)
        settings = Settings(
            epochs=preset.epochs, batch_size=preset.batch_size, crop_padding=preset.crop_padding,
            seed=seed, device=device, channels_last=device.type == "cuda",
            bf16=device.type == "cuda", checkpoint_dir=checkpoints, log_dir=None,
            resume=args.resume, progress=not args.no_progress,
        )  # fmt: skip
        per_seed[seed] = run_seed(preset, data, settings, shifts, progress=not args.no_progress)
    wall = time.perf_counter() - start
    summary = summarize(per_seed, shifts)
    write_figures(summary, shifts, out / "figures")
    results = {"preset": preset.to_dict(), "budget": {
        "fine_tune_epochs": FINE_TUNE_EPOCHS, "fine_tune_lr": FINE_TUNE_LR,
        "target_batch": TARGET_BATCH, "probe_steps": PROBE_STEPS}, "wall_seconds": wall,
        "environment": environment(args, device, 1), "summary": summary,
        "per_seed": {str(s): r for s, r in per_seed.items()}}  # fmt: skip
    files.write_text(out / "results.json", json.dumps(results, indent=1))
    files.write_text(out / "report.md", render(summary, preset, shifts, wall))
    results["output"] = str(out)
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        results = run(args)
    except (UsageError, datasets.DataUnavailable, files.FileProblem) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1
    aim = results["summary"]["aim"]
    reached = [n for n, a in aim.items() if a["reached"]]
    print(f"aim (>= 90% of the oracle-best gain on every shift at <= 1/3 cost) reached by: "
          f"{', '.join(reached) or 'none'}; Lee et al.'s pattern "
          f"{'held' if results['summary']['lee_pattern']['held'] else 'not held'}")
    print(f"wrote {results['output']}/report.md, results.json, figures/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
