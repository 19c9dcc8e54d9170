"""Fast checks of what `fedhydra deploy` generates, without starting Flower processes:
the CA / SuperLink certificate / SuperNode keys, and the Flower app folder that `flwr run` packages."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from fedhydra.common import settings
from fedhydra.simulations.certs import ensure_node_key, ensure_server_certs
from fedhydra.simulations.app_folder import CLIENTAPP, SERVERAPP, write_app
from fedhydra.simulations.processes import Proc


def test_certificates_verify_and_name_loopback(tmp_path):
    certs = ensure_server_certs(tmp_path)
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1"}
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert os.stat(certs.server_key).st_mode & 0o077 == 0 and os.stat(tmp_path / "ca.key").st_mode & 0o077 == 0
    # Reused, not regenerated.
    before = certs.server_cert.read_bytes()
    assert ensure_server_certs(tmp_path).server_cert.read_bytes() == before


def test_node_keys_load_as_flower_expects(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    key = ensure_node_key(tmp_path, "node-0")
    private = load_ssh_private_key(key.private.read_bytes(), None)  # what flower-supernode does
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert try_load_public_key(key.public)  # what `flwr supernode register` does
    assert ensure_node_key(tmp_path, "node-0").private.read_bytes() == key.private.read_bytes()
    assert ensure_node_key(tmp_path, "node-1").public.read_bytes() != key.public.read_bytes()


def test_app_folder_is_a_valid_flower_app(tmp_path):
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.config import validate_config

    values = settings.resolve({"rounds": 2, "out": str(tmp_path / "out dir"), "resume": True})
    app = write_app(tmp_path / "app", values)
    doc = tomllib.loads((app / "pyproject.toml").read_text(encoding="utf-8"))
    assert doc["tool"]["flwr"]["app"]["components"] == {"serverapp": SERVERAPP, "clientapp": CLIENTAPP}
    assert doc["tool"]["flwr"]["app"]["config"] == values  # every setting, typed as the table says
    ok, errors, _warnings = validate_config(doc, check_module=True, project_dir=app)
    assert ok, errors
    assert build_fab_from_disk(app)  # what `flwr run` packages: pyproject.toml only


def test_stop_ends_the_whole_process_tree(tmp_path):
    # A child that starts its own session (as Flower's SuperExec does) must be stopped too.
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
            "start_new_session=True); time.sleep(60)")
    popen = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    proc = Proc("t", popen, tmp_path / "log", {popen.pid})
    time.sleep(1.0)
    from fedhydra.simulations.processes import _proc_table, _tree

    tree = _tree({popen.pid}, {popen.pid})
    assert len(tree) == 2
    proc.stop(grace=5)
    assert not set(tree) & set(_proc_table())


def test_front_forwards_only_fleet_routes():
    from flwr.supercore.protobuf.translation import PROTOBUF_REQUEST_TYPES

    from fedhydra.simulations.fleet_front import allowed

    for method, path in PROTOBUF_REQUEST_TYPES:  # flwr 1.41's routes: only the Fleet API's pass
        assert allowed(method, path.encode(), b"") == path.startswith("/v1/fleet/"), path
    for raw in (b"/v1/fleet/../control/list-runs", b"/v1/fleet/%2e%2e/control/list-runs", b"/v1/fleet//get-run",
                b"/v1/fleet/get-run/", b"/v1/fleet%2fget-run", b"/V1/fleet/get-run", b"//v1/fleet/get-run",
                b"/v1/fleet/", b"/v1/fleet/get-run\n"):
        assert not allowed("POST", raw, b""), raw
    assert not allowed("GET", b"/v1/fleet/get-run", b"") and not allowed("POST", b"/v1/fleet/get-run", b"a=1")


def test_server_certificate_names_every_public_host(tmp_path):
    from fedhydra.simulations.certs import san_hosts

    first = ensure_server_certs(tmp_path, hosts=("127.0.0.1", "localhost", "192.0.2.3"))
    ca = first.ca_cert.read_bytes()
    assert set(san_hosts(first.server_cert)) == {"127.0.0.1", "localhost", "192.0.2.3"}
    # A new public host: a new server certificate from the same CA (devices keep their ca.crt).
    again = ensure_server_certs(tmp_path, hosts=("127.0.0.1", "localhost", "192.0.2.3", "fl.example.org"))
    assert "fl.example.org" in san_hosts(again.server_cert) and again.ca_cert.read_bytes() == ca
    ca_cert = x509.load_pem_x509_certificate(ca)
    x509.load_pem_x509_certificate(again.server_cert.read_bytes()).verify_directly_issued_by(ca_cert)


def test_node_keygen_never_overwrites_a_device_key(tmp_path):
    import pytest

    from fedhydra.simulations.certs import write_node_key

    key = write_node_key(tmp_path / "phone", "phone")
    assert os.stat(key.private).st_mode & 0o077 == 0 and key.public.read_text().endswith(" phone\n")
    with pytest.raises(FileExistsError, match="keeps its key"):
        write_node_key(tmp_path / "phone", "phone")


def test_a_device_sets_its_threads_and_llm_endpoint_in_its_node_config(tmp_path):
    from flwr.app import Context, RecordDict

    from fedhydra.cli.main import build_parser
    from fedhydra.client.client_app import client_settings
    from fedhydra.simulations.node_cmd import node_config

    args = build_parser().parse_args(
        ["node", "start", "--superlink", "127.0.0.1:9092", "--ca", "ca.crt", "--key", "key", "--state", str(tmp_path),
         "--threads", "3", "--llm", "openai", "--llm-base-url", "http://127.0.0.1:8765/v1", "--llm-model", "m",
         "--node-config", "llm-threads=2"])
    config = node_config(args)
    assert config == {"threads": 3, "llm": "openai", "llm-base-url": "http://127.0.0.1:8765/v1", "llm-model": "m",
                      "llm-threads": 2}
    # What the ClientApp on that device runs with: its node config over the run's settings.
    context = Context(run_id=1, node_id=7, node_config=config | {"state": str(tmp_path)}, state=RecordDict(),
                      run_config={"threads": 1, "llm": "embedded", "rounds": 2})
    values = client_settings(context)
    assert (values["threads"], values["llm"], values["llm-threads"], values["rounds"]) == (3, "openai", 2, 2)
    import pytest

    bad = build_parser().parse_args(["node", "start", "--superlink", "h:1", "--ca", "c", "--key", "k", "--state", "s",
                                     "--node-config", "no-such-setting=1"])
    with pytest.raises(ValueError, match="no-such-setting"):
        node_config(bad)


def test_only_an_unspecified_bind_address_counts_as_every_interface():
    # A wildcard bind address is never dialled: the front's readiness probe and the certificate skip it.
    from fedhydra.simulations.deployment import is_wildcard

    assert is_wildcard("0.0.0.0") and is_wildcard("::") and is_wildcard("0:0::0")
    assert not any(is_wildcard(h) for h in ("127.0.0.1", "::1", "localhost", "fleet.example"))
