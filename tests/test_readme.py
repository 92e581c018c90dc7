"""The README is the user's truth: every ``privcam ...`` line in its code blocks runs, as written,
on a fresh key, from a fresh copy of the repository's root and from an empty folder.

Each folder gets its own process (``python -m tests.test_readme FOLDER SPEC``) that runs the lines
in README order through ``pipeline.cli.main.main`` (the console script's entry point) with the folder
as working directory, an empty dataset cache and no Debian copy, so the shared imports and compiled
kernels are paid once per folder. What the test adds to a line, and nothing else:

- small limits (``--limit``, ``--epochs``, attack budgets, a small frame for ``bench``; see
  ``SMALL``) and ``--quiet``;
- the files a user would have: ``photo.jpg``, for ``--dataset folder --data DIR`` that folder holding
  two photos, and for ``replay --ray`` the folders it names, holding the recording made by the lines
  before it (``keygen`` and ``record`` are README lines themselves);
- ``privcam data fashion-mnist`` fetches from a local server (``--mirror``) a tiny Fashion-MNIST
  the test serves (the shipped sample's images as train and test split), with that tiny set's sums
  in place of the official ones. Lines before it find no dataset and run on the shipped sample
  through the lookup order; ``train`` and ``eval`` after it read the cache.

Lines that need the optional Ray extra are skipped, and reported, when ``ray`` is not importable.
They start actor processes (about a minute for the three lines on two cores), so to keep this test
near two minutes they run from the empty folder only, the stricter case (nothing there resolves
to a user's file); ``PRIVCAM_README_RAY_EVERYWHERE=1`` runs them from the repository root too.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# Per subcommand: options set (replacing the README's value when it has one) to keep the run small.
SMALL: dict[tuple[str, ...], dict[str, str | None]] = {
    ("run",): {"--limit": "64", "--cameras": "2", "--actors": "1", "--quiet": None},
    ("record",): {"--limit": "64", "--quiet": None},
    ("replay",): {"--actors": "1", "--quiet": None},
    ("train",): {"--epochs": "1", "--limit-train": "256", "--limit-test": "64", "--quiet": None},
    ("eval", "accuracy"): {"--limit-test": "64", "--attack-train-images": "64", "--attack-epochs": "1",
                           "--invariant-max-epochs": "2", "--quiet": None},
    ("eval", "privacy"): {"--limit-test": "64", "--attack-train-images": "64", "--attack-epochs": "1",
                          "--inversion-train-images": "64", "--inversion-epochs": "1", "--i2p-train-images": "64",
                          "--i2p-epochs": "1", "--kpa-pairs": "1,2", "--floor-train-images": "64",
                          "--floor-max-epochs": "2", "--jigsaw-frames": "2", "--quiet": None},
    ("ptc",): {"--size": "64", "--points": "4"},
    ("data",): {"--quiet": None},
    ("demo",): {"--limit": "64", "--quiet": None},
}
REPLACE_ONLY = {"--cameras", "--actors"}  # Ray's: made smaller where a line has them, never added
# Options after ``--`` go to the benchmark itself: one small frame or a few frames, one round.
BENCH_SMALL = {
    "sensor": ["--sizes", "64x96", "--repeat", "1"],
    "readout": ["--height", "64", "--width", "64", "--repeat", "1"],
    "model": ["--batch", "2", "--repeat", "1"],
    "pipeline": ["--cases", "28-pixel-compact", "--frames", "64", "--rounds", "1", "--no-rss"],
    "ray": ["--recordings", "1", "--frames", "64", "--actors", "1", "--rounds", "1"],
}


def readme_commands(text: str) -> list[str]:
    """Every ``privcam ...`` line of the README's code blocks (indented four spaces, or fenced)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if (fenced or line.startswith("    ")) and line.strip().startswith("privcam "):
            lines.append(line.strip())
    return lines


def needs_ray(argv: list[str]) -> bool:
    return "--ray" in argv or argv[:2] == ["bench", "ray"]


def small(argv: list[str]) -> list[str]:
    """``argv`` (after ``privcam``) with the test's small limits."""
    argv = list(argv)
    if argv[:1] == ["bench"]:
        return argv + (["--"] if "--" not in argv else []) + BENCH_SMALL[argv[1]]
    for prefix, options in SMALL.items():
        if tuple(argv[:len(prefix)]) != prefix:
            continue
        for flag, value in options.items():
            if flag in argv:
                if value is not None:
                    argv[argv.index(flag) + 1] = value
            elif value is None:
                argv.append(flag)
            elif flag not in REPLACE_ONLY:
                argv += [flag, value]
    return argv


def expand(argv: list[str]) -> list[str]:
    """Glob patterns as a POSIX shell expands them (kept as typed when nothing matches)."""
    out = []
    for arg in argv:
        matches = sorted(glob.glob(arg)) if any(c in arg for c in "*?[") else []
        out += matches or [arg]
    return out


def make_user_files(argv: list[str], folder: Path) -> None:
    """The files a user would have before this line: a photo, a folder of photos where ``--dataset folder``
    reads one, and the recordings ``replay --ray`` names."""
    import cv2

    from sensor.scene import colour_chart

    photo = folder / "photo.jpg"
    if not photo.exists():
        cv2.imwrite(str(photo), colour_chart(96, 144)[..., ::-1])
    options = dict(zip(argv, argv[1:], strict=False))
    if options.get("--dataset") == "folder" and options.get("--data"):
        photos = folder / options["--data"].rstrip("/")
        if not photos.exists():
            photos.mkdir(parents=True)
            chart = colour_chart(96, 144)[..., ::-1]
            cv2.imwrite(str(photos / "chart.png"), chart)
            cv2.imwrite(str(photos / "chart_mirrored.png"), chart[:, ::-1].copy())
    if argv[:1] == ["replay"] and "--ray" in argv:
        recording = folder / "frames.mcap"
        for arg in argv[1:]:
            if not (arg.endswith("/") or "*" in arg):
                continue
            target = folder / (arg.rstrip("/") if arg.endswith("/") else os.path.dirname(arg))
            if target != folder and not target.exists():
                target.mkdir(parents=True)
                shutil.copy(recording, target / f"{target.name}.mcap")


def run_lines(folder: Path, spec: dict) -> list[dict]:
    """In this process, with ``folder`` as working directory: each README line through ``main``."""
    import contextlib
    import io

    import numba
    import torch

    from pipeline.cli.main import main
    from pipeline.stream import datafetch, datasets

    os.chdir(folder)
    datasets.FASHION_MNIST_ROOT = folder / "no-debian-dataset-here"  # a fresh machine: nothing installed
    served = spec["served"]
    datafetch.SOURCES["fashion-mnist"] = datafetch.RemoteDataset(
        "fashion-mnist", (served["url"],), tuple(datafetch.RemoteFile(**f) for f in served["files"]),
        datafetch.SOURCES["fashion-mnist"].manual)
    have_ray = importlib.util.find_spec("ray") is not None
    ray_here = spec["ray_here"]
    ray_started = False
    results = []
    for line in spec["lines"]:
        argv = shlex.split(line, comments=True)[1:]
        result: dict = {"line": line}
        if needs_ray(argv) and not have_ray:
            results.append({**result, "status": "skipped", "why": "ray is not importable (pip install -e '.[ray]')"})
            continue
        if needs_ray(argv) and not ray_here:
            results.append({**result, "status": "skipped", "why": "Ray lines run from the empty folder (time); "
                                                                  "PRIVCAM_README_RAY_EVERYWHERE=1 runs them here"})
            continue
        if needs_ray(argv) and not ray_started:
            import ray

            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # once; every Ray line reuses it
            ray_started = True
        make_user_files(argv, folder)
        argv = expand(small(argv))
        if argv[:1] == ["data"]:
            argv += ["--mirror", served["url"]]
        threads = torch.get_num_threads(), numba.get_num_threads()
        out, err = io.StringIO(), io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse: a line the parser refuses
                code = exc.code if isinstance(exc.code, int) else 2
            except Exception as exc:  # noqa: BLE001 - an uncaught exception fails the line; reported
                code = 1
                print(f"uncaught {type(exc).__name__}: {exc}", file=sys.stderr)
        torch.set_num_threads(threads[0])
        numba.set_num_threads(threads[1])
        results.append({**result, "argv": argv, "status": "ran" if code == 0 else "failed", "exit": code,
                        "seconds": round(time.perf_counter() - t0, 1), "stderr": err.getvalue()[-1500:],
                        "stdout": out.getvalue()[-500:]})
    if ray_started:
        import ray

        ray.shutdown()
    return results


def tiny_fashion_mnist(folder: Path) -> list[dict]:
    """A served Fashion-MNIST: the shipped sample's first 512 images as train, the next 128 as test."""
    from pipeline.stream.datasets import load_dataset
    from tests.dataserver import idx_bytes

    sample = load_dataset("fashion-mnist-sample")
    files = []
    for prefix, part in (("train", slice(0, 512)), ("t10k", slice(512, 640))):
        for kind, array in (("images-idx3-ubyte", sample.images[part]),
                            ("labels-idx1-ubyte", sample.labels[part].astype("uint8"))):
            name = f"{prefix}-{kind}.gz"
            data = idx_bytes(array)
            (folder / name).write_bytes(data)
            files.append({"name": name, "md5": hashlib.md5(data).hexdigest(),
                          "sha256": hashlib.sha256(data).hexdigest()})
    return files


def fresh_clone(target: Path) -> Path:
    """The repository's tracked files (the working tree's versions), as a fresh clone has them."""
    try:
        tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: the tree without build outputs
        shutil.copytree(REPO, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".git", ".venv", "__pycache__", "*.egg-info", "build", "demo_out", ".pytest_cache", ".ruff_cache"))
        return target
    for name in tracked.decode().split("\0"):
        if name and (REPO / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
    return target


def test_readme_lines_are_found_and_parse():
    """The extraction sees the README's commands, and each one parses (before anything runs)."""
    from pipeline.cli.main import build_parser

    lines = readme_commands(README.read_text())
    assert len(lines) >= 12 and any(line.startswith("privcam keygen --out camera.key") for line in lines)
    assert any(line.startswith("privcam data fashion-mnist") for line in lines)
    parser = build_parser()
    for line in lines:
        argv = shlex.split(line, comments=True)[1:]
        parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
        assert not any("|" in a for a in argv), f"{line}: not a command as written"


@pytest.mark.parametrize("where", ["repo-root", "empty-folder"])
def test_every_readme_command_runs(where, tmp_path):
    from tests.dataserver import DataServer

    folder = tmp_path / where
    folder.mkdir()
    if where == "repo-root":
        fresh_clone(folder)
    served = tmp_path / "served"
    served.mkdir()
    files = tiny_fashion_mnist(served)
    lines = readme_commands(README.read_text())
    with DataServer({f["name"]: (served / f["name"]).read_bytes() for f in files}) as server:
        spec = tmp_path / "spec.json"
        ray_here = where == "empty-folder" or os.environ.get("PRIVCAM_README_RAY_EVERYWHERE") == "1"
        spec.write_text(json.dumps({"lines": lines, "served": {"url": server.url, "files": files},
                                    "ray_here": ray_here}))
        env = {**os.environ, "PRIVCAM_DATA_DIR": str(tmp_path / "cache"),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run([sys.executable, "-m", "tests.test_readme", str(folder), str(spec)], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((folder / "readme_results.json").read_text())
    print(f"\nREADME commands from {where}:")
    for r in results:
        print(f"  {r['status']:<8} {r.get('seconds', ''):>6}  {r['line']}" + (f"  ({r['why']})" if "why" in r else ""))
    assert [r["line"] for r in results] == lines
    failed = [r for r in results if r["status"] == "failed"]
    assert not failed, "\n\n".join(f"{r['line']}\n  ran as: privcam {shlex.join(r['argv'])}\n  exit {r['exit']}: "
                                   f"{r['stderr'].strip()[-800:]}" for r in failed)
    by_line = {r["line"]: r for r in results}
    sample_note = next(r for line, r in by_line.items() if line.startswith("privcam run ") and "--ray" not in line)
    assert "fashion-mnist-sample" in sample_note["stderr"] and "1000 test images" in sample_note["stderr"]


if __name__ == "__main__":
    target, spec_path = Path(sys.argv[1]), Path(sys.argv[2])
    outcome = run_lines(target, json.loads(spec_path.read_text()))
    (target / "readme_results.json").write_text(json.dumps(outcome, indent=1))
