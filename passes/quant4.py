"""quant4: weight-only 4-bit quantization of MatMul/Gemm layers with constant weights (and optionally
embedding Gathers and the output head).

Changes: each selected MatMul/Gemm (with a following bias Add, Gemm's transB/alpha/beta/bias folded in)
becomes `com.microsoft.MatMulNBits` (format=matmulnbits, the default; `accuracy_level` 4 = int8 activations
on CPU), or opset-21 blocked `DequantizeLinear` (int4/uint4) + MatMul (format=qdq, standard ONNX; the model's
opset is raised to 21). Weights are quantized in blocks of `block` input channels per output channel,
symmetric or with zero points, by round-to-nearest (rtn), GPTQ (gptq) or AWQ (awq). `embeddings=true` turns
embedding Gathers into `com.microsoft.GatherBlockQuantized`; the output head (a layer whose result goes straight
to a graph output) is quantized by default (`lm_head=auto`: 8 bits, 4 under gptq), and a table tied to it is read
from the head's own codes, so it is stored once (`embeddings=auto`). `keep8=N` stores the N layers with the largest relative
output error at 8 bits instead.

GPTQ and AWQ (and keep8's sensitivity) read calibration statistics layer by layer, in graph order, through
`LayerwiseRunner`: each group of layers sharing an input (q/k/v, gate/up) sees the outputs of the layers
already quantized before it; memory holds one group's X^T X. AWQ's input scaling is folded exactly into the
op producing the input (norm gains, a preceding linear layer's output columns, ...) or, where no exact fold
exists, applied by one inserted Mul.

Preserves: graph inputs and outputs (names, shapes, types), every other node. Lossy: the manager measures
the output error. Layers left alone (non-constant weights, unsupported shapes, excluded) are listed.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import onnx_ir as ir

from modelsurgeon import quantize as Q
from modelsurgeon.calibration import require_finite
from modelsurgeon.errors import UserError
from modelsurgeon.pass_api import Option, Pass, PassResult, Stage, register_pass
from modelsurgeon.passes import _quant_graph as G
from modelsurgeon.passes.cleanup import KEEP_UNFOLDED


def _check_block(b: int) -> str | None:
    if b < 16 or b > 256 or b & (b - 1):
        return "must be a power of two from 16 to 256"
    return None


def head_bits(value, algo: str) -> int | None:
    """Bits for the output head from the `lm_head` option: 4, 8 or None (float).

    auto, measured on SmolLM2-135M (benchmarks/quant4_head.py, docs/quant.md): 8 bits under rtn and awq, where a
    4-bit head raised perplexity from 67.9 (8-bit head, the same as a float one) to 75.3; 4 bits under gptq, whose
    error compensation keeps the 4-bit head close (60.3 against 59.1 at 8 bits) for 14% fewer bytes. Decode speed
    was the same at 8 and 4 bits, and 1.25x a float head's."""
    if value == "auto":
        return 4 if algo == "gptq" else 8
    if value is True or value == 4:
        return 4
    if value == 8:
        return 8
    return None  # False, "float"


def _check_lm_head(value) -> str | None:
    ok = value in ("auto", "float") or isinstance(value, bool) or (isinstance(value, int) and value in (4, 8))
    return None if ok else "must be 4, 8, float, true, false or auto"


def _check_embeddings(value) -> str | None:
    return None if isinstance(value, bool) or value == "auto" else "must be true, false or auto"


@dataclasses.dataclass
class _Layer:
    lin: G.Linear
    w_eff: np.ndarray          # the float weight for the layer's current input (AWQ-scaled)
    bias: np.ndarray | None
    nodes: list[ir.Node]       # the nodes now computing the layer (replaced together)
    error: float = 0.0         # relative squared output error at 4 bits (weight error without calibration)
    bits: int = 4
    codes: Q.BlockQuantized | None = None  # what was emitted last


@register_pass
class Quant4Pass(Pass):
    name = "quant4"
    summary = "weight-only 4-bit MatMul/Gemm (MatMulNBits or int4 DequantizeLinear) by RTN, GPTQ or AWQ"
    stage = Stage.QUANTIZE
    options = {
        "block": Option(int, 32, "weights per quantization block along K (16..256, a power of two)", check=_check_block),
        "symmetric": Option(bool, False, "symmetric blocks (no zero points); default: asymmetric with zero points"),
        "algo": Option(str, "rtn", "rtn (round to nearest), gptq or awq (the last two need calibration)",
                       choices=("rtn", "gptq", "awq")),
        "format": Option(str, "matmulnbits", "matmulnbits (com.microsoft) or qdq (opset-21 int4 DequantizeLinear + MatMul)",
                         choices=("matmulnbits", "qdq")),
        "accuracy_level": Option(int, 4, "MatMulNBits accuracy_level: 0 = fp32 compute, 4 = int8 activations (fast on CPU)",
                                 choices=(0, 1, 2, 3, 4)),
        "damp": Option(float, 0.01, "GPTQ dampening, a fraction of the mean Hessian diagonal",
                       check=lambda v: None if 0 < v < 1 else "must be between 0 and 1"),
        "act_order": Option(bool, True, "GPTQ: quantize input channels by decreasing activation energy"),
        "clip_search": Option((bool, type(None)), None, "search a clipping ratio per block (default: on for gptq/awq)"),
        "include": Option(str, "", "regex: only layers whose node or weight name matches (re.search)", check=G.check_regex),
        "exclude": Option(str, "", "regex: leave layers whose node or weight name matches", check=G.check_regex),
        "keep8": Option(int, 0, "keep the N most error-sensitive layers at 8 bits",
                        check=lambda v: None if v >= 0 else "must be >= 0"),
        "protected_bits": G.PROTECTED_BITS,
        "embeddings": Option((bool, str), "auto", "embedding Gathers as GatherBlockQuantized (format=matmulnbits): true = "
                             "every table, false = none, auto = a table tied to the quantized head (stored once, in the "
                             "head's codes)", check=_check_embeddings),
        "lm_head": Option((bool, int, str), "auto", "the output head (the layer feeding a graph output): 4, 8 (bits), float, "
                          "true (= 4), false (= float) or auto (= 4 under gptq, else 8)", check=_check_lm_head),
        "batch": Option(int, 8, "calibration batch size", check=lambda v: None if v > 0 else "must be > 0"),
    }

    def validate(self) -> None:
        c = self.config
        self.head_bits = head_bits(c["lm_head"], c["algo"])
        self.needs_calibration = c["algo"] in ("gptq", "awq") or c["keep8"] > 0
        self.clip = c["algo"] in ("gptq", "awq") if c["clip_search"] is None else c["clip_search"]

    # ------------------------------------------------------------------------------------------------
    def run(self, model: ir.Model, ctx) -> PassResult:
        c = self.config
        include, exclude = c["include"], c["exclude"]
        if c["format"] == "matmulnbits":
            G.ensure_opset(model, "com.microsoft", 1)
        else:
            G.ensure_opset(model, "", 21)  # before collecting layers: converting from below opset 18 rebuilds the graph
        if head_bits(c["lm_head"], c["algo"]) is not None:
            G.expose_ties(model)  # a tied head, however exported, can share its codes with the lookup
        protected: list[G.Linear] = []  # with protected_bits=32, find_linears reports them as kept in float
        linears, skipped = G.find_linears(model, fuse_bias=c["format"] == "matmulnbits",
                                          protected=protected if c["protected_bits"] == 8 else None)
        selected: list[G.Linear] = []
        for lin in linears:
            names = (lin.node.name, lin.weight_name)
            if include and not G.matches(include, *names):
                skipped.append(f"{lin.name}: not matched by include={c['include']}")
            elif exclude and G.matches(exclude, *names):
                skipped.append(f"{lin.name}: excluded by exclude={c['exclude']}")
            elif self.head_bits is None and G.is_output_head(lin.node):
                skipped.append(f"{lin.name}: output head kept in float (lm_head=4 or 8 quantizes it)")
            elif c["lm_head"] == "auto" and c["format"] == "qdq" and G.tied_table(lin.node) is not None:
                # its codes cannot serve the lookup (no standard 4-bit Gather), so quantizing it would store the
                # table twice: the float table for the lookup and the head's codes
                skipped.append(f"{lin.name}: output head tied to the embedding table kept in float under format=qdq "
                               "(quantized, the table would be stored twice); lm_head=4 or 8 quantizes it anyway")
            elif lin.shape[0] < 16:
                skipped.append(f"{lin.name}: K={lin.shape[0]} is below the smallest block (16)")
            else:
                selected.append(lin)
        if c["keep8"] > len(selected):
            raise UserError(f"quant4: keep8={c['keep8']} but only {len(selected)} layers are quantized; lower keep8")

        tied_heads = {id(lin.node): table for lin in selected if (table := G.tied_table(lin.node)) is not None}
        # heads stored at 8 bits: by lm_head=8 (or auto), or reading a basis change a structural pass marked
        # precision-sensitive (slice's, before a tied head) under round to nearest
        heads8 = {id(lin) for lin in selected if self.head_bits == 8 and G.is_output_head(lin.node)}
        rotated = {id(lin) for lin in selected if self.head_bits == 4 and c["algo"] == "rtn" and _reads_protected_basis(lin)}
        namer = G.Namer(model)

        runner = None
        if self.needs_calibration and selected:
            from modelsurgeon.layerwise import LayerwiseRunner

            runner = LayerwiseRunner(model, ctx.require_calibration(self.name), c["batch"], ctx.providers)

        layers: list[_Layer] = []
        by_node: dict[int, _Layer] = {}
        awq_folded = awq_mul = 0
        alphas: list[float] = []
        groups = G.group_by_input(selected)
        for group in ctx.progress_bar(groups, desc=f"quant4 {c['algo']}", total=len(groups)):
            hessian = act = None
            G.refresh_inputs(group)
            if all(id(lin) in heads8 for lin in group):  # 8-bit round to nearest needs no statistics
                for lin in group:
                    layer = self._emit_rtn8(model, namer, lin)
                    layers.append(layer)
                    for n in layer.nodes:
                        by_node[id(n)] = layer
                continue
            if runner is not None:
                hessian, act = _input_statistics(runner, group[0].x.name, group[0].shape[0])
            scales = None
            if c["algo"] == "awq":
                res = Q.awq_search([lin.weight for lin in group], hessian, act, 4, c["block"], c["symmetric"],
                                   clip_search=self.clip)
                alphas.append(res.alpha)
                quantized = res.quantized
                if res.alpha > 0:
                    scales = res.scales.astype(np.float64)
                    folded = self._scale_input(model, namer, group, 1.0 / scales, runner, by_node)
                    awq_folded += folded
                    awq_mul += not folded
                else:
                    scales = None
            elif c["algo"] == "gptq":
                # Output channels are independent in GPTQ: the layers sharing H are quantized as one matrix.
                joint = Q.gptq(np.concatenate([lin.weight for lin in group], axis=1), hessian, 4, c["block"],
                               c["symmetric"], c["damp"], c["act_order"], clip_search=self.clip)
                bounds = np.cumsum([0] + [lin.shape[1] for lin in group])
                quantized = [joint.columns(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
            else:
                quantized = [Q.quantize_rtn(lin.weight, 4, c["block"], c["symmetric"], self.clip, hessian)
                             for lin in group]
            for lin, bq in zip(group, quantized):
                w_eff = lin.weight if scales is None else (lin.weight * scales[:, None]).astype(np.float32)
                layer = _Layer(lin, w_eff, lin.bias, [lin.node] + ([lin.bias_add] if lin.bias_add else []))
                layer.error = Q.quantized_relative_error(lin.weight, bq, hessian, scales)
                self._emit(model, namer, layer, bq)
                layers.append(layer)
                for n in layer.nodes:
                    by_node[id(n)] = layer

        keep8 = sorted(layers, key=lambda l: -l.error)[:c["keep8"]]
        rotated_heads = [l for l in layers if id(l.lin) in rotated]
        late8 = [l for l in layers if l.bits == 4 and (id(l.lin) in rotated or id(l.lin) in heads8)]  # head in a mixed group
        for layer in keep8 + [l for l in late8 if l not in keep8]:
            bq = Q.quantize_rtn(layer.w_eff, 8, c["block"], c["symmetric"])
            layer.bits = 8
            self._emit(model, namer, layer, bq)
        for layer in rotated_heads:
            skipped.append(f"{layer.lin.name}: stored at 8 bits: the head reads slice's principal-component basis, where "
                           "4-bit round to nearest multiplies its error (SmolLM2: 3.3x perplexity); algo=gptq quantizes "
                           "it to 4 bits")

        for lin in protected:  # precision-sensitive: 8-bit round to nearest (their error goes straight downstream)
            layers.append(self._emit_rtn8(model, namer, lin))

        gathers = 0
        tied_quantized = {tied_heads[id(l.lin.node)].name: l for l in layers if id(l.lin.node) in tied_heads}
        if c["embeddings"] is True or c["embeddings"] == "auto":
            # A head tied to the embedding table was just replaced: its Transpose of the table is now dead, so the
            # lookup becomes the table's only reader and can be quantized too.
            import onnx_ir.passes.common as common

            common.RemoveUnusedNodesPass()(model)
            # table name -> the head whose packed codes serve the lookup too (no AWQ scale on them, and codes that
            # reconstruct the table about as well as round to nearest would)
            shared = {name: l.nodes[0] for name, l in tied_quantized.items()
                      if l.w_eff is l.lin.weight and c["format"] == "matmulnbits" and self._fit_for_lookup(l, skipped)}
            only = None if c["embeddings"] is True else set(tied_quantized)
            gathers = self._quantize_embeddings(model, namer, skipped, shared, only)

        protected_ids = {id(lin) for lin in protected}
        notes = {
            "algo": c["algo"], "format": c["format"], "block": c["block"], "symmetric": c["symmetric"],
            "layers_4bit": sum(l.bits == 4 for l in layers), "layers_8bit": [l.lin.name for l in layers if l.bits == 8 and id(l.lin) not in protected_ids],
            "protected_8bit": len(protected),
            "embeddings": gathers,
            "layer_rel_error_mean": float(np.mean([np.sqrt(l.error) for l in layers])) if layers else 0.0,
            "layer_rel_error_max": float(max((np.sqrt(l.error) for l in layers), default=0.0)),
            "error_basis": "calibration activations" if runner is not None else "weights (no calibration)",
        }
        if c["algo"] == "awq":
            notes.update(awq_folded=awq_folded, awq_inserted_mul=awq_mul,
                         awq_alpha_mean=float(np.mean(alphas)) if alphas else 0.0)
        if runner is not None:
            notes["calibration_segments"] = runner.segments_run
        return PassResult(model, bool(layers) or gathers > 0, notes=notes, skipped=skipped)

    # ------------------------------------------------------------------------------------------------
    def _scale_input(self, model, namer, group: list[G.Linear], factor: np.ndarray, runner,
                     by_node: dict[int, _Layer]) -> bool:
        """Divide the group's input by s: folded into its producer if exact, else through one new Mul."""
        x = group[0].x
        allowed = {id(lin.node) for lin in group}
        fold = G.plan_channel_scale(model, namer, x, factor, allowed)
        if fold is not None:
            fold.apply()
            if runner is not None:
                runner.rescale(fold.scaled_values, factor)
            for node in fold.touched_nodes:  # a quantized producer: its float weight changed too (keep8 uses it)
                layer = by_node.get(id(node))
                if layer is not None:
                    layer.w_eff = (layer.w_eff * factor[None, :]).astype(np.float32)
                    if layer.bias is not None:
                        layer.bias = (layer.bias * factor).astype(np.float32)
            return True
        inv = G.add_initializer(model, namer, f"{group[0].weight_name}_awq_inv_scale", factor.astype(group[0].dtype))
        mul = ir.Node("", "Mul", [x, inv], name=namer(f"{group[0].name}_awq_scale"))
        mul.outputs[0].name = namer(f"{x.name}_awq_scaled")
        mul.outputs[0].dtype = x.dtype
        mul.outputs[0].shape = x.shape
        model.graph.insert_before(group[0].node, mul)
        for lin in group:
            lin.node.replace_input_with(0, mul.outputs[0])
            lin.x = mul.outputs[0]
        return False

    def _emit_rtn8(self, model, namer, lin: G.Linear) -> _Layer:
        """Replace `lin` by its 8-bit round-to-nearest form; the layer, with its weight error."""
        c = self.config
        layer = _Layer(lin, lin.weight, lin.bias, [lin.node] + ([lin.bias_add] if lin.bias_add else []), bits=8)
        bq = Q.quantize_rtn(lin.weight, 8, c["block"], c["symmetric"])
        layer.error = Q.quantized_relative_error(lin.weight, bq, None)
        self._emit(model, namer, layer, bq)
        return layer

    def _emit(self, model, namer, layer: _Layer, bq: Q.BlockQuantized) -> None:
        """Replace the layer's current nodes by their quantized form."""
        c = self.config
        lin = layer.lin
        lin.x = G.layer_input(layer.nodes)  # a layer re-emitted (keep8) reads what its producer's newest form writes
        base = lin.weight_name
        nodes: list[ir.Node] = []
        tag = f"Q{bq.bits}"
        if c["format"] == "matmulnbits":
            node = G.matmulnbits_node(model, namer, lin, bq, layer.bias, c["accuracy_level"], tag)
            nodes.append(node)
        else:
            values, scales, zp = Q.onnx_blocked(bq)
            if bq.bits == 4:
                values = values.astype(ml_dtypes.int4 if bq.symmetric else ml_dtypes.uint4)
                zp = None if zp is None else zp.astype(ml_dtypes.uint4)
            dq_in = [G.add_initializer(model, namer, f"{base}_{tag}", ir.tensor(values)),
                     G.add_initializer(model, namer, f"{base}_{tag}_scales", scales.astype(lin.dtype))]
            if zp is not None:
                dq_in.append(G.add_initializer(model, namer, f"{base}_{tag}_zero_points", ir.tensor(zp)))
            dq = ir.Node("", "DequantizeLinear", dq_in, [ir.AttrInt64("axis", 0), ir.AttrInt64("block_size", bq.block_size)],
                         name=namer(f"{lin.name}_DQ_{tag}"))
            dq.outputs[0].name = namer(f"{base}_{tag}_dequantized")
            mm = ir.Node("", "MatMul", [lin.x, dq.outputs[0]], name=namer(f"{lin.name}_{tag}"))
            mm.outputs[0].name = namer(f"{lin.out.name}_{tag}")
            nodes += [dq, mm]
            if layer.bias is not None:
                bias = G.add_initializer(model, namer, f"{base}_{tag}_bias", layer.bias.astype(lin.dtype))
                add = ir.Node("", "Add", [mm.outputs[0], bias], name=namer(f"{lin.name}_{tag}_bias"))
                add.outputs[0].name = namer(f"{lin.out.name}_{tag}_biased")
                nodes.append(add)
        if lin.extra_add is not None:
            add = ir.Node("", "Add", [nodes[-1].outputs[0], lin.extra_add], name=namer(f"{lin.name}_{tag}_c"))
            nodes.append(add)
        old_out = layer.nodes[-1].outputs[0]
        G.replace(model, layer.nodes, old_out, nodes, nodes[-1].outputs[0])
        layer.nodes, layer.codes = nodes, bq

    def _fit_for_lookup(self, layer: _Layer, skipped: list[str]) -> bool:
        """Whether a tied head's codes may serve the embedding lookup: their squared error on the table is at most
        `LOOKUP_MAX_ERROR_OVER_RTN` (4) times a round to nearest's at the same bits (2x in norm).

        GPTQ puts the head's rounding error where the head's input has little energy. After `slice` that is the
        trailing principal components, which the lookup writes into the residual stream like any other. Measured on
        SmolLM2: unsliced, gptq's head codes have 1.9x RTN's squared error on the table, and sharing them costs
        little (perplexity 60.3, against 59.1 with an 8-bit head); after slice(0.25) they have 34x: shared, 180;
        with the lookup's own 4-bit table, 142 (132 with the table in float)."""
        if layer.codes is None or self.config["algo"] == "rtn" or layer.bits == 8:
            return True
        c = self.config
        worse = Q.error_over_rtn(layer.lin.weight, layer.codes, layer.bits, c["block"], c["symmetric"])
        if worse <= Q.LOOKUP_MAX_ERROR_OVER_RTN:
            return True
        skipped.append(f"{layer.lin.name}: its {c['algo']} codes reconstruct the tied table {worse:.1f}x worse "
                       "(squared error) than round to nearest, so the lookup gets its own 4-bit table")
        return False

    def _quantize_embeddings(self, model, namer, skipped: list[str], shared: dict[str, ir.Node],
                             only: set[str] | None) -> int:
        """Quantize embedding lookups (those of the tables named in `only`, if given); a table in `shared` is read
        from its tied head's codes."""
        c = self.config
        count = 0
        found, left = G.find_embeddings(model)
        skipped.extend(left if only is None else [])
        for node, table in found:
            if only is not None and node.inputs[0].name not in only:
                skipped.append(f"{node.name or node.outputs[0].name}: embedding table kept in float (not tied to the "
                               "quantized head; embeddings=true quantizes it)")
                continue
            label = node.name or node.outputs[0].name
            if c["format"] != "matmulnbits":
                skipped.append(f"{label}: format=qdq has no standard 4-bit Gather; use format=matmulnbits for embeddings")
                continue
            v, d = table.shape  # a width that is not a multiple of block ends in a shorter block, as K does
            head = shared.get(node.inputs[0].name)
            if head is not None and _share_head_codes(model, namer, node, head, v, d, c["block"]):
                count += 1
                continue
            bq = Q.quantize_rtn(table.astype(np.float32).T, 4, c["block"], c["symmetric"])  # blocks along the width
            values, scales, zp = Q.onnx_blocked(bq)
            values = values.T.astype(ml_dtypes.int4 if bq.symmetric else ml_dtypes.uint4)
            base = node.inputs[0].name
            inputs = [G.add_initializer(model, namer, f"{base}_Q4", ir.tensor(np.ascontiguousarray(values))), node.inputs[1],
                      G.add_initializer(model, namer, f"{base}_Q4_scales", np.ascontiguousarray(scales.T).astype(table.dtype))]
            if zp is not None:
                inputs.append(G.add_initializer(model, namer, f"{base}_Q4_zero_points",
                                                ir.tensor(np.ascontiguousarray(zp.T).astype(ml_dtypes.uint4))))
            gbq = ir.Node("com.microsoft", "GatherBlockQuantized", inputs,
                          [ir.AttrInt64("gather_axis", 0), ir.AttrInt64("quantize_axis", 1),
                           ir.AttrInt64("block_size", c["block"])], name=namer(f"{label}_Q4"))
            gbq.outputs[0].name = namer(f"{node.outputs[0].name}_Q4")
            G.replace(model, [node], node.outputs[0], [gbq], gbq.outputs[0])
            count += 1
        return count


def _share_head_codes(model: ir.Model, namer, gather: ir.Node, head: ir.Node, v: int, d: int, block: int) -> bool:
    """Replace a lookup in a table tied to a 4- or 8-bit head by GatherBlockQuantized over the head's own codes.

    MatMulNBits stores the head [K=d, N=v] as B [v, d/block, block*bits/8]: row n of the table, block by block (4
    bits: low nibble first), which is GatherBlockQuantized's uint8 layout with quantize_axis=2. The lookup reads B
    itself (so the table is stored once, in the head's bits) with its scales reshaped to [v, d/block, 1] by a Reshape
    node (ORT folds it at session creation; a reshaped copy in the file cost SmolLM2 3.4 MiB at block 32) and its
    zero points unpacked to one per byte (a copy: half a byte per block), and a Reshape merges the last two axes of
    its output back to d. False (nothing changed) when the indices' rank is unknown."""
    indices = gather.inputs[1]
    if indices.shape is None:
        return False
    nb = -(-d // block)  # MatMulNBits pads K to whole blocks; a Slice drops the padding from the lookup's rows
    bits = G.attr(head, "bits", 4)
    b, scales = head.inputs[1], G.const_array(head.inputs[2])
    zp = G.const_array(head.inputs[3]) if len(head.inputs) > 3 and head.inputs[3] is not None else None
    if b is None or scales is None or b.const_value is None or bits not in (4, 8) \
            or tuple(b.const_value.shape) != (v, nb, block * bits // 8):
        return False
    label = gather.name or gather.outputs[0].name
    lookup_shape = G.add_initializer(model, namer, f"{label}_Q{bits}_scales_shape", np.array([v, nb, 1], np.int64))
    lookup_scales = ir.Node("", "Reshape", [head.inputs[2], lookup_shape], name=namer(f"{label}_Q{bits}_scales"))
    lookup_scales.outputs[0].name = namer(f"{head.inputs[2].name}_lookup")
    lookup_scales.metadata_props[KEEP_UNFOLDED] = "1"
    inputs = [b, indices, lookup_scales.outputs[0]]
    if zp is not None:  # MatMulNBits packs 8/bits blocks' zero points per byte; the lookup wants one per byte here
        codes = Q.unpack_bits(zp.reshape(v, -1), bits)[:, :nb]
        inputs.append(G.add_initializer(model, namer, f"{b.name}_lookup_zero_points", codes.reshape(v, nb, 1).astype(np.uint8)))
    gbq = ir.Node("com.microsoft", "GatherBlockQuantized", inputs,
                  [ir.AttrInt64("gather_axis", 0), ir.AttrInt64("quantize_axis", 2), ir.AttrInt64("block_size", block),
                   ir.AttrInt64("bits", bits)], name=namer(f"{label}_Q{bits}_shared"))
    gbq.outputs[0].name = namer(f"{gather.outputs[0].name}_Q{bits}_blocks")
    shape = G.add_initializer(model, namer, f"{label}_Q{bits}_shape", np.array([0] * len(indices.shape) + [nb * block], np.int64))
    reshape = ir.Node("", "Reshape", [gbq.outputs[0], shape], name=namer(f"{label}_Q{bits}_merge"))
    reshape.outputs[0].name = namer(f"{gather.outputs[0].name}_Q{bits}")
    nodes = [lookup_scales, gbq, reshape]
    if nb * block != d:
        bounds = [G.add_initializer(model, namer, f"{label}_Q{bits}_{what}", np.array([x], np.int64))
                  for what, x in (("start", 0), ("end", d), ("axis", -1))]
        cut = ir.Node("", "Slice", [reshape.outputs[0], *bounds], name=namer(f"{label}_Q{bits}_unpad"))
        cut.outputs[0].name = namer(f"{gather.outputs[0].name}_Q{bits}_unpadded")
        nodes.append(cut)
    G.replace(model, [gather], gather.outputs[0], nodes, nodes[-1].outputs[0])
    return True


def _input_statistics(runner, name: str, k: int, who: str = "quant4") -> tuple[np.ndarray, np.ndarray]:
    """H = X^T X / rows ([K, K], float64) and mean |x| per channel over the calibration batches."""
    h = np.zeros((k, k), np.float64)
    absum = np.zeros(k, np.float64)
    rows = 0
    for batch in runner.values([name]):
        x = np.asarray(batch[name], np.float32)
        if x.shape[-1] != k:
            raise UserError(f"{who}: activation '{name}' has {x.shape[-1]} channels, its layer expects {k}")
        x = x.reshape(-1, k)
        h += x.T @ x
        absum += np.abs(x).sum(axis=0)
        rows += x.shape[0]
    rows = max(rows, 1)
    require_finite(h, name, who)
    return h / rows, absum / rows


def _reads_protected_basis(lin: G.Linear) -> bool:
    """An output head whose input is a change of basis a structural pass marked precision-sensitive (slice's basis
    change before a tied head): the stream it reads is rotated into principal components."""
    producer = lin.x.producer() if lin.x is not None else None
    return producer is not None and G.is_output_head(lin.node) and G.keep_float_reason(producer) is not None

