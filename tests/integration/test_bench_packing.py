"""bench/packing.py --quick keeps working (integration tier: builds demo data, plans, trains a tiny model briefly)."""

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
BENCH = Path(__file__).resolve().parents[2] / "bench" / "packing.py"


def test_packing_benchmark_quick(capsys):
    spec = importlib.util.spec_from_file_location("bench_packing", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--quick"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == (f"packing_efficiency={result['packing_efficiency']:.4f} "
                    f"speedup_vs_padded={result['speedup_vs_padded']:.2f}")
    assert result["demo"]["efficiency"] >= 0.98 and result["mix_efficiency"] >= 0.98
    tp = result["throughput"]
    assert tp["packed_efficiency"] > tp["padded_efficiency"]  # the same samples fill fewer slots when packed
    assert tp["speedup"] > 0  # the quick timing (one measured micro-batch a side) is a smoke check, not a result
