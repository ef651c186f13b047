"""QuantLinear and QuantEmbedding: layers whose weight stays packed (``minigrad.quant``).

``QuantLinear`` computes y = x W^T + b straight from the codes (``kernels.quant``) and
carries the gradient to its input x, so a frozen quantized base can sit under a trainable
adapter (QLoRA). W is frozen: it has no gradient, and asking for one is an error. The bias
stays a float Parameter, frozen too (``requires_grad=False``); it may be unfrozen.

The packed arrays are buffers of the module (``weight_codes``, ``weight_blocks``, ...), so
``state_dict``, ``load_state_dict`` and ``.to(device)`` handle them; ``.to(dtype)`` leaves
them alone (a packed format has its own dtypes). ``QuantEmbedding`` owns nothing: it reads
the rows of a tied QuantLinear's weight (GPT's ``wte`` / ``lm_head``).
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..kernels import quant as qk
from ..quant import QuantizedTensor, format_of
from ..tensor import Function, Tensor, is_grad_enabled
from .module import Module, Parameter


class QuantLinearFunction(Function):
    """y = x W^T + b with W packed; the gradient goes to x (and b), never to W."""

    def __init__(self, qweight: QuantizedTensor):
        self.qw = qweight

    def _unpack(self, rows, dtype):
        return self.qw.dequantize_rows(rows, dtype)

    def forward(self, x, b=None):
        qw = self.qw
        out_f, in_f = qw.shape
        if x.shape[-1] != in_f:
            raise ValueError(f"QuantLinear: input of shape {x.shape} does not fit weight of shape "
                             f"{qw.shape} (last dimensions {x.shape[-1]} != {in_f})")
        self.x_shape = x.shape
        y2 = qk.matmul(x.reshape(-1, in_f), qw.format.name, qw.arrays, qw.shape, self._unpack)
        if y2.dtype != x.dtype:
            y2 = y2.astype(x.dtype)
        if b is not None:
            y2 += b
        return y2.reshape(x.shape[:-1] + (out_f,))

    def backward(self, gy):
        qw = self.qw
        g2 = gy.reshape(-1, gy.shape[-1])
        gx = None
        if self.needs_input_grad[0]:
            gx = qk.matmul_t(g2, qw.format.name, qw.arrays, qw.shape, self._unpack)
            gx = gx.astype(gy.dtype, copy=False).reshape(self.x_shape)
        if len(self.needs_input_grad) == 2:
            gb = g2.sum(axis=0) if self.needs_input_grad[1] else None
            return gx, gb
        return gx


class QuantLinear(Module):
    """A Linear layer with a packed weight of ``scheme`` (see ``minigrad.quant``)."""

    _keep_buffer_dtypes = True           # Module.to(dtype) must not cast packed arrays

    def __init__(self, qweight: QuantizedTensor, bias=None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.scheme = qweight.scheme
        self._fields = tuple(qweight.arrays)
        for k, a in qweight.arrays.items():
            self.register_buffer("weight_" + k, a)
        self.bias = None
        if bias is not None:
            self.bias = Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear, qweight: QuantizedTensor) -> "QuantLinear":
        b = linear.bias
        return cls(qweight, None if b is None else backend.get_array_module(b.data).array(b.data, copy=True))

    @classmethod
    def empty(cls, scheme: str, in_features: int, out_features: int, bias: bool = True) -> "QuantLinear":
        """A layer of the right shapes with zero codes, to be filled by ``load_state_dict``."""
        return cls(QuantizedTensor.empty(scheme, (out_features, in_features)),
                   np.zeros(out_features, np.float32) if bias else None)

    @property
    def weight(self) -> QuantizedTensor:
        return QuantizedTensor.wrap(self.scheme, (self.out_features, self.in_features),
                                    {k: getattr(self, "weight_" + k) for k in self._fields})

    def forward(self, x):
        if isinstance(x, Tensor) and not (is_grad_enabled() and (
                x.requires_grad or (self.bias is not None and self.bias.requires_grad))):
            y = self._decode(x)
            if y is not None:
                return y
        f = QuantLinearFunction(self.weight)
        return f(x) if self.bias is None else f(x, self.bias)

    def _decode(self, x):
        """A few rows of x and nothing to record (decoding): the matrix-vector loop called
        straight, its arguments prepared once per weight (``kernels.quant.matvec_plan``),
        none of the graph's bookkeeping. The same loop as QuantLinearFunction's, so the same
        numbers. None when the array path or the prompt path applies."""
        xd = x.data
        K = self.in_features
        if type(xd) is not np.ndarray or xd.dtype != np.float32 or not xd.ndim or xd.shape[-1] != K:
            return None
        n = xd.size // K
        if n > qk.SMALL_N:
            return None
        plan = self.__dict__.get("_plan")
        bufs = self._buffers
        if plan is None or any(bufs[k] is not a for k, a in plan[0]):   # new arrays: plan again
            arrays = {k: bufs["weight_" + k] for k in self._fields}
            if not qk.compiled(xd, arrays):
                return None
            plan = (tuple(("weight_" + k, a) for k, a in arrays.items()),
                    qk.matvec_plan(format_of(self.scheme).name, arrays), format_of(self.scheme).name)
            object.__setattr__(self, "_plan", plan)
        y = qk.matvec(xd.reshape(n, K), plan[2], None, self.out_features, plan[1])
        if self.bias is not None:
            y += self.bias.data
        return Tensor(y.reshape(xd.shape[:-1] + (self.out_features,)))

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scheme={self.scheme}")


class QuantEmbedding(Module):
    """Embedding rows read from a QuantLinear's packed weight (a tied embedding and head)."""

    def __init__(self, linear: QuantLinear):
        super().__init__()
        # not a submodule: the codes belong to (and are saved once with) the linear layer
        object.__setattr__(self, "linear", linear)
        self.num_embeddings, self.embedding_dim = linear.out_features, linear.in_features

    @property
    def weight(self) -> QuantizedTensor:
        return self.linear.weight

    def forward(self, ids):
        ids = ids.data if isinstance(ids, Tensor) else ids
        xp = backend.get_array_module(self.linear.weight.data)
        return Tensor(self.weight.dequantize_rows(xp.asarray(ids)))

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.linear.scheme}, tied"


def packed_bits(module) -> float:
    """Bits per weight of a QuantLinear (for reports)."""
    return module.weight.bits_per_weight


__all__ = ["QuantLinear", "QuantEmbedding", "QuantLinearFunction", "format_of"]
