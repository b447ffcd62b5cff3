# Therapy-target states: per-cell scores within parent populations, per-sample tables, then per
# contrast the sample-level statistics (donors are the units of replication) and the ranked
# therapy-target summary.


rule score:
    input:
        h5ad=f"{RESULTS}/annotated.h5ad",
        signatures=signature_file(),
    output:
        h5ad=f"{RESULTS}/targets/scored.h5ad",
        rules=f"{RESULTS}/targets/state_rules.tsv",
    log:
        f"{LOGS}/score.log",
    benchmark:
        f"{BENCH}/score.tsv"
    conda:
        "../envs/sepsis_sc.yaml"
    threads: 1  # numpy-bound and short: leaves the other core to cluster_summary
    resources:
        mem_mb=cohort_mem("score"),
        runtime=60,
    params:
        counts_layer=config["qc"]["downstream_layer"],
        scoring=config["scoring"],
        organism=config["organism"],
        reference=call_reference(),
        min_cells=config["stats"]["min_cells"],
    script:
        "../scripts/score.py"


rule sample_table:
    input:
        f"{RESULTS}/targets/scored.h5ad",
    output:
        sample_table=f"{RESULTS}/targets/sample_table.tsv",
        contrasts=f"{RESULTS}/targets/contrasts.tsv",
    log:
        f"{LOGS}/sample_table.log",
    benchmark:
        f"{BENCH}/sample_table.tsv"
    conda:
        "../envs/sepsis_sc.yaml"
    resources:
        mem_mb=cohort_mem("sample_table"),
    params:
        counts_layer=config["qc"]["downstream_layer"],
        stats=config["stats"],
        contrasts=contrast_table(),
    script:
        "../scripts/sample_table.py"


rule stats:
    input:
        h5ad=f"{RESULTS}/targets/scored.h5ad",
        sample_table=f"{RESULTS}/targets/sample_table.tsv",
    output:
        effects=f"{RESULTS}/targets/{{contrast}}/condition_effects.tsv",
        composition=f"{RESULTS}/targets/{{contrast}}/composition.tsv",
    log:
        f"{LOGS}/stats/{{contrast}}.log",
    benchmark:
        f"{BENCH}/stats/{{contrast}}.tsv"
    wildcard_constraints:
        contrast=_one_of(TESTED_CONTRASTS),
    conda:
        "../envs/sepsis_sc.yaml"
    resources:
        mem_mb=cohort_mem("stats"),
    params:
        stats=config["stats"],
        contrast=contrast_spec,
    script:
        "../scripts/stats.py"


rule targets:
    input:
        unpack(targets_input),
    output:
        targets=f"{RESULTS}/targets/{{contrast}}/therapy_targets.tsv",
    log:
        f"{LOGS}/targets/{{contrast}}.log",
    wildcard_constraints:
        contrast=_one_of(TESTED_CONTRASTS),
    conda:
        "../envs/sepsis_sc.yaml"
    params:
        stats=config["stats"],
    script:
        "../scripts/targets.py"


rule score_figures:
    input:
        h5ad=f"{RESULTS}/targets/scored.h5ad",
    output:
        umaps=report(
            f"{RESULTS}/targets/figures/umap_scores.png",
            caption="../report/umap_scores.rst",
            category="5. Therapy targets",
            labels={"title": "UMAPs of the state scores"},
        ),
    log:
        f"{LOGS}/score_figures.log",
    benchmark:
        f"{BENCH}/score_figures.tsv"
    conda:
        "../envs/sepsis_sc.yaml"
    script:
        "../scripts/score_figures.py"


rule target_figures:
    input:
        h5ad=f"{RESULTS}/targets/scored.h5ad",
        sample_table=f"{RESULTS}/targets/sample_table.tsv",
        effects=f"{RESULTS}/targets/{{contrast}}/condition_effects.tsv",
        composition=f"{RESULTS}/targets/{{contrast}}/composition.tsv",
        targets=f"{RESULTS}/targets/{{contrast}}/therapy_targets.tsv",
    output:
        forest=report(
            f"{RESULTS}/targets/{{contrast}}/figures/forest_plot.png",
            caption="../report/forest_plot.rst",
            category="5. Therapy targets",
            subcategory="{contrast}",
            labels={"title": "Condition effects (forest plot)"},
        ),
        points=report(
            f"{RESULTS}/targets/{{contrast}}/figures/sample_points.png",
            caption="../report/sample_points.rst",
            category="5. Therapy targets",
            subcategory="{contrast}",
            labels={"title": "Per-sample state values by condition"},
        ),
        composition=report(
            f"{RESULTS}/targets/{{contrast}}/figures/composition.png",
            caption="../report/composition.rst",
            category="5. Therapy targets",
            subcategory="{contrast}",
            labels={"title": "Cell-type shares per sample, by condition"},
        ),
        targets=report(
            f"{RESULTS}/targets/{{contrast}}/figures/therapy_targets.png",
            caption="../report/therapy_targets.rst",
            category="5. Therapy targets",
            subcategory="{contrast}",
            labels={"title": "Therapy targets (figure)"},
        ),
    log:
        f"{LOGS}/target_figures/{{contrast}}.log",
    benchmark:
        f"{BENCH}/target_figures/{{contrast}}.tsv"
    wildcard_constraints:
        contrast=_one_of(TESTED_CONTRASTS),
    conda:
        "../envs/sepsis_sc.yaml"
    params:
        contrast=contrast_spec,
        alpha=config["stats"]["alpha"],
    script:
        "../scripts/target_figures.py"
