# sepsis-sc: sepsis single-cell immunophenotyping workflow.
# Everything is driven by one config file (config/config.yaml by default), validated against
# workflow/schemas/config.schema.yaml before any job runs.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/qc.smk"
include: "workflow/rules/integrate.smk"
include: "workflow/rules/cluster.smk"
include: "workflow/rules/annotate.smk"
include: "workflow/rules/score.smk"
include: "workflow/rules/de.smk"
include: "workflow/rules/da.smk"
include: "workflow/rules/ccc.smk"
include: "workflow/rules/patients.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        final_outputs(),
        f"{RESULTS}/report/tables",
        f"{RESULTS}/report/contrast_tables",


onerror:
    print_job_errors()
