"""The speed layer (`recsys speed`): between retrains, every sale is folded into its user's
factor vector against the current model's item factors, and that user's list is republished."""
