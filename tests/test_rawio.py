"""Tests of sensor.rawio: round trips of every format, DNG read back by rawpy, input validation,
atomic writes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import yaml

from sensor import rawio
from sensor.errors import RawFormatError
from sensor.rawio import (
    EXTENSIONS,
    SIDECAR_FIELDS,
    RawFrame,
    RawMeta,
    read_raw,
    sidecar_path,
    write_raw,
)

PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG", "mono")
NEEDS_TIFFFILE = {".tif", ".tiff", ".dng"}
# rawpy (LibRaw) rejects images smaller than 22 pixels a side; round trips use a size it accepts.
H, W = 24, 32


def _frame(bit_depth: int = 12, cfa: str = "RGGB", height: int = H, width: int = W, seed: int = 0,
           **meta_kwargs: object) -> RawFrame:
    """A frame with random values that reach 2**bit_depth - 1."""
    data = np.random.default_rng(seed).integers(0, 1 << bit_depth, (height, width), dtype=np.uint16)
    data[0, 0] = (1 << bit_depth) - 1
    return RawFrame(data, RawMeta(width, height, bit_depth, cfa, **meta_kwargs))  # type: ignore[arg-type]


def _need(ext: str) -> None:
    if ext in NEEDS_TIFFFILE:
        pytest.importorskip("tifffile")


def _raises(path: Path, field: str, fn, *args, **kwargs) -> RawFormatError:
    """Call fn, expect RawFormatError naming the file and the field."""
    with pytest.raises(RawFormatError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert path.name in msg, msg
    assert field in msg, msg
    assert info.value.field == field or field in info.value.field, (info.value.field, field)
    return info.value


def _write_headerless(path: Path, data: np.ndarray, **overrides: object) -> None:
    """A .raw/.bin file and its sidecar written by hand (not by write_raw)."""
    fields = {"width": int(data.shape[1]), "height": int(data.shape[0]), "bit_depth": 12, "cfa": "RGGB",
              "black_level": 64, "white_level": 4095, "byte_order": "little"}
    fields.update(overrides)
    path.write_bytes(data.astype("<u2").tobytes())
    sidecar_path(path).write_text(yaml.safe_dump(fields))


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", EXTENSIONS)
@pytest.mark.parametrize("cfa", PATTERNS)
@pytest.mark.parametrize("bit_depth", [10, 12, 16])
def test_round_trip_every_format_pattern_and_depth(tmp_path: Path, ext: str, cfa: str,
                                                   bit_depth: int) -> None:
    _need(ext)
    frame = _frame(bit_depth, cfa, black_level=bit_depth * 3, white_level=(1 << bit_depth) - 5)
    path = tmp_path / f"frame{ext}"
    write_raw(path, frame)
    back = read_raw(path)
    assert back.meta == frame.meta
    assert back.data.dtype == np.uint16 and back.data.shape == (H, W)
    np.testing.assert_array_equal(back.data, frame.data)
    assert sidecar_path(path).exists() == (ext != ".dng")


@pytest.mark.parametrize("ext", EXTENSIONS)
@pytest.mark.parametrize("bit_depth", [8, 14])
def test_round_trip_big_endian_and_other_depths(tmp_path: Path, ext: str, bit_depth: int) -> None:
    _need(ext)
    frame = _frame(bit_depth, "GRBG", byte_order="big")
    path = tmp_path / f"frame{ext}"
    write_raw(path, frame.data, frame.meta)
    back = read_raw(path)
    assert back.meta == frame.meta
    np.testing.assert_array_equal(back.data, frame.data)


def test_headerless_file_is_exactly_the_samples_in_the_stated_byte_order(tmp_path: Path) -> None:
    for order, dtype in (("little", "<u2"), ("big", ">u2")):
        frame = _frame(16, "BGGR", byte_order=order)
        path = tmp_path / f"frame_{order}.raw"
        write_raw(path, frame)
        assert path.read_bytes() == frame.data.astype(dtype).tobytes()
        assert yaml.safe_load(sidecar_path(path).read_text()) == {
            "width": W, "height": H, "bit_depth": 16, "cfa": "BGGR", "black_level": 0,
            "white_level": 65535, "byte_order": order,
        }


def test_meta_default_white_level_is_full_scale() -> None:
    meta = RawMeta(4, 2, 10, "mono")
    assert meta.white_level == 1023 and meta.black_level == 0 and meta.byte_order == "little"
    assert meta.shape == (2, 4) and meta.max_value == 1023


@pytest.mark.parametrize("ext", [".npy", ".png", ".tif"])
def test_read_without_sidecar_uses_hints_and_defaults(tmp_path: Path, ext: str) -> None:
    _need(ext)
    frame = _frame(12, "GBRG")
    path = tmp_path / f"frame{ext}"
    write_raw(path, frame)
    sidecar_path(path).unlink()
    back = read_raw(path, cfa="GBRG")
    assert back.meta == RawMeta(W, H, 16, "GBRG", 0, 65535, "little")  # bit depth defaults to 16
    np.testing.assert_array_equal(back.data, frame.data)
    hinted = read_raw(path, cfa="GBRG", bit_depth=12, black_level=64, white_level=4000)
    assert hinted.meta == RawMeta(W, H, 12, "GBRG", 64, 4000, "little")


def test_read_without_sidecar_or_cfa_hint_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "frame.npy"
    np.save(path, np.zeros((4, 6), np.uint16))
    _raises(path, "cfa", read_raw, path)


def test_hint_contradicting_the_sidecar_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "frame.npy"
    write_raw(path, _frame(12, "RGGB"))
    _raises(path, "cfa", read_raw, path, cfa="BGGR")
    assert read_raw(path, cfa="RGGB", bit_depth=12).meta.cfa == "RGGB"  # agreeing hints are fine


def test_unknown_hint_is_a_type_error(tmp_path: Path) -> None:
    path = tmp_path / "frame.npy"
    write_raw(path, _frame())
    with pytest.raises(TypeError, match="pattern"):
        read_raw(path, pattern="RGGB")


# ---------------------------------------------------------------------------------------------
# DNG as rawpy sees it
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfa", ["RGGB", "BGGR", "GRBG", "GBRG"])
@pytest.mark.parametrize("byte_order", ["little", "big"])
def test_dng_read_by_rawpy_gives_pattern_values_and_levels(tmp_path: Path, cfa: str, byte_order: str) -> None:
    pytest.importorskip("tifffile")
    rawpy = pytest.importorskip("rawpy")
    frame = _frame(12, cfa, black_level=64, white_level=4000, byte_order=byte_order)
    path = tmp_path / "frame.dng"
    write_raw(path, frame)
    with rawpy.imread(str(path)) as raw:
        desc = raw.color_desc.decode()
        letters = "".join(desc[i] for i in np.asarray(raw.raw_pattern).flat)
        assert raw.raw_pattern.shape == (2, 2)
        assert letters == cfa
        assert raw.num_colors == 3
        np.testing.assert_array_equal(raw.raw_image, frame.data)
        assert list(raw.black_level_per_channel) == [64] * 4
        assert raw.white_level == 4000


def test_mono_dng_read_by_rawpy(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    rawpy = pytest.importorskip("rawpy")
    frame = _frame(14, "mono", black_level=100)
    path = tmp_path / "mono.dng"
    write_raw(path, frame)
    with tifffile.TiffFile(path) as tif:
        assert int(tif.pages[0].photometric) == 34892  # LinearRaw
    with rawpy.imread(str(path)) as raw:
        assert raw.num_colors == 1
        np.testing.assert_array_equal(raw.raw_image, frame.data)
        assert list(raw.black_level_per_channel) == [100] * 4
        assert raw.white_level == (1 << 14) - 1


def test_dng_tags(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    path = tmp_path / "frame.dng"
    write_raw(path, _frame(10, "GBRG", black_level=16, white_level=1000))
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        tags = {tag.code: tag.value for tag in page.tags}
    assert int(page.photometric) == 32803
    assert tags[254] == 0
    assert tuple(tags[33421]) == (2, 2)
    assert tuple(bytes(tags[33422])) == (1, 2, 0, 1)  # G B R G
    assert tuple(bytes(tags[50706])) == (1, 4, 0, 0)
    assert tags[50714] == 16 and tags[50717] == 1000
    assert tags[50778] == 21 and len(tags[50721]) == 18 and len(tags[50728]) == 6
    assert "bit_depth=10" in tags[270] and tags[50708]


def test_dng_postprocesses_with_rawpy(tmp_path: Path) -> None:
    pytest.importorskip("tifffile")
    rawpy = pytest.importorskip("rawpy")
    path = tmp_path / "frame.dng"
    write_raw(path, _frame(12, "RGGB"))
    with rawpy.imread(str(path)) as raw:
        rgb = raw.postprocess()
    assert rgb.shape == (H, W, 3)


@pytest.mark.parametrize("cfa", PATTERNS)
def test_small_dng_falls_back_to_tifffile(tmp_path: Path, cfa: str) -> None:
    pytest.importorskip("tifffile")
    frame = _frame(12, cfa, height=4, width=6, black_level=10)
    path = tmp_path / "small.dng"
    write_raw(path, frame)
    back = read_raw(path)
    assert back.meta == frame.meta
    np.testing.assert_array_equal(back.data, frame.data)


@pytest.mark.parametrize("cfa", PATTERNS)
def test_dng_read_without_rawpy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cfa: str) -> None:
    pytest.importorskip("tifffile")
    frame = _frame(16, cfa, white_level=60000, byte_order="big")
    path = tmp_path / "frame.dng"
    write_raw(path, frame)
    monkeypatch.setitem(__import__("sys").modules, "rawpy", None)  # import rawpy -> ImportError
    back = read_raw(path)
    assert back.meta == frame.meta
    np.testing.assert_array_equal(back.data, frame.data)


def test_dng_without_privcam_description_infers_bit_depth(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    frame = _frame(12, "BGGR", white_level=4000)
    path = tmp_path / "foreign.dng"
    tifffile.imwrite(path, frame.data, photometric=32803, metadata=None, extratags=rawio.dng_tags(frame.meta))
    assert read_raw(path).meta == frame.meta


# ---------------------------------------------------------------------------------------------
# Bad input: every reader error names the file and the field
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_missing_file(tmp_path: Path, ext: str) -> None:
    path = tmp_path / f"absent{ext}"
    _raises(path, "file", read_raw, path)


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "frame.jpg"
    path.write_bytes(b"x")
    _raises(path, "extension", read_raw, path)
    _raises(path, "extension", write_raw, path, _frame())
    assert path.read_bytes() == b"x"


@pytest.mark.parametrize("ext", [".raw", ".bin"])
def test_missing_sidecar(tmp_path: Path, ext: str) -> None:
    path = tmp_path / f"frame{ext}"
    path.write_bytes(np.zeros((4, 6), "<u2").tobytes())
    err = _raises(path, "sidecar", read_raw, path, width=6, height=4, cfa="RGGB")
    assert "frame" + ext + ".yaml" in str(err)


@pytest.mark.parametrize("ext", [".raw", ".bin"])
def test_truncated_headerless_file(tmp_path: Path, ext: str) -> None:
    path = tmp_path / f"frame{ext}"
    _write_headerless(path, np.zeros((4, 6), np.uint16))
    path.write_bytes(path.read_bytes()[:-3])
    err = _raises(path, "size", read_raw, path)
    assert "48 bytes" in str(err) and "45 bytes" in str(err)


def test_oversized_headerless_file(tmp_path: Path) -> None:
    path = tmp_path / "frame.raw"
    _write_headerless(path, np.zeros((4, 6), np.uint16), height=3)
    err = _raises(path, "size", read_raw, path)
    assert "36 bytes" in str(err) and "48 bytes" in str(err)


def test_truncated_npy(tmp_path: Path) -> None:
    path = tmp_path / "frame.npy"
    np.save(path, np.zeros((8, 8), np.uint16))
    path.write_bytes(path.read_bytes()[:-10])
    _raises(path, "npy", read_raw, path, cfa="RGGB")


def test_undecodable_png(tmp_path: Path) -> None:
    path = tmp_path / "frame.png"
    path.write_bytes(b"not a png at all")
    _raises(path, "png", read_raw, path, cfa="RGGB")


def test_undecodable_tiff_and_dng(tmp_path: Path) -> None:
    pytest.importorskip("tifffile")
    tif = tmp_path / "frame.tif"
    tif.write_bytes(b"II*\x00garbage")
    _raises(tif, "tiff", read_raw, tif, cfa="RGGB")
    dng = tmp_path / "frame.dng"
    dng.write_bytes(b"GIF89a....")
    _raises(dng, "header", read_raw, dng)


@pytest.mark.parametrize("bad", ["RGBG", "rggb", "XYZW", 3])
def test_unknown_cfa_in_sidecar(tmp_path: Path, bad: object) -> None:
    path = tmp_path / "frame.raw"
    _write_headerless(path, np.zeros((4, 6), np.uint16), cfa=bad)
    _raises(path, "cfa", read_raw, path)


def test_unknown_cfa_hint(tmp_path: Path) -> None:
    path = tmp_path / "frame.npy"
    np.save(path, np.zeros((4, 6), np.uint16))
    _raises(path, "cfa", read_raw, path, cfa="CYGM")


def test_unknown_cfa_in_dng(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    pytest.importorskip("rawpy")
    meta = RawMeta(W, H, 12, "RGGB")
    tags = [t if t[0] != 33422 else (33422, 1, 4, (0, 1, 1, 0), True) for t in rawio.dng_tags(meta)]
    path = tmp_path / "rggr.dng"
    tifffile.imwrite(path, np.zeros((H, W), np.uint16), photometric=32803, metadata=None, extratags=tags)
    _raises(path, "cfa", read_raw, path)
    small = tmp_path / "rggr_small.dng"  # below LibRaw's size limit: read by tifffile
    tifffile.imwrite(small, np.zeros((4, 6), np.uint16), photometric=32803, metadata=None, extratags=tags)
    _raises(small, "cfa", read_raw, small)


@pytest.mark.parametrize("bad", [11, 0, 32, "12"])
def test_bad_bit_depth_in_sidecar(tmp_path: Path, bad: object) -> None:
    path = tmp_path / "frame.bin"
    _write_headerless(path, np.zeros((4, 6), np.uint16), bit_depth=bad)
    _raises(path, "bit_depth", read_raw, path)


def test_bad_bit_depth_hint(tmp_path: Path) -> None:
    path = tmp_path / "frame.npy"
    np.save(path, np.zeros((4, 6), np.uint16))
    _raises(path, "bit_depth", read_raw, path, cfa="RGGB", bit_depth=9)


@pytest.mark.parametrize("ext", [".raw", ".npy", ".png", ".tif", ".dng"])
def test_values_above_bit_depth(tmp_path: Path, ext: str) -> None:
    _need(ext)
    frame = _frame(16, "RGGB")
    frame.data[3, 5] = 5000
    frame.data[frame.data > 5000] = 17
    path = tmp_path / f"frame{ext}"
    write_raw(path, frame)
    if ext == ".dng":  # declare 12 bits in the file itself
        rawio.write_dng(path, frame.data, RawMeta(W, H, 12, "RGGB", white_level=4095))
        err = _raises(path, "data", read_raw, path)
    else:
        sidecar = yaml.safe_load(sidecar_path(path).read_text())
        sidecar.update(bit_depth=12, white_level=4095)
        sidecar_path(path).write_text(yaml.safe_dump(sidecar))
        err = _raises(path, "data", read_raw, path)
    assert "5000" in str(err) and "4095" in str(err) and "bit_depth" in str(err)


def test_wrong_dtype_npy(tmp_path: Path) -> None:
    path = tmp_path / "frame.npy"
    np.save(path, np.zeros((4, 6), np.float32))
    err = _raises(path, "dtype", read_raw, path, cfa="RGGB")
    assert "uint16" in str(err) and "float32" in str(err)


def test_wrong_ndim_npy(tmp_path: Path) -> None:
    path = tmp_path / "frame.npy"
    np.save(path, np.zeros((2, 4, 6), np.uint16))
    _raises(path, "ndim", read_raw, path, cfa="RGGB")


def test_eight_bit_png_is_wrong_dtype(tmp_path: Path) -> None:
    import cv2

    path = tmp_path / "frame.png"
    cv2.imwrite(str(path), np.zeros((4, 6), np.uint8))
    _raises(path, "dtype", read_raw, path, cfa="RGGB")


def test_colour_png_is_wrong_ndim(tmp_path: Path) -> None:
    import cv2

    path = tmp_path / "frame.png"
    cv2.imwrite(str(path), np.zeros((4, 6, 3), np.uint16))
    _raises(path, "ndim", read_raw, path, cfa="RGGB")


def test_wrong_ndim_tiff(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    path = tmp_path / "frame.tiff"
    tifffile.imwrite(path, np.zeros((4, 6, 3), np.uint16), photometric="rgb")
    _raises(path, "ndim", read_raw, path, cfa="RGGB")


def test_shape_contradicting_sidecar(tmp_path: Path) -> None:
    path = tmp_path / "frame.npy"
    write_raw(path, _frame())
    np.save(path, np.zeros((H, W + 2), np.uint16))
    _raises(path, "width", read_raw, path)


@pytest.mark.parametrize("text", ["width: [1, 2\n", "width: 4\n  height: 3\n bad", "\t- : :"])
def test_malformed_yaml_sidecar(tmp_path: Path, text: str) -> None:
    path = tmp_path / "frame.raw"
    _write_headerless(path, np.zeros((4, 6), np.uint16))
    sidecar_path(path).write_text(text)
    _raises(path, "sidecar", read_raw, path)


@pytest.mark.parametrize("text", ["just a string\n", "- 1\n- 2\n", ""])
def test_sidecar_not_a_mapping(tmp_path: Path, text: str) -> None:
    path = tmp_path / "frame.npy"
    np.save(path, np.zeros((4, 6), np.uint16))
    sidecar_path(path).write_text(text)
    _raises(path, "sidecar", read_raw, path)


@pytest.mark.parametrize("missing", SIDECAR_FIELDS)
def test_missing_sidecar_field(tmp_path: Path, missing: str) -> None:
    path = tmp_path / "frame.raw"
    _write_headerless(path, np.zeros((4, 6), np.uint16))
    fields = yaml.safe_load(sidecar_path(path).read_text())
    del fields[missing]
    sidecar_path(path).write_text(yaml.safe_dump(fields))
    err = _raises(path, missing, read_raw, path)
    assert "missing" in str(err)


@pytest.mark.parametrize(
    ("field", "value"),
    [("width", 0), ("height", -4), ("width", 6.0), ("black_level", -1), ("black_level", 4095),
     ("white_level", 4096), ("white_level", 64), ("byte_order", "native"), ("height", True)],
)
def test_bad_sidecar_values(tmp_path: Path, field: str, value: object) -> None:
    path = tmp_path / "frame.raw"
    _write_headerless(path, np.zeros((4, 6), np.uint16), **{field: value})
    _raises(path, field, read_raw, path)


# ---------------------------------------------------------------------------------------------
# Writers: validation and atomicity
# ---------------------------------------------------------------------------------------------


def test_write_array_without_meta_is_a_type_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="meta"):
        write_raw(tmp_path / "frame.npy", np.zeros((4, 6), np.uint16))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("data", "meta", "field"),
    [
        (np.full((4, 6), 4096, np.uint16), RawMeta(6, 4, 12, "RGGB"), "data"),
        (np.zeros((4, 6), np.uint16), RawMeta(8, 4, 12, "RGGB"), "shape"),
        (np.zeros((4, 6), np.int32), RawMeta(6, 4, 12, "RGGB"), "dtype"),
        (np.zeros((1, 4, 6), np.uint16), RawMeta(6, 4, 12, "RGGB"), "ndim"),
        (np.zeros((4, 6), np.uint16), RawMeta(6, 4, 12, "RGBG"), "cfa"),
        (np.zeros((4, 6), np.uint16), RawMeta(6, 4, 11, "RGGB"), "bit_depth"),
    ],
)
def test_writer_rejects_bad_frames_and_writes_nothing(tmp_path: Path, data: np.ndarray, meta: RawMeta,
                                                      field: str) -> None:
    path = tmp_path / "frame.raw"
    _raises(path, field, write_raw, path, data, meta)
    assert list(tmp_path.iterdir()) == []


def _partial_then_fail(*args: object, **kwargs: object) -> None:
    """Stand-in for a library writer: writes some bytes to its target, then fails."""
    target = args[0] if isinstance(args[0], (str, os.PathLike)) else None
    if target is not None:
        Path(target).write_bytes(b"partial")
    else:
        args[0].write(b"partial")  # type: ignore[attr-defined]
    raise RuntimeError("disk on fire")


@pytest.mark.parametrize(
    ("ext", "module", "name"),
    [(".npy", "numpy", "save"), (".dng", "tifffile", "imwrite"), (".tif", "tifffile", "imwrite")],
)
def test_failing_writer_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ext: str,
                                             module: str, name: str) -> None:
    mod = pytest.importorskip(module)
    good = tmp_path / f"good{ext}"
    frame = _frame(12, "RGGB")
    write_raw(good, frame)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    monkeypatch.setattr(mod, name, _partial_then_fail)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_raw(good, _frame(12, "BGGR", seed=1))  # over an existing good file
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_raw(tmp_path / f"new{ext}", frame)  # to a fresh path
    monkeypatch.undo()

    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    back = read_raw(good)
    assert back.meta == frame.meta
    np.testing.assert_array_equal(back.data, frame.data)


def test_failing_sidecar_write_keeps_old_frame_and_sidecar(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    good = tmp_path / "good.raw"
    write_raw(good, _frame(12, "RGGB"))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def fail(meta: RawMeta) -> str:
        raise RuntimeError("yaml exploded")

    monkeypatch.setattr(rawio, "_sidecar_text", fail)
    with pytest.raises(RuntimeError, match="yaml exploded"):
        write_raw(good, _frame(10, "GBRG", seed=3))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_failing_replace_removes_temp_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(src: object, dst: object) -> None:
        raise OSError("replace failed")

    monkeypatch.setattr(rawio.os, "replace", fail)
    with pytest.raises(OSError, match="replace failed"):
        write_raw(tmp_path / "frame.png", _frame())
    assert list(tmp_path.iterdir()) == []


def test_written_files_honour_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "frame.npy"
    old = os.umask(0o022)
    try:
        write_raw(path, _frame())
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(sidecar_path(path).stat().st_mode) == 0o644


@pytest.mark.parametrize("cfa", PATTERNS)
def test_dng_read_uses_rawpy_when_it_can(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cfa: str) -> None:
    pytest.importorskip("tifffile")
    pytest.importorskip("rawpy")
    frame = _frame(14, cfa, black_level=200, white_level=16000)
    path = tmp_path / "frame.dng"
    write_raw(path, frame)

    def no_fallback(path: Path) -> None:
        raise AssertionError("tifffile fallback used")

    monkeypatch.setattr(rawio, "_dng_tifffile", no_fallback)
    back = read_raw(path)
    assert back.meta == frame.meta
    np.testing.assert_array_equal(back.data, frame.data)
