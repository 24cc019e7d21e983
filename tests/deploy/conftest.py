"""Shared helpers and fixtures for the deployment checks (pytest tests/deploy).

Everything here runs without a container engine or a cluster: manifests are validated
against schemas, Prometheus files with promtool, and the metric names against a real
tessera (the release binary, the default model) started on a free loopback port.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
CRDS = K8S / "crds"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "tessera-dashboard.json"
DOCKER = DEPLOY / "docker"
FIXTURES = ROOT.parent / "shared" / "fixtures"
BIN = Path(os.environ.get("TESSERA_DEPLOY_TEST_BIN", ROOT / "target" / "release" / "tessera"))


# ---------------------------------------------------------------------------------------
# Files


def load_docs(path: Path) -> list[dict]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def manifest_files() -> list[Path]:
    """Every Kubernetes manifest of deploy/k8s (not the CRD copies, not kustomizations)."""
    return sorted(
        p
        for p in K8S.rglob("*.yaml")
        if CRDS not in p.parents and p.name != "kustomization.yaml"
    )


def manifests() -> list[tuple[Path, dict]]:
    return [(p, d) for p in manifest_files() for d in load_docs(p)]


def find(kind: str, name: str | None = None) -> list[dict]:
    return [
        d
        for _, d in manifests()
        if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(kind: str, name: str) -> dict:
    found = find(kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def container_env(deployment: dict, container: str | None = None) -> dict[str, str]:
    c = pod_container(deployment, container)
    return {e["name"]: e.get("value") for e in c.get("env", []) if "value" in e}


def pod_container(deployment: dict, name: str | None = None) -> dict:
    cs = deployment["spec"]["template"]["spec"]["containers"]
    return cs[0] if name is None else next(c for c in cs if c["name"] == name)


def epp_config(configmap: dict) -> dict:
    (text,) = configmap["data"].values()
    return yaml.safe_load(text)


def legacy_epp_patches() -> list[dict]:
    """The JSON 6902 patches of deploy/k8s/epp-legacy-flags."""
    kz = load_docs(K8S / "epp-legacy-flags" / "kustomization.yaml")[0]
    return [
        {"target": p["target"], "ops": yaml.safe_load(p["patch"])} for p in kz["patches"]
    ]


def apply_json_patch(doc: dict, ops: list[dict]) -> dict:
    """The `replace` and `add` operations of RFC 6902, enough for our kustomize patches."""
    doc = json.loads(json.dumps(doc))
    for op in ops:
        assert op["op"] in ("replace", "add"), op
        keys = [k.replace("~1", "/").replace("~0", "~") for k in op["path"].split("/")[1:]]
        node = doc
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        last = keys[-1]
        if isinstance(node, list):
            node[int(last)] = op["value"]
        else:
            if op["op"] == "replace":
                assert last in node, f"replace of a missing path {op['path']}"
            node[last] = op["value"]
    return doc


def dockerfile_runtime_env(path: Path) -> dict[str, str]:
    """The ENV of the last stage (the image that runs) of a Dockerfile."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages = re.split(r"(?m)^FROM\s", text)
    env: dict[str, str] = {}
    for line in stages[-1].splitlines():
        if line.startswith("ENV "):
            for pair in shlex.split(line[4:]):
                k, _, v = pair.partition("=")
                env[k] = v
    return env


# ---------------------------------------------------------------------------------------
# Running tessera


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_model() -> Path:
    out = subprocess.run(
        [str(ROOT / "scripts" / "fetch-model")], check=True, capture_output=True, text=True
    ).stdout
    return Path(out.strip().splitlines()[-1])


def http(method: str, url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path
    argv: list[str] = field(default_factory=list)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"tessera exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}"
                )
            try:
                if http("GET", self.url + "/ready", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"tessera not ready after {timeout}s:\n{self.log.read_text()[-4000:]}")

    def stop(self, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start(argv: list[str], env: dict[str, str], log: Path, port: int) -> Server:
    f = log.open("w")
    proc = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    return Server(proc=proc, url=f"http://127.0.0.1:{port}", log=log, argv=argv)


def require_binary() -> Path:
    if not BIN.is_file():
        pytest.fail(
            f"{BIN} is missing: build it first (cargo build --release -p tessera-server --bin tessera)"
        )
    return BIN


def require_adapter(name: str) -> Path:
    p = FIXTURES / "adapters" / name
    if not (p / "adapter_config.json").is_file():
        pytest.fail(f"the reference adapter {p} is missing (../shared/fixtures beside the checkout)")
    return p


@pytest.fixture(scope="session")
def tessera_metrics(tmp_path_factory) -> str:
    """/metrics of a real tessera after a base request, an adapter request and a 404."""
    require_binary()
    port = free_port()
    log = tmp_path_factory.mktemp("tessera") / "server.log"
    pirate = require_adapter("pirate")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    srv = start(
        [
            str(BIN), "serve", "--model", str(default_model()), "--host", "127.0.0.1",
            "--port", str(port), "--threads", "1", "--max-loras", "2",
            "--lora", f"pirate={pirate}",
        ],
        env, log, port,
    )
    try:
        srv.wait_ready()
        for model in ("", "pirate"):
            body = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
            if model:
                body["model"] = model
            status, text = http("POST", srv.url + "/v1/completions", body)
            assert status == 200, text
        status, _ = http("POST", srv.url + "/v1/completions", {"model": "no-such-model", "prompt": "x"})
        assert status == 404
        status, text = http("GET", srv.url + "/metrics")
        assert status == 200
        return text
    finally:
        code = srv.stop()
        assert code == 0, f"tessera exited {code} after SIGTERM:\n{log.read_text()[-4000:]}"
