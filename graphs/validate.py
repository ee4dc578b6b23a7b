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
from ray.serve.schema import ServeDeploySchema

from mneme.config import load_config

BUILDER = "graphs.app:build_app"


def validate_file(path: str | Path) -> list[str]:
    """Return one message per problem (empty when the file is deployable)."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        return [f"{path}: {exc}"]
    try:
        schema = ServeDeploySchema.model_validate(raw)
    except ValidationError as exc:
        return [f"{path}: {exc}"]
    problems = []
    for application in schema.applications:
        if application.import_path != BUILDER:
            continue
        try:
            load_config(application.args)
        except ValueError as exc:
            problems.append(f"{path}: application {application.name!r}: {exc}")
    return problems


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
