# Helpers of the zero-shot rules (rules/zeroshot.smk) and of collect; kept beside common.smk.
from svnup import zeroshot as zs

# The demo's local zero-shot task: pick the true continuation of a held-out passage.
DEMO_TASKS = "results/demo/tasks"
DEMO_TASK = {
    "source": f"{cfg.DEMO_CORPUS}/heldout.jsonl",
    "split": "test",
    "name": "demo_continuation",
    "n_docs": 100,
    "n_choices": 4,
    "seed": 0,
    # A choice of at most 120 bytes fits the demo model's 128 positions (context is cut).
    "context_sentences": 1,
    "max_sentence_bytes": 120,
}


wildcard_constraints:
    tasks=r"[0-9a-f]{12}",


def check_zero_shot(name, s):
    """Zero-shot tasks need the harness, an include_path that exists or that this workflow
    builds, and task names that the harness or the include path defines (checked against a
    cached index, see zs.known_tasks): say so before any job."""
    spec = zs.spec(s)
    if spec is None:
        return
    if zs.harness_version() is None:
        fail(
            f"config key 'evaluation.zero_shot' of model '{name}': "
            f"zero-shot evaluation needs lm-evaluation-harness; {zs.INSTALL_HINT}"
        )
    folder = spec["include_path"]
    built = {DEMO_TASKS: [DEMO_TASK["name"]]}
    if folder and folder not in built and not Path(folder).is_dir():
        fail(
            f"config key 'evaluation.zero_shot.include_path' of model '{name}': "
            f"{folder} is not a directory of task YAMLs"
        )
    try:
        zs.check_tasks(spec["tasks"], folder, built)
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


def zeroshot_task_inputs(wildcards):
    """The include path when this workflow builds it (the demo's task)."""
    spec = zs.spec(settings(wildcards))
    return local_inputs(spec["include_path"]) if spec and spec["include_path"] else []


def zeroshot_resources():
    """Runtime resources, with the zero-shot batch size where one is configured."""

    def batch_size(wildcards):
        s = settings(wildcards)
        return s["evaluation"]["zero_shot"].get("batch_size", s["batch_size"])

    return {**runtime_resources(), "batch_size": batch_size}


def collect_zero_shot(wildcards, input):
    return f"--zero-shot {input.zero_shot}" if input.zero_shot else ""
