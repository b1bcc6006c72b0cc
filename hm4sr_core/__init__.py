"""HM4SR workbench core: data, model, training, evaluation and introspection.

HM4SR is "Hierarchical Time-Aware Mixture of Experts for Multi-Modal Sequential
Recommendation" (Zhang et al., WWW 2025, arXiv 2501.14269).
"""

__version__ = "0.1.0"

from . import openmp as _openmp

_openmp.apply()  # before torch is imported: how long idle OpenMP threads spin (see hm4sr_core.openmp)

from .allocator import keep_freed_memory as _keep_freed_memory  # noqa: E402

_keep_freed_memory()  # large CPU tensors reuse freed memory (see hm4sr_core.allocator)
