"""Check a Serve YAML before deploying it: `python -m graphs.validate configs/local.yaml`.

`serve run config.yaml` builds applications inside the cluster and, when a builder fails,
keeps waiting with the error buried in the controller's log. This builds every Mneme
application of the file locally first and exits 1 with the offending field's name.

`--local`: the file is about to run on this machine (`make run`), so its model folders must
be here. `--print-body-limit`: print the request-body limit its Mneme applications
configure (the largest), for `MNEME_MAX_REQUEST_BODY_BYTES`: Serve's HTTP proxy enforces it
and does not see the applications' args.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from graphs.serve_yaml import CONFIG_LOADERS, MnemeApp, read_serve_yaml

# files a model folder cannot load without (sentence-transformers' and transformers' own)
MODEL_FILES = {"embedder": "modules.json", "generator": "config.json"}


def _apps(path: str | Path) -> list[MnemeApp]:
    apps = read_serve_yaml(path)
    if not apps:
        raise ValueError(f"no Mneme application (import_path one of {sorted(CONFIG_LOADERS)})")
    return apps


def _missing_models(app: MnemeApp) -> list[str]:
    problems = []
    for role, needed in MODEL_FILES.items():
        folder = Path(getattr(app.config, role).resolved_model_path())
        if not (folder / needed).is_file():
            problems.append(
                f"application {app.name!r}: {role}.model_path {str(folder)!r} has no {needed} "
                "(run `make install` for the default models, or copy the whole folder)"
            )
    return problems


def _checked(path: str | Path, local: bool) -> tuple[list[MnemeApp], list[str]]:
    """The file's Mneme applications, and one message per problem."""
    try:
        apps = _apps(path)
    except (OSError, yaml.YAMLError, ValidationError, ValueError) as exc:
        return [], [f"{path}: {exc}"]
    return apps, [f"{path}: {p}" for app in apps for p in _missing_models(app)] if local else []


def validate_file(path: str | Path, local: bool = False) -> list[str]:
    """Return one message per problem (empty when the file is deployable)."""
    return _checked(path, local)[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m graphs.validate", description=__doc__)
    parser.add_argument("paths", nargs="*", default=["configs/local.yaml"])
    parser.add_argument("--local", action="store_true", help="its model folders must be here")
    parser.add_argument("--print-body-limit", action="store_true")
    args = parser.parse_args(argv)
    checked = [_checked(path, args.local) for path in args.paths]
    problems = [problem for _, found in checked for problem in found]
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    print(f"ok: {', '.join(args.paths)}", file=sys.stderr if args.print_body_limit else sys.stdout)
    if args.print_body_limit:
        apps = [app for found, _ in checked for app in found]
        print(max(app.config.limits.max_request_body_bytes for app in apps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
