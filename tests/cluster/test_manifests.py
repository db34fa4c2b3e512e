"""k8s/ in step with docker-compose.yml: the same services, commands and ports (no kubectl:
both files read as data). scripts/check_k8s.sh validates the manifests against the schemas."""

from __future__ import annotations

import pytest
import yaml
from compose_cluster import ROOT, compose_commands, compose_spec, k8s_documents, symbolic

from alise.cluster.local import health_address, listen_addresses

WORKLOADS = ("Deployment", "StatefulSet")


def workloads() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in k8s_documents() if d["kind"] in WORKLOADS}


def container(workload: dict) -> dict:
    [c] = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == "alise"]
    return c


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def test_the_same_services_run_the_same_commands():
    compose = {name: [symbolic(a) for a in argv] for name, argv in compose_commands().items()}
    k8s = {name: [symbolic(a) for a in container(w)["command"] + container(w).get("args", [])]
           for name, w in workloads().items()}
    assert k8s == compose


@pytest.mark.parametrize("name", sorted(compose_commands()))
def test_ports_probes_and_metrics_match_the_command(name):
    command = compose_commands()[name]
    listen = {kind: port_of(a) for kind, a in listen_addresses(command).items()}
    health = port_of(health_address(name, command))
    workload = workloads()[name]
    c = container(workload)
    assert sorted(p["containerPort"] for p in c["ports"]) == sorted(listen.values())
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == health, probe
    assert c.get("startupProbe", {"grpc": {"port": health}})["grpc"]["port"] == health
    compose_check = compose_spec()["services"][name]["healthcheck"]["test"]
    assert compose_check[:3] == ["CMD", "alise", "health"] and port_of(compose_check[3]) == health
    annotations = workload["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    # The HTTP door has no metrics listener of its own: it serves /metrics on its HTTP port.
    assert int(annotations["prometheus.io/port"]) == (listen["metrics"] if "metrics" in listen else listen["grpc"])


def test_every_address_a_service_dials_is_a_service_with_that_port():
    services = {d["metadata"]["name"]: d for d in k8s_documents() if d["kind"] == "Service"}
    dialed = []
    for argv in compose_commands().values():
        for flag in ("--predictor", "--scheduler"):
            if flag in argv:
                dialed.append(argv[argv.index(flag) + 1])
    assert dialed, "compose's services dial each other by name"
    for address in dialed:
        host, port = address.rsplit(":", 1)
        assert host in services, f"no Service named {host}"
        assert int(port) in [p["port"] for p in services[host]["spec"]["ports"]]
        selector = services[host]["spec"]["selector"]
        labels = workloads()[host]["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()


def test_variables_in_commands_come_from_the_config_map():
    [config] = [d for d in k8s_documents() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "alise-config"]
    for name, w in workloads().items():
        c = container(w)
        used = {a[2:-1] for a in map(symbolic, c["command"]) if a.startswith("${")}
        refs = [e["configMapRef"]["name"] for e in c.get("envFrom", [])]
        assert "alise-config" in refs, name
        assert used <= set(config["data"]), f"{name} uses {used - set(config['data'])} undefined"


def test_credentials_come_from_secrets_and_state_from_volumes():
    w = workloads()
    secrets = {name: {e["name"] for e in container(x).get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
               for name, x in w.items()}
    assert "ALISE_API_TOKENS" in secrets["scheduler"]
    # The internal channels (scheduler, predictor, workers); the HTTP door speaks only the client
    # API and passes each client's own bearer token on.
    assert all("ALISE_INTERNAL_SECRET" in s for name, s in secrets.items() if name != "http")
    predictor = w["predictor"]
    assert predictor["kind"] == "StatefulSet"
    [claim] = predictor["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container(predictor)["volumeMounts"]}
    index_dir = compose_commands()["predictor"][compose_commands()["predictor"].index("--index-dir") + 1]
    assert index_dir.startswith(mounts[claim["metadata"]["name"]] + "/")
    worker = container(w["worker"])
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "/models" in {m["mountPath"] for m in worker["volumeMounts"]}


def gpu_override() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())


def test_gpu_workers_run_the_gpu_image_with_a_gpu_each():
    """The GPU override changes only the workers: the GPU image, --device cuda, one NVIDIA GPU
    reserved; Kubernetes' workers run the same image with a GPU each."""
    [(name, worker)] = gpu_override()["services"].items()
    assert name == "worker"
    assert worker["build"] == {"context": ".", "dockerfile": "Dockerfile.gpu"}
    base = compose_commands()["worker"]
    device = base.index("--device")
    assert worker["command"] == base[:device + 1] + ["cuda"] + base[device + 2:]
    [reservation] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert reservation["driver"] == "nvidia" and reservation["capabilities"] == ["gpu"]
    images = {name: container(w)["image"] for name, w in workloads().items()}
    assert images.pop("worker") == worker["image"]
    assert set(images.values()) == {compose_spec()["x-alise"]["image"]}
    assert container(workloads()["worker"])["resources"]["limits"]["nvidia.com/gpu"] == 1
    [config] = [d for d in k8s_documents() if d["kind"] == "ConfigMap"]
    assert config["data"]["ALISE_DEVICE"] == "cuda"
