"""The server's public front: forwards Flower's Fleet API, and nothing else, to a SuperLink on loopback.

Why: in flwr 1.41 the SuperLink serves its Fleet, Control and Runtime APIs on one HTTP port, and
open-source Flower authenticates no Control API caller (MEASUREMENTS.md, 2026-12-02). So the SuperLink
listens on 127.0.0.1 only, and devices reach it through this front, which passes a request on only
when its raw path is one of the Fleet API's routes (`/v1/fleet/<name>`, letters and dashes) and its
method is POST, the one Flower's REST transport uses. Everything else (the Control API, the Runtime
APIs, `/docs`, paths with dot segments or percent-escapes that could be normalized into another route)
gets 403 here and never reaches the SuperLink.

Built from Flower's own dependencies: starlette (the app), httpx (the upstream client), uvicorn (the
HTTPS server); no HTTP parsing of ours. TLS on both legs: devices verify this front's certificate
against the deployment's CA, and the front verifies the SuperLink's certificate (the same server
certificate, whose SAN holds 127.0.0.1 and every public host). Request and response bodies are
streamed; headers pass unchanged (a SuperNode's signature headers included) except the hop-by-hop
ones, which belong to each connection.

Run: python -m fedhydra.simulations.fleet_front --listen HOST:PORT --upstream 127.0.0.1:PORT
     --ca ca.crt --cert server.pem --key server.key
"""

from __future__ import annotations

import argparse
import contextlib
import re
import ssl
import sys

# Flower 1.41's Fleet routes are POST /v1/fleet/<name> (activate-node, pull-messages, push-object, ...).
FLEET_ROUTE = re.compile(rb"/v1/fleet/[a-z][a-z0-9-]{0,63}")  # matched whole (fullmatch)
FLEET_METHODS = ("POST",)
# RFC 9110 section 7.6.1: connection-specific headers are not forwarded; Host names the upstream.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
              "te", "trailer", "transfer-encoding", "upgrade", "host"}
REFUSED = "refused by the FedHydra front: only the Fleet API is served here"


def allowed(method: str, raw_path: bytes, query: bytes) -> bool:
    """True only for a Fleet API call: POST, the exact route shape, no query string."""
    return method in FLEET_METHODS and not query and FLEET_ROUTE.fullmatch(raw_path) is not None


def build_app(upstream: str, ca_file: str | None, timeout: float = 600.0):
    """The starlette app: one catch-all route that forwards Fleet calls to https://`upstream` and refuses the rest.
    `ca_file=None` talks plain HTTP upstream (only for an --insecure SuperLink on loopback)."""
    import httpx
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.responses import PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    scheme = "https" if ca_file else "http"
    verify = ssl.create_default_context(cafile=ca_file) if ca_file else False
    client = httpx.AsyncClient(base_url=f"{scheme}://{upstream}", verify=verify, timeout=timeout,
                               limits=httpx.Limits(max_connections=256, max_keepalive_connections=32))

    async def forward(request):
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        if not allowed(request.method, raw_path, request.scope.get("query_string", b"")):
            return PlainTextResponse(REFUSED, status_code=403)
        headers = [(k, v) for k, v in request.headers.raw if k.decode("latin-1").lower() not in HOP_BY_HOP]
        length = request.headers.get("content-length")
        # A known length goes on as is; a chunked body is streamed on as chunks.
        body = await request.body() if length is not None else request.stream()
        upstream_request = client.build_request(request.method, raw_path.decode("ascii"), headers=headers,
                                                content=body)
        try:
            response = await client.send(upstream_request, stream=True)
        except httpx.HTTPError as exc:
            return PlainTextResponse(f"FedHydra front: the SuperLink is unavailable ({type(exc).__name__})",
                                     status_code=502)
        out_headers = {k: v for k, v in response.headers.multi_items() if k.lower() not in HOP_BY_HOP}
        return StreamingResponse(response.aiter_raw(), status_code=response.status_code, headers=out_headers,
                                 background=BackgroundTask(response.aclose))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await client.aclose()

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m fedhydra.simulations.fleet_front", description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", required=True, type=_host_port, help="public HOST:PORT devices connect to")
    p.add_argument("--upstream", required=True, type=_host_port, help="the SuperLink's HOST:PORT on loopback")
    p.add_argument("--ca", default=None, help="CA certificate that signed the SuperLink's certificate")
    p.add_argument("--cert", default=None, help="this front's TLS certificate (PEM)")
    p.add_argument("--key", default=None, help="its private key (PEM)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP on both legs (local experiments only)")
    args = p.parse_args(argv)
    if not args.insecure and not (args.ca and args.cert and args.key):
        p.error("--ca, --cert and --key are required unless --insecure")
    up_host, up_port = args.upstream
    app = build_app(f"{up_host}:{up_port}", None if args.insecure else args.ca)
    host, port = args.listen
    tls = {} if args.insecure else {"ssl_certfile": args.cert, "ssl_keyfile": args.key}
    print(f"FedHydra front on {host}:{port} -> Fleet API of {up_host}:{up_port}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, proxy_headers=False,
                server_header=False, date_header=False, timeout_keep_alive=30, **tls)


if __name__ == "__main__":
    main()
