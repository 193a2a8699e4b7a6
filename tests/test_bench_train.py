"""`tools/bench_train.py` end to end on a shrunken tiny model: what it writes, never how fast it is."""

import json

from launcher import ROOT, check, python

BENCH = ROOT / "tools" / "bench_train.py"
SMALL = [
    "--vocab_size",
    "256",
    "--seq_len",
    "16",
    "--micro_batch_size",
    "2",
    "--experts",
    "4",
    "--threads",
    "1",
    "--warmup",
    "1",
    "--rounds",
    "2",
]


def test_bench_train_times_dense_and_both_moe_twins_with_both_expert_kernels_and_each_peak_in_isolation(tmp_path):
    out = tmp_path / "bench.json"
    proc = check(python(BENCH, [*SMALL, "--isolate", "--json", str(out)], timeout=240))
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["dense", "e4 cf1 grouped", "e4 cf1 loop", "e4 dropless grouped", "e4 dropless loop"]
    assert [r["experts_impl"] for r in rows.values()] == [None, "grouped", "loop", "grouped", "loop"]
    assert "e4 dropless loop" in proc.stdout and result["command"].startswith("python ")
    assert result["args"]["default_impl"] == "loop" and "default expert path here: loop" in proc.stdout
    assert result["tokens_per_step"] == 2 * 16 and 0 < result["ffn_flop_share"] < 1
    for r in rows.values():
        assert len(r["seconds"]) == 2
        for key in ("step_ms", "tok_s", "vs_dense", "opt_ms", "state_mb", "peak_mb", "base_mb"):
            assert r[key] > 0, (r["variant"], key)
    # Twins with the same active parameters (up to the dense FFN's biases and the router's
    # weights): only the total grows with the experts.
    for r in rows.values():
        assert abs(r["params_active"] / rows["dense"]["params_active"] - 1) < 0.01
    assert rows["e4 cf1 loop"]["params_total"] > rows["dense"]["params_total"]
    assert rows["e4 cf1 loop"]["state_mb"] > rows["dense"]["state_mb"]
    assert rows["dense"]["vs_dense"] == 1.0 and rows["dense"]["drop"] is None
    assert rows["e4 dropless grouped"]["drop"] == rows["e4 dropless loop"]["drop"] == 0.0
