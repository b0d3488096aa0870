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
are not separable). The passes run in segments (``_segments``): between two, the T cotangents
at one node (a block's input) are carried and the segment's captures are folded into K and
freed. A Linear or Conv2d layer folds its block from its input rows x (im2col for a
convolution) and its cotangents, K_ij += ⟨(x xᵀ) δ_i, δ_j⟩, when that costs fewer flops than
T VJPs (about M rows < its fan-in); other blocks are built by T VJPs of their consumer alone,
folded and freed; ``bucket_size`` bounds the per-task gradient elements that exist at once (a
block too large for all T tasks is folded a few tasks at a time, at the price of more VJPs).
The heads (non-shared leaves) get Σ_i ∇ L_i in ``.grad`` in the passes, as
``sum(losses).backward()`` gives them. ``apply(w)`` takes d by one ordinary weighted backward
pass of Σ_i w_i L_i into the shared parameters, which also frees the graph.

Memory beyond one plain backward: at most T × the captures of one segment (each consumer's
min(outputs, parameters)) + the carried cut + ``bucket_size`` elements, not the loop engine's
T × N (measured by ``fastmtl.bench.memory``; README, "Memory"). Time: the loop
engine's T passes without their weight-gradient products, plus the folds (T VJPs per block, or
the x xᵀ form) and one weighted backward pass.

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
    """Consumers that share parameters, the shared parameters under them (indices), and the
    edges at which their output cotangents are captured."""
    nodes: list = field(default_factory=list)
    params: set = field(default_factory=set)
    edges: list = field(default_factory=list)       # GradientEdge per used output
    out_numel: int = 0
    isolated: bool = True          # its parameters are reached through its consumers alone


_UNKNOWN = 1 << 62   # the size of an output whose shape the node does not tell: never chosen


def _out_numel(node: object, nr: int) -> int:
    meta = getattr(node, "_input_metadata", None)   # the shapes of the node's forward outputs
    if meta is None or nr >= len(meta):
        return _UNKNOWN
    return int(torch.Size(meta[nr].shape).numel())


@dataclass
class _Graph:
    """The losses' graph as ``_groups`` read it: nodes parents first, their parent counts,
    the parametric ones, and the ``AccumulateGrad`` node of each leaf."""
    order: list
    parents: dict
    under: dict
    leaf_nodes: dict


def _groups(losses: list[Tensor], index: dict[int, int]) -> tuple[list[_Group], _Graph]:
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
    leaf_nodes: dict[int, object] = {}
    for node in reversed(order):    # children first
        var = getattr(node, "variable", None)
        if isinstance(var, Tensor):
            leaf_nodes[id(var)] = node
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
            g.out_numel += _out_numel(node, nr)
    return list(groups.values()), _Graph(order, parents, under, leaf_nodes)


@dataclass
class _Target:
    """What a segment's passes capture: a group's cotangents ("cot"), a parameter's gradient
    ("dir") or a head's ("head"); ``node`` places it in the graph, ``size`` per task."""
    kind: str
    key: int                  # group index, shared-parameter index, or head index
    node: object
    edges: list
    size: int


@dataclass
class _Segment:
    targets: list
    cut: list                 # the GradientEdges carried to the next segment


def _segments(losses: list[Tensor], graph: _Graph, targets: list[_Target], T: int,
              threshold: int) -> list[_Segment]:
    """Cut the backward into segments, each captured by T passes of its own.

    The nodes that lead to a target are walked in a topological order (Kahn's, depth first;
    leaves and one-input chains to one, such as ``Wᵀ``, right after their op). Between two
    segments the T cotangents at the open edges (the cut) are carried; a segment's targets are
    folded and freed before the next one runs. A segment closes once its captures reach
    ``threshold`` elements, where the cut is no larger than them (a cut through the large
    activations of a CNN's first layers would cost more than it frees), the losses are behind
    and the cut enters one node (between two blocks of a network). One segment when
    everything fits.
    """
    at: dict[int, list[_Target]] = {}
    for t in targets:
        at.setdefault(id(t.node), []).append(t)
    needed: set[int] = set()
    side: set[int] = set()    # leaves and one-child chains to one (Wᵀ): visited first
    for node in reversed(graph.order):                # children first
        kids = [c for c, _ in children(node) if id(c) in needed]
        if id(node) in at or kids:
            needed.add(id(node))
            if (not kids and isinstance(getattr(node, "variable", None), Tensor)) or (
                    len(kids) == 1 and id(kids[0]) in side):
                side.add(id(node))
    indegree: dict[int, int] = {}
    for node in graph.order:
        if id(node) in needed:
            for c, _ in children(node):
                if id(c) in needed:
                    indegree[id(c)] = indegree.get(id(c), 0) + 1
    roots = [get_gradient_edge(loss).node for loss in losses]
    root_ids = {id(r) for r in roots if id(r) in needed}   # all in the first segment
    main: list = []
    chain: list = []                                  # side nodes: visited first
    seen: set[int] = set()
    for r in roots:
        if id(r) in needed and indegree.get(id(r), 0) == 0 and id(r) not in seen:
            seen.add(id(r))
            main.append(r)
    segments: list[_Segment] = []
    open_edges: dict[tuple[int, int], tuple[GradientEdge, int]] = {}
    current: list[_Target] = []
    pending = 0
    while main or chain:
        u = chain.pop() if chain else main.pop()
        for key in [k for k in open_edges if k[0] == id(u)]:
            del open_edges[key]
        for c, nr in children(u):
            if id(c) not in needed:
                continue
            open_edges.setdefault((id(c), nr), (GradientEdge(c, nr), _out_numel(c, nr)))
            indegree[id(c)] -= 1
            if indegree[id(c)] == 0:
                (chain if id(c) in side else main).append(c)
        for t in at.get(id(u), ()):
            current.append(t)
            pending += T * t.size
        if id(u) in root_ids:
            root_ids.discard(id(u))
        cut = T * sum(n for _, n in open_edges.values())
        # a cut into one node only: through two, the passes of this segment could run the
        # graph from one to the other, and the next segment's would run it again
        if (pending >= threshold and cut <= pending and (main or chain) and not root_ids
                and len({k[0] for k in open_edges}) == 1):
            segments.append(_Segment(current, [e for e, _ in open_edges.values()]))
            current, pending = [], 0
    segments.append(_Segment(current, []))
    return segments


@dataclass
class _Linear:
    """An op that is a matrix product in its weight: y = x Wᵀ (+ b), as ``addmm``/``mm``
    record a Linear layer, or a 2-D convolution on its unfolded input (im2col): its input as
    a matrix x (M, n_in), lazily, and its output cotangent as (M, out)."""
    x: object                 # () -> (M, n_in)
    m: int
    n_in: int
    out: int
    bias: bool
    rows: object = None       # δ -> (M, out); None: δ is (M, out) already


def _shared_leaf(node: object, index: dict[int, int]) -> Tensor | None:
    var = getattr(node, "variable", None) if node is not None else None
    return var if id(var) in index else None


def _linear(group: _Group, index: dict[int, int]) -> _Linear | None:
    """The group as one matrix product in its weight, if it is: one ``AddmmBackward0``
    (α = β = 1, a 1-D bias) or ``MmBackward0`` node whose weight comes through ``Wᵀ``, or one
    ``ConvolutionBackward0`` (2-D, not transposed, one group) on shared weight and bias. Read
    from the node's saved inputs (``_saved_*``); a torch whose nodes say less gives None (the
    VJP path)."""
    if len(group.nodes) != 1 or len(group.edges) != 1:
        return None
    try:
        return _read_linear(group, index)
    except (AttributeError, IndexError, RuntimeError):
        return None


def _read_linear(group: _Group, index: dict[int, int]) -> _Linear | None:
    """``_linear`` on a one-node group: the reading of the node itself."""
    node = group.nodes[0]
    kids = node.next_functions
    name = node.name()
    if name in ("AddmmBackward0", "MmBackward0"):
        if name == "AddmmBackward0":
            if node._saved_alpha != 1 or node._saved_beta != 1:
                return None
            x, b_node, t_node = node._saved_mat1, kids[0][0], kids[2][0]
        else:
            x, b_node, t_node = node._saved_self, None, kids[1][0]
        if t_node is None or t_node.name() != "TBackward0":
            return None
        w_nodes = [c for c, _ in t_node.next_functions if c is not None]
        w = _shared_leaf(w_nodes[0], index) if len(w_nodes) == 1 else None
        if w is None or x.dim() != 2 or x.shape[1] != w.shape[1]:
            return None
        lin = _Linear(lambda: x, x.shape[0], x.shape[1], w.shape[0], False)
    elif name == "ConvolutionBackward0":
        if node._saved_transposed or node._saved_groups != 1 or len(kids) != 3:
            return None
        x, w = node._saved_input, _shared_leaf(kids[1][0], index)
        b_node = kids[2][0]
        if w is None or x.dim() != 4:
            return None
        out_shape = node._input_metadata[0].shape     # (B, out, H', W')
        k = tuple(w.shape[2:])
        stride, pad, dil = node._saved_stride, node._saved_padding, node._saved_dilation

        def unfolded() -> Tensor:
            cols = torch.nn.functional.unfold(x, k, dilation=dil, padding=pad, stride=stride)
            return cols.mT.reshape(-1, cols.shape[1])        # (B·L, in·kh·kw)

        lin = _Linear(unfolded, out_shape[0] * out_shape[2] * out_shape[3],
                      w[0].numel(), w.shape[0], False,
                      lambda d: d.permute(0, 2, 3, 1).reshape(-1, d.shape[1]))
    else:
        return None
    n_params = 1
    if b_node is not None:
        b = _shared_leaf(b_node, index)
        if b is None or b.dim() != 1 or b.shape[0] != lin.out:
            return None
        lin.bias, n_params = True, 2
    return lin if len(group.params) == n_params else None


def _prefers_gram_trick(lin: _Linear, T: int, bucket: int) -> bool:
    """Flops of K_W by ``_fold_linear`` (M² · n_in for x xᵀ, T · M² · out, T² · M · out)
    against the VJPs (T of them, or more when the block is folded a few tasks at a time,
    M · n_in · out each, and the Gram of T rows of n_in · out): about M < n_in."""
    M, n_in, out = lin.m, lin.n_in, lin.out
    n = n_in * out + out * lin.bias
    c = min(T, max(1, bucket // n))
    vjps = T if c >= T else T / 2 + T * T / (2 * c)
    trick = M * M * n_in + T * M * M * out + T * T * M * out
    return trick < vjps * M * n_in * out + T * T * n / 2


def _fold_linear(K: Tensor, lin: _Linear, deltas: list) -> None:
    """K += G_W G_Wᵀ (+ G_b G_bᵀ) of a matrix product in W from its input rows x and the T
    cotangents at its output, G_W,i = δ_iᵀ x, without forming G_W:

        ⟨δ_iᵀ x, δ_jᵀ x⟩ = tr(δ_iᵀ x xᵀ δ_j) = ⟨(x xᵀ) δ_i, δ_j⟩,
        ⟨G_b,i, G_b,j⟩ = (Σ_a δ_i,a) · (Σ_a δ_j,a)

    in K's dtype, one task's (x xᵀ) δ_i at a time; the two triangles averaged."""
    T = K.shape[0]
    x = lin.x().detach().to(device=K.device, dtype=K.dtype)
    M = x.shape[0]
    X = x @ x.mT                                          # (M, M)
    del x

    def rows(d: Tensor | None) -> Tensor:
        if d is None:
            return torch.zeros(M, lin.out, dtype=K.dtype, device=K.device)
        d = d if lin.rows is None else lin.rows(d)
        return d.reshape(M, lin.out).to(device=K.device, dtype=K.dtype)

    D = torch.stack([rows(d) for d in deltas])            # (T, M, out)
    flat = D.reshape(T, -1)
    A = torch.empty(T, T, dtype=K.dtype, device=K.device)
    for i in range(T):
        A[:, i] = flat @ (X @ D[i]).reshape(-1)
    K += (A + A.mT) / 2
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
        self.segments: list[_Segment] = []   # the last compute's segments (diagnostics)
        self.kept_numel = 0   # the most elements one of its segments' passes kept (diagnostics)

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
        groups, graph = _groups(losses, self._index)
        targets: list[_Target] = []
        for gi, g in enumerate(groups):
            numel = sum(params[k].numel() for k in g.params)
            if self._keeps_cotangents(g, numel):
                targets.append(_Target("cot", gi, g.nodes[0], g.edges, g.out_numel))
            else:
                for k in sorted(g.params):
                    node = graph.leaf_nodes[id(params[k])]
                    targets.append(_Target("dir", k, node, [GradientEdge(node, 0)],
                                           params[k].numel()))
        for j, leaf in enumerate(others):
            node = graph.leaf_nodes.get(id(leaf))
            if node is not None:                       # (a loss that is itself a leaf: not)
                targets.append(_Target("head", j, node, [GradientEdge(node, 0)], 0))
        acc = torch.float64 if any(p.dtype == torch.float64 for p in params) \
            else torch.float32
        K = torch.zeros(T, T, dtype=acc, device=params[0].device)
        bucket = self._bucket(params, T)
        self.segments = _segments(losses, graph, targets, T, bucket // 2)
        self.kept_numel = 0
        carried: list[tuple[GradientEdge, list[Tensor | None]]] = []
        for seg in self.segments:
            inputs = [e for t in seg.targets for e in t.edges] + seg.cut
            rows: list[list[Tensor | None]] = [[] for _ in inputs]
            for i in range(T):
                grads = self._pass(losses[i], carried, i, inputs)
                for r, g in zip(rows, grads):
                    r.append(g)
                del grads
            carried = list(zip(seg.cut, rows[len(inputs) - len(seg.cut):]))
            self.kept_numel = max(self.kept_numel, sum(
                t.numel() for r in rows for t in r if t is not None))
            start = 0
            for t in seg.targets:
                got, start = rows[start:start + len(t.edges)], start + len(t.edges)
                for c in range(start - len(t.edges), start):
                    rows[c] = []
                self._fold_target(K, t, got, groups, others, params, bucket)
                del got
            del rows
        self._K = K
        self._reached = torch.tensor([[bool(m >> i & 1) for m in masks] for i in range(T)],
                                     dtype=torch.bool).reshape(T, P)
        self._losses = losses
        self.num_tasks = T
        return self

    @staticmethod
    def _pass(loss: Tensor, carried: list, i: int, inputs: list) -> tuple:
        """Task i's pass of one segment: from its loss (the first segment) or from the
        cotangents carried at the cut, to the segment's captures and the next cut."""
        if not carried:
            return torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        live = [(e, g[i]) for e, g in carried if g[i] is not None]
        if not live:
            return (None,) * len(inputs)
        return torch.autograd.grad([e for e, _ in live], inputs,
                                   grad_outputs=[g for _, g in live], retain_graph=True,
                                   allow_unused=True)

    def _fold_target(self, K: Tensor, t: _Target, got: list, groups: list[_Group],
                     others: list[Tensor], params: list[Tensor], bucket: int) -> None:
        """Fold one segment's capture into K (or, for a head, into its ``.grad``)."""
        if t.kind == "head":          # Σ_i ∇ L_i, as backward() gives the heads
            total = None
            for g in got[0]:
                if g is not None:
                    total = g if total is None else total + g
            if total is not None:
                leaf = others[t.key]
                with torch.no_grad():
                    leaf.grad = total if leaf.grad is None else leaf.grad.add_(total)
        elif t.kind == "dir":
            rows = got[0]
            self._fold(K, [params[t.key]], lambda i: [rows[i]], None)
        else:
            g = groups[t.key]
            linear = _linear(g, self._index)
            if linear is not None and _prefers_gram_trick(linear, len(got[0]), bucket):
                _fold_linear(K, linear, got[0])
                return
            for block in self._blocks(params, sorted(g.params), K.shape[0], bucket):
                ps = [params[k] for k in block]
                self._fold(K, ps, partial(self._vjp, g, ps, got), bucket)

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
