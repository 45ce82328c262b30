"""One exception type for problems the user can fix (bad paths, bad files, bad options).

The CLI prints these as a single line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: the message names the file or option and says what is wrong."""
