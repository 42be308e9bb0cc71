"""Prometheus metrics of one server: queue depth, running batch size, tokens, adapter loads and evictions
(read from the engine and pool at scrape time), and request latency / time-to-first-token histograms."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class _EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        e, stats = self.engine, self.engine.stats
        yield GaugeMetricFamily("grafting_queue_depth", "requests waiting to join the batch", value=len(e.waiting))
        yield GaugeMetricFamily("grafting_batch_size", "rows in the running batch", value=len(e.running))
        yield CounterMetricFamily("grafting_generated_tokens", "tokens generated", value=stats["generated_tokens"])
        yield CounterMetricFamily("grafting_prompt_tokens", "prompt tokens prefilled", value=stats["prompt_tokens"])
        yield CounterMetricFamily("grafting_requests", "requests accepted", value=stats["requests"])
        yield CounterMetricFamily("grafting_request_errors", "requests that ended in an error",
                                  value=stats["errors"])
        if "preemptions" in stats:  # a generating engine (an embedder keeps no cache)
            yield GaugeMetricFamily("grafting_kv_cache_bytes", "bytes held by the running batch's key/value cache",
                                    value=e.cache.nbytes())
            yield CounterMetricFamily("grafting_preemptions", "rows preempted to keep the key/value cache within "
                                      "its budget (recomputed when they rejoin)", value=stats["preemptions"])
        rate = getattr(e, "token_rate", None)  # an embedder generates nothing
        yield GaugeMetricFamily("grafting_tokens_per_second", f"generated tokens per second over the last "
                                f"{rate.window:g} s" if rate else "generated tokens per second",
                                value=rate.rate(stats["generated_tokens"]) if rate else 0.0)
        pool = e.pool
        if pool is not None:
            yield CounterMetricFamily("grafting_adapter_loads", "adapters installed in the model",
                                      value=pool.stats["loads"])
            yield CounterMetricFamily("grafting_adapter_reads", "adapters read from disk (the rest of the "
                                      "loads came from the host tier)", value=pool.stats["reads"])
            yield CounterMetricFamily("grafting_adapter_evictions", "resident adapters evicted",
                                      value=pool.stats["evictions"])
            yield GaugeMetricFamily("grafting_adapters_resident", "adapters resident in the model",
                                    value=len(pool.resident))
            yield GaugeMetricFamily("grafting_adapters_in_memory", "adapters held in memory as read (host tier)",
                                    value=len(pool.in_memory))
            yield GaugeMetricFamily("grafting_adapters_registered", "adapters registered",
                                    value=len(pool.names()))


class ServerMetrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.latency = Histogram("grafting_request_latency_seconds", "arrival to last token",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("grafting_time_to_first_token_seconds", "arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)

    def observe(self, request) -> None:
        """Engine ``on_finish`` hook."""
        if request.finished_at is not None:
            self.latency.observe(request.finished_at - request.created)
        if request.first_token_at is not None:
            self.ttft.observe(request.first_token_at - request.created)

    def render(self) -> bytes:
        return generate_latest(self.registry)
