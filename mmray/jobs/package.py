"""What ``mmray submit`` uploads as the job's working directory: decided here, file by file, and staged.

The package is built explicitly: :func:`package_files` walks the folder and keeps a file unless

- it is heavy and never needed on the cluster (:data:`EXCLUDES`: environments, datasets, runs, VCS, caches);
- it may hold a secret (:data:`SECRETS`: ``.ray/`` with its auth token, ``.aws/``, ``.ssh/``, ``id_*`` keys,
  ``.env*``, ``.netrc``, anything named ``*credentials*``, ``*.pem`` / ``*.key``, ...);
- a ``.gitignore`` or ``.rayignore`` in its folder or above ignores it;
- it is a symbolic link (it could point anywhere, a home folder's secrets included).

:func:`stage` copies exactly those files into a temporary folder, and that folder is what Ray zips and
uploads, so what is listed is what is sent. A package over :data:`MAX_PACKAGE_BYTES` is refused.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mmray.config.errors import UserError

# Anchored ("/data") where a package folder of the same name (mmray/data) must still go up.
EXCLUDES = (
    "/.venv", "/venv", "/.git", "/data", "/datasets", "/runs", "/build", "/dist",
    "__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache", ".ruff_cache", "*.egg-info", "node_modules",
    ".ipynb_checkpoints",
)
# Never uploaded at any depth: where credentials usually live.
SECRETS = (
    ".ray/", ".aws/", ".ssh/", ".gnupg/", ".kube/", ".docker/", ".config/gcloud/", ".azure/",
    "id_*", ".env*", ".netrc", "_netrc", ".git-credentials", ".pypirc", ".npmrc", "*credentials*",
    "secrets/", ".secrets/", "*.pem", "*.key", "*.p12", "*.pfx", "*.keystore", "auth_token",
)
IGNORE_FILES = (".gitignore", ".rayignore")
MAX_PACKAGE_BYTES = 100 * 2**20  # Ray's own limit on a working_dir is larger; a job folder needs far less


@dataclass
class Package:
    """The files of ``root`` that go up (relative paths, sorted) and what was left out and why."""

    root: str
    files: list[tuple[str, int]]  # (relative path with "/", size in bytes)
    left_out: dict[str, list[str]] = field(default_factory=dict)  # reason -> relative paths

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def summary(self) -> str:
        secrets = len(self.left_out.get("secret", []))
        ignored = len(self.left_out.get("ignored", []))
        return (f"{len(self.files)} files, {_size(self.total_bytes)} from {self.root} "
                f"(left out: {secrets} that may hold secrets, {ignored} ignored by .gitignore/.rayignore)")


def _spec(lines):
    from ray._private.thirdparty.pathspec import PathSpec  # the matcher Ray uses for .gitignore itself

    return PathSpec.from_lines("gitwildmatch", [ln for ln in lines if ln.strip() and not ln.startswith("#")])


def package_files(working_dir: str, *, max_bytes: int | None = None) -> Package:
    """The files of ``working_dir`` that ``mmray submit`` uploads (see the module docstring).

    Raises:
        UserError: the package is larger than ``max_bytes`` (default :data:`MAX_PACKAGE_BYTES`): names its size, its largest files and how to
            leave them out.
    """
    max_bytes = MAX_PACKAGE_BYTES if max_bytes is None else max_bytes
    root = Path(working_dir).resolve()
    heavy, secret = _spec(EXCLUDES), _spec(SECRETS)
    pkg = Package(str(root), [], {})

    def leave(reason: str, rel: str) -> None:
        pkg.left_out.setdefault(reason, []).append(rel)

    def walk(folder: Path, ignores: list) -> None:
        for name in IGNORE_FILES:
            f = folder / name
            if f.is_file() and not f.is_symlink():
                ignores = [*ignores, (folder, _spec(f.read_text(errors="replace").splitlines()))]
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            path = Path(entry.path)
            rel = path.relative_to(root).as_posix()
            is_dir = entry.is_dir(follow_symlinks=False)
            probe = rel + "/" if is_dir else rel
            if entry.is_symlink():
                leave("symlink", rel)
            elif secret.match_file(probe):
                leave("secret", probe)
            elif heavy.match_file(probe):
                leave("excluded", probe)
            elif any(spec.match_file(path.relative_to(base).as_posix() + ("/" if is_dir else ""))
                     for base, spec in ignores):
                leave("ignored", probe)
            elif is_dir:
                walk(path, ignores)
            elif entry.is_file(follow_symlinks=False):
                pkg.files.append((rel, entry.stat(follow_symlinks=False).st_size))

    walk(root, [])
    if pkg.total_bytes > max_bytes:
        largest = sorted(pkg.files, key=lambda f: -f[1])[:5]
        raise UserError(
            f"the job package from {root} is {_size(pkg.total_bytes)} ({len(pkg.files)} files), over the "
            f"{_size(max_bytes)} limit; largest: {', '.join(f'{r} ({_size(s)})' for r, s in largest)}. Leave "
            "them out with a .rayignore (or .gitignore) entry in that folder, or move data and models to a "
            "shared folder or s3://... and point the job there")
    return pkg


def stage(pkg: Package) -> str:
    """A new temporary folder holding exactly ``pkg``'s files (the caller deletes it); Ray uploads that."""
    out = tempfile.mkdtemp(prefix="mmray-package-")
    try:
        for rel, _ in pkg.files:
            target = os.path.join(out, *rel.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(os.path.join(pkg.root, *rel.split("/")), target)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
