# Helpers of rules/laser.smk (the LASER study): config checks, grid and choice readers, point paths.
sys.path.insert(0, str(PACKAGE_DIR.parent))
from sfsd.errors import ConfigError as _LaserConfigError
from sfsd.laser_study import BASELINE as LASER_BASELINE
from sfsd.laser_study import INTERVENTIONS as LASER_INTERVENTIONS
from sfsd.laser_study import LNAME_ORDER as LASER_LNAMES
from sfsd.laser_study import format_rate, grid_points, reported_points

LASER = config["laser"]
LASER_POINT_FILE = "results/{model}/laser/points/{task}/{split}/{intervention}/{lname}/L{lnum}/r{rate}/{kind}.parquet"


def laser_models():
    """Models of the study: laser.models, or every configured model when it is null."""
    return LASER["models"] if LASER["models"] is not None else list(MODELS)


def check_laser_config():
    """One line before any job starts for what the schema cannot judge alone."""
    if not LASER["enabled"]:
        return
    unknown = [m for m in laser_models() if m not in MODELS]
    if unknown:
        fail(f"laser.models {unknown} are not configured under models; use some of {sorted(MODELS)} or null (all)")
    missing = [t for t in LASER["tasks"] if t not in config["evaluation"]["tasks"]]
    if missing:
        fail(f"laser.tasks {missing} are not in evaluation.tasks, whose splits the study uses; add them there")
    for rate in LASER["rates"]:
        try:
            format_rate(rate)
        except _LaserConfigError as err:
            fail(str(err))
    if not LASER["full_grid"] and not (set(LASER["lnames"]) - {"dont"}):
        fail("laser.lnames lists only dont (the baseline); add a layer type such as fc_in, or set laser.full_grid")
    # layer numbers against the model's depth wherever its config.json is readable before any job starts
    # (local models, or a prepared one); otherwise the laser_grid job checks them
    for name in [] if LASER["full_grid"] else laser_models():
        m = MODELS[name]
        model_config = (Path(m["path"]) if m["source"] == "local" else Path("results/models") / name) / "config.json"
        n_blocks = json.loads(model_config.read_text()).get("num_hidden_layers") if model_config.is_file() else None
        bad = [n for n in LASER["lnums"] if n_blocks and n >= n_blocks]
        if bad:
            fail(f"laser.lnums {bad} out of range: model {name} has blocks 0..{n_blocks - 1} (-1 = every block)")


check_laser_config()


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
