"""One import root: nothing named cache, predictors or cli at the top of site-packages."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECK = """
import importlib.util, sys, offload, offload.cache, offload.predictors, offload.cli, offload.profiles
assert offload.__file__.startswith(sys.argv[1]), offload.__file__
for name in ("cache", "predictors", "cli", "models", "profiles"):
    assert importlib.util.find_spec(name) is None, name
print("ok")
"""


def _check_in(path: str, cwd: Path, env_path: str | None = None):
    env = {"PATH": "/usr/bin:/bin"} if env_path is None else {"PATH": "/usr/bin:/bin", "PYTHONPATH": env_path}
    out = subprocess.run([sys.executable, "-c", CHECK, path], cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_installed_package_has_one_root(tmp_path):
    """The environment's own install (editable in development) maps cache/ etc. under offload."""
    _check_in(str(ROOT / "offload") if (ROOT / "offload").exists() else "", tmp_path)


def test_built_wheel_has_one_root(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT),
                    "-w", str(wheel_dir)], check=True, capture_output=True)
    (wheel,) = wheel_dir.glob("moe_offload-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"offload", wheel.name.split("-py3")[0] + ".dist-info"}, tops
    for module in ("offload/cli.py", "offload/cache/__init__.py", "offload/predictors/__init__.py",
                   "offload/profiles/colab-t4.toml", "offload/shapes/qwen3-30b-a3b.json"):
        assert module in names
    # Every package of the source tree is in the wheel (a package missing from pyproject's list is not).
    for init in (ROOT / "offload").rglob("__init__.py"):
        if "demo_model" not in init.parts:
            assert "offload/" + str(init.relative_to(ROOT / "offload")) in names, init
    assert "offload = offload.cli:main" in entry_points
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    _check_in(str(target / "offload"), tmp_path, env_path=str(target))
