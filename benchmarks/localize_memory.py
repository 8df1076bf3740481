"""localize's time and peak memory against one forward+backward pass over the same data.

Run: ``.venv/bin/python -m benchmarks.localize_memory`` (options: ``--help``). Not part of
``make benchmark`` (no pytest cases): each measurement runs in a fresh process, since a
process's peak resident memory (``ru_maxrss``) never goes down.

Both passes see the same model (a convolutional net of ``--width`` channels, eval mode) and
the same loader; the labels are the model's own predictions with ``--error-rate`` of them
changed, so that localize has that fraction of failures (its cost grows with it). The
baseline is a plain ``loss.backward()`` per batch (which allocates ``.grad``, one model size).
Printed: seconds and extra peak RSS of each pass over the RSS before it, and the ratios the
issues set targets for: localize / forward+backward time (target <= 1.3) and localize's extra
peak minus the baseline's, in model sizes (target <= 1.0).
``--old PATH`` also times a copy of an older ``dampopt`` (e.g. from ``git archive``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _setup(args):
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    w = args.width
    model = nn.Sequential(
        nn.Conv2d(3, w, 3, padding=1), nn.ReLU(),
        *[m for _ in range(args.depth) for m in (nn.Conv2d(w, w, 3, padding=1), nn.ReLU())],
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w, 10),
    ).eval()  # fmt: skip
    n = args.batches * args.batch_size
    x = torch.randn(n, 3, args.size, args.size)
    with torch.no_grad():
        y = torch.cat([model(chunk).argmax(1) for chunk in x.split(args.batch_size)])
    wrong = torch.rand(n, generator=torch.Generator().manual_seed(1)) < args.error_rate
    y[wrong] = (y[wrong] + 1) % 10
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size)
    return model, loader


def _worker(args) -> dict:
    import torch
    import torch.nn.functional as F

    import dampopt

    model, loader = _setup(args)
    size_mib = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    before = max(_rss_mib(), _peak_mib())
    start = time.perf_counter()
    if args.worker == "forward_backward":
        for x, y in loader:
            F.cross_entropy(model(x), y).backward()
        errors = None
    else:
        from dampopt.diagnostics import localize

        errors = localize(model, loader).num_errors
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "extra_peak_mib": _peak_mib() - before,
        "model_mib": size_mib,
        "errors": errors,
        "torch_threads": torch.get_num_threads(),
        "dampopt": os.path.dirname(dampopt.__file__),
    }


def _run(args, worker: str, pythonpath: str | None = None) -> dict:
    argv = [sys.executable, "-m", "benchmarks.localize_memory", "--worker", worker]
    for key in ("width", "depth", "size", "batches", "batch_size", "error_rate", "threads"):
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, root) if p)
    # ``-m`` puts the working directory first on sys.path: run an old copy from its own folder
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True,
                         cwd=pythonpath or root)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=384, help="channels (default 384: 5.3M)")
    parser.add_argument("--depth", type=int, default=4, help="width x width conv layers")
    parser.add_argument("--size", type=int, default=8, help="image side")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--error-rate", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds")
    parser.add_argument("--old", default=None, help="path holding an older dampopt package")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    kinds = [("forward_backward", None), ("localize", None)]
    if args.old:
        kinds.append(("localize", args.old))
    results = {}
    for _ in range(args.repeats):  # alternate, so that load on a shared machine hits all alike
        for worker, path in kinds:
            key = worker if path is None else "localize (old)"
            results.setdefault(key, []).append(_run(args, worker, path))
    base = min(r["seconds"] for r in results["forward_backward"])
    base_mem = min(r["extra_peak_mib"] for r in results["forward_backward"])
    model_mib = results["forward_backward"][0]["model_mib"]
    load = os.getloadavg()[0]
    print(f"model {model_mib:.1f} MiB fp32; {args.batches} batches of {args.batch_size}, error "
          f"rate {args.error_rate}; {args.threads} threads; load average {load:.2f}")  # fmt: skip
    for key, runs in results.items():
        print(f"{key}: dampopt from {runs[0]['dampopt']}, {runs[0]['errors']} failures")
    print(f"| pass | seconds (best of {args.repeats}) | x forward+backward | extra peak MiB | "
          "extra beyond forward+backward, model sizes |")  # fmt: skip
    print("|---|---:|---:|---:|---:|")
    for key, runs in results.items():
        seconds = min(r["seconds"] for r in runs)
        memory = min(r["extra_peak_mib"] for r in runs)
        print(f"| {key} | {seconds:.2f} | {seconds / base:.2f} | {memory:.0f} | "
              f"{(memory - base_mem) / model_mib:+.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
