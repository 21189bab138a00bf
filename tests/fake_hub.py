"""A stand-in for the Hugging Face hub's HTTP API on 127.0.0.1, serving repos from local folders.

Just what huggingface_hub's `snapshot_download` asks for (repo info, recursive tree listing, HEAD/GET of
`resolve/<commit>/<file>`), so the real download code of `edgemerge.sources` runs in tests without a network.
Weights are served as LFS files (ETag = sha256), as the hub does; every request is logged in `requests`. A repo
named in `gated` answers 401 GatedRepo, as the hub does without an accepted licence; a revision other than main
or the repo's commit answers 404 RevisionNotFound.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class FakeHub:
    def __init__(self, repos: dict[str, Path], gated: tuple[str, ...] = ()):
        self.repos = {name: Path(folder) for name, folder in repos.items()}
        self.gated = set(gated)
        self.commits = {name: hashlib.sha1(name.encode()).hexdigest() for name in repos}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._serve(self)

            def do_GET(self):
                hub._serve(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def env(self, cache: Path) -> dict[str, str]:
        """Environment for a process that should use this hub and `cache` (no xet, no telemetry, no token)."""
        return {
            "HF_ENDPOINT": self.url,
            "HF_HUB_CACHE": str(cache),
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_OFFLINE": "0",
            "HF_TOKEN": "",
        }

    def fetched(self) -> list[str]:
        """Files whose content was downloaded (GET of resolve URLs), in request order."""
        return [
            r.split("/resolve/", 1)[1].split("/", 1)[1]
            for r in self.requests
            if r.startswith("GET /") and "/resolve/" in r
        ]

    def _files(self, repo: str) -> list[str]:
        root = self.repos[repo]
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        path = unquote(urlparse(h.path).path)
        self.requests.append(f"{h.command} {path}")
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo = "/".join(parts[2:4])
            if repo not in self.repos:
                return self._json(h, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            if repo in self.gated:
                return self._json(
                    h, 401, {"error": "Access to model is restricted"}, {"X-Error-Code": "GatedRepo"}
                )
            if parts[4] == "revision" and "/".join(parts[5:]) not in ("main", self.commits[repo]):
                return self._json(h, 404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
            if parts[4] == "revision":
                siblings = [{"rfilename": f} for f in self._files(repo)]
                return self._json(h, 200, {"id": repo, "sha": self.commits[repo], "siblings": siblings})
            if parts[4] == "tree":
                return self._json(h, 200, [self._entry(repo, f) for f in self._files(repo)])
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, name = "/".join(parts[:2]), "/".join(parts[4:])
            file = self.repos[repo] / name if repo in self.repos else None
            if file is None or not file.is_file():
                return self._json(h, 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
            data = file.read_bytes()
            h.send_response(200)
            h.send_header("X-Repo-Commit", self.commits[repo])
            h.send_header("ETag", f'"{self._etag(name, data)}"')
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if h.command == "GET":
                h.wfile.write(data)
            return None
        return self._json(h, 404, {"error": "not found"})

    def _entry(self, repo: str, name: str) -> dict:
        data = (self.repos[repo] / name).read_bytes()
        entry = {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
        if name.endswith((".safetensors", ".bin")):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 130}
        return entry

    @staticmethod
    def _etag(name: str, data: bytes) -> str:
        lfs = name.endswith((".safetensors", ".bin"))
        return hashlib.sha256(data).hexdigest() if lfs else hashlib.sha1(data).hexdigest()

    @staticmethod
    def _json(h: BaseHTTPRequestHandler, code: int, obj, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if h.command == "GET":
            h.wfile.write(body)
