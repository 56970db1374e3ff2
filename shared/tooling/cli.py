"""The `crier` command: run the services, the all-in-one dev stack, and admin tasks."""
from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import uuid

from shared.platform.logging import configure_logging
from shared.platform.settings import Settings, load_settings


def _require_urls(settings: Settings) -> None:
    missing = [n for n, v in (("CRIER_DATABASE_URL", settings.database_url), ("CRIER_NATS_URL", settings.nats_url)) if not v]
    if missing:
        sys.exit(f"crier: set {' and '.join(missing)} (or run `crier dev` for the embedded servers)")


def _install_secret_box(settings: Settings) -> None:
    """The services seal provider secrets with CRIER_SECRET_KEY. Without one they do not start:
    a deployment must not go on storing credentials in clear because a variable was forgotten,
    unless CRIER_ALLOW_PLAINTEXT_SECRETS says that is meant."""
    from shared.platform import secrets
    from shared.platform.logging import get_logger

    try:
        box = secrets.SecretBox.from_settings(settings)
    except ValueError as exc:
        sys.exit(f"crier: {exc}")
    if not box.can_seal:
        if not settings.allow_plaintext_secrets:
            sys.exit("crier: set CRIER_SECRET_KEY (`crier secrets key` makes one) so that provider secrets are "
                     "sealed at rest, or CRIER_ALLOW_PLAINTEXT_SECRETS=true to store them in clear")
        get_logger(__name__).warning("CRIER_SECRET_KEY is not set: provider secrets are stored in clear")
    secrets.install(box)


def cmd_api(settings: Settings, args: argparse.Namespace) -> None:
    import uvicorn

    from api_service.app import create_app

    _require_urls(settings)
    _install_secret_box(settings)
    _tune_gc()  # a contact import allocates millions of short-lived lists: 2 of its 6 CPU s on 1M CSV rows (measured)
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )


def cmd_sender(settings: Settings, args: argparse.Namespace) -> None:
    from sender_service.main import run_sender

    _require_urls(settings)
    _install_secret_box(settings)
    _tune_gc()
    asyncio.run(run_sender(settings))


def _tune_gc() -> None:
    """A sender allocates a few thousand objects per job (recipients, their attributes, messages),
    none of them in reference cycles. With the default thresholds the cyclic collector ran every
    700 allocations and its older generations walked every object the process holds. Objects
    alive at start-up are frozen out of its reach, and it runs a hundred times less often."""
    gc.freeze()
    gc.set_threshold(70_000, 20, 20)


def cmd_dev(settings: Settings, args: argparse.Namespace) -> None:
    from shared.tooling.devstack import run_dev

    run_dev(settings)


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> None:
    from shared.platform.db import migrate

    _require_db(settings)
    applied = asyncio.run(migrate(settings.database_url))
    print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else ""))


def _require_db(settings: Settings) -> None:
    if not settings.database_url:
        sys.exit("crier: set CRIER_DATABASE_URL")


async def _with_con(settings: Settings, fn):  # type: ignore[no-untyped-def]
    from shared.platform import db

    await db.migrate(settings.database_url)
    con = await db.connect(settings.database_url)
    try:
        return await fn(con)
    finally:
        await con.close()


def cmd_tenant_create(settings: Settings, args: argparse.Namespace) -> None:
    from shared.tenants import store as tenants

    _require_db(settings)
    tenant = asyncio.run(_with_con(settings, lambda con: tenants.create_tenant(con, args.name)))
    print(tenant.id)


def cmd_tenant_limits(settings: Settings, args: argparse.Namespace) -> None:
    from shared.tenants import limits

    _require_db(settings)
    tenant_id = uuid.UUID(args.id)
    changes = {name: value for name in limits.OVERRIDABLE if (value := getattr(args, name)) is not None}
    clear = limits.OVERRIDABLE if args.reset else tuple(args.clear or ())

    async def run(con):  # type: ignore[no-untyped-def]
        if changes or clear:
            return await limits.set_overrides(con, tenant_id, changes, clear=clear)
        own = await limits.get_overrides(con, tenant_id)
        if own is None:
            raise LookupError(f"no tenant {tenant_id}")
        return own

    try:
        own = asyncio.run(_with_con(settings, run))
    except (LookupError, ValueError) as exc:
        sys.exit(f"crier: {exc}")
    effective = limits.apply_overrides(limits.defaults(settings), own)
    for name in limits.OVERRIDABLE:  # what the tenant gets now, and whence
        print(f"{name} {getattr(effective, name)} ({'tenant' if name in own else 'default'})")


def cmd_token_create(settings: Settings, args: argparse.Namespace) -> None:
    from shared.tenants import store as tenants

    _require_db(settings)
    try:
        issued = asyncio.run(
            _with_con(settings, lambda con: tenants.create_token(con, uuid.UUID(args.tenant), args.scope))
        )
    except (LookupError, ValueError) as exc:
        sys.exit(f"crier: {exc}")
    print(f"token id: {issued.id}", file=sys.stderr)
    print(issued.token)  # shown once; only its SHA-256 is stored


def cmd_token_revoke(settings: Settings, args: argparse.Namespace) -> None:
    from shared.tenants import store as tenants

    _require_db(settings)
    token_id = uuid.UUID(args.id) if args.id else None
    revoked = asyncio.run(
        _with_con(settings, lambda con: tenants.revoke_token(con, token_id=token_id, token=args.token))
    )
    if not revoked:
        sys.exit("crier: no such live token")
    print("revoked")


def cmd_keys_rotate(settings: Settings, args: argparse.Namespace) -> None:
    from shared.platform import signing

    _require_db(settings)
    print(asyncio.run(_with_con(settings, signing.rotate_key)))  # the new kid; it signs from now on


def cmd_keys_retire(settings: Settings, args: argparse.Namespace) -> None:
    from shared.platform import signing

    _require_db(settings)
    if not asyncio.run(_with_con(settings, lambda con: signing.retire_key(con, args.kid))):
        sys.exit(f"crier: no live key {args.kid}")
    print(f"retired {args.kid}: its links no longer work")


def cmd_secrets_seal(settings: Settings, args: argparse.Namespace) -> None:
    from shared.channels import accounts
    from shared.platform import secrets

    _require_db(settings)
    try:
        box = secrets.SecretBox.from_settings(settings)
    except ValueError as exc:
        sys.exit(f"crier: {exc}")
    if not box.can_seal:
        sys.exit("crier: set CRIER_SECRET_KEY: the first of its keys seals")
    report = asyncio.run(_with_con(settings, lambda con: accounts.reseal_all(con, box)))
    print(f"sealed {report.sealed} value(s) stored in clear, re-sealed {report.resealed} under the first key, "
          f"{report.current} already under it")
    for exc in report.unreadable:  # each names the provider and the field, never the value
        print(f"crier: {exc}", file=sys.stderr)
    if report.unreadable:
        sys.exit(f"crier: {len(report.unreadable)} provider(s) left as they were: put the key that sealed them "
                 "back in CRIER_SECRET_KEY and run this again")


def cmd_secrets_key(settings: Settings, args: argparse.Namespace) -> None:
    from cryptography.fernet import Fernet

    print(Fernet.generate_key().decode())  # for CRIER_SECRET_KEY; shown once, kept nowhere


def cmd_rebuild(settings: Settings, args: argparse.Namespace) -> None:
    from shared.tooling.rebuild import rebuild_named

    _require_db(settings)
    count = asyncio.run(rebuild_named(settings.database_url, args.projection))
    print(f"rebuilt {args.projection} from {count} events")


def cmd_import(settings: Settings, args: argparse.Namespace) -> None:
    from shared.tooling.import_file import main as import_main

    import_main(args.file, api=args.api, token=args.token, list_name=args.list, format=args.format,
                data_dir=settings.data_path)


def cmd_bench(settings: Settings, args: argparse.Namespace) -> None:
    from cryptography.fernet import Fernet

    from shared.tooling.bench import run_bench

    # The bench's API and senders are child processes that refuse to start without a key; its
    # databases are thrown away, and so is this key.
    if not settings.secret_key:
        os.environ["CRIER_SECRET_KEY"] = Fernet.generate_key().decode()

    if args.clicks:  # GET /r/{code} on one API process (shared/tooling/bench_clicks.py)
        from shared.tooling.bench_clicks import run_click_bench

        if args.channel or args.audience != "list" or args.content != "inline" or args.import_rows:
            sys.exit("crier: --clicks runs alone (not with --channel, --audience, --content or --import-rows)")
        if args.clicks_n < 1 or (args.concurrency is not None and args.concurrency < 1):
            sys.exit("crier: --clicks-n and --concurrency must be at least 1")
        run_click_bench(args.clicks_n, args.runs, 2_000 if args.recipients is None else args.recipients,
                        50 if args.concurrency is None else args.concurrency)
        return
    if args.channel:  # an HTTP channel against a local stand-in for its provider (shared/tooling/bench_channels.py)
        from shared.tooling.bench_channels import CHANNELS, run_channel_bench

        if args.audience != "list" or args.content != "inline" or args.import_rows:
            sys.exit("crier: --audience, --content and --import-rows are for the email bench, not with --channel")
        concurrency = 10 if args.concurrency is None else args.concurrency
        if args.latency_ms < 0 or concurrency < 1:
            sys.exit("crier: --latency-ms must be 0 or more and --concurrency at least 1")
        channels = tuple(CHANNELS) if args.channel == "all" else (args.channel,)
        run_channel_bench(channels, 10_000 if args.recipients is None else args.recipients, args.runs,
                          1 if args.senders is None else args.senders, args.latency_ms, concurrency)
        return
    audiences = ("list", "segment") if args.audience == "both" else (args.audience,)
    contents = {"both": ("inline", "i18n"), "tracking": ("links", "tracked")}.get(args.content, (args.content,))
    run_bench(1_000_000 if args.recipients is None else args.recipients, args.runs,
              2 if args.senders is None else args.senders, audiences, import_rows=args.import_rows, contents=contents)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crier", description="Crier: broadcasts to whole audiences.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("dev", help="embedded Postgres + NATS, the API and one sender, a dev tenant and token").set_defaults(
        fn=cmd_dev
    )
    sub.add_parser("api", help="run the API service").set_defaults(fn=cmd_api)
    sub.add_parser("sender", help="run a sender service").set_defaults(fn=cmd_sender)
    sub.add_parser("migrate", help="apply database migrations").set_defaults(fn=cmd_migrate)

    tenant = sub.add_parser("tenant", help="manage tenants").add_subparsers(dest="action", required=True)
    create = tenant.add_parser("create", help="create a tenant; prints its id")
    create.add_argument("name")
    create.set_defaults(fn=cmd_tenant_create)
    tlimits = tenant.add_parser(
        "limits", help="show a tenant's rate limits and stream slots; with options, override the defaults for it"
    )
    tlimits.add_argument("id", help="tenant id")
    for flag, name, kind in (
        ("--requests-per-s", "requests_per_s", float), ("--burst", "burst", int),
        ("--tenant-requests-per-s", "tenant_requests_per_s", float), ("--tenant-burst", "tenant_burst", int),
        ("--progress-streams-per-token", "progress_streams_per_token", int),
        ("--progress-streams-per-tenant", "progress_streams_per_tenant", int),
    ):
        tlimits.add_argument(flag, dest=name, type=kind, help=f"this tenant's {name} (default: Settings)")
    tlimits.add_argument("--clear", action="append", metavar="NAME", help="back to the default for NAME (repeatable)")
    tlimits.add_argument("--reset", action="store_true", help="back to the defaults for all")
    tlimits.set_defaults(fn=cmd_tenant_limits)

    token = sub.add_parser("token", help="manage API tokens").add_subparsers(dest="action", required=True)
    tcreate = token.add_parser("create", help="create a token; prints it once")
    tcreate.add_argument("--tenant", required=True, help="tenant id")
    tcreate.add_argument("--scope", choices=["read", "write"], required=True)
    tcreate.set_defaults(fn=cmd_token_create)
    trevoke = token.add_parser("revoke", help="revoke a token by id or by value")
    group = trevoke.add_mutually_exclusive_group(required=True)
    group.add_argument("--id", help="token id (printed by token create)")
    group.add_argument("--token", help="the token itself")
    trevoke.set_defaults(fn=cmd_token_revoke)

    keys = sub.add_parser("keys", help="the keys that sign unsubscribe links").add_subparsers(dest="action", required=True)
    keys.add_parser("rotate", help="add a key, which signs from now on; prints its kid").set_defaults(fn=cmd_keys_rotate)
    kretire = keys.add_parser("retire", help="stop the links a key signed from working (once its mail is old enough)")
    kretire.add_argument("kid", type=int)
    kretire.set_defaults(fn=cmd_keys_retire)

    secrets = sub.add_parser("secrets", help="provider secrets, sealed at rest with CRIER_SECRET_KEY").add_subparsers(
        dest="action", required=True)
    secrets.add_parser("seal", help="seal every provider secret under the first key: those stored in clear, and "
                                    "those sealed with an older key (rotation)").set_defaults(fn=cmd_secrets_seal)
    secrets.add_parser("key", help="print a new key for CRIER_SECRET_KEY").set_defaults(fn=cmd_secrets_key)

    imp = sub.add_parser("import", help="stream a CSV or NDJSON file of contacts to the API (with a progress bar)")
    imp.add_argument("file")
    imp.add_argument("--list", metavar="NAME", help="add everyone imported to this list (created if there is none)")
    imp.add_argument("--api", default="http://127.0.0.1:8000", help="the API's base URL")
    imp.add_argument("--token", help="an API token with the write scope (default: $CRIER_TOKEN, then .crier/dev-token)")
    imp.add_argument("--format", choices=("csv", "ndjson"), help="default: from the file's name, else its first byte")
    imp.set_defaults(fn=cmd_import)

    rebuild = sub.add_parser("rebuild", help="rebuild a projection from the whole event log")
    rebuild.add_argument("projection")
    rebuild.set_defaults(fn=cmd_rebuild)
    bench = sub.add_parser("bench", help="import, list, send through the null provider (or, with --channel, an HTTP "
                                         "provider against a local stand-in); print the rates")
    bench.add_argument("--recipients", type=int, default=None,
                       help="default: 1,000,000; 10,000 with --channel; 2,000 with --clicks")
    bench.add_argument("--runs", type=int, default=1)
    bench.add_argument("--senders", type=int, default=None, help="sender processes (default: 2; 1 with --channel)")
    bench.add_argument("--channel", choices=("sms", "whatsapp", "telegram", "push", "webhook", "all"),
                       help="send on this channel through its HTTP provider (twilio, whatsapp_cloud, telegram_bot, "
                            "fcm, webhook) to a local stand-in for the provider's API, instead of email through the "
                            "null provider; `all`: each in turn")
    bench.add_argument("--latency-ms", type=float, default=50.0,
                       help="with --channel: how long the stand-in takes to answer each request")
    bench.add_argument("--concurrency", type=int, default=None,
                       help="with --channel: the provider's requests in flight per sender process (default 10); "
                            "with --clicks: connections clicking at once (default 50)")
    bench.add_argument("--clicks", action="store_true",
                       help="instead: the click endpoint (GET /r/{code}) on one API process, every click checked "
                            "recorded (shared/tooling/bench_clicks.py)")
    bench.add_argument("--clicks-n", type=int, default=20_000, metavar="N", help="with --clicks: how many clicks")
    bench.add_argument("--import-rows", type=int, default=0, metavar="N",
                       help="first stream a CSV of N contacts to POST /v1/contacts/imports (time, CPU, the API's peak "
                            "memory); with --recipients 0, only that")
    bench.add_argument("--audience", choices=("list", "segment", "both"), default="list",
                       help="send to a list, to a segment of the same people, or both in turn (each beside the bare pipeline)")
    bench.add_argument("--content", choices=("inline", "i18n", "both", "links", "tracked", "tracking"), default="inline",
                       help="the broadcast's own content, a template in three locales with a preheader, or both in turn; "
                            "`links`: the content with three links, `tracked`: the same with opens and clicks tracked, "
                            "`tracking`: those two in turn")
    bench.set_defaults(fn=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # `crier dev` is for a person at a terminal: readable logs unless asked otherwise.
    dev_defaults = {"log_format": "console"} if args.command == "dev" and "CRIER_LOG_FORMAT" not in os.environ else {}
    settings = load_settings(**dev_defaults)
    configure_logging(settings.log_format, settings.log_level)
    args.fn(settings, args)


if __name__ == "__main__":
    main()
