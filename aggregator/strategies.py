"""Aggregation strategies as composable functions, and the adaptive FedAvg/FedSGD policy.

A strategy is a function `(aggregate, server_state, config) -> (update, new_server_state)`.
It is built from two parts: an averaging step (the weighted mean of the clients' deltas) and
an optional server optimiser applied to that mean (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021, Algorithm 2; FedAvgM from Hsu et al. 2019). `compose` joins them,
`build_strategy` picks them by name from a fixed table (no class paths in configuration).

Determinism: every operation is float64 and elementwise (IEEE add, multiply, divide, sqrt,
sign are exactly rounded), and the result is cast to float32 once, at the end. Aggregators
that decode the same aggregate therefore compute identical weight bytes. The two reductions
(the norms in `dispersion`) use numpy's fixed pairwise order; they only steer the policy.

Inputs come from the decoded ring vector, laid out by `tessera.crypto.update_layout`
(`aggregate_from_vector`): `sum_weighted_delta` = sum_i w_i d_i, `sum_weight` = sum_i w_i,
`sum_weighted_loss` = sum_i w_i loss_i, `sum_sq_norm` = sum_i w_i |d_i|^2, where d_i is node
i's clipped delta and w_i its capped, scaled sample count. Weighting the squared norm by w_i
makes `dispersion` the weighted variance of the deltas around their weighted mean.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from aggregator.errors import StrategyError
from tessera.crypto.update_layout import split_update_vector
from tessera.wire.messages import ALGORITHMS

OPTIMIZERS = ("none", "fedavgm", "fedadam", "fedyogi")


@dataclass(frozen=True)
class Aggregate:
    """The decoded sum of one round's update vectors (see the module docstring)."""

    sum_weighted_delta: np.ndarray
    sum_weight: float
    sum_weighted_loss: float
    sum_sq_norm: float
    n: int

    def __post_init__(self) -> None:
        if self.n < 1:
            raise StrategyError(f"aggregate of {self.n} nodes; a round needs at least one")
        if not (math.isfinite(self.sum_weight) and self.sum_weight > 0):
            raise StrategyError(
                f"sum of sample weights is {self.sum_weight}; it must be finite and positive "
                "(every node adds its sample count)"
            )
        delta = np.asarray(self.sum_weighted_delta, dtype=np.float64)
        if delta.ndim != 1 or not np.all(np.isfinite(delta)):
            raise StrategyError("sum_weighted_delta must be a finite 1-D vector")
        object.__setattr__(self, "sum_weighted_delta", delta)

    @property
    def mean_loss(self) -> float:
        """The sample-weighted mean validation loss of the participants."""
        return self.sum_weighted_loss / self.sum_weight


def aggregate_from_vector(decoded: np.ndarray, n: int) -> Aggregate:
    """Map the decoded sum of `n` nodes' update vectors (tessera.crypto.update_layout) onto an
    Aggregate; StrategyError if the vector is too short to hold the layout."""
    try:
        parts = split_update_vector(decoded)
    except ValueError as exc:
        raise StrategyError(str(exc)) from None
    return Aggregate(
        parts.weighted_delta, parts.weight, parts.weighted_loss, parts.weighted_sq_norm, n
    )


@dataclass(frozen=True)
class StrategyConfig:
    """Hyperparameters of the server side. Defaults follow Reddi et al. 2021 and Flower."""

    server_learning_rate: float = 1.0  # eta for "none" and "fedavgm"
    adaptive_learning_rate: float = 0.1  # eta for fedadam / fedyogi
    momentum: float = 0.9  # FedAvgM's beta
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3  # adaptivity: v starts at tau**2, the step divides by sqrt(v) + tau

    def __post_init__(self) -> None:
        for name in ("server_learning_rate", "adaptive_learning_rate", "tau"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise StrategyError(f"strategy {name} is {value}; it must be positive")
        for name in ("momentum", "beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise StrategyError(f"strategy {name} is {value}; it must be in [0, 1)")


@dataclass(frozen=True)
class ServerState:
    """The server optimiser's memory between rounds (m: first moment, v: second moment)."""

    step: int = 0
    m: np.ndarray | None = None
    v: np.ndarray | None = None


Strategy = Callable[[Aggregate, ServerState, StrategyConfig], tuple[np.ndarray, ServerState]]
Optimizer = Callable[[np.ndarray, ServerState, StrategyConfig], tuple[np.ndarray, ServerState]]


def fedavg(
    aggregate: Aggregate, state: ServerState, config: StrategyConfig
) -> tuple[np.ndarray, ServerState]:
    """FedAvg: the sample-weighted mean of the clients' deltas (McMahan et al. 2017)."""
    del config
    mean: np.ndarray = aggregate.sum_weighted_delta / aggregate.sum_weight
    return mean, state


def fedsgd(
    aggregate: Aggregate, state: ServerState, config: StrategyConfig
) -> tuple[np.ndarray, ServerState]:
    """FedSGD: the sample-weighted mean of one-step deltas (-lr * gradient) of the clients.

    On the server this is the same weighted mean as FedAvg; what differs is the client plan
    in RoundOpen (one local step instead of several epochs). It is a separate name so that
    the model card and the audit log say which one a round used.
    """
    return fedavg(aggregate, state, config)


def server_sgd(
    delta: np.ndarray, state: ServerState, config: StrategyConfig
) -> tuple[np.ndarray, ServerState]:
    """No server optimiser: x <- x + eta * delta (eta = 1 is plain FedAvg)."""
    return config.server_learning_rate * delta, ServerState(step=state.step + 1)


def fedavgm(
    delta: np.ndarray, state: ServerState, config: StrategyConfig
) -> tuple[np.ndarray, ServerState]:
    """FedAvgM (Hsu et al. 2019): m <- beta m + delta; x <- x + eta m."""
    m = _moment(state.m, delta, 0.0)
    m = config.momentum * m + delta
    return config.server_learning_rate * m, ServerState(step=state.step + 1, m=_frozen(m))


def fedadam(
    delta: np.ndarray, state: ServerState, config: StrategyConfig
) -> tuple[np.ndarray, ServerState]:
    """FedAdam (Reddi et al. 2021, Alg. 2): v <- b2 v + (1-b2) delta^2."""
    m, v = _moments(delta, state, config)
    v = config.beta2 * v + (1.0 - config.beta2) * np.square(delta)
    return _adaptive_step(m, v, state, config)


def fedyogi(
    delta: np.ndarray, state: ServerState, config: StrategyConfig
) -> tuple[np.ndarray, ServerState]:
    """FedYogi (Reddi et al. 2021, Alg. 2): v <- v - (1-b2) delta^2 sign(v - delta^2)."""
    m, v = _moments(delta, state, config)
    squared = np.square(delta)
    v = v - (1.0 - config.beta2) * squared * np.sign(v - squared)
    return _adaptive_step(m, v, state, config)


def _moments(
    delta: np.ndarray, state: ServerState, config: StrategyConfig
) -> tuple[np.ndarray, np.ndarray]:
    """m updated for this step, and v as it was (initialised to tau^2 per the paper)."""
    m = config.beta1 * _moment(state.m, delta, 0.0) + (1.0 - config.beta1) * delta
    v = _moment(state.v, delta, config.tau**2)
    return m, v


def _adaptive_step(
    m: np.ndarray, v: np.ndarray, state: ServerState, config: StrategyConfig
) -> tuple[np.ndarray, ServerState]:
    """x <- x + eta m / (sqrt(v) + tau), with the new moments kept."""
    update = config.adaptive_learning_rate * m / (np.sqrt(v) + config.tau)
    return update, ServerState(step=state.step + 1, m=_frozen(m), v=_frozen(v))


def _moment(previous: np.ndarray | None, delta: np.ndarray, initial: float) -> np.ndarray:
    """The stored moment, or a fresh one filled with `initial`; shapes must match."""
    if previous is None:
        return np.full(delta.shape, initial, dtype=np.float64)
    if previous.shape != delta.shape:
        raise StrategyError(
            f"server optimiser state has shape {previous.shape}, the update {delta.shape}; "
            "the model layout changed, so start the optimiser from a fresh ServerState"
        )
    return previous


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def compose(averaging: Strategy, optimizer: Optimizer) -> Strategy:
    """A strategy that averages, then hands the mean delta to a server optimiser."""

    def strategy(
        aggregate: Aggregate, state: ServerState, config: StrategyConfig
    ) -> tuple[np.ndarray, ServerState]:
        delta, state = averaging(aggregate, state, config)
        return optimizer(delta, state, config)

    strategy.__name__ = f"{averaging.__name__}+{optimizer.__name__}"
    strategy.__doc__ = f"{averaging.__name__} averaging, then the {optimizer.__name__} server step."
    return strategy


_AVERAGING: Mapping[str, Strategy] = MappingProxyType({"fedavg": fedavg, "fedsgd": fedsgd})
_OPTIMIZERS: Mapping[str, Optimizer] = MappingProxyType(
    {"none": server_sgd, "fedavgm": fedavgm, "fedadam": fedadam, "fedyogi": fedyogi}
)


def build_strategy(algorithm: str, optimizer: str) -> Strategy:
    """The strategy for a round: `algorithm` in ALGORITHMS, `optimizer` in OPTIMIZERS."""
    if algorithm not in _AVERAGING:
        raise StrategyError(f"algorithm {algorithm!r} is unknown; use one of {ALGORITHMS}")
    if optimizer not in _OPTIMIZERS:
        raise StrategyError(f"server optimiser {optimizer!r} is unknown; use one of {OPTIMIZERS}")
    return compose(_AVERAGING[algorithm], _OPTIMIZERS[optimizer])


def apply_update(weights: np.ndarray, update: np.ndarray) -> np.ndarray:
    """New float32 weights: float64 addition, one round-to-nearest cast at the end."""
    if weights.shape != update.shape:
        raise StrategyError(
            f"weights have shape {weights.shape} but the update {update.shape}; "
            "decode the aggregate with the base model's flat layout"
        )
    result: np.ndarray = weights.astype(np.float64) + update
    if not np.all(np.isfinite(result)):
        raise StrategyError("the update makes weights non-finite; lower the server learning rate")
    new_weights: np.ndarray = result.astype(np.float32)
    return new_weights


# --- The adaptive policy (docs/architecture.md, section 3, step 7) ---------------------------


@dataclass(frozen=True)
class PolicyConfig:
    """Hysteresis band of the adaptive policy, on the normalised dispersion (`dispersion`:
    1 is the level of independent updates, e.g. updates drowned in DP noise; keep 1 inside
    the band so that noise alone never switches the algorithm)."""

    lower: float = 0.5  # at or below: next round FedAvg (updates clearly aligned)
    upper: float = 2.0  # above: next round FedSGD (updates clearly opposed)

    def __post_init__(self) -> None:
        if not (0.0 <= self.lower <= self.upper and math.isfinite(self.upper)):
            raise StrategyError(
                f"adaptive thresholds lower={self.lower}, upper={self.upper}; "
                "need 0 <= lower <= upper, both finite"
            )


@dataclass(frozen=True)
class SwitchRecord:
    """One change of algorithm, with the numbers behind it, for the audit log and card."""

    round: int
    previous: str
    chosen: str
    dispersion: float
    lower: float
    upper: float
    reason: str = field(default="")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (an infinite dispersion becomes the string "inf")."""
        value: float | str = self.dispersion if math.isfinite(self.dispersion) else "inf"
        return {
            "round": self.round,
            "from": self.previous,
            "to": self.chosen,
            "dispersion": value,
            "lower": self.lower,
            "upper": self.upper,
            "reason": self.reason,
        }


def dispersion(aggregate: Aggregate) -> float:
    """Weighted variance of the deltas over the squared norm of their weighted mean, in units
    of its value for independent updates (divided by n - 1).

    From secret-shared sums only: var = Q/W - |S/W|^2 with Q = sum w|d|^2, S = sum w d. It is
    0 when every client sent the same delta, and grows as they disagree. A zero mean with
    a non-zero spread is infinitely dispersed; all-zero deltas, or a single client, give 0.

    Why n - 1: for n equally weighted updates of equal norm and mean pairwise cosine rho,
    var / |mean|^2 = (n - 1)(1 - rho) / (1 + (n - 1) rho). Independent updates (rho = 0)
    give n - 1, whatever the cohort size, and DP-SGD noise makes updates independent: each
    node adds its own Gaussian noise, which dominates a small model's delta (the demo's
    spot-cnn-v1 at noise 0.5 measured 1.96..2.02 with n = 3, i.e. pure noise). Dividing by
    n - 1 puts that level at 1 for every n: below 1 the clients agree more than independent
    updates do, above 1 they pull in opposite directions (rho < 0, the drift FedSGD is for).
    A band that contains 1 (PolicyConfig's 0.5..2) therefore keeps the current algorithm
    when noise drowns the clients' signal, instead of reading the noise as drift. The noise
    energy itself cannot be subtracted: it depends on each site's noise multiplier, batch
    size and sample count, which the site decides and the aggregators never see. (With
    unequal weights the independent level is W^2 / sum w^2 - 1 <= n - 1; sum w^2 is not in
    the aggregate, so n - 1 is used.)
    """
    if aggregate.n < 2:
        return 0.0
    mean = aggregate.sum_weighted_delta / aggregate.sum_weight
    mean_sq = float(np.sum(np.square(mean)))
    variance = max(aggregate.sum_sq_norm / aggregate.sum_weight - mean_sq, 0.0)
    if mean_sq == 0.0:
        return math.inf if variance > 0.0 else 0.0
    return variance / mean_sq / (aggregate.n - 1)


def next_algorithm(
    current: str, value: float, round_number: int, config: PolicyConfig
) -> tuple[str, SwitchRecord | None]:
    """The algorithm for the next round, and a SwitchRecord when it differs from `current`.

    Above `upper` -> FedSGD, at or below `lower` -> FedAvg, in between -> keep `current`
    (hysteresis, so the policy does not flap around one threshold).
    """
    if current not in ALGORITHMS:
        raise StrategyError(f"current algorithm {current!r} is unknown; use one of {ALGORITHMS}")
    if math.isnan(value):
        raise StrategyError("dispersion is NaN; the aggregate is malformed")
    if value > config.upper:
        chosen, why = "fedsgd", f"dispersion {value:.6g} > upper threshold {config.upper:g}"
    elif value <= config.lower:
        chosen, why = "fedavg", f"dispersion {value:.6g} <= lower threshold {config.lower:g}"
    else:
        return current, None
    if chosen == current:
        return current, None
    record = SwitchRecord(
        round=round_number,
        previous=current,
        chosen=chosen,
        dispersion=value,
        lower=config.lower,
        upper=config.upper,
        reason=f"{why}: next round {chosen}",
    )
    return chosen, record


# --- Persisting the server state -----------------------------------------------------------


def server_state_to_bytes(state: ServerState) -> bytes:
    """Encode a ServerState as safetensors (exact float64 moments, the step in metadata)."""
    tensors = {name: np.ascontiguousarray(value) for name in ("m", "v")
               if (value := getattr(state, name)) is not None}  # fmt: skip
    return save(tensors, metadata={"format": "tessera-server-state-v1", "step": str(state.step)})


def server_state_from_bytes(data: bytes) -> ServerState:
    """Decode what `server_state_to_bytes` wrote; StrategyError on anything else."""
    try:
        tensors = load(data)
        header_length = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_length]).get("__metadata__", {})
        step = int(metadata["step"])
    except (SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise StrategyError(
            f"stored server optimiser state is unreadable ({exc}); "
            "delete it to restart the optimiser from zero"
        ) from None
    if metadata.get("format") != "tessera-server-state-v1" or step < 0:
        raise StrategyError("stored server optimiser state has an unknown format")
    return ServerState(
        step=step,
        m=_frozen(tensors["m"].astype(np.float64)) if "m" in tensors else None,
        v=_frozen(tensors["v"].astype(np.float64)) if "v" in tensors else None,
    )
