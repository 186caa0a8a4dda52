rule prune:
    input:
        unpack(checkpoint_sources),
    output:
        model=pruned_model(
            "results/{model}/runs/{allocation}/s{sparsity}/{pruner}/{key}/model"
        ),
        report=kept(
            "results/{model}/runs/{allocation}/s{sparsity}/{pruner}/{key}/prune.json"
        ),
    log:
        "results/{model}/logs/prune/{allocation}/s{sparsity}/{pruner}/{key}.log",
    benchmark:
        "results/{model}/benchmarks/prune/{allocation}/s{sparsity}/{pruner}/{key}.tsv"
    conda:
        "../envs/svnup.yaml"
    resources:
        **runtime_resources(),
    params:
        spec=lambda wc: checked(
            wc, cfg.prune_spec(settings(wc), wc.allocation, target(wc), wc.pruner)
        ),
        model=lambda wc: as_json(cfg.model_spec(settings(wc))),
        # a checkpoint only where it is kept; else the pruned layers, which the evaluations
        # apply to the dense model (a fraction of a checkpoint's disk)
        layers_only="" if config.get("save_model") else "--layers-only",
    shell:
        logged(
            "python -m svnup prune --spec {params.spec:q} --model {params.model:q} "
            "--device {resources.device} --batch-size {resources.batch_size} "
            "--offload {resources.offload} --threads {threads} "
            "--budget {input.budget} --calibration {input.calibration} "
            "--out-dir {output.model} --report {output.report} {params.layers_only}"
        )
