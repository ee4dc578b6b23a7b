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
DEPLOYMENTS = ("Router", "Embedder", "VectorSearch", "Generator")
BATCHED = {"Embedder": "embedder", "VectorSearch": "vector_search"}  # -> their args section


def _loader(import_path: str) -> Callable[[dict[str, Any] | None], MnemeConfig] | None:
    """Serve takes `module:attr` and `module.attr` alike."""
    module, _, attribute = import_path.replace(":", ".").rpartition(".")
    return CONFIG_LOADERS.get(f"{module}:{attribute}")


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
        loader = _loader(application.import_path)
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
        if unknown := sorted(set(options) - set(DEPLOYMENTS)):
            raise ValueError(
                f"application {application.name!r}: no deployment named {unknown} (Mneme's "
                f"are {', '.join(DEPLOYMENTS)}); its options would be ignored"
            )
        _check_user_configs(application.name, config, options, loader is naive_config)
        _check_memory_only_search(application.name, config, options.get("VectorSearch", {}))
        apps.append(MnemeApp(application.name, application.route_prefix or "/", config, options))
    return apps


def _check_memory_only_search(app: str, config: MnemeConfig, options: dict) -> None:
    """With `storage.data_dir` null each VectorSearch replica keeps its own memories in its
    own memory: a second replica would answer without the first one's writes, and a replica
    scaled down would take its writes with it."""
    if config.vector_search.storage.data_dir is not None:
        return
    replicas = options.get("num_replicas") or 1
    most = (options.get("autoscaling_config") or {}).get("max_replicas") or 1
    if replicas == "auto" or max(replicas, most) > 1:
        raise ValueError(
            f"application {app!r}: args.vector_search.storage.data_dir is null (memories in "
            "each replica's memory), so deployment 'VectorSearch' must keep one replica; "
            "set data_dir (a folder every replica shares) to run more"
        )


def _check_user_configs(
    app: str, config: MnemeConfig, options: dict[str, dict], naive: bool = False
) -> None:
    """Each deployment's `user_config` parsed as its replicas will (ValueError naming it).
    A replica applies its `user_config` over the args, so batch knobs given in both places
    must agree (the args' would be dead), and the naive graph takes none (it would batch)."""
    parsers = {
        "Router": lambda uc: parse_router_user_config(uc, config.auth),
        "Embedder": lambda uc: parse_batch_config(uc, config.embedder.batch),
        "VectorSearch": lambda uc: parse_batch_config(uc, config.vector_search.batch),
    }
    where = f"application {app!r}, deployment"
    if options.get("Generator", {}).get("user_config") is not None:
        raise ValueError(f"{where} 'Generator': takes no user_config (set args.generator)")
    for name, parse in parsers.items():
        user_config = options.get(name, {}).get("user_config")
        if user_config is None:
            continue
        if naive and name in BATCHED:
            raise ValueError(
                f"{where} {name!r}: the naive graph's batching is off by design; a "
                "user_config would turn it back on at run time"
            )
        try:
            parsed = parse(user_config)
        except MnemeError as exc:
            raise ValueError(f"{where} {name!r}: {exc}") from None
        section = getattr(config, BATCHED.get(name, ""), None)
        if section is None:
            continue
        given = section.batch.model_fields_set  # the knobs the args set (not defaults)
        if clash := sorted(k for k in given if getattr(parsed, k) != getattr(section.batch, k)):
            raise ValueError(
                f"{where} {name!r}: its user_config sets {clash} otherwise than "
                f"args.{BATCHED[name]}.batch, and replicas apply the user_config over the "
                "args at run time; set each batch knob in one place"
            )
