"""`pip install .` (not only editable) ships the kernels as `fastadv_kernels`, never as top-level `kernels`."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_kernels_inside_the_package(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), ROOT],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("fastadv-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastadv_kernels/rows_backup_add.py" in names and "fastadv_kernels/row_set.py" in names
    assert not [n for n in names if n.startswith("fastadv_kernels/__init__")], "the kernels are a namespace package"
    assert "fastadv/ops/rows_backup_add.py" in names and "fastadv/methods/fgm.py" in names
    assert "fastadv/integrations/hf.py" in names and "fastadv/integrations/lightning.py" in names
    assert not [n for n in names if n.startswith("kernels/")], "kernels/ must not install as a top-level module"
    sources = [f"fastadv/{p.relative_to(ROOT / 'fastadv')}" for p in (ROOT / "fastadv").rglob("*.py")]
    sources += [f"fastadv_kernels/{p.relative_to(ROOT / 'kernels')}" for p in (ROOT / "kernels").rglob("*.py")]
    missing = sorted(set(sources) - set(names))
    assert not missing, f"the wheel lacks these modules of the source tree (setup.py's packages): {missing}"


def test_installed_kernels_are_the_repositorys():
    import fastadv_kernels.rows_restore

    installed = Path(fastadv_kernels.rows_restore.__file__)  # kernels/ (editable) or site-packages (a wheel)
    assert installed.read_text() == (ROOT / "kernels" / "rows_restore.py").read_text()


def test_the_source_folder_is_no_regular_package():
    # A regular package named kernels in the clone's root would shadow Hugging Face's (see setup.py).
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_every_kernel_of_the_source_folder_reaches_the_launchers():
    import re

    from fastadv.ops.backend import kernels

    defined = {
        name
        for path in (ROOT / "kernels").glob("*.py")
        for name in re.findall(r"^def (\w+_kernel)\(", path.read_text(), re.MULTILINE)
    }
    assert len(defined) >= 6, defined
    missing = defined - set(vars(kernels()))
    assert not missing, f"kernels defined in kernels/ but not in fastadv.ops.backend.KERNEL_MODULES: {missing}"
