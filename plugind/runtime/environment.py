"""A plugin's virtual environment, built with uv.

``uv venv`` plus ``uv pip install -r requirements.txt`` takes about a second with a warm uv
cache, against ten with pip, which matters because every node builds every plugin it runs.
A marker written last (a hash of the requirements, the interpreter and the install options)
tells a finished environment from a half-built one, which is thrown away and rebuilt.
Builds of one folder are serialised with a file lock, so two installs, or two daemons on one
disk, never build into the same ``.venv`` at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import anyio.abc
import uv

from plugind.errors import PlugindError
from plugind.runtime._env import uv_env

log = logging.getLogger(__name__)

VENV = ".venv"
MARKER = ".plugind-env"  # inside the venv, written last
LOCK = ".venv.lock"  # beside the venv
_TAIL_LINES = 40
_PROGRESS_PREFIXES = ("Using ", "Resolved ", "Prepared ", "Installed ", "Audited ", "Uninstalled ")

Progress = Callable[[str], Awaitable[None]]


def venv_python(workdir: Path) -> Path:
    return workdir / VENV / "bin" / "python"


def _requirements(workdir: Path) -> Path:
    for name in ("requirements.txt", "pyproject.toml"):
        path = workdir / name
        if path.is_file():
            return path
    raise PlugindError(
        "dependency_install_failed",
        f"{workdir} has neither requirements.txt nor pyproject.toml; "
        "a plugin needs at least the dify-plugin SDK",
    )


def _fingerprint(requirements: Path, python: Path, index_url: str | None, offline: bool) -> str:
    digest = hashlib.sha256()
    for part in (
        requirements.name.encode(),
        requirements.read_bytes(),
        str(python).encode(),
        (index_url or "").encode(),
        b"offline" if offline else b"online",
    ):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()


def _is_ready(workdir: Path, fingerprint: str) -> bool:
    try:
        return (workdir / VENV / MARKER).read_text("ascii").strip() == fingerprint and venv_python(
            workdir
        ).exists()
    except (OSError, UnicodeDecodeError):
        return False


@contextlib.asynccontextmanager
async def _folder_lock(workdir: Path) -> AsyncIterator[None]:
    """An exclusive ``flock`` on ``workdir/.venv.lock``, polled so waiting stays cancellable."""
    fd = os.open(workdir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await anyio.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


async def ensure_environment(
    workdir: Path,
    python: Path,
    *,
    index_url: str | None = None,
    offline: bool = False,
    timeout: float = 600,
    on_progress: Progress | None = None,
) -> Path:
    """Build ``workdir/.venv`` unless it is already built for these inputs; its python.

    ``offline`` installs without a network (``--offline``): from the wheels the package ships
    in ``wheels/`` when it has that folder (``--no-index --find-links``), else from uv's
    cache. Failure, including ``timeout``, raises ``dependency_install_failed`` with the end
    of uv's output.
    """
    workdir = Path(workdir)
    requirements = _requirements(workdir)
    fingerprint = _fingerprint(requirements, python, index_url, offline)
    if _is_ready(workdir, fingerprint):
        return venv_python(workdir)
    started = time.monotonic()
    try:
        with anyio.fail_after(timeout):
            async with _folder_lock(workdir):
                if _is_ready(workdir, fingerprint):
                    return venv_python(workdir)
                await _build(workdir, python, requirements, index_url, offline, on_progress)
                marker = workdir / VENV / MARKER
                marker.with_suffix(".tmp").write_text(fingerprint, "ascii")
                marker.with_suffix(".tmp").replace(marker)
    except TimeoutError:
        raise PlugindError(
            "dependency_install_failed",
            f"building the environment of {workdir.name} took longer than {timeout:.0f}s",
        ) from None
    elapsed = time.monotonic() - started
    log.info("Plugin environment built: %s in %.1fs", workdir.name, elapsed)
    if on_progress is not None:
        await on_progress(f"environment ready in {elapsed:.1f}s")
    return venv_python(workdir)


async def _build(
    workdir: Path,
    python: Path,
    requirements: Path,
    index_url: str | None,
    offline: bool,
    on_progress: Progress | None,
) -> None:
    venv = workdir / VENV
    if venv.exists():
        await anyio.to_thread.run_sync(shutil.rmtree, venv)
    if on_progress is not None:
        await on_progress(f"creating a virtual environment with {python}")
    await _uv(
        ["venv", "--no-config", "--no-python-downloads", "--python", str(python), str(venv)],
        workdir,
        on_progress,
    )
    install = ["pip", "install", "--no-config", "--python", str(venv_python(workdir))]
    install += ["-r", str(requirements)]
    if index_url:
        install += ["--index-url", index_url]
    if offline:
        install.append("--offline")
        wheels = workdir / "wheels"
        if wheels.is_dir():
            install += ["--no-index", "--find-links", str(wheels)]
    if on_progress is not None:
        await on_progress(f"installing dependencies from {requirements.name}")
    await _uv(install, workdir, on_progress)


async def _uv(args: list[str], workdir: Path, on_progress: Progress | None) -> None:
    """Run uv; its stderr lines feed progress and, on failure, the error message."""
    command = [uv.find_uv_bin(), *args]
    tail: deque[str] = deque(maxlen=_TAIL_LINES)

    async def read_lines(stream: anyio.abc.ByteReceiveStream | None, progress: bool) -> None:
        if stream is None:
            return
        pending = b""
        async for chunk in stream:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                await handle(raw.decode("utf-8", "replace").rstrip(), progress)
        if pending:
            await handle(pending.decode("utf-8", "replace").rstrip(), progress)

    async def handle(line: str, progress: bool) -> None:
        if not line:
            return
        tail.append(line)
        if progress and on_progress is not None and line.startswith(_PROGRESS_PREFIXES):
            await on_progress(line)

    try:
        async with await anyio.open_process(
            command, stdin=subprocess.DEVNULL, cwd=workdir, env=uv_env(), start_new_session=True
        ) as process:
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(read_lines, process.stdout, False)
                    tg.start_soon(read_lines, process.stderr, True)
                    returncode = await process.wait()
            except BaseException:
                # uv's own children (sdist builds) share its process group: end them too.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                raise
    except OSError as exc:
        raise PlugindError("dependency_install_failed", f"cannot run uv: {exc}") from None
    if returncode != 0:
        output = "\n".join(tail)
        raise PlugindError(
            "dependency_install_failed",
            f"uv {args[0]}{' ' + args[1] if args[0] == 'pip' else ''} failed "
            f"(exit {returncode}): {output[-2000:]}",
        )
