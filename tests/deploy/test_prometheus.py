"""promtool on deploy/prometheus, and the metric names of every consumer (rules, alerts,
dashboard, HPA adapter, endpoint picker) against the /metrics of a real tessera."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from conftest import (
    DASHBOARD,
    PROM,
    ROOT,
    epp_config,
    load_docs,
    one,
)

RULE_FILES = ["tessera-recording-rules.yml", "tessera-alerts.yml"]
# Labels that Prometheus adds to every tessera series (deploy/prometheus/prometheus.yml).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "accelerator"}
KUBERNETES_SD_ROLES = {"node", "service", "pod", "endpoints", "endpointslice", "ingress"}


def promtool(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is missing (Debian package `prometheus`; scripts/test installs it)")
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True)


def test_promtool_check_rules():
    r = promtool("check", "rules", *(str(PROM / f) for f in RULE_FILES))
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_rule_unit_tests():
    """Each alert fires on a series built to trip it, and the recording rules compute the
    expected tokens/s and TTFT percentile (tests/deploy/prometheus-rules-test.yml)."""
    r = promtool("test", "rules", "tests/deploy/prometheus-rules-test.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_promtool_check_config(tmp_path):
    """`promtool check config` on prometheus.yml (it also loads the rule files it names).

    Debian's promtool is built without Kubernetes service discovery ("field
    kubernetes_sd_configs not found"). Then each kubernetes_sd_configs block is checked
    here (role and keys) and replaced by an equivalent file_sd_configs, and promtool checks
    everything else: globals, relabelling regexes, rule files."""
    for f in ["prometheus.yml", *RULE_FILES]:
        shutil.copy(PROM / f, tmp_path / f)
    r = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    if r.returncode == 0:
        return
    out = r.stdout + r.stderr
    assert "field kubernetes_sd_configs not found" in out, out
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    (tmp_path / "targets.json").write_text("[]")
    replaced = 0
    for job in cfg["scrape_configs"]:
        for sd in job.pop("kubernetes_sd_configs", []):
            assert sd["role"] in KUBERNETES_SD_ROLES, sd
            assert set(sd) <= {"role", "namespaces", "selectors", "api_server", "kubeconfig_file", "attach_metadata"}, sd
            job.setdefault("file_sd_configs", []).append({"files": ["targets.json"]})
            replaced += 1
    assert replaced >= 1
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    r = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    print(f"promtool without Kubernetes SD: {replaced} kubernetes_sd_configs blocks checked by hand")


# ---------------------------------------------------------------------------------------
# Metric names


RAW = re.compile(r"tessera:[A-Za-z_][A-Za-z0-9_]*")
# Recorded series: level:metric:operation, e.g. model:tessera_generation_tokens:rate1m.
RECORDED = re.compile(r"\b[a-z_]+:tessera_[A-Za-z0-9_]+:[A-Za-z0-9_]+\b")
GROUPING = re.compile(r"\b(?:by|on|without|ignoring|group_left|group_right)\s*\(([^)]*)\)")
MATCHER = re.compile(r"[{,]\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")


def rules() -> list[dict]:
    return [r for f in RULE_FILES for g in yaml.safe_load((PROM / f).read_text())["groups"] for r in g["rules"]]


def consumers() -> dict[str, list[str]]:
    """Every PromQL expression or metric spec that names tessera series, by consumer."""
    out: dict[str, list[str]] = {}
    out["recording rules"] = [r["expr"] for r in rules() if "record" in r]
    out["alerts"] = [r["expr"] for r in rules() if "alert" in r]
    dash = json.loads(DASHBOARD.read_text())
    out["dashboard"] = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])] + [
        v["definition"] for v in dash["templating"]["list"] if v.get("definition")
    ]
    adapter = yaml.safe_load(one("ConfigMap", "tessera-prometheus-adapter")["data"]["config.yaml"])
    out["HPA (prometheus-adapter)"] = [r["seriesQuery"] for r in adapter["rules"]]
    cfg = epp_config(one("ConfigMap", "tessera-epp"))
    extractor = next(p for p in cfg["plugins"] if p["type"] == "core-metrics-extractor")
    out["endpoint picker"] = [
        v for e in extractor["parameters"]["engineConfigs"] if e["name"] == "tessera" for k, v in e.items() if k != "name"
    ]
    kz = load_docs(ROOT / "deploy/k8s/epp-legacy-flags/kustomization.yaml")[0]
    flags = [
        a for p in kz["patches"] for op in yaml.safe_load(p["patch"]) if op["path"].endswith("/args") for a in op["value"]
    ]
    out["endpoint picker flags"] = [a.split("=", 1)[1] for a in flags if a.endswith("-metric") or "-metric=" in a]
    return out


def exposition(text: str) -> tuple[set[str], set[str], dict[str, set[str]]]:
    """Sample names, label names, and label names per sample name of a /metrics body."""
    names, labels, by_name = set(), set(), {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)(\{([^}]*)\})?\s", line)
        assert m, f"unparsable /metrics line: {line}"
        ls = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=\"", m.group(3) or ""))
        names.add(m.group(1))
        labels |= ls
        by_name.setdefault(m.group(1), set()).update(ls)
    return names, labels, by_name


def test_consumers_name_only_series_that_tessera_exposes(tessera_metrics):
    names, labels, by_name = exposition(tessera_metrics)
    recorded = {r["record"] for r in rules() if "record" in r}
    allowed_labels = labels | TARGET_LABELS
    missing, unknown_recorded, unknown_labels = [], [], []
    used = 0
    for consumer, exprs in consumers().items():
        assert exprs, f"nothing found for {consumer}"
        for expr in exprs:
            for n in RAW.findall(expr):
                used += 1
                if n not in names:
                    missing.append(f"{consumer}: {n}")
            for n in RECORDED.findall(expr):
                if n not in recorded:
                    unknown_recorded.append(f"{consumer}: {n}")
            for group in GROUPING.findall(expr):
                for label in filter(None, (s.strip() for s in group.split(","))):
                    if label not in allowed_labels:
                        unknown_labels.append(f"{consumer}: {label} in {group!r}")
            for label in MATCHER.findall(expr):
                if label not in allowed_labels and label != "__name__":
                    unknown_labels.append(f"{consumer}: {label}")
    assert not missing, "not in tessera's /metrics:\n" + "\n".join(missing)
    assert not unknown_recorded, "no recording rule defines:\n" + "\n".join(unknown_recorded)
    assert not unknown_labels, "labels tessera does not have:\n" + "\n".join(unknown_labels)
    assert used >= 20
    # Histograms are read through their series: every *_bucket has its _sum and _count.
    for n in names:
        if n.endswith("_bucket"):
            base = n[: -len("_bucket")]
            assert {base + "_sum", base + "_count"} <= names, base


def test_lora_info_has_the_labels_the_picker_parses(tessera_metrics):
    _, _, by_name = exposition(tessera_metrics)
    assert {"max_lora", "running_lora_adapters", "waiting_lora_adapters"} <= by_name["tessera:lora_requests_info"]
    assert {"lora_name", "model_name"} <= by_name["tessera:lora_generation_tokens_total"]
