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
            labels={"title": "Provenance (config, package versions, device, seeds)"},
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


rule report_tables:
    input:
        report_table_inputs,
    output:
        cohort=report(
            directory(f"{RESULTS}/report/tables"),
            patterns=["{section}/{title}.html"],
            caption="../report/table.rst",
            category="{section}",
            labels={"title": "{title}"},
        ),
        contrasts=report(
            directory(f"{RESULTS}/report/contrast_tables"),
            patterns=["{section}/{contrast}/{title}.html"],
            caption="../report/table.rst",
            category="{section}",
            subcategory="{contrast}",
            labels={"title": "{title}"},
        ),
    log:
        f"{LOGS}/report_tables.log",
    conda:
        "../envs/sepsis_sc.yaml"
    params:
        cohort=report_table_specs(False),
        contrasts=report_table_specs(True),
    script:
        "../scripts/report_tables.py"
