rule calibrate:
    input:
        lambda wc: local_inputs(model_path(wc), settings(wc)["calibration"]["dataset"]),
    output:
        kept("results/{model}/calibration/{key}/calibration.h5"),
    log:
        "results/{model}/logs/calibrate/{key}.log",
    benchmark:
        "results/{model}/benchmarks/calibrate/{key}.tsv"
    conda:
        "../envs/svnup.yaml"
    resources:
        **runtime_resources(),
    params:
        spec=lambda wc: checked(wc, cfg.calibration_spec(settings(wc))),
    shell:
        logged(
            "python -m svnup calibrate --spec {params.spec:q} "
            "--device {resources.device} --batch-size {resources.batch_size} "
            "--offload {resources.offload} --threads {threads} --out {output}"
        )


rule probe:
    input:
        lambda wc: calibration_path(wc.model, settings(wc)),
    output:
        probe_file("results/{model}/probe/{key}/masks.h5"),
    log:
        "results/{model}/logs/probe/{key}.log",
    benchmark:
        "results/{model}/benchmarks/probe/{key}.tsv"
    conda:
        "../envs/svnup.yaml"
    resources:
        **runtime_resources(),
    params:
        spec=lambda wc: as_json(cfg.probe_spec(game_settings(wc, cfg.probe_spec))),
        model=lambda wc: as_json(cfg.model_spec(settings(wc))),
    shell:
        "python -m svnup probe --spec {params.spec:q} --model {params.model:q} "
        "--device {resources.device} --batch-size {resources.batch_size} "
        "--offload {resources.offload} --threads {threads} "
        "--calibration {input} --out {output} > {log} 2>&1"
