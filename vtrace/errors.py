"""The one error type for problems a user can fix (bad file, bad key, missing privilege).

The CLI turns a :class:`VtraceError` into one line on stderr and exit status 2; anything
else is a bug and may show a traceback.
"""

from __future__ import annotations


class VtraceError(Exception):
    """A problem the user can fix; the message is one line naming the file, line or key."""
