"""quant8: 8-bit quantization of Conv, MatMul and Gemm layers with constant weights.

Static (default): QuantizeLinear/DequantizeLinear pairs placed the way ONNX Runtime's QDQ fusions turn them
into int8 kernels:
- weights: int8, symmetric, per output channel (`per_channel=false`: per tensor) `DequantizeLinear`;
  Conv and Gemm biases: int32 `DequantizeLinear` with scale = input scale x weight scale (QLinearConv/QGemm);
- activations feeding these layers: per-tensor Q->DQ (uint8 with zero point, or int8 with
  `symmetric_activations=true`), ranges calibrated by minmax, percentile or entropy (KL) on calibration data;
- Conv outputs also get Q->DQ (after a single following Relu/Clip, which ORT then folds into the Q) so ORT
  forms QLinearConv; MatMul outputs stay float (ORT forms MatMulIntegerToFloat, which keeps the bias Add float).
`dynamic=true`: weight-only int8 per output channel with activations quantized at run time, as
`com.microsoft.DynamicQuantizeMatMul` (bias fused) for MatMul and Gemm; Conv is left float (listed).
Float16 layers (fp16 exports) in either mode: weight-only int8, per output channel, dequantized with a float32
scale and cast back to float16 before the layer (ONNX Runtime's int8 kernels take float32 activations, and
DequantizeLinear has float16 scales only from opset 19): half the weight bytes, fp16 compute. Float16 embedding
tables likewise.

Preserves: graph inputs and outputs and every node not listed. Lossy: the manager measures the error.
Layers whose weight is not constant (activation x activation MatMuls) are counted in one skipped line.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from modelsurgeon import quantize as Q
from modelsurgeon.calibration import require_finite
from modelsurgeon.errors import UserError
from modelsurgeon.pass_api import Option, Pass, PassResult, Stage, register_pass
from modelsurgeon.passes import _quant_graph as G

_TARGETS = ("Conv", "MatMul", "Gemm")
_FOLDABLE_ACTIVATIONS = ("Relu", "Clip")
_WEIGHT_ONLY = (ir.DataType.FLOAT16,)  # layers computing in these types get int8 weights only (see the docstring)


@dataclasses.dataclass
class _Target:
    node: ir.Node
    weight: np.ndarray   # as stored (Conv [M, C/g, ...], MatMul [K, N], Gemm as stored)
    axis: int            # the output-channel axis of the stored weight
    bias_index: int | None
    weight_only: bool = False  # a float16 layer: int8 weight, dequantized and cast back; activations stay fp16


def _targets(model: ir.Model, ops: tuple[str, ...], include, exclude, skipped: list[str]) -> list[_Target]:
    found = []
    for node, label, x_dtype, w in G.weighted_nodes(model, ops, skipped):
        weight_only = x_dtype in _WEIGHT_ONLY and w.dtype == x_dtype.numpy()
        if not weight_only and (x_dtype != ir.DataType.FLOAT or w.dtype != np.float32):
            skipped.append(f"{label}: only float32 and float16 layers are quantized to 8 bits")
            continue
        names = (node.name, node.inputs[1].name)
        if include and not G.matches(include, *names):
            skipped.append(f"{label}: not matched by include")
            continue
        if exclude and G.matches(exclude, *names):
            skipped.append(f"{label}: excluded")
            continue
        bias_index = None
        if node.op_type == "Conv":
            axis = 0
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                if G.const_array(node.inputs[2]) is None:
                    skipped.append(f"{label}: Conv bias is not a constant")
                    continue
                bias_index = 2
        elif node.op_type == "MatMul":
            if w.ndim != 2:
                skipped.append(f"{label}: weight has rank {w.ndim}, only 2-D weights are quantized")
                continue
            axis = 1
        else:
            if w.ndim != 2 or G.attr(node, "transA", 0):
                skipped.append(f"{label}: Gemm with transA=1 or a non-2-D weight is not supported")
                continue
            axis = 0 if G.attr(node, "transB", 0) else 1
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                c = G.const_array(node.inputs[2])
                if c is None or c.size not in (1, w.shape[axis]):
                    skipped.append(f"{label}: Gemm C is not a constant per-column bias")
                    continue
                bias_index = 2
        found.append(_Target(node, w, axis, None if weight_only else bias_index, weight_only))
    return found


def _check_percentile(v: float) -> str | None:
    return None if 90.0 <= v < 100.0 else "must be in [90, 100)"


@register_pass
class Quant8Pass(Pass):
    name = "quant8"
    summary = "int8 QDQ (static, calibrated) or dynamic int8 for Conv/MatMul/Gemm, placed for ORT's int8 kernels"
    stage = Stage.QUANTIZE
    options = {
        "dynamic": Option(bool, False, "weight-only int8 with activations quantized at run time (no calibration)"),
        "calibrate": Option(str, "percentile", "activation ranges: minmax, percentile or entropy",
                            choices=("minmax", "percentile", "entropy")),
        "percentile": Option(float, 99.999, "percentile kept by calibrate=percentile", check=_check_percentile),
        "per_channel": Option(bool, True, "per-output-channel weight scales (else one per tensor)"),
        "symmetric_activations": Option(bool, False, "int8 activations with zero point 0 (default: uint8 with zero point)"),
        "ops": Option(str, "Conv|MatMul|Gemm", "op types to quantize ('|'-separated)"),
        "include": Option(str, "", "regex: only layers whose node or weight name matches (re.search)", check=G.check_regex),
        "exclude": Option(str, "", "regex: leave layers whose node or weight name matches", check=G.check_regex),
        "embeddings": Option(bool, True, "also store embedding tables in int8 (per-column scales, dequantized after the Gather)"),
        "batch": Option(int, 8, "calibration batch size", check=lambda v: None if v > 0 else "must be > 0"),
    }

    def validate(self) -> None:
        ops = tuple(o.strip() for o in self.config["ops"].split("|") if o.strip())
        bad = [o for o in ops if o not in _TARGETS]
        if bad or not ops:
            raise UserError(f"quant8: ops={self.config['ops']!r}: choose among {'|'.join(_TARGETS)}")
        self._ops = ops
        self.needs_calibration = not self.config["dynamic"]

    def run(self, model: ir.Model, ctx) -> PassResult:
        c = self.config
        skipped: list[str] = []
        G.ensure_opset(model, "", 13)  # per-axis DequantizeLinear; first, as it may rebuild the graph
        targets = _targets(model, self._ops, c["include"], c["exclude"], skipped)
        namer = G.Namer(model)
        gathers = self._embeddings(model, namer, skipped) if c["embeddings"] else 0
        weight_only = [t for t in targets if t.weight_only]
        targets = [t for t in targets if not t.weight_only]
        for t in weight_only:
            self._quantize_weight(model, namer, t)
        more = {"weight_only_layers": len(weight_only)} if weight_only else {}
        if c["dynamic"]:
            count = self._dynamic(model, namer, targets, skipped)
            return PassResult(model, count + gathers + len(weight_only) > 0,
                              notes={"mode": "dynamic", "layers": count, "embeddings": gathers, **more}, skipped=skipped)
        if not targets:
            return PassResult(model, gathers + len(weight_only) > 0,
                              notes={"mode": "static", "layers": 0, "embeddings": gathers, **more}, skipped=skipped)
        activations = self._activation_tensors(targets)
        ranges = self._calibrate(model, ctx, activations)
        qparams = {name: Q.activation_qparams(*ranges[name], c["symmetric_activations"]) for name in activations}

        for name, (value, all_uses) in activations.items():
            self._insert_qdq(model, namer, value, *qparams[name], all_uses)
        for t in targets:
            self._quantize_weight(model, namer, t)
        notes = {"mode": "static", "layers": len(targets), "embeddings": gathers, "activations": len(activations),
                 "calibrate": c["calibrate"], **more,
                 "samples": ctx.calibration.num_samples if ctx.calibration is not None else 0}
        return PassResult(model, True, notes=notes, skipped=skipped)

    # ------------------------------------------------------------------------------------------------
    def _activation_tensors(self, targets: list[_Target]) -> dict[str, tuple[ir.Value, bool]]:
        """Tensors to quantize: each layer's input (its uses by layers only), Conv outputs (all uses)."""
        out: dict[str, tuple[ir.Value, bool]] = {}
        for t in targets:
            x = t.node.inputs[0]
            if x.name not in out:
                out[x.name] = (x, False)
        for t in targets:
            if t.node.op_type != "Conv":
                continue
            y = t.node.outputs[0]
            uses = list(y.uses())
            if y.is_graph_output() or not uses:
                continue
            if len(uses) == 1 and uses[0].node.op_type in _FOLDABLE_ACTIVATIONS and not uses[0].node.outputs[0].is_graph_output():
                y = uses[0].node.outputs[0]  # quantize after the activation; ORT folds Relu/Clip into the Q
            if y.is_graph_output():
                continue
            out[y.name] = (y, True)
        return out

    def _calibrate(self, model, ctx, activations) -> dict[str, tuple[float, float]]:
        from modelsurgeon.capture import ActivationCapture, batch_size_for

        c = self.config
        data = ctx.require_calibration(self.name)
        names = list(activations)
        observers = {n: Q.RangeObserver() for n in names}
        capture = ActivationCapture(model, names, providers=ctx.providers)
        bs = batch_size_for(model, c["batch"])
        passes = ["minmax"] if c["calibrate"] == "minmax" else ["minmax", "histogram"]
        for which in passes:
            for out in capture.iterate(data, bs, progress=ctx.progress_bar, desc=f"quant8 {which}"):
                for n, arr in out.items():
                    if which == "minmax" and arr.size:  # np.min/max propagate NaN; the observer's running min would not
                        require_finite(np.array([np.min(arr), np.max(arr)], np.float64), n, "quant8")
                    (observers[n].observe_minmax if which == "minmax" else observers[n].observe_histogram)(arr)
        return {n: o.range(c["calibrate"], c["percentile"]) for n, o in observers.items()}

    def _insert_qdq(self, model, namer, value: ir.Value, scale, zero_point, all_uses: bool) -> ir.Value:
        """value -> QuantizeLinear -> DequantizeLinear; the layers (or every consumer) read the DQ output."""
        uses = list(value.uses())
        s = G.add_initializer(model, namer, f"{value.name}_scale", scale)
        z = G.add_initializer(model, namer, f"{value.name}_zero_point", zero_point)
        q = ir.Node("", "QuantizeLinear", [value, s, z], name=namer(f"{value.name}_QuantizeLinear"))
        q.outputs[0].name = namer(f"{value.name}_quantized")
        dq = ir.Node("", "DequantizeLinear", [q.outputs[0], s, z], name=namer(f"{value.name}_DequantizeLinear"))
        dq.outputs[0].name = namer(f"{value.name}_dequantized")
        if value.dtype is not None:  # an untyped intermediate (no value_info) stays untyped: Tensor(None) is no type
            dq.outputs[0].dtype = value.dtype
        dq.outputs[0].shape = value.shape
        producer = value.producer()
        if producer is not None:
            model.graph.insert_after(producer, [q, dq])
        else:
            first = min((u.node for u in uses), key=lambda n: _position(model, n))
            model.graph.insert_before(first, [q, dq])
        for use in uses:
            if all_uses or (use.node.op_type in _TARGETS and use.idx == 0):
                use.node.replace_input_with(use.idx, dq.outputs[0])
        return dq.outputs[0]

    def _quantize_weight(self, model, namer, t: _Target) -> None:
        c = self.config
        node = t.node
        w = t.weight
        if c["per_channel"]:
            wq, ws = Q.quantize_per_channel_int8(w.astype(np.float32), t.axis)
        else:
            amax = float(np.abs(w.astype(np.float32)).max())
            ws = np.array(amax / 127.0 if amax > 0 else 1.0, np.float32)
            wq = np.clip(np.round(w / ws), -127, 127).astype(np.int8)
        old_w = node.inputs[1]
        base = G.weight_name(node, node.name or node.outputs[0].name)
        node.replace_input_with(1, _dequantized(model, namer, base, wq, ws.astype(np.float32), t.axis,
                                                ir.DataType.from_numpy(w.dtype), before=node))
        olds = [old_w]
        if t.bias_index is not None:
            x_dq = node.inputs[0]
            x_scale = G.const_array(x_dq.producer().inputs[1]) if x_dq.producer() is not None and \
                x_dq.producer().op_type == "DequantizeLinear" else None
            if x_scale is not None:
                bias_v = node.inputs[t.bias_index]
                n_out = w.shape[t.axis]
                bias = np.broadcast_to(G.const_array(bias_v).astype(np.float64).reshape(-1), (n_out,))
                if node.op_type == "Gemm":
                    bias = bias * float(G.attr(node, "beta", 1.0))
                    if G.attr(node, "beta", 1.0) != 1.0:
                        node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
                bscale = (float(x_scale) * np.broadcast_to(ws.astype(np.float64), (n_out,)))
                if node.op_type == "Gemm":
                    bscale = bscale * float(G.attr(node, "alpha", 1.0))
                safe = np.where(bscale == 0, 1.0, bscale)
                bq = np.clip(np.round(bias / safe), -2**31, 2**31 - 1).astype(np.int32)
                bq_v = G.add_initializer(model, namer, f"{bias_v.name}_int32", bq)
                bs_v = G.add_initializer(model, namer, f"{bias_v.name}_scale", bscale.astype(np.float32))
                bz_v = G.add_initializer(model, namer, f"{bias_v.name}_zero_point", np.zeros(n_out, np.int32))
                bdq = ir.Node("", "DequantizeLinear", [bq_v, bs_v, bz_v], [ir.AttrInt64("axis", 0)],
                              name=namer(f"{bias_v.name}_DequantizeLinear"))
                bdq.outputs[0].name = namer(f"{bias_v.name}_dequantized")
                model.graph.insert_before(node, bdq)
                node.replace_input_with(t.bias_index, bdq.outputs[0])
                olds.append(bias_v)
        G.drop_unused_initializers(model, olds)

    def _embeddings(self, model, namer, skipped: list[str]) -> int:
        """Gather(float table) -> Gather(int8 table) -> DequantizeLinear(per-column scales, axis -1)."""
        found, left = G.find_embeddings(model)
        skipped.extend(left)
        count = 0
        for node, table in found:
            label = node.name or node.outputs[0].name
            if table.dtype not in (np.float32, np.float16):
                skipped.append(f"{label}: only float32 and float16 embedding tables are stored in int8")
                continue
            wq, ws = Q.quantize_per_channel_int8(table.astype(np.float32), 1)
            base = node.inputs[0].name
            table_v = G.add_initializer(model, namer, f"{base}_int8", wq)
            gather = ir.Node("", "Gather", [table_v, node.inputs[1]], [ir.AttrInt64("axis", 0)], name=namer(f"{label}_int8"))
            gather.outputs[0].name = namer(f"{node.outputs[0].name}_int8")
            nodes = [gather]
            out = _dequantized(model, namer, base, gather.outputs[0], ws.astype(np.float32), -1,
                               ir.DataType.from_numpy(table.dtype), nodes=nodes)
            G.replace(model, [node], node.outputs[0], nodes, out)
            count += 1
        return count

    # ------------------------------------------------------------------------------------------------
    def _dynamic(self, model, namer, targets: list[_Target], skipped: list[str]) -> int:
        """MatMul/Gemm -> DynamicQuantizeMatMul (int8 per-column weights, bias fused); Conv stays float."""
        G.ensure_opset(model, "com.microsoft", 1)
        lin_by_node = {id(l.node): l for l in G.find_linears(model, fuse_bias=True)[0]}
        count = 0
        for t in targets:
            label = t.node.name or t.node.outputs[0].name
            lin = lin_by_node.get(id(t.node))
            if t.node.op_type == "Conv":
                skipped.append(f"{label}: dynamic int8 covers MatMul/Gemm only (ORT's ConvInteger is slower than "
                               "float Conv); use static quant8 for Conv")
                continue
            if lin is None:
                skipped.append(f"{label}: not a linear layer with a constant weight (and constant bias, beta 1) that "
                               "DynamicQuantizeMatMul can take; left in float")
                continue
            if self.config["per_channel"]:
                wq, ws = Q.quantize_per_channel_int8(lin.weight, 1)
            else:
                amax = float(np.abs(lin.weight).max())
                ws = np.full(lin.shape[1], amax / 127.0 if amax > 0 else 1.0, np.float32)
                wq = np.clip(np.round(lin.weight / ws), -127, 127).astype(np.int8)
            base = lin.weight_name
            inputs = [lin.x, G.add_initializer(model, namer, f"{base}_int8", wq),
                      G.add_initializer(model, namer, f"{base}_scale", ws),
                      G.add_initializer(model, namer, f"{base}_zero_point", np.zeros(ws.shape, np.int8))]
            if lin.bias is not None:
                inputs.append(G.add_initializer(model, namer, f"{base}_bias", lin.bias))
            node = ir.Node("com.microsoft", "DynamicQuantizeMatMul", inputs, name=namer(f"{label}_int8"))
            node.outputs[0].name = namer(f"{lin.out.name}_int8")
            nodes = [node]
            if lin.extra_add is not None:
                nodes.append(ir.Node("", "Add", [node.outputs[0], lin.extra_add], name=namer(f"{label}_int8_c")))
            old = [lin.node] + ([lin.bias_add] if lin.bias_add else [])
            G.replace(model, old, old[-1].outputs[0], nodes, nodes[-1].outputs[0])
            count += 1
        return count


def _dequantized(model: ir.Model, namer, base: str, q, scale: np.ndarray, axis: int, dtype: ir.DataType, *,
                 before: ir.Node | None = None, nodes: list[ir.Node] | None = None) -> ir.Value:
    """DequantizeLinear(q (an int8 array or value), float32 scale, zero point 0) and, for a float16 layer, a Cast to
    float16 (DequantizeLinear has float16 scales only from opset 19). The nodes go before `before`, or are
    appended to `nodes`."""
    q_v = G.add_initializer(model, namer, f"{base}_int8", q) if isinstance(q, np.ndarray) else q
    attrs = [ir.AttrInt64("axis", axis)] if scale.ndim else []
    dq = ir.Node("", "DequantizeLinear", [q_v, G.add_initializer(model, namer, f"{base}_scale", scale),
                                          G.add_initializer(model, namer, f"{base}_zero_point",
                                                            np.zeros(scale.shape, np.int8))],
                 attrs, name=namer(f"{base}_DequantizeLinear"))
    dq.outputs[0].name = namer(f"{base}_dequantized")
    made = [dq]
    if dtype != ir.DataType.FLOAT:
        dq.outputs[0].dtype = ir.DataType.FLOAT
        cast = ir.Node("", "Cast", dq.outputs, [ir.AttrInt64("to", int(dtype))], name=namer(f"{base}_Cast"))
        cast.outputs[0].name = namer(f"{base}_dequantized_{dtype.name.lower()}")
        cast.outputs[0].dtype = dtype
        made.append(cast)
    if before is not None:
        model.graph.insert_before(before, made)
    if nodes is not None:
        nodes.extend(made)
    return made[-1].outputs[0]


def _position(model: ir.Model, node: ir.Node) -> int:
    for i, n in enumerate(model.graph):
        if n is node:
            return i
    return 0
