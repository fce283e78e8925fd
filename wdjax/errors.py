"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class WdjaxError(Exception):
  """A problem the user can fix (bad input, missing asset, corrupt file, diverged run).

  The message is one line that says what is wrong and what to do about it.
  """
