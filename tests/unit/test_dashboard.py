"""The Grafana dashboard and the Prometheus config in deploy/ refer to what the code exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client.metrics import MetricWrapperBase

from services.runtime import metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


SERIES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",), "gauge": ("",)}


def _exported() -> set[str]:
    """Every series name the stages' metrics can expose, observed yet or not, and the SIP
    gateway's (Go: the full names in its metric options; any of a histogram's series)."""
    python = {family.name + suffix
              for metric in vars(metrics).values() if isinstance(metric, MetricWrapperBase)
              for family in metric.collect() for suffix in SERIES.get(family.type, ("",))}
    gateway = {name + suffix
               for path in (DEPLOY.parent / "services" / "sip").glob("*.go")
               if not path.name.endswith("_test.go")
               for name in re.findall(r'Name:\s*"(voicebus_[a-z0-9_]+)"', path.read_text())
               for suffix in ("", "_bucket", "_sum", "_count")}
    return python | gateway


def test_every_dashboard_query_names_a_metric_the_stages_export() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "voicebus.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {name for q in queries for name in re.findall(r"\bvoicebus_[a-z0-9_]+", q)}
    missing = sorted(used - _exported())
    assert not missing, missing
    for name in ("voicebus_e2e_latency_seconds_bucket", "voicebus_llm_ttft_seconds_bucket",
                 "voicebus_tts_ttfb_seconds_bucket", "voicebus_transcription_delay_seconds_bucket",
                 "voicebus_end_of_utterance_delay_seconds_bucket"):
        assert name in used, name


def test_prometheus_scrapes_every_service_and_watching_stays_opt_in() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    names = set(scrape["scrape_configs"][0]["dns_sd_configs"][0]["names"])
    assert names == {"token", "ingress", "stt", "llm", "tts", "egress"} <= set(compose["services"])
    for extra in ("prometheus", "grafana", "jaeger"):
        assert compose["services"][extra]["profiles"] == ["observability"], extra
