"""The paper-scale benchmark's reading of a run (Snakemake's benchmark files, the commands' logged CUDA peak)
and the peak line every command logs on a GPU, on hand-made files and a stand-in for torch.cuda."""

from __future__ import annotations

import json
import logging
import sys
import types

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "workflow" / "benchmarks"))
import paper_scale  # noqa: E402

from sfsd.cli.main import log_gpu_peak  # noqa: E402


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_measured_takes_each_rules_largest_job_and_logged_gpu_peak(tmp_path):
    head = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    bench = tmp_path / "results" / "benchmarks"
    _write(bench / "eigendecompose" / "bench" / "block_000.tsv", head + "10.0\t0:00:10\t1024.0\t1\t1\t1\t0\t0\t1\t10\n")
    _write(bench / "eigendecompose" / "bench" / "block_001.tsv", head + "12.5\t0:00:12\t2048.0\t1\t1\t1\t0\t0\t1\t12\n")
    _write(bench / "search" / "bench" / "s.tsv", head + "3.0\t0:00:03\t-\t-\t-\t-\t-\t-\t-\t-\n")
    _write(tmp_path / "results" / "logs" / "search" / "bench" / "s.log",
           "INFO sfsd: peak GPU memory: 1.250 GB\nINFO sfsd: peak GPU memory: 0.500 GB\n")
    _write(bench / "factor_cache" / "bench" / "feature.tsv", head + "5.0\t0:00:05\t512.0\t1\t1\t1\t0\t0\t1\t5\n")
    _write(tmp_path / "results" / "logs" / "factor_cache" / "bench" / "feature.log", "INFO sfsd: peak host memory: 3.250 GB\n")
    got = paper_scale.measured(tmp_path)
    # no logged peak: the largest sampled max_rss (MiB)
    assert got["eigendecompose"] == {"host": 2048 * 2**20, "device": None, "seconds": 22.5, "jobs": 2}
    assert got["search"] == {"host": None, "device": 1.25e9, "seconds": 3.0, "jobs": 1}
    # the command's own VmHWM over Snakemake's sample, which can miss the peak
    assert got["factor_cache"]["host"] == 3.25e9
    assert set(got) == {"eigendecompose", "search", "factor_cache"}


def test_a_command_logs_its_peak_resident_memory(tmp_path, caplog):
    from sfsd.cli.main import log_host_peak

    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmPeak:\t 9000 kB\nVmHWM:\t  2000000 kB\nVmRSS:\t 1000 kB\n")
    with caplog.at_level(logging.INFO, logger="sfsd"):
        log_host_peak(str(status))
        log_host_peak(str(tmp_path / "absent"))  # no /proc: nothing, no error
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["peak host memory: 2.048 GB"]
    assert paper_scale.HOST_PEAK_LINE.search(lines[0]).group(1) == "2.048"


def test_table_puts_prediction_beside_measurement():
    need = types.SimpleNamespace(mode="streamed", host_bytes=2e9, device_bytes=1e9)
    meas = {"collect_features": {"host": 1.5e9, "device": None, "seconds": 40.0, "jobs": 1}}
    text = paper_scale.table(meas, {"collect_features": need}, "cpu")
    assert "| collect_features | streamed | 2.00 | 1.50 | 0.75 | 1 | 40 |" in text
    assert "predicted device GB" in paper_scale.table(meas, {"collect_features": need}, "cuda")


class _FakeCuda:
    def __init__(self, peaks, initialized=True):
        self.peaks, self.initialized = peaks, initialized

    def is_available(self):
        return True

    def is_initialized(self):
        return self.initialized

    def device_count(self):
        return len(self.peaks)

    def max_memory_allocated(self, i):
        return self.peaks[i]


@pytest.mark.parametrize("initialized", [True, False])
def test_a_command_logs_its_peak_over_every_gpu(monkeypatch, caplog, initialized):
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=_FakeCuda([2.0e9, 3.5e9], initialized)))
    with caplog.at_level(logging.INFO, logger="sfsd"):
        log_gpu_peak()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == (["peak GPU memory: 3.500 GB"] if initialized else [])
    if initialized:  # the benchmark reads the line it writes
        assert paper_scale.PEAK_LINE.search(lines[0]).group(1) == "3.500"


def test_digests_ignore_the_recorded_code_version_and_nothing_else(tmp_path):
    """Two runs of the benchmark (capped and not, or one stage rerun on newer code) must compare equal where
    their outputs are, whatever package digest they recorded."""
    import torch

    from sfsd.io import save_tensors

    def run(folder, code, value):
        results = folder / "results"
        (results / "bench" / "plans").mkdir(parents=True)
        (results / "bench" / "features").mkdir(parents=True)
        (results / "bench" / "plans" / "p.json").write_text(json.dumps({"rank": 3, "code_version": code}))
        save_tensors(results / "bench" / "features" / "block_000.safetensors", {"x": torch.full((2,), value)},
                     {"code_version": code, "block": 0})
        return paper_scale.digests(folder)

    same = run(tmp_path / "a", "1", 1.0)
    assert run(tmp_path / "b", "2", 1.0) == same
    changed = run(tmp_path / "c", "1", 2.0)
    assert changed["bench/plans/p.json"] == same["bench/plans/p.json"]
    assert changed["bench/features/block_000.safetensors"] != same["bench/features/block_000.safetensors"]


def test_the_benchmark_config_plans_every_measured_stage(tmp_path):
    """A dry run of the benchmark's own config on a tiny model plans a job of every rule it measures
    (the search among them: the schema leaves search off unless a config turns it on)."""
    from helpers import build_tiny_model, new_run, planned_jobs, snakemake

    snakefile, workdir = new_run(tmp_path)
    model = build_tiny_model(tmp_path / "model")
    config = paper_scale.run_config(model, ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], "cpu", 0.9)
    jobs = planned_jobs(snakemake(snakefile, workdir, config, "--dry-run"))
    per_block = {"eigendecompose"}  # added once collect_features (a checkpoint) has run
    assert set(paper_scale.STAGES) - per_block <= set(jobs), set(paper_scale.STAGES) - set(jobs)
