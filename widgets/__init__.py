"""Figures and interactive explorers for the HM4SR workbench.

``widgets.figures``: tidy DataFrame (from :mod:`hm4sr_core.introspect`) -> plotly Figure,
all pure; :func:`~hm4sr_core.static_export.save_figure` (PNG/SVG via kaleido and a local
Chromium, or plotly JSON) is re-exported here for convenience.
``widgets.explorers``: ipywidgets + plotly explorers over those tables
(:class:`GateExplorer`, :class:`TemporalExplorer`, :class:`LossExplorer`,
:class:`EmbeddingExplorer`, :class:`RecommendationExplorer`). Widgets take tables; they never train.
"""

from hm4sr_core.static_export import save_figure

from .explorers import (EmbeddingExplorer, GateExplorer, LossExplorer, RecommendationExplorer, TemporalExplorer,
                        figure_widgets_available)

__all__ = ["EmbeddingExplorer", "GateExplorer", "LossExplorer", "RecommendationExplorer", "TemporalExplorer", "figure_widgets_available",
           "save_figure"]
