"""What `pip install .` ships: the bundled presets must be found in an installed package, not only in a
source checkout."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_ships_the_presets_and_finds_them_installed(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True)
    [wheel] = tmp_path.glob("sdcli-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    shipped = sorted(p.name for p in (site / "sdcli" / "presets").glob("*.yaml"))
    assert shipped == sorted(p.name for p in (ROOT / "presets").glob("*.yaml")) and "fast.yaml" in shipped
    # the installed package, imported from that tree, looks in its own folder
    code = "from sdcli.batch import presets_dir, preset_names; print(presets_dir()); print(preset_names())"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}).stdout.splitlines()
    assert out[0] == str(site / "sdcli" / "presets")
    assert out[1] == str(sorted(p.removesuffix(".yaml") for p in shipped))
