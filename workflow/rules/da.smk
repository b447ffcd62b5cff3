# Neighbourhood differential abundance (Milo) per tested contrast, donors as units: which
# regions of the integrated kNN graph expand or shrink whatever their label, and which of
# them no named cell type or state explains (sepsis_sc.da).


rule da:
    input:
        h5ad=f"{RESULTS}/targets/scored.h5ad",
        effects=f"{RESULTS}/targets/{{contrast}}/condition_effects.tsv",
        composition=f"{RESULTS}/targets/{{contrast}}/composition.tsv",
    output:
        nhoods=f"{RESULTS}/da/{{contrast}}/nhoods.tsv",
        per_sample=f"{RESULTS}/da/{{contrast}}/per_sample.tsv",
    log:
        f"{LOGS}/da/{{contrast}}.log",
    benchmark:
        f"{BENCH}/da/{{contrast}}.tsv"
    wildcard_constraints:
        contrast=_one_of(TESTED_CONTRASTS),
    conda:
        "../envs/sepsis_sc.yaml"
    threads: config["resources"]["threads"]
    resources:
        mem_mb=cohort_mem("da"),
        runtime=120,
    params:
        da=config["da"],
        contrast=contrast_spec,
        use_rep=EMBEDDING_KEYS[config["integration"]["method"]],
        seed=config["seed"],
    script:
        "../scripts/da.py"


rule da_figures:
    input:
        h5ad=f"{RESULTS}/targets/scored.h5ad",
        nhoods=f"{RESULTS}/da/{{contrast}}/nhoods.tsv",
    output:
        beeswarm=report(
            f"{RESULTS}/da/{{contrast}}/figures/beeswarm.png",
            caption="../report/da_beeswarm.rst",
            category="6. Differential abundance",
            subcategory="{contrast}",
            labels={"title": "Neighbourhood DA by cell type"},
        ),
        umap=report(
            f"{RESULTS}/da/{{contrast}}/figures/nhood_umap.png",
            caption="../report/da_umap.rst",
            category="6. Differential abundance",
            subcategory="{contrast}",
            labels={"title": "DA neighbourhoods on the UMAP"},
        ),
    log:
        f"{LOGS}/da_figures/{{contrast}}.log",
    benchmark:
        f"{BENCH}/da_figures/{{contrast}}.tsv"
    wildcard_constraints:
        contrast=_one_of(TESTED_CONTRASTS),
    conda:
        "../envs/sepsis_sc.yaml"
    params:
        contrast=contrast_spec,
        alpha=config["da"]["alpha"],
    script:
        "../scripts/da_figures.py"
