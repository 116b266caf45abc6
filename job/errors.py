"""Failure classes and their exit codes: part of the job's interface (README, Slurm, Kubernetes).

Schedulers act on these: 2 and 6 are never worth a retry, which would meet the same settings again
(Kubernetes' podFailurePolicy fails the Job at once), 75 asks for a requeue/retry, the rest are for a
person to read.
"""

import sys

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
    EXIT_BAD_INPUT: "bad settings or data, or OUTPUT_DIR in use, full or read-only; the message names the variable, "
                    "file:row or path; never retried",
    EXIT_TRAINING_FAILED: "training failed (e.g. loss became NaN); checkpoints kept",
    EXIT_VERIFY_FAILED: "the merged model does not match the adapter; nothing was pushed",
    EXIT_PUSH_FAILED: "push to the Hub failed after retries; the merged model is on disk, rerun to push",
    EXIT_OUT_OF_MEMORY: "out of GPU memory; the message names the stage and what to lower (MICRO_BATCH_SIZE, "
                        "MAX_LENGTH; MERGE_DEVICE=cpu for the merge); never retried",
    EXIT_PREEMPTED: "stopped by a signal after writing a checkpoint; rerun (requeue) to resume",
}


class JobError(Exception):
    exit_code = EXIT_UNEXPECTED


class ConfigError(JobError):
    """A setting is wrong. The message names the variable, the value and what is allowed."""
    exit_code = EXIT_BAD_INPUT


class Refused(ConfigError):
    """OUTPUT_DIR belongs to another run (other settings, or a job still running there). Nothing in it is changed."""


class DataError(JobError):
    """The data is wrong. The message names the file, row and column."""
    exit_code = EXIT_BAD_INPUT


class StorageError(JobError):
    """OUTPUT_DIR cannot take what the job writes: the disk or quota is full, or it became read-only. The message
    names the path. Never retried: the same storage fails the same way until a person frees or fixes it."""
    exit_code = EXIT_BAD_INPUT


class TrainingFailed(JobError):
    exit_code = EXIT_TRAINING_FAILED


class VerifyFailed(JobError):
    exit_code = EXIT_VERIFY_FAILED


class PushFailed(JobError):
    exit_code = EXIT_PUSH_FAILED


class Preempted(JobError):
    exit_code = EXIT_PREEMPTED


class OutOfMemory(JobError):
    """CUDA ran out of memory. The message names the stage and the settings that lower its memory."""
    exit_code = EXIT_OUT_OF_MEMORY


# CUDA out-of-memory errors that arrive as a plain RuntimeError: from cuBLAS and cuDNN, which some kernels call to
# allocate their workspace outside PyTorch's allocator, and from CUDA itself (e.g. a context on a full card).
OUT_OF_MEMORY_TEXTS = ("CUDA out of memory", "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED",
                       "CUDNN_STATUS_ALLOC_FAILED")


def cuda_out_of_memory(error: BaseException) -> BaseException | None:
    """The CUDA out-of-memory error that error is or was raised from (a library may wrap it), else None.

    Follows the chain Python prints with a traceback: __cause__, else __context__ unless `from None` hid it.
    torch is looked up, never imported: its errors exist only once something has imported it."""
    torch = sys.modules.get("torch")
    torch_oom = getattr(torch, "OutOfMemoryError", ())  # torch.cuda.OutOfMemoryError is the same class
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, torch_oom) or (isinstance(error, RuntimeError)
                                            and any(text in str(error) for text in OUT_OF_MEMORY_TEXTS)):
            return error
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return None
