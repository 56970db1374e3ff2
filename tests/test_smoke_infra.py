"""The test database is migrated with every migration the package ships, in order, each once."""
import asyncpg

from shared.platform.db import migration_files

SHIPPED = [
    "001_event_store.sql", "002_tenants.sql", "003_broadcasts.sql", "004_contacts_lists.sql", "005_providers.sql",
    "006_sending.sql", "007_idempotency.sql", "008_audience_counts.sql", "009_held_batches.sql",
    "010_parked_events.sql", "011_rate_limits.sql", "012_fair_sending.sql", "013_unknown_outcomes.sql",
    "014_retries.sql",
    "015_contact_channels.sql",
    "016_imports.sql",
    "017_segments.sql",
    "018_suppressions.sql",
    "019_contacts_more.sql",
    "020_audiences.sql",
    "021_channels.sql",
    "022_media.sql",
    "023_templates.sql",
    "024_provider_rate_limits.sql",
    "025_provider_breakers.sql",
    "026_provider_pools.sql",
    "027_tracking.sql",
    "028_receipts.sql",
    "029_messages_reads.sql",
    "030_dashboard.sql",
    "031_contact_versions.sql",
    "032_early_receipts.sql",
]


async def test_db_is_migrated_with_every_shipped_migration(db_url):
    con = await asyncpg.connect(db_url)
    applied = [r["name"] for r in await con.fetch("SELECT name FROM schema_migrations ORDER BY name")]
    tables = {r["tablename"] for r in await con.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    await con.close()
    assert [name for name, _ in migration_files()] == SHIPPED  # the package data made it into the install
    assert applied == SHIPPED
    assert {"events", "checkpoints", "tenants", "api_tokens", "broadcasts", "contacts", "lists", "list_members",
            "providers", "batches", "messages", "runs", "broadcast_counters"} <= tables
