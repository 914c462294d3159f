"""install: fetch, verify, store, extract, dependencies, launch, then `plugin.installed`."""

from __future__ import annotations

import binascii
import logging
import time
from base64 import b64decode
from collections.abc import Callable

import anyio

from plugind.bus.delivery import Delivery
from plugind.errors import PackageNotFound, PlugindError, TooLarge
from plugind.handlers.context import HandlerContext
from plugind.handlers.decide import (
    expected_identifier_error,
    install_failed,
    install_progress,
    install_started,
    installed,
)
from plugind.handlers.finish import finish
from plugind.handlers.timing import ms_since
from plugind.installed.local_plugins import Progress
from plugind.messages import InstallCommand, PackageRef
from plugind.outage import needs_postgres
from plugind.package.difypkg import PluginPackage, read_package
from plugind.package.signature import verify_signature
from plugind.projections.package_store import get_package, store_package

log = logging.getLogger(__name__)


async def handle_install(ctx: HandlerContext, delivery: Delivery, cmd: InstallCommand) -> None:
    started = time.monotonic()
    await ctx.emitter.emit(install_started(ctx.events, cmd))

    async def progress(step: str, message: str) -> None:
        await ctx.emitter.emit(install_progress(ctx.events, cmd, step, message))

    package: PluginPackage | None = None

    def verified(found: PluginPackage) -> None:
        nonlocal package  # so a later failure can still name the plugin
        package = found

    try:
        with anyio.fail_after(ctx.settings.install_timeout):
            await _install(ctx, cmd, progress, verified)
    except (PlugindError, TimeoutError) as exc:
        failed = install_failed(
            ctx.events,
            cmd,
            exc,
            plugin_id=package.plugin_id if package else None,
            install_timeout=ctx.settings.install_timeout,
            duration_ms=ms_since(started),
        )
        if await finish(ctx, delivery, failed, log):
            ctx.metrics.install_ended(failed.event)
        return
    assert package is not None
    previous = await ctx.registry.installed(cmd.tenant_id, package.plugin_id)
    done = installed(ctx.events, cmd, package, previous=previous, duration_ms=ms_since(started))
    if await finish(ctx, delivery, done, log):
        ctx.metrics.install_ended(done.event)


async def _install(
    ctx: HandlerContext,
    cmd: InstallCommand,
    progress: Progress,
    verified: Callable[[PluginPackage], None],
) -> None:
    settings = ctx.settings
    data = await _fetch(ctx, cmd.package)
    await progress("verify", f"verifying {len(data)} bytes")
    package = await anyio.to_thread.run_sync(
        lambda: read_package(data, max_size=settings.max_package_size)
    )
    verified(package)
    if settings.verify_signature:
        signed = await anyio.to_thread.run_sync(lambda: verify_signature(data, ctx.signature_keys))
        await progress("verify", f"signature verified (signed at {signed.signed_at})")
    mismatch = expected_identifier_error(cmd, package)
    if mismatch is not None:
        raise mismatch
    await progress("store", f"storing {package.identifier} ({package.sha256[:12]})")
    with needs_postgres("storing the package", ctx.outages.postgres):
        await store_package(ctx.db, package)
    async with ctx.local.use(package.identifier, package=package, progress=progress) as local:
        await progress("launch", f"starting {package.identifier}")
        try:
            await ctx.plugins.start(local.identifier, local.workdir, local.python, local.entrypoint)
        except PlugindError:
            ctx.local.forget(package.identifier)
            raise


async def _fetch(ctx: HandlerContext, ref: PackageRef) -> bytes:
    limit = ctx.settings.max_package_size
    if ref.base64 is not None:
        if len(ref.base64) * 3 // 4 > limit:
            raise TooLarge("package_too_large", f"inline package is over the {limit}-byte limit")
        try:
            return b64decode(ref.base64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise PlugindError("invalid_package", f"package.base64 is not base64: {exc}") from exc
    if ref.sha256 is not None:
        with needs_postgres("installing from the package store", ctx.outages.postgres):
            stored = await get_package(ctx.db, ref.sha256.lower())
        if stored is None:
            raise PackageNotFound(f"no package with sha256 {ref.sha256} is in the store")
        return stored.data
    assert ref.path is not None
    inbox = (ctx.settings.plugin_dir / "packages").resolve()
    path = (inbox / ref.path).resolve()
    if not path.is_relative_to(inbox):
        raise PlugindError(
            "invalid_package", f"package.path {ref.path!r} leaves the packages inbox"
        )
    apath = anyio.Path(path)
    if not await apath.is_file():
        raise PackageNotFound(f"no package file {ref.path!r} in {inbox}")
    size = (await apath.stat()).st_size
    if size > limit:
        raise TooLarge(
            "package_too_large", f"{ref.path} is {size} bytes, over the {limit}-byte limit"
        )
    return await apath.read_bytes()
