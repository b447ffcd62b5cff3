"""Fetch one file of the sample sheet (rule download): retries, resume, checksum."""

import logging

logging.basicConfig(
    filename=snakemake.log[0],
    level=logging.INFO,
    format="%(asctime)s %(levelname)s %(name)s: %(message)s",
)
from sepsis_sc.config import DownloadSettings  # noqa: E402
from sepsis_sc.download import download  # noqa: E402

try:
    download(
        snakemake.params.url,
        snakemake.output[0],
        DownloadSettings.from_config(snakemake.params.download),
        checksum=snakemake.params.checksum or None,
    )
except Exception:
    logging.getLogger("download").exception("download of %s failed", snakemake.params.url)
    raise
