import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from graphs.naive import naive_config
from graphs.serve_env import (
    SERVE_ENV,
    apply,
    direct_ingress_env,
    for_ray_processes,
    haproxy_env,
)
from graphs.serve_yaml import read_serve_yaml
from graphs.validate import main as validate_main
from graphs.validate import validate_file
from mneme.config import MnemeConfig, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_the_embedded_cpu_graph():
    config = load_config({})
    assert config.embedder.batch.max_batch_size == 32
    assert config.embedder.batch.batch_wait_timeout_s == 0.05
    assert config.limits.max_text_chars == 8192
    assert config.limits.max_items_per_request == 256
    assert config.limits.max_request_body_bytes == 4 * 1024 * 1024
    assert Path(config.embedder.resolved_model_path(), "config.json").exists()


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"embeder": {}}, "args.embeder"),
        ({"embedder": {"batch": {"max_batch_size": 0}}}, "args.embedder.batch.max_batch_size"),
        ({"limits": {"max_top_k": "many"}}, "args.limits.max_top_k"),
        ({"generator": {"gpu_memory_utilization": 1.5}}, "args.generator.gpu_memory_utilization"),
        ({"generator": {"engine_kwargs": {"max_num_seqs": 8}}}, "args.generator.engine_kwargs"),
        ({"generator": {"kv_cache_mib": 0}}, "args.generator.kv_cache_mib"),
        (
            {"generator": {"engine_kwargs": {"kv_cache_memory_bytes": 1}}},
            "args.generator.engine_kwargs",
        ),
        ({"scheduler": {"capacity": {"embedder": 0}}}, "args.scheduler.capacity.embedder"),
        ({"auth": {"keys": [{"name": "a", "key": "x" + " " * 15}]}}, "args.auth.keys.0"),
        (  # the log in Redis without data_dir would be ignored: memories lost on restart
            {"vector_search": {"storage": {"data_dir": None, "redis_url": "redis://h:6379/1"}}},
            "args.vector_search.storage: Value error, redis_url",
        ),
        # defaults a request gets by omitting the field must pass the limits
        ({"limits": {"max_top_k": 4}}, "limits.max_top_k (4)"),
        ({"limits": {"max_tokens": 32}}, "generator.default_max_tokens (64)"),
    ],
)
def test_a_bad_field_is_named(args, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        load_config(args)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    assert validate_file(path) == []


def test_validate_cli_fails_on_a_typo_naming_the_field(tmp_path, capsys):
    raw = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    raw["applications"][0]["args"]["limits"]["max_topk"] = 5
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    assert validate_main([str(bad)]) == 1
    assert "args.limits.max_topk" in capsys.readouterr().err
    assert validate_main([str(ROOT / "configs" / "local.yaml")]) == 0


def local_yaml_changed(change) -> dict:
    raw = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    change(raw["applications"][0], {d["name"]: d for d in raw["applications"][0]["deployments"]})
    return raw


def set_in(mapping: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for key in parents:
        mapping = mapping.setdefault(key, {})
    mapping[last] = value


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (  # Serve takes the dotted form too: the args are still validated
            lambda app, _: (
                app.update(import_path="graphs.app.build_app"),
                set_in(app, "args.limits.max_topk", 5),
            ),
            r"args\.limits\.max_topk",
        ),
        (lambda app, by: by["Embedder"].update(name="Embeder"), "no deployment named"),
        (lambda app, by: by["Generator"].update(user_config={"x": 1}), "takes no user_config"),
        (
            lambda app, _: set_in(app, "args.embedder.batch.max_batch_size", 8),
            r"sets \[.max_batch_size.\] otherwise than args\.embedder\.batch",
        ),
        (  # each replica would keep its own memories: writes split between them
            lambda app, by: (
                set_in(app, "args.vector_search.storage.data_dir", None),
                by["VectorSearch"].update(num_replicas=2),
            ),
            r"data_dir is null .* must keep one replica",
        ),
        (
            lambda app, by: (
                set_in(app, "args.vector_search.storage.data_dir", None),
                by["VectorSearch"].pop("num_replicas"),
                by["VectorSearch"].update(
                    autoscaling_config={"min_replicas": 1, "max_replicas": 3}
                ),
            ),
            r"data_dir is null .* must keep one replica",
        ),
    ],
    ids=[
        "dotted-import-path",
        "deployment-typo",
        "generator-user-config",
        "batch-twice",
        "memory-only-search-replicas",
        "memory-only-search-autoscaled",
    ],
)
def test_validate_refuses_what_serve_run_would_ignore_or_fail_on(tmp_path, change, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(local_yaml_changed(change)))
    [error] = validate_file(bad)
    assert re.search(message, error), error


def test_batch_knobs_split_between_args_and_user_config_are_fine(tmp_path):
    """A replica lays its user_config over the args' batch: knobs set in one place only
    both apply (the shipped user_config sets the size and window; the args, adaptivity)."""
    config = tmp_path / "split.yaml"

    def change(app, by_name):
        set_in(app, "args.embedder.batch.adaptive", False)
        by_name["Embedder"]["user_config"]["max_batch_size"] = 16  # not the default

    config.write_text(yaml.safe_dump(local_yaml_changed(change)))
    assert validate_file(config) == []


def test_the_naive_graph_takes_no_batch_user_config(tmp_path):
    raw = yaml.safe_load((ROOT / "configs" / "naive.yaml").read_text())
    [embedder] = [d for d in raw["applications"][0]["deployments"] if d["name"] == "Embedder"]
    embedder["user_config"] = {"max_batch_size": 32}
    bad = tmp_path / "naive.yaml"
    bad.write_text(yaml.safe_dump(raw))
    [error] = validate_file(bad)
    assert "batching is off by design" in error


def test_build_app_rejects_bad_args_before_deploying():
    from graphs.app import build_app

    with pytest.raises(ValueError, match=r"args\.vector_search\.metric"):
        build_app({"vector_search": {"metric": "l2"}})


def test_engine_kwargs_may_not_repeat_what_the_generator_passes_vllm():
    """The list the config refuses is the Generator's own call, keyword for keyword."""
    import ast

    from mneme.config import ENGINE_ARGS_SET_BY_THE_GENERATOR

    tree = ast.parse((ROOT / "deployments" / "generator.py").read_text())
    [call] = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "AsyncEngineArgs"
    ]
    passed = {keyword.arg for keyword in call.keywords if keyword.arg is not None}
    assert passed == ENGINE_ARGS_SET_BY_THE_GENERATOR


def test_a_router_user_config_whose_auth_is_not_a_mapping_is_refused_by_name():
    from mneme.config import AuthConfig, parse_router_user_config
    from mneme.errors import InvalidRequest

    for auth in ([1], "x"):
        with pytest.raises(InvalidRequest, match="user_config.auth must be a mapping"):
            parse_router_user_config({"auth": auth}, AuthConfig())


def test_config_is_frozen():
    config = MnemeConfig()
    with pytest.raises(ValidationError):
        config.limits.max_top_k = 5  # type: ignore[misc]


def test_naive_config_switches_compute_awareness_off_whatever_the_args_say():
    [app] = read_serve_yaml(ROOT / "configs" / "naive.yaml")
    config = app.config
    assert config.cache.enabled is False and config.scheduler.policy == "fifo"
    assert config.embedder.batch.max_batch_size == 1 and not config.embedder.batch.adaptive
    assert config.vector_search.batch.max_batch_size == 1
    assert config.generator.max_num_seqs == 1
    forced = naive_config({"cache": {"enabled": True}, "generator": {"max_model_len": 256}})
    assert forced.cache.enabled is False and forced.generator.max_model_len == 256


def test_naive_yaml_uses_the_same_replicas_as_the_local_default():
    [local] = read_serve_yaml(ROOT / "configs" / "local.yaml")
    [naive] = read_serve_yaml(ROOT / "configs" / "naive.yaml")
    for name, options in local.deployment_options.items():
        for knob in ("num_replicas", "max_ongoing_requests", "ray_actor_options"):
            assert naive.deployment_options[name][knob] == options[knob], (name, knob)


def kuberay_service() -> dict:
    """The RayService document of the KubeRay manifest."""
    docs = [d for d in yaml.safe_load_all((ROOT / "configs/kuberay/rayservice.yaml").open()) if d]
    [service] = [d for d in docs if d["kind"] == "RayService"]
    return service


def test_the_kuberay_manifest_embeds_cluster_yaml_verbatim():
    service = kuberay_service()
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert embedded == yaml.safe_load((ROOT / "configs/cluster.yaml").read_text())


INGRESS_ENV = {
    "proxy": ([], {}),
    "direct-ingress": (["DIRECT_INGRESS=1"], direct_ingress_env(8100, 100)),
    "haproxy": (["HAPROXY=1"], haproxy_env(8100, 100)),
}


@pytest.mark.parametrize("ingress", list(INGRESS_ENV))
def test_make_run_exports_the_serve_environment(ingress):
    """The environment `make run` (and `DIRECT_INGRESS=1` or `HAPROXY=1 make run`) gives
    `serve run` is SERVE_ENV (the body limit at the proxy, handlers on the replicas' own
    loops), plus the direct-ingress settings with ports 8100-8200, and HAProxy's, when asked."""
    flags, expected = INGRESS_ENV[ingress]
    printed = subprocess.run(
        ["make", "-n", "run", *flags], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    subprocess.run(["sh", "-n"], input=printed, text=True, check=True)  # valid shell
    printed = printed.replace("\\\n", " ")
    [line] = [line for line in printed.splitlines() if "/serve run" in line]
    checked, command = line.split("&&")  # the config is checked first, its limit read
    assert "graphs.validate --local --print-body-limit configs/local.yaml" in checked
    env = dict(word.split("=", 1) for word in command.split() if "=" in word)
    assert env == SERVE_ENV | expected | {"MNEME_MAX_REQUEST_BODY_BYTES": "$limit"}


def test_validate_prints_the_body_limit_the_proxy_needs_and_checks_local_models(tmp_path, capsys):
    def change(app, by_name):
        set_in(app, "args.limits.max_request_body_bytes", 16 * 2**20)

    bigger = tmp_path / "bigger.yaml"
    bigger.write_text(yaml.safe_dump(local_yaml_changed(change)))
    assert validate_main(["--local", "--print-body-limit", str(bigger)]) == 0
    assert capsys.readouterr().out.strip() == str(16 * 2**20)  # stdout: the number alone

    def elsewhere(app, by_name):
        set_in(app, "args.generator.model_path", str(tmp_path / "no-model"))

    moved = tmp_path / "moved.yaml"
    moved.write_text(yaml.safe_dump(local_yaml_changed(elsewhere)))
    assert validate_file(moved) == []  # for a cluster the folder is on its nodes
    [error] = validate_file(moved, local=True)
    assert "generator.model_path" in error and "config.json" in error
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"applications": [{"name": "x", "import_path": "a.b:c"}]}))
    [error] = validate_file(other)
    assert "no Mneme application" in error


def test_only_ray_pods_may_reach_the_kuberay_redis():
    docs = [d for d in yaml.safe_load_all((ROOT / "configs/kuberay/rayservice.yaml").open()) if d]
    [redis] = [d for d in docs if d["kind"] == "StatefulSet"]
    labels = redis["spec"]["template"]["metadata"]["labels"]
    policies = [
        d["spec"]
        for d in docs
        if d["kind"] == "NetworkPolicy"
        and d["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    ]
    assert policies, "no NetworkPolicy selects the Redis pods"
    [rule] = [rule for policy in policies for rule in policy["ingress"]]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"ray.io/is-ray-node": "yes"}}}]


def test_every_kuberay_container_sets_the_serve_environment():
    cluster = kuberay_service()["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for pod in pods:
        for container in pod["template"]["spec"]["containers"]:
            assert {e["name"]: e["value"] for e in container["env"]} == SERVE_ENV


def test_serve_env_leaves_what_the_caller_set_and_only_lasts_for_ray_init(monkeypatch):
    environ = apply({"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1"})
    assert environ["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "1"
    assert environ["RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"] == "0"
    monkeypatch.delenv("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", raising=False)
    with for_ray_processes():
        assert os.environ["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"
    assert "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD" not in os.environ


def test_cluster_yaml_autoscales_every_deployment_and_shares_its_state():
    [app] = read_serve_yaml(ROOT / "configs" / "cluster.yaml")
    for name in ("Router", "Embedder", "VectorSearch", "Generator"):
        scaling = app.deployment_options[name]["autoscaling_config"]
        assert scaling["min_replicas"] >= 1 and scaling["max_replicas"] > scaling["min_replicas"]
        assert scaling["downscale_delay_s"] > scaling["upscale_delay_s"], name
    config = app.config
    # replicas on several nodes must share the memory log and the L2 cache
    assert config.vector_search.storage.redis_url and config.cache.redis_url
    assert config.auth.keys, "an exposed cluster config must require API keys"


def test_a_model_path_pointed_elsewhere_under_the_same_name_shares_no_cached_result():
    """The cache actors and Redis outlive a redeploy: a new model under the default name
    must not be served the old model's vectors or generations."""
    from cache.keys import embedding_key
    from deployments.compute import ComputeGraph

    base = MnemeConfig()
    moved = base.model_copy(
        update={
            "embedder": base.embedder.model_copy(update={"model_path": "/models/bge-small"}),
            "generator": base.generator.model_copy(update={"model_path": "/models/qwen"}),
        }
    )
    assert moved.embedder.model_name == base.embedder.model_name
    graphs = [ComputeGraph(c, None) for c in (base, moved)]
    ids = [graph.embedding_cache_id for graph in graphs]
    assert embedding_key(ids[0], "a text") != embedding_key(ids[1], "a text")
    assert base.generator.cache_id() != moved.generator.cache_id()
    # an answer depends on both models: either one moved keys it apart
    answers = {
        ComputeGraph(c, None).answer_key("ns", ["a question", 5]).base
        for c in (base, moved, only_llm(base))
    }
    assert len(answers) == 3


def only_llm(config: MnemeConfig) -> MnemeConfig:
    generator = config.generator.model_copy(update={"model_path": "/models/qwen"})
    return config.model_copy(update={"generator": generator})
