# svnup: Shapley-value-based non-uniform pruning (SV-NUP) of large language models.
#
#   snakemake --cores all                                  # the embedded demo (default target)
#   snakemake --cores all results/llama-7b/s0.7/ppl.json   # one model at one target sparsity
#   snakemake --workflow-profile profiles/slurm results/llama-7b/summary.csv


from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/common_zeroshot.smk"
include: "rules/calibration.smk"
include: "rules/shapley.smk"
include: "rules/allocation.smk"
include: "rules/pruning.smk"
include: "rules/zeroshot.smk"
include: "rules/evaluation.smk"
include: "rules/report.smk"
include: "rules/export.smk"
include: "rules/preflight.smk"


# Cheap bookkeeping runs on the submitting host, never as a cluster job.
localrules:
    all,
    budget,
    curve,
    shapley,
    collect,
    collect_dense,
    configured_pruner,
    configured_method,
    summary,
    plots,


rule all:
    default_target: True
    input:
        default_targets(),


onsuccess:
    print_outputs()
