"""User-facing errors: anything a user can cause ends as one line on stderr and exit status 2."""

import os
import sys


class UserError(Exception):
    """An error the user can fix. The message names the file and what to do."""

    exit_status = 2


def describe_unexpected(exc: BaseException) -> tuple[str, int]:
    """One line and an exit status for an exception that is not a UserError.

    OSError (permission denied, disk full, a file vanishing) is the user's environment: status 2,
    naming the file. Anything else is a bug in rwkv2rknn: status 1 and a request to report it; set
    RWKV2RKNN_DEBUG=1 to get the traceback instead.
    """
    if isinstance(exc, OSError):
        where = exc.filename if exc.filename is not None else "file system"
        return f"{where}: {exc.strerror or exc}; check the path, its permissions and the free space", 2
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return (f"internal error ({type(exc).__name__}: {first}); please report it with the command line; "
            "RWKV2RKNN_DEBUG=1 shows the traceback"), 1


def run_guarded(prog: str, fn, *args) -> int:
    """Call a command's body; turn every way it can fail into one line on stderr and an exit status."""
    try:
        return int(fn(*args) or 0)
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `... | head` closed the pipe: not an error
        return 0
    except Exception as exc:  # no traceback reaches a user unless asked for
        if os.environ.get("RWKV2RKNN_DEBUG"):
            raise
        msg, status = describe_unexpected(exc)
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return status
