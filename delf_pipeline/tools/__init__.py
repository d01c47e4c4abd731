"""Tools around the pipeline: the demo, match pictures, the HTML report, submission checks."""
