# Ingest: one job per sample; raw counts into layers["counts"], sheet columns into obs.


rule ingest:
    input:
        sample_input,
    output:
        f"{RESULTS}/ingest/{{sample}}.h5ad",
    log:
        f"{LOGS}/ingest/{{sample}}.log",
    benchmark:
        f"{BENCH}/ingest/{{sample}}.tsv"
    conda:
        "../envs/sepsis_sc.yaml"
    resources:
        mem_mb=sample_mem_mb,
        runtime=30,
    params:
        record=sample_record,
        organism=config["organism"],
        min_cells=config["ingest"]["min_cells"],
    script:
        "../scripts/ingest.py"
