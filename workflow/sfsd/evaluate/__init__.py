"""Stage 4, the evaluation: the native multiple-choice scorer (`scoring.py`) and lm-eval's
(`harness.py`), perplexity over windows of a text (`perplexity.py`), result rows (`rows.py`) and
per-item scores (`items.py`), and the measured inference cost (`speed.py`).

Reads: the dense or compressed model, `results/tasks/`, `results/splits.json`. Writes:
`results/<model>/eval/<variant>.parquet` and `.docs.parquet`, `results/<model>/results.parquet` (rules
`evaluate_model`, `check_scorer`, `combine_results`, rules/evaluate.smk) and
`results/<model>/speed/<variant>.json` (rule `inference_speed`, rules/speed.smk).
"""
