"""ssim_ray as a user installs it: a wheel in a fresh virtual environment, run from a folder outside the repository.

`pip install .` used to give a job that failed with "Primary config directory not found ... site-packages/conf"
(conf/ was not shipped) and whose default `source=sample` needed scikit-image from the test extra.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tomllib

import pyarrow.parquet as pq
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _listed_packages() -> set:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(config["packages"]), config["package-dir"]


def test_every_code_package_and_the_configs_are_listed_for_the_wheel():
    listed, package_dir = _listed_packages()
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for root in ("ssim_ray", "jobs")
               for p in (REPO / root).rglob("__init__.py")}
    assert on_disk - listed == set(), "packages missing from pyproject.toml [tool.setuptools] packages"
    config_groups = {"ssim_ray_conf." + p.name for p in (REPO / "conf").iterdir() if p.is_dir() and any(p.glob("*.yaml"))}
    assert listed - on_disk == {"ssim_ray_conf"} | config_groups, "listed packages that are not code or config groups"
    assert package_dir == {"ssim_ray_conf": "conf"} and (REPO / "conf" / "ssim_audit.yaml").exists()


def _run(command, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with the built wheel and its dependencies only (CPU torch from this machine's wheel)."""
    root = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO), "-w",
          str(root / "dist")], timeout=600)
    wheel = next((root / "dist").glob("ssim_ray-*.whl"))
    venv = root / "venv"
    # No pip inside: this environment's pip installs into it (`pip --python`), so the venv holds only the wheel and
    # its dependencies, and no second pip is installed first. One resolve for torch and the wheel. --no-compile: pip
    # would byte-compile every file of torch, Ray, SciPy... (~40 s); the runs below compile what they import, once
    # (their environment lets Python write the caches).
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=300)
    torch_spec = os.environ.get("TORCH_SPEC", "torch==2.13.0")  # the Makefile's CPU build, as `make` installs it
    _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-compile",
          torch_spec, str(wheel)], timeout=2100)
    return venv


@pytest.mark.slow
def test_the_wheel_runs_the_sample_audit_from_any_folder(installed, tmp_path):
    python, audit = installed / "bin" / "python", installed / "bin" / "ssim-audit"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # PYTHONDONTWRITEBYTECODE dropped as well: the venv was installed without byte-compiling, so the first process
    # that imports a module writes its cache for the next ones (with the variable set, every process, Ray's and
    # each actor included, would compile all it imports from source).
    clean_env = {k: v for k, v in os.environ.items()
                 if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE")}
    # The test extra is not installed: nothing the default audit needs may come from it.
    missing = subprocess.run([str(python), "-c", "import pytest"], capture_output=True, cwd=elsewhere)
    assert missing.returncode != 0
    assert "source" in _run([str(audit), "--help"], cwd=elsewhere, env=clean_env, timeout=300).stdout
    assert "ssim_audit" in _run([str(python), "-m", "jobs.ssim_audit", "--help"], cwd=elsewhere, env=clean_env,
                                timeout=300).stdout
    out = tmp_path / "out"
    _run([str(audit), f"output.url={out}", f"hydra.run.dir={tmp_path / 'run'}", "summary.worst_k=4"],
         cwd=elsewhere, env=clean_env, timeout=1200)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["pairs"]["merged"] == pq.read_metadata(out / "ssim.parquet").num_rows > 100
    assert summary["status_counts"] == {"ok": summary["pairs"]["merged"]}
    assert (out / "report.html").stat().st_size > 10_000
    assert (tmp_path / "run" / ".hydra" / "config.yaml").exists()  # Hydra's run folder where we asked for it
    # The compiled CPU kernel is built from its C source, which the wheel must carry (a missing file would only
    # warn and fall back to the eager kernel: warnings are errors here).
    built = _run([str(python), "-W", "error", "-c", "import torch; from ssim_ray import ssim; x = (torch.arange(1600) % 200)"
                  ".reshape(1, 1, 40, 40).to(torch.uint8); print(ssim(x, x + 1, compile='always').item())"],
                 cwd=elsewhere, env=clean_env, timeout=600)
    assert 0.9 < float(built.stdout.strip()) < 1.0
    report = _run([str(installed / "bin" / "ssim-report"), str(out)], cwd=elsewhere, env=clean_env, timeout=600)
    assert "report.html" in report.stdout
    assert not (elsewhere / "outputs").exists() and list(elsewhere.iterdir()) == []
