"""The "stream" engine: K without the (T, N) matrix of per-task gradients.

Read on the autograd graph of the losses: no model, no hooks, nothing recomputed. A *consumer*
is an op that uses a shared parameter θ_c directly or through a chain of one-input ops (``Wᵀ``,
a cast, an embedding lookup): y = f(x, θ_c), a matmul, a convolution, a BatchNorm, the add of
a raw parameter. The per-task gradient of its parameters is its vector-Jacobian product at the
cotangent δ_i = ∂L_i/∂y of its output:

    ∇_{θ_c} L_i = J_{θ_c}(x)ᵀ δ_i,        K = Σ_blocks G_b G_bᵀ,        d = Σ_i w_i ∇ L_i.

``compute(losses)`` runs T backward passes that stop at the consumers' outputs (no
parameter-gradient product is formed in them) and keeps, per consumer, whichever is smaller:
the T cotangents at its outputs, or the T gradients of its parameters (an early convolution of
a CNN, whose outputs are large; and a parameter under two consumers, tied weights, whose VJPs
are not separable). The heads (non-shared leaves) get Σ_i ∇ L_i in ``.grad`` in those passes,
as ``sum(losses).backward()`` gives them. Then, block by block, G_b is built by T VJPs of its
consumer alone, folded into K and freed; ``bucket_size`` bounds the per-task gradient elements
that exist at once (a block too large for all T tasks is folded a few tasks at a time, at the
price of more VJPs). ``apply(w)`` takes d by one ordinary weighted backward pass of
Σ_i w_i L_i into the shared parameters, which also frees the graph.

Memory beyond one plain backward: T × Σ_consumers min(outputs, parameters) + ``bucket_size``
elements, never more than the loop engine's T × N: far below it when ops' outputs are smaller
than their parameters (wide layers, small batches, large models fine-tuned on few tokens), about
the same when activations dominate (a CNN at a large batch). Time: the loop engine's T passes,
plus T VJPs per consumer (Python calls) and one weighted backward pass.

Exact: K, w and every ``.grad`` equal the loop engine's to rounding. Nothing is recomputed, so
any op works and BatchNorm's running statistics are updated once, by the forward (dropout keeps
its mask). A compiled region (``torch.compile``) is one consumer of all its parameters. Needs
torch >= 2.5 (gradients with respect to graph edges).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge

from fastmtl import ops
from fastmtl._checks import check_int, check_shared_params
from fastmtl.engine.base import ParameterEngine
from fastmtl.engine.graph import children, task_masks, topological

__all__ = ["BUCKET_FRACTION", "MIN_BUCKET", "StreamGradients"]

BUCKET_FRACTION = 8            # default bucket: 1/8 of the loop engine's T × N ...
MIN_BUCKET = 1 << 20           # ... and at least 1M elements


@dataclass
class _Group:
    """Consumers that share parameters, the shared parameters under them (indices), and what
    the T passes keep for them: the cotangents at ``edges`` or the parameters' gradients."""
    nodes: list = field(default_factory=list)
    params: set = field(default_factory=set)
    edges: list = field(default_factory=list)       # GradientEdge per used output
    out_numel: int = 0
    isolated: bool = True          # its parameters are reached through its consumers alone
    keep_cotangents: bool = True


def _out_numel(node: object, nr: int) -> int | None:
    meta = getattr(node, "_input_metadata", None)   # the shapes of the node's forward outputs
    if meta is None or nr >= len(meta):
        return None
    return int(torch.Size(meta[nr].shape).numel())


def _groups(losses: list[Tensor], index: dict[int, int]) -> list[_Group]:
    """The consumers of the shared parameters in the losses' graph, grouped by shared
    parameters (connected components), with their used outputs.

    A node is parametric when it is the ``AccumulateGrad`` of a shared parameter or has exactly
    one child and that child is parametric (``Wᵀ``, a cast, an embedding lookup, a convolution
    of an input that needs no gradient): chains that end in one parameter. A consumer is a
    node that is not parametric and has a parametric child. Its VJP from its output cotangent
    to its parameters is that consumer's part alone when every node of its chains has a single
    parent (``isolated``); a parameter under two consumers (tied weights) or under a chain
    shared by several ops is not, and its group keeps the parameters' gradients instead.
    """
    roots = [get_gradient_edge(loss) for loss in losses]
    order = topological([e.node for e in roots])
    parents: dict[int, int] = {}
    for node in order:
        for c, _ in children(node):
            parents[id(c)] = parents.get(id(c), 0) + 1
    for e in roots:
        parents[id(e.node)] = parents.get(id(e.node), 0) + 1
    under: dict[int, int] = {}      # parametric node -> the index of its parameter
    alone: dict[int, bool] = {}     # ... and whether its chain has single parents only
    for node in reversed(order):    # children first
        var = getattr(node, "variable", None)
        if isinstance(var, Tensor):
            if id(var) in index:
                under[id(node)] = index[id(var)]
                alone[id(node)] = parents[id(node)] == 1
            continue
        kids = children(node)
        if len(kids) == 1 and id(kids[0][0]) in under:
            under[id(node)] = under[id(kids[0][0])]
            alone[id(node)] = parents[id(node)] == 1 and alone[id(kids[0][0])]
    consumers: dict[int, tuple[object, set, bool]] = {}
    for node in order:
        if id(node) in under:
            continue
        kids = [c for c, _ in children(node) if id(c) in under]
        if kids:
            consumers[id(node)] = (node, {under[id(c)] for c in kids},
                                   all(alone[id(c)] for c in kids))
    used: dict[int, set] = {k: set() for k in consumers}
    for node in order:
        for c, nr in children(node):
            if id(c) in used:
                used[id(c)].add(nr)
    for e in roots:
        if id(e.node) in used:
            used[id(e.node)].add(e.output_nr)
        elif id(e.node) in under:   # a loss of one parameter alone: its own consumer
            consumers[id(e.node)] = (e.node, {under[id(e.node)]}, alone[id(e.node)])
            used[id(e.node)] = {e.output_nr}
    parent: dict[int, int] = {}     # connected components over shared parameters

    def find(k: int) -> int:
        while parent.setdefault(k, k) != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for _, ps, _ in consumers.values():
        first, *rest = ps
        for k in rest:
            parent[find(k)] = find(first)
    groups: dict[int, _Group] = {}
    for key, (node, ps, isolated) in consumers.items():
        g = groups.setdefault(find(next(iter(ps))), _Group())
        g.nodes.append(node)
        g.params |= ps
        g.isolated = g.isolated and isolated
        for nr in sorted(used[key]):
            g.edges.append(GradientEdge(node, nr))
            n = _out_numel(node, nr)
            g.out_numel += n if n is not None else 1 << 62   # unknown: keep the gradients
    return list(groups.values())


@dataclass
class _Linear:
    """y = x Wᵀ (+ b) as recorded by an ``addmm``/``mm`` node: its input x (M, in)."""
    x: Tensor
    out: int
    bias: bool


def _linear(group: _Group, index: dict[int, int]) -> _Linear | None:
    """The group as a Linear layer, if it is exactly one: one ``AddmmBackward0`` (α = β = 1,
    a 1-D bias) or ``MmBackward0`` node whose parameters are W (through ``Wᵀ``) and b."""
    if len(group.nodes) != 1 or len(group.edges) != 1:
        return None
    node = group.nodes[0]
    kids = node.next_functions
    name = node.name()
    if name == "AddmmBackward0" and node._saved_alpha == 1 and node._saved_beta == 1:
        x, (b_node, _), (t_node, _) = node._saved_mat1, kids[0], kids[2]
    elif name == "MmBackward0":
        x, b_node, (t_node, _) = node._saved_self, None, kids[1]
    else:
        return None
    if t_node is None or t_node.name() != "TBackward0":
        return None
    w_nodes = [c for c, _ in t_node.next_functions if c is not None]
    if len(w_nodes) != 1 or id(getattr(w_nodes[0], "variable", None)) not in index:
        return None
    w = w_nodes[0].variable
    n_params = 1
    if b_node is not None:
        b = getattr(b_node, "variable", None)
        if id(b) not in index or b.dim() != 1 or b.shape[0] != w.shape[0]:
            return None
        n_params = 2
    if len(group.params) != n_params or x.dim() != 2 or x.shape[1] != w.shape[1]:
        return None
    return _Linear(x, w.shape[0], b_node is not None)


def _prefers_gram_trick(lin: _Linear, deltas: list, T: int, bucket: int) -> bool:
    """Flops of K_W by ``_fold_linear`` (T(T+1)/2 · M² · out + M² · in) against the VJPs
    (T of them, or more when the block is folded a few tasks at a time, M · in · out each,
    and the Gram of T rows of in · out)."""
    M, n_in = lin.x.shape
    n = n_in * lin.out + lin.out * lin.bias
    c = min(T, max(1, bucket // n))
    vjps = T if c >= T else T / 2 + T * T / (2 * c)
    trick = T * (T + 1) / 2 * M * M * lin.out + M * M * n_in
    return trick < vjps * M * n_in * lin.out + T * T * n / 2


def _fold_linear(K: Tensor, lin: _Linear, deltas: list) -> None:
    """K += G_W G_Wᵀ (+ G_b G_bᵀ) of a Linear layer from its input and the T cotangents at
    its output, G_W,i = δ_iᵀ x, without forming G_W:

        ⟨δ_iᵀ x, δ_jᵀ x⟩ = Σ_{a,b} (x xᵀ)_{ab} (δ_i δ_jᵀ)_{ab},
        ⟨G_b,i, G_b,j⟩ = (Σ_a δ_i,a) · (Σ_a δ_j,a)

    in K's dtype, one task's row of pairs (δ_i against δ_1..δ_i) at a time."""
    T = K.shape[0]
    x = lin.x.detach().to(device=K.device, dtype=K.dtype)
    M = x.shape[0]
    X = x @ x.mT                                          # (M, M)
    D = torch.stack([d.reshape(M, lin.out) if d is not None
                     else torch.zeros(M, lin.out, dtype=x.dtype, device=x.device)
                     for d in deltas]).to(device=K.device, dtype=K.dtype)   # (T, M, out)
    flat = D.reshape(T * M, lin.out)
    for i in range(T):
        Q = (D[i] @ flat[:(i + 1) * M].mT).reshape(M, i + 1, M)
        k = torch.einsum("ajb,ab->j", Q, X)
        K[i, :i + 1] += k
        K[:i, i] += k[:i]
    if lin.bias:
        s = D.sum(1)
        K += s @ s.mT


class StreamGradients(ParameterEngine):
    """Per-task gradients folded into K block by block, never held as a (T, N) matrix.

    Args:
        shared_params: the parameters whose per-task gradients are aggregated.
        bucket_size: the most per-task gradient elements that exist at once while K is
            folded: parameters are folded in blocks of at most ``bucket_size // T`` elements
            with all T tasks at once; a larger parameter is a block of its own, folded
            ``bucket_size // numel`` tasks at a time (at least one: one task's gradient of one
            parameter is the floor) at the price of more VJPs (``_fold``: T/2 + T²/2c instead
            of T for c tasks at a time). None (default): ``1/BUCKET_FRACTION`` of T × N (what
            the loop engine would hold), at least ``MIN_BUCKET``.

    Use it by name (``engine="stream"``: ``mtl_backward`` keeps one per set of shared
    parameters) or pass an instance as ``engine=``; "auto" picks it when the (T, N) buffer
    would not fit (``fastmtl.engine.prefers_stream``). Methods that need the per-task gradients
    themselves (AdaTask's per-task moments, the PCGrad wrapper's projections, latent mode)
    refuse it.
    """

    def __init__(self, shared_params: Iterable[Tensor], *,
                 bucket_size: int | None = None) -> None:
        if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 5):
            raise RuntimeError("StreamGradients needs torch >= 2.5 (gradients with respect to "
                               f"graph edges); this is torch {torch.__version__}: use "
                               "engine='loop'")
        params = check_shared_params(shared_params)
        self._hold(params)
        self.bucket_size = check_int("bucket_size", bucket_size, who="StreamGradients",
                                     none_ok=True)
        self._index = {id(p): k for k, p in enumerate(params)}
        self.num_tasks: int | None = None
        self._K: Tensor | None = None
        self._losses: list[Tensor] = []
        self.kept_numel = 0          # elements the last compute's T passes kept (diagnostics)

    # -- compute ---------------------------------------------------------------------------
    def _compute(self, losses: list[Tensor]) -> StreamGradients:
        params = self.params
        T, P = len(losses), len(params)
        leaves, _ = task_masks(losses)
        masks = [0] * P
        others = []
        for leaf, mask in leaves:
            k = self._index.get(id(leaf))
            if k is None:
                others.append(leaf)
            else:
                masks[k] = mask
        groups = _groups(losses, self._index)
        for g in groups:
            g.keep_cotangents = self._keeps_cotangents(g, sum(params[k].numel()
                                                              for k in g.params))
        edges = [e for g in groups if g.keep_cotangents for e in g.edges]
        direct = sorted(k for g in groups if not g.keep_cotangents for k in g.params)
        inputs = edges + [params[k] for k in direct] + others
        n_e, n_d = len(edges), len(direct)
        kept: list[list[Tensor | None]] = [[] for _ in range(n_e + n_d)]
        summed: list[Tensor | None] = [None] * len(others)
        for loss in losses:
            grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
            for c in range(n_e + n_d):
                kept[c].append(grads[c])
            for k, g in enumerate(grads[n_e + n_d:]):
                if g is not None:
                    summed[k] = g if summed[k] is None else summed[k] + g
            del grads
        with torch.no_grad():
            for leaf, g in zip(others, summed):   # the heads: Σ_i ∇ L_i, as backward() does
                if g is not None:
                    leaf.grad = g if leaf.grad is None else leaf.grad.add_(g)
        del summed
        self.kept_numel = sum(t.numel() for rows in kept for t in rows if t is not None)
        acc = torch.float64 if any(p.dtype == torch.float64 for p in params) \
            else torch.float32
        K = torch.zeros(T, T, dtype=acc, device=params[0].device)
        for c, k in enumerate(direct):                # the gradients the passes kept
            rows, kept[n_e + c] = kept[n_e + c], []
            self._fold(K, [params[k]], lambda i, rows=rows: [rows[i]], None)
            del rows
        bucket = self._bucket(params, T)
        start = 0
        for g in groups:
            if not g.keep_cotangents:
                continue
            deltas = kept[start:start + len(g.edges)]    # the edges are in group order
            for c in range(start, start + len(g.edges)):
                kept[c] = []
            start += len(g.edges)
            linear = _linear(g, self._index)
            if linear is not None and _prefers_gram_trick(linear, deltas[0], T, bucket):
                _fold_linear(K, linear, deltas[0])
            else:
                for block in self._blocks(params, sorted(g.params), T, bucket):
                    ps = [params[k] for k in block]
                    self._fold(K, ps, partial(self._vjp, g, ps, deltas), bucket)
            del deltas
        self._K = K
        self._reached = torch.tensor([[bool(m >> i & 1) for m in masks] for i in range(T)],
                                     dtype=torch.bool).reshape(T, P)
        self._losses = losses
        self.num_tasks = T
        return self

    @staticmethod
    def _keeps_cotangents(group: _Group, param_numel: int) -> bool:
        """Keep the T cotangents at the group's outputs (else its T parameter gradients):
        when they are fewer elements and the group's VJP is its own (``isolated``)."""
        return group.isolated and group.out_numel < param_numel

    def _bucket(self, params: list[Tensor], T: int) -> int:
        if self.bucket_size is not None:
            return self.bucket_size
        return max(MIN_BUCKET, T * sum(p.numel() for p in params) // BUCKET_FRACTION)

    @staticmethod
    def _blocks(params: list[Tensor], ks: list[int], T: int, bucket: int) -> list[list[int]]:
        """Parameter indices in blocks whose T gradients fit ``bucket_size`` (a parameter
        larger than that is a block of its own, folded a few tasks at a time)."""
        cap = max(1, bucket // T)
        blocks, cur, size = [], [], 0
        for k in ks:
            n = params[k].numel()
            if cur and size + n > cap:
                blocks.append(cur)
                cur, size = [], 0
            cur.append(k)
            size += n
        return blocks + [cur] if cur else blocks

    @staticmethod
    def _fold(K: Tensor, params: list[Tensor], row, bucket: int | None) -> None:
        """K += G_b G_bᵀ for a block of parameters whose gradients for task i are ``row(i)``
        (None: no gradient). All T rows at once when T × the block fits ``bucket`` (or it is
        None: the rows exist already); else c = bucket // block tasks at a time: the diagonal
        (c, c) part by ``ops.gram``, the rest one task's row at a time against the c held
        ones (``row`` is called about T/2 + T²/2c times instead of T)."""
        T = K.shape[0]
        n = sum(p.numel() for p in params)
        c = T if bucket is None else min(T, max(1, bucket // n))

        flip = [False] * len(params)   # rows hold Wᵀ where a VJP returns W transposed

        def rows(tasks: range) -> list[Tensor]:   # per parameter: (len(tasks), numel)
            out = [torch.empty(len(tasks), p.numel(), dtype=p.dtype, device=p.device)
                   for p in params]
            for t, i in enumerate(tasks):         # each task's row copied in, then freed
                for j, (G, g) in enumerate(zip(out, row(i))):
                    if g is None:
                        G[t].zero_()
                        continue
                    if i == 0:   # any order of the entries, the same in every row, keeps K
                        flip[j] = g.dim() == 2 and not g.is_contiguous() and g.mT.is_contiguous()
                    src = g.mT if flip[j] else g
                    G[t].view(src.shape).copy_(src)
            return out

        for a in range(0, T, c):
            held = rows(range(a, min(a + c, T)))
            b = a + held[0].shape[0]
            for G in held:
                K[a:b, a:b] += ops.gram(G).to(device=K.device, dtype=K.dtype)
            if b == T:
                continue
            held = [G.to(K.dtype) for G in held]
            for j in range(b, T):
                r = rows(range(j, j + 1))
                v = sum(H @ g[0].to(device=H.device, dtype=K.dtype) for H, g in zip(held, r))
                v = v.to(K.device)
                K[a:b, j] += v
                K[j, a:b] += v

    @staticmethod
    def _vjp(group: _Group, params: list[Tensor], deltas: list[list], i: int
             ) -> list[Tensor | None]:
        """Task i's gradients of ``params`` from the group's consumers at their kept
        cotangents (the group is isolated: its VJP reaches its parameters alone)."""
        outs = [(e, d[i]) for e, d in zip(group.edges, deltas) if d[i] is not None]
        if not outs:
            return [None] * len(params)
        try:
            return list(torch.autograd.grad([e for e, _ in outs], params,
                                            grad_outputs=[d for _, d in outs],
                                            retain_graph=True, allow_unused=True))
        except RuntimeError as err:
            names = ", ".join(dict.fromkeys(n.name() for n in group.nodes))
            raise RuntimeError(
                f"StreamGradients: the backward of {names} could not be run again from its "
                f"output cotangent ({err}); use engine='loop'") from err

    # -- read-out ---------------------------------------------------------------------------
    def gram(self) -> Tensor:
        """K = Σ_blocks G_b G_bᵀ (T, T): float32, float64 if a shared parameter is float64."""
        self._require_computed()
        return self._K

    def direction(self, w: Tensor) -> list[Tensor]:
        """d_p = Σ_i w_i ∇_p L_i per shared parameter (shaped like it), by one backward pass
        of Σ_i w_i L_i into the shared parameters (it frees the graph)."""
        w = self._check_weights(w)
        if not self._losses:
            raise RuntimeError("StreamGradients: call compute(losses) first (each compute "
                               "allows one apply)")
        losses, self._losses = self._losses, []
        weights = [w[i].to(device=loss.device, dtype=loss.dtype) for i, loss in
                   enumerate(losses)]
        params = self.params
        grads = torch.autograd.grad(losses, params, grad_outputs=weights, allow_unused=True)
        return [torch.zeros_like(p) if d is None else d for p, d in zip(params, grads)]

    def apply(self, w: Tensor, *, return_direction: bool = False) -> list[Tensor] | None:
        """``p.grad += d_p`` for each shared p a task reached (None stays None otherwise)."""
        d = self.direction(w)
        active = self._reached.any(0).tolist()
        with torch.no_grad():
            for p, dp, on in zip(self.params, d, active):
                if on:
                    p.grad = dp if p.grad is None else p.grad.add_(dp)
        return d if return_direction else None

    def discard(self) -> None:
        """Drop the losses kept for ``apply`` (their graph is freed with them)."""
        self._losses = []
