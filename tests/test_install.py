"""A non-editable install works outside the checkout: package data (configs, weights, the data
sample) is found by name, outputs go to the working directory, and ``sensor`` imports without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``pip install --no-deps .`` (a built wheel, not editable) into a target folder."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, capture_output=True, text=True)
    return target


def run_outside(installed: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(installed)}
    return subprocess.run([sys.executable, "-P", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_installed_package_has_its_data_and_no_benchmarks_package(installed):
    for name in ("sensor", "models", "pipeline", "configs"):
        assert (installed / name / "__init__.py").is_file(), name
    assert not (installed / "benchmarks").exists()
    assert (installed / "models" / "weights" / "compact_fashion_mnist_pixel.pt").is_file()
    assert (installed / "configs" / "sensors" / "mono10.yaml").is_file()
    assert (installed / "pipeline" / "stream" / "data" / "fashion_mnist_sample" / "t10k-images-idx3-ubyte.gz").is_file()


def test_demo_runs_from_an_empty_folder_on_the_installed_package(installed, tmp_path):
    code = ("import pipeline, sensor, models, sys; "
            "assert all(m.__file__.startswith(sys.argv[1]) for m in (pipeline, sensor, models)), "
            "[m.__file__ for m in (pipeline, sensor, models)]; "
            "from pipeline.cli.main import main; sys.exit(main(['demo', '--out', 'out', '--limit', '64', '--quiet', "
            "'--json']))")
    proc = run_outside(installed, tmp_path, "-c", code, str(installed))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["replay_identical_predictions"] is True
    assert (tmp_path / "out" / "predictions.jsonl").is_file()
    assert not list(installed.glob("**/*.mcap"))  # nothing written into the package


def test_sensor_imports_without_torch(installed, tmp_path):
    code = ("import sys; sys.modules['torch'] = None; "
            "import sensor; from sensor import sensor as s, readout, keys, rawio, scene, ptc; print('ok')")
    proc = run_outside(installed, tmp_path, "-c", code)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
