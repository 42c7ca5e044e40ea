"""Users' data into our shard layout (``mmpretrain data shards in=...``): ``sources`` lists the rows of a
table, a folder or img2dataset tars; ``convert`` writes them as shards; ``writing`` is the shard, prompt
file and parallel-build helpers every builder (ours too) writes through.

May import ``data.stream`` and ``io``.
"""
