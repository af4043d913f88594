"""Every page, plot and table: the run report, unit cards and index, the graphs and steering
section, the convergence report. The only package that draws; imports every stage below it,
never `pipeline`, `config` or `cli`."""
