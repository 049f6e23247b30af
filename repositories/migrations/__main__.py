"""``python -m repositories.migrations [URL]``: upgrade a database (default ``DATABASE_URL``) to the newest schema."""

from __future__ import annotations

import logging
import sys

from repositories.migrations import current_revision, upgrade_database
from repositories.store import create_store_engine


def main(argv: list[str]) -> int:
    """Upgrade the database named by the argument, or by the settings, and print its revision."""
    if len(argv) > 1:
        print("usage: python -m repositories.migrations [DATABASE_URL]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv:
        url = argv[0]
    else:
        from settings import load_settings

        url = load_settings().database_url
    engine = create_store_engine(url)
    upgrade_database(engine)
    print(f"database at revision {current_revision(engine)}")
    engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
