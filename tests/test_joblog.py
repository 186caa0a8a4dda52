"""A failed workflow job's reason and log on the console (the workflow side is in
tests/test_workflow.py, with the real snakemake)."""

import logging
from enum import Enum

from svnup.joblog import FailedJobs, failure_line, reason, report_failed_jobs


class Event(Enum):  # stands in for Snakemake's LogEvent
    JOB_ERROR = "job_error"
    JOB_INFO = "job_info"


def test_the_reason_is_the_stages_error_else_the_logs_last_line(tmp_path):
    log = tmp_path / "stage.log"
    log.write_text(
        "2026-12-02 INFO svnup: loading\ncoalitions:  50%|#####     | 3/6\r"
        "svnup coalitions: error: masks.h5 is truncated or corrupt (x); delete it\n"
        "2026-12-02 INFO svnup: a message written after the error\n"
    )
    assert reason(log) == "masks.h5 is truncated or corrupt (x); delete it"
    log.write_text("cp: cannot stat 'a/ppl.json': No such file or directory\n\n")
    assert reason(log) == "cp: cannot stat 'a/ppl.json': No such file or directory"
    log.write_text("prune wanda:  10%|#   | 1/10\rprune wanda:  20%|##  | 2/10")  # killed
    assert reason(log) == "prune wanda:  20%|##  | 2/10"
    log.write_text("")
    assert reason(log) is None and reason(tmp_path / "absent.log") is None


def test_the_failure_line_names_the_rule_the_reason_and_the_log(tmp_path):
    log = tmp_path / "summary.log"
    log.write_text("Traceback ...\nsvnup summary: error: unexpected KeyError: 'perplexity'; x\n")
    assert failure_line("summary", [str(log)]) == (
        f"svnup: summary failed: unexpected KeyError: 'perplexity'; x; log: {log}"
    )
    empty = tmp_path / "empty.log"
    empty.write_text("")
    assert failure_line("budget", [str(empty)]) == (
        f"svnup: budget failed (its log is empty); log: {empty}"
    )
    assert failure_line("all", []) == "svnup: all failed (it has no log)"


def test_failed_jobs_are_printed_once_whatever_else_is_logged(tmp_path, capsys):
    log = tmp_path / "calibrate.log"
    log.write_text("svnup calibrate: error: data.jsonl: line 500 has no 'text' field: fix\n")
    logger = logging.getLogger("test-joblog")
    report_failed_jobs(logger)
    report_failed_jobs(logger)  # a workflow parsed twice
    assert sum(isinstance(h, FailedJobs) for h in logger.handlers) == 1
    extra = {"rule_name": "calibrate", "log": [f"{log} (temp)"]}
    logger.error("Error in rule calibrate", extra={**extra, "event": Event.JOB_ERROR})
    logger.error("rule calibrate", extra={**extra, "event": Event.JOB_INFO})
    logger.error("no event at all")
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"svnup: calibrate failed: data.jsonl: line 500 has no 'text' field: fix; log: {log}"
    ]
