"""Stop an application's cache actors, so that its next deploy starts them with its config.

The cache actors are detached and named: they outlive `serve shutdown` and Router restarts,
and keep the settings they started with (sizes, TTLs, `redis_url`, the shard count). To
apply new ones on a long-lived cluster:

    serve shutdown -y && python -m cache.reset --app mneme && serve deploy configs/cluster.yaml

It refuses while the application is deployed: its Routers hold the actors, and without them
every write would fail to invalidate its namespace's cached results (a 503). Whatever the
actors held is dropped (L2 in Redis stays, but the next actors start a new version epoch, so
none of it is served for a namespace again; embeddings are content-addressed and are).
"""

from __future__ import annotations

import argparse
import sys

import ray

from cache.client import cache_actors


def deployed(app_name: str) -> bool:
    from ray import serve

    return app_name in serve.status().applications


def reset(app_name: str) -> list[str]:
    """Kills `app_name`'s cache actors (for good: no restart); returns their names."""
    if deployed(app_name):
        raise RuntimeError(
            f"application {app_name!r} is deployed: its Routers use these cache actors. "
            "Run `serve shutdown` (or deploy a config without it) first."
        )
    killed = []
    for _, name, namespace in cache_actors(app_name):
        try:
            actor = ray.get_actor(name, namespace=namespace)
        except ValueError:  # gone since it was listed
            continue
        ray.kill(actor, no_restart=True)
        killed.append(name)
    return killed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cache.reset", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--app", default="mneme", help="Serve application name (default mneme)")
    parser.add_argument("--address", default="auto", help="Ray cluster address (default auto)")
    args = parser.parse_args(argv)
    ray.init(address=args.address, log_to_driver=False, logging_level="WARNING")
    try:
        killed = reset(args.app)
    except RuntimeError as exc:
        print(f"cache.reset: {exc}", file=sys.stderr)
        return 1
    print(f"stopped {len(killed)} cache actor(s) of {args.app!r}: {', '.join(killed) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
