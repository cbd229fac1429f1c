"""How to reach an MQTT broker: its URL, credentials and TLS.

Shared by the device's link (`agent.link.mqtt`, whose reconnect backoff is
`agent.link.backoff`) and the operator's tools
(`edge-builder fleet`, `rollout`), so both read a broker URL and apply TLS the
same way.
"""

from __future__ import annotations

import os
import ssl
import urllib.parse
from dataclasses import dataclass

import paho.mqtt.client as mqtt

from agent.wire.errors import ConfigError


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    is_tls: bool


def parse_broker_url(url: str) -> BrokerAddress:
    """`mqtt://host[:1883]` or `mqtts://host[:8883]`.

    Raises:
        ConfigError: another scheme, no host, or a bad port.
    """
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("mqtt", "mqtts"):
        raise ConfigError(f"broker_url {url!r}: scheme must be mqtt:// or mqtts://")
    if not parsed.hostname:
        raise ConfigError(f"broker_url {url!r} has no host: write mqtt://host:port")
    try:
        port = parsed.port
    except ValueError as e:
        raise ConfigError(f"broker_url {url!r}: {e}") from e
    is_tls = parsed.scheme == "mqtts"
    return BrokerAddress(parsed.hostname, port or (8883 if is_tls else 1883), is_tls)


@dataclass(frozen=True)
class BrokerCredentials:
    """Everything needed to authenticate to a broker, from config or a CLI."""

    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


def configure_client(client: mqtt.Client, address: BrokerAddress, creds: BrokerCredentials) -> None:
    """Apply TLS and username/password to a paho client (shared with `edge-builder fleet`).

    Raises:
        ConfigError: a named certificate or key file does not exist, or a
            client certificate is given for a plain mqtt:// URL.
    """
    for what, path in (("broker_ca_file", creds.ca_file), ("broker_cert_file", creds.cert_file),
                       ("broker_key_file", creds.key_file)):
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"{what} {path} does not exist: fix the path or remove the key")
    if (creds.cert_file is None) != (creds.key_file is None):
        raise ConfigError("broker_cert_file and broker_key_file must be given together")
    if address.is_tls:
        client.tls_set(ca_certs=creds.ca_file, certfile=creds.cert_file, keyfile=creds.key_file,
                       cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    elif creds.ca_file or creds.cert_file:
        raise ConfigError("TLS files are set but broker_url is mqtt://: use mqtts:// to enable TLS")
    if creds.username is not None:
        client.username_pw_set(creds.username, creds.password)
