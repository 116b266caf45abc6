#!/usr/bin/env python3
"""The GPU end-to-end matrix of `job run` (issue 28): each row runs the job as a user would, on a random-init
checkpoint of a real architecture with a real tokenizer, through training, merge, verification and a push to
the local Hub stand-in (tests/hubserver.py); then it loads the pushed repo back with plain transformers and
reruns the job, which must push nothing.

    python scripts/gpu/e2e.py tokenizers DEST      real Mistral-7B-v0.3 and Llama-3 tokenizers, from PyPI packages
    python scripts/gpu/e2e.py model ROW DEST       a row's random-init bf16 checkpoint (ROW: a row or a shape)
    python scripts/gpu/e2e.py model-dir ROW        where `row` looks for (and builds) that checkpoint
    python scripts/gpu/e2e.py rows                 the rows, in matrix order
    python scripts/gpu/e2e.py row NAME             one row; appends a JSON line to $OUT/e2e.jsonl
    python scripts/gpu/e2e.py table FILE.jsonl     the rows as a markdown table

scripts/gpu/e2e.sh runs the whole matrix; docs/gpu-e2e.md says what each row checks. Environment: WORK (models,
runs; default /tmp/job-e2e), OUT (results; default ./e2e-out), ROW_TIMEOUT (seconds per row, default 600),
E2E_TINY=1 or --tiny (each architecture shrunk to hidden 64 and 2 layers, to try the plumbing on a CPU).
Needs torch, transformers, huggingface_hub and safetensors (the job's own), and, for their tokenizer files, the
mistral-common and llama-models distributions in E2E_PACKAGES (default $WORK/packages; never imported).
"""

from __future__ import annotations

import argparse
import base64
import importlib.metadata
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORK = Path(os.environ.get("WORK", "/tmp/job-e2e"))
OUT = Path(os.environ.get("OUT", "e2e-out"))
ROW_TIMEOUT = float(os.environ.get("ROW_TIMEOUT", "600"))
TINY = os.environ.get("E2E_TINY", "") not in ("", "0")
# mistral-common and llama-models, installed apart from the job's environment: with mistral_common importable,
# transformers loads every Mistral tokenizer through it, which without its dependencies fails (docs/gpu-e2e.md)
PACKAGES = Path(os.environ.get("E2E_PACKAGES", WORK / "packages"))
HUB_USER = "e2e"
HUB_TOKEN = "hf_e2e_local"  # accepted by the local stand-in only; no real token is ever read or sent

# ------------------------------------------------------------------------------------------------ tokenizers

MISTRAL_SPM = ("mistral-common", "mistral_common/data/mistral_instruct_tokenizer_240323.model.v3")
LLAMA3_TIKTOKEN = ("llama-models", "llama_models/llama3/tokenizer.model")
# Llama-3-8B's 256 special tokens in its order (Meta's llama3 tokenizer.py; Llama-3.1 renamed some of the
# reserved ones), appended after the 128,000 BPE tokens: <|begin_of_text|> = 128000, <|eot_id|> = 128009.
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>",
                  *(f"<|reserved_special_token_{i}|>" for i in range(5, 251))]
SPM_CONTROL, SPM_USER_DEFINED = 3, 4  # sentencepiece's piece types


def package_file(dist: str, path: str) -> Path:
    """A file of an installed distribution, found from its RECORD in PACKAGES or on sys.path: the package itself
    is never imported, so its own dependencies (tiktoken, sentencepiece, pydantic, ...) need not be installed."""
    for found in importlib.metadata.distributions(name=dist, path=[str(PACKAGES), *sys.path]):
        for file in found.files or []:
            if str(file) == path:
                return Path(file.locate())
        raise SystemExit(f"{dist} {found.version} has no {path}")
    raise SystemExit(f"{dist} is not installed: pip install --no-deps --target {PACKAGES} {dist}")


def _protobuf_fields(data: bytes):
    """(field number, value) of one protobuf message: bytes for length-delimited fields, ints for varints.
    Enough of the wire format for a sentencepiece model, so neither sentencepiece nor protobuf is needed."""
    def varint(i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = data[i]
            value, shift, i = value | (byte & 0x7F) << shift, shift + 7, i + 1
            if byte < 0x80:
                return value, i

    i = 0
    while i < len(data):
        key, i = varint(i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(i)
        elif wire == 2:
            size, i = varint(i)
            value, i = data[i:i + size], i + size
        else:  # 1: fixed64, 5: fixed32 (the piece scores, unused: BPE merges follow the piece order)
            value, i = None, i + (8 if wire == 1 else 4)
        yield number, value


def spm_pieces(model: bytes) -> list[tuple[str, int]]:
    """(piece, type) of every piece of a sentencepiece ModelProto (field 1: pieces; piece field 1: text,
    field 3: type, NORMAL when absent)."""
    pieces = []
    for number, piece in _protobuf_fields(model):
        if number == 1:
            fields = dict(_protobuf_fields(piece))
            pieces.append((fields[1].decode(), fields.get(3, 1)))
    return pieces


def build_mistral_tokenizer(dest: Path) -> None:
    """Mistral-7B-v0.3's tokenizer (32,768 pieces, [INST] = 3) as its hub repo has it: tokenizer.model plus
    the tokenizer.json transformers makes of it. Converted here the way transformers' SentencePieceExtractor
    does (vocabulary in piece order, merges from it, control pieces special), minus its sentencepiece check."""
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    model = package_file(*MISTRAL_SPM)
    pieces = spm_pieces(model.read_bytes())
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    control = [AddedToken(p, special=True, normalized=False) for p, kind in pieces
               if kind == SPM_CONTROL and p not in ("<s>", "</s>")]
    tokenizer = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), bos_token="<s>", eos_token="</s>",
                               unk_token="<unk>", extra_special_tokens=control)
    tokenizer.add_tokens([AddedToken(p, special=False, normalized=False) for p, kind in pieces
                          if kind == SPM_USER_DEFINED])
    tokenizer.save_pretrained(dest)
    shutil.copyfile(model, dest / "tokenizer.model")


def build_llama3_tokenizer(dest: Path) -> None:
    """Llama-3-8B's tokenizer (128,256 tokens) from Meta's tiktoken file, through transformers' TikTokenConverter,
    with the base model's bos/eos and its post-processor that puts <|begin_of_text|> first."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(path: str) -> dict[bytes, int]:
            # tiktoken's file format ("<base64 token> <rank>" a line), read without tiktoken
            ranks = {}
            for line in Path(path).read_bytes().splitlines():
                if line:
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
            return ranks

    backend = Converter(str(package_file(*LLAMA3_TIKTOKEN)), extra_special_tokens=LLAMA3_SPECIAL).converted()
    bos, eos = LLAMA3_SPECIAL[:2]
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, backend.token_to_id(bos))])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos,
                                        clean_up_tokenization_spaces=True)
    tokenizer.save_pretrained(dest)


# name: (builder, (text, the real tokenizer's ids for it), the real tokenizer's size)
TOKENIZERS = {
    "mistral": (build_mistral_tokenizer, ("[INST]", [3]), 32768),
    "llama3": (build_llama3_tokenizer, ("<|start_header_id|>user<|end_header_id|>", [128006, 882, 128007]), 128256),
}


def build_tokenizers(dest: Path) -> None:
    from transformers import AutoTokenizer

    for name, (build, (text, ids), size) in TOKENIZERS.items():
        target = dest / name
        if (target / "tokenizer.json").is_file():
            continue
        staging = dest / f".{name}.staging"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        build(staging)
        # checked as loaded back, since every row's chat formatting depends on these ids
        tokenizer = AutoTokenizer.from_pretrained(staging)
        got = tokenizer(text, add_special_tokens=False)["input_ids"]
        if got != ids or len(tokenizer) != size:
            raise SystemExit(f"tokenizer {name}: {text!r} -> {got} (want {ids}), {len(tokenizer)} tokens "
                             f"(want {size})")
        staging.rename(target)  # a build cut off never looks finished
        print(f"tokenizer {name}: {target} ({size} tokens; {text!r} -> {ids})", flush=True)


# ------------------------------------------------------------------------------------------------ models

@dataclass(frozen=True)
class Shape:
    model_type: str
    tokenizer: str  # a key of TOKENIZERS
    describe: str  # for the table
    config: dict


LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
SHAPES = {
    "mistral-7b": Shape("mistral", "mistral", "Mistral-7B-v0.3, 32 layers", dict(
        vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, rope_theta=1e6, max_position_embeddings=32768, sliding_window=None,
        rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "llama3-8b": Shape("llama", "llama3", "Llama-3-8B, 32 layers", LLAMA3_8B),
    "llama3-8b-4l": Shape("llama", "llama3", "Llama-3-8B widths, 4 layers", {**LLAMA3_8B, "num_hidden_layers": 4}),
    "qwen2.5-7b": Shape("qwen2", "llama3", "Qwen2.5-7B widths (QKV bias), 4 layers, Llama-3 tokenizer", dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=4, num_attention_heads=28,
        num_key_value_heads=4, rope_theta=1e6, max_position_embeddings=131072, rms_norm_eps=1e-6,
        tie_word_embeddings=False)),
    "gemma2-9b": Shape("gemma2", "llama3", "Gemma-2-9B widths (head 256, soft-capping, sliding window), 4 layers, "
                       "Llama-3 tokenizer", dict(
        vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, sliding_window=4096, max_position_embeddings=8192, rms_norm_eps=1e-6,
        tie_word_embeddings=True)),
    # Phi-3-mini's 32,064 rows are padded to the Mistral tokenizer's 32,768
    "phi3-mini": Shape("phi3", "mistral", "Phi-3-mini widths (fused qkv_proj, gate_up_proj), 4 layers, Mistral "
                       "tokenizer (vocab 32,064 padded to 32,768)", dict(
        vocab_size=32768, hidden_size=3072, intermediate_size=8192, num_hidden_layers=4, num_attention_heads=32,
        num_key_value_heads=32, rope_theta=10000.0, max_position_embeddings=4096, sliding_window=2047,
        rms_norm_eps=1e-5, tie_word_embeddings=False)),
}
TINY_WIDTHS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)


def shape_config(name: str, tiny: bool, tokenizer) -> dict:
    dims = dict(SHAPES[name].config)
    if tiny:
        real_hidden = dims["hidden_size"]
        dims.update(TINY_WIDTHS)
        if "head_dim" in dims:
            dims["head_dim"] = dims["query_pre_attn_scalar"] = 16
        # the logit scale of a random init grows with sqrt(hidden) * range: keep the real width's, so the
        # merge check sees logits of the size it sees at full width
        dims["initializer_range"] = 0.02 * (real_hidden / dims["hidden_size"]) ** 0.5
    if dims["vocab_size"] < len(tokenizer):
        raise SystemExit(f"{name}: vocab_size {dims['vocab_size']} < the tokenizer's {len(tokenizer)} tokens")
    return {**dims, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": None}


def build_model(shape_name: str, dest: Path, tiny: bool) -> None:
    """A random-init checkpoint saved as a hub checkpoint is: bf16 safetensors shards, config.json (dtype
    bfloat16), generation_config.json and the tokenizer. Built in bf16 on the GPU when there is one: no fp32
    copy of an 8B model is ever made, and initialising there takes seconds."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
    )

    shape = SHAPES[shape_name]
    build_tokenizers(WORK / "tokenizers")
    tokenizer_dir = WORK / "tokenizers" / shape.tokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(shape.model_type, **shape_config(shape_name, tiny, tokenizer))
    started = time.time()
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    staging = dest.with_name(f".{dest.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, max_shard_size="5GB")
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id).save_pretrained(staging)
    for file in tokenizer_dir.iterdir():
        shutil.copyfile(file, staging / file.name)
    staging.rename(dest)
    params = sum(p.numel() for p in model.parameters())
    print(f"model {shape_name}{' (tiny)' if tiny else ''}: {params / 1e6:,.0f}M parameters, "
          f"{time.time() - started:.0f}s: {dest}", flush=True)


# ------------------------------------------------------------------------------------------------ the matrix

@dataclass(frozen=True)
class Row:
    shape: str
    settings: dict = field(default_factory=dict)
    data: str = "instructions"  # or summaries, long-documents (write_dataset)
    needs: str | None = None  # a module the row cannot run without


# In matrix order; rows that share a checkpoint run back to back, so e2e.sh can delete it after the last of them.
ROWS = {
    "mistral-7b": Row("mistral-7b", {"PRESET": "mistral-7b-qlora"}),
    "llama3-8b": Row("llama3-8b", {"PRESET": "llama3-8b-qlora"}, data="summaries"),
    "llama3-8b-8gib": Row("llama3-8b", {"GPU_MEMORY_GIB": "8", "MAX_STEPS": "16"}),
    "qwen2.5-7b": Row("qwen2.5-7b"),
    "gemma2-9b": Row("gemma2-9b"),
    # a base model without a chat template, with a tokenizer that has no end-of-turn token: the user picks a format
    "phi3-mini": Row("phi3-mini", {"PROMPT_FORMAT": "mistral"}),
    "llama3-int8": Row("llama3-8b-4l", {"QUANTIZATION": "int8"}),
    "llama3-lora16": Row("llama3-8b-4l", {"QUANTIZATION": "none"}),
    "llama3-dora": Row("llama3-8b-4l", {"USE_DORA": "true"}),
    # the second tutorial's summaries, of documents as long as the context
    "llama3-128k": Row("llama3-8b-4l", {"PRESET": "llama3-8b-qlora", "MAX_LENGTH": "131072", "MICRO_BATCH_SIZE": "1",
                                        "MAX_STEPS": "3"}, data="long-documents"),
    "llama3-fsdp": Row("llama3-8b-4l", {"STRATEGY": "fsdp"}),
    "llama3-zero3": Row("llama3-8b-4l", {"STRATEGY": "zero3"}, needs="deepspeed"),
}
# Every row: short, one training process (the matrix is the one-GPU matrix: fsdp and zero3 at world size 1),
# no trackers. A checkpoint is written mid-run, as in any real run.
COMMON = {"MAX_STEPS": "20", "SAVE_STEPS": "10", "LOGGING_STEPS": "5", "NUM_PROCESSES": "1", "REPORT_TO": "none",
          "SAMPLE_PROMPTS": "2", "MAX_NEW_TOKENS": "32"}
# --tiny: a CPU trains a hidden-64 model on 256-token sequences in seconds a step
TINY_SETTINGS = {"MAX_STEPS": "6", "SAVE_STEPS": "3", "MAX_LENGTH": "256", "MICRO_BATCH_SIZE": "2",
                 "SAMPLE_PROMPTS": "1", "MAX_NEW_TOKENS": "8"}


def model_dir(shape_name: str, tiny: bool) -> Path:
    return WORK / "models" / (f"{shape_name}-tiny" if tiny else shape_name)


def shape_of(name: str) -> str:
    if name in ROWS:
        return ROWS[name].shape
    if name in SHAPES:
        return name
    raise SystemExit(f"unknown row or shape {name!r}; rows: {', '.join(ROWS)}; shapes: {', '.join(SHAPES)}")


# ------------------------------------------------------------------------------------------------ data

COUNTRIES = [("대한민국", "서울", "South Korea", "Seoul"), ("일본", "도쿄", "Japan", "Tokyo"),
             ("프랑스", "파리", "France", "Paris"), ("독일", "베를린", "Germany", "Berlin"),
             ("스페인", "마드리드", "Spain", "Madrid"), ("이탈리아", "로마", "Italy", "Rome"),
             ("캐나다", "오타와", "Canada", "Ottawa"), ("호주", "캔버라", "Australia", "Canberra")]
FACILITIES = ["도서관", "체육관", "미술관", "공원", "병원", "수영장"]  # all take 을/은


def instruction_rows(rng: random.Random) -> list[dict]:
    """databricks-dolly-15k-ko's columns, Korean and English rows."""
    rows = []
    for i in range(240):
        ko, city_ko, en, city_en = rng.choice(COUNTRIES)
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        numbers = [rng.randint(1, 9999) for _ in range(6)]
        rows.append([
            {"instruction": "다음 두 수의 합을 구하세요.", "context": f"{a}, {b}", "response": f"합은 {a + b}입니다.",
             "category": "open_qa"},
            {"instruction": f"{ko}의 수도는 어디인가요?", "context": "", "response": f"{ko}의 수도는 {city_ko}입니다.",
             "category": "open_qa"},
            {"instruction": f"What is the capital of {en}?", "context": "",
             "response": f"The capital of {en} is {city_en}.", "category": "open_qa"},
            {"instruction": "다음 숫자 중 가장 큰 수를 찾으세요.", "context": ", ".join(map(str, numbers)),
             "response": f"가장 큰 수는 {max(numbers)}입니다.", "category": "information_extraction"},
        ][i % 4])
    return rows


def news_sentences(rng: random.Random):
    """An endless Korean news text, each sentence a little different."""
    while True:
        ko, city, _, _ = rng.choice(COUNTRIES)
        facility, cost, year = rng.choice(FACILITIES), rng.randint(10, 900), rng.randint(1990, 2030)
        yield rng.choice([
            f"{city}시는 {year}년에 총 {cost}억 원을 들여 새 {facility}을 지었다고 밝혔다.",
            f"{ko} 정부 관계자는 {facility} 이용객이 지난해보다 {rng.randint(2, 60)}% 늘었다고 말했다.",
            f"시민 {rng.randint(100, 9000)}명이 참여한 조사에서 {facility}에 대한 만족도는 {rng.randint(50, 99)}점이었다.",
            f"{city}의 {facility}은 오전 {rng.randint(6, 10)}시부터 오후 {rng.randint(5, 11)}시까지 문을 연다.",
        ])


def news_row(rng: random.Random, sentences, count: int) -> dict:
    """The llama3-8b-qlora preset's columns: a document, and its lead sentence as the summary."""
    _, city, _, _ = rng.choice(COUNTRIES)
    lead = f"{city}시가 {rng.randint(10, 900)}억 원을 들인 새 {rng.choice(FACILITIES)}을 열었다."
    return {"document": " ".join([lead, *(next(sentences) for _ in range(count))]), "summary": lead}


def long_document_rows(rng: random.Random, tokenizer, tokens: int) -> list[dict]:
    """Five documents of about `tokens` tokens each, for the 131,072-token row: 4 train, 1 evaluation row."""
    rows, sentences = [], news_sentences(rng)
    for _ in range(5):
        rows.append(news_row(rng, sentences, 0))
        text, count = [rows[-1]["document"]], 0
        while count < tokens:
            text.append(next(sentences))
            count += len(tokenizer(text[-1], add_special_tokens=False)["input_ids"])
        rows[-1]["document"] = " ".join(text)
    return rows


def write_dataset(kind: str, path: Path, model: Path, tiny: bool) -> None:
    rng = random.Random(0)
    if kind == "instructions":
        rows = instruction_rows(rng)
    elif kind == "summaries":
        sentences = news_sentences(rng)
        rows = [news_row(rng, sentences, rng.randint(4, 12)) for _ in range(200)]
    else:
        from transformers import AutoTokenizer

        rows = long_document_rows(rng, AutoTokenizer.from_pretrained(model), 200 if tiny else 100_000)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


# ------------------------------------------------------------------------------------------------ running a row


@contextmanager
def hub_server(root: Path):
    """tests/hubserver.py in its own process on a free port; yields its URL."""
    root.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "hubserver.py"), "--root", str(root), "--port", "0",
                             "--token", HUB_TOKEN, "--user", HUB_USER], stdout=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()  # "Fake Hub on http://127.0.0.1:PORT (user ...)"
        if not first.startswith("Fake Hub on "):
            raise SystemExit(f"tests/hubserver.py did not start: {first!r}")
        yield first.split()[3]
    finally:
        proc.terminate()
        proc.wait()


def hub_commits(url: str, repo: str) -> int | None:
    """Commits on the repo's main branch (the API route huggingface_hub's list_repo_commits uses)."""
    request = urllib.request.Request(f"{url}/api/models/{repo}/commits/main",
                                     headers={"Authorization": f"Bearer {HUB_TOKEN}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return len(json.load(response))
    except OSError:  # no such repo (404), server gone
        return None


class GpuMemory:
    """The most memory nvidia-smi saw in use on the visible GPUs while a run lasted, in GiB (the whole card:
    CUDA contexts and allocator caches included, which the job's own figures leave out). None without one."""

    def __init__(self):
        self.max_mib: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        command = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        if os.environ.get("CUDA_VISIBLE_DEVICES"):
            command += ["-i", os.environ["CUDA_VISIBLE_DEVICES"]]
        while True:
            try:
                used = subprocess.run(command, capture_output=True, text=True, timeout=10).stdout.split()
                self.max_mib = max([self.max_mib or 0.0, *map(float, used)])
            except (OSError, ValueError, subprocess.TimeoutExpired):
                return  # no nvidia-smi, or a GPU it cannot read: no figure rather than a wrong one
            if self._stop.wait(1.0):
                return

    def __enter__(self) -> GpuMemory:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def gib(self) -> float | None:
        return None if self.max_mib is None else round(self.max_mib / 1024, 2)


@dataclass
class Run:
    code: int
    seconds: float
    gpu_gib: float | None
    timed_out: bool


def run_until(command: list[str], env: dict, log: Path, deadline: float) -> Run:
    """Run `command` (output to `log`) until it ends or the row's time is up. At the limit it gets SIGTERM first,
    as a scheduler would send (the job then checkpoints and exits 75), and SIGKILL a minute later."""
    started = time.monotonic()
    with log.open("wb") as out, GpuMemory() as gpu:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: the signal reaches every rank
        timed_out = False
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return Run(proc.returncode, round(time.monotonic() - started, 1), gpu.gib, timed_out)


def job_env(settings: dict, hf_home: Path, hub_url: str) -> dict:
    """The caller's environment without any job setting or token of its own (a user's exported QUANTIZATION must
    not change a row), pointed at the local Hub with its token."""
    sys.path.insert(0, str(REPO))
    from job.config import FIELDS, env_name

    ours = {env_name(f) for f in FIELDS.values()} | {"CONFIG_FILE", "HF_TOKEN_FILE", "HUGGING_FACE_HUB_TOKEN",
                                                     "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"}
    env = {k: v for k, v in os.environ.items() if k not in ours}
    env.update(settings, HF_ENDPOINT=hub_url, HF_TOKEN=HUB_TOKEN, HF_HUB_DISABLE_XET="1", HF_HOME=str(hf_home),
               PYTHONUNBUFFERED="1")
    return env


def scalars(d: dict | None) -> dict:
    return {k: v for k, v in (d or {}).items() if v is None or isinstance(v, (bool, int, float, str))}


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def device_name() -> str:
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30).stdout.split("\n")
        return names[0].strip() or "cpu"
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"


def run_row(name: str, tiny: bool) -> int:
    row = ROWS[name]
    settings = {**COMMON, **row.settings, **(TINY_SETTINGS if tiny else {})}
    record = {"row": name, "model": SHAPES[row.shape].describe + ("; tiny: hidden 64, 2 layers" if tiny else ""),
              "settings": {**row.settings, **(TINY_SETTINGS if tiny else {})}, "device": device_name(),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
    if row.needs and importlib.util.find_spec(row.needs) is None:
        record["status"] = f"skipped: {row.needs} not installed"
        return finish(record)

    model = model_dir(row.shape, tiny)
    if not (model / "config.json").is_file():
        # in a process of its own: this one must hold no GPU memory while the job runs
        build = subprocess.run([sys.executable, __file__, *(["--tiny"] if tiny else []), "model", row.shape,
                                str(model)])
        if build.returncode != 0:
            record["status"] = f"failed: building {model} exited {build.returncode}"
            return finish(record)
    base = WORK / "runs" / name
    shutil.rmtree(base, ignore_errors=True)  # the Hub stand-in starts empty, so the run must start afresh too
    base.mkdir(parents=True)
    dataset, output, repo = base / "data.jsonl", base / "output", f"{HUB_USER}/{name}"
    write_dataset(row.data, dataset, model, tiny)
    settings.update(BASE_MODEL=str(model), DATASET=str(dataset), OUTPUT_DIR=str(output), HUB_MODEL_ID=repo)
    deadline = time.monotonic() + ROW_TIMEOUT
    logs = []
    try:
        with hub_server(base / "hub") as url:
            env = job_env(settings, base / "hf", url)
            logs.append(base / "job-1.log")
            first = run_until([sys.executable, "-m", "job", "run"], env, logs[-1], deadline)
            record.update(exit=[first.code], wall_s=[first.seconds], gpu_max_gib=first.gpu_gib,
                          timed_out=first.timed_out)
            merge = read_json(output / "metrics" / "merge.json")
            if merge is not None:
                # its fields are being redesigned (issue 28): every scalar is kept, and the list of problems
                record["merge"] = {**scalars(merge), "problems": merge.get("problems")}
            if first.code != 0:
                return finish(record, logs)
            pushed = hub_commits(url, repo)
            logs.append(base / "job-2.log")
            second = run_until([sys.executable, "-m", "job", "run"], env, logs[-1], deadline)
            record["exit"].append(second.code)
            record["wall_s"].append(second.seconds)
            record["timed_out"] = second.timed_out
            record["commits"] = [pushed, hub_commits(url, repo)]
            record["rerun_pushed_nothing"] = second.code == 0 and pushed is not None and record["commits"][1] == pushed
            # The pushed copy stands for the merged one from here on: an 8B row would otherwise hold four 16 GB
            # copies at once (base, merged, Hub, download), more than a 64 GB disk.
            shutil.rmtree(output / "merged", ignore_errors=True)
            logs.append(base / "load-back.log")
            check = run_until([sys.executable, __file__, "load-back", repo, str(base / "download")], env, logs[-1],
                              deadline)
            lines = [line for line in tail(logs[-1], 5).splitlines() if line.startswith("{")]
            record["load_back"] = json.loads(lines[-1]) if check.code == 0 and lines else {"ok": False,
                                                                                            "exit": check.code}
            record["timed_out"] = check.timed_out
            return finish(record, logs)
    finally:
        for big in (base / "hub", base / "download", output / "merged", output / ".merged.staging"):
            shutil.rmtree(big, ignore_errors=True)


def finish(record: dict, logs: list[Path] = ()) -> int:
    """Judge the row, append its JSON line to $OUT/e2e.jsonl and print a one-line verdict."""
    if "status" not in record:
        exits = record.get("exit", [])
        ok = (exits == [0, 0] and (record.get("merge") or {}).get("passed") is True
              and record.get("rerun_pushed_nothing") is True and record.get("load_back", {}).get("ok") is True)
        record["status"] = "passed" if ok else "timed out" if record.get("timed_out") else "failed"
        if not ok and logs:
            record["log_tail"] = tail(logs[-1])
            print(f"--- {logs[-1]} (last lines)\n{record['log_tail']}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    with (OUT / "e2e.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"row {record['row']}: {record['status']} (exit {record.get('exit')}, {record.get('wall_s')} s)", flush=True)
    return 0 if record["status"] == "passed" or record["status"].startswith("skipped") else 1


def load_back(repo: str, dest: Path) -> None:
    """What a user of the pushed model does: download it and chat with it, with nothing from the job.
    Run as its own process (the environment points huggingface_hub at the local Hub before it is imported)."""
    import torch
    from huggingface_hub import snapshot_download
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = snapshot_download(repo, local_dir=dest)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, device_map="cuda" if torch.cuda.is_available() else None)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "대한민국의 수도는 어디인가요?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    prompt = inputs["input_ids"].shape[1]
    output = model.generate(**inputs.to(model.device), max_new_tokens=8, do_sample=False)
    generated = output[0, prompt:]
    print(json.dumps({"ok": len(generated) > 0, "dtype": str(model.dtype).removeprefix("torch."),
                      "files": sorted(p.name for p in Path(path).iterdir() if p.is_file()),
                      "generated": tokenizer.decode(generated)}, ensure_ascii=False), flush=True)


# ------------------------------------------------------------------------------------------------ the table

def figure(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def table(path: Path) -> str:
    """The rows as a markdown table, then every figure of each row's merge check (its fields are being
    redesigned, so the table names only the stable ones)."""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    runs = sorted({(r.get("device", "?"), r.get("date", "?")) for r in records})
    lines = ["Run on " + "; ".join(f"{device}, {date}" for device, date in runs) + ".", "",
             "| row | model | settings | exit (run / rerun) | merge passed | merge on | merge peak GiB | GPU max GiB "
             "| wall s (run / rerun) | load-back | rerun pushed nothing |",
             "| --- | --- | --- | --- | --- | --- | ---: | ---: | --- | --- | --- |"]
    details = []
    for r in records:
        merge = r.get("merge") or {}
        settings = " ".join(f"{k}={v}" for k, v in r.get("settings", {}).items()) or "defaults"
        exits = " / ".join(map(str, r["exit"])) if "exit" in r else r["status"]
        if "exit" in r and r["status"] == "timed out":
            exits += " (timed out)"
        load_back = r.get("load_back")
        lines.append("| " + " | ".join([
            r["row"], r.get("model", ""), settings, exits, figure(merge.get("passed", "-")),
            " ".join(str(merge[k]) for k in ("device", "dtype") if merge.get(k)) or "-",
            figure(merge.get("peak_memory_gib") or "-"), figure(r.get("gpu_max_gib") or "-"),
            " / ".join(map(str, r.get("wall_s", []))) or "-",
            "-" if load_back is None else "ok" if load_back.get("ok") else "failed",
            figure(r.get("rerun_pushed_nothing", "-"))]) + " |")
        numbers = [f"{k} {figure(v)}" for k, v in merge.items()
                   if isinstance(v, (bool, int, float)) and k not in ("passed", "peak_memory_gib")]
        if numbers or merge.get("problems"):
            details.append(f"- {r['row']}: " + ", ".join(numbers)
                           + "".join(f"; problem: {p}" for p in merge.get("problems") or []))
    if details:
        lines += ["", "Merge check figures (metrics/merge.json):", "", *details]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ command line

def main() -> int:
    global TINY
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="shrunken widths, for a CPU (also E2E_TINY=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("tokenizers").add_argument("dest", type=Path)
    p = sub.add_parser("model")
    p.add_argument("row", help=f"a row or one of the shapes: {', '.join(SHAPES)}")
    p.add_argument("dest", type=Path)
    sub.add_parser("model-dir").add_argument("row")
    sub.add_parser("rows", help="the rows, in matrix order")
    sub.add_parser("row").add_argument("name", choices=ROWS)
    sub.add_parser("table").add_argument("file", type=Path)
    p = sub.add_parser("load-back", help="(used by `row`) download a pushed repo, load it and generate")
    p.add_argument("repo")
    p.add_argument("dest", type=Path)
    args = parser.parse_args()
    TINY = TINY or args.tiny

    if args.command == "tokenizers":
        build_tokenizers(args.dest)
    elif args.command == "model":
        build_model(shape_of(args.row), args.dest, TINY)
    elif args.command == "model-dir":
        print(model_dir(shape_of(args.row), TINY))
    elif args.command == "rows":
        print(" ".join(ROWS))
    elif args.command == "row":
        return run_row(args.name, TINY)
    elif args.command == "table":
        print(table(args.file))
    elif args.command == "load-back":
        load_back(args.repo, args.dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
