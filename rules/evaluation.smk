# An evaluation runs after pruning but does not take the checkpoint as an input: `collect` does,
# which keeps a temporary checkpoint (save_model off) on disk until every evaluation of the run
# is done, and brings it back when an evaluation is added later. Pruning again then leaves the
# finished evaluations alone: the prune report is an ancient input, for the order, while the
# evaluation on disk was measured on the checkpoint the current files make (its identity,
# svnup.provenance). What the checkpoint is made from (every input of the prune job: budget,
# calibration, local model files) are ordinary inputs, so a job that rebuilds one re-runs the
# evaluation; `collect` checks that every number it gathers belongs to one checkpoint.
rule evaluate:
    input:
        unpack(checkpoint_sources),
        report=checkpoint_report(
            lambda wildcards, folder: f"{folder}/eval/{wildcards.dataset}.json"
        ),
        data=lambda wc: local_inputs(*settings(wc)["evaluation"]["datasets"]),
    output:
        kept(
            "results/{model}/runs/{allocation}/s{sparsity}/{pruner}/{key}/eval/{dataset}.json"
        ),
    log:
        "results/{model}/logs/evaluate/{allocation}/s{sparsity}/{pruner}/{key}/{dataset}.log",
    benchmark:
        "results/{model}/benchmarks/evaluate/{allocation}/s{sparsity}/{pruner}/{key}/{dataset}.tsv"
    conda:
        "../envs/svnup.yaml"
    resources:
        **runtime_resources(),
    params:
        spec=eval_spec_of,
        model=lambda wc: as_json(cfg.model_spec(settings(wc))),
        model_dir=lambda wildcards, output: Path(output[0]).parent.parent / "model",
    shell:
        logged(
            "python -m svnup evaluate --spec {params.spec:q} --model {params.model:q} "
            "--device {resources.device} --batch-size {resources.batch_size} "
            "--offload {resources.offload} --threads {threads} "
            "--model-dir {params.model_dir} --out {output}"
        )


rule evaluate_dense:
    input:
        model=lambda wc: local_inputs(model_path(wc)),
        data=lambda wc: local_inputs(*settings(wc)["evaluation"]["datasets"]),
    output:
        kept("results/{model}/runs/dense/{key}/eval/{dataset}.json"),
    log:
        "results/{model}/logs/evaluate/dense/{key}/{dataset}.log",
    benchmark:
        "results/{model}/benchmarks/evaluate/dense/{key}/{dataset}.tsv"
    conda:
        "../envs/svnup.yaml"
    resources:
        **runtime_resources(),
    params:
        spec=eval_spec_of,
        model=lambda wc: checked(wc, cfg.model_spec(settings(wc))),
        path=model_path,
    shell:
        logged(
            "python -m svnup evaluate --spec {params.spec:q} --model {params.model:q} "
            "--device {resources.device} --batch-size {resources.batch_size} "
            "--offload {resources.offload} --threads {threads} "
            "--model-dir {params.path:q} --out {output}"
        )


rule collect:
    input:
        budget=run_budget,
        report=lambda wc: f"{run_folder(wc)}/prune.json",
        evaluations=lambda wc: eval_paths(run_folder(wc), settings(wc)),
        zero_shot=lambda wc: zeroshot_paths(run_folder(wc), settings(wc)),
        checkpoint=lambda wc: f"{run_folder(wc)}/model",
    output:
        kept("results/{model}/s{sparsity}/{allocation}/{pruner}/ppl.json"),
    log:
        "results/{model}/logs/collect/s{sparsity}/{allocation}/{pruner}.log",
    conda:
        "../envs/svnup.yaml"
    params:
        target=target,
        zero_shot=collect_zero_shot,
        # ppl.json names the kept checkpoint; turning save_model on re-runs this (and pruning)
        kept=lambda wc: (
            f"--checkpoint {run_folder(wc)}/model" if config.get("save_model") else ""
        ),
    shell:
        "python -m svnup collect --name {wildcards.model} --sparsity {params.target} "
        "--allocation {wildcards.allocation} --pruner {wildcards.pruner} "
        "--budget {input.budget} --report {input.report} {params.zero_shot} {params.kept} "
        "--evaluations {input.evaluations} --out {output} > {log} 2>&1"


rule collect_dense:
    input:
        evaluations=lambda wc: eval_paths(
            dense_dir(wc.model, settings(wc)), settings(wc)
        ),
        zero_shot=lambda wc: zeroshot_paths(
            dense_dir(wc.model, settings(wc)), settings(wc)
        ),
    output:
        kept("results/{model}/dense/ppl.json"),
    log:
        "results/{model}/logs/collect/dense.log",
    conda:
        "../envs/svnup.yaml"
    params:
        zero_shot=collect_zero_shot,
        model=lambda wc: as_json(cfg.model_spec(settings(wc))),
    shell:
        "python -m svnup collect --name {wildcards.model} {params.zero_shot} "
        "--model {params.model:q} --evaluations {input.evaluations} --out {output} > {log} 2>&1"


rule configured_pruner:
    input:
        lambda wc: f"{target_folder(wc)}/{wc.allocation}/{settings(wc)['pruner']}/ppl.json",
    output:
        "results/{model}/s{sparsity}/{allocation}/ppl.json",
    log:
        "results/{model}/logs/collect/s{sparsity}/{allocation}.log",
    conda:
        "../envs/svnup.yaml"
    shell:
        "cp {input} {output} 2> {log}"


rule configured_method:
    input:
        lambda wc: f"{target_folder(wc)}/{settings(wc)['allocation']['method']}/ppl.json",
    output:
        "results/{model}/s{sparsity}/ppl.json",
    log:
        "results/{model}/logs/collect/s{sparsity}.log",
    conda:
        "../envs/svnup.yaml"
    shell:
        "cp {input} {output} 2> {log}"
