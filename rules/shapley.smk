rule coalitions:
    input:
        calibration=lambda wc: calibration_path(wc.model, settings(wc)),
        masks=lambda wc: (
            probe_path(wc.model, store_settings(wc))
            if settings(wc)["shapley"]["ablation"] == "prune"
            else []
        ),
    output:
        kept("results/{model}/coalitions/{store}/{estimator}/{key}/{job}.h5"),
    log:
        "results/{model}/logs/coalitions/{store}/{estimator}/{key}/{job}.log",
    benchmark:
        "results/{model}/benchmarks/coalitions/{store}/{estimator}/{key}/{job}.tsv"
    conda:
        "../envs/svnup.yaml"
    resources:
        **runtime_resources(),
    params:
        spec=lambda wc: as_json(cfg.store_spec(store_settings(wc))),
        estimator=lambda wc: checked(
            wc, cfg.estimator_params(settings(wc), wc.estimator)
        ),
        model=lambda wc: as_json(cfg.model_spec(settings(wc))),
        store=lambda wc: f"{store_dir(wc.model, store_settings(wc))}/store",
        masks=lambda wc, input: f"--masks {input.masks}" if input.masks else "",
    shell:
        logged(
            "python -m svnup coalitions --spec {params.spec:q} --model {params.model:q} "
            "--estimator {params.estimator:q} --job {wildcards.job} "
            "--device {resources.device} --batch-size {resources.batch_size} "
            "--offload {resources.offload} --threads {threads} "
            "--calibration {input.calibration} {params.masks} --store {params.store} "
            "--out {output}"
        )


rule type_game:
    input:
        calibration=lambda wc: calibration_path(wc.model, settings(wc)),
        masks=lambda wc: probe_path(wc.model, type_game_settings(wc)),
    output:
        kept("results/{model}/type-games/{store}/damage.json"),
    log:
        "results/{model}/logs/type-games/{store}.log",
    benchmark:
        "results/{model}/benchmarks/type-games/{store}.tsv"
    conda:
        "../envs/svnup.yaml"
    resources:
        **runtime_resources(),
    params:
        spec=lambda wc: as_json(cfg.type_game_spec(type_game_settings(wc))),
        model=lambda wc: as_json(cfg.model_spec(settings(wc))),
        store=lambda wc: f"results/{wc.model}/coalitions/{wc.store}/store",
    shell:
        logged(
            "python -m svnup type_game --spec {params.spec:q} --model {params.model:q} "
            "--device {resources.device} --batch-size {resources.batch_size} "
            "--offload {resources.offload} --threads {threads} "
            "--calibration {input.calibration} --masks {input.masks} "
            "--store {params.store} --out {output}"
        )


rule shapley:
    input:
        lambda wc: job_paths(wc.model, shapley_settings(wc), wc.estimator),
    output:
        values=kept("results/{model}/shapley/{estimator}/{key}/scores.json"),
        table=kept(
            report(
                "results/{model}/shapley/{estimator}/{key}/shapley.csv",
                category="Shapley values",
                labels={
                    "model": "{model}",
                    "estimator": "{estimator}",
                    "table": "values",
                },
            )
        ),
    log:
        "results/{model}/logs/shapley/{estimator}/{key}.log",
    benchmark:
        "results/{model}/benchmarks/shapley/{estimator}/{key}.tsv"
    conda:
        "../envs/svnup.yaml"
    params:
        spec=lambda wc: as_json(cfg.shapley_spec(shapley_settings(wc), wc.estimator)),
    shell:
        "python -m svnup shapley --spec {params.spec:q} --jobs {input} --out {output.values} "
        "--csv {output.table} > {log} 2>&1"
