rule owl:
    input:
        lambda wc: calibration_path(wc.model, settings(wc)),
    output:
        "results/{model}/owl/{key}/outliers.json",
    log:
        "results/{model}/logs/owl/{key}.log",
    benchmark:
        "results/{model}/benchmarks/owl/{key}.tsv"
    conda:
        "../envs/svnup.yaml"
    resources:
        **runtime_resources(),
    params:
        spec=lambda wc: checked(wc, cfg.owl_spec(settings(wc))),
        model=lambda wc: as_json(cfg.model_spec(settings(wc))),
    shell:
        "python -m svnup owl --spec {params.spec:q} --model {params.model:q} "
        "--device {resources.device} --batch-size {resources.batch_size} "
        "--offload {resources.offload} --threads {threads} "
        "--calibration {input} --out {output} > {log} 2>&1"


rule budget:
    input:
        importance=importance_input,
        calibration=lambda wc: calibration_path(wc.model, settings(wc)),
    output:
        "results/{model}/budget/{allocation}/{key}/s{sparsity}.json",
    log:
        "results/{model}/logs/budget/{allocation}/{key}/s{sparsity}.log",
    benchmark:
        "results/{model}/benchmarks/budget/{allocation}/{key}/s{sparsity}.tsv"
    conda:
        "../envs/svnup.yaml"
    params:
        spec=lambda wc: checked(wc, cfg.budget_spec(settings(wc), wc.allocation)),
        target=target,
        importance=lambda wc, input: (
            f"--importance {input.importance}" if input.importance else ""
        ),
    shell:
        "python -m svnup budget --spec {params.spec:q} --sparsity {params.target} "
        "--calibration {input.calibration} {params.importance} --out {output} > {log} 2>&1"
