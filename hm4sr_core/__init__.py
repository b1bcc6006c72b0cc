"""HM4SR workbench core: data, model, training, evaluation and introspection.

HM4SR is "Hierarchical Time-Aware Mixture of Experts for Multi-Modal Sequential
Recommendation" (Zhang et al., WWW 2025, arXiv 2501.14269).

Importing the package changes nothing outside it. The workbench's programs apply their
process settings (OpenMP wait policy, glibc allocator thresholds) with one explicit call,
:func:`hm4sr_core.runtime.configure_process`; a library user may make the same call,
before importing torch.
"""

__version__ = "0.1.0"
