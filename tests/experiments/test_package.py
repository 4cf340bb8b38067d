"""The install: one import package, `waitlens`, whatever else is in site-packages."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

import waitlens


def test_every_notebook_verb_resolves():
    for name in waitlens.__all__:
        assert getattr(waitlens, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        waitlens.nope  # noqa: B018


def test_no_module_puts_the_layer_folders_on_sys_path():
    """Importing any waitlens module leaves sys.path as it was: a path entry for the repository or
    site-packages/waitlens would make `import traces` (or hooks, probes, experiments) load our layer
    instead of the user's package of that name (all four are taken on PyPI)."""
    import importlib
    import pkgutil

    before = list(sys.path)
    names = []
    for layer in ("traces", "hooks", "probes", "experiments"):  # (an editable install maps each folder)
        pkg = importlib.import_module(f"waitlens.{layer}")
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, f"{pkg.__name__}.")]
    assert "waitlens.experiments.benchmarks.capture" in names  # the walk reaches the scripts too
    for name in names:
        importlib.import_module(name)
        assert sys.path == before, name


@pytest.mark.slow
def test_the_wheel_installs_one_top_level_package(tmp_path):
    """Generic names (traces, hooks, probes, experiments are all taken on PyPI) stay inside
    `waitlens`: the wheel's top level is `waitlens` alone, with the organism and configs as data."""
    import shutil

    root = waitlens.__file__.rsplit("/waitlens/", 1)[0]
    src = tmp_path / "src"  # a copy: setuptools leaves build/ in the source tree
    shutil.copytree(root, src, ignore=shutil.ignore_patterns(".venv*", "build", "runs", ".git", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", ".ruff_cache"))
    # built by this venv's setuptools (torch requires one, >= 77; pyproject asks >= 68) where there is
    # one: the layout is pyproject's, and an isolated build env costs ~3 s of CPU to install
    import importlib.util

    own = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *own,
                    "-w", str(tmp_path), str(src)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("waitlens-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"waitlens", wheel.name.split("-py3")[0] + ".dist-info"}
    for path in ("waitlens/traces/formats.py", "waitlens/hooks/models.py", "waitlens/probes/linear.py",
                 "waitlens/experiments/cli.py", "waitlens/experiments/configs/organism.toml",
                 "waitlens/experiments/organism/weights/post-large/model.safetensors"):
        assert path in names, path
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "waitlens = waitlens.experiments.cli:main" in entry
    assert "organism = waitlens.experiments.organism.registry:resolve" in entry


@pytest.mark.slow
def test_the_readme_notebook_example_runs_as_written():
    import re
    from pathlib import Path

    readme = Path(waitlens.__file__).resolve().parents[1] / "README.md"
    code = re.search(r"## In a notebook\n\n```python\n(.*?)```", readme.read_text(), re.S).group(1)
    head = readme.read_text().split("\n")[:60]
    assert "## In a notebook" in head and "pip install ." in "\n".join(head)  # the first screen
    # one torch thread, as the suite's other subprocesses: on the shared 2-core box the default two
    # spin against the other worker (~3x the CPU for the same printed table)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "auroc" in out.stdout and "control_random_auroc" in out.stdout
