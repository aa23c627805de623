"""What the `python -m sfsd` subcommands share: option types and choices (their defaults come from the
config schema, `sfsd.defaults`)."""

from __future__ import annotations

from sfsd.defaults import choices, default

# plan.FACTOR_METHODS, written out so that parsing options imports no torch (a test keeps the two equal)
METHOD_CHOICES = ("feature", "weight", "whitened", "asvd")

METRIC_HELP = ("paper (default): per task the metric lm-eval defines and the SFSD paper reports (acc for boolq "
               "and winogrande, acc_norm for the others); acc or acc_norm: that one (acc_norm only for tasks "
               "whose lm-eval config defines it)")


def optional(kind: type):
    """An option type for a nullable setting: `none` (or `null`) is None, anything else `kind`."""

    def parse(value: str):
        return None if value.lower() in ("none", "null") else kind(value)

    parse.__name__ = kind.__name__  # argparse names the type in its error line
    return parse


def csv_list(value: str) -> list[str]:
    """A comma-separated option as a list (blanks dropped)."""
    return [v.strip() for v in value.split(",") if v.strip()]


def add_dtype(p, key: str = "dtype") -> None:
    """The `--dtype` option of a command that loads or builds a model: the setting `key` (its values and
    default from the schema; auto = the checkpoint's own dtype, `sfsd.model.loading.run_dtype`)."""
    p.add_argument("--dtype", choices=choices(key), default=default(key),
                   help="the model's dtype (auto: the checkpoint's own, from its config.json; float32 when it names none)")
