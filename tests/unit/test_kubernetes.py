"""deploy/kubernetes, checked offline: rendered as ``kubectl apply -k`` would (the listed
resources, the namespace and the ``images:`` override, done here without a kustomize binary),
every manifest validated against the Kubernetes OpenAPI schemas that ``kubernetes-validate``
ships (strict: an unknown field is an error), and the references between the manifests that
no schema sees: the headless Service, selectors and labels, the cluster map against the pods'
DNS names and ports, the probes, the data volume. deploy/compose-multihost is checked the same
way for what its two files must agree on.

Each check is shown to fail on a manifest broken on purpose (``test_broken_manifest_fails``)."""

from __future__ import annotations

import copy
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from cluster.config import Address, NodeConfig, RouterConfig, parse_cluster
from cluster.types import NodeId

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE_DIR = ROOT / "deploy" / "kubernetes"
MULTIHOST_DIR = ROOT / "deploy" / "compose-multihost"
# The oldest Kubernetes release the manifests are for, and the newest whose schemas the
# validator ships; docs/KUBERNETES.md states the same range.
K8S_VERSIONS = ("1.28", "1.37")
CLUSTER_DOMAIN = "cluster.local"
# Dockerfile: `useradd --system --uid 10001 --gid replkv ...` (groupadd --gid 10001), `USER replkv`
IMAGE_UID = 10001
CLUSTER_SCOPED = {"Namespace"}
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "images"}

Doc = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# rendering: what `kubectl kustomize deploy/kubernetes` prints, for the features used there


def render(directory: Path) -> list[Doc]:
    """The kustomization in ``directory``, rendered: its resources in order, each put in its
    namespace, each container's image overridden by ``images:``. A field this renderer does
    not implement is refused rather than ignored."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KUSTOMIZATION_KEYS
    assert not unknown, f"kustomization.yaml uses {sorted(unknown)}, which render() ignores"
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    docs: list[Doc] = []
    for name in kustomization["resources"]:
        with (directory / name).open() as f:
            docs.extend(doc for doc in yaml.safe_load_all(f) if doc is not None)
    namespace = kustomization.get("namespace")
    for doc in docs:
        if namespace and doc["kind"] not in CLUSTER_SCOPED:
            doc["metadata"]["namespace"] = namespace
        for container in containers(doc):
            container["image"] = override_image(container["image"],
                                                kustomization.get("images", []))
    return docs


def override_image(image: str, overrides: list[dict[str, str]]) -> str:
    """Kustomize's ``images:``: an entry whose ``name`` is the image's name (without tag or
    digest) replaces the name by ``newName``, and the tag by ``newTag`` or ``digest``."""
    name, tag = split_image(image)
    for entry in overrides:
        if entry["name"] != name:
            continue
        name = entry.get("newName", name)
        if "digest" in entry:
            tag = "@" + entry["digest"]
        elif "newTag" in entry:
            tag = ":" + entry["newTag"]
        break
    return name + tag


def split_image(image: str) -> tuple[str, str]:
    """``registry:5000/replkv:0.2`` -> (``registry:5000/replkv``, ``:0.2``)."""
    if "@" in image:
        name, _, digest = image.partition("@")
        return name, "@" + digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon:]
    return image, ""


def pod_spec(doc: Doc) -> Doc | None:
    if doc["kind"] in ("StatefulSet", "Deployment"):
        spec: Doc = doc["spec"]["template"]["spec"]
        return spec
    return None


def containers(doc: Doc) -> list[Doc]:
    spec = pod_spec(doc)
    return [] if spec is None else [*spec.get("initContainers", []), *spec["containers"]]


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


# ---------------------------------------------------------------------------------------------
# the checks: a list of problems, empty when all is well


def schema_problems(docs: list[Doc], version: str) -> list[str]:
    problems = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path)
            problems.append(f"{doc['kind']} {doc['metadata'].get('name')}: {where}: "
                            f"{exc.message}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{doc['kind']} {doc['apiVersion']}: no schema in Kubernetes "
                            f"{version}")
    return problems


def env_of(container: Doc, config_maps: dict[str, Doc]) -> dict[str, str]:
    """A container's environment, with ``configMapKeyRef`` values looked up (a reference to
    a missing map or key is an error); downward-API values are left out."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        ref = var.get("valueFrom", {}).get("configMapKeyRef")
        if ref is None:
            continue
        data = config_maps.get(ref["name"], {}).get("data", {})
        if ref["key"] not in data:
            raise AssertionError(f"{container['name']}: {var['name']} refers to ConfigMap "
                                 f"{ref['name']} key {ref['key']}, which does not exist")
        env[var["name"]] = data[ref["key"]]
    return env


def probe_addresses(container: Doc) -> dict[str, Address]:
    """Every probe of a container must run ``replctl health 127.0.0.1:PORT``."""
    found = {}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(kind)
        if probe is None:
            continue
        command = probe.get("exec", {}).get("command", [])
        assert command[:2] == ["replctl", "health"] and len(command) == 3, \
            f"{container['name']} {kind} runs {command}, not `replctl health 127.0.0.1:PORT`"
        found[kind] = Address.parse(command[2])
    return found


def cross_problems(docs: list[Doc]) -> list[str]:
    problems: list[str] = []
    config_maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] not in CLUSTER_SCOPED}
    declared = {d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"}
    if len(namespaces) != 1 or not namespaces <= declared:
        problems.append(f"resources are in namespaces {namespaces}; declared: {declared}")
    namespace = next(iter(namespaces))

    sts = one(docs, "StatefulSet")
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}

    # every selector selects the pods of its workload, and only those
    workloads = [d for d in docs if d["kind"] in ("StatefulSet", "Deployment")]
    for w in workloads:
        labels = w["spec"]["template"]["metadata"]["labels"]
        selector = w["spec"]["selector"]["matchLabels"]
        if not selector.items() <= labels.items():
            problems.append(f"{w['kind']} {w['metadata']['name']}: selector {selector} does "
                            f"not match its pod labels {labels}")
    for svc in services.values():
        selected = [w for w in workloads if svc["spec"]["selector"].items()
                    <= w["spec"]["template"]["metadata"]["labels"].items()]
        if len(selected) != 1:
            problems.append(f"Service {svc['metadata']['name']} selects "
                            f"{len(selected)} workloads")
            continue
        port_names = {p["name"]: p["containerPort"]
                      for c in containers(selected[0]) for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            if port["targetPort"] not in port_names:
                problems.append(f"Service {svc['metadata']['name']} port {port['name']} "
                                f"targets {port['targetPort']!r}, which no container names")
    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        if pdb["spec"]["selector"]["matchLabels"] != sts["spec"]["selector"]["matchLabels"]:
            problems.append("the PodDisruptionBudget does not select the node pods")

    # the headless Service the StatefulSet names: its pods' stable DNS names
    headless = services.get(sts["spec"]["serviceName"])
    if headless is None:
        problems.append(f"StatefulSet serviceName {sts['spec']['serviceName']!r} is no Service")
        return problems
    if headless["spec"].get("clusterIP") != "None":
        problems.append(f"Service {headless['metadata']['name']} is not headless")
    if not headless["spec"].get("publishNotReadyAddresses"):
        problems.append("the headless Service must publish not-ready pods: nodes find their "
                        "peers before those are ready")
    if headless["spec"]["selector"].items() > sts["spec"]["template"]["metadata"]["labels"].items():
        problems.append("the headless Service does not select the StatefulSet's pods")

    node_containers = containers(sts)
    assert len(node_containers) == 1, "the node pod has one container"
    node = node_containers[0]
    node_env = env_of(node, config_maps)
    listen = Address.parse(node_env["REPL_LISTEN"])
    ports = {p["name"]: p["containerPort"] for p in node.get("ports", [])}
    if ports.get("replkv") != listen.port:
        problems.append(f"the node listens on {listen.port} but its port `replkv` is "
                        f"{ports.get('replkv')}")
    if "REPL_METRICS_LISTEN" in node_env and \
            Address.parse(node_env["REPL_METRICS_LISTEN"]).port != ports.get("metrics"):
        problems.append("the node's metrics port is not its REPL_METRICS_LISTEN")
    headless_port = {p["name"]: p["port"] for p in headless["spec"]["ports"]}.get("replkv")
    if headless_port != listen.port:
        problems.append(f"the headless Service's port {headless_port} is not the node's "
                        f"{listen.port}")
    for kind, addr in probe_addresses(node).items():
        if addr != Address("127.0.0.1", listen.port):
            problems.append(f"the node's {kind} asks {addr}, it listens on {listen.port}")

    # the cluster map: n(K+1) is pod K, at its stable DNS name and the port it listens on
    cluster = parse_cluster(node_env["REPL_CLUSTER"])
    name, service = sts["metadata"]["name"], headless["metadata"]["name"]
    expected = {
        NodeId(f"n{k + 1}"):
            Address(f"{name}-{k}.{service}.{namespace}.svc.{CLUSTER_DOMAIN}", listen.port)
        for k in range(sts["spec"]["replicas"])
    }
    if cluster != expected:
        problems.append(f"REPL_CLUSTER is {node_env['REPL_CLUSTER']}; the pods are at "
                        f"{','.join(f'{n}={a}' for n, a in expected.items())}")
    if node_env.get("REPL_MASTER") not in cluster:
        problems.append(f"REPL_MASTER {node_env.get('REPL_MASTER')} is not in REPL_CLUSTER")
    for node_id in cluster:  # what replnode itself checks at start, for every pod
        try:
            NodeConfig(node_id=node_id, listen=listen,
                       data_dir=Path(node_env["REPL_DATA_DIR"]), cluster=cluster,
                       bootstrap_master=NodeId(node_env["REPL_MASTER"]),
                       metrics_listen=Address.parse(node_env["REPL_METRICS_LISTEN"])
                       ).validate()
        except Exception as exc:
            problems.append(f"replnode {node_id} would refuse to start: {exc}")

    # the data directory is the claimed volume
    claims = {t["metadata"]["name"] for t in sts["spec"].get("volumeClaimTemplates", [])}
    mounts = {m["mountPath"]: m["name"] for m in node.get("volumeMounts", [])}
    data_dir = node_env.get("REPL_DATA_DIR")
    if mounts.get(data_dir) not in claims:
        problems.append(f"REPL_DATA_DIR {data_dir} is not where a volumeClaimTemplate "
                        f"({', '.join(sorted(claims))}) is mounted ({mounts})")

    # the router: the nodes' cluster map, its ports, its probes, its Service
    router_deploy = one(docs, "Deployment")
    router = containers(router_deploy)[0]
    router_env = env_of(router, config_maps)
    if router_env.get("REPL_CLUSTER") != node_env["REPL_CLUSTER"]:
        problems.append("the router's REPL_CLUSTER is not the nodes'")
    rports = {p["name"]: p["containerPort"] for p in router.get("ports", [])}
    for port_name, var in (("replkv", "REPL_LISTEN"), ("redis", "REPL_RESP_LISTEN"),
                           ("metrics", "REPL_METRICS_LISTEN")):
        if var not in router_env or Address.parse(router_env[var]).port != rports.get(port_name):
            problems.append(f"the router's port `{port_name}` is not its {var}")
    rlisten = Address.parse(router_env["REPL_LISTEN"])
    for kind, addr in probe_addresses(router).items():
        if addr != Address("127.0.0.1", rlisten.port):
            problems.append(f"the router's {kind} asks {addr}, it listens on {rlisten.port}")
    try:
        RouterConfig(listen=rlisten, cluster=parse_cluster(router_env["REPL_CLUSTER"]),
                     resp_listen=Address.parse(router_env["REPL_RESP_LISTEN"]),
                     metrics_listen=Address.parse(router_env["REPL_METRICS_LISTEN"])
                     ).validate()
    except Exception as exc:
        problems.append(f"replrouter would refuse to start: {exc}")
    router_svcs = [s for s in services.values() if s is not headless]
    if len(router_svcs) != 1 or router_svcs[0]["spec"].get("type", "ClusterIP") != "ClusterIP":
        problems.append("expected one ClusterIP Service for the router")
    else:
        svc = router_svcs[0]
        if {p["name"] for p in svc["spec"]["ports"]} != {"replkv", "redis", "metrics"}:
            problems.append("the router's Service must expose replkv, redis and metrics")
        notes = svc["metadata"].get("annotations", {})
        if notes.get("prometheus.io/scrape") != "true" or \
                notes.get("prometheus.io/port") != str(rports.get("metrics")):
            problems.append("the router's Service lacks prometheus.io annotations for its "
                            "metrics port")

    # resources, and the image's own user, never root
    for w in workloads:
        spec = pod_spec(w)
        assert spec is not None
        pod_sc = spec.get("securityContext", {})
        for c in containers(w):
            sc = {**pod_sc, **c.get("securityContext", {})}
            if not (sc.get("runAsNonRoot") and sc.get("runAsUser") == IMAGE_UID
                    and sc.get("runAsGroup") == IMAGE_UID
                    and sc.get("allowPrivilegeEscalation") is False):
                problems.append(f"{c['name']} must run as the image's user {IMAGE_UID}, "
                                f"non-root, without privilege escalation")
            res = c.get("resources", {})
            if set(res.get("requests", {})) != {"cpu", "memory"} or \
                    set(res.get("limits", {})) != {"cpu", "memory"}:
                problems.append(f"{c['name']} needs cpu and memory requests and limits")
    if sts["spec"]["template"]["spec"].get("securityContext", {}).get("fsGroup") != IMAGE_UID:
        problems.append(f"the node pods need fsGroup {IMAGE_UID} to write their volume")
    return problems


# ---------------------------------------------------------------------------------------------
# the shipped manifests


@pytest.fixture(scope="module")
def docs() -> list[Doc]:
    return render(KUSTOMIZE_DIR)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_matches_the_kubernetes_schema(docs: list[Doc], version: str) -> None:
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Deployment", "Namespace", "PodDisruptionBudget", "Service",
                     "Service", "StatefulSet"]
    assert schema_problems(docs, version) == []


def test_manifests_refer_to_each_other_rightly(docs: list[Doc]) -> None:
    assert cross_problems(docs) == []
    sts = one(docs, "StatefulSet")
    assert sts["spec"]["replicas"] == 4
    config_maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    cluster = parse_cluster(env_of(containers(sts)[0], config_maps)["REPL_CLUSTER"])
    assert cluster == {
        NodeId(f"n{k + 1}"): Address(f"replkv-{k}.replkv.replkv.svc.cluster.local", 7001)
        for k in range(4)
    }


def test_image_is_a_kustomize_parameter(docs: list[Doc], tmp_path: Path) -> None:
    assert {c["image"] for d in docs for c in containers(d)} == {"replkv:latest"}
    target = tmp_path / "k"
    shutil.copytree(KUSTOMIZE_DIR, target)
    k = yaml.safe_load((target / "kustomization.yaml").read_text())
    k["images"] = [{"name": "replkv", "newName": "registry.example:5000/team/replkv",
                    "newTag": "0.2.0"}]
    (target / "kustomization.yaml").write_text(yaml.safe_dump(k))
    assert {c["image"] for d in render(target) for c in containers(d)} == \
        {"registry.example:5000/team/replkv:0.2.0"}
    assert override_image("replkv:latest", [{"name": "replkv", "digest": "sha256:ab"}]) == \
        "replkv@sha256:ab"
    assert override_image("other:1", k["images"]) == "other:1"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl to compare with")
def test_render_agrees_with_kubectl_kustomize(docs: list[Doc]) -> None:
    """Where kubectl is installed, its own kustomize renders what render() does."""
    out = subprocess.run(["kubectl", "kustomize", str(KUSTOMIZE_DIR)], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    theirs = [d for d in yaml.safe_load_all(out) if d is not None]
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(theirs, key=key) == sorted(docs, key=key)


@pytest.mark.parametrize(("pod", "node_id"), [("replkv-0", "n1"), ("replkv-3", "n4"),
                                              ("replkv-11", "n12")])
def test_node_id_comes_from_the_pod_ordinal(docs: list[Doc], tmp_path: Path, pod: str,
                                            node_id: str) -> None:
    """The node container's own shell command, run by /bin/sh with a stand-in `replnode`
    that prints the REPL_ID it was given."""
    command = containers(one(docs, "StatefulSet"))[0]["command"]
    assert command[:2] == ["/bin/sh", "-c"]
    stub = tmp_path / "replnode"
    stub.write_text('#!/bin/sh\necho "REPL_ID=$REPL_ID"\n')
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    env = {"PATH": f"{tmp_path}{os.pathsep}/usr/bin:/bin", "REPL_POD_NAME": pod}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout.strip()) == (0, f"REPL_ID={node_id}")
    env["REPL_POD_NAME"] = "replkv"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip() == "Error: config: pod name 'replkv' does not end in -ORDINAL"


# ---------------------------------------------------------------------------------------------
# broken on purpose: each must be caught


def _set_replicas_text(d: list[Doc]) -> None:
    one(d, "StatefulSet")["spec"]["replicas"] = "four"


def _misspell_field(d: list[Doc]) -> None:
    container = containers(one(d, "StatefulSet"))[0]  # caught by the strict schema only
    container["imagePulPolicy"] = container.pop("imagePullPolicy")


def _wrong_service_name(d: list[Doc]) -> None:
    one(d, "StatefulSet")["spec"]["serviceName"] = "replkv-nodes"


def _selector_mismatch(d: list[Doc]) -> None:
    one(d, "Deployment")["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] = "x"


def _cluster_misses_a_pod(d: list[Doc]) -> None:
    data = one(d, "ConfigMap")["data"]
    data["REPL_CLUSTER"] = data["REPL_CLUSTER"].rsplit(",", 1)[0]


def _router_own_cluster(d: list[Doc]) -> None:
    env = containers(one(d, "Deployment"))[0]["env"]
    env[0] = {"name": "REPL_CLUSTER", "value": "n1=replkv-0.replkv:7001"}


def _probe_wrong_port(d: list[Doc]) -> None:
    containers(one(d, "StatefulSet"))[0]["readinessProbe"]["exec"]["command"][2] = \
        "127.0.0.1:7000"


def _data_elsewhere(d: list[Doc]) -> None:
    containers(one(d, "StatefulSet"))[0]["volumeMounts"][0]["mountPath"] = "/var/lib/replkv"


def _runs_as_root(d: list[Doc]) -> None:
    spec = pod_spec(one(d, "Deployment"))
    assert spec is not None
    spec["securityContext"]["runAsUser"] = 0


def _listen_port_moved(d: list[Doc]) -> None:
    for var in containers(one(d, "StatefulSet"))[0]["env"]:
        if var["name"] == "REPL_LISTEN":
            var["value"] = "0.0.0.0:7009"


BREAKAGES: dict[str, tuple[Callable[[list[Doc]], None], str]] = {
    "replicas as text": (_set_replicas_text, "replicas: 'four' is not of type 'integer'"),
    "misspelled field": (_misspell_field, "'imagePulPolicy' was unexpected"),
    "serviceName": (_wrong_service_name, "serviceName 'replkv-nodes' is no Service"),
    "selector": (_selector_mismatch, "selector"),
    "cluster map": (_cluster_misses_a_pod, "REPL_CLUSTER is"),
    "router cluster": (_router_own_cluster, "the router's REPL_CLUSTER is not the nodes'"),
    "probe port": (_probe_wrong_port, "readinessProbe asks 127.0.0.1:7000"),
    "data mount": (_data_elsewhere, "REPL_DATA_DIR /data is not where"),
    "root": (_runs_as_root, "must run as the image's user"),
    "listen port": (_listen_port_moved, "the node listens on 7009"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_broken_manifest_fails(docs: list[Doc], breakage: str) -> None:
    broken = copy.deepcopy(docs)
    breaker, message = BREAKAGES[breakage]
    breaker(broken)
    # the cross-checks read a manifest the schema has passed
    found = schema_problems(broken, K8S_VERSIONS[0]) or cross_problems(broken)
    assert found, f"{breakage}: nothing caught"
    assert any(message in p for p in found), found


def test_broken_file_on_disk_fails(tmp_path: Path) -> None:
    """The same from the files: a StatefulSet whose port is text fails validation."""
    target = tmp_path / "k"
    shutil.copytree(KUSTOMIZE_DIR, target)
    nodes = target / "nodes.yaml"
    nodes.write_text(nodes.read_text().replace("containerPort: 7001", "containerPort: seven"))
    problems = schema_problems(render(target), K8S_VERSIONS[0])
    assert len(problems) == 1 and "'seven' is not of type 'integer'" in problems[0], problems


# ---------------------------------------------------------------------------------------------
# deploy/compose-multihost: two hosts, one cluster map


def test_compose_multihost_files_agree() -> None:
    files = sorted(MULTIHOST_DIR.glob("host-*.yml"))
    assert [f.name for f in files] == ["host-a.yml", "host-b.yml"]
    env = {"REPL_HOST_A": "192.0.2.10", "REPL_HOST_B": "192.0.2.20"}
    maps, nodes, routers = set(), {}, 0
    for f in files:
        text = f.read_text()
        for var, value in env.items():  # what compose does with ${REPL_HOST_A:?...}
            text = _substitute(text, var, value)
        services = yaml.safe_load(text)["services"]
        for name, svc in services.items():
            e = svc["environment"]
            maps.add(e["REPL_CLUSTER"])
            if svc["command"] == ["replrouter"]:
                routers += 1
                continue
            assert svc["command"] == ["replnode"], name
            listen = Address.parse(e["REPL_LISTEN"])
            published = svc["ports"]
            assert len(published) == 1, name
            host, host_port, container_port = published[0].rsplit(":", 2)
            assert int(host_port) == int(container_port) == listen.port, name
            nodes[NodeId(e["REPL_ID"])] = Address(host, listen.port)
            assert svc["healthcheck"]["test"] == ["CMD", "replctl", "health",
                                                  f"127.0.0.1:{listen.port}"], name
    assert len(maps) == 1 and routers == 1
    cluster = parse_cluster(maps.pop())
    assert cluster == nodes  # every node is where the map says: its host's published port
    assert {a.host for a in cluster.values()} == set(env.values())


def _substitute(text: str, var: str, value: str) -> str:
    return re.sub(r"\$\{" + var + r"(:\?[^}]*)?\}", value, text)


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="no docker-compose")
def test_compose_multihost_files_pass_docker_compose_config(tmp_path: Path) -> None:
    """Where docker-compose is installed, it validates both files (offline: no daemon) and
    refuses them, in one line, when a machine's address is not set."""
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path),
           "DOCKER_HOST": "unix:///nonexistent"}
    for f in sorted(MULTIHOST_DIR.glob("host-*.yml")):
        ok = subprocess.run(["docker-compose", "-f", str(f), "config", "-q"],
                            env={**env, "REPL_HOST_A": "192.0.2.10",
                                 "REPL_HOST_B": "192.0.2.20"},
                            capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
        missing = subprocess.run(["docker-compose", "-f", str(f), "config", "-q"], env=env,
                                 capture_output=True, text=True, timeout=60)
        assert missing.returncode != 0
        assert "set REPL_HOST_A to machine A's address" in missing.stderr
