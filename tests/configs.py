"""Configs the tests share."""

from mneme.config import StorageConfig, VectorSearchConfig

# A VectorSearch that keeps its memories in memory only: never the repo's `.data`, which
# `VectorSearchConfig()` would write to (the default of `make run`).
IN_MEMORY_SEARCH = VectorSearchConfig(storage=StorageConfig(data_dir=None))
