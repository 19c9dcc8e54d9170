"""`fedhydra llm serve`: the embedded GGUF as an OpenAI-compatible endpoint (llama-cpp-python's server)."""

from __future__ import annotations

import ipaddress
import sys
import threading
import time
from pathlib import Path

from .embedded import LLAMA_CPP_PIP, default_gguf_path

SERVED_MODEL_ALIAS = "smollm2-135m"


def is_loopback_host(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(host: str = "127.0.0.1", port: int = 8765, model_path: str | Path | None = None, n_threads: int = 2,
          allow_remote: bool = False, n_ctx: int = 2048) -> None:
    """Serve the model at http://host:port/v1 until interrupted; refuses a non-loopback host unless allow_remote.

    Prints "serving <model> at http://host:port/v1" once the server accepts connections.
    """
    if not is_loopback_host(host) and not allow_remote:
        raise ValueError(f"refusing to serve the LLM on {host}: it is not a loopback address and the server has "
                         "no authentication; pass --allow-remote to expose it to the network")
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535, got {port}")
    if n_threads < 1:
        raise ValueError(f"--threads must be >= 1, got {n_threads}")
    path = Path(model_path) if model_path is not None else default_gguf_path()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF model file not found: {path}")
    try:
        import uvicorn
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError as exc:
        raise ModuleNotFoundError(f"`fedhydra llm serve` needs llama-cpp-python's server extra: "
                                  f"`{LLAMA_CPP_PIP}` ({exc})") from exc

    app = create_app(
        server_settings=ServerSettings(host=host, port=port),
        model_settings=[ModelSettings(model=str(path), model_alias=SERVED_MODEL_ALIAS, n_ctx=n_ctx,
                                      n_threads=n_threads, n_threads_batch=n_threads, verbose=False)],
    )
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    shown_host = f"[{host}]" if ":" in host else host

    def announce() -> None:
        # uvicorn sets `started` once its sockets listen; with port 0 the real port is only known then.
        while not server.started and not server.should_exit:
            time.sleep(0.02)
        if server.started:
            bound = port
            for s in getattr(server, "servers", []) or []:
                for sock in getattr(s, "sockets", []) or []:
                    bound = sock.getsockname()[1]
            print(f"serving {SERVED_MODEL_ALIAS} ({path.name}) at http://{shown_host}:{bound}/v1", flush=True)

    threading.Thread(target=announce, name="announce-ready", daemon=True).start()
    server.run()  # main thread, so uvicorn's SIGINT/SIGTERM handlers shut it down cleanly
    if not server.started:
        print(f"fedhydra: could not serve on {host}:{port} (see the error above)", file=sys.stderr)
