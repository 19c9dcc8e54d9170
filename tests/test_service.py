"""The on-device gRPC service, served for real on 127.0.0.1 with the embedded LLM and MiniLM scorers.

One module-scoped server over a small synthetic LaMP_2M state (tiny sizes: M=3, k=2, B=2, 64
tokens), whose saved models hold own heads for two users; the others get the default head.
"""

from __future__ import annotations

import concurrent.futures as cf
import json

import grpc
import pytest

from fedhydra.client.personalizer import Limits, Personalizer
from fedhydra.client.service import start_server
from fedhydra.client.service_client import PersonalizerClient, ServiceError
from fedhydra.cli import main as cli
from fedhydra.common.llm import CachedLLM, ResponseCache
from fedhydra.common.pipeline import HydraPipeline
from fedhydra.common.retrieval import Retriever
from fedhydra.proto import personalizer_v1_pb2 as pb
from fedhydra.proto import personalizer_v1_pb2_grpc as pb_grpc
from service_state import TINY, content, make_state

TOKEN = "a-test-token-of-32-characters-xx"


@pytest.fixture(scope="module")
def served(tmp_path_factory, embedded_llm, one_torch_thread):
    state = make_state(tmp_path_factory.mktemp("client-state"), with_models=True)
    llm = CachedLLM(embedded_llm, ResponseCache(state.llm_cache_dir))
    core = Personalizer(state, llm, limits=Limits(max_message_bytes=2**20))
    running = start_server(core, "127.0.0.1", 0, workers=8)
    yield running
    running.stop(grace=1)


@pytest.fixture(scope="module")
def client(served):
    with PersonalizerClient(served.address, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def stub(served):
    channel = grpc.insecure_channel(served.address)
    yield pb_grpc.PersonalizerStub(channel)
    channel.close()


def test_answer_matches_the_pipeline_called_directly(served, client, embedded_llm):
    state = served.core.state
    models = state.load_models()  # independent copies of the saved scorers
    direct = HydraPipeline(state.task, CachedLLM(embedded_llm, ResponseCache(state.llm_cache_dir)),
                           Retriever(state.task), models.reranker, models.adapter, state.config(), margin=0.0)
    for user, head in ((state.users()[0], "user"), (state.users()[2], "default")):
        got = client.personalize(user.id, content(user))  # content only: the service adds the instruction
        want = direct.answer(user)
        assert [c.text for c in got.candidates] == want.candidates
        assert [c.score for c in got.candidates] == pytest.approx(want.scores, abs=1e-6)
        assert got.answer == want.text
        assert [c.chosen for c in got.candidates].count(True) == 1
        assert got.items == want.items and len(got.items) == TINY["k"]
        assert (got.reranker_head, got.adapter_head) == (head, head)
        assert got.model_version == served.core.status()["model_version"] != "none"
        assert got.llm["calls"] == 1 + TINY["candidates"]  # one model call per answer: greedy + B samples
    # The full LaMP input is accepted as is and gives the same answer (now from the LLM cache).
    again = client.personalize(user.id, user.input)
    assert [c.text for c in again.candidates] == want.candidates
    assert again.llm["calls"] == 0 and again.llm["cache_hits"] == 2  # the greedy and the sampling request


def test_added_history_is_retrieved_by_the_next_query(served, client):
    state = served.core.state
    user = state.users()[3]
    size = len(user.profile)
    fresh = [{"id": f"fresh-{i}", "tag": "fantasy",
              "description": f"A clockwork dragon guards the glass library of Zanthor from ink wizards, part {i}."}
             for i in range(3)]
    ids, new_size = client.add_history(user.id, fresh + [{"description": "A farmer grows giant pumpkins.",
                                                          "tag": "comedy"}])
    assert ids[:3] == ["fresh-0", "fresh-1", "fresh-2"] and len(ids) == 4 and new_size == size + 4
    stored = state.user(user.id).profile
    assert stored[-4:-1] == fresh and stored[-1]["id"] == ids[3]  # on disk, in order, with a made id
    # Only the new items share the query's words, so BM25's top M=3 are exactly them and the
    # reranker's top k come from them, whatever its (untrained default) head prefers.
    got = client.personalize(user.id, "The ink wizards attack the glass library of Zanthor; a clockwork dragon waits.")
    assert len(got.items) == TINY["k"] and {i["id"] for i in got.items} <= set(ids[:3])
    assert all(i["description"].startswith("A clockwork dragon") for i in got.items)
    status = client.status()
    assert {u["user_id"]: int(u["history_size"]) for u in status["users"]}[user.id] == size + 4
    with pytest.raises(ServiceError) as err:  # a retried append of the same id is refused, not duplicated
        client.add_history(user.id, [fresh[0]])
    assert err.value.code == "ALREADY_EXISTS" and "fresh-0" in err.value.details
    assert len(state.user(user.id).profile) == size + 4


U0 = "1000"
GOOD = {"description": "A robot learns to dream aboard a failing space station.", "tag": "sci-fi"}
BAD_PERSONALIZE = [
    ("empty input", dict(user_id=U0, input=""), "input is empty"),
    ("blank input", dict(user_id=U0, input="  \n\t "), "input is empty"),
    ("oversized input", dict(user_id=U0, input="x" * 8001), "limit is 8000"),
    ("control character", dict(user_id=U0, input="a robot\x00story"), "control character"),
    ("instruction without content", dict(user_id=U0, input="tags: [sci-fi] description:   "), "no content"),
    ("unknown task", dict(user_id=U0, input="a film", task="LaMP_99"), "unknown"),
    ("task not served", dict(user_id=U0, input="a film", task="LaMP_7"), "not served here"),
    ("bad user id", dict(user_id="../etc/passwd", input="a film"), "bad user id"),
    ("empty user id", dict(user_id="", input="a film"), "user_id is empty"),
    ("unknown mode", dict(user_id=U0, input="a film", mode=7), "mode 7 is unknown"),
]
BAD_HISTORY = [
    ("no items", [], "items is empty"),
    ("too many items", [GOOD] * 101, "limit is 100"),
    ("missing field", [{"description": "A film."}], "lacks field"),
    ("unknown field", [GOOD | {"rating": "5"}], "unknown field"),
    ("empty field", [GOOD | {"tag": " "}], "items[0].tag is empty"),
    ("label outside the task's labels", [GOOD | {"tag": "horror"}], "not a LaMP_2M label"),
    ("duplicate ids", [GOOD | {"id": "d1"}, GOOD | {"id": "d1"}], "appears twice"),
    ("oversized field", [GOOD | {"description": "y" * 8001}], "limit is 8000"),
    ("id inside fields", None, "key 'id'"),
]


@pytest.mark.parametrize("kind,fields,message", BAD_PERSONALIZE, ids=[c[0] for c in BAD_PERSONALIZE])
def test_bad_personalize_requests_are_invalid_argument(stub, kind, fields, message):
    with pytest.raises(grpc.RpcError) as err:
        stub.Personalize(pb.PersonalizeRequest(**fields), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert message in err.value.details()


@pytest.mark.parametrize("kind,items,message", BAD_HISTORY, ids=[c[0] for c in BAD_HISTORY])
def test_bad_history_is_invalid_argument_and_writes_nothing(served, stub, kind, items, message):
    path = served.core.state.folder / "history" / f"{U0}.json"
    before = path.read_bytes()
    if items is None:
        msgs = [pb.HistoryItem(fields=GOOD | {"id": "x"})]
    else:
        msgs = [pb.HistoryItem(id=i.get("id", ""), fields={k: v for k, v in i.items() if k != "id"}) for i in items]
    with pytest.raises(grpc.RpcError) as err:
        stub.AddHistory(pb.AddHistoryRequest(user_id=U0, items=msgs), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert message in err.value.details()
    assert path.read_bytes() == before


def test_unknown_user_is_not_found_and_oversized_message_is_refused(stub, client):
    for call in (lambda: client.personalize("no-such-user", "a film"),
                 lambda: client.add_history("no-such-user", [GOOD])):
        with pytest.raises(ServiceError) as err:
            call()
        assert err.value.code == "NOT_FOUND" and "no-such-user" in err.value.details
    with pytest.raises(grpc.RpcError) as err:  # above the server's 1 MiB message limit: gRPC itself refuses it
        stub.Personalize(pb.PersonalizeRequest(user_id=U0, input="z" * (2 * 2**20)), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_fifty_concurrent_requests(served, client):
    state = served.core.state
    users = state.users()
    for u in users[:3]:  # warm the LLM cache so 50 calls take seconds, not minutes
        client.personalize(u.id, content(u))
    writer = users[3]  # appends go to a user nobody queries: a queried user's history (and answer) must not move
    history_before = len(state.user(writer.id).profile)

    def call(i):
        with PersonalizerClient(served.address, timeout=300) as c:  # a channel per caller, like separate apps
            if i % 5 == 0:
                return "add", c.add_history(writer.id, [{"description": f"Concurrent film number {i}.",
                                                         "tag": "classic"}])
            if i % 5 == 1:
                return "status", c.status()
            u = users[i % 3]
            return "ask", (u.id, c.personalize(u.id, content(u)))

    with cf.ThreadPoolExecutor(50) as pool:
        results = list(pool.map(call, range(50)))
    asks = [r for kind, r in results if kind == "ask"]
    assert len(results) == 50 and len(asks) == 30
    first = {}
    for uid, got in asks:  # the same query always gets the same candidates and scores
        first.setdefault(uid, got)
        assert [(c.text, c.score) for c in got.candidates] == [(c.text, c.score) for c in first[uid].candidates]
    for uid, got in first.items():  # no race: what 50 concurrent calls saw is what one call alone sees
        alone = client.personalize(uid, content(state.user(uid)))
        assert [(c.text, c.score) for c in alone.candidates] == [(c.text, c.score) for c in got.candidates]
    added = [r[0][0] for kind, r in results if kind == "add"]
    stored = {i["id"] for i in state.user(writer.id).profile}
    assert len(stored) == history_before + 10 and set(added) <= stored


def test_token_is_required_when_set(served):
    server = start_server(served.core, "127.0.0.1", 0, token=TOKEN)
    try:
        for token in (None, "wrong-token-of-enough-length-xx"):
            with PersonalizerClient(server.address, token=token) as c, pytest.raises(ServiceError) as err:
                c.status()
            assert err.value.code == "UNAUTHENTICATED" and "bearer token" in err.value.details
        with PersonalizerClient(server.address, token=TOKEN) as c:
            assert c.status()["task"] == "LaMP_2M"
    finally:
        server.stop(grace=1, close_core=False)  # the module's server shares the core


def test_binding_beyond_loopback_needs_a_token_and_tls(served):
    with pytest.raises(ValueError, match="bearer token"):
        start_server(served.core, "0.0.0.0", 0)
    with pytest.raises(ValueError, match="without TLS"):
        start_server(served.core, "0.0.0.0", 0, token=TOKEN)
    with pytest.raises(ValueError, match="at least 16"):
        start_server(served.core, "127.0.0.1", 0, token="short")


def test_tls_with_token(served, tmp_path):
    from fedhydra.client.service import TLS

    ca_pem, cert_pem, key_pem = _self_signed_localhost(tmp_path)
    server = start_server(served.core, "127.0.0.1", 0, token=TOKEN, tls=TLS(cert_pem, key_pem))
    try:
        with PersonalizerClient(server.address, token=TOKEN, root_certificates=ca_pem) as c:
            assert c.status()["api_version"] == "fedhydra.v1"
        with PersonalizerClient(server.address, token=TOKEN, timeout=5) as c, pytest.raises(ServiceError) as err:
            c.status()  # plaintext against a TLS port never gets an answer
        assert err.value.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    finally:
        server.stop(grace=1, close_core=False)  # the module's server shares the core


def _self_signed_localhost(folder):
    """A self-signed certificate for 127.0.0.1 (it is its own CA), made with `cryptography`."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert_pem, cert_pem, key_pem


def test_cli_ask_add_history_and_status(served, capsys):
    user = served.core.state.users()[2]
    assert cli.main(["client", "ask", "--address", served.address, "--user", user.id, "--json", content(user)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["adapter_head"] == "default" and out["answer"] in [c["text"] for c in out["candidates"]]
    item = json.dumps({"description": "A lighthouse keeper befriends a whale.", "tag": "fantasy"})
    assert cli.main(["client", "add-history", "--address", served.address, "--user", user.id, item]) == 0
    assert "added 1 item(s)" in capsys.readouterr().out
    assert cli.main(["client", "status", "--address", served.address]) == 0
    assert f"{user.id} (test): {len(user.profile) + 1} history items" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        cli.main(["client", "ask", "--address", served.address, "--user", "nobody", "a film"])
    assert "NOT_FOUND" in str(exit_.value.code)
