"""Check a Serve YAML before deploying it: `python -m graphs.validate configs/local.yaml`.

`serve run config.yaml` builds applications inside the cluster and, when a builder fails,
keeps waiting with the error buried in the controller's log. This builds every Mneme
application of the file locally first and exits 1 with the offending field's name.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from graphs.serve_yaml import read_serve_yaml


def validate_file(path: str | Path) -> list[str]:
    """Return one message per problem (empty when the file is deployable)."""
    try:
        read_serve_yaml(path)
    except (OSError, yaml.YAMLError, ValidationError, ValueError) as exc:
        return [f"{path}: {exc}"]
    return []


def main(argv: list[str] | None = None) -> int:
    paths = (argv if argv is not None else sys.argv[1:]) or ["configs/local.yaml"]
    problems = [p for path in paths for p in validate_file(path)]
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"ok: {', '.join(paths)}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
