"""envs/*.yaml, pyproject.toml and envs/constraints.txt must not drift apart."""

import re
import tomllib

import yaml

from helpers import REPO


def pins() -> dict[str, str]:
    out = {}
    for line in (REPO / "envs" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            out[name.strip().lower()] = version.strip()
    return out


def test_conda_envs_use_the_constraint_pins():
    constraints = pins()
    for env in (REPO / "envs").glob("*.yaml"):
        deps = yaml.safe_load(env.read_text())["dependencies"]
        pip = next(d["pip"] for d in deps if isinstance(d, dict))
        for req in pip:
            name, version = re.split(r"==", req)
            name = re.sub(r"\[.*\]", "", name).lower()
            assert constraints.get(name) == version, f"{env.name}: {req} differs from constraints.txt"


def test_every_dependency_is_pinned():
    constraints = pins()
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name = re.split(r"[<>=\[ ]", dep)[0].lower()
        assert name in constraints, f"{name} is not pinned in envs/constraints.txt"
