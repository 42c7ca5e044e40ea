"""The training and validation stream: tar shards -> samples -> decoded -> preprocessed -> batches.

``tar_entries`` (a tar's entries, from a file, a stream or gzip), ``tar_reader`` (samples and their keys),
``reader`` (one source's passes and shuffle buffer), ``position`` (where a stream stands; what a checkpoint
saves), ``pipeline`` (:class:`ShardStream`), ``shards`` (discovery, counting, ``sizes.json``),
``decode``/``video`` (bytes -> values), ``collate``, ``captions`` (which caption trains in a pass),
``questions`` (a sample's VQA questions with answers),
``skips`` (bad samples counted or raised), ``seeds`` (every seed, derived in one place).

May import ``runtime.distributed``, ``io`` and ``towers`` (only the audio resampler, for writing a video's
sound track); a tower's preprocessing reaches the stream as a callable.
"""
