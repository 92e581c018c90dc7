"""Tests of sensor.readout (with its readout_tables and readout_kernels, and the torch twins in
models.tables): numba kernels vs numpy references, round trips, tables, statistics."""

from __future__ import annotations

import hashlib
import math
import sys

import numba
import numpy as np
import pytest
import torch

from models import tables as mt
from sensor import permutation as pm
from sensor import readout as ro
from sensor import readout_kernels as rk
from sensor import readout_tables as rt
from sensor.cfa import pack
from sensor.keys import Key
from sensor.permutation import invert, keystream_words, row_words, shuffle_rows_nb, shuffle_rows_ref
from tests import reference

H, W = 64, 96
SEED = hashlib.sha256(b"privcam test readout subkey").digest()  # a 32-byte readout subkey
SECRET = bytes(range(32))
KEY = Key(SECRET)


def _frames(n: int | None, h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    """Random uint16 frame (h, w), or a batch (n, h, w)."""
    shape = (h, w) if n is None else (n, h, w)
    return np.random.default_rng(seed).integers(0, 1 << 16, shape, dtype=np.uint16)


# ---------------------------------------------------------------------------------------------
# Hash, sort and table builders: numba == numpy
# ---------------------------------------------------------------------------------------------


def _sub(i: int) -> bytes:
    """A deterministic 32-byte subkey per test case."""
    return hashlib.sha256(b"privcam test subkey %d" % i).digest()


@pytest.mark.parametrize("stream, count", [(0, 1), (3, 7), (2**64 - 1, 50), (11, 4096)])
def test_keystream_is_aes256_of_the_documented_counter_blocks(stream, count):
    assert keystream_words(SEED, stream, count).tolist() == reference.keystream_words(SEED, stream, count)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64])
def test_fisher_yates_numba_matches_reference(dtype):
    for rows, cols in ((1, 1), (1, 2), (5, 7), (16, 33), (3, 300)):
        words = keystream_words(SEED, 5, rows * row_words(cols))
        out = np.empty((rows, cols), dtype)
        shuffle_rows_nb(words, out)
        ref = shuffle_rows_ref(words, rows, cols)
        assert np.array_equal(out, ref)
        assert np.array_equal(ref, np.array(reference.row_perms(SEED, 5, rows, cols)))


def test_fisher_yates_rejects_and_redraws():
    """Words that fall in the rejection zone of the bounded draw take the row's next word."""
    cols = 3  # draws for i = 2 (bound 3) and i = 1 (bound 2); 2**32 % 3 == 1, so the low word 0 is rejected
    words = np.array([0, 0xAAAAAAAB, 0x80000000, 0, 0, 0], np.uint32)  # bound 3: w=0 -> m=0 < 1: redraw
    ref = shuffle_rows_ref(words, 1, cols)
    out = np.empty((1, cols), np.int64)
    shuffle_rows_nb(words, out)
    assert np.array_equal(out, ref)
    assert ref[0].tolist() == np.array(reference.row_perms_from_words(words.tolist(), 1, cols)).ravel().tolist()


@pytest.mark.parametrize("rows, cols", [(8, 8), (12, 20), (31, 7)])
def test_three_pass_tables_and_compose_numba_match_numpy(rows, cols):
    fast = rt.three_pass_tables(SEED, rows, cols)
    ref = rt.three_pass_tables_numpy(SEED, rows, cols)
    for a, b, shape in zip(fast, ref, [(rows, cols), (cols, rows), (rows, cols)], strict=True):
        assert a.shape == shape and a.dtype == b.dtype == np.uint16
        assert np.array_equal(a, b)
    assert np.array_equal(rt.compose_table(*fast), rt.compose_table_numpy(*ref))
    out = np.full((2, rows * cols), -1, np.int64)  # into a row of a batch's tables
    assert np.shares_memory(rt.compose_table(*fast, out=out[1]), out)
    assert np.array_equal(out[1], rt.compose_table_numpy(*ref)) and (out[0] == -1).all()
    with pytest.raises(ValueError, match="out"):
        rt.compose_table(*fast, out=np.empty(rows * cols, np.int32))


@pytest.mark.parametrize("dtype", [np.uint16, np.int64])
def test_single_threaded_shuffle_matches_reference(dtype):
    for rows, cols in ((1, 1), (5, 7), (16, 33), (3, 300)):
        words = keystream_words(SEED, 2, rows * row_words(cols))
        out = np.empty((rows, cols), dtype)
        pm.shuffle_block_nb(words, out)
        assert np.array_equal(out, shuffle_rows_ref(words, rows, cols))


@pytest.mark.parametrize("chunk_bytes, tasks_per_thread, one_thread",
                         [(1, 100, False), (52, 100, False), (100, 1, False), (4096, 4, False), (1 << 20, 4, False),
                          (52, 4, True)])
def test_pipelined_builder_in_chunks_matches_the_reference(monkeypatch, chunk_bytes, tasks_per_thread, one_thread):
    """Chunks of whole rows whose keystream starts mid-block (row_words(6) = 9 words = 36 bytes),
    on the pool or in the calling thread (small tables, or one thread), and several tables in one
    call give the tables of the plain reference and of the test reference."""
    monkeypatch.setattr(pm, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(pm, "TASKS_PER_THREAD", tasks_per_thread)
    if one_thread:  # the caller's numba share is one thread: built inline, the pool untouched
        monkeypatch.setattr(pm, "_pool", lambda: (2, None))
    outs = [(4, np.empty((13, 6), np.uint16)), (9, np.empty((5, 40), np.int32)),
            (2**64 - 1, np.empty((1, 3), np.int64))]
    before = numba.get_num_threads()
    numba.set_num_threads(1 if one_thread else numba.config.NUMBA_NUM_THREADS)
    try:
        pm.fill_row_permutations(SEED, outs)
    finally:
        numba.set_num_threads(before)
    for stream, out in outs:
        rows, cols = out.shape
        assert np.array_equal(out, shuffle_rows_ref(keystream_words(SEED, stream, rows * row_words(cols)), rows, cols))
        assert out.tolist() == reference.row_perms(SEED, stream, rows, cols)


def test_pipelined_builder_validates_its_tables():
    with pytest.raises(ValueError, match="out: expected a C-contiguous"):
        pm.fill_row_permutations(SEED, [(0, np.empty((4, 6), np.uint16)[:, ::2])])
    with pytest.raises(ValueError, match="out: expected .* integer array, got float64"):
        pm.fill_row_permutations(SEED, [(0, np.empty((4, 6)))])
    with pytest.raises(ValueError, match="stream: expected an integer in"):
        pm.fill_row_permutations(SEED, [(-1, np.empty((4, 6), np.uint16))])
    with pytest.raises(ValueError, match="subkey: expected 32 bytes"):
        pm.fill_row_permutations(SEED[:31], [(0, np.empty((4, 6), np.uint16))])


def test_stacked_tables_are_the_per_plane_tables():
    a, b, c = rt.stacked_tables(SEED, 6, 10, 4)
    assert a.shape == c.shape == (4, 6, 10) and b.shape == (4, 10, 6)
    for t in range(4):
        for got, want in zip((a[t], b[t], c[t]), rt.three_pass_tables_numpy(SEED, 6, 10, t), strict=True):
            assert np.array_equal(got, want)


def test_table_dtype_switches_to_int32_for_long_axes():
    assert rt.table_dtype(65535, 10) == np.uint16
    assert rt.table_dtype(3, 65536) == np.int32


def test_composed_table_matches_the_three_passes():
    rows, cols = 9, 13
    a, b, c = rt.three_pass_tables_numpy(SEED, rows, cols)
    x = np.arange(rows * cols).reshape(rows, cols)
    pa = np.take_along_axis(x, a.astype(np.intp), axis=1)  # a[r, c] = x[r, A[r, c]]
    pb = np.take_along_axis(pa, b.T.astype(np.intp), axis=0)  # b[r, c] = a[B[c, r], c]
    y = np.take_along_axis(pb, c.astype(np.intp), axis=1)  # y[r, c] = b[r, C[r, c]]
    assert np.array_equal(y.ravel(), x.ravel()[rt.compose_table_numpy(a, b, c)])
    for tab, n in ((a, cols), (b, rows), (c, cols)):  # every row of every table is a permutation
        assert np.array_equal(np.sort(tab, axis=1), np.broadcast_to(np.arange(n), tab.shape))


# ---------------------------------------------------------------------------------------------
# Pass kernels: numba == numpy reference, on every unit layout
# ---------------------------------------------------------------------------------------------

# (P, Q, unit dtype, lanes T): the pixel, quad and plane layouts
LAYOUTS = [(1, 1, np.uint16, 1), (2, 1, np.uint32, 1), (2, 2, np.uint16, 4)]


def _units_and_tables(layout, tab_dtype, n=2, rows=11, cols=19):
    p, q, dt, t = layout
    rng = np.random.default_rng(7)
    x = rng.integers(0, np.iinfo(dt).max, (n, rows, p, cols, q), dtype=dt)

    def perms(r, k):
        return np.stack([np.argsort(rng.random((r, k)), axis=1) for _ in range(t)]).astype(tab_dtype)

    return x, perms(rows, cols), perms(cols, rows)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tab_dtype", [np.uint16, np.int32])
@pytest.mark.parametrize("scatter", [False, True])
def test_row_kernel_matches_reference(layout, tab_dtype, scatter):
    x, tab, _ = _units_and_tables(layout, tab_dtype)
    ref = rk.rows_ref(x, tab, scatter)
    out = np.empty_like(x)
    rk.rows_nb(x, tab, out, False, scatter)
    assert np.array_equal(out, ref)
    inplace = x.copy()
    rk.rows_nb(inplace, tab, inplace, True, scatter)
    assert np.array_equal(inplace, ref)
    assert np.array_equal(rk.rows_ref(ref, tab, not scatter), x)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tab_dtype", [np.uint16, np.int32])
@pytest.mark.parametrize("scatter", [False, True])
@pytest.mark.parametrize("rows, cols", [(11, 19), (12, 20)])
def test_transposing_kernels_match_reference(layout, tab_dtype, scatter, rows, cols):
    # 11 x 19 moves single units; 12 x 20 moves uint64 word tiles for the pixel layout (uint16
    # units) with blocks 4, 8 and 64
    x, tab, _ = _units_and_tables(layout, tab_dtype, rows=rows, cols=cols)
    n, _, p, _, q = x.shape
    xt = rk.swap_rk(x)  # a source in the transposed layout (N, K, P, R, Q)
    assert xt.shape == (n, cols, p, rows, q)
    for block in (1, 4, 6, 8, 64):
        out_t = np.empty_like(xt)
        rk.rows_to_t_nb(x, tab, out_t, block, scatter)
        assert np.array_equal(out_t, rk.rows_to_t_ref(x, tab, scatter))
        out = np.empty_like(x)
        rk.t_to_rows_nb(xt, tab, out, block, scatter)
        assert np.array_equal(out, rk.t_to_rows_ref(xt, tab, scatter))
    assert np.array_equal(rk.t_to_rows_ref(rk.rows_to_t_ref(x, tab, scatter), tab, not scatter), x)


@pytest.mark.skipif(sys.byteorder != "little", reason="word tiles are only used on little-endian machines")
def test_word_tile_transpose():
    rng = np.random.default_rng(5)
    w = rng.integers(0, 1 << 63, 4, dtype=np.uint64)
    tile = w.view(np.uint16).reshape(4, 4)  # row i = the 4 lanes of word i (little-endian)
    got = np.array(rk.tr4x16(*w), np.uint64).view(np.uint16).reshape(4, 4)
    assert np.array_equal(got, tile.T)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scatter", [False, True])
def test_column_strip_kernel_matches_reference(layout, scatter):
    x, _, b = _units_and_tables(layout, np.uint16)
    bt = np.ascontiguousarray(b.transpose(0, 2, 1))  # (T, R, K): Bt[t, r, c] = B[t, c, r]
    expected = rk.cols_ref(x, bt, scatter)
    for tile in (1, 4, 64):  # 4 does not divide the 19 columns
        out = np.empty_like(x)
        rk.cols_nb(x, bt, out, tile, scatter)
        assert np.array_equal(out, expected)
        inplace = x.copy()
        rk.cols_nb(inplace, bt, inplace, tile, scatter)
        assert np.array_equal(inplace, expected)
    assert np.array_equal(rk.cols_ref(expected, bt, not scatter), x)


def test_forward_units_match_the_pass_references():
    for layout in LAYOUTS:
        x, a, b = _units_and_tables(layout, np.uint16)
        c = _units_and_tables(layout, np.uint16)[1][:, ::-1].copy()
        y = rk.rows_ref(x, a, False)  # pass A
        y = rk.cols_ref(y, np.ascontiguousarray(b.transpose(0, 2, 1)), False)  # pass B
        y = rk.rows_ref(y, c, False)  # pass C
        out = np.empty_like(x)
        rk.forward_units(x, (a, b, c), out)
        assert np.array_equal(out, y)
        rk.inverse_units(out, (a, b, c), out)
        assert np.array_equal(out, x)


def test_flat_gather_matches_reference():
    x = _frames(3).reshape(3, -1)
    pi = np.random.default_rng(1).permutation(x.shape[1]).astype(np.int64)
    out = np.empty_like(x)
    rk.flat_gather_nb(x, pi, out)
    assert np.array_equal(out, rk.flat_gather_ref(x, pi))


# ---------------------------------------------------------------------------------------------
# ReadoutPermutation: round trips, tables, mosaics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ro.SCHEMES)
@pytest.mark.parametrize("batch", [None, 3])
def test_round_trip_and_table(scheme, batch):
    perm = ro.ReadoutPermutation(scheme, H, W, SEED)
    x = _frames(batch)
    y = perm.forward(x)
    assert y.shape == x.shape and y.dtype == np.uint16
    assert not np.array_equal(y, x)
    assert np.array_equal(perm.inverse(y), x)
    pi = perm.table()
    assert pi.shape == (H * W,) and pi.dtype == np.int64
    assert np.array_equal(np.sort(pi), np.arange(H * W))
    flat = x.reshape(-1, H * W)
    assert np.array_equal(y.reshape(-1, H * W), flat[:, pi])


@pytest.mark.parametrize("scheme", ro.SCHEMES)
def test_batch_items_equal_single_frames_and_out_in_place(scheme):
    perm = ro.ReadoutPermutation(scheme, H, W, SEED)
    x = _frames(4)
    y = perm.forward(x)
    for i in range(4):
        assert np.array_equal(y[i], perm.forward(x[i]))
    buf = x.copy()
    assert perm.forward(buf, out=buf) is buf
    assert np.array_equal(buf, y)
    assert perm.inverse(buf, out=buf) is buf
    assert np.array_equal(buf, x)
    out = np.empty_like(x)
    assert perm.forward(x, out=out) is out and np.array_equal(out, y)


@pytest.mark.parametrize("scheme", ro.SCHEMES)
def test_non_contiguous_and_misaligned_inputs(scheme):
    perm = ro.ReadoutPermutation(scheme, H, W, SEED)
    big = _frames(None, H, 2 * W)
    strided = big[:, ::2]  # not contiguous
    assert np.array_equal(perm.forward(strided), perm.forward(strided.copy()))
    raw = np.empty(H * W + 1, np.uint16)
    misaligned = raw[1:].reshape(H, W)  # 2 bytes off a 4-byte boundary
    misaligned[...] = big[:, :W]
    assert np.array_equal(perm.forward(misaligned), perm.forward(big[:, :W].copy()))
    assert np.array_equal(perm.inverse(perm.forward(misaligned)), misaligned)


@pytest.mark.parametrize("scheme", ro.SCHEMES)
def test_int32_tables_for_a_long_axis(scheme):
    h, w = 4, 2 * 65540  # the cell grid has 65540 columns, so the tables are int32
    perm = ro.ReadoutPermutation(scheme, h, w, SEED)
    assert perm.kernel_tables()[0].dtype == np.int32
    x = _frames(2, h, w)
    y = perm.forward(x)
    assert np.array_equal(y.reshape(2, -1), x.reshape(2, -1)[:, perm.table()])
    assert np.array_equal(perm.inverse(y), x)


def test_quad_moves_whole_cells():
    perm = ro.ReadoutPermutation("quad", H, W, SEED)
    x = _frames(2)
    planes, planes_prot = pack(x), pack(perm.forward(x))
    tab = perm.plane_tables()
    assert tab.shape == (H * W // 4,)
    for k in range(4):  # all four planes (colours) are permuted by the same table
        flat = planes[:, k].reshape(2, -1)
        assert np.array_equal(planes_prot[:, k].reshape(2, -1), flat[:, tab])


def test_plane_permutes_each_plane_within_itself():
    perm = ro.ReadoutPermutation("plane", H, W, SEED)
    x = _frames(2)
    planes, planes_prot = pack(x), pack(perm.forward(x))
    tabs = perm.plane_tables()
    assert tabs.shape == (4, H * W // 4)
    for k in range(4):
        flat = planes[:, k].reshape(2, -1)
        assert np.array_equal(planes_prot[:, k].reshape(2, -1), flat[:, tabs[k]])
    for k in range(1, 4):  # independent sub-seeds: the planes get different tables
        assert np.mean(tabs[0] == tabs[k]) < 0.01


@pytest.mark.parametrize("scheme", ro.SCHEMES)
def test_tables_and_frames_follow_the_documented_definition(scheme):
    """Against tests/reference.py: the three passes applied literally to an index grid, with the
    keyed hash in plain Python integers, and the scheme's cell/plane layout from the docstring."""
    perm = ro.ReadoutPermutation(scheme, H, W, SEED)
    pi = reference.frame_table(scheme, H, W, SEED)
    planes = reference.plane_tables(scheme, H, W, SEED)
    assert np.array_equal(perm.table(), pi)
    assert np.array_equal(perm.plane_tables(), planes)
    assert np.array_equal(rt.plane_tables(scheme, H, W, SEED), planes)
    x = _frames(2)
    y = perm.forward(x)
    for i in range(2):
        assert np.array_equal(y[i].reshape(-1), x[i].flat[pi])  # protected.flat[s] = frame.flat[pi[s]]
    assert np.array_equal(perm.forward(x[1]).reshape(-1), x[1].flat[pi])
    restored = np.empty_like(x[0]).reshape(-1)
    restored[pi] = y[0].reshape(-1)
    assert np.array_equal(perm.inverse(y[0]).reshape(-1), restored)


def test_pass_tables_follow_the_documented_definition():
    rows, cols = 9, 13
    a, b, c = reference.pass_tables(SEED, rows, cols)
    for got in (rt.three_pass_tables_numpy(SEED, rows, cols), rt.three_pass_tables(SEED, rows, cols)):
        for tab, want in zip(got, (a, b, c), strict=True):
            assert np.array_equal(tab, np.array(want))


# ---------------------------------------------------------------------------------------------
# Tables on the network's device (built on the CPU and copied)
# ---------------------------------------------------------------------------------------------


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("scheme", ro.SCHEMES)
def test_torch_plane_tables_equal_numpy(scheme, device):
    subkeys = [ro.readout_subkey(KEY, scheme, i) for i in range(3)]
    got = mt.plane_tables_torch(scheme, H, W, subkeys, device)
    ref = np.stack([ro.ReadoutPermutation(scheme, H, W, s).plane_tables() for s in subkeys])
    n = H * W if scheme == "pixel" else H * W // 4
    assert tuple(got.shape) == ((3, 4, n) if scheme == "plane" else (3, n))
    assert got.dtype == torch.int64 and got.device.type == device
    assert np.array_equal(got.cpu().numpy(), ref)
    assert tuple(mt.plane_tables_torch(scheme, H, W, [], device).shape)[0] == 0


# ---------------------------------------------------------------------------------------------
# Keys, rotation and validation
# ---------------------------------------------------------------------------------------------


def test_readout_subkey_static_and_rotated():
    for scheme in ro.SCHEMES:  # HMAC-SHA256 of the documented labels, recomputed with hmac
        assert ro.readout_subkey(KEY, scheme) == reference.readout_subkey(SECRET, scheme)
        for n in (0, 1, 5, 2**40 + 3):
            assert ro.readout_subkey(KEY, scheme, n) == reference.readout_subkey(SECRET, scheme, n)
    subkeys = {ro.readout_subkey(KEY, "pixel")} | {ro.readout_subkey(KEY, s, i) for s in ro.SCHEMES for i in range(3)}
    assert len(subkeys) == 10
    perm = ro.readout_permutation(KEY, "quad", H, W, frame_index=2)
    assert perm == ro.ReadoutPermutation("quad", H, W, reference.readout_subkey(SECRET, "quad", 2))
    assert np.array_equal(perm.table(), reference.readout_table(SECRET, "quad", H, W, 2))


def test_repr_hides_the_subkey():
    perm = ro.readout_permutation(KEY, "plane", H, W)
    for text in (repr(perm), str(perm)):
        assert "subkey" not in text and perm.subkey.hex() not in text and str(perm.subkey) not in text
        assert "plane" in text and str(H) in text and str(W) in text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scheme="tile"), "^scheme: expected one of pixel, quad, plane"),
        (dict(scheme="quad", height=63), "^height: .* even height, got 63"),
        (dict(scheme="plane", width=95), "^width: .* even width, got 95"),
        (dict(height=0), "^height: expected a positive int"),
        (dict(width=2.0), "^width: expected a positive int"),
        (dict(height=True), "^height: expected a positive int"),
        (dict(height=1 << 17, width=1 << 16), "^height, width: at most 2\\*\\*32 pixels"),
        (dict(subkey=b"short"), "^subkey: expected 32 bytes"),
        (dict(subkey=1 << 62), "^subkey: expected 32 bytes"),
        (dict(subkey="1" * 32), "^subkey: expected 32 bytes"),
    ],
)
def test_constructor_validation(kwargs, match):
    args = dict(scheme="pixel", height=H, width=W, subkey=SEED) | kwargs
    with pytest.raises(ValueError, match=match):
        ro.ReadoutPermutation(**args)


def test_pixel_scheme_accepts_odd_sizes():
    perm = ro.ReadoutPermutation("pixel", 7, 5, SEED)
    x = _frames(None, 7, 5)
    assert np.array_equal(perm.inverse(perm.forward(x)), x)


def test_frame_validation_and_secret_free_messages():
    perm = ro.ReadoutPermutation("quad", H, W, SEED)
    with pytest.raises(ValueError, match="frame: expected dtype uint16"):
        perm.forward(np.zeros((H, W), np.float32))
    with pytest.raises(ValueError, match=r"frame: expected shape \(64, 96\)"):
        perm.forward(np.zeros((H, W + 2), np.uint16))
    with pytest.raises(ValueError, match="frame: expected shape"):
        perm.inverse(np.zeros((2, 2, H, W), np.uint16))
    with pytest.raises(ValueError, match="frame: expected a numpy array"):
        perm.forward([[0]])
    with pytest.raises(ValueError, match="out: expected a uint16 array"):
        perm.forward(_frames(None), out=np.empty((H, W), np.int16))
    frames = _frames(3)
    with pytest.raises(ValueError, match="out: overlaps"):
        perm.forward(frames[:2], out=frames[1:])
    with pytest.raises(ValueError, match="out: expected a C-contiguous"):
        perm.forward(frames[0], out=frames[1][::-1])
    with pytest.raises(ValueError, match="frame_index"):
        ro.readout_subkey(KEY, "quad", -1)
    with pytest.raises(ValueError, match="scheme"):
        ro.readout_subkey(KEY, "tiles")
    with pytest.raises(ValueError, match="subkey") as err:
        ro.ReadoutPermutation("pixel", H, W, SEED[:31])
    assert SEED[:31].hex() not in str(err.value) and str(SEED[:31]) not in str(err.value)


# ---------------------------------------------------------------------------------------------
# Statistics of the permutation family (deterministic seeds, so these never flake)
# ---------------------------------------------------------------------------------------------


def _chi2_critical(dof: int, z: float = 3.0902) -> float:
    """Upper critical value of chi-square at alpha = 0.001 (z = 0.999 normal quantile), by the
    Wilson-Hilferty approximation (within 0.1% here; e.g. dof 63 gives 103.4, exact 103.44)."""
    v = 2.0 / (9.0 * dof)
    return dof * (1.0 - v + z * math.sqrt(v)) ** 3


def _landing(scheme: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """(n,) landing slot of each item on the permuted grid of a scheme (plane: plane 0)."""
    h, w = (rows, cols) if scheme == "pixel" else (2 * rows, 2 * cols)
    tabs = rt.plane_tables(scheme, h, w, seed)
    return invert(tabs[0] if scheme == "plane" else tabs)


def test_chi2_critical_value():
    assert abs(_chi2_critical(63) - 103.442) < 0.2
    assert abs(_chi2_critical(10) - 29.588) < 0.3


@pytest.mark.parametrize("scheme", ro.SCHEMES)
def test_landing_slot_is_uniform(scheme):
    rows = cols = 8
    n, trials = rows * cols, 2000
    landing = np.stack([_landing(scheme, rows, cols, _sub(1000 + i)) for i in range(trials)])
    for item in (0, 3 * cols + 5, n - 1):  # corner, interior, opposite corner
        counts = np.bincount(landing[:, item], minlength=n)
        expected = trials / n
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < _chi2_critical(n - 1), (item, chi2)
    # every (item, slot) pair at once: rows of a 64 x 64 contingency table
    table = np.zeros((n, n))
    np.add.at(table, (np.broadcast_to(np.arange(n), landing.shape), landing), 1)
    expected = trials / n
    chi2 = float(((table - expected) ** 2 / expected).sum())
    assert chi2 < _chi2_critical(n * (n - 1)), chi2


def _mean_random_distance(rows: int, cols: int) -> float:
    """Exact mean Euclidean distance between two distinct uniformly random cells of the grid."""
    dr, dc = np.arange(-rows + 1, rows), np.arange(-cols + 1, cols)
    wr, wc = rows - np.abs(dr), cols - np.abs(dc)  # ordered pairs with each difference
    dist = np.hypot(dr[:, None], dc[None, :])
    n = rows * cols
    return float((wr[:, None] * wc[None, :] * dist).sum() / (n * n - n))


@pytest.mark.parametrize("scheme", ro.SCHEMES)
def test_adjacent_pixels_land_far_apart(scheme):
    rows, cols = 24, 32
    expected = _mean_random_distance(rows, cols)
    horiz, vert = [], []
    for i in range(12):
        slot = _landing(scheme, rows, cols, _sub(50 + i)).reshape(rows, cols)
        r, c = np.divmod(slot, cols)
        horiz.append(np.hypot(r[:, 1:] - r[:, :-1], c[:, 1:] - c[:, :-1]).ravel())
        vert.append(np.hypot(r[1:] - r[:-1], c[1:] - c[:-1]).ravel())
    for dists in (horiz, vert):
        assert abs(np.concatenate(dists).mean() / expected - 1.0) < 0.03


@pytest.mark.parametrize("scheme", ro.SCHEMES)
def test_different_seeds_give_unrelated_tables(scheme):
    agree = []
    for i in range(20):
        t1 = rt.plane_tables(scheme, H, W, _sub(2 * i))
        t2 = rt.plane_tables(scheme, H, W, _sub(2 * i + 1))
        frac = np.mean(t1 == t2, axis=-1)
        n = t1.shape[-1]
        assert np.all(frac < 1.0 / n + 0.003), frac
        agree.append(frac.mean() * n)
    assert np.mean(agree) < 2.0  # about 1 agreeing slot per pair, as for random permutations


@pytest.mark.parametrize("scheme", ro.SCHEMES)
def test_rotation_gives_unrelated_consecutive_frames(scheme):
    perms = [ro.readout_permutation(KEY, scheme, H, W, i) for i in range(6)]
    static = ro.readout_permutation(KEY, scheme, H, W)
    tables = [p.table() for p in perms]
    n = H * W
    for t1, t2 in zip(tables, tables[1:] + [static.table()], strict=True):
        assert np.mean(t1 == t2) < 1.0 / n + 0.003
        land1, land2 = invert(t1), invert(t2)  # landing slots of the same pixels: uncorrelated
        assert abs(np.corrcoef(land1, land2)[0, 1]) < 0.05


def test_a_readout_permutation_refuses_to_be_pickled():
    import pickle

    perm = ro.readout_permutation(KEY, "pixel", H, W)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(perm)
