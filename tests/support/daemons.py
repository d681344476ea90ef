"""Real node and aggregator daemons built in the test process from a provisioned federation
(`node.demo.federation.prepare_federation`: real CA, bundles, signed roster and manifest,
approvals), for what needs no broker: their HTTP endpoints, readiness checks and audit logs.

A daemon is built exactly as `tessera node run` / `tessera aggregator run` build it, from its
configuration file plus overrides; nothing connects to a broker unless the test starts it.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aggregator.config import config_from_mapping
from aggregator.daemon import AggregatorDaemon
from aggregator.setup import load_study_setup
from node.config import node_config_from_mapping
from node.daemon import NodeDaemon
from node.demo.federation import FederationSpec, PreparedFederation, prepare_federation
from node.setup import load_node_setup
from tessera.crypto.signing import load_private_key
from tessera.models.weights import weights_bytes
from tessera.settings import read_toml
from tessera.wire.release import ReleaseBundle, build_release, sign_release

SPEC = FederationSpec(sites=("site-a", "site-b"), aggregators=("agg-uni", "agg-ngo"))


def prepare(root: Path) -> PreparedFederation:
    """A provisioned two-site, two-aggregator federation under `root` (no DICOM)."""
    return prepare_federation(root, SPEC)


def _merged(document: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(document)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def node_daemon(prepared: PreparedFederation, site: str, **overrides: Any) -> NodeDaemon:
    """`site`'s node daemon, as `tessera node run` builds it, with configuration overrides."""
    path = prepared.config(site)
    document = _merged(read_toml(path), overrides)
    return NodeDaemon(load_node_setup(node_config_from_mapping(document, {}, str(path))))


def aggregator_daemon(
    prepared: PreparedFederation, aggregator: str, **overrides: Any
) -> AggregatorDaemon:
    """`aggregator`'s daemon, as `tessera aggregator run` builds it, with overrides."""
    path = prepared.config(aggregator)
    config = config_from_mapping(_merged(read_toml(path), overrides), {}, str(path))
    return AggregatorDaemon(config, load_study_setup(config))


def close_unstarted(daemon: NodeDaemon | AggregatorDaemon) -> None:
    """Release what a daemon built but never started holds (its ports and audit log)."""
    daemon.health.close()
    inference = getattr(daemon, "inference", None)
    if inference is not None:
        inference.shutdown()
    if isinstance(daemon, AggregatorDaemon) and daemon.store is not None:
        daemon.store.close()
    if daemon.audit is not None:
        daemon.audit.close()


def release_payload(prepared: PreparedFederation, version: int = 1) -> bytes:
    """A release of the study's genesis model, signed by every aggregator of the roster."""
    model = prepared.study_model()
    genesis = model.genesis()
    card = json.dumps({"version": version}).encode()
    bundle = ReleaseBundle(weights_bytes(genesis), model.export(genesis, version), card)
    release = build_release(SPEC.federation_id, SPEC.study_id, version, version, bytes(32), bundle)
    for aggregator in SPEC.aggregators:
        key = load_private_key(prepared.bundle(aggregator) / "signing.key")
        release = sign_release(release, aggregator, key)
    return release.to_bytes()


def get_json(url: str, context: ssl.SSLContext | None = None) -> tuple[int, Any]:
    """(status, parsed JSON body) of a GET, whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=30, context=context) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def failing(readyz_url: str) -> tuple[int, list[str]]:
    """(status, the failing checks' names) of a /readyz."""
    status, body = get_json(readyz_url)
    return status, list(body["failing"])
