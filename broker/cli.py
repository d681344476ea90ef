"""`tessera provision ...`: the broker package's sub-commands."""

from __future__ import annotations

import argparse
from pathlib import Path

from broker.provisioning.federation import load_federation
from broker.provisioning.k8s_secrets import check_k8s_names, write_k8s_secrets
from broker.provisioning.provision import provision


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this package's sub-commands to the `tessera` parser."""
    parser = commands.add_parser(
        "provision",
        help="create the federation CA, certificates, keys, roster, broker config and bundles",
        description=(
            "Provision a federation from FEDERATION.toml (see broker/examples/). Refuses to "
            "replace an existing CA; --reuse-ca issues new members under it. Every run "
            "rewrites the broker's revocation list (broker/crl.pem): restart the broker "
            "after --revoke or --reissue so that it refuses the old certificates."
        ),
    )
    parser.add_argument("federation", type=Path, help="the FEDERATION.toml file")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--reuse-ca",
        action="store_true",
        help="keep the CA and existing members in --out; issue only new members",
    )
    parser.add_argument(
        "--revoke",
        action="append",
        default=[],
        metavar="MEMBER",
        help="revoke every certificate MEMBER holds (repeatable); implies --reuse-ca",
    )
    parser.add_argument(
        "--reissue",
        action="append",
        default=[],
        metavar="MEMBER",
        help=(
            "give MEMBER a new TLS key and certificate and revoke its old one: renewal, or "
            "after a lost key (repeatable); its signing and HPKE keys stay; implies --reuse-ca"
        ),
    )
    parser.add_argument(
        "--broker-user",
        default="mosquitto",
        help="user Mosquitto switches to when started as root (default: mosquitto)",
    )
    parser.add_argument(
        "--k8s",
        action="store_true",
        help=(
            "also write Kubernetes Secrets into OUT/k8s/: tessera-bundle for each member in "
            "namespace tessera-<member-id>, tessera-broker-tls in tessera-broker"
        ),
    )
    parser.set_defaults(handler=_provision)


def _provision(args: argparse.Namespace) -> int:
    federation = load_federation(args.federation)
    if args.k8s:
        check_k8s_names(federation)  # refuse an id that makes no namespace before writing
    result = provision(
        federation,
        args.out,
        reuse_ca=args.reuse_ca,
        run_as_user=args.broker_user,
        revoke=tuple(args.revoke),
        reissue=tuple(args.reissue),
    )
    print(
        f"provisioned federation {federation.id!r} in {result.out} "
        f"(roster v{result.roster_version})"
    )
    if result.issued:
        print(f"  issued: {', '.join(result.issued)}")
    if result.reissued:
        print(f"  reissued: {', '.join(result.reissued)} (hand over the new bundle)")
    if result.kept:
        print(f"  kept:   {', '.join(result.kept)}")
    if result.revoked:
        print(
            f"  revoked: {', '.join(result.revoked)} (in broker/crl.pem; restart the broker so "
            "that it refuses them and drops their connections)"
        )
    if result.suspended:
        print(
            f"  cannot connect, certificate revoked: {', '.join(result.suspended)} "
            "(--reissue MEMBER to readmit, or remove it from the federation file)"
        )
    if result.expiring:
        print(
            f"  certificate expires within 30 days: {', '.join(result.expiring)} "
            "(renew with --reissue MEMBER)"
        )
    if result.not_in_federation:
        print(
            f"  NOT in {args.federation.name} any more, left on disk but dropped from roster "
            f"and ACL: {', '.join(result.not_in_federation)} (--revoke MEMBER to refuse "
            "its certificate too)"
        )
    if args.k8s:
        written = write_k8s_secrets(federation, args.out)
        print(f"  k8s Secrets (0600, private keys): {', '.join(str(p) for p in written)}")
    print(f"  keep {result.out / 'coordinator'} offline; hand each bundles/<id>/ to its member")
    return 0
