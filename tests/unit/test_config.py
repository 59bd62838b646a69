"""Config parsing and validation: every bad input is a clear ConfigurationError."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
from torch.distributed.elastic.rendezvous import RendezvousParameters

from etcd_rdzv.config import EtcdEndpoint, RendezvousConfig, parse_endpoints
from etcd_rdzv.errors import ConfigurationError


def config_of(
    endpoint: str = "127.0.0.1:2379", environ: dict[str, str] | None = None, **conf: Any
) -> RendezvousConfig:
    params = RendezvousParameters(
        backend="etcd-rdzv", endpoint=endpoint, run_id="job1", min_nodes=2, max_nodes=4, **conf
    )
    return RendezvousConfig.from_parameters(params, {} if environ is None else environ)


def test_defaults_match_torch_etcd_backend() -> None:
    config = config_of()
    assert config.prefix == "/torchelastic/p2p"
    assert config.timeout == 600
    assert config.last_call_timeout == 30
    assert config.run_path == "/torchelastic/p2p/run_job1"
    assert (config.ttls.setup, config.ttls.joinable, config.ttls.frozen) == (5, 10, 10)
    assert config.ttls.keep_alive == 10


def test_etcd_api_is_v3_unless_v2_is_asked_for() -> None:
    assert config_of().etcd_api == "v3"
    assert config_of(etcd_api="v2").etcd_api == "v2"
    assert config_of(environ={"ETCD_RDZV_ETCD_API": "v2"}).etcd_api == "v2"
    # --rdzv-conf wins over the environment, as for every other setting.
    assert config_of(environ={"ETCD_RDZV_ETCD_API": "v2"}, etcd_api="v3").etcd_api == "v3"


def test_unknown_etcd_api_is_rejected_with_the_choices() -> None:
    with pytest.raises(ConfigurationError, match=r"etcd_api='v4': use 'v3'.*or 'v2'"):
        config_of(etcd_api="v4")


def test_the_protocol_ttls_follow_the_keep_alive_ttl() -> None:
    # torch's proportions: the default keep-alive of 10 s gives torch's 5/10/10 s exactly.
    default = config_of().ttls
    assert (default.setup, default.joinable, default.frozen, default.keep_alive) == (5, 10, 10, 10)
    short = config_of(keep_alive_ttl="2").ttls
    assert (short.setup, short.joinable, short.frozen, short.keep_alive) == (1, 2, 2, 2)
    assert short.run == default.run == 7200


def test_rdzv_conf_values_arrive_as_strings() -> None:
    config = config_of(timeout="120", last_call_timeout="2.5", keep_alive_ttl="3")
    assert (config.timeout, config.last_call_timeout, config.ttls.keep_alive) == (120, 2.5, 3)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("etcd-a", (EtcdEndpoint("etcd-a", 2379),)),
        ("10.0.0.1:2479", (EtcdEndpoint("10.0.0.1", 2479),)),
        ("a:1, b:2,c", (EtcdEndpoint("a", 1), EtcdEndpoint("b", 2), EtcdEndpoint("c", 2379))),
        ("[::1]:2379", (EtcdEndpoint("::1", 2379),)),
    ],
)
def test_endpoints_parse(text: str, expected: tuple[EtcdEndpoint, ...]) -> None:
    assert parse_endpoints(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "No etcd endpoint"),
        ("host:", "Malformed"),
        ("host:abc", "Malformed"),
        ("host:99999", "not in 1..65535"),
        ("a:1,,b:2", "Malformed"),
        ("http://host:2379", "without a scheme"),
        ("::1:2379", "Malformed"),
    ],
)
def test_bad_endpoints_are_named(text: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_endpoints(text)


def test_min_greater_than_max_is_rejected() -> None:
    endpoints = parse_endpoints("h:1")
    with pytest.raises(
        ConfigurationError, match=r"max_nodes \(2\) is smaller than min_nodes \(3\)"
    ):
        RendezvousConfig(run_id="r", endpoints=endpoints, min_nodes=3, max_nodes=2)


@pytest.mark.parametrize(
    "key", ["timeout", "last_call_timeout", "keep_alive_ttl", "request_timeout"]
)
@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_non_positive_or_non_numeric_seconds_are_rejected(key: str, value: str) -> None:
    conf: dict[str, Any] = {key: value}
    with pytest.raises(ConfigurationError, match=key):
        config_of(**conf)


@pytest.mark.parametrize("run_id", ["", "a/b", "has space", "x" * 129])
def test_run_ids_that_could_escape_their_namespace_are_rejected(run_id: str) -> None:
    with pytest.raises(ConfigurationError, match="Run id"):
        RendezvousConfig(run_id=run_id, endpoints=parse_endpoints("h"), min_nodes=1, max_nodes=1)


def test_prefix_is_normalized() -> None:
    assert config_of(etcd_prefix="custom/prefix/").prefix == "/custom/prefix"
    assert config_of(etcd_prefix="/").run_path == "/run_job1"


def test_protocol_must_be_http_or_https() -> None:
    with pytest.raises(ConfigurationError, match="protocol='ftp'"):
        config_of(protocol="ftp")


def test_missing_tls_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigurationError, match=f"cacert={missing}: no such file"):
        config_of(protocol="https", cacert=str(missing))


def test_tls_files_with_http_ask_for_https(tmp_path: Path) -> None:
    cacert = tmp_path / "ca.pem"
    cacert.write_text("x")
    with pytest.raises(ConfigurationError, match="protocol=https"):
        config_of(cacert=str(cacert))


def test_garbage_ca_certificate_is_rejected(tmp_path: Path) -> None:
    cacert = tmp_path / "ca.pem"
    cacert.write_text("not a certificate")
    with pytest.raises(ConfigurationError, match="not a PEM CA certificate"):
        config_of(protocol="https", cacert=str(cacert))


def test_key_without_certificate_is_rejected(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("x")
    with pytest.raises(ConfigurationError, match="needs its certificate"):
        config_of(protocol="https", key=str(key))


def test_mismatched_certificate_and_key_are_rejected(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path, "a")
    _, other_key = _self_signed(tmp_path, "b")
    assert config_of(protocol="https", cert=str(cert), key=str(key)).tls.cert == cert
    with pytest.raises(ConfigurationError, match="not a matching PEM certificate"):
        config_of(protocol="https", cert=str(cert), key=str(other_key))


def test_unknown_keys_are_reported_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    config_of(tiemout="5", rank="0")
    assert "tiemout" in caplog.text
    assert "rank" not in caplog.text.split("ignores these --rdzv-conf keys:")[1].split("(")[0]


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    ssl.create_default_context().load_cert_chain(str(cert), str(key))
    return cert, key


def test_credentials_come_from_the_environment_or_a_file_never_the_command_line(
    tmp_path: Path,
) -> None:
    assert config_of().credentials is None
    from_env = config_of(environ={"ETCD_RDZV_PASSWORD": "pw"}, username="trainer")
    assert from_env.credentials is not None
    assert (from_env.credentials.username, from_env.credentials.password) == ("trainer", "pw")
    password_file = tmp_path / "password"
    password_file.write_text("from-file\n")
    from_file = config_of(username="trainer", password_file=str(password_file))
    assert from_file.credentials is not None and from_file.credentials.password == "from-file"
    with pytest.raises(ConfigurationError, match="ETCD_RDZV_PASSWORD"):
        config_of(username="trainer", password="on-the-command-line")


def test_a_password_never_shows_in_the_config_repr() -> None:
    config = config_of(environ={"ETCD_RDZV_PASSWORD": "hunter2-secret"}, username="trainer")
    assert "hunter2-secret" not in repr(config)
    assert "trainer" in repr(config)


@pytest.mark.parametrize(
    ("conf", "environ", "message"),
    [
        ({"username": "trainer"}, {}, "has no password"),
        ({}, {"ETCD_RDZV_PASSWORD": "pw"}, "no user"),
        ({"username": "trainer", "password_file": "/no/such/file"}, {}, "cannot read"),
    ],
)
def test_incomplete_credentials_are_named(
    conf: dict[str, str], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        config_of(environ=environ, **conf)


@pytest.mark.parametrize("name", ["cacert", "cert"])
def test_a_file_that_is_no_pem_is_named_without_a_stray_none(tmp_path: Path, name: str) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("garbage\n")
    files: dict[str, Any] = {name: str(garbage)}
    with pytest.raises(ConfigurationError) as refused:
        config_of(protocol="https", **files)
    message = str(refused.value)
    assert f"{name}={garbage}" in message and "(None)" not in message, message
    assert "_ssl.c" not in message, message


def test_a_password_in_rdzv_conf_is_refused_without_a_warning_first(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(ConfigurationError, match="would show the password"):
        config_of(username="trainer", password="on-the-command-line")
    assert "ignores these --rdzv-conf keys" not in caplog.text
    assert "on-the-command-line" not in caplog.text
