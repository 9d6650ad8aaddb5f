"""Starting the server: threads, workers, the port check, the timeouts, and uvicorn."""

import functools
import json
import os
from typing import Any

from eanet.errors import ConfigError, log_to_terminal
from eanet.runtime import set_threads
from eanet.serve.app import create_app
from eanet.serve.config import CONFIG_ENV, ServeConfig, check_dependencies
from eanet.serve.model import ServedModel


def default_threads(workers: int = 1) -> int:
    """Torch threads per worker: its share of the cores, less one for HTTP and decoding.

    Measured on the 2-core machine under other load (benchmarks/serve_load.py, README): one
    torch thread served several times the requests/s of two, which waited for the busy cores.
    """
    return max(1, (os.cpu_count() or 1) // workers - 1)


def _set_threads(config: ServeConfig) -> None:
    """In the serving process only: the app factory leaves the caller's torch alone."""
    set_threads(config.threads or default_threads(config.workers))


def app_from_env() -> Any:
    """The app for one uvicorn worker process, configured from $EANET_SERVE_CONFIG."""
    log_to_terminal()
    config = ServeConfig.from_dict(json.loads(os.environ[CONFIG_ENV]))
    _set_threads(config)
    return create_app(config)


def uvicorn_options(config: ServeConfig) -> dict:
    """uvicorn.run's arguments for `config`: address, limits and timeouts."""
    from eanet.serve.protocol import ConnectionLimits, GuardedH11Protocol

    # A partial of the protocol class carries the deadlines into uvicorn (and, being picklable,
    # into each --workers process, which then counts its own connections per address).
    limits = ConnectionLimits(
        header_timeout_s=config.header_timeout_s,
        body_timeout_s=config.body_timeout_s,
        idle_timeout_s=config.keep_alive_s,
        max_connection_s=config.max_connection_s,
        max_per_ip=config.max_connections_per_ip,
    )
    http = functools.partial(GuardedH11Protocol, limits=limits)
    return {
        "host": config.host,
        "port": config.port,
        "access_log": False,  # the request guard logs one line per request
        "log_level": "info",
        "http": http,
        "timeout_keep_alive": config.keep_alive_s,
        "h11_max_incomplete_event_size": config.max_header_kb * 1024,
        "limit_concurrency": config.max_connections,
    }


def serve(config: ServeConfig) -> None:
    """Start uvicorn on `config` and serve until interrupted."""
    check_dependencies()
    import uvicorn

    _check_port(config.host, config.port)
    options = uvicorn_options(config)
    if config.workers == 1:
        _set_threads(config)
        uvicorn.run(create_app(config), **options)
        return
    # Every worker loads the model itself, and uvicorn restarts a worker that dies, for ever:
    # a device or checkpoint no worker can load would be a crash loop. Load it here once
    # first, so that those are one line and exit 2 before any worker starts.
    served = ServedModel(config.checkpoint, config.device, config.precision, accel=config.accel)
    del served
    os.environ[CONFIG_ENV] = json.dumps(config.to_dict())
    uvicorn.run("eanet.serve.server:app_from_env", factory=True, workers=config.workers, **options)


def _check_port(host: str, port: int) -> None:
    """A one-line error now for a port in use, before the model loads."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigError(f"--host {host}: cannot resolve it ({exc.strerror or exc})") from exc
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(address)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}); another server may "
                "be running there, choose another --port"
            ) from exc
