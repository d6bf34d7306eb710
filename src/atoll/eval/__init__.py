"""Evaluating stages: loss and perplexity on several held-out sets at once.

`heldout` reads held-out sets and checks by hash that no stage of a chain trained on them;
`perplexity` scores a model on one; `report` prints the table, draws the bar chart and writes
the JSON record; `commands` adds `atoll eval`.
"""
