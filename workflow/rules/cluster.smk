# Clustering: kNN graph on the integrated space, Leiden over several resolutions and UMAP
# (the critical path), then the resolution summary (seed-stability runs) and cluster markers
# in a side job that runs beside annotation and scoring.


rule cluster:
    input:
        f"{RESULTS}/integrate/integrated.h5ad",
    output:
        h5ad=f"{RESULTS}/cluster/clustered.h5ad",
    log:
        f"{LOGS}/cluster.log",
    benchmark:
        f"{BENCH}/cluster.tsv"
    conda:
        "../envs/sepsis_sc.yaml"
    threads: config["resources"]["threads"]
    resources:
        mem_mb=cohort_mem("cluster"),
        runtime=120,
    params:
        clustering=config["clustering"],
        use_rep=EMBEDDING_KEYS[config["integration"]["method"]],
        seed=config["seed"],
    script:
        "../scripts/cluster.py"


rule cluster_summary:
    input:
        f"{RESULTS}/cluster/clustered.h5ad",
    output:
        resolutions=f"{RESULTS}/cluster/resolutions.tsv",
        markers=f"{RESULTS}/cluster/markers.tsv",
    log:
        f"{LOGS}/cluster_summary.log",
    benchmark:
        f"{BENCH}/cluster_summary.tsv"
    conda:
        "../envs/sepsis_sc.yaml"
    resources:
        mem_mb=cohort_mem("cluster_summary"),
        runtime=120,
    params:
        clustering=config["clustering"],
        seed=config["seed"],
    script:
        "../scripts/cluster_summary.py"


rule cluster_figures:
    input:
        h5ad=f"{RESULTS}/cluster/clustered.h5ad",
        resolutions=f"{RESULTS}/cluster/resolutions.tsv",
    output:
        resolutions=report(
            f"{RESULTS}/cluster/figures/resolutions.png",
            caption="../report/resolutions.rst",
            category="3. Clustering",
            labels={"title": "Leiden resolutions compared"},
        ),
        umap=report(
            f"{RESULTS}/cluster/figures/umap_clusters.png",
            caption="../report/umap_clusters.rst",
            category="3. Clustering",
            labels={"title": "UMAP of Leiden clusters"},
        ),
    log:
        f"{LOGS}/cluster_figures.log",
    benchmark:
        f"{BENCH}/cluster_figures.tsv"
    conda:
        "../envs/sepsis_sc.yaml"
    params:
        resolution=config["clustering"]["resolution"],
        contrast=condition_colouring(),
    script:
        "../scripts/cluster_figures.py"
