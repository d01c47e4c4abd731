"""``delf-pipeline serve --index INDEX``: the HTTP API and web page on uvicorn.

FastAPI, uvicorn and python-multipart are in the default install; they are imported only when
the command runs, and where one is missing (a trimmed environment) the command stops with one
line naming it (exit code 2), before the index is loaded.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import socket
import threading
from contextlib import contextmanager
from typing import Iterator

from .limits import Limits, allowed_hosts

log = logging.getLogger("delf_pipeline.service")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    limits = Limits()
    parser.add_argument("--index", required=True, help="index folder from `delf-pipeline index build`")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=limits.workers,
                        help="photos searched at once, each in a thread (default: %(default)s; one per core)")
    parser.add_argument("--queue", type=int, default=limits.queue,
                        help="requests waiting beyond those; more get 503 (default: %(default)s)")
    parser.add_argument("--max-megabytes", type=_positive, default=limits.max_bytes / 1e6,
                        help="largest upload accepted (default: %(default)s)")
    parser.add_argument("--max-megapixels", type=_positive, default=limits.max_pixels / 1e6,
                        help="largest image size accepted, checked before decoding (default: %(default)s)")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="also answer requests whose Host header is NAME (repeatable; by default only the "
                             "--host address and localhost: a page of another site that resolves its name to "
                             "this address is refused)")


def _positive(text: str) -> float:
    """A finite number > 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= 1e6):
        raise argparse.ArgumentTypeError(f"must be a number above 0 and at most 1e6, got {text!r}")
    return value


#: (distribution, the module names it may be imported as); python-multipart renamed its module.
DEPENDENCIES = (("fastapi", ("fastapi",)), ("uvicorn", ("uvicorn",)),
                ("python-multipart", ("python_multipart", "multipart")))


def check_dependencies() -> None:
    """ModuleNotFoundError naming the service's missing distributions and how to install them."""
    missing = [name for name, modules in DEPENDENCIES if not any(importlib.util.find_spec(m) for m in modules)]
    if missing:
        raise ModuleNotFoundError(f"delf-pipeline serve needs {', '.join(missing)}, which this Python lacks: "
                                  f"pip install {' '.join(missing)} (or reinstall delf_pipeline, which brings them)")


def main(args: argparse.Namespace) -> int:
    check_dependencies()
    import uvicorn

    from .app import create_app

    limits = Limits(workers=args.workers, queue=args.queue, max_bytes=max(1, int(args.max_megabytes * 1e6)),
                    max_pixels=max(1, int(args.max_megapixels * 1e6)))
    sock = bind(args.host, args.port)  # before the index loads: a port in use is said at once
    app = create_app(args.index, limits, hosts=allowed_hosts(args.host, args.allow_host))
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: reachable from other machines (the API has no authentication); requests must "
                    "name an allowed host (--allow-host NAME for this machine's names)", args.host)
    log.info("serving http://%s:%d (Ctrl-C stops)", args.host, args.port)
    uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
    return 0


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; OSError naming ``host:port`` (exit 5) when it is taken."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except socket.gaierror as error:
        raise ValueError(f"--host {host!r} is not an address of this machine ({error.strerror})") from None
    except OSError as error:
        raise OSError(error.errno, error.strerror or str(error), f"{host}:{port}") from None


@contextmanager
def running(app, limit_max_requests: int | None = None, timeout: float = 60.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread on a free loopback port; yields its
    base URL and stops the server on exit. With ``limit_max_requests`` the server also stops
    by itself after that many requests (a bounded load test)."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", limit_max_requests=limit_max_requests)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(int(timeout * 20)):
            if server.started or not thread.is_alive():
                break
            thread.join(0.05)
        if not server.started:
            raise RuntimeError("uvicorn did not start")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
