# Surgical Feature-Space Decomposition (SFSD) of LLMs, and its peers.
# This file is the table of contents; each stage lives in rules/<stage>.smk.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


# validates the config (workflow/schemas/config.schema.yaml) before anything else
include: "rules/common.smk"
include: "rules/models.smk"
include: "rules/calibration.smk"
include: "rules/features.smk"
include: "rules/eigen.smk"
include: "rules/compress.smk"
include: "rules/loss_shots.smk"
include: "rules/evaluate_common.smk"
include: "rules/evaluate.smk"
include: "rules/search.smk"
include: "rules/speed.smk"
include: "rules/figures.smk"
include: "rules/laser.smk"
include: "rules/quick.smk"
include: "rules/progress.smk"


rule all:
    input:
        all_targets(),
    default_target: True
