"""User-facing errors: one readable message naming the problem and the fix, never a traceback."""

from __future__ import annotations


class TunefleetError(Exception):
    """An error caused by the user's input (recipe, data, command line, environment).

    The CLI prints ``str(error)`` and exits with `exit_code` (2: refused); no traceback is shown.
    """

    exit_code = 2
    """`layout.EXIT_REFUSED`: a check refused the run."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")

    def __reduce__(self) -> tuple:
        # pickled whole (problem and fix apart) when a worker process raises it to its parent
        return (type(self), (self.problem, self.fix))


class RecipeError(TunefleetError):
    """The recipe (YAML or --set overrides) is invalid."""


class DataError(TunefleetError):
    """The training data is missing, unreadable or malformed."""


class RunDirError(TunefleetError):
    """The output directory holds something the run must not touch or cannot continue."""


class DivergedError(TunefleetError):
    """The run's loss or gradient norm stopped being finite: it stopped there, saved nothing after."""

    exit_code = 3
    """`layout.EXIT_DIVERGED`."""
