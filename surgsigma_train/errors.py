"""Typed errors and the exit codes that tell a launcher (torchrun, the sbatch script) what to do.

    0   done
    1   InternalError or an unexpected error: a bug in surgsigma_train, not in the data or recipe -> report it
    2   ConfigError: the recipe or an override is invalid          -> fix it, do NOT retry
    3   DataError: the data a recipe names is unusable             -> fix it, do NOT retry
    4   TrainingDiverged: too many non-finite steps in a row       -> change the recipe, do NOT retry
    75  EXIT_PREEMPTED: SIGUSR2/SIGTERM, a committed checkpoint was saved -> requeue, it resumes by itself
    76  InfraError: collective timeout, lost peer, I/O failure     -> retry / requeue (resume is automatic)
"""

EXIT_PREEMPTED = 75  # EX_TEMPFAIL from sysexits.h: "try again later"


class UserError(Exception):
    exit_code = 1


class ConfigError(UserError, ValueError):
    """A recipe or override is invalid (exit code 2)."""

    exit_code = 2


class DataError(UserError, RuntimeError):
    """The data a recipe names is unusable (exit code 3)."""

    exit_code = 3


class TrainingDiverged(UserError, RuntimeError):
    """Too many consecutive optimizer steps with a non-finite loss or gradient norm (exit code 4).

    Resuming would replay the same data and diverge again: not retryable."""

    exit_code = 4


class InternalError(RuntimeError):
    """A check of the project's own invariants failed, e.g. the metadata-first token plan disagrees with the
    processor (exit code 1). Neither the data nor the recipe is at fault and a retry gives the same result: the
    message says what to report."""

    exit_code = 1


class InfraError(RuntimeError):
    """Infrastructure failure: a collective timed out or a peer died, a checkpoint could not be written
    (exit code 76). Retrying or requeueing the job is the right reaction; it resumes from the last
    committed checkpoint."""

    exit_code = 76


class Preempted(Exception):
    """All ranks saw SIGUSR2/SIGTERM, saved a committed checkpoint and stop (exit code 75)."""

    exit_code = EXIT_PREEMPTED
