"""Fixtures for broker tests: one provisioned federation, real Mosquitto processes, sessions."""

from __future__ import annotations

import getpass
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.mosquitto import TEST_FEDERATION, MosquittoProcess, SessionFactory

from broker.provisioning.bundle import load_bundle
from broker.provisioning.federation import Federation, parse_federation
from broker.provisioning.provision import provision
from broker.session import Session


@pytest.fixture(scope="session")
def federation() -> Federation:
    """The test federation: two sites, two aggregators."""
    return parse_federation(TEST_FEDERATION)


@pytest.fixture(scope="session")
def provisioned(federation: Federation, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tessera provision` output for the test federation (broker runs as this user)."""
    out = tmp_path_factory.mktemp("provisioned")
    provision(federation, out, run_as_user=getpass.getuser())
    return out


@pytest.fixture(scope="module")
def mosquitto(
    federation: Federation, provisioned: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MosquittoProcess]:
    """A real Mosquitto with the provisioned certificates and ACL, shared by a module."""
    with MosquittoProcess(federation, provisioned, tmp_path_factory.mktemp("mosquitto")) as broker:
        yield broker


@pytest.fixture
def connect(provisioned: Path) -> Iterator[SessionFactory]:
    """connect(member_id, broker, start=True, **config overrides) -> a Session, closed after."""
    opened: list[Session] = []

    def factory(member_id: str, broker: MosquittoProcess, start: bool = True, **kw: Any) -> Session:
        bundle = load_bundle(provisioned / "bundles" / member_id)
        config = bundle.session_config(broker.host, port=broker.mqtt_port, **kw)
        session = Session(config)
        opened.append(session)
        if start:
            session.start().wait_connected(10)
        return session

    yield factory
    for session in opened:
        session.close(timeout=2)
