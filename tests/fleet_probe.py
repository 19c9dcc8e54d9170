"""Run inside a device's network namespace by tests/test_hosts.py: what can this device reach on the server?

    python tests/fleet_probe.py '{"front": "10.x.y.1:9092", "ca": ".../ca.crt", "routes": [["POST", "/v1/..."]],
                                  "closed": [["10.x.y.1", 40000], ["127.0.0.1", 40000]]}'

Prints one JSON object: for each route, the HTTP status and the first bytes of the body the front answered
(over TLS, verified against the CA); for each (host, port) in "closed", whether a TCP connection opened.
"""

from __future__ import annotations

import json
import socket
import ssl
import sys

import httpx


def main() -> None:
    spec = json.loads(sys.argv[1])
    ctx = ssl.create_default_context(cafile=spec["ca"])
    routes = {}
    # A raw path is sent as given (no dot-segment or percent normalization by the client).
    with httpx.Client(base_url=f"https://{spec['front']}", verify=ctx, timeout=20) as client:
        for method, path in spec["routes"]:
            request = client.build_request(method, f"https://{spec['front']}")
            request.url = request.url.copy_with(raw_path=path.encode("ascii"))
            response = client.send(request)
            routes[f"{method} {path}"] = [response.status_code, response.text[:120]]
    closed = {}
    for host, port in spec["closed"]:
        try:
            socket.create_connection((host, int(port)), timeout=3).close()
            closed[f"{host}:{port}"] = "open"
        except OSError as exc:
            closed[f"{host}:{port}"] = f"refused ({type(exc).__name__})"
    print(json.dumps({"routes": routes, "closed": closed}))


if __name__ == "__main__":
    main()
