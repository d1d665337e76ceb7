"""`edge-qwen serve`: the OpenAI-compatible HTTP server over one model (apps/server*.py)."""

from __future__ import annotations

import ipaddress
import logging
import sys
from pathlib import Path

import click

log = logging.getLogger("edge_qwen.server")

DEFAULT_CONTEXT = 4096  # tokens per conversation: 100 MB of KV cache on the 0.5B (fp32), at most
POOL_MEMORY_SHARE = 0.25  # of the memory available at start, for the pool of KV caches


@click.command()
@click.argument("model", required=False)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; 0.0.0.0 for all.")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0 picks a free one."
)
@click.option(
    "--api-key",
    envvar="EDGE_QWEN_API_KEY",
    default=None,
    help="Require 'Authorization: Bearer KEY' on every request [env: EDGE_QWEN_API_KEY].",
)
@click.option(
    "--max-context",
    type=click.IntRange(min=2),
    default=DEFAULT_CONTEXT,
    show_default=True,
    help="Tokens per conversation (prompt + answer).",
)
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=2048,
    show_default=True,
    help="Most tokens a request may ask for.",
)
@click.option(
    "--cache-slots",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Conversations whose KV cache is kept.",
)
@click.option(
    "--queue",
    "max_waiting",
    type=click.IntRange(min=0),
    default=16,
    show_default=True,
    help="Requests that may wait; more get 429.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=600.0,
    show_default=True,
    help="Seconds a request may take, waiting included.",
)
@click.option(
    "--max-body",
    type=click.IntRange(min=1024),
    default=1 << 20,
    show_default=True,
    help="Largest request body in bytes.",
)
@click.option("--provider", default="cpu", show_default=True, help="cpu, xnnpack, qnn, nnapi, coreml.")
@click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="CPU threads [default: physical cores]."
)
def serve(
    model: str | None,
    host: str,
    port: int,
    api_key: str | None,
    max_context: int,
    max_tokens: int,
    cache_slots: int,
    max_waiting: int,
    timeout: float,
    max_body: int,
    provider: str,
    threads: int | None,
) -> None:
    """Serve MODEL (a package folder or a catalog name) over OpenAI's HTTP API at /v1.

    Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health. One
    request runs at a time, the others wait their turn. Omitted sampling fields take Qwen2.5's own
    defaults (temperature 0.7, top-p 0.8, top-k 20, repetition penalty 1.05).
    """
    import edge_qwen
    from edge_qwen.apps.server import OpenAIApp
    from edge_qwen.apps.server_http import EdgeHTTPServer, HttpLimits
    from edge_qwen.apps.server_openai import Limits  # numpy and the runtime: not at `--help`
    from edge_qwen.apps.server_pool import CachePool, FairQueue
    from edge_qwen.cache import available_memory, kv_bytes_per_token
    from edge_qwen.hub import catalog

    _setup_log()
    name = model if model is not None else catalog.default_name()
    path = catalog.resolve(name)
    loaded = edge_qwen.load(path, provider=provider, threads=threads)
    if loaded.chat_template is None:
        raise edge_qwen.PackageError(f"{path} has no chat template: serve an Instruct model")
    context = min(max_context, loaded.manifest.max_context)
    available = available_memory()
    budget = (
        int(available * POOL_MEMORY_SHARE)
        if available
        else cache_slots * context * kv_bytes_per_token(loaded.config)
    )
    pool = CachePool(lambda: loaded.new_cache(context), cache_slots, budget)
    limits = Limits(max_tokens=max_tokens)
    app = OpenAIApp(loaded, Path(name).name, pool, FairQueue(max_waiting), limits)
    http = HttpLimits(max_body=max_body, request_timeout=timeout)
    try:
        server = EdgeHTTPServer((host, port), app.routes, api_key, http)
    except OSError as e:
        raise click.ClickException(f"cannot listen on {host}:{port}: {e.strerror}") from None
    if api_key is None and not _is_loopback(host):
        log.warning("listening on %s without --api-key: anyone who can reach it can use the model", host)
    bound_host, bound_port = server.server_address[:2]
    log.info(
        "serving %s at http://%s:%d/v1 (context %d, %d cache slots)",
        path.name,
        bound_host,
        bound_port,
        context,
        cache_slots,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopped")
    finally:
        server.server_close()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _setup_log() -> None:
    """The request log goes to stderr whatever -v says: it is the server's output."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
