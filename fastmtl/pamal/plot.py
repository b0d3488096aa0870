"""A PNG of a Pareto front (matplotlib, an optional dependency: ``pip install matplotlib``).

The points' objectives ``objectives=(i, j)`` are drawn against each other, coloured by α_1
(α's first coordinate) when the α are known, joined in grid order for T = 2 (the paper's
line from e_1 to e_2), with the vertices e_t labelled.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from fastmtl.pamal.front import ParetoFront

__all__ = ["plot_front"]


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plot_front needs matplotlib, an optional dependency of fastmtl: "
                          "pip install matplotlib") from e
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_front(front: ParetoFront | torch.Tensor, path: str | os.PathLike, *,
               objectives: tuple[int, int] = (0, 1), labels: Sequence[str] | None = None,
               title: str | None = None) -> str:
    """Write the front (a ``ParetoFront`` or a (P, M) tensor of values) to the PNG ``path``.

    ``labels``: one name per objective (default "objective k"). Returns ``path`` as a string.
    """
    values = front.values if isinstance(front, ParetoFront) else torch.as_tensor(front)
    alphas = front.alphas if isinstance(front, ParetoFront) else None
    if values.dim() != 2 or values.shape[1] < 2:
        raise ValueError(f"plot_front: values must have shape (P, M) with M >= 2, "
                         f"got {tuple(values.shape)}")
    i, j = objectives
    if not (0 <= i < values.shape[1] and 0 <= j < values.shape[1]):
        raise ValueError(f"plot_front: objectives {objectives} out of range for "
                         f"{values.shape[1]} objectives")
    plt = _pyplot()
    x, y = values[:, i].double().tolist(), values[:, j].double().tolist()
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    try:
        if alphas is not None and alphas.shape[1] == 2:
            ax.plot(x, y, color="0.6", linewidth=1, zorder=1)
        colour = None if alphas is None else alphas[:, 0].double().tolist()
        points = ax.scatter(x, y, c=colour, cmap="viridis", zorder=2)
        if alphas is not None:
            fig.colorbar(points, ax=ax, label="α₁")
            for t in range(alphas.shape[1]):
                hits = (alphas[:, t] == 1).nonzero().flatten().tolist()
                for h in hits:
                    ax.annotate(f"e{t + 1}", (x[h], y[h]), textcoords="offset points",
                                xytext=(4, 4))
        names = list(labels) if labels is not None else [
            f"objective {k}" for k in range(values.shape[1])]
        ax.set_xlabel(names[i])
        ax.set_ylabel(names[j])
        if title:
            ax.set_title(title)
        fig.tight_layout()
        fig.savefig(os.fspath(path), format="png")
    finally:
        plt.close(fig)
    return os.fspath(path)
