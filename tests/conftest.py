"""Shared pytest configuration: the order in which `pytest -n 2` (`make test`) runs tests.

The suite's wall time on two workers is set by its few long end-to-end tests (tests/e2e,
marked `slow`: one to four minutes each) more than by the 1,400 others. With xdist's default
`load` schedule the long tests, adjacent in the collection, were sent to one worker in one
batch; the other worker ran out of tests and sat idle for the rest of the run (measured on
the shared 2-core machine: one worker ran all eight e2e tests and ended after 1,361 s, the
other was done after 428 s). So:

- the `slow` tests and those in tests/e2e run first, the longest first (by their
  `timeout` mark, the best estimate a test gives of its length), the other tests in
  collection order after them;
- the `load` schedule hands tests out one at a time (`--maxschedchunk 1`, unless given),
  so that each worker takes the next test when it finishes one: the long tests spread over
  both workers, and the short ones fill in around them until both end together.

Neither changes what any test runs or checks; each test is still independent of the order.
"""

from __future__ import annotations

from typing import Any

import pytest


def _expected_length(item: pytest.Item) -> float:
    """For a `slow` test or one in tests/e2e, its `timeout` mark (else the suite's
    timeout); 0 for any other test."""
    if item.get_closest_marker("slow") is None and item.path.parent.name != "e2e":
        return 0.0
    mark = item.get_closest_marker("timeout")
    if mark is not None and mark.args:
        return float(mark.args[0])
    return float(item.config.getini("timeout") or 300)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The slow tests first, longest first; the rest keep their order (a stable sort)."""
    items.sort(key=lambda item: -_expected_length(item))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist's `load` schedule, one test at a time unless `--maxschedchunk` says otherwise;
    any other `--dist` is left to xdist."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScheduling

    scheduler = LoadScheduling(config, log)
    if config.getvalue("maxschedchunk") is None:
        scheduler.maxschedchunk = 1
    return scheduler
