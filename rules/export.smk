from svnup.export import MODIFIERS


# Cheap: reads a budget and the model's config, so it runs on the submitting host.
localrules:
    recipe,


rule recipe:
    input:
        budget=run_budget,
        model=lambda wc: local_inputs(model_path(wc)),
    output:
        kept(
            f"results/{{model}}/s{{sparsity}}/{{allocation}}/{{pruner,{'|'.join(MODIFIERS)}}}/recipe.yaml"
        ),
    log:
        "results/{model}/logs/recipe/s{sparsity}/{allocation}/{pruner}.log",
    conda:
        "../envs/svnup.yaml"
    params:
        model=lambda wc: as_json(cfg.model_spec(settings(wc))),
        nm=lambda wc: f"--nm {settings(wc)['nm']}" if settings(wc)["nm"] else "",
    shell:
        "python -m svnup recipe --budget {input.budget} --pruner {wildcards.pruner} "
        "--model {params.model:q} {params.nm} --out {output} > {log} 2>&1"
