"""`tessera provision --k8s`: Kubernetes Secrets built from the provisioned bundles.

Layout under ``OUT/k8s/`` (folder 0700, every file 0600: they hold private keys)::

    <member-id>.yaml   Secret ``tessera-bundle`` in namespace ``tessera-<member-id>``: one
                       data key per file of ``bundles/<member-id>/``
    broker.yaml        Secret ``tessera-broker-tls`` in namespace ``tessera-broker``:
                       ``ca.pem``, ``server.pem``, ``server.key``, and ``crl.pem`` (the
                       revocation list: not secret, but it changes with the CA's
                       certificates; re-apply it and restart the broker after a revocation)

One Secret per file, so each member applies only its own (``kubectl apply -f``) or lists it
under ``resources:`` of its Kustomize overlay. The namespace rule is the one the overlays in
``k8s/overlays`` follow: ``tessera-`` followed by the member id (site ``site-a`` runs in
``tessera-site-a``, aggregator ``agg-uni`` in ``tessera-agg-uni``). A member id that does not
make a valid namespace (lower-case letters, digits and ``-``, at most 63 characters in all)
or that would land in the broker's namespace is refused before anything is written.
Private keys go only into Secrets, never into a ConfigMap.
"""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path

from broker.errors import ProvisioningError
from broker.provisioning.federation import Federation
from tessera.files import write_private_file

NAMESPACE_PREFIX = "tessera-"
BROKER_NAMESPACE = "tessera-broker"
# Object names the k8s/ bases mount, not secret values.
BUNDLE_SECRET = "tessera-bundle"  # noqa: S105
BROKER_TLS_SECRET = "tessera-broker-tls"  # noqa: S105
BROKER_TLS_FILES = ("ca.pem", "server.pem", "server.key", "crl.pem")
# Kubernetes refuses a Secret over 1 MiB (the API object, of which data is nearly all).
MAX_SECRET_BYTES = 1 << 20
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def member_namespace(member_id: str) -> str:
    """The namespace a member's workload and Secret live in; ProvisioningError if none fits."""
    namespace = NAMESPACE_PREFIX + member_id
    if len(namespace) > 63 or _DNS_LABEL.fullmatch(namespace) is None:
        raise ProvisioningError(
            f"member id {member_id!r} gives namespace {namespace!r}, which Kubernetes refuses "
            "(lower-case letters, digits and '-', ending in a letter or digit, at most 63 "
            "characters): give the member an id like 'site-a' for --k8s"
        )
    if namespace == BROKER_NAMESPACE:
        raise ProvisioningError(
            f"member id {member_id!r} would put its keys in the broker's namespace "
            f"{BROKER_NAMESPACE!r}: give the member another id for --k8s"
        )
    return namespace


def check_k8s_names(federation: Federation) -> dict[str, str]:
    """Every member's namespace, by member id; raises before provisioning writes anything."""
    return {member.id: member_namespace(member.id) for member in federation.members}


def write_k8s_secrets(federation: Federation, out: Path) -> tuple[Path, ...]:
    """Write ``out/k8s/<member>.yaml`` and ``out/k8s/broker.yaml`` from ``out``'s bundles.

    Call after `broker.provisioning.provision.provision` into the same ``out``. Returns the
    files written.
    """
    namespaces = check_k8s_names(federation)
    folder = Path(out) / "k8s"
    folder.mkdir(mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    annotations = {"tessera.io/federation": federation.id}
    written = []
    for member in federation.members:
        bundle = Path(out) / "bundles" / member.id
        files = sorted(p for p in bundle.iterdir() if p.is_file())
        if not any(p.name == "client.pem" for p in files):
            raise ProvisioningError(f"{bundle} is not a complete bundle: run tessera provision")
        document = render_secret(
            BUNDLE_SECRET,
            namespaces[member.id],
            {p.name: p.read_bytes() for p in files},
            annotations | {"tessera.io/member": member.id},
        )
        written.append(_write(folder / f"{member.id}.yaml", document))
    broker = Path(out) / "broker"
    tls = {name: (broker / name).read_bytes() for name in BROKER_TLS_FILES}
    document = render_secret(BROKER_TLS_SECRET, BROKER_NAMESPACE, tls, annotations)
    written.append(_write(folder / "broker.yaml", document))
    return tuple(written)


def render_secret(
    name: str, namespace: str, data: dict[str, bytes], annotations: dict[str, str]
) -> str:
    """One Opaque Secret as YAML, every value base64 under ``data``; keys in sorted order."""
    # json.dumps gives double-quoted scalars, which YAML reads back as the same strings: an id
    # such as "1e3" or "no" stays a string instead of becoming a number or a boolean.
    quote = json.dumps
    lines = [
        "# Written by `tessera provision --k8s`. It holds private keys: apply it to this",
        "# member's cluster only (kubectl apply -f), keep it 0600 and never commit it.",
        "apiVersion: v1",
        "kind: Secret",
        "metadata:",
        f"  name: {quote(name)}",
        f"  namespace: {quote(namespace)}",
        "  labels:",
        '    app.kubernetes.io/part-of: "tessera"',
        "  annotations:",
        *(f"    {quote(k)}: {quote(v)}" for k, v in sorted(annotations.items())),
        "type: Opaque",
        "data:",
        *(f"  {quote(k)}: {quote(base64.b64encode(data[k]).decode())}" for k in sorted(data)),
    ]
    text = "\n".join(lines) + "\n"
    if len(text) > MAX_SECRET_BYTES:
        raise ProvisioningError(
            f"Secret {name} for {namespace} would be {len(text)} bytes, over Kubernetes' 1 MiB "
            "limit; mount the bundle from a volume instead of a Secret"
        )
    return text


def _write(path: Path, text: str) -> Path:
    write_private_file(path, text.encode())
    return path
