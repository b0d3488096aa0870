"""Which task reaches which leaf: one walk over the autograd graph of the T losses.

Each loss L_i seeds its ``grad_fn`` with the bit 2^i. Nodes are visited in a topological order
(every node before the nodes it feeds gradients to, i.e. its ``next_functions``), and each
node's mask is OR-ed into its children, so that in one pass

    mask(node) = Σ_{i : node is reachable from L_i} 2^i.

Leaves that require grad appear as ``AccumulateGrad`` nodes whose ``.variable`` is the leaf;
their mask says which tasks send them a gradient. Python ints serve as bitmasks for any T.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

__all__ = ["children", "task_masks", "topological"]


def children(node: object) -> list[tuple[object, int]]:
    """The (node, output_nr) edges a node sends gradients to, without the empty ones."""
    return [(child, nr) for child, nr in getattr(node, "next_functions", ()) if child is not None]


def topological(roots: list[object], stop: object | None = None) -> list[object]:
    """Nodes reachable from ``roots`` (not expanding ``stop``), parents before children."""
    seen: set[int] = set()
    finished: list[object] = []
    stack: list[tuple[object, bool]] = [(r, False) for r in roots]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            finished.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        if node is stop:
            continue
        for child, _ in children(node):
            if id(child) not in seen:
                stack.append((child, False))
    finished.reverse()
    return finished


def task_masks(losses: Sequence[Tensor], target: Tensor | None = None
               ) -> tuple[list[tuple[Tensor, int]], int]:
    """Leaves reached by the losses with their task bitmasks, and the mask of ``target``.

    Returns ``(leaves, target_mask)``: ``leaves`` lists each requires-grad leaf of the graph once
    (in discovery order) with the bitmask of the tasks whose loss reaches it; ``target_mask`` is
    the bitmask of the tasks that reach the tensor ``target`` (0 when not given). The walk does
    not go behind a non-leaf ``target`` (leaves behind it are then not listed). A loss that is
    itself a leaf counts as reaching itself.
    """
    stop = None
    target_edge = None
    if target is not None and target.grad_fn is not None:
        stop = target.grad_fn
        target_edge = (id(stop), target.output_nr)
    roots, seeds, leaves_direct = [], {}, []
    for i, loss in enumerate(losses):
        node = loss.grad_fn
        if node is None:
            leaves_direct.append((loss, 1 << i))
            continue
        roots.append(node)
        seeds[id(node)] = seeds.get(id(node), 0) | (1 << i)
    order = topological(roots, stop)
    masks: dict[int, int] = dict(seeds)
    target_mask = 0
    leaves: dict[int, tuple[Tensor, int]] = {}
    for node in order:
        m = masks.get(id(node), 0)
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):
            old = leaves.get(id(variable), (variable, 0))[1]
            leaves[id(variable)] = (variable, old | m)
        if node is stop:
            continue
        for child, nr in children(node):
            masks[id(child)] = masks.get(id(child), 0) | m
            if target_edge is not None and (id(child), nr) == target_edge:
                target_mask |= m
    for leaf, m in leaves_direct:
        old = leaves.get(id(leaf), (leaf, 0))[1]
        leaves[id(leaf)] = (leaf, old | m)
    if target is not None and target.grad_fn is None:
        target_mask = leaves.get(id(target), (target, 0))[1]
    return list(leaves.values()), target_mask
