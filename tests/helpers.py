"""Helpers shared by the tests (fixtures live in conftest.py): tiny random models, a private copy of the
workflow and Snakemake runs on it, the CLI in a subprocess, and the bad-config cases."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import yaml

from sfsd.decompose.methods import max_rank
from sfsd.model.hf_modeling import LowRankLinear
from sfsd.model.registry import get_arch

REPO = Path(__file__).resolve().parents[1]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: What do plants need to grow?\nAnswer: water and light",
    "A man is sitting on a roof. He starts pulling up roofing on a roof.",
    "Once upon a time, in a barn near a farm house, there lived a little white kitten.",
    "Sarah was a much better surgeon than Maria so Sarah always got the harder cases.",
] * 20


def build_tokenizer(folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


# config class and size keywords of each architecture's tiny model (hidden 32, 4 query heads, 2 key/value
# heads where the family has grouped-query attention)
_LLAMA_SIZES = {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 512}
TINY_CONFIGS = {
    "LlamaForCausalLM": ("LlamaConfig", _LLAMA_SIZES),
    "MistralForCausalLM": ("MistralConfig", _LLAMA_SIZES),
    "Qwen2ForCausalLM": ("Qwen2Config", _LLAMA_SIZES),
    "Qwen3ForCausalLM": ("Qwen3Config", {**_LLAMA_SIZES, "head_dim": 8}),
    "Gemma2ForCausalLM": ("Gemma2Config", {**_LLAMA_SIZES, "head_dim": 8, "query_pre_attn_scalar": 8}),
    "Phi3ForCausalLM": ("Phi3Config", _LLAMA_SIZES),
    "Olmo2ForCausalLM": ("Olmo2Config", _LLAMA_SIZES),
    "GPTNeoXForCausalLM": ("GPTNeoXConfig", {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4,
                                             "max_position_embeddings": 512}),
    "GPTJForCausalLM": ("GPTJConfig", {"n_embd": 32, "n_inner": 48, "n_head": 4, "rotary_dim": 4,
                                       "n_positions": 512}),
}


def build_tiny_model(folder: Path, architecture: str = "LlamaForCausalLM", seed: int = 0,
                     n_layers: int = 2) -> Path:
    """A random decoder of `architecture` (TINY_CONFIGS: hidden 32, 4 query heads and 2 key/value heads
    where the family has them), saved as safetensors + tokenizer."""
    import transformers

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(folder)
    config_name, sizes = TINY_CONFIGS[architecture]
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer), num_hidden_layers=n_layers, **sizes, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, architectures=[architecture],
    )
    model = getattr(transformers, architecture)(config)
    # a non-zero, non-trivial mean in the residual stream, like real models
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(0.3)
    model.save_pretrained(folder, safe_serialization=True)
    from transformers import AutoTokenizer

    loaded = len(AutoTokenizer.from_pretrained(folder))  # Qwen2's tokenizer class adds <|endoftext|>
    if loaded > config.vocab_size:
        model.resize_token_embeddings(loaded)
        model.save_pretrained(folder, safe_serialization=True)
    return folder


def copy_workflow(dest: Path) -> Path:
    """A private copy of the workflow, so a test may edit its code without touching the repo."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in ("Snakefile", "config.yaml", "rules", "profiles", "envs"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / item)
    shutil.copytree(REPO / "workflow", dest / "workflow", ignore=shutil.ignore_patterns("__pycache__"))
    return dest / "Snakefile"


def new_run(root: Path) -> tuple[Path, Path]:
    """(Snakefile of a private workflow copy in root/repo, an empty working folder root/run)."""
    snakefile = copy_workflow(root / "repo")
    workdir = root / "run"
    workdir.mkdir()
    return snakefile, workdir


def snakemake(snakefile: Path, workdir: Path, config: dict, *args: str, check: bool = True, env=None):
    cfg = workdir / "test-config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--directory", str(workdir),
           "--configfile", str(cfg), "--cores", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def planned_jobs(proc) -> dict[str, int]:
    """Rule -> job count from a dry run's 'Job stats' table; empty when there is nothing to do."""
    out = proc.stdout + proc.stderr
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)}


def run_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python -m sfsd --threads 1 ...` in a fresh interpreter: its exit code and output."""
    return subprocess.run([sys.executable, "-m", "sfsd", "--threads", "1", *args], capture_output=True, text=True,
                          timeout=timeout)


# run first by python_without_sfsd: `import sfsd` (and any submodule) fails there
NO_SFSD = textwrap.dedent("""
    import importlib.abc, sys
    class _NoSfsd(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "sfsd" or name.startswith("sfsd."):
                raise ImportError("sfsd is not importable here")
            return None
    sys.meta_path.insert(0, _NoSfsd())
""")


@contextlib.contextmanager
def one_thread():
    """torch on one thread inside (restored after): results comparable bit for bit with another process
    that also runs on one thread (a different thread count changes the reduction order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def python_without_sfsd(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter in which `import sfsd` fails (what a user without the package has)."""
    return subprocess.run([sys.executable, "-c", NO_SFSD + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)


# The start of a capped script (`run_capped`): after its own imports and warm-up, a script calls
# cap_memory(budget_mb) to limit its address space to what it uses now plus the budget.
CAP_MEMORY = textwrap.dedent("""
    import resource, sys
    import torch, transformers
    torch.set_num_threads(1)

    def cap_memory(budget_mb):
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2)
        with torch.inference_mode():  # warm up a model's forward first: its lazy imports and buffers
            transformers.LlamaForCausalLM(cfg).model(input_ids=torch.ones(2, 8, dtype=torch.long))
        vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + budget_mb * 2**20, vm + budget_mb * 2**20))

    def out_of_memory(err):
        print("out of memory:", str(err)[:120])
        sys.exit(3)
""")


def run_capped(code: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """CAP_MEMORY + `code` (dedented) in a fresh interpreter: exit code 3 and "out of memory" when the cap
    bit. The cap limits address space, so glibc is set to keep it close to the memory in use: one arena,
    and every allocation of 1 MiB or more mapped on its own and unmapped when freed (with glibc's moving
    threshold, freed tensors come back from the heap, whose holes stay in the address space: a run then
    grew by a few MB per block in one run of three while its resident memory stayed flat)."""
    import os

    env = {**os.environ, "MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    return subprocess.run([sys.executable, "-c", CAP_MEMORY + textwrap.dedent(code), *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def deep_llama(folder: Path):
    """A 64-block Llama of about 450 MB (hidden 512), saved in 20 MB shards: larger than the memory caps of
    the streamed tests. Returns the model and its size in MB."""
    import transformers

    tokenizer = build_tokenizer(folder)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=512,
                                      num_hidden_layers=64, num_attention_heads=8, num_key_value_heads=8,
                                      architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder, max_shard_size="20MB")
    return model, sum(p.numel() for p in model.parameters()) * 4 / 2**20


def deep_merge(base: dict, change: dict) -> dict:
    out = dict(base)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "models":
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def base_config(model: Path, calibration: Path) -> dict:
    return {
        "models": {"tiny": {"source": "local", "path": str(model)}},
        "calibration": {"source": "text_file", "path": str(calibration), "num_samples": 24, "seq_len": 32},
        "collection": {"batch_size": 4},
        "device": "cpu",
        # every method, and the allocation that needs no gradient pass (the loss allocation's own tests add it)
        "compression": {"budgets": {"b80": 0.8}, "first_block": 0, "methods": ["feature", "weight", "whitened", "asvd"],
                        "allocations": ["uniform", "spectral"]},
        "evaluation": {"tasks": ["arc_easy"], "limit": 4, "perplexity": {"source": "lambada", "window": 32}},
    }


def one_error_line(output: str, prefix: str) -> str:
    """The single line carrying the error; fails on none, several, or a traceback."""
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if "error:" in line.lower()]
    assert len(lines) == 1, f"expected exactly one error line, got {lines}\n{output[-2000:]}"
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


# ---------------------------------------------------------------- bad config: caught before any job


def _arch_gpt2(tmp: Path, model: Path, calib: Path) -> dict:
    folder = tmp / "gpt2-like"
    shutil.copytree(model, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    return {"models": {"tiny": {"source": "local", "path": str(folder)}}}


def _gptj_default_layers(tmp: Path, model: Path, calib: Path) -> dict:
    folder = build_tiny_model(tmp / "gptj", "GPTJForCausalLM")  # inspected; the default layers are Llama's
    return {"models": {"tiny": {"source": "local", "path": str(folder)}}}


def _gptj_long_calibration(tmp: Path, model: Path, calib: Path) -> dict:
    folder = build_tiny_model(tmp / "gptj", "GPTJForCausalLM")  # its context is n_positions (512)
    return {"models": {"tiny": {"source": "local", "path": str(folder)}}, "calibration": {"seq_len": 1024},
            "layers": ["q_proj", "fc_in"]}


def _arch_neox_on_llama(tmp: Path, model: Path, calib: Path) -> dict:
    folder = tmp / "neox-named-llama"  # config.json builds a Llama but names GPT-NeoX
    shutil.copytree(model, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPTNeoXForCausalLM"]}))
    return {"models": {"tiny": {"source": "local", "path": str(folder)}}, "layers": ["dense"]}


def _no_config_json(tmp: Path, model: Path, calib: Path) -> dict:
    (tmp / "empty-model").mkdir()
    return {"models": {"tiny": {"source": "local", "path": str(tmp / "empty-model")}}}


def _empty_calibration(tmp: Path, model: Path, calib: Path) -> dict:
    (tmp / "empty.txt").write_text("")
    return {"calibration": {"path": str(tmp / "empty.txt")}}


def _jsonl_without_field(tmp: Path, model: Path, calib: Path) -> dict:
    (tmp / "calib.jsonl").write_text(json.dumps({"body": "some text"}) + "\n")
    return {"calibration": {"source": "jsonl_file", "path": str(tmp / "calib.jsonl")}}


def _binary_jsonl(tmp: Path, model: Path, calib: Path) -> dict:
    (tmp / "calib.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe binary")
    return {"calibration": {"source": "jsonl_file", "path": str(tmp / "calib.jsonl")}}


def _calibration_is_evaluated_task(tmp: Path, model: Path, calib: Path) -> dict:
    # an exported evaluation task file (results/tasks/<task>.jsonl, under the run's own folder)
    task_file = tmp / "run" / "results" / "tasks" / "arc_easy.jsonl"
    task_file.parent.mkdir(parents=True)
    task_file.write_text(json.dumps({"text": "Question: what is 2+2?\nAnswer: 4"}) + "\n")
    return {"calibration": {"source": "jsonl_file", "path": "results/tasks/arc_easy.jsonl"}}


CONFIG_CASES = [
    # (id, change to the base config or a function (tmp, model, calibration) -> change, expected text)
    ("streamed under collection", {"collection": {"streamed": "always"}}, "is now the top-level key streamed"),
    ("binary calibration file", _binary_jsonl, "is not UTF-8 text"),
    ("unknown embedded model", {"models": {"tiny": {"source": "embedded", "id": "gpt-5"}}},
     "models.tiny.id 'gpt-5' is not an embedded model"),
    ("unsupported architecture", _arch_gpt2,
     "unsupported architecture 'GPT2LMHeadModel': inspection found no torch.nn.Linear projections"),
    ("inspected model with Llama's layer names", _gptj_default_layers,
     "models.tiny: config 'layers' keyword(s) ['o_proj', 'gate_proj', 'up_proj', 'down_proj'] match no Linear "
     "layer; available: q_proj, k_proj, v_proj, out_proj, fc_in, fc_out"),
    ("search order names a layer the model lacks", {"search": {"order": ["down_proj", "fc_out"]}},
     "models.tiny: search.order names ['fc_out'], not Linear layers of LlamaForCausalLM"),
    ("config builds another model than its architecture", _arch_neox_on_llama,
     "models.tiny: GPTNeoXForCausalLM: the model holds no blocks at gpt_neox.layers"),
    ("calibration longer than GPT-J's n_positions", _gptj_long_calibration,
     "calibration.seq_len 1024 exceeds the context of model tiny (512 tokens)"),
    ("model folder without config.json", _no_config_json, "is not a model folder with config.json"),
    ("unknown model source", {"models": {"tiny": {"source": "s3", "path": "x"}}}, "models.tiny.source: 's3' is not one of"),
    ("layer keywords match nothing", {"layers": ["qq_proj"]}, "keyword(s) ['qq_proj'] match no Linear layer"),
    ("no layers", {"layers": []}, "layers: [] should be non-empty"),
    ("unknown calibration source", {"calibration": {"source": "wiki"}}, "calibration.source: 'wiki' is not one of"),
    ("missing calibration file", {"calibration": {"path": "/nonexistent/calib.txt"}},
     "calibration.path '/nonexistent/calib.txt' is not a file"),
    ("empty calibration file", _empty_calibration, "is empty; give it some text"),
    ("calibration jsonl without the text field", _jsonl_without_field, "calibration.text_field 'text' is not a field"),
    ("hub calibration without a dataset", {"calibration": {"source": "hub"}}, "calibration.hub_dataset must be set"),
    ("no calibration samples", {"calibration": {"num_samples": 0}},
     "calibration.num_samples: 0 is less than the minimum of 1"),
    ("quick budget not a compression budget", {"quick": {"budget": "p99"}},
     "quick.budget 'p99' is not a name of compression.budgets"),
    ("seq_len above the model's context", {"calibration": {"seq_len": 1024}},
     "calibration.seq_len 1024 exceeds the context of model tiny (512 tokens)"),
    ("calibration overlapping the evaluated splits", {"calibration": {"source": "combination"},
                                                     "splits": {"calibration_fraction": 0}},
     "splits.calibration_fraction is 0"),
    ("calibration file is an evaluated task", _calibration_is_evaluated_task, "is an exported evaluation task file"),
    ("budget above 1", {"compression": {"budgets": {"b150": 1.5}}},
     "compression.budgets.b150: 1.5 is greater than the maximum of 1"),
    ("budget of 0", {"compression": {"budgets": {"b0": 0}}},
     "compression.budgets.b0: 0 is less than or equal to the minimum of 0"),
    ("unknown compression method", {"compression": {"methods": ["magic"]}},
     "compression.methods.0: 'magic' is not one of"),
    ("first block out of range", {"compression": {"first_block": 2}},
     "compression.first_block 2 is out of range: model tiny has blocks 0..1"),
    ("unknown evaluation task", {"evaluation": {"tasks": ["mmlu"]}}, "evaluation.tasks.0: 'mmlu' is not one of"),
    ("unknown calibration task", {"calibration": {"tasks": ["mmlu"]}}, "calibration.tasks.0: 'mmlu' is not one of"),
    ("perplexity window above the context", {"evaluation": {"perplexity": {"window": 1024}}},
     "evaluation.perplexity.window 1024 exceeds the context of model tiny"),
    ("unknown table metric", {"evaluation": {"metric": "f1"}}, "evaluation.metric: 'f1' is not one of"),
    ("device typo", {"device": "gpu"}, "device: 'gpu' does not match"),
    ("collection dtype typo", {"collection": {"dtype": "float8"}}, "collection.dtype: 'float8' is not one of"),
    ("misspelt key", {"calibraton": {"seq_len": 64}}, "'calibraton' was unexpected"),
    ("eigen threads of 0", {"eigen": {"threads": 0}}, "eigen.threads: 0 is less than the minimum of 1"),
    ("batch size as a string", {"collection": {"batch_size": "8"}}, "collection.batch_size: '8' is not of type 'integer'"),
    ("search delta out of range", {"search": {"delta": -0.5}}, "search.delta: -0.5 is less than the minimum of 0"),
    ("search blocks out of range", {"search": {"enabled": True, "first_block": 5}},
     "search.first_block 5 is out of range: model tiny has blocks 0..1"),
    ("search target not evaluated", {"search": {"enabled": True, "first_block": -1, "targets": {"accuracy": ["piqa"]}},
                                     "evaluation": {"tasks": ["arc_easy"]}},
     "search.targets.accuracy ['piqa'] are not in evaluation.tasks ['arc_easy']"),
    ("unknown search method", {"search": {"methods": ["laser"]}}, "search.methods.0: 'laser' is not one of"),
    ("search completed by a loss criterion the run does not make",
     {"search": {"enabled": True, "first_block": -1, "complete": "loss"}},
     "search.complete loss reads the loss criterion, which runs (and is sized) only where compression.allocations "
     "lists loss"),
    ("unknown search completion", {"search": {"complete": "energy"}}, "search.complete: 'energy' is not one of"),
    ("unknown search metric", {"search": {"metric": "f1"}}, "search.metric: 'f1' is not one of"),
    # a metric lm-eval's task config does not define (BoolQ and WinoGrande have acc only)
    ("table metric undefined for a task", {"evaluation": {"tasks": ["arc_easy", "boolq"], "metric": "acc_norm"}},
     "evaluation.metric: lm-eval defines no acc_norm for boolq"),
    ("search metric undefined for an averaged task", {"evaluation": {"tasks": ["arc_easy", "winogrande"]},
                                                      "search": {"enabled": True, "metric": "acc_norm"}},
     "search.metric: lm-eval defines no acc_norm for winogrande"),
    ("search metric undefined for a target", {"evaluation": {"tasks": ["arc_easy", "boolq"]},
                                              "search": {"enabled": True, "metric": "acc_norm",
                                                         "targets": {"accuracy": ["boolq"]}}},
     "search.metric: lm-eval defines no acc_norm for boolq"),
    ("laser metric undefined for its task", {"evaluation": {"tasks": ["arc_easy", "winogrande"]},
                                             "laser": {"enabled": True, "tasks": ["winogrande"], "metric": "acc_norm"}},
     "laser.metric: lm-eval defines no acc_norm for winogrande"),
]


def bad_config(case: str, tmp: Path, model: Path, calibration: Path) -> tuple[dict, str]:
    """The full config of a CONFIG_CASES case (its change merged into base_config) and the expected text."""
    _, change, expected = next(c for c in CONFIG_CASES if c[0] == case)
    if callable(change):
        change = change(tmp, model, calibration)
    return deep_merge(base_config(model, calibration), change), expected


# ---------------------------------------------------------------- statistics and searches on tiny models

LLAMA = get_arch("LlamaForCausalLM")
LINEARS = list(LLAMA.linears)

STAT_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: What do plants need to grow?\nAnswer: water and light",
    "A man is sitting on a roof. He starts pulling up roofing on a roof.",
    "Sarah was a much better surgeon than Maria so Sarah always got the harder cases.",
    "Once upon a time, in a barn near a farm house, there lived a little white kitten.",
]


def stage_tensors(model, spec, linears: list[str], moments) -> tuple[dict, dict]:
    """What stages 1 and 2 write, in memory: per block the feature tensors of each input group and the
    eigendecomposition (eigenvalues, eigenvectors, mean) of each Linear's output covariance."""
    from sfsd.model.registry import linear_of
    from sfsd.features.stats import eigh_descending, output_moments

    features, eigen = {}, {}
    for b, per_block in enumerate(moments):
        features[b] = {}
        for g, acc in per_block.items():
            features[b].update({f"{g}.xxt": acc.xxt, f"{g}.xsum": acc.xsum, f"{g}.xabs": acc.xabs,
                                f"{g}.count": torch.tensor(acc.count, dtype=torch.int64)})
        eigen[b] = {}
        for name in linears:
            layer = linear_of(model, spec, b, name)
            acc = per_block[spec.group_of(name)]
            with torch.no_grad():
                mu, cov = output_moments(layer.weight, layer.bias, acc.mean(), acc.covariance())
            eig = eigh_descending(cov)
            eigen[b].update({f"{name}.eigenvalues": eig.values, f"{name}.eigenvectors": eig.vectors.float(),
                             f"{name}.mean": mu})
    return features, eigen


def tiny_statistics(model_dir: Path) -> dict:
    """Base model, tokens, and per-block eigen / feature tensors as the cached files hold them (what stages
    1 and 2 write, computed in memory from STAT_TEXTS)."""
    from sfsd.model.registry import groups_for
    from sfsd.features.calibration import tokenize
    from sfsd.features.collect import collect_input_moments
    from sfsd.io import model_digest
    from sfsd.model.loading import load_model
    from sfsd.model.shapes import model_shapes

    spec, linears = LLAMA, LINEARS
    model, tokenizer = load_model(model_dir, device="cpu")
    tokens = tokenize(STAT_TEXTS, tokenizer, seq_len=40)
    groups = groups_for(spec, linears)
    moments = collect_input_moments(model, spec, groups, tokens["input_ids"], tokens["attention_mask"],
                                    batch_size=5, progress=False)
    features, eigen = stage_tensors(model, spec, linears, moments)
    return {"model": model, "tokenizer": tokenizer, "tokens": tokens, "eigen": eigen, "features": features,
            "shapes": model_shapes(model), "digest": model_digest(model_dir), "dir": model_dir}




class LogitAgreement:
    """A hand-made objective that depends on the whole forward pass: minus the mean squared difference
    of the logits from the dense model's on fixed batches (the scorer runs the same batches each call)."""

    name = "agreement"

    def __init__(self, model, tol: float, batches):
        self.batches = batches
        with torch.no_grad():
            self.reference = [model(b, use_cache=False).logits for b in batches]
        self.tol = tol

    def score(self, model) -> float:
        with torch.no_grad():
            return -float(sum(((model(b, use_cache=False).logits - r) ** 2).mean()
                              for b, r in zip(self.batches, self.reference)))

    def threshold(self, baseline, step):
        return baseline - self.tol

    def passes(self, score, threshold):
        return score >= threshold


class RankBudget(LogitAgreement):
    """Monotone in every rank by construction (fewer removed ranks = higher score), still running the
    model so the cache and the counter are exercised."""

    def score(self, model) -> float:
        super().score(model)
        removed = sum(max_rank(m.in_features, m.out_features) - m.first.out_features
                      for m in model.modules() if isinstance(m, LowRankLinear))
        return -float(removed)


def fresh_model(folder):
    """The saved tiny model, loaded anew (the search edits the model it is given)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def random_batches(seed=0, n=3):
    """Seeded token batches (4 x 12) for the hand-made objectives."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (4, 12), generator=g) for _ in range(n)]




def search_settings(**kw):
    """The tests' search: weight space, accuracy on the average, delta 0 from block 2 (the schema's defaults
    for the rest)."""
    from sfsd.search.settings import SearchSettings

    return SearchSettings(**{"method": "weight", "mode": "accuracy", "target": "average", "delta": 0.0,
                             "first_block": 2, "checkpoints": (), **kw})


