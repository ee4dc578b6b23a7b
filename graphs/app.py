"""Builds the Mneme application from the YAML `args` (validated once, here)."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.embedder import Embedder
from deployments.generator import Generator
from deployments.router import Router
from deployments.vector_search import VectorSearch
from mneme.config import MnemeConfig, load_config


def bind_graph(config: MnemeConfig) -> Application:
    """Router -> (Embedder, VectorSearch, Generator), each given its typed config."""
    return Router.bind(
        config,
        Embedder.bind(config.embedder),
        VectorSearch.bind(config.vector_search),
        Generator.bind(config.generator),
    )


def build_app(args: dict[str, Any] | None = None) -> Application:
    """`import_path: graphs.app:build_app` in a Serve YAML; `args` is the config's `args:`."""
    return bind_graph(load_config(args))
