"""The on-device gRPC server (`fedhydra client serve`): fedhydra.v1.Personalizer over a client state folder.

Security defaults, because a device may be on a shared network:
- binds 127.0.0.1 unless told otherwise; binding any other address needs a bearer token
  (`authorization: Bearer <token>` metadata, compared in constant time) and either TLS or an
  explicit `allow_plaintext`, since a token sent in clear text can be sniffed. A token may also
  be set on loopback, where it keeps other local users' programs out;
- requests are bounded: gRPC refuses messages above `Limits.max_message_bytes`
  (RESOURCE_EXHAUSTED) and the checks in client/personalizer.py bound every field
  (INVALID_ARGUMENT); at most `max_concurrent_rpcs` calls are admitted at once;
- SO_REUSEPORT is off, so a second server cannot silently share the port.

Errors: bad request INVALID_ARGUMENT, unknown user NOT_FOUND, history id already stored
ALREADY_EXISTS, LLM failure UNAVAILABLE, shutting down UNAVAILABLE, anything else INTERNAL (logged
here, a one-line message to the caller).

Shutdown (SIGTERM/SIGINT): stop admitting calls, give running ones `grace` seconds, then wait for
an append in progress to reach the disk. An append is acknowledged only after it is fsynced, so
every acknowledged history item survives the restart.
"""

from __future__ import annotations

import hmac
import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc

from fedhydra.common.llm.base import LLMError
from fedhydra.common.llm.serve import is_loopback_host
from fedhydra.proto import personalizer_v1_pb2 as pb
from fedhydra.proto import personalizer_v1_pb2_grpc as pb_grpc

from fedhydra.common.protocol import ANSWER_MODES, FULL

from .personalizer import BadRequest, ItemExists, Personalizer, UnknownUser

API_VERSION = "fedhydra.v1"
TOKEN_ENV = "FEDHYDRA_SERVICE_TOKEN"
log = logging.getLogger("fedhydra.service")

# the wire's Mode enum (proto/personalizer_v1.proto: MODE_<ANSWER MODE>) -> answer mode; unset means full
_MODE_NAMES = {pb.MODE_UNSPECIFIED: FULL} | {pb.Mode.Value(f"MODE_{m.upper()}"): m for m in ANSWER_MODES}


def _usage(stats) -> pb.LlmUsage:
    return pb.LlmUsage(calls=stats.calls, cache_hits=stats.cache_hits, prompt_tokens=stats.prompt_tokens,
                       completion_tokens=stats.completion_tokens)


class PersonalizerServicer(pb_grpc.PersonalizerServicer):
    """Maps fedhydra.v1 messages onto a Personalizer and its errors onto gRPC status codes."""

    def __init__(self, core: Personalizer):
        self.core = core

    def _run(self, context, fn):
        try:
            return fn()
        except BadRequest as exc:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except UnknownUser as exc:
            code, message = grpc.StatusCode.NOT_FOUND, str(exc)
        except ItemExists as exc:
            code, message = grpc.StatusCode.ALREADY_EXISTS, str(exc)
        except LLMError as exc:
            code, message = grpc.StatusCode.UNAVAILABLE, f"the LLM failed: {exc}"
        except Exception as exc:  # a bug or a broken state folder: log it, tell the caller briefly
            if self.core.closed:
                code, message = grpc.StatusCode.UNAVAILABLE, "the service is shutting down"
            else:
                log.exception("internal error")
                code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"[:500]
        context.abort(code, message)

    def Personalize(self, request, context):
        def call():
            if request.mode not in _MODE_NAMES:
                raise BadRequest(f"mode {request.mode} is unknown; modes: "
                                 + ", ".join(f"{pb.Mode.Name(v)}={v}" for v in _MODE_NAMES))
            got = self.core.personalize(request.user_id, request.input, request.task, _MODE_NAMES[request.mode])
            a = got.answer
            best = a.candidates.index(a.text) if a.text in a.candidates else -1
            candidates = [pb.Candidate(text=c, chosen=(j == best), **({"score": a.scores[j]} if a.scores else {}))
                          for j, c in enumerate(a.candidates)]
            items = [pb.HistoryItem(id=str(i["id"]), fields={k: str(v) for k, v in i.items() if k != "id"})
                     for i in a.items]
            return pb.PersonalizeResponse(answer=a.text, candidates=candidates, items=items, llm=_usage(got.llm),
                                          reranker_head=got.reranker_head, adapter_head=got.adapter_head,
                                          model_version=got.model_version, task=got.task,
                                          elapsed_ms=got.elapsed_ms)
        return self._run(context, call)

    def AddHistory(self, request, context):
        def call():
            items = []
            for n, item in enumerate(request.items):
                if "id" in item.fields:
                    raise BadRequest(f"items[{n}].fields has a key 'id'; put the id in the item's id field")
                items.append(({"id": item.id} if item.id else {}) | dict(item.fields))
            ids, size = self.core.add_history(request.user_id, items)
            return pb.AddHistoryResponse(item_ids=ids, history_size=size)
        return self._run(context, call)

    def Status(self, request, context):
        def call():
            s = self.core.status()
            return pb.StatusResponse(
                task=s["task"], users=[pb.UserStatus(**u) for u in s["users"]],
                models=[pb.ModelStatus(**m) for m in s["models"]], llm_backend=s["llm_backend"],
                llm=_usage(s["llm"]), server_version=_version(), api_version=API_VERSION,
                requests_served=s["requests_served"], model_version=s["model_version"])
        return self._run(context, call)


class _TokenCheck(grpc.ServerInterceptor):
    """Admit only calls carrying `authorization: Bearer <token>`."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'")
        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        sent = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if isinstance(sent, str) and hmac.compare_digest(sent.encode(), self._expected):
            return continuation(handler_call_details)
        return self._deny


@dataclass(frozen=True)
class TLS:
    cert: bytes  # PEM certificate chain
    key: bytes  # PEM private key
    client_ca: bytes | None = None  # PEM CA: when set, clients must present a certificate it signed


@dataclass
class RunningServer:
    server: grpc.Server
    core: Personalizer
    address: str  # host:port actually bound
    port: int

    def stop(self, grace: float = 10.0, close_core: bool = True) -> None:
        """Stop admitting calls, let running ones finish within `grace` s, then settle pending appends
        (close_core=False leaves the core open for another server sharing it)."""
        self.server.stop(grace).wait()
        if close_core:
            self.core.close()


def start_server(core: Personalizer, host: str = "127.0.0.1", port: int = 50051, *, token: str | None = None,
                 tls: TLS | None = None, allow_plaintext: bool = False, workers: int = 8,
                 max_concurrent_rpcs: int = 256) -> RunningServer:
    """Start serving `core` on host:port (port 0: any free port); refuses unsafe exposure (module docstring)."""
    if token is not None and (len(token) < 16 or token != token.strip()):
        raise ValueError("the bearer token must be at least 16 characters without surrounding spaces "
                         "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    if not is_loopback_host(host):  # a name other than localhost may resolve to anything
        if token is None:
            raise ValueError(f"binding {host} exposes the service beyond this machine: give a bearer token "
                             f"(--token-file or ${TOKEN_ENV}), or bind 127.0.0.1")
        if tls is None and not allow_plaintext:
            raise ValueError(f"binding {host} without TLS would send the token in clear text: give --tls-cert and "
                             "--tls-key, or --allow-plaintext on a network you trust")
    if workers < 1 or max_concurrent_rpcs < workers:
        raise ValueError(f"workers ({workers}) must be >= 1 and max_concurrent_rpcs ({max_concurrent_rpcs}) >= workers")
    options = [("grpc.max_receive_message_length", core.limits.max_message_bytes),
               ("grpc.max_send_message_length", 64 * 2**20),
               ("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="personalizer"),
                         interceptors=[_TokenCheck(token)] if token else [], options=options,
                         maximum_concurrent_rpcs=max_concurrent_rpcs)
    pb_grpc.add_PersonalizerServicer_to_server(PersonalizerServicer(core), server)
    bind = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        if tls is None:
            bound = server.add_insecure_port(bind)
        else:
            creds = grpc.ssl_server_credentials([(tls.key, tls.cert)], root_certificates=tls.client_ca,
                                                require_client_auth=tls.client_ca is not None)
            bound = server.add_secure_port(bind, creds)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {bind}: {exc}") from None
    if not bound:
        raise OSError(f"cannot listen on {bind} (address in use or not available here)")
    server.start()
    return RunningServer(server, core, bind.rsplit(":", 1)[0] + f":{bound}", bound)


def serve_forever(running: RunningServer, grace: float = 10.0) -> None:
    """Block until SIGTERM or SIGINT, then shut down gracefully (main thread only)."""
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop.wait(0.5):  # a timed wait keeps the main thread responsive to signals
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        log.info("shutting down (grace %.0f s)", grace)
        running.stop(grace)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedhydra")
    except PackageNotFoundError:
        return "unknown"


__all__ = [
    "API_VERSION",
    "ANSWER_MODES",
    "TLS",
    "TOKEN_ENV",
    "PersonalizerServicer",
    "RunningServer",
    "serve_forever",
    "start_server",
]
