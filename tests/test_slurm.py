"""The SLURM profile (profiles/slurm) against a real SLURM: the workflow on the tiny random Llama,
submitted job by job through sbatch to a private single-node cluster on localhost.

tests/slurm_cluster.py starts munged, slurmctld and slurmd (Debian's slurm-wlm 22.05, installed
with apt-get when missing and running as root; set SFSD_SLURM_INSTALL=0 to forbid that) with all
their state in a temporary folder, on free ports, and stops them by their pid files afterwards,
also when a test fails. Where SLURM cannot run (not root, no packages, daemons never idle) the
SLURM tests skip with the reason. The node advertises one GPU as a generic resource (no device
behind it) so that the GPU request of stage 1 is really made and granted; the model still runs on
the CPU (`device: cpu`).

The run takes about 1.5 minutes on 2 cores: each dependency level costs a job start plus one
status poll. It is marked `slow` (pytest -m "not slow" skips it).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from helpers import REPO, new_run
from slurm_cluster import SlurmCluster, SlurmUnavailable, ensure_installed

PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
TARGET = "results/tiny/eigen/summary.json"
# the jobs of TARGET on a 2-block model, each one SLURM job
EXPECTED_JOBS = {"calibration_texts": 1, "tokenize_calibration": 1, "collect_features": 1,
                 "eigendecompose": 2, "eigen_summary": 1}
RUN_TIMEOUT_S = 300


def load_profile() -> dict:
    return yaml.safe_load(PROFILE.read_text())


def partition_of(profile: dict, rule: str) -> str | None:
    """The partition the profile sends a rule's jobs to (None: the cluster's default)."""
    own = (profile.get("set-resources") or {}).get(rule, {}).get("slurm_partition")
    return own or (profile.get("default-resources") or {}).get("slurm_partition")


def workflow_config(tiny_llama: Path, calibration_text_file: Path, **extra) -> dict:
    return {
        "models": {"tiny": {"source": "local", "path": str(tiny_llama)}},
        "calibration": {"source": "text_file", "path": str(calibration_text_file), "num_samples": 24,
                        "seq_len": 32},
        "collection": {"batch_size": 4},
        "compression": {"first_block": 0},  # the tiny model has 2 blocks (checked before any job)
        **extra,
    }


def test_profile_settings():
    """What the issue asks of the profile, read the way Snakemake reads it."""
    profile = load_profile()
    assert profile["executor"] == "slurm"
    assert profile["jobs"] >= 1 and profile["latency-wait"] >= 5
    assert profile["retries"] >= 1 and profile["rerun-incomplete"] and profile["keep-going"]
    assert str(profile["slurm-logdir"]).startswith("results/")
    # GPU stage and CPU stage go to different partitions; the CPU stage asks for no GPU
    assert partition_of(profile, "collect_features") != partition_of(profile, "eigendecompose")
    eigen = profile["set-resources"]["eigendecompose"]
    assert not eigen.get("gpu") and "gpu" not in str(eigen.get("gres", ""))
    # the placeholders are documented, not set to values that would fail on every cluster
    text = PROFILE.read_text()
    assert "slurm_account" in text and "slurm_partition" in text


def test_profile_names_real_rules_and_resources(tmp_path, tiny_llama, calibration_text_file):
    """A dry run through the profile: every rule it routes exists, and stage 1 asks for a GPU
    (the rule's gpu=1 with device cuda, as on a cluster whose login node has no GPU) in the profile's
    GPU partition."""
    snakefile, workdir = new_run(tmp_path)
    cfg = workdir / "test-config.yaml"
    cfg.write_text(yaml.safe_dump(workflow_config(tiny_llama, calibration_text_file, device="cuda")))
    base = [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--directory", str(workdir),
            "--configfile", str(cfg)]
    rules = subprocess.run([*base, "--list-rules"], capture_output=True, text=True, timeout=300)
    assert rules.returncode == 0, rules.stderr[-3000:]
    names = set(rules.stdout.split())
    profile = load_profile()
    assert set(profile["set-resources"]) <= names, set(profile["set-resources"]) - names
    dry = subprocess.run([*base, "--workflow-profile", str(PROFILE.parent), "--dry-run", TARGET],
                         capture_output=True, text=True, timeout=300, cwd=workdir)
    out = dry.stdout + dry.stderr
    assert dry.returncode == 0, out[-3000:]
    resources = dict(re.findall(r"^(?:rule|checkpoint|localrule|localcheckpoint) (\w+):.*?^\s+resources: ([^\n]*)", out, re.M | re.S))
    collect = resources["collect_features"]
    assert re.search(r"\bgpu=1\b", collect), collect
    assert f"slurm_partition={partition_of(profile, 'collect_features')}" in collect, collect


def test_gpu_stages_ask_for_the_gpus_that_hold_the_model(tmp_path, tiny_llama, calibration_text_file):
    """With device auto on a machine with an NVIDIA driver (a stand-in nvidia-smi on PATH), evaluation asks
    for the GPUs the resource planner gives it: those that hold the weights in the run dtype at 80% of
    gpu_memory_gb each. A hub model of 40B parameters not downloaded yet is planned from params_b (a
    Llama-shaped model stored in bfloat16): 5 GPUs of 24 GB. Stage 1 streams and asks for one."""
    from sfsd.model.placement import gpus_needed
    from sfsd.resources.needs import llama_like

    snakefile, workdir = new_run(tmp_path)
    config = workflow_config(tiny_llama, calibration_text_file, device="auto", gpu_memory_gb=24)
    config["models"] = {"big": {"source": "hub", "id": "org/model-40b", "params_b": 40}}
    cfg = workdir / "test-config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    dry = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--directory",
                          str(workdir), "--configfile", str(cfg), "--workflow-profile", str(PROFILE.parent),
                          "--dry-run", "results/big/eval/base.parquet", "results/big/features"],
                         capture_output=True, text=True, timeout=300, cwd=workdir,
                         env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    out = dry.stdout + dry.stderr
    assert dry.returncode == 0, out[-3000:]
    resources = dict(re.findall(r"^(?:rule|checkpoint|localrule|localcheckpoint) (\w+):.*?^\s+resources: ([^\n]*)",
                                out, re.M | re.S))
    gpus = gpus_needed(llama_like(40).total_params * 2, 24e9)
    assert gpus == 5
    assert re.search(rf"\bgpu={gpus}\b", resources["evaluate_model"]), resources["evaluate_model"]
    assert re.search(r"\bnodes=1\b", resources["evaluate_model"]), resources["evaluate_model"]  # one process
    assert re.search(r"\bgpu=1\b", resources["collect_features"]), resources["collect_features"]


# ---- a real SLURM ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    if os.environ.get("SFSD_SLURM_TEST") == "0":
        pytest.skip("SLURM tests disabled (SFSD_SLURM_TEST=0)")
    try:
        ensure_installed(allow_install=os.environ.get("SFSD_SLURM_INSTALL", "1") != "0")
    except SlurmUnavailable as err:
        pytest.skip(f"no SLURM here: {err}")
    profile = load_profile()
    routed = [partition_of(profile, r) for r in (*profile.get("set-resources", {}), "prepare_model")]
    # a default partition for the unrouted rules, plus every partition the profile names
    partitions = ["main", *sorted({str(p) for p in routed if p and str(p) != "main"})]
    slurm = SlurmCluster(partitions=tuple(partitions), gpus=1)
    try:
        slurm.start(timeout=60)
    except SlurmUnavailable as err:
        slurm.remove()
        pytest.skip(f"SLURM daemons did not come up: {err}")
    try:
        yield slurm
    finally:
        slurm.stop()
        slurm.remove()


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory, tiny_llama, calibration_text_file):
    """The workflow through a test variant of profiles/slurm, on the private cluster."""
    root = tmp_path_factory.mktemp("slurm-wf")
    snakefile, workdir = new_run(root)
    cfg = workdir / "test-config.yaml"
    cfg.write_text(yaml.safe_dump(workflow_config(tiny_llama, calibration_text_file, device="cpu")))

    profile = load_profile()
    profile.update({
        # no accounting database here: sacct cannot answer status queries, squeue can
        "slurm-status-command": "squeue",
        # first status check 20 s after a submission instead of 40: the tiny jobs take 10-16 s
        # (a job start, then Snakemake inside the job). A check that finds nothing finished waits
        # 10 s longer for the next one, so a shorter first wait only adds checks.
        "slurm-init-seconds-before-status-checks": 20,
        "latency-wait": 5,
        "retries": 0,
        "jobs": 4,
    })
    # the node's GPU is a stand-in and the model runs on the CPU (device: cpu makes the rule ask
    # gpu=0): ask for the GPU anyway, as a GPU run does, to see the request reach SLURM
    profile["set-resources"]["collect_features"]["gpu"] = 1
    profile_dir = root / "profile"
    profile_dir.mkdir()
    (profile_dir / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))

    env = cluster.env
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])  # jobs run `python -m sfsd`
    cmd = ["timeout", "-k", "30", str(RUN_TIMEOUT_S), sys.executable, "-m", "snakemake", TARGET,
           "--snakefile", str(snakefile), "--directory", str(workdir), "--workflow-profile", str(profile_dir),
           "--configfile", str(cfg)]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S + 60)
    elapsed = time.monotonic() - start
    print(f"\nSLURM run of {TARGET}: {elapsed:.0f} s, exit {proc.returncode}")
    return proc, workdir, elapsed, cluster


def submitted_jobs(output: str) -> dict[str, str]:
    """SLURM job id -> rule name, from the plugin's 'has been submitted' lines (log path rule_<name>)."""
    jobs = {}
    for m in re.finditer(r"has been submitted with SLURM jobid (\d+) \(log: ([^)]*)\)", output):
        rule = re.search(r"/rule_(\w+?)/", m.group(2))
        jobs[m.group(1)] = rule.group(1) if rule else "?"
    return jobs


def job_logs(workdir: Path, chars: int = 1500) -> str:
    """The end of each sbatch log (failed jobs' logs are kept by the plugin anyway)."""
    logs = sorted((workdir / "results" / "logs" / "slurm").rglob("*.log"))
    return "".join(f"\n--- {p.relative_to(workdir)}:\n{p.read_text(errors='replace')[-chars:]}" for p in logs)


@pytest.mark.slow
def test_slurm_run_succeeds(slurm_run):
    proc, workdir, elapsed, _ = slurm_run
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode} after {elapsed:.0f} s:\n{output[-5000:]}{job_logs(workdir)}"
    results = workdir / "results" / "tiny"
    assert (results / "eigen" / "summary.json").is_file()
    for block in ("000", "001"):
        assert (results / "eigen" / f"block_{block}.safetensors").is_file()
        assert (results / "features" / f"block_{block}.safetensors").is_file()


@pytest.mark.slow
def test_every_job_went_through_sbatch(slurm_run):
    """Each rule instance is one SLURM job that `sacct -c` (the job completion records) lists as
    COMPLETED under the run's job name, and the plugin kept its sbatch log under results/."""
    proc, workdir, _, cluster = slurm_run
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    jobs = submitted_jobs(output)
    assert Counter(jobs.values()) == EXPECTED_JOBS, jobs
    run_id = re.search(r"SLURM run ID: (\S+)", output).group(1)
    records = {r["JobID"]: r for r in cluster.completed_jobs()}
    print("\nsacct -c:", *(f"{r} ({jobs.get(i, '?')})" for i, r in records.items()), sep="\n  ")
    for job_id, rule in jobs.items():
        record = records.get(job_id)
        assert record is not None, f"{rule} (SLURM job {job_id}) missing from sacct -c: {sorted(records)}"
        assert record["State"] == "COMPLETED" and record["ExitCode"] == "0:0", (rule, record)
        assert record["JobName"] == run_id, (rule, record)
    assert sum(r["JobName"] == run_id for r in records.values()) == sum(EXPECTED_JOBS.values())
    logs = workdir / "results" / "logs" / "slurm"
    assert {p.name for p in logs.iterdir()} == {f"rule_{r}" for r in EXPECTED_JOBS}
    assert len(list(logs.rglob("*.log"))) == sum(EXPECTED_JOBS.values())


@pytest.mark.slow
def test_gpu_stage_gets_a_gpu_and_its_partition(slurm_run):
    """What slurmctld recorded for each job: its rule (the plugin's --comment), the partition the
    profile routes it to, and a GPU (--gpus=1 -> TresPerJob gres:gpu:1) for stage 1 only."""
    proc, _, _, cluster = slurm_run
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    profile = load_profile()
    for job_id, rule in submitted_jobs(output).items():
        job = cluster.job_details(job_id)
        assert job["Comment"].startswith(f"rule_{rule}"), job
        expected = partition_of(profile, rule) or "main"
        assert job["Partition"] == str(expected), (rule, job["Partition"])
        gpu = "gpu" in job.get("TresPerJob", "") + job.get("TresPerNode", "")
        assert gpu == (rule == "collect_features"), (rule, job.get("TresPerJob"))
        if rule == "collect_features":
            assert job["TresPerJob"] == "gres:gpu:1"
        assert int(job["MinMemoryNode"].rstrip("MG")) > 0 and job["TimeLimit"] != "UNLIMITED", job
