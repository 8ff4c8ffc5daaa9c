"""Storage paths: a local (or shared) folder, or any URI pyarrow can write (``s3://``, ``gs://``, ``file://``).

Runs, sweeps, exports and datasets all live at such a path. Everything in mmray that reads or
writes one goes through these helpers instead of ``os.path``; files mmray itself produces (TensorBoard
events, per-epoch metrics, exports, leaderboards) are written to a local staging folder and uploaded
(:class:`StagedDir`, :func:`local_output`), because most object stores cannot append to a file.

Credentials and endpoints come from the usual environment of each filesystem (for S3:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` /
``AWS_ENDPOINT_URL_S3``; for GCS: ``GOOGLE_APPLICATION_CREDENTIALS``). Ray workers on a local cluster
inherit the driver's environment; on a remote cluster set them in the cluster's environment.
No Ray here: export loading and the data reader use this module too.
"""
from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import socket
import sys
import tempfile
import threading
import time
from typing import Callable, Iterator
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from mmray.config.errors import UserError

# Free space a local storage folder (and the local staging folder) must have before a run starts:
# a few checkpoints and an export of a mid-sized model, with room to spare.
MIN_FREE_BYTES = 1 << 30

_BUCKET_SCHEMES = ("s3", "gs", "gcs")  # URIs whose path inside the filesystem is "bucket/key"
_FILESYSTEMS: dict[str, pafs.FileSystem] = {}
_LOCK = threading.Lock()


def is_uri(path: str) -> bool:
    """Whether ``path`` names a remote filesystem (``file://`` counts as local)."""
    return "://" in str(path) and not str(path).startswith("file://")


def normalize(path: str) -> str:
    """A local path made absolute (``~`` expanded, ``file://`` dropped); a URI without trailing slashes."""
    path = str(path)
    if path.startswith("file://"):
        path = urlsplit(path).path
    if is_uri(path):
        return path.rstrip("/")
    return os.path.abspath(os.path.expanduser(path))


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a local path or a URI.

    One filesystem object per bucket and process is reused (S3 resolves a bucket's region once).

    Raises:
        UserError: the URI's scheme is not supported or its filesystem cannot be opened.
    """
    path = normalize(path)
    if not is_uri(path):
        return pafs.LocalFileSystem(), path
    parts = urlsplit(path)
    if parts.scheme not in _BUCKET_SCHEMES:
        return _from_uri(path)
    key = f"{parts.scheme}://{parts.netloc}" + (f"?{parts.query}" if parts.query else "")
    with _LOCK:
        fs = _FILESYSTEMS.get(key)
        if fs is None:
            fs = _FILESYSTEMS[key] = _from_uri(key)[0]
    return fs, (parts.netloc + parts.path).rstrip("/")


def _from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        raise UserError(f"{uri}: cannot open this location: {e}") from None


def to_uri(fs: pafs.FileSystem, inner: str) -> str:
    """The path or URI naming ``inner`` on ``fs`` (Ray hands out checkpoints as a filesystem and a path in it)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return inner
    scheme = "gs" if fs.type_name == "gcs" else fs.type_name
    return f"{scheme}://{inner}"


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path or a URI (always ``/`` inside URIs)."""
    return posixpath.join(str(base), *parts) if is_uri(base) else os.path.join(base, *parts)


def split(path: str) -> tuple[str, str]:
    """``(parent, name)`` of a normalized path or URI: ``s3://b/runs/x`` -> ``("s3://b/runs", "x")``."""
    path = normalize(path)
    if is_uri(path):
        parent, _, name = path.rpartition("/")
        return parent, name
    return os.path.split(path)


def _info(path: str) -> pafs.FileInfo:
    fs, inner = resolve(path)
    return fs.get_file_info(inner)


def exists(path: str) -> bool:
    return _info(path).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    return _info(path).type == pafs.FileType.Directory


def is_file(path: str) -> bool:
    return _info(path).type == pafs.FileType.File


def listdir(path: str) -> list[str]:
    """Names directly inside folder ``path`` (sorted); empty when it does not exist."""
    fs, inner = resolve(path)
    infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    return sorted(i.base_name for i in infos)


def makedirs(path: str) -> None:
    """Create folder ``path`` and its parents (a no-op on object stores, where folders are implicit)."""
    fs, inner = resolve(path)
    fs.create_dir(inner, recursive=True)


def read_bytes(path: str) -> bytes:
    fs, inner = resolve(path)
    with fs.open_input_stream(inner) as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file (parents created); local files are replaced atomically."""
    fs, inner = resolve(path)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(inner), exist_ok=True)
        tmp = f"{inner}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, inner)
        return
    with fs.open_output_stream(inner) as f:
        f.write(data)


def _umask() -> int:
    """The process's umask, read without changing it (Linux's /proc; elsewhere the usual 0o022)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        return 0o022


def save_weights(tensors: dict, path: str, metadata: dict[str, str] | None = None) -> None:
    """``tensors`` as a safetensors file at the local ``path``, with the mode any other file written here gets
    (0666 less the umask; safetensors' ``save_file`` writes 0600): a checkpoint or an export is meant to be read by
    others. The one writer of every ``model.safetensors`` (checkpoints, exports, soups, compressed exports)."""
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def remove(path: str) -> None:
    """Delete a file or a whole folder; a missing path is fine."""
    fs, inner = resolve(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(inner)
    elif info.type == pafs.FileType.File:
        fs.delete_file(inner)


def upload(local: str, target: str) -> None:
    """Copy a local file or folder (recursively) to ``target`` (local path or URI), overwriting files there."""
    fs, inner = resolve(target)
    folder = inner if os.path.isdir(local) else (posixpath if is_uri(target) else os.path).dirname(inner)
    fs.create_dir(folder, recursive=True)
    pafs.copy_files(local, inner, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download(source: str, local: str) -> str:
    """Copy a file or folder at ``source`` (local path or URI) to the local path ``local``; returns ``local``.

    Raises:
        UserError: ``source`` does not exist.
    """
    fs, inner = resolve(source)
    kind = fs.get_file_info(inner).type
    if kind == pafs.FileType.NotFound:
        raise UserError(f"{source}: not found")
    if kind == pafs.FileType.Directory:
        os.makedirs(local, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    pafs.copy_files(inner, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


def download_tree(source: str, local: str, *, leave_out: Callable[[str], bool]) -> str:
    """Copy the folder ``source`` (local path or URI) to ``local``, except the contents of sub-folders whose
    name ``leave_out`` accepts: those are created empty (their names stay listable). Returns ``local``.

    Raises:
        UserError: ``source`` is not a folder.
    """
    fs, inner = resolve(source)
    if fs.get_file_info(inner).type != pafs.FileType.Directory:
        raise UserError(f"{source}: no such folder")
    os.makedirs(local, exist_ok=True)
    root = inner.rstrip("/")
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        rel = info.path[len(root):].lstrip("/")
        parts = rel.split("/")
        if any(leave_out(p) for p in parts[:-1]):
            continue  # inside a left-out folder
        target = os.path.join(local, *parts)
        if info.type == pafs.FileType.Directory:
            os.makedirs(target, exist_ok=True)
        elif info.type == pafs.FileType.File:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with fs.open_input_stream(info.path) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
    return local


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
    """A local path holding the file or folder ``path``: itself when local, else a temporary download."""
    if not is_uri(path):
        yield normalize(path)
        return
    with tempfile.TemporaryDirectory(prefix="mmray-download-") as tmp:
        yield download(path, os.path.join(tmp, split(path)[1] or "data"))


@contextlib.contextmanager
def local_output(path: str) -> Iterator[str]:
    """A local file path to write ``path`` to: itself when local, else a temporary file uploaded on success."""
    if not is_uri(path):
        yield normalize(path)
        return
    with tempfile.TemporaryDirectory(prefix="mmray-upload-") as tmp:
        local = os.path.join(tmp, split(path)[1])
        yield local
        upload(local, path)


class StagedDir:
    """Write files under :attr:`local`, then :meth:`sync` them to ``target`` (a local path or a URI).

    For a local target, :attr:`local` is the target itself and syncing does nothing. For a URI it is
    a private temporary folder; :meth:`sync` uploads the files that changed since the last sync
    (object stores cannot append, so a grown file is uploaded whole), and :meth:`close` syncs one last
    time and deletes the temporary folder.
    """

    def __init__(self, target: str):
        self.target = normalize(target)
        self.remote = is_uri(self.target)
        self.local = tempfile.mkdtemp(prefix="mmray-stage-") if self.remote else self.target
        self._sent: dict[str, tuple[int, int]] = {}

    def path(self, *parts: str) -> str:
        """A local path under the staging folder (parents created)."""
        p = os.path.join(self.local, *parts)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    def sync(self) -> None:
        if not self.remote:
            return
        fs, inner = resolve(self.target)
        for root, _, files in os.walk(self.local):
            for name in files:
                local = os.path.join(root, name)
                st = os.stat(local)
                stamp = (st.st_size, st.st_mtime_ns)
                if self._sent.get(local) == stamp:
                    continue
                rel = os.path.relpath(local, self.local).replace(os.sep, "/")
                dest = posixpath.join(inner, rel)
                fs.create_dir(posixpath.dirname(dest), recursive=True)
                with open(local, "rb") as src, fs.open_output_stream(dest) as out:
                    shutil.copyfileobj(src, out, length=1 << 20)
                self._sent[local] = stamp

    def close(self) -> None:
        if self.remote:
            self.sync()
            shutil.rmtree(self.local, ignore_errors=True)


LOCK_FILE = ".mmray-lock"


@contextlib.contextmanager
def folder_lock(folder: str, *, what: str, say: Callable[[str], object] | None = None) -> Iterator[None]:
    """Hold ``folder`` (a run or an experiment) for this process while the block runs.

    The lock is an exclusive ``flock`` on ``folder/.mmray-lock``, which also records the holder (pid, host,
    start time, command) for the message a second user gets. The kernel releases it when the holder dies,
    however it dies, so a lock file left behind by a killed holder is taken over, with a message naming
    that holder. It works on local disks and on shared folders whose filesystem supports locks (NFS does).
    Object stores (``s3://``, ``gs://``) have no such primitive: a URI folder is not locked.

    Raises:
        UserError: another live process holds it; names ``what``, the folder and the holder's pid and host.
    """
    if is_uri(folder):
        yield
        return
    folder = normalize(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    fd = _acquire(path, what, folder, say or (lambda m: print(f"mmray: {m}", file=sys.stderr, flush=True)))
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # still holding it: nobody can be between their open and their flock on this file
        os.close(fd)  # releases the flock


def _acquire(path: str, what: str, folder: str, say: Callable[[str], object]) -> int:
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd) or {}
            os.close(fd)
            raise UserError(
                f"{what} {folder} is in use by pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
                f"(since {holder.get('started', '?')}: {holder.get('command', '?')}); two processes in one {what} "
                f"folder would mix their checkpoints. Wait for it to end, or choose another --name") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder released and deleted it between our open and our flock: try the new file
            os.close(fd)
            continue
        previous = _holder(fd)
        if previous:
            say(f"{what} {folder}: taking over the lock of pid {previous.get('pid', '?')} on host "
                f"{previous.get('host', '?')} (since {previous.get('started', '?')}), which is no longer running")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        return fd


def _holder(fd: int) -> dict | None:
    try:
        data = os.pread(fd, 1 << 16, 0)
        return json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return None


def check_writable(path: str, *, what: str = "--storage", min_free_bytes: int = MIN_FREE_BYTES) -> None:
    """Fail before anything starts when ``path`` cannot be written or its disk is (nearly) full.

    Creates the folder if needed and writes and deletes a small probe file there (for a URI: an
    object, which also checks the bucket and the credentials). A local folder, and the local temporary
    folder every run stages checkpoints in, must have ``min_free_bytes`` free.

    Raises:
        UserError: naming ``what`` (the flag or key the path came from), the path and the reason.
    """
    target = normalize(path)
    probe = join(target, f".mmray-write-test-{os.getpid()}")
    try:
        makedirs(target)
        write_bytes(probe, b"ok")
        remove(probe)
    except UserError:
        raise
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"{what}: cannot write to {target}: {e}; choose a writable location") from None
    local_dirs = [("the local temporary folder", tempfile.gettempdir())]
    if not is_uri(target):
        local_dirs.insert(0, (target, target))
    for label, folder in local_dirs:
        free = shutil.disk_usage(folder).free
        if free < min_free_bytes:
            raise UserError(f"{what}: {label} has only {_gib(free)} free (at least {_gib(min_free_bytes)} needed "
                            f"for checkpoints and the export); free some space or choose another location")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def human_size(n: float) -> str:
    """``n`` bytes for a person: ``512 B``, ``3.4 KiB``, ``67.3 MiB``, ``1.2 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
