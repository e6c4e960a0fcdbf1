"""The one exception type that the command line turns into a one-sentence message."""


class UserError(Exception):
    """A mistake in what the user asked for: the message says what was wrong and what to do."""
