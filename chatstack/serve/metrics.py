"""Server metrics in Prometheus' text exposition format (what `GET /metrics` returns).

Counters, gauges and histograms written by hand (no prometheus_client dependency), thread-safe,
because the scheduler thread and the HTTP handlers both update them. Names follow Prometheus'
conventions (`_total` counters, `_seconds` histograms) and vLLM's where one exists:

    chatstack_requests_total{endpoint,status}      finished HTTP API requests by status code
    chatstack_prompt_tokens_total                  prompt tokens admitted
    chatstack_generation_tokens_total              tokens generated
    chatstack_queue_depth                          rows waiting for a batch slot
    chatstack_running_requests                     rows in the running batch
    chatstack_time_to_first_token_seconds          submit -> first generated token (histogram)
    chatstack_request_latency_seconds              submit -> last token (histogram)
    chatstack_batch_size                           rows per engine step (histogram)
    chatstack_engine_step_seconds                  time of one engine step (histogram)
    chatstack_prefix_cache_reused_tokens           prompt tokens not prefilled thanks to the prefix cache (so far)
    chatstack_prefix_cache_bytes                   memory the prefix cache holds
    chatstack_event_loop_lag_seconds               how late a 20 ms timer fires on the HTTP event loop (histogram):
                                                   time the loop spent blocked or waiting for the GIL / a CPU
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _labels(names: tuple[str, ...], values: tuple) -> str:
    if not names:
        return ""
    inner = ",".join(
        f'{n}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for n, v in zip(names, values)
    )
    return "{" + inner + "}"


class _Metric:
    kind = ""

    def __init__(self, name: str, help_: str, labelnames: tuple[str, ...] = ()):
        self.name, self.help, self.labelnames = name, help_, labelnames
        self.lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.values: dict[tuple, float] = defaultdict(float)

    def inc(self, amount: float = 1.0, *labels):
        with self.lock:
            self.values[tuple(labels)] += amount

    def get(self, *labels) -> float:
        with self.lock:
            return self.values.get(tuple(labels), 0.0)

    def render(self) -> list[str]:
        with self.lock:
            items = sorted(self.values.items()) or ([((), 0.0)] if not self.labelnames else [])
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {v:g}" for k, v in items]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.value = 0.0

    def set(self, v: float):
        self.value = float(v)

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {self.value:g}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help_, buckets=LATENCY_BUCKETS):
        super().__init__(name, help_)
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # last = +Inf
        self.sum = 0.0
        self.count = 0
        self.samples: list[float] = []  # kept (bounded) for quantiles in /health and benchmarks

    def observe(self, v: float):
        with self.lock:
            self.counts[bisect.bisect_left(self.buckets, v)] += 1
            self.sum += v
            self.count += 1
            if len(self.samples) < 100_000:
                self.samples.append(v)

    def quantile(self, q: float) -> float | None:
        with self.lock:
            s = sorted(self.samples)
        if not s:
            return None
        return s[min(len(s) - 1, int(q * len(s)))]

    def render(self) -> list[str]:
        with self.lock:
            counts, total, n = list(self.counts), self.sum, self.count
        lines, cum = self.header(), 0
        for b, c in zip(self.buckets, counts):
            cum += c
            lines.append(f'{self.name}_bucket{{le="{b:g}"}} {cum}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {n}')
        lines.append(f"{self.name}_sum {total:g}")
        lines.append(f"{self.name}_count {n}")
        return lines


class ServerMetrics:
    def __init__(self):
        self.requests = Counter(
            "chatstack_requests_total", "Finished API requests by endpoint and HTTP status.", ("endpoint", "status")
        )
        self.prompt_tokens = Counter("chatstack_prompt_tokens_total", "Prompt tokens admitted.")
        self.generation_tokens = Counter("chatstack_generation_tokens_total", "Tokens generated.")
        self.cancelled = Counter("chatstack_cancelled_rows_total", "Rows cancelled (client disconnects, stops).")
        self.rejected = Counter("chatstack_rejected_rows_total", "Rows refused because the queue was full.")
        self.queue_depth = Gauge("chatstack_queue_depth", "Rows waiting for a batch slot.")
        self.running = Gauge("chatstack_running_requests", "Rows in the running batch.")
        self.ttft = Histogram("chatstack_time_to_first_token_seconds", "Seconds from submit to the first token.")
        self.latency = Histogram("chatstack_request_latency_seconds", "Seconds from submit to the last token.")
        self.batch = Histogram("chatstack_batch_size", "Rows in the batch per engine step.", BATCH_BUCKETS)
        self.step_time = Histogram(
            "chatstack_engine_step_seconds",
            "Seconds per engine step (prefill + decode).",
            (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        )
        self.prefix_reused = Gauge(
            "chatstack_prefix_cache_reused_tokens",
            "Prompt tokens not prefilled thanks to the prefix cache, since start.",
        )
        self.prefix_bytes = Gauge("chatstack_prefix_cache_bytes", "Bytes of keys/values the prefix cache holds.")
        self.kv_bytes = Gauge(
            "chatstack_kv_cache_bytes", "Bytes of keys/values held: running rows, prompts being read, the prefix cache."
        )
        self.kv_budget = Gauge("chatstack_kv_cache_budget_bytes", "The KV cache budget (--kv-cache-mb).")
        self.loop_lag = Histogram(
            "chatstack_event_loop_lag_seconds",
            "How late a 20 ms timer fires on the HTTP event loop (blocked, or waiting for the GIL or a CPU).",
            (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        )
        self.preemptions = Gauge(
            "chatstack_preemptions_total",
            "Rows taken out of the batch to stay within the KV budget (recomputed later).",
        )

    def render(self) -> str:
        lines: list[str] = []
        for m in (
            self.requests,
            self.prompt_tokens,
            self.generation_tokens,
            self.cancelled,
            self.rejected,
            self.queue_depth,
            self.running,
            self.ttft,
            self.latency,
            self.batch,
            self.step_time,
            self.prefix_reused,
            self.prefix_bytes,
            self.kv_bytes,
            self.kv_budget,
            self.preemptions,
            self.loop_lag,
        ):
            lines += m.render()
        return "\n".join(lines) + "\n"
