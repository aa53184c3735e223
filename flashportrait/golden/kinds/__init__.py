"""One module per golden kind: `run(case: GoldenCase) -> list[Comparison]`."""
