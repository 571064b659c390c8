"""Which ONNX operators TensorRT's ONNX parser imports: a static check that needs no GPU and no TensorRT.

Source: onnx-tensorrt ``docs/operators.md`` for TensorRT 10.15 (opsets 9 to 24), every row marked "Y".
Rows marked "N" are left out, among them AffineGrid, Compress, the Sequence / Optional / String ops,
QLinear*, Unique and DFT. Row restrictions that an export can break are not checked here. The ones that
matter for diffusion graphs: Conv / ConvTranspose weights must be initializers; Dropout must be in
inference mode; Resize antialiasing is unsupported. The engine build reports those.

Beyond the op type, the parser refuses (or TensorRT cannot run) a few things worth flagging statically:
custom domains (need a plugin), DOUBLE tensors (TensorRT has no float64), and Cast to DOUBLE.
"""

from __future__ import annotations

import os

TRT_VERSION = "10.15"
SOURCE = "onnx-tensorrt docs/operators.md (TensorRT 10.15)"

SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool
BatchNormalization BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape
Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp
Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool
GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow Hardmax
HardSigmoid HardSwish Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization
LeakyRelu Less LessOrEqual Log LogSoftmax Loop LpNormalization LpPool LRN LSTM MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization RNN
RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink
Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan
Tanh TensorScatter ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

_DEFAULT_DOMAINS = ("", "ai.onnx")
_DOUBLE = 11  # onnx.TensorProto.DOUBLE


def _load(onnx_path_or_proto):
    import onnx

    if isinstance(onnx_path_or_proto, (str, os.PathLike)):
        return onnx.load(os.fspath(onnx_path_or_proto), load_external_data=False)
    return onnx_path_or_proto


def _nodes(graph):
    """Every node, including those inside If / Loop / Scan bodies."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                yield from _nodes(attr.g)
            for g in attr.graphs:
                yield from _nodes(g)


def unsupported_ops(onnx_path_or_proto) -> list:
    """Sorted op types in the graph that TensorRT's ONNX parser (``TRT_VERSION``) does not import.

    Custom-domain ops are named ``domain::OpType``. An empty list means every op is in the table.
    """
    proto = _load(onnx_path_or_proto)
    bad = set()
    for node in _nodes(proto.graph):
        if node.domain not in _DEFAULT_DOMAINS:
            bad.add(f"{node.domain}::{node.op_type}")
        elif node.op_type not in SUPPORTED_OPS:
            bad.add(node.op_type)
    return sorted(bad)


def static_check(onnx_path_or_proto) -> list:
    """Human-readable problems TensorRT would hit: unsupported ops and float64 tensors. [] = none found."""
    proto = _load(onnx_path_or_proto)
    problems = [f"op {op} is not supported by TensorRT {TRT_VERSION}'s ONNX parser ({SOURCE})"
                for op in unsupported_ops(proto)]
    doubles = [t.name for t in proto.graph.initializer if t.data_type == _DOUBLE]
    for vi in list(proto.graph.input) + list(proto.graph.output) + list(proto.graph.value_info):
        if vi.type.tensor_type.elem_type == _DOUBLE:
            doubles.append(vi.name)
    if doubles:
        problems.append(f"float64 tensors (TensorRT has no DOUBLE): {sorted(set(doubles))[:5]}")
    for node in _nodes(proto.graph):
        if node.op_type == "Cast" and any(a.name == "to" and a.i == _DOUBLE for a in node.attribute):
            problems.append(f"Cast to DOUBLE in node {node.name or node.output[0]!r}")
            break
    return problems


__all__ = ["TRT_VERSION", "SOURCE", "SUPPORTED_OPS", "unsupported_ops", "static_check"]
