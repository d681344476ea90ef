"""A late site for tests/e2e/test_e2e_hostile_intake.py (issue 19, point 8).

Python imports `sitecustomize` at start-up from the path; a `tessera node run` process
started with this folder first on PYTHONPATH and TESSERA_TEST_LATE=1 is the real node in
everything, except that it seals its shares only once the round's deadline has passed by
two seconds (as a slow site would), so every aggregator has closed collection without them.
Without TESSERA_TEST_LATE this module does nothing."""

from __future__ import annotations

import os

if os.environ.get("TESSERA_TEST_LATE") == "1":
    import time
    from typing import Any

    import node.round.participation as participation

    _seal_shares = participation.seal_shares

    def _late(round_open: Any, *args: Any, **kwargs: Any) -> Any:
        time.sleep(max(0.0, round_open.deadline_ms / 1000 + 2.0 - time.time()))
        return _seal_shares(round_open, *args, **kwargs)

    participation.seal_shares = _late  # type: ignore[assignment]
