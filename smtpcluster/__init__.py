"""smtpcluster: the SMTP relay (config, node wiring, front ends, delivery, admin)."""

from importlib.metadata import PackageNotFoundError, version

try:
    # Shown by `--version`, `cluster status` and the build_info metric: during a rolling
    # upgrade the operator needs to see which nodes already run the new release.
    VERSION = version("smtpcluster")
except PackageNotFoundError:  # run from a source tree that was never installed
    VERSION = "unknown"
