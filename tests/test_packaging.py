"""What `pip install .` ships: the bundled presets and the demo model must be found in an installed package,
not only in a source checkout."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_ships_the_presets_and_the_demo_model_and_finds_them_installed(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True)
    [wheel] = tmp_path.glob("sdcli-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    shipped = sorted(p.name for p in (site / "sdcli" / "presets").glob("*.yaml"))
    assert shipped == sorted(p.name for p in (ROOT / "presets").glob("*.yaml")) and "fast.yaml" in shipped
    # the installed package, imported from that tree, looks in its own folder
    code = "from sdcli.prompts_file import presets_dir, preset_names; print(presets_dir()); print(preset_names())"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}).stdout.splitlines()
    assert out[0] == str(site / "sdcli" / "presets")
    assert out[1] == str(sorted(p.removesuffix(".yaml") for p in shipped))

    # the demo model: every file of sdcli/demo, and `sdcli generate` with no model renders with it
    demo = ROOT / "sdcli" / "demo"
    want = sorted(str(p.relative_to(demo)) for p in demo.rglob("*") if p.is_file())
    assert want and sorted(str(p.relative_to(site / "sdcli" / "demo")) for p in (site / "sdcli" / "demo").rglob("*")
                           if p.is_file()) == want
    done = subprocess.run([sys.executable, "-m", "sdcli", "generate", "a large red circle on a blue background",
                           "--seed", "1", "--steps", "4", "-o", "out.png"], cwd=tmp_path, capture_output=True,
                          text=True, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "built-in demo model" in done.stderr and (tmp_path / "out.png").is_file()
    with Image.open(tmp_path / "out.png") as image:
        assert json.loads(image.info["sdcli"])["model_path"] == str(site / "sdcli" / "demo")
