"""The one exception type users see.

Anything a user can cause (a missing shard, a corrupt config, an unknown
architecture, a prompt longer than the context, a budget that cannot work)
raises `OffloadError` with the fix in its message, never a traceback from
deep inside torch.
"""


class OffloadError(Exception):
    """A problem the user can fix; the message says how."""
