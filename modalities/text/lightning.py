"""Lightning OPD (work in progress)."""
