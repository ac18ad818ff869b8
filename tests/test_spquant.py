"""spquant: the SparseQuantMatMul format, its ONNX-function fallback, the native kernel, and the pass."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import onnx_ir as ir
import pytest

from modelsurgeon.errors import UserError
from modelsurgeon.runtime import custom_ops
from modelsurgeon.runtime.session import make_session, session_options
from modelsurgeon.runtime.sparse_quant_format import (SparseQuantWeight, pack_codes, random_weight, reference,
                                                      unpack_codes)
from modelsurgeon.runtime.sparse_quant_function import OP_NAME, single_op_model
from modelsurgeon.verify import structural_problems

LIBRARY = custom_ops.library_path()
needs_library = pytest.mark.skipif(LIBRARY is None, reason="custom-op library not built (see runtime/kernels/_build/build.log)")

# (K, N, block): odd K and N, K below one block, K not a multiple of the block, every block size the kernel has a
# specialized path for (32; 64/128 as multiples of 64) and the scalar one (16).
SHAPES = [(77, 13, 32), (300, 33, 64), (129, 7, 16), (1000, 21, 128), (17, 5, 32)]
# (zero_points, outliers per column, bias, scale dtype, group_index dtype, columns per tile): tiles of 4, 8 and 16
# columns have AVX-512 paths of their own (a partial last tile whenever N is not a multiple); 3 takes the generic one.
VARIANTS = [(False, 0, False, np.float16, None, 1), (True, 3, True, np.float32, np.int32, 1),
            (True, 0, False, np.float16, None, 1), (False, 4, True, np.float16, None, 1),
            (False, 0, False, np.float16, None, 4), (True, 3, True, np.float32, np.int32, 8),
            (True, 0, True, np.float16, None, 16), (False, 4, True, np.float16, None, 3),
            (False, 0, False, np.uint8, None, 8), (True, 3, True, np.uint8, np.int32, 1),
            (False, 2, True, np.uint8, None, 4)]  # uint8: 8-bit scale codes


def _weight(seed, shape, variant):
    K, N, block = shape
    zp, outliers, bias, scale_dtype, index_type, tile = variant
    return random_weight(np.random.default_rng(seed), K, N, block, zero_points=zp, outliers=outliers, bias=bias,
                         scale_dtype=scale_dtype, index_type=index_type, tile=tile)


def _run(model, A, *, library: bool, profile: bool = False):
    """Outputs of a session with or without our library, and the op types ORT executed."""
    import onnxruntime as ort

    so = session_options()
    if library:
        so.register_custom_ops_library(LIBRARY)
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(os.environ.get("TMPDIR", "/tmp"), "spquant_profile")
    sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), so, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"A": A})[0]
    ops = set()
    if profile:
        path = sess.end_profiling()
        with open(path) as f:
            ops = {e["args"]["op_name"] for e in json.load(f) if e.get("cat") == "Node" and "op_name" in e.get("args", {})}
        os.remove(path)
    return y, ops


def _rel(y, ref):
    return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-12))


# ------------------------------------------------------------------------------------------------ format


def test_pack_roundtrip_and_layout():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, size=(9, 32), dtype=np.uint8)
    packed = pack_codes(codes)
    assert packed.shape == (9, 16)
    assert np.array_equal(unpack_codes(packed), codes)
    assert packed[0, 0] == codes[0, 0] | (codes[0, 16] << 4)  # low nibble: first half of the group


def test_dense_decodes_the_documented_formula():
    w = SparseQuantWeight(K=5, N=2, block=4, packed=pack_codes(np.array([[8, 9, 7, 15], [0, 8, 8, 8]], np.uint8)),
                          scales=np.array([0.5, 2.0], np.float16), group_ptr=np.array([0, 1, 2], np.int32),
                          group_index=np.array([1, 0], np.uint16), zero_points=np.array([0, -1], np.int8),
                          outlier_rows=np.array([[0], [4]], np.uint16), outlier_values=np.array([[3.0], [0.0]], np.float32))
    expect = np.zeros((5, 2), np.float32)
    expect[4, 0] = (8 - 8) * 0.5           # column 0 keeps block 1 = rows 4..7, only row 4 < K
    expect[0, 0] = 3.0                     # outlier of column 0
    expect[0:4, 1] = (np.array([0, 8, 8, 8]) - 7) * 2.0  # column 1 keeps block 0 with zero point 8 - 1
    assert np.array_equal(w.dense(), expect)


def test_scale_codes_are_a_sign_a_4_bit_exponent_and_a_3_bit_mantissa():
    from modelsurgeon.runtime.sparse_quant_format import decode_scale_codes, encode_scale_codes, scale_code_exponent

    codes = np.arange(256, dtype=np.uint8)
    values = decode_scale_codes(codes, -10)
    assert values[0] == 2.0 ** -10 and values[0x3A] == 2.0 ** -3 * (1 + 2 / 8) and values[127] == 2.0 ** 5 * 15 / 8
    assert np.array_equal(values[128:], -values[:128])  # the top bit is the sign
    assert np.all(np.diff(values[:128]) > 0)  # monotonic: every code a distinct scale
    assert np.array_equal(encode_scale_codes(values, -10), codes)  # representable scales round-trip
    rng = np.random.default_rng(0)
    s = np.exp2(rng.uniform(-9.9, 5.8, size=10000)) * rng.choice([-1, 1], size=10000)
    back = decode_scale_codes(encode_scale_codes(s, -10), -10)
    assert np.abs(back / s - 1).max() <= 1 / 16 + 1e-9  # nearest code: half a mantissa step
    # out of range: clamped to the end codes; zero and non-finite scales give valid codes
    assert encode_scale_codes(np.array([0.0, 1e-9, -1e-9, 1e9, np.inf]), -10).tolist() == [0, 0, 128, 127, 127]
    # the exponent leaves one octave above a layer's largest scale
    e = scale_code_exponent(0.37)
    assert decode_scale_codes(np.array([127]), e)[0] >= 2 * 0.37 and decode_scale_codes(np.array([0]), e)[0] < 0.37 / 2 ** 13


def test_tiles_share_blocks_and_store_columns_side_by_side():
    # N = 3 in tiles of 2: tile 0 = columns 0, 1 keeps block 1; tile 1 = column 2 (+ one padding column) keeps
    # blocks 0 and 1. Slot j * 2 + c holds column c of tile-group j.
    codes = np.array([[9, 9], [10, 10], [7, 7], [0, 0], [15, 15], [0, 0]], np.uint8)
    w = SparseQuantWeight(K=4, N=3, block=2, packed=pack_codes(codes), scales=np.ones(6, np.float16),
                          group_ptr=np.array([0, 1, 3], np.int32), group_index=np.array([1, 0, 1], np.uint16), tile=2)
    expect = np.zeros((4, 3), np.float32)
    expect[2:4, 0] = 1.0    # slot 0: tile-group 0 (block 1), column 0
    expect[2:4, 1] = 2.0    # slot 1: column 1
    expect[0:2, 2] = -1.0   # slot 2: tile-group 1 (block 0), column 2; slot 3 is padding
    expect[2:4, 2] = 7.0    # slot 4: tile-group 2 (block 1), column 2; slot 5 is padding
    assert np.array_equal(w.dense(), expect)
    assert w.slot_columns().tolist() == [0, 1, 2, 3, 2, 3]


# ------------------------------------------------------------------------------------------------ ONNX function


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_function_fallback_matches_numpy(shape, variant):
    w = _weight(1, shape, VARIANTS[variant])
    model = single_op_model(w, leading=("B", "S"))
    assert structural_problems(model) == []  # checker + strict shape inference through the function
    A = np.random.default_rng(2).normal(size=(2, 3, shape[0])).astype(np.float32)
    y, _ = _run(model, A, library=False)
    assert y.shape == (2, 3, shape[1])
    assert _rel(y, reference(A, w)) < 1e-5


@pytest.mark.parametrize("variant", [1, 9])  # zero points, outliers and bias; 8-bit scale codes
def test_function_fallback_folds_to_one_matmul(variant):
    """Everything but the product depends on initializers only: ORT folds it at session creation, so each call
    runs a float MatMul (a DequantizeLinear in the body would stay unfolded with everything after it)."""
    w = _weight(5, (300, 33, 64), VARIANTS[variant])
    A = np.random.default_rng(6).normal(size=(2, 300)).astype(np.float32)
    y, ops = _run(single_op_model(w), A, library=False, profile=True)
    assert ops and ops <= {"MatMul", "Gemm", "FusedMatMul", "Add"}, ops
    assert _rel(y, reference(A, w)) < 1e-5


def test_function_rejects_old_opsets():
    with pytest.raises(ValueError, match="opset"):
        single_op_model(_weight(0, SHAPES[0], VARIANTS[0]), opset=15)


# ------------------------------------------------------------------------------------------------ kernel


@needs_library
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_numpy_on_every_path(isa, shape, monkeypatch):
    monkeypatch.setenv("MODELSURGEON_SQMM_ISA", isa)  # read when ORT creates the kernel; lowers the path only
    rng = np.random.default_rng(3)
    # 1 and 3 rows: the one-token and per-row paths; 19 rows: AVX-512's 16-row tiles (one full, one partial); 65: the
    # tile-8 kernel's 64-row chunks, the last one a single row
    inputs = [rng.normal(size=(m, shape[0])).astype(np.float32) for m in (1, 3, 19, 65)]
    for v, variant in enumerate(VARIANTS):
        w = _weight(10 + v, shape, variant)
        for level in (0, 4):
            model = single_op_model(w, accuracy_level=level)
            for A in inputs:
                y, _ = _run(model, A, library=True)
                # level 4 is compared with the int8-rounded activations the kernel uses: only fp32 round-off remains,
                # measured against |A| @ |W| (the scale of that round-off; one row's outputs can cancel to near zero)
                ref = reference(A, w, accuracy_level=level)
                err = np.abs(y - ref).max() / max((np.abs(A) @ np.abs(w.dense())).max(), np.abs(ref).max(), 1e-30)
                assert err < 2e-5, (isa, shape, variant, level, len(A), err)


@needs_library
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("shape", [(600, 44, 32), (600, 44, 64), (1100, 44, 128)])
def test_kernel_serves_later_calls_from_its_cached_weights(isa, shape, monkeypatch):
    """The first call checks the weights and keeps them (on AVX2, and for blocks above 32 on AVX-512, also the
    codes transposed for the tile-of-8 kernel, a block of 32H rows as H sub-blocks); later calls of any row count
    read that copy, one row with its activations broadcast once per call."""
    import onnxruntime as ort

    monkeypatch.setenv("MODELSURGEON_SQMM_ISA", isa)
    w = _weight(12, shape, VARIANTS[8])  # tiles of 8 (a partial last one), 8-bit scale codes
    so = session_options()
    so.register_custom_ops_library(LIBRARY)
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(ir.serde.serialize_model(single_op_model(w)).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(12)
    for m in (1, 65, 1, 3, 1):  # 65 x 600 x 44 multiply-adds is past the inline threshold: the pool splits it
        A = rng.normal(size=(m, shape[0])).astype(np.float32)
        ref = reference(A, w, accuracy_level=4)
        y = sess.run(None, {"A": A})[0]
        assert np.abs(y - ref).max() / np.abs(ref).max() < 2e-5, m


@needs_library
def test_int8_activations_stay_close_to_exact_math():
    w = _weight(4, (1000, 21, 32), VARIANTS[1])
    A = np.random.default_rng(4).normal(size=(8, 1000)).astype(np.float32)
    y, _ = _run(single_op_model(w, accuracy_level=4), A, library=True)
    err = np.linalg.norm(y - reference(A, w)) / np.linalg.norm(reference(A, w))
    assert 1e-5 < err < 2e-2  # really int8 (not exact), and as close as MatMulNBits accuracy_level=4 gets


@needs_library
def test_same_model_runs_with_and_without_library():
    w = _weight(5, (300, 33, 32), VARIANTS[1])
    model = single_op_model(w, accuracy_level=0, leading=("B", "S"))
    A = np.random.default_rng(5).normal(size=(2, 5, 300)).astype(np.float32)
    y_kernel, ops_kernel = _run(model, A, library=True, profile=True)
    y_function, ops_function = _run(model, A, library=False, profile=True)
    assert ops_kernel == {OP_NAME}                       # ORT ran our kernel ...
    assert OP_NAME not in ops_function and "MatMul" in ops_function  # ... or the inlined function
    np.testing.assert_allclose(y_kernel, y_function, rtol=1e-5, atol=1e-5)


@needs_library
def test_session_helper_reports_its_path(monkeypatch):
    model = single_op_model(_weight(6, SHAPES[0], VARIANTS[0]))
    assert custom_ops.session_path(make_session(model)) == "kernel"
    assert custom_ops.session_path(make_session(model, custom_ops=False)) == "function"
    monkeypatch.setenv(custom_ops.ENV_DISABLE, "1")
    assert custom_ops.library_path() is None
    assert custom_ops.session_path(make_session(model)) == "function"


@needs_library
def test_library_facts():
    info = custom_ops.kernel_info()
    assert info["op"] == "ai.modelsurgeon::SparseQuantMatMul" and info["ort_api_version"] == 17
    assert info["isa"] in ("scalar", "avx2", "avx512vnni")
    import subprocess

    deps = subprocess.run(["ldd", LIBRARY], capture_output=True, text=True).stdout
    assert "onnxruntime" not in deps  # the ORT C API comes from the loading process, not a link


@needs_library
def test_kernel_rejects_corrupt_indices():
    w = _weight(7, (77, 13, 32), VARIANTS[0])
    w.group_index = w.group_index.copy()
    w.group_index[0] = 50  # n_blocks is 3
    with pytest.raises(Exception, match="group_index out of range"):
        _run(single_op_model(w), np.zeros((1, 77), np.float32), library=True)


# ------------------------------------------------------------------------------------------------ the pass


@pytest.fixture(scope="module")
def layer_problem():
    """A weight with structure (some input channels and groups matter more) and correlated activations."""
    rng = np.random.default_rng(0)
    k, n = 256, 48
    mix = rng.normal(size=(k, k)) / np.sqrt(k) + np.eye(k)
    x = (rng.normal(size=(2048, k)) * np.exp(rng.normal(0, 1, size=k))) @ mix
    w = (rng.normal(size=(k, n)) * np.exp(rng.normal(0, 0.7, size=(k, 1)))).astype(np.float32)
    return w, (x.T @ x / len(x)), x


def test_compressed_layer_decodes_to_what_gptq_computed(layer_problem):
    from modelsurgeon.passes.spquant import compress_layer

    w, h, _ = layer_problem
    for symmetric, tile in ((True, 1), (False, 1), (True, 8), (False, 5)):  # 48 columns: 5 leaves a partial tile
        res = compress_layer(w, h, sparsity=0.5, block=32, outliers=0.01, symmetric=symmetric, tile=tile)
        assert res.kept_fraction == pytest.approx(0.5, abs=0.03)
        assert res.weight.outliers_per_column == 3
        assert res.weight.tile == tile and len(res.weight.group_ptr) == -(-48 // tile) + 1
        np.testing.assert_allclose(res.weight.dense(), res.dense, rtol=0, atol=1e-6)
        # without the outliers, a column is nonzero only in the blocks its tile keeps
        groups_only = dataclasses.replace(res.weight, outlier_rows=None, outlier_values=None).dense()
        ptr, idx = res.weight.group_ptr, res.weight.group_index
        for col in range(48):
            t = col // tile
            allowed = np.zeros(256, bool)
            for b in idx[ptr[t]:ptr[t + 1]]:
                allowed[b * 32:(b + 1) * 32] = True
            assert not groups_only[~allowed, col].any()


def test_8_bit_scale_codes_cost_a_byte_per_group_and_little_error(layer_problem):
    from modelsurgeon import quantize as Q
    from modelsurgeon.passes.spquant import compress_layer

    w, h, _ = layer_problem
    res = {bits: compress_layer(w, h, sparsity=0.25, block=32, outliers=0.0, symmetric=True, tile=8, scale_bits=bits)
           for bits in (16, 8)}
    coded = res[8].weight
    assert coded.scales.dtype == np.uint8 and res[16].weight.scales.dtype == np.float16
    assert res[16].weight.nbytes() - coded.nbytes() == coded.scales.size  # one byte less per stored group
    np.testing.assert_allclose(coded.dense(), res[8].dense, rtol=0, atol=1e-6)  # GPTQ used the stored scales
    err = {bits: Q.relative_output_error(w, r.dense, h) for bits, r in res.items()}
    assert err[16] <= err[8] < 1.05 * err[16]


def test_outlier_slots_no_column_fills_are_not_stored(layer_problem):
    from modelsurgeon.passes.spquant import compress_layer

    w, h, _ = layer_problem
    dense = compress_layer(w, h, sparsity=0.0, block=32, outliers=0.01, symmetric=True, tile=8)
    assert dense.weight.outliers_per_column == 0 and dense.weight.outlier_rows is None
    plain = compress_layer(w, h, sparsity=0.0, block=32, outliers=0.0, symmetric=True, tile=8)
    assert dense.weight.nbytes() == plain.weight.nbytes()
    np.testing.assert_array_equal(dense.dense, plain.dense)
    # 64 slots asked per column; a column has 32 rows per dropped group to fill them with
    few = compress_layer(w, h, sparsity=1 / 8, block=32, outliers=0.25, symmetric=True, tile=8)
    ptr = few.weight.group_ptr
    most_dropped = int((8 - np.diff(ptr)).max())
    assert 1 <= most_dropped < 2
    assert few.weight.outliers_per_column == 32 * most_dropped
    np.testing.assert_allclose(few.weight.dense(), few.dense, rtol=0, atol=1e-6)


def test_tiles_cost_some_error_and_keep_their_columns_together(layer_problem):
    from modelsurgeon import quantize as Q
    from modelsurgeon.passes.spquant import choose_groups, compress_layer, group_importance

    w, h, _ = layer_problem
    kept = choose_groups(group_importance(w, h, 32), 0.5, tile=8)
    assert (kept.reshape(kept.shape[0], -1, 8) == kept[:, ::8, None]).all()  # every tile's columns agree
    err = {t: Q.relative_output_error(w, compress_layer(w, h, sparsity=0.5, block=32, outliers=0.0, symmetric=True,
                                                        tile=t).dense, h) for t in (1, 8)}
    assert err[1] < err[8] < 2 * err[1]  # a shared choice is coarser, not a different method


def test_error_compensation_and_outliers_lower_the_layer_error(layer_problem):
    from modelsurgeon import quantize as Q
    from modelsurgeon.passes.spquant import choose_groups, compress_layer, group_importance

    w, h, _ = layer_problem
    err = lambda dense: Q.relative_output_error(w, dense, h)
    ours = err(compress_layer(w, h, sparsity=0.5, block=32, outliers=0.0, symmetric=False).dense)
    with_outliers = err(compress_layer(w, h, sparsity=0.5, block=32, outliers=0.02, symmetric=False).dense)
    # no compensation: the same groups, rounded to nearest, dropped ones zeroed
    kept = np.repeat(choose_groups(group_importance(w, h, 32), 0.5), 32, axis=0)[:w.shape[0]]
    naive = err(Q.quantize_rtn(w, 4, 32, False).dequantize() * kept)
    # magnitude-only importance (no activations), with compensation
    flat = compress_layer(w, np.diag(np.diag(h)) * 0 + np.eye(w.shape[0]), sparsity=0.5, block=32, outliers=0.0,
                          symmetric=False).dense
    assert ours < 0.6 * naive
    assert with_outliers < ours
    assert ours < err(flat)


@pytest.fixture(scope="module")
def llama_path():
    from modelsurgeon.models import reference as ref

    return ref.export("llama")


def test_pass_emits_the_op_and_its_function(llama_path):
    import modelsurgeon

    res = modelsurgeon.compile(str(llama_path), "spquant", progress=False)
    row = next(r for r in res.report.rows if r.name.startswith("spquant"))
    nodes = [n for n in res.model.graph.all_nodes() if n.domain == "ai.modelsurgeon"]
    # fuse (on by default) packs the layers that read one input (q/k/v, gate/up) into one product each
    assert 0 < len(nodes) < row.notes["layers_sparse"]
    assert {n.attributes["tile"].value for n in nodes} == {8}  # the default: 8 columns share their groups
    assert ("ai.modelsurgeon", OP_NAME, "") in res.model.functions
    assert res.report.rows[-1].rel_l2 < 1.0
    # both paths give the same outputs on the compiled model (the verifier ran the kernel when built)
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 256, size=(2, 8)).astype(np.int64)}
    fb = make_session(res.model, custom_ops=False).run(None, feeds)[0]
    if LIBRARY:
        kn = make_session(res.model).run(None, feeds)[0]
        assert np.linalg.norm(kn - fb) / np.linalg.norm(fb) < 0.05  # int8 activations vs exact fp32 fallback


def test_pass_stores_8_bit_scale_codes_that_both_paths_run(llama_path):
    import modelsurgeon

    res = modelsurgeon.compile(str(llama_path), "spquant(sparsity=0,min_saving=0,scale_bits=8)", progress=False)
    nodes = [n for n in res.model.graph.all_nodes() if n.domain == "ai.modelsurgeon"]
    assert nodes and all(n.attributes["scale_code"].value == 1 and n.inputs[2].const_value.dtype == ir.DataType.UINT8
                         for n in nodes)
    assert res.report.rows[-1].rel_l2 < 0.5
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 256, size=(2, 8)).astype(np.int64)}
    fb = make_session(res.model, custom_ops=False).run(None, feeds)[0]
    if LIBRARY:
        kn = make_session(res.model).run(None, feeds)[0]
        assert np.linalg.norm(kn - fb) / np.linalg.norm(fb) < 0.05


def test_pass_falls_back_to_matmulnbits_where_sparsity_does_not_pay(llama_path):
    import modelsurgeon

    res = modelsurgeon.compile(str(llama_path), "spquant(sparsity=0.0)", progress=False)
    ops = {n.op_type for n in res.model.graph.all_nodes()}
    assert "MatMulNBits" in ops and OP_NAME not in ops and not res.model.functions
    row = next(r for r in res.report.rows if r.name.startswith("spquant"))
    assert any("MatMulNBits instead" in s for s in row.skipped)


@pytest.mark.parametrize("spec", ["spquant(block=48)", "spquant(sparsity=1.0)", "spquant(outliers=-0.1)",
                                  "spquant(accuracy_level=2)", "spquant(bogus=1)", "spquant(tile=3)",
                                  "spquant(protected_bits=4)", "spquant(scale_bits=4)", "spquant(max_block=96)",
                                  "spquant(block=64,max_block=32)"])
def test_bad_options(spec):
    from modelsurgeon.pipeline import build_pipeline, parse_passes

    with pytest.raises(UserError):
        build_pipeline(parse_passes(spec))


def test_slices_shortcuts_become_8_bit_blocks_not_sparse_groups(llama_path):
    """slice marks its k x k residual shortcuts precision-sensitive: spquant stores them as 8-bit MatMulNBits (like
    quant4), or leaves them in float with protected_bits=32, and never drops their groups."""
    import modelsurgeon
    from modelsurgeon.calibration import synthesize

    calib = synthesize(ir.load(llama_path), num_samples=8, seq_len=16, seed=3)
    compile_ = lambda passes: modelsurgeon.compile(str(llama_path), passes, calibration=calib, progress=False,
                                                   fuse=False)  # counts spquant's own MatMulNBits, unpacked
    floats = compile_("slice(sparsity=0.25),spquant(protected_bits=32)")
    shortcuts = [n for n in floats.model.graph if n.op_type == "MatMul" and n.name.endswith("/shortcut")]
    assert len(shortcuts) > 0 and floats.report.rows[-2].notes["protected_8bit"] == 0
    eight = compile_("slice(sparsity=0.25),spquant")
    bits = [n.attributes["bits"].value for n in eight.model.graph if n.op_type == "MatMulNBits"]
    assert bits.count(8) == len(shortcuts) == eight.report.rows[-2].notes["protected_8bit"]
    assert not [n for n in eight.model.graph if n.op_type == "MatMul" and n.name.endswith("/shortcut")]
    assert eight.report.rows[-1].rel_l2 < 1.0


def _weight_of(node: ir.Node) -> SparseQuantWeight:
    """The SparseQuantWeight a SparseQuantMatMul node stores (its initializers and attributes)."""
    arrays = [None if v is None or v.const_value is None else v.const_value.numpy() for v in node.inputs[1:8]]
    packed, scales, zero_points, group_ptr, group_index = arrays[:5]
    attrs = {name: a.value for name, a in node.attributes.items()}
    return SparseQuantWeight(K=attrs["K"], N=attrs["N"], block=attrs["block"], packed=packed, scales=scales,
                             group_ptr=group_ptr, group_index=group_index, zero_points=zero_points,
                             tile=attrs.get("tile", 1), scale_exponent=attrs.get("scale_exponent", 0))


@pytest.mark.parametrize("source, options", [("llama-tied/optimum", "sparsity=0.5"),
                                             ("llama-tied/genai-fp32", "sparsity=0,block=64,scale_bits=8,symmetric=false")])
def test_tied_head_codes_serve_the_embedding_lookup(corpus_model, source, options):
    """spquant(lm_head=true) on a head tied to the embedding table (Optimum's TorchScript export stores the head as a
    copy, which canonicalize ties back; GenAI's builder gathers through a Transpose): the head keeps every group
    whatever the sparsity, the table is stored once, in the head's codes (no float table is left), the lookup
    returns exactly the head's decoded columns, and the kernel and the ONNX function agree on the logits."""
    import modelsurgeon
    from modelsurgeon.calibration import synthesize

    path = corpus_model(source)
    calib = synthesize(ir.load(path), num_samples=8, seq_len=16, seed=3)
    res = modelsurgeon.compile(str(path), f"spquant(lm_head=true,min_saving=0,{options})", calibration=calib,
                               progress=False)
    row = next(r for r in res.report.rows if r.name.startswith("spquant"))
    assert row.notes["lookups_from_head"] == 1
    model = res.model
    head = max((n for n in model.graph.all_nodes() if n.op_type == OP_NAME), key=lambda n: n.attributes["N"].value)
    weight = _weight_of(head)
    vocab, width = weight.N, weight.K
    assert weight.nnz == weight.n_blocks * weight.n_tiles  # every group kept, at sparsity=0.5 too
    assert not [v for v in model.graph.initializers.values() if v.const_value is not None
                and v.const_value.dtype == ir.DataType.FLOAT and v.const_value.size >= vocab * width // 2]
    assert not [n for n in model.graph.all_nodes() if n.op_type in ("Gather", "GatherBlockQuantized")
                and n.inputs[0].const_value is not None and n.inputs[0].const_value.size >= vocab * width // 2
                and n.inputs[0] is not head.inputs[1]]
    lookup = next(n for n in model.graph.all_nodes() if n.name.endswith(("_SQ_rows", "_SQ_unpadded"))
                  and not n.outputs[0].uses()[0].node.name.endswith("_SQ_unpadded"))
    model.graph.outputs.append(lookup.outputs[0])
    feeds = synthesize(model, num_samples=2, seq_len=5, seed=1).arrays
    fallback = make_session(model, custom_ops=False).run(None, feeds)
    names = [v.name for v in model.graph.outputs]
    np.testing.assert_array_equal(fallback[names.index(lookup.outputs[0].name)],
                                  weight.dense().T[feeds["input_ids"]])
    if LIBRARY:
        kernel = make_session(model).run(None, feeds)
        assert _rel(kernel[0], fallback[0]) < 0.05  # int8 activations against the exact fp32 fallback


def test_layers_take_the_widest_block_their_width_allows():
    """max_block: a layer whose K a wider block divides stores fewer scales (K=1536 at 128 or 256 under block=64); one
    that it does not divide (576) keeps block, so nothing is padded."""
    from modelsurgeon.passes.spquant import layer_block

    assert [layer_block(k, 64, 256) for k in (576, 1536, 640, 4096)] == [64, 256, 128, 256]
    assert [layer_block(k, 64, 128) for k in (576, 1536)] == [64, 128]
    assert layer_block(1536, 64, 0) == 64 and layer_block(100, 32, 256) == 32


def test_pass_gives_each_layer_its_block(llama_path):
    """The reference llama's K=64 projections and K=128 down projections under block=32,max_block=128: 64 and 128,
    and the compiled model still matches its float outputs closely."""
    import modelsurgeon

    res = modelsurgeon.compile(str(llama_path), "spquant(sparsity=0,min_saving=0,scale_bits=8,max_block=128)",
                               progress=False, fuse=False)
    blocks = {n.attributes["K"].value: n.attributes["block"].value for n in res.model.graph.all_nodes()
              if n.op_type == OP_NAME}
    assert blocks == {64: 64, 128: 128}, blocks
    assert res.report.rows[-1].rel_l2 < 0.5
