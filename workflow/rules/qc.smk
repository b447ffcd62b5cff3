# Ingest and QC, one job per sample: read the raw counts (10x HDF5/MTX, h5ad, text), check
# them and label the cells from the sheet (sepsis_sc.io.ingest_sample), then adaptive
# thresholds and doublets. One process per sample: a separate ingest job cost a Python
# start-up, imports and an h5ad round trip per sample (about 5 s each). Then a merge that
# normalises the cohort. Figures use every cell (kept and removed) with the thresholds drawn.


rule qc_sample:
    input:
        unpack(sample_inputs),
    output:
        h5ad=f"{RESULTS}/qc/{{sample}}.h5ad",
        summary=f"{RESULTS}/qc/{{sample}}.qc.tsv",
        cells=f"{RESULTS}/qc/{{sample}}.cells.tsv.gz",
    log:
        f"{LOGS}/qc/{{sample}}.log",
    benchmark:
        f"{BENCH}/qc/{{sample}}.tsv"
    wildcard_constraints:
        sample=_one_of(SAMPLES),  # so qc/merged.h5ad is never taken for a sample
    conda:
        "../envs/sepsis_sc.yaml"
    resources:
        mem_mb=sample_mem_mb,
        runtime=60,
    params:
        record=sample_record,
        min_cells=config["ingest"]["min_cells"],
        qc=config["qc"],
        organism=config["organism"],
        seed=config["seed"],
    script:
        "../scripts/qc_sample.py"


rule qc_merge:
    input:
        h5ad=expand(f"{RESULTS}/qc/{{sample}}.h5ad", sample=SAMPLES),
        summaries=expand(f"{RESULTS}/qc/{{sample}}.qc.tsv", sample=SAMPLES),
    output:
        h5ad=f"{RESULTS}/qc/merged.h5ad",
        summary=f"{RESULTS}/qc/qc_summary.tsv",
    log:
        f"{LOGS}/qc_merge.log",
    benchmark:
        f"{BENCH}/qc_merge.tsv"
    conda:
        "../envs/sepsis_sc.yaml"
    resources:
        mem_mb=cohort_mem("qc_merge"),
        runtime=60,
    params:
        qc=config["qc"],
    script:
        "../scripts/qc_merge.py"


rule qc_figures:
    input:
        cells=expand(f"{RESULTS}/qc/{{sample}}.cells.tsv.gz", sample=SAMPLES),
        summary=f"{RESULTS}/qc/qc_summary.tsv",
    output:
        violins=report(
            f"{RESULTS}/qc/figures/qc_violins.png",
            caption="../report/qc_violins.rst",
            category="1. Quality control",
            labels={"title": "QC metrics per sample with thresholds"},
        ),
        scatter=report(
            f"{RESULTS}/qc/figures/qc_scatter.png",
            caption="../report/qc_scatter.rst",
            category="1. Quality control",
            labels={"title": "QC scatter of counts, genes and mitochondrial share"},
        ),
        removed=report(
            f"{RESULTS}/qc/figures/qc_removed.png",
            caption="../report/qc_removed.rst",
            category="1. Quality control",
            labels={"title": "QC cells kept and removed per sample"},
        ),
        lineage=report(
            f"{RESULTS}/qc/figures/qc_lineage_removed.png",
            caption="../report/qc_lineage_removed.rst",
            category="1. Quality control",
            labels={"title": "QC cells removed per lineage and sample"},
        ),
        contamination=report(
            f"{RESULTS}/qc/figures/qc_contamination.png",
            caption="../report/qc_contamination.rst",
            category="1. Quality control",
            labels={"title": "Ambient RNA contamination per sample"},
        ),
    log:
        f"{LOGS}/qc_figures.log",
    benchmark:
        f"{BENCH}/qc_figures.tsv"
    conda:
        "../envs/sepsis_sc.yaml"
    script:
        "../scripts/qc_figures.py"
