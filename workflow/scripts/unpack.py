"""Unpack one downloaded archive (rule unpack_archive_*) and check it held the sheet's files."""

import logging
from pathlib import Path

logging.basicConfig(
    filename=snakemake.log[0],
    level=logging.INFO,
    format="%(asctime)s %(levelname)s %(name)s: %(message)s",
)
from sepsis_sc.download import unpack_archive  # noqa: E402

log = logging.getLogger("unpack")
try:
    files = unpack_archive(snakemake.input.archive, snakemake.params.outdir, nested=True)
    missing = [p for p in snakemake.output if not Path(p).is_file()]
    if missing:
        held = sorted(str(p.relative_to(snakemake.params.outdir)) for p in files)
        raise FileNotFoundError(
            f"archive {snakemake.input.archive} does not contain {missing}; it holds "
            f"{len(held)} files: {', '.join(held[:40])}{' ...' if len(held) > 40 else ''}. "
            "Fix the 'path' column of the sample sheet to name files that are in the archive."
        )
except Exception:
    log.exception("unpacking %s failed", snakemake.input.archive)
    raise
