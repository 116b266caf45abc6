"""The `job` command: every setting is a flag and an environment variable (flag wins).

    job run          # preflight -> train -> evaluate -> merge -> push; each stage skipped when done
    job preflight    # check settings, model and data; print the plan; no training
    job train | evaluate | merge | push      # one stage
Exit codes: see job.errors.EXIT_CODES (0 done, 2 bad input, 75 preempted: rerun to resume).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time

import click

from job import checkpoint, config, errors
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
        return command(s)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
             epilog="Exit codes: " + "; ".join(f"{k} {v}" for k, v in errors.EXIT_CODES.items()))
def cli():
    """Fine-tune a causal LM with QLoRA/LoRA, merge it, verify it and push it to the Hub."""


@cli.command()
@with_settings
def preflight(s):
    """Check settings, model and data, and print the plan (no training)."""
    from job.preflight import preflight as check

    click.echo(json.dumps(check(s), indent=2, ensure_ascii=False))


@cli.command()
@with_settings
def train(s):
    """Train the adapter (one process; `job run` launches it on every rank)."""
    from job.train import train as train_stage

    train_stage(s)


@cli.command()
@with_settings
def evaluate(s):
    """Eval loss, perplexity and sample generations, before and after training."""
    from job.evaluate import evaluate as evaluate_stage

    click.echo(json.dumps(evaluate_stage(s), indent=2, ensure_ascii=False))


@cli.command()
@with_settings
def merge(s):
    """Merge the adapter into the 16-bit base, verify it, save it to OUTPUT_DIR/merged."""
    from job.merge import merge as merge_stage

    click.echo(json.dumps(merge_stage(s), indent=2, ensure_ascii=False))


@cli.command()
@with_settings
def push(s):
    """Push the merged model and/or adapter to HUB_MODEL_ID."""
    from job.publish import push as push_stage

    click.echo(json.dumps(push_stage(s), indent=2, ensure_ascii=False))


@cli.command()
@with_settings
def run(s):
    """The whole job: preflight, train, evaluate, merge, push. Rerun it to resume."""
    from job import launch
    from job.evaluate import evaluate as evaluate_stage
    from job.preflight import preflight as check

    layout = Layout(s.output)
    summary = Summary(layout, s)
    try:
        plan = check(s)
        log.info("plan: %s", json.dumps({k: v for k, v in plan.items() if k != "data"}, ensure_ascii=False))
        summary.update(status="training", plan=plan)
        if not checkpoint.is_complete(layout.adapter):
            code = launch.run_training(s)
            if code != errors.EXIT_OK:
                summary.update(status="preempted" if code == errors.EXIT_PREEMPTED else "failed", exit_code=code)
                raise SystemExit(code)
        summary.update(status="evaluating")
        evaluate_stage(s)
        summary.update(status="merging")
        from job.merge import merge as merge_stage

        merge_stage(s)
        if s.hub_model_id:
            summary.update(status="pushing")
            from job.publish import push as push_stage

            push_stage(s)
        summary.update(status="done", exit_code=0)
    except errors.JobError as error:
        summary.update(status="preempted" if isinstance(error, errors.Preempted) else "failed",
                       exit_code=error.exit_code, error=str(error))
        raise


class Summary:
    """summary.json: the machine-readable state of the run, rewritten after every stage."""

    def __init__(self, layout: Layout, s):
        self.layout, self.settings = layout, s
        self.extra = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def update(self, **fields):
        self.extra.update(fields)
        metrics = {name: checkpoint.read_json(self.layout.metrics / f"{name}.json") or {}
                   for name in ("train", "evaluate", "merge", "push")}
        train, evaluation = metrics["train"], metrics["evaluate"]
        summary = {
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
            "loss_plot": str(self.layout.loss_plot) if self.layout.loss_plot.exists() else None,
            "tensorboard_dir": str(self.layout.tensorboard),
            "started": self.extra["started"],
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "settings": json.loads(config.to_json(self.settings)),
        }
        checkpoint.write_json(self.layout.summary, summary)


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
    rank = os.environ.get("RANK", "0")
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stderr)]
    try:
        (layout.root / "logs").mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(layout.root / "logs" / f"job-rank{rank}.log", encoding="utf-8"))
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
    try:
        cli.main(args=argv, prog_name="job", standalone_mode=False)
    except errors.JobError as error:
        log.error("%s", error) if logging.getLogger().handlers else click.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(errors.EXIT_BAD_INPUT)
    except SystemExit:
        raise
    except Exception:
        log.exception("unexpected error")
        sys.exit(errors.EXIT_UNEXPECTED)
    sys.exit(errors.EXIT_OK)
