"""User-facing errors: anything a user can cause ends as one line on stderr and exit status 2."""


class UserError(Exception):
    """An error the user can fix. The message names the file and what to do."""

    exit_status = 2
