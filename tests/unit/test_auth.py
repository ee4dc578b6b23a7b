import pytest

from mneme.auth import KeyRing
from mneme.config import AuthConfig, load_config, parse_router_user_config
from mneme.errors import Forbidden, InvalidRequest, Unauthorized
from mneme.priority import Priority

ADMIN = "admin-key-0123456789"
AGENT = "agent-key-0123456789"


def keyring(environ=None) -> KeyRing:
    config = AuthConfig.model_validate(
        {
            "keys": [
                {"name": "admin", "key": ADMIN},
                {
                    "name": "agents",
                    "key_env": "AGENT_KEY",
                    "namespaces": ["agent-*", "shared"],
                    "max_priority": "high",
                },
                {"name": "batch", "key": "batch-key-0123456789", "max_priority": "low"},
            ]
        }
    )
    return KeyRing(config, environ={"AGENT_KEY": AGENT} if environ is None else environ)


def test_no_keys_lets_everything_through():
    ring = KeyRing(AuthConfig())
    assert not ring.enabled
    assert ring.authenticate(None) is None
    assert ring.authenticate("Bearer whatever") is None


@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Bearer   ", f"Basic {ADMIN}", "Bearer wrong-key-0123456789"]
)
def test_a_missing_or_unknown_key_is_401(header):
    with pytest.raises(Unauthorized) as err:
        keyring().authenticate(header)
    assert err.value.status_code == 401
    assert err.value.headers["WWW-Authenticate"].startswith("Bearer")
    assert ADMIN not in err.value.message and AGENT not in err.value.message


def test_keys_from_config_and_environment():
    ring = keyring()
    assert ring.authenticate(f"Bearer {ADMIN}").name == "admin"
    assert ring.authenticate(f"bearer  {AGENT} ").name == "agents"


def test_a_key_env_that_is_not_set_fails_at_start_naming_it():
    with pytest.raises(ValueError, match=r"auth\.keys\[1\]\.key_env.*AGENT_KEY"):
        keyring(environ={})


def test_namespaces_are_shell_patterns():
    agents = keyring().authenticate(f"Bearer {AGENT}")
    agents.check_namespace("agent-7")
    agents.check_namespace("shared")
    for namespace in ("agent", "shared2", "other", "AGENT-7"):
        with pytest.raises(Forbidden) as err:
            agents.check_namespace(namespace)
        assert err.value.status_code == 403 and err.value.code == "namespace_forbidden"


def test_priority_ceiling():
    ring = keyring()
    agents = ring.authenticate(f"Bearer {AGENT}")
    assert agents.priority(None, "priority") is Priority.NORMAL
    assert agents.priority(Priority.HIGH, "priority") is Priority.HIGH
    assert agents.priority(Priority.BACKGROUND, "priority") is Priority.BACKGROUND
    with pytest.raises(Forbidden, match="critical") as err:
        agents.priority(Priority.CRITICAL, "X-Priority")
    assert err.value.param == "X-Priority" and err.value.code == "priority_forbidden"
    # a key capped below normal gets its ceiling by default, not a 403
    batch = ring.authenticate("Bearer batch-key-0123456789")
    assert batch.priority(None, "priority") is Priority.LOW


@pytest.mark.parametrize(
    ("keys", "field"),
    [
        ([{"name": "a"}], "exactly one of key or key_env"),
        ([{"name": "a", "key": "k" * 20, "key_env": "X"}], "exactly one of key or key_env"),
        ([{"name": "a", "key": "short"}], "at least 16"),
        ([{"name": "a", "key_env": "X", "max_priority": "urgent"}], "max_priority"),
        ([{"name": "a", "key_env": "X"}, {"name": "a", "key_env": "Y"}], "unique"),
        ([{"name": "a", "key_env": "X", "namespaces": []}], "namespaces"),
    ],
)
def test_bad_key_configs_fail_at_build_naming_the_field(keys, field):
    with pytest.raises(ValueError, match=field):
        load_config({"auth": {"keys": keys}})


def test_the_key_never_shows_in_the_config():
    config = load_config({"auth": {"keys": [{"name": "a", "key": ADMIN}]}})
    assert ADMIN not in repr(config) and ADMIN not in config.model_dump_json()


@pytest.mark.parametrize(
    "keys",
    [
        [{"key": ADMIN}],  # name forgotten
        [{"name": "a", "key": ADMIN, "key_env": "X"}],
        [{"name": "a", "key": ADMIN}, {"name": "a", "key": ADMIN[::-1]}],
    ],
    ids=["no-name", "key-and-key_env", "same-name"],
)
def test_a_refused_key_config_never_quotes_the_key(keys):
    """pydantic's message quotes the input it refused: a rotation's mistake would print the
    key into the replica's and the controller's logs."""
    with pytest.raises(InvalidRequest) as rotation:
        parse_router_user_config({"auth": {"keys": keys}}, AuthConfig())
    with pytest.raises(ValueError) as build:
        load_config({"auth": {"keys": keys}})
    for message in (rotation.value.message, str(build.value)):
        assert "user_config.auth.keys" in message or "args.auth.keys" in message
        assert ADMIN[4:20] not in message and ADMIN[::-1][4:20] not in message


def test_router_user_config_replaces_the_args_keys():
    default = AuthConfig()
    assert parse_router_user_config(None, default) is default
    assert parse_router_user_config({}, default) is default
    rotated = parse_router_user_config({"auth": {"keys": [{"name": "a", "key": ADMIN}]}}, default)
    assert [k.name for k in rotated.keys] == ["a"]
    with pytest.raises(InvalidRequest, match="max_batch_size"):
        parse_router_user_config({"max_batch_size": 3}, default)
    with pytest.raises(InvalidRequest, match="user_config.auth"):
        parse_router_user_config({"auth": {"keys": [{"name": "a"}]}}, default)


def test_rotation_merges_over_the_args_and_never_turns_keys_off_by_accident():
    args = AuthConfig.model_validate({"keys": [{"name": "a", "key": ADMIN}]})
    paths_only = parse_router_user_config(
        {"auth": {"public_paths": ["/healthz", "/metrics"]}}, args
    )
    assert [k.name for k in paths_only.keys] == ["a"] and "/metrics" in paths_only.public_paths
    for off in ({"auth": {"keys": []}}, {"auth": {"keys": [], "public_paths": ["/healthz"]}}):
        with pytest.raises(InvalidRequest, match="disable: true"):
            parse_router_user_config(off, args)
    off = parse_router_user_config({"auth": {"keys": [], "disable": True}}, args)
    assert off.keys == [] and not KeyRing(off).enabled
    assert parse_router_user_config({"auth": None}, args) is args  # back to the args' keys


def test_env_keys_are_stripped_checked_for_length_and_never_shared():
    config = AuthConfig.model_validate({"keys": [{"name": "a", "key_env": "K"}]})
    ring = KeyRing(config, environ={"K": AGENT + "\n"})  # as a Secret file mounts it
    assert ring.authenticate(f"Bearer {AGENT}").name == "a"
    with pytest.raises(ValueError, match="shorter than 16"):
        KeyRing(config, environ={"K": "x"})
    twice = AuthConfig.model_validate(
        {"keys": [{"name": "wide", "key": ADMIN}, {"name": "narrow", "key_env": "K"}]}
    )
    with pytest.raises(ValueError, match=r"keys\[1\]: the same token"):
        KeyRing(twice, environ={"K": ADMIN})


def test_public_paths_are_matched_inside_the_route_prefix():
    from deployments.api_keys import route_path

    assert route_path({"path": "/mneme/healthz", "root_path": "/mneme"}) == "/healthz"
    assert route_path({"path": "/healthz", "root_path": ""}) == "/healthz"
    assert keyring().is_public(route_path({"path": "/mneme/healthz", "root_path": "/mneme"}))
