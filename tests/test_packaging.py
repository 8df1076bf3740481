import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_installs_kernels_as_a_subpackage_only(tmp_path):
    """An unrelated PyPI package owns the top-level name `kernels`: never ship one."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(ROOT),
            "-w",
            str(tmp_path),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("dampopt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"dampopt", f"dampopt-{wheel.name.split('-')[1]}.dist-info"}
    assert "dampopt/kernels/__init__.py" in names
    assert "dampopt/diagnostics/__init__.py" in names
    for module in ROOT.joinpath("kernels").glob("*.py"):
        assert f"dampopt/kernels/{module.name}" in names


def test_installed_kernels_resolve_to_the_kernels_folder():
    import dampopt.kernels

    assert Path(dampopt.kernels.__file__).resolve().parent == ROOT / "kernels"
