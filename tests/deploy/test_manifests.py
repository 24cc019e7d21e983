"""Static checks of deploy/: YAML lint, Kubernetes and CRD schemas, the cross-references
between the manifests, the Dockerfiles and the Grafana dashboard."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import (
    CRDS,
    DASHBOARD,
    DEPLOY,
    DOCKER,
    K8S,
    ROOT,
    apply_json_patch,
    container_env,
    dockerfile_runtime_env,
    epp_config,
    find,
    legacy_epp_patches,
    load_docs,
    manifests,
    one,
    pod_container,
)

# Oldest and newest Kubernetes the manifests are meant for (gRPC probes, autoscaling/v2,
# policy/v1 and resourceFieldRef env are all older than 1.29).
K8S_VERSIONS = ["1.29.0", "1.37.0"]

# Kinds that come from CRDs: validated against deploy/k8s/crds, or (HTTPRoute, whose schema
# is not vendored) by the cross-reference test below.
CRD_FILES = {
    ("inference.networking.k8s.io/v1", "InferencePool"): "inference.networking.k8s.io_inferencepools.yaml",
    ("inference.networking.x-k8s.io/v1alpha2", "InferenceObjective"): (
        "inference.networking.x-k8s.io_inferenceobjectives.yaml"
    ),
}
NOT_VENDORED = {("gateway.networking.k8s.io/v1", "HTTPRoute")}


def test_yamllint_passes():
    r = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-c", str(DEPLOY / ".yamllint"), "deploy", "tests/deploy"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def all_resources() -> list[tuple[str, dict]]:
    """Every manifest document, plus the EPP objects as the legacy-flags overlay patches them."""
    out = [(str(p.relative_to(ROOT)), d) for p, d in manifests()]
    for patch in legacy_epp_patches():
        t = patch["target"]
        (doc,) = find(t["kind"], t["name"])
        out.append((f"epp-legacy-flags: {t['kind']}/{t['name']}", apply_json_patch(doc, patch["ops"])))
    return out


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_kubernetes_schemas(version):
    checked, failures = 0, []
    for where, doc in all_resources():
        key = (doc["apiVersion"], doc["kind"])
        if key in CRD_FILES or key in NOT_VENDORED:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
            checked += 1
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            failures.append(f"{where} {doc['kind']}/{doc['metadata']['name']}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            failures.append(f"{where}: no Kubernetes schema and no CRD copy for {key}: {e}")
    assert not failures, "\n".join(failures)
    assert checked >= 15, f"only {checked} resources validated"


# ---------------------------------------------------------------------------------------
# CRDs


def crd_schema(filename: str) -> dict:
    (crd,) = load_docs(CRDS / filename)
    (version,) = [v for v in crd["spec"]["versions"] if v.get("served") and v.get("storage")]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])

    def close(node):
        # The API server prunes unknown fields silently; refuse them here instead.
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for v in node.values():
                close(v)
        elif isinstance(node, list):
            for v in node:
                close(v)

    close(schema)
    schema["properties"]["metadata"] = {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"}},
    }
    return schema


def cel_rules(doc: dict) -> list[str]:
    """The x-kubernetes-validations (CEL) of InferencePool v1, which JSON Schema cannot express."""
    errs = []
    if doc["kind"] == "InferencePool":
        ref = doc["spec"].get("endpointPickerRef", {})
        if ref.get("kind", "Service") == "Service" and "port" not in ref:
            errs.append("spec.endpointPickerRef: port is required when kind is 'Service' or unspecified")
        nums = [p["number"] for p in doc["spec"].get("targetPorts", [])]
        if len(nums) != len(set(nums)):
            errs.append("spec.targetPorts: port number must be unique")
    return errs


def crd_errors(doc: dict) -> list[str]:
    schema = crd_schema(CRD_FILES[(doc["apiVersion"], doc["kind"])])
    v = jsonschema.Draft7Validator(schema)
    errs = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in v.iter_errors(doc)]
    return errs + cel_rules(doc)


def test_crd_copies_are_the_published_files():
    readme = (CRDS / "README.md").read_text()
    for name in CRD_FILES.values():
        digest = hashlib.sha256((CRDS / name).read_bytes()).hexdigest()
        assert f"`{name}`" in readme and digest in readme, f"{name}: sha256 {digest} is not the one in crds/README.md"
        assert "github.com/kubernetes-sigs/gateway-api-inference-extension" in readme


def test_custom_resources_validate_against_crd_schemas():
    seen = set()
    for where, doc in all_resources():
        key = (doc["apiVersion"], doc["kind"])
        if key in CRD_FILES:
            assert not crd_errors(doc), f"{where} {doc['kind']}/{doc['metadata']['name']}: {crd_errors(doc)}"
            seen.add(key)
    assert seen == set(CRD_FILES), f"no resource of {set(CRD_FILES) - seen}"


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d["spec"]["endpointPickerRef"].pop("port"), "port is required"),
        (lambda d: d["spec"]["targetPorts"].append({"number": 8000}), "must be unique"),
        (lambda d: d["spec"]["endpointPickerRef"].update(failureMode="Sometimes"), "is not one of"),
        (lambda d: d["spec"].update(extensionRef={"name": "x"}), "Additional properties"),
        (lambda d: d["spec"].pop("selector"), "'selector' is a required property"),
        (lambda d: d["spec"]["targetPorts"][0].update(number=70000), "is greater than the maximum"),
    ],
)
def test_crd_validation_catches_broken_pools(mutate, expected):
    doc = copy.deepcopy(one("InferencePool", "tessera"))
    mutate(doc)
    errs = crd_errors(doc)
    assert any(expected in e for e in errs), errs


def test_crd_validation_catches_broken_objectives():
    doc = copy.deepcopy(find("InferenceObjective")[0])
    doc["spec"]["priority"] = "high"
    doc["spec"]["modelName"] = "pirate"  # the pre-v1 InferenceModel field
    errs = crd_errors(doc)
    assert any("is not of type 'integer'" in e for e in errs), errs
    assert any("Additional properties" in e for e in errs), errs


# ---------------------------------------------------------------------------------------
# Cross-references


def server_deployments() -> list[dict]:
    return [
        d for d in find("Deployment")
        if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "server"
    ]


def test_both_variants_exist():
    names = {d["metadata"]["name"] for d in server_deployments()}
    assert names == {"tessera-cpu", "tessera-gpu"}
    gpu = pod_container(one("Deployment", "tessera-gpu"))
    assert gpu["resources"]["limits"].get("nvidia.com/gpu") == "1"
    assert "nvidia.com/gpu" not in pod_container(one("Deployment", "tessera-cpu"))["resources"]["limits"]


@pytest.mark.parametrize("name", ["tessera-cpu", "tessera-gpu"])
def test_server_deployment_probes_shutdown_and_resources(name):
    d = one("Deployment", name)
    pod = d["spec"]["template"]["spec"]
    c = pod_container(d)
    env = container_env(d)
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    sleep_s = int(pre_stop[1])
    shutdown_s = float(env["TESSERA_SHUTDOWN_TIMEOUT"])
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= sleep_s + shutdown_s + 5, (
        f"terminationGracePeriodSeconds {grace} < preStop {sleep_s} + --shutdown-timeout {shutdown_s} + 5 s"
    )
    assert grace <= sleep_s + shutdown_s + 30, "grace period far beyond the drain: pods linger"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{name}: resources.{kind}"
    assert pod["enableServiceLinks"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    # One port everywhere: the container, TESSERA_PORT, the scrape annotation, the pool.
    port = c["ports"][0]["containerPort"]
    assert str(port) == env["TESSERA_PORT"]
    assert d["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    pool = one("InferencePool", "tessera")
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [port]
    labels = d["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items(), "the pool does not select these pods"
    # Adapters: start-up ones must lie under the mounted --lora-root.
    root = env["TESSERA_LORA_ROOT"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert root in mounts and mounts[root].get("readOnly") is True
    claim = next(v for v in pod["volumes"] if v["name"] == mounts[root]["name"])["persistentVolumeClaim"]["claimName"]
    assert one("PersistentVolumeClaim", claim)
    for entry in env["TESSERA_LORA"].split(","):
        _, path = entry.split("=", 1)
        assert path.startswith(root + "/"), f"{entry} is not under --lora-root {root}"
    model = env["TESSERA_MODEL"]
    assert any(model.startswith(m + "/") for m in mounts), f"{model} is on no mounted volume"


def test_epp_grace_covers_the_pool_and_pool_points_at_epp():
    epp = one("Deployment", "tessera-epp")
    longest = max(d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] for d in server_deployments())
    assert epp["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= longest
    ref = one("InferencePool", "tessera")["spec"]["endpointPickerRef"]
    svc = one("Service", ref["name"])
    assert ref["port"]["number"] in [p["port"] for p in svc["spec"]["ports"]]
    assert svc["spec"]["selector"].items() <= epp["spec"]["template"]["metadata"]["labels"].items()
    args = pod_container(epp)["args"]
    assert "--pool-name=tessera" in args
    (cm_volume,) = [v for v in epp["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    cm = one("ConfigMap", cm_volume["configMap"]["name"])
    (config_file,) = [a.split("=", 1)[1] for a in args if a.startswith("--config-file=")]
    assert config_file.rsplit("/", 1)[1] in cm["data"]


def test_epp_configuration_names_tessera_metrics():
    cfg = epp_config(one("ConfigMap", "tessera-epp"))
    assert cfg["kind"] == "EndpointPickerConfig"
    plugins = {p.get("name", p["type"]): p for p in cfg["plugins"]}
    extractor = plugins["core-metrics-extractor"]["parameters"]
    engines = {e["name"]: e for e in extractor["engineConfigs"]}
    assert extractor["defaultEngine"] in engines
    tessera = engines["tessera"]
    assert tessera["queuedRequestsSpec"] == "tessera:num_requests_waiting"
    assert tessera["kvUsageSpec"] == "tessera:kv_cache_usage_perc"
    assert tessera["loraSpec"] == "tessera:lora_requests_info"
    # Pods say which engine they are.
    for d in server_deployments():
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert labels.get(extractor["engineLabelKey"]) == "tessera"
    # Every plugin of a profile is declared.
    for profile in cfg["schedulingProfiles"]:
        for p in profile["plugins"]:
            assert p["pluginRef"] in plugins, p
    # The legacy overlay passes the same names as flags.
    flags = dict(
        a.split("=", 1) for a in legacy_flag_args() if a.startswith("--") and "=" in a
    )
    assert flags["--total-queued-requests-metric"] == "tessera:num_requests_waiting"
    assert flags["--total-running-requests-metric"] == "tessera:num_requests_running"
    assert flags["--kv-cache-usage-percentage-metric"] == "tessera:kv_cache_usage_perc"
    assert flags["--lora-info-metric"] == "tessera:lora_requests_info"


def legacy_flag_args() -> list[str]:
    for patch in legacy_epp_patches():
        for op in patch["ops"]:
            if op["path"].endswith("/args"):
                return op["value"]
    raise AssertionError("no args patch in epp-legacy-flags")


def test_one_inference_objective_per_served_model():
    objectives = {o["metadata"]["name"]: o for o in find("InferenceObjective")}
    for d in server_deployments():
        env = container_env(d)
        served = {env["TESSERA_SERVED_MODEL_NAME"]} | {
            e.split("=", 1)[0] for e in env["TESSERA_LORA"].split(",")
        }
        assert served == set(objectives), f"{d['metadata']['name']}: served {served}, objectives {set(objectives)}"
    for o in objectives.values():
        assert o["spec"]["poolRef"]["name"] == "tessera"
        assert isinstance(o["spec"].get("priority"), int)


def test_httproute_sends_to_the_pool():
    route = one("HTTPRoute", "tessera")
    refs = [r for rule in route["spec"]["rules"] for r in rule["backendRefs"]]
    assert refs and all(
        r["group"] == "inference.networking.k8s.io" and r["kind"] == "InferencePool" and "port" not in r
        for r in refs
    ), refs
    for r in refs:
        assert one("InferencePool", r["name"])


def test_hpa_targets_and_metric_adapter():
    rules = yaml.safe_load(one("ConfigMap", "tessera-prometheus-adapter")["data"]["config.yaml"])["rules"]
    for hpa in find("HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        assert one(ref["kind"], ref["name"])
        for m in hpa["spec"]["metrics"]:
            name = m["pods"]["metric"]["name"]
            assert name == "tessera_num_requests_waiting"
            assert any(adapter_exposes(r, "tessera:num_requests_waiting", name) for r in rules), (
                f"no prometheus-adapter rule exposes {name}"
            )


def adapter_exposes(rule: dict, series: str, exposed: str) -> bool:
    """Whether a prometheus-adapter rule turns `series` into the custom metric `exposed`."""
    if series not in rule["seriesQuery"]:
        return False
    m = re.match(rule["name"]["matches"], series)
    if not m:
        return False
    return re.sub(r"\$\{(\d+)\}", lambda g: m.group(int(g.group(1))), rule["name"]["as"]) == exposed


def test_kustomization_lists_existing_files():
    for kz in K8S.rglob("kustomization.yaml"):
        for res in load_docs(kz)[0]["resources"]:
            assert (kz.parent / res).exists(), f"{kz}: {res}"


# ---------------------------------------------------------------------------------------
# Dockerfiles


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_shape(name):
    text = (DOCKER / name).read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "target-cpu" not in code, "the image must not be built for the build host's CPU"
    assert len(re.findall(r"(?m)^FROM ", code)) >= 2, "multi-stage build"
    runtime = re.split(r"(?m)^FROM ", code)[-1]
    assert re.search(r"(?m)^USER 10001", runtime), "the server runs as a non-root user"
    assert re.search(r"(?m)^HEALTHCHECK .*\n?.*tessera-healthcheck", runtime)
    assert "ENTRYPOINT [\"/usr/local/bin/tessera-entrypoint\"]" in runtime
    assert not re.search(r"(?m)^(COPY|ADD) .*(models|\.gguf|adapters|safetensors)", code), "no baked weights"
    assert "cargo build --release --locked -p tessera-server --bin tessera" in code
    ignore = (DOCKER / f"{name}.dockerignore").read_text()
    assert "**/*.gguf" in ignore and "!crates/**" in ignore
    if name == "Dockerfile.cuda":
        assert "--features cuda" in code
        assert runtime.startswith("nvidia/cuda:${CUDA_VERSION}-runtime-")
        assert "libnvrtc" in runtime


def tool(name: str) -> str:
    """A linter installed from tests/deploy/requirements.txt (next to this Python, or on PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: pip install -r tests/deploy/requirements.txt")
    return found


def test_hadolint_passes():
    r = subprocess.run([tool("hadolint"), "Dockerfile.cpu", "Dockerfile.cuda"], cwd=DOCKER, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_shellcheck_passes():
    r = subprocess.run([tool("shellcheck"), "entrypoint.sh", "healthcheck.sh"], cwd=DOCKER, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_images_share_the_server_flags():
    cpu = dockerfile_runtime_env(DOCKER / "Dockerfile.cpu")
    cuda = dockerfile_runtime_env(DOCKER / "Dockerfile.cuda")
    tess = {k: v for k, v in cpu.items() if k.startswith("TESSERA_")}
    assert tess == {k: v for k, v in cuda.items() if k.startswith("TESSERA_")}
    for d in server_deployments():
        env = container_env(d)
        for k in ("TESSERA_SHUTDOWN_TIMEOUT", "TESSERA_PORT", "TESSERA_LORA_ROOT", "TESSERA_MODEL"):
            assert env[k] == tess[k], f"{d['metadata']['name']} {k}={env[k]} but the image has {tess[k]}"


# ---------------------------------------------------------------------------------------
# Grafana


def test_dashboard_is_well_formed():
    dash = json.loads(DASHBOARD.read_text())
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "namespace", "model"} <= variables
    titles = " | ".join(p["title"] for p in panels)
    for needed in ("tokens/s per model", "tokens/s per LoRA adapter", "Time to first token", "Inter-token latency",
                   "KV-cache usage", "running and waiting", "5xx"):
        assert needed in titles, f"no panel for {needed}"
    for p in panels:
        assert 0 <= p["gridPos"]["x"] and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}"
        assert p["targets"], p["title"]
        for t in p["targets"]:
            for var in re.findall(r"\$(\w+)", t["expr"]):
                assert var in variables, f"{p['title']}: ${var} is not a dashboard variable"
