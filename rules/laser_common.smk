# Helpers of rules/laser.smk (the LASER study): grid and choice readers, point paths (its config checks:
# sfsd.config).
sys.path.insert(0, str(PACKAGE_DIR.parent))
from sfsd.config import laser_models as sfsd_laser_models
from sfsd.laser.study import BASELINE as LASER_BASELINE
from sfsd.laser.study import INTERVENTIONS as LASER_INTERVENTIONS
from sfsd.laser.study import LNAME_ORDER as LASER_LNAMES
from sfsd.laser.study import format_rate, grid_points, reported_points

LASER = config["laser"]
LASER_POINT_FILE = "results/{model}/laser/points/{task}/{split}/{intervention}/{lname}/L{lnum}/r{rate}/{kind}.parquet"


def laser_models():
    """Models of the study: laser.models, or every configured model when it is null."""
    return sfsd_laser_models(config)


def laser_point_file(model, task, split, point, kind):
    return LASER_POINT_FILE.format(model=model, task=task, split=split, kind=kind, **point.wildcards())


def laser_grid_points(model):
    with open(checkpoints.laser_grid.get(model=model).output.grid) as f:
        return grid_points(json.load(f))


def laser_reported(model, task):
    """The points the choice sends to the test split (baseline, chosen, best of each intervention)."""
    with open(checkpoints.laser_choose.get(model=model, task=task).output.chosen) as f:
        return reported_points(json.load(f))


def laser_search_scores(wildcards):
    return [laser_point_file(wildcards.model, wildcards.task, "search", p, "scores")
            for p in laser_grid_points(wildcards.model)]


def laser_results_scores(wildcards):
    """Every search point's rows, and the test rows of the points each task's choice reports."""
    m = wildcards.model
    out = []
    for task in LASER["tasks"]:
        out += [laser_point_file(m, task, "search", p, "scores") for p in laser_grid_points(m)]
        out += [laser_point_file(m, task, "test", p, "scores") for p in laser_reported(m, task)]
    return out


def laser_results_items(wildcards):
    """Per-item records of the reported points, on both splits."""
    m = wildcards.model
    return [laser_point_file(m, task, split, p, "items") for task in LASER["tasks"]
            for p in laser_reported(m, task) for split in ("search", "test")]
