"""The one kind of error a user can fix: a bad name, value, length, path or option combination.

Every such error derives from `UsageError`, whichever floor raises it: method parameters
(`config.ConfigError`), model names and weights (`models.ModelError`), task names and
data (`tasks.harness.TaskError`), and the run options checked in `stem_cli.runs`.
The CLI prints the message and exits with code 2; a Python caller catches `UsageError`.
"""


class UsageError(Exception):
    """Bad input from the user; the message says what is wrong and what is allowed."""
