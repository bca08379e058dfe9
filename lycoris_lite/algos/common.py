"""Maths shared by several algorithms: factorisations, the Cayley transform, Tucker rebuilds."""

from __future__ import annotations

import math

import torch


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dim = m * n`` with ``m <= n`` (LyCORIS's rule, used for LoKr).

    ``factor > 0`` that divides ``dim`` gives ``(factor, dim // factor)`` sorted; otherwise the most
    square split with ``m <= factor`` (``factor = -1``: most square). ``128 -> (8, 16)``,
    ``1024, 4 -> (4, 256)``.
    """
    if factor > 0 and dim % factor == 0:
        m, n = factor, dim // factor
        return (m, n) if m <= n else (n, m)
    if factor < 0:
        factor = dim
    m, n = 1, dim
    length = m + n
    while m < n:
        new_m = m + 1
        while dim % new_m != 0:
            new_m += 1
        new_n = dim // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
        length = m + n
    return (m, n) if m <= n else (n, m)


def skew(raw: torch.Tensor) -> torch.Tensor:
    """``Q = B - Bᵀ`` over the last two dims: a skew-symmetric matrix from an unconstrained one."""
    return raw - raw.transpose(-1, -2)


def clamp_norm(q: torch.Tensor, radius: float) -> torch.Tensor:
    """COFT: if ``‖Q‖_F > radius`` (all blocks together) rescale ``Q`` onto that sphere; 0 = off."""
    if radius <= 0:
        return q
    norm = torch.linalg.vector_norm(q)
    factor = torch.clamp(radius / (norm + 1e-8), max=1.0)
    return q * factor


def cayley(q: torch.Tensor, neumann_terms: int = 0) -> torch.Tensor:
    """Orthogonal ``(I - Q)(I + Q)⁻¹`` for skew-symmetric ``Q`` (batched over leading dims).

    ``neumann_terms = n > 0`` uses the truncated series ``I - 2Q + 2Q² - ... ± Q^{n-1}`` instead of
    the inverse (only approximately orthogonal; PEFT's Cayley-Neumann with the sign of ``Q`` flipped).
    The inverse is taken in at least float32; while training only the result is kept for backward
    (:class:`_Cayley`).
    """
    b = q.shape[-1]
    eye = torch.eye(b, dtype=q.dtype, device=q.device)
    if neumann_terms > 0:
        out = eye.expand_as(q).clone()
        power = eye.expand_as(q)
        for k in range(1, neumann_terms):
            power = power @ (-q)
            out = out + (power if k == neumann_terms - 1 else 2 * power)
        return out
    work = q if q.dtype in (torch.float32, torch.float64) else q.float()
    out = _Cayley.apply(work) if _training((work,)) else _cayley_solve(work)
    return out.to(q.dtype)


def _cayley_solve(q: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return torch.linalg.solve(eye + q, eye - q, left=False)  # X (I + Q) = I − Q


class _Cayley(torch.autograd.Function):
    """``R = (I − Q)(I + Q)⁻¹`` keeping only ``R`` for backward (autograd's solve also keeps ``I + Q``, its
    LU factors and pivots: twice the adapter's size more, in every layer until its backward).
    ``I + R = 2(I + Q)⁻¹`` for any ``Q``, so ``dR = −(I + R)·dQ·(I + R)/2`` and
    ``∂Q = −(I + R)ᵀ·∂R·(I + R)ᵀ/2``: two batched ``b × b`` products, no solve."""

    @staticmethod
    def forward(ctx, q):
        out = _cayley_solve(q)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        shifted = out.transpose(-1, -2) + torch.eye(out.shape[-1], dtype=out.dtype, device=out.device)
        return (shifted @ grad @ shifted).mul_(-0.5)


class _Recomputed(torch.autograd.Function):
    """``fn(*tensors)`` keeping only its inputs for backward, which re-runs ``fn`` to get the gradients."""

    @staticmethod
    def forward(ctx, fn, *tensors):
        ctx.fn = fn
        ctx.save_for_backward(*tensors)
        return fn(*tensors)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        needs = ctx.needs_input_grad[1:]
        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, needs)]
        with torch.enable_grad():
            out = ctx.fn(*inputs)
        wanted = [t for t in inputs if t.requires_grad]
        found = iter(torch.autograd.grad(out, wanted, grad))
        return (None, *(next(found) if t.requires_grad else None for t in inputs))


def _training(tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _nested_autograd_traced(route=None) -> bool:
    """Whether a backward written with nested ``torch.autograd.grad`` (:class:`_Recomputed`, and
    :func:`_route_backward` for a route without ``factors_vjp``) would run under ``torch.compile``, where
    dynamo breaks the graph on it. There the plain formula is traced instead and autograd (with the
    compiler's own choice of what to keep or recompute) differentiates it: same values and gradients."""
    return torch.compiler.is_compiling() and (route is None or not hasattr(route, "factors_vjp"))


def recompute_in_backward(fn, *tensors: torch.Tensor) -> torch.Tensor:
    """``fn(*tensors)``; while training, only ``tensors`` are kept for backward (not ``fn``'s
    intermediates), and backward runs ``fn`` once more (autograd of the same formula)."""
    if _training(tensors) and not _nested_autograd_traced():
        return _Recomputed.apply(fn, *tensors)
    return fn(*tensors)


def op_backward(spec, x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, need_x: bool = True,
                need_weight: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(∂x, ∂weight)`` of ``spec.op(x, weight)`` (no bias) for the upstream gradient ``grad``,
    allocating nothing but the results. Thin weights (few output rows) get ``∂weight = grad_flatᵀ·x_flat``,
    the GEMM orientation MKL runs fast for them."""
    if not spec.is_conv:
        grad_x = grad @ weight if need_x else None
        grad_w = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1]) if need_weight else None
        return grad_x, grad_w
    if spec.padding_mode == "zeros" and not isinstance(spec.padding, str):
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, spec.stride, spec.padding, spec.dilation, False, (0, 0), 1,
            (need_x, need_weight, False))
        return grad_x, grad_w
    with torch.enable_grad():  # padding modes and string paddings: autograd of the op itself
        xi, wi = x.detach().requires_grad_(need_x), weight.detach().requires_grad_(need_weight)
        found = iter(torch.autograd.grad(spec.op(xi, wi), [t for t in (xi, wi) if t.requires_grad], grad))
    return (next(found) if need_x else None), (next(found) if need_weight else None)


def channel_mix_backward(spec, h: torch.Tensor, mix: torch.Tensor, grad: torch.Tensor,
                         need_h: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(∂h, ∂mix)`` of ``spec.pointwise(h, mix)`` (``mix``: ``(out, p)``), without copying ``h`` or
    ``grad`` into another layout."""
    if spec.is_conv:
        n, out = grad.shape[:2]
        g = grad.reshape(n, out, -1)
        grad_mix = torch.bmm(h.reshape(n, h.shape[1], -1), g.transpose(1, 2)).sum(0).T
    else:
        grad_mix = (h.reshape(-1, h.shape[-1]).T @ grad.reshape(-1, grad.shape[-1])).T
    grad_h = spec.pointwise(grad, mix.T) if need_h else None
    return grad_h, grad_mix


class _FactoredRoute(torch.autograd.Function):
    """An activation route ``route.forward(x, *route.factors(*tensors))`` that keeps only ``x`` and the
    (small) ``tensors`` for backward; ``route.backward`` recomputes what it needs from them."""

    @staticmethod
    def forward(ctx, route, x, *tensors):
        ctx.route = route
        ctx.save_for_backward(x, *tensors)
        return route.forward(x, *route.factors(*tensors))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, *tensors = ctx.saved_tensors
        # in the adapter's dtype: under autocast the forward ran in half precision, the backward runs without
        # autocast (autograd casts ∂x back to x's dtype)
        dtype = tensors[0].dtype
        grad_x, grads = _route_backward(ctx.route, x.to(dtype), tensors, grad.to(dtype).contiguous(),
                                        ctx.needs_input_grad[1], ctx.needs_input_grad[2:])
        return (None, grad_x, *grads)


def _route_backward(route, x, tensors, grad, need_x, needs):
    """``(∂x, [∂tensor or None])`` of ``route.forward(x, *route.factors(*tensors))`` for the upstream
    ``grad``: ``route.backward`` gives the factors' gradients, then ``route.factors_vjp`` (written out)
    or autograd of ``route.factors`` takes them to the tensors."""
    if hasattr(route, "factors_vjp"):  # the factors' own backward, written out (no nested autograd)
        grad_x, grad_factors = route.backward(x, route.factors(*tensors), grad, need_x)
        return grad_x, [g if need else None for g, need in zip(route.factors_vjp(tensors, grad_factors), needs)]
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(need) for t, need in zip(tensors, needs)]
        factors = route.factors(*inputs)
    grad_x, grad_factors = route.backward(x, [f.detach() for f in factors], grad, need_x)
    wanted = [t for t in inputs if t.requires_grad]
    pairs = [(f, g) for f, g in zip(factors, grad_factors) if f.requires_grad]
    found = iter(torch.autograd.grad([f for f, _ in pairs], wanted, [g for _, g in pairs]) if wanted else ())
    return grad_x, [next(found) if t.requires_grad else None for t in inputs]


class LowRankRoute:
    """``Δy = spec.pointwise(spec.op(x, down), up)`` with ``(down, up) = factors(*tensors)``: ``down`` a
    ``(p, in[, kh, kw])`` weight run with the layer's op, ``up`` an ``(out, p)`` channel mix. Backward
    recomputes ``h = op(x, down)`` (``T × p``) instead of keeping it. Subclasses may add
    ``factors_vjp(tensors, (∂down, ∂up)) -> ∂tensors`` (otherwise autograd differentiates ``factors``)."""

    def __init__(self, spec, factors=None):
        self.spec = spec
        if factors is not None:
            self.factors = factors

    def forward(self, x, down, up):
        return self.spec.pointwise(self.spec.op(x, down), up)

    def backward(self, x, factors, grad, need_x):
        down, up = factors
        h = self.spec.op(x, down)
        grad_h, grad_up = channel_mix_backward(self.spec, h, up, grad)
        del h
        grad_x, grad_down = op_backward(self.spec, x, down, grad_h, need_x)
        return grad_x, (grad_down, grad_up)


def factored_route(route, x: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
    """Run an activation route given as an object with ``factors(*tensors) -> factors`` (the small
    matrices built from the adapter's tensors: the formula), ``forward(x, *factors) -> Δy``,
    ``backward(x, factors, ∂Δy, need_x) -> (∂x, ∂factors)`` and optionally ``factors_vjp``. While
    training only ``x`` and ``tensors`` are kept; the activation-sized intermediates are recomputed in
    ``backward``."""
    if _training((x, *tensors)) and not _nested_autograd_traced(route):
        return _FactoredRoute.apply(route, x, *tensors)
    return route.forward(x, *route.factors(*tensors))


class _FoldedRoute(torch.autograd.Function):
    """``op(x, W + up·down) + bias`` forward (the adapter folded into the base op: no activation-sized
    work of its own), the low-rank route's backward for the adapter's tensors (see :func:`folded_route`)."""

    @staticmethod
    def forward(ctx, route, x, weight, bias, *tensors):
        ctx.route = route
        ctx.save_for_backward(x, weight, *tensors)
        return route.spec.op(x, _folded_weight(route, weight, tensors), bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, *tensors = ctx.saved_tensors
        route, spec = ctx.route, ctx.route.spec
        need_x, need_weight, need_bias = ctx.needs_input_grad[1:4]
        needs = ctx.needs_input_grad[4:]
        # in the adapter's dtype: under autocast the forward ran in half precision, the backward runs without
        # autocast (autograd casts each gradient back to its input's dtype)
        dtype = tensors[0].dtype
        x, grad = x.to(dtype), grad.to(dtype).contiguous()
        grad_x = grad_weight = grad_bias = None
        if need_x or need_weight:
            used = _folded_weight(route, weight, tensors) if need_x else weight
            grad_x, grad_weight = op_backward(spec, x, used.to(dtype), grad, need_x, need_weight)
        if need_bias:
            grad_bias = grad.sum(tuple(d for d in range(grad.dim()) if d != (1 if spec.is_conv else grad.dim() - 1)))
        grads = [None] * len(tensors)
        if any(needs):
            _, grads = _route_backward(route, x, tensors, grad, False, needs)
        return (None, grad_x, grad_weight, grad_bias, *grads)


def _folded_weight(route, weight: torch.Tensor, tensors) -> torch.Tensor:
    """``W + ΔW``: ``route.delta(*tensors)`` where the route has a cheaper formula, else ``up·down``."""
    if hasattr(route, "delta"):
        delta = route.delta(*tensors)
    else:
        down, up = route.factors(*tensors)
        delta = up @ down.flatten(1)
    return weight + delta.reshape(weight.shape).to(weight.dtype)


def folded_route(route, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 *tensors: torch.Tensor) -> torch.Tensor:
    """``op(x, W) + bias + Δy`` of one adapter training alone on a layer, with ``route`` an activation
    route of :func:`factored_route`'s kind that also has ``spec`` and, unless it is a
    :class:`LowRankRoute` (``ΔW = up·down``), ``delta(*tensors)``: forward folds ``ΔW`` into the base op
    (one GEMM of the layer's size, as the frozen layer runs anyway, plus the ``out × in`` sum), and
    backward takes the route's: the adapter tensors' gradients from ``h = op(x, down)``, recomputed,
    never the full ``∂W = gᵀ·x``. Against the route both ways it saves the route's forward (for a
    low-rank route its two thin GEMMs, ``T·p·(in + out)`` multiply-adds at rank ``p``: most of a
    rank-``r²`` LoHa's forward). Keeps ``x``, the weight and the tensors for backward (nothing new)."""
    if _nested_autograd_traced(route):
        return route.spec.op(x, _folded_weight(route, weight, tensors), bias)
    return _FoldedRoute.apply(route, x, weight, bias, *tensors)


def rebuild_tucker(core: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``W[p, q, kh, kw] = Σ_ij core[i, j, kh, kw] · up[p, i] · down[j, q]``.

    ``core``: ``(r1, r2, kh, kw)``, ``up``: ``(out, r1)``, ``down``: ``(r2, in)`` -> ``(out, in, kh, kw)``.
    """
    return torch.einsum("ijhw,pi,jq->pqhw", core, up, down)


def kaiming_(t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``kaiming_uniform_(a=√5)`` as nn.Linear does, with an explicit generator."""
    if t.is_meta:  # shapes only (checking a file's tensors): nothing to fill
        return t
    fan_in = t[0].numel() if t.dim() > 1 else t.numel()
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    with torch.no_grad():
        return t.uniform_(-bound, bound, generator=generator)


def init_factors(params: dict[str, torch.Tensor], zero_key: str, init_weights, generator=None) -> dict:
    """Kaiming-initialise every factor; ``zero_key`` starts at zero (so ΔW = 0) unless
    ``init_weights`` is False (random non-identity weights, for tests)."""
    for key, value in params.items():
        if key == zero_key and init_weights is not False:
            value.zero_()
        else:
            kaiming_(value, generator)
    return params


def normal_(t: torch.Tensor, std: float, generator: torch.Generator | None = None, mean: float = 0.0):
    if t.is_meta:
        return t
    with torch.no_grad():
        return t.normal_(mean, std, generator=generator)


ROTATION_SIDES = ("input", "output")


def rotated_dim(spec, side: str) -> int:
    """Length of the vectors a rotation acts on: ``out`` (output side) or ``in·kh·kw`` (input side)."""
    return spec.out_features if side == "output" else spec.flat_in


def divisors_near(dim: int, target: int, count: int = 4) -> list[int]:
    divs = [k for k in range(1, dim + 1) if dim % k == 0]
    return sorted(divs, key=lambda k: (abs(k - target), k))[:count]


def block_layout(dim: int, block_size: int, block_num: int, name: str, what: str = "block_size") -> tuple[int, int]:
    """``(block_num, block_size)`` with ``block_num · block_size = dim``; clear error otherwise."""
    if block_num > 0:
        if dim % block_num:
            raise ValueError(
                f"layer {name!r}: {block_num} blocks do not divide the rotated dimension {dim}; "
                f"numbers of blocks that fit: {divisors_near(dim, block_num)}"
            )
        return block_num, dim // block_num
    if block_size <= 0 or dim % block_size:
        raise ValueError(
            f"layer {name!r}: {what}={block_size} does not divide the rotated dimension {dim}; "
            f"sizes that fit: {divisors_near(dim, max(block_size, 1))}"
        )
    return dim // block_size, block_size
