"""Developer tools of the workspace: the local demo and the benchmarks."""
