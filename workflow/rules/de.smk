# Pseudobulk differential expression (PyDESeq2) per cell type and per lineage, for each
# tested contrast: raw counts summed per sample, then per donor unit (sepsis_sc.design).


rule de:
    input:
        f"{RESULTS}/targets/scored.h5ad",
    output:
        results=f"{RESULTS}/de/{{contrast}}/de_results.tsv",
        summary=f"{RESULTS}/de/{{contrast}}/summary.tsv",
    log:
        f"{LOGS}/de/{{contrast}}.log",
    benchmark:
        f"{BENCH}/de/{{contrast}}.tsv"
    wildcard_constraints:
        contrast=_one_of(TESTED_CONTRASTS),
    conda:
        "../envs/sepsis_sc.yaml"
    threads: config["resources"]["threads"]  # PyDESeq2 spreads each label's genes
    resources:
        mem_mb=cohort_mem("de"),
        runtime=120,
    params:
        counts_layer=config["qc"]["downstream_layer"],
        contrast=contrast_spec,
        stats=config["stats"],
        de=config["de"],
    script:
        "../scripts/de.py"


rule de_figures:
    input:
        h5ad=f"{RESULTS}/targets/scored.h5ad",
        results=f"{RESULTS}/de/{{contrast}}/de_results.tsv",
        summary=f"{RESULTS}/de/{{contrast}}/summary.tsv",
    output:
        volcano=report(
            f"{RESULTS}/de/{{contrast}}/figures/volcano.png",
            caption="../report/de_volcano.rst",
            category="7. Differential expression",
            labels={"title": "Pseudobulk DE volcano plots"},
        ),
        heatmap=report(
            f"{RESULTS}/de/{{contrast}}/figures/heatmap.png",
            caption="../report/de_heatmap.rst",
            category="7. Differential expression",
            labels={"title": "Pseudobulk DE top-genes heatmap"},
        ),
    log:
        f"{LOGS}/de_figures/{{contrast}}.log",
    benchmark:
        f"{BENCH}/de_figures/{{contrast}}.tsv"
    wildcard_constraints:
        contrast=_one_of(TESTED_CONTRASTS),
    conda:
        "../envs/sepsis_sc.yaml"
    resources:
        mem_mb=cohort_mem("de_figures"),
        runtime=30,
    params:
        contrast=contrast_spec,
        stats=config["stats"],
        de=config["de"],
        counts_layer=config["qc"]["downstream_layer"],
    script:
        "../scripts/de_figures.py"
