# Therapy-target states: per-cell scores within parent populations, then sample-level
# statistics (the sample is the unit of replication) and the ranked therapy-target summary.


rule score:
    input:
        h5ad=f"{RESULTS}/annotated.h5ad",
        signatures=signature_file(),
    output:
        h5ad=f"{RESULTS}/targets/scored.h5ad",
        rules=report(
            f"{RESULTS}/targets/state_rules.tsv",
            caption="../report/state_rules.rst",
            category="5. Therapy targets",
        ),
    log:
        f"{LOGS}/score.log",
    benchmark:
        f"{BENCH}/score.tsv"
    conda:
        "../envs/sepsis_sc.yaml"
    threads: 1  # numpy-bound and short: leaves the other core to cluster_summary
    resources:
        mem_mb=cohort_mem_mb,
        runtime=60,
    params:
        scoring=config["scoring"],
        organism=config["organism"],
        contrast=config["contrast"],
        min_cells=config["stats"]["min_cells"],
    script:
        "../scripts/score.py"


rule stats:
    input:
        f"{RESULTS}/targets/scored.h5ad",
    output:
        sample_table=report(
            f"{RESULTS}/targets/sample_table.tsv",
            caption="../report/sample_table.rst",
            category="5. Therapy targets",
        ),
        effects=report(
            f"{RESULTS}/targets/condition_effects.tsv",
            caption="../report/condition_effects.rst",
            category="5. Therapy targets",
        ),
        composition=report(
            f"{RESULTS}/targets/composition.tsv",
            caption="../report/composition_table.rst",
            category="5. Therapy targets",
        ),
        targets=report(
            f"{RESULTS}/targets/therapy_targets.tsv",
            caption="../report/therapy_targets_table.rst",
            category="5. Therapy targets",
        ),
    log:
        f"{LOGS}/stats.log",
    benchmark:
        f"{BENCH}/stats.tsv"
    conda:
        "../envs/sepsis_sc.yaml"
    params:
        stats=config["stats"],
        contrast=config["contrast"],
    script:
        "../scripts/stats.py"


rule target_figures:
    input:
        h5ad=f"{RESULTS}/targets/scored.h5ad",
        sample_table=f"{RESULTS}/targets/sample_table.tsv",
        effects=f"{RESULTS}/targets/condition_effects.tsv",
        composition=f"{RESULTS}/targets/composition.tsv",
        targets=f"{RESULTS}/targets/therapy_targets.tsv",
    output:
        forest=report(
            f"{RESULTS}/targets/figures/forest_plot.png",
            caption="../report/forest_plot.rst",
            category="5. Therapy targets",
        ),
        points=report(
            f"{RESULTS}/targets/figures/sample_points.png",
            caption="../report/sample_points.rst",
            category="5. Therapy targets",
        ),
        umaps=report(
            f"{RESULTS}/targets/figures/umap_scores.png",
            caption="../report/umap_scores.rst",
            category="5. Therapy targets",
        ),
        composition=report(
            f"{RESULTS}/targets/figures/composition.png",
            caption="../report/composition.rst",
            category="5. Therapy targets",
        ),
        targets=report(
            f"{RESULTS}/targets/figures/therapy_targets.png",
            caption="../report/therapy_targets.rst",
            category="5. Therapy targets",
        ),
    log:
        f"{LOGS}/target_figures.log",
    benchmark:
        f"{BENCH}/target_figures.tsv"
    conda:
        "../envs/sepsis_sc.yaml"
    params:
        contrast=config["contrast"],
        alpha=config["stats"]["alpha"],
    script:
        "../scripts/target_figures.py"
