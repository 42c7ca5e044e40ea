"""Data: the webdataset stream (``stream/``), users' data into our shards (``convert/``), the bundled
data sets (``synthetic/``) and the ``mmpretrain data NAME`` registry (``builders``).

May import: ``towers`` (a tower's preprocessing, the audio resampler), ``runtime.distributed``, ``io``.
Never Lightning or Hydra. Inside: ``stream`` < ``convert`` < ``synthetic`` < ``builders``.
"""

from mmpretrain.data.stream.pipeline import ShardStream
from mmpretrain.data.stream.shards import (
    MissingShardsError,
    NoShardsError,
    Source,
    count_samples,
    expand_shards,
)

__all__ = ["MissingShardsError", "NoShardsError", "ShardStream", "Source", "count_samples", "expand_shards"]
