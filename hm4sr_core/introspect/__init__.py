"""Model outputs -> tidy pandas DataFrames, for the notebooks and the explorers in ``widgets``.

What lives here (docs/model.md section 6, "where to look"), one module per question:

- :mod:`.gates`: Interactive-MoE gates g_s per stream and position (paper section 3.2):
  :func:`gate_table`, summarised by :func:`expert_usage`, :func:`gate_by_category`,
  :func:`dominant_expert`; Temporal-MoE gates r per position (section 3.3):
  :func:`temporal_gate_table`.
- :mod:`.temporal`: what the model does with time. The interval table at the buckets
  actually used (a one-day gap lands in bucket ~1641 = floor(100 log2 86401) + 2; the ones
  below are never reached with day-granular data): :func:`used_buckets`,
  :func:`interval_table`; the absolute-time embedding with and without normalised time
  (defect 2): :func:`absolute_time_embedding`, :func:`compare_absolute_time`; the temporal
  gate on a grid of (gap, date) with no data at all: :func:`temporal_gate_curve`,
  :func:`time_embedding_at`; whether time is used at all: :func:`time_control_table`
  (real / shuffled / zeroed timestamps).
- :mod:`.losses`: each named loss per step and its share of the weighted total:
  :func:`loss_table`, :func:`smooth`; how hard each loss pulls on the shared weights:
  :func:`gradient_shares`.
- :mod:`.atlas`: item representations and a 2-D atlas of them: :func:`item_embeddings`,
  :func:`umap_projection`, :func:`atlas_table`.

Every name is importable from ``hm4sr_core.introspect`` itself, as the notebooks and the
explorers do. Nothing here plots or trains; every function puts the model in eval mode
(dropout off) for its forward passes and restores the mode it found.
"""

from ._common import PART_NAMES, SECONDS_PER_DAY, TIME_MODES
from .atlas import UMAP_MIN_POINTS, atlas_table, item_embeddings, umap_projection
from .gates import dominant_expert, expert_usage, gate_by_category, gate_table, temporal_gate_table
from .losses import gradient_shares, loss_table, smooth
from .temporal import (
    absolute_time_embedding,
    bucket_start_seconds,
    compare_absolute_time,
    gap_bucket,
    interval_table,
    temporal_gate_curve,
    time_control_table,
    time_embedding_at,
    used_buckets,
)

__all__ = [
    "PART_NAMES", "SECONDS_PER_DAY", "TIME_MODES", "UMAP_MIN_POINTS",
    "gate_table", "temporal_gate_table", "expert_usage", "gate_by_category", "dominant_expert",
    "gap_bucket", "bucket_start_seconds", "used_buckets", "interval_table", "absolute_time_embedding",
    "compare_absolute_time", "temporal_gate_curve", "time_embedding_at", "time_control_table",
    "loss_table", "smooth", "gradient_shares",
    "item_embeddings", "umap_projection", "atlas_table",
]
