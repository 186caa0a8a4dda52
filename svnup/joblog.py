"""The console line of a failed workflow job: why it failed, and where its log is.

Every rule sends its command's output to its log, and the default profile's ``quiet: [host,
rules]`` drops Snakemake's error block of a failed job, so the console would show only
``CalledProcessError ... exit status 2`` and the reason would stay in the log. The workflow
(rules/common.smk) therefore listens to Snakemake's job-error event itself, which every failed job
raises whatever the console's quietness, and prints one line per failed job::

    svnup: <rule> failed: <reason>; log: <path>

The reason is the stage's own ``svnup STAGE: error: ...`` line (``svnup.cli``), else the log's
last line. The rules' shell commands stay as they are: Snakemake records each command's text with
the results it made, and a new text would make it compute every result again.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable
from pathlib import Path

ERROR_LINE = re.compile(r"svnup [a-z_]+: error: (?P<reason>.*)")
JOB_ERROR = "job_error"  # the value of Snakemake's LogEvent.JOB_ERROR


def reason(log: str | Path) -> str | None:
    """Why the job that wrote ``log`` failed: its last stage error, else its last line (progress
    bars are split at their carriage returns); None for an empty or unreadable log."""
    try:
        text = Path(log).read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None
    lines = [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]
    errors = [m.group("reason") for line in lines if (m := ERROR_LINE.search(line))]
    if errors:
        return errors[-1]
    return lines[-1] if lines else None


def failure_line(rule: str, logs: Iterable[str]) -> str:
    """The console line of a failed job of ``rule`` that logged to ``logs``."""
    logs = [str(log) for log in logs]
    if not logs:
        return f"svnup: {rule} failed (it has no log)"
    for log in logs:
        found = reason(log)
        if found:
            return f"svnup: {rule} failed: {found}; log: {log}"
    return f"svnup: {rule} failed (its log is empty); log: {logs[0]}"


class FailedJobs(logging.Handler):
    """A handler of Snakemake's logger that prints ``failure_line`` of every failed job on stderr
    as soon as Snakemake reports it."""

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "event", None)
        if getattr(event, "value", event) != JOB_ERROR:
            return
        logs = [str(log).split(" (")[0] for log in getattr(record, "log", None) or []]
        print(failure_line(getattr(record, "rule_name", "a job"), logs), file=sys.stderr)


def report_failed_jobs(logger: logging.Logger) -> None:
    """Attach ``FailedJobs`` to Snakemake's logger once (the workflow may be parsed again)."""
    if not any(isinstance(handler, FailedJobs) for handler in logger.handlers):
        logger.addHandler(FailedJobs())
