"""Readers: one module per data source, each turning files into a
:class:`hm4sr_core.data.schema.RawDataset` (original tokens, unfiltered)."""
