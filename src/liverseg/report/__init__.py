"""The report's parts, below the `report` stage (`liverseg.stages.report`, which renders them).

`inputs` (every upstream output the report reads, checked for the columns it needs),
`table` (a table and its cells: undefined metrics read as 'n/a'), `figures` (the PNGs: the
slices they show and how each is drawn) and `sections` (the template context of each
section: data, training, comparison, visual, lineage). None of them imports torch, DVC,
MLflow or Dagster.
"""
