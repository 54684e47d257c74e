"""Prometheus metrics of one daemon (its own registry, served at /metrics)."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.rpc_calls = Counter(
            "den_rpc_calls", "RPC calls by method and outcome.", ["method", "outcome"], registry=r
        )
        self.rpc_latency = Histogram(
            "den_rpc_latency_seconds",
            "RPC call latency by method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.workspaces = Gauge("den_workspaces", "Workspaces by state.", ["state"], registry=r)
        self.sessions = Gauge("den_sessions", "Open sessions by kind.", ["kind"], registry=r)
        self.transitions = Counter(
            "den_workspace_transitions",
            "Suspends, resumes, stops by cause.",
            ["action", "cause"],
            registry=r,
        )
        self.resume_latency = Histogram(
            "den_resume_seconds",
            "Time to resume a suspended workspace.",
            ["cause"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.suspend_latency = Histogram(
            "den_suspend_seconds",
            "Time to suspend a workspace.",
            ["cause"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ws_cpu = Gauge(
            "den_workspace_cpu_seconds",
            "CPU seconds used by a workspace.",
            ["workspace"],
            registry=r,
        )
        self.ws_memory = Gauge(
            "den_workspace_memory_bytes", "Memory used by a workspace.", ["workspace"], registry=r
        )
        # The web front door: requests the gate let through to a workspace (by how
        # the caller got in) and refused, and Caddy's restarts.
        self.http_requests = Counter(
            "den_http_requests",
            "Requests to workspace URLs let through, by workspace and how the caller got in.",
            ["workspace", "share"],
            registry=r,
        )
        self.http_refused = Counter(
            "den_http_refused",
            "Requests to workspace URLs refused, by reason.",
            ["reason"],
            registry=r,
        )
        self.caddy_restarts = Counter(
            "den_caddy_restarts", "Times den restarted Caddy after it died.", registry=r
        )
        # The LLM gateway (den.llm): requests and tokens charged to each user.
        self.llm_requests = Counter(
            "den_llm_requests",
            "LLM gateway requests by user, provider, model and outcome.",
            ["user", "provider", "model", "outcome"],
            registry=r,
        )
        self.llm_tokens = Counter(
            "den_llm_tokens",
            "LLM tokens used by user, provider, model and kind (prompt, completion).",
            ["user", "provider", "model", "kind"],
            registry=r,
        )
        self.llm_refusals = Counter(
            "den_llm_refusals",
            "LLM gateway requests refused before reaching a provider, by user and reason.",
            ["user", "reason"],
            registry=r,
        )
        self.llm_latency = Histogram(
            "den_llm_upstream_seconds",
            "Time from forwarding an LLM request to its upstream's last byte, by provider.",
            ["provider"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def forget_workspace(self, ref: str) -> None:
        for g in (self.ws_cpu, self.ws_memory):
            with contextlib.suppress(KeyError):
                g.remove(ref)
        for labels in [k for k in self.http_requests._metrics if k[0] == ref]:
            with contextlib.suppress(KeyError):
                self.http_requests.remove(*labels)
