"""Stages 1 and 2, the features: calibration texts and their tokens (`calibration.py`), the input
second moments of every targeted Linear over those tokens (`collect.py`, with the streaming sums of
`stats.py`), the second moment of the LM loss's gradient at every targeted Linear's output
(`gradients.py`), and the eigendecomposition of each layer's output covariance (`eigen.py`).

Reads: the model and `results/calibration/texts.jsonl`. Writes: `results/calibration/texts.jsonl`,
`results/<model>/calibration/tokens.safetensors` (rules/calibration.smk),
`results/<model>/features/block_NNN.safetensors` (rule `collect_features`, rules/features.smk),
`results/<model>/gradients/block_NNN.safetensors` (rule `collect_gradients`, rules/features.smk),
`results/<model>/eigen/` (rules `eigendecompose`, `eigen_summary`, rules/eigen.smk).
"""
