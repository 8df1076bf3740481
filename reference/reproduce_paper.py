#!/usr/bin/env python
"""Reproduce the paper's four experiments end to end: tables, figures, and every claim checked.

    python reference/reproduce_paper.py                     # quick preset, <= 10 min on 2 CPUs
    python reference/reproduce_paper.py --preset smoke      # <= 60 s, what the tests run
    python reference/reproduce_paper.py --preset paper      # the paper's protocol, CIFAR-10, GPU
    python reference/reproduce_paper.py --seeds 42 43 44    # mean +- std, claims per seed
    python reference/reproduce_paper.py --out runs/x --resume   # continue an interrupted run

Writes ``runs/<timestamp>/`` (or ``--out``): report.md, results.json, logs/ (per-epoch CSV),
checkpoints/, figures/. Under ``torchrun`` (WORLD_SIZE > 1) every training is data-parallel
(DDP; gloo on CPU, nccl on CUDA) and only rank 0 writes.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: the package runs it
    from dampopt.reference import run_file

    run_file(__file__)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import dampopt  # noqa: E402
from dampopt._distributed import rank_and_world_size  # noqa: E402

from . import data as datasets  # noqa: E402
from . import experiments, figures, files, report  # noqa: E402
from .presets import PRESETS  # noqa: E402
from .training import Interrupted, Settings  # noqa: E402

HERE = Path(__file__).resolve().parent

EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 3


class UsageError(Exception):
    """A problem with the command line or the environment, reported in one line."""


def common_arguments(description: str, seeds: list, out_default: str) -> argparse.ArgumentParser:
    """The options reproduce_paper.py and surgical_benchmark.py share."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", default="quick", help="quick (default), smoke or paper")
    parser.add_argument("--out", help=f"output directory (default: {out_default})")
    parser.add_argument("--data-dir", help="directory with the dataset files")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(seeds),
                        help="default: " + " ".join(map(str, seeds)))  # fmt: skip
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out (default: the newest runs/*)")
    parser.add_argument("--no-download", action="store_true",
                        help="never download: fail with a message when the data is missing")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (default: torch's, one per core, the "
                             "fastest on a quiet machine); 1 where other jobs share the cores "
                             "(measured 2.4x faster with one busy process on 2 cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = common_arguments(__doc__.split("\n")[0], [42], "runs/<timestamp>")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the training step (worth it on GPU)")
    # Testing only: simulate an interruption after this many training epochs in total.
    parser.add_argument("--stop-after-epochs", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def choose_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown --device {name!r}: use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} requested but CUDA is not available")
    return device


def output_directory(args, prefix: str = "") -> Path:
    """``--out``, or with ``--resume`` the newest ``runs/<prefix><timestamp>``, or a new one."""
    if args.out:
        out = Path(args.out)
        if args.resume and not out.is_dir():
            raise UsageError(f"--resume: {out} does not exist; there is no run to continue")
    elif args.resume:
        previous = sorted(p for p in Path("runs").glob(f"{prefix}[0-9]*") if p.is_dir())
        if not previous:
            raise UsageError(f"--resume: no previous run under runs/{prefix}*; pass --out DIR")
        out = previous[-1]  # timestamps sort in time order
    else:
        out = Path("runs") / (prefix + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as error:
        raise UsageError(f"cannot write to output directory {out}: {error.strerror}") from None
    return out


def check_same_run(out: Path, args) -> None:
    """Record the run's preset and seeds; --resume refuses a directory made by another preset."""
    record = out / "run.json"
    current = {"preset": args.preset, "seeds": args.seeds}
    if args.resume and record.exists():
        previous = json.loads(record.read_text())
        if previous["preset"] != args.preset:
            raise UsageError(f"--resume: {out} holds a {previous['preset']!r} run, not "
                             f"{args.preset!r}; pass the same --preset or another --out")
    files.write_text(record, json.dumps(current))


def setup_distributed(device: torch.device) -> torch.device:
    """Join the torchrun process group when WORLD_SIZE > 1; returns this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return device


def load_arrays(preset, data_dir, download: bool):
    if preset.dataset == "cifar10":
        return datasets.load_cifar10(data_dir, download)
    return datasets.load_fashion_mnist(data_dir, download)


def run(args) -> dict | None:
    if args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}: choose one of {', '.join(PRESETS)}")
    preset = PRESETS[args.preset]
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = setup_distributed(choose_device(args.device))
    rank, world_size = rank_and_world_size()
    out = output_directory(args) if rank == 0 else Path(args.out or ".")
    if world_size > 1:  # every rank needs rank 0's directory for checkpoints
        shared = [str(out)]
        dist.broadcast_object_list(shared, src=0)
        out = Path(shared[0])
    if rank == 0:
        check_same_run(out, args)
    arrays = load_arrays(preset, args.data_dir, not args.no_download)
    # The subset is fixed (data seed 0) so that every seed is scored on the same test images.
    data = datasets.prepare(arrays, device, preset.train_size, preset.test_size,
                            preset.image_size, seed=0)  # fmt: skip

    # No channels_last on CPU: torch 2.14's channels_last convolutions corrupted memory there,
    # for channel counts that are not multiples of 8 (width 4 and 6 crashed with one thread)
    # and, at width 8, in the backward pass of odd batch sizes (3, 5, 7: "corrupted size vs.
    # prev_size"), which the diagnostics' cells of a few images are.
    channels_last = device.type == "cuda"
    start = time.perf_counter()
    budget = [args.stop_after_epochs] if args.stop_after_epochs is not None else None
    per_seed = {}
    for seed in args.seeds:
        settings = Settings(
            epochs=preset.epochs, batch_size=preset.batch_size, crop_padding=preset.crop_padding,
            seed=seed, device=device, channels_last=channels_last, bf16=device.type == "cuda",
            checkpoint_dir=experiments.checkpoint_dir(out, seed),
            log_dir=_log_dir(out, seed) if rank == 0 else None,
            resume=args.resume, progress=not args.no_progress, epoch_budget=budget,
            compile=args.compile,
        )  # fmt: skip
        per_seed[seed] = experiments.run_seed(preset, data, settings)
        _print_seed(seed, per_seed[seed], preset)
    if rank != 0:
        return None
    return write_outputs(out, preset, args.seeds, per_seed, device, data, start,
                         environment=environment(args, device, world_size))  # fmt: skip


def environment(args, device: torch.device, world_size: int) -> dict:
    """What produced the run: versions, the checkout's commit, threads, device and arguments."""
    commit, dirty = git_state(HERE.parent)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dampopt": _dampopt_version(),
        "git_commit": commit,
        "git_dirty": dirty,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "world_size": world_size,
        "args": vars(args),
        "argv": list(sys.argv),
    }


def _dampopt_version() -> str | None:
    version = getattr(dampopt, "__version__", None)
    if version is not None:
        return str(version)
    try:
        return importlib.metadata.version("dampopt")
    except importlib.metadata.PackageNotFoundError:
        return None


def git_state(directory: Path) -> tuple[str | None, bool | None]:
    """``(HEAD commit, uncommitted changes?)`` of the repository at ``directory``.

    ``(None, None)`` when git is missing or ``directory`` is not in a repository: recording the
    environment never fails a run.
    """

    def git(*command):
        try:
            result = subprocess.run(["git", *command], cwd=directory, capture_output=True,
                                    text=True, timeout=30)  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return None
        return result.stdout if result.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    if not head or not head.strip():
        return None, None
    # --no-optional-locks: a status must not take index.lock from someone working in the tree.
    status = git("--no-optional-locks", "status", "--porcelain", "--untracked-files=no")
    return head.strip(), None if status is None else bool(status.strip())


def _log_dir(out: Path, seed: int) -> Path:
    path = out / "logs" / f"seed{seed}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_outputs(out, preset, seeds, per_seed, device, data, start, environment) -> dict:
    captions = figures.write_figures({s: per_seed[s] for s in seeds}, preset, out / "figures",
                                     classes=data.classes)  # fmt: skip
    summary = {
        "preset": preset.to_dict(),
        "seeds": list(seeds),
        "device": str(device),
        "environment": environment,
        "classes": list(data.classes),
        "data": f"{data.source} ({len(data.train_labels)} train / {len(data.test_labels)} test, "
                f"{data.image_size}x{data.image_size})",
        "output": str(out),
        "wall_seconds": time.perf_counter() - start,
        "claims": report.merge_claims(
            [report.evaluate_claims(per_seed[s], preset) for s in seeds], seeds),
        "tables": report.merge_seeds([report.build_tables(per_seed[s], preset) for s in seeds]),
        "figures": captions,
        "per_seed": {str(s): per_seed[s] for s in seeds},
    }  # fmt: skip
    files.write_text(out / "results.json", json.dumps(summary, indent=1, default=_json_default))
    files.write_text(out / "report.md", report.render_report(summary))
    return summary


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _print_seed(seed: int, results: dict, preset) -> None:
    if rank_and_world_size()[0] != 0:
        return
    e1, e3 = results["experiment_1"]["methods"], results["experiment_3"]
    mid = f"{preset.mid_threshold:.0%}"
    print(f"seed {seed}: best accuracy " + ", ".join(
        f"{m} {s['best_accuracy']:.2%}" for m, s in {**e1, **e3["trainings"]}.items()))
    print(f"seed {seed}: epochs to {mid}: " + ", ".join(
        f"{m} {s['epochs_to'][mid]}" for m, s in e1.items()))
    print(f"seed {seed}: flagged SGD {e3['layers']['sgd']}, Adam {e3['layers']['adam']}, "
          f"iKFAD {e3['layers']['ikfad']}")
    print(f"seed {seed}: corrections (fixed/new/net, p) " + "; ".join(
        f"{k} {c['fixed']}/{c['new']}/{c['net']:+d}, p={c['p_value']:.3g}"
        for k, c in e3["corrections"].items()), flush=True)  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = run(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (datasets.DataUnavailable, files.FileProblem) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except Interrupted:
        print(f"stopped after {args.stop_after_epochs} training epochs (testing); continue "
              "with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if summary is not None:
        held = sum(c["held"] for c in summary["claims"])
        print(f"claims held: {held}/{len(summary['claims'])}; not held: "
              + (", ".join(c["id"] for c in summary["claims"] if not c["held"]) or "none"))
        print(f"wrote {summary['output']}/report.md, results.json, figures/, logs/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
