"""Reads a Serve YAML of Mneme applications into typed configs, the way `serve run` would
build them, so that benchmarks and checks use the shipped files rather than copies."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from graphs.app import bind_graph
from graphs.naive import naive_config
from mneme.config import (
    MnemeConfig,
    load_config,
    parse_batch_config,
    parse_router_user_config,
)
from mneme.errors import MnemeError

CONFIG_LOADERS: dict[str, Callable[[dict[str, Any] | None], MnemeConfig]] = {
    "graphs.app:build_app": load_config,
    "graphs.naive:build_app": naive_config,
}


@dataclass(frozen=True)
class MnemeApp:
    """One Mneme application of a Serve YAML."""

    name: str
    route_prefix: str
    config: MnemeConfig
    deployment_options: dict[str, dict[str, Any]]

    def bind(self) -> Application:
        return bind_graph(self.config, self.deployment_options)

    def with_data_dir(self, data_dir: str) -> MnemeApp:
        """The same application with its memory log in `data_dir` (benchmarks, tests)."""
        storage = self.config.vector_search.storage.model_copy(update={"data_dir": data_dir})
        search = self.config.vector_search.model_copy(update={"storage": storage})
        config = self.config.model_copy(update={"vector_search": search})
        return MnemeApp(self.name, self.route_prefix, config, self.deployment_options)


def read_serve_yaml(path: str | Path) -> list[MnemeApp]:
    """Every Mneme application of the file; ValueError (naming the field) when invalid."""
    raw = yaml.safe_load(Path(path).read_text())
    schema = ServeDeploySchema.model_validate(raw)
    apps = []
    for application in schema.applications:
        loader = CONFIG_LOADERS.get(application.import_path)
        if loader is None:
            continue
        try:
            config = loader(application.args)
        except ValueError as exc:
            raise ValueError(f"application {application.name!r}: {exc}") from None
        options = {
            d.name: d.model_dump(exclude_unset=True, exclude={"name"})
            for d in application.deployments
        }
        _check_user_configs(application.name, config, options)
        apps.append(MnemeApp(application.name, application.route_prefix or "/", config, options))
    return apps


def _check_user_configs(app: str, config: MnemeConfig, options: dict[str, dict]) -> None:
    """Each deployment's `user_config` parsed as its replicas will (ValueError naming it)."""
    parsers = {
        "Router": lambda uc: parse_router_user_config(uc, config.auth),
        "Embedder": lambda uc: parse_batch_config(uc, config.embedder.batch),
        "VectorSearch": lambda uc: parse_batch_config(uc, config.vector_search.batch),
    }
    for name, parse in parsers.items():
        user_config = options.get(name, {}).get("user_config")
        if user_config is None:
            continue
        try:
            parse(user_config)
        except MnemeError as exc:
            raise ValueError(f"application {app!r}, deployment {name!r}: {exc}") from None
