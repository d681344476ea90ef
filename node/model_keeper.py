"""Which accepted model a running node trains from and serves, and what it does about a
damaged one (`node.daemon` calls it under its lock).

Every read of a stored version re-checks its files against the release's hashes
(`ModelStore.weights_bytes`, `onnx_bytes`). A version found damaged is first repaired from
its own `release.bin`, when that still verifies; otherwise it is set aside:

- training starts from the newest intact version (a round on the damaged one is then refused
  as `base-model-mismatch`, honestly), serving from the newest intact version up to the
  store's current one, and `/readyz` stays ready with a warning naming the damaged version;
- the node asks the aggregators for it again (`ReleaseRequest` on its fetch topic, at once
  and then every `RELEASE_REFETCH_INTERVAL_S`, `aggregator.release_copies`); the copy that
  comes back is verified and accepted like any release, which rewrites the damaged files,
  and the node trains from and serves it again.

A version that is intact but that ONNX Runtime cannot load is skipped for serving too (and
said so), but not fetched again: another copy of the same bytes would not load either.
"""

from __future__ import annotations

import logging

from node.errors import NodeError
from node.inference.runtime import LoadedModel, ModelSlot, load_model
from node.round.releases import ModelFileDamaged
from node.setup import NodeSetup
from tessera.limits import RELEASE_REFETCH_INTERVAL_S
from tessera.models.nets import TesseraNet
from tessera.observability.events import Event
from tessera.wire.messages import ReleaseRequest

log = logging.getLogger("tessera.node.daemon")


class ModelKeeper:
    """The node's training base and served model over its model store (module docstring)."""

    def __init__(self, setup: NodeSetup, slot: ModelSlot) -> None:
        self.setup, self.store, self.slot = setup, setup.store, slot
        self.serving: int | None = None
        self.damaged: dict[int, str] = {}  # version -> what is wrong, until repaired
        self.unusable: dict[int, str] = {}  # intact, but ONNX Runtime cannot load it
        self._next_request = 0.0  # monotonic time of the next ReleaseRequest

    def training_base(self) -> TesseraNet:
        """The newest intact accepted version's model, else the study's genesis model."""
        for record in reversed(self.store.versions()):
            version = record.version
            if version in self.damaged:
                continue
            try:
                return self.setup.model_at(version)
            except ModelFileDamaged as error:
                if self._set_aside(version, error):
                    return self.setup.model_at(version)
        return self.setup.model_at(None)

    def refresh(self) -> None:
        """Serve the newest intact, loadable version up to the store's current one."""
        target = self.store.current()
        if target is None:
            return
        for version in sorted((r.version for r in self.store.versions()), reverse=True):
            if version > target or version in self.damaged or version in self.unusable:
                continue
            if version == self.serving:
                return
            model = self._load(version)
            if model is not None:
                self._serve(version, model)
                return

    def accepted(self, version: int) -> None:
        """After a release of `version` was accepted: a damaged copy of it is now repaired."""
        if version in self.damaged and self.store.damaged(version) is None:
            del self.damaged[version]
            fields = {"version": version, "source": "aggregators"}
            log.warning(Event.MODEL_REPAIRED, extra={"fields": fields})

    def due_requests(self, now: float) -> list[ReleaseRequest]:
        """The requests to publish now for the damaged versions (none between intervals)."""
        if not self.damaged or now < self._next_request:
            return []
        self._next_request = now + RELEASE_REFETCH_INTERVAL_S
        config, study = self.setup.config, self.setup.member.study
        federation = self.setup.member.manifest.federation_id
        requests = []
        for version in sorted(self.damaged):
            record = self.store.get(version)
            if record is not None:
                requests.append(
                    ReleaseRequest(federation, study.id, record.round, config.site_id, version)
                )
        return requests

    def warnings(self) -> list[str]:
        """Sentences for `/readyz`: each damaged (its error names the fix) or unusable
        version, and what is served."""
        serving = f"serving version {self.serving}" if self.serving else "serving none"
        damaged, unusable = dict(self.damaged), dict(self.unusable)  # read from HTTP threads
        found = [f"{why}; {serving}" for _, why in sorted(damaged.items())]
        found += [f"model version {v} does not load ({why}); {serving}"
                  for v, why in sorted(unusable.items())]  # fmt: skip
        return found

    def _set_aside(self, version: int, error: ModelFileDamaged) -> bool:
        """Repair `version` from its own release.bin (True), else note it for a re-fetch."""
        if self.store.repair_from_disk(version, self.setup.member.aggregator_signing):
            fields = {"version": version, "source": "release.bin"}
            log.warning(Event.MODEL_REPAIRED, extra={"fields": fields})
            return True
        if version not in self.damaged:
            self.damaged[version] = str(error)
            self._next_request = 0.0  # ask at once
            fields = {"version": version, "reason": str(error)}
            log.error(Event.MODEL_DAMAGED, extra={"fields": fields})
        return False

    def _load(self, version: int) -> LoadedModel | None:
        try:
            data = self.store.onnx_bytes(version)
        except ModelFileDamaged as error:
            if not self._set_aside(version, error):
                return None
            data = self.store.onnx_bytes(version)
        try:
            return load_model(data)
        except NodeError as error:  # intact but not loadable: keep serving another one
            self.unusable[version] = str(error)
            fields = {"version": version, "reason": str(error)}
            log.error(Event.MODEL_UNUSABLE, extra={"fields": fields})
            return None

    def _serve(self, version: int, model: LoadedModel) -> None:
        self.slot.swap(model)
        self.serving = version
        record = self.store.get(version)
        assert record is not None
        self.setup.metrics.set_model(version, bytes.fromhex(record.model_hash))
        log.info(
            Event.MODEL_SWAPPED,
            extra={"fields": {"version": version, "pinned": self.store.pinned is not None}},
        )
