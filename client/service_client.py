"""A small Python client for the on-device service (fedhydra.v1.Personalizer).

    from fedhydra.client.service_client import PersonalizerClient

    with PersonalizerClient("127.0.0.1:50051") as c:
        got = c.personalize("user-1", "A lonely engineer wakes up on a frozen moon.")
        print(got.answer, [(x.text, x.score) for x in got.candidates])
        c.add_history("user-1", [{"description": "...", "tag": "sci-fi"}])

Failed calls raise ServiceError with the gRPC status code name and the server's message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fedhydra.common.protocol import ANSWER_MODES, FULL



class ServiceError(RuntimeError):
    """A call the service refused or could not answer; `code` is the gRPC status name (e.g. NOT_FOUND)."""

    def __init__(self, code: str, details: str):
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details


@dataclass
class Candidate:
    text: str
    score: float | None  # adapter log-odds of a good answer; None when no adapter was used
    chosen: bool


@dataclass
class PersonalizeResult:
    answer: str
    candidates: list[Candidate]
    items: list[dict]  # history items in the prompt, best first: {"id": ..., field: text}
    llm: dict  # calls, cache_hits, prompt_tokens, completion_tokens caused by this request
    reranker_head: str
    adapter_head: str
    model_version: str
    task: str
    elapsed_ms: float


def read_token(token_file: str | os.PathLike | None = None, env: str = "FEDHYDRA_SERVICE_TOKEN") -> str | None:
    """The bearer token from `token_file` (first line), else from $FEDHYDRA_SERVICE_TOKEN, else None."""
    if token_file:
        text = Path(token_file).expanduser().read_text(encoding="utf-8").strip()
        if not text:
            raise ValueError(f"token file {token_file} is empty")
        return text.splitlines()[0].strip()
    return os.environ.get(env) or None


class PersonalizerClient:
    """One channel to the service. `root_certificates`: PEM CA bytes for TLS (None: plaintext);
    `client_cert`/`client_key` for a server that requires client certificates."""

    def __init__(self, address: str = "127.0.0.1:50051", token: str | None = None,
                 root_certificates: bytes | None = None, client_cert: bytes | None = None,
                 client_key: bytes | None = None, timeout: float = 300.0):
        import grpc

        from fedhydra.proto import personalizer_v1_pb2 as pb
        from fedhydra.proto import personalizer_v1_pb2_grpc as pb_grpc

        self._grpc, self._pb, self.timeout = grpc, pb, timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        if root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates, client_key, client_cert)
            self._channel = grpc.secure_channel(address, creds)
        else:
            self._channel = grpc.insecure_channel(address)
        self._stub = pb_grpc.PersonalizerStub(self._channel)

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except self._grpc.RpcError as exc:
            raise ServiceError(exc.code().name, exc.details() or "") from None

    def personalize(self, user_id: str, text: str, task: str = "", mode: str = FULL) -> PersonalizeResult:
        if mode not in ANSWER_MODES:
            raise ValueError(f"mode {mode!r} is unknown; modes: {', '.join(ANSWER_MODES)}")
        r = self._call(self._stub.Personalize, self._pb.PersonalizeRequest(
            user_id=user_id, task=task, input=text, mode=self._pb.Mode.Value(f"MODE_{mode.upper()}")))
        return PersonalizeResult(
            answer=r.answer,
            candidates=[Candidate(c.text, c.score if c.HasField("score") else None, c.chosen) for c in r.candidates],
            items=[{"id": i.id, **dict(i.fields)} for i in r.items],
            llm={"calls": r.llm.calls, "cache_hits": r.llm.cache_hits, "prompt_tokens": r.llm.prompt_tokens,
                 "completion_tokens": r.llm.completion_tokens},
            reranker_head=r.reranker_head, adapter_head=r.adapter_head, model_version=r.model_version,
            task=r.task, elapsed_ms=r.elapsed_ms)

    def add_history(self, user_id: str, items: list[dict]) -> tuple[list[str], int]:
        """Append items ({"id"?: str, field: str, ...}); returns (their ids, the user's new history size)."""
        msgs = []
        for n, item in enumerate(items):
            if not isinstance(item, dict):
                raise ValueError(f"items[{n}] must be a dict of field -> text, got {type(item).__name__}")
            bad = [k for k, v in item.items() if not isinstance(k, str) or not isinstance(v, str)]
            if bad:
                raise ValueError(f"items[{n}]: field(s) {bad} must have string names and string values")
            msgs.append(self._pb.HistoryItem(id=item.get("id", ""),
                                             fields={k: v for k, v in item.items() if k != "id"}))
        r = self._call(self._stub.AddHistory, self._pb.AddHistoryRequest(user_id=user_id, items=msgs))
        return list(r.item_ids), r.history_size

    def status(self) -> dict:
        from google.protobuf.json_format import MessageToDict

        r = self._call(self._stub.Status, self._pb.StatusRequest())
        return MessageToDict(r, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PersonalizerClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
