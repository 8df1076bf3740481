"""Paired step timings on ResNet-18's parameter shapes: every case once per round, in a new
random order each round, so that each ratio to a twin is taken within one round (a shared
machine's load moves both sides alike) and reported as the median over rounds with its spread.

    python -m benchmarks.paired_steps --threads 1 [--rounds 31] [--load 1]

``--load N`` runs N busy-looping processes during the measurement (a loaded machine);
``TORCHINDUCTOR_CACHE_DIR`` chooses the inductor cache (empty: the first steps include a cold
compile). Prints one row per case - first step (seconds, compile included), median ms per
step, median per-round ratio to its memory-traffic twin with the 10th-90th percentile range -
and the issue-15 targets.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import statistics
import time

import torch

from dampopt import PhysicsSGD

from .cases import Case, cases, make_parameters
from .report import BASELINE_FACTOR, TWIN_BOUND_CPU

ADAM, SGD = "torch Adam(fused)", "torch SGD(fused)"
TWINS = {"iKFAD": ADAM, "CADAM": ADAM, "Adam": ADAM, "CD": SGD, "SGD": SGD, "PhysicsSGD": SGD}


def _burn() -> None:  # a busy loop: one core's worth of another job
    while True:
        pass


def _percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--load", type=int, default=0, help="busy processes during the run")
    parser.add_argument("--only", nargs="*", help="case labels to time (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    chosen = cases(device, "ResNet-18") + [
        Case("torch SGD(default)", "SGD", "default", "sgd-like",
             lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)),
        Case("PhysicsSGD(default)", "PhysicsSGD", "default", "sgd-like",
             lambda p: PhysicsSGD(p, lr=0.01)),
    ]  # fmt: skip
    if args.only:
        chosen = [c for c in chosen if c.label in args.only or c.label in TWINS.values()]
    burners = [multiprocessing.Process(target=_burn, daemon=True) for _ in range(args.load)]
    for burner in burners:
        burner.start()
    try:
        optimizers, first = {}, {}
        for case in chosen:
            optimizer = case.build(make_parameters("ResNet-18", device))
            start = time.perf_counter()
            optimizer.step()
            first[case.label] = time.perf_counter() - start
            optimizers[case.label] = optimizer
        times = {label: [] for label in optimizers}
        load_start = os.getloadavg()[0]
        for _ in range(args.rounds):
            labels = list(optimizers)
            random.shuffle(labels)
            for label in labels:
                start = time.perf_counter()
                optimizers[label].step()
                times[label].append(time.perf_counter() - start)
        load_end = os.getloadavg()[0]
    finally:
        for burner in burners:
            burner.terminate()
    print(f"threads {args.threads}, rounds {args.rounds}, busy processes {args.load}, load "
          f"average {load_start:.2f} -> {load_end:.2f}, torch {torch.__version__}")  # fmt: skip
    print("| case | first step s | median ms | / twin (p10-p90) |\n|---|---:|---:|---|")
    by_rule = {case.label: case.rule for case in chosen}
    for label, values in times.items():
        twin = TWINS[by_rule[label]]
        ratios = [a / b for a, b in zip(values, times[twin])]
        print(f"| {label} | {first[label]:.2f} | {statistics.median(values) * 1e3:.2f} | "
              f"{statistics.median(ratios):.2f} ({_percentile(ratios, 0.1):.2f}-"
              f"{_percentile(ratios, 0.9):.2f}) vs {twin} |")  # fmt: skip
    print("\ntargets (median per-round ratio):")
    for rule, bound in TWIN_BOUND_CPU.items():
        label, twin = f"{rule} [compiled]", TWINS[rule]
        if label in times:
            ratio = statistics.median(a / b for a, b in zip(times[label], times[twin]))
            verdict = "met" if ratio <= bound else "MISSED"
            print(f"  {label} / {twin} = {ratio:.2f} <= {bound}: {verdict}")
    for rule in ("iKFAD", "CD", "CADAM"):
        ours, baseline = f"{rule} [compiled]", f"{rule} published (baseline)"
        if ours in times and baseline in times:
            ratio = statistics.median(b / a for a, b in zip(times[ours], times[baseline]))
            verdict = "met" if ratio >= BASELINE_FACTOR else "MISSED"
            print(f"  {baseline} / {ours} = {ratio:.2f} >= {BASELINE_FACTOR:g}: {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
