"""The factor cache and compression one block at a time (sfsd/model/stream.py `BlockStream`): the same files as
with the whole model in memory, a compressed model written shard by shard that every loader reads, and
(slow) a model whose weights exceed an imposed memory limit cached and compressed under it."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import (
    LINEARS,
    LLAMA,
    build_tiny_model,
    deep_llama,
    one_thread,
    python_without_sfsd,
    run_capped,
    run_cli,
)
from sfsd.decompose.compress import load_compressed
from sfsd.decompose.factor_cache import compress_from_cache, save_factor_cache
from sfsd.decompose.plan import new_plan
from sfsd.errors import ConfigError
from sfsd.io import (
    INDEX_FILE,
    SINGLE_FILE,
    ShardWriter,
    checkpoint_index,
    checkpoint_metadata,
    load_tensors,
    model_digest,
    read_parameters,
)
from sfsd.model.loading import load_model
from sfsd.model.registry import get_arch
from sfsd.model.stream import BlockStream, WholeModel, open_blocks

CPU = torch.device("cpu")


def _weights(folder) -> dict[str, torch.Tensor]:
    return read_parameters(folder, list(checkpoint_index(folder)))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _plan(spec, n_blocks: int, method: str, rank: int, digest: str) -> dict:
    return new_plan({f"{b}.{name}": {"method": method, "rank": rank} for b in range(1, n_blocks)
                     for name in spec.linears}, model_digest=digest)


def test_the_shard_writer_starts_a_shard_before_one_would_overflow(tmp_path):
    tensors = {"a": torch.ones(3), "b": torch.ones(3) * 2, "c": torch.ones(5) * 3, "d": torch.ones(1) * 4,
               "e": torch.ones(9) * 5}
    writer = ShardWriter(tmp_path / "sharded", max_bytes=24, raw={"format": "pt"})
    (tmp_path / "sharded").mkdir()
    for name, t in tensors.items():
        writer.add({name: t})
    files = writer.finish({"note": {"x": 1}})
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "sharded" / INDEX_FILE).read_text())
    assert index["weight_map"] == {"a": files[0].name, "b": files[0].name, "c": files[1].name,
                                   "d": files[1].name, "e": files[2].name}  # 36 bytes alone: its own shard
    assert index["metadata"] == {"total_size": 21 * 4, "note": {"x": 1}}
    assert checkpoint_metadata(tmp_path / "sharded") == {"note": {"x": 1}}
    read = _weights(tmp_path / "sharded")
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], tensors[k]) for k in tensors)
    assert not list((tmp_path / "sharded").glob(".shard-*"))  # no temporary name left
    single = ShardWriter(tmp_path / "single", max_bytes=1000, raw={"format": "pt"})
    (tmp_path / "single").mkdir()
    single.add(tensors)
    assert [f.name for f in single.finish({"note": 1})] == [SINGLE_FILE]
    assert checkpoint_metadata(tmp_path / "single") == {"note": 1}
    with pytest.raises(ValueError, match="added twice"):
        single.add({"a": torch.ones(1)})


def test_the_factor_cache_is_the_same_streamed(tiny_stats, tmp_path):
    for method in ("feature", "weight", "whitened", "asvd"):
        for name, model in (("whole", tiny_stats["model"]), ("streamed", BlockStream(tiny_stats["dir"],
                                                                                      torch.float32, CPU))):
            save_factor_cache(model, LLAMA, method, LINEARS, tmp_path / name / method, tiny_stats["eigen"],
                              tiny_stats["features"], model_digest=tiny_stats["digest"])
        for file in sorted((tmp_path / "whole" / method).iterdir()):
            whole, meta_whole = load_tensors(file)
            streamed, meta_streamed = load_tensors(tmp_path / "streamed" / method / file.name)
            assert whole.keys() == streamed.keys() and all(torch.equal(whole[k], streamed[k]) for k in whole)
            assert meta_whole == meta_streamed, file


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Gemma2ForCausalLM"])
def test_compression_streamed_and_sharded_gives_the_same_model(architecture, tmp_path):
    """Gemma 2 ties its lm_head to the embedding: the streamed model keeps the tie and writes it once."""
    folder = build_tiny_model(tmp_path / "model", architecture, n_layers=3)
    spec, digest = get_arch(architecture), model_digest(folder)
    model, tokenizer = load_model(folder, device="cpu")
    save_factor_cache(model, spec, "weight", list(spec.linears), tmp_path / "factors" / "weight", model_digest=digest)
    plan = _plan(spec, 3, "weight", 3, digest)
    outs = {}
    for name, source, shard_bytes in (("whole", WholeModel(model), 2**40),
                                      ("streamed", BlockStream(folder, torch.float32, CPU), 2**40),
                                      ("sharded", BlockStream(folder, torch.float32, CPU), 5_000)):
        outs[name] = tmp_path / name
        result = compress_from_cache(source, plan, tmp_path / "factors", outs[name], model_digest=digest,
                                     tokenizer=tokenizer, shard_bytes=shard_bytes)
        assert len(result["layers"]) == 2 * len(spec.linears)
    assert (outs["whole"] / SINGLE_FILE).is_file() and not (outs["whole"] / INDEX_FILE).exists()
    shards = sorted(p.name for p in outs["sharded"].glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    reference = _weights(outs["whole"])
    for name in ("streamed", "sharded"):
        weights = _weights(outs[name])
        assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights)
        assert checkpoint_metadata(outs[name]) == checkpoint_metadata(outs["whole"])
    if model.config.tie_word_embeddings:
        assert checkpoint_metadata(outs["sharded"])["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    ids = torch.arange(1, 13).reshape(2, 6)
    expected = _logits(load_compressed(outs["whole"])[0], ids)
    assert torch.equal(_logits(load_compressed(outs["sharded"])[0], ids), expected)
    # transformers alone reads the shards through the index
    code = (f"import torch, transformers; m = transformers.AutoModelForCausalLM.from_pretrained({str(outs['sharded'])!r}, "
            "trust_remote_code=True, dtype=torch.float32).eval()\n"
            "with torch.no_grad(): print(m(input_ids=torch.arange(1, 13).reshape(2, 6)).logits.double().sum().item())")
    run = python_without_sfsd(code)
    assert run.returncode == 0, run.stderr[-2000:]
    assert float(run.stdout.split()[-1]) == pytest.approx(expected.double().sum().item(), rel=1e-6)


def test_the_compress_command_streams_on_request(tiny4, tmp_path):
    folder, model, tokenizer, factors = tiny4
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(_plan(LLAMA, 4, "weight", 5, model_digest(folder))))
    run = run_cli("compress", "--model-dir", str(folder), "--plan", str(plan), "--factors", str(factors),
                  "--streamed", "always", "--out", str(tmp_path / "streamed"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "one block at a time (streamed: always)" in run.stderr
    compress_from_cache(WholeModel(model), json.loads(plan.read_text()), factors, tmp_path / "whole",
                        model_digest=model_digest(folder), tokenizer=tokenizer)
    streamed, whole = _weights(tmp_path / "streamed"), _weights(tmp_path / "whole")
    assert streamed.keys() == whole.keys() and all(torch.equal(streamed[k], whole[k]) for k in whole)


def test_open_blocks_follows_the_setting(tiny_llama):
    assert isinstance(open_blocks(tiny_llama, "always"), BlockStream)
    assert isinstance(open_blocks(tiny_llama, "never"), WholeModel)
    with pytest.raises(ConfigError, match="decide auto"):  # the resource planner decides auto first
        open_blocks(tiny_llama, "auto")
    stream = open_blocks(tiny_llama, "always")
    assert all(p.is_meta for p in stream.blocks[0].parameters())
    with stream.block(0) as block:
        assert not any(p.is_meta for p in block.parameters())
    assert all(p.is_meta for p in stream.blocks[0].parameters())  # dropped again


# In a fresh process: import and warm up, cap the address space at what is used now plus `budget` MB
# (helpers.CAP_MEMORY), then write the weight-space factor cache and the compressed model (whole: load the
# model first).
CAPPED = """
    import json, os
    from sfsd.model.registry import get_arch
    from sfsd.decompose.factor_cache import compress_from_cache, save_factor_cache
    from sfsd.io import model_digest
    from sfsd.model.stream import BlockStream, open_blocks
    folder, mode, budget, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    spec = get_arch("LlamaForCausalLM")
    digest = model_digest(folder)
    plan = json.load(open(os.path.join(out, "plan.json")))
    BlockStream(folder, torch.float32, torch.device("cpu"))  # warm-up: the model classes' lazy imports
    torch.linalg.svd(torch.randn(8, 8, dtype=torch.float64))
    cap_memory(budget)
    try:
        source = open_blocks(folder, "always" if mode == "streamed" else "never")
        save_factor_cache(source, spec, "weight", list(spec.linears), os.path.join(out, "factors", "weight"),
                          model_digest=digest)
        compress_from_cache(source, plan, os.path.join(out, "factors"), os.path.join(out, "compressed"),
                            model_digest=digest, shard_bytes=20 * 2**20)
    except (MemoryError, RuntimeError) as err:
        out_of_memory(err)
"""


@pytest.mark.slow  # writes a 450 MB model
def test_weights_above_the_memory_limit_are_cached_and_compressed_streamed(tmp_path):
    folder = tmp_path / "model"
    model, weights_mb = deep_llama(folder)
    digest = model_digest(folder)
    plan = _plan(LLAMA, 64, "weight", 64, digest)
    budget = 340  # one block's weights and factors need a few tens of MB above the warmed-up process
    assert weights_mb > budget + 100  # the whole model cannot fit under the cap
    runs = {}
    for mode in ("whole", "streamed"):
        (tmp_path / mode).mkdir()
        (tmp_path / mode / "plan.json").write_text(json.dumps(plan))
        runs[mode] = run_capped(CAPPED, str(folder), mode, str(budget), str(tmp_path / mode))
    assert runs["whole"].returncode == 3 and "out of memory" in runs["whole"].stdout  # the cap bites
    assert runs["streamed"].returncode == 0, runs["streamed"].stdout + runs["streamed"].stderr[-2000:]
    compressed = tmp_path / "streamed" / "compressed"
    assert len(list(compressed.glob("model-*.safetensors"))) > 1  # written shard by shard
    with one_thread():  # as in the capped process: the same kernels' reduction order
        save_factor_cache(model, LLAMA, "weight", LINEARS, tmp_path / "reference" / "weight", model_digest=digest)
        compress_from_cache(WholeModel(model), plan, tmp_path / "reference", tmp_path / "reference-model",
                            model_digest=digest)
    reference, capped = _weights(tmp_path / "reference-model"), _weights(compressed)
    assert reference.keys() == capped.keys() and all(torch.equal(reference[k], capped[k]) for k in reference)
