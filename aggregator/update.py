"""Turn a round's decoded aggregate into the next model: strategy, then policy.

`apply_round` is the whole of step 7 after decoding, as one pure function: flatten the base
model (canonical order), run the configured strategy (averaging + server optimiser), add the
update in float64 and cast once to float32, cut the vector back into named parameters, and
let the adaptive policy choose the next round's algorithm. Identical inputs give identical
parameter bytes at every aggregator.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from aggregator.config import StrategySettings
from aggregator.errors import StrategyError
from aggregator.strategies import (
    Aggregate,
    ServerState,
    SwitchRecord,
    apply_update,
    build_strategy,
    dispersion,
    next_algorithm,
)
from tessera.crypto.flatten import flatten, unflatten


@dataclass(frozen=True)
class RoundOutcome:
    """What a round produced: the new parameters and everything the card and log need."""

    params: dict[str, np.ndarray]
    server_state: ServerState
    algorithm: str  # used this round
    next_algorithm: str
    switch: SwitchRecord | None
    dispersion: float
    mean_loss: float  # sample-weighted validation loss reported by the participants
    participants: int


def apply_round(
    base_params: Mapping[str, np.ndarray],
    aggregate: Aggregate,
    server_state: ServerState,
    settings: StrategySettings,
    algorithm: str,
    round_number: int,
) -> RoundOutcome:
    """Apply one round's aggregate to the base model (see the module docstring)."""
    vector, manifest = flatten(base_params)
    if aggregate.sum_weighted_delta.size != vector.size:
        raise StrategyError(
            f"the aggregate has {aggregate.sum_weighted_delta.size} delta values, the base "
            f"model {vector.size} parameters; the round was announced for another model"
        )
    strategy = build_strategy(algorithm, settings.optimizer)
    update, new_state = strategy(aggregate, server_state, settings.optimizer_config())
    params = unflatten(apply_update(vector, update), manifest)
    value = dispersion(aggregate)
    if settings.adaptive:
        chosen, switch = next_algorithm(algorithm, value, round_number, settings.policy_config())
    else:
        chosen, switch = algorithm, None
    return RoundOutcome(
        params=params,
        server_state=new_state,
        algorithm=algorithm,
        next_algorithm=chosen,
        switch=switch,
        dispersion=value,
        mean_loss=aggregate.mean_loss,
        participants=aggregate.n,
    )
