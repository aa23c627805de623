"""The configuration: the schema as the single source of defaults (the CLI's options take theirs from
it), the one reading of block numbers, and every config check called directly (no Snakemake)."""

from __future__ import annotations

import copy

import pytest
import yaml

from helpers import REPO, CONFIG_CASES, bad_config
from sfsd import config as sfsd_config
from sfsd import defaults
from sfsd.cli.main import build_parser
from sfsd.errors import ConfigError


def test_default_reads_the_schema():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    assert defaults.default("search.delta") == schema["properties"]["search"]["properties"]["delta"]["default"]
    assert defaults.default("evaluation.perplexity.window") == (
        schema["properties"]["evaluation"]["properties"]["perplexity"]["properties"]["window"]["default"])
    with pytest.raises(KeyError):
        defaults.default("search.no_such_key")


# (subcommand with its required options, {dest: config key}) for every option that mirrors a setting
_REQUIRED = {
    "collect": ["--model-dir", "m", "--model-name", "n", "--tokens", "t", "--layers", "q_proj", "--out", "o"],
    "make-plan": ["--model-dir", "m", "--model-name", "n", "--method", "feature", "--params-fraction", "0.5",
                  "--layers", "q_proj", "--out", "o"],
    "evaluate": ["--model-dir", "m", "--model-name", "n", "--variant", "base", "--tasks", "piqa", "--splits", "s",
                 "--out", "o"],
    "search": ["--model-dir", "m", "--model-name", "n", "--factors", "f", "--method", "feature", "--mode",
               "accuracy", "--target", "average", "--layers", "q_proj", "--splits", "s", "--tasks", "piqa",
               "--ppl-search-fraction", "0.2", "--out", "o"],
    "comparisons": ["--out-md", "a", "--out-csv", "b", "x.parquet"],
    "gradients": ["--model-dir", "m", "--model-name", "n", "--tokens", "t", "--layers", "q_proj", "--out", "o"],
    "laser-point": ["--model-dir", "m", "--model-name", "n", "--splits", "s", "--task", "piqa", "--split", "test",
                    "--intervention", "laser", "--lname", "fc_in", "--lnum", "1", "--rate", "9", "--out-scores", "a",
                    "--out-items", "b"],
}
_MIRRORED = {
    "collect": {"dtype": "collection.dtype", "device": "device", "batch_size": "collection.batch_size",
                "flush_every": "collection.flush_every", "staging": "collection.staging"},
    "make-plan": {"first_block": "compression.first_block", "convention": "compression.convention",
                  "bias_compensation": "compression.bias_compensation",
                  "spectral_groups": "compression.spectral_groups", "complete": "search.complete"},
    "evaluate": {"split": "evaluation.split", "limit": "evaluation.limit", "scorer": "evaluation.scorer",
                 "batch_size": "evaluation.batch_size", "task_source": "evaluation.source",
                 "ppl_source": "evaluation.perplexity.source", "ppl_window": "evaluation.perplexity.window",
                 "ppl_max_docs": "evaluation.perplexity.max_docs", "dtype": "dtype"},
    "search": {"metric": "search.metric", "delta": "search.delta", "eps": "search.eps",
               "loglik_delta": "search.loglik_delta", "kl_max": "search.kl_max", "first_block": "search.first_block",
               "last_block": "search.last_block", "strategy": "search.strategy", "stop_at": "search.stop_at",
               "search_limit": "search.search_limit", "curve_limit": "search.curve_limit",
               "curve_every": "search.curve_every", "batch_size": "search.batch_size",
               "cache_max_mb": "search.cache_max_mb", "dtype": "dtype"},
    "comparisons": {"seed": "evaluation.bootstrap.seed", "n_boot": "evaluation.bootstrap.resamples",
                    "metric": "evaluation.metric"},
    "gradients": {"full": "gradients.full", "dtype": "gradients.dtype", "batch_size": "gradients.batch_size",
                  "device": "device", "streamed": "streamed"},
    "laser-point": {"batch_size": "laser.batch_size", "limit": "laser.limit", "vendi_bandwidth": "laser.vendi.bandwidth",
                    "dtype": "dtype"},
}


@pytest.mark.parametrize("command", sorted(_MIRRORED))
def test_cli_defaults_are_the_schema_defaults(command):
    args = build_parser().parse_args([command, *_REQUIRED[command]])
    for dest, key in _MIRRORED[command].items():
        assert getattr(args, dest) == defaults.default(key), (command, dest, key)
    if command == "search":
        assert args.order.split(",") == defaults.default("search.order")
        assert [float(f) for f in args.fractions.split(",")] == defaults.default("search.fractions")
        assert [float(c) for c in args.checkpoints.split(",")] == defaults.default("search.checkpoints")


def test_nullable_options_take_none():
    args = build_parser().parse_args(["evaluate", *_REQUIRED["evaluate"], "--limit", "none", "--ppl-max-docs", "None"])
    assert args.limit is None and args.ppl_max_docs is None
    assert build_parser().parse_args(["evaluate", *_REQUIRED["evaluate"], "--limit", "7"]).limit == 7


@pytest.mark.parametrize("block,n,expected", [(0, 30, 0), (29, 30, 29), (-1, 30, 29), (-2, 30, 28), (-30, 30, 0)])
def test_resolve_block(block, n, expected):
    assert defaults.resolve_block(block, n) == expected


def test_block_range():
    assert defaults.block_range(-2, None, 30, "search.first_block") == range(28, 30)
    assert defaults.block_range(4, None, 30, "compression.first_block") == range(4, 30)
    assert defaults.block_range(0, 1, 3, "x") == range(0, 2)
    for first, last in [(30, None), (-31, None), (2, 1), (0, 30)]:
        with pytest.raises(ConfigError, match="is out of range: model m has blocks 0..29"):
            defaults.block_range(first, last, 30, "search.first_block", "model m")


def test_search_completion_is_read_in_one_place():
    """search.complete auto: loss where compression.allocations lists loss, else spectral; a set value as it
    is. make-plan's --complete auto reads the same rule from whether --loss is given."""
    def config(complete, allocations):
        return {"search": {"complete": complete}, "compression": {"allocations": allocations}}

    assert sfsd_config.search_completion(config("auto", ["uniform", "spectral", "loss"])) == "loss"
    assert sfsd_config.search_completion(config("auto", ["uniform", "spectral"])) == "spectral"
    assert sfsd_config.search_completion(config("spectral", ["loss"])) == "spectral"
    assert sfsd_config.search_completion(config("loss", ["loss"])) == "loss"
    assert defaults.resolve_completion("auto", True) == "loss" and defaults.resolve_completion("auto", False) == "spectral"
    with pytest.raises(ConfigError, match="search.complete 'energy' is unknown"):
        defaults.resolve_completion("energy", True)


@pytest.mark.parametrize("case", [c[0] for c in CONFIG_CASES])
def test_bad_config_is_one_line(case, tiny_llama, calibration_text_file, tmp_path):
    """Every bad-config case (helpers.CONFIG_CASES) called directly: the schema check or check_config
    raises one line with the expected text."""
    config, expected = bad_config(case, tmp_path, tiny_llama, calibration_text_file)
    with pytest.raises(ConfigError) as err:
        sfsd_config.validate(config)
        sfsd_config.check_config(config, root=tmp_path / "run")
    assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_the_shipped_config_passes(tmp_path):
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    sfsd_config.validate(config)
    sfsd_config.check_config(config, root=tmp_path)
    assert config["search"]["delta"] == defaults.default("search.delta")  # filled in from the schema


def test_validate_fills_defaults_without_changing_given_values():
    config = copy.deepcopy({"models": {"m": {"source": "embedded", "id": "smollm2-135m"}},
                            "search": {"delta": 0.1}})
    sfsd_config.validate(config)
    assert config["search"]["delta"] == 0.1
    assert config["search"]["eps"] == defaults.default("search.eps")
    assert config["compression"]["first_block"] == defaults.default("compression.first_block")


def test_more_calibration_samples_than_the_source_holds_is_a_warning(tiny_llama, calibration_text_file, tmp_path):
    """The stage would calibrate on every document the source holds, fewer than asked: said before any job."""
    from helpers import base_config

    config = base_config(tiny_llama, calibration_text_file)
    sfsd_config.validate(config)
    paragraphs = len([p for p in calibration_text_file.read_text().split("\n\n") if p.strip()])
    config["calibration"]["num_samples"] = paragraphs
    assert sfsd_config.config_warnings(config, tmp_path) == []
    config["calibration"]["num_samples"] = paragraphs + 1
    (warning,) = sfsd_config.config_warnings(config, tmp_path)
    assert f"exceeds the {paragraphs} documents that calibration.source text_file offers" in warning
    # the default source: the calibration part of the six tasks' local documents
    config["calibration"] = {**config["calibration"], "source": "combination", "num_samples": 10**8}
    (warning,) = sfsd_config.config_warnings(config, tmp_path)
    assert warning.startswith("calibration.num_samples 100000000 exceeds the 1730 documents that calibration.source "
                              "combination offers") and "\n" not in warning


def test_a_speed_selection_of_nothing_built_is_a_warning(tiny_llama, calibration_text_file):
    """speed.methods or speed.allocations naming nothing compression builds would leave the inference-cost
    table with the dense model alone: said before any job; the default measures feature space at uniform ranks."""
    from helpers import base_config

    config = base_config(tiny_llama, calibration_text_file)
    sfsd_config.validate(config)
    assert config["speed"]["methods"] == ["feature"] and sfsd_config.config_warnings(config, ".") == []
    config["speed"]["methods"] = ["asvd"]
    assert sfsd_config.config_warnings(config, ".") == []  # base_config builds asvd
    config["compression"]["methods"] = ["feature", "weight"]
    (warning,) = sfsd_config.config_warnings(config, ".")
    assert warning == ("speed.methods ['asvd'] names none of compression.methods ['feature', 'weight']: the "
                       "inference-cost table holds the dense model alone; add one of compression.methods to speed.methods")
    config["speed"] = {**config["speed"], "methods": None, "allocations": ["spectral"]}
    config["compression"]["allocations"] = ["uniform"]
    (warning,) = sfsd_config.config_warnings(config, ".")
    assert warning.startswith("speed.allocations ['spectral'] names none of compression.allocations ['uniform']")
    config["speed"]["enabled"] = False
    assert sfsd_config.config_warnings(config, ".") == []
