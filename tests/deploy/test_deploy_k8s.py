"""Kustomize overlays: render with kubectl, validate strictly offline, then the policy rules."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from tests.support.deploy import K8S, KUBERNETES_VERSION, OVERLAYS, pod_specs, run

Manifests = dict[str, list[dict[str, Any]]]
SITES = [o for o in OVERLAYS if o.startswith("site-")]
AGGREGATORS = [o for o in OVERLAYS if o.startswith("aggregator-")]


def test_overlays_cover_sites_gpu_aggregators_and_broker() -> None:
    assert len([s for s in SITES if not s.endswith("-gpu")]) >= 2
    assert any(s.endswith("-gpu") for s in SITES)
    assert len(AGGREGATORS) >= 2
    assert "broker" in OVERLAYS


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_overlay_validates_strictly(
    kubernetes_validate: str, rendered: dict[str, Path], overlay: str
) -> None:
    result = run(
        kubernetes_validate, "--strict", "-k", KUBERNETES_VERSION, "--quiet", str(rendered[overlay])
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_strict_validation_rejects_an_unknown_field(
    kubernetes_validate: str, rendered: dict[str, Path], tmp_path: Path
) -> None:
    text = rendered["broker"].read_text()
    assert "  strategy:\n" in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("  strategy:\n", "  stratagem: 1\n  strategy:\n", 1))
    result = run(kubernetes_validate, "--strict", "-k", KUBERNETES_VERSION, "--quiet", str(bad))
    assert result.returncode != 0
    assert "stratagem" in result.stdout + result.stderr


def test_kustomize_fails_on_a_broken_overlay(kubectl: str, tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(
        f"resources:\n  - {K8S / 'base' / 'site'}\n  - missing.yaml\n"
    )
    assert run(kubectl, "kustomize", str(tmp_path)).returncode != 0


def security_violations(name: str, pod: dict[str, Any]) -> list[str]:
    """What makes a pod spec fall short of the hardening rules (empty: none)."""
    problems = []
    pod_sc = pod.get("securityContext", {})
    if pod.get("automountServiceAccountToken") is not False:
        problems.append(f"{name}: service account token mounted")
    if pod_sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append(f"{name}: pod seccomp is not RuntimeDefault")
    tmp = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
    for container in pod.get("initContainers", []) + pod["containers"]:
        where = f"{name}/{container['name']}"
        sc = {**pod_sc, **container.get("securityContext", {})}
        if sc.get("runAsNonRoot") is not True or sc.get("runAsUser", 1) == 0:
            problems.append(f"{where}: may run as root")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: writable root filesystem")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: privilege escalation allowed")
        if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc["capabilities"].get("add"):
            problems.append(f"{where}: capabilities not all dropped")
        if sc.get("privileged"):
            problems.append(f"{where}: privileged")
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            if not {"cpu", "memory"} <= set(resources.get(kind, {})):
                problems.append(f"{where}: no cpu/memory {kind}")
        if "livenessProbe" not in container or "readinessProbe" not in container:
            problems.append(f"{where}: missing liveness or readiness probe")
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        if mounts.get("/tmp") not in tmp:
            problems.append(f"{where}: /tmp is not an emptyDir")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_workload_is_hardened(manifests: Manifests, overlay: str) -> None:
    workloads = list(pod_specs(manifests[overlay]))
    assert workloads
    problems = [p for name, pod in workloads for p in security_violations(name, pod)]
    assert problems == []


def test_the_policy_check_catches_a_weakened_pod(manifests: Manifests) -> None:
    name, pod = next(pod_specs(manifests["site-a"]))
    container = pod["containers"][0]
    weakened = {
        **pod,
        "containers": [
            {
                **container,
                "securityContext": {
                    **container["securityContext"],
                    "readOnlyRootFilesystem": False,
                    "runAsUser": 0,
                },
                "resources": {"limits": container["resources"]["limits"]},
                "livenessProbe": None,
            }
        ],
    }
    weakened["containers"][0].pop("livenessProbe")
    problems = "\n".join(security_violations(name, weakened))
    for expected in ("may run as root", "writable root", "no cpu/memory requests", "probe"):
        assert expected in problems


def test_http_probes_use_the_service_endpoints(manifests: Manifests) -> None:
    for overlay in SITES + AGGREGATORS:
        for _, pod in pod_specs(manifests[overlay]):
            container = pod["containers"][0]
            assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
            assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports["http"] == 8080


def namespaces(docs: list[dict[str, Any]]) -> set[str]:
    """Every namespace a document of the overlay lives in or defines."""
    return {d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"} | {
        d["metadata"]["namespace"] for d in docs if "namespace" in d["metadata"]
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_namespace_is_restricted_and_denies_by_default(
    manifests: Manifests, overlay: str
) -> None:
    docs = manifests[overlay]
    defined = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Namespace"}
    assert set(defined) == namespaces(docs), "every namespace used is defined by the overlay"
    for name, namespace in defined.items():
        labels = namespace["metadata"]["labels"]
        for mode in ("enforce", "audit", "warn"):
            assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted", name
        deny = [
            d
            for d in docs
            if d["kind"] == "NetworkPolicy"
            and d["metadata"]["namespace"] == name
            and d["spec"]["podSelector"] == {}
            and "ingress" not in d["spec"]
            and "egress" not in d["spec"]
        ]
        assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}, name


def egress_targets(docs: list[dict[str, Any]]) -> list[tuple[str, tuple[int, ...]]]:
    """(target description, ports) for every egress rule in the overlay's policies."""
    targets = []
    for doc in docs:
        if doc["kind"] != "NetworkPolicy":
            continue
        for rule in doc["spec"].get("egress", []):
            ports = tuple(sorted(p["port"] for p in rule.get("ports", [])))
            for peer in rule.get("to", [{}]):
                ns = peer.get("namespaceSelector", {}).get("matchLabels", {})
                pods = peer.get("podSelector", {}).get("matchLabels", {})
                targets.append(
                    (
                        f"{ns.get('kubernetes.io/metadata.name')}/"
                        f"{pods.get('app.kubernetes.io/name') or pods.get('k8s-app')}",
                        ports,
                    )
                )
    return targets


@pytest.mark.parametrize("overlay", SITES + AGGREGATORS)
def test_nodes_and_aggregators_reach_only_the_broker_and_dns(
    manifests: Manifests, overlay: str
) -> None:
    assert sorted(egress_targets(manifests[overlay])) == [
        ("kube-system/kube-dns", (53, 53)),
        ("tessera-broker/tessera-broker", (443, 8883)),
    ]


@pytest.mark.parametrize("overlay", SITES)
def test_only_the_sites_own_inference_clients_reach_its_node(
    manifests: Manifests, overlay: str
) -> None:
    docs = manifests[overlay]
    site = next(d for d in docs if d["kind"] == "StatefulSet")["metadata"]["labels"][
        "tessera.io/site"
    ]
    ingress = [
        r for d in docs if d["kind"] == "NetworkPolicy" for r in d["spec"].get("ingress", [])
    ]
    assert len(ingress) == 1
    (peer,) = ingress[0]["from"]
    assert peer["namespaceSelector"]["matchLabels"] == {"tessera.io/inference-client-of": site}
    assert peer["podSelector"]["matchLabels"] == {"tessera.io/inference-client": "true"}
    assert sorted(p["port"] for p in ingress[0]["ports"]) == [8080, 11112]


def test_aggregators_each_have_their_own_namespace(manifests: Manifests) -> None:
    owned = [namespaces(manifests[o]) for o in AGGREGATORS]
    assert all(len(ns) == 1 for ns in owned)
    assert len(set().union(*owned)) == len(AGGREGATORS)


def test_sites_and_aggregators_keep_state_on_claims(manifests: Manifests) -> None:
    for overlay in SITES + AGGREGATORS:
        (sts,) = [d for d in manifests[overlay] if d["kind"] == "StatefulSet"]
        claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
        mounts = {
            m["name"]: m for m in sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        }
        assert mounts["state"]["mountPath"] == "/var/lib/tessera" and "state" in claims
        assert mounts["bundle"]["readOnly"] is True
        if overlay in SITES:
            assert "cache" in claims
            assert mounts["dicom"] == {
                "name": "dicom",
                "mountPath": "/data/dicom",
                "readOnly": True,
            }
            volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
            assert volumes["dicom"]["persistentVolumeClaim"]["readOnly"] is True


def test_gpu_variant_requests_a_gpu_on_gpu_nodes(manifests: Manifests) -> None:
    for overlay in SITES:
        ((_, pod),) = pod_specs(manifests[overlay])
        container = pod["containers"][0]
        gpu = container["resources"]["limits"].get("nvidia.com/gpu")
        if overlay.endswith("-gpu"):
            assert gpu == 1
            assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            assert container["image"].startswith("tessera/node-gpu:")
        else:
            assert gpu is None and "nodeSelector" not in pod
            assert container["image"].startswith("tessera/node:")


def test_broker_has_service_configmap_secret_and_disruption_budget(manifests: Manifests) -> None:
    docs = manifests["broker"]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= kinds
    (pdb,) = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    sources = deployment["spec"]["template"]["spec"]["volumes"][0]["projected"]["sources"]
    assert sources[1]["secret"]["name"] == "tessera-broker-tls"
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert sources[0]["configMap"]["name"] == configmap["metadata"]["name"]
    assert set(configmap["data"]) == {"mosquitto.conf", "acl"}
    assert "Secret" not in kinds, "real Secrets come from `tessera provision --k8s` only"


def test_broker_overlay_config_is_what_provisioning_generates() -> None:
    from broker.provisioning.federation import load_federation
    from broker.provisioning.mosquitto_conf import BrokerFiles, render_acl, render_conf

    federation = load_federation(K8S.parent / "broker" / "examples" / "FEDERATION.toml")
    overlay = K8S / "overlays" / "broker"
    assert (overlay / "acl").read_text() == render_acl(federation)
    assert (overlay / "mosquitto.conf").read_text() == render_conf(federation, BrokerFiles())


def test_broker_mounts_every_file_its_configuration_names(manifests: Manifests) -> None:
    (configmap,) = [d for d in manifests["broker"] if d["kind"] == "ConfigMap"]
    (deployment,) = [d for d in manifests["broker"] if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    mounted = set()
    for volume in pod["volumes"]:
        for source in volume.get("projected", {}).get("sources", []):
            ref = source.get("configMap") or source.get("secret") or {}
            mounted |= {f"{mounts[volume['name']]}/{i['path']}" for i in ref.get("items", [])}
    conf = configmap["data"]["mosquitto.conf"].splitlines()
    named = {line.split()[1] for line in conf if line.split()[:1] in (
        ["cafile"], ["certfile"], ["keyfile"], ["crlfile"], ["acl_file"],
    )}  # fmt: skip
    assert "/mosquitto/config/crl.pem" in named
    assert named <= mounted


def secret_leaks(docs: list[dict[str, Any]], secret_values: list[str]) -> list[str]:
    """ConfigMap entries that contain a Secret's value or any PEM key or certificate."""
    leaks = []
    for doc in docs:
        if doc["kind"] != "ConfigMap":
            continue
        for key, value in (doc.get("data") or {}).items():
            if "-----BEGIN" in value or any(
                s.strip() and s.strip() in value for s in secret_values
            ):
                leaks.append(f"{doc['metadata']['name']}/{key}")
    return leaks


@pytest.fixture(scope="module")
def provisioned_secrets(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The values `tessera provision` puts into Secrets: the broker's TLS files, the bundles."""
    from broker.provisioning.federation import load_federation
    from broker.provisioning.provision import provision

    out = tmp_path_factory.mktemp("provisioned")
    provision(load_federation(K8S.parent / "broker" / "examples" / "FEDERATION.toml"), out / "p")
    files = [out / "p" / "broker" / name for name in ("ca.pem", "server.pem", "server.key")]
    files += [f for f in (out / "p" / "bundles").rglob("*") if f.is_file()]
    values = []
    for data in (f.read_bytes() for f in files):
        values.append(base64.b64encode(data).decode())  # as a Secret's data holds it
        try:
            values.append(data.decode())  # as stringData, or pasted into a file
        except UnicodeDecodeError:
            pass
    return values


def test_no_secret_value_appears_in_a_configmap(
    manifests: Manifests, provisioned_secrets: list[str]
) -> None:
    assert len(provisioned_secrets) > 10
    for overlay, docs in manifests.items():
        assert secret_leaks(docs, provisioned_secrets) == [], overlay


def test_the_leak_check_catches_a_key_in_a_configmap(
    manifests: Manifests, provisioned_secrets: list[str]
) -> None:
    key = next(s for s in provisioned_secrets if "PRIVATE KEY" in s)
    body = key.strip().splitlines()[1]  # a key line without its PEM armour
    docs = manifests["broker"] + [
        {"kind": "ConfigMap", "metadata": {"name": "oops"}, "data": {"conf": f"x {body} y"}}
    ]
    assert secret_leaks(docs, [body]) == ["oops/conf"]
    assert secret_leaks(documents_with({"pem": key}), []) == ["oops/pem"]


def documents_with(data: dict[str, str]) -> list[dict[str, Any]]:
    """One ConfigMap named oops holding `data`."""
    return [{"kind": "ConfigMap", "metadata": {"name": "oops"}, "data": data}]
