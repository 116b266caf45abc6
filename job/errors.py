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
EXIT_HUB_UNREACHABLE = 5
EXIT_OUT_OF_MEMORY = 6
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was written, run again to resume

EXIT_CODES = {
    EXIT_OK: "done (or nothing left to do)",
    EXIT_UNEXPECTED: "unexpected error (a bug: please report it with the log)",
    EXIT_BAD_INPUT: "bad settings or data, or OUTPUT_DIR in use, full or read-only; the message names the variable, "
                    "file:row or path; never retried",
    EXIT_TRAINING_FAILED: "training failed (e.g. loss became NaN); checkpoints kept",
    EXIT_VERIFY_FAILED: "the merged model does not match the adapter; nothing was pushed",
    EXIT_HUB_UNREACHABLE: "the Hub could not be reached after retries (the push, or downloading the model or "
                          "data); what is done stays on disk, rerun to go on",
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
    exit_code = EXIT_HUB_UNREACHABLE


class HubUnreachable(JobError):
    """A download (base model, dataset) met a connection error, a timeout, 429 or 5xx after the client's retries."""
    exit_code = EXIT_HUB_UNREACHABLE


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
    return in_chain(error, lambda e: isinstance(e, torch_oom) or (
        isinstance(e, RuntimeError) and any(text in str(e) for text in OUT_OF_MEMORY_TEXTS)))


def preempted_cause(error: BaseException) -> Preempted | None:
    """The stop signal's Preempted that error is or was raised from: a library may wrap it in its own error (trl's
    lazy import turns it into a RuntimeError when the signal lands during the import)."""
    return in_chain(error, lambda e: isinstance(e, Preempted))


def in_chain(error: BaseException | None, matches) -> BaseException | None:
    """The first exception in error's chain that `matches`, following what Python prints with a traceback:
    __cause__, else __context__ unless `from None` hid it."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if matches(error):
            return error
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return None


# Hub answers worth another try: a request the Hub may not have finished or that raced another (408, 409 on a
# commit whose answer was lost to a timeout, 412, 423, 425), rate limits (429) and every 5xx.
RETRY_STATUS = {408, 409, 412, 423, 425, 429}


def transient_hub_error(error: BaseException) -> tuple[bool, float | None]:
    """(transient?, seconds the server asked to wait) for an error from a Hub request, or from a library that wraps
    one (datasets and transformers raise their own, with the client's error in the chain)."""
    found = in_chain(error, lambda e: _transient(e)[0])
    return _transient(found) if found is not None else (False, None)


def _transient(error: BaseException) -> tuple[bool, float | None]:
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    hub_error = sys.modules.get("huggingface_hub.errors")
    if (hub_error is not None and isinstance(error, hub_error.HfHubHTTPError)) or status is not None:
        if status is None:
            return True, None  # no response at all: a connection problem
        wait = None
        try:
            wait = float(response.headers.get("Retry-After"))
        except (TypeError, ValueError):
            pass
        return status in RETRY_STATUS or status >= 500, wait
    httpx = sys.modules.get("httpx2") or sys.modules.get("httpx")
    if httpx is not None and isinstance(error, httpx.TransportError):  # timeouts, refused or reset connections
        return True, None
    return isinstance(error, (ConnectionError, TimeoutError)), None


def unreachable_or(error: BaseException, what: str, otherwise: JobError) -> JobError:
    """HubUnreachable for `what` when `error` is a transient Hub failure (a rerun may succeed), else `otherwise`."""
    if not transient_hub_error(error)[0]:
        return otherwise
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    return HubUnreachable(f"{what}: the Hub could not be reached ({first}); nothing is lost, rerun when it answers")
