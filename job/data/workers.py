"""Rows to tokens on every CPU core this process may use: worker processes render and tokenize chunks of rows, each
row as DATA_FORMAT reads it and the chat template renders it, and send back the tokens in file order."""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass

from job import stagefile
from job.config import Settings
from job.data.formats import to_messages
from job.data.reading import Row
from job.data.templates import end_of_turn_id, loss_targets, render_row, tokenize
from job.errors import DataError


@dataclass(frozen=True)
class Work:
    """What turns a row into tokens; each worker gets it once, when it starts."""

    settings: Settings
    tokenizer: object
    template: str
    format_name: str
    data_format: str


# Rows a worker takes at a time: enough that sending back the tokens costs little beside making them.
CHUNK_ROWS = 256
PARALLEL_FROM_ROWS = 2048  # below this, starting the workers costs more than it saves
_work: Work | None = None  # a worker's copy, sent once when it starts


def render_and_tokenize(work: Work, rows: list[Row], stage_name: str = "tokenizing"
                        ) -> tuple[list[tuple], list[str], int | None]:
    """(conversation, input ids, labels) of every good row in order, the bad rows skipped (when SKIP_BAD_ROWS), and
    the end-of-turn token. Runs on every CPU core this process may use, in worker processes: rendering a chat template
    and tokenizing is Python work per row, one core's worth in one process. A bad row stops it naming file:line
    (the first in file order), as in one process. Progress goes to job.stagefile as `stage_name`."""
    chunks = [rows[i:i + CHUNK_ROWS] for i in range(0, len(rows), CHUNK_ROWS)]
    workers = min(len(os.sched_getaffinity(0)), len(chunks))
    results, pool = [], None
    if len(rows) < PARALLEL_FROM_ROWS or workers < 2:
        chunks_done = (_chunk(work, chunk) for chunk in chunks)
    else:
        # forkserver: workers start from a clean process, never a fork of this one, whose other threads (the
        # tokenizer's pool, a download, a test's server) may hold a lock that a forked child would wait on forever
        pool = multiprocessing.get_context("forkserver").Pool(workers, initializer=_adopt, initargs=(work,))
        chunks_done = pool.imap(_chunk_in_worker, chunks)
    try:
        for result in chunks_done:
            results.append(result)
            stagefile.progress(stage_name, min(len(results) * CHUNK_ROWS, len(rows)), len(rows))
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    done = [item for chunk_done, _, _ in results for item in chunk_done]
    skipped = [text for _, chunk_skipped, _ in results for text in chunk_skipped]
    eot = next((e for _, _, e in results if e is not None), None)
    return done, skipped, eot


def _adopt(work: Work) -> None:
    global _work
    _work = work


def _chunk_in_worker(rows: list[Row]):
    return _chunk(_work, rows)


def _chunk(work: Work, rows: list[Row]) -> tuple[list[tuple], list[str], int | None]:
    s, tokenizer = work.settings, work.tokenizer
    done, skipped, eot = [], [], None
    for row in rows:
        try:
            chat = to_messages(row, work.data_format, s)
            segments = render_row(row, chat, tokenizer, work.template, work.format_name, s)
        except DataError as error:
            if not s.skip_bad_rows:
                raise DataError(f"{error} (set SKIP_BAD_ROWS=true to skip such rows)") from None
            skipped.append(str(error))
            continue
        if eot is None:
            eot = end_of_turn_id(segments, tokenizer, s)
        done.append((chat, *tokenize(loss_targets(segments, s.loss_on), tokenizer)))
    return done, skipped, eot
