"""The model's dtype end to end (the `dtype` setting, `sfsd.model.loading.run_dtype`): auto is the
checkpoint's own, an explicit dtype overrides it, a dtype the workflow or the device cannot run is one
config error; a bfloat16 checkpoint runs every stage in bfloat16 and its compressed folder is written in
bfloat16 (smaller than the dense checkpoint at a p54-like budget), loads with transformers alone with the
logits of `load_compressed`, streamed or not, readable by others; the factor cache stays float32. (slow) The table of a tiny model in bfloat16 agrees with the float32 one within the bounds
docs/evaluation.md states."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from helpers import LINEARS, STAT_TEXTS, build_tiny_model, one_thread, python_without_sfsd
from sfsd import config as sfsd_config
from sfsd.cli.main import main
from sfsd.decompose.compress import load_compressed
from sfsd.errors import ConfigError
from sfsd.io import load_tensors, read_json, safetensors_header
from sfsd.model.loading import load_model, load_tokenizer, run_dtype
from sfsd.model.stream import BlockStream, open_blocks

LAYERS = ",".join(LINEARS)
P54 = 0.806  # the default budget p54 (fraction of the parameters kept)


def bf16_checkpoint(folder, n_layers: int = 4, seed: int = 5):
    """A tiny random Llama saved in bfloat16 (config.json: "dtype": "bfloat16"), as Llama-3-8B or
    Qwen2.5-7B come from the hub."""
    dense = build_tiny_model(folder.parent / f"{folder.name}-fp32", n_layers=n_layers, seed=seed)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).to(torch.bfloat16)
    model.save_pretrained(folder)
    for f in dense.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, folder / f.name)
    return folder


def cli(*args: str) -> None:
    """A command in this process (`python -m sfsd` without the interpreter start); it must succeed."""
    assert main(["--threads", "1", *map(str, args)]) == 0, args


def tensor_dtypes(folder) -> set[str]:
    """The dtypes of the tensors in a folder's safetensors files, as their headers name them."""
    out = set()
    for f in folder.glob("*.safetensors"):
        out |= {v["dtype"] for k, v in json.loads(safetensors_header(f)).items() if k != "__metadata__"}
    return out


def weight_bytes(folder) -> tuple[int, int]:
    """(bytes of a folder's safetensors files, bytes of the tensors in them)."""
    files = list(folder.glob("*.safetensors"))
    data = sum(v["data_offsets"][1] - v["data_offsets"][0] for f in files
               for k, v in json.loads(safetensors_header(f)).items() if k != "__metadata__")
    return sum(f.stat().st_size for f in files), data


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """Stages 1-3 of a bfloat16 checkpoint through the commands the rules run (dtype auto everywhere):
    tokens, statistics, eigendecompositions, the feature-space factor cache, a p54-like plan, and the
    compressed folder written streamed and whole."""
    root = tmp_path_factory.mktemp("bf16")
    model = bf16_checkpoint(root / "model")
    texts = root / "texts.jsonl"
    texts.write_text("".join(json.dumps({"doc_id": f"t/{i}", "task": "t", "text": t}) + "\n"
                             for i, t in enumerate(STAT_TEXTS * 4)))
    res = root / "results"
    cli("tokenize", "--model-dir", model, "--texts", texts, "--seq-len", 32, "--out", res / "tokens.safetensors")
    cli("collect", "--model-dir", model, "--model-name", "tiny", "--tokens", res / "tokens.safetensors",
        "--layers", LAYERS, "--device", "cpu", "--batch-size", 4, "--streamed", "never", "--out", res / "features")
    for b in range(4):
        cli("eigen", "--features", res / "features" / f"block_{b:03d}.safetensors", "--model-dir", model,
            "--layers", LAYERS, "--out", res / "eigen" / f"block_{b:03d}.safetensors")
    cli("factor-cache", "--model-dir", model, "--results", res, "--method", "feature", "--layers", LAYERS,
        "--streamed", "never", "--out", res / "factors" / "feature")
    plan = res / "plans" / "feature-p54.json"
    cli("make-plan", "--model-dir", model, "--model-name", "tiny", "--method", "feature", "--params-fraction", P54,
        "--first-block", 0, "--layers", LAYERS, "--out", plan)
    for streamed in ("never", "always"):
        cli("compress", "--model-dir", model, "--plan", plan, "--factors", res / "factors", "--streamed", streamed,
            "--out", res / "compressed" / f"feature-p54-{streamed}")
    return {"model": model, "results": res, "plan": plan, "compressed": res / "compressed" / "feature-p54-never"}


def test_auto_is_the_checkpoints_dtype_and_an_explicit_dtype_overrides_it(bf16_run, tiny_llama):
    bf16 = bf16_run["model"]
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    assert run_dtype(bf16) == "bfloat16" and run_dtype(tiny_llama) == "float32"
    assert run_dtype({"torch_dtype": "float16"}) == "float16"  # the name transformers 4 writes
    assert run_dtype({"torch_dtype": "torch.bfloat16"}) == "bfloat16"
    assert run_dtype({}) == "float32"  # a checkpoint that names none: float32, as transformers 4 loads it
    for setting in ("float32", "bfloat16", "float16"):
        assert run_dtype(bf16, setting) == setting and run_dtype(tiny_llama, setting) == setting
    with pytest.raises(ConfigError, match="unknown dtype 'float8'"):
        run_dtype(bf16, "float8")
    with pytest.raises(ConfigError, match="names torch_dtype 'float64', which the workflow does not run"):
        run_dtype({"torch_dtype": "float64"})
    assert next(load_model(bf16, device="cpu")[0].parameters()).dtype == torch.bfloat16
    assert next(load_model(bf16, "float32", device="cpu")[0].parameters()).dtype == torch.float32
    assert next(load_model(tiny_llama, device="cpu")[0].parameters()).dtype == torch.float32
    stream = open_blocks(bf16, "always")
    assert isinstance(stream, BlockStream) and stream.dtype == torch.bfloat16
    with stream.block(1) as block:
        assert {p.dtype for p in block.parameters()} == {torch.bfloat16}


def test_every_stage_ran_in_bfloat16_and_the_factor_cache_stays_float32(bf16_run):
    res = bf16_run["results"]
    manifest = read_json(res / "features" / "manifest.json")
    assert manifest["dtype"] == "bfloat16" and manifest["settings"]["dtype"] == "bfloat16"
    stats, _ = load_tensors(res / "features" / "block_001.safetensors")
    assert stats["attn_in.xxt"].dtype == torch.float64  # the statistics stay float64 sums
    cache, _ = load_tensors(res / "factors" / "feature" / "block_001.safetensors")
    assert {t.dtype for k, t in cache.items() if k.endswith((".first", ".second", ".mean"))} == {torch.float32}


def test_the_factor_cache_of_a_bfloat16_model_is_the_float32_one(bf16_run, tmp_path):
    """bfloat16 weights widen exactly to float32, so the cache built from the model in bfloat16 equals, bit
    for bit, the cache built from the same checkpoint loaded in float32 (the factors computed as before)."""
    res = bf16_run["results"]
    cli("factor-cache", "--model-dir", bf16_run["model"], "--results", res, "--method", "feature", "--layers", LAYERS,
        "--streamed", "never", "--dtype", "float32", "--out", tmp_path / "feature")
    for b in range(4):
        a, _ = load_tensors(res / "factors" / "feature" / f"block_{b:03d}.safetensors")
        c, _ = load_tensors(tmp_path / "feature" / f"block_{b:03d}.safetensors")
        assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)


def test_a_bfloat16_checkpoint_compresses_into_a_smaller_bfloat16_folder(bf16_run):
    folder, dense = bf16_run["compressed"], bf16_run["model"]
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    assert tensor_dtypes(folder) == {"BF16"} == tensor_dtypes(dense)
    fraction = read_json(bf16_run["plan"])["notes"]["params_fraction"]
    assert abs(fraction - P54) < 0.02
    # the weights shrink with the parameters (in float32 the folder would be 1.6 times the dense checkpoint);
    # the files' headers, which name more tensors, weigh on a model this small only
    (files, data), (dense_files, dense_data) = weight_bytes(folder), weight_bytes(dense)
    assert files < dense_files and abs(data / dense_data - fraction) < 0.005, (files, dense_files, data, dense_data)
    streamed = folder.parent / "feature-p54-always"  # the same tensors (in another order) and metadata
    (whole, meta), (one_by_one, streamed_meta) = (load_tensors(f / "model.safetensors") for f in (folder, streamed))
    assert whole.keys() == one_by_one.keys() and all(torch.equal(whole[k], one_by_one[k]) for k in whole)
    assert meta == streamed_meta and meta["dtype"] == "bfloat16"
    assert read_json(streamed / "config.json") == read_json(folder / "config.json")


def test_the_bfloat16_folder_loads_with_transformers_alone_with_the_logits_of_load_compressed(bf16_run, tmp_path):
    folder = bf16_run["compressed"]
    model, _ = load_compressed(folder)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = torch.randint(3, 300, (3, 11), generator=torch.Generator().manual_seed(0))
    with one_thread(), torch.no_grad():
        torch.save({"ids": ids, "logits": model(input_ids=ids).logits}, tmp_path / "ref.pt")
    proc = python_without_sfsd(f"""
        import torch
        torch.set_num_threads(1)
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        with torch.no_grad():
            logits = model(input_ids=ref["ids"]).logits
        print("dtypes:", sorted({{str(p.dtype) for p in model.parameters()}}))
        print("identical:", torch.equal(logits, ref["logits"]))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert lines == {"dtypes": "['torch.bfloat16']", "identical": "True"}


def test_an_explicit_dtype_overrides_the_checkpoints_in_compression_and_loading(bf16_run, tmp_path):
    res = bf16_run["results"]
    cli("compress", "--model-dir", bf16_run["model"], "--plan", bf16_run["plan"], "--factors", res / "factors",
        "--streamed", "never", "--dtype", "float32", "--out", tmp_path / "fp32")
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"
    assert tensor_dtypes(tmp_path / "fp32") == {"F32"}
    model, _ = load_compressed(bf16_run["compressed"], dtype="float32")  # cast up while loading
    reference, _ = load_compressed(bf16_run["compressed"])
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(torch.equal(a.float(), b) for a, b in zip(reference.state_dict().values(), model.state_dict().values()))


def _float64_checkpoint(tmp, model, calib) -> dict:
    folder = tmp / "float64-model"
    shutil.copytree(model, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("dtype", None)
    (folder / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "float64"}))
    return {"models": {"tiny": {"source": "local", "path": str(folder)}}}


def _config(tiny_llama, calibration_text_file, change: dict) -> dict:
    from helpers import base_config, deep_merge

    return deep_merge(base_config(tiny_llama, calibration_text_file), change)


@pytest.mark.parametrize("change,expected", [
    ({"dtype": "float8"}, "dtype: 'float8' is not one of"),
    ({"collection": {"dtype": "fp16"}}, "collection.dtype: 'fp16' is not one of"),
    (_float64_checkpoint, "models.tiny: dtype auto: its config.json names torch_dtype 'float64', which the workflow "
                          "does not run; set dtype to one of float32, bfloat16, float16"),
])
def test_a_dtype_the_workflow_cannot_run_is_one_config_line(change, expected, tiny_llama, calibration_text_file,
                                                           tmp_path):
    if callable(change):
        change = change(tmp_path, tiny_llama, calibration_text_file)
    config = _config(tiny_llama, calibration_text_file, change)
    with pytest.raises(ConfigError) as err:
        sfsd_config.validate(config)
        sfsd_config.check_config(config, root=tmp_path)
    assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("key", ["dtype", "collection.dtype"])
def test_a_dtype_the_device_cannot_run_is_one_config_line(key, tiny_llama, calibration_text_file, tmp_path,
                                                          monkeypatch):
    """A CPU whose torch has no float16 kernels (simulated: attention refuses float16) stops the run before any
    job, naming the key; float32 still passes."""
    import torch.nn.functional as F

    attention = F.scaled_dot_product_attention

    def no_half(q, *args, **kwargs):
        if q.dtype == torch.float16:
            raise RuntimeError('"baddbmm_with_gemm" not implemented for \'Half\'')
        return attention(q, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", no_half)
    change = {"dtype": "float16"} if key == "dtype" else {"collection": {"dtype": "float16"}}
    config = _config(tiny_llama, calibration_text_file, change)
    sfsd_config.validate(config)
    with pytest.raises(ConfigError) as err:
        sfsd_config.check_config(config, root=tmp_path)
    assert str(err.value).startswith(f"{key} float16: cpu cannot run it with this torch (\"baddbmm_with_gemm\" not "
                                      "implemented for 'Half'); set " + key + " to float32"), str(err.value)
    config = _config(tiny_llama, calibration_text_file, {"dtype": "float32"})
    sfsd_config.validate(config)
    sfsd_config.check_config(config, root=tmp_path)


def test_a_compressed_folder_is_readable_by_others(bf16_run, tmp_path):
    """The compress command's folder under umask 022: the folder 0755, every file 0644 (config.json,
    model.safetensors, plan.json, the tokenizer)."""
    res = bf16_run["results"]
    old = os.umask(0o022)
    try:
        cli("compress", "--model-dir", bf16_run["model"], "--plan", bf16_run["plan"], "--factors", res / "factors",
            "--streamed", "never", "--out", tmp_path / "shared")
    finally:
        os.umask(old)
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o755
    files = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "shared").iterdir()}
    assert {"config.json", "model.safetensors", "plan.json", "modeling_sfsd.py", "tokenizer.json"} <= files.keys()
    assert set(files.values()) == {0o644}, files


TABLE_TASKS = "arc_easy,piqa,hellaswag,boolq"
PPL_RTOL = 1e-3  # perplexity, bfloat16 against float32 (docs/evaluation.md)


def _table(bf16_run, folder, dtype: str, tasks_dir, splits) -> dict:
    """One chain of the bf16 checkpoint in `dtype` (auto: bfloat16) through the commands: statistics, factor
    cache, compressed folder (feature-p54) and the evaluation of it and of the base model: the rows'
    {(variant, task, metric): value}, and each variant's per-document scores (lls) from the native scorer."""
    import pyarrow.parquet as pq

    from sfsd.evaluate.scoring import build_requests, score_multiple_choice
    from sfsd.tasks.splits import read_split_ids

    model, res = bf16_run["model"], folder / "results"
    if dtype == "auto":
        res = bf16_run["results"]
    else:
        cli("collect", "--model-dir", model, "--model-name", "tiny", "--tokens",
            bf16_run["results"] / "tokens.safetensors", "--layers", LAYERS, "--device", "cpu", "--batch-size", 4,
            "--streamed", "never", "--dtype", dtype, "--out", res / "features")
        for b in range(4):
            cli("eigen", "--features", res / "features" / f"block_{b:03d}.safetensors", "--model-dir", model,
                "--layers", LAYERS, "--out", res / "eigen" / f"block_{b:03d}.safetensors")
        cli("factor-cache", "--model-dir", model, "--results", res, "--method", "feature", "--layers", LAYERS,
            "--streamed", "never", "--dtype", dtype, "--out", res / "factors" / "feature")
        cli("compress", "--model-dir", model, "--plan", bf16_run["plan"], "--factors", res / "factors",
            "--streamed", "never", "--dtype", dtype, "--out", res / "compressed" / "feature-p54-never")
    folders = {"base": None, "feature-p54": res / "compressed" / "feature-p54-never"}
    ids, n_docs = read_split_ids(splits, TABLE_TASKS.split(","), "test", 60)
    requests = build_requests(tasks_dir, TABLE_TASKS.split(","), ids, n_docs=n_docs)
    values, scores = {}, {}
    for variant, compressed in folders.items():
        out = folder / f"{variant}.parquet"
        given = [] if compressed is None else ["--compressed", compressed, "--method", "feature"]
        cli("evaluate", "--model-dir", model, *given, "--model-name", "tiny", "--variant", variant,
            "--tasks-dir", tasks_dir, "--tasks", TABLE_TASKS, "--splits", splits,
            "--limit", 60, "--batch-size", 8, "--device", "cpu", "--dtype", dtype, "--ppl-source", "lambada",
            "--ppl-window", 64, "--ppl-max-docs", 100, "--ppl-search-fraction", 0.2, "--out", out)
        for r in pq.read_table(out).to_pylist():
            assert r["dtype"] == ("bfloat16" if dtype == "auto" else dtype)
            values[(variant, r["task"], r["metric"])] = r["value"]
        m = load_model(model, dtype, "cpu")[0] if compressed is None else load_compressed(compressed, dtype=dtype)[0]
        scores[variant] = score_multiple_choice(m, load_tokenizer(model), requests, 8)
    return {"values": values, "scores": scores}


@pytest.mark.slow
def test_the_bfloat16_table_agrees_with_the_float32_one(bf16_run, tmp_path):
    """The whole chain (statistics, factors, compressed folder, evaluation) of one bfloat16 checkpoint, run
    in bfloat16 and in float32: every choice's log-likelihood within the bfloat16 bound of the scorer check
    (0.25 + 5% of it, `scoring.CHECK_TOLERANCE`), acc and acc_norm equal but for documents whose choices
    are tied within it (so each task score differs by at most those documents), perplexity within
    PPL_RTOL (docs/evaluation.md)."""
    from sfsd.evaluate.scoring import CHECK_TOLERANCE, check_against_lmeval
    from sfsd.tasks.lmeval import export_local_tasks
    from sfsd.tasks.splits import split_doc_ids

    tasks, splits = TABLE_TASKS.split(","), tmp_path / "splits.json"
    export_local_tasks(tmp_path / "tasks", tasks)
    splits.write_text(json.dumps({"tasks": {t: split_doc_ids(t, None, 1234, 0.1, 0.2, limit=60) for t in tasks}}))
    (tmp_path / "bf16").mkdir()
    (tmp_path / "fp32").mkdir()
    low, high = (_table(bf16_run, tmp_path / name, dtype, tmp_path / "tasks", splits)
                 for name, dtype in (("bf16", "auto"), ("fp32", "float32")))
    assert low["values"].keys() == high["values"].keys()
    for variant in ("base", "feature-p54"):
        report = check_against_lmeval(low["scores"][variant], high["scores"][variant], *CHECK_TOLERANCE["bfloat16"])
        assert report["mismatches"] == [] and report["docs"] == 4 * 60, report["mismatches"][:3]
        ppl = low["values"][(variant, "lambada", "ppl")] / high["values"][(variant, "lambada", "ppl")]
        assert abs(ppl - 1) <= PPL_RTOL, ppl


def test_the_scorer_check_of_a_bfloat16_folder_takes_the_bfloat16_tolerance(bf16_run, tmp_path):
    """check-scorer on the bfloat16 folder: the native scorer against lm-eval in bfloat16, within the
    bfloat16 bound (`scoring.CHECK_TOLERANCE`), which the report records with the dtype."""
    from sfsd.evaluate.scoring import CHECK_TOLERANCE
    from sfsd.tasks.lmeval import export_local_tasks
    from sfsd.tasks.splits import split_doc_ids

    export_local_tasks(tmp_path / "tasks", ["arc_easy"])
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"tasks": {"arc_easy": split_doc_ids("arc_easy", None, 1234, 0.1, 0.2, limit=6)}}))
    cli("check-scorer", "--model-dir", bf16_run["model"], "--compressed", bf16_run["compressed"], "--tasks-dir",
        tmp_path / "tasks", "--tasks", "arc_easy", "--splits", splits, "--limit", 6, "--batch-size", 4,
        "--device", "cpu", "--out", tmp_path / "check.json")
    report = read_json(tmp_path / "check.json")
    assert report["dtype"] == "bfloat16" and (report["tolerance"], report["rtol"]) == CHECK_TOLERANCE["bfloat16"]
    assert report["mismatches"] == [] and report["docs"] == 6
