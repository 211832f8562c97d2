"""Prometheus text format of the service's metrics."""

from __future__ import annotations

from diffmem.server.metrics import Counter, Histogram, Metrics


def test_counter_and_histogram_text_format():
    c = Counter("x_total", "help text", ("endpoint",))
    c.inc('/a"b')
    c.inc('/a"b', value=2)
    assert c.render() == ["# HELP x_total help text", "# TYPE x_total counter",
                          'x_total{endpoint="/a\\"b"} 3']
    h = Histogram("lat", "latency", (0.1, 1.0))
    for v in (0.05, 0.5, 5.0):
        h.observe(v)
    assert h.render()[2:] == ['lat_bucket{le="0.1"} 1', 'lat_bucket{le="1"} 2',
                              'lat_bucket{le="+Inf"} 3', "lat_count 3", "lat_sum 5.55"]


def test_metrics_render_lists_every_family():
    text = Metrics().render()
    for name in ("diffmem_requests_total", "diffmem_request_seconds", "diffmem_batch_prompts",
                 "diffmem_batch_seconds", "diffmem_prompts_total", "diffmem_queue_prompts"):
        assert f"# TYPE {name} " in text
