"""deploy/docker/entrypoint.sh and healthcheck.sh, run here outside a container against the
default model, with the environment the image sets (Dockerfile.cpu's runtime ENV)."""

from __future__ import annotations

import json
import os
import re
import subprocess

from conftest import (
    DOCKER,
    FIXTURES,
    default_model,
    dockerfile_runtime_env,
    free_port,
    http,
    require_adapter,
    require_binary,
    start,
)

ENTRYPOINT = DOCKER / "entrypoint.sh"
HEALTHCHECK = DOCKER / "healthcheck.sh"


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}


def entrypoint_list(name: str) -> set[str]:
    m = re.search(rf"(?ms)^{name}=\((.*?)\)", ENTRYPOINT.read_text())
    assert m, name
    return set(m.group(1).split())


def test_entrypoint_knows_every_tessera_serve_variable():
    help_text = subprocess.run(
        [str(require_binary()), "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    from_help = set(re.findall(r"\[env: TESSERA_([A-Z0-9_]+)", help_text))
    assert from_help, help_text
    mapped = entrypoint_list("known") | entrypoint_list("env_only")
    assert mapped == from_help, f"entrypoint.sh lacks {from_help - mapped}, has extra {mapped - from_help}"


def test_entrypoint_serves_a_request_with_the_image_flags(tmp_path):
    image_env = {k: v for k, v in dockerfile_runtime_env(DOCKER / "Dockerfile.cpu").items() if k.startswith("TESSERA_")}
    assert {"TESSERA_MODEL", "TESSERA_PORT", "TESSERA_HOST", "TESSERA_LORA_ROOT"} <= set(image_env)
    port = free_port()
    # Only what points into the container's file system or network changes.
    overrides = {
        "TESSERA_MODEL": str(default_model()),
        "TESSERA_LORA_ROOT": str(require_adapter("pirate").parent),
        "TESSERA_HOST": "127.0.0.1",
        "TESSERA_PORT": str(port),
    }
    env = clean_env() | image_env | overrides | {"TESSERA_BIN": str(require_binary())}
    srv = start(["bash", str(ENTRYPOINT)], env, tmp_path / "entrypoint.log", port)
    try:
        srv.wait_ready()
        status, body = http(
            "POST",
            srv.url + "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8,
             "temperature": 0},
        )
        assert status == 200, body
        answer = json.loads(body)["choices"][0]["message"]["content"]
        assert "Paris" in answer, answer
        # Run-time adapter loading works under the image's --lora-root.
        status, body = http("POST", srv.url + "/v1/load_lora_adapter", {"lora_name": "shout", "lora_path": "shout"})
        assert status == 200, body

        hc = subprocess.run(["bash", str(HEALTHCHECK)], env=clean_env() | {"TESSERA_PORT": str(port)},
                            capture_output=True, text=True, timeout=10)
        assert hc.returncode == 0, hc.stderr
        closed = subprocess.run(["bash", str(HEALTHCHECK)], env=clean_env() | {"TESSERA_PORT": str(free_port())},
                                capture_output=True, text=True, timeout=10)
        assert closed.returncode != 0
    finally:
        code = srv.stop()
    log = srv.log.read_text()
    assert code == 0, log[-4000:]
    (exec_line,) = [line for line in log.splitlines() if line.startswith("tessera-entrypoint: exec ")]
    for var, value in (image_env | overrides).items():
        flag = "--" + var.removeprefix("TESSERA_").lower().replace("_", "-")
        assert f"{flag} {value}" in exec_line, f"{var}={value} did not become {flag}: {exec_line}"
    # TESSERA_LOG_FORMAT=json took effect: tessera's own lines are JSON.
    tessera_lines = [line for line in log.splitlines() if line.startswith("{")]
    assert tessera_lines and all(json.loads(line)["level"] for line in tessera_lines)


def test_entrypoint_reports_a_missing_model():
    env = clean_env() | {"TESSERA_MODEL": "/models/missing.gguf", "TESSERA_BIN": str(require_binary())}
    r = subprocess.run(["bash", str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "mount the models volume" in r.stderr and "fetch" in r.stderr, r.stderr


def test_entrypoint_drops_service_links_and_names_unknown_variables():
    env = clean_env() | {
        "TESSERA_BIN": str(require_binary()),
        "TESSERA_PORT": "tcp://10.0.0.7:8000",
        "TESSERA_SERVICE_HOST": "10.0.0.7",
        "TESSERA_PORT_8000_TCP_ADDR": "10.0.0.7",
        "TESSERA_MAX_LORA": "3",
        "TESSERA_THREADS": "",
        "TESSERA_LORA": f"a={FIXTURES}/adapters/pirate,b={FIXTURES}/adapters/shout",
    }
    r = subprocess.run(["bash", str(ENTRYPOINT), "--help"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "ignoring TESSERA_PORT=tcp://10.0.0.7:8000" in r.stderr
    assert "unknown variables ignored: TESSERA_MAX_LORA " in r.stderr
    assert "TESSERA_SERVICE_HOST" not in r.stderr.split("unknown variables ignored:")[1].split("(")[0]
    (exec_line,) = [line for line in r.stderr.splitlines() if line.startswith("tessera-entrypoint: exec ")]
    assert "--port" not in exec_line and "--threads" not in exec_line
    assert f"--lora a={FIXTURES}/adapters/pirate --lora b={FIXTURES}/adapters/shout" in exec_line
