"""The `job` command: every setting is a flag and an environment variable (flag wins).

    job run          # preflight -> train -> evaluate -> merge -> push; each stage skipped when done
    job preflight    # check settings, model and data; print the plan; no training
    job train | evaluate | merge | push      # one stage
Exit codes: see job.errors.EXIT_CODES (0 done, 2 bad input, 6 out of GPU memory, 75 preempted: rerun to resume).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import socket
import sys
import time
from typing import NoReturn

import click

import job
from job import checkpoint, config, errors, launch, names, stagefile, stopping
from job.checkpoint import Layout

log = logging.getLogger("job")


def setting_options(command):
    """Add a --flag for every Settings field, with its variable and default in the help."""
    for f in reversed(list(config.FIELDS.values())):
        choices = f.metadata["choices"]
        detail = f"one of {'|'.join(choices)}; " if choices else ""
        command = click.option(
            "--" + f.name.replace("_", "-"), f.name, default=None, metavar=config.value_type(f).__name__.upper(),
            help=f"{f.metadata['help']} [{detail}env {config.env_name(f)}; default {f.default}]")(command)
    return click.option("--config", "config_file", default=None, metavar="FILE",
                        help="YAML file of settings (keys as variables or field names) [env CONFIG_FILE]")(command)


def with_settings(command):
    """Resolve settings, set up logging, and turn job errors into their exit codes."""
    @setting_options
    @functools.wraps(command)
    def wrapper(config_file, **flags):
        s = config.load(flags, config_file=config_file)
        setup_logging(Layout(s.output))
        if launch.EXIT_DIR not in os.environ:  # not again in every training process
            for name, hint in names.misspelt_variables(os.environ, config.known_names()).items():
                log.warning("%s is not a setting and is ignored: %s", name, hint)
        return command(s)
    return wrapper


class SettingsCommand(click.Command):
    """A command whose --help lists the settings under their groups (inputs, model, training, ...)."""

    def format_options(self, ctx, formatter):
        sections: dict[str, list] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record:
                field = config.FIELDS.get(param.name)
                sections.setdefault(field.metadata["group"].capitalize() if field else "Options", []).append(record)
        for title, records in sections.items():
            with formatter.section(title):
                formatter.write_dl(records)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
             epilog="Settings: `job run --help` lists every one by group; each is also an environment variable "
                    "(upper case) and a key of the CONFIG_FILE YAML. Exit codes: "
                    + "; ".join(f"{k} {v}" for k, v in errors.EXIT_CODES.items()))
@click.version_option(job.__version__, prog_name="job")
def cli():
    """Fine-tune a causal LM with QLoRA/LoRA, merge it, verify it and push it to the Hub."""


cli.command_class = SettingsCommand


@cli.command()
@with_settings
def preflight(s):
    """Check settings, model and data, and print the plan and the machines it runs on (no training)."""
    from job.preflight import preflight as check

    where = launch.resolve(s)
    plan = check(s, world_size=where.world_size)
    plan["launch"] = {**where.describe(), "command": launch.command(s, where)}
    click.echo(json.dumps(plan, indent=2, ensure_ascii=False))


@cli.command()
@with_settings
def train(s):
    """Train the adapter (one process; `job run` launches it on every rank)."""
    from job.train import train as train_stage

    with owner(s), stage("training", s):
        train_stage(s)


@cli.command()
@with_settings
def evaluate(s):
    """Eval loss, perplexity and sample generations, before and after training."""
    from job.evaluate import evaluate as evaluate_stage

    with owner(s), stage("evaluation", s):
        check_adapter_intact(s)
        result = evaluate_stage(s)
    click.echo(json.dumps(result, indent=2, ensure_ascii=False))


@cli.command()
@with_settings
def merge(s):
    """Merge the adapter into the 16-bit base, verify it, save it to OUTPUT_DIR/merged."""
    from job.merge import merge as merge_stage

    with owner(s), stage("merge", s):
        check_adapter_intact(s)
        result = merge_stage(s)
    click.echo(json.dumps(result, indent=2, ensure_ascii=False))


@cli.command()
@with_settings
def push(s):
    """Push the merged model and/or adapter to HUB_MODEL_ID."""
    from job.publish import push as push_stage

    with owner(s):
        result = push_stage(s)
    click.echo(json.dumps(result, indent=2, ensure_ascii=False))


@cli.command()
@click.option("--model", "arch", default="llama-3-8b", show_default=True,
              type=click.Choice(["llama-3-8b", "mistral-7b"]), help="Architecture built with random weights.")
@click.option("--max-length", default="2048", show_default=True,
              help="MAX_LENGTH of every phase, or max: find the longest single sequence that trains "
                   "(doubling, then bisecting, one process per trial; docs/long-context.md).")
@click.option("--steps", default=8, show_default=True, help="Timed optimizer steps per phase.")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(1), help="Untimed steps first.")
@click.option("--phases", default="tutorial,stock,job", show_default=True,
              help="Comma-separated: tutorial, stock, job. Keep stock when --memory-cap is timed: it compiles "
                   "flex_attention before the capped stock phases (measured cold: 22% slow).")
@click.option("--memory-cap", default="", metavar="GIB[,GIB...]",
              help="Also compare under these GPU memory caps (as on smaller cards), e.g. 8,16,24.")
@click.option("--levers", is_flag=True,
              help="Also time the job with each lever changed on its own: uncapped when the job phase is timed, and "
                   "under each --memory-cap (24, 16, 8) for the levers a capped plan uses.")
@click.option("--stock-tries", default=2, show_default=True, type=click.IntRange(1),
              help="Stock recipes timed per memory cap; the fastest that fits is the comparison.")
@click.option("--variant", multiple=True, metavar="NAME:KEY=VALUE,...",
              help="An extra job phase with settings forced, e.g. 'flex:ATTN_IMPLEMENTATION=flex_attention'.")
@click.option("--workdir", default="", help="Where the models are built and kept [default: $TMPDIR/job-bench].")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@click.option("--out", default="", metavar="FILE", help="Also write the JSON report to FILE.")
def bench(arch, max_length, steps, warmup, phases, memory_cap, levers, stock_tries, variant, workdir, as_json, out):
    """Time the job's training path against the tutorial recipe and the best stock settings (GPU)."""
    from job.bench import compare, longest, recipes, report

    logging.basicConfig(level=logging.WARNING)
    try:
        caps = tuple(float(c) for c in memory_cap.split(",") if c.strip())
        if max_length.strip().lower() == "max":
            click.echo(json.dumps(longest.longest_sequence(arch, workdir, caps, out), indent=2))
            return
        max_length = int(max_length)
        variants = tuple(recipes.parse_variant(v) for v in variant)
    except ValueError as error:
        raise errors.ConfigError(f"job bench: {error}") from None
    phases = tuple(p.strip() for p in phases.split(",") if p.strip())
    if levers:
        variants = recipes.lever_variants(phases, caps) + variants
    opts = recipes.Options(model=arch, max_length=max_length, warmup=warmup, steps=steps, phases=phases,
                           memory_caps=caps, variants=variants, stock_tries=stock_tries, workdir=workdir,
                           as_json=as_json, out=out)
    figures = compare.run(opts)
    click.echo(json.dumps(figures, indent=2) if as_json else report.render(figures))


@cli.command()
@with_settings
def run(s):
    """The whole job: preflight, train, evaluate, merge, push. Rerun it to resume."""
    where = launch.resolve(s)
    if not where.is_first_machine:  # the first machine checks, evaluates, merges and pushes; the others train
        _train_only(s, where)
    if where.num_machines > 1:  # the others wait for machine 0's checks and tokenizing: tell them how it goes
        os.environ[stagefile.FILE_VARIABLE] = str(Layout(s.output).stage)
    # machine 0's lock stands for every machine (they share OUTPUT_DIR); a stop signal while waiting for it exits 75
    with stopping.stop_on_signals() as signals, owner(s) as lock:
        _run_stages(s, where, lock, signals)


def _train_only(s, where: launch.Topology) -> NoReturn:
    """Another machine than the first: its share of training, then its exit code."""
    log.info("machine %d of %d: training only", where.machine_rank, where.num_machines)
    with stopping.stop_on_signals():
        raise SystemExit(errors.EXIT_OK if checkpoint.is_complete(Layout(s.output).adapter)
                         else launch.run_training(s, where))


def _run_stages(s, where: launch.Topology, lock: int | None, signals: stopping.StageSignals) -> None:
    """Machine 0's stages in order, each recorded in summary.json; a stop signal that came during one (and that a
    library may have swallowed) ends the run with exit 75 before the next."""
    from job.evaluate import evaluate as evaluate_stage

    summary = Summary(Layout(s.output), s)
    with summary.recording_failures():
        _check_and_plan(s, where, summary)
        _train_unless_done(s, where, lock, summary)
        signals.check()
        summary.update(status="evaluating")
        with stage("evaluation", s):
            evaluate_stage(s)
        signals.check()
        summary.update(status="merging")
        from job.merge import merge as merge_stage

        with stage("merge", s):
            merge_stage(s)
        signals.check()
        if s.hub_model_id:
            summary.update(status="pushing")
            from job.publish import push as push_stage

            push_stage(s)
            signals.check()
        summary.update(status="done", exit_code=0)


def _check_and_plan(s, where: launch.Topology, summary: Summary) -> None:
    """Preflight for the whole layout; its plan goes to the log and summary.json."""
    from job.preflight import preflight as check

    stagefile.announce("checking the settings, model and data")
    plan = check(s, world_size=where.world_size)
    plan["launch"] = where.describe()
    log.info("plan: %s", json.dumps({k: v for k, v in plan.items() if k != "data"}, ensure_ascii=False))
    summary.update(status="training", plan=plan)


def _train_unless_done(s, where: launch.Topology, lock: int | None, summary: Summary) -> None:
    """Training on every machine, unless the adapter is finished and intact (a damaged one is moved aside and
    rebuilt). A training process's failure ends the run with its exit code."""
    layout = Layout(s.output)
    if checkpoint.intact(layout.adapter):
        return
    stagefile.announce("training")
    code = launch.run_training(s, where, lock)  # returns once every rank has finished
    if code == errors.EXIT_OUT_OF_MEMORY:  # the training process logged its CUDA report
        raise out_of_memory("training", s, f"see {layout.root / 'logs'}/job-rank*.log")
    if code != errors.EXIT_OK:
        summary.stopped(code, f"training ended with exit code {code}: {errors.EXIT_CODES.get(code, '')} "
                              f"(the message is in {layout.root / 'logs'}/job-rank*.log)")
        raise SystemExit(code)


def check_adapter_intact(s) -> None:
    """Before a single stage reads adapter/: a damaged one is moved aside and refused (exit 2) naming the bad file.
    `job train` (or `job run`, which does this itself) rebuilds it from the last checkpoint."""
    why = checkpoint.set_aside_if_damaged(Layout(s.output).adapter)
    if why:
        raise errors.ConfigError(f"the adapter is damaged: {why}. Run `job train` (or `job run`) to rebuild it from "
                                 "the last checkpoint")


@contextlib.contextmanager
def owner(s):
    """Own OUTPUT_DIR while the command runs (checkpoint.own): a second job there waits, then exits 2. A training
    process started by `job run` runs under its lock (inherited) and takes none. Yields the lock's descriptor."""
    if launch.EXIT_DIR in os.environ:
        yield None
        return
    with checkpoint.own(Layout(s.output)) as lock:
        yield lock


@contextlib.contextmanager
def stage(name: str, s):
    """Turn a CUDA out-of-memory error in this stage into exit 6 (never retried: the same settings would meet it
    again) with what to lower for it. Preflight only probes the card and the push does not use it."""
    try:
        yield
    except errors.JobError:
        raise
    except Exception as error:
        oom = errors.cuda_out_of_memory(error)
        if oom is None:
            raise
        log.error("the %s stage ran out of GPU memory", name, exc_info=True)  # where, and CUDA's full report
        raise out_of_memory(name, s, _first_sentences(oom)) from error


def _first_sentences(error: BaseException, count: int = 3) -> str:
    """How CUDA's report begins: what it tried to allocate and what the card has free (the rest is in the log)."""
    line = next(iter(str(error).strip().splitlines()), type(error).__name__)
    return ". ".join(line.split(". ")[:count])


def out_of_memory(name: str, s, detail: str) -> errors.OutOfMemory:
    """The error for stage `name` out of GPU memory, naming the settings that lower its memory, with their values."""
    return errors.OutOfMemory(f"the {name} stage ran out of GPU memory ({detail}): {MEMORY_ADVICE[name](s)}")


def _training_advice(s) -> str:
    keeps_rows = (f"GLOBAL_BATCH_SIZE={s.global_batch_size} keeps the rows per optimizer step" if s.global_batch_size
                  else f"raise GRAD_ACCUM, now {s.grad_accum}, to keep {s.micro_batch_size * s.grad_accum} rows per "
                       "optimizer step")
    lower = [f"MICRO_BATCH_SIZE (now {s.micro_batch_size}; {keeps_rows})"] if s.micro_batch_size > 1 else []
    lower.append(f"MAX_LENGTH (now {s.max_length})")
    # those two define the run, so checkpoints made with the old values are not resumed; these two do not
    keep = ([f"GRADIENT_CHECKPOINTING=true (now {s.gradient_checkpointing})"]
            if s.gradient_checkpointing not in ("true", "offload") else [])
    keep.append("GPU_MEMORY_GIB to what this job may use if another process shares the card (now "
                + (f"{s.gpu_memory_gib:g} GiB)" if s.gpu_memory_gib else "0: the free memory at the start)"))
    return (f"lower {' or '.join(lower)}, in a new OUTPUT_DIR if it holds checkpoints; or, resuming from them, "
            f"set {' or '.join(keep)}")


MEMORY_ADVICE = {
    "training": _training_advice,
    # MICRO_BATCH_SIZE and MAX_LENGTH define the run (a finished adapter would be refused); these do not
    "evaluation": lambda s: (f"set GPU_MEMORY_GIB (now {s.gpu_memory_gib:g}) to what the card holds: under a cap "
                             f"the eval loss takes one sequence at a time; lower MAX_NEW_TOKENS (now "
                             f"{s.max_new_tokens}) for the prompt test"),
    "merge": lambda s: f"set MERGE_DEVICE=cpu (now {s.merge_device}) to merge in CPU memory",
}


class Summary:
    """summary.json: the machine-readable state of the run, rewritten after every stage."""

    def __init__(self, layout: Layout, s):
        self.layout, self.settings = layout, s
        self.extra = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    @contextlib.contextmanager
    def recording_failures(self):
        """Record the error that ends the stages inside (handled or a bug: summary.json never stays "training" or
        "merging"), but for a refused run, which leaves the directory as it found it. A stop signal that a library
        wrapped in its own error is raised as the stop it is."""
        try:
            yield
        except Exception as error:
            cause = errors.preempted_cause(error) or error
            if not isinstance(cause, errors.Refused):
                self.failed(cause)
            if cause is error:
                raise
            raise cause from error

    def failed(self, error: Exception) -> None:
        self.stopped(getattr(error, "exit_code", errors.EXIT_UNEXPECTED), str(error) or type(error).__name__)

    def stopped(self, code: int, error: str) -> None:
        """Record why the run stopped. A summary that cannot be written (the disk is full) is logged, and the error
        that stopped the run stays the one reported."""
        try:
            self.update(status="preempted" if code == errors.EXIT_PREEMPTED else "failed", exit_code=code, error=error)
        except (OSError, errors.JobError):
            try:  # a full disk has no room for the temporary copy: the old summary's own space takes the new one
                self.layout.summary.write_text(json.dumps(self.contents(), indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
            except OSError as problem:
                log.warning("summary.json could not be updated: %s", problem)

    def update(self, **fields):
        self.extra.update(fields)
        checkpoint.write_json(self.layout.summary, self.contents(), root=self.layout.root)

    def contents(self) -> dict:
        metrics = {name: checkpoint.read_json(self.layout.metrics / f"{name}.json") or {}
                   for name in ("train", "evaluate", "merge", "push")}
        train, evaluation = metrics["train"], metrics["evaluate"]
        return {
            "status": self.extra.get("status"),
            "exit_code": self.extra.get("exit_code"),
            "error": self.extra.get("error"),
            "steps": train.get("steps"),
            "train_loss": train.get("train_loss"),
            "eval_loss_before": evaluation.get("eval_loss_before"),
            "eval_loss_after": evaluation.get("eval_loss_after"),
            "perplexity_before": evaluation.get("perplexity_before"),
            "perplexity_after": evaluation.get("perplexity_after"),
            "adapter_dir": str(self.layout.adapter) if checkpoint.is_complete(self.layout.adapter) else None,
            "merged_dir": str(self.layout.merged) if checkpoint.is_complete(self.layout.merged) else None,
            "push": metrics["push"] or None,
            "merge": metrics["merge"] or None,
            "samples": evaluation.get("samples"),
            "data": train.get("data") or self.extra.get("plan", {}).get("data"),
            "batch": train.get("batch") or self.extra.get("plan", {}).get("batch"),
            "loss_plot": str(self.layout.loss_plot) if self.layout.loss_plot.exists() else None,
            "tensorboard_dir": str(self.layout.tensorboard),
            "started": self.extra["started"],
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "settings": json.loads(config.to_json(self.settings)),
        }


class RedactToken(logging.Filter):
    """Belt and braces: the token never reaches a log line, whatever library printed it."""

    def filter(self, record):
        from job.publish import token

        secret = token()
        if secret and secret in record.getMessage():
            record.msg, record.args = record.getMessage().replace(secret, "***"), ()
        return True


def setup_logging(layout: Layout) -> None:
    if getattr(setup_logging, "done", False):
        return
    # training processes (started by `job run`, which sets JOB_EXIT_DIR) log as their rank; `job run` itself
    # and the other commands, one per machine, as their host
    if launch.EXIT_DIR in os.environ:
        who = f"rank {os.environ.get('RANK', '0')}"
        name = f"job-rank{os.environ.get('RANK', '0')}.log"
    else:
        who = socket.gethostname()
        name = f"job-{who}.log"
    fmt = logging.Formatter(f"%(asctime)s [{who}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stderr)]
    try:
        (layout.root / "logs").mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(layout.root / "logs" / name, encoding="utf-8"))
    except OSError:
        pass  # an unwritable OUTPUT_DIR is reported by preflight with its name
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in handlers:
        handler.setFormatter(fmt)
        handler.addFilter(RedactToken())
        root.addHandler(handler)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    setup_logging.done = True


def main(argv=None) -> None:
    use_token_file_everywhere()
    code = run_command(argv)
    # The exit code is decided. A stop signal from here on (srun stopping this node because another one exited
    # first) must not turn it into death by that signal while the interpreter shuts down: a scheduler would read
    # another outcome (train.sbatch requeues only when every node exited 75).
    # SIG_IGN, not a handler: Python puts SIG_DFL back for its own handlers while it finalizes, which takes a while
    # after torch; nothing is started from here on that could inherit the ignored signals.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    # the launchers between a training process and `job run` report any failure as 1, whatever failed
    # and when (even while reading the settings): the process leaves its own code for `job run`
    launch.report_exit_code(code)
    sys.exit(code)


def use_token_file_everywhere() -> None:
    """Make every Hub request read HF_TOKEN_FILE (downloads of a gated base model too, not only the push):
    huggingface_hub reads its token file from HF_TOKEN_PATH, once, when it is first imported."""
    if os.environ.get("HF_TOKEN_FILE") and not os.environ.get("HF_TOKEN_PATH"):
        os.environ["HF_TOKEN_PATH"] = os.environ["HF_TOKEN_FILE"]


def run_command(argv) -> int:
    """Run the command; its exit code (job.errors.EXIT_CODES)."""
    try:
        cli.main(args=argv, prog_name="job", standalone_mode=False)
    except errors.JobError as error:
        log.error("%s", error) if logging.getLogger().handlers else click.echo(f"error: {error}", err=True)
        return error.exit_code
    except click.exceptions.Abort:
        return 130
    except click.ClickException as error:
        error.show()
        return errors.EXIT_BAD_INPUT
    except SystemExit as stop:  # `job run` exits with the training code itself; a library may exit too
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or errors.EXIT_OK
        click.echo(stop.code, err=True)  # as Python does for sys.exit("message")
        return errors.EXIT_UNEXPECTED
    except Exception:
        log.exception("unexpected error")
        return errors.EXIT_UNEXPECTED
    return errors.EXIT_OK
