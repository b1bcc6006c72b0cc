"""HM4SR workbench core: data, model, training, evaluation and introspection.

HM4SR is "Hierarchical Time-Aware Mixture of Experts for Multi-Modal Sequential
Recommendation" (Zhang et al., WWW 2025, arXiv 2501.14269).
"""

__version__ = "0.1.0"

from .allocator import keep_freed_memory as _keep_freed_memory

_keep_freed_memory()  # large CPU tensors reuse freed memory (see hm4sr_core.allocator)
