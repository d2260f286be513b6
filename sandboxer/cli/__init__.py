"""`sandboxer`: run the service, and talk to it. The commands are grouped by who uses
them: `service.py` (worker, billing, dev), `sandboxes.py` (provision, destroy,
status, ls, extensions, profiles, schemas), `money.py` (credits, fin-hub), `policy.py`
(usage, policy), `templates.py` (template build, ls, show) and `operations.py` (replay,
reconcile, dead letters, route explain).

Exit codes: 0 success; 1 the operation failed; 2 the command line is wrong. Either
way one line on stderr says why.
"""

import sys

import typer
from typer._click.exceptions import ClickException, UsageError  # typer vendors click
from typer.main import get_command

from sandboxer.cli import money, operations, policy, sandboxes, service, templates
from sandboxer.cli._common import app

__all__ = [
    "app",
    "main",
    "money",
    "operations",
    "policy",
    "sandboxes",
    "service",
    "templates",
]


def main() -> None:
    """Run a command; a wrong command line is one line and exit 2 (no usage box)."""
    try:
        code = get_command(app).main(prog_name="sandboxer", standalone_mode=False)
    except UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "sandboxer"
        hint = f" (see `{where} --help`)" if exc.ctx else ""
        typer.echo(f"{where}: {exc.format_message().rstrip('.')}{hint}", err=True)
        sys.exit(2)
    except ClickException as exc:
        typer.echo(f"sandboxer: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
