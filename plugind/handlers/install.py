"""install: fetch, verify, store, extract, dependencies, launch, then `plugin.installed`."""

from __future__ import annotations

import binascii
import logging
import time
from base64 import b64decode
from collections.abc import Callable

import anyio

from plugind.bus.delivery import Delivery
from plugind.bus.emit import RegistryChange
from plugind.errors import PlugindError
from plugind.handlers.context import HandlerContext
from plugind.handlers.timing import ms_since
from plugind.installed.local_plugins import Progress
from plugind.messages import (
    InstallCommand,
    Installed,
    InstallFailed,
    InstallProgress,
    InstallStarted,
    PackageRef,
)
from plugind.package.difypkg import PluginPackage, read_package
from plugind.package.signature import verify_signature
from plugind.projections.package_store import get_package, store_package

log = logging.getLogger(__name__)


async def handle_install(ctx: HandlerContext, delivery: Delivery, cmd: InstallCommand) -> None:
    started = time.monotonic()
    events = ctx.events
    rid, tenant = cmd.request_id, cmd.tenant_id
    await ctx.emitter.emit(
        events(InstallStarted, request_id=rid, tenant_id=tenant, source=cmd.package.describe())
    )

    async def progress(step: str, message: str) -> None:
        await ctx.emitter.emit(
            events(InstallProgress, request_id=rid, tenant_id=tenant, step=step, message=message)
        )

    package: PluginPackage | None = None

    def verified(found: PluginPackage) -> None:
        nonlocal package  # so a later failure can still name the plugin
        package = found

    try:
        with anyio.fail_after(ctx.settings.install_timeout):
            await _install(ctx, cmd, progress, verified)
    except (PlugindError, TimeoutError) as exc:
        error = (
            exc
            if isinstance(exc, PlugindError)
            else PlugindError(
                "timeout", f"install did not finish within {ctx.settings.install_timeout:g}s"
            )
        )
        duration_ms = ms_since(started)
        plugin_id = package.plugin_id if package else None
        await ctx.emitter.terminal(
            delivery,
            events(
                InstallFailed,
                request_id=rid,
                tenant_id=tenant,
                plugin_id=plugin_id,
                error=error.info(),
                duration_ms=duration_ms,
            ),
        )
        log.warning(
            "Plugin install failed: %s, request_id=%s, code=%s, error=%s",
            plugin_id or cmd.package.describe(),
            rid,
            error.code,
            error.message,
        )
        return
    assert package is not None
    previous = await ctx.registry.installed(tenant, package.plugin_id)
    upgraded_from = previous if previous and previous != package.identifier else None
    duration_ms = ms_since(started)
    committed = await ctx.emitter.terminal(
        delivery,
        events(
            Installed,
            request_id=rid,
            tenant_id=tenant,
            plugin_id=package.plugin_id,
            identifier=package.identifier,
            version=package.version,
            checksum=package.checksum,
            manifest=package.summary(),
            upgraded_from=upgraded_from,
            duration_ms=duration_ms,
        ),
        registry=RegistryChange("set", tenant, package.plugin_id, package.identifier),
    )
    if committed is None:
        return
    log.info(
        "Plugin installed: %s, tenant=%s, request_id=%s, duration=%.1fs%s",
        package.identifier,
        tenant,
        rid,
        duration_ms / 1000,
        f", upgraded_from={upgraded_from}" if upgraded_from else "",
    )
    if upgraded_from and not await ctx.registry.in_use(upgraded_from):
        await ctx.plugins.stop(upgraded_from)


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
    if cmd.expected_identifier is not None and cmd.expected_identifier != package.identifier:
        raise PlugindError(
            "checksum_mismatch",
            f"package is {package.identifier}, expected {cmd.expected_identifier}",
        )
    await progress("store", f"storing {package.identifier} ({package.sha256[:12]})")
    await store_package(ctx.db, package)
    local = await ctx.local.ensure(package.identifier, package=package, progress=progress)
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
            raise PlugindError(
                "package_too_large", f"inline package is over the {limit}-byte limit"
            )
        try:
            return b64decode(ref.base64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise PlugindError("invalid_package", f"package.base64 is not base64: {exc}") from exc
    if ref.sha256 is not None:
        stored = await get_package(ctx.db, ref.sha256.lower())
        if stored is None:
            raise PlugindError(
                "package_not_found", f"no package with sha256 {ref.sha256} is in the store"
            )
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
        raise PlugindError("package_not_found", f"no package file {ref.path!r} in {inbox}")
    size = (await apath.stat()).st_size
    if size > limit:
        raise PlugindError(
            "package_too_large", f"{ref.path} is {size} bytes, over the {limit}-byte limit"
        )
    return await apath.read_bytes()
