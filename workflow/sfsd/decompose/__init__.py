"""Stage 3, the decomposition: each method's factors from the statistics (`methods.py`, pure math), the
factor cache at full rank (`factor_cache.py`), rank plans and their parameter counts (`plan.py`), the
spectral allocation (`allocate.py`), the loss criterion of every rank (`criteria.py`), the allocated
and searched plans from their files (`allocated.py`), cutting and replacing a layer (`lowrank.py`), the
names of the variants (`variants.py`) and the compressed folder (`compress.py`).

Reads: the features or eigen files and the weights. Writes: `results/<model>/factors/<method>/`,
`results/<model>/loss/<method>/`, `results/<model>/plans/`, `results/<model>/compressed/<variant>/` (rules
`factor_cache`, `make_plan`, `spectral_plan`, `loss_spectra`, `loss_plan`, `compress_model`, rules/compress.smk;
`searched_plan`, rules/search.smk).
"""
