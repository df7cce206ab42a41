"""Layer structure: where parameters are used, and contractions inside matched layers."""
