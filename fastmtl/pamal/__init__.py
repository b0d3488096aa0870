"""Pareto Manifold Learning (Dimitriadis, Frossard & Fleuret, "Pareto Manifold Learning:
Tackling multiple tasks via ensembles of single-task models", ICML 2023, PMLR 202:8015–8052;
arXiv:2210.09759; code ``nik-dim/pamal``).

Every layer holds T members W_1..W_T (T = number of tasks); for α on the simplex the network
runs with W(α) = Σ_t α_t W_t. Training draws one α ~ Dir(p·1) per forward and minimises
Σ_t α_t L_t(θ(α)) (optionally over W forwards per batch with an ordering regulariser), so one
run yields a continuous front of models, one per α, traded off at inference::

    import fastmtl as fm

    net = fm.pamal.to_subspace(net, num_tasks=2)          # in place; make the optimizer after
    pm = fm.pamal.PaMaL(net, num_tasks=2, concentration=1.0, window=3, reg_lambda=1.0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for x, (y1, y2) in loader:
        loss = pm.loss(x, (y1, y2), [loss_fn_1, loss_fn_2])  # outputs (head1, head2)
        opt.zero_grad(); loss.backward(); opt.step()

    front = fm.pamal.pareto_front(net, evaluate, num_points=11)   # the paper's grid
    hv = fm.pamal.hypervolume(front.values, reference=[1.0, 1.0])
    plain = fm.pamal.extract(net, [0.3, 0.7])             # an ordinary nn.Module at α

Modules: ``layers`` (subspace layers), ``convert`` (``to_subspace``, ``extract``), ``alpha``
(checks, Dirichlet sampling, ``set_alpha``/``use_alpha``), ``objective`` (``PaMaL``),
``regularizer``, ``inner`` (inner weightings), ``batchnorm`` (``recompute_bn``), ``front``
(grids, ``pareto_front``), ``hypervolume``, ``plot`` (``plot_front``, needs matplotlib).
"""

from fastmtl.pamal.alpha import check_alpha, get_alpha, sample_alpha, set_alpha, use_alpha
from fastmtl.pamal.batchnorm import recompute_bn
from fastmtl.pamal.convert import extract, to_subspace
from fastmtl.pamal.front import ParetoFront, pareto_front, simplex_grid
from fastmtl.pamal.hypervolume import hypervolume
from fastmtl.pamal.inner import INNER_METHODS
from fastmtl.pamal.layers import (
    SUPPORTED_LAYERS,
    SubspaceBatchNorm1d,
    SubspaceBatchNorm2d,
    SubspaceConv1d,
    SubspaceConv2d,
    SubspaceEmbedding,
    SubspaceLayer,
    SubspaceLayerNorm,
    SubspaceLinear,
    subspace_layers,
)
from fastmtl.pamal.objective import PaMaL
from fastmtl.pamal.plot import plot_front
from fastmtl.pamal.regularizer import DIRECTIONS, ordering_regularizer

__all__ = [
    "DIRECTIONS",
    "INNER_METHODS",
    "SUPPORTED_LAYERS",
    "PaMaL",
    "ParetoFront",
    "SubspaceBatchNorm1d",
    "SubspaceBatchNorm2d",
    "SubspaceConv1d",
    "SubspaceConv2d",
    "SubspaceEmbedding",
    "SubspaceLayer",
    "SubspaceLayerNorm",
    "SubspaceLinear",
    "check_alpha",
    "extract",
    "get_alpha",
    "hypervolume",
    "ordering_regularizer",
    "pareto_front",
    "plot_front",
    "recompute_bn",
    "sample_alpha",
    "set_alpha",
    "simplex_grid",
    "subspace_layers",
    "to_subspace",
    "use_alpha",
]
