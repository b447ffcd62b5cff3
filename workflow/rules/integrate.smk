# Integration: scVI (GPU when available) or Harmony/PCA; comparison methods for the metrics.


rule integrate:
    input:
        f"{RESULTS}/qc/merged.h5ad",
    output:
        h5ad=f"{RESULTS}/integrate/integrated.h5ad",
        model=directory(f"{RESULTS}/integrate/scvi_model"),
        record=f"{RESULTS}/integrate/integration.yaml",
    log:
        f"{LOGS}/integrate.log",
    benchmark:
        f"{BENCH}/integrate.tsv"
    conda:
        "../envs/sepsis_sc.yaml"
    threads: config["resources"]["threads"]
    resources:
        mem_mb=cohort_mem("integrate"),
        runtime=240,
        gpu=scvi_gpu_count(),
    params:
        counts_layer=config["qc"]["downstream_layer"],
        integration=config["integration"],
        methods=integration_methods(),
        seed=config["seed"],
    script:
        "../scripts/integrate.py"


rule integration_metrics:
    input:
        h5ad=f"{RESULTS}/integrate/integrated.h5ad",
        labels=metrics_labels_input(),
    output:
        table=f"{RESULTS}/integrate/metrics.tsv",
        figure=report(
            f"{RESULTS}/integrate/figures/integration_metrics.png",
            caption="../report/integration_metrics.rst",
            category="2. Integration",
            labels={"title": "Integration metrics of the methods compared"},
        ),
        umaps=report(
            f"{RESULTS}/integrate/figures/umap_by_batch.png",
            caption="../report/integration_umaps.rst",
            category="2. Integration",
            labels={"title": "UMAPs by batch, condition and method"},
        ),
    log:
        f"{LOGS}/integration_metrics.log",
    benchmark:
        f"{BENCH}/integration_metrics.tsv"
    conda:
        "../envs/sepsis_sc.yaml"
    threads: config["resources"]["threads"]
    resources:
        mem_mb=cohort_mem("integration_metrics"),
        runtime=120,
    params:
        methods=integration_methods(),
        integration=config["integration"],
        label_key=metrics_label_key(),
        label_title=metrics_label_title(),
        n_neighbors=config["clustering"]["n_neighbors"],
        seed=config["seed"],
    script:
        "../scripts/integration_metrics.py"
