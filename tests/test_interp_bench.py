"""The `dictionary` and `steering` benchmarks run on a CPU at tiny sizes and write schema rows."""

from __future__ import annotations

import csv

from vlafast import _backend
from vlafast.cli import main


def test_dictionary_and_steering_bench_rows(tmp_path):
    out = tmp_path / "rows.csv"
    with _backend.override("torch"):  # the kernels have their own tests; the interpreter is slow here
        assert main(["bench", "dictionary", "--out", str(out)]) == 0
        assert main(["bench", "steering", "--batch", "2", "--steps", "2", "--neurons", "7", "--views", "1",
                     "--prompt-tokens", "6", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    dictionary = [r for r in rows if r["bench"] == "dictionary"]
    assert len(dictionary) == 1 and float(dictionary[0]["baseline_ms"]) > 0
    assert '"ids_agree_layer0": 1.0' in dictionary[0]["extra"]  # fp32 on CPU: identical top-k ids
    ops = sorted(r["op"] for r in rows if r["bench"] == "steering")
    assert ops == ["pi0_chunk+DirectionPlan", "pi0_chunk+SteeringPlan", "pi0_chunk+SteeringPlan mask=0"]
