"""The ``llm-jobs`` console script: imports the CLI inside a guard, so a bad setting is one line, not a traceback.

Importing ``actors`` reads the settings, which would raise before ``actors.cli.main`` could catch it.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run ``actors.cli.main``; an invalid setting or a Ctrl+C during start-up ends with one line."""
    from settings import ConfigurationError

    try:
        from actors.cli import main as cli_main
    except ConfigurationError as error:
        print(f"llm-jobs: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llm-jobs: interrupted", file=sys.stderr)
        return 130
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
