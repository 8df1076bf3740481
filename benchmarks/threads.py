"""Training throughput of the reference loop by thread count and OpenMP wait policy, on a quiet
and on a loaded machine: the measurement behind reference/'s defaults.

    python -m benchmarks.threads [--repeats 2] [--preset quick] [--epochs 2]

Each configuration is a fresh process (libgomp reads ``OMP_WAIT_POLICY`` when torch loads)
running ``reference/throughput.py``'s training on synthetic data of the preset's shape; the
policy is PASSIVE (idle threads sleep), ACTIVE (they spin) or unset (libgomp's default: spin a
while, then sleep). "Loaded" runs one busy-looping process alongside, i.e. another job holding
a core. Configurations run in a new random order each repeat; prints training images/s (last
epoch) per repeat and their median.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import random
import re
import statistics
import subprocess
import sys

CHILD = (
    "import sys, torch; torch.set_num_threads(int(sys.argv[1])); "
    "from dampopt.reference.throughput import main; "
    "main(['--preset', sys.argv[2], '--synthetic', '--epochs', sys.argv[3], '--device', 'cpu'])"
)
POLICIES = ("unset", "PASSIVE", "ACTIVE")


def _burn() -> None:
    while True:
        pass


def run_once(threads: int, policy: str, preset: str, epochs: int) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy != "unset":
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", CHILD, str(threads), preset, str(epochs)],
                         env=env, capture_output=True, text=True, check=True).stdout  # fmt: skip
    return float(re.search(r"training images/s \(last epoch\): ([\d,]+)", out)[1].replace(",", ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)
    configs = list(itertools.product((0, 1), (1, 2), POLICIES))  # (busy processes, threads, ..)
    results = {config: [] for config in configs}
    for _ in range(args.repeats):
        for load in (0, 1):
            burners = [multiprocessing.Process(target=_burn, daemon=True) for _ in range(load)]
            for burner in burners:
                burner.start()
            try:
                order = [c for c in configs if c[0] == load]
                random.shuffle(order)
                for config in order:
                    results[config].append(run_once(config[1], config[2], args.preset,
                                                    args.epochs))  # fmt: skip
            finally:
                for burner in burners:
                    burner.terminate()
    print(f"preset {args.preset}, {args.epochs} epochs, training images/s of the last epoch, "
          f"load average now {os.getloadavg()[0]:.2f}")  # fmt: skip
    print("| machine | threads | OMP_WAIT_POLICY | images/s (median) | runs |")
    print("|---|---:|---|---:|---|")
    for (load, threads, policy), rates in results.items():
        machine = "loaded (1 busy process)" if load else "quiet"
        runs = ", ".join(f"{r:,.0f}" for r in rates)
        print(f"| {machine} | {threads} | {policy} | {statistics.median(rates):,.0f} | {runs} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
