"""Builds the Mneme application from the YAML `args` (validated once, here)."""

from __future__ import annotations

from typing import Any

from ray.serve import Application, Deployment

from deployments.embedder import Embedder
from deployments.generator import Generator
from deployments.router import Router
from deployments.vector_search import VectorSearch
from mneme.config import MnemeConfig, load_config


def bind_graph(
    config: MnemeConfig, deployment_options: dict[str, dict[str, Any]] | None = None
) -> Application:
    """Router -> (Embedder, VectorSearch, Generator), each given its typed config.

    `deployment_options` maps a deployment name to `.options(...)` overrides (what a YAML's
    `deployments:` section does for `serve run`), for tests and benchmarks built in Python.
    """
    options = deployment_options or {}

    def node(deployment: Deployment) -> Deployment:
        return (
            deployment.options(**options[deployment.name])
            if deployment.name in options
            else (deployment)
        )

    return node(Router).bind(
        config,
        node(Embedder).bind(config.embedder),
        node(VectorSearch).bind(config.vector_search),
        node(Generator).bind(config.generator),
    )


def build_app(args: dict[str, Any] | None = None) -> Application:
    """`import_path: graphs.app:build_app` in a Serve YAML; `args` is the config's `args:`."""
    return bind_graph(load_config(args))
