rule metric:
    input:
        calibration=lambda wc: (
            calibration_path(wc.model, settings(wc))
            if METRICS[wc.metric].statistics
            else []
        ),
        model=lambda wc: local_inputs(model_path(wc)),
    output:
        kept("results/{model}/metrics/{metric}/{key}/scores.json"),
    log:
        "results/{model}/logs/metrics/{metric}/{key}.log",
    benchmark:
        "results/{model}/benchmarks/metrics/{metric}/{key}.tsv"
    conda:
        "../envs/svnup.yaml"
    resources:
        **runtime_resources(),
    params:
        spec=metric_spec_json,
        model=lambda wc: as_json(cfg.model_spec(settings(wc))),
        calibration=lambda wc, input: (
            f"--calibration {input.calibration}" if input.calibration else ""
        ),
    shell:
        "python -m svnup metric --spec {params.spec:q} --model {params.model:q} "
        "--device {resources.device} --batch-size {resources.batch_size} "
        "--offload {resources.offload} --threads {threads} "
        "{params.calibration} --out {output} > {log} 2>&1"


rule levels:
    input:
        calibration=lambda wc: calibration_path(wc.model, settings(wc)),
        model=lambda wc: local_inputs(model_path(wc)),
    output:
        kept("results/{model}/levels/{allocation}/{key}/s{sparsity}.h5"),
    log:
        "results/{model}/logs/levels/{allocation}/{key}/s{sparsity}.log",
    benchmark:
        "results/{model}/benchmarks/levels/{allocation}/{key}/s{sparsity}.tsv"
    conda:
        "../envs/svnup.yaml"
    resources:
        **runtime_resources(),
    params:
        spec=levels_spec_json,
        target=target,
        model=lambda wc: as_json(cfg.model_spec(settings(wc))),
    shell:
        "python -m svnup levels --spec {params.spec:q} --model {params.model:q} "
        "--sparsity {params.target} "
        "--device {resources.device} --batch-size {resources.batch_size} "
        "--offload {resources.offload} --threads {threads} "
        "--calibration {input.calibration} --out {output} > {log} 2>&1"


rule search:
    input:
        calibration=lambda wc: calibration_path(wc.model, settings(wc)),
        model=lambda wc: local_inputs(model_path(wc)),
        database=search_database,
        start=search_start,
    output:
        kept("results/{model}/search/{allocation}/{key}/s{sparsity}.json"),
    log:
        "results/{model}/logs/search/{allocation}/{key}/s{sparsity}.log",
    benchmark:
        "results/{model}/benchmarks/search/{allocation}/{key}/s{sparsity}.tsv"
    conda:
        "../envs/svnup.yaml"
    resources:
        **runtime_resources(),
    params:
        spec=search_spec_json,
        target=target,
        model=lambda wc: as_json(cfg.model_spec(settings(wc))),
        database=lambda wc, input: (
            f"--database {input.database}" if input.database else ""
        ),
        start=lambda wc, input: f"--start {input.start}" if input.start else "",
    shell:
        "python -m svnup search --spec {params.spec:q} --model {params.model:q} "
        "--sparsity {params.target} "
        "--device {resources.device} --batch-size {resources.batch_size} "
        "--offload {resources.offload} --threads {threads} "
        "--calibration {input.calibration} {params.database} {params.start} "
        "--out {output} > {log} 2>&1"


rule budget:
    input:
        scores=scores_input,
        calibration=lambda wc: calibration_path(wc.model, settings(wc)),
    output:
        kept("results/{model}/budget/{allocation}/{key}/s{sparsity}.json"),
    log:
        "results/{model}/logs/budget/{allocation}/{key}/s{sparsity}.log",
    benchmark:
        "results/{model}/benchmarks/budget/{allocation}/{key}/s{sparsity}.tsv"
    conda:
        "../envs/svnup.yaml"
    params:
        spec=budget_spec_json,
        target=target,
        scores=lambda wc, input: f"--scores {input.scores}" if input.scores else "",
    shell:
        "python -m svnup budget --spec {params.spec:q} --sparsity {params.target} "
        "--calibration {input.calibration} {params.scores} --out {output} > {log} 2>&1"


rule curve:
    input:
        scores=curve_inputs,
        type_games=curve_type_games,
    output:
        kept("results/{model}/curves/{allocation}/{key}/scores.json"),
    log:
        "results/{model}/logs/curves/{allocation}/{key}.log",
    benchmark:
        "results/{model}/benchmarks/curves/{allocation}/{key}.tsv"
    conda:
        "../envs/svnup.yaml"
    params:
        spec=curve_spec_json,
        type_games=lambda wc, input: (
            f"--type-games {input.type_games}" if input.type_games else ""
        ),
    shell:
        "python -m svnup curve --spec {params.spec:q} --scores {input.scores} "
        "{params.type_games} --out {output} > {log} 2>&1"
