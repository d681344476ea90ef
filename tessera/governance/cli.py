"""`tessera manifest ...`, `tessera approve` and `tessera audit ...`: thin wrappers over
tessera.governance.manifest, tessera.governance.approvals and tessera.governance.audit."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import sys
from pathlib import Path

from tessera.crypto.signing import key_fingerprint, load_private_key, load_public_key
from tessera.errors import ConfigError
from tessera.governance.approvals import approve_study, save_approval
from tessera.governance.audit import Anchor, export, verify
from tessera.governance.manifest import (
    Study,
    canonical_bytes,
    check_successor,
    decode_key,
    diff,
    load_manifest,
    save_manifest,
    sign_manifest,
    study_hash,
    verify_manifest,
)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the governance sub-commands to the `tessera` parser."""
    manifest = commands.add_parser("manifest", help="create, sign, show, verify, diff manifests")
    sub = manifest.add_subparsers(dest="manifest_command", metavar="ACTION", required=True)
    create = sub.add_parser("create", help="validate a draft and write it as an unsigned manifest")
    create.add_argument("draft", type=Path, help="the manifest TOML as written by hand")
    create.add_argument("--out", type=Path, required=True, help="where to write the manifest")
    create.add_argument(
        "--previous", type=Path, help="the current manifest: check the new version is newer"
    )
    create.set_defaults(handler=manifest_create)
    sign = sub.add_parser("sign", help="sign a manifest with the coordinator's key")
    sign.add_argument("manifest", type=Path)
    sign.add_argument("--key", type=Path, required=True, help="the coordinator's PEM key")
    sign.add_argument("--out", type=Path, help="default: sign the file in place")
    sign.set_defaults(handler=manifest_sign)
    show = sub.add_parser("show", help="print a manifest's terms")
    show.add_argument("manifest", type=Path)
    show.add_argument("--canonical", action="store_true", help="print the signed bytes")
    show.set_defaults(handler=manifest_show)
    check = sub.add_parser("verify", help="check the coordinator's signature")
    check.add_argument("manifest", type=Path)
    check.add_argument("--coordinator-key", help="the pinned coordinator key (base64 or hex)")
    check.set_defaults(handler=manifest_verify)
    compare = sub.add_parser("diff", help="list what changed between two manifests")
    compare.add_argument("old", type=Path)
    compare.add_argument("new", type=Path)
    compare.set_defaults(handler=manifest_diff)

    approve = commands.add_parser("approve", help="a data steward approves a study for a site")
    approve.add_argument("--manifest", type=Path, required=True)
    approve.add_argument("--study", required=True, help="the study id")
    approve.add_argument("--site", required=True, help="the steward's site id")
    approve.add_argument("--key", type=Path, required=True, help="the steward's PEM key")
    approve.add_argument("--out", type=Path, required=True, help="the approval file to write")
    approve.add_argument("--coordinator-key", help="the pinned coordinator key (base64 or hex)")
    approve.set_defaults(handler=approve_command)

    audit = commands.add_parser("audit", help="verify or export an audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    audit_verify = audit_sub.add_parser("verify", help="check the hash chain")
    audit_verify.add_argument("log", type=Path)
    audit_verify.add_argument("--anchor", help="SEQ:HASH kept apart from the log")
    audit_verify.set_defaults(handler=audit_verify_command)
    audit_export = audit_sub.add_parser("export", help="write verified entries as JSON lines")
    audit_export.add_argument("log", type=Path)
    audit_export.add_argument("--out", type=Path, required=True)
    audit_export.add_argument("--kind", action="append", help="only this kind (repeatable)")
    audit_export.add_argument("--anchor", help="SEQ:HASH kept apart from the log")
    audit_export.set_defaults(handler=audit_export_command)


def fingerprint(raw: bytes) -> str:
    """A short, stable name for a raw public key (tessera.crypto.signing's fingerprint)."""
    return key_fingerprint(load_public_key(raw))


def manifest_create(args: argparse.Namespace) -> int:
    """Validate a draft and write it in Tessera's layout, unsigned."""
    manifest = load_manifest(args.draft)
    if manifest.signature is not None:
        print("note: dropping the draft's [signature]; sign the new manifest again")
    if args.previous is not None:
        previous = load_manifest(args.previous)
        check_successor(previous, manifest)
        for change in diff(previous, manifest):
            print(f"  {change}")
    unsigned = dataclasses.replace(manifest, signature=None)
    save_manifest(unsigned, args.out)
    print(
        f"wrote {args.out}: federation {manifest.federation_id} version {manifest.version}, "
        f"{len(manifest.sites)} sites, {len(manifest.aggregators)} aggregators, "
        f"{len(manifest.studies)} studies (unsigned: run `tessera manifest sign`)"
    )
    return 0


def manifest_sign(args: argparse.Namespace) -> int:
    """Sign with the coordinator's key, in place or to --out."""
    signed = sign_manifest(load_manifest(args.manifest), load_private_key(args.key))
    out = args.out or args.manifest
    save_manifest(signed, out)
    digest = hashlib.sha256(canonical_bytes(signed)).hexdigest()
    print(f"signed {out}: federation {signed.federation_id} version {signed.version}")
    print(f"canonical sha256 {digest}, coordinator {fingerprint(signed.coordinator.key)}")
    return 0


def describe_study(study: Study) -> list[str]:
    """The lines a steward reads before approving."""
    pre = " ".join(f"{k}={v}" for k, v in study.preprocessing)
    audit = "not required"
    if study.privacy_audit is not None:
        limit = study.privacy_audit.max_tpr_at_0_1pct_fpr
        audit = f"required, release held if attack TPR at 0.1% FPR > {limit} at any site"
    return [
        f"study {study.id}  (hash {study_hash(study).hex()})",
        f"  purpose: {study.purpose}",
        f"  labels: {', '.join(study.labels)}",
        f"  architectures: {', '.join(study.architectures)}",
        f"  k >= {study.min_participants}, at most {study.max_rounds} rounds, "
        f"clip norm {study.clip_norm}",
        f"  DP per site: epsilon {study.dp.epsilon}, delta {study.dp.delta}",
        f"  expires: {study.expires} (runs through that day, UTC)",
        f"  preprocessing: {pre}",
        f"  privacy audit: {audit}",
    ]


def manifest_show(args: argparse.Namespace) -> int:
    """Print the terms, or the canonical bytes that are signed."""
    manifest = load_manifest(args.manifest)
    if args.canonical:
        sys.stdout.write(canonical_bytes(manifest).decode("ascii") + "\n")
        return 0
    state = "signed" if manifest.signature else "UNSIGNED"
    lines = [
        f"federation {manifest.federation_id}, version {manifest.version} ({state})",
        f"coordinator: {manifest.coordinator.id} {fingerprint(manifest.coordinator.key)}",
        f"auditors: {', '.join(m.id for m in manifest.auditors) or '(none)'}",
        f"sites ({len(manifest.sites)}):",
    ]
    for site in manifest.sites:
        stewards = ", ".join(m.id for m in site.stewards)
        lines.append(f"  {site.id}: node {fingerprint(site.node_key)}, stewards {stewards}")
    lines.append(f"aggregators ({len(manifest.aggregators)}):")
    for agg in manifest.aggregators:
        operators = ", ".join(m.id for m in agg.operators) or "(none)"
        lines.append(f"  {agg.id}: {fingerprint(agg.signing_key)}, operators {operators}")
    for study in manifest.studies:
        lines += describe_study(study)
    print("\n".join(lines))
    return 0


def _pinned(text: str | None) -> bytes | None:
    return None if text is None else decode_key(text, "--coordinator-key")


def manifest_verify(args: argparse.Namespace) -> int:
    """Check the signature; with --coordinator-key, against the pinned key."""
    manifest = load_manifest(args.manifest)
    verify_manifest(manifest, _pinned(args.coordinator_key))
    print(
        f"ok: {args.manifest} federation {manifest.federation_id} version {manifest.version} "
        f"is signed by coordinator {fingerprint(manifest.coordinator.key)}"
    )
    if args.coordinator_key is None:
        print(
            "warning: checked against the key the manifest names itself; pass "
            "--coordinator-key to check who the coordinator is"
        )
    return 0


def manifest_diff(args: argparse.Namespace) -> int:
    """Print one line per changed term."""
    changes = diff(load_manifest(args.old), load_manifest(args.new))
    for change in changes:
        print(change)
    if not changes:
        print("no changes to any signed term")
    return 0


def approve_command(args: argparse.Namespace) -> int:
    """Show the study's terms, sign them with the steward's key, write the approval."""
    manifest = load_manifest(args.manifest)
    verify_manifest(manifest, _pinned(args.coordinator_key))
    study = manifest.study(args.study)
    if study is None:
        known = ", ".join(s.id for s in manifest.studies)
        raise ConfigError(f"manifest has no study {args.study!r}; choose one of: {known}")
    key = load_private_key(args.key)
    approval = approve_study(manifest, args.study, args.site, key, dt.datetime.now(dt.UTC))
    print("\n".join(describe_study(study)))
    save_approval(approval, args.out)
    print(
        f"approved for site {approval.site_id} by steward {approval.steward_id} "
        f"(manifest version {manifest.version}); wrote {args.out}"
    )
    return 0


def _anchor(text: str | None) -> Anchor | None:
    if text is None:
        return None
    try:
        return Anchor.from_text(text)
    except ValueError as error:
        raise ConfigError(str(error)) from None


# What a chain checked without an anchor cannot show (tessera.governance.audit).
UNANCHORED = (
    "not shown without --anchor: whether the log was rewritten from some entry on with "
    "every hash recomputed, or its last entries were cut off; either leaves an unbroken "
    "chain. Only an anchor kept apart from the log (the SEQ:HASH printed below, by an "
    "earlier verify, or by the writer's anchor file) shows them"
)


def audit_verify_command(args: argparse.Namespace) -> int:
    """Verify the chain; print the count, what was and was not shown, and the anchor to
    keep elsewhere."""
    anchor = _anchor(args.anchor)
    result = verify(args.log, anchor)
    last = result.last.to_text() if result.last else "(empty)"
    if anchor is None:
        print(f"{args.log}: {result.entries} entries, each linked to the one before")
        print(UNANCHORED)
    else:
        print(
            f"ok: {args.log}: {result.entries} entries, chain intact through the anchored "
            f"entry {anchor.seq} ({result.entries - anchor.seq} after it)"
        )
    print(f"anchor (store it apart from the log): {last}")
    return 0


def audit_export_command(args: argparse.Namespace) -> int:
    """Export verified entries as JSON lines."""
    count = export(args.log, args.out, args.kind, _anchor(args.anchor))
    kinds = f" of kind {', '.join(args.kind)}" if args.kind else ""
    print(f"exported {count} verified entries{kinds} to {args.out}")
    return 0
