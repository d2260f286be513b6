"""`sandboxer`: run the service, and talk to it. The commands are grouped by who uses
them: `service.py` (worker, billing, dev), `sandboxes.py` (provision, destroy,
status, ls, extensions, profiles, schemas), `money.py` (credits, fin-hub) and
`operations.py` (replay, reconcile, dead letters, route explain).

Exit codes: 0 success; 1 the operation failed (one line on stderr says why);
2 bad usage.
"""

from sandboxer.cli import money, operations, sandboxes, service
from sandboxer.cli._common import app

__all__ = ["app", "main", "money", "operations", "sandboxes", "service"]


def main() -> None:
    app()
