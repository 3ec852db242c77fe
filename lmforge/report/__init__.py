"""The pipeline report: `write_report(RUN_DIR)` writes RUN_DIR/report.html (see `lmforge.report.html`)."""
