"""A wheel built from the repository runs from any directory: conf/ and scripts/
travel inside the package."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

from tests.conftest import REPO

# Runs the unpacked wheel's metatrain with the dependencies of this environment but
# none of the checkout: the editable install's import hook is taken out first.
RUNNER = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
sys.path.insert(0, sys.argv.pop(1))
module, func = sys.argv.pop(1).split(":")
import importlib
mod = importlib.import_module(module)
assert mod.__file__.startswith(sys.path[0]), mod.__file__
sys.exit(getattr(mod, func)())
"""


@pytest.fixture(scope="module")
def unpacked_wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy of the sources, so no build/ folder is left in the checkout.
    src = out / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("metatrain", "conf", "scripts"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = out.glob("metatrain-*.whl")
    site = out / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    return site


def run_from(site: Path, cwd: Path, entry: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", RUNNER, str(site), entry, *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": ""},
        check=False,
    )


def test_wheel_runs_help_and_cfg_job_from_another_directory(unpacked_wheel, tmp_path):
    assert (unpacked_wheel / "metatrain" / "conf" / "config.yaml").is_file()
    entry = "metatrain.cli:main"
    out = run_from(unpacked_wheel, tmp_path, entry, "--help")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "algorithm: " in out.stdout and "hydra/launcher: " in out.stdout
    out = run_from(unpacked_wheel, tmp_path, entry, "--cfg", "job", "algorithm=reptile")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "name: reptile" in out.stdout
    out = run_from(unpacked_wheel, tmp_path, "metatrain.scripts.summarize:main", "--help")
    assert out.returncode == 0 and "SWEEP_DIR" in out.stdout, out.stderr[-2000:]
    out = run_from(unpacked_wheel, tmp_path, "metatrain.scripts.plot:main", "--help")
    assert out.returncode == 0 and "SWEEP_OR_RUN_DIR" in out.stdout, out.stderr[-2000:]
    assert not list(tmp_path.iterdir())  # nothing written where it ran


def test_console_scripts_point_at_modules_that_exist():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    mapped = project["tool"]["setuptools"]["package-dir"]
    for name, target in project["project"]["scripts"].items():
        module, _, func = target.partition(":")
        parts = module.split(".")
        package = ".".join(parts[:-1])
        folder = REPO / mapped.get(package, package.replace(".", "/"))
        source = folder / f"{parts[-1]}.py"
        assert source.is_file(), (name, source)
        assert f"def {func}(" in source.read_text(), (name, func)


def test_every_subpackage_is_listed_for_the_wheel():
    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "metatrain").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages"
