"""lowrank: replace constant-weight MatMul/Gemm layers by two thinner MatMuls (W ≈ A·B); eora: low-rank
compensation of 4-bit quantization error.

`lowrank(ratio=0.3)` removes that fraction of the eligible layers' parameters, `lowrank(energy=0.95)` keeps
per layer the smallest rank holding that share of the output energy on calibration data, `lowrank(rank=R)`
uses one rank everywhere. `method` = `svd` | `asvd` (activation-scaled) | `svdllm` (Cholesky-whitened; the
truncation error on calibration data equals the dropped singular values). Ranks are multiples of 8 and a
layer is factored only where that saves parameters and MACs (r (K + N) < K N). Under a `ratio` budget the
ranks are allocated across layers by measured sensitivity (each layer's relative output error on the
calibration data at each candidate rank), see `modelsurgeon.lowrank_math`. `reconstruct=true` then refits every
factored layer in graph order (same ranks) on its input in the factored model, earlier layers already refit,
against its output in the original (`refit_factors`): each layer absorbs the error upstream of it instead of
passing it on (on the first calibration samples that fit `refit_memory`, like `prune(reconstruct=true)`).

Preserved: every graph input/output name, shape and dtype; a Gemm stays two Gemms (transA, alpha, beta and
the bias C kept, transB folded into the factors); a MatMul becomes MatMul·MatMul on the same input; factors
keep the weight's float dtype. Layers left alone (weights shared with other nodes, not 2-D, too small to
save anything, excluded, the LM head unless `head=true`) are listed in the report's skipped list.
Full rank (`energy=1, only_if_smaller=false`) reproduces the model to float round-off.

Sweeps over one model and calibration set (e.g. several ratios) may reuse the statistics and SVDs: put empty
dicts under `ctx.extra[STATS_CACHE]` and `ctx.extra[SPECTRA_CACHE]` of the PassContext they share.

`eora(rank=16, quant="quant4(block=32)")` (a QUANTIZE-stage pass) records the float weights and input
covariances, runs the given quantizing pass, reads back each quantized layer's effective weight (by running
the node on an identity input, so any format works: MatMulNBits, DequantizeLinear+MatMul, ...), and adds a
parallel path `x @ A @ B` that cancels the quantization error in the eigenspace of the inputs (EoRA). The
factors are stored as int8 per-channel DequantizeLinear (`bits=8`, default) or float (`bits=32`).
Hook for a quantizer that wants `quant4(eora=R)` itself: `snapshot_linears` before quantizing, then
`apply_eora(model, snapshot, rank, ...)` after.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable

import numpy as np
import onnx_ir as ir

from modelsurgeon import lowrank_math as lm
from modelsurgeon.calibration import require_finite
from modelsurgeon.errors import UserError
from modelsurgeon.pass_api import Option, Pass, PassResult, Stage, register_pass

SPECTRA_CACHE_BYTES = 1_500_000_000  # keep SVDs between allocation and factoring up to this much, else recompute


# --------------------------------------------------------------------------------------------------------------
# Finding the layers


@dataclasses.dataclass
class ConstLinear:
    """A MatMul or Gemm `y = x @ W (+ C)` whose weight is constant; `w` is [K, N] (alpha folded in)."""

    node: ir.Node
    w: np.ndarray                       # float64 [K, N]
    dtype: np.dtype                     # the stored weight's dtype
    weight: ir.Value                    # the stored constant
    transpose_node: ir.Node | None      # MatMul(x, Transpose(W)) form
    trans_a: bool = False               # Gemm transA
    beta: float = 1.0                   # Gemm beta (applies to C)

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name

    @property
    def input(self) -> ir.Value:
        return self.node.inputs[0]

    @property
    def k(self) -> int:
        return self.w.shape[0]

    @property
    def n(self) -> int:
        return self.w.shape[1]


def _const_array(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _attr(node: ir.Node, key: str, default):
    a = node.attributes.get(key)
    return default if a is None else a.value


def _weight_users(value: ir.Value) -> int:
    return len(value.uses()) + int(value.is_graph_output())


def find_constant_linears(graph: ir.Graph, allow_shared: bool = False) -> tuple[list[ConstLinear], list[str]]:
    """Every MatMul/Gemm with a constant 2-D float weight (possibly behind a Transpose), and why others were left.

    Weights that other nodes also read are skipped unless `allow_shared` (rewriting them would not free them)."""
    found, skipped = [], []
    for node in graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        wv = node.inputs[1]
        tnode = None
        arr = _const_array(wv)
        if arr is None and wv is not None and wv.producer() is not None and wv.producer().op_type == "Transpose":
            p = wv.producer()
            inner = _const_array(p.inputs[0])
            perm = _attr(p, "perm", None)
            if inner is not None and inner.ndim == 2 and (perm is None or list(perm) == [1, 0]):
                arr, tnode = inner.T, p
        if arr is None:
            continue  # activation x activation (attention): not a layer
        label = node.name or node.outputs[0].name
        if arr.ndim != 2:
            skipped.append(f"{label}: weight is {arr.ndim}-D, not a matrix")
            continue
        if arr.dtype not in (np.float32, np.float16, np.float64):
            skipped.append(f"{label}: weight dtype {arr.dtype} is not float")
            continue
        stored = tnode.inputs[0] if tnode is not None else wv
        if not allow_shared and (_weight_users(stored) > 1 or (tnode is not None and _weight_users(wv) > 1)):
            skipped.append(f"{label}: weight '{stored.name}' is shared with other nodes")
            continue
        w = np.asarray(arr, np.float64)
        trans_a, beta = False, 1.0
        if node.op_type == "Gemm":
            if _attr(node, "transB", 0):
                w = w.T
            w = w * float(_attr(node, "alpha", 1.0))
            trans_a, beta = bool(_attr(node, "transA", 0)), float(_attr(node, "beta", 1.0))
        found.append(ConstLinear(node, w, arr.dtype, stored, tnode, trans_a, beta))
    return found, skipped


def lm_head_node(model: ir.Model, ctx) -> ir.Node | None:
    """The LM head found by the "blocks" analysis, if the model is a transformer it understands."""
    try:
        tb = ctx.analysis("blocks")
    except Exception:
        return None
    head = getattr(tb, "lm_head", None)
    return None if head is None else head.node


# --------------------------------------------------------------------------------------------------------------
# Statistics


@dataclasses.dataclass
class InputStats:
    cov: np.ndarray        # XᵀX over all calibration rows, float64 [K, K]
    mean_abs: np.ndarray   # mean |x| per channel [K]
    rows: int


STATS_CACHE = "lowrank.input_statistics"  # ctx.extra keys of optional caches, see the module docstring
SPECTRA_CACHE = "lowrank.spectra"


def input_statistics(model: ir.Model, ctx, linears: Iterable[ConstLinear], desc: str = "lowrank: calibrating") -> dict[str, InputStats]:
    """XᵀX and mean |x| of every distinct layer input, accumulated batch by batch on the calibration data.

    Each batch's XᵀX is a float32 product added into float64 sums (relative error ~1e-6, far below the
    damping the factorizations add). With a dict under `ctx.extra[STATS_CACHE]`, inputs found there are
    not captured again and new ones are stored (valid only for the same model and calibration data).
    """
    from modelsurgeon.capture import ActivationCapture, batch_size_for

    calib = ctx.calibration
    cache = ctx.extra.get(STATS_CACHE)
    by_name: dict[str, bool] = {}
    for lin in linears:  # anything with .input (ir.Value) and .trans_a (x is [K, rows])
        by_name[lin.input.name] = lin.trans_a
    done = {n: cache[n] for n in by_name if cache is not None and n in cache}
    by_name = {n: t for n, t in by_name.items() if n not in done}
    if not by_name:
        return done
    graph_inputs = {v.name for v in model.graph.inputs}
    captured = [n for n in by_name if n not in graph_inputs]
    cap = ActivationCapture(model, captured) if captured else None
    acc: dict[str, list] = {}
    bs = batch_size_for(model, 4)
    for feeds in ctx.progress_bar(calib.batches(bs), desc=desc, total=calib.num_batches(bs)):
        outs = cap.run(feeds) if cap is not None else {}
        for name, trans_a in by_name.items():
            x = feeds[name] if name in graph_inputs else outs[name]
            x = np.asarray(x, np.float32)
            x = _rows_of(x, trans_a)
            if name not in acc:
                acc[name] = [np.zeros((x.shape[1], x.shape[1])), np.zeros(x.shape[1]), 0]
            a = acc[name]
            a[0] += x.T @ x
            a[1] += np.abs(x).sum(0, dtype=np.float64)
            a[2] += x.shape[0]
    new = {n: InputStats(require_finite(c, n, desc.split(":")[0]), s / max(r, 1), r) for n, (c, s, r) in acc.items()}
    if cache is not None:
        cache.update(new)
    return {**done, **new}


# --------------------------------------------------------------------------------------------------------------
# Graph edits (shared by lowrank and eora)


class Namer:
    """Fresh value and node names for one graph (scans the graph once)."""

    def __init__(self, graph: ir.Graph):
        self.taken = set(graph.initializers)
        self.taken.update(v.name for v in graph.inputs if v.name)
        for node in graph.all_nodes():
            self.taken.update(v.name for v in node.outputs if v.name)
            if node.name:
                self.taken.add(node.name)

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name


def add_initializer(graph: ir.Graph, namer: Namer, base: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=namer(base), const_value=ir.tensor(np.ascontiguousarray(array)))
    graph.register_initializer(value)
    return value


def _take_over_output(namer: Namer, old: ir.Value, new: ir.Value) -> None:
    """Route every use of `old` (graph outputs included) to `new`, which inherits `old`'s name, type and shape."""
    name = old.name
    if old.dtype is not None:  # an untyped intermediate keeps `new`'s own type (Tensor(None) is no type)
        new.dtype = old.dtype
    new.shape = old.shape
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    old.name = namer(f"{name}.replaced")
    new.name = name


def _remove_if_unused(graph: ir.Graph, value: ir.Value | None) -> None:
    """Drop an initializer (or a Transpose of one) nothing reads any more."""
    if value is None or value.uses() or value.is_graph_output():
        return
    producer = value.producer()
    if producer is not None:
        if all(not o.uses() and not o.is_graph_output() for o in producer.outputs):
            inputs = list(producer.inputs)
            graph.remove(producer, safe=True)
            for v in inputs:
                _remove_if_unused(graph, v)
        return
    if value.name in graph.initializers and not value.is_graph_input():
        del graph.initializers[value.name]


def _constant_matrix(graph: ir.Graph, namer: Namer, base: str, matrix: np.ndarray, dtype: np.dtype, bits: int,
                     nodes: list[ir.Node]) -> ir.Value:
    """A constant matrix input: float initializer (bits=32), or int8 per-column DequantizeLinear (bits=8).

    DequantizeLinear takes a float16 scale from opset 19 on; at older opsets an fp16 model's factors are
    dequantized with a float32 scale and cast to float16."""
    if bits >= 16:
        return add_initializer(graph, namer, base, matrix.astype(dtype))
    amax = np.abs(matrix).max(axis=0)
    scale = np.where(amax > 0, amax / 127.0, 1.0)
    q = np.clip(np.round(matrix / scale), -127, 127).astype(np.int8)
    cast = np.dtype(dtype) != np.float32 and graph.opset_imports.get("", 1) < 19
    qv = add_initializer(graph, namer, base + "_quantized", q)
    sv = add_initializer(graph, namer, base + "_scale", scale.astype(np.float32 if cast else dtype))
    node = ir.Node("", "DequantizeLinear", [qv, sv], [ir.AttrInt64("axis", 1)], name=namer(base + "_dq"),
                   outputs=[ir.Value(name=namer(base + "_dequantized" if cast else base))])
    nodes.append(node)
    if not cast:
        return node.outputs[0]
    to = ir.DataType.from_numpy(np.dtype(dtype))
    node.outputs[0].dtype = ir.DataType.FLOAT
    cast_node = ir.Node("", "Cast", node.outputs, [ir.AttrInt64("to", int(to))], name=namer(base + "_cast"),
                        outputs=[ir.Value(name=namer(base))])
    cast_node.outputs[0].dtype = to
    nodes.append(cast_node)
    return cast_node.outputs[0]


def factorize(graph: ir.Graph, lin: ConstLinear, a: np.ndarray, b: np.ndarray, namer: Namer | None = None) -> list[ir.Node]:
    """Replace `lin` by x·A·B (MatMul) or Gemm(Gemm(x, A), B, C) (Gemm); the output keeps its name."""
    namer = namer or Namer(graph)
    node = lin.node
    base = lin.name
    av = add_initializer(graph, namer, f"{base}.lowrank_A", a.astype(lin.dtype))
    bv = add_initializer(graph, namer, f"{base}.lowrank_B", b.astype(lin.dtype))
    mid = ir.Value(name=namer(f"{base}.lowrank_mid"))
    out = ir.Value(name=namer(f"{base}.lowrank_out"))
    mid.dtype = out.dtype = av.const_value.dtype  # typed, so later passes (quant4) see float activations
    if node.op_type == "MatMul":
        first = ir.Node("", "MatMul", [lin.input, av], outputs=[mid], name=namer(f"{base}.lowrank_0"))
        second = ir.Node("", "MatMul", [mid, bv], outputs=[out], name=namer(f"{base}.lowrank_1"))
    else:
        attrs_a = [ir.AttrInt64("transA", 1)] if lin.trans_a else []
        first = ir.Node("", "Gemm", [lin.input, av], attrs_a, outputs=[mid], name=namer(f"{base}.lowrank_0"))
        c = node.inputs[2] if len(node.inputs) > 2 else None
        attrs_b = [ir.AttrFloat32("beta", lin.beta)] if c is not None and lin.beta != 1.0 else []
        second = ir.Node("", "Gemm", [mid, bv] + ([c] if c is not None else []), attrs_b, outputs=[out],
                         name=namer(f"{base}.lowrank_1"))
    for n in (first, second):
        n.metadata_props.update(node.metadata_props)
    graph.insert_before(node, [first, second])
    _take_over_output(namer, node.outputs[0], out)
    weight_in = node.inputs[1]
    graph.remove(node, safe=True)
    _remove_if_unused(graph, weight_in)
    return [first, second]


def add_lowrank_branch(graph: ir.Graph, node: ir.Node, a: np.ndarray, b: np.ndarray, dtype=np.float32,
                       bits: int = 8, label: str | None = None, namer: Namer | None = None) -> list[ir.Node]:
    """y ← y + (x @ A) @ B after `node` (x = node.inputs[0], y = node.outputs[0]); A, B int8-dequantized or float."""
    namer = namer or Namer(graph)
    base = label or node.name or node.outputs[0].name
    new: list[ir.Node] = []
    av = _constant_matrix(graph, namer, f"{base}.eora_A", a, dtype, bits, new)
    bv = _constant_matrix(graph, namer, f"{base}.eora_B", b, dtype, bits, new)
    mid = ir.Value(name=namer(f"{base}.eora_mid"))
    corr = ir.Value(name=namer(f"{base}.eora_correction"))
    out = ir.Value(name=namer(f"{base}.eora_out"))
    mid.dtype = corr.dtype = out.dtype = node.outputs[0].dtype or ir.DataType.FLOAT
    new.append(ir.Node("", "MatMul", [node.inputs[0], av], outputs=[mid], name=namer(f"{base}.eora_0")))
    new.append(ir.Node("", "MatMul", [mid, bv], outputs=[corr], name=namer(f"{base}.eora_1")))
    y = node.outputs[0]
    add = ir.Node("", "Add", [y, corr], outputs=[out], name=namer(f"{base}.eora_add"))
    for n in new + [add]:
        n.metadata_props.update(node.metadata_props)
    graph.insert_after(node, new + [add])
    # Route the uses of y (other than the new Add) to the corrected output.
    for user, idx in list(y.uses()):
        if user is not add:
            user.replace_input_with(idx, out)
    if y.is_graph_output():
        name = y.name
        idx = [i for i, v in enumerate(graph.outputs) if v is y]
        y.name = namer(f"{name}.uncorrected")
        out.name = name
        out.dtype, out.shape = y.dtype, y.shape
        for i in idx:
            graph.outputs[i] = out
    return new + [add]


# --------------------------------------------------------------------------------------------------------------
# The lowrank pass


def _fraction(lo_open: bool = True, hi_closed: bool = False):
    def check(v):
        if v is None:
            return None
        ok = (v > 0 if lo_open else v >= 0) and (v <= 1 if hi_closed else v < 1)
        return None if ok else f"must lie in {'(' if lo_open else '['}0, 1{']' if hi_closed else ')'}"
    return check


def _pattern(v):
    if not v:
        return None
    try:
        re.compile(v)
    except re.error as exc:
        return f"not a valid regular expression ({exc})"
    return None


def _selected(name: str, include: str | None, exclude: str | None) -> bool:
    if include and not re.search(include, name):
        return False
    return not (exclude and re.search(exclude, name))


@register_pass
class LowRankPass(Pass):
    name = "lowrank"
    requires = ("canonicalize",)  # the block finder reads the canonical form
    summary = "factor MatMul/Gemm weights as A·B (svd, asvd, svdllm) where that saves parameters and MACs"
    analyses = ("blocks",)  # to leave the LM head alone
    options = {
        "ratio": Option((float, type(None)), None, "fraction of the eligible layers' parameters to remove "
                        "(default 0.2 when neither energy nor rank is given)", check=_fraction()),
        "energy": Option((float, type(None)), None, "keep per layer the smallest rank holding this share of the "
                         "output energy on calibration data (1.0 = full rank)", check=_fraction(hi_closed=True)),
        "rank": Option((int, type(None)), None, "one rank for every layer",
                       check=lambda v: None if v is None or v > 0 else "must be positive"),
        "method": Option(str, "svdllm", "svd: plain SVD; asvd: scaled by activation magnitudes; svdllm: whitened "
                         "by the Cholesky factor of the input covariance", choices=lm.METHODS),
        "alloc": Option(str, "error", "ratio budget: 'error' allocates ranks by measured sensitivity, "
                        "'uniform' removes the same share from every layer", choices=("error", "uniform")),
        "alpha": Option(float, 0.5, "asvd: exponent of the activation scaling",
                        check=lambda v: None if 0 < v <= 2 else "must lie in (0, 2]"),
        "damp": Option(float, 1e-4, "svdllm: damping added to the covariance, relative to its mean diagonal",
                       check=lambda v: None if 0 <= v < 1 else "must lie in [0, 1)"),
        "include": Option((str, type(None)), None, "regex: only layers whose node name matches", check=_pattern),
        "exclude": Option((str, type(None)), None, "regex: leave layers whose node name matches", check=_pattern),
        "head": Option(bool, False, "also factor the LM head (found by the blocks analysis)"),
        "only_if_smaller": Option(bool, True, "factor only where it saves parameters and MACs "
                                  "(false: factor every selected layer, e.g. to check full rank is exact)"),
        "reconstruct": Option(bool, False, "refit each factored layer, in graph order, on its input in the "
                              "factored model (earlier layers already refit) against its output in the original"),
        "refit_memory": Option(float, 8.0, "reconstruct: GiB of activations the refit may hold (both models); it "
                               "refits on the first calibration samples that fit",
                               check=lambda v: None if v > 0 else "must be > 0"),
    }

    def validate(self) -> None:
        given = [k for k in ("ratio", "energy", "rank") if self.config[k] is not None]
        if len(given) > 1:
            raise UserError(f"lowrank: give one of ratio, energy or rank, not {' and '.join(given)}")
        if not given:
            self.config["ratio"] = 0.2
        if self.config["method"] in ("svdllm", "asvd") or self.config["reconstruct"]:
            self.needs_calibration = True
        if self.config["ratio"] is not None and not self.config["only_if_smaller"]:
            raise UserError("lowrank: only_if_smaller=false goes with energy= or rank=, not with a ratio budget")

    def run(self, model: ir.Model, ctx) -> PassResult:
        with lm.blas_threads(1):
            return self._run(model, ctx)

    def _run(self, model: ir.Model, ctx) -> PassResult:
        cfg = self.config
        graph = model.graph
        linears, skipped = find_constant_linears(graph)
        head = None if cfg["head"] else lm_head_node(model, ctx)
        chosen: list[ConstLinear] = []
        for lin in linears:
            if lin.node is head:
                skipped.append(f"{lin.name}: LM head (head=true to factor it)")
            elif not _selected(lin.name, cfg["include"], cfg["exclude"]):
                continue
            elif cfg["only_if_smaller"] and lm.max_useful_rank(lin.k, lin.n) == 0:
                skipped.append(f"{lin.name}: [{lin.k}x{lin.n}] too small: no rank multiple of "
                               f"{lm.RANK_MULTIPLE} saves parameters")
            else:
                chosen.append(lin)
        if not chosen:
            return PassResult(model, False, notes={"layers_factored": 0}, skipped=skipped)

        method = cfg["method"]
        stats = None
        if method != "svd" or ctx.calibration is not None:
            if ctx.calibration is None:
                ctx.require_calibration(f"lowrank(method={method})")
            stats = input_statistics(model, ctx, chosen)

        whiteners: dict[str, np.ndarray] = {}  # svdllm: one Cholesky factor per distinct input (q/k/v share one)
        reuse = ctx.extra.get(SPECTRA_CACHE)

        def spec(lin: ConstLinear) -> lm.Spectrum:
            key = (method, cfg["alpha"], cfg["damp"], lin.name, stats is not None)
            if reuse is not None and key in reuse:
                return reuse[key]
            st = stats[lin.input.name] if stats is not None else None
            chol = None
            if method == "svdllm":
                if lin.input.name not in whiteners:
                    whiteners[lin.input.name] = lm.cholesky_whitener(st.cov, cfg["damp"])
                chol = whiteners[lin.input.name]
            s = lm.spectrum(method, lin.w, cov=None if st is None else st.cov, act_scale=None if st is None else
                            st.mean_abs, damp=cfg["damp"], alpha=cfg["alpha"], chol=chol)
            if reuse is not None:
                reuse[key] = s
            return s

        spectra: dict[str, lm.Spectrum] = {}  # full SVDs kept for factoring (within a memory budget)
        budgets: list[lm.LayerBudget] = []
        held = 0
        for lin in ctx.progress_bar(chosen, desc=f"lowrank: {method} spectra", total=len(chosen)):
            s = spec(lin)
            nbytes = s.u_unscaled.nbytes + s.vt.nbytes
            if reuse is not None or held + nbytes <= SPECTRA_CACHE_BYTES:
                spectra[lin.name] = s
                held += nbytes
            budgets.append(lm.LayerBudget(lin.name, lin.k, lin.n, s if lin.name in spectra else s.costs_only()))
        costs = {b.name: b.spectrum for b in budgets}

        ranks: dict[str, int] = {}
        if cfg["rank"] is not None:
            ranks = {lin.name: min(cfg["rank"], lin.k, lin.n) for lin in chosen}
        elif cfg["energy"] is not None:
            ranks = {lin.name: costs[lin.name].rank_for_energy(cfg["energy"]) for lin in chosen}
        else:
            ranks = lm.allocate_ranks(budgets, cfg["ratio"], cfg["alloc"])

        namer = Namer(graph)
        original = model.clone() if cfg["reconstruct"] else None  # the targets of the refit (shares the weights)
        original_index = {node: i for i, node in enumerate(graph)}
        refits: list[tuple[ConstLinear, int, list[ir.Node]]] = []
        factored, params_before, params_after, rel_errors = [], 0, 0, {}
        eligible_params = sum(lin.k * lin.n for lin in chosen)
        for lin in ctx.progress_bar(chosen, desc="lowrank: factoring", total=len(chosen)):
            r = ranks.get(lin.name, 0)
            if r <= 0:
                continue
            if cfg["only_if_smaller"] and lm.factor_params(lin.k, lin.n, r) >= lin.k * lin.n:
                skipped.append(f"{lin.name}: rank {r} would not save parameters on [{lin.k}x{lin.n}]")
                continue
            s = spectra[lin.name] if lin.name in spectra else spec(lin)
            a, b = s.factors(r)
            name = lin.name  # an unnamed node's name is its output's, which factorize renames
            refits.append((lin, original_index[lin.node], factorize(graph, lin, a, b, namer)))
            factored.append(f"{name}: [{lin.k}x{lin.n}] -> rank {r}")
            params_before += lin.k * lin.n
            params_after += lm.factor_params(lin.k, lin.n, r)
            rel_errors[name] = costs[name].relative_error(r) ** 0.5
        notes = {
            "method": method,
            "layers_factored": len(factored),
            "layers_eligible": len(chosen),
            "eligible_parameters": eligible_params,
            "parameters_removed": params_before - params_after,
            "removed_share_of_eligible": round((params_before - params_after) / max(eligible_params, 1), 4),
            "ranks": factored,
        }
        if rel_errors:
            errs = np.array(list(rel_errors.values()))
            notes["layer_rel_error_mean"] = float(errs.mean())
            notes["layer_rel_error_max"] = float(errs.max())
        if original is not None and refits:
            notes.update(refit_factors(original, model, refits, ctx, cfg["damp"], cfg["refit_memory"] * 2**30))
        return PassResult(model, bool(factored), notes=notes, skipped=skipped)


def refit_factors(original: ir.Model, model: ir.Model, refits: list[tuple[ConstLinear, int, list[ir.Node]]], ctx,
                  damp: float, memory_bytes: float) -> dict:
    """Refit each factored layer's A, B (same rank), in graph order: argmin over rank-r M of ||X' M - X W||, X' its
    input in `model` with every earlier layer refit, X its input in `original`, W its original weight.

    With G = X'ᵀX' (damped) = L Lᵀ, the minimizer is M = L⁻ᵀ [L⁻¹ X'ᵀX W]_r (reduced-rank regression; the
    truncation is an SVD). Where X' = X (nothing upstream changed) this is svdllm's factorization itself.
    """
    import scipy.linalg

    from modelsurgeon.segment_runner import PairedRunner

    index = {node: i for i, node in enumerate(model.graph)}
    refits = sorted(refits, key=lambda t: t[1])
    stops = [(at, index[nodes[0]]) for _, at, nodes in refits]
    runner = PairedRunner(original, model, stops, ctx.calibration, memory_bytes, who="lowrank")
    grams: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # input name -> (X'ᵀX', X'ᵀX): q, k and v share one
    for i, (lin, _, nodes) in enumerate(ctx.progress_bar(refits, desc="lowrank: refitting", total=len(refits))):
        name = nodes[0].inputs[0].name  # the layer's input (`lin.node` is gone), named alike in both models
        if name not in grams:
            g = c = 0.0
            for x, xp in runner.advance(i, name):
                # float64 products: at full rank the solve inverts G, and float32 sums put ~1e-7·‖G‖ of noise
                # into the directions the samples barely span (gpt2's full-rank refit: 1.3e-4 with float32 sums, 3e-7)
                x, xp = (_rows_of(np.asarray(v, np.float64), lin.trans_a) for v in (x, xp))
                g = g + xp.T @ xp
                c = c + xp.T @ x
            grams = {name: (require_finite(g, name, "lowrank"), c)}
        else:
            runner.advance(i, name)
        g, c = grams[name]
        a_value, b_value = nodes[0].inputs[1], nodes[1].inputs[1]
        rank = a_value.const_value.shape[1]
        chol = lm.cholesky_whitener(g, damp)
        us, sv, vt = lm.thin_svd(scipy.linalg.solve_triangular(chol, c @ lin.w, lower=True))
        root = np.sqrt(sv[:rank])
        a = scipy.linalg.solve_triangular(chol.T, us[:, :rank] / np.where(root > 0, root, 1.0), lower=False)
        a_value.const_value = ir.tensor(np.ascontiguousarray(a.astype(lin.dtype)), name=a_value.name)
        b_value.const_value = ir.tensor(np.ascontiguousarray((root[:, None] * vt[:rank]).astype(lin.dtype)),
                                        name=b_value.name)
    return {"layers_refit": len(refits), **runner.notes}


def _rows_of(x: np.ndarray, trans_a: bool) -> np.ndarray:
    """A layer input as [rows, K] (Gemm transA: x is [K, rows])."""
    return x.T if trans_a else x.reshape(-1, x.shape[-1])


# --------------------------------------------------------------------------------------------------------------
# EoRA: low-rank compensation of quantization error


@dataclasses.dataclass
class LinearSnapshot:
    """A float layer before quantization: its weight and input statistics."""

    name: str
    input_name: str
    w: np.ndarray           # float64 [K, N]
    dtype: np.dtype
    stats: InputStats


def snapshot_linears(model: ir.Model, ctx, include: str | None = None, exclude: str | None = None) -> list[LinearSnapshot]:
    """Float weights and input statistics of every constant-weight MatMul/Gemm (call before quantizing)."""
    linears, _ = find_constant_linears(model.graph, allow_shared=True)
    linears = [lin for lin in linears if not lin.trans_a and _selected(lin.name, include, exclude)]
    if not linears:
        return []
    stats = input_statistics(model, ctx, linears, desc="eora: calibrating")
    return [LinearSnapshot(lin.name, lin.input.name, lin.w, lin.dtype, stats[lin.input.name])
            for lin in linears]


def _constant_ancestors(value: ir.Value | None, order: list[ir.Node], seen: set[int]) -> bool:
    """Collect (post-order) the nodes computing `value` from constants; False if it depends on an input."""
    if value is None or ir.convenience.get_const_tensor(value) is not None or value.is_initializer():
        return True
    producer = value.producer()
    if producer is None:
        return False
    if id(producer) in seen:
        return True
    if not all(_constant_ancestors(v, order, seen) for v in producer.inputs):
        return False
    seen.add(id(producer))
    order.append(producer)
    return True


def effective_weights(model: ir.Model, nodes: list[ir.Node]) -> dict[int, np.ndarray]:
    """W [K, N] with node(x) = x @ W + node(0), read by running each node on the identity (any weight format).

    The nodes are copied with the constant subgraphs feeding their other inputs into one small model whose
    inputs replace each node's first input; `accuracy_level` attributes are set to 0 (exact float math).
    Returns {id(node): W} for the nodes whose other inputs are constant.
    """
    from modelsurgeon.runtime.session import run_model

    copies: dict[int, ir.Value] = {}
    new_nodes: list[ir.Node] = []
    inits: dict[int, ir.Value] = {}
    inputs, outputs, dims, order_ids = [], [], {}, []

    def mapped(v: ir.Value | None) -> ir.Value | None:
        if v is None:
            return None
        if id(v) in copies:
            return copies[id(v)]
        if id(v) not in inits:
            tensor = ir.convenience.get_const_tensor(v)
            nv = ir.Value(name=f"c{len(inits)}", const_value=tensor if tensor is not None else v.const_value)
            inits[id(v)] = nv
        return inits[id(v)]

    def copy(node: ir.Node, first: ir.Value | None) -> ir.Node:
        ins = [first] + [mapped(v) for v in node.inputs[1:]] if first is not None else [mapped(v) for v in node.inputs]
        attrs = [a if a.name != "accuracy_level" else ir.AttrInt64("accuracy_level", 0) for a in node.attributes.values()]
        out = [ir.Value(name=f"v{len(copies) + len(new_nodes)}_{i}") for i in range(len(node.outputs))]
        c = ir.Node(node.domain, node.op_type, ins, attrs, outputs=out)
        for o, no in zip(node.outputs, out):
            copies[id(o)] = no
        new_nodes.append(c)
        return c

    seen: set[int] = set()
    for i, node in enumerate(nodes):
        order: list[ir.Node] = []
        if not all(_constant_ancestors(v, order, seen) for v in node.inputs[1:]):
            continue
        for anc in order:
            copy(anc, None)
        x = node.inputs[0]
        k = _input_width(node)
        if k is None:
            continue
        xi = ir.Value(name=f"x{i}", type=ir.TensorType(x.dtype or ir.DataType.FLOAT), shape=ir.Shape([k, k]))
        inputs.append(xi)
        c = copy(node, xi)
        c.outputs[0].name = f"y{i}"
        outputs.append(c.outputs[0])
        dims[xi.name] = k
        order_ids.append(id(node))
    if not outputs:
        return {}
    graph = ir.Graph(inputs, outputs, nodes=new_nodes, initializers=list(inits.values()),
                     opset_imports=dict(model.opset_imports))
    mini = ir.Model(graph, ir_version=model.ir_version)
    # fed in each layer input's own float type (an fp16 model's layers take float16): the identity and zero are
    # exact in every float type, and fp16 products of them are the weights' own values
    types = {xi.name: xi.dtype.numpy() for xi in inputs}
    feeds_eye = {n: np.eye(k, dtype=types[n]) for n, k in dims.items()}
    feeds_zero = {n: np.zeros((k, k), types[n]) for n, k in dims.items()}
    at_eye = run_model(mini, feeds_eye, accuracy_level=0)
    at_zero = run_model(mini, feeds_zero, accuracy_level=0)
    return {nid: np.asarray(at_eye[o.name], np.float64) - np.asarray(at_zero[o.name], np.float64)
            for nid, o in zip(order_ids, outputs)}


def _input_width(node: ir.Node) -> int | None:
    k = node.attributes.get("K")
    if k is not None:
        return int(k.value)
    shape = node.inputs[0].shape
    if shape is not None and len(shape) and isinstance(shape[-1], int):
        return int(shape[-1])
    w = ir.convenience.get_const_tensor(node.inputs[1]) if len(node.inputs) > 1 else None
    return None if w is None or len(w.shape) != 2 else int(w.shape[0])


QUANTIZED_MATMULS = ("MatMulNBits", "MatMul", "Gemm", "FusedMatMul")
RESCALE_TOLERANCE = 0.1  # median |log(per-channel gain)| above which a layer input counts as rescaled


def _rescaled(w: np.ndarray, w_quant: np.ndarray) -> bool:
    """Whether the quantizer rescaled the layer's input channels (AWQ scales folded into the previous op):
    then row k of W_q is s_k times row k of W. Honest rounding leaves the per-row least-squares gain near 1
    (the rounding noise averages out over the N outputs of a row)."""
    energy = (w ** 2).sum(1)
    live = energy > 1e-12 * max(float(energy.max()), 1e-30)
    if not live.any():
        return False
    gain = (w * w_quant).sum(1)[live] / energy[live]
    return bool(np.median(np.abs(np.log(np.maximum(np.abs(gain), 1e-6)))) > RESCALE_TOLERANCE)


def apply_eora(model: ir.Model, ctx, snapshot: list[LinearSnapshot], rank: int, bits: int = 8,
               damp: float = 1e-4) -> tuple[dict, list[str]]:
    """Add EoRA corrections to the quantized layers of `model` that match a snapshot layer (same input value,
    same shape, input channels not rescaled). Returns (notes, skipped)."""
    graph = model.graph
    by_input: dict[str, list[LinearSnapshot]] = {}
    for snap in snapshot:
        by_input.setdefault(snap.input_name, []).append(snap)
    candidates = []
    for node in graph:
        if node.op_type not in QUANTIZED_MATMULS or not node.inputs or node.inputs[0] is None:
            continue
        if node.inputs[0].name not in by_input or node.op_type == "Gemm" and _attr(node, "transA", 0):
            continue
        if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1 and _const_array(node.inputs[1]) is not None:
            continue  # still a float weight: nothing was quantized here
        candidates.append(node)
    skipped: list[str] = []
    if not candidates:
        return {"eora_layers": 0}, ["eora: no quantized MatMul reads a recorded layer input"]
    weights = effective_weights(model, candidates)
    namer = Namer(graph)
    whiteners: dict[str, lm.EigenWhitener] = {}
    used: set[str] = set()
    corrected, before, after, added = [], [], [], 0
    for node in ctx.progress_bar(candidates, desc="eora: correcting", total=len(candidates)):
        label = node.name or node.outputs[0].name
        wq = weights.get(id(node))
        if wq is None:
            skipped.append(f"{label}: weight is not constant; no EoRA")
            continue
        options = [s for s in by_input[node.inputs[0].name] if s.w.shape == wq.shape and s.name not in used]
        if not options:
            skipped.append(f"{label}: no float layer of shape {list(wq.shape)} recorded for its input")
            continue
        snap = min(options, key=lambda s: np.linalg.norm(s.w - wq))
        rel = np.linalg.norm(snap.w - wq) / max(np.linalg.norm(snap.w), 1e-30)
        if rel > 0.5:
            skipped.append(f"{label}: quantized weight is far from every recorded float weight ({rel:.2f}); no EoRA")
            continue
        if _rescaled(snap.w, wq):
            skipped.append(f"{label}: the quantizer rescaled its input channels (AWQ scales folded upstream?); no EoRA")
            continue
        used.add(snap.name)
        r = min(rank, *wq.shape)
        if snap.input_name not in whiteners:  # one eigen-decomposition per distinct input (q/k/v share one)
            whiteners[snap.input_name] = lm.EigenWhitener.from_cov(snap.stats.cov, damp)
        a, b = lm.eora_correction(snap.w, wq, None, r, whitener=whiteners[snap.input_name])
        cov = snap.stats.cov
        delta = snap.w - wq
        err0 = float(np.einsum("kn,kn->", delta, cov @ delta))
        total = float(np.einsum("kn,kn->", snap.w, cov @ snap.w))
        d2 = delta - a @ b
        err1 = float(np.einsum("kn,kn->", d2, cov @ d2))
        add_lowrank_branch(graph, node, a, b, dtype=snap.dtype, bits=bits, label=label, namer=namer)
        corrected.append(label)
        # max(0, .): an error that is zero up to rounding can come out slightly negative (a power of it is complex)
        before.append(max(err0 / total, 0.0) ** 0.5 if total > 0 else 0.0)
        after.append(max(err1 / total, 0.0) ** 0.5 if total > 0 else 0.0)
        added += r * sum(wq.shape)
    for snap in snapshot:
        if snap.name not in used and not any(s.startswith(f"{snap.name}:") for s in skipped) and \
                not any(n.inputs[0].name == snap.input_name for n in candidates):
            skipped.append(f"{snap.name}: no quantized layer reads its input (left float, or its input was changed); no EoRA")
    notes = {"eora_layers": len(corrected), "eora_rank": rank, "eora_parameters_added": added}
    if corrected:
        notes["layer_rel_error_before_mean"] = float(np.mean(before))
        notes["layer_rel_error_after_mean"] = float(np.mean(after))
    return notes, skipped


def _quant_spec(text: str):
    from modelsurgeon.pipeline import parse_passes
    from modelsurgeon.pass_api import get_pass

    specs = parse_passes(text)
    if len(specs) != 1:
        raise UserError(f"eora: quant='{text}' must name one quantizing pass, e.g. quant=quant4(block=32)")
    name, opts = specs[0]
    cls = get_pass(name)
    if cls.stage != Stage.QUANTIZE:
        raise UserError(f"eora: quant='{name}' is not a quantizing pass; use e.g. quant=quant4(block=32)")
    return cls(**opts)


@register_pass
class EoraPass(Pass):
    name = "eora"
    summary = "run a weight quantizer and add rank-R corrections of its error in the input eigenspace (EoRA)"
    stage = Stage.QUANTIZE
    needs_calibration = True
    options = {
        "rank": Option(int, 16, "rank of each correction", check=lambda v: None if v > 0 else "must be positive"),
        "quant": Option(str, "quant4", "the quantizing pass to run and compensate, e.g. quant4(block=32,algo=gptq)"),
        "bits": Option(int, 8, "storage of the correction factors: 8 (int8 per-channel DequantizeLinear) or 32 (float)",
                       choices=(8, 32)),
        "damp": Option(float, 1e-4, "damping of the input covariance, relative to its mean diagonal",
                       check=lambda v: None if 0 <= v < 1 else "must lie in [0, 1)"),
        "include": Option((str, type(None)), None, "regex: only layers whose node name matches", check=_pattern),
        "exclude": Option((str, type(None)), None, "regex: leave layers whose node name matches", check=_pattern),
    }

    def validate(self) -> None:
        self.quantizer = _quant_spec(self.config["quant"])
        self.needs_calibration = True

    def run(self, model: ir.Model, ctx) -> PassResult:
        calib = ctx.require_calibration("eora")
        if calib is None:  # pragma: no cover - require_calibration raises
            raise UserError("eora needs calibration data")
        with lm.blas_threads(1):
            snapshot = snapshot_linears(model, ctx, self.config["include"], self.config["exclude"])
        result = self.quantizer.run(model, ctx)
        model = result.model
        ctx.model = model
        ctx.analyses.invalidate()
        with lm.blas_threads(1):
            notes, skipped = apply_eora(model, ctx, snapshot, self.config["rank"], self.config["bits"], self.config["damp"])
        merged = {f"{self.quantizer.name}.{k}": v for k, v in result.notes.items()}
        merged.update(notes)
        return PassResult(model, True, notes=merged, skipped=list(result.skipped) + skipped)
