"""bench_trl_step.py's distill step at a toy shape, in this process: unpatched and patched, a
step of TRL's DistillationTrainer runs and reports its time and its sampling's; and the
harness hands the timing worker's extra numbers (the sampling) back beside the memory
worker's.

    pytest -q bench/test_bench_trl_step.py
"""

import pytest

import bench_trl_step as bench
import harness

pytest.importorskip("trl")

# 2 rows of 8 prompt + 4 sampled tokens, a 16-wide student and a 32-wide teacher over the byte
# tokenizer's 300 tokens: the step's code paths in a few seconds.
TOY = dict(step="distill", rows=2, prompt=8, completion=4, teacher_hidden=32, beta=1.0,
           hidden=16, layers=1, vocab=300, repeats=1, device="cpu")


@pytest.mark.parametrize("provider", bench.PROVIDERS)
def test_the_distill_step_runs_and_times_its_sampling(provider):
    reply = bench.worker(dict(TOY, provider=provider, measure="time"))
    assert 0 < reply["sampling_seconds"] < reply["seconds"]


def test_measure_trainer_step_returns_both_workers_replies(monkeypatch):
    replies = {False: {"seconds": 2.0, "sampling_seconds": 1.5},
               True: {"peak_bytes": 3 * 2**20, "completion_length": 7}}
    monkeypatch.setattr(harness._measure, "run_worker",
                        lambda command, spec, for_memory: replies[for_memory])
    measured, reply = harness.measure_trainer_step("script.py", {})
    assert measured == dict(time_ms=2000.0, peak_mb=3.0, error="")
    assert reply == {**replies[False], **replies[True]}
