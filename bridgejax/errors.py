"""The error a user can fix: bad flags, config values, paths or input data.

The command-line entry points (train.py, eval.py, predict, prepare) print these as one line,
`error: <message>`, and exit with status 2; `--debug` shows the traceback too. The message names
what is wrong and how to fix it. See bridgejax.cli.USER_ERRORS for the other classes treated alike.
"""


class UserError(ValueError):
  """Bad input from the user: a config key, a path, a split, a data file."""
