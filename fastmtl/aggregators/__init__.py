"""Aggregators: weights from the Gram matrix K = G Gᵀ (and the losses), one file a method."""

from fastmtl.aggregators.base import Aggregator, StatefulAggregator, check_gram, check_losses
from fastmtl.aggregators.cdtt import CDTT
from fastmtl.aggregators.gradvac import GradVac
from fastmtl.aggregators.mean import Mean
from fastmtl.aggregators.mgda import MGDA
from fastmtl.aggregators.pcgrad import PCGrad
from fastmtl.aggregators.sum import Sum

__all__ = [
    "CDTT",
    "MGDA",
    "Aggregator",
    "GradVac",
    "Mean",
    "PCGrad",
    "StatefulAggregator",
    "Sum",
    "check_gram",
    "check_losses",
]
