"""TLS and user/password authentication to etcd, against real servers that demand them.

Each test runs over both etcd APIs. Certificates are made by the test (tests/support/certs.py);
auth is switched on through etcd's own API, as an operator would with etcdctl.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path

import pytest

from etcd_rdzv.cli import main
from etcd_rdzv.status import EXIT_ETCD, EXIT_OK
from etcd_rdzv_devtools.local_etcd import LocalEtcd, ServerTls, free_loopback_ports
from tests.conftest import EtcdFactory, only_etcd_api
from tests.support.certs import Certificates, client_certificate, make_certificates
from tests.support.harness import ParticipantGroup, check_membership

BACKEND = "etcd-rdzv"
FAST = {"last_call_timeout": "1", "keep_alive_ttl": "2", "timeout": "30", "request_timeout": "3"}
PASSWORD = "s3cret-Pa55word"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def foreign_certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """From another CA: the server trusts none of them, and they do not vouch for the server."""
    return make_certificates(tmp_path_factory.mktemp("foreign-certs"), name="foreign")


@pytest.fixture
def tls_etcd(etcd_factory: EtcdFactory, certificates: Certificates) -> LocalEtcd:
    """An etcd that speaks only TLS and demands a client certificate signed by its CA."""
    return etcd_factory(
        tls=ServerTls(
            cacert=certificates.cacert,
            cert=certificates.server_cert,
            key=certificates.server_key,
            client_cert=certificates.client_cert,
            client_key=certificates.client_key,
            client_cert_auth=True,
        )
    )


def tls_conf(cacert: Path, cert: Path | None = None, key: Path | None = None) -> dict[str, str]:
    files = {"cacert": cacert, "cert": cert, "key": key}
    return {"protocol": "https", **{name: str(path) for name, path in files.items() if path}}


def group(tmp_path: Path, server: LocalEtcd, run_id: str, size: int, **conf: str
          ) -> ParticipantGroup:  # fmt: skip
    return ParticipantGroup(
        tmp_path / run_id, endpoint=server.endpoint, run_id=run_id, min_nodes=size,
        max_nodes=size, conf={**FAST, **conf},
    )  # fmt: skip


def refused_at_start(nodes: ParticipantGroup, **start: object) -> str:
    """The error a participant reports when its handler cannot even be created."""
    with nodes, pytest.raises(AssertionError) as failure:
        nodes.start(1, backend=BACKEND, ready_timeout=30, **start)  # type: ignore[arg-type]
    return str(failure.value)


def test_rendezvous_over_tls_with_client_certificates(
    tmp_path: Path, tls_etcd: LocalEtcd, certificates: Certificates, run_id: str
) -> None:
    conf = tls_conf(certificates.cacert, certificates.client_cert, certificates.client_key)
    with group(tmp_path, tls_etcd, run_id, 2, **conf) as nodes:
        nodes.start(2, backend=BACKEND)
        results = nodes.rendezvous_all(timeout=60)
    check_membership(results)


def test_a_server_signed_by_an_untrusted_ca_is_a_clear_error(
    tmp_path: Path,
    tls_etcd: LocalEtcd,
    certificates: Certificates,
    foreign_certificates: Certificates,
    run_id: str,
) -> None:
    conf = tls_conf(foreign_certificates.cacert, certificates.client_cert, certificates.client_key)
    message = refused_at_start(group(tmp_path, tls_etcd, run_id, 1, **conf))
    assert "EtcdRejectedError" in message
    assert "TLS handshake failed" in message and "certificate verify failed" in message
    assert tls_etcd.endpoint in message


def test_a_client_certificate_the_server_does_not_trust_is_a_clear_error(
    tmp_path: Path,
    tls_etcd: LocalEtcd,
    certificates: Certificates,
    foreign_certificates: Certificates,
    run_id: str,
) -> None:
    conf = tls_conf(
        certificates.cacert, foreign_certificates.client_cert, foreign_certificates.client_key
    )
    message = refused_at_start(group(tmp_path, tls_etcd, run_id, 1, **conf))
    assert "EtcdRejectedError" in message and "TLS" in message, message
    assert tls_etcd.endpoint in message


def enable_auth(server: LocalEtcd, api: str) -> None:
    """A `root` user with PASSWORD, auth on, and (v2) no access for anonymous clients."""
    if api == "v3":
        for command in (["user", "add", f"root:{PASSWORD}"], ["auth", "enable"]):
            subprocess.run(
                ["etcdctl", f"--endpoints={server.client_url}", *command],
                env={**os.environ, "ETCDCTL_API": "3"},
                check=True,
                capture_output=True,
                timeout=30,
            )
        return
    guest = {"role": "guest", "revoke": {"kv": {"read": ["/*"], "write": ["/*"]}}}
    for path, body in (
        ("/v2/auth/users/root", {"user": "root", "password": PASSWORD}),
        ("/v2/auth/enable", None),
        ("/v2/auth/roles/guest", guest),
    ):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{server.client_url}{path}", data=data, method="PUT")
        if path.endswith("guest"):
            request.add_header("Authorization", _basic("root", PASSWORD))
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status in (200, 201), (path, answer.status)


def _basic(user: str, password: str) -> str:
    import base64

    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def auth_etcd(etcd_factory: EtcdFactory, etcd_api: str) -> LocalEtcd:
    server = etcd_factory()
    enable_auth(server, etcd_api)
    return server


def logged_text(tmp_path: Path) -> str:
    return "\n".join(path.read_text(errors="replace") for path in tmp_path.rglob("*.log"))


def test_rendezvous_with_a_password_from_the_environment_never_logs_it(
    tmp_path: Path, auth_etcd: LocalEtcd, run_id: str
) -> None:
    trace_file = tmp_path / "traces.jsonl"
    [port] = free_loopback_ports(1)
    conf = {"username": "root", "trace_file": str(trace_file), "metrics_port": str(port)}
    with group(tmp_path, auth_etcd, run_id, 2, **conf) as nodes:
        nodes.start(1, backend=BACKEND, env={"ETCD_RDZV_PASSWORD": PASSWORD})
        nodes.start(1, backend=BACKEND, conf={"metrics_port": "0"},
                    env={"ETCD_RDZV_PASSWORD": PASSWORD})  # fmt: skip
        results = nodes.rendezvous_all(timeout=60)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            metrics = answer.read().decode()
    check_membership(results)
    assert "etcd_rdzv_phase" in metrics and PASSWORD not in metrics
    assert PASSWORD not in logged_text(tmp_path)
    assert trace_file.stat().st_size > 0 and PASSWORD not in trace_file.read_text()


def test_a_password_file_works_too(tmp_path: Path, auth_etcd: LocalEtcd, run_id: str) -> None:
    password_file = tmp_path / "etcd-password"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    conf = {"username": "root", "password_file": str(password_file)}
    with group(tmp_path, auth_etcd, run_id, 1, **conf) as nodes:
        nodes.start(1, backend=BACKEND)
        check_membership(nodes.rendezvous_all(timeout=60))


def test_a_wrong_password_is_a_clear_error_that_does_not_show_it(
    tmp_path: Path, auth_etcd: LocalEtcd, run_id: str
) -> None:
    wrong = "not-the-Pa55word"
    message = refused_at_start(
        group(tmp_path, auth_etcd, run_id, 1, username="root"),
        env={"ETCD_RDZV_PASSWORD": wrong},
    )
    assert "EtcdRejectedError" in message and auth_etcd.endpoint in message
    assert "root" in message
    assert wrong not in message and wrong not in logged_text(tmp_path)


def test_no_credentials_against_an_etcd_with_auth_is_a_clear_error(
    tmp_path: Path, auth_etcd: LocalEtcd, run_id: str
) -> None:
    message = refused_at_start(group(tmp_path, auth_etcd, run_id, 1))
    assert "EtcdRejectedError" in message and auth_etcd.endpoint in message


def test_status_reads_an_etcd_with_auth_given_the_user(
    tmp_path: Path,
    auth_etcd: LocalEtcd,
    run_id: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with group(tmp_path, auth_etcd, run_id, 1, username="root") as nodes:
        nodes.start(1, backend=BACKEND, env={"ETCD_RDZV_PASSWORD": PASSWORD})
        check_membership(nodes.rendezvous_all(timeout=60))
    status = ["status", "--endpoint", auth_etcd.endpoint, "--run-id", run_id, "--timeout", "3"]
    assert main(status) == EXIT_ETCD
    assert "authentication" in capsys.readouterr().err
    monkeypatch.setenv("ETCD_RDZV_PASSWORD", PASSWORD)
    assert main([*status, "--username", "root"]) == EXIT_OK
    assert "final" in capsys.readouterr().out


# --- client certificates together with etcd users (issue 18) -----------------------------------


@pytest.fixture
def cert_and_auth_etcd(
    etcd_factory: EtcdFactory, certificates: Certificates, tls_etcd: LocalEtcd
) -> LocalEtcd:
    """TLS only, client certificates required (`--client-cert-auth`) and etcd users on: the
    strongest setup etcd documents. Auth is switched on with etcdctl over gRPC."""
    for command in (["user", "add", f"root:{PASSWORD}"], ["auth", "enable"]):
        etcdctl(tls_etcd, certificates, *command)
    return tls_etcd


def etcdctl(server: LocalEtcd, certificates: Certificates, *command: str) -> None:
    """etcdctl over gRPC with the tests' CN client certificate (gRPC takes CNs; the gateway
    does not)."""
    tls = ["--cacert", certificates.cacert, "--cert", certificates.client_cert,
           "--key", certificates.client_key]  # fmt: skip
    subprocess.run(
        ["etcdctl", f"--endpoints={server.client_url}", *map(str, tls), *command],
        env={**os.environ, "ETCDCTL_API": "3"},
        check=True,
        capture_output=True,
        timeout=30,
    )


@only_etcd_api("v3")  # the rule is the v3 JSON gateway's; torch's v2 API has no such gateway
def test_client_certificates_with_etcd_users(
    tmp_path: Path,
    cert_and_auth_etcd: LocalEtcd,
    certificates: Certificates,
    run_id: str,
    *,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client certificate with a CN (as most PKIs issue them) gets an error that says what
    to do, in the agent and in `status`; one without a CN rendezvous."""
    (tmp_path / "certs").mkdir()
    no_cn = client_certificate(tmp_path / "certs", certificates, "no-cn", common_name=None)
    with_cn = (certificates.client_cert, certificates.client_key)
    server = cert_and_auth_etcd
    env = {"ETCD_RDZV_PASSWORD": PASSWORD}
    conf = {**tls_conf(certificates.cacert, *with_cn), "username": "root"}
    message = refused_at_start(group(tmp_path, server, run_id, 1, **conf), env=env)
    assert "EtcdRejectedError" in message and server.endpoint in message
    assert "a client certificate without a CN" in message, message
    assert "client certificates without etcd users" in message, message
    assert PASSWORD not in message

    conf = {**tls_conf(certificates.cacert, *no_cn), "username": "root"}
    with group(tmp_path, server, run_id, 2, **conf) as nodes:
        nodes.start(2, backend=BACKEND, env=env)
        check_membership(nodes.rendezvous_all(timeout=60))

    monkeypatch.setenv("ETCD_RDZV_PASSWORD", PASSWORD)
    status = ["status", "--endpoint", server.endpoint, "--run-id", run_id, "--timeout", "3",
              "--protocol", "https", "--cacert", str(certificates.cacert),
              "--username", "root"]  # fmt: skip
    capsys.readouterr()
    cn_files = ["--cert", str(with_cn[0]), "--key", str(with_cn[1])]
    assert main([*status, *cn_files]) == EXIT_ETCD
    assert "a client certificate without a CN" in capsys.readouterr().err
    assert main([*status, "--cert", str(no_cn[0]), "--key", str(no_cn[1])]) == EXIT_OK
    assert "final" in capsys.readouterr().out

    # Without credentials, etcd-rdzv's requests are not judged as the server certificate's
    # identity, even where its CN is an etcd user with the root role: they carry the Accept
    # header by which etcd tells gateway requests (without it, this status read the run).
    server_cn = "test-server"  # tests/support/certs.py: the server certificate's CN
    etcdctl(server, certificates, "--user", f"root:{PASSWORD}", "user", "add", f"{server_cn}:x")
    etcdctl(server, certificates, "--user", f"root:{PASSWORD}", "user", "grant-role",
            server_cn, "root")  # fmt: skip
    monkeypatch.delenv("ETCD_RDZV_PASSWORD")
    anonymous = [arg for arg in status if arg not in ("--username", "root")]
    assert main([*anonymous, "--cert", str(no_cn[0]), "--key", str(no_cn[1])]) == EXIT_ETCD
    assert "etcd requires authentication" in capsys.readouterr().err


def test_plain_http_to_an_etcd_that_serves_tls_suggests_https(
    tmp_path: Path, tls_etcd: LocalEtcd, run_id: str
) -> None:
    message = refused_at_start(group(tmp_path, tls_etcd, run_id, 1, request_timeout="1"))
    assert "EtcdUnavailableError" in message and tls_etcd.endpoint in message
    assert "closed without a reply" in message and "protocol=https" in message, message
    assert "Check that etcd is running" not in message


def test_no_client_certificate_for_an_etcd_that_requires_one_is_said(
    tmp_path: Path, tls_etcd: LocalEtcd, certificates: Certificates, run_id: str
) -> None:
    message = refused_at_start(
        group(tmp_path, tls_etcd, run_id, 1, **tls_conf(certificates.cacert))
    )
    assert "EtcdRejectedError" in message and "TLS handshake failed" in message
    assert "may require a client certificate" in message, message
