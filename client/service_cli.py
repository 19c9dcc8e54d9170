"""`fedhydra client serve|ask|add-history|status`: the on-device service and a command-line client for it.

Registered by cli/main.py's build_parser(); grpc, torch and the models are imported only when
a command runs, so `fedhydra --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedhydra.common.protocol import ANSWER_MODES, FULL

DEFAULT_ADDRESS = "127.0.0.1:50051"


def _cmd_serve(args) -> None:
    import logging

    from fedhydra.common import settings
    from fedhydra.common.llm import llm_from_settings

    from .personalizer import Limits, Personalizer
    from .service import TLS, serve_forever, start_server
    from .service_client import read_token
    from .state import ClientState

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    state = ClientState(args.state)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("give both --tls-cert and --tls-key, or neither")
    tls = None
    if args.tls_cert:
        tls = TLS(cert=_read(args.tls_cert), key=_read(args.tls_key),
                  client_ca=_read(args.tls_client_ca) if args.tls_client_ca else None)
    token = read_token(args.token_file)
    values = settings.resolve(settings.from_args(args, ("llm",)), groups=("llm",))
    llm = llm_from_settings(values, cache_dir=values["cache-dir"] or state.llm_cache_dir)  # its own cache by default
    limits = Limits(max_input_chars=args.max_input_chars, max_items=args.max_items,
                    max_message_bytes=args.max_request_bytes)
    core = Personalizer(state, llm, limits=limits, device=args.device)
    try:
        running = start_server(core, args.host, args.port, token=token, tls=tls,
                               allow_plaintext=args.allow_plaintext, workers=args.workers)
    except OSError as exc:  # port taken or address not here: the user's to fix, no traceback
        _fail(exc)
    status = core.status()
    heads = ", ".join(f"{m['module']} {m['heads']}" for m in status["models"]) or "none: not trained yet"
    print(f"fedhydra: serving fedhydra.v1.Personalizer on {running.address} "
          f"({'TLS' if tls else 'plaintext'}, {'token required' if token else 'no token'}) for "
          f"{len(state.roles)} {state.task.name} users; models {status['model_version']} (user heads: {heads}); "
          f"LLM {llm.name}", flush=True)
    serve_forever(running, grace=args.grace)
    print("fedhydra: stopped", flush=True)


def _read(path: str) -> bytes:
    return Path(path).expanduser().read_bytes()


def _client(args):
    from .service_client import PersonalizerClient, read_token

    return PersonalizerClient(args.address, token=read_token(args.token_file),
                              root_certificates=_read(args.tls_ca) if args.tls_ca else None, timeout=args.timeout)


def _fail(exc) -> None:
    raise SystemExit(f"fedhydra: error: {exc}")


def _cmd_ask(args) -> None:
    from .service_client import ServiceError

    text = sys.stdin.read() if args.input == "-" else args.input
    try:
        with _client(args) as c:
            got = c.personalize(args.user, text, task=args.task or "", mode=args.mode)
    except ServiceError as exc:
        _fail(exc)
    if args.json:
        print(json.dumps({"answer": got.answer, "candidates": [vars(x) for x in got.candidates],
                          "items": got.items, "llm": got.llm, "reranker_head": got.reranker_head,
                          "adapter_head": got.adapter_head, "model_version": got.model_version,
                          "elapsed_ms": round(got.elapsed_ms, 1)}, ensure_ascii=False, indent=1))
        return
    print(got.answer)
    for x in got.candidates:
        score = "   -  " if x.score is None else f"{x.score:.3f}"
        print(f"  {'*' if x.chosen else ' '} {score}  {x.text}", file=sys.stderr)
    print(f"  {len(got.items)} history items, heads reranker={got.reranker_head} adapter={got.adapter_head}, "
          f"LLM calls {got.llm['calls']} (cache hits {got.llm['cache_hits']}), {got.elapsed_ms:.0f} ms",
          file=sys.stderr)


def _cmd_add_history(args) -> None:
    from .service_client import ServiceError

    raw = sys.stdin.read() if args.items == "-" else args.items
    try:
        items = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"ITEMS must be a JSON list of objects ({exc})") from None
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list):
        raise ValueError("ITEMS must be a JSON object or a list of objects")
    try:
        with _client(args) as c:
            ids, size = c.add_history(args.user, items)
    except ServiceError as exc:
        _fail(exc)
    print(f"added {len(ids)} item(s) ({', '.join(ids)}); user {args.user} now has {size}")


def _cmd_status(args) -> None:
    from .service_client import ServiceError

    try:
        with _client(args) as c:
            s = c.status()
    except ServiceError as exc:
        _fail(exc)
    if args.json:
        print(json.dumps(s, indent=1))
        return
    print(f"{s['api_version']} server {s['server_version']}: task {s['task']}, LLM {s['llm_backend']}, "
          f"models {s['model_version']}, {s['requests_served']} requests served")
    for m in s["models"]:
        print(f"  {m['module']}: version {m['version']}, {m['heads']} user heads")
    for u in s["users"]:
        print(f"  {u['user_id']} ({u['role']}): {u['history_size']} history items, own heads: "
              f"reranker {'yes' if u['reranker_head'] else 'no'}, adapter {'yes' if u['adapter_head'] else 'no'}")


def _connection_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=DEFAULT_ADDRESS, help=f"host:port of the service (default {DEFAULT_ADDRESS})")
    p.add_argument("--token-file", default=None,
                   help="file holding the bearer token (default: $FEDHYDRA_SERVICE_TOKEN, if set)")
    p.add_argument("--tls-ca", default=None, help="PEM CA certificate to verify a TLS server with (default plaintext)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the answer (default 300)")


def add_client_commands(sub) -> None:
    """Add `client` with serve, ask, add-history and status to the `fedhydra` subparsers."""
    from fedhydra.common import settings

    client = sub.add_parser("client", help="the on-device personalization service (gRPC) and a client for it",
                            description="Serve a client's personalization pipeline over gRPC (fedhydra.v1, "
                                        "proto/personalizer_v1.proto) from its private state folder, and call it.")
    actions = client.add_subparsers(dest="client_command", required=True, metavar="ACTION")

    s = actions.add_parser(
        "serve", help="serve personalized answers from a client state folder over gRPC",
        description="Answers Personalize, AddHistory and Status calls with the state folder's users, history and "
                    "saved heads (before any training: BM25 items and the greedy answer). Binds 127.0.0.1 by "
                    "default. Binding another address requires a bearer token and TLS (or --allow-plaintext). "
                    "SIGTERM/Ctrl-C shut down gracefully; acknowledged history is always on disk.")
    s.add_argument("--state", required=True, help="the client's private state folder (client.json, history/, models/)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=50051, help="port (default 50051; 0 picks a free one)")
    s.add_argument("--token-file", default=None,
                   help="file holding the bearer token callers must send (default: $FEDHYDRA_SERVICE_TOKEN; "
                        "required off loopback; at least 16 characters)")
    s.add_argument("--tls-cert", default=None, help="PEM server certificate (chain) for TLS")
    s.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    s.add_argument("--tls-client-ca", default=None, help="PEM CA; when given, callers need a certificate it signed")
    s.add_argument("--allow-plaintext", action="store_true",
                   help="allow a non-loopback bind without TLS (the token then travels in clear text)")
    s.add_argument("--workers", type=int, default=8,
                   help="threads handling calls (default 8); answers are computed one at a time, appends and "
                        "status calls proceed meanwhile")
    s.add_argument("--max-input-chars", type=int, default=8000, help="longest Personalize input (default 8000)")
    s.add_argument("--max-items", type=int, default=100, help="most history items per AddHistory call (default 100)")
    s.add_argument("--max-request-bytes", type=int, default=4 * 2**20,
                   help="largest request message in bytes (default 4 MiB)")
    s.add_argument("--grace", type=float, default=10.0,
                   help="seconds running calls get to finish on shutdown (default 10)")
    s.add_argument("--device", default=None, help="torch device for the scorers (default: cuda if present, else cpu)")
    settings.add_arguments(s, ("llm",))
    s.set_defaults(func=_cmd_serve)

    a = actions.add_parser("ask", help="get a personalized answer from a running service",
                           description="Sends one Personalize call and prints the answer (candidates, adapter "
                                       "scores and what was used go to stderr; --json prints everything).")
    a.add_argument("--user", required=True, help="user id held by the serving client")
    a.add_argument("input", help="the task's content (e.g. a movie description or a tweet); '-' reads stdin")
    a.add_argument("--task", default=None, help="LaMP task name (default: the one the service serves)")
    a.add_argument("--mode", choices=ANSWER_MODES, default=FULL,
                   help="full: reranked history + adapter choice (default); reranker: greedy answer; "
                        "adapter: no history in the prompt")
    a.add_argument("--json", action="store_true", help="print the whole response as JSON")
    _connection_options(a)
    a.set_defaults(func=_cmd_ask)

    h = actions.add_parser("add-history", help="append items to a user's history on a running service",
                           description="ITEMS is a JSON object or list of objects with the task's profile fields, "
                                       "e.g. '{\"description\": \"...\", \"tag\": \"sci-fi\"}' for LaMP_2M; an "
                                       "optional \"id\" must be new. '-' reads the JSON from stdin.")
    h.add_argument("--user", required=True, help="user id held by the serving client")
    h.add_argument("items", help="JSON object or list of objects, or '-' for stdin")
    _connection_options(h)
    h.set_defaults(func=_cmd_add_history)

    st = actions.add_parser("status", help="users, heads, model versions and LLM backend of a running service")
    st.add_argument("--json", action="store_true", help="print the raw status as JSON")
    _connection_options(st)
    st.set_defaults(func=_cmd_status)
