"""An OCI image layout directory as a backup target (image-spec image-layout.md).

On-disk layout::

    <dir>/oci-layout              {"imageLayoutVersion": "1.0.0"}; also the lock file (flock)
    <dir>/index.json              an image index; a tagged manifest carries the annotation
                                  org.opencontainers.image.ref.name = <tag>
    <dir>/blobs/sha256/<hex>      blobs and manifests, by digest
    <dir>/blobs/.strata-tmp-*     a blob being written, flock-ed by its writer while it is (removed
                                  on failure; one no process holds — a kill's leftover — is swept
                                  by the next writer, never read)

Crash safety: a blob is streamed into a temporary file in ``blobs/`` while it is hashed,
fsynced, checked against the expected digest (when one was given), then renamed to its digest
name and the directory fsynced — a blob path therefore always holds complete, verified content.
``index.json`` is rewritten the same way (temp + fsync + rename), under an exclusive ``flock`` on
``oci-layout`` so that concurrent writers do not lose each other's tags. Manifests are blobs and
are written before ``index.json`` names them. ``delete`` removes the index entry, then every blob
no remaining manifest references (mark and sweep under the same lock).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from csi.backup.media import CONFIG, INDEX, MANIFEST, check_digest, digest_bytes
from csi.backup.target import VerifyingReader
from csi.errors import DigestMismatch, InvalidArgument, NotFound
from csi.host.atomicfile import write_atomic
from csi.host.fsinfo import fsync_dir

REF_NAME = "org.opencontainers.image.ref.name"
_TMP_PREFIX = ".strata-tmp-"
_CHUNK = 1 << 20
_STALE_TMP_SECONDS = 3600  # a write_atomic temporary (unlocked, written in one go) this old is a leftover


class LayoutTarget:
    """A target on an OCI image layout directory (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike[str], *, create: bool = False) -> None:
        self.dir = Path(directory)
        self.blobs = self.dir / "blobs" / "sha256"
        marker = self.dir / "oci-layout"
        if not marker.is_file():
            if not create:
                raise NotFound(f"{self.dir} is not an OCI image layout (no oci-layout file)")
            self.blobs.mkdir(parents=True, exist_ok=True)
            if not marker.exists():
                write_atomic(marker, b'{"imageLayoutVersion":"1.0.0"}', tmp_prefix=_TMP_PREFIX)
        self.blobs.mkdir(parents=True, exist_ok=True)
        if not (self.dir / "index.json").exists():
            with self._lock():
                if not (self.dir / "index.json").exists():
                    self._write_index({"schemaVersion": 2, "mediaType": INDEX, "manifests": []})

    def location(self) -> str:
        return f"oci-layout:{self.dir}"

    def close(self) -> None:
        return None

    # ------------------------------------------------------------------ helpers

    @contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.dir / "oci-layout", "rb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _blob_path(self, digest: str) -> Path:
        return self.blobs / check_digest(digest).split(":", 1)[1]

    def _read_index(self) -> dict[str, Any]:
        try:
            obj = json.loads((self.dir / "index.json").read_bytes())
        except FileNotFoundError:
            return {"schemaVersion": 2, "mediaType": INDEX, "manifests": []}
        except ValueError as exc:
            raise InvalidArgument(f"{self.dir}/index.json is not JSON: {exc}") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get("manifests", []), list):
            raise InvalidArgument(f"{self.dir}/index.json is not an image index")
        obj.setdefault("manifests", [])
        return obj

    def _write_index(self, index: dict[str, Any]) -> None:
        write_atomic(self.dir / "index.json", json.dumps(index, sort_keys=True, indent=1).encode(), tmp_prefix=_TMP_PREFIX)

    def _sweep_tmp(self) -> None:
        """Remove blob temporaries no writer holds (their writer died), and old unlocked
        temporaries of manifest writes."""
        for path in (self.dir / "blobs").glob(f"{_TMP_PREFIX}*"):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    path.unlink()
            except (BlockingIOError, FileNotFoundError):
                pass  # a live writer holds it, or it is gone
            finally:
                os.close(fd)
        cutoff = time.time() - _STALE_TMP_SECONDS
        for path in self.blobs.glob(f"{_TMP_PREFIX}*"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except FileNotFoundError:
                pass

    def _locked_tmp(self) -> tuple[Path, int]:
        """A new blob temporary, flock-ed (a sweeper that got to it first makes us take another)."""
        while True:
            tmp = self.dir / "blobs" / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                    return tmp, fd
            except FileNotFoundError:
                pass
            os.close(fd)

    # ------------------------------------------------------------------ blobs

    def has_blob(self, digest: str) -> bool:
        return self._blob_path(digest).is_file()

    def mount_blob(self, digest: str, from_locations: list[str]) -> bool:
        return self.has_blob(digest)

    def put_blob(self, stream: IO[bytes], expected: str | None = None) -> tuple[str, int]:
        if expected is not None and self.has_blob(expected):
            return expected, self._blob_path(expected).stat().st_size
        self._sweep_tmp()
        tmp, fd = self._locked_tmp()
        h, size = hashlib.sha256(), 0
        f = open(fd, "wb")  # closed (and the lock dropped) only after the rename
        try:
            while True:
                chunk = stream.read(_CHUNK)
                if not chunk:
                    break
                h.update(chunk)
                f.write(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
            digest = "sha256:" + h.hexdigest()
            if expected is not None and digest != expected:
                raise DigestMismatch(f"blob written to {self.dir} hashes to {digest}, expected {expected}")
            final = self._blob_path(digest)
            if final.exists():
                tmp.unlink()
            else:
                os.replace(tmp, final)
                fsync_dir(self.blobs)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            f.close()
        return digest, size

    def open_blob(self, digest: str, size: int | None = None) -> IO[bytes]:
        path = self._blob_path(digest)
        try:
            raw = open(path, "rb")
        except FileNotFoundError as exc:
            raise NotFound(f"blob {digest} is not in {self.dir}") from exc
        return VerifyingReader(raw, digest, size, f"blob {digest} of {self.dir}")  # type: ignore[return-value]

    # ------------------------------------------------------------------ manifests

    def put_manifest(self, data: bytes, tag: str | None) -> str:
        digest = digest_bytes(data)
        path = self._blob_path(digest)
        if not path.exists():
            write_atomic(path, data, tmp_prefix=_TMP_PREFIX)
        with self._lock():
            index = self._read_index()
            keep = []
            for entry in index["manifests"]:
                name = (entry.get("annotations") or {}).get(REF_NAME)
                if tag is not None and name == tag:
                    continue  # the tag moves to the new manifest
                if name is None and entry.get("digest") == digest:
                    continue  # re-added below
                keep.append(entry)
            new: dict[str, Any] = {"mediaType": MANIFEST, "digest": digest, "size": len(data)}
            if tag is not None:
                new["annotations"] = {REF_NAME: tag}
            keep.append(new)
            index["manifests"] = keep
            self._write_index(index)
        return digest

    def _resolve(self, tag_or_digest: str) -> str:
        if tag_or_digest.startswith("sha256:"):
            return check_digest(tag_or_digest)
        for entry in self._read_index()["manifests"]:
            if (entry.get("annotations") or {}).get(REF_NAME) == tag_or_digest:
                return check_digest(entry.get("digest"), "index.json digest")
        raise NotFound(f"tag {tag_or_digest!r} is not in {self.dir}")

    def get_manifest(self, tag_or_digest: str) -> tuple[bytes, str]:
        digest = self._resolve(tag_or_digest)
        try:
            data = self._blob_path(digest).read_bytes()
        except FileNotFoundError as exc:
            raise NotFound(f"manifest {digest} is not in {self.dir}") from exc
        if digest_bytes(data) != digest:
            raise DigestMismatch(f"manifest {digest} in {self.dir} is corrupt")
        return data, digest

    def delete(self, tag_or_digest: str) -> None:
        with self._lock():
            index = self._read_index()
            if tag_or_digest.startswith("sha256:"):
                check_digest(tag_or_digest)
                index["manifests"] = [e for e in index["manifests"] if e.get("digest") != tag_or_digest]
            else:
                index["manifests"] = [e for e in index["manifests"]
                                      if (e.get("annotations") or {}).get(REF_NAME) != tag_or_digest]
            self._write_index(index)
            self._collect_garbage(index)

    def _collect_garbage(self, index: dict[str, Any]) -> None:
        live: set[str] = set()
        for entry in index["manifests"]:
            digest = entry.get("digest")
            if not isinstance(digest, str):
                continue
            live.add(digest)
            try:
                manifest = json.loads(self._blob_path(digest).read_bytes())
            except (FileNotFoundError, ValueError, InvalidArgument):
                continue
            for desc in [manifest.get("config") or {}, *(manifest.get("layers") or [])]:
                if isinstance(desc, dict) and isinstance(desc.get("digest"), str):
                    live.add(desc["digest"])
        for path in self.blobs.iterdir():
            if f"sha256:{path.name}" not in live:
                path.unlink(missing_ok=True)


__all__ = ["CONFIG", "LayoutTarget", "REF_NAME"]
