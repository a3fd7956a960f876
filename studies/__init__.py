"""One-off measurements behind the notes in results/ (not installed; see studies/README.md)."""
