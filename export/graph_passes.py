"""ONNX rewrites that shape an exported graph for ONNX Runtime's fusions. Each is exact up to float reassociation,
and the exporter's parity check runs on the rewritten graph."""

from __future__ import annotations

import onnx


def reorder_gelu_for_fusion(model: onnx.ModelProto) -> int:
    """Rewrite exact GELU from `x * (0.5 * (1 + erf(x / √2)))` to `(x * (1 + erf(x / √2))) * 0.5`, in place.

    torch.onnx writes the first order; ORT's GELU fusion matches only the second, so without this every GELU runs
    as five element-wise passes instead of one (Bias)Gelu kernel. Returns how many GELUs were rewritten.
    """
    nodes = list(model.graph.node)
    producer = {name: node for node in nodes for name in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def only_consumer(node: onnx.NodeProto, op_type: str) -> onnx.NodeProto | None:
        users = consumers.get(node.output[0], [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None

    rewritten = 0
    for erf in (n for n in nodes if n.op_type == "Erf"):
        div = producer.get(erf.input[0])
        add = only_consumer(erf, "Add")
        scale = only_consumer(add, "Mul") if add is not None else None
        outer = only_consumer(scale, "Mul") if scale is not None else None
        if div is None or div.op_type != "Div" or outer is None:
            continue
        x = div.input[0]
        if sorted(outer.input) != sorted([x, scale.output[0]]):
            continue
        half = next(name for name in scale.input if name != add.output[0])
        inner_out, final_out = scale.output[0], outer.output[0]
        outer.input[:], outer.output[:] = [x, add.output[0]], [inner_out]
        scale.input[:], scale.output[:] = [inner_out, half], [final_out]
        first, second = nodes.index(scale), nodes.index(outer)  # keep topological order: x * (1 + erf) comes first
        nodes[first], nodes[second] = outer, scale
        rewritten += 1
    if rewritten:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return rewritten
