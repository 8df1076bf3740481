import os

# Triton kernels run on CPU tensors only in Triton's interpreter, which must be switched on
# before triton is first imported. CI has no GPU, so every test session interprets.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
