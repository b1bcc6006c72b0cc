"""Figures and interactive explorers for the HM4SR workbench.

``widgets.figures``: tidy DataFrame (from :mod:`hm4sr_core.introspect`) -> plotly Figure,
plus :func:`~widgets.figures.save_figure` (PNG/SVG via kaleido and a local Chromium).
``widgets.explorers``: ipywidgets + plotly explorers over those tables
(:class:`GateExplorer`, :class:`TemporalExplorer`, :class:`LossExplorer`,
:class:`EmbeddingExplorer`, :class:`RecommendationExplorer`). Widgets take tables; they never train.
"""

from .explorers import (EmbeddingExplorer, GateExplorer, LossExplorer, RecommendationExplorer, TemporalExplorer,
                        figure_widgets_available)
from .figures import save_figure

__all__ = ["EmbeddingExplorer", "GateExplorer", "LossExplorer", "RecommendationExplorer", "TemporalExplorer", "figure_widgets_available",
           "save_figure"]
