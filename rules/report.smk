rule summary:
    input:
        lambda wc: ppl_targets(wc.model),
    output:
        kept(
            report(
                "results/{model}/summary.csv",
                category="Perplexity",
                labels={"model": "{model}", "table": "summary"},
            )
        ),
    log:
        "results/{model}/logs/summary.log",
    conda:
        "../envs/svnup.yaml"
    shell:
        "python -m svnup summary --runs {input} --out {output} > {log} 2>&1"


rule plots:
    input:
        summary="results/{model}/summary.csv",
        shapley=lambda wc: shapley_path(
            wc.model, cfg.for_pruner(settings(wc), settings(wc)["pruner"])
        ),
        budgets=report_budgets,
    output:
        shapley=kept(
            report(
                "results/{model}/report/shapley.png",
                category="Shapley values",
                labels={"model": "{model}", "figure": "per-block values"},
            )
        ),
        sparsity=kept(
            report(
                "results/{model}/report/sparsity.png",
                category="Allocation",
                labels={"model": "{model}", "figure": "per-block sparsity"},
            )
        ),
        ppl=kept(
            report(
                "results/{model}/report/perplexity.png",
                category="Perplexity",
                labels={"model": "{model}", "figure": "perplexity vs sparsity"},
            )
        ),
        html=kept("results/{model}/report/report.html"),
    log:
        "results/{model}/logs/report.log",
    conda:
        "../envs/svnup.yaml"
    params:
        out=lambda wildcards, output: Path(output.html).parent,
        results=lambda wildcards, output: Path(output.html).parent.parent,
        recommended=lambda wildcards: settings(wildcards)["allocation"]["method"],
        note=note_option,
    shell:
        "python -m svnup report --results {params.results} --out-dir {params.out} "
        "--summary {input.summary} --shapley {input.shapley} --budgets {input.budgets} "
        "--recommended {params.recommended} {params.note} > {log} 2>&1"
