"""A warm ClientApp executor for one SuperNode started with `flower-supernode --isolation process`.

Why: with Flower's default subprocess isolation, every message makes the SuperNode's SuperExec
start a fresh `flwr-clientapp` interpreter, which imports torch, transformers and flwr (about 5 s
of CPU on this machine) before it does any work. This process imports all of that once, then
runs Flower's own SuperExec loop (`run_superexec`: acquire a task from the SuperNode's Runtime
API, launch it) with an executor that launches a task by forking this warm process. The child
runs Flower's own `run_clientapp` (pull the message, run the ClientApp, push the reply) and
exits, as a `flwr-clientapp` process does. Each task still gets a process of its own, so a
crash or a leak in one ClientApp cannot touch the next. (In `ps`, a ClientApp shows its
executor's command line; the executor logs each one's pid and task id.)

Fork safety: this parent only imports. It runs no torch op, loads no model, tokenizer or LLM,
so no OpenMP, tokenizers or llama.cpp thread pool exists when it forks (numpy's OpenBLAS pool,
started at import, is shut down across fork by OpenBLAS's own atfork handler). The ClientApp
sets its torch threads in the child, from the node config (`threads`), per message.

Security: the Runtime API must be on loopback (checked). It is plain HTTP, as between a SuperNode
and the SuperExec it starts itself in subprocess mode (Flower passes `--insecure` there too):
loopback traffic never leaves the machine. Getting a task, and with it the token that authorizes
every other call of that task, needs Flower's SuperExec HMAC authentication with the secret that
the SuperNode got (`--superexec-auth-secret-file`), so another local process cannot take the
node's tasks. Flower ignores that secret in subprocess mode.

Flower internals (flwr is pinned to 1.41.0, which has no public hook for a custom executor; its
`--executor` knows only `subprocess` and `kubernetes`):
- `flwr.supercore.superexec.run_superexec.get_executor` is replaced to hand in ForkExecutor;
- `flwr.supercore.exit.exit_handler.registered_exit_handlers` is emptied in the child, or the
  parent's handlers (close its HTTP client, stop this executor) would run when the child exits.

Run: python -m fedhydra.client.executor --runtime-api-address 127.0.0.1:PORT
     --superexec-auth-secret-file FILE --parent-pid SUPERNODE_PID
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
import time
import traceback
from logging import INFO, WARNING

# The processes that read these lines: server/deployment.py waits for READY, counts LAUNCHED.
READY = "FedHydra executor ready"
LAUNCHED = "Forked ClientApp process"


def warm_up() -> None:
    """Import what every ClientApp needs: Flower's ClientApp runtime, torch, transformers' BERT,
    llama.cpp's bindings and FedHydra's ClientApp. Imports only: nothing that starts threads."""
    import llama_cpp  # noqa: F401  (the embedded LLM's bindings; the model loads in the child)
    import torch  # noqa: F401
    import transformers.models.bert.modeling_bert  # noqa: F401  (the classes AutoModel and AutoTokenizer pick)
    import transformers.models.bert.tokenization_bert  # noqa: F401
    from transformers import AutoModel, AutoTokenizer  # noqa: F401

    import fedhydra.client.client_app  # noqa: F401  (load_app reuses it: it is in sys.modules)
    import fedhydra.common.llm.embedded  # noqa: F401
    import flwr.supernode.runtime.run_clientapp  # noqa: F401


def _run_task(spec) -> None:
    """In the forked child: Flower's `flwr-clientapp` for one task, then leave without running the
    parent's exit code (os._exit, as multiprocessing's forked children do)."""
    code = 1
    try:
        from flwr.supercore.exit import exit_handler
        from flwr.supercore.tls import validate_and_resolve_root_certificates
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        signal.signal(signal.SIGINT, signal.default_int_handler)  # run_clientapp installs its own
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        exit_handler.registered_exit_handlers.clear()  # the parent's, not this task's
        run_clientapp(runtime_api_address=spec.runtime_api_address, token=spec.token, insecure=spec.insecure,
                      certificates=validate_and_resolve_root_certificates(spec.root_certificates_path,
                                                                          spec.insecure),
                      parent_pid=spec.parent_pid, runtime_dependency_install=spec.runtime_dependency_install)
        code = 0
    except SystemExit as exc:  # run_clientapp always ends with flwr_exit -> sys.exit(0 or 1)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001  (the child must never return into the parent's loop)
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class ForkExecutor:
    """Flower's Executor protocol (flwr.supercore.superexec.executor.types): one forked child of
    this warm process per ClientApp task; finished children are reaped between polls."""

    def __init__(self):
        self.owner = os.getpid()
        self.children: dict[int, int] = {}  # pid -> task id

    def get_eligible_capacity(self, supported_task_types, *, insecure=False, root_certificates_path=None):
        from flwr.supercore.constant import TaskType

        return set(supported_task_types) & {TaskType.CLIENT_APP}, set()  # a SuperNode runs ClientApps only

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure=False, root_certificates_path=None):
        """No capacity gate, as Flower's SubprocessExecutor."""

    def launch(self, spec):
        from flwr.supercore import log
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed(f"this executor runs ClientApps only, not {spec.task_type}")
        sys.stdout.flush()  # or the child would write the parent's buffered lines again
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            return LaunchResult.failed(f"fork failed: {exc}")
        if pid == 0:
            _run_task(spec)  # never returns
        self.children[pid] = spec.task_id
        log(INFO, "%s %d for task %d", LAUNCHED, pid, spec.task_id)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        from flwr.supercore import log

        for pid, task_id in list(self.children.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                del self.children[pid]
                code = os.waitstatus_to_exitcode(status)
                if code:
                    log(WARNING, "ClientApp process %d (task %d) exited with %d", pid, task_id, code)

    def close(self, grace: float = 5.0) -> None:
        """Stop the running ClientApps (they push a failed status, as on SIGTERM to flwr-clientapp)."""
        if os.getpid() != self.owner:
            return
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while self.children and time.monotonic() < deadline:
            self.reconcile()
            time.sleep(0.1)
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        self.children.clear()


def loopback_address(address: str) -> str:
    """`address` (host:port) if its host is a loopback address, else a ValueError."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not sep or not port.isdigit() or not loopback:
        raise ValueError(f"--runtime-api-address {address!r}: expected a loopback HOST:PORT such as 127.0.0.1:9094")
    return address


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedhydra.client.executor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-api-address", required=True, type=loopback_address,
                        help="the SuperNode's Runtime API (its --host/--port), on loopback")
    parser.add_argument("--superexec-auth-secret-file", default=None,
                        help="the secret the SuperNode was given (raw bytes); without it, tasks are acquired unsigned")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="exit when this process (the SuperNode) is gone")
    args = parser.parse_args(argv)

    import importlib

    from flwr.supercore import log
    from flwr.supercore.auth import load_superexec_auth_secret

    superexec = importlib.import_module("flwr.supercore.superexec.run_superexec")  # the module, not the function

    secret = load_superexec_auth_secret(args.superexec_auth_secret_file)
    t0 = time.perf_counter()
    warm_up()
    log(INFO, "%s (imports took %.1f s); Runtime API %s", READY, time.perf_counter() - t0, args.runtime_api_address)
    executor = ForkExecutor()
    superexec.get_executor = lambda *_args, **_kwargs: executor  # see the module docstring
    superexec.run_superexec(runtime_api_address=args.runtime_api_address, insecure=True,
                            superexec_auth_secret=secret, parent_pid=args.parent_pid,
                            runtime_dependency_install=False)


if __name__ == "__main__":
    main()
