"""How processes run: ``distributed`` (the only module touching ``torch.distributed``; torch only, so
losses, metrics and the data stream use it), ``ddp`` and ``fsdp`` (Lightning strategies, used by
``training`` and ``commands``), ``allocator`` (the host allocator's tuning).

``distributed`` and ``allocator`` import nothing of ours; ``ddp``/``fsdp`` import ``distributed`` and ``io``.
"""
