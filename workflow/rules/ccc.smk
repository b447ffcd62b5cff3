# Therapy axes between cells: per-sample ligand-receptor scores (LIANA+) of the checkpoint
# and cytokine signals sepsis trials target (resources/therapy_axes.yaml), tested per
# contrast with donors as units (sepsis_sc.ccc).


rule ccc_scores:
    input:
        h5ad=f"{RESULTS}/targets/scored.h5ad",
    output:
        per_sample=f"{RESULTS}/ccc/per_sample.tsv",
    log:
        f"{LOGS}/ccc_scores.log",
    benchmark:
        f"{BENCH}/ccc_scores.tsv"
    conda:
        "../envs/sepsis_sc.yaml"
    threads: 1
    resources:
        mem_mb=cohort_mem("ccc"),
        runtime=240,
    params:
        ccc=config["ccc"],
        organism=config["organism"],
        seed=config["seed"],
    script:
        "../scripts/ccc_scores.py"


rule ccc:
    input:
        h5ad=f"{RESULTS}/targets/scored.h5ad",
        per_sample=f"{RESULTS}/ccc/per_sample.tsv",
    output:
        axes=f"{RESULTS}/ccc/{{contrast}}/axes.tsv",
    log:
        f"{LOGS}/ccc/{{contrast}}.log",
    benchmark:
        f"{BENCH}/ccc/{{contrast}}.tsv"
    wildcard_constraints:
        contrast=_one_of(TESTED_CONTRASTS),
    conda:
        "../envs/sepsis_sc.yaml"
    resources:
        mem_mb=cohort_mem("stats"),
    params:
        ccc=config["ccc"],
        stats=config["stats"],
        contrast=contrast_spec,
    script:
        "../scripts/ccc.py"


rule ccc_figures:
    input:
        h5ad=f"{RESULTS}/targets/scored.h5ad",
        per_sample=f"{RESULTS}/ccc/per_sample.tsv",
        axes=f"{RESULTS}/ccc/{{contrast}}/axes.tsv",
    output:
        heatmap=report(
            f"{RESULTS}/ccc/{{contrast}}/figures/axes_heatmap.png",
            caption="../report/ccc_heatmap.rst",
            category="5. Therapy targets",
            subcategory="{contrast}",
            labels={"title": "Therapy axes per sample (z vs controls)"},
        ),
    log:
        f"{LOGS}/ccc_figures/{{contrast}}.log",
    benchmark:
        f"{BENCH}/ccc_figures/{{contrast}}.tsv"
    wildcard_constraints:
        contrast=_one_of(TESTED_CONTRASTS),
    conda:
        "../envs/sepsis_sc.yaml"
    params:
        contrast=contrast_spec,
        alpha=config["stats"]["alpha"],
    script:
        "../scripts/ccc_figures.py"
