"""A node that does not check whether the round can represent its update, for
tests/e2e/test_e2e_degenerate_round.py (issue 19, point 9).

Python imports `sitecustomize` at start-up from the path; a `tessera node run` process started
with this folder first on PYTHONPATH and TESSERA_TEST_UNCHECKED=1 is the real node in
everything except one check: it does not refuse a round whose weight cap and precision round
its update away (`node.round.participation._check_own_update`), as a node did before that
check existed. It trains, spends its epsilon and sends its genuinely rounded update, so the
aggregators receive a degenerate sum. Without TESSERA_TEST_UNCHECKED this module does
nothing."""

from __future__ import annotations

import os

if os.environ.get("TESSERA_TEST_UNCHECKED") == "1":
    import node.round.participation as participation

    if hasattr(participation, "_check_own_update"):
        participation._check_own_update = lambda round_open, ctx: None
