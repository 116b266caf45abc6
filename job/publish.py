"""Pushing to the Hugging Face Hub: the merged model and/or the adapter, with a model card.

- The token comes from HF_TOKEN or the file HF_TOKEN_FILE names (a mounted secret). It is passed to
  the client directly, never logged, printed or written anywhere (no `login()`, no settings dump).
- One commit per push. The client leaves out files whose content the Hub already has, and LFS
  objects it already holds are not sent again, so a retry or a rerun re-uploads only what is
  missing or changed. Shards of an earlier push that are no longer part of the model are deleted
  in the same commit.
- Transient failures (timeouts, connection errors, 429, 5xx) are retried PUSH_RETRIES times with
  exponential backoff from PUSH_BACKOFF seconds (a longer Retry-After wins); anything else, or
  running out of retries, raises PushFailed (exit 5). The merged model stays on disk and a rerun
  of `job run` goes straight to the push. A token the Hub refuses (401) or that may not write to the
  repo (403) is bad settings: exit 2 naming HF_TOKEN or HF_TOKEN_FILE, never retried; `check_access`
  asks the Hub before training.
- OUTPUT_DIR/metrics/push.json records the repo, commit and a fingerprint of what was pushed; a
  rerun with the same repo and unchanged local files does nothing, without contacting the Hub.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from job import checkpoint
from job.checkpoint import COMPLETE, Layout
from job.config import BUILTIN_DATASET, BUILTIN_MODEL, HUB_ID, Settings, sources
from job.errors import ConfigError, PushFailed, transient_hub_error

log = logging.getLogger("job.publish")

# The token is wrong (401) or may not write there (403): bad settings, exit 2, never retried.
AUTH_STATUS = {401, 403}
# The client's shared HTTP client has no timeouts at all, so a stalled connection would hang the job;
# these are per network operation (not per upload), so a large shard still uploads at any speed.
HUB_TIMEOUT = {"connect": 30.0, "read": 300.0, "write": 300.0, "pool": 60.0}
MAX_BACKOFF = 120.0
ADAPTER_SKIP = {COMPLETE, "README.md", "job.json", "training_args.bin"}  # local paths, pickles, peft's stub card
WEIGHT_FILES = re.compile(r"(^|/)[^/]+\.safetensors(\.index\.json)?$")


def token() -> str | None:
    """HF_TOKEN, or the contents of HF_TOKEN_FILE (a mounted Kubernetes/Slurm secret). Never logged."""
    value = os.environ.get("HF_TOKEN")
    if not value and os.environ.get("HF_TOKEN_FILE"):
        try:
            value = Path(os.environ["HF_TOKEN_FILE"]).read_text(encoding="utf-8").strip()
        except OSError:
            value = None
    return value or None


def token_source() -> str:
    """Where the token comes from, for messages: the variable, or the file HF_TOKEN_FILE names."""
    return "HF_TOKEN" if os.environ.get("HF_TOKEN") else f"HF_TOKEN_FILE={os.environ.get('HF_TOKEN_FILE')}"


def require_token(s: Settings) -> str:
    """The token a push to HUB_MODEL_ID needs, or ConfigError saying why there is none (naming HF_TOKEN_FILE's path
    when that file is missing, unreadable or empty)."""
    secret = token()
    if secret:
        return secret
    path = os.environ.get("HF_TOKEN_FILE")
    if path and not os.environ.get("HF_TOKEN"):
        try:
            Path(path).read_text(encoding="utf-8")
            why = "is empty"
        except OSError as error:
            why = f"cannot be read ({error.strerror})"
        raise ConfigError(f"HF_TOKEN_FILE={path} {why}: HUB_MODEL_ID={s.hub_model_id} needs a token to push. Mount "
                          "the secret there, or set HF_TOKEN")
    raise ConfigError(f"HUB_MODEL_ID={s.hub_model_id} asks for a push but no token was found: set HF_TOKEN or "
                      "HF_TOKEN_FILE (a mounted secret)")


def check_access(s: Settings) -> None:
    """Before training: ask the Hub who the token belongs to, so a wrong, expired or read-only token stops the job
    now (exit 2) instead of after hours of training. The Hub being unreachable only warns: the push retries."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    secret = require_token(s)
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        log.warning("HF_HUB_OFFLINE is set: the token for HUB_MODEL_ID=%s is not checked before training",
                    s.hub_model_id)
        return
    try:
        with _timeouts():
            me = HfApi(token=secret).whoami()
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        if status in AUTH_STATUS:
            raise _auth_error(s, "checking the token", status) from None
        log.warning("could not check the token for HUB_MODEL_ID=%s before training: %s", s.hub_model_id,
                    _describe(error))
        return
    except Exception as error:  # unreachable: the push will retry
        log.warning("could not check the token for HUB_MODEL_ID=%s before training: %s", s.hub_model_id,
                    _describe(error))
        return
    role = me.get("auth", {}).get("accessToken", {}).get("role")
    if role == "read":
        raise ConfigError(f"the token from {token_source()} is read-only: HUB_MODEL_ID={s.hub_model_id} needs a "
                          "token with write access")
    namespace = s.hub_model_id.split("/")[0]
    mine = {me.get("name")} | {org.get("name") for org in me.get("orgs") or []}
    if role == "write" and namespace not in mine:
        raise ConfigError(f"HUB_MODEL_ID={s.hub_model_id}: the token from {token_source()} belongs to "
                          f"{me.get('name')}, who may not create repos under {namespace} (theirs: "
                          f"{', '.join(sorted(n for n in mine if n))})")


def _auth_error(s: Settings, what: str, status: int) -> ConfigError:
    if status == 401:
        return ConfigError(f"the Hub refused the token from {token_source()} (HTTP 401 while {what}): it is wrong or "
                           f"expired. Set a valid write token; HUB_MODEL_ID={s.hub_model_id}")
    return ConfigError(f"the token from {token_source()} may not write to HUB_MODEL_ID={s.hub_model_id} (HTTP "
                       f"{status} while {what}): give it write access to that repo, or push elsewhere")


# ------------------------------------------------------------------------------------------ push

def push(s: Settings) -> dict:
    layout = Layout(s.output)
    repo = s.hub_model_id
    if not repo:
        raise ConfigError("HUB_MODEL_ID is not set: there is nowhere to push to")
    secret = require_token(s)
    parts = ["merged", "adapter"] if s.push_what == "both" else [s.push_what]
    _check_ready(layout, parts)
    plan = upload_plan(s, layout, parts)
    fingerprint = _fingerprint(repo, plan)
    done = checkpoint.read_json(layout.metrics / "push.json")
    if done and done.get("repo") == repo and done.get("fingerprint") == fingerprint and done.get("commit"):
        log.info("already pushed to %s at commit %s; nothing changed since", repo, done["commit"])
        return done

    if "merged" in parts:  # the card on disk matches the one pushed (it names the repo now)
        _write_if_changed(layout.merged / "README.md", plan["README.md"])
    from huggingface_hub import HfApi

    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one line per request: URLs, noise in a batch log
    api = HfApi(token=secret)
    log.info("pushing %s to %s (%d files)", " and ".join(parts), repo, len(plan))
    with _timeouts():
        url = _retry(s, "creating the repo", lambda: api.create_repo(repo, private=s.hub_private, exist_ok=True))
        private = _retry(s, "reading the repo", lambda: api.repo_info(repo)).private
        if private != s.hub_private:
            log.warning("%s already exists and is %s; its visibility is left as it is (HUB_PRIVATE=%s)", repo,
                        "private" if private else "public", s.hub_private)
        info = _retry(s, "uploading", lambda: _commit(api, repo, plan, parts))
    result = {
        "repo": repo,
        "commit": info.oid,
        "commit_url": info.commit_url,
        "url": str(url),
        "pushed": parts,
        "private": private,
        "files": sorted(plan),
        "fingerprint": fingerprint,
    }
    checkpoint.write_json(layout.metrics / "push.json", result)
    log.info("pushed to %s: commit %s", result["url"], info.oid)
    return result


def _check_ready(layout: Layout, parts: list[str]) -> None:
    if "merged" in parts:
        merged = checkpoint.read_json(layout.metrics / "merge.json") or {}
        if not checkpoint.is_complete(layout.merged) or not merged.get("passed"):
            raise ConfigError(f"nothing to push: {layout.merged} is not a verified merged model; run `job merge` "
                              "(or `job run`) first, or set PUSH_WHAT=adapter")
    if "adapter" in parts and not checkpoint.is_complete(layout.adapter):
        raise ConfigError(f"nothing to push: {layout.adapter} is not a finished adapter; train first")


def upload_plan(s: Settings, layout: Layout, parts: list[str]) -> dict[str, Path | bytes]:
    """path in the repo -> local file, or bytes for what is generated (model cards, adapter config)."""
    plan: dict[str, Path | bytes] = {}
    if "merged" in parts:
        for path in sorted(layout.merged.iterdir()):
            if path.is_file() and path.name not in (COMPLETE, "README.md"):
                plan[path.name] = path
        plan["README.md"] = model_card(s, layout, "merged", parts=parts).encode()
    if "adapter" in parts:
        prefix = "adapter/" if "merged" in parts else ""
        for path in sorted(layout.adapter.iterdir()):
            if path.is_file() and path.name not in ADAPTER_SKIP:
                plan[prefix + path.name] = path
        adapter_config = json.loads((layout.adapter / "adapter_config.json").read_text(encoding="utf-8"))
        if _hub_id(s.base_model):  # not the path it had on the training machine
            adapter_config["base_model_name_or_path"] = s.base_model
        plan[prefix + "adapter_config.json"] = (json.dumps(adapter_config, indent=2, sort_keys=True) + "\n").encode()
        plan[prefix + "README.md"] = model_card(s, layout, "adapter", parts=parts).encode()
    return plan


def _fingerprint(repo: str, plan: dict[str, Path | bytes]) -> str:
    """What was pushed, cheaply: sealed files never change in place, so size and mtime identify them."""
    h = hashlib.sha256(repo.encode())
    for name, source in sorted(plan.items()):
        if isinstance(source, bytes):
            h.update(f"{name}:{hashlib.sha256(source).hexdigest()};".encode())
        else:
            stat = source.stat()
            h.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return h.hexdigest()[:32]


def _commit(api, repo: str, plan: dict[str, Path | bytes], parts: list[str]):
    """One commit: every planned file (the client skips those the Hub already has) and stale weight files."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    head = api.repo_info(repo).sha  # committed on top of exactly this: a lost-but-applied attempt gives 412
    folders = {name.rpartition("/")[0] for name in plan}  # weight files of an older push in the same folders
    stale = [name for name in api.list_repo_files(repo, revision=head)
             if name not in plan and name.rpartition("/")[0] in folders and WEIGHT_FILES.search(name)]
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=source if isinstance(source, bytes)
                                     else str(source)) for name, source in sorted(plan.items())]
    operations += [CommitOperationDelete(path_in_repo=name) for name in stale]
    return api.create_commit(repo, operations=operations, commit_message=f"Upload {' and '.join(parts)} (job)",
                             commit_description="Pushed by the fine-tuning job; see README.md for how it was made.",
                             parent_commit=head)


@contextmanager
def _timeouts():
    """Give the client's shared HTTP client timeouts (HUB_TIMEOUT) while pushing, then restore its factory."""
    import httpx2
    from huggingface_hub.utils import _http, set_client_factory

    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)

    def factory():
        client = previous()
        client.timeout = httpx2.Timeout(**HUB_TIMEOUT)
        return client

    set_client_factory(factory)
    try:
        yield
    finally:
        set_client_factory(previous)


def _retry(s: Settings, what: str, call):
    attempt = 0
    while True:
        try:
            return call()
        except Exception as error:  # classified below; everything else becomes PushFailed
            status = getattr(getattr(error, "response", None), "status_code", None)
            if status in AUTH_STATUS:
                raise _auth_error(s, what, status) from None
            transient, wait_hint = transient_hub_error(error)
            text = _describe(error)
            if not transient:
                raise PushFailed(f"push to {s.hub_model_id} failed while {what}: {text} (not retried). The merged "
                                 "model is on disk; fix the cause and rerun to push") from None
            if attempt >= s.push_retries:
                raise PushFailed(f"push to {s.hub_model_id} failed while {what} after {attempt + 1} attempts: "
                                 f"{text}. The merged model is on disk; rerun to push") from None
            delay = min(s.push_backoff * 2 ** attempt, MAX_BACKOFF)
            if wait_hint is not None:
                delay = max(delay, min(wait_hint, 600.0))
            attempt += 1
            log.warning("%s failed (%s); retry %d of %d in %.1f s", what, text, attempt, s.push_retries, delay)
            time.sleep(delay)


def _describe(error: Exception) -> str:
    status = getattr(getattr(error, "response", None), "status_code", None)
    first = (str(error).strip().splitlines() or [""])[0][:300]
    text = f"{type(error).__name__}" + (f" HTTP {status}" if status else "") + (f": {first}" if first else "")
    secret = token()
    return text.replace(secret, "***") if secret else text


def _write_if_changed(path: Path, content: bytes) -> None:
    if path.is_file() and path.read_bytes() == content:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(content)
    tmp.replace(path)


# ------------------------------------------------------------------------------------ model card

def _hub_id(name: str | None) -> bool:
    return bool(name) and bool(HUB_ID.fullmatch(name)) and not Path(name).exists()


def _trained_on(mix: list) -> str:
    """The data as the card names it: each source of DATASET, with its share of the training rows in a mix."""
    names = ["the bundled task set" if source.path == BUILTIN_DATASET else f"`{source.path}`" for source in mix]
    if mix[0].weight is not None:
        total = sum(source.weight for source in mix)
        names = [f"{name} ({source.weight / total:.0%})" for name, source in zip(names, mix)]
    return f"{', '.join(names[:-1])} and {names[-1]}" if len(names) > 1 else names[0]


METHODS = {"nf4": "QLoRA (4-bit NF4 base)", "int8": "LoRA on an 8-bit base", "none": "LoRA on a 16-bit base"}
# The settings the card's training table lists (SYSTEM_PROMPT only when set).
CARD_SETTINGS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "use_dora", "learning_rate",
                 "lr_scheduler", "warmup_ratio", "epochs", "max_steps", "micro_batch_size", "grad_accum", "max_length",
                 "packing", "seed", "data_format", "prompt_format", "system_prompt")


def model_card(s: Settings, layout: Layout, kind: str, *, parts: list[str] | None = None,
               merge_metrics: dict | None = None) -> str:
    """README.md for the merged model (kind="merged") or the adapter: YAML front matter, what it was trained
    from and on, the prompt format with an example, training settings, metrics, and how to load it."""
    parts = parts or [kind]
    merged = merge_metrics or checkpoint.read_json(layout.metrics / "merge.json") or {}
    base = "the built-in tiny Llama test model" if s.base_model == BUILTIN_MODEL else f"`{s.base_model}`"
    mix = sources(s)
    dataset = _trained_on(mix)
    method = METHODS.get(s.quantization, s.quantization)
    return "\n".join([
        *_front_matter(s, kind, mix),
        *_introduction(s, kind, parts, base, dataset, method),
        *_prompt_format(s, layout),
        *_how_to_load(s, kind, parts, merged),
        *_training_table(s, layout, base, dataset, mix, method),
        *_results_table(s, layout, merged),
        "## License", "",
        f"Not set by the training job: the terms of the base model ({base}) and of the dataset apply.", "",
    ])


def _front_matter(s: Settings, kind: str, mix: list) -> list[str]:
    """The card's YAML front matter: library, task, tags, and the base model and datasets where they are on the Hub."""
    front = {"library_name": "transformers" if kind == "merged" else "peft", "pipeline_tag": "text-generation",
             "license": "unknown",
             "tags": ["text-generation", "sft", "lora", *(["qlora"] if s.quantization != "none" else []),
                      *(["peft"] if kind == "adapter" else []), "trl"]}
    if _hub_id(s.base_model):
        front["base_model"] = s.base_model
        if kind == "merged":
            front["base_model_relation"] = "finetune"
    hub_datasets = [source.path for source in mix if _hub_id(source.path)]
    if hub_datasets:
        front["datasets"] = hub_datasets
    return ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", ""]


def _introduction(s: Settings, kind: str, parts: list[str], base: str, dataset: str, method: str) -> list[str]:
    """The title, what the model is, and where the adapter is when the merged model is beside it."""
    repo = s.hub_model_id
    lines = [
        f"# {repo.split('/')[-1] if repo else 'Fine-tuned model'}", "",
        (f"{base[0].upper() + base[1:]} fine-tuned on {dataset} with {method}; the adapter was merged into the "
         "16-bit base weights." if kind == "merged" else f"A LoRA adapter for {base}, trained on {dataset} with "
         f"{method}."), "",
    ]
    if len(parts) > 1:
        lines += ["This repository holds the merged model at its root and the LoRA adapter under `adapter/`.", ""]
    return lines


def _prompt_format(s: Settings, layout: Layout) -> list[str]:
    """The chat template with a conversation as trained, and the prompt for a new answer."""
    example, generation_prompt, template, stops = _prompt_example(s, layout)
    return [
        "## Prompt format", "",
        "Conversations are rendered with the chat template below, the one used in training; it is saved with "
        f"the tokenizer, so `apply_chat_template` reproduces it. Generation stops at {stops}.", "",
        "A conversation as trained (the answer and its end-of-turn token are what the loss was on):", "",
        "```text", example, "```", "",
        "The prompt for a new answer (`add_generation_prompt=True`):", "",
        "```text", generation_prompt, "```", "",
        "<details><summary>Chat template (Jinja)</summary>", "", "```jinja", template, "```", "", "</details>", "",
    ]


def _how_to_load(s: Settings, kind: str, parts: list[str], merged: dict) -> list[str]:
    """Code that loads the model (or the adapter, from its subfolder when the merged model is beside it) and asks
    it a question."""
    lines = ["## How to load", ""]
    if kind == "merged":
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model_id = "{s.hub_model_id or "path/to/merged"}"',
                  "tokenizer = AutoTokenizer.from_pretrained(model_id)",
                  'model = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto", device_map="auto")', ""]
    else:
        sub = ', subfolder="adapter"' if "merged" in parts else ""
        lines += ["```python", "from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer",
                  "", f'adapter_id = "{s.hub_model_id or "path/to/adapter"}"',
                  f"tokenizer = AutoTokenizer.from_pretrained(adapter_id{sub})",
                  f'model = AutoPeftModelForCausalLM.from_pretrained(adapter_id{sub}, dtype="auto", '
                  'device_map="auto")', ""]
    lines += [
        'messages = [{"role": "user", "content": "What is the capital of Norway?"}]',
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",",
        "                                       return_dict=True).to(model.device)",
        "output = model.generate(**inputs, max_new_tokens=128)  # stops at the end-of-turn token",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```", "",
    ]
    if kind == "merged":
        return lines + [f"Weights are {merged.get('dtype', '16-bit')} safetensors (sharded for large models); "
                        "`generation_config.json` lists EOS and the end-of-turn token as stop tokens.", ""]
    return lines + ["Loading the adapter downloads the base model it names in `adapter_config.json`.", ""]


def _training_table(s: Settings, layout: Layout, base: str, dataset: str, mix: list, method: str) -> list[str]:
    """What was trained from, on and how (CARD_SETTINGS), and what training did."""
    split = f" (split `{mix[0].alone(s).dataset_split}`)" if len(mix) == 1 else ""  # a mix: in summary.json
    lines = ["## Training", "", "| Setting | Value |", "| --- | --- |", f"| base model | {base} |",
             f"| dataset | {dataset}{split} |", f"| method | {method} |"]
    lines += [f"| `{name.upper()}` | `{getattr(s, name)}` |" for name in CARD_SETTINGS
              if not (name == "system_prompt" and s.system_prompt is None)]
    train = checkpoint.read_json(layout.metrics / "train.json") or {}
    stats = train.get("data") or {}
    # GRAD_ACCUM above is the setting: with GLOBAL_BATCH_SIZE the accumulation was derived for each layout
    global_batch = (train.get("batch") or {}).get("global_batch_size")
    for label, value in (("optimizer steps", train.get("steps")), ("rows per optimizer step", global_batch),
                         ("training rows", stats.get("train_rows")),
                         ("evaluation rows", stats.get("eval_rows")), ("final training loss",
                                                                      _num(train.get("train_loss")))):
        if value is not None:
            lines.append(f"| {label} | {value} |")
    return lines + [""]


def _results_table(s: Settings, layout: Layout, merged: dict) -> list[str]:
    """The eval loss and perplexity before and after training, and the merge check's figures."""
    evaluation = checkpoint.read_json(layout.metrics / "evaluate.json") or {}
    lines = ["## Results", "", "| Metric | Value |", "| --- | --- |"]
    for label, key in (("eval loss before training", "eval_loss_before"), ("eval loss after", "eval_loss_after"),
                       ("perplexity before", "perplexity_before"), ("perplexity after", "perplexity_after")):
        if evaluation.get(key) is not None:
            lines.append(f"| {label} | {_num(evaluation[key])} |")
    if merged.get("max_rounding_steps") is not None:
        lines.append(f"| merge check: merged weights vs base + adapter, computed in float32 | within "
                     f"{_num(merged['max_rounding_steps'])} {merged.get('dtype')} rounding steps "
                     f"({_num(merged.get('weight_error_of_bound'))} of the bound) |")
    if merged.get("max_abs_logit_gap") is not None:
        lines.append(f"| merge check: max logit gap, merged vs unmerged base + adapter | "
                     f"{_num(merged['max_abs_logit_gap'])} ({_pct(merged.get('relative_gap'))} of the largest "
                     f"logit; bound from rounding {_num(merged.get('logit_bound'))}; top-1 agreement "
                     f"{_pct(merged.get('top1_agreement'))}) |")
    if merged.get("gap_4bit") is not None:
        lines.append(f"| max logit gap, 16-bit vs the {s.quantization} training-time model | "
                     f"{_num(merged['gap_4bit'])} ({_pct(merged.get('relative_gap_4bit'))}) |")
    return lines + ["", "Evaluation rows are held out from the training data (or the configured evaluation split).",
                    ""]


def _prompt_example(s: Settings, layout: Layout) -> tuple[str, str, str, str]:
    """A rendered conversation and prompt, the template, and the stop tokens, from the adapter's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(layout.adapter), trust_remote_code=s.trust_remote_code)
    messages = [{"role": "user", "content": "What is the capital of Norway?"}]
    if s.system_prompt:
        messages.insert(0, {"role": "system", "content": s.system_prompt})
    conversation = messages + [{"role": "assistant", "content": "The capital of Norway is Oslo."}]
    example = tokenizer.apply_chat_template(conversation, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    meta = checkpoint.read_json(layout.adapter / "job.json") or {}
    ids = list(dict.fromkeys(i for i in (tokenizer.eos_token_id, meta.get("end_of_turn_id")) if i is not None))
    stops = " or ".join(f"`{tokenizer.convert_ids_to_tokens(i)}` (id {i})" for i in ids)
    return example, prompt, tokenizer.chat_template or "", stops


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.3g}%"
