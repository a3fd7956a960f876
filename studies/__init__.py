"""One-off measurements behind the notes in bench/results/ (not installed; see studies/README.md)."""
