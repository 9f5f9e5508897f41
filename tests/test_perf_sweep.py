"""perf_sweep's curve summary: perf_analyzer CSV (µs) -> points, best under a p99 bound."""

from __future__ import annotations

from pathlib import Path

from clients.bench.perf_sweep import best_under, plot, summarize

HEADER = ["Concurrency", "Inferences/Second", "p50 latency", "p99 latency"]
ROWS = [["1", "500.5", "1900", "2600"], ["64", "9000", "6000", "21000"],
        ["256", "12000", "20000", "70000"]]  # fmt: skip


def test_summarize_reads_microseconds_as_milliseconds() -> None:
    assert summarize(HEADER, ROWS)[1] == (64, 9000.0, 6.0, 21.0)


def test_best_under_takes_the_fastest_level_within_the_bound() -> None:
    curve = summarize(HEADER, ROWS)
    assert best_under(curve, 50.0) == (64, 9000.0, 6.0, 21.0)
    assert best_under(curve, 100.0) == (256, 12000.0, 20.0, 70.0)
    assert best_under(curve, 1.0) is None


def test_plot_writes_a_png(tmp_path: Path) -> None:
    out = tmp_path / "curve.png"
    plot(summarize(HEADER, ROWS), 50.0, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
