# Downloads of public cohort files (local rules: HPC compute nodes often have no internet).
#
# Sample-sheet columns used here (all optional; see docs/cohorts.md):
#   url (+ checksum)                  fetch the sample's `path` itself from this URL
#   archive_url (+ archive_checksum)  fetch a tar, unpack it; `path` is a file inside it
# Targets live under config key download.dir: direct downloads at <dir>/<file>, archives at
# <dir>/<archive file> and unpacked into <dir>/<archive stem>/. The plan (and its checks)
# comes from sepsis_sc.download.download_plan, so it is unit-tested with the library.
rule download:
    output:
        f"{DOWNLOADS.download_dir}/{{dlfile}}",
    log:
        f"{LOGS}/download/{{dlfile}}.log",
    wildcard_constraints:
        dlfile=_one_of(DOWNLOADS.files),
    retries: 1
    localrule: True
    conda:
        "../envs/sepsis_sc.yaml"
    resources:
        downloads=1,  # cap parallel downloads with --resources downloads=N
    params:
        url=download_url,
        checksum=download_checksum,
        download=config["download"],
    script:
        "../scripts/download.py"


# One unpack rule per archive: its outputs are the files the sheet's `path`s point to, so
# the per-sample QC jobs depend on them directly (no checkpoint). The whole archive is unpacked
# (nested per-sample archives too, as in GSE190856),
# since MTX triplets need their barcodes/features siblings next to the matrix.
for _stem in DOWNLOADS.archives:

    rule:
        name:
            f"unpack_archive_{re.sub(r'[^0-9A-Za-z_]', '_', _stem)}"
        input:
            archive=DOWNLOADS.archive_path(_stem),
        output:
            DOWNLOADS.archive_outputs(_stem),
        log:
            f"{LOGS}/download/unpack_{_stem}.log",
        localrule: True
        conda:
            "../envs/sepsis_sc.yaml"
        script:
            "../scripts/unpack.py"
