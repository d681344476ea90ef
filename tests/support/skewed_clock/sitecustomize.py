"""A process whose wall clock is off by TESSERA_TEST_CLOCK_SKEW_S seconds (issue 19, point 7).

Python imports `sitecustomize` at start-up from the path; a `tessera node run` process
started with this folder first on PYTHONPATH and TESSERA_TEST_CLOCK_SKEW_S=600 reads every
wall-clock time 600 s ahead of the machine's: `time.time`, `time.time_ns` and
`datetime.datetime.now` (the class is replaced by a subclass before anything else imports
it). The monotonic clock, which only measures intervals, is left alone, as a real skew would
leave it. (libfaketime, the usual tool, hangs Python's threads on this system's glibc.)
Without TESSERA_TEST_CLOCK_SKEW_S this module does nothing."""

from __future__ import annotations

import os

_SKEW = os.environ.get("TESSERA_TEST_CLOCK_SKEW_S")
if _SKEW:
    import datetime
    import time

    _skew_s = float(_SKEW)
    _time, _time_ns = time.time, time.time_ns

    def _skewed_time() -> float:
        return _time() + _skew_s

    def _skewed_time_ns() -> int:
        return _time_ns() + int(_skew_s * 1e9)

    class _SkewedDatetime(datetime.datetime):
        @classmethod
        def now(cls, tz: datetime.tzinfo | None = None) -> _SkewedDatetime:  # type: ignore[override]
            return cls.fromtimestamp(_skewed_time(), tz)

        @classmethod
        def utcnow(cls) -> _SkewedDatetime:  # type: ignore[override]
            return cls.fromtimestamp(_skewed_time(), datetime.UTC).replace(tzinfo=None)

    time.time = _skewed_time
    time.time_ns = _skewed_time_ns
    datetime.datetime = _SkewedDatetime  # type: ignore[misc]
