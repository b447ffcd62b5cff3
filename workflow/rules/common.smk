# Shared set-up: config and sample-sheet validation (before any job), paths and input
# functions. Named functions only, so every rule reads plainly.
import re
import sys
import time
from pathlib import Path

from sepsis_sc.download import download_plan
from sepsis_sc.config import EMBEDDING_KEYS, load_samples, validate_config, validate_run

# Validate the config (defaults fill in) and fail before any job with the key at fault.
_validated = validate_config(config)
config.clear()
config.update(_validated)


def demo_sample_paths():
    """Inputs the demo simulator writes: sheet paths inside demo.dir (when demo.simulate).

    Paths elsewhere are real data and are never simulated, so running a real cohort with
    `--config samples=...` cannot overwrite it with simulated counts.
    """
    if not config["demo"]["simulate"]:
        return []
    demo_dir = Path(config["demo"]["dir"]).resolve()
    return [p for p in _SHEET["path"] if demo_dir in Path(p).resolve().parents]


# The sheet against the config: columns and values the config names, input files,
# each contrast's design (sepsis_sc.config.validate_run; errors name the key at fault).
_SHEET = load_samples(config["samples"])
PLAN = validate_run(config, _SHEET, produced=demo_sample_paths())
samples = PLAN.samples
SAMPLES = list(samples.index)
RESULTS = f"results/{config['run_name']}"
LOGS = f"{RESULTS}/logs"
BENCH = f"{RESULTS}/benchmarks"
CONTRASTS = PLAN.contrasts
DESIGNS = PLAN.designs
TESTED_CONTRASTS = PLAN.tested
NOT_TESTED = PLAN.not_tested


def demo_sheet():
    """The sheet rows the demo simulator writes."""
    return samples[samples["path"].isin(demo_sample_paths())]


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
    from sepsis_sc.io import preflight

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
if MAIN_PROCESS:
    for _note in PLAN.notes:
        print(f"sepsis-sc: {_note}", file=sys.stderr)


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
        + ([f"{RESULTS}/ccc/per_sample.tsv"] if config["ccc"]["enabled"] else [])
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
        if config["da"]["enabled"]:
            a = f"{RESULTS}/da/{name}"
            out += [
                f"{a}/nhoods.tsv",
                f"{a}/per_sample.tsv",
                f"{a}/figures/beeswarm.png",
                f"{a}/figures/nhood_umap.png",
            ]
        if config["ccc"]["enabled"]:
            out += [
                f"{RESULTS}/ccc/{name}/axes.tsv",
                f"{RESULTS}/ccc/{name}/figures/axes_heatmap.png",
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


def targets_input(wildcards):
    """A contrast's state effects and, when neighbourhood DA / therapy axes run, its
    neighbourhoods / axis tests."""
    files = {"effects": f"{RESULTS}/targets/{wildcards.contrast}/condition_effects.tsv"}
    if config["da"]["enabled"]:
        files["nhoods"] = f"{RESULTS}/da/{wildcards.contrast}/nhoods.tsv"
    if config["ccc"]["enabled"]:
        files["axes"] = f"{RESULTS}/ccc/{wildcards.contrast}/axes.tsv"
    return files


# ---- patient profiles (rules in patients.smk) ----
def patient_reference():
    """{column, value} of the reference (control) samples, or None (then reference_file)."""
    p = config["patients"]
    if p["reference_value"] is not None:
        return {"column": p["reference_column"], "value": str(p["reference_value"])}
    return call_reference()


def patients_input(wildcards):
    """Scored cells, the per-sample table, the saved reference file (when configured) and
    the per-sample readouts of neighbourhood DA and the therapy axes (when they run)."""
    files = {
        "h5ad": f"{RESULTS}/targets/scored.h5ad",
        "sample_table": f"{RESULTS}/targets/sample_table.tsv",
    }
    if config["patients"]["reference_file"]:
        files["reference_file"] = config["patients"]["reference_file"]
    if config["da"]["enabled"] and TESTED_CONTRASTS:
        files["da"] = f"{RESULTS}/da/{TESTED_CONTRASTS[0]}/per_sample.tsv"
    if config["ccc"]["enabled"]:
        files["ccc"] = f"{RESULTS}/ccc/per_sample.tsv"
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


# ---- tables shown inside the report as HTML pages (workflow/report/tables.yaml) ----
def report_table_specs(per_contrast):
    """The report's tables that this run makes (those among rule all's targets)."""
    import yaml

    with open(Path(workflow.basedir) / "workflow" / "report" / "tables.yaml") as fh:
        tables = yaml.safe_load(fh)
    wanted = set(final_outputs())
    specs = []
    for t in tables:
        if ("{contrast}" in t["path"]) != per_contrast:
            continue
        for name in TESTED_CONTRASTS if per_contrast else [""]:
            path = str(Path(RESULTS) / t["path"].format(contrast=name))
            if path in wanted:
                specs.append(
                    {
                        "path": path,
                        "section": t["section"],
                        "title": t["title"],
                        "contrast": name,
                        "caption": str(
                            Path(workflow.basedir)
                            / "workflow"
                            / "report"
                            / f"{t['caption']}.rst"
                        ),
                    }
                )
    return specs


def report_table_inputs(wildcards):
    return [s["path"] for s in report_table_specs(False) + report_table_specs(True)]
