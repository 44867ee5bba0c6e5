"""Reliability suite (issue 17): faults, hostile clients and shutdown against real service processes."""

# Bound on one service start-up (imports, bundle check, warm-up). Generous: on a shared 2-core machine the imports
# alone can take tens of seconds; a test's own timing claims are measured after the server is up.
START_S = 120.0
