"""Where BOS goes in perplexity windows (evaluation.perplexity.bos): the per-family fact of the registry
(Gemma: BOS on every window; Llama and the rest: the tokenizer's BOS at the start of the text only), each
window's NLL against a hand computation on tiny random Gemma and Llama models, the protocol recorded in the
rows and per-item files, and the tables and comparisons refusing to put two protocols side by side."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import CORPUS, build_tiny_model
from sfsd.errors import ConfigError, DataError
from sfsd.evaluate.perplexity import perplexity
from sfsd.evaluate.rows import perplexity_row
from sfsd.model.registry import PPL_BOS, perplexity_bos

TEXTS = [f"Paragraph {i}. {CORPUS[i % 5]} {CORPUS[(i + 2) % 5]}" for i in range(8)]
WINDOW = 12


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_gemma3(tokenizer):
    """A random Gemma 3 text model (model_type gemma3_text, as Gemma-3-270M) over the tiny tokenizer."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                              max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return Gemma3ForCausalLM(config).eval()


def adds_bos(tokenizer):
    """The tokenizer made to put BOS before every text it encodes with special tokens, as Llama's and
    Gemma's tokenizers do (the tiny test tokenizer adds none)."""
    from tokenizers.processors import TemplateProcessing

    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, tokenizer.bos_token_id)])
    return tokenizer


@pytest.fixture(scope="module")
def models(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = adds_bos(AutoTokenizer.from_pretrained(tiny_llama))
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    return {"tok": tok, "llama": llama, "gemma": tiny_gemma3(tok)}


def window_inputs(model):
    """The input_ids of every forward pass of `model`, as a list that fills while the hook is on."""
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"].clone()),
                                             with_kwargs=True)
    return seen, handle


def hand_nll(model, window_ids: list[int], first: int) -> float:
    """Summed NLL of positions first..len-1 of one window, each given the positions before it."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([window_ids])).logits[0].double()
    lp = torch.log_softmax(logits[first - 1:-1], -1)
    return float(-lp.gather(-1, torch.tensor(window_ids[first:]).unsqueeze(-1)).sum())


# ------------------------------------------------------------------------- the per-family fact


def test_auto_gives_gemma_families_every_window_and_others_the_first():
    for model_type in ("gemma", "gemma2", "gemma3", "gemma3_text", "sfsd_gemma3_text"):
        assert perplexity_bos("auto", model_type) == "every_window", model_type
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "phi3", "gpt_neox", "sfsd_llama", None):
        assert perplexity_bos("auto", model_type) == "first_window", model_type
    assert set(PPL_BOS) == {"gemma", "gemma2", "gemma3", "gemma3_text"}
    # an explicit setting wins over the family
    assert perplexity_bos("first_window", "gemma3_text") == "first_window"
    assert perplexity_bos("every_window", "llama") == "every_window"
    with pytest.raises(ConfigError, match="evaluation.perplexity.bos 'always' is unknown"):
        perplexity_bos("always", "llama")


def test_schema_offers_the_protocols_and_defaults_to_auto():
    from sfsd.defaults import choices, default
    from sfsd.model.registry import PPL_BOS_PROTOCOLS

    assert default("evaluation.perplexity.bos") == "auto"
    assert set(choices("evaluation.perplexity.bos")) == {"auto", *PPL_BOS_PROTOCOLS}


# ------------------------------------------------------------------------- the windows


def test_gemma_gets_bos_on_every_window_each_scoring_its_text_tokens(models):
    """auto on a Gemma: every window is BOS + WINDOW-1 text tokens of one tokenization (no special tokens),
    the text windows follow one another, and each window's NLL is the hand computation over its WINDOW-1
    text tokens (BOS never scored)."""
    gemma, tok = models["gemma"], models["tok"]
    text = tok("\n\n".join(TEXTS), add_special_tokens=False)["input_ids"]
    span = WINDOW - 1
    n = len(text) // span
    assert n >= 3
    seen, handle = window_inputs(gemma)
    try:
        res = perplexity(gemma, tok, TEXTS, WINDOW, batch_size=2)
    finally:
        handle.remove()
    assert res["bos"] == "every_window" and res["stride"] == span and res["total_tokens"] == len(text)
    assert res["windows"] == n and res["window_tokens"] == [span] * n and res["tokens"] == n * span
    inputs = torch.cat(seen)
    assert inputs.shape == (n, WINDOW)
    assert (inputs[:, 0] == tok.bos_token_id).all() and not (inputs[:, 1:] == tok.bos_token_id).any()
    for w in range(n):
        ids = [tok.bos_token_id] + text[w * span:(w + 1) * span]
        assert inputs[w].tolist() == ids
        assert res["window_nll"][w] == pytest.approx(hand_nll(gemma, ids, first=1), rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(sum(res["window_nll"]) / (n * span)))
    # the first-window protocol forced on the same model gives another number (BOS matters to it)
    assert perplexity(gemma, tok, TEXTS, WINDOW, bos="first_window")["ppl"] != pytest.approx(res["ppl"], rel=1e-3)


def test_llama_keeps_bos_on_the_first_window_only(models):
    """auto on a Llama: the text tokenized once with the tokenizer's BOS, cut into WINDOW-token windows;
    only the first starts with BOS, and each window scores its last WINDOW-1 tokens (SVD-LLM's protocol)."""
    llama, tok = models["llama"], models["tok"]
    ids = tok("\n\n".join(TEXTS))["input_ids"]
    assert ids[0] == tok.bos_token_id
    n = len(ids) // WINDOW
    seen, handle = window_inputs(llama)
    try:
        res = perplexity(llama, tok, TEXTS, WINDOW, batch_size=3)
    finally:
        handle.remove()
    assert res["bos"] == "first_window" and res["windows"] == n and res["window_tokens"] == [WINDOW - 1] * n
    inputs = torch.cat(seen)
    assert inputs[0, 0] == tok.bos_token_id and not (inputs[1:, 0] == tok.bos_token_id).any()
    for w in range(n):
        assert res["window_nll"][w] == pytest.approx(hand_nll(llama, ids[w * WINDOW:(w + 1) * WINDOW], 1), rel=1e-5)
    # every_window forced on a Llama: BOS + WINDOW-1 text tokens, as for Gemma
    forced = perplexity(llama, tok, TEXTS, WINDOW, bos="every_window")
    text = tok("\n\n".join(TEXTS), add_special_tokens=False)["input_ids"]
    assert forced["bos"] == "every_window" and forced["windows"] == len(text) // (WINDOW - 1)
    assert forced["window_nll"][1] == pytest.approx(
        hand_nll(llama, [tok.bos_token_id] + text[WINDOW - 1:2 * (WINDOW - 1)], 1), rel=1e-5)


def test_sliding_windows_with_bos_score_each_text_token_once(models):
    gemma, tok = models["gemma"], models["tok"]
    text = tok("\n\n".join(TEXTS[:3]), add_special_tokens=False)["input_ids"]
    res = perplexity(gemma, tok, TEXTS[:3], WINDOW, stride=4)
    n = (len(text) - (WINDOW - 1)) // 4 + 1
    assert res["windows"] == n and res["window_tokens"] == [WINDOW - 1] + [4] * (n - 1)
    # the second window: BOS + text[4:4+WINDOW-1], scoring its last 4 text tokens
    ids = [tok.bos_token_id] + text[4:4 + WINDOW - 1]
    assert res["window_nll"][1] == pytest.approx(hand_nll(gemma, ids, first=WINDOW - 4), rel=1e-5)
    with pytest.raises(ConfigError, match=r"stride must be in \[1, 11\] \(window 12, BOS on every window\)"):
        perplexity(gemma, tok, TEXTS, WINDOW, stride=WINDOW)


def test_every_window_without_a_bos_token_is_a_config_error(models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["tok"].name_or_path)
    tok.bos_token = None
    with pytest.raises(ConfigError, match="the tokenizer defines no BOS token; set evaluation.perplexity.bos to "
                                          "first_window"):
        perplexity(models["gemma"], tok, TEXTS, WINDOW)


def test_the_search_objective_uses_the_same_protocol(models):
    from sfsd.search.objectives import PerplexityObjective

    gemma, tok = models["gemma"], models["tok"]
    auto = PerplexityObjective(tok, TEXTS, WINDOW).score(gemma)
    assert auto == pytest.approx(perplexity(gemma, tok, TEXTS, WINDOW, bos="every_window")["ppl"])
    assert PerplexityObjective(tok, TEXTS, WINDOW, bos="first_window").score(gemma) == pytest.approx(
        perplexity(gemma, tok, TEXTS, WINDOW, bos="first_window")["ppl"])


# ------------------------------------------------------------------------- rows, per-item files, tables


def test_rows_record_the_protocol(models):
    res = perplexity(models["gemma"], models["tok"], TEXTS, WINDOW)
    row = perplexity_row(res, "lambada", docs=[{"doc_id": "lambada/1"}])
    assert row["ppl_bos"] == "every_window" and row["window"] == WINDOW and row["stride"] == WINDOW - 1
    assert perplexity_row(perplexity(models["llama"], models["tok"], TEXTS, WINDOW), "lambada")["ppl_bos"] == \
        "first_window"


def test_evaluate_command_on_a_tiny_gemma_records_every_window(tmp_path):
    """`python -m sfsd evaluate` on a tiny random Gemma 2 with the default setting (auto): its perplexity
    row and its per-item file say every_window; --ppl-bos first_window is recorded as such."""
    import pyarrow.parquet as pq

    from sfsd.cli.main import main
    from sfsd.evaluate.items import PPL_BOS
    from sfsd.tasks.lmeval import export_local_tasks
    from sfsd.tasks.splits import split_doc_ids

    folder = build_tiny_model(tmp_path / "gemma2", "Gemma2ForCausalLM")
    export_local_tasks(tmp_path / "tasks", ["arc_easy"])
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"tasks": {"arc_easy": split_doc_ids("arc_easy", None, 1234, 0.1, 0.2, limit=2)}}))
    text = tmp_path / "ppl.txt"
    text.write_text("\n\n".join(TEXTS))
    got = {}
    for setting in ("auto", "first_window"):
        out = tmp_path / setting
        assert main(["evaluate", "--model-dir", str(folder), "--model-name", "tiny", "--variant", "base",
                     "--tasks-dir", str(tmp_path / "tasks"), "--tasks", "arc_easy", "--splits", str(splits),
                     "--limit", "2", "--device", "cpu", "--ppl-source", "text_file", "--ppl-path", str(text),
                     "--ppl-window", str(WINDOW), "--ppl-search-fraction", "0", "--ppl-bos", setting,
                     "--out", str(out / "base.parquet"), "--items-out", str(out / "base.docs.parquet")]) == 0
        row = next(r for r in pq.read_table(out / "base.parquet").to_pylist() if r["metric"] == "ppl")
        meta = pq.read_table(out / "base.docs.parquet").schema.metadata
        got[setting] = (row["ppl_bos"], json.loads(meta[PPL_BOS.encode()]), row["value"])
    assert got["auto"][:2] == ("every_window", "every_window")
    assert got["first_window"][:2] == ("first_window", "first_window")
    assert got["auto"][2] != pytest.approx(got["first_window"][2])


def ppl_rows(bos_by_plan: dict[str, str | None]) -> list[dict]:
    common = {"split": "test", "n": 10, "params_model": 100, "params_decoder_linear_fraction": 1.0,
              "macs_per_token": 10, "stderr": 0.05}
    rows = []
    for plan, bos in bos_by_plan.items():
        method = "baseline" if plan == "base" else plan.split("-")[0]
        fraction = 1.0 if plan == "base" else 0.8
        rows += [{**common, "method": method, "plan": plan, "params_model_fraction": fraction, "task": "piqa",
                  "metric": "acc_norm", "value": 0.6},
                 {**common, "method": method, "plan": plan, "params_model_fraction": fraction, "task": "lambada",
                  "metric": "ppl", "value": 40.0, "stderr": None, "n": 300, "window": 128, "ppl_bos": bos}]
    return rows


def test_tables_refuse_perplexities_of_two_protocols(tmp_path):
    from sfsd.evaluate.rows import write_rows
    from sfsd.report.tables import methods_table, methods_table_rows, paper_table, paper_table_rows

    same = ppl_rows({"base": "every_window", "feature-b80": "every_window"})
    table, notes = paper_table_rows(same)
    assert len(table) == 2 and notes["ppl_bos"] == {("lambada", 128): "every_window"}
    write_rows(tmp_path / "r.parquet", same)
    paper_table(tmp_path / "r.parquet", "paper", tmp_path / "t.md", tmp_path / "t.csv")
    assert "lambada 128-token windows: BOS + window-1 text tokens in every window" in (tmp_path / "t.md").read_text()
    methods_table(tmp_path / "r.parquet", "paper", tmp_path / "m.md", tmp_path / "m.csv")
    assert "BOS + window-1 text tokens in every window" in (tmp_path / "m.md").read_text()
    mixed = ppl_rows({"base": "first_window", "feature-b80": "every_window"})
    message = (r"lambada perplexities \(128-token windows\) were measured under different BOS protocols "
               r"\(feature-b80 BOS every_window, base BOS first_window\); evaluate every variant with the same "
               r"evaluation.perplexity.bos")
    with pytest.raises(DataError, match=message):
        paper_table_rows(mixed)
    with pytest.raises(DataError, match=message):
        methods_table_rows(mixed)
    with pytest.raises(DataError, match="base BOS unrecorded"):  # a row from before the protocol was recorded
        paper_table_rows(ppl_rows({"base": None, "feature-b80": "first_window"}))


def test_comparisons_refuse_windows_of_two_protocols(tmp_path):
    from sfsd.evaluate.items import write_items
    from sfsd.report.compare import comparisons_table

    def docs_file(plan, bos):
        common = {"model": "tiny", "method": "baseline" if plan == "base" else "feature", "plan": plan,
                  "params_model_fraction": 1.0 if plan == "base" else 0.8}
        rows = [{**common, "task": "piqa", "split": "test", "unit": "doc", "item": i, "acc": float(i % 2),
                 "acc_norm": float(i % 2)} for i in range(6)]
        rows += [{**common, "task": "lambada", "split": "test", "unit": "window", "item": w, "nll": 30.0 + w,
                  "tokens": 11} for w in range(4)]
        return write_items(tmp_path / bos / f"{plan}.docs.parquet", rows, common, ["lambada/1"], ppl_bos=bos)

    ok = [docs_file("base", "every_window"), docs_file("feature-b80", "every_window")]
    comparisons_table(ok, "paper", tmp_path / "c.md", tmp_path / "c.csv", n_boot=10)
    assert "Perplexity windows: lambada 4 (BOS: every window)." in (tmp_path / "c.md").read_text()
    mixed = [ok[0], docs_file("feature-b80", "first_window")]
    with pytest.raises(DataError, match="cannot pair feature-b80 with base: their perplexity windows put BOS "
                                        r"differently \(first_window vs every_window\); evaluate both with the "
                                        "same evaluation.perplexity.bos"):
        comparisons_table(mixed, "paper", tmp_path / "x.md", tmp_path / "x.csv", n_boot=10)


# ------------------------------------------------------------------------- the workflow


@pytest.mark.slow  # dry runs of the real Snakefile
def test_the_setting_reaches_the_evaluation_and_perplexity_search_commands(tmp_path, tiny_llama,
                                                                        calibration_text_file):
    """A dry run of the real Snakefile: evaluate_model and a perplexity search run with --ppl-bos of the
    setting (a rule's params are its rerun trigger, so changing the setting reruns them); a KL search,
    which scores no perplexity window, does not get it (a change does not rerun it)."""
    import re

    from helpers import new_run, snakemake

    snakefile, workdir = new_run(tmp_path)
    config = {
        "models": {"tiny": {"source": "local", "path": str(tiny_llama)}},
        "calibration": {"source": "text_file", "path": str(calibration_text_file), "num_samples": 8, "seq_len": 32},
        "device": "cpu",
        "compression": {"budgets": {"b80": 0.8}, "first_block": 0},
        "evaluation": {"tasks": ["arc_easy"], "limit": 4, "perplexity": {"source": "lambada", "window": 32}},
        "search": {"enabled": True, "methods": ["feature"], "modes": ["kl", "perplexity"], "first_block": -1},
        "laser": {"enabled": False},
    }
    targets = ["results/tiny/eval/base.parquet", "results/tiny/search/feature-perplexity-lambada/summary.json",
               "results/tiny/search/feature-kl-average/summary.json"]
    for setting in ("auto", "every_window"):
        config["evaluation"]["perplexity"]["bos"] = setting
        out = snakemake(snakefile, workdir, config, "--dry-run", "--printshellcmds", "--forceall", *targets).stdout
        evaluate = re.search(r"python -m sfsd .* evaluate .*", out).group(0)
        searches = re.findall(r"python -m sfsd .* search .*--mode (\w+).*", out)
        assert f"--ppl-bos {setting} " in evaluate, evaluate
        assert sorted(searches) == ["kl", "perplexity"]
        for line in re.findall(r"python -m sfsd .* search .*", out):
            assert (f"--ppl-bos {setting}" in line) == ("--mode perplexity" in line), line
