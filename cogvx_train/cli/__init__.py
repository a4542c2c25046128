"""Console scripts: cogvx-train, cogvx-data, cogvx-sample."""
