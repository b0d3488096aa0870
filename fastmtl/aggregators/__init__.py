"""Aggregators: weights from the Gram matrix K = G Gᵀ (and the losses), one file a method."""

from fastmtl.aggregators.aligned_mtl import AlignedMTL
from fastmtl.aggregators.base import Aggregator, StatefulAggregator, check_gram, check_losses
from fastmtl.aggregators.cagrad import CAGrad
from fastmtl.aggregators.cdtt import CDTT
from fastmtl.aggregators.edm import EDM
from fastmtl.aggregators.gradvac import GradVac
from fastmtl.aggregators.imtlg import IMTLG
from fastmtl.aggregators.mean import Mean
from fastmtl.aggregators.mgda import MGDA
from fastmtl.aggregators.nash_mtl import NashMTL
from fastmtl.aggregators.pcgrad import PCGrad
from fastmtl.aggregators.sum import Sum
from fastmtl.aggregators.upgrad import UPGrad

__all__ = [
    "CDTT",
    "EDM",
    "IMTLG",
    "MGDA",
    "UPGrad",
    "Aggregator",
    "AlignedMTL",
    "CAGrad",
    "GradVac",
    "Mean",
    "NashMTL",
    "PCGrad",
    "StatefulAggregator",
    "Sum",
    "check_gram",
    "check_losses",
]
