r"""Subspace layers: T member copies of a layer's parameters, used at a convex combination.

Pareto Manifold Learning (Dimitriadis, Frossard & Fleuret, ICML 2023, §3; official code
``nik-dim/pamal``, ``src/ll/subspace_modules.py``): every layer holds T members
W_1..W_T, and for α on the simplex Δ^{T-1} the network runs with

.. math::  W(\alpha) = \sum_{t=1}^{T} \alpha_t W_t ,

for the weights, the biases and the norm layers' affine γ, β alike.

Layout. All the parameters of one layer (e.g. weight and bias) are flattened and stored as one
``members`` Parameter of shape (T, P), row t = member t. The interpolation is then one call of
the fused op ``fastmtl.ops.combine(α, members)`` (d = membersᵀα) for all members and all the
layer's parameters, differentiable in both: ∂/∂W_t = α_t·∂/∂W(α) and ∂/∂α_t = ⟨W_t, ∂/∂W(α)⟩
(the op's backward writes the (T, P) member gradient in ``members``' layout in one outer
product).

Mechanism. A subspace layer is the torch layer itself with its class swapped for a subclass
that puts ``SubspaceLayer`` first (``SubspaceLinear(SubspaceLayer, nn.Linear)``, ...): the
torch ``forward`` runs unchanged and reads ``self.weight``/``self.bias``, which now resolve to
the views of W(α) (computed once per forward, or once per ``use_alpha(..., precompute=True)``
block). Buffers (BatchNorm's running statistics) stay single and shared by all α, as in the
official code (see ``fastmtl.pamal.batchnorm`` for re-estimating them at one α).

Weight decay applies to all of a layer's members alike (weights, biases and norm γ, β share
one Parameter); group parameters by module type to exclude norm layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fastmtl.ops import combine

__all__ = [
    "SUPPORTED_LAYERS",
    "SubspaceBatchNorm1d",
    "SubspaceBatchNorm2d",
    "SubspaceConv1d",
    "SubspaceConv2d",
    "SubspaceEmbedding",
    "SubspaceLayer",
    "SubspaceLayerNorm",
    "SubspaceLinear",
    "interpolate_members",
    "subspace_class",
    "subspace_layers",
]

#: The torch layers ``to_subspace`` converts (and their subclasses).
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.Embedding,
)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def interpolate_members(alpha: Tensor, members: Tensor) -> Tensor:
    """W(α) = Σ_t α_t members[t], (P,): one ``fastmtl.ops.combine`` call, differentiable in
    ``alpha`` (T,) and ``members`` (T, P) (first derivatives only)."""
    return combine(alpha.to(device=members.device, dtype=_acc(members.dtype)), members)


class SubspaceLayer(nn.Module):
    """Mixin placed before a torch layer class: the layer's parameters become T members.

    Instance state (set by ``fastmtl.pamal.to_subspace``, never by ``__init__``):

    - ``members``: Parameter (T, P), the flattened parameters of member t in row t;
    - ``member_layout``: {parameter name: (shape, offset, numel)} into a row of ``members``;
    - ``param_order``: the names of the torch layer's parameters (None ones included), to
      restore the plain layer exactly (``extract``);
    - ``_alpha``: the current α (T,) or None; ``_weights``: the W(α) views in use, or None.

    ``layer.weight`` (any member name) returns W(α) at the current α; it raises when no α
    is set. Set α with ``fastmtl.pamal.set_alpha`` / ``use_alpha`` on the model.
    """

    plain_class: type[nn.Module]

    @property
    def num_members(self) -> int:
        """T, the number of members (rows of ``members``)."""
        return self.members.shape[0]

    def __getattr__(self, name: str) -> Any:
        layout = self.__dict__.get("member_layout")
        if layout is not None and name in layout:
            return self.interpolated()[name]
        return super().__getattr__(name)

    def member(self, t: int) -> dict[str, Tensor]:
        """Member t's parameters as views of ``members[t]``, {name: tensor of the layer's shape}."""
        return self._views(self.members[t])

    def interpolated(self) -> dict[str, Tensor]:
        """W(α) for each parameter name at the current α (the views in use during a forward)."""
        if self._weights is not None:
            return self._weights
        return self.interpolate(self._current_alpha())

    def interpolate(self, alpha: Tensor) -> dict[str, Tensor]:
        """W(α) = Σ_t α_t W_t for every parameter of the layer: one ``combine`` call, then
        views of the (P,) result. ``alpha`` (T,) is not checked here (``set_alpha`` does)."""
        return self._views(interpolate_members(alpha, self.members))

    def _views(self, flat: Tensor) -> dict[str, Tensor]:
        layout = self.member_layout
        if len(layout) == 1:
            ((name, (shape, _, _)),) = layout.items()
            return {name: flat.view(shape)}
        parts = torch.split(flat, [numel for _, _, numel in layout.values()])
        return {name: part.view(shape)
                for (name, (shape, _, _)), part in zip(layout.items(), parts)}

    def _current_alpha(self) -> Tensor:
        alpha = self._alpha
        if alpha is None:
            raise RuntimeError(
                f"{type(self).__name__}: no alpha is set; call fastmtl.pamal.set_alpha(model, "
                "alpha) or use `with fastmtl.pamal.use_alpha(model, alpha):` (PaMaL.loss sets "
                "it during training)")
        return alpha

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._weights is not None:  # precomputed for a whole block (use_alpha)
            return super().forward(*args, **kwargs)
        self._weights = self.interpolate(self._current_alpha())
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._weights = None

    def extra_repr(self) -> str:
        saved = self._weights  # the torch repr may read a parameter (Linear: bias is not None)
        self._weights = self._weights or self.member(0)
        try:
            return f"{super().extra_repr()}, members={self.num_members}"
        finally:
            self._weights = saved


class SubspaceLinear(SubspaceLayer, nn.Linear):
    """``nn.Linear`` with T members (see ``SubspaceLayer``)."""

    plain_class = nn.Linear


class SubspaceConv1d(SubspaceLayer, nn.Conv1d):
    """``nn.Conv1d`` with T members (see ``SubspaceLayer``)."""

    plain_class = nn.Conv1d


class SubspaceConv2d(SubspaceLayer, nn.Conv2d):
    """``nn.Conv2d`` with T members (see ``SubspaceLayer``)."""

    plain_class = nn.Conv2d


class SubspaceBatchNorm1d(SubspaceLayer, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with T members of γ, β; one shared set of running statistics."""

    plain_class = nn.BatchNorm1d


class SubspaceBatchNorm2d(SubspaceLayer, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with T members of γ, β; one shared set of running statistics."""

    plain_class = nn.BatchNorm2d


class SubspaceLayerNorm(SubspaceLayer, nn.LayerNorm):
    """``nn.LayerNorm`` with T members of γ, β (see ``SubspaceLayer``)."""

    plain_class = nn.LayerNorm


class SubspaceEmbedding(SubspaceLayer, nn.Embedding):
    """``nn.Embedding`` with T members of the table (``max_norm`` and ``sparse`` unsupported)."""

    plain_class = nn.Embedding


_CLASSES: dict[type[nn.Module], type[SubspaceLayer]] = {
    c.plain_class: c for c in (SubspaceLinear, SubspaceConv1d, SubspaceConv2d,
                               SubspaceBatchNorm1d, SubspaceBatchNorm2d, SubspaceLayerNorm,
                               SubspaceEmbedding)
}


def subspace_class(cls: type[nn.Module]) -> type[SubspaceLayer] | None:
    """The subspace class for torch layer class ``cls``, or None if it is not supported.

    Subclasses of a supported layer get a subclass made on first use (cached); those cannot be
    pickled as whole modules (their ``state_dict`` can).
    """
    if cls in _CLASSES:
        return _CLASSES[cls]
    if issubclass(cls, SubspaceLayer) or not issubclass(cls, SUPPORTED_LAYERS):
        return None
    made = type(f"Subspace{cls.__name__}", (SubspaceLayer, cls),
                {"plain_class": cls, "__module__": __name__,
                 "__doc__": f"``{cls.__name__}`` with T members (see ``SubspaceLayer``)."})
    _CLASSES[cls] = made
    return made


def subspace_layers(model: nn.Module) -> list[SubspaceLayer]:
    """The subspace layers of ``model`` (itself included), each once, in module order."""
    return [m for m in model.modules() if isinstance(m, SubspaceLayer)]
