import email
import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
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
            str(out),
        ],
        check=True,
        timeout=300,
    )
    (built,) = out.glob("dampopt-*.whl")
    return built


def _dist_info(wheel: Path) -> str:
    return f"dampopt-{wheel.name.split('-')[1]}.dist-info"


def test_wheel_installs_kernels_as_a_subpackage_only(wheel):
    """An unrelated PyPI package owns the top-level name `kernels`: never ship one."""
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"dampopt", _dist_info(wheel)}
    assert "dampopt/kernels/__init__.py" in names
    assert "dampopt/diagnostics/__init__.py" in names
    for module in ROOT.joinpath("kernels").glob("*.py"):
        assert f"dampopt/kernels/{module.name}" in names


def test_wheel_ships_reference_types_and_licence(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    modules = sorted(ROOT.joinpath("reference").glob("*.py"))
    assert {"__init__.py", "__main__.py", "reproduce_paper.py"} <= {m.name for m in modules}
    for module in modules:
        assert f"dampopt/reference/{module.name}" in names
    assert not any(name.startswith(("reference/", "kernels/")) for name in names)
    assert "dampopt/py.typed" in names
    licences = {Path(name).name for name in names if name.startswith(f"{_dist_info(wheel)}/")}
    assert {"LICENSE", "NOTICE"} <= licences


def test_wheel_metadata(wheel):
    import dampopt

    archive = zipfile.ZipFile(wheel)
    metadata = email.message_from_bytes(archive.read(f"{_dist_info(wheel)}/METADATA"))
    assert metadata["Version"] == dampopt.__version__  # the one place the version is written
    assert metadata["License-Expression"] == "Apache-2.0"
    requires = metadata.get_all("Requires-Dist")
    assert not any(r.startswith("numpy") and "extra" not in r for r in requires)  # not imported
    assert set(metadata.get_all("Provides-Extra")) == {"reference", "dev", "llm"}
    entry_points = archive.read(f"{_dist_info(wheel)}/entry_points.txt").decode()
    assert "dampopt-reproduce = dampopt.reference.__main__:main" in entry_points


def test_installed_console_script_is_the_reference_main():
    from dampopt.reference.__main__ import main

    (script,) = importlib.metadata.entry_points(group="console_scripts", name="dampopt-reproduce")
    assert script.load() is main
    assert Path(sys.executable).with_name("dampopt-reproduce").exists()


def test_installed_kernels_resolve_to_the_kernels_folder():
    import dampopt.kernels

    assert Path(dampopt.kernels.__file__).resolve().parent == ROOT / "kernels"


def test_installed_reference_resolves_to_the_reference_folder():
    import dampopt.reference

    assert Path(dampopt.reference.__file__).resolve().parent == ROOT / "reference"
