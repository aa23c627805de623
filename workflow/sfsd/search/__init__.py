"""Stage 5, the surgical rank search: the algorithm (`algorithm.py`, pure: layers from the top down,
the smallest rank whose score stays within the tolerance), its objectives (`objectives.py`: accuracy,
log-likelihood, KL, perplexity), its settings (`settings.py`), the cache of block inputs that lets a
candidate rerun only the blocks after it (`block_cache.py`) and the run with its state file
(`run.py`).

Reads: the model, the factor cache, the tasks and splits. Writes:
`results/<model>/search/<method>-<mode>-<target>/` (rule `search`; `searched_plan` and
`compress_searched` turn it into plans and folders, rules/search.smk).
"""
