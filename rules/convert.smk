# A GGUF file named by a model entry becomes a float32 Hugging Face folder once, keyed by the
# file's content (svnup.gguf_files); every stage then loads that folder. Where the file lies is a
# resource, not an input or a param: reinstalling its package or moving it elsewhere must not
# convert again and re-run everything downstream of the conversion.
rule convert_gguf:
    output:
        directory(f"{cfg.GGUF_FOLDER}/{{key}}"),
    log:
        f"{cfg.GGUF_FOLDER}/logs/{{key}}.log",
    benchmark:
        f"{cfg.GGUF_FOLDER}/benchmarks/{{key}}.tsv"
    conda:
        "../envs/svnup.yaml"
    resources:
        gguf=gguf_file,
    shell:
        logged("python -m svnup convert --gguf {resources.gguf:q} --out-dir {output}")
