"""Unpack one downloaded archive (rule unpack_archive_*) and check it held the sheet's files."""

import logging
from pathlib import Path

logging.basicConfig(
    filename=snakemake.log[0],
    level=logging.INFO,
    format="%(asctime)s %(levelname)s %(name)s: %(message)s",
)
from sepsis_sc.download import archive_stem, unpack_archive  # noqa: E402

log = logging.getLogger("unpack")
archive = Path(snakemake.input.archive)
outdir = archive.parent / archive_stem(archive)  # <download.dir>/<stem>, as download_plan says
try:
    files = unpack_archive(archive, outdir, nested=True)
    missing = [p for p in snakemake.output if not Path(p).is_file()]
    if missing:
        held = sorted(str(p.relative_to(outdir)) for p in files)
        raise FileNotFoundError(
            f"archive {archive} does not contain {missing}; it holds "
            f"{len(held)} files: {', '.join(held[:40])}{' ...' if len(held) > 40 else ''}. "
            "Fix the 'path' column of the sample sheet to name files that are in the archive."
        )
except Exception:
    log.exception("unpacking %s failed", archive)
    raise
