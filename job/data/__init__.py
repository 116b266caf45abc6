"""From a dataset (hub id, local files or the bundled set) to tokenized rows with loss masks.

Steps, for each source of DATASET: read rows (each with a file:line location for error messages) ->
turn each into a conversation according to DATA_FORMAT -> render it with the prompt format's chat
template into prompt/answer segments -> tokenize, labelling only answer tokens (the end-of-turn token
included, so the model learns to stop) -> split off evaluation rows. Then mix the sources by their
weights -> cache on OUTPUT_DIR for every rank.
We tokenize here rather than in SFTTrainer so bad rows fail before a GPU hour is spent, with the
row named, and so the loss mask and EOS handling are ours to check.

Where each step lives, in the order the data goes through them:

- reading.py: rows of one dataset and split (read_rows, Row): the bundled set, local files by suffix
  (LOCAL_SUFFIXES; a folder's splits by name: local_files, split_of), CSV and JSON Lines problems named by
  file:line, and the Hub.
- formats.py: rows to conversations (to_messages, Chat): DATA_FORMAT and its detection, COLUMN_MAP, role names
  and ROLE_MAP, content blocks, tools and tool calls, the order of turns (check_roles).
- templates.py: conversations to segments and tokens: the named prompt formats (PROMPT_FORMATS) and the chat
  template chosen (chat_template_for), rendering into prompt and answer segments (render: growing prefixes, else
  marked answers), LOSS_ON (loss_targets), tokenize, and the end-of-turn token (end_of_turn_id).
- workers.py: rendering and tokenizing rows in worker processes on every CPU core (render_and_tokenize;
  PARALLEL_FROM_ROWS, CHUNK_ROWS).
- mixing.py: one source prepared with its evaluation rows held out (prepare_source, Part), the sources mixed by
  their weights (mix, shares, draw) and what each gave (source_stats).
- preparation.py: the whole data (prepare, Prepared): MAX_LENGTH cuts, the loss mask check, the stats; its
  fingerprint; load, which prepares once into the cache on OUTPUT_DIR.

The names below are the ones other modules use, so that `from job import data` is all they need.
"""

from job.data.formats import Chat, detect_format, to_messages
from job.data.preparation import Prepared, fingerprint, load, prepare
from job.data.reading import BUNDLED_DATASET, Row, local_files, read_rows, split_of
from job.data.templates import (
           PROMPT_FORMATS,
           chat_template_for,
           end_of_turn_id,
           render,
           tokenize,
)

__all__ = ["BUNDLED_DATASET", "PROMPT_FORMATS", "Chat", "Prepared", "Row", "chat_template_for", "detect_format",
           "end_of_turn_id", "fingerprint", "load", "local_files", "prepare", "read_rows", "render", "split_of",
           "to_messages", "tokenize"]
