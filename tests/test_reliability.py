"""Reliability: bad input fails fast with one line naming the key or file and leaves no output;
numerical faults are named; every artefact records what it was made from and stages refuse mismatched
inputs; the same config gives bit-identical results; killed jobs resume to the outputs of an
uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sfsd.cli.main import main as sfsd_main
from sfsd.io import load_tensors, read_json, read_metadata, save_tensors
from helpers import CORPUS, bad_config, build_tiny_model, copy_workflow, one_error_line, planned_jobs, snakemake

ALL_LAYERS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


# ---------------------------------------------------------------- shared fixtures


@pytest.fixture(scope="module")
def snakefile(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("reliability-wf")
    return copy_workflow(repo)


# The bad-config cases (helpers.CONFIG_CASES) are each called directly in test_config.py; these run a few
# of them through Snakemake: the schema's error, a check of sfsd.config for each part of the config it
# reads (files, the model, several keys, the LASER study), each one line before any job, no file written.
WIRED_CASES = ["binary calibration file", "misspelt key", "batch size as a string", "first block out of range",
               "search target not evaluated", "laser metric undefined for its task",
               "quick budget not a compression budget"]


@pytest.fixture(scope="module")
def config_case_runs(snakefile, tiny_llama, calibration_text_file, tmp_path_factory) -> dict:
    """The WIRED_CASES dry runs, three at a time (each is mostly interpreter start-up):
    id -> (process, files the run left in its folder, expected text)."""
    from concurrent.futures import ThreadPoolExecutor

    def run(case):
        tmp = tmp_path_factory.mktemp("bad-config")
        workdir = tmp / "run"
        workdir.mkdir()
        config, expected = bad_config(case, tmp, tiny_llama, calibration_text_file)
        before = set(workdir.rglob("*"))
        proc = snakemake(snakefile, workdir, config, "--dry-run", check=False)
        return case, (proc, set(workdir.rglob("*")) - before - {workdir / "test-config.yaml"}, expected)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(pool.map(run, WIRED_CASES))


@pytest.mark.parametrize("case", WIRED_CASES)
def test_bad_config_fails_before_any_job(config_case_runs, case):
    proc, written, expected = config_case_runs[case]
    assert proc.returncode != 0
    line = one_error_line(proc.stdout + proc.stderr, "config error: ")
    assert expected in line, line
    assert not written  # no results, no Snakemake metadata: nothing but the test's own config file


def test_a_setting_the_run_cannot_honour_is_said_before_any_job(snakefile, tiny_llama, calibration_text_file,
                                                                tmp_path):
    """calibration.num_samples beyond what the source holds: the run goes on with what there is, and says so
    in its own output before its first job, not only in the calibration job's log."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    config, _ = bad_config("misspelt key", tmp_path, tiny_llama, calibration_text_file)
    config.pop("calibraton")
    config["calibration"] = {**config["calibration"], "source": "combination", "num_samples": 10**8}
    proc = snakemake(snakefile, workdir, config, "--dry-run")
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("config warning: ")]
    assert warnings == [line for line in warnings if "calibration.num_samples 100000000 exceeds the 1730" in line]
    # said while the config is read, before Snakemake plans a job
    assert len(warnings) == 1 and "Job stats" in proc.stdout + proc.stderr


# ---------------------------------------------------------------- bad files and numerical faults: the stages


def run_main(capsys, *argv: str) -> tuple[int, str]:
    """`python -m sfsd` in this process (no 5 s interpreter start per case): exit code, stderr."""
    capsys.readouterr()
    rc = sfsd_main(["--threads", "1", *argv])
    return rc, capsys.readouterr().err


def scaled_model(src: Path, dest: Path, scale: dict[str, float]) -> Path:
    """A copy of a model with some weights multiplied (inf/nan allowed)."""
    shutil.copytree(src, dest)
    tensors = load_file(dest / "model.safetensors")
    for name, factor in scale.items():
        tensors[name] = tensors[name] * factor
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory, tiny_llama, calibration_text_file):
    """Every stage's output for the tiny model, and for another model of the same shapes, made in this
    process through the CLI; the cases below corrupt copies of them."""
    root = tmp_path_factory.mktemp("stages")
    other = build_tiny_model(root / "other-model", seed=1)
    texts = root / "texts.jsonl"
    settings = json.dumps({"source": "text_file", "path": str(calibration_text_file), "num_samples": 24})
    assert sfsd_main(["calibration-texts", "--settings", settings, "--out", str(texts)]) == 0
    paths = {"model": tiny_llama, "other": other, "texts": texts}
    for name, model in (("tiny", tiny_llama), ("other", other)):
        res = root / name
        tokens = res / "calibration" / "tokens.safetensors"
        assert sfsd_main(["--threads", "1", "tokenize", "--model-dir", str(model), "--texts", str(texts),
                          "--seq-len", "32", "--out", str(tokens)]) == 0
        assert sfsd_main(["--threads", "1", "collect", "--model-dir", str(model), "--model-name", name,
                          "--tokens", str(tokens), "--layers", ALL_LAYERS, "--device", "cpu", "--batch-size", "4",
                          "--out", str(res / "features")]) == 0
        for b in (0, 1):
            assert sfsd_main(["--threads", "1", "eigen", "--features", str(res / "features" / f"block_00{b}.safetensors"),
                              "--model-dir", str(model), "--layers", ALL_LAYERS,
                              "--out", str(res / "eigen" / f"block_00{b}.safetensors")]) == 0
        assert sfsd_main(["--threads", "1", "factor-cache", "--model-dir", str(model), "--results", str(res),
                          "--method", "feature", "--layers", ALL_LAYERS, "--out", str(res / "factors" / "feature")]) == 0
        assert sfsd_main(["--threads", "1", "make-plan", "--model-dir", str(model), "--model-name", name,
                          "--method", "feature", "--params-fraction", "0.8", "--first-block", "0", "--layers", ALL_LAYERS,
                          "--out", str(res / "plans" / "feature-b80.json")]) == 0
        paths[f"{name}_results"] = res
    return paths


def _truncated_checkpoint(s: dict, tmp: Path) -> list[str]:
    model = tmp / "truncated-model"
    shutil.copytree(s["model"], model)
    weights = model / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)  # an interrupted copy or download
    return ["collect", "--model-dir", str(model), "--model-name", "tiny", "--tokens",
            str(s["tiny_results"] / "calibration" / "tokens.safetensors"), "--layers", ALL_LAYERS,
            "--device", "cpu", "--out", str(tmp / "out")]


def _eigen_of(features: Path, model: Path, tmp: Path) -> list[str]:
    return ["eigen", "--features", str(features), "--model-dir", str(model), "--layers", ALL_LAYERS,
            "--out", str(tmp / "out")]


def _truncated_features(s: dict, tmp: Path) -> list[str]:
    block = tmp / "block_000.safetensors"
    data = (s["tiny_results"] / "features" / "block_000.safetensors").read_bytes()
    block.write_bytes(data[: len(data) - 100])
    return _eigen_of(block, s["model"], tmp)


def _garbage_features(s: dict, tmp: Path) -> list[str]:
    block = tmp / "block_000.safetensors"
    block.write_bytes(os.urandom(4096))
    return _eigen_of(block, s["model"], tmp)


def _missing_features(s: dict, tmp: Path) -> list[str]:
    return _eigen_of(tmp / "block_000.safetensors", s["model"], tmp)


def _features_of_other_model(s: dict, tmp: Path) -> list[str]:
    return _eigen_of(s["other_results"] / "features" / "block_000.safetensors", s["model"], tmp)


def _tampered_features(s: dict, tmp: Path, edit) -> Path:
    tensors, meta = load_tensors(s["tiny_results"] / "features" / "block_000.safetensors")
    edit(tensors)
    block = tmp / "block_000.safetensors"
    save_tensors(block, tensors, meta)
    return block


def _not_psd(s: dict, tmp: Path) -> list[str]:
    def edit(t):  # a large negative direction: symmetric, but no longer a sum of x x^T
        x = t["attn_in.xxt"]
        v = torch.randn(x.shape[0], dtype=x.dtype, generator=torch.Generator().manual_seed(0))
        t["attn_in.xxt"] = x - 10 * x.diagonal().max() * torch.outer(v, v) / v.dot(v)
    return _eigen_of(_tampered_features(s, tmp, edit), s["model"], tmp)


def _not_symmetric(s: dict, tmp: Path) -> list[str]:
    def edit(t):
        x = t["attn_in.xxt"].clone()
        x[0, 1] += 0.1 * x.diagonal().max()
        t["attn_in.xxt"] = x
    return _eigen_of(_tampered_features(s, tmp, edit), s["model"], tmp)


def _fp16_overflow(s: dict, tmp: Path) -> list[str]:
    # block 0's MLP made loud enough that its output passes float16's 65504 (its weights stay in range):
    # the residual stream becomes Inf and block 1's inputs NaN
    model = scaled_model(s["model"], tmp / "loud-model", {"model.layers.0.mlp.up_proj.weight": 6000.0,
                                                           "model.layers.0.mlp.down_proj.weight": 6000.0})
    return ["collect", "--model-dir", str(model), "--model-name", "tiny", "--tokens",
            str(s["tiny_results"] / "calibration" / "tokens.safetensors"), "--layers", ALL_LAYERS,
            "--dtype", "float16", "--device", "cpu", "--batch-size", "4", "--out", str(tmp / "out")]


def _nan_weights(s: dict, tmp: Path) -> list[str]:
    model = scaled_model(s["model"], tmp / "nan-model", {"model.layers.1.self_attn.v_proj.weight": float("nan")})
    return ["collect", "--model-dir", str(model), "--model-name", "tiny", "--tokens",
            str(s["tiny_results"] / "calibration" / "tokens.safetensors"), "--layers", ALL_LAYERS,
            "--device", "cpu", "--batch-size", "4", "--out", str(tmp / "out")]


def _tokens_of_other_tokenizer(s: dict, tmp: Path) -> list[str]:
    model = tmp / "retokenized-model"
    shutil.copytree(s["model"], model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**cfg, "model_max_length": 77}))
    return ["collect", "--model-dir", str(model), "--model-name", "tiny", "--tokens",
            str(s["tiny_results"] / "calibration" / "tokens.safetensors"), "--layers", ALL_LAYERS,
            "--device", "cpu", "--out", str(tmp / "out")]


def _seq_len_above_context(s: dict, tmp: Path) -> list[str]:
    tokens = tmp / "long-tokens.safetensors"
    assert sfsd_main(["--threads", "1", "tokenize", "--model-dir", str(s["model"]), "--texts", str(s["texts"]),
                      "--seq-len", "600", "--out", str(tokens)]) == 0
    return ["collect", "--model-dir", str(s["model"]), "--model-name", "tiny", "--tokens", str(tokens),
            "--layers", ALL_LAYERS, "--device", "cpu", "--out", str(tmp / "out")]


def _no_calibration_text(s: dict, tmp: Path) -> list[str]:
    (tmp / "blank.txt").write_text("\n\n   \n\n")  # not empty, but no text
    settings = json.dumps({"source": "text_file", "path": str(tmp / "blank.txt"), "num_samples": 8})
    return ["calibration-texts", "--settings", settings, "--out", str(tmp / "out")]


def _compress(s: dict, tmp: Path, plan: Path, factors: Path) -> list[str]:
    return ["compress", "--model-dir", str(s["model"]), "--plan", str(plan), "--factors", str(factors),
            "--out", str(tmp / "out")]


def _plan_of_other_model(s: dict, tmp: Path) -> list[str]:
    return _compress(s, tmp, s["other_results"] / "plans" / "feature-b80.json", s["tiny_results"] / "factors")


def _factors_of_other_model(s: dict, tmp: Path) -> list[str]:
    return _compress(s, tmp, s["tiny_results"] / "plans" / "feature-b80.json", s["other_results"] / "factors")


def _rank_out_of_range(s: dict, tmp: Path) -> list[str]:
    plan = read_json(s["tiny_results"] / "plans" / "feature-b80.json")
    key = next(k for k, v in plan["layers"].items() if v["method"] == "feature")
    plan["layers"][key]["rank"] = 10_000
    (tmp / "plan.json").write_text(json.dumps(plan))
    return _compress(s, tmp, tmp / "plan.json", s["tiny_results"] / "factors")


def _budget_unreachable(s: dict, tmp: Path) -> list[str]:
    return ["make-plan", "--model-dir", str(s["model"]), "--model-name", "tiny", "--method", "feature",
            "--params-fraction", "0.01", "--first-block", "0", "--layers", ALL_LAYERS, "--out", str(tmp / "out")]


def _mixed_eigen_blocks(s: dict, tmp: Path) -> list[str]:
    # block 1 from a second calibration run (other texts): a stale file that must not be mixed in
    texts = tmp / "texts.jsonl"
    texts.write_text("".join(json.dumps({"doc_id": f"x/{i}", "text": t}) + "\n" for i, t in enumerate(CORPUS[5:30])))
    res = tmp / "res"
    assert sfsd_main(["--threads", "1", "tokenize", "--model-dir", str(s["model"]), "--texts", str(texts),
                      "--seq-len", "16", "--out", str(res / "tokens.safetensors")]) == 0
    assert sfsd_main(["--threads", "1", "collect", "--model-dir", str(s["model"]), "--model-name", "tiny",
                      "--tokens", str(res / "tokens.safetensors"), "--layers", ALL_LAYERS, "--device", "cpu",
                      "--out", str(res / "features")]) == 0
    assert sfsd_main(["--threads", "1", *_eigen_of(res / "features" / "block_001.safetensors", s["model"], res)]) == 0
    return ["eigen-summary", "--out", str(tmp / "out"), str(s["tiny_results"] / "eigen" / "block_000.safetensors"),
            str(res / "out")]


def _mixed_factor_statistics(s: dict, tmp: Path) -> list[str]:
    _mixed_eigen_blocks(s, tmp)
    res = tmp / "mixed"
    shutil.copytree(s["tiny_results"] / "features", res / "features")
    (res / "eigen").mkdir()
    shutil.copy(s["tiny_results"] / "eigen" / "block_000.safetensors", res / "eigen" / "block_000.safetensors")
    shutil.copy(tmp / "res" / "out", res / "eigen" / "block_001.safetensors")
    return ["factor-cache", "--model-dir", str(s["model"]), "--results", str(res), "--method", "feature",
            "--layers", ALL_LAYERS, "--out", str(tmp / "out")]


STAGE_CASES = [
    # (id, builder(stage_inputs, tmp) -> argv whose output is tmp/"out", expected text)
    ("truncated model checkpoint", _truncated_checkpoint, "model.safetensors is truncated or corrupt"),
    ("truncated statistics file", _truncated_features, "block_000.safetensors is corrupt or truncated"),
    ("garbage statistics file", _garbage_features, "block_000.safetensors is corrupt or truncated"),
    ("missing statistics file", _missing_features, "missing file"),
    ("statistics of another model", _features_of_other_model, "was collected from another model"),
    ("tokens of another tokenizer", _tokens_of_other_tokenizer, "was made from another tokenizer_digest"),
    ("tokens longer than the model's context", _seq_len_above_context,
     "calibration.seq_len 600 exceeds the model's context of 512 tokens"),
    ("calibration file without text", _no_calibration_text, "holds no text"),
    ("covariance not PSD", _not_psd, "is not positive semi-definite beyond round-off"),
    ("covariance not symmetric", _not_symmetric, "attn_in: x x^T is not symmetric"),
    ("float16 overflow during collection", _fp16_overflow,
     "block 1 attn_in (input of q_proj, k_proj, v_proj): NaN activations in calibration batch 0"),
    ("NaN weights", _nan_weights, "block 1 attn_out (input of o_proj): NaN activations"),
    ("plan of another model", _plan_of_other_model, "plan was made for another model"),
    ("factor cache of another model", _factors_of_other_model, "was made from another model"),
    ("plan rank out of range", _rank_out_of_range, "rank 10000 is out of range"),
    ("budget below rank 1 everywhere", _budget_unreachable, "is unreachable: rank 1 everywhere"),
    ("eigen blocks of two calibration runs", _mixed_eigen_blocks, "come from different runs"),
    ("factor cache from two calibration runs", _mixed_factor_statistics, "come from different runs"),
]


@pytest.mark.parametrize("build, expected", [c[1:] for c in STAGE_CASES], ids=[c[0] for c in STAGE_CASES])
def test_bad_stage_input_is_one_line_and_no_output(stage_inputs, tmp_path, capsys, build, expected):
    argv = build(stage_inputs, tmp_path)
    rc, err = run_main(capsys, *argv)
    assert rc == 2
    assert expected in one_error_line(err, "error: ")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))  # no temporary left behind either


def test_float16_overflow_names_the_dtype_and_float32_passes(stage_inputs, tmp_path, capsys):
    argv = _fp16_overflow(stage_inputs, tmp_path)
    rc, err = run_main(capsys, *argv)
    assert rc == 2 and "collection.dtype float16 overflowed" in err and "bfloat16 or float32" in err
    rc, _ = run_main(capsys, *[a if a != "float16" else "float32" for a in argv])
    assert rc == 0 and (tmp_path / "out" / "manifest.json").exists()


def test_real_cli_prints_one_line(stage_inputs, tmp_path):
    """The same through `python -m sfsd` itself: exit status 2, one line on stderr, nothing written."""
    argv = _truncated_checkpoint(stage_inputs, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "sfsd", "--threads", "1", *argv], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert "truncated or corrupt" in one_error_line(proc.stderr, "error: ")
    assert not (tmp_path / "out").exists()


def test_cholesky_fallbacks_are_logged_with_their_jitter(stage_inputs, tmp_path, capsys, caplog):
    """A dead input direction makes x x^T singular: the eigen stage logs its fallback to the direct
    eigh, the whitened factors log and record the jitter their Cholesky needed."""
    res = tmp_path / "res"
    shutil.copytree(stage_inputs["tiny_results"] / "features", res / "features")
    block = res / "features" / "block_000.safetensors"
    tensors, meta = load_tensors(block)
    for key in ("attn_in.xxt",):
        x = tensors[key].clone()
        x[0, :] = 0
        x[:, 0] = 0
        tensors[key] = x
    tensors["attn_in.xsum"] = tensors["attn_in.xsum"].clone()
    tensors["attn_in.xsum"][0] = 0
    save_tensors(block, tensors, meta)
    caplog.set_level("INFO")
    rc, _ = run_main(capsys, *_eigen_of(block, stage_inputs["model"], res))
    assert rc == 0
    assert "block 0 attn_in: input covariance is not positive definite" in caplog.text
    shutil.copytree(stage_inputs["tiny_results"] / "eigen", res / "eigen")
    caplog.clear()
    rc, _ = run_main(capsys, "factor-cache", "--model-dir", str(stage_inputs["model"]), "--results", str(res),
                    "--method", "whitened", "--layers", ALL_LAYERS, "--out", str(res / "factors"))
    assert rc == 0
    assert "block 0 q_proj: Cholesky of the attn_in second moment needed jitter" in caplog.text
    recorded = read_metadata(res / "factors" / "block_000.safetensors")["layers"]
    assert recorded["q_proj"]["jitter"] > 0 and recorded["k_proj"]["jitter"] > 0


# ---------------------------------------------------------------- provenance


def test_every_artefact_records_its_provenance(stage_inputs):
    res = stage_inputs["tiny_results"]
    tokens = read_metadata(res / "calibration" / "tokens.safetensors")
    digest = tokens["calibration_digest"]
    assert tokens["tokenizer_digest"] and tokens["texts_digest"] and tokens["settings"] == {"seq_len": 32}
    model_digest = tokens["model_digest"]
    artefacts = {
        "features": read_metadata(res / "features" / "block_001.safetensors"),
        "manifest": read_json(res / "features" / "manifest.json"),
        "eigen": read_metadata(res / "eigen" / "block_001.safetensors"),
        "factors": read_metadata(res / "factors" / "feature" / "block_001.safetensors"),
        "plan": read_json(res / "plans" / "feature-b80.json")["notes"]["provenance"],
    }
    for name, meta in artefacts.items():
        assert meta["model_digest"] == model_digest, name
        assert meta["code_version"].startswith("0.") and "+" in meta["code_version"], name
        assert isinstance(meta["settings"], dict) and meta["settings"], name
        # a uniform plan reads no statistics, so it names no calibration
        assert meta["calibration_digest"] == (None if name == "plan" else digest), name
    assert artefacts["features"]["settings"]["batch_size"] == 4
    assert artefacts["eigen"]["settings"]["save_dtype"] == "float32"
    assert artefacts["factors"]["settings"]["method"] == "feature"


# ---------------------------------------------------------------- determinism and interruption (real workflow)

RUN_TARGETS = ["results/tiny/eigen/summary.json", "results/tiny/plans/feature-b80.json",
               *(f"results/tiny/factors/{m}" for m in ("feature", "weight", "whitened"))]


@pytest.fixture(scope="module")
def run_config(tmp_path_factory, tiny_llama) -> dict:
    # enough sequences, one per forward pass, that collection lasts long enough to be killed mid-way
    calib = tmp_path_factory.mktemp("calib-long") / "calib.txt"
    calib.write_text("\n\n".join(f"{CORPUS[i % 5]} {CORPUS[(i * 3 + 1) % 5]} ({i})" for i in range(300)))
    return {
        "models": {"tiny": {"source": "local", "path": str(tiny_llama)}},
        "calibration": {"source": "text_file", "path": str(calib), "num_samples": 300, "seq_len": 48},
        "collection": {"batch_size": 1},
        "device": "cpu",
        "compression": {"budgets": {"b80": 0.8}, "first_block": 0, "save_models": False},
        "evaluation": {"enabled": False},
    }


def workflow_run(snakefile: Path, workdir: Path, config: dict, kill=None, whole_run: bool = False,
                 timeout: float = 400):
    """Snakemake on RUN_TARGETS in a subprocess (its own process group). `kill(workdir, cmdline) -> bool`
    is polled against every running sfsd job process; on the first it accepts, SIGKILL goes to that job
    alone (an OOM kill: the profile's `retries` gives it a second attempt) or, with `whole_run`, to
    Snakemake and all its jobs at once (a lost node). Returns (returncode, output, killed cmdline)."""
    workdir.mkdir(exist_ok=True)
    cfg = workdir / "test-config.yaml"
    cfg.write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--directory", str(workdir),
           "--configfile", str(cfg), "--cores", "2", *RUN_TARGETS]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    killed = None
    deadline = time.monotonic() + timeout
    try:
        while kill is not None and killed is None and proc.poll() is None and time.monotonic() < deadline:
            family = psutil.Process(proc.pid).children(recursive=True)
            for child in family:
                try:
                    cmdline = child.cmdline()
                    if "sfsd" not in cmdline or child.status() == psutil.STATUS_ZOMBIE or not kill(workdir, cmdline):
                        continue
                    if whole_run:
                        os.killpg(proc.pid, signal.SIGKILL)
                        psutil.wait_procs(family, timeout=10)
                        assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
                    else:
                        child.kill()
                    killed = " ".join(cmdline)
                    break
                except psutil.NoSuchProcess:
                    continue
            time.sleep(0.01)
        output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, output, killed


def tensor_contents(path: Path) -> dict:
    """Every tensor of a safetensors file as (dtype, shape, raw bytes), and the metadata without the
    code version (other work on the package may change between two runs of a test session)."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: (str(t.dtype), tuple(t.shape), t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
                   for k in f.keys() for t in [f.get_tensor(k)]}
        meta = {k: v for k, v in (f.metadata() or {}).items() if k != "code_version"}
    return {"tensors": tensors, "metadata": meta}


def run_outputs(workdir: Path) -> dict:
    res = workdir / "results" / "tiny"
    files = sorted(res.glob("*/*.safetensors")) + sorted(res.glob("*/*/*.safetensors"))
    out = {str(p.relative_to(res)): tensor_contents(p) for p in files}
    plan = read_json(res / "plans" / "feature-b80.json")
    plan["notes"]["provenance"].pop("code_version")
    out["plan"] = plan
    return out


@pytest.fixture(scope="module")
def reference_run(snakefile, run_config, tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp("reference")
    rc, output, _ = workflow_run(snakefile, workdir, run_config)
    assert rc == 0, output[-4000:]
    return run_outputs(workdir)


@pytest.mark.slow  # two real runs of the workflow
def test_same_config_gives_bit_identical_results(snakefile, run_config, reference_run, tmp_path):
    rc, output, _ = workflow_run(snakefile, tmp_path, run_config)
    assert rc == 0, output[-4000:]
    again = run_outputs(tmp_path)
    kinds = {name.split("/")[0] for name in again}
    assert {"calibration", "features", "eigen", "factors", "plan"} <= kinds
    assert len([n for n in again if n.startswith("factors/")]) == 6  # 3 methods x 2 blocks
    assert again.keys() == reference_run.keys()
    for name in again:
        assert again[name] == reference_run[name], f"{name} differs between two runs of the same config"


@pytest.mark.slow  # three interrupted runs and a resumed one: about 2 minutes on 2 cores
def test_killed_jobs_resume_to_the_uninterrupted_result(snakefile, run_config, reference_run, tmp_path):
    """SIGKILL the whole run (Snakemake and its jobs, as when a node is lost) during collection, then
    during the eigendecompositions; SIGKILL one factor job alone (as an OOM kill). Rerunning the same
    command completes, redoes no finished job, and gives the uninterrupted run's outputs bit for bit."""
    res = tmp_path / "results" / "tiny"

    def in_collection(workdir, cmdline):  # the collect job, once its forward pass has begun
        log = workdir / "results" / "logs" / "collect_features" / "tiny.log"
        return "collect" in cmdline and log.exists() and "collecting" in log.read_text()

    rc, output, killed = workflow_run(snakefile, tmp_path, run_config, kill=in_collection, whole_run=True)
    assert killed and rc == -signal.SIGKILL, output[-3000:]
    assert not (res / "features").exists()  # written atomically: nothing a rerun could trust
    tokens_mtime = (res / "calibration" / "tokens.safetensors").stat().st_mtime_ns
    # a killed Snakemake leaves its lock: the same command refuses to start until `snakemake --unlock`
    rc, output, _ = workflow_run(snakefile, tmp_path, run_config)
    assert rc != 0 and "Directory cannot be locked" in output and "--unlock" in output
    snakemake(snakefile, tmp_path, run_config, "--unlock")
    rerun = planned_jobs(snakemake(snakefile, tmp_path, run_config, "--dry-run", *RUN_TARGETS))
    assert "calibration_texts" not in rerun and "tokenize_calibration" not in rerun  # finished: not redone
    assert rerun["collect_features"] == 1

    def in_eigen_block_1(workdir, cmdline):
        return "eigen" in cmdline and any(a.endswith("block_001.safetensors") for a in cmdline)

    rc, output, killed = workflow_run(snakefile, tmp_path, run_config, kill=in_eigen_block_1, whole_run=True)
    assert killed and rc == -signal.SIGKILL, output[-3000:]
    assert (res / "features" / "manifest.json").exists() and not (res / "eigen" / "block_001.safetensors").exists()
    features_mtime = (res / "features" / "block_000.safetensors").stat().st_mtime_ns
    snakemake(snakefile, tmp_path, run_config, "--unlock")
    rerun = planned_jobs(snakemake(snakefile, tmp_path, run_config, "--dry-run", *RUN_TARGETS))
    assert "collect_features" not in rerun and rerun["eigendecompose"] in (1, 2)

    def in_whitened_factors(workdir, cmdline):
        return "factor-cache" in cmdline and "whitened" in cmdline

    rc, output, killed = workflow_run(snakefile, tmp_path, run_config, kill=in_whitened_factors)
    assert killed and rc == 0, output[-3000:]
    assert "exit status 137" in output  # the killed job failed, and its retry (profile: retries 1) completed
    assert (res / "calibration" / "tokens.safetensors").stat().st_mtime_ns == tokens_mtime
    assert (res / "features" / "block_000.safetensors").stat().st_mtime_ns == features_mtime
    assert planned_jobs(snakemake(snakefile, tmp_path, run_config, "--dry-run", *RUN_TARGETS)) == {}
    resumed = run_outputs(tmp_path)
    assert resumed.keys() == reference_run.keys()
    for name in resumed:
        assert resumed[name] == reference_run[name], f"{name} differs from the uninterrupted run"
