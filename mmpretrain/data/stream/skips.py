"""Bad samples: what the stream skips is counted (and the reasons kept), or raised with the shard named."""

from __future__ import annotations

from collections import Counter


class SampleError(RuntimeError):
    pass


class SkipCounter:
    """webdataset handler that counts what it skips, one sample per call, or raises with the shard named.
    ``reasons`` counts by exception type (and ``reason``, where the exception has one)."""

    #: this many failures in a row (no good sample between) stop the stream with an error: a
    #: transform or decoder that fails on every sample would otherwise spin a training stream forever.
    MAX_CONSECUTIVE = 1000

    def __init__(self, on_error: str = "skip"):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"data.on_error must be 'skip' or 'raise', not '{on_error}'")
        self.on_error = on_error
        self.pending = 0
        self.consecutive = 0
        self.reasons: Counter[str] = Counter()

    def __call__(self, exn: Exception) -> bool:
        if self.on_error == "raise":
            raise SampleError(
                f"bad sample ({type(exn).__name__}: {exn}); set data.on_error=skip to skip it"
            ) from exn
        self.pending += 1
        reason = getattr(exn, "reason", None)  # the tar reader's: one call per sample it lost
        self.reasons[f"{type(exn).__name__}: {reason}" if reason else type(exn).__name__] += 1
        self.consecutive += 1
        if self.consecutive >= self.MAX_CONSECUTIVE:
            raise SampleError(
                f"{self.consecutive} samples in a row failed and were skipped (by reason: "
                f"{dict(self.reasons)}); the last: {type(exn).__name__}: {exn}. The shards or the "
                "preprocessing are broken, not a few samples: fix that (set data.on_error=raise to stop at "
                "the first failure with its traceback)."
            ) from exn
        return True

    def ok(self) -> None:
        self.consecutive = 0

    def take(self) -> int:
        n, self.pending = self.pending, 0
        return n
