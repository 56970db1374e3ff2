import asyncpg


async def test_db_is_migrated(db_url):
    con = await asyncpg.connect(db_url)
    n = await con.fetchval("SELECT count(*) FROM schema_migrations")
    await con.close()
    assert n >= 2
