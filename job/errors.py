"""Failure classes and their exit codes: part of the job's interface (README, Slurm, Kubernetes).

Schedulers act on these: 2 is never worth a retry (Kubernetes' podFailurePolicy fails the Job at
once), 75 asks for a requeue/retry, the rest are for a person to read.
"""

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_BAD_INPUT = 2
EXIT_TRAINING_FAILED = 3
EXIT_VERIFY_FAILED = 4
EXIT_PUSH_FAILED = 5
EXIT_OUT_OF_MEMORY = 6
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was written, run again to resume

EXIT_CODES = {
    EXIT_OK: "done (or nothing left to do)",
    EXIT_UNEXPECTED: "unexpected error (a bug: please report it with the log)",
    EXIT_BAD_INPUT: "bad settings or data; the message names the variable or file:row; never retried",
    EXIT_TRAINING_FAILED: "training failed (e.g. loss became NaN); checkpoints kept",
    EXIT_VERIFY_FAILED: "the merged model does not match the adapter; nothing was pushed",
    EXIT_PUSH_FAILED: "push to the Hub failed after retries; the merged model is on disk, rerun to push",
    EXIT_OUT_OF_MEMORY: "out of GPU memory; lower MICRO_BATCH_SIZE or MAX_LENGTH",
    EXIT_PREEMPTED: "stopped by a signal after writing a checkpoint; rerun (requeue) to resume",
}


class JobError(Exception):
    exit_code = EXIT_UNEXPECTED


class ConfigError(JobError):
    """A setting is wrong. The message names the variable, the value and what is allowed."""
    exit_code = EXIT_BAD_INPUT


class DataError(JobError):
    """The data is wrong. The message names the file, row and column."""
    exit_code = EXIT_BAD_INPUT


class TrainingFailed(JobError):
    exit_code = EXIT_TRAINING_FAILED


class VerifyFailed(JobError):
    exit_code = EXIT_VERIFY_FAILED


class PushFailed(JobError):
    exit_code = EXIT_PUSH_FAILED


class Preempted(JobError):
    exit_code = EXIT_PREEMPTED
