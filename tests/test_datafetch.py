"""``privcam data``: downloads from a local HTTP server (the shipped sample, a corrupted copy, a
dropped connection, a server that ignores ranges), checksums, resume, atomic placement, the
offline message, and the dataset lookup order (--data, cache, Debian path, shipped sample)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import socket
import tarfile

import numpy as np
import pytest

from pipeline.cli.main import main
from pipeline.resources import sample_root
from pipeline.stream import datafetch, datasets
from pipeline.stream.datafetch import DataFetchError, RemoteDataset, RemoteFile, fetch
from pipeline.stream.datasets import load_dataset
from sensor.errors import DatasetError
from tests.dataserver import DataServer, idx_bytes

SAMPLE_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
# The shipped sample's files, pinned: a changed sample fails here, not silently in a download test.
SAMPLE_SHA256 = {
    "t10k-images-idx3-ubyte.gz": "9506366ef791793e1286ede3b2ea6578574914a6014f8607bb2089df178ccfce",
    "t10k-labels-idx1-ubyte.gz": "685528d11c03d1604f3b8ba71a788bf3945e332e5b720911d11edfb2203c106b",
}
SAMPLE_MD5 = {
    "t10k-images-idx3-ubyte.gz": "8189e7ab3c4b68354899eea509f2515c",
    "t10k-labels-idx1-ubyte.gz": "ed0e8d4ac4658d0b31cbf018ab9bc4d7",
}


def sample_bytes() -> dict[str, bytes]:
    return {name: (sample_root() / name).read_bytes() for name in SAMPLE_FILES}


def sample_source(sha256: bool = True) -> RemoteDataset:
    """The test split of Fashion-MNIST as the shipped sample: served by the test, with its sums."""
    files = tuple(RemoteFile(n, SAMPLE_MD5[n], SAMPLE_SHA256[n] if sha256 else None) for n in SAMPLE_FILES)
    return RemoteDataset("fashion-mnist", ("http://unused.invalid",), files, "use --data DIR")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache (PRIVCAM_DATA_DIR) and no Debian copy."""
    root = tmp_path / "cache"
    monkeypatch.setenv(datafetch.CACHE_ENV, str(root))
    monkeypatch.setattr(datasets, "FASHION_MNIST_ROOT", tmp_path / "no-debian")
    return root


def no_parts(folder) -> bool:
    return not list(folder.glob("*.part"))


def test_the_shipped_sample_is_what_the_tests_pin():
    for name, data in sample_bytes().items():
        assert hashlib.sha256(data).hexdigest() == SAMPLE_SHA256[name]
        assert hashlib.md5(data).hexdigest() == SAMPLE_MD5[name]


def test_official_table_has_canonical_urls_and_published_md5s():
    assert datafetch.SOURCES["fashion-mnist"].mirrors[0] == "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com"
    assert datafetch.SOURCES["mnist"].mirrors[0] == "https://ossci-datasets.s3.amazonaws.com/mnist"
    assert datafetch.SOURCES["cifar10"].files[0].md5 == "c58f30108f718f92721af3b95e74349a"
    for source in datafetch.SOURCES.values():
        for f in source.files:
            assert len(f.md5) == 32 and int(f.md5, 16) >= 0
            assert f.sha256 is None or len(f.sha256) == 64  # None: no verifiable SHA-256; MD5 checked


@pytest.mark.parametrize("sha256", [True, False], ids=["sha256+md5", "md5-only"])
def test_fetch_verifies_places_and_is_then_found_by_the_lookup(cache, sha256):
    with DataServer(sample_bytes()) as server:
        summary = fetch("fashion-mnist", mirror=server.url, progress=False,
                        sources={"fashion-mnist": sample_source(sha256)})
        folder = cache / "fashion-mnist"
        assert summary["folder"] == str(folder) and summary["found_automatically"]
        assert [f["status"] for f in summary["files"]] == ["downloaded", "downloaded"]
        assert no_parts(folder)
        for name in SAMPLE_FILES:
            assert (folder / name).read_bytes() == (sample_root() / name).read_bytes()
        sums = (folder / "SHA256SUMS").read_text().splitlines()
        assert sums == [f"{SAMPLE_SHA256[n]}  {n}" for n in SAMPLE_FILES]
        assert (folder / SAMPLE_FILES[0]).stat().st_mode & 0o777 == 0o644
        served = len(server.behaviour.requests)
        again = fetch("fashion-mnist", mirror=server.url, progress=False,
                      sources={"fashion-mnist": sample_source(sha256)})
        assert [f["status"] for f in again["files"]] == ["present", "present"]
        assert len(server.behaviour.requests) == served, "a verified file is not downloaded again"
    ds = load_dataset("fashion-mnist", "test")
    assert ds.name == "fashion-mnist" and ds.source == str(folder) and len(ds) == 1000


@pytest.mark.parametrize("sha256", [True, False], ids=["sha256+md5", "md5-only"])
def test_a_corrupted_copy_is_refused_and_nothing_is_left(cache, sha256):
    files = sample_bytes()
    bad = bytearray(files["t10k-labels-idx1-ubyte.gz"])
    bad[100] ^= 0xFF
    files["t10k-labels-idx1-ubyte.gz"] = bytes(bad)
    with DataServer(files) as server, pytest.raises(DataFetchError) as err:
        fetch("fashion-mnist", mirror=server.url, progress=False, sources={"fashion-mnist": sample_source(sha256)})
    msg = str(err.value)
    assert "t10k-labels-idx1-ubyte.gz" in msg and ("SHA-256" if sha256 else "MD5 ") in msg and "deleted" in msg
    folder = cache / "fashion-mnist"
    assert not (folder / "t10k-labels-idx1-ubyte.gz").exists() and no_parts(folder)
    assert (folder / "t10k-images-idx3-ubyte.gz").exists()  # the good file before it stays


def test_the_official_sums_refuse_files_that_are_not_the_official_ones(tmp_path, capsys):
    """Through the CLI with the real table: the sample is not the official t10k file, so it fails."""
    with DataServer(sample_bytes()) as server:
        code = main(["data", "fashion-mnist", "--mirror", server.url, "--root", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "train-images-idx3-ubyte.gz" in err and "HTTP 404" in err  # the sample has no train split
    with DataServer({**sample_bytes(), "train-images-idx3-ubyte.gz": b"x" * 100}) as server:
        code = main(["data", "fashion-mnist", "--mirror", server.url, "--root", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "differs from the published 8d4fb7e6c68d591d4c3dfef9ec88bf0d" in err
    assert not list((tmp_path / "fashion-mnist").glob("train-images*"))


def test_an_interrupted_download_resumes_with_a_range_request(cache):
    files = sample_bytes()
    name = "t10k-images-idx3-ubyte.gz"
    with DataServer(files) as server:
        server.behaviour.cut_after[name] = 100_000
        with pytest.raises(DataFetchError, match="100000 bytes received are kept .* resumes"):
            fetch("fashion-mnist", mirror=server.url, progress=False, sources={"fashion-mnist": sample_source()})
        folder = cache / "fashion-mnist"
        parts = list(folder.glob(f"{name}.*.part"))
        assert len(parts) == 1 and parts[0].stat().st_size == 100_000 and not (folder / name).exists()
        summary = fetch("fashion-mnist", mirror=server.url, progress=False, sources={"fashion-mnist": sample_source()})
        assert summary["files"][0]["status"] == "resumed"
        assert server.behaviour.requests[-2] == (name, "bytes=100000-")
    assert (folder / name).read_bytes() == files[name] and no_parts(folder)


def test_a_server_that_ignores_the_range_restarts_the_file(cache):
    files = sample_bytes()
    name = "t10k-images-idx3-ubyte.gz"
    folder = cache / "fashion-mnist"
    folder.mkdir(parents=True)
    (folder / f"{name}.abc123.part").write_bytes(files[name][:5000])
    with DataServer(files) as server:
        server.behaviour.ignore_range = True
        fetch("fashion-mnist", mirror=server.url, progress=False, sources={"fashion-mnist": sample_source()})
    assert (folder / name).read_bytes() == files[name] and no_parts(folder)


def test_a_corrupt_partial_is_discarded_and_fetched_again_from_zero(cache):
    files = sample_bytes()
    name = "t10k-images-idx3-ubyte.gz"
    folder = cache / "fashion-mnist"
    folder.mkdir(parents=True)
    (folder / f"{name}.stale.part").write_bytes(b"\0" * 5000)  # not a prefix of the file
    with DataServer(files) as server:
        summary = fetch("fashion-mnist", mirror=server.url, progress=False, sources={"fashion-mnist": sample_source()})
        assert [r[1] for r in server.behaviour.requests if r[0] == name] == ["bytes=5000-", None]
    assert summary["files"][0]["status"] == "downloaded"
    assert (folder / name).read_bytes() == files[name] and no_parts(folder)


def test_a_bad_file_under_the_final_name_is_replaced(cache):
    files = sample_bytes()
    folder = cache / "fashion-mnist"
    folder.mkdir(parents=True)
    (folder / SAMPLE_FILES[1]).write_bytes(b"truncated")
    with DataServer(files) as server:
        fetch("fashion-mnist", mirror=server.url, progress=False, sources={"fashion-mnist": sample_source()})
    assert (folder / SAMPLE_FILES[1]).read_bytes() == files[SAMPLE_FILES[1]]


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_no_network_names_the_manual_alternatives(tmp_path, capsys):
    code = main(["data", "fashion-mnist", "--mirror", closed_port_url(), "--root", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "No network?" in err and "dataset-fashion-mnist" in err and "--data DIR" in err
    assert no_parts(tmp_path / "fashion-mnist")
    code = main(["data", "cifar10", "--mirror", closed_port_url(), "--root", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "cifar-10-batches-py" in err and "--data" in err


def test_cli_prints_where_the_data_went(cache, monkeypatch, capsys):
    monkeypatch.setitem(datafetch.SOURCES, "fashion-mnist", sample_source())
    with DataServer(sample_bytes()) as server:
        assert main(["data", "fashion-mnist", "--mirror", server.url, "--quiet", "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["data"] == str(cache / "fashion-mnist") and summary["found_automatically"]
        other = cache.parent / "elsewhere"
        assert main(["data", "fashion-mnist", "--mirror", server.url, "--root", str(other), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"--data {other / 'fashion-mnist'}" in out and "t10k-images-idx3-ubyte.gz" in out


def cifar_archive(top: str = "cifar-10-batches-py", evil: bool = False) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for name in names:
            data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
            blob = pickle.dumps({b"data": data, b"labels": [1, 2, 3]})
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        if evil:
            info = tarfile.TarInfo("../escaped")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    return buf.getvalue()


@pytest.mark.parametrize("evil", [False, True], ids=["archive", "path-escape"])
def test_cifar10_archive_is_verified_unpacked_and_found(cache, evil):
    blob = cifar_archive(evil=evil)
    source = RemoteDataset("cifar10", ("http://unused.invalid",),
                           (RemoteFile("cifar-10-python.tar.gz", hashlib.md5(blob).hexdigest()),), "use --data DIR",
                           extract="cifar-10-batches-py")
    with DataServer({"cifar-10-python.tar.gz": blob}) as server:
        if evil:
            with pytest.raises(DataFetchError, match="unexpected member '../escaped'"):
                fetch("cifar10", mirror=server.url, progress=False, sources={"cifar10": source})
            assert not (cache / "escaped").exists() and not (cache / "cifar10" / "cifar-10-batches-py").exists()
            return
        summary = fetch("cifar10", mirror=server.url, progress=False, sources={"cifar10": source})
    assert summary["data"] == str(cache / "cifar10" / "cifar-10-batches-py")
    assert not [p for p in (cache / "cifar10").iterdir() if p.name.startswith(".unpack")]
    assert len(load_dataset("cifar10", "test")) == 3 and len(load_dataset("cifar10", "train")) == 15


def write_idx_split(folder, split: str, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    prefix = {"train": "train", "test": "t10k"}[split]
    (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(idx_bytes(np.zeros((count, 28, 28), np.uint8)))
    (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(idx_bytes(np.zeros(count, np.uint8)))


def test_lookup_order_data_then_cache_then_debian_then_sample(cache, tmp_path, monkeypatch, caplog):
    debian = tmp_path / "debian"
    monkeypatch.setattr(datasets, "FASHION_MNIST_ROOT", debian)
    user = tmp_path / "user"
    for folder, count in ((user, 3), (cache / "fashion-mnist", 5), (debian, 7)):
        write_idx_split(folder, "test", count)
    write_idx_split(debian, "train", 11)
    assert len(load_dataset("fashion-mnist", "test", user)) == 3
    assert len(load_dataset("fashion-mnist", "test")) == 5
    assert len(load_dataset("fashion-mnist", "train")) == 11  # the cache has no train split: Debian's
    for path in (cache / "fashion-mnist").iterdir():
        path.unlink()
    ds = load_dataset("fashion-mnist", "test")
    assert len(ds) == 7 and ds.source == str(debian)
    for path in debian.iterdir():
        path.unlink()
    with caplog.at_level(logging.WARNING, logger="privcam.data"):
        ds = load_dataset("fashion-mnist", "test")
    assert ds.name == "fashion-mnist-sample" and len(ds) == 1000 and ds.source == str(sample_root())
    note = caplog.text
    assert "fashion-mnist-sample" in note and "1000 test images" in note and "privcam data fashion-mnist" in note
    with pytest.raises(DatasetError, match="no train split.*privcam data fashion-mnist.*dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "train")


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_missing_datasets_name_the_command_that_gets_them(cache, name):
    with pytest.raises(DatasetError, match=f"privcam data {name}"):
        load_dataset(name, "test")


def test_missing_files_in_data_dir_name_the_command(tmp_path):
    with pytest.raises(DatasetError, match="privcam data fashion-mnist"):
        load_dataset("fashion-mnist", "test", tmp_path)
    with pytest.raises(DatasetError, match="privcam data cifar10"):
        load_dataset("cifar10", "test", tmp_path)
    with pytest.raises(DatasetError, match="privcam data fashion-mnist"):
        load_dataset("fashion-mnist-sample", "train")


def test_cache_root_follows_env_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv(datafetch.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert datafetch.cache_root() == tmp_path / "xdg" / "privcam"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert datafetch.cache_root() == tmp_path / "home" / ".cache" / "privcam"
    monkeypatch.setenv(datafetch.CACHE_ENV, str(tmp_path / "mine"))
    assert datafetch.cache_root() == tmp_path / "mine"
    assert datafetch.data_path("cifar10") == tmp_path / "mine" / "cifar10" / "cifar-10-batches-py"


def test_a_whole_part_left_before_its_rename_is_checked_and_placed(cache):
    """A run that died between the last byte and the rename: the server answers 416 to the range."""
    files = sample_bytes()
    name = SAMPLE_FILES[1]
    folder = cache / "fashion-mnist"
    folder.mkdir(parents=True)
    (folder / f"{name}.whole.part").write_bytes(files[name])
    with DataServer(files) as server:
        fetch("fashion-mnist", mirror=server.url, progress=False, sources={"fashion-mnist": sample_source()})
        assert (name, f"bytes={len(files[name])}-") in server.behaviour.requests
    assert (folder / name).read_bytes() == files[name] and no_parts(folder)


def test_every_not_here_error_names_the_command_that_gets_it(tmp_path, capsys):
    from models.checkpoint import CheckpointError, load_checkpoint
    from sensor.errors import PrivcamError
    from sensor.keys import write_key_file

    key = tmp_path / "k.key"
    assert main(["replay", str(tmp_path / "gone.mcap"), "--key", str(key)]) == 2
    assert "privcam keygen" in capsys.readouterr().err
    write_key_file(key)
    assert main(["replay", str(tmp_path / "gone.mcap"), "--key", str(key)]) == 2
    err = capsys.readouterr().err
    assert "gone.mcap: recording not found" in err and "privcam record" in err
    with pytest.raises(CheckpointError, match="privcam train"):
        load_checkpoint(tmp_path / "none.pt")
    pytest.importorskip("ray")
    from pipeline.ray.datasource import expand_recordings

    for missing in (tmp_path / "gone.mcap", tmp_path / "*.mcap", tmp_path):
        with pytest.raises(PrivcamError, match="privcam record"):
            expand_recordings([str(missing)])


def test_progress_bar_and_an_unwritable_cache(cache, monkeypatch, capsys):
    monkeypatch.setitem(datafetch.SOURCES, "fashion-mnist", sample_source())
    with DataServer(sample_bytes()) as server:
        assert main(["data", "fashion-mnist", "--mirror", server.url]) == 0
        err = capsys.readouterr().err
        assert "t10k-images-idx3-ubyte.gz" in err and "100%" in err  # tqdm, on stderr
        blocker = cache.parent / "a-file"
        blocker.write_text("")
        assert main(["data", "fashion-mnist", "--mirror", server.url, "--root", str(blocker), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot create the dataset folder" in err and err.count("\n") == 1
