"""`tools/bench_packing.py` end to end, tiny: packed rows against padding to the longest; never how fast."""

import json

from launcher import ROOT, check, python

BENCH = ROOT / "tools" / "bench_packing.py"
TINY = ["--conversations", "48", "--seq_len", "256", "--vocab_size", "256", "--threads", "1"]


def test_packed_rows_are_at_least_95_percent_real_tokens_and_padding_fewer_on_the_same_conversations(tmp_path):
    out = tmp_path / "bench.json"
    proc = check(python(BENCH, [*TINY, "--rounds", "2", "--warmup", "0", "--json", str(out)], timeout=120))
    result = json.loads(out.read_text())
    packed, padded = result["methods"]["packed"], result["methods"]["padded"]
    assert packed["real_fraction"] >= 0.95 > padded["real_fraction"]
    # The same conversations both ways: every real and supervised token counted once by each method.
    assert packed["real"] == padded["real"] and packed["supervised"] == padded["supervised"] > 0
    assert packed["slots"] < padded["slots"]
    for r in (packed, padded):
        assert len(r["seconds"]) == 2 and r["supervised_tok_s"] > 0 and r["real_tok_s"] > r["supervised_tok_s"]
    assert result["packed_over_padded"] > 0 and result["command"].startswith("python ")
    assert result["lengths"]["p99"] > 2 * result["lengths"]["p50"]  # long-tailed
    assert "packed / padded supervised tokens/s" in proc.stdout
