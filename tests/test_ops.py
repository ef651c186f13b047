"""Every op: numerical gradient (float64), the same op on each backend, and PyTorch when installed.

One line per case: ``case(id, shapes, minigrad_fn, torch_fn, **options)``. A tuple in
``shapes`` is a random float64 input of that shape; an array is used as given (integer
targets and ids, boolean masks, tied values).
"""
import math

import numpy as np
import pytest

import minigrad as mg
from minigrad import functional as F
from helpers import helper_test_op

try:  # PyTorch is only a reference: the lambdas below look it up when they run
    import torch
    import torch.nn.functional as TF
except ImportError:  # pragma: no cover - depends on the environment
    torch = TF = None


def T(a):
    """A NumPy constant (index, mask) as a torch tensor."""
    return torch.from_numpy(np.asarray(a))


IDX = np.array([0, 2, 0, 2, 1])                      # repeated rows: backward must scatter-add
ROWS, COLS = np.array([0, 1, 1, 2]), np.array([2, 0, 2, 2])
MASK = np.array([[1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 0, 0]], dtype=bool)
TIE_A = np.array([1.0, 2.0, -3.0, 0.5, 4.0])
TIE_B = np.array([1.0, 0.0, -3.0, 2.0, 4.0])        # equal at 0, 2 and 4
MAX_TIES = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, -1.0, 2.0, 1.5], [0.5, 0.25, -1.0, 0.75]])
TARGETS = np.array([1, 0, 4, 2])
TARGETS_IGN = np.array([1, -100, 4, -100])
TARGETS_3D = np.array([[1, 0, 3], [2, 4, 4]])
IDS = np.array([[1, 3, 1], [0, 3, 3]])               # repeated ids
KV_MASK = np.tril(np.ones((2, 5), dtype=bool), 3)    # 2 new queries after 3 cached positions
PROD_ZEROS = np.array([[1.5, 0.0, 2.0, -1.0], [0.0, 0.0, 3.0, 1.0], [2.0, 1.0, 0.5, -2.0]])  # one and two zeros
GIDX = np.array([[0, 2, 2], [1, 0, 3], [3, 3, 3]])   # repeated picks: backward scatter-adds
CLAMP_EDGE = np.array([-1.0, -0.5, 0.0, 0.7, 1.0])   # values on the bounds keep their gradient
LSE_INF = np.array([[-np.inf, -np.inf, -np.inf], [1.0, np.inf, 0.0], [0.5, -np.inf, 2.0]])
POW_ZERO = np.array([0.0, 1.5, -2.0, 0.0])
DIV_TINY_A, DIV_TINY_B = np.array([1e-160, 2.0, -3e-150]), np.array([1e-170, 0.5, 4e-160])
NORM_ZERO = np.array([[0.0, 0.0, 0.0], [3.0, -4.0, 0.0]])

ADD, SUB, MUL, DIV, POW = (lambda a, b: a + b), (lambda a, b: a - b), (lambda a, b: a * b), \
    (lambda a, b: a / b), (lambda a, b: a ** b)
MATMUL = lambda a, b: a @ b  # noqa: E731


def case(name, shapes, mg_fn, torch_fn=None, **kw):
    return pytest.param(shapes, mg_fn, torch_fn, kw, id=name)


CASES = [
    # ---------------------------------------------------------------- elementwise binary
    case("add", [(3, 4), (3, 4)], ADD, ADD),
    case("add_bcast_row", [(3, 4), (4,)], ADD, ADD),
    case("add_bcast_left", [(4,), (3, 4)], ADD, ADD),
    case("add_bcast_both", [(3, 1), (1, 4)], ADD, ADD),
    case("add_size1", [(1, 1), (2, 1, 3)], ADD, ADD),
    case("add_0d", [(), (2, 3)], ADD, ADD),
    case("add_0d_0d", [(), ()], ADD, ADD),
    case("add_scalar", [(2, 3)], lambda a: 1.5 + a + 2, lambda a: 1.5 + a + 2),
    case("sub", [(3, 4), (3, 4)], SUB, SUB),
    case("sub_bcast_both", [(3, 1), (4,)], SUB, SUB),
    case("sub_0d", [(2, 3), ()], SUB, SUB),
    case("rsub_scalar", [(2, 3)], lambda a: 1.0 - a, lambda a: 1.0 - a),
    case("mul", [(3, 4), (3, 4)], MUL, MUL),
    case("mul_bcast_both", [(3, 1), (1, 4)], MUL, MUL),
    case("mul_0d", [(), (2, 3)], MUL, MUL),
    case("mul_self", [(2, 3)], lambda a: a * a, lambda a: a * a),
    case("div", [(3, 4), (3, 4)], DIV, DIV, low=0.5),
    case("div_bcast_both", [(3, 1), (1, 4)], DIV, DIV, low=0.5),
    case("div_0d", [(2, 3), ()], DIV, DIV, low=0.5),
    case("rdiv_scalar", [(2, 3)], lambda a: 1.0 / a, lambda a: 1.0 / a, low=0.5),
    case("div_scalar", [(2, 3)], lambda a: a / 4.0, lambda a: a / 4.0),
    case("neg", [(2, 3)], lambda a: -a, lambda a: -a),
    case("neg_fn_0d", [()], mg.neg, torch.neg if torch else None),
    case("pow_int", [(2, 3)], lambda a: a ** 2, lambda a: a ** 2),
    case("pow_float", [(2, 3)], lambda a: a ** 3.0, lambda a: a ** 3.0),
    case("pow_sqrt", [(2, 3)], lambda a: a ** 0.5, lambda a: a ** 0.5, low=0.5),
    case("pow_negative_exp", [(2, 3)], lambda a: a ** -1.5, lambda a: a ** -1.5, low=0.5),
    case("pow_tensor", [(2, 3), (2, 3)], POW, POW, low=0.5),
    case("pow_tensor_bcast", [(3, 1), (4,)], POW, POW, low=0.5),
    case("pow_tensor_0d", [(), (3,)], POW, POW, low=0.5),
    case("rpow_scalar", [(2, 3)], lambda a: 2.0 ** a, lambda a: 2.0 ** a),
    case("maximum", [(3, 4), (3, 4)], mg.maximum, torch.maximum if torch else None),
    case("maximum_bcast", [(3, 4), (4,)], mg.maximum, torch.maximum if torch else None),
    case("maximum_ties", [TIE_A, TIE_B], mg.maximum, torch.maximum if torch else None),
    case("minimum", [(3, 4), (1, 4)], mg.minimum, torch.minimum if torch else None),
    case("minimum_ties", [TIE_A, TIE_B], mg.minimum, torch.minimum if torch else None),
    # ---------------------------------------------------------------- elementwise unary
    case("exp", [(2, 3)], lambda a: a.exp(), lambda a: a.exp()),
    case("exp_0d", [()], mg.exp, torch.exp if torch else None),
    case("log", [(2, 3)], lambda a: a.log(), lambda a: a.log(), low=0.1),
    case("sqrt", [(2, 3)], lambda a: a.sqrt(), lambda a: a.sqrt(), low=0.1),
    case("tanh", [(2, 3)], lambda a: a.tanh(), lambda a: a.tanh()),
    case("relu", [(3, 4)], lambda a: a.relu(), lambda a: a.relu()),
    case("abs", [(3, 4)], lambda a: a.abs(), lambda a: a.abs()),
    case("abs_op_0d", [()], abs, abs),
    # ---------------------------------------------------------------- matmul and linear
    case("matmul_2d", [(2, 3), (3, 4)], MATMUL, MATMUL),
    case("matmul_batched", [(2, 2, 3), (2, 3, 4)], MATMUL, MATMUL),
    case("matmul_bcast_batch", [(2, 1, 2, 3), (3, 3, 2)], MATMUL, MATMUL),
    case("matmul_1d_2d", [(3,), (3, 4)], MATMUL, MATMUL),
    case("matmul_2d_1d", [(2, 3), (3,)], MATMUL, MATMUL),
    case("matmul_1d_1d", [(3,), (3,)], MATMUL, MATMUL),
    case("matmul_3d_1d", [(2, 2, 3), (3,)], MATMUL, MATMUL),
    case("matmul_1d_3d", [(3,), (2, 3, 2)], MATMUL, MATMUL),
    case("matmul_btc_cd", [(2, 3, 4), (4, 2)], MATMUL, MATMUL),
    case("matmul_fn", [(2, 3), (3, 2)], mg.matmul, torch.matmul if torch else None),
    case("linear_bias", [(2, 3), (4, 3), (4,)], mg.linear, TF.linear if TF else None),
    case("linear_nobias", [(2, 3), (4, 3)], mg.linear, TF.linear if TF else None),
    case("linear_3d", [(2, 2, 3), (4, 3), (4,)], mg.linear, TF.linear if TF else None),
    case("linear_1d", [(3,), (2, 3), (2,)], mg.linear, TF.linear if TF else None),
    # ---------------------------------------------------------------- reductions
    case("sum_all", [(2, 3, 4)], lambda x: x.sum(), lambda x: x.sum()),
    case("sum_axis", [(2, 3, 4)], lambda x: x.sum(axis=1), lambda x: x.sum(dim=1)),
    case("sum_neg_keep", [(2, 3, 4)], lambda x: x.sum(axis=-1, keepdims=True), lambda x: x.sum(dim=-1, keepdim=True)),
    case("sum_tuple", [(2, 3, 4)], lambda x: x.sum(axis=(0, -1)), lambda x: x.sum(dim=(0, -1))),
    case("sum_tuple_keep", [(2, 3, 4)], lambda x: x.sum(axis=(0, 2), keepdims=True), lambda x: x.sum(dim=(0, 2), keepdim=True)),
    case("sum_all_keep", [(2, 3)], lambda x: x.sum(keepdims=True), lambda x: x.sum(dim=(0, 1), keepdim=True)),
    case("sum_size1", [(3, 1)], lambda x: x.sum(axis=1), lambda x: x.sum(dim=1)),
    case("sum_0d", [()], lambda x: x.sum(), lambda x: x.sum()),
    case("mean_all", [(2, 3, 4)], lambda x: x.mean(), lambda x: x.mean()),
    case("mean_axis", [(2, 3, 4)], lambda x: x.mean(axis=0), lambda x: x.mean(dim=0)),
    case("mean_neg_keep", [(2, 3, 4)], lambda x: x.mean(axis=-2, keepdims=True), lambda x: x.mean(dim=-2, keepdim=True)),
    case("mean_tuple", [(2, 3, 4)], lambda x: x.mean(axis=(1, 2)), lambda x: x.mean(dim=(1, 2))),
    case("max_all", [(2, 3, 4)], lambda x: x.max(), lambda x: x.amax()),
    case("max_axis", [(2, 3, 4)], lambda x: x.max(axis=1), lambda x: x.amax(dim=1)),
    case("max_neg_keep", [(2, 3, 4)], lambda x: x.max(axis=-1, keepdims=True), lambda x: x.amax(dim=-1, keepdim=True)),
    case("max_tuple", [(2, 3, 4)], lambda x: x.max(axis=(0, 2)), lambda x: x.amax(dim=(0, 2))),
    case("max_ties_axis", [MAX_TIES], lambda x: x.max(axis=1), lambda x: x.amax(dim=1)),
    case("max_ties_all", [MAX_TIES], lambda x: x.max(), lambda x: x.amax()),
    case("max_0d", [()], lambda x: x.max(), lambda x: x.amax()),
    case("min_all", [(2, 3, 4)], lambda x: x.min(), lambda x: x.amin()),
    case("min_axis_keep", [(2, 3, 4)], lambda x: x.min(axis=0, keepdims=True), lambda x: x.amin(dim=0, keepdim=True)),
    case("min_ties", [-MAX_TIES], lambda x: mg.min(x, axis=-1), lambda x: x.amin(dim=-1)),
    case("var_all", [(2, 3, 4)], lambda x: x.var(), lambda x: x.var(correction=0)),
    case("var_axis", [(2, 3, 4)], lambda x: x.var(axis=1), lambda x: x.var(dim=1, correction=0)),
    case("var_neg_keep", [(2, 3, 4)], lambda x: x.var(axis=-1, keepdims=True), lambda x: x.var(dim=-1, correction=0, keepdim=True)),
    case("var_tuple", [(2, 3, 4)], lambda x: x.var(axis=(0, 2)), lambda x: x.var(dim=(0, 2), correction=0)),
    case("var_ddof1", [(2, 3, 4)], lambda x: mg.var(x, axis=1, ddof=1), lambda x: x.var(dim=1, correction=1)),
    # ---------------------------------------------------------------- shapes
    case("reshape", [(2, 3, 4)], lambda x: x.reshape(6, 4), lambda x: x.reshape(6, 4)),
    case("reshape_tuple_neg1", [(2, 3, 4)], lambda x: x.reshape((4, -1)), lambda x: x.reshape((4, -1))),
    case("reshape_0d_to_1", [()], lambda x: x.reshape(1), lambda x: x.reshape(1)),
    case("reshape_1_to_0d", [(1,)], lambda x: x.reshape(()), lambda x: x.reshape(())),
    case("transpose_T", [(2, 3)], lambda x: x.T, lambda x: x.T),
    case("transpose_axes", [(2, 3, 4)], lambda x: x.transpose(1, 0, 2), lambda x: x.permute(1, 0, 2)),
    case("transpose_neg_axes", [(2, 3, 4)], lambda x: x.transpose((-1, 0, 1)), lambda x: x.permute(-1, 0, 1)),
    case("transpose_reverse", [(2, 3, 4)], lambda x: mg.transpose(x), lambda x: x.permute(2, 1, 0)),
    case("permute", [(2, 3, 4)], lambda x: x.permute(2, 0, 1), lambda x: x.permute(2, 0, 1)),
    case("swapaxes_neg", [(2, 3, 4)], lambda x: x.swapaxes(0, -1), lambda x: x.swapaxes(0, -1)),
    case("broadcast_to", [(3, 1)], lambda x: mg.broadcast_to(x, (2, 3, 4)), lambda x: x.broadcast_to((2, 3, 4))),
    case("broadcast_to_0d", [()], lambda x: x.broadcast_to((2, 3)), lambda x: x.broadcast_to((2, 3))),
    case("expand_squeeze", [(2, 3)], lambda x: x.expand_dims(-1).squeeze(), lambda x: x.unsqueeze(-1).squeeze()),
    case("flatten", [(2, 3, 2)], lambda x: x.flatten(1), lambda x: x.flatten(1)),
    # ---------------------------------------------------------------- indexing
    case("getitem_int", [(3, 4)], lambda x: x[1], lambda x: x[1]),
    case("getitem_neg_int", [(3, 4)], lambda x: x[-1, -2], lambda x: x[-1, -2]),
    case("getitem_slice", [(5, 4)], lambda x: x[1:4, :2], lambda x: x[1:4, :2]),
    case("getitem_neg_step", [(5, 4)], lambda x: x[::-1], lambda x: x.flip(0)),
    case("getitem_neg_step2", [(5, 4)], lambda x: x[::-2, 1], lambda x: x.flip(0)[::2, 1]),
    case("getitem_none", [(3, 4)], lambda x: x[None, :, None], lambda x: x[None, :, None]),
    case("getitem_ellipsis", [(2, 3, 4)], lambda x: x[..., 1], lambda x: x[..., 1]),
    case("getitem_array_repeats", [(3, 4)], lambda x: x[IDX], lambda x: x[T(IDX)]),
    case("getitem_array_list", [(3, 4)], lambda x: x[[2, 2, 0]], lambda x: x[[2, 2, 0]]),
    case("getitem_array_slice", [(3, 4)], lambda x: x[IDX, 1:3], lambda x: x[T(IDX), 1:3]),
    case("getitem_bool_mask", [(3, 4)], lambda x: x[MASK], lambda x: x[T(MASK)]),
    case("getitem_row_mask", [(3, 4)], lambda x: x[MASK[:, 0]], lambda x: x[T(MASK[:, 0])]),
    case("getitem_tuple_arrays", [(3, 4)], lambda x: x[ROWS, COLS], lambda x: x[T(ROWS), T(COLS)]),
    case("getitem_0d_result", [(3, 4)], lambda x: x[2, 3], lambda x: x[2, 3]),
    case("getitem_tensor_index", [(3, 4)], lambda x: x[mg.tensor(IDX)], lambda x: x[T(IDX)]),
    case("concatenate", [(2, 3), (1, 3)], lambda a, b: mg.concatenate([a, b]), lambda a, b: torch.cat([a, b])),
    case("concatenate_neg_axis", [(2, 3), (2, 1), (2, 2)], lambda *xs: mg.cat(xs, axis=-1), lambda *xs: torch.cat(xs, dim=-1)),
    case("stack", [(2, 3), (2, 3)], lambda a, b: mg.stack([a, b]), lambda a, b: torch.stack([a, b])),
    case("stack_neg_axis", [(2, 3), (2, 3), (2, 3)], lambda *xs: mg.stack(xs, axis=-1), lambda *xs: torch.stack(xs, dim=-1)),
    case("stack_0d", [(), ()], lambda *xs: mg.stack(xs), lambda *xs: torch.stack(xs)),
    case("split_sections", [(2, 6)], lambda x: mg.split(x, 3, axis=1), lambda x: torch.tensor_split(x, 3, dim=1)),
    case("split_indices", [(2, 6)], lambda x: mg.split(x, [1, 4], axis=-1), lambda x: torch.tensor_split(x, [1, 4], dim=-1)),
    case("split_one_used", [(6, 2)], lambda x: mg.split(x, 3)[1] * 2.0, lambda x: torch.tensor_split(x, 3)[1] * 2.0),
    case("split_two_used", [(2, 6)], lambda x: (lambda p: p[0] * p[2])(mg.split(x, 3, axis=1)),
         lambda x: (lambda p: p[0] * p[2])(torch.tensor_split(x, 3, dim=1))),
    # ---------------------------------------------------------------- selection and masks
    case("where", [(3, 4), (3, 4)], lambda a, b: mg.where(MASK, a, b), lambda a, b: torch.where(T(MASK), a, b)),
    case("where_bcast", [(3, 1), (4,)], lambda a, b: mg.where(MASK, a, b), lambda a, b: torch.where(T(MASK), a, b)),
    case("where_scalar", [(3, 4)], lambda a: mg.where(MASK, a, 0.5), lambda a: torch.where(T(MASK), a, 0.5)),
    case("masked_fill", [(3, 4)], lambda x: F.masked_fill(x, MASK, -1.5), lambda x: x.masked_fill(T(MASK), -1.5)),
    case("masked_fill_bcast", [(2, 3, 4)], lambda x: F.masked_fill(x, MASK, 0.0), lambda x: x.masked_fill(T(MASK), 0.0)),
    case("tril", [(3, 4)], F.tril, torch.tril if torch else None),
    case("tril_batched_k1", [(2, 3, 3)], lambda x: F.tril(x, 1), lambda x: torch.tril(x, 1)),
    case("tril_kneg", [(4, 3)], lambda x: F.tril(x, -1), lambda x: torch.tril(x, -1)),
    # ---------------------------------------------------------------- softmax family
    case("softmax", [(3, 5)], F.softmax, lambda x: torch.softmax(x, dim=-1)),
    case("softmax_axis0", [(3, 5)], lambda x: F.softmax(x, axis=0), lambda x: torch.softmax(x, dim=0)),
    case("softmax_size1", [(3, 1)], F.softmax, lambda x: torch.softmax(x, dim=-1)),
    case("softmax_0d", [()], F.softmax, lambda x: torch.softmax(x, dim=-1)),
    case("softmax_large", [(3, 5)], lambda x: F.softmax(x * 1000.0), lambda x: torch.softmax(x * 1000.0, dim=-1)),
    case("log_softmax", [(3, 5)], F.log_softmax, lambda x: torch.log_softmax(x, dim=-1)),
    case("log_softmax_axis0", [(3, 5)], lambda x: F.log_softmax(x, axis=0), lambda x: torch.log_softmax(x, dim=0)),
    case("log_softmax_large", [(3, 5)], lambda x: F.log_softmax(x * 1000.0), lambda x: torch.log_softmax(x * 1000.0, dim=-1)),
    case("logsumexp", [(3, 5)], F.logsumexp, lambda x: torch.logsumexp(x, dim=-1)),
    case("logsumexp_keep", [(3, 5)], lambda x: F.logsumexp(x, axis=0, keepdims=True), lambda x: torch.logsumexp(x, dim=0, keepdim=True)),
    case("logsumexp_all", [(3, 5)], lambda x: F.logsumexp(x, axis=None), lambda x: torch.logsumexp(x, dim=(0, 1))),
    case("logsumexp_tuple", [(2, 3, 2)], lambda x: F.logsumexp(x, axis=(0, 2)), lambda x: torch.logsumexp(x, dim=(0, 2))),
    case("logsumexp_large", [(3, 5)], lambda x: F.logsumexp(x * 1000.0), lambda x: torch.logsumexp(x * 1000.0, dim=-1)),
    case("cross_entropy", [(4, 5), TARGETS], F.cross_entropy, TF.cross_entropy if TF else None),
    case("cross_entropy_ignore", [(4, 5), TARGETS_IGN], F.cross_entropy, TF.cross_entropy if TF else None),
    case("cross_entropy_1d", [(5,), np.array(3)], F.cross_entropy, TF.cross_entropy if TF else None),
    case("cross_entropy_no_ignore", [(4, 5), TARGETS], lambda x, t: F.cross_entropy(x, t, ignore_index=None),
         TF.cross_entropy if TF else None),
    case("cross_entropy_sum", [(4, 5), TARGETS], lambda x, t: F.cross_entropy(x, t, reduction="sum"),
         lambda x, t: TF.cross_entropy(x, t, reduction="sum")),
    case("cross_entropy_none", [(4, 5), TARGETS_IGN], lambda x, t: F.cross_entropy(x, t, reduction="none"),
         lambda x, t: TF.cross_entropy(x, t, reduction="none")),
    case("cross_entropy_3d", [(2, 3, 5), TARGETS_3D], F.cross_entropy, lambda x, t: TF.cross_entropy(x.permute(0, 2, 1), t)),
    case("cross_entropy_3d_none", [(2, 3, 5), TARGETS_3D], lambda x, t: F.cross_entropy(x, t, reduction="none"),
         lambda x, t: TF.cross_entropy(x.permute(0, 2, 1), t, reduction="none")),
    case("cross_entropy_large", [(4, 5), TARGETS], lambda x, t: F.cross_entropy(x * 1000.0, t),
         lambda x, t: TF.cross_entropy(x * 1000.0, t)),
    # ---------------------------------------------------------------- the Tensor API of PyTorch users
    case("sin", [(3, 4)], lambda x: x.sin(), lambda x: x.sin(), low=-4.0, high=4.0),
    case("cos", [(3, 4)], lambda x: x.cos(), lambda x: x.cos(), low=-4.0, high=4.0),
    case("log1p", [(3, 4)], lambda x: x.log1p(), lambda x: x.log1p(), low=-0.9),
    case("log1p_tiny", [(3,)], lambda x: (x * 1e-9).log1p(), lambda x: (x * 1e-9).log1p()),
    case("expm1", [(3, 4)], lambda x: x.expm1(), lambda x: x.expm1()),
    case("sign", [(3, 4)], lambda x: x.sign() * x, lambda x: x.sign() * x),
    case("square", [(3, 4)], lambda x: x.square(), lambda x: x.square()),
    case("clamp", [(3, 4)], lambda x: x.clamp(-0.5, 0.7), lambda x: x.clamp(-0.5, 0.7)),
    case("clamp_min_only", [(3, 4)], lambda x: mg.clamp(x, min=0.1), lambda x: torch.clamp(x, min=0.1)),
    case("clamp_bounds", [CLAMP_EDGE], lambda x: x.clamp(-0.5, 0.7), lambda x: x.clamp(-0.5, 0.7), numerical=False),
    case("clip_numpy_order", [(3, 4)], lambda x: x.clip(-1.0, 1.0), lambda x: x.clip(-1.0, 1.0)),
    case("std_all", [(2, 3, 4)], lambda x: x.std(), lambda x: x.std(correction=0)),
    case("std_axis_ddof1", [(2, 3, 4)], lambda x: x.std(axis=1, ddof=1), lambda x: x.std(dim=1, correction=1)),
    case("std_keep", [(2, 3, 4)], lambda x: x.std(axis=-1, keepdims=True), lambda x: x.std(dim=-1, correction=0, keepdim=True)),
    case("prod_all", [(2, 3)], lambda x: x.prod(), lambda x: x.prod()),
    case("prod_axis", [(2, 3, 4)], lambda x: x.prod(axis=1), lambda x: x.prod(dim=1)),
    case("prod_keep_neg", [(2, 3, 4)], lambda x: x.prod(axis=-1, keepdims=True), lambda x: x.prod(dim=-1, keepdim=True)),
    case("prod_tuple", [(2, 3, 4)], lambda x: x.prod(axis=(0, 2)), lambda x: x.prod(dim=2).prod(dim=0)),
    case("prod_zeros", [PROD_ZEROS], lambda x: x.prod(axis=1), lambda x: x.prod(dim=1)),
    case("prod_zeros_all", [PROD_ZEROS[:1]], lambda x: x.prod(), lambda x: x.prod()),
    case("prod_0d", [()], lambda x: x.prod(), lambda x: x.prod()),
    case("cumsum", [(3, 4)], lambda x: x.cumsum(axis=1), lambda x: x.cumsum(dim=1)),
    case("cumsum_axis0", [(3, 4, 2)], lambda x: x.cumsum(0), lambda x: x.cumsum(0)),
    case("cumsum_flat", [(3, 4)], lambda x: x.cumsum(), lambda x: x.flatten().cumsum(0)),
    case("unsqueeze", [(3, 4)], lambda x: x.unsqueeze(1) * 2.0, lambda x: x.unsqueeze(1) * 2.0),
    case("unsqueeze_neg", [(3,)], lambda x: mg.unsqueeze(x, -1), lambda x: torch.unsqueeze(x, -1)),
    case("norm", [(3, 4)], lambda x: x.norm(), lambda x: torch.linalg.vector_norm(x)),
    case("norm_axis_keep", [(3, 4)], lambda x: x.norm(axis=1, keepdims=True), lambda x: torch.linalg.vector_norm(x, dim=1, keepdim=True)),
    case("norm_p1", [(3, 4)], lambda x: x.norm(p=1, axis=0), lambda x: torch.linalg.vector_norm(x, ord=1, dim=0)),
    case("norm_inf", [(3, 4)], lambda x: x.norm(p=math.inf, axis=1), lambda x: torch.linalg.vector_norm(x, ord=math.inf, dim=1)),
    case("norm_p3", [(3, 4)], lambda x: x.norm(p=3), lambda x: torch.linalg.vector_norm(x, ord=3)),
    case("norm_zero_row", [NORM_ZERO], lambda x: x.norm(axis=1), lambda x: torch.linalg.vector_norm(x, dim=1), numerical=False),
    case("topk", [(3, 5)], lambda x: x.topk(2)[0], lambda x: x.topk(2).values),
    case("topk_axis0_smallest", [(4, 3)], lambda x: x.topk(3, axis=0, largest=False)[0], lambda x: x.topk(3, dim=0, largest=False).values),
    case("sort", [(3, 5)], lambda x: x.sort()[0], lambda x: x.sort().values),
    case("sort_desc_axis0", [(4, 3)], lambda x: x.sort(axis=0, descending=True)[0], lambda x: x.sort(dim=0, descending=True).values),
    case("clone", [(3, 4)], lambda x: x.clone() * x, lambda x: x.clone() * x),
    case("flip", [(3, 4)], lambda x: x.flip(0), lambda x: x.flip(0)),
    case("flip_two_axes", [(2, 3, 4)], lambda x: x.flip((0, -1)), lambda x: x.flip((0, -1))),
    case("gather", [(3, 4)], lambda x: x.gather(1, GIDX), lambda x: x.gather(1, T(GIDX))),
    case("gather_axis0", [(4, 3)], lambda x: mg.gather(x, 0, GIDX), lambda x: torch.gather(x, 0, T(GIDX))),
    case("gather_smaller_index", [(4, 5)], lambda x: x.gather(1, GIDX[:2, :2]), lambda x: x.gather(1, T(GIDX[:2, :2]))),
    case("cross_entropy_label_smoothing", [(4, 5), TARGETS], lambda x, t: F.cross_entropy(x, t, label_smoothing=0.1),
         lambda x, t: TF.cross_entropy(x, t, label_smoothing=0.1)),
    case("cross_entropy_smoothing_ignore", [(4, 5), TARGETS_IGN], lambda x, t: F.cross_entropy(x, t, label_smoothing=0.3),
         lambda x, t: TF.cross_entropy(x, t, label_smoothing=0.3)),
    case("cross_entropy_smoothing_none", [(2, 3, 5), TARGETS_3D], lambda x, t: F.cross_entropy(x, t, reduction="none", label_smoothing=0.2),
         lambda x, t: TF.cross_entropy(x.permute(0, 2, 1), t, reduction="none", label_smoothing=0.2)),
    # ---------------------------------------------------------------- numerical edges (PyTorch's answers)
    case("pow_zero_exponent_at_zero", [POW_ZERO], lambda x: x ** 0, lambda x: x ** 0),
    case("pow_zero_float_exponent_at_zero", [POW_ZERO], lambda x: x ** 0.0, lambda x: x ** 0.0),
    case("div_tiny_denominator", [DIV_TINY_A, DIV_TINY_B], DIV, DIV, numerical=False, rtol=1e-12, atol=0),
    case("logsumexp_nonfinite_rows", [LSE_INF], F.logsumexp, lambda x: torch.logsumexp(x, dim=-1), numerical=False, finite=False),
    # ---------------------------------------------------------------- activations, norms, layers
    case("gelu_tanh", [(3, 4)], F.gelu, lambda x: TF.gelu(x, approximate="tanh"), low=-4.0, high=4.0),
    case("gelu_exact", [(3, 4)], lambda x: F.gelu(x, approximate="none"), lambda x: TF.gelu(x, approximate="none"), low=-4.0, high=4.0),
    case("sigmoid", [(3, 4)], F.sigmoid, torch.sigmoid if torch else None, low=-6.0, high=6.0),
    case("sigmoid_large", [(3, 4)], lambda x: F.sigmoid(x * 400.0), lambda x: torch.sigmoid(x * 400.0)),
    case("layer_norm", [(2, 3, 4), (4,), (4,)], F.layer_norm, lambda x, w, b: TF.layer_norm(x, (4,), w, b)),
    case("layer_norm_plain", [(3, 4)], F.layer_norm, lambda x: TF.layer_norm(x, (4,))),
    case("layer_norm_weight_only", [(3, 4), (4,)], F.layer_norm, lambda x, w: TF.layer_norm(x, (4,), w)),
    case("dropout_p0", [(3, 4)], lambda x: F.dropout(x, 0.0), lambda x: TF.dropout(x, 0.0)),
    case("dropout_eval", [(3, 4)], lambda x: F.dropout(x, 0.5, training=False), lambda x: TF.dropout(x, 0.5, training=False)),
    case("embedding", [IDS, (5, 3)], F.embedding, TF.embedding if TF else None),
    case("embedding_1d", [np.array([4, 4, 0]), (5, 2)], F.embedding, TF.embedding if TF else None),
    case("sdpa_causal", [(1, 2, 3, 4)] * 3, F.scaled_dot_product_attention,
         lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, is_causal=True)),
    case("sdpa_full", [(2, 3, 4)] * 3, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=False),
         lambda q, k, v: TF.scaled_dot_product_attention(q, k, v)),
    case("sdpa_kv_cache", [(1, 2, 2, 4), (1, 2, 5, 4), (1, 2, 5, 4)], F.scaled_dot_product_attention,
         lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, attn_mask=T(KV_MASK))),
    case("sdpa_single_query", [(1, 4), (3, 4), (3, 4)], F.scaled_dot_product_attention,
         lambda q, k, v: TF.scaled_dot_product_attention(q, k, v)),
    case("mse_loss", [(3, 4), (3, 4)], F.mse_loss, TF.mse_loss if TF else None),
    case("mse_loss_0d", [(), ()], F.mse_loss, TF.mse_loss if TF else None),
]


@pytest.mark.parametrize("shapes, mg_fn, torch_fn, kw", CASES)
def test_op(shapes, mg_fn, torch_fn, kw, backend):
    """Numerical gradient, with the op run on ``backend``; forward and gradients match the CPU."""
    helper_test_op(shapes, mg_fn, device=backend, **kw)


@pytest.mark.parametrize("shapes, mg_fn, torch_fn, kw", CASES)
def test_op_vs_torch(shapes, mg_fn, torch_fn, kw):
    """Forward and gradients equal PyTorch's on the same float64 inputs."""
    pytest.importorskip("torch")
    helper_test_op(shapes, mg_fn, torch_fn, **{**kw, "numerical": False})


# ---------------------------------------------------------------------------- dropout (random)
def test_dropout_training_mask_scaling_and_gradient(backend):
    p, n = 0.3, 20_000
    x = mg.Tensor(np.random.default_rng(0).uniform(1.0, 2.0, n), requires_grad=True, device=backend)
    y = F.dropout(x, p)
    y.sum().backward()
    xs, ys, g = x.numpy(), y.numpy(), x.grad.numpy()
    kept = ys != 0
    assert abs(kept.mean() - (1 - p)) < 0.02, f"kept fraction {kept.mean():.3f}, expected {1 - p}"
    np.testing.assert_allclose(ys[kept], xs[kept] / (1 - p), rtol=1e-6)      # inverted-dropout scale
    np.testing.assert_allclose(g, kept / (1 - p), rtol=1e-6)                  # same mask in backward


def test_dropout_identity_when_off(backend):
    x = mg.randn(4, 5, device=backend)
    np.testing.assert_array_equal(F.dropout(x, 0.0).numpy(), x.numpy())
    np.testing.assert_array_equal(F.dropout(x, 0.5, training=False).numpy(), x.numpy())
    np.testing.assert_array_equal(F.dropout(x, 1.0, training=False).numpy(), x.numpy())
    assert not F.dropout(x, 1.0).numpy().any()


def test_dropout_bad_p():
    with pytest.raises(ValueError, match="dropout"):
        F.dropout(mg.ones(3), 1.5)


# ---------------------------------------------------------------------------- dtype of results
def test_float32_stays_float32(backend):
    x = mg.randn(3, 4, requires_grad=True, device=backend)
    w = mg.randn(5, 4, requires_grad=True, device=backend)
    outs = [x * 2.0, 2 ** x, x / 3, F.gelu(x), F.gelu(x, approximate="none"), F.softmax(x), F.layer_norm(x),
            mg.linear(x, w), x.var(axis=0),
            F.cross_entropy(x, np.array([0, 1, 2])), F.dropout(x, 0.5),
            x.sin(), x.cos(), x.abs().log1p().clamp(-1.0, 1.0), x.expm1(), x.sign(), x.square(), x.std(axis=1),
            x.prod(axis=0), x.cumsum(1), x.norm(), x.topk(2)[0], x.sort()[0], x.clone(), x.flip(0),
            x.gather(1, np.array([[0], [1], [2]])), x.unsqueeze(0), x ** 0,
            F.cross_entropy(x, np.array([0, 1, 2]), label_smoothing=0.1), F.logsumexp(x)]
    for o in outs:
        assert o.dtype == np.float32, o
    sum(o.sum() for o in outs).backward()
    assert x.grad.dtype == np.float32 and w.grad.dtype == np.float32


# ---------------------------------------------------------------------------- error messages
def test_add_shape_mismatch_names_op_and_shapes():
    with pytest.raises(ValueError, match=r"add.*\(2, 3\).*\(4,\)"):
        mg.ones(2, 3) + mg.ones(4)


def test_matmul_shape_mismatch_names_op_and_shapes():
    with pytest.raises(ValueError, match=r"matmul.*\(2, 3\).*\(4, 5\)"):
        mg.ones(2, 3) @ mg.ones(4, 5)


def test_linear_shape_mismatch_names_op_and_shapes():
    with pytest.raises(ValueError, match=r"linear.*\(2, 3\).*\(4, 5\)"):
        mg.linear(mg.ones(2, 3), mg.ones(4, 5))


def test_reshape_mismatch_names_op_and_shapes():
    with pytest.raises(ValueError, match=r"reshape.*\(2, 3\).*\(4,\)"):
        mg.ones(2, 3).reshape(4)


@pytest.mark.parametrize("op", [mg.add, mg.mul, mg.matmul, mg.maximum], ids=lambda f: f.__name__)
def test_float32_float64_mix_raises(op):
    a, b = mg.ones(2, 2), mg.ones(2, 2, dtype=np.float64)
    with pytest.raises(TypeError, match=r"float32.*float64"):
        op(a, b)
    with pytest.raises(TypeError, match=r"float64.*float32"):
        op(b, a)


@pytest.mark.parametrize("bad", [5, -1], ids=["too_big", "negative"])
def test_cross_entropy_target_out_of_range(bad):
    with pytest.raises(IndexError, match=r"cross_entropy.*5 classes"):
        F.cross_entropy(mg.randn(3, 5), np.array([0, bad, 1]))


def test_cross_entropy_wrong_target_shape():
    with pytest.raises(ValueError, match=r"cross_entropy.*\(2, 3, 5\).*\(2, 3\).*\(6,\)"):
        F.cross_entropy(mg.randn(2, 3, 5), np.zeros(6, dtype=np.int64))


def test_cross_entropy_float_targets():
    with pytest.raises(TypeError, match="cross_entropy"):
        F.cross_entropy(mg.randn(2, 5), np.array([0.0, 1.0]))


@pytest.mark.parametrize("ids", [[0, 5], [-1, 2]], ids=["too_big", "negative"])
def test_embedding_out_of_range(ids):
    with pytest.raises(IndexError, match=r"embedding.*\[0, 5\)"):
        F.embedding(np.array(ids), mg.randn(5, 3))


# ---------------------------------------------------------------------------- fused-path sanity
def test_sdpa_causal_equals_explicit_mask():
    rng = np.random.default_rng(0)
    q, k, v = (mg.Tensor(rng.standard_normal((2, 4, 3))) for _ in range(3))
    y = F.scaled_dot_product_attention(q, k, v, causal=True)
    att = (q @ k.swapaxes(-1, -2)) * (1 / math.sqrt(3))
    att = F.masked_fill(att, ~np.tril(np.ones((4, 4), dtype=bool)), -np.inf)
    np.testing.assert_allclose(y.numpy(), (F.softmax(att) @ v).numpy(), rtol=1e-6, atol=1e-7)
