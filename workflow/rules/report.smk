# Provenance: the config used, package versions, the scVI device and the seeds, saved with
# the results so every figure can be traced to what made it.


rule provenance:
    input:
        record=f"{RESULTS}/integrate/integration.yaml",
        annotated=f"{RESULTS}/annotated.h5ad",
    output:
        report(
            f"{RESULTS}/provenance.yaml",
            caption="../report/provenance.rst",
            category="0. Provenance",
        ),
    log:
        f"{LOGS}/provenance.log",
    benchmark:
        f"{BENCH}/provenance.tsv"
    conda:
        "../envs/sepsis_sc.yaml"
    params:
        config=config,
    script:
        "../scripts/provenance.py"
