rule demo_corpus:
    output:
        train=f"{cfg.DEMO_CORPUS}/train.jsonl",
        heldout=f"{cfg.DEMO_CORPUS}/heldout.jsonl",
    log:
        "results/demo/logs/demo_corpus.log",
    benchmark:
        "results/demo/benchmarks/demo_corpus.tsv"
    conda:
        "../envs/svnup.yaml"
    params:
        folder=lambda wildcards, output: Path(output.train).parent,
    shell:
        "python -m svnup demo corpus {params.folder} > {log} 2>&1"


rule demo_model:
    input:
        rules.demo_corpus.output,
    output:
        directory(cfg.DEMO_MODEL),
    log:
        "results/demo/logs/demo_model.log",
    benchmark:
        "results/demo/benchmarks/demo_model.tsv"
    conda:
        "../envs/svnup.yaml"
    threads: 1  # several torch threads stall badly whenever another job shares the cores
    params:
        corpus=lambda wildcards, input: Path(input[0]).parent,
        demo=cfg.demo_settings(config),
    shell:
        logged(
            "python -m svnup demo train {params.corpus} {output} --steps {params.demo[steps]} "
            "--n-layers {params.demo[n_layers]} --seed {params.demo[seed]} --threads {threads}"
        )
