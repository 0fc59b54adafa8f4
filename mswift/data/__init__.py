"""Data: row formats, chat templates with loss masks, packing, streaming, indexed pretrain data.

Heavy dependencies (datasets, megatron-core) are imported where they are used.
"""
from mswift.data.encode import EncodedSample, SampleEncoder, resolve_template
from mswift.data.formats import BadRowError, Conversation, PlainText, row_to_example
from mswift.data.options import PipelineOptions
from mswift.data.packing import (
    IGNORE_INDEX,
    WindowPacker,
    block_causal_mask,
    collate_rows,
    first_fit_decreasing,
)
from mswift.data.streaming import DataPipeline

__all__ = [
    "BadRowError", "Conversation", "DataPipeline", "EncodedSample", "IGNORE_INDEX",
    "PipelineOptions", "PlainText", "SampleEncoder", "WindowPacker", "block_causal_mask",
    "collate_rows", "first_fit_decreasing", "resolve_template", "row_to_example",
]
