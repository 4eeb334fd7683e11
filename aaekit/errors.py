"""Errors that are the user's to fix: the CLI prints them as one readable message, no traceback."""


class UserError(Exception):
    """A mistake in a recipe, a path, a plugin or a command line; the message says how to fix it."""


class RecipeError(UserError):
    """Every problem found in a recipe, reported together, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class PluginError(UserError):
    """A plugin that is broken, misspelt or clashes with another."""


class TrainingStopped(UserError):
    """Training stopped on purpose (diverging loss, interrupt); the last good checkpoint is kept."""

    def __init__(self, message: str, exit_code: int = 3):
        super().__init__(message)
        self.exit_code = exit_code
