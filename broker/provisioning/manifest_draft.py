"""The roster is the source of the manifest's member keys.

Provisioning issues every member's keys and signs the roster; the coordinator then writes
the studies. `draft_manifest` builds the manifest's member part (every site's node key,
every aggregator's signing and HPKE keys) from the roster, adds what provisioning does not
know (the sites' data stewards, the studies), and returns an unsigned manifest for
`tessera manifest sign`. Services re-check the pair at start with
`broker.provisioning.roster.check_manifest_agrees`, so a hand-edited key is caught before any round.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

from broker.provisioning.roster import Roster
from tessera.errors import ConfigError
from tessera.governance.manifest import Manifest
from tessera.governance.manifest_schema import manifest_from_dict


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def draft_manifest(
    roster: Roster,
    coordinator_key: bytes,
    stewards: Mapping[str, Sequence[tuple[str, bytes]]],
    studies: Sequence[Mapping[str, Any]],
    *,
    version: int = 1,
    coordinator_id: str = "coordinator",
) -> Manifest:
    """An unsigned manifest whose members and keys are exactly the roster's.

    `stewards` maps each site id to its stewards as (id, raw Ed25519 public key); every site
    needs one. `studies` are manifest study tables (see `tessera.governance.manifest`). ConfigError
    names a site without a steward or a steward for a site the roster does not have.
    """
    unknown = sorted(set(stewards) - set(roster.site_ids))
    if unknown:
        raise ConfigError(f"stewards given for {unknown}, which are not sites of the roster")
    sites = []
    for site_id in roster.site_ids:
        named = stewards.get(site_id, ())
        if not named:
            raise ConfigError(f"site {site_id!r} has no data steward; add one")
        sites.append({
            "id": site_id,
            "node_key": _b64(roster.member(site_id).signing_key),
            "stewards": [{"id": sid, "key": _b64(key)} for sid, key in named],
        })  # fmt: skip
    aggregators = []
    for aggregator_id in roster.aggregator_ids:
        entry = roster.member(aggregator_id)
        assert entry.hpke_key is not None  # the roster guarantees one for every aggregator
        aggregators.append({
            "id": aggregator_id, "signing_key": _b64(entry.signing_key),
            "hpke_key": _b64(entry.hpke_key),
        })  # fmt: skip
    return manifest_from_dict({
        "federation": {"id": roster.federation_id, "version": version},
        "coordinator": {"id": coordinator_id, "key": _b64(coordinator_key)},
        "sites": sites, "aggregators": aggregators, "studies": [dict(s) for s in studies],
    })  # fmt: skip
