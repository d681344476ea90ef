"""`tessera models list|show`: the model cards of the registry, read from an aggregator's state.

`list` gives one line per registered version; `show VERSION` gives the card (rounds,
participant count, strategy and its switches, epsilon per site, validation metrics), the
lineage back to the first model (following parent hashes), the hashes, who signed, and
whether the files still match their registered hashes (`Registry.verify`).

The cards are printed as they were signed: a card never names sites where fewer than k took
part (`aggregator.model_card`), and nothing here adds a name.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from aggregator.errors import AggregatorError
from aggregator.layout import DEFAULT_STATE_DIR, StateLayout
from aggregator.records import ModelRecord
from aggregator.registry import GENESIS_PARENT, Registry
from aggregator.store import Store
from broker.provisioning.bundle import load_bundle
from tessera.errors import TesseraError
from tessera.wire.release import ModelRelease, verify_release

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def register(commands: Subparsers) -> None:
    """Add `tessera models list|show` to the `tessera` parser."""
    models = commands.add_parser("models", help="the model registry: cards, lineage, checks")
    sub = models.add_subparsers(dest="models_command", metavar="MODELS_COMMAND")
    models.set_defaults(handler=lambda _args: _usage(models))
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state",
        type=Path,
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help=f"the aggregator's state_dir (default {DEFAULT_STATE_DIR})",
    )
    common.add_argument("--study", help="the study id (needed when the state holds several)")
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    listing = sub.add_parser("list", parents=[common], help="one line per model version")
    listing.set_defaults(handler=list_command)
    show = sub.add_parser("show", parents=[common], help="one version's model card")
    show.add_argument("version", type=int, metavar="VERSION")
    show.add_argument(
        "--bundle",
        type=Path,
        metavar="DIR",
        help="a startup bundle: re-verify every aggregator's signature with its roster's keys",
    )
    show.set_defaults(handler=show_command)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _open(state: Path) -> tuple[Store, Registry]:
    """The aggregator's store and registry, without creating a state that is not there."""
    layout = StateLayout(state)
    database = layout.database
    if not database.is_file():
        raise AggregatorError(
            f"no aggregator state at {state} ({database} does not exist); pass --state with "
            "the aggregator's state_dir"
        )
    store = Store(database, layout.shares)
    return store, Registry(store, layout.registry)


def _created(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _strategy(card: dict[str, Any]) -> str:
    strategy = card["strategy"]
    text = f"{strategy['algorithm']}+{strategy['optimizer']}"
    return text + (" (adaptive)" if strategy["adaptive"] else "")


def _parent(record: ModelRecord, by_hash: dict[bytes, ModelRecord]) -> str:
    if record.parent_hash == GENESIS_PARENT:
        return "root"
    parent = by_hash.get(record.parent_hash)
    return str(parent.version) if parent else f"?{record.parent_hash.hex()[:12]}"


def _summary(
    record: ModelRecord, created_ms: int, by_hash: dict[bytes, ModelRecord]
) -> dict[str, Any]:
    card = json.loads(record.card_json)
    return {
        "study": record.study_id,
        "version": record.version,
        "parent": _parent(record, by_hash),
        "round": record.round,
        "participants": card["participants"]["count"],
        "strategy": _strategy(card),
        "created": _created(created_ms),
    }


def list_command(args: argparse.Namespace) -> int:
    """Print one line (or JSON object) per registered version, by study then version."""
    store, registry = _open(args.state)
    with store:
        index = [e for e in store.model_index() if args.study in (None, e[0])]
        rows = []
        for study in dict.fromkeys(study for study, _, _ in index):
            records = registry.list(study)
            by_hash = {r.model_hash: r for r in records}
            created = {version: ms for s, version, ms in index if s == study}
            rows += [_summary(r, created[r.version], by_hash) for r in records]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no model versions registered in {args.state}")
        return 0
    header = ("study", "version", "parent", "round", "participants", "strategy", "created")
    table = [header] + [tuple(str(row[k]) for k in header) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    return 0


def _study(store: Store, requested: str | None, state: Path) -> str:
    studies = sorted({study for study, _, _ in store.model_index()})
    if requested is not None:
        return requested
    if len(studies) == 1:
        return studies[0]
    if not studies:
        raise AggregatorError(f"no model versions are registered in {state}")
    raise AggregatorError(
        f"{state} holds models of several studies ({', '.join(studies)}); pass --study"
    )


def _lineage(record: ModelRecord, by_hash: dict[bytes, ModelRecord]) -> list[dict[str, Any]]:
    """The version itself, then each parent back to the first model (or a missing parent)."""
    chain: list[dict[str, Any]] = []
    current = record
    while True:
        chain.append(
            {
                "version": current.version,
                "round": current.round,
                "model_hash": current.model_hash.hex(),
            }
        )
        if current.parent_hash == GENESIS_PARENT:
            return chain
        parent = by_hash.get(current.parent_hash)
        # A sha256 chain cannot loop; the length bound only guards against a corrupt store.
        if parent is None or len(chain) > len(by_hash):
            chain.append({"version": None, "round": None, "model_hash": current.parent_hash.hex()})
            return chain
        current = parent


def show_details(
    registry: Registry,
    study: str,
    version: int,
    aggregator_keys: Mapping[str, Ed25519PublicKey] | None = None,
) -> dict[str, Any]:
    """Everything `show` prints: card, lineage, hashes, signers, verification result.

    With `aggregator_keys` (every aggregator's key from a verified roster), the stored
    signed release is verified again: every aggregator signed it, and its payload is these
    files. Without them, `signatures` is "not checked"."""
    records = registry.list(study)
    known = [r.version for r in records]
    if version not in known:
        raise AggregatorError(
            f"study {study} has no model version {version}; known versions: "
            f"{', '.join(map(str, known)) or 'none'}"
        )
    shown = registry.show(study, version)
    record = shown.record
    lineage = _lineage(record, {r.model_hash: r for r in records})
    try:
        registry.verify(study, version)
        verified, problem = True, None
    except AggregatorError as error:
        verified, problem = False, str(error)
    signatures = "not checked (pass --bundle)"
    if aggregator_keys is not None:
        try:
            release = ModelRelease.from_bytes(shown.release_path.read_bytes())
            verify_release(release, aggregator_keys)
            signatures = f"verified ({len(aggregator_keys)} of {len(aggregator_keys)})"
        except (TesseraError, OSError) as error:
            verified, problem = False, f"signatures do not verify ({type(error).__name__})"
            signatures = "FAILED"
    return {
        "card": shown.card,
        "lineage": lineage,
        "hashes": {
            "parent": record.parent_hash.hex(),
            "model": record.model_hash.hex(),
            "onnx": record.onnx_hash.hex(),
            "card": record.card_hash.hex(),
        },
        "signers": [signer for signer, _ in record.signatures],
        "signatures": signatures,
        "verified": verified,
        "problem": problem,
    }


def show_command(args: argparse.Namespace) -> int:
    """Print one version's card; exit 1 when its files no longer match their hashes."""
    keys = None
    if args.bundle is not None:
        roster = load_bundle(args.bundle).roster
        signing = roster.signing_keys()
        keys = {a: signing[a] for a in roster.aggregator_ids}
    store, registry = _open(args.state)
    with store:
        study = _study(store, args.study, args.state)
        details = show_details(registry, study, args.version, keys)
    if args.json:
        print(json.dumps(details, indent=2))
    else:
        print("\n".join(render(details)))
    return 0 if details["verified"] else 1


def render(details: dict[str, Any]) -> Sequence[str]:
    """The text form of `show_details`."""
    card, hashes = details["card"], details["hashes"]
    lines = [
        f"model {card['study']} version {card['version']} (federation {card['federation']})",
        f"  round:         {card['round']}",
        "  lineage:       " + " <- ".join(_link(entry) for entry in details["lineage"]),
        f"  participants:  {card['participants']['count']} "
        f"(minimum k={card['participants']['minimum']})",
        f"  strategy:      {_strategy(card)}",
    ]
    for switch in card["strategy"]["switches"]:
        lines.append(
            f"    switch in round {switch['round']}: {switch['from']} -> {switch['to']} "
            f"(dispersion {switch['dispersion']}, band {switch['lower']}..{switch['upper']}): "
            f"{switch['reason']}"
        )
    privacy = card["privacy"]
    if "epsilon_per_site" in privacy:
        per_site = privacy["epsilon_per_site"]
        lines.append("  epsilon spent: " + ("none recorded" if not per_site else ""))
        lines += [f"    {site}: {value:g}" for site, value in per_site.items()]
    else:  # fewer than k sites: the card holds only their count and the largest epsilon
        lines.append(
            f"  epsilon spent: {privacy['sites']} site(s), at most {privacy['epsilon_max']:g} "
            "(fewer than k, so not named)"
        )
    validation = card["validation"]
    lines.append("  validation:    " + ("none" if not validation else ""))
    lines += [f"    {name}: {value:g}" for name, value in validation.items()]
    lines.append(f"  architecture:  {card['model']['architecture'] or '-'}")
    lines += [f"  {name + ' hash:':<14} {value}" for name, value in hashes.items()]
    lines.append(f"  signed by:     {', '.join(details['signers'])}")
    lines.append(f"  signatures:    {details['signatures']}")
    verdict = "yes (files match the registered hashes)"
    lines.append(
        f"  verified:      {verdict if details['verified'] else 'NO: ' + details['problem']}"
    )
    return [line.rstrip() for line in lines]


def _link(entry: dict[str, Any]) -> str:
    if entry["version"] is None:
        return f"missing parent {entry['model_hash'][:12]}"
    return f"v{entry['version']} (round {entry['round']})"
