"""When backend="auto" should compile on CPU: first-step seconds and per-step ms of the
"torch" (foreach) and "compiled" backends on ResNet-18's parameter shapes, the saving per
element of the large tensors and the break-even in steps (dampopt/_compiled.py uses the
measured constants).

    python benchmarks/compile_breakeven.py [threads]      # an empty inductor cache per run
"""

import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp())

import torch  # noqa: E402
import torchvision  # noqa: E402

import dampopt  # noqa: E402

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
model = torchvision.models.resnet18()
shapes = [p.shape for p in model.parameters()]
large = sum(p.numel() for p in model.parameters() if p.numel() >= 1 << 15)
print("tensors", len(shapes), "large elements", large, "threads", torch.get_num_threads())
for cls in (dampopt.CubicDampedSGD, dampopt.CADAM, dampopt.iKFAD):
    row = {}
    for backend in ("torch", "compiled"):
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt = cls(params, backend=backend)
        start = time.perf_counter()
        opt.step()
        first = time.perf_counter() - start
        times = []
        for _ in range(15):
            start = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - start)
        row[backend] = (first, statistics.median(times))
    saving = row["torch"][1] - row["compiled"][1]
    compile_s = row["compiled"][0] - row["compiled"][1]
    print(
        f"{cls.__name__:15s} torch first {row['torch'][0]:.3f}s step "
        f"{row['torch'][1] * 1e3:.1f} ms | compiled first {row['compiled'][0]:.2f}s step "
        f"{row['compiled'][1] * 1e3:.1f} ms | saving {saving * 1e3:.1f} ms/step = "
        f"{saving / large * 1e9:.2f} ns/element | break-even "
        f"{compile_s / max(saving, 1e-9):.0f} steps"
    )
