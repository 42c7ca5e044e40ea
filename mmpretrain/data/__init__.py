"""Data: shard discovery, decoding, the webdataset stream, and builders for the bundled data."""

from mmpretrain.data.pipeline import ShardStream, Source
from mmpretrain.data.shards import NoShardsError, count_samples, expand_shards

__all__ = ["NoShardsError", "ShardStream", "Source", "count_samples", "expand_shards"]
