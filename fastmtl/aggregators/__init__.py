"""Aggregators: weights from the Gram matrix K = G Gᵀ (and the losses), one file a method."""

from fastmtl.aggregators.base import Aggregator, StatefulAggregator, check_gram, check_losses
from fastmtl.aggregators.mean import Mean
from fastmtl.aggregators.mgda import MGDA
from fastmtl.aggregators.sum import Sum

__all__ = [
    "MGDA",
    "Aggregator",
    "Mean",
    "StatefulAggregator",
    "Sum",
    "check_gram",
    "check_losses",
]
