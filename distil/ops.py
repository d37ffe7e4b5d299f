"""Public masked-token row gather (implemented in :mod:`distil._ops.masked_gather`)."""
from distil._ops.masked_gather import GATHER_DTYPES, GatherResult, check_capacity, masked_gather

__all__ = ["GatherResult", "masked_gather", "check_capacity", "GATHER_DTYPES"]
