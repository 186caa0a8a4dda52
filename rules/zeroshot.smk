# Like `evaluate`, it reads the checkpoint that `collect` keeps on disk and re-runs when what the
# checkpoint is made from changes (see evaluation.smk).
rule zeroshot:
    input:
        unpack(checkpoint_sources),
        report=checkpoint_report(
            lambda wildcards, folder: f"{folder}/zeroshot/{wildcards.tasks}.json"
        ),
    output:
        kept(
            "results/{model}/runs/{allocation}/s{sparsity}/{pruner}/{key}/zeroshot/{tasks}.json"
        ),
    log:
        "results/{model}/logs/zeroshot/{allocation}/s{sparsity}/{pruner}/{key}/{tasks}.log",
    benchmark:
        "results/{model}/benchmarks/zeroshot/{allocation}/s{sparsity}/{pruner}/{key}/{tasks}.tsv"
    conda:
        "../envs/svnup.yaml"
    resources:
        **zeroshot_resources(),
    params:
        spec=zeroshot_spec_json,
        model=lambda wc: as_json(cfg.model_spec(settings(wc))),
        model_dir=lambda wildcards, output: Path(output[0]).parent.parent / "model",
    shell:
        "python -m svnup zeroshot --spec {params.spec:q} --model {params.model:q} "
        "--device {resources.device} --batch-size {resources.batch_size} "
        "--offload {resources.offload} --threads {threads} "
        "--model-dir {params.model_dir} --out {output} > {log} 2>&1"


rule zeroshot_dense:
    input:
        model=lambda wc: local_inputs(model_path(wc)),
    output:
        kept("results/{model}/runs/dense/{key}/zeroshot/{tasks}.json"),
    log:
        "results/{model}/logs/zeroshot/dense/{key}/{tasks}.log",
    benchmark:
        "results/{model}/benchmarks/zeroshot/dense/{key}/{tasks}.tsv"
    conda:
        "../envs/svnup.yaml"
    resources:
        **zeroshot_resources(),
    params:
        spec=zeroshot_spec_json,
        model=lambda wc: checked(wc, cfg.model_spec(settings(wc))),
        path=model_path,
    shell:
        "python -m svnup zeroshot --spec {params.spec:q} --model {params.model:q} "
        "--device {resources.device} --batch-size {resources.batch_size} "
        "--offload {resources.offload} --threads {threads} "
        "--model-dir {params.path:q} --out {output} > {log} 2>&1"
