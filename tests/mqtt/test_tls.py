"""TLS with client certificates against a real mosquitto, with certificates made here."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.config import ConfigError, parse_config
from edge_agent.mqtt.client import MqttClient, MqttClientError
from edge_agent.mqtt.transport import MqttTransport, build_tls_context
from tests.broker import Broker, free_port
from tests.conftest import require_module
from tests.support import agent_config, wait_until


def make_pki(folder: Path, name: str = "ca") -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    require_module("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def key_file(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return path

    def cert_file(cert: x509.Certificate, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"edge-agent test {name}")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(common_name: str, server: bool) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        return builder.sign(ca_key, hashes.SHA256()), key

    server_cert, server_key = leaf("localhost", server=True)
    client_cert, client_key = leaf("dev1", server=False)
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "ca": cert_file(ca, folder / "ca.pem"),
        "ca_key": key_file(ca_key, folder / "ca.key"),
        "server_cert": cert_file(server_cert, folder / "server.pem"),
        "server_key": key_file(server_key, folder / "server.key"),
        "client_cert": cert_file(client_cert, folder / "client.pem"),
        "client_key": key_file(client_key, folder / "client.key"),
    }


@pytest.fixture()
def tls_broker(tmp_path: Path):  # type: ignore[no-untyped-def]
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    broker = Broker(
        tmp_path,
        port=port,
        extra_config=(
            f"listener {port} 127.0.0.1\nallow_anonymous true\n"
            f"cafile {pki['ca']}\ncertfile {pki['server_cert']}\nkeyfile {pki['server_key']}\n"
            "require_certificate true\ntls_version tlsv1.2\n"
        ),
    ).start()
    yield broker, pki
    broker.stop()


def tls_config(port: int, tmp_path: Path, ca: Path, cert: Path, key: Path):  # type: ignore[no-untyped-def]
    return agent_config(
        port,
        tmp_path,
        mqtt={"tls": {"enabled": True, "ca_file": str(ca), "cert_file": str(cert), "key_file": str(key)}},
    )


def test_agent_connects_with_ca_and_client_certificate(tls_broker, make_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    broker, pki = tls_broker
    agent = make_agent(tls_config(broker.port, tmp_path, pki["ca"], pki["client_cert"], pki["client_key"]))
    assert agent.transport is not None and agent.transport.connected


# paho 2.2 does not close the TLS socket when the handshake fails (client.py _ssl_wrap_socket):
# it is only finalised by the garbage collector, which Python reports as a ResourceWarning.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_wrong_ca_fails_with_a_clear_error_and_keeps_retrying(tls_broker, make_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    broker, pki = tls_broker
    other = make_pki(tmp_path / "other", name="other-ca")
    agent = make_agent(
        tls_config(broker.port, tmp_path, other["ca"], pki["client_cert"], pki["client_key"]), start=False
    )
    agent.start()
    assert agent.transport is not None
    wait_until(lambda: agent.transport.stats.last_error is not None, timeout=10)  # type: ignore[union-attr]
    assert not agent.transport.connected
    assert "TLS: the broker's certificate was not accepted" in (agent.transport.stats.last_error or "")
    assert "self-signed certificate in certificate chain" in (agent.transport.stats.last_error or "")
    assert agent.worker.alive  # the agent goes on (local audio, outbox) while it retries


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_client_without_certificate_is_refused_by_the_broker(tls_broker, make_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    broker, pki = tls_broker
    config = agent_config(broker.port, tmp_path, mqtt={"tls": {"enabled": True, "ca_file": str(pki["ca"])}})
    agent = make_agent(config, start=False)
    agent.start()
    assert agent.transport is not None
    wait_until(lambda: bool(agent.transport.stats.last_error), timeout=10)  # type: ignore[union-attr]
    assert not agent.transport.connected


def client_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    return context


def test_the_command_line_client_connects_with_tls(tls_broker) -> None:  # type: ignore[no-untyped-def]
    broker, pki = tls_broker
    context = client_context(pki["ca"], pki["client_cert"], pki["client_key"])
    with MqttClient("127.0.0.1", broker.port, tls=context).connect() as client:
        client.subscribe("tls/echo")
        client.publish("tls/echo", b"sealed")
        message = client.receive(10)
        assert message is not None and message.payload == b"sealed"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # paho 2.2, as above
def test_the_command_line_client_names_a_certificate_it_refuses(tls_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    broker, pki = tls_broker
    other = make_pki(tmp_path / "other", name="other-ca")
    context = client_context(other["ca"], pki["client_cert"], pki["client_key"])
    with pytest.raises(MqttClientError, match="TLS: the broker's certificate was not accepted"):
        MqttClient("127.0.0.1", broker.port, tls=context).connect()


@pytest.mark.parametrize(
    "tls, key, message",
    [
        ({"ca_file": "/nonexistent/ca.pem"}, "mqtt.tls.ca_file", "does not exist"),
        ({"ca_file": "NOT_PEM"}, "mqtt.tls.ca_file", "is not a PEM CA certificate"),
        (
            {"cert_file": "/nonexistent/c.pem", "key_file": "/nonexistent/k.pem"},
            "mqtt.tls.cert_file",
            "does not exist",
        ),
        ({"cert_file": "CERT", "key_file": "WRONG_KEY"}, "mqtt.tls.cert_file", "cannot load"),
    ],
)
def test_bad_tls_files_fail_at_start_up(tls, key: str, message: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pki = make_pki(tmp_path / "pki")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is not a certificate\n", encoding="utf-8")
    substitutions = {
        "NOT_PEM": str(garbage),
        "CERT": str(pki["client_cert"]),
        "WRONG_KEY": str(pki["ca_key"]),
    }
    resolved = {k: substitutions.get(v, v) for k, v in tls.items()}
    config = parse_config({"mqtt": {"tls": {"enabled": True, **resolved}}})
    with pytest.raises(ConfigError) as error:
        build_tls_context(config.mqtt)
    assert str(error.value).startswith(key) and message in str(error.value)
    with pytest.raises(ConfigError):
        MqttTransport(config.mqtt, "x")


def test_cli_refuses_to_start_with_a_missing_ca(model_dir: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent", "run", "--model-dir", str(model_dir)],
        env={
            **os.environ,
            "EDGE_AGENT_MQTT__TLS__ENABLED": "true",
            "EDGE_AGENT_MQTT__TLS__CA_FILE": str(tmp_path / "missing-ca.pem"),
            "EDGE_AGENT_OUTBOX__PATH": str(tmp_path / "o.db"),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "mqtt.tls.ca_file" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
