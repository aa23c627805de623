"""The resource planner: each stage's peak device memory, peak host memory and disk written, predicted from
a model's shapes (config.json and the safetensors headers, never the weights), the dtype, the device and
the stage's settings, and the mode each stage runs in (whole or streamed, statistics staged on the device
or on the host, the number of GPUs).

The formulas (`needs.py`, pure), the choice of mode and the fix when none fits (`modes.py`, pure), the
reading of shapes, tokens and this machine (`read.py`), the settings of a whole config and the checks
before a run (`plan.py`), and the `streamed: auto` decision of the stages that run (`decide.py`).

Reads: the model folder's config.json and safetensors headers, the calibration tokens' header. Writes
nothing: rules/common.smk sizes every job from it (mem_mb, disk_mb, gpu, threads), `sfsd.config` refuses
a run that fits in no mode or on no disk, and the command `python -m sfsd plan-resources` prints its table.
"""
