# Helpers of the zero-shot rules (rules/zeroshot.smk) and of collect; kept beside common.smk.
from svnup import zeroshot as zs


wildcard_constraints:
    tasks=r"[0-9a-f]{12}",


def check_zero_shot(name, s):
    """Zero-shot tasks need the harness, an include_path that exists, and task names that the
    harness or the include path defines (checked against a cached index, see zs.known_tasks):
    say so before any job."""
    spec = zs.spec(s)
    if spec is None:
        return
    if zs.harness_version() is None:
        fail(
            f"config key 'evaluation.zero_shot' of model '{name}': "
            f"zero-shot evaluation needs lm-evaluation-harness; {zs.INSTALL_HINT}"
        )
    folder = spec["include_path"]
    if folder and not Path(folder).is_dir():
        fail(
            f"config key 'evaluation.zero_shot.include_path' of model '{name}': "
            f"{folder} is not a directory of task YAMLs"
        )
    try:
        zs.check_tasks(spec["tasks"], folder)
    except ValueError as error:
        fail(f"config key 'evaluation.zero_shot.tasks' of model '{name}': {error}")


def zeroshot_paths(folder, s):
    """The zero-shot result of a run folder ([] when no zero-shot tasks are configured)."""
    spec = zs.spec(s)
    return [] if spec is None else [f"{folder}/zeroshot/{cfg.key(spec)}.json"]


def zeroshot_spec_json(wildcards):
    spec = zs.spec(settings(wildcards))
    if spec is None:
        raise WorkflowError(
            "no zero-shot tasks are configured; set evaluation.zero_shot.tasks"
        )
    return checked(wildcards, spec, name="tasks")


def zeroshot_resources():
    """Runtime resources, with the zero-shot batch size where one is configured."""

    def batch_size(wildcards):
        s = settings(wildcards)
        return s["evaluation"]["zero_shot"].get("batch_size", s["batch_size"])

    return {**runtime_resources(), "batch_size": batch_size}


def collect_zero_shot(wildcards, input):
    return f"--zero-shot {input.zero_shot}" if input.zero_shot else ""
