"""The one exception type for mistakes a user can fix (bad config value, missing file, malformed input).

run.py prints these as a short message without a traceback; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: the message names the file, key or value and what to do."""
