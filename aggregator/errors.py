"""Errors raised by the aggregator package.

Each says what failed, the value, and the fix. The daemon logs them; the ones that end a
round carry a `reason` that is safe to publish in a RoundAbort (counts, never site names).
"""

from tessera.errors import ConfigError, TesseraError


class AggregatorError(TesseraError):
    """Base class of the aggregator package's errors."""


class TransitionRejected(AggregatorError):
    """A round event that the round's current stage does not allow."""

    def __init__(self, round_number: int, stage: str, event: str, allowed: tuple[str, ...]):
        self.round_number = round_number
        self.stage = stage
        self.event = event
        self.allowed = allowed
        options = ", ".join(allowed) if allowed else "none (the round is over)"
        super().__init__(
            f"round {round_number}: event {event!r} is not allowed in stage {stage}; "
            f"events allowed there: {options}. A late or repeated message is dropped; "
            "anything else is a bug in the caller"
        )


class AgreementFailed(AggregatorError):
    """The participant set cannot be agreed; the round must abort with `reason`."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


class PartialSumRefused(AggregatorError):
    """The honest-aggregator rule refuses to publish a partial sum for this request."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


class BaseModelSpent(AggregatorError):
    """The leader will not open a round on a base model already summed without a release
    while a node of that sum is missing: no honest aggregator would sum a retry without it
    (agreement.check_retry_rule), so the round could only cost the nodes epsilon."""


class PartialSumRejected(AggregatorError):
    """A received partial sum does not belong to this round's agreed set or layout."""


class AggregateRefused(AggregatorError):
    """The decoded aggregate is not a sum that honest nodes under the round's terms can give
    (aggregator.aggregate_check), or one whose updates rounded away (precision): the round
    must abort with `reason` and release nothing. `part` names the part of the update vector
    (weight, delta, loss, squared-norm, range, layout, precision), `figure` its offending
    value."""

    def __init__(self, part: str, figure: float, detail: str):
        self.part = part
        self.figure = figure
        self.reason = f"aggregate refused ({part}): {detail}"
        super().__init__(self.reason)


class MessageRejected(AggregatorError):
    """A verified message that does not fit this aggregator's state: wrong sender role,
    wrong topic, not the current round, or out of order. Logged and dropped."""


class ShareRejected(AggregatorError, ValueError):
    """A share cannot be accumulated: wrong length, wrong kind, or the round is finalised."""


class DuplicateShare(AggregatorError):
    """A second share from the same node in the same round; the first copy was kept."""

    def __init__(self, round_number: int, node_id: str):
        self.round_number = round_number
        self.node_id = node_id
        super().__init__(
            f"round {round_number}: a second share from node {node_id!r} was dropped; "
            "the first copy wins (a QoS 1 redelivery or a replay)"
        )


class StoreError(AggregatorError):
    """The durable state store refused an operation or found an inconsistency."""


class RegistryError(AggregatorError):
    """A model version cannot be registered or read back."""


class StrategyError(AggregatorError, ValueError):
    """A strategy or server optimiser got an input it cannot use."""


class AggregatorConfigError(ConfigError, AggregatorError):
    """The aggregator's configuration is invalid; the message names the key and the fix."""
