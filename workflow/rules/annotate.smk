# Annotation: hierarchical marker-based labels (lineage, then subset) combined with a
# whole-transcriptome reference opinion (agreement.tsv), optional CellTypist.


rule annotate:
    input:
        **reference_input(),
        h5ad=f"{RESULTS}/cluster/clustered.h5ad",
        markers=marker_file(),
    output:
        **celltypist_outputs(),
        **reference_outputs(),
        h5ad=f"{RESULTS}/annotated.h5ad",
        table=f"{RESULTS}/annotate/cell_types.tsv",
        agreement_opinions=f"{RESULTS}/annotate/agreement.tsv",
    log:
        f"{LOGS}/annotate.log",
    benchmark:
        f"{BENCH}/annotate.tsv"
    conda:
        "../envs/sepsis_sc.yaml"
    threads: 1  # numpy-bound and short: leaves the other core to cluster_summary
    resources:
        mem_mb=cohort_mem("annotate"),
        runtime=60,
    params:
        counts_layer=config["qc"]["downstream_layer"],
        annotation=config["annotation"],
        organism=config["organism"],
        use_rep=EMBEDDING_KEYS[config["integration"]["method"]],
        seed=config["seed"],
    script:
        "../scripts/annotate.py"


rule annotation_figures:
    input:
        f"{RESULTS}/annotated.h5ad",
    output:
        umap=report(
            f"{RESULTS}/annotate/figures/umap_cell_types.png",
            caption="../report/umap_cell_types.rst",
            category="4. Annotation",
            labels={"title": "UMAP of annotated cell types"},
        ),
        dotplot=report(
            f"{RESULTS}/annotate/figures/marker_dotplot.png",
            caption="../report/marker_dotplot.rst",
            category="4. Annotation",
            labels={"title": "Marker genes per cell type (dot plot)"},
        ),
    log:
        f"{LOGS}/annotation_figures.log",
    benchmark:
        f"{BENCH}/annotation_figures.tsv"
    conda:
        "../envs/sepsis_sc.yaml"
    resources:
        mem_mb=cohort_mem("annotation_figures"),  # the dot plot reads one count matrix
    params:
        annotation=config["annotation"],
        organism=config["organism"],
        counts_layer=config["qc"]["downstream_layer"],
    script:
        "../scripts/annotation_figures.py"
