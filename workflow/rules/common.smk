# Shared set-up: config and sample-sheet validation (before any job), paths and input
# functions. Named functions only, so every rule reads plainly.
import re
import sys
import time
from pathlib import Path

from sepsis_sc.download import download_plan
from sepsis_sc.design import check_designs, parse_contrasts
from sepsis_sc.config import (
    EMBEDDING_KEYS,
    check_sample_inputs,
    load_samples,
    validate_config,
    validate_samples,
)

# Validate the config (defaults fill in) and fail before any job with the key at fault.
_validated = validate_config(config)
config.clear()
config.update(_validated)

samples = validate_samples(
    load_samples(config["samples"]),
    config,
    sheet_name=f"sample sheet {config['samples']}",
)
SAMPLES = list(samples.index)
RESULTS = f"results/{config['run_name']}"
LOGS = f"{RESULTS}/logs"
BENCH = f"{RESULTS}/benchmarks"


def demo_sample_paths():
    """Inputs the demo simulator writes: sheet paths inside demo.dir (when demo.simulate).

    Paths elsewhere are real data and are never simulated, so running a real cohort with
    `--config samples=...` cannot overwrite it with simulated counts.
    """
    if not config["demo"]["simulate"]:
        return []
    demo_dir = Path(config["demo"]["dir"]).resolve()
    return [
        samples.loc[s, "path"]
        for s in SAMPLES
        if demo_dir in Path(samples.loc[s, "path"]).resolve().parents
    ]


def demo_sheet():
    """The sheet rows the demo simulator writes."""
    return samples[samples["path"].isin(demo_sample_paths())]


check_sample_inputs(
    samples,
    produced=demo_sample_paths(),
    sheet_name=f"sample sheet {config['samples']}",
)
# the report's first line: what the data are (config key 'title'; the demo says it is simulated)
if config.get("title") is None:
    _simulated = len(demo_sample_paths())
    config["title"] = (
        f"SIMULATED DATA: {_simulated} of {len(SAMPLES)} samples made by the sepsis-sc "
        "demo simulator, with planted effects; not real patients"
        if _simulated
        else f"Cohort {config['run_name']} (sample sheet {config['samples']})"
    )
# the main Snakemake process, not a cluster job or a job's subprocess re-reading the workflow
MAIN_PROCESS = not (workflow.remote_exec or workflow.subprocess_exec)
if config["preflight"]["enabled"] and MAIN_PROCESS:
    # every input file, cheaply: unreadable or wrong data stops here, one line per problem
    from sepsis_sc.preflight import preflight

    for _warning in preflight(
        samples,
        config["organism"],
        max_cells=config["preflight"]["max_cells"],
        min_cells=config["ingest"]["min_cells"],
        small_cells=config["qc"]["min_cells_per_sample"],
        small_is_error=config["qc"]["on_small_sample"] == "stop",
        skip=demo_sample_paths(),
        cache=".snakemake/sepsis_sc_preflight.json",
        sheet_name=f"sample sheet {config['samples']}",
    ):
        print(f"sepsis-sc: warning: {_warning}", file=sys.stderr)


def _check_sheet_column(key, column):
    """A config key that names a sample-sheet column must name one (before any job)."""
    if column not in samples.columns:
        raise ValueError(
            f"config key '{key}' is {column!r}, but the sample sheet {config['samples']} has no "
            f"such column (columns: {', '.join(samples.columns)})."
        )


_check_sheet_column("integration.batch_key", config["integration"]["batch_key"])
for _col in config["integration"]["categorical_covariates"]:
    _check_sheet_column("integration.categorical_covariates", _col)
# continuous covariates may also be per-cell QC metrics that qc_sample adds to obs
_QC_METRICS = {
    "total_counts",
    "n_genes_by_counts",
    "pct_counts_mt",
    "pct_counts_ribo",
    "pct_counts_hb",
    "log1p_total_counts",
    "log1p_n_genes_by_counts",
    "doublet_score",
}
for _col in config["integration"]["continuous_covariates"]:
    if _col not in _QC_METRICS:
        _check_sheet_column("integration.continuous_covariates", _col)


def _check_sheet_value(column_key, column, value_key, value):
    """Config keys that name a sheet column and one of its values must name both."""
    _check_sheet_column(column_key, column)
    present = sorted(set(samples[column].astype(str)))
    if str(value) not in present:
        raise ValueError(
            f"config key '{value_key}' is {value!r}, but no sample in the sample sheet "
            f"{config['samples']} has {column} == {value!r} (values: {', '.join(present)})."
        )


if config["scoring"]["reference"]:
    _check_sheet_value(
        "scoring.reference.column",
        config["scoring"]["reference"]["column"],
        "scoring.reference.value",
        config["scoring"]["reference"]["value"],
    )
if config["patients"]["enabled"] and config["patients"]["reference_value"] is not None:
    _check_sheet_value(
        "patients.reference_column",
        config["patients"]["reference_column"],
        "patients.reference_value",
        config["patients"]["reference_value"],
    )

N_BATCHES = samples[config["integration"]["batch_key"]].nunique()
if N_BATCHES == 1 and MAIN_PROCESS:
    print(
        f"sepsis-sc: one level of {config['integration']['batch_key']!r} in the sheet: "
        "integration runs without a batch covariate and skips the batch-mixing metrics",
        file=sys.stderr,
    )

# ---- contrasts: resolved on the sheet before any job (design errors name the column) ----
CONTRASTS = parse_contrasts(config)
DESIGNS = check_designs(
    samples,
    CONTRASTS,
    config["stats"]["design"],
    paired=config["stats"]["paired"],
    sheet_name=f"sample sheet {config['samples']}",
)
TESTED_CONTRASTS = [c.name for c in CONTRASTS if not isinstance(DESIGNS[c.name], str)]
NOT_TESTED = {n: r for n, r in DESIGNS.items() if isinstance(r, str)}
if MAIN_PROCESS:
    for _name, _reason in NOT_TESTED.items():
        print(f"sepsis-sc: contrast {_name!r} {_reason}", file=sys.stderr)


def contrast_record(name):
    """One contrast as a plain dict (params of the per-contrast rules)."""
    c = next(c for c in CONTRASTS if c.name == name)
    return {
        "name": c.name,
        "column": c.column,
        "case": c.case,
        "control": c.control,
        "design": c.design or config["stats"]["design"],
        "paired": c.paired or config["stats"]["paired"],
    }


def contrast_spec(wildcards):
    """The contrast of a per-contrast job (wildcard `contrast`)."""
    return contrast_record(wildcards.contrast)


def contrast_table():
    """Every configured contrast with its status, design and units (targets/contrasts.tsv)."""
    rows = []
    for c in CONTRASTS:
        d = DESIGNS[c.name]
        rec = contrast_record(c.name)
        if isinstance(d, str):
            rows.append(
                {
                    **rec,
                    "status": d,
                    "design_used": "",
                    "n_case": 0,
                    "n_control": 0,
                    "notes": "",
                }
            )
        else:
            rows.append(
                {
                    **rec,
                    "status": (
                        "tested" if d.testable else f"effect sizes only: {d.reason}"
                    ),
                    "design_used": d.description(),
                    "n_case": d.n_case,
                    "n_control": d.n_control,
                    "notes": "; ".join(d.notes),
                }
            )
    return rows


def first_contrast():
    """The first tested contrast (colours of condition figures, demo check), or None."""
    return contrast_record(TESTED_CONTRASTS[0]) if TESTED_CONTRASTS else None


def condition_colouring():
    """Column and case / control of the condition-coloured figures."""
    first = first_contrast()
    if first:
        return first
    values = sorted(samples["condition"].unique())
    return {"column": "condition", "case": values[-1], "control": values[0]}


def call_reference():
    """{column, value} of the samples whose cells set control_quantile thresholds, or None."""
    ref = config["scoring"]["reference"]
    if ref:
        _check_sheet_column("scoring.reference.column", ref["column"])
        if ref["value"] not in set(samples[ref["column"]]):
            raise ValueError(
                f"config key 'scoring.reference.value' is {ref['value']!r}, but no sample has "
                f"{ref['column']} == {ref['value']!r}."
            )
        return dict(ref)
    first = first_contrast()
    if first:
        return {"column": first["column"], "value": first["control"]}
    return None


def sample_input(wildcards):
    """Raw input file of one sample, as named in the sheet."""
    return samples.loc[wildcards.sample, "path"]


def sample_inputs(wildcards):
    """Inputs of one sample's QC job: its counts and, when the sheet names it, its raw
    (unfiltered) droplet matrix for the SoupX soup profile."""
    out = {"counts": samples.loc[wildcards.sample, "path"]}
    raw = samples.loc[wildcards.sample].get("raw_path", "")
    if isinstance(raw, str) and raw.strip():
        out["raw"] = raw
    return out


def sample_record(wildcards):
    """The sheet row of one sample, as a plain dict (becomes obs columns)."""
    return samples.loc[wildcards.sample].to_dict()


def n_cells_estimate():
    """Rough cohort size for memory requests (cells per sample x samples)."""
    per_sample = (
        config["demo"]["cells_per_sample"] if config["demo"]["simulate"] else 10000
    )
    return per_sample * len(SAMPLES)


def cohort_mem(stage):
    """``mem_mb`` of a cohort-level rule: the stage's measured footprint at the job's cells
    (counted in its .h5ad inputs, else the sheet's estimate; sepsis_sc.store.stage_mem_mb),
    or resources.mem_mb_per_10k_cells when set."""
    from sepsis_sc.store import h5ad_cells, stage_mem_mb

    def mem_mb(wildcards, input, attempt):
        cells = h5ad_cells([f for f in input if str(f).endswith(".h5ad")])
        return stage_mem_mb(
            stage,
            cells or n_cells_estimate(),
            per_10k_cells=config["resources"]["mem_mb_per_10k_cells"],
            attempt=attempt,
        )

    return mem_mb


def sample_mem_mb(wildcards, input, attempt):
    """Memory for the per-sample ingest + QC job, from the raw input's size on disk.

    Compressed inputs (10x HDF5, gzipped MTX or text) expand about 10x in memory, and QC
    holds a few copies (measured: 1.7 GB peak for a 17 MB 10x HDF5 of 5,000 cells).
    """
    path = Path(input[0])
    if path.is_dir():  # 10x MTX directory
        size_mb = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6
    else:
        size_mb = input.size_mb
    compressed = path.is_dir() or path.name.endswith((".h5", ".gz"))
    return int(max(2000, (100 if compressed else 15) * size_mb) * attempt)


def scvi_gpu_count():
    """GPUs requested from the cluster for scVI (resources.gpu, integration.method scvi)."""
    uses_scvi = (
        config["integration"]["method"] == "scvi"
        or "scvi" in config["integration"]["compare"]
    )
    return 1 if (config["resources"]["gpu"] and uses_scvi) else 0


def integration_methods():
    """The downstream method first, then the comparison methods (no repeats)."""
    methods = [config["integration"]["method"]]
    methods += [m for m in config["integration"]["compare"] if m not in methods]
    return methods


def celltypist_outputs():
    """The CellTypist agreement table, declared only when a model is configured."""
    if not config["annotation"]["celltypist_model"]:
        return {}
    return {"agreement": f"{RESULTS}/annotate/celltypist_agreement.tsv"}


def reference_outputs():
    """The scANVI reference-consensus table, declared only when a reference is configured."""
    if not config["annotation"]["reference"]:
        return {}
    return {"reference_agreement": f"{RESULTS}/annotate/reference_agreement.tsv"}


def reference_input():
    """The annotation reference .h5ad as an input (editing it reruns annotation)."""
    path = config["annotation"]["reference"]
    return {"reference": path} if path else {}


def metrics_labels_input():
    """Known-label table for the integration metrics: integration.metrics_labels, or the
    planted truth of the simulated demo, or nothing."""
    path = config["integration"]["metrics_labels"]
    if path:
        return [path]
    if demo_sample_paths():
        return [f"{config['demo']['dir']}/truth.tsv.gz"]
    return []


def metrics_label_key():
    """Label column for the integration metrics (the demo truth's cell_type by default)."""
    key = config["integration"]["metrics_label_key"]
    if (
        key is None
        and demo_sample_paths()
        and not config["integration"]["metrics_labels"]
    ):
        return "cell_type"
    return key


def metrics_label_title():
    """How the UMAP panels name the label colouring: the demo's labels are the simulator's
    planted truth, not an annotation (None: the column name)."""
    key = metrics_label_key()
    if key and metrics_labels_input() and not config["integration"]["metrics_labels"]:
        return f"simulated truth {key.replace('_', ' ')}"
    return None


def signature_file():
    """The signature YAML the scoring uses (an input, so editing a signature reruns scoring)."""
    path = config["scoring"]["signatures"]
    return path or f"{workflow.basedir}/resources/signatures/{config['organism']}.yaml"


def marker_file():
    """The marker YAML the annotation uses (an input, so editing markers reruns annotation)."""
    path = config["annotation"]["markers"]
    return path or f"{workflow.basedir}/resources/markers/{config['organism']}.yaml"


def final_outputs():
    """Every file `rule all` asks for."""
    return (
        [
            f"{RESULTS}/qc/qc_summary.tsv",
            f"{RESULTS}/qc/figures/qc_violins.png",
            f"{RESULTS}/qc/figures/qc_scatter.png",
            f"{RESULTS}/qc/figures/qc_removed.png",
            f"{RESULTS}/cluster/resolutions.tsv",
            f"{RESULTS}/cluster/markers.tsv",
            f"{RESULTS}/cluster/figures/resolutions.png",
            f"{RESULTS}/cluster/figures/umap_clusters.png",
            f"{RESULTS}/annotated.h5ad",
            f"{RESULTS}/annotate/cell_types.tsv",
            f"{RESULTS}/annotate/figures/umap_cell_types.png",
            f"{RESULTS}/annotate/figures/marker_dotplot.png",
            f"{RESULTS}/targets/scored.h5ad",
            f"{RESULTS}/targets/state_rules.tsv",
            f"{RESULTS}/targets/sample_table.tsv",
            f"{RESULTS}/targets/contrasts.tsv",
            f"{RESULTS}/targets/figures/umap_scores.png",
            f"{RESULTS}/provenance.yaml",
        ]
        + contrast_outputs()
        + (
            [f"{RESULTS}/targets/demo_check.tsv"]
            if demo_sample_paths() and TESTED_CONTRASTS
            else []
        )
        + (
            [
                f"{RESULTS}/integrate/metrics.tsv",
                f"{RESULTS}/integrate/figures/integration_metrics.png",
                f"{RESULTS}/integrate/figures/umap_by_batch.png",
            ]
            if config["integration"]["metrics"]
            else []
        )
        + (
            [
                f"{RESULTS}/patients/profiles.tsv",
                f"{RESULTS}/patients/states.tsv",
                f"{RESULTS}/patients/reference.tsv",
                f"{RESULTS}/patients/figures/cohort_heatmap.png",
                f"{RESULTS}/patients/figures/trajectories.png",
                f"{RESULTS}/patients/figures/cards",
            ]
            if config["patients"]["enabled"]
            else []
        )
    )


def contrast_outputs():
    """Per-contrast tables and figures (targets/<name>/, de/<name>/) of the tested contrasts."""
    out = []
    for name in TESTED_CONTRASTS:
        t = f"{RESULTS}/targets/{name}"
        out += [
            f"{t}/condition_effects.tsv",
            f"{t}/composition.tsv",
            f"{t}/therapy_targets.tsv",
            f"{t}/figures/forest_plot.png",
            f"{t}/figures/sample_points.png",
            f"{t}/figures/composition.png",
            f"{t}/figures/therapy_targets.png",
        ]
        if config["de"]["enabled"]:
            d = f"{RESULTS}/de/{name}"
            out += [
                f"{d}/de_results.tsv",
                f"{d}/summary.tsv",
                f"{d}/figures/volcano.png",
                f"{d}/figures/heatmap.png",
            ]
    return out


# ---- patient profiles (rules in patients.smk) ----
def patient_reference():
    """{column, value} of the reference (control) samples, or None (then reference_file)."""
    p = config["patients"]
    if p["reference_value"] is not None:
        _check_sheet_column("patients.reference_column", p["reference_column"])
        return {"column": p["reference_column"], "value": str(p["reference_value"])}
    return call_reference()


def patients_input(wildcards):
    """Scored cells, the per-sample table and the saved reference file (when configured)."""
    files = {
        "h5ad": f"{RESULTS}/targets/scored.h5ad",
        "sample_table": f"{RESULTS}/targets/sample_table.tsv",
    }
    if config["patients"]["reference_file"]:
        files["reference_file"] = config["patients"]["reference_file"]
    return files


# ---- downloads (rules in download.smk) ----
DOWNLOADS = download_plan(samples, config["download"]["dir"])


def _one_of(names):
    """Regex matching exactly the given names (a never-matching one when there are none)."""
    return "|".join(re.escape(n) for n in sorted(names)) or "(?!)"


def download_url(wildcards):
    """URL of one file to download."""
    return DOWNLOADS.files[wildcards.dlfile].url


def download_checksum(wildcards):
    """Expected checksum of one download ('' when the sheet gives none)."""
    return DOWNLOADS.files[wildcards.dlfile].checksum or ""


# ---- errors found inside jobs: the project's message at the end of the run ----
RUN_STARTED = time.time()


def print_job_errors():
    """Print the one-line messages of the jobs that failed in this run (``<log>.error.txt``)."""
    from sepsis_sc.utils import ERROR_SUFFIX

    logs = Path(RESULTS) / "logs"
    found = (
        sorted(
            p
            for p in logs.rglob(f"*{ERROR_SUFFIX}")
            if p.stat().st_mtime >= RUN_STARTED - 1
        )
        if logs.exists()
        else []
    )
    if not found:
        return
    print(
        "\nsepsis-sc: what went wrong (the project's messages from the failed jobs):",
        file=sys.stderr,
    )
    for p in found:
        text = p.read_text().strip().replace("\n", "\n  ")
        print(f"  {text}", file=sys.stderr)


# ---- tables shown inside the report as HTML pages (path under RESULTS, section, title,
# caption file); per-contrast ones carry {contrast} ----
REPORT_TABLES = [
    ("qc/qc_summary.tsv", "1. Quality control", "QC summary per sample", "qc_summary"),
    (
        "integrate/metrics.tsv",
        "2. Integration",
        "Integration metrics",
        "integration_metrics_table",
    ),
    (
        "cluster/resolutions.tsv",
        "3. Clustering",
        "Leiden resolutions compared",
        "resolutions_table",
    ),
    ("cluster/markers.tsv", "3. Clustering", "Cluster marker genes", "cluster_markers"),
    (
        "annotate/cell_types.tsv",
        "4. Annotation",
        "Cell types (cells, share, confidence)",
        "cell_types_table",
    ),
    (
        "targets/state_rules.tsv",
        "5. Therapy targets",
        "State calls and how each was made",
        "state_rules",
    ),
    (
        "targets/sample_table.tsv",
        "5. Therapy targets",
        "Per-sample values",
        "sample_table",
    ),
    (
        "targets/contrasts.tsv",
        "5. Therapy targets",
        "Contrasts (tested or not, and why)",
        "contrasts",
    ),
    (
        "targets/{contrast}/therapy_targets.tsv",
        "5. Therapy targets",
        "Therapy targets (evidence per state)",
        "therapy_targets_table",
    ),
    (
        "targets/{contrast}/condition_effects.tsv",
        "5. Therapy targets",
        "Condition effects (sample level)",
        "condition_effects",
    ),
    (
        "targets/{contrast}/composition.tsv",
        "5. Therapy targets",
        "Composition tests (sample level)",
        "composition_table",
    ),
    (
        "de/{contrast}/summary.tsv",
        "6. Differential expression",
        "Pseudobulk DE summary per cell type",
        "de_summary",
    ),
    (
        "de/{contrast}/de_results.tsv",
        "6. Differential expression",
        "Pseudobulk DE genes",
        "de_results",
    ),
    (
        "targets/demo_check.tsv",
        "7. Demo: planted truth",
        "Demo check (planted effects recovered?)",
        "demo_check",
    ),
    ("patients/states.tsv", "8. Patients", "Patient immune states", "patients_states"),
    ("patients/profiles.tsv", "8. Patients", "Patient profiles", "patients_profiles"),
    (
        "patients/reference.tsv",
        "8. Patients",
        "Control reference ranges",
        "patients_reference",
    ),
]


def report_table_specs(per_contrast):
    """The report's tables that this run makes (those among rule all's targets)."""
    wanted = set(final_outputs())
    specs = []
    for rel, section, title, caption in REPORT_TABLES:
        if ("{contrast}" in rel) != per_contrast:
            continue
        for name in TESTED_CONTRASTS if per_contrast else [""]:
            path = str(Path(RESULTS) / rel.format(contrast=name))
            if path in wanted:
                specs.append(
                    {
                        "path": path,
                        "section": section,
                        "title": title,
                        "contrast": name,
                        "caption": str(
                            Path(workflow.basedir)
                            / "workflow"
                            / "report"
                            / f"{caption}.rst"
                        ),
                    }
                )
    return specs


def report_table_inputs(wildcards):
    return [s["path"] for s in report_table_specs(False) + report_table_specs(True)]
